r"""``z = linear(h, W, b)`` where the weight ``W`` is a selected weight used more than once (a tied LM head:
GPT-2's ``wte`` is the token embedding and the output layer) and the input ``h`` depends on it too.

For a weight used once the op is linear in ``W`` and in ``h`` separately, and its curvature, the bilinear
form ``2 sum G_tv dh_t . dW_v`` coupling ``h`` and ``W``, only reaches the Hessian's off-diagonal blocks
(between ``W`` and the weights upstream of ``h``). When ``h`` depends on ``W`` itself, that coupling is
on the diagonal of ``W``'s block: this rule samples it, as :class:`~.products.MatmulRule` samples ``X @
Y`` with ``X = h`` ``(N, P, d)`` (``P`` positions) and ``Y = W^T``: per sample, ``alpha`` ``(P, d)`` and
``beta`` ``(V, d)`` Rademacher, ``c_h = alpha o (sqrt(|G| / 2) @ beta)`` and
``c_W = beta o ((s sqrt(|G| / 2))^T @ alpha)``, ``s = sign(G)``; ``+``: ``(c_h, c_W)``, ``-``:
``(c_h, -c_W)``.

``W`` has no sample dim, so its column is **per sample**: ``(N, *W.shape)``, added to each sample's own
gradient of ``W`` (on the per-layer path, to the sum of its calls' per-sample gradients,
:mod:`..layer_rules.shared`; ``N`` times the weight's size per column, which :mod:`..hessian_sketch`
bounds). Cost: two batched matrix products of the op's
size per column.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_flatness.functional.estimators.node_rules.base import (
    NodeCall,
    NodeRule,
    rademacher,
    register_node_rule,
)

__all__ = ["TiedLinearRule"]


class TiedLinearRule(NodeRule):
    ops = ("linear",)
    own_pair = True

    def accepts(self, call: NodeCall) -> bool:
        h, weight = call.inputs if len(call.inputs) == 2 else (None, None)
        return h is not None and h.ndim >= 2 and weight is not None and weight.ndim == 2

    def columns(
        self, call: NodeCall, adjoint: Tensor, generator: Optional[torch.Generator]
    ) -> tuple[list[Optional[Tensor]], list[Optional[Tensor]]]:
        h, weight = call.inputs
        n, d, v = h.shape[0], weight.shape[1], weight.shape[0]
        g = adjoint.reshape(n, -1, v)  # (N, P, V)
        root = (g.abs() / 2).sqrt()
        signed = torch.where(g < 0, -root, root)
        alpha = rademacher(g, generator, (n, g.shape[1], d))
        beta = rademacher(g, generator, (n, v, d))
        ch = (alpha * (root @ beta)).reshape(h.shape)
        cw = beta * (signed.transpose(-1, -2) @ alpha)  # (N, V, d): per sample
        return [ch, cw], [ch, -cw]


register_node_rule(TiedLinearRule())
