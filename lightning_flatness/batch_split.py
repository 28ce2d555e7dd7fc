"""Cut a training batch into ``(inputs, target)``: the default of ``SharpnessMonitor.split_batch``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

__all__ = ["INPUT_KEYS", "TARGET_KEYS", "split_batch"]

#: Keys looked up, in this order, for the inputs of a dict batch.
INPUT_KEYS = ("inputs", "input", "x", "features", "image", "images", "data")
#: Keys looked up, in this order, for the target of a dict batch.
TARGET_KEYS = ("target", "targets", "y", "label", "labels")

_FIX = ("override `SharpnessMonitor.split_batch(self, batch)` in a subclass so that it returns "
        "`(inputs, target)` with `model(inputs)` the logits and `target` what `loss_fn` expects")


def _first_key(batch: Mapping, keys: tuple[str, ...], what: str) -> Any:
    for key in keys:
        if key in batch:
            return batch[key]
    raise ValueError(f"SharpnessMonitor cannot find the {what} in a dict batch with keys "
                     f"{sorted(map(str, batch))}: it looks for one of {list(keys)}; rename the key or "
                     f"{_FIX}.")


def split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """Split a batch as yielded by a DataLoader into ``(inputs, target)``.

    Understood out of the box:

    - a tuple or list ``(inputs, target, *rest)``: the first two entries (extra entries such as
      sample indices are ignored);
    - a dict (any ``Mapping``): the inputs under the first of :data:`INPUT_KEYS` present
      (``"inputs"``, ``"input"``, ``"x"``, ``"features"``, ``"image"``, ``"images"``, ``"data"``) and
      the target under the first of :data:`TARGET_KEYS` present (``"target"``, ``"targets"``,
      ``"y"``, ``"label"``, ``"labels"``).

    Args:
        batch: one collated batch.

    Returns:
        ``(inputs, target)``, two tensors with the same size along dim 0.

    Raises:
        TypeError, ValueError: the batch has another structure; the message names the hook to
            override.

    Example:
        >>> import torch
        >>> x, y = split_batch({"image": torch.zeros(4, 3), "label": torch.arange(4)})
        >>> x.shape, y.tolist()
        (torch.Size([4, 3]), [0, 1, 2, 3])
    """
    if isinstance(batch, Mapping):
        inputs = _first_key(batch, INPUT_KEYS, "inputs")
        target = _first_key(batch, TARGET_KEYS, "target")
    elif isinstance(batch, Sequence) and not isinstance(batch, (str, bytes, Tensor)):
        if len(batch) < 2:
            raise ValueError("SharpnessMonitor needs batches of (inputs, target), got a "
                             f"{type(batch).__name__} of length {len(batch)}; {_FIX}.")
        inputs, target = batch[0], batch[1]
    else:
        raise TypeError(f"SharpnessMonitor does not know how to split a batch of type {type(batch).__name__} "
                        f"into (inputs, target); {_FIX}.")
    if not isinstance(inputs, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"SharpnessMonitor expected the inputs and target of a batch to be tensors, got "
                        f"{type(inputs).__name__} and {type(target).__name__}; {_FIX}.")
    if inputs.ndim == 0 or target.ndim == 0 or inputs.shape[0] != target.shape[0]:
        raise ValueError("SharpnessMonitor expected inputs and target with the same number of samples along "
                         f"dim 0, got shapes {tuple(inputs.shape)} and {tuple(target.shape)}; {_FIX}.")
    return inputs, target
