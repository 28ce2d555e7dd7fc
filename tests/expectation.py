"""Agreement in expectation of a stochastic curvature estimator with a float64 brute-force Hessian diagonal,
over seeds, for the tests of models the estimators reach (question answering, multiple choice)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from zoo_oracle import brute_force_hessian_diagonal

from lightning_flatness.functional.estimators.api import hessian_diagonal_groups


def assert_unbiased_traces(
    model: nn.Module,
    loss: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    target: Tensor,
    names: list[str],
    method: str = "hessian_sketch",
    seeds: int = 8,
    min_random: int = 4,
) -> None:
    """Per tensor of ``names``, the mean trace of ``method``'s estimates on one batch over ``seeds`` seeds
    lies within 4.5 standard errors of the seeds of the brute-force trace (t with 7 degrees of freedom at
    8 seeds: p < 0.3% per tensor); at least ``min_random`` tensors have random estimates, so that the
    check has teeth (deterministic ones must agree to rounding)."""
    truth = brute_force_hessian_diagonal(model, loss, inputs, target, names)
    runs = [
        hessian_diagonal_groups(
            model,
            loss,
            inputs,
            target,
            method=method,
            parameters=names,
            generator=torch.Generator().manual_seed(seed),
        ).groups
        for seed in range(seeds)
    ]
    random = 0
    for name, true in truth.items():
        true = true.detach()
        traces = torch.stack([run[name].sum() for run in runs])
        se = float(traces.std()) / seeds**0.5
        scale = float(true.abs().sum())
        assert abs(float(traces.mean()) - float(true.sum())) <= 4.5 * se + 1e-9 * scale, (
            name,
            traces,
            true.sum(),
        )
        random += se > 1e-6 * scale
    assert random >= min_random, random
