r"""``torch.nn.MultiheadAttention`` in explicit operations, for a measurement only.

``nn.MultiheadAttention`` (torchvision's ``VisionTransformer``, ``nn.TransformerEncoderLayer`` /
``nn.TransformerDecoderLayer``, and most hand-written transformers) runs its whole forward inside one
call of ``F.multi_head_attention_forward``. The estimators' recorder, a
:class:`torch.overrides.TorchFunctionMode`, sees that call as a single operation: it cannot see the
projections, the softmax or the two products inside, so the exact, Gauss-Newton and Hessian sketches
cannot apply their layer and operation rules there.

:func:`composite_multi_head_attention` computes the same function as ``F.multi_head_attention_forward``
in the operations that its slow path itself uses, written out:

- the input projection as **one** ``F.linear`` with the packed ``in_proj_weight`` ``(3E, E)``, on the
  batch-first layout whatever the module's (the samples along dim 0, where the layer rules look for
  them; a linear map of rows gives the same values in any layout). For self-attention (``query is
  key is value``, the usual case) that is the original's projection; otherwise the distinct inputs
  are concatenated along the sequence dim first, so that the packed weight is still used once (what
  a weight used once means: :mod:`.estimators.exact`);
- ``q k^T / sqrt(d)`` plus the merged float mask (``attn_mask`` and ``key_padding_mask`` as the
  original merges them, boolean masks as ``-inf``), ``softmax`` over the keys, ``@ v``, in a
  ``(batch, heads, length, head_dim)`` layout (the samples along dim 0);
- the output projection ``F.linear(out, out_proj.weight, out_proj.bias)``.

Values equal the original's to float rounding (tested against ``nn.MultiheadAttention`` with
``batch_first`` either way, cross-attention, masks of every kind, ``need_weights`` and per-head weights,
and ``is_causal``). Configurations it does not write out are left to the original forward (and so
stay one opaque operation): unbatched inputs, separate ``kdim``/``vdim`` projections, ``add_bias_kv``,
``add_zero_attn``, dropout in training mode.

:func:`explicit_multi_head_attention` installs it on every such module of a model for the duration of a
``with`` block (:func:`~lightning_flatness.functional.twice_differentiable.twice_differentiable` enters
it) and restores the modules exactly afterwards.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_flatness.functional.instance_forwards import instance_forwards

__all__ = ["composite_multi_head_attention", "explicit_multi_head_attention", "writes_out"]


def writes_out(module: nn.MultiheadAttention, query: Tensor) -> bool:
    """Whether :func:`composite_multi_head_attention` covers this module and input (module docstring)."""
    return (
        query.dim() == 3
        and module._qkv_same_embed_dim
        and module.in_proj_weight is not None
        and module.bias_k is None
        and module.bias_v is None
        and not module.add_zero_attn
        and not (module.training and module.dropout > 0.0)
    )


def _float_mask(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A boolean mask (``True``: not attended) as ``0 / -inf`` of ``dtype``; a float mask as it is."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def composite_multi_head_attention(
    module: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    need_weights: bool = True,
    attn_mask: Optional[Tensor] = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """``module(query, key, value, ...)`` in explicit operations (module docstring); same arguments and
    returns as ``nn.MultiheadAttention.forward``. Only for what :func:`writes_out` accepts.

    Shapes: ``query`` ``(L, B, E)`` and ``key``/``value`` ``(S, B, E)`` (``(B, L, E)``, ``(B, S, E)`` with
    ``batch_first``); returns ``(L, B, E)`` (or ``(B, L, E)``) and, with ``need_weights``, the attention
    weights ``(B, L, S)`` (averaged over heads) or ``(B, H, L, S)``. Cost: that of the original slow path.
    """
    distinct: list[Tensor] = []  # the distinct inputs, by identity (self-attention: one)
    for t in (query, key, value):
        if not any(t is d for d in distinct):
            distinct.append(t)
    which = [next(i for i, d in enumerate(distinct) if d is t) for t in (query, key, value)]
    # batch first (the samples along dim 0, for the layer rules), whatever the module's layout
    rows = [d if module.batch_first else d.transpose(0, 1) for d in distinct]
    batch, length, embed = rows[which[0]].shape
    source = rows[which[1]].shape[1]
    heads = module.num_heads
    head_dim = embed // heads
    # the distinct inputs through the packed projection in one call, then each one's block
    stacked = rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)
    projected = F.linear(stacked, module.in_proj_weight, module.in_proj_bias)  # (B, T, 3E)
    starts = [sum(r.shape[1] for r in rows[:i]) for i in range(len(rows))]

    def heads_first(i: int, part: int) -> Tensor:  # input i's block of part (q, k, v): (B, H, T, d)
        t = projected[:, starts[i] : starts[i] + rows[i].shape[1], part * embed : (part + 1) * embed]
        return t.reshape(batch, t.shape[1], heads, head_dim).transpose(1, 2)

    q, k, v = (heads_first(i, part) for part, i in enumerate(which))
    mask = _merged_mask(
        attn_mask, key_padding_mask, is_causal, need_weights, query, batch, heads, length, source
    )
    scores = torch.matmul(q * math.sqrt(1.0 / float(head_dim)), k.transpose(-2, -1))  # (B, H, L, S)
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1)  # no dropout: writes_out leaves training-mode dropout alone
    out = torch.matmul(weights, v)  # (B, H, L, d)
    out = out.transpose(1, 2).reshape(batch, length, embed)
    out = F.linear(out, module.out_proj.weight, module.out_proj.bias)
    if not module.batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    return out, weights.mean(dim=1) if average_attn_weights else weights


def _merged_mask(
    attn_mask: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    is_causal: bool,
    need_weights: bool,
    query: Tensor,
    batch: int,
    heads: int,
    length: int,
    source: int,
) -> Optional[Tensor]:
    """The additive mask of ``F.multi_head_attention_forward``, broadcastable to ``(B, H, L, S)``: with
    ``is_causal``, no key padding and no weights asked for, the original ignores ``attn_mask`` and lets the
    attention kernel apply a causal mask (``tril`` of ones): the same here."""
    dtype = query.dtype
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
            "`generate_square_subsequent_mask` to create this mask."
        )
    if is_causal and key_padding_mask is None and not need_weights:
        allowed = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        return _float_mask(~allowed, dtype)
    mask = _float_mask(attn_mask, dtype)
    if mask is not None:
        mask = (
            mask.reshape(1, 1, length, source)
            if mask.dim() == 2
            else mask.reshape(batch, heads, length, source)
        )
    padding = _float_mask(key_padding_mask, dtype)
    if padding is not None:
        padding = padding.reshape(batch, 1, 1, source)
        mask = padding if mask is None else mask + padding
    return mask


def _forward(
    self: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any
):
    """The installed forward: the composite where :func:`writes_out` covers the call, else the original."""
    if writes_out(self, query):
        return composite_multi_head_attention(self, query, key, value, *args, **kwargs)
    return type(self).forward(self, query, key, value, *args, **kwargs)


@contextlib.contextmanager
def explicit_multi_head_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every ``nn.MultiheadAttention`` of ``model`` runs
    :func:`composite_multi_head_attention` (where it covers the call; a module whose ``forward`` was
    replaced on the instance already keeps it); on exit the modules are restored exactly (the instance
    ``forward`` attribute removed), also on exceptions.

    Example:
        >>> import torch
        >>> mha = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
        >>> x = torch.randn(3, 5, 8)
        >>> with explicit_multi_head_attention(mha):
        ...     out, _ = mha(x, x, x, need_weights=False)
        >>> torch.allclose(out, mha(x, x, x, need_weights=False)[0], atol=1e-6)
        True
    """
    attention = (m for m in model.modules() if isinstance(m, nn.MultiheadAttention))
    with instance_forwards((m, _forward) for m in attention):  # a replaced forward is kept
        yield model
