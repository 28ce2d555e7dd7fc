"""Before/after in one interleaved run: the exact method of a baseline tree (imported as the renamed
package `lightning_flatness_base` from BASE_DIR) and of this tree, beside BackPACK's DiagGGNExact and
the rest of bench_backpack's candidates, in the benchmark's own order; ours and the baseline swap
places every round. Wall time (perf_counter) and CPU time of the thread (thread_time) per call."""
import json, os, statistics, sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, os.environ.get("BASE_DIR", "/tmp/exact/base"))
import torch.nn.functional as F
from benchmarks.bench_backpack import METHODS, batch, candidate
import lightning_flatness_base.functional as base

models = sys.argv[1].split(",")
rounds = int(sys.argv[2])
out = {"load_before": os.getloadavg(), "rounds": rounds, "models": {}}
for name in models:
    model, x, y = batch(name, 0)
    fns = {}
    for m in METHODS:
        try:
            f = candidate(model, x, y, m, 64)
            f()
            fns[m] = f
        except Exception as err:  # BackPACK's DiagHessian has no rule for the ResNet's sums
            print(f"{name} {m}: skipped ({type(err).__name__})")
    fns["base_exact"] = lambda: base.hessian_diagonal(model, F.cross_entropy, x, y, method="exact")
    fns["base_exact"]()
    order = list(fns)
    order.remove("base_exact")
    i = order.index("ours_exact")
    wall = {m: [] for m in fns}
    cpu = {m: [] for m in fns}
    for r in range(rounds):
        pair = ["ours_exact", "base_exact"] if r % 2 == 0 else ["base_exact", "ours_exact"]
        for m in order[:i] + pair + order[i + 1 :]:
            c, w = time.thread_time(), time.perf_counter()
            fns[m]()
            wall[m].append(time.perf_counter() - w)
            cpu[m].append(time.thread_time() - c)
    med = {m: (1e3 * statistics.median(wall[m]), 1e3 * statistics.median(cpu[m])) for m in fns}
    bp = med["backpack_diag_ggn_exact"]
    row = {
        "ms_wall_cpu": {m: med[m] for m in ("gradient", "ours_exact", "base_exact", "backpack_diag_ggn_exact")},
        "speedup_vs_DiagGGNExact_wall": {"ours": bp[0] / med["ours_exact"][0], "base": bp[0] / med["base_exact"][0]},
        "speedup_vs_DiagGGNExact_cpu": {"ours": bp[1] / med["ours_exact"][1], "base": bp[1] / med["base_exact"][1]},
        "load_after": os.getloadavg(),
    }
    out["models"][name] = row
    print(
        f"{name:6s} load {os.getloadavg()[0]:.2f} | wall ms: ours {med['ours_exact'][0]:.3f} base {med['base_exact'][0]:.3f} "
        f"DiagGGNExact {bp[0]:.3f} -> ours {row['speedup_vs_DiagGGNExact_wall']['ours']:.2f}x, base "
        f"{row['speedup_vs_DiagGGNExact_wall']['base']:.2f}x | cpu ms: ours {med['ours_exact'][1]:.3f} base "
        f"{med['base_exact'][1]:.3f} DiagGGNExact {bp[1]:.3f} -> ours {row['speedup_vs_DiagGGNExact_cpu']['ours']:.2f}x, "
        f"base {row['speedup_vs_DiagGGNExact_cpu']['base']:.2f}x",
        flush=True,
    )
if len(sys.argv) > 3:
    with open(sys.argv[3], "w") as f:
        json.dump(out, f, indent=1)
