r"""The curvature of a normalization of ``D`` entries, shared by the ``layer_norm``, ``group_norm`` and
``rms_norm`` rules: random signed columns of

.. math:: M = \sum_i r_i \nabla^2 u_i

for one normalized slice ``a`` of ``D`` entries with output ``u`` and adjoint ``r`` of ``u`` (the op's
adjoint times its affine weight, where it has one).

- Centred (layer norm, group norm): ``u = (a - mean a) / s``, ``s = sqrt(var a + eps)`` (population
  variance). With ``P = I - 11^T / D`` and ``r~ = r - mean r``, ``du_i/da_j = (P_ij - u_i u_j / D) / s``
  and (the same algebra as eq. 20's normalization,
  :func:`~lightning_flatness.functional.loss_hessian_factors.normalized_cross_entropy_logit_hessian`)

  .. math:: M = \alpha P - \frac{1}{D s^2}\big(\tilde r u^\top + u \tilde r^\top\big)
            + \frac{3 (r\cdot u)}{D^2 s^2} u u^\top, \qquad \alpha = -\frac{r \cdot u}{D s^2}.

- Not centred (RMS norm): ``u = a / s``, ``s = sqrt(mean(a^2) + eps)``, ``du_i/da_j = (I_ij - u_i u_j / D) /
  s``, and the same formula with ``P`` replaced by ``I`` and ``r~`` by ``r``.

The first term is a multiple of a projection (column ``sqrt|alpha| P xi``, or ``sqrt|alpha| xi``, on the
side of its sign); the rest lies in ``span{u, r~}``: a ``2 x 2`` eigenproblem per slice in an orthonormal
basis of that span gives two signed exact columns, mixed with random signs. Cost ``O(numel)``, in
float64. The same structure gives ``diag(M)`` exactly (:func:`normalization_diagonal`), for a
normalization of weights alone (:mod:`.weight_functions`), whose curvature needs no sampling.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_flatness.functional.estimators.node_rules.base import rademacher

__all__ = ["normalization_columns", "normalization_diagonal"]


def _structure(a: Tensor, r: Tensor, eps: float, centered: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(alpha (..., 1), lam (..., 2), cols (..., D, 2))`` with ``M = alpha P + cols diag(lam) cols^T``
    (``P = I`` when not centred; module docstring)."""
    d = a.shape[-1]
    c = a - a.mean(dim=-1, keepdim=True) if centered else a
    s2 = c.pow(2).mean(dim=-1, keepdim=True) + eps
    u = c / s2.sqrt()
    rt = r - r.mean(dim=-1, keepdim=True) if centered else r
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
        return -(rt.unsqueeze(-1) * ux + u.unsqueeze(-1) * rx) / scale + 3 * ru.unsqueeze(-1) * u.unsqueeze(
            -1
        ) * ux / (d * scale)

    small = basis.transpose(-1, -2) @ low_rank(basis)  # (..., 2, 2)
    lam, vec = torch.linalg.eigh(0.5 * (small + small.transpose(-1, -2)))
    # each eigenvector's sign fixed by a fixed linear functional of its coordinates (not by its largest
    # entry: for r~ orthogonal to u the two have equal size), so that a draw does not depend on how the
    # eigensolver happened to orient it (float32 and float64 runs then agree draw by draw)
    orient = vec[..., 0, :] + 0.6180339887 * vec[..., 1, :]  # (..., 2)
    vec = vec * torch.where(orient < 0, -1.0, 1.0).to(vec.dtype).unsqueeze(-2)
    return alpha, lam, basis @ vec


def normalization_columns(
    a: Tensor, r: Tensor, eps: float, centered: bool, generator: Optional[torch.Generator]
) -> tuple[Tensor, Tensor]:
    """The ``+`` and ``-`` columns ``(..., D)`` of ``M`` (module docstring) for slices ``a`` ``(..., D)`` with
    adjoints ``r`` of their normalized values (float64 recommended: the ``2 x 2`` eigenproblems)."""
    alpha, lam, cols = _structure(a, r, eps, centered)
    out = []
    for sign in (1.0, -1.0):
        part = (sign * alpha).clamp_min(0).sqrt()
        xi = rademacher(a, generator)
        col = part * (xi - xi.mean(dim=-1, keepdim=True) if centered else xi)
        weights = (sign * lam).clamp_min(0).sqrt() * rademacher(lam, generator)  # (..., 2)
        out.append(col + (cols * weights.unsqueeze(-2)).sum(dim=-1))
    return out[0], out[1]


def normalization_diagonal(a: Tensor, r: Tensor, eps: float, centered: bool) -> Tensor:
    """The diagonal of ``M`` (module docstring), exactly, ``(..., D)``: ``alpha (1 - 1/D)`` (``alpha`` when
    not centred) plus ``sum_k lam_k cols_k^2``. ``O(numel)``."""
    alpha, lam, cols = _structure(a, r, eps, centered)
    d = a.shape[-1]
    return alpha * ((1.0 - 1.0 / d) if centered else 1.0) + (cols.square() * lam.unsqueeze(-2)).sum(dim=-1)
