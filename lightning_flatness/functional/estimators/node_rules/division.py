r"""Division by a weight-dependent tensor, ``z = x / y`` (``div``, ``divide``, ``true_divide``, and ``c / y``
as ``rdiv``): the normalization of linear attention (EfficientViT's ``LiteMLA``), ratios of activations.

With adjoint ``G`` per output entry ``t``, the Hessian of ``<G, x / y>`` has, per term, the blocks
``d2/dx2 = 0``, ``d2/dx dy = b_t = -G_t / y_t^2`` and ``d2/dy2 = d_t = 2 G_t x_t / y_t^3``: a product part
``2 b_t dx dy``, sampled as :mod:`.products` samples ``x * y`` (``sqrt(|b| / 2)`` times one Rademacher sign
per term, shared by the ``+`` and ``-`` columns, ``sign(b)`` on ``y``'s side), and a diagonal part on ``y``,
``sum_t d_t dy_t^2`` (summed over the entries ``y`` is broadcast to), sampled as the elementwise rules
sample theirs (independent signs on the ``+`` and ``-`` columns). With ``x`` constant (or a number) only
the diagonal part is left. Cost ``O(numel)``. Integer division (``rounding_mode``) is not covered.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from lightning_flatness.functional.estimators.layer_rules.base import argument
from lightning_flatness.functional.estimators.node_rules.base import (
    NodeCall,
    NodeRule,
    rademacher,
    register_node_rule,
    split_signs,
)
from lightning_flatness.functional.estimators.node_rules.products import _sum_to, product_columns

__all__ = ["DivisionRule"]


class DivisionRule(NodeRule):
    ops = ("div", "divide", "true_divide", "rdiv")
    own_pair = True

    @staticmethod
    def _operands(call: NodeCall) -> tuple[Any, Any]:
        """``(numerator, denominator)``: ``rdiv`` (``c / y`` as ``y.__rtruediv__(c)``) has them swapped."""
        first = argument(call.args, call.kwargs, 0, ("input",))
        second = argument(call.args, call.kwargs, 1, ("other",))
        return (second, first) if call.op == "rdiv" else (first, second)

    def accepts(self, call: NodeCall) -> bool:
        if call.kwargs.get("rounding_mode") is not None:
            return False
        _, y = self._operands(call)
        return isinstance(y, Tensor) and any(y is t for t in call.inputs)

    def columns(
        self, call: NodeCall, adjoint: Tensor, generator: Optional[torch.Generator]
    ) -> tuple[list[Optional[Tensor]], list[Optional[Tensor]]]:
        x, y = self._operands(call)
        yv = y.detach().to(adjoint.dtype)
        xv = x.detach() if isinstance(x, Tensor) else torch.as_tensor(x)
        xv = xv.to(adjoint.dtype)
        d_plus, d_minus = split_signs(_sum_to(2 * adjoint * xv / yv**3, y.shape))  # the y-y block
        cy_plus = d_plus * rademacher(d_plus, generator)
        cy_minus = d_minus * rademacher(d_minus, generator)
        x_varies = isinstance(x, Tensor) and any(x is t for t in call.inputs)
        if not x_varies:
            plus, minus = [cy_plus], [cy_minus]
        else:
            cx, cy = product_columns(-adjoint / yv**2, x.shape, y.shape, generator)
            plus, minus = [cx, cy + cy_plus], [cx, -cy + cy_minus]
            if x is y:  # x / x: one input, both columns added
                return [plus[0] + plus[1]], [minus[0] + minus[1]]
        by_id = {id(y): (plus[-1], minus[-1])}
        if x_varies:
            by_id[id(x)] = (plus[0], minus[0])
        return [by_id[id(t)][0] for t in call.inputs], [by_id[id(t)][1] for t in call.inputs]


register_node_rule(DivisionRule())
