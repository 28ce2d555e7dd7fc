"""Where one evaluation of ``SharpnessMonitor`` spends its CPU time, piece by piece, on the paper's MLP.

Wraps the monitor's methods (and ``LightningModule.log``/``log_dict``, the chart's matplotlib calls)
with ``time.process_time`` counters, then runs a warm-up fit and a fit of 6 epochs of 20 steps (one
measurement per epoch) with ``benchmarks.bench_callback.fit``; prints the median CPU milliseconds per
call of each piece. ``TREE`` is the source tree to import the library from (this checkout, or a
``git archive`` of an older commit, for a before/after comparison); ``MONITOR`` the monitor's
arguments as a Python dict literal.

    python benchmarks/callback_breakdown.py TREE ["{'log_images': False}"]
"""

from __future__ import annotations

import ast
import collections
import functools
import os
import statistics
import sys
import tempfile
import time


def main() -> None:
    tree = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".")
    monitor = ast.literal_eval(sys.argv[2]) if len(sys.argv) > 2 else {}
    sys.path.insert(0, tree)
    os.chdir(tree)
    import pytorch_lightning as pl
    import torch

    import lightning_flatness.callback as cb
    import lightning_flatness.measure as ms
    from benchmarks.bench_callback import fit

    torch.set_num_threads(1)
    spent: dict[str, list[float]] = collections.defaultdict(list)

    def wrap(owner, name: str) -> None:
        if not hasattr(owner, name):  # a piece the tree does not have
            return
        f = getattr(owner, name)

        @functools.wraps(f)
        def timed(*args, **kwargs):
            t = time.process_time()
            try:
                return f(*args, **kwargs)
            finally:
                spent[name].append(time.process_time() - t)

        setattr(owner, name, timed)

    base = cb.SharpnessMonitorBase
    for name in ("on_validation_epoch_end", "_measure", "_log", "_log_media", "copy_network", "_estimate"):
        wrap(base, name)
    wrap(ms.SharpnessMeasurement, "compute")
    wrap(cb, "bar_chart_figure")
    wrap(cb, "figure_to_image")
    wrap(cb, "log_per_layer_media")
    wrap(pl.LightningModule, "log_dict")
    with tempfile.TemporaryDirectory() as logdir:
        fit("mlp", 1, 4, monitor, 0, logdir)  # warm-up: imports, matplotlib, first calls
        spent.clear()
        fit("mlp", 6, 20, monitor, 0, logdir)
    print(f"tree {tree}, monitor {monitor or 'defaults'}, load {os.getloadavg()[0]:.2f}")
    print("| piece | calls | median CPU ms per call | total CPU ms |\n|---|---|---|---|")
    for name, values in spent.items():
        print(f"| {name} | {len(values)} | {1e3 * statistics.median(values):.2f} | {1e3 * sum(values):.1f} |")


if __name__ == "__main__":
    main()
