r"""Jackknife replicates of eq. 17 to first order: each replicate's objective at the pooled minimiser.

For coefficients ``A`` (the clipped curvature, summed over the kernel) and a fixed ``B`` (the squared
weights over ``2 lambda``), the minimum of eq. 17

.. math::

    V(A) = \inf_{x, y} S_A(x, y), \qquad S_A(x, y) = \sum_{ij} A_{ij} e^{x_i + y_j} + B_{ij} e^{-x_i - y_j}

is concave in ``A`` (an infimum of functions affine in ``A``), and where its minimiser ``(x*, y*)``
is attained on the components of the problem (:mod:`._components`), Danskin's theorem gives its
gradient ``dV / dA_ij = exp(x*_i + y*_j)`` on the entries inside a component and 0 on the terms
driven to 0 between them (the gauge ``x + t, y - t`` leaves ``x_i + y_j`` unchanged). A jackknife
replicate ``A'`` close to the pooled ``A`` with the same ``B`` therefore has, to first order,

.. math::

    V_{\mathrm{lin}}(A') = S_{A'}(x^*, y^*)
    = V(A) + \sum_{ij \in \mathrm{keep}} (A'_{ij} - A_{ij}) e^{x^*_i + y^*_j},

the replicate's objective at the pooled minimiser: an achieved value, hence an upper bound of
``V(A')`` (as concavity also says), above it by about half the replicate's squared Newton decrement
at ``(x*, y*)``, i.e. second order in ``A' - A``. Standard errors from these values are the
infinitesimal jackknife of the jackknife literature (Jaeckel 1972; Efron 1982, ch. 6): the
delta method with the exact gradient.

This holds where the replicate has the pooled problem's component layout (same rows and columns
in the same components, same entries inside them). Elsewhere ``V`` is not differentiable along
the replicate's direction: a unit that comes alive in a replicate adds a term ``2 sqrt(A_ij B_ij)``
with infinite slope at ``A_ij = 0``, and a unit that dies changes ``A`` by 100% on its row. Such
replicates are found by :func:`linearizable` and must be solved.

Cost: :func:`linearizable` is :func:`~._components.component_layout` of the ``P`` replicates
(``O(P m n)`` in the usual case); :func:`objective_at_minimiser` one ``(m, n)`` exponential and one
pass over the ``(P, m, n)`` coefficients. No Newton step, no certificate: the values are exact
evaluations of ``S_{A'}`` at a point, not certified minima.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_flatness.functional.solvers._components import component_layout, same_layout

__all__ = ["linearizable", "objective_at_minimiser"]


def linearizable(a: Tensor, b: Tensor, a0: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """Which replicate problems ``(a_p, b)`` have the component layout of the pooled ``(a0, b)``.

    Args:
        a: ``(P, m, n)`` non-negative float64 replicate coefficients ``A``.
        b: ``(m, n)`` non-negative float64 ``B``, shared.
        a0: ``(m, n)`` the pooled ``A``.

    Returns:
        ``(P,)`` bool, and the pooled problem's entries inside a component, ``(m, n)`` bool (None when
        every entry is: one component with every row and column, the usual case).
    """
    transposed = a.shape[1] > a.shape[2]  # closures cost O(m^2 n): the smaller side as rows
    if transposed:
        a, b, a0 = a.transpose(1, 2), b.T, a0.T
    keep0, free0 = component_layout(a0[None], b[None])
    keep, free = component_layout(a, b[None].expand_as(a))
    same = same_layout(keep, free, keep0, free0)
    if keep0 is None:
        return same, None
    return same, keep0[0].T if transposed else keep0[0]


def objective_at_minimiser(
    a: Tensor,
    a0: Tensor,
    value0: Tensor,
    row_log_variance: Tensor,
    col_log_variance: Tensor,
    keep0: Optional[Tensor],
) -> Tensor:
    """``S_{a_p}(x*, y*) = V(a0) + sum_{keep0} (a_p - a0) exp(x*_i + y*_j)`` for each replicate ``p``.

    Args:
        a: ``(P, m, n)`` replicate coefficients ``A`` (each with the layout of ``a0``:
            :func:`linearizable`).
        a0: ``(m, n)`` the pooled ``A``.
        value0: the pooled minimum ``V(a0)``.
        row_log_variance, col_log_variance: ``(m,)``, ``(n,)`` the pooled minimiser (NaN outside
            every component), as in
            :class:`~lightning_flatness.functional.solvers.NormalizedSharpnessSolution`.
        keep0: the pooled entries inside a component (:func:`linearizable`), or None for all.

    Returns:
        ``(P,)`` float64, an upper bound of each replicate's minimum, equal to it to first order.
    """
    x, y = row_log_variance.nan_to_num(0.0), col_log_variance.nan_to_num(0.0)
    variance = torch.exp(x[:, None] + y[None, :])  # (sigma_i sigma'_j)^2 of the pooled minimiser
    if keep0 is not None:
        variance = variance.masked_fill(~keep0, 0.0)
    return value0 + torch.einsum("pmn,mn->p", a - a0, variance)
