r"""``z = ||a||_2`` over some dims of each sample (``torch.linalg.vector_norm``, ``Tensor.norm``): the global
response normalization of ConvNeXt V2 (timm's ``GlobalResponseNorm``, Hugging Face's ``ConvNextV2GRN``) takes
the norm of each channel over the spatial positions.

Per slice ``a`` of the reduced dims, with ``y = ||a||`` and ``u = a / y``, the Hessian of the norm is
:math:`\nabla^2 y = (I - u u^\top) / y`, a projection ``P`` (PSD) over ``y``; so for the adjoint ``r`` of
the slice's output, :math:`M = \frac{r}{y} P`. With Rademacher signs :math:`\varepsilon` on the slice,
:math:`E[(P \varepsilon)(P \varepsilon)^\top] = P P^\top = P`, and the columns are
:math:`c^\pm = \sqrt{\max(\pm r, 0) / y}\, P \varepsilon` (one of them is zero on each slice). A slice with
``y = 0`` (where the norm is not differentiable; autograd gives it the subgradient 0) has no columns.

Covered: the 2-norm (``ord=2``; ``Tensor.norm``'s default ``"fro"``, which over one or two dims is the same)
over explicit dims that leave the samples (dim 0) apart, without a ``dtype`` argument.
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

__all__ = ["VectorNormRule"]

_TWO_NORMS = {"linalg_vector_norm": (2, 2.0), "norm": (2, 2.0, "fro")}


def _reduced_dims(call: NodeCall) -> Optional[tuple[int, ...]]:
    """The dims the call reduces, non-negative and sorted, or None when it is not a covered 2-norm."""
    a = call.inputs[0]
    order = argument(call.args, call.kwargs, 1, ("ord", "p"), 2 if call.op == "linalg_vector_norm" else "fro")
    dim = argument(call.args, call.kwargs, 2, ("dim",))
    if order not in _TWO_NORMS.get(call.op, ()) or dim is None or a.ndim < 2:
        return None
    if argument(call.args, call.kwargs, 4, ("dtype",)) is not None or call.kwargs.get("out") is not None:
        return None
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if not dims or not all(isinstance(d, int) for d in dims):
        return None
    dims = tuple(sorted({d % a.ndim for d in dims}))
    if 0 in dims or (call.op == "norm" and isinstance(order, str) and len(dims) > 2):
        return None  # across the samples; a Frobenius norm over more than two dims is not defined
    return dims


class VectorNormRule(NodeRule):
    ops = tuple(_TWO_NORMS)

    def accepts(self, call: NodeCall) -> bool:
        return len(call.inputs) == 1 and call.args[0] is call.inputs[0] and _reduced_dims(call) is not None

    def columns(
        self, call: NodeCall, adjoint: Tensor, generator: Optional[torch.Generator]
    ) -> tuple[list[Optional[Tensor]], list[Optional[Tensor]]]:
        dims = _reduced_dims(call)
        assert dims is not None
        keepdim = bool(argument(call.args, call.kwargs, 3, ("keepdim",), False))
        dtype = torch.promote_types(adjoint.dtype, torch.float64)
        a = call.inputs[0].detach().to(dtype)
        r = adjoint.to(dtype)
        if not keepdim:
            for d in dims:
                r = r.unsqueeze(d)
        y = a.square().sum(dim=dims, keepdim=True).sqrt()
        curved = y > 0
        safe = torch.where(curved, y, torch.ones_like(y))
        u = a / safe
        eps = rademacher(a, generator)
        projected = eps - u * (u * eps).sum(dim=dims, keepdim=True)  # P eps
        plus, minus = split_signs(torch.where(curved, r / safe, torch.zeros_like(r)))
        return [(plus * projected).to(adjoint.dtype)], [(minus * projected).to(adjoint.dtype)]


register_node_rule(VectorNormRule())
