r"""``z = rms_norm(a, normalized_shape, weight, eps)`` (``nn.RMSNorm``): per slice of the trailing
``D = prod(normalized_shape)`` entries, ``u = a / s`` with ``s = sqrt(mean(a^2) + eps)`` (``eps`` None:
``torch.finfo(a.dtype).eps``, as PyTorch does), ``z = weight * u``. The adjoint of ``u`` is
``r = weight * g``; the curvature and its columns: :mod:`.normalization_curvature` (not centred).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from lightning_flatness.functional.estimators.layer_rules.base import argument
from lightning_flatness.functional.estimators.node_rules.base import NodeCall, NodeRule, register_node_rule
from lightning_flatness.functional.estimators.node_rules.layer_norm import normalized_shape
from lightning_flatness.functional.estimators.node_rules.normalization_curvature import normalization_columns

__all__ = ["RMSNormRule"]


class RMSNormRule(NodeRule):
    ops = ("rms_norm",)

    def accepts(self, call: NodeCall) -> bool:
        a = call.inputs[0]
        return len(call.inputs) == 1 and call.args[0] is a and len(normalized_shape(call)) < a.ndim

    def columns(
        self, call: NodeCall, adjoint: Tensor, generator: Optional[torch.Generator]
    ) -> tuple[list[Optional[Tensor]], list[Optional[Tensor]]]:
        shape = normalized_shape(call)
        weight = argument(call.args, call.kwargs, 2, ("weight",))
        eps = argument(call.args, call.kwargs, 3, ("eps",))
        if eps is None:
            eps = torch.finfo(call.inputs[0].dtype).eps
        dtype = torch.promote_types(adjoint.dtype, torch.float64)
        a = call.inputs[0].detach().to(dtype)
        d = math.prod(shape)
        lead = a.shape[: a.ndim - len(shape)]
        g = adjoint.to(dtype)
        r = g if weight is None else g * weight.detach().to(dtype)
        plus, minus = normalization_columns(a.reshape(*lead, d), r.reshape(*lead, d), eps, False, generator)
        shape_in, out_dtype = call.inputs[0].shape, adjoint.dtype
        return [plus.reshape(shape_in).to(out_dtype)], [minus.reshape(shape_in).to(out_dtype)]


register_node_rule(RMSNormRule())
