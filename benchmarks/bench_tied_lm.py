"""Cost of one Hessian-diagonal estimate on language models whose weights are used more than once (a tied
LM head; ALBERT's layers shared across depth) and on GPT-2's ``Conv1D`` layers: the estimator
``method="auto"`` picks, on one batch, timed, and whether it took the per-layer path or fell back to
per-sample backward passes (it warns then).

Small Hugging Face configurations with random weights (no downloads): by default 64-dim, 2 layers, a
512-token vocabulary, 32 tokens per sequence (``--width``, ``--vocab``, ``--seq``); causal LMs scored per
token (``TokenLoss(shift=True)``), ALBERT as a
sequence classifier. The estimate's values go in the JSON (the squared norm of the diagonal), so that two
runs of the script on two versions of the library, with the same seeds, can be checked for equal values.

Run: ``python -m benchmarks.bench_tied_lm --json benchmarks/results/bench_tied_lm.json`` (needs the
``zoo`` extra; writes a markdown table beside the JSON). To compare with another checkout, run it with
``PYTHONPATH`` pointing there too.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import lightning_flatness
from benchmarks.common import (
    base_parser,
    command_line,
    environment,
    setup,
    timed_estimate,
    write_json_and_markdown,
)
from lightning_flatness.functional import select_parameters
from lightning_flatness.functional.estimators.method_choice import choose_method
from lightning_flatness.functional.model_io import TokenLoss

#: the models' sizes (``--vocab``, ``--seq``, ``--width`` set them)
SIZES = {"vocab": 512, "seq": 32, "width": 64}


def _common() -> dict[str, int]:
    return dict(vocab_size=SIZES["vocab"], num_hidden_layers=2, num_attention_heads=4)


def _config(config_class: str, **kw: Any) -> Any:
    import transformers

    return getattr(transformers, config_class)(**kw)


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2LMHeadModel

    cfg = _config(
        "GPT2Config",
        vocab_size=SIZES["vocab"],
        n_embd=SIZES["width"],
        n_layer=2,
        n_head=4,
        n_positions=SIZES["seq"],
    )
    return GPT2LMHeadModel(cfg)


def _opt() -> torch.nn.Module:
    from transformers import OPTForCausalLM

    width = SIZES["width"]
    cfg = _config("OPTConfig", hidden_size=width, ffn_dim=4 * width, word_embed_proj_dim=width, **_common())
    return OPTForCausalLM(cfg)


def _llama() -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    cfg = _config(
        "LlamaConfig",
        hidden_size=SIZES["width"],
        intermediate_size=4 * SIZES["width"],
        num_key_value_heads=2,
        tie_word_embeddings=True,
        **_common(),
    )
    return LlamaForCausalLM(cfg)


def _albert() -> torch.nn.Module:
    from transformers import AlbertForSequenceClassification

    width = SIZES["width"]
    sizes = dict(hidden_size=width, embedding_size=32, intermediate_size=4 * width, num_labels=5)
    cfg = _config("AlbertConfig", **sizes, **_common())
    return AlbertForSequenceClassification(cfg)


MODELS: dict[str, tuple[Callable[[], torch.nn.Module], str]] = {
    "GPT-2 (tied head, Conv1D)": (_gpt2, "lm"),
    "OPT (tied head)": (_opt, "lm"),
    "Llama (tied head)": (_llama, "lm"),
    "ALBERT (shared layers)": (_albert, "classifier"),
}


def _batch(kind: str, samples: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SIZES["vocab"], (samples, SIZES["seq"]), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    target = ids.clone() if kind == "lm" else torch.randint(0, 5, (samples,), generator=g)
    return inputs, target


def measure(name: str, samples: int, repeats: int) -> dict[str, Any]:
    build, kind = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    inputs, target = _batch(kind, samples)
    loss = TokenLoss(F.cross_entropy, shift=True) if kind == "lm" else F.cross_entropy
    choice = choose_method(model, loss, inputs, target)
    params = select_parameters(model)
    runs = [timed_estimate(model, loss, inputs, target, choice.method) for _ in range(repeats)]
    return {
        "method": choice.method,
        "quantity": choice.quantity,
        "weights": sum(p.numel() for p in params.values()),
        **runs[-1][2],
        "seconds": statistics.median(r[1] for r in runs),
        "times": [r[1] for r in runs],
        "squared_norm": float(sum(d.double().square().sum() for d in runs[-1][0].values())),
    }


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        "# Tied and shared weights: one estimate at `auto`'s choice (issue 8)",
        "",
        f"Command: `{results['command']}`  ",
        f"Library: {results['library']}  ",
        f"Machine: {env['cpu']} ({env['nproc']} cores), torch {env['torch']}, {env['threads']} thread(s).",
        "",
        "| model | selected weights | `auto` picks | path | seconds (median) | squared norm of the diagonal "
        "|",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results["models"].items():
        lines.append(
            f"| {name} | {r['weights']:,} | `{r['method']}` ({r['quantity']}) | {r['path']} | "
            f"{r['seconds']:.2f} | {r['squared_norm']:.6e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict[str, Any]:
    p = base_parser(__doc__)
    p.add_argument("--samples", type=int, default=16, help="samples in the batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", nargs="*", default=None, help="names (default: all; --quick: GPT-2)")
    for size, default in SIZES.items():
        p.add_argument(f"--{size}", type=int, default=default, help=f"{size} of the models")
    args = p.parse_args(argv)
    SIZES.update({size: getattr(args, size) for size in SIZES})
    setup(args)
    names = args.models or (["GPT-2 (tied head, Conv1D)"] if args.quick else list(MODELS))
    results: dict[str, Any] = {
        "command": command_line("benchmarks.bench_tied_lm", argv),
        "library": str(Path(lightning_flatness.__file__).resolve().parent.parent),
        "environment": environment(),
        "models": {},
    }
    for name in names:
        samples = 2 if args.quick else args.samples
        results["models"][name] = r = measure(name, samples, 1 if args.quick else args.repeats)
        print(f"{name}: {r['method']}, {r['path']}, {r['seconds']:.2f} s", flush=True)
    write_json_and_markdown(args.json, results, markdown)
    return results


if __name__ == "__main__":
    main()
