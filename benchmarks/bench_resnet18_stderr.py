"""How many samples a default measurement needs for a 5% standard error on a ResNet-18 that has
learned something, against the random-weight, random-data ResNet-18 of ``bench_callback_resnet18``
(issue 9, target "standard error of the total <= 5%").

Random weights on random data are the worst case for the sampling error: every sample's curvature
is an independent draw from a heavy-tailed distribution. This benchmark repeats the measurement on
a network trained on data with structure, built offline and shipped with scikit-learn:

- **data**: ``sklearn.datasets.load_digits`` (1,797 handwritten digits, 8x8, 10 classes), upsampled
  bilinearly to 32x32, repeated to 3 channels, standardised: a CIFAR-size input with real labels;
- **model**: ``torchvision.models.resnet18(num_classes=10)`` (as ``bench_callback_resnet18``);
- **states**: ``untrained`` (its random initialisation) and ``trained`` (``--epochs`` epochs of SGD,
  momentum 0.9, lr ``--lr``, weight decay 5e-4, batch 128, train mode; accuracy and loss reported);
- **measurement**: what the callback does (eval-mode float32 network, :class:`SharpnessMeasurement` with
  every default: ``method="auto"``, eq. 20 loss, 8 replicate slots), on ``n`` training samples
  drawn by ``choose_indices(1797, n, seed)`` in the callback's batches (``chunk_sizes(n, 128, 8)``),
  for ``n`` in ``--sizes`` and ``--seeds`` subsets each.

Reported per state and ``n``: the method auto chose; the mean of the values over the seeds; the mean
reported relative standard error (``normalized_stderr / normalized``); the spread of the value across
the subsets (sd / mean over the seeds: what the standard error should predict, up to the finite-
population factor ``sqrt(1 - n / 1797)`` since the subsets come from one pool of 1,797); the ``n``
a 5% standard error needs (``n (s.e. / 5%)^2``, s.e. falling like ``1 / sqrt(n)``); seconds per
measurement and the same in training steps of batch 128 (timed in the same run).

Needs scikit-learn (``pip install -e ".[bench]"``; the digits ship with it, nothing is downloaded).

Run: ``python -m benchmarks.bench_resnet18_stderr --json benchmarks/results/bench_resnet18_stderr.json``
(writes ``bench_resnet18_stderr.md`` beside the JSON).
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import base_parser, environment, setup

POOL_BATCH = 128


def digits_32x32() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits as ``(1797, 3, 32, 32)`` standardised images and ``(1797,)`` labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8), values 0..16
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()
    return x, torch.tensor(d.target, dtype=torch.long)


def resnet18() -> torch.nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


def train(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int
) -> dict:
    """``epochs`` epochs of SGD (momentum 0.9, weight decay 5e-4, batch 128) in train mode; returns the
    final training accuracy and loss (eval mode, whole set) and the median seconds of one step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps: list[float] = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=g)
        for start in range(0, len(x) - POOL_BATCH + 1, POOL_BATCH):
            idx = order[start : start + POOL_BATCH]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            steps.append(time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)])
    return {
        "train_accuracy": float((logits.argmax(1) == y).float().mean()),
        "train_loss": float(F.cross_entropy(logits, y)),
        "step_seconds": statistics.median(steps) if steps else math.nan,
    }


def step_seconds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 5) -> float:
    """Median seconds of one training step (forward, cross-entropy, backward, SGD step) of batch 128 on
    a copy of ``model`` (the model itself is not changed)."""
    import copy

    net = copy.deepcopy(model).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    times = []
    for r in range(repeats + 1):
        idx = torch.arange(r * POOL_BATCH, (r + 1) * POOL_BATCH) % len(x)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
        if r:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, n: int, seed: int) -> dict:
    """One measurement as the callback makes it, on ``n`` samples of the pool chosen with ``seed``."""
    from lightning_flatness.measure import SharpnessMeasurement
    from lightning_flatness.training_subset import choose_indices, chunk_sizes

    idx = choose_indices(len(x), n, seed)
    t0 = time.perf_counter()
    m = SharpnessMeasurement(model, generator=torch.Generator().manual_seed(seed))
    start = 0
    for size in chunk_sizes(len(idx), POOL_BATCH, 8):
        part = idx[start : start + size]
        m.metric.update(m.estimate(x[part], y[part]), m.weights)
        start += size
    values = m.compute()
    seconds = time.perf_counter() - t0
    value = float(values["normalized"])
    return {
        "seed": seed,
        "n": len(idx),
        "method": m.choice.method,
        "normalized": value,
        "relative_stderr": float(values["normalized_stderr"]) / value if value else math.nan,
        "seconds": seconds,
    }


def summarise(rows: list[dict], pool: int, target: float = 0.05) -> dict:
    values = [r["normalized"] for r in rows]
    mean = statistics.fmean(values)
    se = statistics.fmean(r["relative_stderr"] for r in rows)
    n = rows[0]["n"]
    spread = statistics.stdev(values) / mean if len(values) > 1 else math.nan
    return {
        "n": n,
        "method": rows[0]["method"],
        "seeds": len(rows),
        "mean_value": mean,
        "mean_relative_stderr": se,
        "predicted_spread": se * math.sqrt(max(0.0, 1.0 - n / pool)),
        "spread_across_subsets": spread,
        "samples_for_target": n * (se / target) ** 2,
        "seconds": statistics.median(r["seconds"] for r in rows),
    }


def run(args) -> dict[str, Any]:
    x, y = digits_32x32()
    torch.manual_seed(args.seed)
    model = resnet18()
    import datetime
    import os

    results: dict[str, Any] = {"environment": environment(), "pool": len(x), "states": {}}
    results["started"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results["load_average_start"] = os.getloadavg()[0]
    for state in args.states:
        info: dict[str, Any] = {}
        if state == "trained":
            info = train(model, x, y, args.epochs, args.lr, args.seed)
        model.eval()
        info["step_seconds"] = step_seconds(model, x, y)
        sizes = [min(n, len(x)) for n in args.sizes]
        table = []
        for n in sizes:
            seeds = range(1 if n >= len(x) else args.seeds)
            rows = [measure(model, x, y, n, s) for s in seeds]
            summary = summarise(rows, len(x))
            summary["steps_per_measurement"] = summary["seconds"] / info["step_seconds"]
            summary["rows"] = rows
            table.append(summary)
            print(
                f"{state:9s} n={n:5d} {summary['method']:20s} value {summary['mean_value']:.4g}  "
                f"s.e. {100 * summary['mean_relative_stderr']:.1f}%  "
                f"spread {100 * summary['spread_across_subsets']:.1f}%  "
                f"{summary['seconds']:.1f} s = {summary['steps_per_measurement']:.0f} steps",
                flush=True,
            )
        info["table"] = table
        results["states"][state] = info
    results["load_average_end"] = os.getloadavg()[0]
    return results


def markdown(results: dict[str, Any], command: str) -> str:
    env = results["environment"]
    lines = [
        "# Sampling error of one default measurement on a ResNet-18 with real labels "
        "(`bench_resnet18_stderr.py`)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {env.get('cpu', '?')} (nproc {env.get('nproc', '?')}), {env.get('threads', 1)} thread(s), "
        f"torch {env.get('torch', '?')}; started {results['started']}, 1-minute load average "
        f"{results['load_average_start']:.1f} at the start, {results['load_average_end']:.1f} at the end.  ",
        f"Pool: scikit-learn digits upsampled to 3x32x32, {results['pool']} samples, 10 classes.",
        "",
        "| state | train accuracy | n | auto chose | value (mean) | reported s.e. | predicted spread "
        "| spread across subsets | n for 5% s.e. | s / measurement | training steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for state, info in results["states"].items():
        acc = info.get("train_accuracy")
        acc_text = f"{100 * acc:.1f}%" if acc is not None else "-"
        for row in info["table"]:
            spread = row["spread_across_subsets"]
            lines.append(
                f"| {state} | {acc_text} | {row['n']} | `{row['method']}` | {row['mean_value']:.4g} | "
                f"{100 * row['mean_relative_stderr']:.1f}% | {100 * row['predicted_spread']:.1f}% | "
                f"{'-' if math.isnan(spread) else f'{100 * spread:.1f}%'} ({row['seeds']} subsets) | "
                f"{row['samples_for_target']:.0f} | {row['seconds']:.1f} | "
                f"{row['steps_per_measurement']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict[str, Any]:
    import sys

    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--states", nargs="+", default=["untrained", "trained"], choices=["untrained", "trained"]
    )
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024, 1797])
    parser.add_argument(
        "--seeds", type=int, default=4, help="subsets per size (one when n is the whole pool)"
    )
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.seeds, args.epochs, args.states = [64], 2, 1, ["trained"]
    setup(args)
    results = run(args)
    if args.json is not None:
        import json

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        command = "python -m benchmarks.bench_resnet18_stderr " + " ".join(
            sys.argv[1:] if argv is None else argv
        )
        Path(args.json).with_suffix(".md").write_text(markdown(results, command))
    return results


if __name__ == "__main__":
    main()
