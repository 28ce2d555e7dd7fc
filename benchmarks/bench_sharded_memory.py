"""Peak memory per process of the FSDP2 sharded measurement against the unsharded one (CPU, gloo).

A ReLU MLP ``1024 -> 1024 -> 1024 -> 1024 -> 10`` (3.2 M weights in four tensors, float32), 256
samples in 4 batches, ``num_replicates=4``. Unsharded: ``measure_sharpness(method="exact")`` in one
process. Sharded: ``P`` forked processes, each with its ``fully_shard`` rows and ``256 / P``
samples, measured by ``lightning_flatness.sharded``. Memory is the resident set size (RSS, sampled
every 2 ms by a thread) above its value just before the measurement, so the model, the data and
the interpreter are left out. The target: per process at most ``1.5 x (unsharded / P)`` plus one
whole float64 tensor of the largest weight's size.

RSS depends on the allocator (glibc keeps freed blocks; ``malloc_trim`` runs before each
baseline), so repeated runs differ by tens of MiB; run it twice.

Usage::

    python benchmarks/bench_sharded_memory.py > benchmarks/results/bench_sharded_memory.md
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WIDTH, DEPTH, SAMPLES, BATCHES, REPLICATES = 1024, 3, 256, 4, 4


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRSS:
    """The largest RSS above the value at entry, sampled by a thread while the block runs."""

    def __enter__(self) -> PeakRSS:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap to the system: a clean baseline
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def bytes(self) -> int:
        return self.peak - self.base


def model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 10)).eval()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(SAMPLES, WIDTH, generator=g), torch.randint(0, 10, (SAMPLES,), generator=g)


def unsharded() -> dict:
    from lightning_flatness.measure import measure_sharpness

    net, (x, y) = model(), data()
    batches = [(x[i::BATCHES], y[i::BATCHES]) for i in range(BATCHES)]
    with PeakRSS() as peak:
        result = measure_sharpness(net, batches, method="exact", num_replicates=REPLICATES)
    return {"peak_bytes": peak.bytes, "normalized": float(result["normalized"])}


def _unsharded_process(out_file: str) -> None:
    torch.set_num_threads(1)
    torch.save(unsharded(), out_file)


def _solve_process(out_file: str) -> None:
    """The eq. 13/17 solves of one whole ``WIDTH x WIDTH`` float64 tensor, alone: their workspace."""
    from lightning_flatness.functional import sharpness_measures

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    w, h = (
        torch.randn(WIDTH, WIDTH, generator=g, dtype=torch.float64),
        torch.rand(WIDTH, WIDTH, generator=g, dtype=torch.float64),
    )
    sharpness_measures({"w": w[:4, :4]}, {"w": h[:4, :4]})  # warm-up (lazy imports)
    with PeakRSS() as peak:
        sharpness_measures({"w": w}, {"w": h})
    torch.save({"peak_bytes": peak.bytes}, out_file)


def _in_fresh_process(target, *args):
    with tempfile.TemporaryDirectory() as tmp:
        process = multiprocessing.get_context("fork").Process(target=target, args=(*args, f"{tmp}/out.pt"))
        process.start()
        process.join()
        return torch.load(f"{tmp}/out.pt")


def _rank(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_flatness.sharded import ShardedSharpnessMeasurement

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    net = model()
    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    x, y = data()
    own = torch.arange(rank, SAMPLES, world)
    with PeakRSS() as peak:
        start = time.perf_counter()
        measurement = ShardedSharpnessMeasurement(net, num_replicates=REPLICATES)
        for chunk in own.tensor_split(BATCHES):
            measurement.add(x[chunk], y[chunk])
        estimate_bytes = peak.peak - peak.base
        middle = time.perf_counter()
        values = measurement.compute()
        end = time.perf_counter()
    torch.save(
        {
            "peak_bytes": peak.bytes,
            "estimate_peak_bytes": estimate_bytes,
            "normalized": float(values["normalized"]),
            "state_bytes": measurement.state_bytes(),
            "largest_whole_tensor_bytes": 8 * measurement.largest_whole_tensor,
            "estimate_seconds": middle - start,
            "compute_seconds": end - middle,
            "gathered_solves": sorted(measurement.gathered_solves),
        },
        out_file,
    )
    dist.destroy_process_group()


def sharded(world: int) -> list[dict]:
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory() as tmp:
        outs = [f"{tmp}/rank{r}.pt" for r in range(world)]
        procs = [
            context.Process(target=_rank, args=(r, world, f"{tmp}/store", outs[r])) for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        assert all(p.exitcode == 0 for p in procs)
        return [torch.load(o) for o in outs]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    one = _in_fresh_process(_unsharded_process)  # a fresh process, as each sharded rank
    solve = _in_fresh_process(_solve_process)
    mib = 2**20
    largest = 8 * WIDTH * WIDTH
    lines = [
        "Command: `python benchmarks/bench_sharded_memory.py` (CPU, gloo, one thread per process; "
        f"MLP {WIDTH}x{DEPTH}+10, {SAMPLES} samples, {BATCHES} batches, num_replicates={REPLICATES})",
        "",
        "| processes | peak RSS above start, per process (MiB) | peak while estimating (before the solves) "
        "(MiB) | 1.5 x unsharded / P + one whole float64 tensor (MiB) | met | replicate sums per process "
        "(MiB) | estimate / compute() seconds (rank 0) | eq. 17 gathered | normalized |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| 1 (unsharded) | {one['peak_bytes'] / mib:.1f} | | | | | | | {one['normalized']:.10g} |",
    ]
    results = {"unsharded": one}
    for world in args.processes:
        records = sharded(world)
        target = 1.5 * one["peak_bytes"] / world + largest
        results[world] = records
        peaks = ", ".join(f"{r['peak_bytes'] / mib:.1f}" for r in records)
        states = ", ".join(f"{r['state_bytes'] / mib:.1f}" for r in records)
        estimating = ", ".join(f"{r['estimate_peak_bytes'] / mib:.1f}" for r in records)
        met = "yes" if all(r["peak_bytes"] <= target for r in records) else "**no**"
        seconds = f"{records[0]['estimate_seconds']:.1f} / {records[0]['compute_seconds']:.1f}"
        gathered = ", ".join(records[0]["gathered_solves"]) or "none"
        lines.append(
            f"| {world} (sharded) | {peaks} | {estimating} | {target / mib:.1f} | {met} | {states} | "
            f"{seconds} | {gathered} | {records[0]['normalized']:.10g} |"
        )

    lines += [
        "",
        f"The eq. 13/17 solves of one whole {WIDTH}x{WIDTH} float64 tensor, alone in a fresh process: "
        f"{solve['peak_bytes'] / mib:.1f} MiB "
        f"({solve['peak_bytes'] / largest:.0f} whole tensors) of workspace, "
        "on every process, sharded or not.",
    ]
    print("\n".join(lines))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
