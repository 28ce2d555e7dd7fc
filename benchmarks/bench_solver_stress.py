"""Benchmark: worst-case time of the eq. 17 solver, under load, and the metric's batched replicate solves.

Part 1 (stress): every case of ``benchmarks/solver_stress.py`` at layer size (512x512 matrices,
a 256x256x3x3 conv, a depthwise 1024x1x5x5, 64x8192 and 8192x64, Hutchinson and finite-difference
diagonals of a 64-512-512-10 MLP) plus 4096x4096, 2048x2048 and 1024x4096 log-normal (sigma 3)
matrices, timed end to end with ``solve_normalized_sharpness`` (coefficients, reduction, Newton,
certificate) in three
conditions: one intra-op thread; one thread with two busy processes beside it
(``python -c "while 1: pass"``, started and stopped by this script); two threads with the two busy
processes. Reported: wall milliseconds per million weight entries (median of ``--repeats``) with
the process's CPU milliseconds (what an idle machine would take, on a shared one), the slowdown
under load, and the certified gap. Also per case, in the one-thread condition: the Newton
iterations and the conjugate-gradient steps of the last solve (``_newton._conjugate_gradients``,
counted as Gram products ``Gs (Gs^T v)``, one per step plus one true-residual check per polished
system); with ``--factorised`` a fourth column times every case with the conjugate-gradient path
switched off (``_newton._CG_FROM`` above every size: the factorised Schur complement of each Newton
step, as before it existed), in the same run.

Part 2 (replicates): ``NormalizedSharpness.compute()`` (pooled + 8 leave-one-out + 2 halves
eq. 17 problems per tensor, batched and warm-started) against one pooled solve of every tensor,
on synthetic heavy-tailed curvature with the 17 WRN-16-4 shapes (8 replicate groups, each the
pooled diagonal times ``1 + 0.5 N(0, 1)``): with non-negative diagonals (as the exact method
gives) and with 31% negative entries (as stochastic estimators give).

Run ``python -m benchmarks.bench_solver_stress`` from the repository root (a few minutes);
``--quick`` is a smoke test; ``--json PATH`` writes the raw results; ``--cases a,b`` runs only the
stress cases whose names contain one of the comma-separated parts (and skips part 2).
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch

import lightning_flatness.functional.solvers._newton as newton_module
from benchmarks.bench_solver import machine, make_layer, wrn16_4_shapes
from benchmarks.common import base_parser, setup, write_json
from benchmarks.solver_stress import stress_cases
from lightning_flatness.functional.solvers import solve_normalized_sharpness
from lightning_flatness.metric import NormalizedSharpness

CONDITIONS = (("1 thread", 1, 0), ("1 thread, 2 busy processes", 1, 2), ("2 threads, 2 busy processes", 2, 2))
FACTORISED = "1 thread, factorised"  # the conjugate-gradient path switched off (--factorised)


def conditions(args) -> tuple:
    return CONDITIONS + (((FACTORISED, 1, 0),) if args.factorised else ())


def _busy(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(count)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


class CountCG:
    """Counts the conjugate-gradient Gram products of the solves run inside the ``with`` block."""

    def __enter__(self) -> CountCG:
        self.steps, self.inside = 0, False
        self._cg, self._gram = newton_module._conjugate_gradients, newton_module._gram_times

        def cg(*args, **kwargs):
            self.inside = True
            try:
                return self._cg(*args, **kwargs)
            finally:
                self.inside = False

        def gram(*args, **kwargs):
            self.steps += self.inside
            return self._gram(*args, **kwargs)

        newton_module._conjugate_gradients, newton_module._gram_times = cg, gram
        return self

    def __exit__(self, *exc) -> None:
        newton_module._conjugate_gradients, newton_module._gram_times = self._cg, self._gram


def time_case(w: torch.Tensor, h: torch.Tensor, repeats: int) -> tuple[float, float, float, int, int]:
    """(median wall seconds, median CPU seconds of this process, certified relative gap, Newton
    iterations, conjugate-gradient steps) of one solve."""
    sol = solve_normalized_sharpness(w, h)  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        with CountCG() as count:
            start, start_cpu = time.perf_counter(), time.process_time()
            sol = solve_normalized_sharpness(w, h)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    gap = float((sol.value - sol.lower_bound) / sol.lower_bound) if sol.lower_bound > 0 else 0.0
    return statistics.median(wall), statistics.median(cpu), gap, sol.iterations, count.steps


def stress(args) -> list[dict]:
    cases = stress_cases("small" if args.quick else "layer", seed=args.seed)
    if not args.quick:
        for big in ((4096, 4096), (2048, 2048), (1024, 4096)):  # (the first as in earlier runs)
            g = torch.Generator().manual_seed(args.seed)
            cases[f"lognormal_sigma3_{big[0]}x{big[1]}"] = (
                torch.randn(big, generator=g, dtype=torch.float64) / math.sqrt(big[1]),
                torch.exp(3.0 * torch.randn(big, generator=g, dtype=torch.float64)),
            )
    if args.cases:
        parts = args.cases.split(",")
        cases = {name: case for name, case in cases.items() if any(p in name for p in parts)}
    rows = {
        name: {"case": name, "shape": list(w.shape), "numel": w.numel()} for name, (w, h) in cases.items()
    }
    cg_from = newton_module._CG_FROM
    for label, threads, busy in conditions(args):
        torch.set_num_threads(threads)
        procs = _busy(busy)
        if label == FACTORISED:
            newton_module._CG_FROM = 1 << 62
        try:
            time.sleep(0.5 if busy else 0.0)
            for name, (w, h) in cases.items():
                reps = 1 if w.numel() > 4e6 else args.repeats
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    seconds, cpu, gap, iterations, cg_steps = time_case(w, h, reps)
                rows[name][label] = {
                    "ms_per_million": seconds * 1e3 / (w.numel() / 1e6),
                    "ms": seconds * 1e3,
                    "cpu_ms_per_million": cpu * 1e3 / (w.numel() / 1e6),
                    "gap": gap,
                    "warnings": len(caught),
                    "newton_iterations": iterations,
                    "cg_steps": cg_steps,
                }
        finally:
            newton_module._CG_FROM = cg_from
            _stop(procs)
    torch.set_num_threads(args.threads)
    return list(rows.values())


def replicates(args, signed: bool) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    shapes = wrn16_4_shapes()[: 4 if args.quick else None]
    data = [make_layer(s, "channels", g) for s in shapes]
    names = [f"t{i}" for i in range(len(shapes))]
    num_replicates = 8
    weights = {n: w for n, (w, _) in zip(names, data)}
    groups = {}
    for n, (_, h) in zip(names, data):
        h = h if signed else h.abs()
        groups[n] = h[None] * (
            1 + 0.5 * torch.randn((num_replicates, *h.shape), generator=g, dtype=torch.float64)
        )
    metric = NormalizedSharpness({n: w.shape for n, w in weights.items()}, num_replicates=num_replicates)
    metric.update(groups, weights, [32] * num_replicates)
    pooled = {n: groups[n].mean(dim=0) for n in names}
    solve = lambda: [solve_normalized_sharpness(weights[n], pooled[n]) for n in names]  # noqa: E731
    solve()
    metric.compute()
    t_pooled, t_compute = [], []
    for _ in range(args.repeats):  # CPU time of this process: the machine is shared
        start = time.process_time()
        solve()
        t_pooled.append(time.process_time() - start)
        start = time.process_time()
        metric.compute()
        t_compute.append(time.process_time() - start)
    p, c = statistics.median(t_pooled), statistics.median(t_compute)
    return {
        "diagonals": "31% negative entries" if signed else "non-negative",
        "pooled_ms": p * 1e3,
        "compute_ms": c * 1e3,
        "ratio": c / p,
        "tensors": len(shapes),
        "parameters": sum(math.prod(s) for s in shapes),
    }


def main(argv=None) -> dict:
    p = base_parser(__doc__)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cases", default="", help="only the stress cases whose names contain one of these (a,b)")
    p.add_argument("--factorised", action="store_true", help="also time the factorised path (no CG)")
    args = p.parse_args(argv)
    setup(args)
    if args.quick:
        args.repeats = 1
    cli = " ".join(
        ["python -m benchmarks.bench_solver_stress"] + list(argv if argv is not None else sys.argv[1:])
    )
    print("## Solver stress suite and batched replicate solves (issue 9)\n")
    print(f"Command: `{cli}`  ")
    print(
        f"Machine: {machine()}; torch {torch.__version__}; load average before the run "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}\n"
    )
    rows = stress(args)
    conds = conditions(args)
    print(
        "Wall ms per million weight entries (median); CPU ms of this process in brackets. Newton "
        "iterations / conjugate-gradient steps of the one-thread solve"
        + (f"; in brackets under '{FACTORISED}' its Newton iterations." if args.factorised else ".")
        + "\n"
    )
    print(
        "| case | shape | "
        + " | ".join(f"{c[0]}" for c in conds)
        + " | load / 1 thread | 2 thr. load / 1 thread | gap | Newton / CG |"
    )
    print("|---|---|" + "---|" * (len(conds) + 4))
    for r in rows:
        t = [r[c[0]]["ms_per_million"] for c in CONDITIONS]
        cpu = [r[c[0]]["cpu_ms_per_million"] for c in CONDITIONS]
        gaps = max(r[c[0]]["gap"] for c in conds)
        cells = [f"{v:.1f} ({u:.1f})" for v, u in zip(t, cpu)]
        if args.factorised:
            f = r[FACTORISED]
            cells.append(f"{f['ms_per_million']:.1f} ({f['newton_iterations']})")
        one = r[CONDITIONS[0][0]]
        print(
            f"| {r['case']} | {'x'.join(map(str, r['shape']))} | "
            + " | ".join(cells)
            + f" | {t[1] / t[0]:.2f}x | {t[2] / t[0]:.2f}x | {gaps:.1e} "
            + f"| {one['newton_iterations']} / {one['cg_steps']} |"
        )
    if args.cases:
        write_json(args.json, {"stress": rows})
        return {"stress": rows}
    reps = [replicates(args, signed) for signed in (False, True)]
    print("\nCPU time, 1 thread, median:\n")
    print(
        "| WRN-16-4 diagonals | one pooled solve of every tensor "
        "| `compute()` (R = 8: 11 problems per tensor) | ratio |"
    )
    print("|---|---|---|---|")
    for r in reps:
        print(
            f"| {r['diagonals']} | {r['pooled_ms']:.1f} ms | {r['compute_ms']:.1f} ms | {r['ratio']:.2f}x |"
        )
    results = {"stress": rows, "replicates": reps}
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
