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

Some models call ``F.multi_head_attention_forward`` in their own code: WavLM's attention (wav2vec 2.0's
family) passes its three projections' weights (``use_separate_proj_weight=True``), their biases concatenated,
and a gated relative position bias computed from the hidden states as ``attn_mask``.
:class:`ExplicitAttentionCalls`, a torch-function mode entered inside the recorder, evaluates such calls by
:func:`composite_attention_call`: the same operations, sequence first outside, with one ``F.linear`` per
projection where the weights are separate (each bias a block of the concatenation). Calls it does not write
out (as above) run the original.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_flatness.functional.instance_forwards import instance_forwards
from lightning_flatness.functional.module_walk import modules_of

__all__ = [
    "ExplicitAttentionCalls",
    "composite_attention_call",
    "composite_multi_head_attention",
    "explicit_multi_head_attention",
    "writes_out",
]


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
    return _composite(
        query,
        key,
        value,
        batch_first=module.batch_first,
        heads=module.num_heads,
        in_proj_weight=module.in_proj_weight,
        in_proj_bias=module.in_proj_bias,
        separate_weights=None,
        out_proj_weight=module.out_proj.weight,
        out_proj_bias=module.out_proj.bias,
        key_padding_mask=key_padding_mask,
        need_weights=need_weights,
        attn_mask=attn_mask,
        average_attn_weights=average_attn_weights,
        is_causal=is_causal,
    )


def _composite(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    batch_first: bool,
    heads: int,
    in_proj_weight: Optional[Tensor],
    in_proj_bias: Optional[Tensor],
    separate_weights: Optional[tuple[Tensor, Tensor, Tensor]],
    out_proj_weight: Tensor,
    out_proj_bias: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    need_weights: bool,
    attn_mask: Optional[Tensor],
    average_attn_weights: bool,
    is_causal: bool,
) -> tuple[Tensor, Optional[Tensor]]:
    """Multi-head attention in explicit operations, batch first inside: the packed ``in_proj_weight`` as
    one ``F.linear`` on the distinct inputs, or, with ``separate_weights`` ``(W_q, W_k, W_v)``, one
    ``F.linear`` per input with its block of ``in_proj_bias``."""
    distinct: list[Tensor] = []  # the distinct inputs, by identity (self-attention: one)
    for t in (query, key, value):
        if not any(t is d for d in distinct):
            distinct.append(t)
    which = [next(i for i, d in enumerate(distinct) if d is t) for t in (query, key, value)]
    # batch first (the samples along dim 0, for the layer rules), whatever the module's layout
    rows = [d if batch_first else d.transpose(0, 1) for d in distinct]
    batch, length, embed = rows[which[0]].shape
    source = rows[which[1]].shape[1]
    head_dim = embed // heads

    def heads_first(t: Tensor) -> Tensor:  # (B, T, E) -> (B, H, T, d)
        return t.reshape(batch, t.shape[1], heads, head_dim).transpose(1, 2)

    if separate_weights is not None:
        biases = (None,) * 3 if in_proj_bias is None else in_proj_bias.chunk(3)
        q, k, v = (heads_first(F.linear(rows[i], w, b)) for i, w, b in zip(which, separate_weights, biases))
    else:
        assert in_proj_weight is not None  # the packed projection (composite_attention_call checks it)
        # the distinct inputs through the packed projection in one call, then each one's block
        stacked = rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)
        projected = F.linear(stacked, in_proj_weight, in_proj_bias)  # (B, T, 3E)
        starts = [sum(r.shape[1] for r in rows[:i]) for i in range(len(rows))]

        def block(i: int, part: int) -> Tensor:  # input i's block of part (q, k, v): (B, H, T, d)
            return heads_first(
                projected[:, starts[i] : starts[i] + rows[i].shape[1], part * embed : (part + 1) * embed]
            )

        q, k, v = (block(i, part) for part, i in enumerate(which))
    mask = _merged_mask(
        attn_mask, key_padding_mask, is_causal, need_weights, query, batch, heads, length, source
    )
    scores = torch.matmul(q * math.sqrt(1.0 / float(head_dim)), k.transpose(-2, -1))  # (B, H, L, S)
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1)  # no dropout: writes_out leaves training-mode dropout alone
    out = torch.matmul(weights, v)  # (B, H, L, d)
    out = out.transpose(1, 2).reshape(batch, length, embed)
    out = F.linear(out, out_proj_weight, out_proj_bias)
    if not batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    return out, weights.mean(dim=1) if average_attn_weights else weights


#: ``F.multi_head_attention_forward``'s parameters, in order
_CALL_PARAMETERS = (
    "query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k",
    "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
    "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
    "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal",
)  # fmt: skip


def composite_attention_call(args: tuple, kwargs: dict) -> Optional[tuple[Tensor, Optional[Tensor]]]:
    """``F.multi_head_attention_forward(*args, **kwargs)`` in explicit operations (as
    :func:`composite_multi_head_attention`, sequence first: ``query`` ``(L, B, E)``), with the packed
    ``in_proj_weight`` or, with ``use_separate_proj_weight``, three projections (WavLM calls it so, with the
    biases concatenated); None for a call it does not write out (as :func:`writes_out`: unbatched inputs,
    ``bias_k``/``bias_v``, ``add_zero_attn``, dropout in training, ``static_k``/``static_v``)."""
    bound = dict(zip(_CALL_PARAMETERS, args)) | kwargs
    query = bound["query"]
    separate = bool(bound.get("use_separate_proj_weight", False))
    weights = (bound.get("q_proj_weight"), bound.get("k_proj_weight"), bound.get("v_proj_weight"))
    if (
        not isinstance(query, Tensor)
        or query.dim() != 3
        or bound.get("bias_k") is not None
        or bound.get("bias_v") is not None
        or bound.get("add_zero_attn")
        or (bound.get("training", True) and float(bound.get("dropout_p") or 0.0) > 0.0)
        or bound.get("static_k") is not None
        or bound.get("static_v") is not None
        or (separate and any(w is None for w in weights))
        or (not separate and bound.get("in_proj_weight") is None)
        or query.shape[-1] != bound["embed_dim_to_check"]
    ):
        return None
    return _composite(
        query,
        bound["key"],
        bound["value"],
        batch_first=False,
        heads=int(bound["num_heads"]),
        in_proj_weight=None if separate else bound["in_proj_weight"],
        in_proj_bias=bound.get("in_proj_bias"),
        separate_weights=weights if separate else None,  # type: ignore[arg-type]
        out_proj_weight=bound["out_proj_weight"],
        out_proj_bias=bound.get("out_proj_bias"),
        key_padding_mask=bound.get("key_padding_mask"),
        need_weights=bool(bound.get("need_weights", True)),
        attn_mask=bound.get("attn_mask"),
        average_attn_weights=bool(bound.get("average_attn_weights", True)),
        is_causal=bool(bound.get("is_causal", False)),
    )


class ExplicitAttentionCalls(TorchFunctionMode):
    """Evaluates ``F.multi_head_attention_forward`` calls in a model's own code (WavLM's attention calls it
    with its three projections' weights) by :func:`composite_attention_call` where it writes them out;
    every other call passes through unchanged. Entered inside the estimators' recorder, which then sees the
    projections as Linear layers (``nn.MultiheadAttention`` modules are written out before: by
    :func:`explicit_multi_head_attention`)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            out = composite_attention_call(args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


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
    attention = (m for m in modules_of(model) if isinstance(m, nn.MultiheadAttention))
    with instance_forwards((m, _forward) for m in attention):  # a replaced forward is kept
        yield model
