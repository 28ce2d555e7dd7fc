r"""``p = softmax(a, dim)`` (attention weights), ``log_softmax`` and ``logsumexp`` (a router's normalizer).

With adjoint ``g``, per slice along ``dim`` (Jacobian ``dp_i/da_j = p_i (delta_ij - p_j)``):

.. math:: M = \sum_i g_i \nabla^2 p_i = T\,\mathrm{diag}\big(p \circ (g - g\cdot p)\big)\,T^\top, \qquad
          T = I - p \mathbf{1}^\top,

because :math:`\nabla^2 p_i = p_i [(e_i - p)(e_i - p)^\top - (\mathrm{diag}\,p - p p^\top)]` and
:math:`\mathrm{diag}\,p - p p^\top = T \mathrm{diag}(p) T^\top`. For ``log_softmax``,
:math:`M = -(\sum_i g_i)\, T \mathrm{diag}(p) T^\top`; for ``z = logsumexp(a, dim)``
(``log_softmax_i = a_i - z``), :math:`M = g\, T \mathrm{diag}(p) T^\top` with the adjoint ``g`` of ``z``.
Columns: ``T (sqrt(max(+-c, 0)) o xi)`` for the core ``c``, i.e. ``w - p sum(w)``; ``O(numel)``.
"""

from __future__ import annotations

from typing import Optional

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

__all__ = ["SoftmaxRule"]


class SoftmaxRule(NodeRule):
    ops = ("softmax", "log_softmax", "logsumexp")

    def accepts(self, call: NodeCall) -> bool:
        dim = argument(call.args, call.kwargs, 1, ("dim",))
        if call.op == "logsumexp" and isinstance(dim, (tuple, list)) and len(dim) == 1:
            dim = dim[0]
        a = call.inputs[0]
        # not along the samples (dim 0): the per-sample columns need a curvature that keeps them apart
        return len(call.inputs) == 1 and call.args[0] is a and isinstance(dim, int) and dim % a.ndim != 0

    def columns(
        self, call: NodeCall, adjoint: Tensor, generator: Optional[torch.Generator]
    ) -> tuple[list[Optional[Tensor]], list[Optional[Tensor]]]:
        dim = argument(call.args, call.kwargs, 1, ("dim",))
        if isinstance(dim, (tuple, list)):
            dim = dim[0]
        a = call.inputs[0].detach().to(adjoint.dtype)
        p = torch.softmax(a, dim=dim)
        if call.op == "softmax":
            core = p * (adjoint - (adjoint * p).sum(dim=dim, keepdim=True))
        elif call.op == "log_softmax":
            core = -adjoint.sum(dim=dim, keepdim=True) * p
        else:  # logsumexp: the adjoint of the reduced output, broadcast back along dim
            keepdim = bool(argument(call.args, call.kwargs, 2, ("keepdim",), False))
            core = (adjoint if keepdim else adjoint.unsqueeze(dim)) * p
        out: list[list[Optional[Tensor]]] = []
        for root in split_signs(core):
            w = root * rademacher(core, generator)
            out.append([w - p * w.sum(dim=dim, keepdim=True)])
        return out[0], out[1]


register_node_rule(SoftmaxRule())
