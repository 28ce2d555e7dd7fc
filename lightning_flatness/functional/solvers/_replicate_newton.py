r"""Newton iterations for replicate eq. 17 problems near a solved one: no factorisation of their own.

The jackknife replicates of a tensor (leave-one-out and half-sample means) have coefficients
``A_p`` close to the pooled ``A_0`` (the same ``B``), so their optima lie ``O(1/sqrt(n))`` from the
pooled optimum ``(x_0, y_0)`` and their Newton systems are close to the pooled one. Starting every
replicate at ``(x_0, y_0)``, this module takes **exact** Newton steps (the direction solved to float64
accuracy, so the dual point of :func:`._newton._dual_bound` is feasible) without factorising
any replicate's system: each system is solved by preconditioned conjugate gradients with the
float32 Cholesky factor of the *pooled* system at ``(x_0, y_0)`` as the preconditioner (flexible,
Polak-Ribiere form, robust to a float32 preconditioner). Per iteration and problem this costs
``O(m n)`` float64 passes (about 12 plus two per CG step) and ``O(m^2)`` triangular solves per CG
step; the one ``O(m^2 n)`` factorisation is shared by all replicates. Near the pooled optimum
Newton converges quadratically: one or two iterations certify a replicate, with the dual bound
evaluated to fourth order in the step (:func:`_series_dual_bound`).

Uses the private helpers ``_terms``, ``_objective``, ``BatchResult``, ``_REFINE_TOL``,
``_MAX_HALVINGS`` and the conjugate-gradient loop ``preconditioned_cg`` of :mod:`._newton`.

Same conventions as :mod:`._newton`: ``P`` problems over a leading dimension, coefficients scaled
(the replicates with the pooled problem's scales), ``m <= n``, zero outside the components, which
are the pooled problem's (the caller checks; other problems take the general solver).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from lightning_flatness.functional.solvers._newton import (
    _MAX_HALVINGS,
    _REFINE_TOL,
    BatchResult,
    _objective,
    _terms,
    preconditioned_cg,
)

__all__ = ["replicate_newton"]

_MAX_CG = 40  # conjugate-gradient steps per Newton system (unsolved problems go to the general solver)


def replicate_newton(
    a: Tensor,
    b: Tensor,
    a0: Tensor,
    free: Tensor,
    x0: Tensor,
    y0: Tensor,
    rtol: float,
    max_iter: int,
    b0: Optional[Tensor] = None,
    free0: Optional[Tensor] = None,
) -> tuple[BatchResult, Tensor]:
    """Certified Newton from the pooled optimum for ``P`` replicate problems.

    Args:
        a: ``(P, m, n)`` float64 replicate coefficients, scaled with the pooled problem's scale.
        b: ``(m, n)`` float64, shared, scaled likewise, or ``(P, m, n)`` (each problem's ``B`` masked to
            its own components, a part of the pooled ones).
        a0: ``(m, n)`` the pooled coefficients (its Newton system at ``(x0, y0)`` preconditions all).
        free: ``(m,)`` or ``(P, m)`` bool, rows whose ``x`` is free (in a component, not its gauge
            row); rows and columns without terms get a zero direction.
        x0, y0: ``(m,)``, ``(n,)`` the pooled optimum in the scaled problem.
        rtol: a problem is done once ``value - lower <= rtol * lower``.
        max_iter: Newton iterations at most.
        b0, free0: the pooled problem's ``B`` and free rows (default ``b`` and ``free``, shared).

    Returns:
        The :class:`._newton.BatchResult` of all ``P`` problems and ``(P,)`` bool: certified. The
        others (a conjugate-gradient solve that did not reach float64 accuracy, or ``max_iter``)
        keep their last point, value and bound; the caller finishes them with the general solver.
    """
    num, m, n = a.shape
    b = b.expand(num, m, n)
    x = x0.expand(num, m).clone()
    y = y0.expand(num, n).clone()
    value = torch.full((num,), math.inf, dtype=a.dtype, device=a.device)
    lower = a.new_zeros(num)
    certified = torch.zeros(num, dtype=torch.bool, device=a.device)
    precondition = _pooled_preconditioner(
        a0, b[0] if b0 is None else b0, free if free0 is None else free0, x0, y0
    )
    if precondition is None:
        return BatchResult(x, y, value, lower, 0), certified
    active = torch.arange(num, device=a.device)
    iterations = 0
    for it in range(1, max_iter + 1):
        if active.numel() == 0:
            break
        iterations = it
        a_a, b_a = (a, b) if active.numel() == num else (a[active], b[active])
        xa, ya = x[active], y[active]
        ta, tb = _terms(a_a, b_a, xa, ya)
        ra, rb, ca, cb = ta.sum(dim=2), tb.sum(dim=2), ta.sum(dim=1), tb.sum(dim=1)
        val = ra.sum(1) + rb.sum(1)
        gx, gy, r, c = ra - rb, ca - cb, ra + rb, ca + cb
        gamma = ta + tb
        free_a = free if free.ndim == 1 or active.numel() == num else free[active]
        px, py, solved = _direction_pcg(gamma, r, c, gx, gy, free_a, precondition)
        bound = _series_dual_bound(ta, tb, gamma, r, c, val, gx, gy, px, py, xa, ya)
        low = torch.where(solved, torch.maximum(bound, lower[active]), lower[active])
        del gamma, ta, tb
        stepped = torch.where(solved, _objective(a_a, b_a, xa + px, ya + py), torch.full_like(val, math.inf))
        take = stepped < val
        best = torch.minimum(val, stepped)
        done = solved & ((best - low <= rtol * low) | (val == 0))
        step = take.to(val.dtype)[:, None]
        glob = active
        # every problem moves to its better point; certified ones stop there
        x[glob] = xa + step * torch.where(solved[:, None], px, torch.zeros_like(px))
        y[glob] = ya + step * torch.where(solved[:, None], py, torch.zeros_like(py))
        value[glob] = torch.where(solved, best, val)
        lower[glob] = torch.minimum(low, best)
        certified[glob[done]] = True
        keep = solved & ~done
        if bool((take | ~keep).all()):
            active = glob[keep]
            continue
        # a full step that did not decrease S (far from the pooled optimum): backtrack (Armijo)
        slope = (gx * px).sum(1) + (gy * py).sum(1)
        back = (keep & ~take).nonzero().squeeze(1)
        t = torch.full((back.numel(),), 0.5, dtype=a.dtype, device=a.device)
        ok = torch.zeros_like(t, dtype=torch.bool)
        for _ in range(_MAX_HALVINGS):
            trial = _objective(
                a_a[back], b_a[back], xa[back] + t[:, None] * px[back], ya[back] + t[:, None] * py[back]
            )
            ok = trial <= val[back] + 1e-4 * t * slope[back]
            if bool(ok.all()):
                break
            t = torch.where(ok, t, 0.5 * t)
        t = torch.where(ok, t, torch.zeros_like(t))
        gb = glob[back]
        x[gb] = xa[back] + t[:, None] * px[back]
        y[gb] = ya[back] + t[:, None] * py[back]
        value[gb] = _objective(a_a[back], b_a[back], x[gb], y[gb])
        keep[back[~ok]] = False  # no representable decrease: left to the general solver
        active = glob[keep]
    return BatchResult(x, y, value, lower, iterations), certified


def _row_times(v: Tensor, g: Tensor) -> Tensor:
    """``v^T G`` per problem: ``(P, m)``, ``(P, m, n)`` -> ``(P, n)``."""
    return torch.bmm(v.unsqueeze(1), g).squeeze(1)


def _times_col(g: Tensor, v: Tensor) -> Tensor:
    """``G v`` per problem, ``(P, m, n)``, ``(P, n)`` -> ``(P, m)``, as ``v^T G^T``: the batched
    matrix-vector product with the vector on the left runs several times faster on CPU (measured)."""
    return torch.bmm(v.unsqueeze(1), g.mT).squeeze(1)


def _series_dual_bound(
    ta: Tensor,
    tb: Tensor,
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
) -> Tensor:
    """Lower bound on ``inf S`` per problem at the Newton-linearised dual point, to fourth order in the
    step; 0 where it does not apply (``max |s| >= 1/2``).

    The dual point and the AM-GM bound are those of :func:`._newton._dual_bound`,
    ``S(x', y') >= exp(log T - (C + x . rr + y . rc) / T)`` with ``T = S + g.p``, ``rr``, ``rc`` the row
    and column residuals of the Newton system and ``C = sum ta phi(s) + tb phi(-s)``,
    ``phi(s) = (1 + s) log(1 + s)``, ``s_ij = px_i + py_j``. Here ``phi`` is expanded to fourth order,
    ``phi(s) = s + s^2/2 - s^3/6 + s^4/12 + R``, ``|R| <= |s|^5 / (20 (1 - s_max)^4)`` (Taylor, with
    ``phi^(5)(s) = -6 / (1 + s)^4``), so ``C <= g.p + sum (ta - tb)(-s^3/6) + gamma (s^2/2 + s^4/12)
    + s_max^3 / (20 (1 - s_max)^4) sum gamma s^2``. The moments ``sum_ij t_ij (px_i + py_j)^k`` are
    binomial sums of the bilinear forms ``(px^l)^T t (py^(k-l))``: one batched product of ``t`` with
    the five powers of ``px`` per term kind. The slack is ``O(s_max^3 lambda^2)`` against
    ``O(s_max lambda^2)`` for the second-order bound of :mod:`._newton`, so one Newton step from the
    pooled optimum certifies a replicate to a tighter tolerance (measured per tolerance:
    ``benchmarks/results/bench_compute_ratio.md``).
    """
    s_max = px.abs().amax(dim=1) + py.abs().amax(dim=1)
    pow_x = torch.stack([torch.ones_like(px), px, px * px, px**3, px**4], dim=1)  # (P, 5, m)
    pow_y = torch.stack([torch.ones_like(py), py, py * py, py**3, py**4], dim=1)  # (P, 5, n)
    ma, mb = torch.bmm(pow_x, ta), torch.bmm(pow_x, tb)  # (P, 5, n): sum_i t_ij px_i^l

    def moment(m: Tensor, k: int) -> Tensor:  # sum_ij t_ij (px_i + py_j)^k
        terms = [math.comb(k, j) * (m[:, j] * pow_y[:, k - j]).sum(dim=1) for j in range(k + 1)]
        return torch.stack(terms).sum(dim=0)

    d3 = moment(ma, 3) - moment(mb, 3)
    g2 = moment(ma, 2) + moment(mb, 2)
    g4 = moment(ma, 4) + moment(mb, 4)
    lin = (gx * px).sum(1) + (gy * py).sum(1)
    total = value + lin
    feasible = (s_max < 0.5) & (total > 0) & (g2 >= 0)
    total = torch.where(feasible, total, torch.ones_like(total))
    slack = s_max**3 / (20 * (1 - s_max.clamp(max=0.5)) ** 4)
    cross = lin - d3 / 6 + g2 / 2 + g4 / 12 + slack * g2
    rr = gx + r * px + _times_col(gamma, py)
    rc = gy + ma[:, 1] + mb[:, 1] + c * py
    residual = (x * rr).sum(1) + (y * rc).sum(1)
    bound = torch.exp(torch.log(total) - (cross + residual) / total)
    return torch.where(feasible & torch.isfinite(bound), bound, torch.zeros_like(bound))


def _pooled_preconditioner(
    a0: Tensor, b0: Tensor, free: Tensor, x0: Tensor, y0: Tensor
) -> Optional[Callable[[Tensor, Tensor], Tensor]]:
    """The preconditioner ``(v, d) -> d * Ks_0^{-1} (d * v)`` with ``Ks_0 = I - Gs Gs^T`` the Jacobi-scaled
    pooled Schur complement (``K_0 = diag(r) - G diag(1/c) G^T`` on the free rows) at ``(x0, y0)``,
    applied through its float32 Cholesky factor, and ``d = r_p^{-1/2}`` the problem's own Jacobi scale
    (so each replicate's ``K_p`` is approximated by ``D_p^{1/2} Ks_0 D_p^{1/2}``: its own diagonal, the
    pooled coupling: fewer CG steps than with the pooled scale). None if the factorisation fails."""
    ta, tb = _terms(a0[None], b0[None], x0[None], y0[None])
    gamma = (ta + tb)[0]
    r, c = gamma.sum(dim=1), gamma.sum(dim=0)
    tiny = torch.finfo(r.dtype).tiny
    fr = free & (r > 0)
    sr = torch.where(fr, torch.rsqrt(r.clamp_min(tiny)), torch.zeros_like(r))
    sc = torch.where(c > 0, torch.rsqrt(c.clamp_min(tiny)), torch.zeros_like(c))
    gs = (gamma * (sr[:, None] * sc[None, :])).to(torch.float32)
    k = torch.eye(gs.shape[0], dtype=torch.float32, device=gs.device) - gs @ gs.T
    chol, info = torch.linalg.cholesky_ex(k)
    if int(info) != 0:
        return None

    def apply(v: Tensor, scale: Tensor) -> Tensor:  # (P, m), (P, m) -> (P, m)
        z = torch.cholesky_solve((v * scale).to(torch.float32).T, chol).T
        return torch.nan_to_num(z.to(v.dtype) * scale)

    return apply


def _direction_pcg(
    gamma: Tensor,
    r: Tensor,
    c: Tensor,
    gx: Tensor,
    gy: Tensor,
    free: Tensor,
    precondition: Callable[[Tensor, Tensor], Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """Newton direction ``H p = -g`` of ``P`` problems (``p_x = 0`` off ``free``) and whether it is
    float64-accurate (the Jacobi-scaled residual of the Schur system within ``_REFINE_TOL`` of the
    right-hand side, as for the factorised solve of :mod:`._newton`).

    Eliminating ``p_y``: ``K p_x = -g_x + G (g_y / c)`` with ``K = diag(r) - G diag(1/c) G^T`` on the
    free rows, solved by flexible preconditioned CG (:func:`._newton.preconditioned_cg`;
    ``precondition``: the pooled ``Ks_0^{-1}`` in the problem's Jacobi scaling);
    ``p_y = -(g_y + G^T p_x) / c``. Cost per CG step: two ``(m, n)`` matrix-vector products per problem.
    """
    mask = free.to(gamma.dtype)
    inv_c = torch.where(c > 0, 1.0 / c.clamp_min(torch.finfo(c.dtype).tiny), torch.zeros_like(c))
    jac = torch.where(
        free & (r > 0), torch.rsqrt(r.clamp_min(torch.finfo(r.dtype).tiny)), torch.zeros_like(r)
    )

    def matvec(u: Tensor) -> Tensor:
        gtu = _row_times(u, gamma) * inv_c  # (P, n)
        return (r * u - _times_col(gamma, gtu)) * mask

    rhs = (-gx + _times_col(gamma, gy * inv_c)) * mask
    tol = _REFINE_TOL * (rhs * jac).abs().amax(dim=1)
    u, solved, _ = preconditioned_cg(
        matvec,
        rhs,
        lambda res: precondition(res, jac) * mask,
        lambda res: (res * jac).abs().amax(dim=1),
        tol,
        _MAX_CG,
    )
    # the recurrence's residual drifts from the true one: check the true residual
    solved = solved & ((rhs - matvec(u)) * jac).abs().amax(dim=1).le(tol)
    px = u
    py = -(gy + _row_times(px, gamma)) * inv_c
    return px, py, solved
