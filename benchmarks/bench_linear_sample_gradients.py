"""Benchmark: per-sample gradients of a Linear layer on many positions, the two ways the rules form them.

``one product``: the output gradients ``(K, N, P, O)`` copied into ``(N, K * O, P)`` (a transposing copy),
then one batched product over the samples of each chunk (``LayerRule.factors`` and ``torch.matmul``, as the
contractions did before round 14). ``sample by sample``: one batched product over the ``K`` columns per
sample, reading the gradients as they lie (``layer_rules.base.samplewise_gradients``). Both in chunks of
``CHUNK_ELEMENTS`` per-sample-gradient entries, as :func:`~lightning_flatness.functional.estimators.
layer_rules.contraction.factor_contraction` takes them; each shape is ``(K columns, N samples, P positions,
O outputs, I inputs)``: transformer layers of ViT-B size, a tiny one, and a language-model head with the
vocabulary of GPT-2 (``K = 2``: one group of draws; ``K = 18``: eq. 20's columns of all 8 default draws).
Medians of interleaved repeats (``benchmarks.common.interleaved_times``).

Run from the repository root: ``python -m benchmarks.bench_linear_sample_gradients --json PATH``; ``--quick``
is a smoke test.
"""

from __future__ import annotations

import torch

from benchmarks.common import base_parser, interleaved_times, setup, write_json
from lightning_flatness.functional.estimators.layer_rules.base import samplewise_gradients
from lightning_flatness.functional.estimators.layer_rules.contraction import CHUNK_ELEMENTS

SHAPES = {
    "ViT-B qkv (K 2, N 8, P 197, O 2304, I 768)": (2, 8, 197, 2304, 768),
    "ViT-B projection (K 2, N 8, P 197, O 768, I 768)": (2, 8, 197, 768, 768),
    "tiny (K 4, N 16, P 65, O 192, I 192)": (4, 16, 65, 192, 192),
    "LM head, one group of draws (K 2, N 4, P 128, O 50257, I 64)": (2, 4, 128, 50257, 64),
    "LM head, all draws (K 18, N 2, P 128, O 50257, I 64)": (18, 2, 128, 50257, 64),
}
QUICK = {"tiny (K 2, N 4, P 16, O 64, I 32)": (2, 4, 16, 64, 32)}


def _ways(k: int, n: int, p: int, o: int, i: int):
    grad, a = torch.randn(k, n, p, o), torch.randn(n, p, i)
    step = max(1, CHUNK_ELEMENTS // (k * o * i))

    def one_product() -> None:
        g = grad.permute(1, 0, 3, 2).reshape(n, k * o, p)  # the transposing copy of LayerRule.factors
        for start in range(0, n, step):
            torch.matmul(g[start : start + step], a[start : start + step])

    def sample_by_sample() -> None:
        for start in range(0, n, step):
            samplewise_gradients(a, grad, slice(start, start + step))

    reference = torch.matmul(grad.permute(1, 0, 3, 2).reshape(n, k * o, p)[:1], a[:1]).reshape(k, o, i)
    difference = float((samplewise_gradients(a, grad, slice(0, 1))[0] - reference).abs().max())
    return {"one product": one_product, "sample by sample": sample_by_sample}, difference


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
