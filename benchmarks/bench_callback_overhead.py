"""Overhead of ``SharpnessMonitor`` on the paper's MLP, before and after a change, in one interleaved run.

Issue 9's target: the callback at its defaults costs at most 5% of a 390-step epoch. Each timed run
is a fresh process (``--child``) that imports the library from a given source tree (``--old``: e.g.
a ``git worktree`` of an earlier commit; the new tree: this checkout), does one warm-up fit (imports,
first calls, matplotlib), then one ``trainer.fit`` of ``--epochs`` epochs of ``--steps`` steps of
batch 128 (MNIST-1D repeated, Adam, validation on the 1000 test samples every epoch, TensorBoard
logger), with or without the monitor: ``benchmarks.bench_callback.fit`` of that tree. The configs
run in turn, ``--repeats`` rounds, so load changes hit all of them alike; medians are reported.

Overhead = median with / median without - 1, in wall time and in CPU time of the process
(``time.process_time``: robust to other processes on a shared machine; the fit is single-threaded).
The "without" runs use the new tree (the monitor is not involved). Also reported per config: the monitor's own
``seconds`` per measurement (``history``), the values of ``normalized`` (identical before and
after: the same computation), and, with ``--memory``, the peak memory of one measurement of a
wide MLP (40-2048-2048-2048-10, 8.5M weights, 32 MiB) on 64 samples, measuring its first layer only
(so the estimator's and solver's own memory is small): the monitor's ``peak_memory_mb`` (sampled
resident set, ``MALLOC_MMAP_THRESHOLD_=65536`` so that it follows live tensors) minus the resident
set just before the measurement.

    git worktree add /tmp/cb-old af2be98
    python -W ignore -m benchmarks.bench_callback_overhead --old /tmp/cb-old --repeats 5 --memory \\
        --json benchmarks/results/bench_callback_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent.parent  # the new tree


def _rss_mb() -> float:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One timed fit in this process, with the library of ``spec["tree"]``."""
    sys.path.insert(0, spec["tree"])
    os.chdir(spec["tree"])
    import tempfile

    import torch

    torch.set_num_threads(1)
    from benchmarks import bench_callback

    hooks = _time_monitor_hooks()
    with tempfile.TemporaryDirectory() as logdir:
        if spec["kind"] == "memory":
            return _memory_child(spec, logdir)
        bench_callback.fit("mlp", 1, 4, spec["monitor"], 0, logdir)  # warm-up
        hooks["cpu"], hooks["wall"] = 0.0, 0.0
        cpu = time.process_time()
        run = bench_callback.fit("mlp", spec["epochs"], spec["steps"], spec["monitor"], 0, logdir)
        cpu = time.process_time() - cpu
    history = run["history"]
    return {
        "seconds": run["seconds"],
        "cpu_seconds": cpu,
        "hooks_cpu_seconds": hooks["cpu"],
        "hooks_wall_seconds": hooks["wall"],
        "steps": run["steps"],
        "eval_seconds": [h["seconds"] for h in history],
        "normalized": [h["normalized"] for h in history],
        "peak_memory_mb": [h["peak_memory_mb"] for h in history],
        "tree": spec["tree"],
    }


def _time_monitor_hooks() -> dict[str, float]:
    """Count the CPU and wall time spent inside the monitor's Lightning hooks (all of its work except
    Lightning's own handling of the values it logs)."""
    import functools

    from lightning_flatness.callback import SharpnessMonitorBase

    spent = {"cpu": 0.0, "wall": 0.0}
    for name in ("setup", "on_fit_start", "on_validation_start", "on_validation_epoch_end", "on_train_end"):
        if name not in vars(SharpnessMonitorBase):
            continue
        hook = vars(SharpnessMonitorBase)[name]

        def timed(*args, _hook=hook, **kwargs):
            cpu, wall = time.process_time(), time.perf_counter()
            try:
                return _hook(*args, **kwargs)
            finally:
                spent["cpu"] += time.process_time() - cpu
                spent["wall"] += time.perf_counter() - wall

        setattr(SharpnessMonitorBase, name, functools.wraps(hook)(timed))
    return spent


def _memory_child(spec: dict[str, Any], logdir: str) -> dict[str, Any]:
    import pytorch_lightning as pl
    from torch import nn

    from benchmarks import bench_callback
    from lightning_flatness import SharpnessMonitor

    class Probe(pl.Callback):  # the resident set just before the monitor measures
        rss: list[float] = []

        def on_validation_epoch_end(self, trainer, pl_module):
            self.rss.append(_rss_mb())

    module = bench_callback.make_module("mlp", 0)
    widths = [40, 2048, 2048, 2048, 10]
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    module.net = nn.Sequential(*layers[:-1])
    train, val = bench_callback.loaders("mlp", 4, 0)
    # only the first layer is measured (the estimator's and the solver's memory stay small), so what
    # the measurement adds beyond them is the network copy
    monitor = SharpnessMonitor(num_samples=64, parameters=["net.0.weight"], **spec["monitor"])
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        callbacks=[Probe(), monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train, val)
    peak = monitor.history[-1]["peak_memory_mb"]
    weights_mb = sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20
    return {
        "peak_mb": peak,
        "before_mb": Probe.rss[-1],
        "added_mb": peak - Probe.rss[-1],
        "weights_mb": weights_mb,
    }


def _spawn(spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ)
    if spec["kind"] == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run(
        [sys.executable, "-W", "ignore", str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        cwd=spec["tree"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"child {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run(args: argparse.Namespace) -> dict[str, Any]:
    old, new = str(Path(args.old).resolve()), str(HERE)
    configs: list[tuple[str, str, Optional[dict[str, Any]]]] = [
        ("without monitor", new, None),
        ("before (old tree), defaults", old, {}),
        ("after, defaults", new, {}),
        ("after, images_every_n_evaluations=1", new, {"images_every_n_evaluations": 1}),
        ("after, log_images=False", new, {"log_images": False}),
    ]
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in configs}
    loads = []
    for r in range(args.repeats):
        for label, tree, monitor in configs:
            spec = {
                "kind": "time",
                "tree": tree,
                "monitor": monitor,
                "epochs": args.epochs,
                "steps": args.steps,
            }
            result = _spawn(spec)
            runs[label].append(result)
            loads.append(_load())
            print(
                f"round {r} {label}: {result['seconds']:.3f} s, CPU {result['cpu_seconds']:.3f} s, hooks CPU "
                f"{result['hooks_cpu_seconds']:.3f} s (load {loads[-1]})",
                flush=True,
            )
    base = statistics.median(x["seconds"] for x in runs["without monitor"])
    cpu_base = statistics.median(x["cpu_seconds"] for x in runs["without monitor"])
    rows = []
    for label, tree, _ in configs:
        seconds = [x["seconds"] for x in runs[label]]
        median = statistics.median(seconds)
        cpu = statistics.median(x["cpu_seconds"] for x in runs[label])
        hooks_cpu = statistics.median(x["hooks_cpu_seconds"] for x in runs[label])
        hooks_wall = statistics.median(x["hooks_wall_seconds"] for x in runs[label])
        # within one run: the monitor's hooks against the rest of the same fit (robust to load changes
        # between runs, which hit both alike)
        within_cpu = statistics.median(
            x["hooks_cpu_seconds"] / (x["cpu_seconds"] - x["hooks_cpu_seconds"]) for x in runs[label]
        )
        within_wall = statistics.median(
            x["hooks_wall_seconds"] / (x["seconds"] - x["hooks_wall_seconds"]) for x in runs[label]
        )
        evals = [s for x in runs[label] for s in x["eval_seconds"]]
        n_evals = len(runs[label][0]["eval_seconds"])
        rows.append(
            {
                "config": label,
                "commit_tree": tree,
                "median_s": median,
                "runs_s": seconds,
                "overhead": median / base - 1,
                "cpu_median_s": cpu,
                "cpu_overhead": cpu / cpu_base - 1,
                "hooks_cpu_s": hooks_cpu,
                "hooks_cpu_fraction": hooks_cpu / cpu_base,
                "hooks_wall_fraction": hooks_wall / base,
                "within_run_cpu": within_cpu,
                "within_run_wall": within_wall,
                "added_per_eval_s": (median - base) / n_evals if n_evals else 0.0,
                "measurement_s": statistics.median(evals) if evals else None,
                "normalized_last": runs[label][0]["normalized"][-1] if n_evals else None,
            }
        )
    results: dict[str, Any] = {"rows": rows, "runs": runs, "loadavg": loads, "args": vars(args)}
    print(
        f"\n### MLP, {args.epochs} epochs x {args.steps} steps, medians of {args.repeats} interleaved runs\n"
    )
    print(
        "| config | wall s | wall overhead | CPU s | CPU overhead | monitor hooks CPU s | hooks CPU / "
        "CPU without | hooks wall / wall without | within run: hooks / rest, CPU | within run: hooks / "
        "rest, wall | added wall per evaluation s | one measurement s | normalized (last) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        meas = "" if row["measurement_s"] is None else f"{row['measurement_s']:.4f}"
        norm = "" if row["normalized_last"] is None else f"{row['normalized_last']:.10g}"
        print(
            f"| {row['config']} | {row['median_s']:.3f} | {100 * row['overhead']:.1f}% | "
            f"{row['cpu_median_s']:.3f} | {100 * row['cpu_overhead']:.1f}% | {row['hooks_cpu_s']:.3f} | "
            f"{100 * row['hooks_cpu_fraction']:.1f}% | {100 * row['hooks_wall_fraction']:.1f}% | "
            f"{100 * row['within_run_cpu']:.1f}% | {100 * row['within_run_wall']:.1f}% | "
            f"{row['added_per_eval_s']:.4f} | {meas} | {norm} |"
        )
    if args.memory:
        memory = []
        for r in range(args.memory_repeats):
            for label, tree, monitor in [("before (old tree)", old, {}), ("after", new, {})]:
                m = _spawn(
                    {"kind": "memory", "tree": tree, "monitor": {**(monitor or {}), "log_images": False}}
                )
                memory.append({"config": label, **m})
                print(f"memory round {r} {label}: {m}", flush=True)
        results["memory"] = memory
        print(
            "\n### peak memory of one measurement, wide MLP (8.5M weights), 64 samples, first layer "
            "measured (medians)\n"
        )
        print("| config | weights MB | RSS before MB | peak MB | added MB |")
        print("|---|---|---|---|---|")
        for label in ("before (old tree)", "after"):
            ms = [m for m in memory if m["config"] == label]
            med = {
                k: statistics.median(m[k] for m in ms)
                for k in ("weights_mb", "before_mb", "peak_mb", "added_mb")
            }
            print(
                f"| {label} | {med['weights_mb']:.1f} | {med['before_mb']:.0f} | {med['peak_mb']:.0f} | "
                f"{med['added_mb']:.1f} |"
            )
    return results


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--old", help="source tree of the 'before' version (a git worktree)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=390)
    parser.add_argument("--memory", action="store_true", help="also the peak memory of a wide MLP")
    parser.add_argument("--memory-repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    if not args.old:
        parser.error("--old PATH (a tree of the version to compare against) is required")
    start = time.perf_counter()
    results = run(args)
    results["seconds"] = time.perf_counter() - start
    import platform

    import torch

    results["environment"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "nproc": os.cpu_count(),
        "threads": 1,
    }
    print(f"\ntotal time {results['seconds']:.1f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
