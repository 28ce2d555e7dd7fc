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
in the same components, same entries inside them). It extends to a replicate whose single component
lies inside the pooled one (a unit whose curvature came from the left-out slot only, dead in the
replicate): its infimum drops that unit's terms (its variance runs off), and the family "the
unit's terms scaled by ``t``" is smooth down to ``t = 0`` (the unit's optimal variance depends on the
ratio of its ``B`` and ``A`` terms only), so the replicate's objective restricted to its own component
and evaluated at the pooled minimiser is again an achieved value, above the minimum by a term second
order in the change (the dropped terms plus ``A' - A``). A unit that comes alive in a replicate
(outside the pooled component) is not covered: its term ``2 sqrt(A_ij B_ij)`` has infinite slope at
``A_ij = 0``. :func:`linearizable` tells the replicates apart; the others must be solved.

Cost: :func:`linearizable` is :func:`~._components.component_layout` of the ``P`` replicates
(``O(P m n)`` in the usual case); :func:`objective_at_minimiser` one ``(m, n)`` exponential and one
pass over the ``(P, m, n)`` coefficients. No Newton step, no certificate: the values are exact
evaluations of ``S_{A'}`` at a point, not certified minima.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Union

import torch
from torch import Tensor

from lightning_flatness.functional.solvers._components import component_layout, same_layout

__all__ = ["linearizable", "objective_at_minimiser", "streamed_first_order"]


Keep = Union[None, Tensor, tuple[Tensor, Tensor]]


def linearizable(a: Tensor, b: Tensor, a0: Tensor) -> tuple[Tensor, Keep]:
    """Which replicate problems ``(a_p, b)`` the first order covers, and their component entries.

    Covered: the component layout of the pooled ``(a0, b)``, or (pooled problem with one component)
    a single component inside the pooled one.

    Args:
        a: ``(P, m, n)`` non-negative float64 replicate coefficients ``A``.
        b: ``(m, n)`` non-negative float64 ``B``, shared.
        a0: ``(m, n)`` the pooled ``A``.

    Returns:
        ``(P,)`` bool, and each replicate's entries inside its component(s): None when every entry of
        every replicate is (one component with every row and column); with every ``B`` positive (no
        zero weight), the rows ``(P, m)`` and columns ``(P, n)`` with a positive ``A``, whose products
        are the entries (no ``(P, m, n)`` mask); else a ``(P, m, n)`` bool mask.
    """
    if bool((b > 0).all()):
        return _linearizable_positive_b(a, a0)
    return _linearizable_components(a, b, a0)


def _linearizable_positive_b(a: Tensor, a0: Tensor) -> tuple[Tensor, Keep]:
    """:func:`linearizable` with every ``B`` positive: every column reaches every row through ``B``, so
    each problem's component is its rows and columns with a positive ``A`` (the fast path of
    :func:`~._components.component_layout`), one per problem. ``O(P m n)`` boolean reductions."""
    pos = a > 0
    return _covered_positive_b(pos.any(dim=2), pos.any(dim=1), a0)


def _covered_positive_b(rows: Tensor, cols: Tensor, a0: Tensor) -> tuple[Tensor, Keep]:
    """:func:`_linearizable_positive_b` from each replicate's rows ``(P, m)`` and columns ``(P, n)`` with a
    positive ``A``: covered where they lie inside the pooled problem's and are not empty."""
    pos0 = a0 > 0
    rows0, cols0 = pos0.any(dim=1), pos0.any(dim=0)
    covered = (rows & ~rows0).any(dim=1).logical_not() & (cols & ~cols0).any(dim=1).logical_not()
    covered &= rows.any(dim=1)
    if bool(rows.all()) and bool(cols.all()):
        return covered, None
    return covered, (rows, cols)


def _linearizable_components(a: Tensor, b: Tensor, a0: Tensor) -> tuple[Tensor, Keep]:
    """:func:`linearizable` in general: the components of every problem
    (:func:`~._components.component_layout`)."""
    transposed = a.shape[1] > a.shape[2]  # closures cost O(m^2 n): the smaller side as rows
    if transposed:
        a, b, a0 = a.transpose(1, 2), b.T, a0.T
    keep0, free0 = component_layout(a0[None], b[None])
    keep, free = component_layout(a, b[None].expand_as(a))
    covered = same_layout(keep, free, keep0, free0)
    pooled_one = int((~free0 & (keep0.any(dim=2) if keep0 is not None else True)).sum()) == 1
    if keep is not None and pooled_one:
        inside = ((keep0 if keep0 is not None else True) | ~keep).flatten(1).all(dim=1)
        inside &= (keep.any(dim=2) & ~free).sum(dim=1) == 1
        covered |= inside
    if keep is None:
        return covered, None
    return covered, keep.transpose(1, 2) if transposed else keep


def objective_at_minimiser(
    a: Tensor,
    b: Tensor,
    row_log_variance: Tensor,
    col_log_variance: Tensor,
    keep: Keep,
) -> Tensor:
    """``S_{a_p}(x*, y*)`` over each replicate's component entries: ``sum_keep a_p e^(x*+y*) + b e^-(x*+y*)``.

    Args:
        a: ``(P, m, n)`` replicate coefficients ``A`` (covered by :func:`linearizable`).
        b: ``(m, n)`` the shared ``B``.
        row_log_variance, col_log_variance: ``(m,)``, ``(n,)`` the pooled minimiser (NaN outside
            every component), as in
            :class:`~lightning_flatness.functional.solvers.NormalizedSharpnessSolution`.
        keep: each replicate's component entries as :func:`linearizable` gives them: None for all, a
            ``(P, m, n)`` mask, or the rows ``(P, m)`` and columns ``(P, n)`` whose products they are.

    Returns:
        ``(P,)`` float64, an upper bound of each replicate's minimum, equal to it to first order.
    """
    x, y = row_log_variance.nan_to_num(0.0), col_log_variance.nan_to_num(0.0)
    variance = torch.exp(x[:, None] + y[None, :])  # (sigma_i sigma'_j)^2 of the pooled minimiser
    if keep is None:
        return torch.einsum("pmn,mn->p", a, variance) + (b / variance).sum()
    if isinstance(keep, tuple):  # rows (P, m) x columns (P, n): sum_ij r_i c_j (a_ij s_ij + b_ij / s_ij)
        rows, cols = keep
        return (_column_partials(a, b, variance, rows) * cols).sum(dim=1)
    return torch.where(keep, a * variance + b / variance, 0.0).sum(dim=(1, 2))


def _column_partials(a: Tensor, b: Tensor, variance: Tensor, rows: Tensor) -> Tensor:
    """``sum_i rows_pi (a_pij s_ij + b_ij / s_ij)`` ``(P, n)`` over the rows of ``a`` ``(P, m, n)`` (a block
    of rows: the partial sums add up over blocks), ``s = variance``."""
    r = rows.to(a.dtype)
    return torch.einsum("pm,pmn->pn", r, a * variance) + r @ (b / variance)


def streamed_first_order(
    chunks: Iterable[tuple[int, int, Tensor, Any]],
    b: Tensor,
    a0: Tensor,
    row_log_variance: Tensor,
    col_log_variance: Tensor,
    num_components: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`linearizable` and :func:`objective_at_minimiser` for replicates whose ``(P, m, n)`` coefficients
    come as blocks of whole rows and are never held at once (a large weight).

    Per block ``lo:hi`` it keeps only each replicate's rows with a positive ``A`` there, the columns
    seen so far and the column partial sums of its objective at the pooled minimiser: ``O(P (m + n))``
    memory beyond one block.

    - Every ``B`` positive: equal to the in-memory functions on the same coefficients (the same
      operations, summed by blocks of rows).
    - Some ``B`` zero (a zero weight: pruned, or an exact zero of a large random initialisation), where
      the components need the whole matrices in general: a replicate is covered when the pooled problem
      is one component (its rows and columns: those of finite log-variance) and per-block statistics
      prove the replicate's component the same rows and columns (:func:`_covered_zero_b`). It may have
      more ``A`` entries inside it, where the minimum is smooth in ``A``: the first order holds, and the
      objective runs over the pooled rows and columns. The in-memory analysis differs: it also asks for
      the same entries (a replicate that gains an ``A`` entry where ``B = 0`` is solved there) and
      covers units that die (solved here).

    Args:
        chunks: ``(lo, hi, a_block, ...)`` with ``a_block`` ``(P, hi - lo, n)``, in row order, covering every
            row (:func:`~lightning_flatness.functional.replicate_curvature.curvature_chunks`).
        b: ``(m, n)`` the shared ``B``.
        a0: ``(m, n)`` the pooled ``A``.
        row_log_variance, col_log_variance: the pooled minimiser (as for :func:`objective_at_minimiser`).
        num_components: the pooled problem's components (its solution's ``num_components``).

    Returns:
        ``(P,)`` bool covered (as :func:`linearizable`), ``(P,)`` the objective at the pooled minimiser
        over each replicate's component (meaningful where covered), ``(P,)`` each replicate's ``sum A``.
    """
    arcs_b = b > 0
    positive_b = bool(arcs_b.all())
    x, y = row_log_variance.nan_to_num(0.0), col_log_variance.nan_to_num(0.0)
    rows0, cols0 = torch.isfinite(row_log_variance), torch.isfinite(col_log_variance)
    if not positive_b:  # hubs: rows with a B arc from every pooled column, columns with one to every row
        hub_rows = (arcs_b | ~cols0[None, :]).all(dim=1) & rows0
        hub_cols = (arcs_b | ~rows0[:, None]).all(dim=0) & cols0
    rows, cols, partials, sums, checks = [], [], [], [], []
    for lo, hi, a, *_ in chunks:
        pos = a > 0
        rows.append(pos.any(dim=2))
        cols.append(pos.any(dim=1))
        variance = torch.exp(x[lo:hi, None] + y[None, :])
        inside = rows[-1] if positive_b else rows0[lo:hi].expand_as(rows[-1])  # the component's rows
        partials.append(_column_partials(a, b[lo:hi], variance, inside))
        sums.append(a.sum(dim=(1, 2)))
        if not positive_b:
            in_rows, in_cols = rows0[lo:hi, None], cols0[None, :]
            # any A arc; an A arc into the component
            rows[-1] = torch.stack([rows[-1], (pos & in_cols).any(dim=2)])
            cols[-1] = torch.stack([cols[-1], (pos & in_rows).any(dim=1)])
            lost = ((a0[lo:hi] > 0) & in_rows & in_cols & ~pos).flatten(1).any(dim=1)  # a pooled arc gone
            hub = (pos & hub_rows[lo:hi, None] & hub_cols[None, :]).flatten(1).any(dim=1)
            checks.append(torch.stack([lost, hub]))
        if len(partials) > 1:  # O(P n) kept between blocks
            cols[:] = [cols[0] | cols[1]]
            partials[:] = [partials[0] + partials[1]]
            sums[:] = [sums[0] + sums[1]]
            checks[:] = [checks[0] | checks[1]] if checks else []
    if not rows:
        raise ValueError("streamed_first_order got no rows.")
    if positive_b:
        covered, _ = _covered_positive_b(torch.cat(rows, dim=1), cols[0], a0)
        inside_cols = cols[0]
    else:
        covered = _covered_zero_b(torch.cat(rows, dim=-1), cols[0], checks[0], arcs_b, rows0, cols0)
        covered &= num_components == 1
        inside_cols = cols0.expand_as(cols[0][0])
    return covered, (partials[0] * inside_cols.to(partials[0].dtype)).sum(dim=1), sums[0]


def _covered_zero_b(
    rows: Tensor, cols: Tensor, checks: Tensor, arcs_b: Tensor, rows0: Tensor, cols0: Tensor
) -> Tensor:
    """:func:`streamed_first_order`'s test with some ``B`` zero: the replicate's component is the pooled one.

    ``rows`` ``(2, P, m)``: rows with an ``A`` arc, and with one into the pooled columns; ``cols`` likewise
    ``(2, P, n)``; ``checks`` ``(2, P)``: a pooled arc lost, an ``A`` arc between a hub row and a hub column;
    ``arcs_b`` ``(m, n)``: ``B > 0``.

    No row or column outside the pooled component can join (outside it, those with an ``A`` arc have no
    ``B`` arc), every pooled row and column keeps an ``A`` arc within it, and the component stays strongly
    connected: either no pooled arc is lost (the pooled paths remain), or a hub column ``j*`` (``B`` arcs
    to every pooled row) and a hub row ``i*`` (``B`` arcs from every pooled column) with ``A_r[i*, j*] >
    0`` join every row (``i ->A-> j ->B-> i* ->A-> j* ->B-> i``) and every column (through ``i*``).
    """
    rows_b, cols_b = arcs_b.any(dim=1), arcs_b.any(dim=0)
    covered = ((rows[0] & rows_b) == rows0).all(dim=1) & ((cols[0] & cols_b) == cols0).all(dim=1)
    covered &= (rows[1] | ~rows0).all(dim=1) & (cols[1] | ~cols0).all(dim=1)
    return covered & (~checks[0] | checks[1])
