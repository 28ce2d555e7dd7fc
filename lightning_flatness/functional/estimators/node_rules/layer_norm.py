r"""``z = layer_norm(a, normalized_shape, weight, bias, eps)``: per normalized slice of ``D`` entries (the
trailing ``normalized_shape``), ``u = (a - mean a) / s`` with ``s = sqrt(var a + eps)`` (population
variance), ``z = weight * u + bias``. With adjoint ``g``, the adjoint of ``u`` is ``r = weight * g``; the
curvature and its columns: :mod:`.normalization_curvature` (centred).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from lightning_flatness.functional.estimators.layer_rules.base import argument
from lightning_flatness.functional.estimators.node_rules.base import NodeCall, NodeRule, register_node_rule
from lightning_flatness.functional.estimators.node_rules.normalization_curvature import normalization_columns

__all__ = ["LayerNormRule", "normalized_shape", "trailing_normalization_columns"]


def normalized_shape(call: NodeCall) -> tuple[int, ...]:
    """The ``normalized_shape`` argument of a ``layer_norm`` / ``rms_norm`` call, as a tuple."""
    shape = argument(call.args, call.kwargs, 1, ("normalized_shape",))
    return (int(shape),) if isinstance(shape, int) else tuple(int(d) for d in shape)


class LayerNormRule(NodeRule):
    ops = ("layer_norm",)

    def accepts(self, call: NodeCall) -> bool:
        shape = normalized_shape(call)
        a = call.inputs[0]
        # normalized over trailing dims only, never over the samples (dim 0)
        return len(call.inputs) == 1 and call.args[0] is a and len(shape) < a.ndim

    def columns(
        self, call: NodeCall, adjoint: Tensor, generator: Optional[torch.Generator]
    ) -> tuple[list[Optional[Tensor]], list[Optional[Tensor]]]:
        weight = argument(call.args, call.kwargs, 2, ("weight",))
        eps = argument(call.args, call.kwargs, 4, ("eps",), 1e-5)
        return trailing_normalization_columns(call, adjoint, weight, eps, True, generator)


def trailing_normalization_columns(
    call: NodeCall,
    adjoint: Tensor,
    weight: Optional[Tensor],
    eps: float,
    centered: bool,
    generator: Optional[torch.Generator],
) -> tuple[list[Optional[Tensor]], list[Optional[Tensor]]]:
    """The columns of a normalization over the trailing ``normalized_shape`` (``layer_norm``, ``rms_norm``)
    with an elementwise affine ``weight`` (or None): :func:`.normalization_curvature.normalization_columns`
    on slices of ``D = prod(normalized_shape)`` entries, in float64, back in the input's shape."""
    shape = normalized_shape(call)
    dtype = torch.promote_types(adjoint.dtype, torch.float64)  # float64: the 2 x 2 eigenproblems
    a = call.inputs[0].detach().to(dtype)
    d = math.prod(shape)
    lead = a.shape[: a.ndim - len(shape)]
    g = adjoint.to(dtype)
    r = g if weight is None else g * weight.detach().to(dtype)
    plus, minus = normalization_columns(a.reshape(*lead, d), r.reshape(*lead, d), eps, centered, generator)
    shape_in, out_dtype = call.inputs[0].shape, adjoint.dtype
    return [plus.reshape(shape_in).to(out_dtype)], [minus.reshape(shape_in).to(out_dtype)]


register_node_rule(LayerNormRule())
