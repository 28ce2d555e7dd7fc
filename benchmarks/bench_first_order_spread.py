"""How far off is the first-order (linearized) jackknife as the relative spread grows? Evidence for
``replicate_measures.LINEARIZATION_MAX_RELATIVE_SPREAD``.

Per weight tensor of real measurements, the standard error of eq. 17 from the first-order leave-one-out
values (the replicate's objective at the pooled minimiser, with *only* the half-shift check: the
relative-spread check switched off) against the solved jackknife's (every replicate certified), and the
tensor's relative standard error (solved s.e. / value). Measurements, each at every default of
:class:`~lightning_flatness.measure.SharpnessMeasurement` (``method="auto"``, eq. 20, 8 replicate
slots):

- the tiny zoo models (``tests/zoo_models.py``: torchvision ResNet and MobileNetV3, timm ViT, Hugging
  Face BERT and GPT-2), untrained and trained (``bench_zoo_residual.train``), 8 batches of 4 samples
  drawn with replacement from a pool of 32, ``--seeds`` seeds (as ``bench_zoo_auto.py``);
- the CIFAR-size torchvision ResNet-18 (10 classes, random weights and data) on 512 samples in 8 batches
  of 64 (``--resnet``), as ``bench_callback_resnet18.py``.

Reported: per band of relative s.e., the number of tensors, the median and the largest
``|first-order s.e. / solved s.e. - 1|``, and how many of them the half-shift check alone sends to the
solver. One thread.

    python -m benchmarks.bench_first_order_spread --json benchmarks/results/bench_first_order_spread.json
"""

from __future__ import annotations

import math
import statistics
import sys
import warnings
from typing import Any

import torch

from benchmarks.common import base_parser, environment, setup, write_json

BANDS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, math.inf)


def tensor_rows(measurement: Any, label: str) -> list[dict[str, Any]]:
    """Per tensor (``ndim >= 2``) of a finished measurement: relative s.e. (solved), the first-order s.e.
    with the half-shift check only, the solved s.e., and whether that check fired."""
    import lightning_flatness.functional.replicate_measures as rm

    metric = measurement.metric
    sums, counts = metric.hessian_sums(), metric.count.to(torch.float64)
    used = [int(r) for r in torch.nonzero(counts > 0).flatten().tolist()]
    mix = rm.replicate_weights(counts, used)
    rows = []
    for name, s in sums.items():
        w = metric.weights[name].to(torch.float64) if metric.weights else None
        if w is None or w.ndim < 2:
            continue
        solved = rm.tensor_measures(w, s.to(torch.float64), mix, metric.lam, "solved")["normalized"]
        fired: list[bool] = []
        original = rm.first_order_is_off

        def half_shift_only(loo, halves, pooled, fired=fired):
            spread = rm.jackknife_standard_error(loo)
            off = bool(
                (halves.mean() - pooled).abs() > rm.LINEARIZATION_TOLERANCE * (loo.shape[0] - 1) * spread
            )
            fired.append(off)
            return off

        rm.first_order_is_off = half_shift_only
        try:
            linear = rm.tensor_measures(w, s.to(torch.float64), mix, metric.lam, "linearized")["normalized"]
        finally:
            rm.first_order_is_off = original
        loo = slice(1, 1 + len(used))
        se_solved = float(rm.jackknife_standard_error(solved[loo]))
        se_linear = float(rm.jackknife_standard_error(linear[loo]))
        value = float(solved[0])
        if not (value > 0 and se_solved > 0):
            continue
        rows.append(
            {
                "case": label,
                "tensor": name,
                "rel_se": se_solved / value,
                "se_ratio": se_linear / se_solved,
                "half_shift_fired": bool(fired and fired[0]),
            }
        )
    return rows


def zoo_rows(models: list[str], seeds: int) -> list[dict[str, Any]]:
    from benchmarks.bench_zoo_auto import make_batch
    from benchmarks.bench_zoo_residual import train
    from lightning_flatness.batch_split import split_batch
    from lightning_flatness.measure import SharpnessMeasurement
    from tests.zoo_models import TINY

    rows: list[dict[str, Any]] = []
    for name in models:
        model, (x, y) = TINY[name](n=32, seed=0)
        for state in ("untrained", "trained"):
            net = model if state == "untrained" else train(model, x, y, name, 300, 1e-2)[0].eval()
            for seed in range(seeds):
                gen = torch.Generator().manual_seed(10_000 + seed)
                m = SharpnessMeasurement(net, generator=torch.Generator().manual_seed(seed))
                for _ in range(8):
                    m.add(*split_batch(make_batch(x, y, torch.randint(0, 32, (4,), generator=gen))))
                rows += tensor_rows(m, f"{name} {state}")
            print(f"{name} {state}: {sum(r['case'] == f'{name} {state}' for r in rows)} tensors", flush=True)
    return rows


def resnet_rows(seeds: int) -> list[dict[str, Any]]:
    from benchmarks.bench_callback_resnet18 import data, resnet18
    from lightning_flatness.measure import SharpnessMeasurement

    rows: list[dict[str, Any]] = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        net = resnet18(10).eval()
        x, y = data(512, 10, seed + 1)
        m = SharpnessMeasurement(net, generator=torch.Generator().manual_seed(seed))
        for lo in range(0, 512, 64):
            m.add(x[lo : lo + 64], y[lo : lo + 64])
        rows += tensor_rows(m, "resnet18 (512 samples)")
        print(f"resnet18 seed {seed}: {len(rows)} tensors", flush=True)
    return rows


def bands(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for lo, hi in zip(BANDS, BANDS[1:]):
        inside = [r for r in rows if lo <= r["rel_se"] < hi]
        if not inside:
            continue
        errors = [abs(r["se_ratio"] - 1) for r in inside]
        kept = [abs(r["se_ratio"] - 1) for r in inside if not r["half_shift_fired"]]
        out.append(
            {
                "band": f"{lo:.0%}-{hi:.0%}" if math.isfinite(hi) else f">= {lo:.0%}",
                "tensors": len(inside),
                "half_shift_fired": sum(r["half_shift_fired"] for r in inside),
                "median_error": statistics.median(errors),
                "max_error": max(errors),
                "max_error_not_fired": max(kept) if kept else math.nan,
            }
        )
    return out


def main(argv: Any = None) -> dict[str, Any]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["resnet", "mobilenet_v3", "vit", "bert", "gpt2"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--resnet", type=int, default=2, help="seeds of the CIFAR-size ResNet-18 (0: none)")
    args = parser.parse_args(argv)
    setup(args)
    warnings.filterwarnings("ignore")
    models = args.models[:1] if args.quick else args.models
    rows = zoo_rows(models, 1 if args.quick else args.seeds)
    if not args.quick:
        rows += resnet_rows(args.resnet)
    table = bands(rows)
    print(
        "\n| relative s.e. (solved) | tensors | half-shift check fired | median error | largest error "
        "| largest, check not fired |"
    )
    print("|---|---|---|---|---|---|")
    for b in table:
        print(
            f"| {b['band']} | {b['tensors']} | {b['half_shift_fired']} | {b['median_error']:.1%} | "
            f"{b['max_error']:.1%} | {b['max_error_not_fired']:.1%} |"
        )
    out = {"command": " ".join(sys.argv), "environment": environment(), "bands": table, "rows": rows}
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
