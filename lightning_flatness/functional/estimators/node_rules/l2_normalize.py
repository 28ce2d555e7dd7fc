r"""``z = F.normalize(a, p=2, dim, eps)``: each slice of ``D`` entries along ``dim`` divided by its Euclidean
norm (``max(||a||, eps)``), as cross-covariance attention normalizes its queries and keys (timm's
EdgeNeXt and XCiT). Where ``||a|| > eps``, ``z = u / sqrt(D)`` with ``u = a / sqrt(mean(a^2))``, the RMS
normalization without ``eps``; so ``M = sum_i g_i grad^2 z_i`` is that of :mod:`.normalization_curvature`
(not centred) with the adjoint ``r = g / sqrt(D)``. Where ``||a|| <= eps`` the op is linear (``a / eps``):
no curvature, no columns (a zero slice included: the keys of a padded window, whose bias is zero in Swin V2).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from lightning_flatness.functional.estimators.layer_rules.base import argument
from lightning_flatness.functional.estimators.node_rules.base import NodeCall, NodeRule, register_node_rule
from lightning_flatness.functional.estimators.node_rules.normalization_curvature import normalization_columns

__all__ = ["L2NormalizeRule"]


class L2NormalizeRule(NodeRule):
    ops = ("normalize",)

    def accepts(self, call: NodeCall) -> bool:
        a = call.inputs[0]
        p = argument(call.args, call.kwargs, 1, ("p",), 2.0)
        dim = argument(call.args, call.kwargs, 2, ("dim",), 1)
        out = argument(call.args, call.kwargs, 4, ("out",))
        return (
            len(call.inputs) == 1
            and call.args[0] is a
            and p == 2
            and out is None
            and isinstance(dim, int)
            and a.ndim >= 2
            and dim % a.ndim != 0  # never across the samples
        )

    def columns(
        self, call: NodeCall, adjoint: Tensor, generator: Optional[torch.Generator]
    ) -> tuple[list[Optional[Tensor]], list[Optional[Tensor]]]:
        dim = argument(call.args, call.kwargs, 2, ("dim",), 1)
        eps = argument(call.args, call.kwargs, 3, ("eps",), 1e-12)
        dtype = torch.promote_types(adjoint.dtype, torch.float64)
        a = call.inputs[0].detach().to(dtype).movedim(dim, -1)
        d = a.shape[-1]
        r = adjoint.to(dtype).movedim(dim, -1) / math.sqrt(d)
        curved = a.norm(dim=-1, keepdim=True) > eps
        # a slice at or below eps (a zero key of a padded window) is linear: its columns are zero, and are
        # formed from ones there, since the normalization of a zero slice is 0 / 0
        plus, minus = normalization_columns(
            torch.where(curved, a, torch.ones_like(a)), r, 0.0, False, generator
        )
        zero = torch.zeros((), dtype=plus.dtype)
        return [torch.where(curved, plus, zero).movedim(-1, dim).to(adjoint.dtype)], [
            torch.where(curved, minus, zero).movedim(-1, dim).to(adjoint.dtype)
        ]


register_node_rule(L2NormalizeRule())
