"""Before/after in one interleaved run: the exact method of a baseline tree and of this tree, beside
BackPACK's DiagGGNExact and the rest of bench_backpack's candidates, in the benchmark's own order;
ours and the baseline swap places every round. Wall time (perf_counter) and CPU time of the thread
(thread_time) per call, medians over the rounds.

The baseline is the package of another commit renamed to ``lightning_flatness_base`` in ``BASE_DIR``:

    git archive 0f2b7d9 lightning_flatness | tar -x -C /tmp/base && cd /tmp/base
    mv lightning_flatness lightning_flatness_base
    grep -rl lightning_flatness lightning_flatness_base \\
        | xargs sed -i 's/\\blightning_flatness\\b/lightning_flatness_base/g'

Usage, from the repository root:
``BASE_DIR=/tmp/base python benchmarks/results/exact_speed2_before_after.py mlp,lenet 25 [out.json]``
(models, rounds, optional JSON of the medians).
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.bench_backpack import METHODS, batch, candidate

BP = "backpack_diag_ggn_exact"


def baseline(model, x, y):
    """The baseline tree's ``hessian_diagonal(..., method="exact")`` on one batch."""
    base = importlib.import_module("lightning_flatness_base.functional")
    return lambda: base.hessian_diagonal(model, F.cross_entropy, x, y, method="exact")


def measure(name: str, rounds: int) -> dict:
    model, x, y = batch(name, 0)
    fns = {}
    for m in METHODS:
        try:
            f = candidate(model, x, y, m, 64)
            f()
            fns[m] = f
        except Exception as err:  # noqa: BLE001 - BackPACK's DiagHessian has no rule for the ResNet's sums
            print(f"{name} {m}: skipped ({type(err).__name__})")
    fns["base_exact"] = baseline(model, x, y)
    fns["base_exact"]()
    order = [m for m in fns if m != "base_exact"]
    i = order.index("ours_exact")
    wall: dict[str, list[float]] = {m: [] for m in fns}
    cpu: dict[str, list[float]] = {m: [] for m in fns}
    for r in range(rounds):
        pair = ["ours_exact", "base_exact"] if r % 2 == 0 else ["base_exact", "ours_exact"]
        for m in order[:i] + pair + order[i + 1 :]:
            c, w = time.thread_time(), time.perf_counter()
            fns[m]()
            wall[m].append(time.perf_counter() - w)
            cpu[m].append(time.thread_time() - c)
    med = {m: (1e3 * statistics.median(wall[m]), 1e3 * statistics.median(cpu[m])) for m in fns}
    speed = {
        clock: {
            who: med[BP][j] / med[key][j] for who, key in (("ours", "ours_exact"), ("base", "base_exact"))
        }
        for j, clock in enumerate(("wall", "cpu"))
    }
    row = {
        "ms_wall_cpu": {m: med[m] for m in ("gradient", "ours_exact", "base_exact", BP)},
        "speedup_vs_DiagGGNExact_wall": speed["wall"],
        "speedup_vs_DiagGGNExact_cpu": speed["cpu"],
        "load_after": os.getloadavg(),
    }
    parts = [f"{name:6s} load {os.getloadavg()[0]:.2f}"]
    for j, clock in enumerate(("wall", "cpu")):
        parts.append(
            f"{clock} ms: ours {med['ours_exact'][j]:.3f} base {med['base_exact'][j]:.3f} "
            f"DiagGGNExact {med[BP][j]:.3f} -> ours {speed[clock]['ours']:.2f}x, "
            f"base {speed[clock]['base']:.2f}x"
        )
    print(" | ".join(parts), flush=True)
    return row


def main() -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, os.environ.get("BASE_DIR", "/tmp/base"))
    rounds = int(sys.argv[2])
    out = {"load_before": os.getloadavg(), "rounds": rounds, "models": {}}
    for name in sys.argv[1].split(","):
        out["models"][name] = measure(name, rounds)
    if len(sys.argv) > 3:
        with open(sys.argv[3], "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
