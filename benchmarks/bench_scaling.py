"""Scaling of time and peak memory with the number of parameters and samples, and the memory of the
DDP synchronisation of ``NormalizedSharpness`` with the number of processes.

1. MLP (40 -> w -> w -> w -> 10) of width w = 100 ... 3200 (0.03 M to 20.6 M weights), batch of 128
   MNIST-1D samples, mean normalized-softmax-cross-entropy (eq. 20): time (median of interleaved
   repeats) and peak memory (fresh subprocess per point, ``common.py``) of one gradient, the exact
   diagonal, and one Hutchinson / finite-difference probe (``--probes`` probes, time divided by
   them). The log-log slope of time against the number of weights is fitted over w >= 400.
2. Width 400, samples n = 128 ... 2048: time of each method (slope against n).
3. DDP: ``--world`` gloo processes (file store, one machine) each hold a ``NormalizedSharpness``
   with ``R = 8`` replicate slots for the width-400 MLP (344 k weights: ``8 R`` bytes per weight,
   22 MB of float64 states) and synchronise it (``metric.sync()``, what ``compute()`` does under DDP).
   Peak resident memory of the synchronisation per process, against a torchmetrics ``Metric`` with
   the same states and torchmetrics' default synchronisation (``gather_all_tensors``: an all-gather
   of every state, then a sum), which holds ``world_size`` copies.

    python -m benchmarks.bench_scaling --json benchmarks/results_scaling.json --plot benchmarks/scaling.png
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from typing import Any, Callable

import torch

from benchmarks.common import (
    REPO_ROOT,
    base_parser,
    build_model,
    gradient_fn,
    interleaved_times,
    markdown_table,
    mnist1d,
    peak_rss_delta_mib,
    run_memory_worker,
    run_timed,
    setup,
    weight_parameters,
)

METHODS = ("gradient", "exact", "hutchinson", "finite_difference")
DDP_WIDTH = 400
REPLICATES = 8


def candidate(method: str, width: int, n: int, probes: int, seed: int = 0) -> tuple[Callable[[], Any], int]:
    """``(fn, number of weights)`` for one method on a random-init MLP of ``width`` and ``n`` samples."""
    from lightning_flatness.functional import hessian_diagonal, normalized_softmax_cross_entropy

    torch.manual_seed(seed)
    model = build_model("mlp", width).eval()
    data = mnist1d()
    x, y = data.x_train[:n], data.y_train[:n]
    numel = sum(p.numel() for p in weight_parameters(model).values())
    if method == "gradient":
        return gradient_fn(model, normalized_softmax_cross_entropy, x, y), numel

    def fn():
        return hessian_diagonal(
            model,
            normalized_softmax_cross_entropy,
            x,
            y,
            method=method,
            num_probes=probes,
            generator=torch.Generator().manual_seed(0),
        )

    return fn, numel


def worker(argv: list[str]) -> None:
    """``--worker METHOD WIDTH N PROBES``: peak memory of one call, as JSON."""
    method, width, n, probes = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    torch.set_num_threads(1)
    fn, _ = candidate(method, width, n, probes)
    fn()
    print(json.dumps({"peak_mib": peak_rss_delta_mib(fn)}))


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(v) for v in xs], [math.log(v) for v in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def width_sweep(
    widths: list[int], n: int, probes: int, repeats: int, memory: Callable[[int, str], bool]
) -> list[dict[str, Any]]:
    rows = []
    for width in widths:
        fns, numel = {}, 0
        for method in METHODS:
            fns[method], numel = candidate(method, width, n, probes)
        reps = repeats if numel < 2_000_000 else max(1, repeats // 2)
        times = interleaved_times(fns, repeats=reps, warmup=1)
        for method in METHODS:
            t = times[method]["median"] / (probes if method in ("hutchinson", "finite_difference") else 1)
            row = {
                "width": width,
                "weights": numel,
                "method": method,
                "ms": 1e3 * t,
                "gradients": t / times["gradient"]["median"],
            }
            if memory(width, method):
                res = run_memory_worker("benchmarks.bench_scaling", [method, str(width), str(n), str(probes)])
                row["peak_mib"] = res.get("peak_mib")
                row["peak_bytes_per_weight"] = (
                    None if row["peak_mib"] is None else row["peak_mib"] * 2**20 / numel
                )
            rows.append(row)
    return rows


def sample_sweep(sizes: list[int], width: int, probes: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        fns = {m: candidate(m, width, n, probes)[0] for m in METHODS}
        times = interleaved_times(fns, repeats=repeats, warmup=1)
        for method in METHODS:
            t = times[method]["median"] / (probes if method in ("hutchinson", "finite_difference") else 1)
            rows.append({"samples": n, "method": method, "ms": 1e3 * t})
    return rows


# ------------------------------------------------------------------------------------------------
# DDP synchronisation
# ------------------------------------------------------------------------------------------------


def _gather_metric_class():
    """A torchmetrics ``Metric`` with the same states as ``NormalizedSharpness`` and torchmetrics'
    default synchronisation (all-gather each state, then sum)."""
    from torchmetrics import Metric

    class GatherSum(Metric):
        full_state_update = False

        def __init__(self, shapes: dict[str, int], replicates: int):
            super().__init__()
            self.names = list(shapes)
            for i, numel in enumerate(shapes.values()):
                self.add_state(
                    f"sum_{i}",
                    default=torch.zeros(replicates, numel, dtype=torch.float64),
                    dist_reduce_fx="sum",
                )
            self.add_state("count", default=torch.zeros(replicates, dtype=torch.int64), dist_reduce_fx="sum")

        def update(self, diagonals: dict[str, torch.Tensor]) -> None:
            for i, name in enumerate(self.names):
                getattr(self, f"sum_{i}").add_(diagonals[name].reshape(REPLICATES, -1))
            self.count += 1

        def compute(self):
            return self.count.sum()

    return GatherSum


def ddp_worker(argv: list[str]) -> None:
    """``--ddp-worker KIND RANK WORLD INIT_FILE``: peak memory of one synchronisation, as JSON."""
    import torch.distributed as dist

    kind, rank, world, init_file = argv[0], int(argv[1]), int(argv[2]), argv[3]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = build_model("mlp", DDP_WIDTH)
    weights = {n: p.detach() for n, p in weight_parameters(model).items()}
    gen = torch.Generator().manual_seed(rank)
    diagonals = {n: torch.rand((REPLICATES, *w.shape), generator=gen) for n, w in weights.items()}
    if kind == "ours":
        from lightning_flatness.metric import NormalizedSharpness

        metric = NormalizedSharpness(weights, num_replicates=REPLICATES)
        metric.update(diagonals, weights, [16] * REPLICATES)
    else:
        metric = _gather_metric_class()({n: w.numel() for n, w in weights.items()}, REPLICATES)
        metric.update(diagonals)
    state_bytes = sum(
        t.numel() * t.element_size()
        for k in metric._defaults
        for t in [getattr(metric, k)]
        if isinstance(t, torch.Tensor)
    )
    del diagonals
    moved = {"all_reduce": 0, "all_gather": 0}
    real_reduce, real_gather = dist.all_reduce, dist.all_gather

    def counting_reduce(tensor, *args, **kwargs):
        moved["all_reduce"] += tensor.numel() * tensor.element_size()
        return real_reduce(tensor, *args, **kwargs)

    def counting_gather(tensor_list, tensor, *args, **kwargs):
        moved["all_gather"] += sum(t.numel() * t.element_size() for t in tensor_list)
        return real_gather(tensor_list, tensor, *args, **kwargs)

    dist.all_reduce, dist.all_gather = counting_reduce, counting_gather
    dist.barrier()

    def sync():
        metric.sync(should_sync=True, distributed_available=lambda: True)
        metric.unsync()

    peak = peak_rss_delta_mib(sync)
    dist.barrier()
    dist.destroy_process_group()
    print(
        json.dumps(
            {
                "rank": rank,
                "peak_mib": peak,
                "state_mib": state_bytes / 2**20,
                "all_reduce_mib": moved["all_reduce"] / 2**20,
                "all_gather_mib": moved["all_gather"] / 2**20,
            }
        )
    )


def ddp_sweep(worlds: list[int]) -> list[dict[str, Any]]:
    env = dict(
        os.environ,
        MALLOC_MMAP_THRESHOLD_="65536",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    rows = []
    for kind in ("ours", "torchmetrics_all_gather"):
        for world in worlds:
            with tempfile.TemporaryDirectory() as tmp:
                init_file = os.path.join(tmp, "store")
                procs = [
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "benchmarks.bench_scaling",
                            "--ddp-worker",
                            kind,
                            str(rank),
                            str(world),
                            init_file,
                        ],
                        cwd=REPO_ROOT,
                        env=env,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                    for rank in range(world)
                ]
                outs = []
                for proc in procs:
                    out, err = proc.communicate(timeout=300)
                    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
                    outs.append(json.loads(lines[-1]) if lines else {"error": err.strip().splitlines()[-1:]})
            ok = [o for o in outs if "peak_mib" in o]
            if len(ok) != world:
                rows.append(
                    {"sync": kind, "processes": world, "error": str([o for o in outs if "error" in o][:1])}
                )
                continue
            rows.append(
                {
                    "sync": kind,
                    "processes": world,
                    "state_mib": ok[0]["state_mib"],
                    "peak_mib_max_rank": max(o["peak_mib"] for o in ok),
                    "peak_over_state": max(o["peak_mib"] for o in ok) / ok[0]["state_mib"],
                    "all_reduce_mib": ok[0]["all_reduce_mib"],
                    "all_gather_out_mib": ok[0]["all_gather_mib"],
                }
            )
    return rows


def plot(results: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    rows = results["widths"]
    for method in METHODS:
        sel = [r for r in rows if r["method"] == method]
        label = method + (" (per probe)" if method in ("hutchinson", "finite_difference") else "")
        axes[0].loglog([r["weights"] for r in sel], [r["ms"] for r in sel], "o-", label=label)
        mem = [r for r in sel if r.get("peak_mib") is not None]
        if mem:
            axes[1].loglog(
                [r["weights"] for r in mem], [max(r["peak_mib"], 1e-2) for r in mem], "o-", label=label
            )
    xs = sorted({r["weights"] for r in rows})
    ref = [r for r in rows if r["method"] == "gradient"]
    if ref:  # a slope-1 guide through the gradient's last point
        axes[0].loglog(xs, [ref[-1]["ms"] * x / xs[-1] for x in xs], "k:", lw=0.8, label="linear")
    axes[0].set(xlabel="weights", ylabel="ms (batch of 128)", title="time vs parameters (MLP width 100-3200)")
    axes[1].set(xlabel="weights", ylabel="peak MiB above baseline", title="peak memory vs parameters")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    srows = results["samples"]
    for method in METHODS:
        sel = [r for r in srows if r["method"] == method]
        axes[2].loglog([r["samples"] for r in sel], [r["ms"] for r in sel], "o-", label=method)
    axes[2].set(
        xlabel="samples", ylabel="ms", title=f"time vs samples (width {results['config']['sample_width']})"
    )
    drows = [r for r in results["ddp"] if "peak_mib_max_rank" in r]
    for kind in ("ours", "torchmetrics_all_gather"):
        sel = [r for r in drows if r["sync"] == kind]
        axes[3].plot([r["processes"] for r in sel], [r["peak_mib_max_rank"] for r in sel], "o-", label=kind)
    if drows:
        axes[3].axhline(drows[0]["state_mib"], color="grey", ls=":", label="state size")
    axes[3].set(xlabel="processes (gloo)", ylabel="peak MiB per process", title="DDP sync memory")
    axes[3].set_xticks(sorted({r["processes"] for r in drows}) or [1])
    for ax in axes[:3]:
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def run(args) -> dict[str, Any]:
    quick = args.quick
    widths = [100, 200] if quick else [100, 200, 400, 800, 1600, 3200]
    sizes = [128, 256] if quick else [128, 256, 512, 1024, 2048]
    worlds = [2] if quick else [1, 2, 4]
    probes = 2 if quick else args.probes
    repeats = 1 if quick else args.repeats
    results: dict[str, Any] = {
        "config": {
            "widths": widths,
            "samples": 128,
            "probes": probes,
            "repeats": repeats,
            "sample_sizes": sizes,
            "sample_width": 400,
            "worlds": worlds,
            "ddp_width": DDP_WIDTH,
            "replicates": REPLICATES,
        }
    }
    if args.no_memory:

        def memory(width: int, method: str) -> bool:
            return False

    elif quick:  # one subprocess measurement, to exercise the path

        def memory(width: int, method: str) -> bool:
            return width == widths[0] and method == "exact"

    else:

        def memory(width: int, method: str) -> bool:
            return True

    rows = width_sweep(widths, 128, probes, repeats, memory)
    results["widths"] = rows
    print(
        f"\n### MLP width sweep, batch of 128 (time: median of {repeats} interleaved repeats; stochastic "
        f"methods per probe, {probes} probes)\n"
    )
    print(
        markdown_table(
            rows,
            ["width", "weights", "method", "ms", "gradients", "peak_mib", "peak_bytes_per_weight"],
            {"ms": ".3g", "gradients": ".3g", "peak_mib": ".3g", "peak_bytes_per_weight": ".3g"},
        )
    )
    fits = []
    for method in METHODS:
        sel = [r for r in rows if r["method"] == method and r["width"] >= 400]
        if len(sel) >= 2:
            fit = {
                "method": method,
                "time_slope_vs_weights": slope([r["weights"] for r in sel], [r["ms"] for r in sel]),
            }
            if all(r.get("peak_mib") is not None for r in sel):
                fit["memory_slope_vs_weights"] = slope(
                    [r["weights"] for r in sel], [r["peak_mib"] for r in sel]
                )
            fits.append(fit)
    srows = sample_sweep(sizes, 400, probes, repeats)
    results["samples"] = srows
    for fit in fits:
        sel = [r for r in srows if r["method"] == fit["method"]]
        fit["time_slope_vs_samples"] = slope([r["samples"] for r in sel], [r["ms"] for r in sel])
    for method in METHODS:
        if not any(f["method"] == method for f in fits):
            sel = [r for r in srows if r["method"] == method]
            fits.append(
                {
                    "method": method,
                    "time_slope_vs_samples": slope([r["samples"] for r in sel], [r["ms"] for r in sel]),
                }
            )
    results["fits"] = fits
    print("\n### samples sweep, width 400\n")
    print(markdown_table(srows, ["samples", "method", "ms"], {"ms": ".3g"}))
    print("\n### log-log slopes (1 = linear; widths >= 400 for parameters)\n")
    print(
        markdown_table(
            fits,
            ["method", "time_slope_vs_weights", "memory_slope_vs_weights", "time_slope_vs_samples"],
            {
                "time_slope_vs_weights": ".2f",
                "memory_slope_vs_weights": ".2f",
                "time_slope_vs_samples": ".2f",
            },
        )
    )
    drows = ddp_sweep(worlds)
    results["ddp"] = drows
    print(f"\n### DDP synchronisation of the metric states (MLP width {DDP_WIDTH}, R = {REPLICATES}), gloo\n")
    print(
        markdown_table(
            drows,
            [
                "sync",
                "processes",
                "state_mib",
                "peak_mib_max_rank",
                "peak_over_state",
                "all_reduce_mib",
                "all_gather_out_mib",
                "error",
            ],
            {
                "state_mib": ".3g",
                "peak_mib_max_rank": ".3g",
                "peak_over_state": ".2f",
                "all_reduce_mib": ".3g",
                "all_gather_out_mib": ".3g",
            },
        )
    )
    return results


def main(argv=None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker(argv[1:])
        return {}
    if argv and argv[0] == "--ddp-worker":
        ddp_worker(argv[1:])
        return {}
    parser = base_parser(__doc__)
    parser.add_argument("--probes", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--plot", default=None, help="write the scaling figure (PNG) here")
    args = parser.parse_args(argv)
    setup(args)
    return run_timed(run, args, plot)


if __name__ == "__main__":
    main()
