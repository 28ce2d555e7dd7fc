"""Cost of the sketched Hessian diagonal on a CIFAR-size vision transformer, against the Gauss-Newton
sketch and a training step (issue 8: "cost a few percent of an epoch").

Model: timm ``VisionTransformer`` as ``vit_tiny`` builds it (embed 192, depth 12, 3 heads, MLP ratio 4:
5.4 M weights) on 32x32 inputs with 4x4 patches (64 tokens and a class token), 10 classes, random
weights, eval mode for the measurements; one intra-op thread. Per round, interleaved: one training
step (forward, backward, SGD) of batch ``--train-batch``, then each estimator on one batch of
``--batch`` samples with the eq. 20 loss and the default selection (``gauss_newton_sketch``,
``hessian_sketch`` with ``--sketches`` sketches). Reported: median seconds, the ratio to the Gauss-Newton
sketch, and the cost of a 512-sample measurement (the callback's default) in training steps, and the
peak resident memory of each estimate (sampled). ``--one-pass-too``: each ``hessian_sketch`` also with all
its columns in one batched backward pass (``BATCHED_COLUMN_ELEMENTS`` unbounded: the code before round 23),
interleaved with the grouped columns, with the relative difference of the two diagonals of the same draws.

Run: ``python -m benchmarks.bench_hessian_sketch_cost --json
benchmarks/results/bench_hessian_sketch_cost.json``.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import base_parser, run_timed, setup
from lightning_flatness.functional.estimators import gauss_newton_sketch as sketch_module
from lightning_flatness.functional.estimators.gauss_newton_sketch import gauss_newton_sketch_diagonal
from lightning_flatness.functional.estimators.hessian_sketch import hessian_sketch_diagonal
from lightning_flatness.functional.losses import normalized_softmax_cross_entropy
from lightning_flatness.functional.parameters import select_parameters
from lightning_flatness.memory import PeakMemory

#: ``BATCHED_COLUMN_ELEMENTS`` of the ``one pass`` variants: every column in one batched backward pass
ONE_PASS = 2**62


def build(depth: int, dim: int, heads: int):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=32, patch_size=4, embed_dim=dim, depth=depth, num_heads=heads, num_classes=10
    )


def run(args) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = build(args.depth, args.dim, args.heads)
    g = torch.Generator().manual_seed(args.seed + 1)
    x_train = torch.randn(args.train_batch, 3, 32, 32, generator=g)
    y_train = torch.randint(0, 10, (args.train_batch,), generator=g)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    params = select_parameters(model)
    grouped = sketch_module.BATCHED_COLUMN_ELEMENTS

    def hessian(s: int, budget: int):
        def estimate(gen: torch.Generator) -> dict[str, torch.Tensor]:
            sketch_module.BATCHED_COLUMN_ELEMENTS = budget
            try:
                return hessian_sketch_diagonal(
                    model, normalized_softmax_cross_entropy, x, y, params, generator=gen, num_sketches=s
                )
            finally:
                sketch_module.BATCHED_COLUMN_ELEMENTS = grouped

        return estimate

    options = {
        "gauss_newton_sketch": lambda gen: gauss_newton_sketch_diagonal(
            model, normalized_softmax_cross_entropy, x, y, params, generator=gen
        )
    }
    for s in args.sketches:
        options[f"hessian_sketch:{s}"] = hessian(s, grouped)
        if args.one_pass_too:
            options[f"hessian_sketch:{s} one pass"] = hessian(s, ONE_PASS)
    times: dict[str, list[float]] = {"train_step": [], **{k: [] for k in options}}
    peaks: dict[str, list[float]] = {k: [] for k in options}
    differences: dict[str, float] = {}
    for r in range(args.repeats + 1):  # the first round warms up
        model.train()
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x_train), y_train).backward()
        opt.step()
        step = time.perf_counter() - t0
        model.eval()
        names = list(options) if r % 2 else list(reversed(options))  # alternate the order of the variants
        diagonals = {}
        for name in names:
            with PeakMemory() as peak:
                t0 = time.perf_counter()
                diagonals[name] = options[name](torch.Generator().manual_seed(r))
                seconds = time.perf_counter() - t0
            if r:
                times[name].append(seconds)
                peaks[name].append(float(peak.rss_mb or 0.0))
        for name in options:
            if name.endswith(" one pass"):  # the same draws, grouped and in one pass
                a, b = (
                    torch.cat([d.flatten().double() for d in diagonals[k].values()])
                    for k in (name[:-9], name)
                )
                differences[name[:-9]] = max(
                    differences.get(name[:-9], 0.0), float((a - b).norm() / b.norm())
                )
        if r:
            times["train_step"].append(step)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items() if v), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    per_measurement = 512 / args.batch
    out: dict[str, Any] = {
        "command": args.command,
        "weights": sum(p.numel() for p in params.values() if p.ndim >= 2),
        "batch": args.batch,
        "train_batch": args.train_batch,
        "batched_column_elements": grouped,
        "median_seconds": med,
        "ratio_to_gauss_newton_sketch": {k: med[k] / med["gauss_newton_sketch"] for k in options},
        "training_steps_per_512_samples": {k: med[k] * per_measurement / med["train_step"] for k in options},
        "peak_rss_mib": {k: max(v) for k, v in peaks.items()},
        "grouped_against_one_pass_relative_difference": differences,
    }
    print(out)
    return out


def main(argv=None) -> dict[str, Any]:
    parser = base_parser(__doc__)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sketches", type=int, nargs="*", default=[1])
    parser.add_argument(
        "--one-pass-too",
        action="store_true",
        help="time each hessian_sketch with all its columns in one batched backward pass too",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.depth, args.dim, args.heads, args.batch, args.train_batch, args.repeats = 1, 16, 2, 4, 4, 1
    args.command = "python -m benchmarks.bench_hessian_sketch_cost " + " ".join(
        sys.argv[1:] if argv is None else list(argv)
    )
    setup(args)
    return run_timed(run, args)


if __name__ == "__main__":
    main()
