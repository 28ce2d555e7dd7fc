"""Buffers that a model's forward updates, put back after a measurement; quantization observers paused.

The estimators run many forwards; the measurement promises to leave the model as it found it. Some modules
update their buffers in ``forward``:

- in training mode (``measure_sharpness`` of a model the caller left in ``train()``): BatchNorm's
  ``running_mean``, ``running_var`` and ``num_batches_tracked``, any module keeping a running average;
- in eval mode too: the observers of quantization-aware training (``torch.ao.quantization.prepare_qat``:
  ``FakeQuantize`` and its fused variant update their ``min_val``, ``max_val``, ``scale`` and ``zero_point``
  from every batch they see while their observer is enabled, whatever the mode).

:func:`buffers_restored` copies every buffer of the model on entry and, on exit (also on error), writes back,
bit for bit, all of them (BatchNorm's kernel updates its running statistics without moving their version
counters, so a changed buffer cannot be told from an unchanged one more cheaply than by the copy). For the
duration of the block it also pauses the observers of fake-quantization modules (``disable_observer()``), so
that every forward of the measurement quantizes with the scales training left (an observer that went on
updating would change the measured function from batch to batch); the snapshot puts their ``observer_enabled``
flags back.

Cost: one copy of the buffers per measurement (BatchNorm's are two vectors per layer; position ids and
rotary tables of a transformer are of its sequence length), and one copy back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lightning_flatness.functional.module_walk import modules_of

__all__ = ["buffers_restored"]


@contextlib.contextmanager
def buffers_restored(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the model's modules may update their buffers (fake-quantization observers are
    paused); on exit every buffer holds its value from entry again.

    Example:
        >>> import torch
        >>> norm = torch.nn.BatchNorm1d(2)  # training mode
        >>> with buffers_restored(norm):
        ...     _ = norm(torch.randn(4, 2))
        ...     moved = norm.num_batches_tracked.item()
        >>> moved, norm.num_batches_tracked.item(), norm.running_mean.tolist()
        (1, 0, [0.0, 0.0])
    """
    modules = modules_of(model)
    # a buffer made under inference_mode (by a validation step) cannot change in place outside it: neither
    # by the measurement's forwards nor by a copy back, so it is left out
    saved: list[tuple[Tensor, Tensor]] = [
        (buffer, buffer.detach().clone())
        for module in modules
        for buffer in module._buffers.values()
        if buffer is not None and not buffer.is_inference()
    ]
    try:
        for module in modules:
            if isinstance(module, torch.ao.quantization.FakeQuantizeBase):
                module.disable_observer()
        yield model
    finally:
        with torch.no_grad():
            for buffer, values in saved:  # all of them: BatchNorm's kernel updates its statistics
                buffer.copy_(values)  # in place without moving their version counters
