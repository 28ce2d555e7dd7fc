r"""``embedding`` (``nn.Embedding``, Hugging Face word / token-type embeddings): a table lookup; and
``embedding_bag`` on bags of equal length (:class:`EmbeddingBagRule`: each bag's output gradient spread over
its entries, then the same contraction).

``F.embedding(ids, E)`` returns ``E[ids]``: row ``v`` of the table reaches every position ``p`` of a
sample with ``ids_p = v``. The per-sample gradient of column ``k`` is therefore sparse,
``G_nk[v] = sum_{p: ids_np = v} g_nkp`` (the output gradients of the positions that looked ``v`` up,
summed), and the Gauss-Newton diagonal of the table is

.. math:: D[v, c] = \sum_{n,k} s_{nk} \Big(\sum_{p:\, \mathrm{ids}_{np} = v} g_{nkpc}\Big)^2 .

Computed without per-sample gradients of the whole table: the positions are grouped by their
``(sample, id)`` pair (``torch.unique``), their gradients summed per pair (``index_add``), squared,
weighted by the signs and added to the pairs' rows. Ids with several rows per sample along dim 0,
sample-major (a multiple-choice model's ``(N * choices, T)``), are read as more positions of each sample
(:meth:`EmbeddingRule.regroup`; the batch-independence probe checks the order). Cost ``O(K N P C)`` for
``N`` samples of ``P`` positions and ``C`` columns, independent of the vocabulary size; memory ``K U C``
for the ``U <= N P`` distinct pairs. Positions holding ``padding_idx`` are left out (autograd gives that
row no gradient).

A lookup is linear in the table, so the exactness recorder lists ``embedding`` among the piecewise
linear ops; ``max_norm`` (which renormalises rows in place) and ``scale_grad_by_freq`` (which rescales
the gradient by batch counts) are not covered by this rule: the per-sample path handles them. A
table used twice (a tied language-model head) has its looked-up rows added, in place, into the per-sample
gradients of its other calls (:meth:`EmbeddingRule.sample_gradients`, :mod:`.shared`), which are dense:
``V C`` entries per sample and column, in chunks of samples.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from lightning_flatness.functional.estimators.layer_rules.base import (
    LayerCall,
    LayerRule,
    SampleGradients,
    argument,
    register_layer_rule,
)

__all__ = ["EmbeddingBagRule", "EmbeddingRule"]


class EmbeddingRule(LayerRule):
    """``embedding(input ids (N, *positions), weight (V, C), padding_idx, max_norm, norm_type,
    scale_grad_by_freq, sparse)``."""

    op = "embedding"
    weight_argument = (1, ("weight",))
    bias_argument = None

    def record(self, call: LayerCall, args: tuple, kwargs: dict, weight: Optional[Tensor]) -> None:
        max_norm = argument(args, kwargs, 3, ("max_norm",))
        by_frequency = bool(argument(args, kwargs, 5, ("scale_grad_by_freq",), False))
        if max_norm is not None or by_frequency:
            call.samples_interact = True  # not this rule's layout: the per-sample path handles it
        padding = argument(args, kwargs, 2, ("padding_idx",))
        if padding is not None and weight is not None and padding < 0:
            padding += weight.shape[0]
        call.options["padding_idx"] = padding

    def is_batched(self, call: LayerCall, n: int) -> bool:
        rows = call.inputs.shape[0] if call.inputs.ndim >= 1 else -1
        return not call.samples_interact and rows > 0 and rows % n == 0 and call.output.shape[0] == rows

    def regroup(self, call: LayerCall, grad: Tensor, n: int) -> tuple[LayerCall, Tensor]:
        """``(n k, *positions)`` ids (a multiple-choice model's ``(N * choices, T)`` tokens) as ``(n, k *
        positions)``: each sample's ``k`` rows are more positions of its lookup, like
        :meth:`~.linear.LinearRule.regroup`."""
        inputs = call.inputs.reshape(n, -1)
        return dataclasses.replace(call, inputs=inputs), grad.reshape(grad.shape[0], n, -1, grad.shape[-1])

    def accumulate(
        self, call: LayerCall, grad: Tensor, signs: Tensor, diag: dict[str, Tensor], leaves: dict[str, Tensor]
    ) -> bool:
        assert call.weight is not None
        table = leaves[call.weight]
        vocab, width = table.shape
        k, n = grad.shape[:2]
        ids = call.inputs.reshape(n, -1)  # (N, P)
        g = grad.reshape(k, n * ids.shape[1], width)  # (K, N P, C)
        keys = (torch.arange(n, device=ids.device).unsqueeze(1) * vocab + ids).reshape(-1)  # (N P,)
        if call.options.get("padding_idx") is not None:  # padding positions get no gradient
            keep = ids.reshape(-1) != call.options["padding_idx"]
            keys, g = keys[keep], g[:, keep]
        pairs, slot = torch.unique(keys, return_inverse=True)  # the distinct (sample, id) pairs
        summed = torch.zeros(k, pairs.numel(), width, dtype=grad.dtype, device=grad.device)
        summed.index_add_(1, slot, g)  # (K, U, C) per-sample gradients of the rows looked up
        weights = signs[pairs // vocab].T.to(grad.dtype)  # (K, U) the sign of each pair's sample
        contribution = torch.einsum("ku,kuc->uc", weights, summed.square_())
        diag[call.weight].index_add_(0, pairs % vocab, contribution)
        return True

    def sample_gradients(self, call: LayerCall, grad: Tensor, shape: tuple[int, ...]) -> SampleGradients:
        """Per-sample gradients of the table for a tied table (:mod:`.shared`), where they are summed with the
        other calls' before squaring: each position's output gradient added to the row it looked up
        (padding positions left out), into the other calls' dense sum in place (``add_weight``, ``O(P C)``
        per sample and column)."""
        k, n = grad.shape[:2]
        vocab, width = shape
        ids = call.inputs.reshape(n, -1)  # (N, P)
        g = grad.reshape(k, n, ids.shape[1], width)
        padding = call.options.get("padding_idx")

        def add_weight(samples: slice, total: Tensor) -> None:
            rows, gs = ids[samples], g[:, samples]  # (m, P), (K, m, P, C)
            m = rows.shape[0]
            sample = torch.arange(m, device=rows.device).unsqueeze(1).expand_as(rows).reshape(-1)
            values = gs.permute(1, 2, 0, 3).reshape(-1, k, width)  # (m P, K, C)
            flat = rows.reshape(-1)
            if padding is not None:
                keep = flat != padding
                sample, flat, values = sample[keep], flat[keep], values[keep]
            # total (m, K, V, C) seen as (m, V, K, C): each position's gradient onto its row, in place
            total.view(m, k, vocab, width).permute(0, 2, 1, 3).index_put_(
                (sample, flat), values, accumulate=True
            )

        def bias(samples: slice) -> Tensor:
            raise ValueError("an embedding lookup has no bias")

        return SampleGradients(None, bias, add_weight)


register_layer_rule(EmbeddingRule())


class EmbeddingBagRule(EmbeddingRule):
    r"""``embedding_bag(ids (N, L), table (V, C), offsets=None, max_norm, norm_type, scale_grad_by_freq,
    mode, sparse, per_sample_weights, include_last_offset, padding_idx)`` (``nn.EmbeddingBag`` on bags of
    equal length, one per sample): ``out_n = sum_p c_np E[ids_np]`` with ``c_np = 1`` (``"sum"``),
    ``per_sample_weights[n, p]`` (``"sum"`` with weights) or ``1 / (non-padding entries of bag n)``
    (``"mean"``), padding entries 0. So the per-sample gradient of column ``k`` is the embedding rule's with
    the output gradient of each position ``c_np g_nk``: the output gradients are spread over the bag's
    positions and the embedding rule contracts them (``O(K N L C)``). Bags given by ``offsets`` (1-D ids),
    ``mode="max"``, ``max_norm`` and ``scale_grad_by_freq`` are not this layout: the per-sample path handles
    them where it can."""

    op = "embedding_bag"

    def record(self, call: LayerCall, args: tuple, kwargs: dict, weight: Optional[Tensor]) -> None:
        offsets = argument(args, kwargs, 2, ("offsets",))
        max_norm = argument(args, kwargs, 3, ("max_norm",))
        by_frequency = bool(argument(args, kwargs, 5, ("scale_grad_by_freq",), False))
        mode = argument(args, kwargs, 6, ("mode",), "mean")
        per_sample = argument(args, kwargs, 8, ("per_sample_weights",))
        padding = argument(args, kwargs, 10, ("padding_idx",))
        if padding is not None and weight is not None and padding < 0:
            padding += weight.shape[0]
        call.options["padding_idx"] = padding
        if (
            offsets is not None
            or call.inputs.ndim != 2
            or mode not in ("sum", "mean")
            or max_norm is not None
            or by_frequency
            or (per_sample is not None and per_sample.requires_grad)
        ):
            call.samples_interact = True  # not this rule's layout: the per-sample path handles it
            return
        ids, dtype = call.inputs, torch.float32 if weight is None else weight.dtype
        if per_sample is not None:
            scale = per_sample.detach().to(dtype)
        else:
            scale = torch.ones(ids.shape, dtype=dtype, device=ids.device)
        if padding is not None:
            scale = scale * (ids != padding)
        if mode == "mean":
            scale = scale / scale.sum(dim=1, keepdim=True).clamp_min(1)
        call.options["bag_scale"] = scale  # (N, L): c_np

    def _spread(self, call: LayerCall, grad: Tensor) -> Tensor:
        """``(K, N, C)`` output gradients as ``(K, N, L, C)``: ``c_np g_nk`` at each position of the bag."""
        scale = call.options["bag_scale"].to(grad.dtype)
        return grad.unsqueeze(2) * scale[None, :, :, None]

    def accumulate(
        self, call: LayerCall, grad: Tensor, signs: Tensor, diag: dict[str, Tensor], leaves: dict[str, Tensor]
    ) -> bool:
        return super().accumulate(call, self._spread(call, grad), signs, diag, leaves)

    def sample_gradients(self, call: LayerCall, grad: Tensor, shape: tuple[int, ...]) -> SampleGradients:
        return super().sample_gradients(call, self._spread(call, grad), shape)

    def is_batched(self, call: LayerCall, n: int) -> bool:
        """One bag per sample (never several rows per sample: the embedding rule's regrouping is not used)."""
        return not call.samples_interact and call.inputs.shape[0] == n and call.output.shape[0] == n


register_layer_rule(EmbeddingBagRule())
