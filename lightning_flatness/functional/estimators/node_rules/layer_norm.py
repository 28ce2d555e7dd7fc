r"""``z = layer_norm(a, normalized_shape, weight, bias, eps)``: per normalized slice of ``D`` entries,
``u = (a - mean a) / s`` with ``s = sqrt(var a + eps)`` (population variance), ``z = weight * u + bias``.

With adjoint ``g`` and ``r = weight * g`` (the adjoint of ``u``), ``r~ = r - mean r`` and the centering
``P = I - 11^T / D``, the derivatives ``du_i/da_j = (P_ij - u_i u_j / D) / s`` give (the same algebra as
eq. 20's normalization,
:func:`~lightning_flatness.functional.loss_hessian_factors.normalized_cross_entropy_logit_hessian`,
with ``eps`` inside ``s``):

.. math:: M = \sum_i r_i \nabla^2 u_i = \alpha P - \frac{1}{D s^2}\big(\tilde r u^\top + u \tilde r^\top\big)
          + \frac{3 (r\cdot u)}{D^2 s^2} u u^\top, \qquad \alpha = -\frac{r \cdot u}{D s^2}.

The first term is a multiple of a projection (column ``sqrt|alpha| P xi`` on the side of its sign); the
rest lies in ``span{u, r~}``: a ``2 x 2`` eigenproblem per slice in an orthonormal basis of that span
gives two signed exact columns, mixed with random signs. Cost ``O(numel)``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from lightning_flatness.functional.estimators.layer_rules.base import argument
from lightning_flatness.functional.estimators.node_rules.base import (
    NodeCall,
    NodeRule,
    rademacher,
    register_node_rule,
)

__all__ = ["LayerNormRule"]


def _normalized_shape(call: NodeCall) -> tuple[int, ...]:
    shape = argument(call.args, call.kwargs, 1, ("normalized_shape",))
    return (int(shape),) if isinstance(shape, int) else tuple(int(d) for d in shape)


class LayerNormRule(NodeRule):
    ops = ("layer_norm",)

    def accepts(self, call: NodeCall) -> bool:
        shape = _normalized_shape(call)
        a = call.inputs[0]
        # normalized over trailing dims only, never over the samples (dim 0)
        return len(call.inputs) == 1 and call.args[0] is a and len(shape) < a.ndim

    def columns(
        self, call: NodeCall, adjoint: Tensor, generator: Optional[torch.Generator]
    ) -> tuple[list[Optional[Tensor]], list[Optional[Tensor]]]:
        shape = _normalized_shape(call)
        weight = argument(call.args, call.kwargs, 2, ("weight",))
        eps = argument(call.args, call.kwargs, 4, ("eps",), 1e-5)
        dtype = torch.promote_types(adjoint.dtype, torch.float64)  # float64: the 2 x 2 eigenproblems
        a = call.inputs[0].detach().to(dtype)
        d = math.prod(shape)
        lead = a.shape[: a.ndim - len(shape)]
        a = a.reshape(*lead, d)
        g = adjoint.to(dtype)
        r = g.reshape(*lead, d) if weight is None else (g * weight.detach().to(dtype)).reshape(*lead, d)
        c = a - a.mean(dim=-1, keepdim=True)
        s2 = c.pow(2).mean(dim=-1, keepdim=True) + eps
        u = c / s2.sqrt()
        rt = r - r.mean(dim=-1, keepdim=True)
        ru = (r * u).sum(dim=-1, keepdim=True)
        alpha = -ru / (d * s2)  # (..., 1)
        # orthonormal basis of span{u, r~}
        tiny = torch.finfo(a.dtype).tiny ** 0.5
        q1 = u / u.norm(dim=-1, keepdim=True).clamp_min(tiny)
        v = rt - (rt * q1).sum(dim=-1, keepdim=True) * q1
        q2 = v / v.norm(dim=-1, keepdim=True).clamp_min(tiny)
        q2 = torch.where(v.norm(dim=-1, keepdim=True) > 1e-12 * rt.norm(dim=-1, keepdim=True), q2, 0.0)
        basis = torch.stack([q1, q2], dim=-1)  # (..., D, 2)

        def low_rank(x: Tensor) -> Tensor:  # (M - alpha P) x for x (..., D, 2)
            ux = (u.unsqueeze(-1) * x).sum(dim=-2, keepdim=True)
            rx = (rt.unsqueeze(-1) * x).sum(dim=-2, keepdim=True)
            scale = (d * s2).unsqueeze(-1)
            return -(rt.unsqueeze(-1) * ux + u.unsqueeze(-1) * rx) / scale + 3 * ru.unsqueeze(
                -1
            ) * u.unsqueeze(-1) * ux / (d * scale)

        small = basis.transpose(-1, -2) @ low_rank(basis)  # (..., 2, 2)
        lam, vec = torch.linalg.eigh(0.5 * (small + small.transpose(-1, -2)))
        # each eigenvector's sign fixed by a fixed linear functional of its coordinates (not by its largest
        # entry: for r~ orthogonal to u the two have equal size), so that a draw does not depend on how the
        # eigensolver happened to orient it (float32 and float64 runs then agree draw by draw)
        orient = vec[..., 0, :] + 0.6180339887 * vec[..., 1, :]  # (..., 2)
        vec = vec * torch.where(orient < 0, -1.0, 1.0).to(vec.dtype).unsqueeze(-2)
        cols = basis @ vec  # (..., D, 2)
        out: list[list[Optional[Tensor]]] = []
        for sign in (1.0, -1.0):
            part = (sign * alpha).clamp_min(0).sqrt()
            xi = rademacher(a, generator)
            col = part * (xi - xi.mean(dim=-1, keepdim=True))
            weights = (sign * lam).clamp_min(0).sqrt() * rademacher(lam, generator)  # (..., 2)
            col = col + (cols * weights.unsqueeze(-2)).sum(dim=-1)
            out.append([col.reshape(call.inputs[0].shape).to(adjoint.dtype)])
        return out[0], out[1]


register_node_rule(LayerNormRule())
