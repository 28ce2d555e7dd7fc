"""Before/after cost of one default measurement, piece by piece: a CIFAR-size ResNet-18 and the paper's MLP.

Each timed run is a fresh process (``--worker``) that imports the library from one source tree (this
checkout, or ``--old TREE``: a ``git archive`` of an older commit), so the two versions alternate
within one run and see the same load. Per process, one thread:

- **resnet**: ``torchvision.models.resnet18(num_classes=10)``, random weights (seed 0), random
  ``(3, 32, 32)`` data; ``--step-repeats`` training steps of batch 128 (SGD, momentum 0.9) timed,
  then two measurements as the callback makes them at its defaults (an eval-mode float32 copy,
  :class:`SharpnessMeasurement` with ``method="auto"``, ``add`` of 8 batches of 64, ``compute()``);
  the second is reported: the estimator (``SharpnessMeasurement.estimate``), the metric's ``update``,
  the rest of ``add`` (its finiteness check) and ``compute()``, wall and process CPU seconds, and the
  measurement in training steps and as a percentage of a 390-step epoch.
- **mlp**: the paper's MLP 40-100-100-100-10 after 300 Adam steps on MNIST-1D (float32, eval);
  ``--mlp-repeats`` measurements of 8 batches of 64 (``method="auto"`` = exact): medians of the
  estimator + update and of ``compute()``, process CPU milliseconds.

Values (``normalized``, its standard error) are printed per tree: the change must not move them
beyond the solver's certified ``1e-11``.

Run: ``python -m benchmarks.bench_resnet18_measurement_profile --old /tmp/old --repeats 3``
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

EPOCH_STEPS = 390
BATCH = 128


def _timers():
    """``(spent, wrap)``: ``wrap(owner, name, key)`` makes ``owner.name`` add its wall and CPU seconds to
    ``spent[key]``."""
    spent: dict[str, list[float]] = {}

    def wrap(owner: Any, name: str, key: str) -> None:
        f = getattr(owner, name)

        def timed(*args, **kwargs):
            t, c = time.perf_counter(), time.process_time()
            try:
                return f(*args, **kwargs)
            finally:
                w = spent.setdefault(key, [0.0, 0.0])
                w[0] += time.perf_counter() - t
                w[1] += time.process_time() - c

        setattr(owner, name, timed)

    return spent, wrap


def _wrap_compute_pieces(spent: dict[str, list[float]], wrap) -> None:
    """Time the pieces of ``compute()`` (module functions both trees have): the clipped replicate
    curvature, the pooled (cold) and general warm-started eq. 17 solves, the preconditioned replicate
    Newton; ``compute()`` minus these is the rest (components, closed forms, jackknife, dict)."""
    import lightning_flatness.functional.replicate_measures as rm
    import lightning_flatness.functional.solvers.normalized as nm

    wrap(rm, "replicate_curvature", "curvature")
    wrap(nm, "replicate_newton", "replicate_newton")
    solve = nm._solve_reduced

    def solve_reduced(a, b, rtol, max_iter, shape, start, *rest):
        key = "cold_solve" if start is None else "general_warm_solve"
        t, c = time.perf_counter(), time.process_time()
        try:
            return solve(a, b, rtol, max_iter, shape, start, *rest)
        finally:
            w = spent.setdefault(key, [0.0, 0.0])
            w[0] += time.perf_counter() - t
            w[1] += time.process_time() - c

    nm._solve_reduced = solve_reduced


def worker_resnet(step_repeats: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    import torchvision

    from lightning_flatness.measure import SharpnessMeasurement
    from lightning_flatness.training_subset import chunk_sizes

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    g = torch.Generator().manual_seed(1)
    xb, yb = torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    x, y = torch.randn(512, 3, 32, 32, generator=g), torch.randint(0, 10, (512,), generator=g)
    train = copy.deepcopy(model).train()
    opt = torch.optim.SGD(train.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(train(xb), yb).backward()
        opt.step()

    step()
    steps, step_cpu = [], []
    for _ in range(step_repeats):
        t, c = time.perf_counter(), time.process_time()
        step()
        steps.append(time.perf_counter() - t)
        step_cpu.append(time.process_time() - c)
    spent, wrap = _timers()
    _wrap_compute_pieces(spent, wrap)
    sizes = chunk_sizes(512, BATCH, 8)
    result: dict[str, Any] = {}
    for _run in range(2):  # the first warms up (lazy imports, allocator); the second is reported
        spent.clear()
        t, c = time.perf_counter(), time.process_time()
        net = copy.deepcopy(model).float().eval()
        m = SharpnessMeasurement(net, generator=torch.Generator().manual_seed(0))
        wrap(m, "estimate", "estimate")
        wrap(m.metric, "update", "update")
        wrap(m, "add", "add")
        start = 0
        for s in sizes:
            m.add(x[start : start + s], y[start : start + s])
            start += s
        tc, cc = time.perf_counter(), time.process_time()
        values = m.compute()
        compute = [time.perf_counter() - tc, time.process_time() - cc]
        total = [time.perf_counter() - t, time.process_time() - c]
        result = {
            "method": m.choice.method,
            "step_seconds": statistics.median(steps),
            "step_cpu_seconds": statistics.median(step_cpu),
            "total": total,
            "estimate": spent["estimate"],
            "update": spent["update"],
            "add_rest": [spent["add"][k] - spent["estimate"][k] - spent["update"][k] for k in (0, 1)],
            "compute": compute,
            "compute_pieces": {
                k: spent.get(k, [0.0, 0.0])
                for k in ("curvature", "cold_solve", "general_warm_solve", "replicate_newton")
            },
            "normalized": float(values["normalized"]),
            "normalized_stderr": float(values["normalized_stderr"]),
            "hessian_trace": float(values["hessian_trace"]),
        }
    result["epoch_percent"] = 100 * result["total"][0] / (EPOCH_STEPS * result["step_seconds"])
    result["steps_per_measurement"] = result["total"][0] / result["step_seconds"]
    result["epoch_percent_cpu"] = 100 * result["total"][1] / (EPOCH_STEPS * result["step_cpu_seconds"])
    return result


def worker_mlp(repeats: int, train_steps: int = 300) -> dict[str, Any]:
    import torch

    from lightning_flatness.datasets import make_mnist1d
    from lightning_flatness.measure import SharpnessMeasurement
    from lightning_flatness.reference_models import mlp

    torch.manual_seed(0)
    data = make_mnist1d(seed=0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = data.x_train, data.y_train
    for _ in range(train_steps):
        idx = torch.randint(0, x.shape[0], (BATCH,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    spent, wrap = _timers()
    _wrap_compute_pieces(spent, wrap)
    adds, computes, values = [], [], {}
    for r in range(repeats + 3):  # 3 warm-up measurements
        if r == 3:
            spent.clear()
        m = SharpnessMeasurement(model, generator=torch.Generator().manual_seed(0))
        c = time.process_time()
        for k in range(8):
            m.add(x[64 * k : 64 * k + 64], y[64 * k : 64 * k + 64])
        c2 = time.process_time()
        values = m.compute()
        c3 = time.process_time()
        if r >= 3:
            adds.append(c2 - c)
            computes.append(c3 - c2)
    return {
        "add_ms": 1e3 * statistics.median(adds),
        "compute_ms": 1e3 * statistics.median(computes),
        "compute_pieces_ms": {
            k: 1e3 * spent.get(k, [0.0, 0.0])[1] / repeats
            for k in ("curvature", "cold_solve", "general_warm_solve", "replicate_newton")
        },
        "normalized": float(values["normalized"]),
        "normalized_stderr": float(values["normalized_stderr"]),
    }


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, args.worker)
    os.chdir(args.worker)
    load = os.getloadavg()[0]
    if args.part == "resnet":
        out = worker_resnet(args.step_repeats)
    else:
        out = worker_mlp(args.mlp_repeats, args.mlp_train_steps)
    out["load"] = [load, os.getloadavg()[0]]
    print("RESULT " + json.dumps(out), flush=True)


def run_worker(tree: str, part: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-W", "ignore", str(Path(__file__).resolve()), "--worker", tree, "--part", part]
    cmd += ["--step-repeats", str(args.step_repeats), "--mlp-repeats", str(args.mlp_repeats)]
    cmd += ["--mlp-train-steps", str(args.mlp_train_steps)]
    env = {**os.environ, "PYTHONPATH": tree}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"worker {tree} {part} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(lines[-1][len("RESULT ") :])


def med(rows: list[dict], key: str, k: int | None = None) -> float:
    return statistics.median(r[key] if k is None else r[key][k] for r in rows)


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--old", default=None, help="source tree of the 'before' library (git archive of a commit)"
    )
    p.add_argument("--parts", nargs="*", default=["resnet", "mlp"], choices=["resnet", "mlp"])
    p.add_argument("--repeats", type=int, default=3, help="processes per tree and part (interleaved)")
    p.add_argument("--step-repeats", type=int, default=5)
    p.add_argument("--mlp-repeats", type=int, default=15)
    p.add_argument("--mlp-train-steps", type=int, default=300, help="Adam steps before the MLP is measured")
    p.add_argument(
        "--quick", action="store_true", help="smoke test: the MLP part, one process, a few seconds"
    )
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.parts, args.repeats, args.mlp_repeats, args.mlp_train_steps = ["mlp"], 1, 2, 20
    if args.worker:
        worker(args)
        return {}
    trees = {"after": str(Path(__file__).resolve().parent.parent)}
    if args.old:
        trees = {"before": str(Path(args.old).resolve()), **trees}
    runs: dict[str, dict[str, list]] = {part: {t: [] for t in trees} for part in args.parts}
    for r in range(args.repeats):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for part in args.parts:
            for name in order:
                res = run_worker(trees[name], part, args)
                runs[part][name].append(res)
                print(f"repeat {r} {part} {name}: {json.dumps(res)}", flush=True)
    out: dict[str, Any] = {
        "command": "python -m benchmarks.bench_resnet18_measurement_profile "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "runs": runs,
        "nproc": os.cpu_count(),
    }
    if "resnet" in runs:
        print(
            "\n| tree | training step wall / CPU (s) | measurement wall / CPU (s) | estimator wall / CPU | "
            "update wall / CPU | add's finiteness check wall | compute() wall / CPU | steps (wall) | "
            "% of 390-step epoch, wall / CPU | loads |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, rows in runs["resnet"].items():
            print(
                f"| {name} | {med(rows, 'step_seconds'):.3f} / {med(rows, 'step_cpu_seconds'):.3f} | "
                f"{med(rows, 'total', 0):.2f} / {med(rows, 'total', 1):.2f} | "
                f"{med(rows, 'estimate', 0):.2f} / {med(rows, 'estimate', 1):.2f} | "
                f"{med(rows, 'update', 0):.2f} / {med(rows, 'update', 1):.2f} | "
                f"{med(rows, 'add_rest', 0):.3f} | "
                f"{med(rows, 'compute', 0):.2f} / {med(rows, 'compute', 1):.2f} | "
                f"{med(rows, 'steps_per_measurement'):.1f} | {med(rows, 'epoch_percent'):.2f}% / "
                f"{med(rows, 'epoch_percent_cpu'):.2f}% | "
                f"{min(r['load'][0] for r in rows):.1f}-{max(r['load'][1] for r in rows):.1f} |"
            )
        print(
            "\n`compute()` pieces, CPU s (medians): curvature | pooled solves | general warm solves | "
            "replicate Newton | rest"
        )
        for name, rows in runs["resnet"].items():
            pieces = [
                statistics.median(r["compute_pieces"][k][1] for r in rows) for k in rows[0]["compute_pieces"]
            ]
            rest = med(rows, "compute", 1) - sum(pieces)
            print(f"{name}: " + " | ".join(f"{v:.3f}" for v in pieces) + f" | {rest:.3f}")
        for name, rows in runs["resnet"].items():
            print(
                f"{name}: normalized {rows[0]['normalized']!r} +- {rows[0]['normalized_stderr']!r}, "
                f"trace {rows[0]['hessian_trace']!r}"
            )
    if "mlp" in runs:
        print(
            "\n| tree | 8 x add (estimator + update), CPU ms | compute(), CPU ms | loads |\n|---|---|---|---|"
        )
        for name, rows in runs["mlp"].items():
            print(
                f"| {name} | {med(rows, 'add_ms'):.1f} | {med(rows, 'compute_ms'):.1f} | "
                f"{min(r['load'][0] for r in rows):.1f}-{max(r['load'][1] for r in rows):.1f} |"
            )
        print(
            "\n`compute()` pieces, CPU ms per compute (means): "
            "curvature | pooled | general warm | replicate Newton"
        )
        for name, rows in runs["mlp"].items():
            pieces = [
                statistics.median(r["compute_pieces_ms"][k] for r in rows)
                for k in rows[0]["compute_pieces_ms"]
            ]
            print(f"{name}: " + " | ".join(f"{v:.2f}" for v in pieces))
        for name, rows in runs["mlp"].items():
            print(f"{name}: normalized {rows[0]['normalized']!r} +- {rows[0]['normalized_stderr']!r}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
