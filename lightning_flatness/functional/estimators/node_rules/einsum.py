r"""``einsum`` of two weight-dependent tensors, ``Z = einsum("A,B->O", X, Y)``: attention written with
einsum (``"bhid,bhjd->bhij"``, ``"bhij,bhjd->bhid"``: torchvision's MaxViT, much research code).

The products' rule of :mod:`.products` for matmul, for any index pattern: each output entry is a sum of
terms ``X[a] Y[b]`` over the contracted indices, the op is bilinear, and with adjoint ``G`` the
quadratic form is ``2 sum_t G_t dX_t dY_t`` over the terms. Mixing the terms with the signs
``eps_t = alpha[a] beta[b]`` (``alpha``, ``beta`` independent Rademacher tensors shaped like ``X`` and
``Y``: products of two such signs are pairwise uncorrelated across terms) gives

.. math:: c_X = \alpha \circ \mathrm{einsum}(\text{"O,B->A"}, R, \beta), \qquad
          c_Y = \beta \circ \mathrm{einsum}(\text{"O,A->B"}, s R, \alpha),

``R = sqrt(|G| / 2)``, ``s = sign(G)``; ``+``: ``(c_X, c_Y)``, ``-``: ``(c_X, -c_Y)`` (the signs shared, so
that the own squares cancel draw by draw, as for matmul). Two einsums of the op's own size per column.

Covered: two distinct operands, explicit output (``->``), no ellipsis, no index repeated within an
operand, every index of each operand present in the output or in the other operand.
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

__all__ = ["EinsumRule"]


def _parse(call: NodeCall) -> Optional[tuple[str, str, str, tuple[Tensor, Tensor]]]:
    """``(A, B, O, operands)``: the index strings and the two operands of a covered einsum call, or None."""
    if not call.args or not isinstance(call.args[0], str):
        return None
    operands = call.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (tuple, list)):
        operands = tuple(operands[0])
    if len(operands) != 2 or not all(isinstance(t, Tensor) for t in operands):
        return None
    equation = call.args[0].replace(" ", "")
    if "..." in equation or "->" not in equation:
        return None
    left, out = equation.split("->")
    parts = left.split(",")
    if len(parts) != 2:
        return None
    a, b = parts
    if any(len(set(s)) != len(s) for s in (a, b, out)):
        return None  # a diagonal or a repeated output index
    if len(a) != operands[0].ndim or len(b) != operands[1].ndim:
        return None
    if not set(a) <= set(out) | set(b) or not set(b) <= set(out) | set(a):
        return None
    return a, b, out, (operands[0], operands[1])


class EinsumRule(NodeRule):
    ops = ("einsum",)
    own_pair = True

    def accepts(self, call: NodeCall) -> bool:
        parsed = _parse(call) if len(call.inputs) == 2 else None
        return parsed is not None and parsed[3][0] is call.inputs[0] and parsed[3][1] is call.inputs[1]

    def columns(
        self, call: NodeCall, adjoint: Tensor, generator: Optional[torch.Generator]
    ) -> tuple[list[Optional[Tensor]], list[Optional[Tensor]]]:
        parsed = _parse(call)
        assert parsed is not None
        a, b, out, (x, y) = parsed
        root = (adjoint.abs() / 2).sqrt()
        signed = torch.where(adjoint < 0, -root, root)
        alpha = rademacher(adjoint, generator, tuple(x.shape))
        beta = rademacher(adjoint, generator, tuple(y.shape))
        cx = alpha * torch.einsum(f"{out},{b}->{a}", root, beta)
        cy = beta * torch.einsum(f"{out},{a}->{b}", signed, alpha)
        return [cx, cy], [cx, -cy]


register_node_rule(EinsumRule())
