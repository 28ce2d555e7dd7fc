r"""All sharpness measures on a pooled Hessian-diagonal estimate and on its jackknife replicates, batched.

Given ``R`` replicate slots of summed estimates (slot ``r``: ``sum_g n_g diag_g`` over its groups and
``N_r = sum_g n_g``), every measure of :func:`~lightning_flatness.functional.sharpness_measures` is
evaluated on ``P = R' + 3`` means of one shape per weight tensor: the pooled mean ``sum / N``, the
``R'`` leave-one-out means ``(sum - slot_r) / (N - N_r)`` of the non-empty slots, and the means of
their even and odd halves. The ``(P, numel)`` means are never materialised: eq. 17's clipped
kernel sums of all ``P`` come chunk by chunk from the slot sums (:func:`replicate_curvature`). Eq. 17
is solved for the pooled mean and the halves as one cold batch
(:func:`~lightning_flatness.functional.solvers.solve_normalized_sharpness_coefficients`: alternating
sweeps, then Newton, each problem certified); the leave-one-out values are, by default, the
first-order values at the pooled minimiser
(:mod:`~lightning_flatness.functional.solvers.linearized_replicates`), solved only where the first
order does not hold (:func:`tensor_measures`); eq. 13 and eq. 5 are closed forms,
evaluated for all ``P`` at once.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

from lightning_flatness.functional.measures import MEASURES, measure_totals
from lightning_flatness.functional.solvers.linearized_replicates import (
    linearizable,
    objective_at_minimiser,
)
from lightning_flatness.functional.solvers.normalized import (
    intra_op_threads,
    solve_normalized_sharpness_coefficients,
)

__all__ = ["JACKKNIFE_MODES", "jackknife_standard_error", "replicate_sharpness_measures"]

POOLED_RTOL = 1e-11  # certified relative accuracy of the pooled value (the solver's default)
REPLICATE_RTOL = 1e-11  # ... of the solved leave-one-out and half values (see tensor_measures)
JACKKNIFE_MODES = ("linearized", "solved")
# largest |half shift| / ((R' - 1) jackknife s.e.) of a tensor whose leave-one-out values stay first-order
# (above it they are solved): an estimate of the first order's relative error in the standard error
LINEARIZATION_TOLERANCE = 0.05
# largest first-order standard error of a tensor, relative to its value, whose leave-one-out values stay
# first-order: the first order's error grows with the relative size of the replicates' deviations
# (measured: benchmarks/results/linearized_jackknife.md, "Small samples")
LINEARIZATION_MAX_RELATIVE_SPREAD = 0.1


def jackknife_standard_error(leave_one_out: Tensor) -> Tensor:
    """Delete-one jackknife standard error ``sqrt((R-1)/R * sum_r (S_(-r) - mean_r S_(-r))^2)``.

    Args:
        leave_one_out: ``(R, ...)``, the statistic evaluated with replicate ``r`` left out, ``R >= 2``.

    Example:
        >>> import torch
        >>> jackknife_standard_error(torch.tensor([1.0, 2.0, 3.0]))  # sqrt(2/3 * 2)
        tensor(1.1547)
    """
    r = leave_one_out.shape[0]
    deviation = leave_one_out - leave_one_out.mean(dim=0)
    return torch.sqrt((r - 1) / r * deviation.pow(2).sum(dim=0))


def derived_key(key: str, suffix: str) -> str:
    """``"normalized"`` -> ``"normalized_<suffix>"``, ``"normalized/fc.weight"`` ->
    ``"normalized_<suffix>/fc.weight"``."""
    measure, sep, rest = key.partition("/")
    return f"{measure}_{suffix}{sep}{rest}"


def replicate_weights(counts: Tensor, used: list[int]) -> Tensor:
    """``(P, R)`` non-negative weights ``C`` with ``mean_p = sum_r C_pr slot_r``: the pooled mean, then
    (when ``len(used) >= 2``) the leave-one-out means of the ``used`` slots and the means of their
    even and odd halves.

    Args:
        counts: ``(R,)`` float64 samples per slot.
        used: the non-empty slots.
    """
    n = counts.sum()
    rows = [torch.full_like(counts, 1.0 / float(n))]
    if len(used) >= 2:
        for r in used:
            row = torch.full_like(counts, 1.0 / float(n - counts[r]))
            row[r] = 0.0
            rows.append(row)
        for half in (used[0::2], used[1::2]):
            row = torch.zeros_like(counts)
            row[half] = 1.0 / float(counts[half].sum())
            rows.append(row)
    return torch.stack(rows)


_CHUNK = 1 << 15  # entries per slot in one chunk of replicate_curvature (P such rows fit in L2/L3 cache)


def replicate_curvature(sums: Tensor, mix: Tensor, shape: torch.Size) -> tuple[Tensor, Tensor]:
    """Eq. 17's ``A = sum_k max(mean_p, 0)`` ``(P, m, n)`` and the trace ``sum mean_p`` ``(P,)`` of the
    ``P`` means ``mean_p = sum_r mix_pr sums_r``, without materialising the ``(P, numel)`` means.

    Every row of ``mix`` from :func:`replicate_weights` is one constant ``c_p > 0`` on a set of slots, so
    ``max(mean_p, 0) = c_p max(sum_{r in set} sums_r, 0)``: the sums of each set are formed slot by slot,
    leave-one-out sets as the sum of all minus one slot (exactly 0 where every other slot is exactly 0,
    which is what tells the solver an infimum is unattained; elsewhere within ``eps`` times the
    largest slot of the entry), clipped and summed over the kernel, chunk by chunk (``_CHUNK`` entries
    per slot, so the ``P`` rows of a chunk stay in cache; the slot totals of the trace from the same
    chunks). Cost: about ``3 R + 2 P`` flops per weight entry and one read of the ``(R, numel)`` sums.
    Any other ``mix`` takes the dense product ``mix @ sums``.

    Args:
        sums: ``(R, numel)`` float64 slot sums of a tensor of ``shape`` ``(m, n, *kernel)``.
        mix: ``(P, R)`` non-negative float64 (:func:`replicate_weights`).
    """
    m, n = shape[0], shape[1]
    kernel = math.prod(shape[2:])
    support = mix > 0
    coef = mix.amax(dim=1)
    if not torch.equal(mix, torch.where(support, coef[:, None], torch.zeros_like(mix))):
        return _dense_curvature(sums, mix, m, n, kernel)
    used = support.any(dim=0).nonzero().squeeze(1).tolist()
    position = {slot: k for k, slot in enumerate(used)}
    num = mix.shape[0]
    # rows of mix: the pooled mean (every used slot), leave-one-out means, and other sets (the halves)
    loo_rows, loo_slots, other = [], [], []
    for p, row in enumerate(support.tolist()):
        slots = [position[r] for r, on in enumerate(row) if on]
        if len(slots) == len(used) - 1 and len(used) >= 2:
            loo_rows.append(p)
            loo_slots.append(next(k for k in range(len(used)) if k not in slots))
        else:
            other.append((p, slots))
    sub = sums if used == list(range(sums.shape[0])) else sums[used]
    loo_block = (
        loo_rows == list(range(loo_rows[0], loo_rows[0] + len(loo_rows)))
        and loo_slots == list(range(len(used)))
        if loo_rows
        else False
    )
    a = sums.new_empty(num, m * n)
    step = max(1, _CHUNK // kernel) * kernel
    means = sums.new_empty(num, min(step, m * n * kernel))
    slot_totals = sums.new_zeros(sub.shape[0])  # summed chunk by chunk while the chunk is in cache
    workspace = (sums.new_ones(kernel), sums.new_empty(num * (step // kernel)))
    for lo in range(0, m * n * kernel, step):
        s = sub[:, lo : lo + step]
        c = s.shape[1]
        chunk = means[:, :c]
        total = s.sum(dim=0)
        slot_totals += s.sum(dim=1)
        if loo_block:  # one op: sum - slot (slots all exactly 0 but one give exactly 0)
            torch.sub(total, s, out=chunk[loo_rows[0] : loo_rows[0] + len(loo_rows)])
        else:
            for p, k in zip(loo_rows, loo_slots):
                torch.sub(total, s[k], out=chunk[p])
        for p, slots in other:
            if len(slots) == len(used):
                chunk[p] = total
            else:
                torch.sum(s[_as_index(slots)], dim=0, out=chunk[p])
        _kernel_sum(chunk.clamp_min_(0), kernel, a[:, lo // kernel : (lo + c) // kernel], workspace)
    a *= coef[:, None]
    trace = (support[:, used].to(sums.dtype) @ slot_totals) * coef
    return a.view(num, m, n), trace


def _kernel_sum(clipped: Tensor, kernel: int, out: Tensor, workspace: tuple[Tensor, Tensor]) -> None:
    """``out = clipped.view(P, c // kernel, kernel).sum(2)``; a matrix-vector product with ones where the
    chunk is contiguous (faster than a reduction over a short innermost dimension on the CPU; measured
    in ``benchmarks/results/linearized_jackknife.md``)."""
    if kernel == 1:
        out.copy_(clipped)
    elif clipped.is_contiguous():
        ones, buffer = workspace
        flat = buffer[: clipped.numel() // kernel]
        torch.mv(clipped.view(-1, kernel), ones, out=flat)
        out.copy_(flat.view(out.shape))
    else:  # the last, partial chunk
        torch.sum(clipped.view(clipped.shape[0], -1, kernel), dim=2, out=out)


def _as_index(slots: list[int]):
    """``slots`` as a slice where they are evenly spaced (indexing then gives a view, not a gathered
    copy: the halves' slots, the leave-one-out rows)."""
    step = slots[1] - slots[0] if len(slots) > 1 else 1
    if step > 0 and slots == list(range(slots[0], slots[-1] + 1, step)):
        return slice(slots[0], slots[-1] + 1, step)
    return slots


def _dense_curvature(sums: Tensor, mix: Tensor, m: int, n: int, kernel: int) -> tuple[Tensor, Tensor]:
    """:func:`replicate_curvature` for a general ``mix``: the means ``mix @ sums``, clipped, kernel-summed."""
    means = (mix @ sums).view(-1, m * n, kernel)
    return means.clamp_min(0).sum(dim=2).view(-1, m, n), means.sum(dim=(1, 2))


def tensor_measures(
    weight: Tensor, sums: Tensor, mix: Tensor, lam: float, jackknife: str = "linearized"
) -> dict[str, Tensor]:
    """The three measures of one weight tensor for the ``P`` means ``mix @ sums``: ``{measure: (P,)}``.

    Normalized sharpness (eq. 17): the pooled mean (problem 0) and the two halves (the last two
    problems) by the batched solver, cold, in one batch, certified to ``POOLED_RTOL = 1e-11``
    relative. The leave-one-out replicates (problems ``1..P-3``):

    - ``jackknife="linearized"`` (default): the replicate's objective at the pooled minimiser,
      ``V_0 + sum (A_r - A_0) (sigma_i sigma'_j)^2`` (first order in ``A_r - A_0``, Danskin's
      theorem; an upper bound of the replicate's minimum;
      :mod:`~lightning_flatness.functional.solvers.linearized_replicates`), for every replicate with
      the pooled problem's component layout or one component inside it (units that die without
      the left-out slot drop out); the others (e.g. a unit that comes alive) are solved in the
      same batch. No Newton step for the linearized ones. The first
      order misses about half of each replicate's squared Newton decrement, whose mean is about
      ``|half shift| / (R' - 1)`` (a leave-one-out mean deviates ``R' - 1`` times less in variance
      from the pooled one than a half does); so where ``|half shift| > LINEARIZATION_TOLERANCE
      (R' - 1) s.e.`` (0.05: a standard error possibly more than about 5% off), or where the
      first-order s.e. exceeds ``LINEARIZATION_MAX_RELATIVE_SPREAD = 0.1`` of the tensor's value
      (replicates far from the pooled mean: small samples, noisy estimators), the tensor's
      leave-one-out values are solved instead.
    - ``jackknife="solved"``: every replicate solved in the batch, certified to ``REPLICATE_RTOL``.

    The halves are always solved: their shift from the pooled value is the second-order (bias)
    effect that a linearization would miss. Matrix-normalized sharpness (eq. 13)
    ``sqrt(||W||_F^2 sum max(h, 0))`` and the trace (eq. 5) ``sum h`` in closed form for all ``P``.

    Args:
        weight: ``(m, n, *kernel)`` float64.
        sums: ``(R, numel)`` float64 slot sums.
        mix: ``(P, R)`` (:func:`replicate_weights`: pooled, leave-one-out, halves).
        lam: ``lambda`` of eq. 17.
        jackknife: ``"linearized"`` or ``"solved"``.
    """
    with intra_op_threads(sums.numel(), sums.device):  # few, memory-bound ops: no thread handoffs
        a, trace = replicate_curvature(sums, mix, weight.shape)
        square = weight.square().reshape(a.shape[1], a.shape[2], -1).sum(dim=2)  # ||W_ij||^2 over the kernel
        b = square / (2.0 * lam)
        normalized = _normalized_values(a, b, tuple(weight.shape), jackknife)
    return {
        "normalized": normalized.to(sums.device),
        "matrix_normalized": torch.sqrt(square.sum() * a.sum(dim=(1, 2))),
        "hessian_trace": trace,
    }


def _normalized_values(a: Tensor, b: Tensor, shape: tuple, jackknife: str) -> Tensor:
    """Eq. 17 of the ``P`` problems ``(a_p, b)`` (pooled, leave-one-out, halves): ``(P,)`` float64."""
    num = a.shape[0]
    loo = slice(1, num - 2)
    linear = torch.zeros(num, dtype=torch.bool)
    keep = None
    if jackknife == "linearized" and num > 3:
        covered, keep = linearizable(a[loo], b, a[0])
        linear[loo] = covered.cpu()
    if not bool(linear.any()):
        return _solved_values(a, b, shape)
    solved = (~linear).nonzero().squeeze(1).to(a.device)
    rows = linear.nonzero().squeeze(1).to(a.device)
    sols = _solve(a[solved], b, shape)
    values = a.new_empty(num)
    values[solved] = torch.stack([s.value for s in sols])
    pooled = sols[0]
    first = rows.tolist()
    picked = _as_index(first)  # usually every leave-one-out row: a view, not a copy of (R', m, n)
    values[rows] = objective_at_minimiser(
        a[picked],
        b,
        pooled.row_log_variance,
        pooled.col_log_variance,
        _replicates_of(keep, _as_index([r - 1 for r in first])),
    )
    if first_order_is_off(values[loo], values[num - 2 :], values[0]):
        values[rows] = _solved_values(a[rows], b, shape)  # the others are solved already
    return values


def first_order_is_off(leave_one_out: Tensor, halves: Tensor, pooled: Tensor) -> bool:
    """The tensor-level checks of first-order leave-one-out values (:func:`tensor_measures`): the half
    shift above ``LINEARIZATION_TOLERANCE (R' - 1)`` jackknife standard errors (the first order misses
    about ``|half shift| / (R' - 1)`` per replicate), or the standard error above
    ``LINEARIZATION_MAX_RELATIVE_SPREAD`` of the pooled value (replicates far from the pooled mean).

    Args:
        leave_one_out: ``(R',)`` eq. 17 values of the leave-one-out means (first order where covered).
        halves: ``(2,)`` solved values of the two halves.
        pooled: the pooled value.
    """
    spread = jackknife_standard_error(leave_one_out)
    shift = halves.mean() - pooled
    nonlinear = shift.abs() > LINEARIZATION_TOLERANCE * (leave_one_out.shape[0] - 1) * spread
    return bool(nonlinear | (spread > LINEARIZATION_MAX_RELATIVE_SPREAD * pooled))


def _replicates_of(keep: Any, index: Any) -> Any:
    """The component entries of the replicates ``index`` (as :func:`linearizable` gives them)."""
    if keep is None:
        return None
    if isinstance(keep, tuple):
        return tuple(k[index] for k in keep)
    return keep[index]


def _solve(a: Tensor, b: Tensor, shape: tuple) -> list:
    """All problems as one cold batch (alternating sweeps, then Newton), certified to ``POOLED_RTOL``.

    Cold, not warm-started from the pooled optimum: the sweeps bring every mean close to its optimum
    cheaply, where a start at the pooled optimum takes several damped Newton iterations for a half or a
    leave-one-out mean, each a factorisation or conjugate-gradient solve (measured:
    ``benchmarks/results/linearized_jackknife.md``, ``benchmarks/bench_cold_vs_warm.py``)."""
    assert POOLED_RTOL == REPLICATE_RTOL  # one tolerance for the batch
    return solve_normalized_sharpness_coefficients(a, b, shape=shape, rtol=POOLED_RTOL, warm_start=False)


def _solved_values(a: Tensor, b: Tensor, shape: tuple) -> Tensor:
    return torch.stack([s.value for s in _solve(a, b, shape)])


def replicate_sharpness_measures(
    weights: Mapping[str, Tensor],
    sums: Mapping[str, Tensor],
    counts: Tensor,
    lam: float,
    jackknife: str = "linearized",
) -> tuple[dict[str, Tensor], int]:
    """Every measure on the pooled mean, its jackknife standard error and its half-sample shift.

    Args:
        weights: ``{name: W}`` float64 (1-D tensors enter the trace only).
        sums: ``{name: (R, numel)}`` float64, slot ``r`` holding ``sum_g n_g * diag_g`` of its groups.
        counts: ``(R,)`` samples per slot (any numeric dtype).
        lam: ``lambda`` of eq. 17.
        jackknife: how the leave-one-out values of eq. 17 are obtained: ``"linearized"`` (first order
            at the pooled minimiser where exact to first order, solved elsewhere) or ``"solved"``
            (every one solved); see :func:`tensor_measures`.

    Returns:
        The flat dict ``{key: 0-dim float64}`` with ``"<measure>"`` (sum over tensors; the trace over
        every tensor, eq. 5, and ``"hessian_trace_weights"`` over the ``ndim >= 2`` ones; 1-D tensors
        have the trace alone),
        ``"<measure>/<name>"``, ``"<measure>_stderr"``, ``"<measure>_stderr/<name>"`` (NaN when fewer
        than 2 slots hold samples), ``"<measure>_half_shift"``, ``"<measure>_half_shift/<name>"``
        (mean over the two halves minus the pooled value; NaN likewise), and the number of
        non-empty slots used by the jackknife.

    Example:
        >>> import torch
        >>> w = {"fc.weight": torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)}
        >>> sums = {"fc.weight": torch.tensor([[0.1] * 4, [0.2] * 4], dtype=torch.float64)}
        >>> out, used = replicate_sharpness_measures(w, sums, torch.tensor([1.0, 1.0]), 0.5)
        >>> used, round(out["hessian_trace"].item(), 6), round(out["hessian_trace_stderr"].item(), 6)
        (2, 0.6, 0.2)
    """
    if jackknife not in JACKKNIFE_MODES:
        raise ValueError(f"jackknife must be one of {JACKKNIFE_MODES}, got {jackknife!r}.")
    counts_f = counts.to(torch.float64)
    used = [int(r) for r in torch.nonzero(counts_f > 0).flatten().tolist()]
    mix = replicate_weights(counts_f, used)
    per_tensor = {
        name: tensor_measures(weights[name], s, mix, lam, jackknife)
        if weights[name].ndim >= 2
        else {"hessian_trace": mix @ s.sum(dim=1)}
        for name, s in sums.items()
    }  # 1-D tensors (biases, normalization scales) enter the trace only (footnote 5; eq. 5 counts them)
    series: dict[str, Tensor] = dict(measure_totals(per_tensor))  # key -> (P,)
    for measure in MEASURES:
        series.update({f"{measure}/{n}": v[measure] for n, v in per_tensor.items() if measure in v})
    keys = list(series)
    table = torch.stack([series[k] for k in keys])  # (keys, P): every series at once, a few ops in all
    out: dict[str, Tensor] = dict(zip(keys, table[:, 0].unbind()))
    if len(used) >= 2:
        loo, halves = table[:, 1 : 1 + len(used)], table[:, 1 + len(used) :]
        stderr = jackknife_standard_error(loo.T).unbind()
        shift = (halves.mean(dim=1) - table[:, 0]).unbind()
    else:
        stderr = shift = table.new_full((len(keys),), math.nan).unbind()
    for k, e, h in zip(keys, stderr, shift):
        out[derived_key(k, "stderr")], out[derived_key(k, "half_shift")] = e, h
    return out, len(used)
