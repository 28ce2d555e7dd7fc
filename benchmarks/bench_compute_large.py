"""Benchmark: ``NormalizedSharpness.compute()`` on large weight tensors (LM vocabularies, VGG heads):
time and peak memory, against one pooled eq. 17 solve of the same tensor.

Each case is one weight tensor with heavy-tailed synthetic curvature
(``benchmarks.bench_solver.make_layer``, scenario ``"channels"``: log-normal row and column effects,
about 31% negative entries, clipped) in ``R = 8`` replicate slots, each the diagonal times
``1 + 0.5 N(0, 1)``, 32 samples per slot; the metric's state is filled by one ``update``. Reported:

- ``compute()``: process CPU time, one intra-op thread (the first and only call of the process);
- its peak memory above the resident memory before the call
  (:func:`benchmarks.common.peak_rss_delta_mib`: ``VmHWM`` reset through ``/proc/self/clear_refs``;
  Linux only), also as a multiple of the metric's ``(R, numel)`` float64 state;
- one pooled solve (``solve_normalized_sharpness`` of the pooled mean, the value ``compute()`` reports),
  timed after ``compute()`` in the same process, and the ratio (issue 9: ``compute() <= 2x``).

``--sweep`` instead times ``tensor_measures`` (the per-tensor core of ``compute()``) held in memory
against streamed on the same slot sums, for linear and convolution shapes around the threshold
``STREAM_FROM`` (interleaved, medians of ``--repeats``, one process): the evidence for the
threshold and its kernel factor.

Every case runs in a fresh process (:func:`benchmarks.common.run_memory_worker`: ``--worker CASE SEED``,
one thread, large buffers returned to the kernel when freed), so that peak memory and first-touch page
faults are those of one ``compute()``. Run ``python -m benchmarks.bench_compute_large`` from the
repository root; ``--cases`` picks cases, ``--quick`` is a
smoke test, ``--json PATH`` writes the raw results (and a ``.md`` table beside it).
"""

from __future__ import annotations

import json
import sys
import time

import torch

from benchmarks.bench_solver import machine, make_layer
from benchmarks.common import (
    base_parser,
    command_line,
    peak_rss_delta_mib,
    run_memory_worker,
    setup,
    write_json_and_markdown,
)

CASES = {
    "quick_512x256": (512, 256),
    "vgg_fc2_4096x4096": (4096, 4096),
    "gpt2_vocabulary_50257x768": (50257, 768),
    "8192x4096": (8192, 4096),
    "vgg_fc1_4096x25088": (4096, 25088),
    "vgg_fc2_4096x4096_zeros": (4096, 4096),
}
# cases with this suffix get 8 exact zero weights at random entries (as torchvision's float32 normal
# initialisation of VGG-16's 4096 x 25088 layer has: B = 0 there, the components need checking)
ZEROS_SUFFIX = "_zeros"
NUM_SLOTS = 8


def run_case(name: str, seed: int) -> dict:
    """One case in this process: fill the metric, time ``compute()`` and its peak memory, then one pooled
    solve."""
    from lightning_flatness.functional.solvers import solve_normalized_sharpness
    from lightning_flatness.metric import NormalizedSharpness

    shape = CASES[name]
    g = torch.Generator().manual_seed(seed)
    w, h = make_layer(shape, "channels", g)
    if name.endswith(ZEROS_SUFFIX):
        w.view(-1)[torch.randperm(w.numel(), generator=g)[:8]] = 0.0
    metric = NormalizedSharpness({"w": w.shape}, num_replicates=NUM_SLOTS)
    groups = torch.empty((NUM_SLOTS, *shape), dtype=torch.float64)
    for r in range(NUM_SLOTS):
        groups[r] = h * (1 + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64))
    metric.update({"w": groups}, {"w": w}, [32] * NUM_SLOTS)
    pooled = groups.mean(dim=0)
    del groups, h
    timed: dict = {}

    def compute() -> None:
        start = time.process_time()
        timed["out"] = metric.compute()
        timed["seconds"] = time.process_time() - start

    peak = peak_rss_delta_mib(compute)
    out, compute_s = timed["out"], timed["seconds"]
    start = time.process_time()
    solution = solve_normalized_sharpness(w, pooled)
    pooled_s = time.process_time() - start
    state_mib = NUM_SLOTS * w.numel() * 8 / 2**20
    return {
        "case": name,
        "shape": list(shape),
        "numel": w.numel(),
        "state_mib": state_mib,
        "compute_s": compute_s,
        "compute_peak_extra_mib": peak,
        "peak_over_state": peak / state_mib,
        "pooled_solve_s": pooled_s,
        "ratio": compute_s / pooled_s,
        "normalized": float(out["normalized"]),
        "pooled_value": float(solution.value),
        "normalized_stderr": float(out["normalized_stderr"]),
        "normalized_half_shift": float(out["normalized_half_shift"]),
    }


SWEEP_SHAPES = [
    (100, 100),
    (256, 256),
    (256, 512),
    (512, 1024),
    (1024, 1024),
    (768, 3072),
    (2048, 2048),
    (256, 256, 3, 3),
    (512, 512, 3, 3),
]


def sweep(seed: int, repeats: int, quick: bool) -> list[dict]:
    """``tensor_measures`` held against streamed (the ``STREAM_FROM`` threshold set to force each), on the
    heavy-tailed curvature of :func:`run_case`."""
    import math
    import statistics

    from lightning_flatness.functional import replicate_measures
    from lightning_flatness.functional.replicate_measures import replicate_weights, tensor_measures

    g = torch.Generator().manual_seed(seed)
    mix = replicate_weights(torch.full((NUM_SLOTS,), 32.0, dtype=torch.float64), list(range(NUM_SLOTS)))
    rows = []
    default = replicate_measures.STREAM_FROM
    for shape in SWEEP_SHAPES[:2] if quick else SWEEP_SHAPES:
        w, h = make_layer(shape, "channels", g)
        sums = torch.stack(
            [
                (h * (1 + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)) * 32).reshape(-1)
                for _ in range(NUM_SLOTS)
            ]
        )
        times: dict[str, list[float]] = {"held": [], "streamed": []}
        values = {}
        try:
            for _ in range(repeats):
                for mode, threshold in (("held", math.inf), ("streamed", 0)):
                    replicate_measures.STREAM_FROM = threshold
                    start = time.process_time()
                    values[mode] = tensor_measures(w, sums, mix, 0.5)["normalized"]
                    times[mode].append(time.process_time() - start)
        finally:
            replicate_measures.STREAM_FROM = default
        row = {
            "shape": list(shape),
            "held_ms": 1e3 * statistics.median(times["held"]),
            "streamed_ms": 1e3 * statistics.median(times["streamed"]),
            "streamed_by_default": replicate_measures.streamed(shape),
            "max_rel_diff": float(((values["streamed"] - values["held"]).abs() / values["held"]).max()),
        }
        rows.append(row)
        print(
            f"{'x'.join(map(str, shape))}: held {row['held_ms']:.1f} ms, "
            f"streamed {row['streamed_ms']:.1f} ms "
            f"(default: {'streamed' if row['streamed_by_default'] else 'held'})",
            flush=True,
        )
    return rows


def sweep_markdown(payload: dict) -> str:
    lines = [
        "## `tensor_measures`: held in memory against streamed (the `STREAM_FROM` threshold)\n",
        f"Command: `{payload['command']}`  ",
        f"Machine: {payload['machine']}; torch {torch.__version__}; 1 thread; interleaved, medians\n",
        "| shape | held | streamed | streamed / held | default path "
        "| largest relative difference of the P values |",
        "|---|---|---|---|---|---|",
    ]
    for r in payload["sweep"]:
        lines.append(
            f"| {'x'.join(map(str, r['shape']))} | {r['held_ms']:.1f} ms | {r['streamed_ms']:.1f} ms "
            f"| {r['streamed_ms'] / r['held_ms']:.2f} | {'streamed' if r['streamed_by_default'] else 'held'} "
            f"| {r['max_rel_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def markdown(payload: dict) -> str:
    lines = [
        "## `NormalizedSharpness.compute()` on large tensors (issue 9)\n",
        f"Command: `{payload['command']}`  ",
        f"Machine: {payload['machine']}; torch {torch.__version__}; 1 thread; each case in a fresh process\n",
        "| case | shape | state (R = 8, float64) | `compute()` | peak memory above its start | x state "
        "| one pooled solve | ratio | value = pooled solve? |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        same = abs(r["normalized"] - r["pooled_value"]) <= 1e-9 * abs(r["pooled_value"])
        lines.append(
            f"| {r['case']} | {'x'.join(map(str, r['shape']))} | {r['state_mib']:.0f} MiB "
            f"| {r['compute_s']:.2f} s | {r['compute_peak_extra_mib']:.0f} MiB | {r['peak_over_state']:.2f} "
            f"| {r['pooled_solve_s']:.2f} s | {r['ratio']:.2f}x | {'yes' if same else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":  # ``--worker CASE SEED``: one case in this (fresh) process
        torch.set_num_threads(1)
        print(json.dumps(run_case(argv[1], int(argv[2]))))
        return {}
    p = base_parser(__doc__)
    p.add_argument("--cases", default="vgg_fc2_4096x4096,8192x4096,gpt2_vocabulary_50257x768")
    p.add_argument("--sweep", action="store_true", help="held against streamed tensor_measures, by shape")
    p.add_argument("--repeats", type=int, default=5, help="--sweep: interleaved repeats")
    args = p.parse_args(argv)
    setup(args)
    command = command_line("benchmarks.bench_compute_large", argv)
    if args.sweep:
        payload = {"sweep": sweep(args.seed, 1 if args.quick else args.repeats, args.quick)}
        payload.update(command=command, machine=machine())
        print(sweep_markdown(payload))
        write_json_and_markdown(args.json, payload, sweep_markdown)
        return payload
    rows = []
    for name in ["quick_512x256"] if args.quick else args.cases.split(","):
        r = {"case": name, **run_memory_worker("benchmarks.bench_compute_large", [name, str(args.seed)])}
        rows.append(r)
        if "error" in r:
            print(f"{name}: failed ({r['error']})", flush=True)
            continue
        print(
            f"{name}: compute {r['compute_s']:.2f} s, peak +{r['compute_peak_extra_mib']:.0f} MiB "
            f"({r['peak_over_state']:.2f}x state), pooled solve {r['pooled_solve_s']:.2f} s "
            f"({r['ratio']:.2f}x)",
            flush=True,
        )
    payload = {"rows": [r for r in rows if "error" not in r], "failed": [r for r in rows if "error" in r]}
    payload.update(command=command, machine=machine())
    print(markdown(payload))
    write_json_and_markdown(args.json, payload, markdown)
    return payload


if __name__ == "__main__":
    main()
