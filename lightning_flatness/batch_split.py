"""Cut a training batch into ``(inputs, target)``: the default of ``SharpnessMonitor.split_batch``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_flatness.functional.model_io import input_tensors, inputs_batch_size, samples_along_dim0

__all__ = [
    "INPUT_KEYS",
    "batch_layout_hint",
    "KEYWORD_INPUT_KEYS",
    "SPAN_TARGET_KEYS",
    "TARGET_KEYS",
    "span_target",
    "split_batch",
]

#: Keys looked up, in this order, for the inputs of a dict batch.
INPUT_KEYS = ("inputs", "input", "x", "features", "image", "images", "data")
#: Keys looked up, in this order, for the target of a dict batch.
TARGET_KEYS = ("target", "targets", "y", "label", "labels")
#: Keys that mark a dict batch of keyword arguments (Hugging Face): the model is called as
#: ``model(**inputs)`` with every entry but the target.
KEYWORD_INPUT_KEYS = ("input_ids", "pixel_values", "inputs_embeds", "input_values", "input_features")
#: Keys of the answer span of an extractive question-answering batch (Hugging Face
#: ``*ForQuestionAnswering``), taken as the target where no key of :data:`TARGET_KEYS` is present.
SPAN_TARGET_KEYS = ("start_positions", "end_positions")
#: Keyword inputs whose dim 1 is the sequence (the positions a span is read from), in order.
_SEQUENCE_KEYS = ("input_ids", "inputs_embeds", "attention_mask")

_FIX = (
    "override `SharpnessMonitor.split_batch(self, batch)` in a subclass (for `measure_sharpness`, pass "
    "`split_batch=`) so that it returns `(inputs, target)` with `model(inputs)` the logits (a dict of "
    "inputs: `model(**inputs)`) and `target` what `loss_fn` expects"
)


def _first_key(batch: Mapping, keys: tuple[str, ...], what: str) -> Any:
    for key in keys:
        if key in batch:
            return batch[key]
    raise ValueError(
        f"SharpnessMonitor cannot find the {what} in a dict batch with keys "
        f"{sorted(map(str, batch))}: it looks for one of {list(keys)}; rename the key or "
        f"{_FIX}."
    )


def split_batch(batch: Any) -> tuple[Any, Tensor]:
    """Split a batch as yielded by a DataLoader into ``(inputs, target)``.

    Understood out of the box:

    - a tuple or list ``(inputs, target, *rest)``: the first two entries (extra entries such as
      sample indices are ignored); ``inputs`` a tensor, or a dict or tuple of tensors, which the model
      takes as keyword or positional arguments, or whole where its signature says so
      (:func:`~lightning_flatness.functional.model_io.arguments_for`);
    - a dict (any ``Mapping``, e.g. a Hugging Face ``BatchEncoding``) with one of
      :data:`KEYWORD_INPUT_KEYS` (``"input_ids"``, ``"pixel_values"``, ...): keyword arguments.
      The target is the first of :data:`TARGET_KEYS` present (``"labels"`` in Hugging Face) and the
      inputs are every other entry, so the model is called as ``model(**inputs)`` (its
      ``attention_mask``, ``token_type_ids``, ... included). Without such a key, an extractive
      question-answering batch (``"start_positions"`` and ``"end_positions"``, Hugging Face's
      ``*ForQuestionAnswering``) has the answer span as its target, ``(N, 2)``
      (:func:`span_target`);
    - any other dict: the inputs under the first of :data:`INPUT_KEYS` present
      (``"inputs"``, ``"input"``, ``"x"``, ``"features"``, ``"image"``, ``"images"``, ``"data"``) and
      the target under the first of :data:`TARGET_KEYS` present (``"target"``, ``"targets"``,
      ``"y"``, ``"label"``, ``"labels"``).

    Args:
        batch: one collated batch.

    Returns:
        ``(inputs, target)``: ``inputs`` a tensor, or a dict of keyword arguments; ``target`` a tensor
        with the same number of samples along dim 0.

    Raises:
        TypeError, ValueError: the batch has another structure; the message names the hook to
            override.

    Example:
        >>> import torch
        >>> x, y = split_batch({"image": torch.zeros(4, 3), "label": torch.arange(4)})
        >>> x.shape, y.tolist()
        (torch.Size([4, 3]), [0, 1, 2, 3])
        >>> kwargs, y = split_batch({"input_ids": torch.zeros(2, 5, dtype=torch.long),
        ...                          "attention_mask": torch.ones(2, 5), "labels": torch.tensor([1, 0])})
        >>> sorted(kwargs), y.tolist()
        (['attention_mask', 'input_ids'], [1, 0])
    """
    if isinstance(batch, Mapping) and any(k in batch for k in KEYWORD_INPUT_KEYS):
        key = next((k for k in TARGET_KEYS if k in batch), None)
        if key is None and all(k in batch for k in SPAN_TARGET_KEYS):
            inputs = {k: v for k, v in batch.items() if k not in SPAN_TARGET_KEYS}
            target = span_target(
                batch[SPAN_TARGET_KEYS[0]], batch[SPAN_TARGET_KEYS[1]], _sequence_length(batch)
            )
            _check(inputs, target)
            return inputs, target
        if key is None:
            raise ValueError(
                f"SharpnessMonitor cannot find the target in a dict batch with keys "
                f"{sorted(map(str, batch))}: it looks for one of {list(TARGET_KEYS)}; add the "
                f"labels to the batch or {_FIX}."
            )
        target = batch[key]
        inputs = {k: v for k, v in batch.items() if k != key}
        _check(inputs, target)
        return inputs, target
    if isinstance(batch, Mapping):
        inputs = _first_key(batch, INPUT_KEYS, "inputs")
        target = _first_key(batch, TARGET_KEYS, "target")
    elif isinstance(batch, Sequence) and not isinstance(batch, (str, bytes, Tensor)):
        if len(batch) < 2:
            raise ValueError(
                "SharpnessMonitor needs batches of (inputs, target), got a "
                f"{type(batch).__name__} of length {len(batch)}; {_FIX}."
            )
        inputs, target = batch[0], batch[1]
    else:
        raise TypeError(
            f"SharpnessMonitor does not know how to split a batch of type {type(batch).__name__} "
            f"into (inputs, target); {_FIX}."
        )
    if not isinstance(inputs, (Tensor, Mapping, tuple, list)):
        raise TypeError(
            f"SharpnessMonitor expected the inputs of a batch to be a tensor, a dict or a tuple of tensors, "
            f"got {type(inputs).__name__}; {_FIX}."
        )
    _check(inputs, target)
    return inputs, target


def batch_layout_hint(inputs: Any, n: int) -> str:
    """For a batch whose input tensors hold its ``n`` samples along dim 0 in some tensors and not in others
    (``nn.EmbeddingBag``'s 1-D token list beside its ``offsets``): that the measurement cuts batches into
    samples by rows, and what to pass instead; ``""`` for any other layout."""
    if samples_along_dim0(inputs, n) or all(t.ndim == 0 or t.shape[0] != n for t in input_tensors(inputs)):
        return ""  # (some tensors with the samples along dim 0, others not: a token list beside its offsets)
    shapes = [tuple(t.shape) for t in input_tensors(inputs)]
    return (
        f"the input tensors {shapes} do not all hold the batch's {n} samples along dim 0 (a 1-D token list "
        "beside its offsets, as `nn.EmbeddingBag(text, offsets)` takes them), and the measurement cuts "
        "batches into samples by rows: pass the bags as `(N, L)` ids padded with the table's `padding_idx` "
        "(`nn.EmbeddingBag` takes them without offsets), in the collate function or in `split_batch`. "
    )


def _check(inputs: Any, target: Any) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(
            f"SharpnessMonitor expected the target of a batch to be a tensor, got "
            f"{type(target).__name__}; {_FIX}."
        )
    try:
        n = inputs_batch_size(inputs)
    except TypeError as err:
        raise TypeError(f"SharpnessMonitor: {err} ({_FIX})") from None
    if target.ndim == 0 or target.shape[0] != n:
        layout = batch_layout_hint(inputs, int(target.shape[0])) if target.ndim else ""
        raise ValueError(
            "SharpnessMonitor expected inputs and target with the same number of samples along "
            f"dim 0, got {n} inputs and a target of shape {tuple(target.shape)}; " + (layout or f"{_FIX}.")
        )


def span_target(start: Tensor, end: Tensor, length: int) -> Tensor:
    """The ``(N, 2)`` target of an extractive question-answering batch: the start and end positions of
    the answer, each a class index over the ``length`` positions of the sequence, read as Hugging Face's
    ``ForQuestionAnsweringLoss`` reads them: clamped to ``[0, length]``, and ``length`` (a position
    outside the model's inputs) ignored, here as ``-100``.

    With the span logits stacked as ``(N, 2, length)``
    (:func:`~lightning_flatness.functional.model_io.extract_logits`), a token-level loss over the two
    rows of each sample (:class:`~lightning_flatness.functional.model_io.TokenLoss`) is the model's own
    loss ``(mean start loss + mean end loss) / 2`` whenever as many start as end positions are scored
    (always where every position lies in the sequence); otherwise the mean over all scored rows.

    Args:
        start, end: ``(N,)`` (or ``(N, 1)``) integer positions.
        length: the sequence length of the batch.

    Example:
        >>> import torch
        >>> span_target(torch.tensor([0, 3, 9]), torch.tensor([2, -1, 4]), length=5).tolist()
        [[0, 2], [3, 0], [-100, 4]]
    """
    span = torch.stack([start.reshape(start.shape[0]), end.reshape(end.shape[0])], dim=1)
    span = span.clamp(0, length)
    return span.masked_fill(span == length, -100)


def _sequence_length(batch: Mapping) -> int:
    """Dim 1 of the first of ``input_ids``, ``inputs_embeds``, ``attention_mask`` in a dict batch."""
    for key in _SEQUENCE_KEYS:
        value = batch.get(key)
        if isinstance(value, Tensor) and value.ndim >= 2:
            return int(value.shape[1])
    raise ValueError(
        f"SharpnessMonitor found an answer span ({', '.join(SPAN_TARGET_KEYS)}) in a dict batch with keys "
        f"{sorted(map(str, batch))} but no sequence to read it from: it looks for one of "
        f"{list(_SEQUENCE_KEYS)} with the positions along dim 1; add it to the batch or {_FIX}."
    )
