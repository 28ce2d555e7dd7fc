"""Cost of one measurement of a mixture-of-experts language model at the defaults (issue 8).

Hugging Face's Qwen2-MoE and Mixtral as ``transformers`` builds them (experts by ``torch._grouped_mm``), and
Llama 4 (its own layer: every expert on every token by ``torch.bmm``; top 1, a shared expert), random
weights: 64-dim, 2 layers, 8 experts of width 128, top 2, vocabulary 512, 32 tokens per sequence;
``--samples`` sequences in batches of 8, ``measure_sharpness`` at its defaults (``method="auto"``,
eq. 20 per token), one thread. Reported per model: the method ``auto`` chose, whether the estimator
fell back to per-sample backward passes (its warning), the seconds of the whole measurement (median of
``--repeats``) and the normalized sharpness.

Run from the repository root: ``python -m benchmarks.bench_moe --json benchmarks/results/bench_moe.json``;
to compare two checkouts, run this file from each (``PYTHONPATH`` at the checkout).
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from typing import Any

import torch

from benchmarks.bench_solver import machine
from benchmarks.common import base_parser, setup, write_json

MODELS = ("qwen2_moe", "mixtral", "llama4")


def build(kind: str) -> torch.nn.Module:
    import transformers

    common = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=512,
        max_position_embeddings=64,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    if kind == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(
            num_experts=8, moe_intermediate_size=128, shared_expert_intermediate_size=128, **common
        )
        return transformers.Qwen2MoeForCausalLM(config).eval()
    if kind == "llama4":
        config = transformers.Llama4TextConfig(
            num_local_experts=8,
            intermediate_size=128,
            intermediate_size_mlp=128,
            layer_types=["full_attention"] * 2,
            no_rope_layers=[1, 1],
            **{**common, "num_experts_per_tok": 1},
        )
        return transformers.Llama4ForCausalLM(config).eval()
    config = transformers.MixtralConfig(num_local_experts=8, intermediate_size=128, **common)
    return transformers.MixtralForCausalLM(config).eval()


def batches(samples: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (samples, 32), generator=g)
    return [{"input_ids": ids[i : i + 8], "labels": ids[i : i + 8]} for i in range(0, samples, 8)]


def run(kind: str, samples: int, repeats: int) -> dict[str, Any]:
    from lightning_flatness.measure import measure_sharpness

    model, data = build(kind), batches(samples)
    seconds, per_sample, result = [], False, None
    for _ in range(repeats):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            result = measure_sharpness(model, data, generator=torch.Generator().manual_seed(0))
            seconds.append(time.perf_counter() - start)
        per_sample = per_sample or any(
            "per-layer contractions do not apply" in str(w.message) for w in caught
        )
    assert result is not None
    return {
        "model": kind,
        "method": result.choice.method,
        "quantity": result.choice.quantity,
        "per_sample_path": per_sample,
        "seconds": statistics.median(seconds),
        "all_seconds": seconds,
        "normalized": float(result.values["normalized"]),
        "normalized_stderr": float(result.values["normalized_stderr"]),
        "tensors": sum(1 for k in result.values if k.startswith("hessian_trace/")),
    }


def main(argv=None) -> dict[str, Any]:
    p = base_parser(__doc__)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = p.parse_args(argv)
    setup(args)
    command = " ".join(["python -m benchmarks.bench_moe"] + list(argv if argv is not None else sys.argv[1:]))
    rows = [run(kind, args.samples, 1 if args.quick else args.repeats) for kind in args.models]
    print(f"## One measurement of a mixture-of-experts LM at the defaults\n\nCommand: `{command}`  ")
    print(f"Machine: {machine()}; torch {torch.__version__}; {torch.get_num_threads()} thread(s)\n")
    print("| model | auto | per-sample path | seconds (median) | normalized +- s.e. | tensors |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['method']} ({r['quantity']}) | {'yes' if r['per_sample_path'] else 'no'} "
            f"| {r['seconds']:.2f} | {r['normalized']:.4g} +- {r['normalized_stderr']:.2g} | {r['tensors']} |"
        )
    results = {"command": command, "samples": args.samples, "rows": rows}
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
