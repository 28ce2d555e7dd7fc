r"""``z = rms_norm(a, normalized_shape, weight, eps)`` (``nn.RMSNorm``): per slice of the trailing
``D = prod(normalized_shape)`` entries, ``u = a / s`` with ``s = sqrt(mean(a^2) + eps)`` (``eps`` None:
``torch.finfo(a.dtype).eps``, as PyTorch does), ``z = weight * u``. The adjoint of ``u`` is
``r = weight * g``; the curvature and its columns: :mod:`.normalization_curvature` (not centred).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_flatness.functional.estimators.layer_rules.base import argument
from lightning_flatness.functional.estimators.node_rules.base import NodeCall, NodeRule, register_node_rule
from lightning_flatness.functional.estimators.node_rules.layer_norm import (
    normalized_shape,
    trailing_normalization_columns,
)

__all__ = ["RMSNormRule"]


class RMSNormRule(NodeRule):
    ops = ("rms_norm",)

    def accepts(self, call: NodeCall) -> bool:
        a = call.inputs[0]
        return len(call.inputs) == 1 and call.args[0] is a and len(normalized_shape(call)) < a.ndim

    def columns(
        self, call: NodeCall, adjoint: Tensor, generator: Optional[torch.Generator]
    ) -> tuple[list[Optional[Tensor]], list[Optional[Tensor]]]:
        weight = argument(call.args, call.kwargs, 2, ("weight",))
        eps = argument(call.args, call.kwargs, 3, ("eps",))
        if eps is None:
            eps = torch.finfo(call.inputs[0].dtype).eps
        return trailing_normalization_columns(call, adjoint, weight, eps, False, generator)


register_node_rule(RMSNormRule())
