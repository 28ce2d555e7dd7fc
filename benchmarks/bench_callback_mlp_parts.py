"""Where the callback's overhead on the paper's MLP goes: configurations and training-step time.

Fits the paper's MLP on MNIST-1D (``benchmarks.bench_callback.fit``: 3 epochs of 390 steps of batch
128, Adam, TensorBoard logger), interleaved over ``--repeats`` rounds, in five configurations: no
callback, an empty ``Callback`` (Lightning's per-step hook dispatch for one more callback),
``SharpnessMonitor()`` at its defaults, with ``log_per_layer=False`` and with ``log_images=False``;
``--configs`` also offers ``num_samples=256`` and ``num_samples=128`` (the cost and the standard error
of fewer samples per measurement) and ``every_n_epochs=2`` / ``3`` (a coarser cadence; with
``--epochs`` a multiple of it), and ``defaults, state_key formed at every read`` (the monitor's checkpoint key
formed at every read, as before round 22: Lightning reads it for every hook it dispatches).
A timing callback added in front of them all (so every configuration has at least one callback)
records the process CPU time of every training step (``on_train_batch_start`` to
``on_train_batch_end``) and of every validation
(``on_validation_start`` to ``on_validation_end``, which holds the measurement and its logging).
Reports per configuration the median fit CPU time and overhead, the summed step time, the median
step after the first epoch, the validation time per epoch (mean, and the median after the first
epoch: the steady state), and the relative standard error of the total at the last measurement. One
intra-op thread.

    python -m benchmarks.bench_callback_mlp_parts --json benchmarks/results/bench_callback_mlp_parts.json
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

from benchmarks.bench_callback import _lightning, fit
from benchmarks.bench_callback_resnet18 import EPOCH_STEPS
from benchmarks.bench_solver import machine
from benchmarks.common import base_parser, setup, write_json

EMPTY = "empty"  # an empty pl.Callback in place of the monitor: Lightning's per-step hook dispatch alone
# the monitor at its defaults with its state_key formed at every read, as before round 22 (Lightning reads it
# for every hook it dispatches): the cost of that read, in the same process as the defaults
KEY_AT_EVERY_READ = "key at every read"

CONFIGS: dict[str, Any] = {
    "no callback": None,
    "an empty Callback": EMPTY,
    "defaults": {},
    "log_per_layer=False": {"log_per_layer": False},
    "log_images=False": {"log_images": False},
}
#: Further configurations, run when named in ``--configs``: fewer samples per measurement (the cost and
#: the standard error it buys).
MORE_CONFIGS: dict[str, Any] = {
    "num_samples=256": {"num_samples": 256},
    "num_samples=128": {"num_samples": 128},
    "every_n_epochs=2": {"every_n_epochs": 2},
    "every_n_epochs=3": {"every_n_epochs": 3},
    "defaults, state_key formed at every read": KEY_AT_EVERY_READ,
}


def _key_formed_at_every_read(self: Any) -> str:
    """``SharpnessMonitor.state_key`` before round 22: formed from its seven arguments at every read."""
    return self._formed_state_key()


def _timer_class():
    pl = _lightning()

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.steps: list[float] = []
            self.validations: list[float] = []

        def on_train_batch_start(self, *args: Any) -> None:
            self._step = time.process_time()

        def on_train_batch_end(self, *args: Any) -> None:
            self.steps.append(time.process_time() - self._step)

        def on_validation_start(self, *args: Any) -> None:
            self._validation = time.process_time()

        def on_validation_end(self, *args: Any) -> None:
            self.validations.append(time.process_time() - self._validation)

    return StepTimer


def _monitor_arguments(monitor: Any) -> Any:
    """The monitor's arguments for ``bench_callback.fit`` (None: no monitor) of a configuration."""
    if monitor == EMPTY:
        return None
    return {} if monitor == KEY_AT_EVERY_READ else monitor


def timed_fit(monitor: Any, epochs: int, steps: int, logdir: str) -> dict[str, float]:
    """One fit with a StepTimer in front of the trainer's callbacks (patched into ``Trainer.__init__``)."""
    pl = _lightning()
    timer = _timer_class()()
    original = pl.Trainer.__init__

    extra = [pl.Callback()] if monitor == EMPTY else []

    def init(self, *args: Any, callbacks: Any = None, **kwargs: Any) -> None:
        original(self, *args, callbacks=[timer, *extra, *(callbacks or [])], **kwargs)

    from lightning_flatness import SharpnessMonitor

    key_at_every_read = monitor == KEY_AT_EVERY_READ
    if key_at_every_read:  # shadows the inherited, cached property for this fit only
        SharpnessMonitor.state_key = property(_key_formed_at_every_read)  # type: ignore[assignment,method-assign]
    pl.Trainer.__init__ = init
    try:
        run = fit("mlp", epochs, steps, _monitor_arguments(monitor), 0, logdir)
    finally:
        pl.Trainer.__init__ = original
        if key_at_every_read:
            del SharpnessMonitor.state_key
    last = run["history"][-1] if run["history"] else {}
    return {
        "cpu_seconds": run["cpu_seconds"],
        "step_seconds": sum(timer.steps),
        "median_step_after_first_epoch": statistics.median(timer.steps[steps:] or timer.steps),
        "validation_seconds_per_epoch": sum(timer.validations) / max(len(timer.validations), 1),
        # the steady state: the first measurement of a fit is dearer (the curvature of the first epoch is the
        # noisiest to solve)
        "median_validation_after_first_epoch": statistics.median(timer.validations[1:] or timer.validations),
        # the relative standard error of the total at the last measurement (NaN without a monitor)
        "rel_stderr": float(last.get("normalized_stderr", math.nan))
        / float(last.get("normalized", math.nan)),
    }


def main(argv=None) -> dict:
    p = base_parser(__doc__)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--epochs", type=int, default=3, help="epochs of 390 steps per fit")
    p.add_argument(
        "--configs",
        nargs="+",
        default=list(CONFIGS),
        choices=[*CONFIGS, *MORE_CONFIGS],
        help="configurations to run (default: the first five; 'no callback' is always run, as the base)",
    )
    args = p.parse_args(argv)
    setup(args)
    epochs, steps = (2, 20) if args.quick else (args.epochs, EPOCH_STEPS)
    repeats = 1 if args.quick else args.repeats
    every = {**CONFIGS, **MORE_CONFIGS}
    configs = {name: every[name] for name in dict.fromkeys(["no callback", *args.configs])}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as logdir:
        for monitor in configs.values():  # warm-up: imports, first calls
            fit("mlp", 1, 4, _monitor_arguments(monitor), 0, logdir)
        for _ in range(repeats):
            for name, monitor in configs.items():
                runs[name].append(timed_fit(monitor, epochs, steps, logdir))
    base = statistics.median(r["cpu_seconds"] for r in runs["no callback"])
    rows = []
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        rows.append({"config": name, **med, "overhead_cpu": med["cpu_seconds"] / base - 1, "runs": rs})
    given = list(argv if argv is not None else sys.argv[1:])
    print(f"Command: `python -m benchmarks.bench_callback_mlp_parts {' '.join(given)}`  ")
    print(f"Machine: {machine()}; torch {torch.__version__}; 1 thread; load {os.getloadavg()[0]:.1f}\n")
    print(
        f"| configuration | fit (CPU s, median of {repeats}) | overhead | training steps (s) "
        "| median step after epoch 1 (ms) | validation per epoch (ms) | median validation after epoch 1 (ms) "
        "| s.e. / value (last measurement) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        se = "" if math.isnan(r["rel_stderr"]) else f"{r['rel_stderr']:.1%}"
        print(
            f"| {r['config']} | {r['cpu_seconds']:.3f} | {r['overhead_cpu']:.1%} | {r['step_seconds']:.3f} "
            f"| {1e3 * r['median_step_after_first_epoch']:.3f} "
            f"| {1e3 * r['validation_seconds_per_epoch']:.1f} "
            f"| {1e3 * r['median_validation_after_first_epoch']:.1f} | {se} |"
        )
    results = {"rows": rows, "repeats": repeats, "epochs": epochs, "steps": steps}
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
