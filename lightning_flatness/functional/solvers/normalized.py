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
2. **Damped Newton** on the reduced problem in log-space (:mod:`._newton`), started cold from at
   most 30 closed-form alternating sweeps ``x_i = 1/2 log(sum_j B_ij e^{-y_j} / sum_j A_ij e^{y_j})``
   (likewise ``y``; stopped when they stall: no path runs alternating updates unbounded), or
   warm from a nearby solution (batched replicate solves). The Hessian is ``[[diag(r), G], [G^T,
   diag(c)]]`` with ``G_ij = A_ij e^{x_i+y_j} + B_ij e^{-x_i-y_j}`` (eq. 49-55); one row per
   component is held fixed (the gauge) and the diagonal block of the larger side is eliminated;
   the Jacobi-scaled Schur complement of size ``min(m, n)`` is formed and Cholesky-factored in
   float32, and the direction refined to float64 accuracy (mixed-precision iterative refinement;
   float64 factorisation where that fails) once the iterate is near the optimum. From
   ``min(m, n) >= 256`` the Schur system is instead solved by Jacobi-preconditioned conjugate
   gradients, ``O(m n)`` per step (to float64 accuracy near the optimum, loosely before; the
   factorisation takes over a system they do not solve within 64 steps), after alternating sweeps
   stopped at 1e-3 nats. Terms
   ``A_ij e^{x_i + y_j}`` are products of vector exponentials (no ``(m, n)`` exponential). A
   backtracking line search, with each ``x_i + y_j`` moving at most 8 nats per step, keeps every
   step a descent step. ``P`` problems of one shape iterate together over a leading dimension,
   each stopping on its own certificate. Warm-started problems that share ``B`` and the components
   of a solved problem 0 (jackknife replicates), or one component inside problem 0's single one (a
   replicate that loses the units alive only in the slot it leaves out), take exact Newton steps
   from its optimum, on problem 0's component rows and columns, with no factorisation of their own:
   conjugate gradients preconditioned by problem 0's factorised system (:mod:`._replicate_newton`);
   the others, and small ones, take the general path.
3. **Certificate.** The Newton-linearised terms ``delta_ij^A = A_ij e^{x_i+y_j} (1 + s_ij)``,
   ``delta_ij^B = B_ij e^{-x_i-y_j} (1 - s_ij)`` (``s_ij = dx_i + dy_j``) have zero row and column sums
   (up to the rounding of the solve, accounted for), so the weighted AM-GM inequality gives a
   lower bound ``S(x', y') >= prod_k (c_k / d_k)^{d_k}`` for every ``(x', y')`` (``d = delta / sum
   delta``, a feasible point of the dual geometric program). Its logarithm needs ``sum d log(1 + s)``,
   bounded by Taylor's theorem through the Newton decrement ``lambda^2`` and ``max |s|`` (two
   matrix-vector products; see ``_newton._dual_bound``): near the optimum the bound is
   ``S - lambda^2 / 2 + O(lambda^3)``. The solver stops when ``upper - lower <= rtol * lower``,
   with ``upper`` the better of the current value and the value after the full Newton step.
4. **Bounded time.** At most ``max_iter`` Newton iterations (default 100), each ``O(m n)``
   float64 passes plus an ``O(m n min(m, n))`` float32 factorisation (from ``min(m, n) >= 256``: at
   most 64 conjugate-gradient steps of two ``O(m n)`` passes each, before that factorisation); at the
   cap the solver returns the achieved value with its certified gap (against the dual bound or at
   least the separable bound ``sum_ij 2 sqrt(A_ij B_ij)``) and warns once per call, naming the
   tensor shape and the gap. On the stress suite (``benchmarks/solver_stress.py``) every case certifies in at
   most a few iterations.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from lightning_flatness.functional.solvers._components import component_layout, same_layout
from lightning_flatness.functional.solvers._newton import alternating_sweeps, newton
from lightning_flatness.functional.solvers._replicate_newton import replicate_newton
from lightning_flatness.functional.solvers.matrix_normalized import _float64, _result_dtype, _to_result

__all__ = [
    "NormalizedSharpnessSolution",
    "normalized_sharpness",
    "normalized_sharpness_coefficients",
    "solve_normalized_sharpness",
    "solve_normalized_sharpness_batch",
    "solve_normalized_sharpness_coefficients",
]


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
    if k == 1:  # a matrix: no kernel sum, and no (m, n) temporaries beyond the results (large ones
        # cost more to allocate, page by page, than to compute)
        return h.reshape(m, n).clamp_min(0), w.reshape(m, n).square().div_(2.0 * lam)
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
    per Newton iteration about 20 ``O(m n)`` float64 passes plus ``O(m n min(m, n))`` float32 (the
    Schur complement) and ``O(min(m, n)^3)`` (its Cholesky factor), or from ``min(m, n) >= 256``
    conjugate-gradient steps of two ``O(m n)`` passes each (about 10-15 on the stress suite);
    typically one Newton iteration, at most ``max_iter``. Timings per input kind, idle and under load:
    ``benchmarks/results_solver.md``. Memory: a few ``(m, n)`` float64 matrices and one
    ``(min(m, n), min(m, n))`` float32.

    Args:
        weight: ``(m, n, *kernel)`` weight tensor (``ndim >= 2``).
        hessian_diagonal: its Hessian diagonal, same shape, unclipped.
        lam: the PAC-Bayes ``lambda > 0`` (the paper uses 1/2).
        rtol: certified relative accuracy of the value (duality gap over lower bound).
        max_iter: Newton iterations before the solver stops and warns (once, naming the shape and
            the certified gap); the value returned then is an upper bound within that gap.

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
    _check_tolerances(rtol, max_iter)
    with intra_op_threads(weight.numel(), weight.device):
        a, b = normalized_sharpness_coefficients(weight, hessian_diagonal, lam)
        return _solve(a[None], b[None], rtol, max_iter, tuple(weight.shape), warm_start=False, owned=True)[0]


def solve_normalized_sharpness_batch(
    weight: Tensor,
    hessian_diagonals: Tensor,
    lam: float = 0.5,
    *,
    rtol: float = 1e-11,
    max_iter: int = 100,
    warm_start: bool = False,
) -> list[NormalizedSharpnessSolution]:
    r"""Solve eq. 17 for one weight tensor and ``P`` Hessian diagonals at once (e.g. a pooled estimate
    and its jackknife replicates), as one batched Newton iteration.

    All problems start from the alternating sweeps, batched over a leading dimension, each stopping
    when its own certificate holds. With ``warm_start=True`` problem 0 is solved first and problems
    ``1..P-1`` start from its solution instead (put the diagonal the others scatter around first);
    that was measured slower, with more damped Newton iterations per replicate (the sweeps bring each
    problem closer to its optimum than a neighbour's optimum is; ``benchmarks/bench_cold_vs_warm.py``,
    figures in ``benchmarks/results/linearized_jackknife.md``). Each value is certified to ``rtol``
    exactly as by :func:`solve_normalized_sharpness`.

    Cost: forming the ``P`` coefficient matrices, ``O(P numel)``; then per Newton iteration and
    unfinished problem ``O(m n)`` float64 and ``O(m n min(m, n))`` float32 (see the module docstring).

    Args:
        weight: ``(m, n, *kernel)`` weight tensor, shared by all problems.
        hessian_diagonals: ``(P, m, n, *kernel)`` Hessian diagonals, unclipped.
        lam, rtol, max_iter: as for :func:`normalized_sharpness` (``max_iter`` bounds the iterations
            of each of the two stages when warm-started: problem 0, then the batch).
        warm_start: start problems ``1..P-1`` from problem 0's solution.

    Returns:
        ``P`` :class:`NormalizedSharpnessSolution` in float64.

    Example:
        >>> import torch
        >>> w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
        >>> h = torch.rand(3, 6, 4, 3, 3, dtype=torch.float64)
        >>> sols = solve_normalized_sharpness_batch(w, h)
        >>> all(torch.isclose(s.value, normalized_sharpness(w, h[p]), rtol=1e-10) for p, s in enumerate(sols))
        True
    """
    _check_tolerances(rtol, max_iter)
    if hessian_diagonals.ndim != weight.ndim + 1 or hessian_diagonals.shape[1:] != weight.shape:
        raise ValueError(
            f"hessian_diagonals has shape {tuple(hessian_diagonals.shape)}; expected (P, "
            f"*weight.shape) = (P, {', '.join(map(str, weight.shape))}): one diagonal per problem."
        )
    if hessian_diagonals.shape[0] == 0:
        return []
    _check_inputs(weight, hessian_diagonals[0], lam)
    with intra_op_threads(hessian_diagonals.numel(), weight.device):
        w, h = _float64(weight), _float64(hessian_diagonals)
        num, m, n = h.shape[0], w.shape[0], w.shape[1]
        a = h.clamp_min(0).reshape(num, m, n, -1).sum(dim=3)
        b = (w.square().reshape(m, n, -1).sum(dim=2) / (2.0 * lam))[None]
        return _solve(a, b, rtol, max_iter, tuple(weight.shape), warm_start=warm_start)


def solve_normalized_sharpness_coefficients(
    a: Tensor,
    b: Tensor,
    *,
    rtol: float = 1e-11,
    max_iter: int = 100,
    warm_start: bool = False,
    shape: Optional[tuple] = None,
    replicate_rtol: Optional[float] = None,
) -> list[NormalizedSharpnessSolution]:
    r"""Solve eq. 17 from its ``(m, n)`` coefficient matrices, for ``P`` problems at once.

    The batched core of :func:`solve_normalized_sharpness_batch`, for callers that form
    ``A = sum_k max(h, 0)`` and ``B = sum_k W^2 / (2 lam)`` themselves (e.g. from sums of
    replicates, without materialising every diagonal). All problems are solved cold (the default,
    measured faster: see :func:`solve_normalized_sharpness_batch`), or problem 0 cold and the others
    warm-started from it (``warm_start=True``).

    Args:
        a: ``(P, m, n)`` non-negative float64.
        b: ``(P, m, n)`` or ``(m, n)`` (shared) non-negative float64.
        rtol, max_iter: as for :func:`normalized_sharpness`.
        warm_start: start problems ``1..P-1`` from problem 0's solution.
        shape: the weight's shape, for the warning text (default ``(m, n)``).
        replicate_rtol: certified accuracy of problems ``1..P-1`` (default ``rtol``); e.g. ``1e-9``
            for jackknife replicates, whose spread is many orders of magnitude larger.

    Returns:
        ``P`` :class:`NormalizedSharpnessSolution` in float64.
    """
    _check_tolerances(rtol, max_iter)
    if replicate_rtol is not None:
        _check_tolerances(replicate_rtol, max_iter)
    if a.ndim != 3 or b.shape[-2:] != a.shape[-2:] or b.ndim not in (2, 3):
        raise ValueError(
            f"coefficients must be a (P, m, n) and b (m, n) or (P, m, n); got {tuple(a.shape)} "
            f"and {tuple(b.shape)}."
        )
    b = b if b.ndim == 3 else b[None]
    return _solve(
        a.to(torch.float64),
        b.to(torch.float64),
        rtol,
        max_iter,
        tuple(a.shape[1:]) if shape is None else tuple(shape),
        warm_start=warm_start,
        replicate_rtol=replicate_rtol,
    )


def _check_tolerances(rtol: float, max_iter: int) -> None:
    if not (rtol > 0 and math.isfinite(rtol)):
        raise ValueError(f"rtol must be a positive finite number, got {rtol!r}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(
            f"max_iter must be a positive int (Newton iterations before the solver stops "
            f"with a warning), got {max_iter!r}."
        )


# m n from which replicates take the pooled-preconditioned Newton (below it, per-op overhead dominates
# and the general solver's few batched float32 factorisations are cheaper)
_PRECONDITIONED_FROM = 1 << 12
_ONE_THREAD_BELOW = 1 << 22  # P m n below which the CPU solve runs on one intra-op thread


@contextlib.contextmanager
def intra_op_threads(work: int, device: torch.device):
    """One intra-op thread for CPU solves of fewer than ``_ONE_THREAD_BELOW`` entries (restored after;
    not for concurrent use of torch from several Python threads).

    The solve is a few hundred small ops; with several intra-op threads each op is a thread
    handoff, and on a busy machine (data-loader workers, other jobs) every handoff waits for a
    descheduled thread, many times slower than one thread (measured: ``benchmarks/results_solver.md``).
    Large problems keep the caller's setting (their float32 GEMM gains from threads).
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or work >= _ONE_THREAD_BELOW:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _solve(
    a: Tensor,
    b: Tensor,
    rtol: float,
    max_iter: int,
    shape: tuple,
    warm_start: bool,
    replicate_rtol: Optional[float] = None,
    owned: bool = False,
) -> list[NormalizedSharpnessSolution]:
    """Solve ``P`` problems with coefficients ``a`` ``(P, m, n)`` and ``b`` ``(P or 1, m, n)`` (``owned``: the
    caller's own copies, which the solver may overwrite)."""
    with intra_op_threads(a.numel(), a.device):
        return _solve_threads_set(a, b, rtol, max_iter, shape, warm_start, replicate_rtol, owned)


def _solve_threads_set(
    a: Tensor,
    b: Tensor,
    rtol: float,
    max_iter: int,
    shape: tuple,
    warm_start: bool,
    replicate_rtol: Optional[float],
    owned: bool = False,
) -> list[NormalizedSharpnessSolution]:
    if not (math.isfinite(float(a.sum())) and math.isfinite(float(b.sum()))):  # a, b >= 0: no cancellation
        raise ValueError(
            "normalized_sharpness got non-finite weights or Hessian diagonal (NaN/inf, or an "
            "overflow of W^2 / h summed over the kernel); check the curvature estimate."
        )
    num = a.shape[0]
    shared_b = b.shape[0] == 1
    b = b.expand_as(a)
    transposed = a.shape[1] > a.shape[2]
    if transposed:  # the Newton system is solved on the smaller side
        a, b = a.transpose(1, 2), b.transpose(1, 2)
    if a.shape[1] == 0 or a.shape[2] == 0:  # an empty tensor: no terms
        zero = a.new_zeros(())
        sols = [
            NormalizedSharpnessSolution(
                zero,
                zero,
                a.new_full((a.shape[1],), math.nan),
                a.new_full((a.shape[2],), math.nan),
                0,
                True,
                0,
            )
        ] * num
    elif a.shape[1] == 1:
        sols = _solve_one_row(a, b)
    elif warm_start and num > 1:
        first = _solve_reduced(a[:1], b[:1], rtol, max_iter, shape, None)
        rest = _solve_replicates(
            a[1:],
            b[1:],
            a[0],
            first[0],
            rtol if replicate_rtol is None else replicate_rtol,
            max_iter,
            shape,
            shared_b,
        )
        sols = first + rest
    else:
        sols = _solve_reduced(a, b, rtol, max_iter, shape, None, owned and (not shared_b or num == 1))
    _warn_uncertified(sols, max(rtol, replicate_rtol or rtol), max_iter, shape)
    return [_finish(sol, transposed) for sol in sols]


def _solve_replicates(
    a: Tensor,
    b: Tensor,
    a0: Tensor,
    pooled: NormalizedSharpnessSolution,
    rtol: float,
    max_iter: int,
    shape: tuple,
    shared_b: bool,
) -> list[NormalizedSharpnessSolution]:
    """Problems near the solved ``pooled`` one (``m <= n``): Newton from its optimum with its factorised
    system as the preconditioner (:mod:`._replicate_newton`) for every problem that shares ``B`` and
    whose components are the pooled problem's, or (one component on both sides) a part of it; the
    general warm-started solver for the rest.

    A part of the pooled component: a replicate loses the rows and columns whose only positive ``A``
    came from the slot it leaves out (a unit alive in one batch only); its infimum is the one over its
    own component, with those rows and columns out of it. Their ``B`` terms are dropped (``B``
    masked per problem), their variables then carry no term (zero rows and columns of the Newton
    system, held at the pooled value), and the gauge is the problem's own first row: the same
    problem the general solver reduces to, solved without a factorisation of its own."""
    num, m, n = a.shape

    a_in = a

    def general(idx: Optional[Tensor] = None) -> list[NormalizedSharpnessSolution]:
        if idx is None:
            return _solve_reduced(a_in, b, rtol, max_iter, shape, pooled)
        return _solve_reduced(a_in[idx], b[idx], rtol, max_iter, shape, pooled)

    if not shared_b or pooled.num_components == 0 or m * n < _PRECONDITIONED_FROM:
        return general()
    b0 = b[0]
    keep0, free0 = component_layout(a0[None], b0[None])
    keep, free = component_layout(a, b)
    same = same_layout(keep, free, keep0, free0)
    if keep is not None and pooled.num_components == 1:
        # one component on both sides, inside the pooled one: the replicate's own reduced problem
        inside = ((keep0 if keep0 is not None else True) | ~keep).flatten(1).all(dim=1)
        inside &= (keep.any(dim=2) & ~free).sum(dim=1) == 1
        fast = same | inside
    else:
        fast = same
    if not bool(fast.any()):
        return general()
    if keep is not None:
        attained = ~((((a > 0) | (b > 0)) & ~keep).flatten(1).any(dim=1))
        rows, cols = keep.any(dim=2), keep.any(dim=1)
    else:
        attained = torch.ones(num, dtype=torch.bool, device=a.device)
        rows = torch.ones(num, m, dtype=torch.bool, device=a.device)
        cols = torch.ones(num, n, dtype=torch.bool, device=a.device)
    if keep0 is not None:
        a0, b0 = a0.masked_fill(~keep0[0], 0.0), b0.masked_fill(~keep0[0], 0.0)
    scale_a, scale_b = a0.amax(), b0.amax()
    if not bool(scale_a > 0) or not bool(scale_b > 0):
        return general()
    shift = 0.5 * torch.log(scale_b / scale_a)
    factor = torch.sqrt(scale_a * scale_b)
    idx = fast.nonzero().squeeze(1)
    every = idx.numel() == num
    x0, y0 = (pooled.row_log_variance - shift).nan_to_num(0.0), pooled.col_log_variance.nan_to_num(0.0)
    # only the pooled component's rows and columns (the fast problems have no terms elsewhere), each
    # problem's coefficients masked to its own components and scaled: one copy per coefficient
    in_rows, in_cols = _index_or_all(keep0, 1), _index_or_all(keep0, 0)

    def part(t: Tensor) -> Tensor:  # (..., m, n) -> (..., m', n'): the pooled component's rows, columns
        if in_rows is None:
            return t if in_cols is None else t.index_select(-1, in_cols)
        if in_cols is None:
            return t.index_select(-2, in_rows)
        return t[..., in_rows[:, None], in_cols]

    a_fast = part(a if every else a[idx])
    if a_fast is a:  # neither picked nor compacted: a copy of its own, scaled in place below
        a_fast = a_fast.clone()
    b_fast = part(b0)[None].expand_as(a_fast)
    if keep is not None:
        outside = ~part(keep if every else keep[idx])
        a_fast.masked_fill_(outside, 0.0)
        b_fast = b_fast.masked_fill(outside, 0.0)
    else:
        b_fast = b_fast.clone()
    res, certified = replicate_newton(
        a_fast.div_(scale_a),
        b_fast.div_(scale_b),
        part(a0) / scale_a,
        _pick(free if every else free[idx], in_rows),
        _pick(x0, in_rows),
        _pick(y0, in_cols),
        rtol,
        max_iter,
        b0=part(b0) / scale_b,
        free0=_pick(free0[0], in_rows),
    )
    del a_fast, b_fast
    value, lower = res.value * factor, res.lower * factor
    nan = torch.tensor(float("nan"), dtype=a.dtype, device=a.device)
    x_full = torch.full((idx.numel(), m), math.nan, dtype=a.dtype, device=a.device)
    y_full = torch.full((idx.numel(), n), math.nan, dtype=a.dtype, device=a.device)
    x_full[:, slice(None) if in_rows is None else in_rows] = res.x
    y_full[:, slice(None) if in_cols is None else in_cols] = res.y
    x_out = torch.where(rows[idx], x_full + shift, nan)
    y_out = torch.where(cols[idx], y_full, nan)
    sols: list[Optional[NormalizedSharpnessSolution]] = [None] * num
    for k, p in enumerate(idx.tolist()):
        if bool(certified[k]):
            sols[p] = NormalizedSharpnessSolution(
                value[k],
                lower[k],
                x_out[k],
                y_out[k],
                pooled.num_components,
                bool(attained[p]),
                res.iterations,
            )
    rest = [p for p in range(num) if sols[p] is None]
    if rest:
        for p, sol in zip(rest, general(torch.tensor(rest, device=a.device))):
            sols[p] = sol
    return [s for s in sols if s is not None]


def _index_or_all(keep0: Optional[Tensor], dim: int) -> Optional[Tensor]:
    """Indices of the rows (``dim=1``) or columns (``dim=0``) of the ``(1, m, n)`` component mask
    ``keep0`` that lie in a component; None for all of them."""
    if keep0 is None:
        return None
    inside = keep0[0].any(dim=dim)
    return None if bool(inside.all()) else inside.nonzero().squeeze(1)


def _pick(t: Tensor, index: Optional[Tensor]) -> Tensor:
    """``t[..., index]`` (all of ``t`` for None)."""
    return t if index is None else t.index_select(-1, index)


def _warn_uncertified(
    sols: list[NormalizedSharpnessSolution], rtol: float, max_iter: int, shape: tuple
) -> None:
    """One warning per call when any problem stopped above ``rtol`` (the cap or the rounding floor)."""
    gaps = [
        float((s.value - s.lower_bound) / s.lower_bound)
        if s.lower_bound > 0
        else (math.inf if s.value > 0 else 0.0)
        for s in sols
    ]
    worst = max(range(len(gaps)), key=gaps.__getitem__, default=None)
    if worst is not None and gaps[worst] > rtol:
        warnings.warn(
            f"normalized_sharpness stopped after {sols[worst].iterations} Newton iterations (max_iter="
            f"{max_iter}) on a weight tensor of shape {shape} with a certified relative gap of "
            f"{gaps[worst]:.2e} > rtol={rtol:.1e} (problem {worst} of {len(sols)}); the value is an "
            f"upper bound within that gap. Raise max_iter or rtol.",
            RuntimeWarning,
            stacklevel=4,
        )


def _solve_reduced(
    a: Tensor,
    b: Tensor,
    rtol: float,
    max_iter: int,
    shape: tuple,
    start: Optional[NormalizedSharpnessSolution],
    owned: bool = False,
) -> list[NormalizedSharpnessSolution]:
    """Component reduction, scaling, start point, Newton and the iteration-cap warning (``m <= n``);
    ``owned``: ``a`` and ``b`` are the caller's own copies, scaled in place (no ``(m, n)`` copies)."""
    num, m, n = a.shape
    keep, free = component_layout(a, b)
    if keep is None:  # one component with every row and column: nothing to drop
        attained = torch.ones(num, dtype=torch.bool, device=a.device)
        rows = torch.ones(num, m, dtype=torch.bool, device=a.device)
        cols = torch.ones(num, n, dtype=torch.bool, device=a.device)
    else:
        attained = ~((((a > 0) | (b > 0)) & ~keep).flatten(1).any(dim=1))
        rows, cols = keep.any(dim=2), keep.any(dim=1)
        a = a.masked_fill(~keep, 0.0)
        b = b.masked_fill(~keep, 0.0)
        owned = True
    one = torch.ones((), dtype=a.dtype, device=a.device)
    scale_a = torch.where(rows.any(dim=1), a.amax(dim=(1, 2)), one)
    scale_b = torch.where(rows.any(dim=1), b.amax(dim=(1, 2)), one)
    # scaled to maximum 1, contiguous (a transposed view would be copied by every product)
    a, b = _scaled(a, 1.0 / scale_a, owned), _scaled(b, 1.0 / scale_b, owned)
    shift = 0.5 * torch.log(scale_b / scale_a)  # x of the scaled problem = x - shift
    if start is None:
        x, y = alternating_sweeps(a, b)
    else:
        x = (start.row_log_variance[None, :] - shift[:, None]).nan_to_num(0.0)
        y = start.col_log_variance[None, :].nan_to_num(0.0).expand(num, n).clone()
    res = newton(a, b, free, x, y, rtol, max_iter)

    factor = torch.sqrt(scale_a * scale_b)  # S(A, B) = sqrt(ab) S(A/a, B/b) with x shifted by log(b/a)/2
    value, lower = res.value * factor, res.lower * factor
    nan = torch.tensor(float("nan"), dtype=a.dtype, device=a.device)
    x_out = torch.where(rows, res.x + shift[:, None], nan)
    y_out = torch.where(cols, res.y, nan)
    components = (rows & ~free).sum(dim=1)
    return [
        NormalizedSharpnessSolution(
            value[p], lower[p], x_out[p], y_out[p], int(components[p]), bool(attained[p]), res.iterations
        )
        for p in range(num)
    ]


def _scaled(t: Tensor, factor: Tensor, in_place: bool) -> Tensor:
    """``t * factor[:, None, None]``, contiguous, in place when allowed and ``t`` is contiguous, else in
    one new buffer (a large fresh buffer costs more than the arithmetic: no second copy)."""
    if in_place and t.is_contiguous():
        return t.mul_(factor[:, None, None])
    return torch.mul(t, factor[:, None, None], out=torch.empty(t.shape, dtype=t.dtype, device=t.device))


def _solve_one_row(a: Tensor, b: Tensor) -> list[NormalizedSharpnessSolution]:
    """``m = 1`` (one row, e.g. a depthwise ``(C, 1, k, k)`` weight transposed): every entry has its own
    free ``x + y_j``, so the infimum is separable, ``sum_j 2 sqrt(A_j B_j)``, closed form."""
    both = (a > 0) & (b > 0)
    value = 2.0 * torch.sqrt(a * b).sum(dim=(1, 2))
    attained = ~(((a > 0) ^ (b > 0)).flatten(1).any(dim=1))
    nan = torch.tensor(float("nan"), dtype=a.dtype, device=a.device)
    has = both.any(dim=2)  # (P, 1)
    x_out = torch.where(has, torch.zeros_like(has, dtype=a.dtype), nan)
    y_out = torch.where(both[:, 0], 0.5 * torch.log(b[:, 0] / a[:, 0]), nan)
    return [
        NormalizedSharpnessSolution(
            value[p], value[p], x_out[p], y_out[p], int(has[p].sum()), bool(attained[p]), 0
        )
        for p in range(a.shape[0])
    ]


def _finish(sol: NormalizedSharpnessSolution, transposed: bool) -> NormalizedSharpnessSolution:
    if transposed:
        sol = sol._replace(row_log_variance=sol.col_log_variance, col_log_variance=sol.row_log_variance)
    return sol


def _check_inputs(weight: Tensor, hessian_diagonal: Tensor, lam: float) -> None:
    if weight.ndim < 2:
        raise ValueError(
            f"normalized sharpness needs a weight tensor with ndim >= 2 (rows x columns), got "
            f"shape {tuple(weight.shape)}; biases and other 1-D parameters are left out "
            f"(footnote 5), or reshape to (n, 1) for one variance per entry."
        )
    if hessian_diagonal.shape != weight.shape:
        raise ValueError(
            f"Hessian diagonal has shape {tuple(hessian_diagonal.shape)} but the weight has "
            f"{tuple(weight.shape)}; pass the diagonal of this weight tensor."
        )
    if not (lam > 0 and math.isfinite(lam)):
        raise ValueError(f"lam must be a positive finite number (the paper uses 0.5), got {lam!r}.")
