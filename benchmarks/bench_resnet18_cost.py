"""Estimator cost and accuracy on a CIFAR-size ResNet-18 at the callback's defaults (issue 8, target 3):
``exact`` and ``gauss_newton_mc`` against the sketched Gauss-Newton diagonal (``gauss_newton_sketch``).

Setting: ``torchvision.models.resnet18(num_classes=K)`` for K = 10 and 1,000, random weights, eval mode,
float32, random ``3x32x32`` inputs and random labels, the callback's 512 samples in 8 batches of 64, the
eq. 20 loss (the callback's default), one thread.

1. **Cost** (``--parts cost``): per method, the estimate of ``--batches`` batches of 64 (scaled to the 8
   batches of a measurement: a sum of independent per-batch costs), timed round-robin with one training
   step (forward, cross-entropy, backward, SGD momentum 0.9 step at batch 128, train mode) in the same
   loop, ``--repeats`` times; medians. Reported: seconds per measurement (estimator only, without
   ``compute()``, which is timed in part 2), the same in training steps and in % of a 390-step epoch,
   and the ratio 1000/10 classes. ``auto`` is what ``choose_method`` picks.
2. **Accuracy** (``--parts accuracy``): all 8 batches, pooled in a ``NormalizedSharpness`` (8 replicate
   slots) as the callback pools them: the total normalized sharpness (eq. 17), its jackknife s.e. and
   the Hessian trace (eq. 5) of ``exact`` (K = 10: the reference, zero estimator noise on the same
   samples) and of the stochastic estimators over ``--seeds`` seeds of their draws. The difference to
   ``exact`` on the same samples is pure estimator error (noise plus bias); K = 1,000 has no affordable
   exact reference (80 s per sample), so the two unbiased estimators are compared with each other.
3. **Convergence at 1,000 classes** (``--parts convergence``): one batch of 64, the measures of the
   default estimators and of sketches with more mixtures and draws (less noise, same expectation): the
   noise-free value is approached from above, which shows the noise bias of each default.

Run: ``python -W ignore -m benchmarks.bench_resnet18_cost --json benchmarks/results/bench_resnet18_cost.json``
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import base_parser, environment, run_timed, setup

EPOCH_STEPS = 390
TRAIN_BATCH = 128
BATCH = 64
BATCHES = 8


def resnet18(num_classes: int):
    import torchvision

    return torchvision.models.resnet18(num_classes=num_classes)


def data(n: int, num_classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def estimate(method: str, model, x, y, generator) -> dict:
    """``{name: (1, *shape)}``: one group's estimate. ``method`` is a registered name, or
    ``gauss_newton_sketch:B:S[:D]`` for the sketch with ``chunk_size=B``, ``num_sketches=S`` (and
    ``num_mc_samples=D``)."""
    from lightning_flatness.functional.estimators import hessian_diagonal_groups
    from lightning_flatness.functional.estimators.gauss_newton_sketch import gauss_newton_sketch_diagonal
    from lightning_flatness.functional.losses import normalized_softmax_cross_entropy
    from lightning_flatness.functional.parameters import select_parameters

    name, *options = method.split(":")
    if options:
        chunk_size, num_sketches, *draws = (int(o) for o in options)
        est = gauss_newton_sketch_diagonal(
            model,
            normalized_softmax_cross_entropy,
            x,
            y,
            select_parameters(model),
            generator=generator,
            chunk_size=chunk_size,
            num_sketches=num_sketches,
            num_mc_samples=draws[0] if draws else None,
        )
        return {n: d.unsqueeze(0) for n, d in est.items()}
    groups = hessian_diagonal_groups(
        model, normalized_softmax_cross_entropy, x, y, method=name, num_groups=1, generator=generator
    ).groups
    return dict(groups)


def auto_method(model, x, y) -> str:
    from lightning_flatness.functional.estimators.method_choice import choose_method
    from lightning_flatness.functional.losses import normalized_softmax_cross_entropy

    return choose_method(model, normalized_softmax_cross_entropy, x[:2], y[:2]).method


def cost(args) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in args.classes:
        net = resnet18(k).eval()
        train_net = resnet18(k)
        opt = torch.optim.SGD(train_net.parameters(), lr=0.01, momentum=0.9)
        x, y = data(BATCH * args.batches, k, args.seed)
        xt, yt = data(TRAIN_BATCH, k, args.seed + 1)
        auto = auto_method(net, x, y)
        methods = [m for m in args.methods if not (m == "exact" and k > 32)]
        methods = list(dict.fromkeys([*methods, auto]))
        times: dict[str, list[float]] = {m: [] for m in ["train_step", *methods]}
        loads = [os.getloadavg()[0]]
        for _ in range(args.repeats):
            t = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(train_net(xt), yt).backward()
            opt.step()
            times["train_step"].append(time.perf_counter() - t)
            for method in methods:
                gen = torch.Generator().manual_seed(0)
                t = time.perf_counter()
                for b in range(args.batches):
                    sl = slice(b * BATCH, (b + 1) * BATCH)
                    estimate(method, net, x[sl], y[sl], gen)
                times[method].append((time.perf_counter() - t) * BATCHES / args.batches)
            loads.append(os.getloadavg()[0])
        step = statistics.median(times["train_step"])
        rows = {}
        for method in methods:
            sec = statistics.median(times[method])
            rows[method] = {
                "seconds": sec,
                "train_steps": sec / step,
                "epoch_percent": 100 * sec / (step * EPOCH_STEPS),
                "all_seconds": times[method],
            }
            print(
                f"K={k:5d} {method:20s} {sec:7.2f} s = {sec / step:6.1f} steps = "
                f"{100 * sec / (step * EPOCH_STEPS):5.1f}% of an epoch",
                flush=True,
            )
        out[str(k)] = {"auto": auto, "train_step_seconds": step, "methods": rows, "loadavg_1min": loads}
        print(f"K={k:5d} auto -> {auto}; training step {step:.3f} s; load {loads}", flush=True)
    if len(args.classes) == 2:
        lo, hi = (out[str(k)] for k in sorted(args.classes))
        for method in set(lo["methods"]) & set(hi["methods"]):
            r = hi["methods"][method]["seconds"] / lo["methods"][method]["seconds"]
            rs = hi["methods"][method]["train_steps"] / lo["methods"][method]["train_steps"]
            print(f"ratio {max(args.classes)}/{min(args.classes)} {method}: {r:.2f}x ({rs:.2f}x in steps)")
            out.setdefault("ratios", {})[method] = {"seconds": r, "train_steps": rs}
        auto_lo, auto_hi = lo["auto"], hi["auto"]
        if auto_lo in lo["methods"] and auto_hi in hi["methods"]:
            r = hi["methods"][auto_hi]["train_steps"] / lo["methods"][auto_lo]["train_steps"]
            print(f"ratio auto ({auto_hi} / {auto_lo}) in training steps: {r:.2f}x")
            out.setdefault("ratios", {})["auto"] = {"train_steps": r}
    return out


def accuracy(args) -> dict[str, Any]:
    from lightning_flatness.functional.parameters import select_parameters
    from lightning_flatness.metric import NormalizedSharpness

    out: dict[str, Any] = {}
    for k in args.classes:
        net = resnet18(k).eval()
        x, y = data(BATCH * BATCHES, k, args.seed)
        weights = {n: p.detach() for n, p in select_parameters(net).items()}
        rows = []
        methods = [m for m in args.accuracy_methods if not (m == "exact" and k > 32)]
        for method in methods:
            for seed in range(1 if method == "exact" else args.seeds):
                gen = torch.Generator().manual_seed(seed)
                t = time.perf_counter()
                groups = [
                    estimate(method, net, x[b * BATCH : (b + 1) * BATCH], y[b * BATCH : (b + 1) * BATCH], gen)
                    for b in range(BATCHES)
                ]
                est_s = time.perf_counter() - t
                metric = NormalizedSharpness({n: w.shape for n, w in weights.items()}, num_replicates=BATCHES)
                for g in groups:
                    metric.update(g, weights, [BATCH])
                t = time.perf_counter()
                r = metric.compute()
                row = {
                    "method": method,
                    "seed": seed,
                    "estimator_seconds": est_s,
                    "compute_seconds": time.perf_counter() - t,
                    **{
                        key: float(r[key])
                        for key in (
                            "normalized",
                            "normalized_stderr",
                            "hessian_trace",
                            "hessian_trace_stderr",
                        )
                    },
                }
                rows.append(row)
                rel = row["normalized_stderr"] / row["normalized"]
                print(
                    f"K={k:5d} {method:20s} seed {seed}: normalized {row['normalized']:.5g} "
                    f"+- {row['normalized_stderr']:.3g} ({rel:.1%}), "
                    f"trace {row['hessian_trace']:.5g} +- {row['hessian_trace_stderr']:.3g}; "
                    f"estimator {est_s:.1f} s, compute {row['compute_seconds']:.1f} s",
                    flush=True,
                )
        ref = next((r for r in rows if r["method"] == "exact"), None)
        summary = {}
        for method in methods:
            vals = [r for r in rows if r["method"] == method]
            entry = {
                "normalized_mean": statistics.fmean(r["normalized"] for r in vals),
                "normalized_rel_se_mean": statistics.fmean(
                    r["normalized_stderr"] / r["normalized"] for r in vals
                ),
            }
            if ref is not None:
                errs = [r["normalized"] / ref["normalized"] - 1 for r in vals]
                entry["normalized_rel_error_vs_exact"] = errs
                entry["trace_rel_error_vs_exact"] = [
                    r["hessian_trace"] / ref["hessian_trace"] - 1 for r in vals
                ]
                print(
                    f"K={k:5d} {method:20s} vs exact on the same samples: normalized "
                    + ", ".join(f"{e:+.1%}" for e in errs)
                )
            summary[method] = entry
        out[str(k)] = {"rows": rows, "summary": summary}
    return out


def convergence(args) -> dict[str, Any]:
    """One batch of 64 at the largest ``--classes``: the measures of each ``--convergence-methods`` spec
    over ``--seeds`` seeds; sketches with many mixtures and draws approach the noise-free value."""
    from lightning_flatness.functional.measures import sharpness_measures
    from lightning_flatness.functional.parameters import select_parameters

    k = max(args.classes)
    net = resnet18(k).eval()
    x, y = data(BATCH, k, args.seed)
    weights = {n: p.detach() for n, p in select_parameters(net).items()}
    rows = []
    for method in args.convergence_methods:
        for seed in range(args.seeds):
            t = time.perf_counter()
            est = estimate(method, net, x, y, torch.Generator().manual_seed(seed))
            seconds = time.perf_counter() - t
            r = sharpness_measures(weights, {n: d[0] for n, d in est.items()})
            row = {
                "method": method,
                "seed": seed,
                "seconds": seconds,
                "normalized": float(r["normalized"]),
                "hessian_trace": float(r["hessian_trace"]),
            }
            rows.append(row)
            print(
                f"K={k:5d} one batch of {BATCH}: {method:28s} seed {seed}: normalized "
                f"{row['normalized']:.5g}, trace {row['hessian_trace']:.5g} ({seconds:.1f} s)",
                flush=True,
            )
    return {"classes": k, "rows": rows}


def run(args) -> dict[str, Any]:
    out: dict[str, Any] = {"command": args.command, "loadavg_start": os.getloadavg()}
    if "cost" in args.parts:
        out["cost"] = cost(args)
    if "accuracy" in args.parts:
        out["accuracy"] = accuracy(args)
    if "convergence" in args.parts:
        out["convergence"] = convergence(args)
    out["loadavg_end"] = os.getloadavg()
    return out


def main(argv=None) -> dict[str, Any]:
    parser = base_parser(__doc__)
    parser.add_argument(
        "--parts", nargs="*", default=["cost", "accuracy"], choices=["cost", "accuracy", "convergence"]
    )
    parser.add_argument("--classes", nargs="*", type=int, default=[10, 1000])
    parser.add_argument(
        "--methods",
        nargs="*",
        default=["exact", "gauss_newton_mc", "gauss_newton_sketch"],
        help="cost part; a registered name or gauss_newton_sketch:B:S (chunk_size B, num_sketches S)",
    )
    parser.add_argument(
        "--accuracy-methods", nargs="*", default=["exact", "gauss_newton_mc", "gauss_newton_sketch"]
    )
    parser.add_argument(
        "--convergence-methods",
        nargs="*",
        default=[
            "gauss_newton_sketch",
            "gauss_newton_mc",
            "gauss_newton_sketch:1:8:16",
            "gauss_newton_sketch:1:32:64",
        ],
    )
    parser.add_argument("--batches", type=int, default=2, help="batches of 64 timed per repeat (cost part)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the draws (accuracy part)")
    args = parser.parse_args(argv)
    if args.quick:
        args.classes, args.batches, args.repeats, args.parts = [10], 1, 1, ["cost"]
        args.methods = ["gauss_newton_sketch"]
    args.command = "python -m benchmarks.bench_resnet18_cost " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    setup(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = run_timed(run, args)
    if args.json:
        results["environment"] = environment()
        from benchmarks.common import write_json

        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
