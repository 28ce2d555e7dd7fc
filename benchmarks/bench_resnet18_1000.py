"""1,000 classes: where the estimator time goes and what accuracy each option buys (issue 8).

Target: one measurement with 1,000 classes costs at most 1.5x the 10-class one (CIFAR ResNet-18,
the callback's defaults: 512 samples in 8 batches of 64, eq. 20). Parts:

1. ``--parts tiny``: accuracy against the exact Gauss-Newton diagonal (``method="gauss_newton"``, all
   ``K`` columns; itself tested against brute force) on tiny networks with ``--tiny-classes`` outputs,
   random weights, a pool of 512 random samples in batches of 64, ``--seeds`` seeds of the draws: the
   relative L2 error of the diagonal and the bias / RMS of normalized sharpness (eq. 17) and trace.
2. ``--parts resnet``: ResNet-18 at 1,000 classes, the 512 samples of the callback: each option's
   estimate against a reference of many sketches of the exact factors on the same samples
   (``--reference-sketches``), over seeds; the estimator seconds of each.
3. ``--parts cost``: seconds of one measurement's estimator (8 batches of 64; ``--batches`` timed per
   repeat, scaled), for 10 and 1,000 classes, interleaved, with a training step (batch 128) as the unit.

Options (``spec`` strings):

- ``mc``: ``gauss_newton_mc`` at its defaults (eq. 20: 8 draws of the sampled columns + 2 exact
  columns of the rank-2 part: 18 backward columns); ``mc:D``: ``D`` draws.
- ``sketch``: ``gauss_newton_sketch`` at its defaults (above 32 outputs: the exact structured factors of
  :func:`~lightning_flatness.functional.loss_hessian_factors.loss_hessian_structure`, mixed; 4 sketches
  for eq. 20, 1 for cross-entropy); ``sketch:S``: ``S`` sketches (``2 S`` columns for eq. 20).
- ``sketch_sampled``: the previous sketch above 32 outputs: Monte-Carlo base columns (8 draws) mixed
  into 2 columns (the structure switched off).
- ``exact``: ``method="gauss_newton"`` (all ``K`` columns; tiny models only).

    python -W ignore -m benchmarks.bench_resnet18_1000 --parts tiny \
        --json benchmarks/results/bench_resnet18_1000_tiny.json
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import base_parser, environment, write_json

BATCH = 64
BATCHES = 8
TRAIN_BATCH = 128


def load_average() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


@contextlib.contextmanager
def sampled_base_columns() -> Iterator[None]:
    """The sketch as it was before the structured factors: Monte-Carlo base columns above 32 outputs."""
    from lightning_flatness.functional.estimators import gauss_newton_sketch

    saved = gauss_newton_sketch.loss_hessian_structure
    gauss_newton_sketch.loss_hessian_structure = lambda *args: None  # type: ignore[assignment]
    try:
        yield
    finally:
        gauss_newton_sketch.loss_hessian_structure = saved  # type: ignore[assignment]


def estimate(
    spec: str, model: nn.Module, loss_fn, x: Tensor, y: Tensor, params, generator
) -> dict[str, Tensor]:
    from lightning_flatness.functional.estimators.gauss_newton import gauss_newton_exact_diagonal
    from lightning_flatness.functional.estimators.gauss_newton_mc import gauss_newton_mc_diagonal
    from lightning_flatness.functional.estimators.gauss_newton_sketch import gauss_newton_sketch_diagonal

    name, *opt = spec.split(":")
    if name == "exact":
        return gauss_newton_exact_diagonal(model, loss_fn, x, y, params)
    if name == "mc":
        draws = int(opt[0]) if opt else None
        return gauss_newton_mc_diagonal(
            model, loss_fn, x, y, params, generator=generator, num_mc_samples=draws
        )
    if name == "sketch":
        sketches = int(opt[0]) if opt else None
        return gauss_newton_sketch_diagonal(
            model, loss_fn, x, y, params, generator=generator, num_sketches=sketches
        )
    if name == "sketch_sampled":
        with sampled_base_columns():
            return gauss_newton_sketch_diagonal(model, loss_fn, x, y, params, generator=generator)
    raise ValueError(f"unknown spec {spec!r}")


def pooled(spec, model, loss_fn, x, y, params, seed) -> tuple[dict[str, Tensor], float]:
    gen = torch.Generator().manual_seed(seed)
    total: dict[str, Tensor] = {}
    start = time.perf_counter()
    batches = list(zip(x.split(BATCH), y.split(BATCH)))
    for xb, yb in batches:
        d = estimate(spec, model, loss_fn, xb, yb, params, gen)
        for k, v in d.items():
            total[k] = total.get(k, 0) + v.double()
    return {k: v / len(batches) for k, v in total.items()}, time.perf_counter() - start


def measures(weights, diag) -> tuple[float, float]:
    from lightning_flatness.functional.measures import sharpness_measures

    out = sharpness_measures(weights, {k: diag[k].to(weights[k].dtype) for k in weights})
    return float(out["normalized"]), float(out["hessian_trace"])


def compare(specs, model, loss_fn, x, y, params, ref, seeds, label) -> list[dict[str, Any]]:
    weights = {n: p.detach() for n, p in params.items()}
    names = list(params)
    ref_flat = torch.cat([ref[n].flatten() for n in names])
    ref_ns, ref_tr = measures(weights, ref)
    rows = []
    print(f"\n{label}: reference eq. 17 {ref_ns:.5g}, trace {ref_tr:.5g} (load {load_average()})", flush=True)
    print("| option | seconds | diag rel. L2 | eq. 17 bias | eq. 17 RMS | trace bias | trace RMS |")
    print("|---|---|---|---|---|---|---|")
    for spec in specs:
        diag_err, ns_err, tr_err, secs = [], [], [], []
        for seed in range(seeds):
            est, sec = pooled(spec, model, loss_fn, x, y, params, 1000 + seed)
            diag_err.append(
                float((torch.cat([est[n].flatten() for n in names]) - ref_flat).norm() / ref_flat.norm())
            )
            ns, tr = measures(weights, est)
            ns_err.append(ns / ref_ns - 1)
            tr_err.append(tr / ref_tr - 1)
            secs.append(sec)
        row = {
            "case": label,
            "option": spec,
            "seconds": statistics.median(secs),
            "diag_rel_l2": statistics.fmean(diag_err),
            "ns_bias": statistics.fmean(ns_err),
            "ns_rms": math.sqrt(statistics.fmean(e * e for e in ns_err)),
            "trace_bias": statistics.fmean(tr_err),
            "trace_rms": math.sqrt(statistics.fmean(e * e for e in tr_err)),
            "ns_errors": ns_err,
            "reference_ns": ref_ns,
            "reference_trace": ref_tr,
        }
        rows.append(row)
        print(
            f"| {spec} | {row['seconds']:.3g} | {row['diag_rel_l2']:.3f} | {row['ns_bias']:+.1%} | "
            f"{row['ns_rms']:.1%} | {row['trace_bias']:+.1%} | {row['trace_rms']:.1%} |",
            flush=True,
        )
    return rows


def tiny_models(k: int) -> dict[str, nn.Module]:
    return {
        "mlp": nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, k)),
        "cnn": nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32, k),
        ),
    }


def cached_exact(
    key: str, model, loss_fn, x, y, params, cache: bool = True
) -> tuple[dict[str, Tensor], float]:
    """The exact reference, kept in the temporary directory between runs (K backward columns per
    sample cost minutes at K = 1,000); delete ``bench_resnet18_1000_exact_*.pt`` there after changing
    the exact estimator."""
    if not cache:
        return pooled("exact", model, loss_fn, x, y, params, 0)
    import tempfile
    from pathlib import Path

    path = Path(tempfile.gettempdir()) / f"bench_resnet18_1000_exact_{key}.pt"
    if path.exists():
        saved = torch.load(path)
        return saved["diag"], saved["seconds"]
    diag, sec = pooled("exact", model, loss_fn, x, y, params, 0)
    torch.save({"diag": diag, "seconds": sec}, path)
    return diag, sec


def tiny(args) -> list[dict[str, Any]]:
    from lightning_flatness.functional.losses import normalized_softmax_cross_entropy
    from lightning_flatness.functional.parameters import select_parameters

    rows = []
    for k in args.tiny_classes:
        for name in args.tiny_models:
            torch.manual_seed(args.seed)
            model = tiny_models(k)[name].eval()
            shape = (512, 20) if name == "mlp" else (512, 3, 8, 8)
            g = torch.Generator().manual_seed(args.seed)
            x, y = torch.randn(*shape, generator=g), torch.randint(0, k, (512,), generator=g)
            params = select_parameters(model)
            losses = {"eq20": normalized_softmax_cross_entropy, "ce": F.cross_entropy}
            for loss_name in args.tiny_losses:
                loss_fn = losses[loss_name]
                key = f"{name}_{k}_{loss_name}_{args.seed}"
                ref, sec = cached_exact(key, model, loss_fn, x, y, params, cache=not args.quick)
                label = f"{name} K={k} {loss_name} (exact {sec:.2f} s)"
                specs = [s for s in args.options if s != "exact"]
                rows += compare(specs, model, loss_fn, x, y, params, ref, args.seeds, label)
    return rows


def resnet18(k: int) -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=k).eval()


def resnet_data(n: int, k: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, k, (n,), generator=g)


def resnet(args) -> list[dict[str, Any]]:
    from lightning_flatness.functional.losses import normalized_softmax_cross_entropy
    from lightning_flatness.functional.parameters import select_parameters

    torch.manual_seed(args.seed)
    model = resnet18(args.resnet_classes)
    x, y = resnet_data(BATCH * args.resnet_batches, args.resnet_classes, args.seed)
    params = select_parameters(model)
    t = time.perf_counter()
    ref, _ = pooled(
        f"sketch:{args.reference_sketches}", model, normalized_softmax_cross_entropy, x, y, params, 7
    )
    label = (
        f"ResNet-18 K={args.resnet_classes}, {len(x)} samples, reference: sketch:{args.reference_sketches} "
        f"({time.perf_counter() - t:.0f} s)"
    )
    return compare(
        args.options, model, normalized_softmax_cross_entropy, x, y, params, ref, args.seeds, label
    )


def cost(args) -> dict[str, Any]:
    """Every (classes, option) and a training step of each model, interleaved round by round, so that
    the 1,000 / 10 ratios are taken under the same load."""
    from lightning_flatness.functional.losses import normalized_softmax_cross_entropy
    from lightning_flatness.functional.parameters import select_parameters

    setups = {}
    for k in args.cost_classes:
        torch.manual_seed(args.seed)
        model = resnet18(k)
        x, y = resnet_data(BATCH * args.batches, k, args.seed)
        train_net = resnet18(k).train()
        opt = torch.optim.SGD(train_net.parameters(), lr=0.01)
        xt, yt = resnet_data(TRAIN_BATCH, k, args.seed + 1)
        setups[k] = (model, x, y, select_parameters(model), train_net, opt, xt, yt)
    specs = {k: [s for s in args.options if not (s == "exact" and k > 32)] for k in args.cost_classes}
    times: dict[str, list[float]] = {}
    gen = torch.Generator().manual_seed(0)
    for r in range(args.repeats + 1):
        for k, (model, x, y, params, train_net, opt, xt, yt) in setups.items():
            t = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(train_net(xt), yt).backward()
            opt.step()
            if r:
                times.setdefault(f"{k}/train_step", []).append(time.perf_counter() - t)
            for spec in specs[k]:
                t = time.perf_counter()
                for b in range(args.batches):
                    sl = slice(b * BATCH, (b + 1) * BATCH)
                    estimate(spec, model, normalized_softmax_cross_entropy, x[sl], y[sl], params, gen)
                if r:
                    times.setdefault(f"{k}/{spec}", []).append(
                        (time.perf_counter() - t) * BATCHES / args.batches
                    )
        print(f"round {r} done (load {load_average()})", flush=True)
    med = {key: statistics.median(v) for key, v in times.items()}
    print("\n| classes | option | seconds (8 batches of 64) | training steps (batch 128) |")
    print("|---|---|---|---|")
    for key, sec in med.items():
        k = key.split("/")[0]
        print(f"| {k} | {key.split('/', 1)[1]} | {sec:.3f} | {sec / med[f'{k}/train_step']:.1f} |")
    return {"median_seconds": med, "all": times, "load_end": load_average()}


def main(argv=None) -> dict[str, Any]:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=["tiny"], choices=["tiny", "resnet", "cost"])
    parser.add_argument(
        "--options", nargs="+", default=["mc", "sketch_sampled", "sketch:1", "sketch:2", "sketch:4"]
    )
    parser.add_argument("--tiny-classes", nargs="+", type=int, default=[1000])
    parser.add_argument("--tiny-models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--tiny-losses", nargs="+", default=["eq20", "ce"])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--resnet-classes", type=int, default=1000)
    parser.add_argument("--resnet-batches", type=int, default=BATCHES)
    parser.add_argument("--reference-sketches", type=int, default=32)
    parser.add_argument("--cost-classes", nargs="+", type=int, default=[10, 1000])
    parser.add_argument("--batches", type=int, default=2, help="batches of 64 timed per repeat (cost)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:  # a smoke run: tiny networks with 40 outputs, 2 seeds
        args.parts, args.tiny_classes, args.tiny_models, args.seeds = ["tiny"], [40], ["mlp"], 2
        args.options = ["mc", "sketch:1"]
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "environment": environment(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    start = time.perf_counter()
    if "tiny" in args.parts:
        results["tiny"] = tiny(args)
    if "resnet" in args.parts:
        results["resnet"] = resnet(args)
    if "cost" in args.parts:
        results["cost"] = cost(args)
    results["seconds"] = time.perf_counter() - start
    write_json(args.json, results)
    print(f"\n{results['seconds']:.0f} s", flush=True)
    return results


if __name__ == "__main__":
    main()
