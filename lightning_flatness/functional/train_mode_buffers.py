"""Buffers that a module in training mode updates in its forward, put back after a measurement.

A network measured in training mode (``measure_sharpness`` of a model the caller left in ``train()``)
updates, in every forward, the buffers its modules keep for evaluation: BatchNorm's ``running_mean``,
``running_var`` and ``num_batches_tracked``, and any buffer a custom module updates likewise. The
estimators run many forwards; the measurement promises to leave the model as it found it.
:func:`train_mode_buffers_restored` copies the buffers of every module in training mode on entry and
writes them back, bit for bit, on exit (also on error). Modules in eval mode update nothing and are left
alone, so a measurement in eval mode (``SharpnessMonitor``'s) copies nothing.

Cost: one copy of those buffers per measurement (BatchNorm's are two vectors per layer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lightning_flatness.functional.module_walk import modules_of

__all__ = ["train_mode_buffers_restored"]


@contextlib.contextmanager
def train_mode_buffers_restored(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the modules of ``model`` in training mode may update their buffers; on exit the
    buffers hold their values from entry again.

    Example:
        >>> import torch
        >>> norm = torch.nn.BatchNorm1d(2)  # training mode
        >>> with train_mode_buffers_restored(norm):
        ...     _ = norm(torch.randn(4, 2))
        ...     moved = norm.num_batches_tracked.item()
        >>> moved, norm.num_batches_tracked.item(), norm.running_mean.tolist()
        (1, 0, [0.0, 0.0])
    """
    saved: list[tuple[Tensor, Tensor]] = [
        (buffer, buffer.detach().clone())
        for module in modules_of(model)
        if module.training
        for buffer in module._buffers.values()
        if buffer is not None
    ]
    try:
        yield model
    finally:
        with torch.no_grad():
            for buffer, values in saved:
                buffer.copy_(values)
