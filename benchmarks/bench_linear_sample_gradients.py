"""Benchmark: per-sample gradients of a Linear layer on many positions, the two ways the rules form them.

The library's own contraction of one Linear call (``layer_rules.contraction.factor_contraction``: per-sample
gradients in chunks of ``CHUNK_ELEMENTS`` entries, squared and summed with the signs), with
``layer_rules.base.SAMPLEWISE_MIN_ENTRIES`` set so that it takes either path: ``one product`` (the output
gradients ``(K, N, P, O)`` copied into ``LinearRule.factors``' ``(N, K * O, P)`` layout, a transposing copy,
then one batched product over the samples of each chunk: the only path before round 14) or ``sample by
sample`` (one batched product over the ``K`` columns per sample, reading the gradients as they lie:
``samplewise_gradients``). Each shape is ``(K columns, N samples, P positions, O outputs, I inputs)``:
transformer layers of ViT-B size, a tiny one, and a language-model head with the vocabulary of GPT-2
(``K = 2``: one group of draws; ``K = 18``: eq. 20's columns of all 8 default draws). Medians of
interleaved repeats (``benchmarks.common.interleaved_times``).

Run from the repository root: ``python -m benchmarks.bench_linear_sample_gradients --json PATH``; ``--quick``
is a smoke test.
"""

from __future__ import annotations

import torch

from benchmarks.common import base_parser, interleaved_times, setup, write_json
from lightning_flatness.functional.estimators.layer_rules import LAYER_RULES, LayerCall
from lightning_flatness.functional.estimators.layer_rules import base as rules_base
from lightning_flatness.functional.estimators.layer_rules.contraction import factor_contraction

SHAPES = {
    "ViT-B qkv (K 2, N 8, P 197, O 2304, I 768)": (2, 8, 197, 2304, 768),
    "ViT-B projection (K 2, N 8, P 197, O 768, I 768)": (2, 8, 197, 768, 768),
    "tiny (K 4, N 16, P 65, O 192, I 192)": (4, 16, 65, 192, 192),
    "LM head, one group of draws (K 2, N 4, P 128, O 50257, I 64)": (2, 4, 128, 50257, 64),
    "LM head, all draws (K 18, N 2, P 128, O 50257, I 64)": (18, 2, 128, 50257, 64),
}
QUICK = {"tiny (K 2, N 4, P 16, O 64, I 32)": (2, 4, 16, 64, 32)}


def _ways(k: int, n: int, p: int, o: int, i: int):
    grad, inputs = torch.randn(k, n, p, o), torch.randn(n, p, i)
    call = LayerCall("linear", "head", inputs, torch.zeros(n, p, o), "weight", None)
    signs = torch.randn(n, k).sign()
    rule = LAYER_RULES["linear"]

    def contraction(min_entries: int):
        def run() -> torch.Tensor:
            default = rules_base.SAMPLEWISE_MIN_ENTRIES
            rules_base.SAMPLEWISE_MIN_ENTRIES = min_entries
            try:
                return factor_contraction(rule, call, grad, signs, ())
            finally:
                rules_base.SAMPLEWISE_MIN_ENTRIES = default

        return run

    ways = {"one product": contraction(2**62), "sample by sample": contraction(0)}
    difference = float((ways["one product"]() - ways["sample by sample"]()).abs().max())
    return ways, difference


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    setup(args)
    rows = []
    for name, shape in (QUICK if args.quick else SHAPES).items():
        ways, difference = _ways(*shape)
        times = interleaved_times(ways, repeats=1 if args.quick else args.repeats)
        one, each = times["one product"]["median"], times["sample by sample"]["median"]
        rows.append(
            {
                "shape": name,
                "one_product_ms": 1e3 * one,
                "sample_by_sample_ms": 1e3 * each,
                "ratio": one / each,
                "max_abs_difference": difference,
            }
        )
        print(
            f"{name}: one product {1e3 * one:.1f} ms, sample by sample {1e3 * each:.1f} ms "
            f"({one / each:.2f}x), max |difference| {difference:.1e}"
        )
    out = {"rows": rows, "repeats": args.repeats}
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
