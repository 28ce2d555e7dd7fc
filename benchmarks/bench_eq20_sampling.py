"""How the Monte-Carlo Gauss-Newton estimator should sample eq. 20's logit Hessian: draws per sample
and the rank-2 part taken exactly or sampled (``loss_hessian_factors.EXACT_LOW_RANK``).

A ReLU MLP 5-12-10-K at initialisation (so the Gauss-Newton diagonal is the Hessian diagonal and the
brute-force Hessian is the reference), 256 samples in 8 batches, eq. 20 loss, 8 seeds of the draws.
Prints the mean relative bias and RMS error of the total normalized sharpness and of the trace.

    python -m benchmarks.bench_eq20_sampling > benchmarks/results/bench_eq20_sampling.md
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
from torch import nn

import lightning_flatness.functional.loss_hessian_factors as factors
from lightning_flatness.measure import measure_sharpness

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from oracles import brute_force_measures  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    print(
        "| classes | labels | rank-2 part | draws | normalized bias | normalized RMS | "
        "trace bias | trace RMS |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for classes, labels in ((40, "random"), (40, "teacher"), (10, "random")):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, classes)
        ).double()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(256, 5, generator=g, dtype=torch.float64)
        if labels == "random":
            y = torch.randint(0, classes, (256,), generator=g)
        else:
            y = (x @ torch.randn(5, classes, generator=g, dtype=torch.float64)).argmax(1)
        ref = brute_force_measures(model, x, y)
        batches = list(zip(x.tensor_split(8), y.tensor_split(8)))
        for exact in (False, True):
            factors.EXACT_LOW_RANK = exact
            for draws in (1, 4, 8):
                norm, trace = [], []
                for seed in range(8):
                    r = measure_sharpness(
                        model,
                        batches,
                        method="gauss_newton_mc",
                        num_mc_samples=draws,
                        generator=torch.Generator().manual_seed(seed),
                    )
                    norm.append(float(r["normalized"]) / ref["normalized"] - 1)
                    trace.append(float(r["hessian_trace"]) / ref["hessian_trace"] - 1)
                rms = [statistics.mean(e * e for e in v) ** 0.5 for v in (norm, trace)]
                print(
                    f"| {classes} | {labels} | {'exact' if exact else 'sampled'} | {draws} | "
                    f"{100 * statistics.mean(norm):+.1f}% | {100 * rms[0]:.1f}% | "
                    f"{100 * statistics.mean(trace):+.1f}% | {100 * rms[1]:.1f}% |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
