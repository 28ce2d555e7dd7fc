"""Benchmark: ``NormalizedSharpness.compute()`` against one pooled eq. 17 solve of the same tensors.

``compute()`` evaluates every measure on the pooled mean, the ``R = 8`` leave-one-out means and the
two halves (``R + 3`` eq. 17 problems per weight tensor). The target of issue 9 is
``compute() <= 2x`` one pooled solve (``solve_normalized_sharpness(W, pooled mean)`` per tensor,
certified to 1e-11, the value the metric reports). Cases:

- ``mlp``: the paper's MLP 40-100-100-100-10 (:func:`lightning_flatness.reference_models.mlp`)
  trained for 300 Adam steps on MNIST-1D, curvature from the exact method, 8 groups of 64 samples
  (``hessian_diagonal_groups``): realistic curvature, signed (eq. 20's loss Hessian is indefinite, so
  its Gauss-Newton diagonal has negative entries: more than half of them here).
- ``wrn16_4`` / ``wrn16_4_signed``: the 17 WRN-16-4 shapes with heavy-tailed synthetic curvature
  (``benchmarks.bench_solver.make_layer``, scenario ``"channels"``), 8 replicates each the pooled
  diagonal times ``1 + 0.5 N(0, 1)``: a non-negative pooled diagonal (``|h|``; the factor makes 2.3% of
  the replicates' entries negative), and one with 31% negative entries (clipped).
- ``resnet18``: the 21 weight tensors of torchvision's ``resnet18(num_classes=10)`` (random weights),
  heavy-tailed curvature of the same kind.
- ``resnet18_sketch``: the same network's curvature as the callback measures it at its defaults
  (512 random images, the Gauss-Newton sketch, 8 batches of 64): units alive in one batch only.
  Signed, as the MLP's.
- ``resnet18_cross_entropy``: the same with ``loss_fn=F.cross_entropy`` (a convex loss: a
  non-negative Gauss-Newton diagonal, nothing to clip).

Each case runs ``compute()`` with the default ``jackknife="linearized"`` (leave-one-out values to
first order at the pooled minimiser) and with ``jackknife="solved"`` (every replicate solved), and
reports how far the linearized standard error is from the solved one (total, and the worst tensor).

Timing: one intra-op thread; per case, ``--repeats`` interleaved pairs (pooled solves, then
``compute()``), process CPU time (the machine is shared), medians; the ratio is of the medians,
from this one run. Run ``python -m benchmarks.bench_compute_ratio`` from the repository root;
``--quick`` is a smoke test; ``--json PATH`` writes the raw results.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from benchmarks.bench_solver import machine, make_layer, wrn16_4_shapes
from benchmarks.common import base_parser, setup, write_json
from lightning_flatness.functional.solvers import solve_normalized_sharpness
from lightning_flatness.metric import NormalizedSharpness

F64 = torch.float64
NUM_REPLICATES = 8


def mlp_case(seed: int, quick: bool) -> tuple[dict, dict]:
    """Weights and 8 exact Hessian-diagonal groups of the paper's MLP after a short training run."""
    from lightning_flatness.datasets import make_mnist1d
    from lightning_flatness.functional import hessian_diagonal_groups, normalized_softmax_cross_entropy
    from lightning_flatness.reference_models import mlp

    torch.manual_seed(seed)
    data = make_mnist1d(seed=seed)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = data.x_train, data.y_train
    for _step in range(20 if quick else 300):
        idx = torch.randint(0, x.shape[0], (128,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model = model.double().eval()
    n = 8 * 64
    est = hessian_diagonal_groups(
        model,
        normalized_softmax_cross_entropy,
        x[:n].double(),
        y[:n],
        method="exact",
        num_groups=NUM_REPLICATES,
    )
    weights = {k: p.detach() for k, p in model.named_parameters() if p.ndim >= 2}
    groups = {k: est.groups[k] for k in weights}
    return weights, {"groups": groups, "num_samples": est.group_sizes}


def synthetic_case(shapes, seed: int, signed: bool, real_weights=None) -> tuple[dict, dict]:
    """Heavy-tailed curvature (``make_layer``, ``"channels"``) and 8 replicates times ``1 + 0.5 N(0, 1)``."""
    g = torch.Generator().manual_seed(seed)
    weights, groups = {}, {}
    for i, s in enumerate(shapes):
        w, h = make_layer(tuple(s), "channels", g)
        name = f"t{i}" if real_weights is None else real_weights[i][0]
        if real_weights is not None:
            w = real_weights[i][1]
        h = h if signed else h.abs()
        weights[name] = w
        groups[name] = h[None] * (1 + 0.5 * torch.randn((NUM_REPLICATES, *h.shape), generator=g, dtype=F64))
    return weights, {"groups": groups, "num_samples": [32] * NUM_REPLICATES}


def resnet18_weights(seed: int) -> list[tuple[str, torch.Tensor]]:
    from torchvision.models import resnet18

    torch.manual_seed(seed)
    model = resnet18(num_classes=10)
    return [(k, p.detach().to(F64)) for k, p in model.named_parameters() if p.ndim >= 2]


def resnet18_sketch_case(seed: int, quick: bool, loss_fn=None) -> tuple[dict, dict]:
    """torchvision ResNet-18 (10 classes, random weights) on 512 random 3x32x32 images (64 in ``quick``),
    curvature from what the callback runs at its defaults (``SharpnessMeasurement``: auto picks the
    Gauss-Newton sketch here), one batch of 64 per replicate slot: the realistic hard case (units alive
    in one batch only, large sampling noise)."""
    from benchmarks.bench_callback_resnet18 import data, resnet18
    from lightning_flatness.measure import SharpnessMeasurement

    torch.manual_seed(seed)
    model = resnet18(10).float().eval()
    n, bs = (64, 8) if quick else (512, 64)
    x, y = data(n, 10, seed)
    m = SharpnessMeasurement(model, generator=torch.Generator().manual_seed(seed), loss_fn=loss_fn)
    weights = {k: w.detach().to(F64) for k, w in m.weights.items() if w.ndim >= 2}
    groups: dict = {k: [] for k in weights}
    sizes = []
    for start in range(0, n, bs):
        est = m.estimate(x[start : start + bs], y[start : start + bs])
        for k in weights:
            groups[k].append(est.mean()[k].to(F64))
        sizes.append(int(est.group_sizes.sum()))
    return weights, {"groups": {k: torch.stack(v) for k, v in groups.items()}, "num_samples": sizes}


def _stderr_agreement(linear: dict, solved: dict) -> dict:
    """Relative difference of the linearized from the solved standard errors: total and worst tensor."""
    keys = [k for k in solved if k.startswith("normalized_stderr/") and float(solved[k]) > 0]
    per_tensor = [abs(float(linear[k]) / float(solved[k]) - 1) for k in keys]
    return {
        "stderr_solved": float(solved["normalized_stderr"]),
        "stderr_linearized": float(linear["normalized_stderr"]),
        "stderr_rel_diff_total": float(linear["normalized_stderr"]) / float(solved["normalized_stderr"]) - 1,
        "stderr_rel_diff_worst_tensor": max(per_tensor, default=0.0),
        "half_shift": float(solved["normalized_half_shift"]),
    }


def time_case(name: str, weights: dict, data: dict, repeats: int) -> dict:
    shapes = {n: w.shape for n, w in weights.items()}
    metrics = {
        mode: NormalizedSharpness(shapes, num_replicates=NUM_REPLICATES, jackknife=mode)
        for mode in ("linearized", "solved")
    }
    for metric in metrics.values():
        metric.update(data["groups"], weights, data["num_samples"])
    counts = torch.as_tensor(data["num_samples"], dtype=F64)
    pooled = {
        n: torch.einsum("g,g...->...", counts, g.to(F64)) / counts.sum() for n, g in data["groups"].items()
    }

    def solve():
        return [solve_normalized_sharpness(weights[n], pooled[n]) for n in weights]

    pooled_value = float(sum(sol.value for sol in solve()))
    outs = {mode: metric.compute() for mode, metric in metrics.items()}  # warm-up
    t_pooled: list[float] = []
    t_compute: dict[str, list[float]] = {mode: [] for mode in metrics}
    for _ in range(repeats):  # interleaved; CPU time of this process (the machine is shared)
        start = time.process_time()
        solve()
        t_pooled.append(time.process_time() - start)
        for mode, metric in metrics.items():
            start = time.process_time()
            outs[mode] = metric.compute()
            t_compute[mode].append(time.process_time() - start)
    p = statistics.median(t_pooled)
    c = {mode: statistics.median(t) for mode, t in t_compute.items()}
    out = outs["linearized"]
    return {
        "case": name,
        "tensors": len(weights),
        "parameters": sum(w.numel() for w in weights.values()),
        "pooled_ms": p * 1e3,
        "compute_ms": c["linearized"] * 1e3,
        "ratio": c["linearized"] / p,
        "compute_solved_ms": c["solved"] * 1e3,
        "ratio_solved": c["solved"] / p,
        "normalized": float(out["normalized"]),
        "normalized_of_pooled_solves": pooled_value,
        "normalized_stderr": float(out["normalized_stderr"]),
        "normalized_half_shift": float(out["normalized_half_shift"]),
        **_stderr_agreement(out, outs["solved"]),
    }


def main(argv=None) -> dict:
    p = base_parser(__doc__)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument(
        "--cases", default="mlp,wrn16_4,wrn16_4_signed,resnet18,resnet18_sketch,resnet18_cross_entropy"
    )
    args = p.parse_args(argv)
    setup(args)
    if args.quick:
        args.repeats = 1
    cli = " ".join(
        ["python -m benchmarks.bench_compute_ratio"] + list(argv if argv is not None else sys.argv[1:])
    )
    print("## `NormalizedSharpness.compute()` / one pooled solve (issue 9)\n")
    print(f"Command: `{cli}`  ")
    print(
        f"Machine: {machine()}; torch {torch.__version__}; {torch.get_num_threads()} thread(s); load "
        f"average before the run {', '.join(f'{x:.1f}' for x in os.getloadavg())}\n"
    )
    wrn = wrn16_4_shapes()[: 4 if args.quick else None]
    builders = {
        "mlp": lambda: mlp_case(args.seed, args.quick),
        "wrn16_4": lambda: synthetic_case(wrn, args.seed, signed=False),
        "wrn16_4_signed": lambda: synthetic_case(wrn, args.seed, signed=True),
        "resnet18_sketch": lambda: resnet18_sketch_case(args.seed, args.quick),
        "resnet18_cross_entropy": lambda: resnet18_sketch_case(
            args.seed, args.quick, torch.nn.functional.cross_entropy
        ),
        "resnet18": lambda: synthetic_case(
            [tuple(w.shape) for _, w in resnet18_weights(args.seed)][: 4 if args.quick else None],
            args.seed,
            signed=True,
            real_weights=resnet18_weights(args.seed),
        ),
    }
    rows = []
    for name in args.cases.split(","):
        weights, data = builders[name]()
        rows.append(time_case(name, weights, data, args.repeats))
        r = rows[-1]
        print(
            f"{name}: pooled {r['pooled_ms']:.1f} ms, compute {r['compute_ms']:.1f} ms ({r['ratio']:.2f}x), "
            f"solved replicates {r['compute_solved_ms']:.1f} ms ({r['ratio_solved']:.2f}x)"
        )
    print("\nProcess CPU time, 1 thread, median of interleaved repeats:\n")
    print(
        "| case | tensors | parameters | one pooled solve | `compute()`, linearized jackknife (default) "
        "| ratio | `compute()`, solved replicates | ratio | s.e. solved / linearized (total, % of value) "
        "| s.e. difference: total, worst tensor |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        v = r["normalized"]
        print(
            f"| {r['case']} | {r['tensors']} | {r['parameters']:,} | {r['pooled_ms']:.1f} ms "
            f"| {r['compute_ms']:.1f} ms | {r['ratio']:.2f}x | {r['compute_solved_ms']:.1f} ms "
            f"| {r['ratio_solved']:.2f}x | {100 * r['stderr_solved'] / v:.3f}% / "
            f"{100 * r['stderr_linearized'] / v:.3f}% | {100 * r['stderr_rel_diff_total']:+.2f}%, "
            f"{100 * r['stderr_rel_diff_worst_tensor']:.2f}% |"
        )
    results = {"rows": rows, "repeats": args.repeats}
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
