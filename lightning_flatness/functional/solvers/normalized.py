r"""Normalized sharpness of one weight tensor: the minimum of eq. 17, solved exactly.

Eq. 17 gives entry ``W[i, j]`` of a weight tensor the posterior variance
``(sigma_i sigma'_j)^2 = exp(x_i + y_j)`` (one variance per row and one per column, Sec. 5.2) and
minimises, over the log-variances ``x`` (rows) and ``y`` (columns) of eq. 18-19,

.. math::

    S(x, y) = \sum_{i,j} A_{ij} e^{x_i + y_j} + B_{ij} e^{-x_i - y_j},
    \qquad A_{ij} = \sum_k \max(h_{ijk}, 0), \quad B_{ij} = \sum_k \frac{W_{ijk}^2}{2\lambda},

with ``h`` the Hessian diagonal clipped at 0 (Algorithm 1) and ``k`` the kernel positions of a
convolution, which share their channel pair's variance (Sec. 5.3). ``S`` is convex (Appendix B);
this module returns its infimum.

How it is solved (deterministic, certified):

1. **Reduction to attained problems.** Write the entries as arcs of a directed bipartite graph:
   row ``i -> column j`` when ``A_ij > 0`` and ``column j -> row i`` when ``B_ij > 0``. A direction
   ``(dx, dy)`` along which no term grows is a potential ``p(row i) = dx_i``,
   ``p(column j) = -dy_j`` that never decreases along an arc; it is constant on every cycle, and
   numbering the strongly connected components in topological order gives one that strictly
   increases along every arc between components. So exactly the terms between components can
   be driven to 0, the infimum is the sum over components of the minimum of ``S`` restricted to
   the entries inside each, and each of these minima is attained (its only flat direction is the
   gauge ``x + t, y - t``). This covers dead units (a row with ``h = 0`` or ``W = 0``), pruned
   weights and blocks of clipped curvature, without overflow: variables that run off to infinity
   are never iterated. Components come from a boolean transitive closure by repeated squaring
   (``O(min(m, n)^2 max(m, n) log d)`` for graph diameter ``d``; skipped when ``W`` or ``h`` has no
   zero channel pair, the usual case).
2. **Damped Newton** on the reduced problem in log-space, started from closed-form alternating
   sweeps ``x_i = 1/2 log(sum_j B_ij e^{-y_j} / sum_j A_ij e^{y_j})`` (likewise ``y``; stopped when
   they stall), which remove gross scale mismatches. The Hessian is ``[[diag(r), G], [G^T,
   diag(c)]]`` with ``G_ij = A_ij e^{x_i+y_j} + B_ij e^{-x_i-y_j}`` (eq. 49-55); one row per
   component is held fixed (the gauge) and the diagonal block of the larger side is eliminated,
   so each step is a Cholesky solve of size ``min(m, n)``. A backtracking line search, with each
   ``x_i + y_j`` moving at most 8 nats per step, keeps every step a descent step.
3. **Certificate.** Each Newton step near the optimum also yields a lower bound: with the
   linearised terms at the Newton point, ``delta_ij^A = A_ij e^{x_i+y_j} (1 + s_ij)`` and
   ``delta_ij^B = B_ij e^{-x_i-y_j} (1 - s_ij)`` (``s_ij = dx_i + dy_j``) make ``delta^A - delta^B``
   have zero row and column sums (up to the rounding of the Cholesky solve), so the weighted
   AM-GM inequality gives ``S(x', y') >= prod_k (c_k / d_k)^{d_k}`` for every ``(x', y')``
   (``d = delta / sum(delta)``, a feasible point of the dual geometric program). The solver stops
   when ``upper - lower <= rtol * lower`` and returns the value after that last Newton step, so
   the result is typically exact to rounding (about ``1e-15`` relative). On random WRN-sized
   layers this takes a handful of sweeps and one Newton step.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_flatness.functional.solvers.matrix_normalized import _float64, _result_dtype, _to_result

__all__ = [
    "NormalizedSharpnessSolution",
    "normalized_sharpness",
    "normalized_sharpness_coefficients",
    "solve_normalized_sharpness",
]

_MAX_SWEEPS = 30  # closed-form alternating sweeps before Newton, at most
_SWEEP_TOL = 1e-7  # ... stopping once no log-variance moves by more than this (nats)
_SWEEP_STALL = 0.5  # ... or once a sweep shrinks the largest move by less than this factor (Newton's turn)
_MAX_STEP = 8.0  # largest change of any x_i + y_j per Newton step, in nats (a trust region on exp(.))
_BOUND_FROM = 1e-4  # evaluate the dual bound once the Newton decrement^2 / S is below this


class NormalizedSharpnessSolution(NamedTuple):
    """Result of :func:`solve_normalized_sharpness`: float64, on the input's device (the CPU for MPS).

    Attributes:
        value: the infimum of eq. 17 (an achieved value of the reduced objective, an upper bound).
        lower_bound: a certified lower bound (dual of the geometric program); ``value - lower_bound
            <= rtol * lower_bound`` on success.
        row_log_variance: ``(m,)`` ``x_i = log sigma_i^2`` of one minimiser of the reduced problem;
            NaN for rows outside every component (their variance runs to 0 or infinity).
        col_log_variance: ``(n,)`` ``y_j = log sigma'_j^2``, likewise.
        num_components: strongly connected components with at least one entry. Each has its own
            free shift ``(x + t, y - t)``; the variances of different components are not comparable.
        attained: whether the minimum of the full problem is attained (no term had to be driven to
            0 and every row and column with entries belongs to one component).
        iterations: Newton iterations taken.
    """

    value: Tensor
    lower_bound: Tensor
    row_log_variance: Tensor
    col_log_variance: Tensor
    num_components: int
    attained: bool
    iterations: int


def normalized_sharpness_coefficients(
    weight: Tensor, hessian_diagonal: Tensor, lam: float = 0.5
) -> tuple[Tensor, Tensor]:
    r"""The ``(m, n)`` coefficient matrices of eq. 17 for one weight tensor, in float64.

    ``A_ij = sum_k max(h_ijk, 0)`` (Algorithm 1's clipping) and ``B_ij = sum_k W_ijk^2 / (2 lam)``,
    ``k`` running over the trailing (kernel) dimensions. Cost ``O(numel)``.

    Args:
        weight: ``(m, n, *kernel)`` weight tensor, dim 0 rows / output channels, dim 1 columns /
            input channels.
        hessian_diagonal: the Hessian diagonal with the same shape (unclipped).
        lam: the PAC-Bayes ``lambda > 0``.

    Returns:
        ``(A, B)``, each ``(m, n)`` float64.

    Example:
        >>> import torch
        >>> A, B = normalized_sharpness_coefficients(torch.ones(2, 3, 5), torch.full((2, 3, 5), -1.0))
        >>> A.sum().item(), B[0, 0].item()
        (0.0, 5.0)
    """
    _check_inputs(weight, hessian_diagonal, lam)
    w, h = _float64(weight), _float64(hessian_diagonal)
    m, n, k = w.shape[0], w.shape[1], math.prod(w.shape[2:])
    a = h.clamp_min(0).reshape(m, n, k).sum(dim=2)
    b = w.square().reshape(m, n, k).sum(dim=2) / (2.0 * lam)
    return a, b


def normalized_sharpness(
    weight: Tensor,
    hessian_diagonal: Tensor,
    lam: float = 0.5,
    *,
    rtol: float = 1e-11,
    max_iter: int = 100,
) -> Tensor:
    r"""Normalized sharpness of one weight tensor: the minimum value of eq. 17.

    .. math::

        \min_{\sigma, \sigma'} \sum_{i,j} h_{ij} (\sigma_i \sigma'_j)^2
        + \frac{W_{ij}^2}{2 \lambda (\sigma_i \sigma'_j)^2}

    with one variance per row (output channel) and per column (input channel), kernel dimensions
    sharing their channel pair's variance (Sec. 5.3), negative ``h`` clipped to 0 (Algorithm 1).
    Solved deterministically in float64 (reduction to strongly connected components, then damped
    Newton with a certified duality gap; see the module docstring), not by gradient descent.
    Rows or columns with all-zero curvature or weights, and clipped entries that make the
    infimum unattained, contribute their infimum exactly, without overflow.

    Properties: invariant to scaling row ``i`` of ``W`` by ``alpha`` and row ``i`` of ``h`` by
    ``alpha^-2`` (likewise columns; Sec. 5.1); scales as ``lam ** -0.5`` (Sec. 5.3); lies between the
    per-parameter optimum ``sum_ij 2 sqrt(A_ij B_ij)`` and the single-variance value
    ``sqrt(2 / lam) * matrix_normalized_sharpness(W, h)`` (eq. 12); a ``1 x 1`` tensor gives
    ``2 |w| sqrt(max(h, 0) / (2 lam))``. Not differentiable (inputs are detached).

    Cost: ``O(numel)`` to form the coefficients, ``O(m n)`` per alternating sweep (at most 30), and
    per Newton iteration ``O(m n min(m, n))`` (a Schur complement and its Cholesky factor); on
    random layers one Newton iteration, at most a few dozen when an optimum lies very far out
    (nearly decoupled blocks). All 17 weight tensors of a WRN-16-4 (2.7 M weights) take about
    0.07 s on one CPU core (``benchmarks/bench_solver.py``). Memory: a few ``(m, n)`` float64
    matrices and one ``(min(m, n), min(m, n))``.

    Args:
        weight: ``(m, n, *kernel)`` weight tensor (``ndim >= 2``).
        hessian_diagonal: its Hessian diagonal, same shape, unclipped.
        lam: the PAC-Bayes ``lambda > 0`` (the paper uses 1/2).
        rtol: certified relative accuracy of the value (duality gap over lower bound).
        max_iter: Newton iterations before giving up with a warning.

    Returns:
        0-dim tensor in the floating dtype of the inputs (float64 inputs: ``promote_types``),
        on the input's device.

    Example:
        >>> import torch
        >>> w, h = torch.tensor([[3.0]]), torch.tensor([[2.0]])
        >>> normalized_sharpness(w, h, lam=0.5)  # 2 |w| sqrt(h / (2 lam)) = 6 sqrt(2)
        tensor(8.4853)
        >>> w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
        >>> h = torch.rand(8, 4, 3, 3, dtype=torch.float64)
        >>> alpha = torch.rand(8, 1, 1, 1, dtype=torch.float64) + 0.5  # rescale rows (Sec. 5.1)
        >>> s1 = normalized_sharpness(w, h)
        >>> s2 = normalized_sharpness(w * alpha, h / alpha**2)
        >>> bool(torch.isclose(s1, s2, rtol=1e-10))
        True
    """
    dtype = _result_dtype(weight, hessian_diagonal)
    sol = solve_normalized_sharpness(weight, hessian_diagonal, lam, rtol=rtol, max_iter=max_iter)
    return _to_result(sol.value, dtype, weight)


def solve_normalized_sharpness(
    weight: Tensor,
    hessian_diagonal: Tensor,
    lam: float = 0.5,
    *,
    rtol: float = 1e-11,
    max_iter: int = 100,
) -> NormalizedSharpnessSolution:
    r"""Solve eq. 17 for one weight tensor and return the value, certificate and log-variances.

    Same problem, arguments and cost as :func:`normalized_sharpness`, which returns only
    ``value`` (cast to the input dtype).

    Returns:
        :class:`NormalizedSharpnessSolution` in float64.

    Example:
        >>> import torch
        >>> w = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
        >>> h = torch.tensor([[1.0, -1.0], [0.5, 2.0]], dtype=torch.float64)  # h[0, 1] clipped
        >>> sol = solve_normalized_sharpness(w, h)
        >>> bool(sol.value - sol.lower_bound <= 1e-11 * sol.lower_bound), sol.attained
        (True, True)
    """
    if not (rtol > 0 and math.isfinite(rtol)):
        raise ValueError(f"rtol must be a positive finite number, got {rtol!r}.")
    a, b = normalized_sharpness_coefficients(weight, hessian_diagonal, lam)
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        raise ValueError("normalized_sharpness got non-finite weights or Hessian diagonal (NaN/inf, or an "
                         "overflow of W^2 / h summed over the kernel); check the curvature estimate.")
    transposed = a.shape[0] > a.shape[1]
    if transposed:  # the Newton system is solved on the smaller side
        a, b = a.T, b.T
    m, n = a.shape
    x_out = torch.full((m,), float("nan"), dtype=torch.float64, device=a.device)
    y_out = torch.full((n,), float("nan"), dtype=torch.float64, device=a.device)
    zero = torch.zeros((), dtype=torch.float64, device=a.device)

    keep, rep = _component_mask(a > 0, b > 0)
    # the minimum is attained iff no positive term lies outside the components (none must vanish)
    attained = not bool((((a > 0) | (b > 0)) & ~keep).any())
    rows = keep.any(dim=1).nonzero().squeeze(1)
    cols = keep.any(dim=0).nonzero().squeeze(1)
    if rows.numel() == 0:
        return _finish(NormalizedSharpnessSolution(zero, zero, x_out, y_out, 0, attained, 0), transposed)
    keep = keep[rows][:, cols]
    a, b, rep = a[rows][:, cols], b[rows][:, cols], rep[rows]
    a = torch.where(keep, a, torch.zeros_like(a))
    b = torch.where(keep, b, torch.zeros_like(b))
    scale_a, scale_b = a.max(), b.max()
    log_a = torch.log(a) - torch.log(scale_a)  # -inf where a == 0; finite for every positive float64
    log_b = torch.log(b) - torch.log(scale_b)
    representative = rep == rows  # one fixed row per component (gauge)
    free = (~representative).nonzero().squeeze(1)
    num_components = int(representative.sum())

    x, y, value, lower, iters = _newton(log_a, log_b, free, rtol, max_iter)

    factor = torch.sqrt(scale_a * scale_b)  # S(A, B) = sqrt(ab) S(A/a, B/b) with x shifted by log(b/a)/2
    x_out[rows] = x + 0.5 * torch.log(scale_b / scale_a)
    y_out[cols] = y
    sol = NormalizedSharpnessSolution(value * factor, lower * factor, x_out, y_out, num_components,
                                      attained, iters)
    return _finish(sol, transposed)


def _finish(sol: NormalizedSharpnessSolution, transposed: bool) -> NormalizedSharpnessSolution:
    if transposed:
        sol = sol._replace(row_log_variance=sol.col_log_variance, col_log_variance=sol.row_log_variance)
    return sol


def _check_inputs(weight: Tensor, hessian_diagonal: Tensor, lam: float) -> None:
    if weight.ndim < 2:
        raise ValueError(f"normalized sharpness needs a weight tensor with ndim >= 2 (rows x columns), got "
                         f"shape {tuple(weight.shape)}; biases and other 1-D parameters are left out "
                         f"(footnote 5), or reshape to (n, 1) for one variance per entry.")
    if hessian_diagonal.shape != weight.shape:
        raise ValueError(f"Hessian diagonal has shape {tuple(hessian_diagonal.shape)} but the weight has "
                         f"{tuple(weight.shape)}; pass the diagonal of this weight tensor.")
    if not (lam > 0 and math.isfinite(lam)):
        raise ValueError(f"lam must be a positive finite number (the paper uses 0.5), got {lam!r}.")


def _component_mask(pos_a: Tensor, pos_b: Tensor) -> tuple[Tensor, Tensor]:
    """Entries inside a strongly connected component of the arc graph, and each row's component.

    Arcs: row i -> column j where ``A_ij > 0``, column j -> row i where ``B_ij > 0``. Returns
    ``keep`` ``(m, n)`` (row i and column j in the same component) and ``rep`` ``(m,)`` (the smallest
    row index of row i's component). Boolean matrix products in float32 (counts are thresholded
    at 0, so rounding cannot matter).
    """
    m, n = pos_a.shape
    arange = torch.arange(m, device=pos_a.device)
    if bool(pos_b.all()) or bool(pos_a.all()):
        # every column reaches every row (or vice versa): one component of the rows and columns
        # that have an arc of the other kind
        other = pos_a if bool(pos_b.all()) else pos_b
        keep = other.any(dim=1, keepdim=True) & other.any(dim=0, keepdim=True)
        first = keep.any(dim=1).nonzero()
        rep = torch.where(keep.any(dim=1), first[0, 0] if first.numel() else 0, arange)
        return keep, rep
    fa, fb = pos_a.to(torch.float32), pos_b.to(torch.float32)
    reach = (fa @ fb.T > 0) | torch.eye(m, dtype=torch.bool, device=pos_a.device)  # row -> col -> row
    while True:  # reflexive-transitive closure by squaring: log2(diameter) products
        r = reach.to(torch.float32)
        nxt = r @ r > 0
        if torch.equal(nxt, reach):
            break
        reach = nxt
    r = reach.to(torch.float32)
    row_to_col = r @ fa > 0  # row i ->* row k -> column j
    col_to_row = fb.T @ r > 0  # column j -> row k ->* row i
    keep = row_to_col & col_to_row.T
    mutual = reach & reach.T
    rep = mutual.to(torch.float32).argmax(dim=1)  # first row of the component
    return keep, rep


def _alternating_sweeps(log_a: Tensor, log_b: Tensor) -> tuple[Tensor, Tensor]:
    """Closed-form block minimisation, ``y`` then ``x``, from 0: a cheap start for Newton.

    ``y_j = 1/2 log(sum_i B_ij e^{-x_i} / sum_i A_ij e^{x_i})``, likewise ``x``. Each sweep moves every
    variable to its exact block optimum, which removes gross scale mismatches that would cost
    Newton many damped steps, and on well-mixed problems converges linearly and fast. Sums are
    matrix-vector products with the exponentials shifted by their extreme (no overflow); a sum
    that underflows switches that sweep to log-sum-exp. Stops after ``_MAX_SWEEPS``, when the
    largest move is below ``_SWEEP_TOL`` or when sweeps stall (unattained-like slow mixing).
    """
    a, b = torch.exp(log_a), torch.exp(log_b)
    x = torch.zeros(log_a.shape[0], dtype=log_a.dtype, device=log_a.device)
    y = torch.zeros(log_a.shape[1], dtype=log_a.dtype, device=log_a.device)
    prev_move = math.inf
    for _ in range(_MAX_SWEEPS):
        y_new = _block_minimiser(a.T, b.T, log_a.T, log_b.T, x)
        x_new = _block_minimiser(a, b, log_a, log_b, y_new)
        move = float(torch.maximum((x_new - x).abs().max(), (y_new - y).abs().max()))
        x, y = x_new, y_new
        if move <= _SWEEP_TOL or move > _SWEEP_STALL * prev_move:
            break
        prev_move = move
    return x, y


def _block_minimiser(a: Tensor, b: Tensor, log_a: Tensor, log_b: Tensor, v: Tensor) -> Tensor:
    """``1/2 log(sum_j B_ij e^{-v_j} / sum_j A_ij e^{v_j})`` for every row i."""
    hi, lo = v.max(), v.min()
    sum_a = a @ torch.exp(v - hi)  # = e^{-hi} sum_j A_ij e^{v_j}, terms <= A_ij <= 1
    sum_b = b @ torch.exp(lo - v)  # = e^{lo} sum_j B_ij e^{-v_j}
    if bool(torch.minimum(sum_a.min(), sum_b.min()) > 1e-250):
        return 0.5 * (torch.log(sum_b) - lo - torch.log(sum_a) - hi)
    return 0.5 * (torch.logsumexp(log_b - v[None, :], 1) - torch.logsumexp(log_a + v[None, :], 1))


def _terms(log_a: Tensor, log_b: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    u = x[:, None] + y[None, :]
    return torch.exp(log_a + u), torch.exp(log_b - u)


def _objective(log_a: Tensor, log_b: Tensor, x: Tensor, y: Tensor) -> Tensor:
    ta, tb = _terms(log_a, log_b, x, y)
    return ta.sum() + tb.sum()


def _newton(log_a: Tensor, log_b: Tensor, free: Tensor, rtol: float, max_iter: int):
    """Damped Newton with a gauge fix and a duality-gap stop on a reduced (attained) problem.

    Every row and column of ``log_a`` / ``log_b`` has at least one finite entry in each (it lies on
    a cycle of its component), so the alternating updates and the Schur complement are defined.
    """
    m, n = log_a.shape
    x, y = _alternating_sweeps(log_a, log_b)

    best_value = None
    it = 0
    lower = torch.zeros((), dtype=log_a.dtype, device=log_a.device)
    for it in range(1, max_iter + 1):
        ta, tb = _terms(log_a, log_b, x, y)
        value = ta.sum() + tb.sum()
        d = ta - tb
        gx, gy = d.sum(dim=1), d.sum(dim=0)
        gamma = ta + tb
        tiny = torch.finfo(gamma.dtype).tiny  # guards an underflowed row/column far from the optimum
        r, c = gamma.sum(dim=1).clamp_min(tiny), gamma.sum(dim=0).clamp_min(tiny)
        px, py = _newton_direction(gamma, r, c, gx, gy, free)

        decrement = -(gx @ px + gy @ py)  # Newton decrement squared: about twice the suboptimality
        if bool(decrement <= _BOUND_FROM * value):
            bound = _dual_bound(ta, tb, value, px, py, x, y)
            if bound is not None:
                lower = torch.maximum(lower, bound)
        if value - lower <= rtol * lower:  # certified; the full Newton step is usually exact to rounding
            xn, yn = x + px, y + py
            vn = _objective(log_a, log_b, xn, yn)
            if bool(vn < value):
                return xn, yn, vn, torch.minimum(lower, vn), it
            return x, y, value, torch.minimum(lower, value), it

        # backtracking (Armijo) line search, first step capped to a trust region in log-space
        slope = gx @ px + gy @ py
        s_max = float((px.abs().max() if m else 0.0) + (py.abs().max() if n else 0.0))
        t = min(1.0, _MAX_STEP / s_max) if s_max > 0 else 1.0
        accepted = False
        for _ in range(60):
            xn, yn = x + t * px, y + t * py
            vn = _objective(log_a, log_b, xn, yn)
            if bool(vn <= value + 1e-4 * t * slope) or bool(vn <= value * (1 + 4e-16)) and t == 1.0:
                accepted = True
                break
            t *= 0.5
        if not accepted:  # no decrease representable: at the rounding floor
            break
        x, y = xn, yn
        best_value = vn
    if best_value is None:
        best_value = _objective(log_a, log_b, x, y)
    gap = float((best_value - lower) / lower) if lower > 0 else float("inf")
    if gap > rtol:
        warnings.warn(f"normalized_sharpness stopped after {it} Newton iterations with a certified relative "
                      f"gap of {gap:.2e} > rtol={rtol:.1e}; the value is an upper bound. Increase max_iter "
                      f"or rtol.",
                      RuntimeWarning, stacklevel=3)
    return x, y, best_value, lower, it


def _newton_direction(
    gamma: Tensor, r: Tensor, c: Tensor, gx: Tensor, gy: Tensor, free: Tensor
) -> tuple[Tensor, Tensor]:
    """Solve ``[[diag(r), G], [G^T, diag(c)]] p = -g`` with ``p_x`` fixed to 0 on component representatives.

    Eliminating ``p_y``: ``(diag(r_F) - G_F diag(1/c) G_F^T) p_F = -g_F + G_F (g_y / c)``, positive
    definite (a grounded weighted graph Laplacian); then ``p_y = -(g_y + G_F^T p_F) / c``.
    """
    px = torch.zeros_like(r)
    if free.numel():
        g_f = gamma[free]
        g_fc = g_f / c
        k = torch.diag(r[free]) - g_fc @ g_f.T
        rhs = -gx[free] + g_fc @ gy
        chol, info = torch.linalg.cholesky_ex(k)
        if int(info) == 0:
            sol = torch.cholesky_solve(rhs[:, None], chol).squeeze(1)
        else:  # numerically semidefinite (very weak links): least squares is still a descent direction
            sol = torch.linalg.lstsq(k, rhs[:, None]).solution.squeeze(1)
        px[free] = sol
    py = -(gy + gamma.T @ px) / c
    return px, py


def _dual_bound(ta: Tensor, tb: Tensor, value: Tensor, px: Tensor, py: Tensor, x: Tensor, y: Tensor):
    """Lower bound on ``inf S`` from the Newton-linearised dual point (weighted AM-GM), or None.

    ``delta^A = ta (1 + s)``, ``delta^B = tb (1 - s)`` with ``s_ij = px_i + py_j``; then
    ``log L = log(value) + log(sum delta / value) - sum dhat^A log1p(s) - sum dhat^B log1p(-s)
    - (x . rowsum(D) + y . colsum(D))``, ``D = dhat^A - dhat^B`` (zero up to the solve's residual).
    """
    s = px[:, None] + py[None, :]
    pa, pb = ta > 0, tb > 0
    if bool((pa & (s <= -1)).any()) or bool((pb & (s >= 1)).any()):
        return None
    da = ta * (1 + s)
    db = tb * (1 - s)
    total = da.sum() + db.sum()
    if not bool(total > 0):
        return None
    da, db = da / total, db / total
    la = torch.where(pa, torch.log1p(s), torch.zeros_like(s))
    lb = torch.where(pb, torch.log1p(-s), torch.zeros_like(s))
    dd = da - db
    residual = x @ dd.sum(dim=1) + y @ dd.sum(dim=0)
    log_ratio = torch.log(total / value) - (da * la).sum() - (db * lb).sum() - residual
    return value * torch.exp(log_ratio)
