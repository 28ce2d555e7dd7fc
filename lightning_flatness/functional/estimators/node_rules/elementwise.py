r"""Unary elementwise ops ``z = phi(a)`` (GELU, SiLU, tanh, sigmoid, hardswish, softplus, exp, pow with a
constant exponent, ...): ``M = diag(g * phi''(a))``.

``phi''`` comes from autograd on the op itself (the derivative of ``sum phi'(a)``, exact for an elementwise
op), evaluated under :class:`~lightning_flatness.functional.twice_differentiable.CompositeActivations`
so that hardswish and hardsigmoid, whose kernels have no double backward, are differentiated through
their documented composite form (``hardswish'' = 1/3`` on ``(-3, 3)``, ``hardsigmoid'' = 0``).
Columns: ``c^+ = sqrt(max(d, 0)) xi``, ``c^- = sqrt(max(-d, 0)) xi'`` with ``d = g phi''(a)`` and
independent Rademacher ``xi, xi'``. Cost: one double backward of the op, ``O(numel)``.
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
    replace_inputs,
    split_signs,
)
from lightning_flatness.functional.twice_differentiable import CompositeActivations

__all__ = ["ElementwiseRule", "second_derivative"]

UNARY_OPS = (
    "gelu",
    "silu",
    "mish",
    "tanh",
    "sigmoid",
    "logsigmoid",
    "log_sigmoid",  # F.logsigmoid as torch function modes see it
    "hardswish",
    "softplus",
    "elu",
    "selu",
    "celu",
    "exp",
    "expm1",
    "log",
    "log1p",
    "sqrt",
    "rsqrt",
    "reciprocal",
    "erf",
    "pow",
    "square",
    "sin",
    "cos",
)


def second_derivative(call: NodeCall) -> Tensor:
    """``phi''(a)`` elementwise for the one input of ``call``."""
    a = call.inputs[0].detach().requires_grad_(True)
    args, kwargs = replace_inputs(call, [a])
    with torch.enable_grad(), CompositeActivations():
        z = call.func(*args, **kwargs)
        (first,) = torch.autograd.grad(z.sum(), a, create_graph=True)
        if not first.requires_grad:  # phi' constant: phi'' = 0
            return torch.zeros_like(a)
        (second,) = torch.autograd.grad(first.sum(), a, allow_unused=True)
    return torch.zeros_like(a) if second is None else second


class ElementwiseRule(NodeRule):
    ops = UNARY_OPS

    def accepts(self, call: NodeCall) -> bool:
        return len(call.inputs) == 1 and call.output.shape == call.inputs[0].shape

    def columns(
        self, call: NodeCall, adjoint: Tensor, generator: Optional[torch.Generator]
    ) -> tuple[list[Optional[Tensor]], list[Optional[Tensor]]]:
        d = adjoint * second_derivative(call).to(adjoint.dtype)
        plus, minus = split_signs(d)
        return [plus * rademacher(d, generator)], [minus * rademacher(d, generator)]


register_node_rule(ElementwiseRule())
