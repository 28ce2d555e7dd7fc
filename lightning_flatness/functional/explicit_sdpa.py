r"""``F.scaled_dot_product_attention`` called directly in a model's code, in explicit operations, for the
sketched Hessian diagonal only.

Hand-written transformers (nanoGPT and most research code) call ``F.scaled_dot_product_attention`` in their
forward. The estimators' recorder sees that call as one operation without a node rule, so the sketched
Hessian diagonal did not apply and ``auto`` measured the Gauss-Newton diagonal. (Library models need no
such help: :func:`~lightning_flatness.functional.twice_differentiable.twice_differentiable` switches timm's
and Hugging Face's attention to their explicit paths, and ``nn.MultiheadAttention`` runs
:mod:`.composite_attention`.)

:class:`ExplicitAttention` is a :class:`torch.overrides.TorchFunctionMode` entered *inside* the recorder:
it takes each ``scaled_dot_product_attention`` call first and evaluates it as PyTorch documents the math
path, so that the recorder sees the operations, each with a node rule (the two products, the softmax):

.. math:: \mathrm{softmax}\big(Q K^\top s + B\big)\, V, \qquad s = \texttt{scale}\ \text{or}\ 1/\sqrt{d},

with ``B`` the additive mask (a boolean ``attn_mask`` as ``-inf`` where it is ``False``, a float one added,
``is_causal`` the lower triangle) and ``enable_gqa`` repeating the key and value heads. Values equal the
fused kernel's to float rounding (tested). Calls with ``dropout_p > 0`` (random) keep the fused kernel.
The ``(B, H, T, S)`` attention matrix is materialised, as the eager attention of timm and Hugging Face
does under ``twice_differentiable``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["ExplicitAttention", "explicit_scaled_dot_product_attention"]


def explicit_scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``F.scaled_dot_product_attention`` without dropout, in explicit operations (module docstring)."""
    if dropout_p != 0.0:
        raise ValueError("explicit_scaled_dot_product_attention has no dropout; call the fused kernel")
    length, source = query.shape[-2], key.shape[-2]
    factor = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and key.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        repeats = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeats, dim=-3), value.repeat_interleave(repeats, dim=-3)
    scores = query @ key.transpose(-2, -1) * factor
    if is_causal:
        allowed = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return torch.softmax(scores, dim=-1) @ value


def _call(args: tuple, kwargs: dict) -> Optional[dict[str, Any]]:
    """The call's arguments by name, or None when it draws dropout (kept fused)."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return None if float(bound.get("dropout_p", 0.0) or 0.0) != 0.0 else bound


class ExplicitAttention(TorchFunctionMode):
    """Evaluates ``F.scaled_dot_product_attention`` calls by :func:`explicit_scaled_dot_product_attention`
    (except those with dropout); every other call passes through unchanged."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            bound = _call(args, kwargs)
            if bound is not None:
                return explicit_scaled_dot_product_attention(**bound)
        return func(*args, **kwargs)
