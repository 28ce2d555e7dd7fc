"""PyTorch's own sequence modules (``nn.TransformerEncoder``, ``nn.Transformer``, ``nn.LSTM``, ``nn.GRU``),
in their default sequence-first layout (``batch_first=False``): what ``method="auto"`` measures and what
one Hessian-diagonal estimate costs, beside the same weights in a batch-first twin.

Models, written as PyTorch's tutorials write them (random weights, no downloads): a token classifier on an
``nn.TransformerEncoder`` (embedding, transpose to ``(T, N, E)``, 2 encoder layers, transpose back, mean
over tokens, linear head), a sequence-to-sequence ``nn.Transformer`` (1 encoder and 1 decoder layer,
causal target mask) scored on the mean of its decoder output, and token classifiers on a one-layer
``nn.LSTM`` and ``nn.GRU`` (the last time step's output, linear head). Defaults: 64-dim, 4 heads,
feed-forward 256, a 1,000-token vocabulary, 32 tokens, 4 classes, batches of 64 (``--width``, ``--seq``,
``--samples``).

Per model and layout: the estimator ``auto`` picks (on a 4-sample batch, as the callback's dry run does),
then one estimate of that estimator on the batch, timed (median of ``--repeats``), whether it took the
per-layer path or fell back to per-sample backward passes (it warns then), and the estimate's squared norm;
for the sequence-first model also the largest relative difference of its estimate from the batch-first
twin's with the same generator (the two compute one function with one set of draws).

Run: ``python -m benchmarks.bench_torch_sequence_models --json
benchmarks/results/bench_torch_sequence_models.json`` (writes a markdown table beside the JSON). To
compare with another checkout, run it with ``PYTHONPATH`` there.
"""

from __future__ import annotations

import functools
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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

SIZES = {"width": 64, "seq": 32, "samples": 64}
VOCAB, CLASSES, HEADS = 1000, 4, 4


class EncoderClassifier(nn.Module):
    """Embedding -> ``nn.TransformerEncoder`` (2 layers) -> mean over tokens -> head."""

    def __init__(self, batch_first: bool):
        super().__init__()
        width = SIZES["width"]
        self.batch_first = batch_first
        self.embed = nn.Embedding(VOCAB, width)
        layer = nn.TransformerEncoderLayer(width, HEADS, 4 * width, dropout=0.1, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h if self.batch_first else h.transpose(0, 1)
        h = self.encoder(h)
        h = h if self.batch_first else h.transpose(0, 1)
        return self.head(h.mean(dim=1))


class Seq2Seq(nn.Module):
    """``nn.Transformer`` (1 + 1 layers) on source and target tokens (an embedding each), causal target mask,
    mean of the decoder output -> head."""

    def __init__(self, batch_first: bool):
        super().__init__()
        width = SIZES["width"]
        self.batch_first = batch_first
        self.embed, self.embed_target = nn.Embedding(VOCAB, width), nn.Embedding(VOCAB, width)
        self.transformer = nn.Transformer(width, HEADS, 1, 1, 4 * width, dropout=0.1, batch_first=batch_first)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        s, t = self.embed(src), self.embed_target(tgt)
        if not self.batch_first:
            s, t = s.transpose(0, 1), t.transpose(0, 1)
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], dtype=s.dtype)
        h = self.transformer(s, t, tgt_mask=mask)
        h = h if self.batch_first else h.transpose(0, 1)
        return self.head(h.mean(dim=1))


class RecurrentClassifier(nn.Module):
    """Embedding -> one recurrent layer (``cell``) -> output at the last time step -> head."""

    def __init__(self, batch_first: bool, cell: type = nn.LSTM):
        super().__init__()
        width = SIZES["width"]
        self.batch_first = batch_first
        self.embed = nn.Embedding(VOCAB, width)
        self.rnn = cell(width, width, batch_first=batch_first)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        out, _ = self.rnn(h if self.batch_first else h.transpose(0, 1))
        return self.head(out[:, -1] if self.batch_first else out[-1])


MODELS: dict[str, Any] = {
    "nn.TransformerEncoder classifier": EncoderClassifier,
    "nn.Transformer (encoder-decoder)": Seq2Seq,
    "nn.LSTM classifier": RecurrentClassifier,
    "nn.GRU classifier": functools.partial(RecurrentClassifier, cell=nn.GRU),
}


def _inputs(name: str, samples: int) -> tuple[Any, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (samples, SIZES["seq"]), generator=g)
    target = torch.randint(0, CLASSES, (samples,), generator=g)
    if MODELS[name] is Seq2Seq:
        return (tokens, torch.randint(0, VOCAB, (samples, SIZES["seq"]), generator=g)), target
    return tokens, target


def measure(name: str, samples: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    models = {"sequence-first": MODELS[name](batch_first=False).eval()}
    models["batch-first"] = MODELS[name](batch_first=True).eval()
    models["batch-first"].load_state_dict(models["sequence-first"].state_dict())
    inputs, target = _inputs(name, samples)
    few, few_target = _inputs(name, 4)
    out: dict[str, Any] = {}
    diags = {}
    for layout, model in models.items():
        choice = choose_method(model, F.cross_entropy, few, few_target)
        runs = [timed_estimate(model, F.cross_entropy, inputs, target, choice.method) for _ in range(repeats)]
        diags[layout] = runs[0][0]
        out[layout] = {
            "method": choice.method,
            "quantity": choice.quantity,
            "weights": sum(p.numel() for p in select_parameters(model).values()),
            **runs[0][2],
            "seconds": statistics.median(r[1] for r in runs),
            "times": [r[1] for r in runs],
            "squared_norm": float(sum(d.double().square().sum() for d in runs[0][0].values())),
        }
    if out["sequence-first"]["method"] == out["batch-first"]["method"]:
        a, b = diags["sequence-first"], diags["batch-first"]
        scale = max(float(v.abs().max()) for v in b.values())
        out["max_difference_relative_to_largest_entry"] = (
            max(float((a[k] - b[k]).abs().max()) for k in b) / scale
        )
    return out


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        "# PyTorch sequence modules, sequence-first and batch-first: one estimate at `auto`'s choice "
        "(issue 8)",
        "",
        f"Command: `{results['command']}`  ",
        f"Library: {results['library']}  ",
        f"Machine: {env['cpu']} ({env['nproc']} cores), torch {env['torch']}, {env['threads']} thread(s).  ",
        f"Sizes: {results['sizes']}",
        "",
        "| model | layout | selected weights | `auto` picks | path | seconds (median) | squared norm of the "
        "diagonal | difference from the batch-first twin |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["models"].items():
        for layout in ("sequence-first", "batch-first"):
            x = r[layout]
            diff = r.get("max_difference_relative_to_largest_entry")
            diff_text = (
                "" if layout == "batch-first" else ("(other method)" if diff is None else f"{diff:.1e}")
            )
            lines.append(
                f"| {name} | {layout} | {x['weights']:,} | `{x['method']}` ({x['quantity']}) | {x['path']} | "
                f"{x['seconds']:.2f} | {x['squared_norm']:.6e} | {diff_text} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict[str, Any]:
    p = base_parser(__doc__)
    p.add_argument("--repeats", type=int, default=3)
    for size, default in SIZES.items():
        p.add_argument(f"--{size}", type=int, default=default)
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.seq, args.samples, args.repeats = 16, 6, 4, 1
    SIZES.update({size: getattr(args, size) for size in SIZES})
    setup(args)
    results: dict[str, Any] = {
        "command": command_line("benchmarks.bench_torch_sequence_models", argv),
        "library": str(Path(lightning_flatness.__file__).resolve().parent.parent),
        "environment": environment(),
        "sizes": dict(SIZES),
        "models": {},
    }
    for name in MODELS:
        results["models"][name] = r = measure(name, SIZES["samples"], args.repeats)
        for layout in ("sequence-first", "batch-first"):
            print(
                f"{name}, {layout}: {r[layout]['method']}, {r[layout]['path']}, {r[layout]['seconds']:.2f} s"
            )
    write_json_and_markdown(args.json, results, markdown)
    return results


if __name__ == "__main__":
    main()
