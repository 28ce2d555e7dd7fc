r"""``conv_transpose1d`` / ``2d`` / ``3d`` (``nn.ConvTranspose{1,2,3}d``: decoders, U-Nets, DPT's and SAM's
upsampling heads) with any stride, padding, output padding, dilation and groups.

A transposed convolution with weight ``W`` ``(C, O / G, *kernel)`` sends input position ``q`` to the output
positions ``o = q s - p + t d`` of the kernel taps ``t``, so the per-sample gradient of column ``k`` is, per
group, ``dW[c, o, t] = sum_q x[c, q] g_k[o, q s - p + t d]``: the input ``x`` against the output gradient
unfolded as the forward convolution with the same stride, padding and dilation would unfold its input
(:func:`~.conv.unfold`; the output padding adds positions no input reaches, which it skips). In the
contraction's layout (:meth:`~.base.LayerRule.factors`) the roles of input and output swap: the unfolded
output gradients ``(N, G, K (O / G) prod(kernel), Q)`` are the per-column factor and the input
``(N, G, C / G, Q)`` the shared one, so the per-sample gradients come out as ``(O / G prod(kernel), C / G)``
per group, which :meth:`ConvTransposeRule.as_weight` lays out as the weight ``(C, O / G, *kernel)``.

Cost: the generic contraction (:func:`~.contraction.factor_contraction`: per-sample gradients in batched
matrix products, or position pairs), ``O(N K Q C O prod(kernel) / G)`` flops, and an unfold of the ``K``
columns' output gradients (``K`` times the unfold a convolution of the same geometry makes of its input).
"""

from __future__ import annotations

import math
from typing import Optional

from torch import Tensor

from lightning_flatness.functional.estimators.layer_rules.base import (
    LayerCall,
    LayerRule,
    register_layer_rule,
)
from lightning_flatness.functional.estimators.layer_rules.conv import record_geometry, unfold

__all__ = ["ConvTransposeRule"]


class ConvTransposeRule(LayerRule):
    """``conv_transposeNd(input (N, C, *S), weight (C, O/groups, *kernel), bias, stride, padding,
    output_padding, groups, dilation)``."""

    sliceable = True

    def __init__(self, spatial_dims: int) -> None:
        self.spatial_dims = spatial_dims
        self.op = f"conv_transpose{spatial_dims}d"

    def record(self, call: LayerCall, args: tuple, kwargs: dict, weight: Optional[Tensor]) -> None:
        record_geometry(call, args, kwargs, weight, self.spatial_dims, dilation_position=7)

    def is_batched(self, call: LayerCall, n: int) -> bool:
        rows = call.inputs.shape[0] if call.inputs.ndim == self.spatial_dims + 2 else -1
        return rows == n and call.output.shape[0] == rows

    def bias_position_dims(self, grad: Tensor) -> tuple[int, ...]:
        return tuple(range(3, grad.ndim))

    def factors(self, call: LayerCall, grad: Tensor, kernel: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """The input ``(N, G, C / G, Q)`` and the unfolded output gradients ``(N, G, K (O / G) prod(kernel),
        Q)`` (module docstring: the roles of a convolution's factors, swapped)."""
        k, n = grad.shape[:2]
        groups = call.groups
        unfolded = unfold(grad.reshape(k * n, *grad.shape[2:]), call, kernel)  # (K N, G, O/G * taps, L)
        positions = math.prod(call.inputs.shape[2:])
        # the output padding's last rows and columns reach no input: the unfold stops at the input's size
        unfolded = unfolded[..., :positions]
        g = unfolded.reshape(k, n, groups, -1, positions).permute(1, 2, 0, 3, 4)
        a = call.inputs.reshape(n, groups, call.inputs.shape[1] // groups, positions)
        return a, g.reshape(n, groups, -1, positions)

    def as_weight(self, value: Tensor, shape: tuple[int, ...]) -> Tensor:
        """``(..., G, (O / G) prod(kernel), C / G)`` as the weight's ``(..., C, O / G, *kernel)``."""
        lead, groups, per_group_in = value.shape[:-3], value.shape[-3], value.shape[-1]
        v = value.reshape(*lead, groups, shape[1], math.prod(shape[2:]), per_group_in)
        return v.movedim(-1, -3).reshape(*lead, *shape)


for _nd in (1, 2, 3):
    register_layer_rule(ConvTransposeRule(_nd))
