"""Per-layer contractions on a CIFAR ResNet-18, before/after a change, interleaved (issues 8, 9).

Times ``hessian_diagonal(model, normalized_softmax_cross_entropy, x, y, method=M, generator=...)`` on
``torchvision.models.resnet18(num_classes=10)`` (random weights, eval mode, float32) for batches of
64 random ``3x32x32`` inputs, for the library of this working tree ("after") and for the library of
a git revision ("before", extracted with ``git archive`` into a temporary folder). Each measurement
is one fresh subprocess (one thread: ``torch.set_num_threads``), the two versions alternate, so that
load from other processes falls on both alike; the report is the median over the repeats of each
subprocess's median call. The subprocess also times the per-layer contractions alone (the calls of
``layer_rules.accumulate_layer`` made by the estimators) and returns every diagonal's sum and
sum of squares, so that the two versions' values are compared (relative difference per tensor).

Run from the repository root::

    python -W ignore -m benchmarks.bench_contraction_speed --before-rev HEAD~3 --repeats 5 \
        --json benchmarks/results/bench_contraction_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def _worker(tree: str, method: str, calls: int, threads: int, batch: int) -> dict[str, Any]:
    """One measurement in this process, with the library found in ``tree``."""
    sys.path.insert(0, tree)
    import torch
    import torchvision

    torch.set_num_threads(threads)
    import lightning_flatness
    import lightning_flatness.functional.estimators.exact as exact
    import lightning_flatness.functional.estimators.gauss_newton_sketch as sketch
    from lightning_flatness.functional import hessian_diagonal, normalized_softmax_cross_entropy

    assert Path(lightning_flatness.__file__).resolve().is_relative_to(Path(tree).resolve())
    spent = [0.0]
    inner = exact.accumulate_layer

    def timed(*args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        inner(*args, **kwargs)
        spent[0] += time.perf_counter() - start

    exact.accumulate_layer = timed
    sketch.accumulate_layer = timed
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))

    def run() -> dict[str, Any]:
        return hessian_diagonal(
            model,
            normalized_softmax_cross_entropy,
            x,
            y,
            method=method,
            generator=torch.Generator().manual_seed(1),
        )

    diag = run()  # warm-up
    seconds, contraction = [], []
    for _ in range(calls):
        spent[0] = 0.0
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
        contraction.append(spent[0])
    return {
        "seconds": statistics.median(seconds),
        "contraction_seconds": statistics.median(contraction),
        "sums": {k: [float(v.double().sum()), float(v.double().square().sum())] for k, v in diag.items()},
        "torch": torch.__version__,
    }


def _measure(tree: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        "-W",
        "ignore",
        "-m",
        "benchmarks.bench_contraction_speed",
        "--worker",
        tree,
        method,
    ]
    command += ["--calls", str(args.calls), "--threads", str(args.threads), "--batch", str(args.batch)]
    # the worker (run as a module from the repository root) puts the measured tree first on its path
    out = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: Any = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before-rev", default="HEAD", help="git revision of the 'before' library")
    parser.add_argument("--methods", nargs="+", default=["gauss_newton_sketch", "exact"])
    parser.add_argument("--repeats", type=int, default=5, help="subprocesses per version and method")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per subprocess (after a warm-up)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: one repeat, one call, batch 8, sketch only"
    )
    parser.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        result = _worker(args.worker[0], args.worker[1], args.calls, args.threads, args.batch)
        print(json.dumps(result))
        return result

    if args.quick:
        args.repeats, args.calls, args.batch, args.methods = 1, 1, 8, ["gauss_newton_sketch"]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as before:
        archive = subprocess.run(
            ["git", "archive", args.before_rev, "lightning_flatness"],
            cwd=REPO_ROOT,
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", before], input=archive, check=True)
        trees = {"before": before, "after": str(REPO_ROOT)}
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {m: {v: [] for v in trees} for m in args.methods}
        for repeat in range(args.repeats):
            for method in args.methods:
                order = list(trees) if repeat % 2 == 0 else list(reversed(trees))
                for version in order:
                    runs[method][version].append(_measure(trees[version], method, args))
    report: dict[str, Any] = {
        "command": "python -W ignore -m benchmarks.bench_contraction_speed " + " ".join(sys.argv[1:]),
        "before_rev": subprocess.run(
            ["git", "rev-parse", "--short", args.before_rev], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "machine": {
            "nproc": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "loadavg_start": load_before,
            "loadavg_end": os.getloadavg(),
            "torch": runs[args.methods[0]]["after"][0]["torch"],
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        },
        "methods": {},
    }
    print(f"ResNet-18, batch {args.batch}, {args.threads} thread(s), {args.repeats} interleaved repeats")
    for method, versions in runs.items():
        row: dict[str, Any] = {}
        for version, results in versions.items():
            row[version] = {
                "seconds": statistics.median(r["seconds"] for r in results),
                "contraction_seconds": statistics.median(r["contraction_seconds"] for r in results),
                "all_seconds": [r["seconds"] for r in results],
                "all_contraction_seconds": [r["contraction_seconds"] for r in results],
            }
        a, b = versions["after"][0]["sums"], versions["before"][0]["sums"]
        row["max_relative_difference"] = max(
            abs(a[k][i] - b[k][i]) / max(abs(b[k][i]), 1e-30) for k in b for i in range(2)
        )
        report["methods"][method] = row
        print(
            f"{method:22s} total {row['before']['seconds']:.3f} -> {row['after']['seconds']:.3f} s "
            f"({row['after']['seconds'] / row['before']['seconds']:.2f}x); contractions "
            f"{row['before']['contraction_seconds']:.3f} -> {row['after']['contraction_seconds']:.3f} s "
            f"({row['after']['contraction_seconds'] / row['before']['contraction_seconds']:.2f}x); "
            f"max rel. diff. of per-tensor sums {row['max_relative_difference']:.1e}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
