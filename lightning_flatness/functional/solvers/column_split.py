r"""Eq. 17 for one weight tensor whose coefficient columns are split across processes.

The problem is the one of :mod:`.normalized`, ``min_{x, y} S(x, y) = sum_ij A_ij e^{x_i + y_j} + B_ij
e^{-x_i - y_j}``, laid out with the ``m`` rows on every process and the ``n >= m`` columns split:
process ``q`` holds ``A[:, J_q]``, ``B[:, J_q]`` (e.g. the transposed rows of an FSDP2 shard,
``Shard(0)`` of a tall ``(n, m)`` weight). The column variables ``y_j`` are local, and the Newton
system eliminates exactly them (the diagonal block of the larger side), so the damped Newton of
:mod:`._newton` runs unchanged with every sum over columns completed by an all-reduce
(:class:`GroupColumnReduction`): row sums, the objective, the line-search values, the ``m x m``
Schur complement ``I - Gs Gs^T`` (a float32 all-reduce of at most one whole tensor's size,
``m^2 <= m n``), its float64 refinement residuals and the dual bound. Rows, values and the
certificate are identical on every process; the Cholesky factor of the Schur complement is
computed on every process (``O(m^3)``).

**Assumptions.** Every ``B_ij > 0`` (no zero weight) or every ``A_ij > 0``: then the rows and
columns with an entry of the other kind form one strongly connected component and the others none
(dead ReLU units, whose rows or columns of ``A`` are 0: common), the fast path of
:mod:`._components`, decided with three small all-reduces. Otherwise (exact zero weights together
with zero curvature: pruned models) :func:`solve_split_coefficients` returns ``None`` and the caller
solves the gathered problem (:func:`~.normalized.solve_normalized_sharpness`, which finds the
components by a transitive closure). Every process holds at least one column and ``m >= 2``. The replicated
steps (the Cholesky factorisation, vector updates) must give the same bits on every process (the
same torch build, device type and number of intra-op threads, as ``torchrun`` sets them), since the
processes take their decisions from them.

**Cost per Newton iteration and process**: the ``O(m n / Q)`` float64 passes of :mod:`._newton` on
its ``n / Q`` columns, ``O(m^2 n / Q)`` float32 for its part of the Schur complement, ``O(m^3)``
for the factor, and about 15 all-reduces (one of ``m^2`` float32, the others of ``m`` floats or
fewer); 4 small all-reduces per alternating sweep of the cold start
(:class:`GroupColumnReduction` counts them). From ``m >= 256`` the Schur system is solved by
conjugate gradients instead (:mod:`._newton`): no ``m^2`` all-reduce and no factor, one all-reduce
of ``m`` floats per conjugate-gradient step.
**Memory per process**: ``A``, ``B`` and a few ``(m, n / Q)`` float64 temporaries (``1/Q`` of the
whole solve's) plus two ``m x m`` float32 matrices (the Schur complement, reduced in place, and its
Cholesky factor).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_flatness.functional.solvers._newton import ColumnReduction, alternating_sweeps, newton
from lightning_flatness.functional.solvers.normalized import NormalizedSharpnessSolution, _warn_uncertified

__all__ = ["GroupColumnReduction", "solve_split_coefficients"]


class GroupColumnReduction(ColumnReduction):
    """Column reductions completed by ``all_reduce`` over a process group (each process holding
    some of the columns; arguments are reduced in place when contiguous). Counts the collectives
    (``calls``), the elements reduced (``elements``) and the largest single reduction (``largest``,
    in elements)."""

    distributed = True

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        self.group = group
        self.calls = 0
        self.elements = 0
        self.largest = 0

    def _reduce(self, tensor: Tensor, op: Any) -> Tensor:
        tensor = tensor.contiguous()  # the solver's partial results are temporaries: reduced in place
        dist.all_reduce(tensor, op=op, group=self.group)
        self.calls += 1
        self.elements += tensor.numel()
        self.largest = max(self.largest, tensor.numel())
        return tensor

    def sum(self, *tensors: Tensor) -> list[Tensor]:
        if len(tensors) == 1 or len({t.dtype for t in tensors}) > 1:
            return [self._reduce(t, dist.ReduceOp.SUM) for t in tensors]
        flat = self._reduce(torch.cat([t.reshape(-1) for t in tensors]), dist.ReduceOp.SUM)
        return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def max(self, tensor: Tensor) -> Tensor:
        return self._reduce(tensor, dist.ReduceOp.MAX)

    def min(self, tensor: Tensor) -> Tensor:
        return self._reduce(tensor, dist.ReduceOp.MIN)


def solve_split_coefficients(
    a: Tensor,
    b: Tensor,
    comm: ColumnReduction,
    *,
    rtol: float = 1e-11,
    max_iter: int = 100,
    start: Optional[NormalizedSharpnessSolution] = None,
    shape: Optional[tuple] = None,
) -> Optional[NormalizedSharpnessSolution]:
    r"""Certified minimum of eq. 17 from this process's columns of its coefficients (a collective).

    Args:
        a: ``(m, n_q)`` float64, ``A = sum_k max(h, 0)`` on this process's columns (non-negative).
        b: ``(m, n_q)`` float64, ``B = sum_k W^2 / (2 lam)`` likewise.
        comm: completes the reductions over columns (:class:`GroupColumnReduction`; the base
            :class:`~._newton.ColumnReduction` when one process holds every column).
        rtol, max_iter: as for :func:`~.normalized.normalized_sharpness` (one warning, naming
            ``shape`` and the certified gap, when a solve stops above ``rtol``).
        start: a solution of a nearby problem on the same columns (e.g. the pooled diagonal's, for
            its jackknife replicates): Newton starts from it instead of the alternating sweeps.
        shape: the weight's shape, for the warning.

    Returns:
        The :class:`~.normalized.NormalizedSharpnessSolution` (``value`` and ``lower_bound`` identical
        on every process, ``row_log_variance`` ``(m,)``, ``col_log_variance`` this process's ``(n_q,)``,
        NaN outside the component), or ``None`` when neither every ``A_ij`` nor every ``B_ij`` is
        positive (solve the gathered problem instead). Raises ``ValueError`` on non-finite coefficients.
    """
    m, n_local = a.shape
    if m < 2 or n_local < 1:
        raise ValueError(
            f"solve_split_coefficients needs at least 2 rows and one column per process, got "
            f"{m} x {n_local}; solve the gathered problem with solve_normalized_sharpness."
        )
    a, b = a.to(torch.float64)[None], b.to(torch.float64)[None]
    totals = torch.stack([a.sum(), b.sum()])
    (totals,) = comm.sum(totals)
    if not bool(torch.isfinite(totals).all()):  # a, b >= 0: no cancellation
        raise ValueError(
            "normalized_sharpness got non-finite weights or Hessian diagonal (NaN/inf, or an "
            "overflow of W^2 / h summed over the kernel); check the curvature estimate."
        )
    pos_a, pos_b = a > 0, b > 0
    every = comm.min(torch.stack([pos_a.all(), pos_b.all()]).to(torch.float64))
    all_a, all_b = bool(every[0]), bool(every[1])
    if not (all_a or all_b):
        return None
    # every column reaches every row through the complete kind: the rows and columns with an arc of
    # the other kind form one component, the others (dead units, clipped channels) none
    other = pos_a if all_b else pos_b
    rows = comm.max(other.any(dim=2).to(torch.float64)) > 0  # (1, m)
    cols = other.any(dim=1)  # (1, n_q)
    if not bool(rows.any()):
        return None
    keep = rows[:, :, None] & cols[:, None, :]
    dropped = comm.max(((pos_a | pos_b) & ~keep).any().to(torch.float64).reshape(1))
    attained = not bool(dropped[0] > 0)
    if not attained:  # terms outside the component are driven to 0 (see .normalized)
        a = a.masked_fill(~keep, 0.0)
        b = b.masked_fill(~keep, 0.0)
    scales = comm.max(torch.stack([a.amax(), b.amax()]))
    scale_a, scale_b = scales[0], scales[1]
    a = a * (1.0 / scale_a)
    b = b * (1.0 / scale_b)
    shift = 0.5 * torch.log(scale_b / scale_a)  # x of the scaled problem = x - shift
    if start is None:
        x, y = alternating_sweeps(a, b, comm)
    else:
        x = (start.row_log_variance - shift)[None].nan_to_num(0.0)
        y = start.col_log_variance[None].nan_to_num(0.0)
    free = rows & ~(torch.cumsum(rows.to(torch.int32), dim=1) == 1)  # the gauge: its first row fixed
    res = newton(a, b, free, x, y, rtol, max_iter, comm)
    factor = torch.sqrt(scale_a * scale_b)
    nan = torch.tensor(math.nan, dtype=a.dtype, device=a.device)
    sol = NormalizedSharpnessSolution(
        res.value[0] * factor,
        res.lower[0] * factor,
        torch.where(rows[0], res.x[0] + shift, nan),
        torch.where(cols[0], res.y[0], nan),
        1,
        attained,
        res.iterations,
    )
    _warn_uncertified([sol], rtol, max_iter, tuple(shape) if shape is not None else (m, math.nan))
    return sol
