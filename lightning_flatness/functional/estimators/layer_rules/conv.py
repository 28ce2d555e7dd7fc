"""``conv1d`` / ``conv2d`` / ``conv3d`` with any stride, padding (``"same"``, ``"valid"``, ints),
dilation and groups: im2col of the input, so that the per-sample gradient of column ``k`` is
``sum_p g_kp a_p^T`` over the output positions ``p``, per group."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch.nn.functional as F
from torch import Tensor

from lightning_flatness.functional.estimators.layer_rules.base import (
    LayerCall,
    LayerRule,
    argument,
    register_layer_rule,
)

__all__ = ["ConvRule", "conv_padding", "unfold"]


def _expand(value: Any, nd: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * nd
    value = tuple(int(v) for v in value)
    return value * nd if len(value) == 1 else value


def conv_padding(
    padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]
) -> tuple[tuple[int, int], ...]:
    """(left, right) zero padding per spatial dim; ``"same"`` puts the odd element on the right."""
    if isinstance(padding, str):
        if padding == "valid":
            return tuple((0, 0) for _ in kernel)
        if padding == "same":
            total = [d * (k - 1) for k, d in zip(kernel, dilation)]
            return tuple((t // 2, t - t // 2) for t in total)
        raise ValueError(f"unknown conv padding {padding!r}; expected an int, a tuple, 'same' or 'valid'.")
    return tuple((p, p) for p in _expand(padding, len(kernel)))


def unfold(x: Tensor, call: LayerCall, kernel: tuple[int, ...]) -> Tensor:
    """im2col for 1, 2 or 3 spatial dims: ``(N, C, *S) -> (N, groups, C/groups * prod(k), L)``."""
    nd = len(kernel)
    pads = [p for pair in reversed(call.padding) for p in pair]
    if any(pads):
        x = F.pad(x, pads)
    for d in range(nd):
        span = call.dilation[d] * (kernel[d] - 1) + 1
        x = x.unfold(2 + d, span, call.stride[d])
        if call.dilation[d] > 1:
            x = x[..., :: call.dilation[d]]
    n, c = x.shape[:2]
    positions = math.prod(x.shape[2 : 2 + nd])
    x = x.permute(0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))
    return x.reshape(n, call.groups, (c // call.groups) * math.prod(kernel), positions)


class ConvRule(LayerRule):
    """``convNd(input (N, C, *S), weight (O, C/groups, *kernel), bias, stride, padding, dilation,
    groups)``."""

    def __init__(self, spatial_dims: int) -> None:
        self.spatial_dims = spatial_dims
        self.op = f"conv{spatial_dims}d"

    def record(self, call: LayerCall, args: tuple, kwargs: dict, weight: Optional[Tensor]) -> None:
        nd = self.spatial_dims
        assert weight is not None  # convolutions always have a weight
        kernel = tuple(weight.shape[2:])
        call.stride = _expand(argument(args, kwargs, 3, ("stride",), 1), nd)
        call.dilation = _expand(argument(args, kwargs, 5, ("dilation",), 1), nd)
        call.padding = conv_padding(argument(args, kwargs, 4, ("padding",), 0), kernel, call.dilation)
        call.groups = int(argument(args, kwargs, 6, ("groups",), 1))

    def is_batched(self, call: LayerCall, n: int) -> bool:
        return (
            call.inputs.ndim == self.spatial_dims + 2
            and call.inputs.shape[0] == n
            and call.output.shape[0] == n
        )

    def bias_position_dims(self, grad: Tensor) -> tuple[int, ...]:
        return tuple(range(3, grad.ndim))

    def factors(self, call: LayerCall, grad: Tensor, kernel: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        k, n = grad.shape[:2]
        a = unfold(call.inputs, call, kernel)
        g = grad.reshape(k, n, call.groups, grad.shape[2] // call.groups, -1).permute(1, 2, 0, 3, 4)
        return a, g.reshape(n, g.shape[1], -1, g.shape[-1])


for _nd in (1, 2, 3):
    register_layer_rule(ConvRule(_nd))
