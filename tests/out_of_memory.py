"""A loss that runs out of memory on large batches: the tests of how a measurement recovers from it."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


class OutOfMemoryAbove:
    """``loss``, raising CUDA's out-of-memory error on more than ``limit`` rows of logits (as an estimate
    whose backward columns do not fit); counts the errors it raised."""

    def __init__(self, limit: int, loss: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.limit, self.loss, self.raised = limit, loss, 0

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        if logits.shape[0] > self.limit:
            self.raised += 1
            raise torch.OutOfMemoryError(f"CUDA out of memory: {logits.shape[0]} samples")
        return self.loss(logits, target)
