r"""Batched damped Newton with a certified duality gap for reduced eq. 17 problems.

All functions work on ``P`` problems of one shape at once (a leading batch dimension):
``S_p(x, y) = sum_ij A_pij e^{x_pi + y_pj} + B_pij e^{-x_pi - y_pj}`` with coefficients scaled to
maximum 1, zero outside the problem's components (see :mod:`._components`), ``m <= n``. The
Newton system is eliminated to the ``m`` rows and Jacobi-scaled,
``(I - Gs Gs^T) z = D^{-1/2} b`` with ``Gs = D_r^{-1/2} G D_c^{-1/2}`` (entries in ``[0, 1]``), and
factored in float32; near the optimum (where the certificate is evaluated) the solve is refined
to float64 accuracy (mixed-precision iterative refinement), so the factorisation, the only
``O(m^2 n)`` step, runs at float32 speed while the certificate keeps float64 accuracy. Problems
whose float32 factor is not accurate enough to refine (very ill-conditioned coupling) are
factored again in float64.

**Large problems** (``m >= _CG_FROM``): the ``O(m^2 n)`` factorisation is replaced by Jacobi-preconditioned
conjugate gradients on the same scaled system, ``O(m n)`` per step (two matrix-vector products
with ``Gs``): to the refinement tolerance ``_REFINE_TOL`` where the certificate may be evaluated
(so the dual point is the one of an exact Newton step, as with the factorisation), to a forcing
term ``_CG_FORCING`` elsewhere (inexact Newton). A system not solved within ``_MAX_CG`` steps takes
the factorisation, so a Newton step costs at most ``_MAX_CG`` matrix-vector pairs more than before.
Measured step counts: ``benchmarks/results/solver_stress_4096.md``.

**Split columns.** Every function takes ``comm``, a :class:`ColumnReduction`: the ``n`` columns may be
split across processes (each holding ``A[:, :, its columns]``, ``y[:, its columns]``), and every
quantity summed or maximised over columns is completed by ``comm`` (an all-reduce), so that all
processes take identical decisions and hold identical row quantities (``x``, values, bounds); column
quantities stay local. The default, :data:`LOCAL`, holds all columns and reduces nothing.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["LOCAL", "BatchResult", "ColumnReduction", "alternating_sweeps", "newton"]

_MAX_SWEEPS = 30  # closed-form alternating sweeps before Newton, at most
_SWEEP_TOL = 1e-7  # ... stopping once no log-variance moves by more than this (nats)
_CG_SWEEP_TOL = 1e-3  # ... or this, before conjugate-gradient Newton (measured: still one Newton step)
_SWEEP_STALL = 0.5  # ... or once a sweep shrinks the largest move by less than this factor (Newton's turn)
_MAX_STEP = 8.0  # largest change of any x_i + y_j per Newton step, in nats (a trust region on exp(.))
_BOUND_FROM = 1e-4  # evaluate the dual bound once the Newton decrement^2 / S is below this
_POLISH_FROM = 1e-2  # refine the float32 Newton solve in float64 once sum g^2 / diag(H) / S is below this
_MAX_HALVINGS = 60  # backtracking steps per line search
_MAX_REFINE = 6  # float64 refinement steps of a float32-factored Newton system
_REFINE_TOL = 1e-13  # residual (relative to the right-hand side) at which refinement stops
_CG_FROM = 256  # rows (the smaller side) from which Newton systems are solved by conjugate gradients
_MAX_CG = 64  # conjugate-gradient steps per Newton system before the factorisation takes over
_CG_FORCING = 1e-3  # relative residual of the inexact (unpolished) conjugate-gradient Newton directions


class ColumnReduction:
    """Completes reductions over the (possibly split) column dimension: this base class holds every
    column, so each method returns its argument. A split implementation all-reduces (sum, max, min)
    over the processes that hold the other columns; inputs are reduced partial results, returned
    reduced (identical on every process)."""

    distributed = False

    def sum(self, *tensors: Tensor) -> list[Tensor]:
        """Sums over columns of several partial results (one all-reduce when split)."""
        return list(tensors)

    def max(self, tensor: Tensor) -> Tensor:
        return tensor

    def min(self, tensor: Tensor) -> Tensor:
        return tensor


LOCAL = ColumnReduction()


def _logsumexp_columns(z: Tensor, comm: ColumnReduction) -> Tensor:
    """``log sum_j exp(z_pij)`` over the (split) last dimension."""
    if not comm.distributed:
        return torch.logsumexp(z, 2)
    top = comm.max(z.amax(dim=2))
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    (total,) = comm.sum(torch.exp(z - top[:, :, None]).sum(dim=2))
    return torch.log(total) + top


class BatchResult(NamedTuple):
    """Per problem: final ``x`` ``(P, m)``, ``y`` ``(P, n)``, value and certified lower bound ``(P,)``,
    and the Newton iterations taken (shared by the batch)."""

    x: Tensor
    y: Tensor
    value: Tensor
    lower: Tensor
    iterations: int


def alternating_sweeps(
    a: Tensor, b: Tensor, comm: ColumnReduction = LOCAL, cg_from: Optional[int] = None
) -> tuple[Tensor, Tensor]:
    """Closed-form block minimisation, ``y`` then ``x``, from 0: a cheap cold start for Newton.

    ``y_j = 1/2 log(sum_i B_ij e^{-x_i} / sum_i A_ij e^{x_i})``, likewise ``x``. Removes gross scale
    mismatches; at most ``_MAX_SWEEPS`` sweeps (four ``O(m n)`` matrix-vector products each),
    stopping when the largest move is below ``_SWEEP_TOL`` or sweeps stall (slow mixing is Newton's
    job: no path runs alternating updates unbounded). Rows and columns without terms stay at 0.
    From ``m >= cg_from`` (Newton by conjugate gradients, whose step costs only a few sweeps'
    worth of passes) the sweeps stop at ``_CG_SWEEP_TOL``.

    Args:
        a, b: ``(P, m, n)`` coefficients, maximum 1 (``n``: this process's columns).
        comm: completes sums over columns (module docstring).
        cg_from: as for :func:`newton` (default ``_CG_FROM``).
    """
    tol = _CG_SWEEP_TOL if a.shape[1] >= (_CG_FROM if cg_from is None else cg_from) else _SWEEP_TOL
    x = a.new_zeros(a.shape[:2])
    y = a.new_zeros(a.shape[0], a.shape[2])
    prev_move = math.inf
    for _ in range(_MAX_SWEEPS):
        y_new = _block_minimiser(a, b, x, over_rows=True, comm=comm)
        x_new = _block_minimiser(a, b, y_new, over_rows=False, comm=comm)
        move = float(torch.maximum((x_new - x).abs().max(), comm.max((y_new - y).abs().max())))
        x, y = x_new, y_new
        if move <= tol or move > _SWEEP_STALL * prev_move:
            break
        prev_move = move
    return x, y


def _block_minimiser(
    a: Tensor, b: Tensor, v: Tensor, over_rows: bool, comm: ColumnReduction = LOCAL
) -> Tensor:
    """Per column (``over_rows``: sums over ``i`` with ``v = x``) or per row (sums over ``j``, ``v = y``):
    ``1/2 log(sum B e^{-v} / sum A e^{v})``, 0 where a sum is empty."""
    hi = v.amax(dim=1, keepdim=True)
    lo = v.amin(dim=1, keepdim=True)
    if not over_rows:  # v = y: extrema over the (split) columns
        hi, lo = comm.max(hi), comm.min(lo)
    ea, eb = torch.exp(v - hi), torch.exp(lo - v)  # terms <= A_ij <= 1: no overflow
    if over_rows:
        sum_a = torch.bmm(ea.unsqueeze(1), a).squeeze(1)
        sum_b = torch.bmm(eb.unsqueeze(1), b).squeeze(1)
    else:
        sum_a, sum_b = comm.sum(
            torch.bmm(a, ea.unsqueeze(2)).squeeze(2), torch.bmm(b, eb.unsqueeze(2)).squeeze(2)
        )
    has = (sum_a > 0) & (sum_b > 0)
    if bool((torch.where(has, torch.minimum(sum_a, sum_b), sum_a.new_ones(())) > 1e-250).all()):
        out = 0.5 * (torch.log(sum_b) - lo - torch.log(sum_a) - hi)
    else:  # a sum underflowed: log-sum-exp (rare, far from the optimum)
        if over_rows:
            vv = v[:, :, None]
            out = 0.5 * (torch.logsumexp(torch.log(b) - vv, 1) - torch.logsumexp(torch.log(a) + vv, 1))
        else:
            vv = v[:, None, :]
            out = 0.5 * (
                _logsumexp_columns(torch.log(b) - vv, comm) - _logsumexp_columns(torch.log(a) + vv, comm)
            )
    return torch.where(has, out, torch.zeros_like(out))


def _exp_factors(
    x: Tensor, y: Tensor, comm: ColumnReduction = LOCAL
) -> Optional[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """``(e^x, e^-x, e^y, e^-y)`` after moving the gauge ``(x - c, y + c)`` to centre ``x``, so that
    ``e^{x_i + y_j} = e^{x_i} e^{y_j}`` needs no ``(m, n)`` exponential; None when a factor would leave
    float64's range (then the caller exponentiates entrywise)."""
    if x.shape[1] == 0 or y.shape[1] == 0:
        return None
    c = 0.5 * (x.amax(dim=1, keepdim=True) + x.amin(dim=1, keepdim=True))
    xs, ys = x - c, y + c
    if bool((xs.abs().amax() > 700) | (comm.max(ys.abs().amax()) > 700)):
        return None
    ex, ey = torch.exp(xs), torch.exp(ys)
    return ex, 1.0 / ex, ey, 1.0 / ey


def _terms(
    a: Tensor, b: Tensor, x: Tensor, y: Tensor, comm: ColumnReduction = LOCAL
) -> tuple[Tensor, Tensor]:
    """``A_ij e^{x_i + y_j}`` and ``B_ij e^{-x_i - y_j}``, ``(P, m, n)``: outer products of vector
    exponentials (a few multiplications per entry), entrywise exponentials only as a fallback."""
    f = _exp_factors(x, y, comm)
    if f is None:
        u = x[:, :, None] + y[:, None, :]
        return a * torch.exp(u), b * torch.exp(-u)
    ex, emx, ey, emy = f
    # the products in place: a fresh large buffer costs more (page faults) than the arithmetic
    return (ex[:, :, None] * ey[:, None, :]).mul_(a), (emx[:, :, None] * emy[:, None, :]).mul_(b)


def _objective(a: Tensor, b: Tensor, x: Tensor, y: Tensor, comm: ColumnReduction = LOCAL) -> Tensor:
    """``S_p(x, y)`` as bilinear forms ``e^x . A e^y + e^-x . B e^-y``: one pass over ``A`` and ``B``."""
    f = _exp_factors(x, y, comm)
    if f is None:
        ta, tb = _terms(a, b, x, y, comm)
        return comm.sum(ta.sum(dim=(1, 2)) + tb.sum(dim=(1, 2)))[0]
    ex, emx, ey, emy = f
    sa = torch.bmm(torch.bmm(ex.unsqueeze(1), a), ey.unsqueeze(2))
    sb = torch.bmm(torch.bmm(emx.unsqueeze(1), b), emy.unsqueeze(2))
    return comm.sum((sa + sb).view(-1))[0]


def newton(
    a: Tensor,
    b: Tensor,
    free: Tensor,
    x: Tensor,
    y: Tensor,
    rtol: float,
    max_iter: int,
    comm: ColumnReduction = LOCAL,
    cg_from: Optional[int] = None,
) -> BatchResult:
    """Damped Newton from ``(x, y)`` on ``P`` reduced problems until each is certified or ``max_iter``.

    Per iteration and problem: about 20 passes over ``(m, n)`` float64 (terms, gradient, Newton
    system, refinement; the certificate and line search are bilinear forms) and ``O(m^2 n)`` float32
    for the Schur complement plus ``O(m^3)`` for its Cholesky factor; from ``m >= cg_from`` instead
    two float64 passes per conjugate-gradient step (at most ``_MAX_CG``, then the factorisation).
    Problems stop individually: the active set shrinks as problems are certified. A problem stops
    uncertified only at ``max_iter`` or when no descent is representable (the rounding floor); the
    caller reads its gap from ``value`` and ``lower``.

    Args:
        a, b: ``(P, m, n)`` float64 coefficients (0 for absent terms), scaled to maximum 1.
        free: ``(P, m)`` bool, the rows whose ``x`` is free (not a component's gauge row, in a component).
        x, y: ``(P, m)``, ``(P, n)`` float64 start points (finite).
        rtol: stop a problem once ``value - lower <= rtol * lower``.
        max_iter: Newton iterations at most.
        comm: completes sums over columns when they are split across processes (``a``, ``b``, ``y``
            hold this process's columns; the returned ``y`` too); see the module docstring.
        cg_from: ``m`` from which the Newton systems are solved by conjugate gradients (``O(m n)`` per
            step, :func:`_conjugate_gradients`) rather than factorised; default ``_CG_FROM``.
    """
    cg_from = _CG_FROM if cg_from is None else cg_from
    num = a.shape[0]
    lower = a.new_zeros(num)
    x, y = x.clone(), y.clone()
    value = _objective(a, b, x, y, comm)
    active = torch.arange(num, device=a.device)
    iterations = 0
    for it in range(1, max_iter + 1):
        if active.numel() == 0:
            break
        iterations = it
        a_a, b_a = (a, b) if active.numel() == num else (a[active], b[active])
        xa, ya, fa = x[active], y[active], free[active]
        ta, tb = _terms(a_a, b_a, xa, ya, comm)
        ra, rb = comm.sum(ta.sum(dim=2), tb.sum(dim=2))
        ca, cb = ta.sum(dim=1), tb.sum(dim=1)
        val = ra.sum(1) + rb.sum(1)
        gx, gy, r, c = ra - rb, ca - cb, ra + rb, ca + cb
        gamma = ta.add_(tb)
        del tb
        tiny = torch.finfo(gamma.dtype).tiny
        # float64-polish the direction only where the certificate may be evaluated: the Jacobi
        # estimate of the Newton decrement, sum g^2 / diag(H), is within a factor of it
        jacobi = (gx * gx / r.clamp_min(tiny)).sum(1) + comm.sum((gy * gy / c.clamp_min(tiny)).sum(1))[0]
        polish = (jacobi <= _POLISH_FROM * val) | (it == max_iter)
        px, py, accurate = _direction(gamma, r, c, gx, gy, fa, polish, comm, cg_from)

        slope = (gx * px).sum(1) + comm.sum((gy * py).sum(1))[0]  # -(Newton decrement^2)
        low = lower[active]
        near = (
            -slope <= _BOUND_FROM * val
        ) & accurate  # (the bound needs max|s| < 1/2; it is tight once lambda^2 << S)
        if it == max_iter:  # the cap: report the best certificate available, at least the separable
            near = accurate  # bound sum_ij 2 sqrt(A_ij B_ij) (each term minimised on its own)
            low = torch.maximum(low, 2.0 * comm.sum(torch.sqrt(a_a * b_a).sum(dim=(1, 2)))[0])
        if bool(near.any()):
            bound = _dual_bound(gamma, r, c, val, gx, gy, px, py, xa, ya, comm)
            low = torch.where(near, torch.maximum(low, bound), low)
        del gamma
        # where the bound was evaluated, the full Newton step (usually exact to rounding) may already
        # close the gap: certify the better of the current and the stepped value
        stepped = torch.full_like(val, math.inf)
        if bool(near.any()):
            if bool(near.all()):  # (no (m, n) copies)
                stepped = _objective(a_a, b_a, xa + px, ya + py, comm)
            else:
                idx = near.nonzero().squeeze(1)
                stepped[idx] = _objective(a_a[idx], b_a[idx], xa[idx] + px[idx], ya[idx] + py[idx], comm)
        take = stepped < val
        best = torch.minimum(val, stepped)
        done = (best - low <= rtol * low) | (val == 0)
        if bool(done.any()):
            idx = done.nonzero().squeeze(1)
            glob, step = active[idx], take[idx].to(val.dtype)[:, None]
            x[glob] = xa[idx] + step * px[idx]
            y[glob] = ya[idx] + step * py[idx]
            value[glob] = best[idx]
            lower[glob] = torch.minimum(low[idx], best[idx])
        go = (~done).nonzero().squeeze(1)
        if go.numel() == 0:
            active = active[go]
            break
        # backtracking (Armijo) line search, the first step capped to a trust region in log-space
        px, py, slope, val, low = px[go], py[go], slope[go], val[go], low[go]
        xa, ya = xa[go], ya[go]
        a_g, b_g = (a_a, b_a) if go.numel() == a_a.shape[0] else (a_a[go], b_a[go])
        s_max = px.abs().amax(1) + comm.max(py.abs().amax(1))
        t = torch.where(s_max > 0, (_MAX_STEP / s_max).clamp(max=1.0), torch.ones_like(s_max))
        accepted = torch.zeros_like(t, dtype=torch.bool)
        vn = val.clone()
        for _ in range(_MAX_HALVINGS):
            pending = ~accepted
            trial = _objective(a_g, b_g, xa + t[:, None] * px, ya + t[:, None] * py, comm)
            ok = (trial <= val + 1e-4 * t * slope) | ((trial <= val * (1 + 4e-16)) & (t == 1.0))
            vn = torch.where(pending & ok, trial, vn)
            accepted |= ok
            if bool(accepted.all()):
                break
            t = torch.where(accepted, t, 0.5 * t)
        glob = active[go]
        step = torch.where(accepted, t, torch.zeros_like(t))
        x[glob] = xa + step[:, None] * px
        y[glob] = ya + step[:, None] * py
        value[glob] = torch.where(accepted, vn, val)
        lower[glob] = low
        # no representable decrease: at the rounding floor, stop (reported by its gap)
        active = glob[accepted]
    return BatchResult(x, y, value, lower, iterations)


def _direction(
    gamma: Tensor,
    r: Tensor,
    c: Tensor,
    gx: Tensor,
    gy: Tensor,
    free: Tensor,
    polish: Tensor,
    comm: ColumnReduction = LOCAL,
    cg_from: int = _CG_FROM,
) -> tuple[Tensor, Tensor, Tensor]:
    """Newton direction of ``P`` problems, ``p_x = 0`` on non-free rows, and whether it is float64-accurate.

    ``polish`` ``(P,)`` selects the problems whose float32 solve is refined to float64 accuracy (those
    near enough to the optimum for the certificate); the others keep the float32 solve, an
    inexact Newton direction that the line search still makes a descent step.

    Solves ``[[diag(r), G], [G^T, diag(c)]] p = -g``: eliminating ``p_y``,
    ``(diag(r) - G diag(1/c) G^T) p_x = -g_x + G (g_y / c)`` on the free rows (a grounded weighted
    graph Laplacian: positive definite), Jacobi-scaled to ``(I - Gs Gs^T) z = rhs`` with
    ``Gs = D_r^{-1/2} G D_c^{-1/2}``, ``p_x = D_r^{-1/2} z``; then ``p_y = -(g_y + G^T p_x) / c``.
    """
    tiny = torch.finfo(gamma.dtype).tiny
    inv_c = torch.where(c > 0, 1.0 / c.clamp_min(tiny), torch.zeros_like(c))
    sqrt_inv_c = torch.sqrt(inv_c)
    fr = free & (r > 0)
    sr = torch.where(fr, torch.rsqrt(r.clamp_min(tiny)), torch.zeros_like(r))
    gs = (sr[:, :, None] * sqrt_inv_c[:, None, :]).mul_(gamma)
    rhs = -gx * sr + comm.sum(torch.bmm(gs, (gy * sqrt_inv_c).unsqueeze(2)).squeeze(2))[0]
    z, accurate = _solve_scaled(gs, rhs, fr, polish, comm, cg_from)
    px = z * sr
    py = -(gy + torch.bmm(z.unsqueeze(1), gs).squeeze(1) * torch.sqrt(c)) * inv_c
    return px, py, accurate


def _gram_complement(gs: Tensor, comm: ColumnReduction) -> Tensor:
    """``I - Gs Gs^T`` ``(P, m, m)`` in the dtype of ``gs``; the product sums over the (split) columns."""
    num, m, _ = gs.shape
    if not comm.distributed:
        eye = torch.eye(m, dtype=gs.dtype, device=gs.device)
        return torch.baddbmm(eye.expand(num, m, m), gs, gs.transpose(1, 2), beta=1.0, alpha=-1.0)
    (gram,) = comm.sum(torch.bmm(gs, gs.transpose(1, 2)))
    gram.neg_().diagonal(dim1=1, dim2=2).add_(1.0)  # in place: one m x m buffer
    return gram


def _solve_scaled(
    gs: Tensor,
    rhs: Tensor,
    free: Tensor,
    polish: Tensor,
    comm: ColumnReduction = LOCAL,
    cg_from: int = _CG_FROM,
) -> tuple[Tensor, Tensor]:
    """Solve ``(I - Gs Gs^T) z = rhs`` (rows of ``Gs`` and ``rhs`` zero outside ``free``, where ``z = 0``);
    also return which solutions are float64-accurate.

    From ``m >= cg_from``: conjugate gradients (:func:`_conjugate_gradients`, ``O(m n)`` per step), to
    ``_REFINE_TOL`` for the ``polish`` problems and to ``_CG_FORCING`` for the others; the problems it
    does not solve within ``_MAX_CG`` steps take the factorisation below (so a step costs at most
    ``_MAX_CG`` matrix-vector pairs more than the factorisation alone). Otherwise a float32
    Cholesky; for the ``polish`` problems float64 iterative refinement, and a float64 Cholesky (then
    least squares) where that does not reach ``_REFINE_TOL``; a float64 Cholesky also wherever the
    float32 one fails.
    """
    num, m, _ = gs.shape
    if m == 0:
        return rhs.clone(), torch.ones_like(polish)
    if m >= cg_from:
        z, solved = _conjugate_gradients(gs, rhs, free, polish, comm)
        if bool(solved.all()):
            return z * free, polish.clone()
        bad = (~solved).nonzero().squeeze(1)
        z_bad, accurate_bad = _solve_scaled(gs[bad], rhs[bad], free[bad], polish[bad], comm, m + 1)
        z[bad] = z_bad
        accurate = polish.clone()
        accurate[bad] = accurate_bad
        return z * free, accurate
    k32 = _gram_complement(gs.to(torch.float32), comm)
    chol, info = torch.linalg.cholesky_ex(k32)
    ok = info == 0
    z = torch.zeros_like(rhs)
    if bool(ok.any()):
        z, converged = _refine(gs, rhs, chol, ok, ok & polish, comm)
        ok = ok & (converged | ~polish)
    accurate = polish.clone()
    if bool((~ok).any()):
        bad = (~ok).nonzero().squeeze(1)
        k = _gram_complement(gs[bad], comm)
        chol64, info64 = torch.linalg.cholesky_ex(k)
        sol = torch.cholesky_solve(rhs[bad].unsqueeze(2), chol64).squeeze(2)
        if bool((info64 != 0).any()):  # numerically semidefinite: least squares is still a descent direction
            fail = (info64 != 0).nonzero().squeeze(1)
            sol[fail] = torch.linalg.lstsq(k[fail], rhs[bad][fail].unsqueeze(2)).solution.squeeze(2)
        z[bad] = sol
        accurate[bad] = True
    return z * free, accurate


def preconditioned_cg(
    matvec: Callable[[Tensor], Tensor],
    rhs: Tensor,
    precondition: Callable[[Tensor], Tensor],
    residual_size: Callable[[Tensor], Tensor],
    tol: Tensor,
    max_steps: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Preconditioned conjugate gradients on ``P`` systems ``M u = rhs`` at once, from ``u = 0``.

    ``matvec`` applies ``M`` and ``precondition`` an approximation of ``M^{-1}`` to ``(P, m)`` vectors;
    a system is solved once ``residual_size(residual) <= tol`` (``(P,)``) for the recurrence's
    residual (callers that need the true residual check it themselves). The flexible (Polak-Ribiere)
    ``beta = r_new . (z_new - z) / (r . z)`` equals the classical one for a fixed linear preconditioner
    in exact arithmetic and stays robust for an inexact one. A system whose curvature ``d . M d`` is
    not positive (numerically semidefinite) is stopped and reported as failed. Cost per step: one
    ``matvec``, one ``precondition`` and a few ``O(P m)`` vector operations; at most ``max_steps``.

    Returns:
        ``(u, solved, failed)``: the iterate and two ``(P,)`` bool masks.
    """
    u = torch.zeros_like(rhs)
    res = rhs
    z = precondition(res)
    d = z
    rz = (res * z).sum(1)
    solved = residual_size(res) <= tol
    failed = torch.zeros_like(solved)
    for _ in range(max_steps):
        if bool((solved | failed).all()):
            break
        q = matvec(d)
        dq = (d * q).sum(1)
        failed |= ~solved & ~(dq > 0)
        alpha = torch.where(solved | failed, torch.zeros_like(dq), rz / dq.where(dq > 0, torch.ones_like(dq)))
        u = u + alpha[:, None] * d
        res_new = res - alpha[:, None] * q
        solved |= residual_size(res_new) <= tol
        z_new = precondition(res_new)
        beta = (res_new * (z_new - z)).sum(1) / rz.where(rz != 0, torch.ones_like(rz))
        d = z_new + beta[:, None] * d
        res, z, rz = res_new, z_new, (res_new * z_new).sum(1)
    return u, solved, failed


def _conjugate_gradients(
    gs: Tensor, rhs: Tensor, free: Tensor, polish: Tensor, comm: ColumnReduction = LOCAL
) -> tuple[Tensor, Tensor]:
    """Jacobi-preconditioned conjugate gradients (:func:`preconditioned_cg`) on ``(I - Gs Gs^T) z = rhs``
    (the scaled Schur system of :func:`_direction`, positive definite on the ``free`` rows), float64;
    and whether each problem reached its tolerance: ``_REFINE_TOL`` (the true residual, checked at the
    end) for the ``polish`` problems, ``_CG_FORCING`` for the others (an inexact Newton direction:
    every CG iterate from 0 is a descent direction), both relative to ``||rhs||_inf``, within
    ``_MAX_CG`` steps.

    Each step is two ``(m, n)`` matrix-vector products (``Gs^T d``, then ``Gs (Gs^T d)``, summed over
    the split columns): ``O(m n)`` against ``O(m^2 n)`` for forming the Schur complement. The
    preconditioner is ``diag(I - Gs Gs^T)^{-1}`` (one more pass). Converges fast when the spectrum of
    ``Gs Gs^T`` below its gauge eigenvalue 1 is bounded away from 1 (dense, well-mixed coupling).
    """
    tiny = torch.finfo(gs.dtype).tiny
    mask = free.to(gs.dtype)
    tol = torch.where(polish, _REFINE_TOL, _CG_FORCING) * rhs.abs().amax(dim=1)
    (row_sq,) = comm.sum(torch.linalg.vector_norm(gs, dim=2).square())
    diag = 1.0 - row_sq
    inv_diag = torch.where(free & (diag > 0), 1.0 / diag.clamp_min(tiny), torch.zeros_like(diag))
    z, solved, failed = preconditioned_cg(
        lambda d: (d - _gram_times(gs, d, comm)) * mask,
        rhs * mask,
        lambda res: inv_diag * res,
        lambda res: res.abs().amax(dim=1),
        tol,
        _MAX_CG,
    )
    # the recurrence's residual drifts from the true one: check the true residual where it matters
    if bool((solved & polish).any()):
        true = _residual(gs, rhs, z, comm) * mask
        solved &= ~polish | (true.abs().amax(dim=1) <= tol)
    return z, solved & ~failed


def _gram_times(gs: Tensor, v: Tensor, comm: ColumnReduction = LOCAL) -> Tensor:
    """``Gs (Gs^T v)`` ``(P, m)``, the product summed over the (split) columns: two passes over ``Gs``."""
    gv = torch.bmm(v.unsqueeze(1), gs)  # (P, 1, n) = v^T Gs
    return comm.sum(torch.bmm(gv, gs.transpose(1, 2)).squeeze(1))[0]


def _residual(gs: Tensor, rhs: Tensor, z: Tensor, comm: ColumnReduction = LOCAL) -> Tensor:
    """``rhs - (I - Gs Gs^T) z`` in float64, ``O(m n)`` per problem."""
    return rhs - z + _gram_times(gs, z, comm)


def _refine(
    gs: Tensor, rhs: Tensor, chol32: Tensor, ok: Tensor, polish: Tensor, comm: ColumnReduction = LOCAL
) -> tuple[Tensor, Tensor]:
    """The float32 solve (0 where not ``ok``), with mixed-precision iterative refinement for the
    ``polish`` problems; and whether each reached a residual of ``_REFINE_TOL`` (times ``||rhs||_inf``)."""
    okf = ok.to(rhs.dtype)[:, None]
    z = torch.cholesky_solve((rhs * okf).to(torch.float32).unsqueeze(2), chol32).squeeze(2).to(rhs.dtype)
    z = torch.nan_to_num(z) * okf
    tol = _REFINE_TOL * rhs.abs().amax(dim=1)
    if not bool(polish.any()):
        return z, torch.zeros_like(ok)
    okf = polish.to(rhs.dtype)[:, None]
    for _ in range(_MAX_REFINE):
        res = _residual(gs, rhs, z, comm) * okf
        converged = res.abs().amax(dim=1) <= tol
        if bool(converged[polish].all()):
            break
        dz = torch.cholesky_solve(res.to(torch.float32).unsqueeze(2), chol32).squeeze(2).to(rhs.dtype)
        z = z + torch.nan_to_num(dz) * okf
    else:
        converged = _residual(gs, rhs, z, comm).abs().amax(dim=1) <= tol
    return z, converged


def _dual_bound(
    gamma: Tensor,
    r: Tensor,
    c: Tensor,
    value: Tensor,
    gx: Tensor,
    gy: Tensor,
    px: Tensor,
    py: Tensor,
    x: Tensor,
    y: Tensor,
    comm: ColumnReduction = LOCAL,
) -> Tensor:
    """Lower bound on ``inf S`` per problem from the Newton-linearised dual point (weighted AM-GM);
    0 where it does not apply (``max |s| >= 1/2``).

    Dual point: ``delta^A = ta (1 + s)``, ``delta^B = tb (1 - s)`` with ``s_ij = px_i + py_j``,
    ``T = sum delta = S + g.p``, ``dhat = delta / T``. AM-GM gives, for every ``(x', y')``,
    ``S(x', y') >= exp(log T - C / T - (x . rowsum(D) + y . colsum(D)) / T)`` with
    ``C = sum ta phi(s) + tb phi(-s)``, ``phi(s) = (1 + s) log(1 + s)``, and ``D T = delta^A - delta^B``,
    whose row and column sums are the Newton system's residuals ``g_x + r p_x + G p_y`` and
    ``g_y + G^T p_x + c p_y`` (zero up to rounding; the term accounts for the rounding at the
    current point). Taylor's theorem with ``|phi'''(s)| <= (1 - s_max)^-2`` bounds
    ``C <= g.p + (1/2 + s_max / (6 (1 - s_max)^2)) p^T H p`` with ``p^T H p = sum gamma s^2 =
    r.px^2 + 2 px.G py + c.py^2`` and ``s_max = max|px| + max|py|``: the bound costs two
    matrix-vector products and no ``(m, n)`` logarithm. Near the optimum it is
    ``S - lambda^2 / 2 + O(lambda^3)``, ``lambda^2 = -g.p`` the Newton decrement squared.
    """
    s_max = px.abs().amax(dim=1) + comm.max(py.abs().amax(dim=1))
    (g_py,) = comm.sum(torch.bmm(gamma, py.unsqueeze(2)).squeeze(2))
    gt_px = torch.bmm(px.unsqueeze(1), gamma).squeeze(1)
    rc = gy + gt_px + c * py  # column residuals of the Newton system (local columns)
    col_quad, col_lin, col_residual = comm.sum((c * py * py).sum(1), (gy * py).sum(1), (y * rc).sum(1))
    quad = (r * px * px).sum(1) + 2 * (px * g_py).sum(1) + col_quad
    lin = (gx * px).sum(1) + col_lin
    total = value + lin
    feasible = (s_max < 0.5) & (total > 0) & (quad >= 0)
    total = torch.where(feasible, total, torch.ones_like(total))
    cross = lin + (0.5 + s_max / (6 * (1 - s_max).square())) * quad
    rr = gx + r * px + g_py
    residual = (x * rr).sum(1) + col_residual
    bound = torch.exp(torch.log(total) - (cross + residual) / total)
    return torch.where(feasible & torch.isfinite(bound), bound, torch.zeros_like(bound))
