"""Do the monitor's samples reach the network as training's do? A comparison of the inputs' statistics.

The monitor fetches its samples itself and applies what Lightning applies (the collate function, the
batch-transfer hooks: :mod:`~lightning_flatness.batch_transfer`), but not what ``training_step`` does to a
batch before calling the network: a scaling (``x.float() / 255``), a normalisation (``(x - mean) / std``), a
reshape. The network would then be measured on inputs it is never trained on, silently. This module compares
the floating-point inputs the network receives in the first training step (recorded by a forward pre-hook,
:class:`FirstCallInputs`, removed after that call) with the monitor's own (the dry run's batch): a standard
deviation more than :data:`SCALE_RATIO` times larger or smaller, or means further apart than
:data:`SHIFT_STDS` standard deviations, is named (:func:`input_differences`). Augmentations change neither by
that much (a colour jitter, mixup, random erasing: a few tens of percent); a scaling or a normalisation does.
Integer inputs (token ids) are compared by kind only (integer against floating point).

Cost: a mean and a standard deviation of the first training batch's inputs, once per fit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

__all__ = ["SCALE_RATIO", "SHIFT_STDS", "FirstCallInputs", "InputSummary", "input_differences", "summarize"]

#: standard deviations further apart than this factor (either way) are named
SCALE_RATIO = 3.0
#: means further apart than this many standard deviations (the larger of the two) are named
SHIFT_STDS = 2.0


@dataclass(frozen=True)
class InputSummary:
    """One input tensor: whether it is floating point, and (if so) its mean and standard deviation."""

    floating: bool
    mean: float = math.nan
    std: float = math.nan


def _named_tensors(inputs: Any) -> dict[str, Tensor]:
    """``{name: tensor}``: ``"input"`` for a tensor, ``"input[i]"`` for a tuple or list, a dict's keys."""
    if isinstance(inputs, Tensor):
        return {"input": inputs}
    if isinstance(inputs, Mapping):
        return {str(k): v for k, v in inputs.items() if isinstance(v, Tensor)}
    if isinstance(inputs, (tuple, list)):
        return {f"input[{i}]": v for i, v in enumerate(inputs) if isinstance(v, Tensor)}
    return {}


def summarize(inputs: Any) -> dict[str, InputSummary]:
    """:class:`InputSummary` of each tensor of ``inputs`` (a tensor, tuple, list or dict), in float64."""
    out = {}
    with torch.no_grad():
        for name, t in _named_tensors(inputs).items():
            if t.is_floating_point() and t.numel() > 1:
                values = t.detach().to(torch.float64)
                out[name] = InputSummary(True, float(values.mean()), float(values.std()))
            elif not t.is_floating_point() and not t.is_complex():
                out[name] = InputSummary(False)
    return out


def input_differences(
    training: Mapping[str, InputSummary], measured: Mapping[str, InputSummary]
) -> list[str]:
    """The inputs (present in both) whose kind, scale or offset differ between training's call and the
    monitor's batch, each as a phrase naming the two statistics; empty where they agree."""
    found = []
    for name in training.keys() & measured.keys():
        a, b = training[name], measured[name]
        if a.floating != b.floating:
            kinds = (
                "floating point" if a.floating else "integer",
                "floating point" if b.floating else "integer",
            )
            found.append(
                f"'{name}' is {kinds[0]} in training_step's call and {kinds[1]} in the monitor's batch"
            )
            continue
        if not a.floating or not all(math.isfinite(v) for v in (a.mean, a.std, b.mean, b.std)):
            continue
        scale = max(a.std, b.std)
        ratio = math.inf if min(a.std, b.std) == 0 else scale / min(a.std, b.std)
        if (ratio > SCALE_RATIO and scale > 0) or abs(a.mean - b.mean) > SHIFT_STDS * scale:
            found.append(
                f"'{name}' has mean {a.mean:.3g} and standard deviation {a.std:.3g} in training_step's call, "
                f"{b.mean:.3g} and {b.std:.3g} in the monitor's batch"
            )
    return sorted(found)


class FirstCallInputs:
    """Records :func:`summarize` of the inputs of ``module``'s next call (positional arguments, or keyword
    arguments where there are any), by a forward pre-hook that removes itself after that call and changes
    nothing (``summary`` is None until then)."""

    def __init__(self, module: nn.Module) -> None:
        self.summary: Optional[dict[str, InputSummary]] = None
        self._handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs:
            self.summary = summarize({**{f"input[{i}]": a for i, a in enumerate(args)}, **kwargs})
        else:
            self.summary = summarize(args[0] if len(args) == 1 else args)
        self.remove()

    def remove(self) -> None:
        """Remove the hook (idempotent)."""
        self._handle.remove()
