r"""``z = group_norm(a, num_groups, weight, bias, eps)`` on ``a`` ``(N, C, *spatial)``: per sample and group
of ``C / G`` channels, the ``D = (C / G) * prod(spatial)`` entries are normalized as a layer norm does
(``u = (a - mean a) / s``, ``s = sqrt(var a + eps)``), then ``z = weight_c u + bias_c`` per channel
(timm's PoolFormer, GroupNorm ResNets). The adjoint of ``u`` is ``r = weight_c * g``; the curvature and its
columns: :mod:`.normalization_curvature` (centred), per group.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_flatness.functional.estimators.layer_rules.base import argument
from lightning_flatness.functional.estimators.node_rules.base import NodeCall, NodeRule, register_node_rule
from lightning_flatness.functional.estimators.node_rules.normalization_curvature import normalization_columns

__all__ = ["GroupNormRule"]


class GroupNormRule(NodeRule):
    ops = ("group_norm",)

    def accepts(self, call: NodeCall) -> bool:
        a = call.inputs[0]
        groups = argument(call.args, call.kwargs, 1, ("num_groups",))
        return (
            len(call.inputs) == 1
            and call.args[0] is a
            and a.ndim >= 2
            and isinstance(groups, int)
            and groups >= 1
            and a.shape[1] % groups == 0
        )

    def columns(
        self, call: NodeCall, adjoint: Tensor, generator: Optional[torch.Generator]
    ) -> tuple[list[Optional[Tensor]], list[Optional[Tensor]]]:
        groups = int(argument(call.args, call.kwargs, 1, ("num_groups",)))
        weight = argument(call.args, call.kwargs, 2, ("weight",))
        eps = argument(call.args, call.kwargs, 4, ("eps",), 1e-5)
        dtype = torch.promote_types(adjoint.dtype, torch.float64)
        a = call.inputs[0].detach().to(dtype)
        n, channels = a.shape[:2]
        g = adjoint.to(dtype)
        if weight is not None:
            g = g * weight.detach().to(dtype).reshape(channels, *([1] * (a.ndim - 2)))
        plus, minus = normalization_columns(
            a.reshape(n, groups, -1), g.reshape(n, groups, -1), eps, True, generator
        )
        shape, out_dtype = call.inputs[0].shape, adjoint.dtype
        return [plus.reshape(shape).to(out_dtype)], [minus.reshape(shape).to(out_dtype)]


register_node_rule(GroupNormRule())
