"""Two networks measured alike: the same batches, method and draws, warnings silenced (for the checks that a
set-up the measurement neutralises, autocast in ``forward`` or a backward hook, leaves the values alone)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from lightning_flatness.measure import SharpnessResult, measure_sharpness

#: the totals compared (standard error included: it is computed from the same replicate groups)
KEYS = ("normalized", "matrix_normalized", "hessian_trace", "normalized_stderr")


def measured_alike(
    models: list[nn.Module], data: list[Any], method: str, seed: int = 0
) -> list[SharpnessResult]:
    """``measure_sharpness`` of each model on ``data`` with ``method`` and a generator seeded ``seed``."""
    results = []
    for model in models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            generator = torch.Generator().manual_seed(seed)
            results.append(
                measure_sharpness(model, data, method=method, num_replicates=4, generator=generator)
            )
    return results
