"""Benchmark: the metric's eq. 17 batches solved cold (alternating sweeps, then Newton) against warm
starts from the pooled optimum (the solver's ``warm_start=True``, which ``compute()`` used before).

Per case (``benchmarks.bench_compute_ratio``: ``mlp``, ``wrn16_4_signed``, ``resnet18_sketch``), the
``P = 11`` coefficient matrices of every weight tensor (pooled, 8 leave-one-out, 2 halves) are formed
as ``compute()`` forms them, then three batches are timed per tensor: the pooled problem alone, the
pooled problem with the two halves (``P = 3``: what ``jackknife="linearized"`` solves) and all
``P = 11`` (``jackknife="solved"``), each warm and cold. Process CPU time, one intra-op thread,
medians of ``--repeats``; Newton iterations of the first tensors as reported by the solver.

    python -m benchmarks.bench_cold_vs_warm --json benchmarks/results/bench_cold_vs_warm.json
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from benchmarks.bench_compute_ratio import mlp_case, resnet18_sketch_case, synthetic_case
from benchmarks.bench_solver import machine, wrn16_4_shapes
from benchmarks.common import base_parser, setup, write_json
from lightning_flatness.functional.replicate_measures import replicate_curvature, replicate_weights
from lightning_flatness.functional.solvers import solve_normalized_sharpness_coefficients

F64 = torch.float64


def problems(weights: dict, data: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(a, b)`` per weight tensor: ``a`` ``(11, m, n)`` as ``compute()`` forms it, ``b`` ``(m, n)``."""
    counts = torch.as_tensor(data["num_samples"], dtype=F64)
    mix = replicate_weights(counts, list(range(counts.numel())))
    out = []
    for name, w in weights.items():
        g = data["groups"][name].to(F64)
        sums = (counts.view(-1, *[1] * (g.ndim - 1)) * g).reshape(counts.numel(), -1)
        a, _ = replicate_curvature(sums, mix, w.shape)
        out.append((a.contiguous(), w.square().reshape(a.shape[1], a.shape[2], -1).sum(dim=2)))
    return out


def time_batches(probs, repeats: int) -> dict:
    rows = {"pooled": [0], "pooled_and_halves": [0, 9, 10], "all": list(range(11))}
    result = {}
    for label, idx in rows.items():
        for warm in (True, False) if len(idx) > 1 else (False,):
            per_tensor, iterations = [], []
            for a, b in probs:
                batch = a[idx].contiguous()
                times = []
                for _ in range(repeats):
                    start = time.process_time()
                    sols = solve_normalized_sharpness_coefficients(batch, b, warm_start=warm)
                    times.append(time.process_time() - start)
                per_tensor.append(statistics.median(times))
                iterations.append(max(s.iterations for s in sols))
            key = label if len(idx) == 1 else f"{label}_{'warm' if warm else 'cold'}"
            result[key] = {"ms": 1e3 * sum(per_tensor), "max_newton_iterations": iterations}
    return result


def main(argv=None) -> dict:
    p = base_parser(__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", default="mlp,wrn16_4_signed,resnet18_sketch")
    args = p.parse_args(argv)
    setup(args)
    if args.quick:
        args.repeats = 1
    builders = {
        "mlp": lambda: mlp_case(args.seed, args.quick),
        "wrn16_4_signed": lambda: synthetic_case(
            wrn16_4_shapes()[: 3 if args.quick else None], args.seed, True
        ),
        "resnet18_sketch": lambda: resnet18_sketch_case(args.seed, args.quick),
    }
    cli = " ".join(
        ["python -m benchmarks.bench_cold_vs_warm"] + list(argv if argv is not None else sys.argv[1:])
    )
    load = os.getloadavg()[0]
    print(f"Command: `{cli}`  \nMachine: {machine()}; torch {torch.__version__}; 1 thread; load {load:.1f}\n")
    print(
        "| case | pooled alone | pooled + halves: warm / cold | all 11: warm / cold "
        "| Newton iterations, warm / cold (all 11, per tensor) |"
    )
    print("|---|---|---|---|---|")
    rows = []
    for name in args.cases.split(","):
        res = time_batches(problems(*builders[name]()), args.repeats)
        rows.append({"case": name, **res})
        print(
            f"| {name} | {res['pooled']['ms']:.1f} ms | {res['pooled_and_halves_warm']['ms']:.1f} / "
            f"{res['pooled_and_halves_cold']['ms']:.1f} ms | {res['all_warm']['ms']:.1f} / "
            f"{res['all_cold']['ms']:.1f} ms | {res['all_warm']['max_newton_iterations'][:6]} / "
            f"{res['all_cold']['max_newton_iterations'][:6]} |"
        )
    results = {"rows": rows, "repeats": args.repeats}
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
