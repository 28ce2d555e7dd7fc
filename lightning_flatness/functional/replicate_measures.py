r"""All sharpness measures on a pooled Hessian-diagonal estimate and on its jackknife replicates, batched.

Given ``R`` replicate slots of summed estimates (slot ``r``: ``sum_g n_g diag_g`` over its groups and
``N_r = sum_g n_g``), every measure of :func:`~lightning_flatness.functional.sharpness_measures` is
evaluated on ``P = R' + 3`` means of one shape per weight tensor: the pooled mean ``sum / N``, the
``R'`` leave-one-out means ``(sum - slot_r) / (N - N_r)`` of the non-empty slots, and the means of
their even and odd halves. The ``(P, numel)`` means are never materialised: eq. 17's clipped
kernel sums of all ``P`` come chunk by chunk from the slot sums
(:mod:`~lightning_flatness.functional.replicate_curvature`). Eq. 17 is solved for the pooled mean
and the halves as one cold batch
(:func:`~lightning_flatness.functional.solvers.solve_normalized_sharpness_coefficients`: alternating
sweeps, then Newton, each problem certified), together with those of small weights of the same shape
(:func:`tensors_measures`); the leave-one-out values are, by default, the
first-order values at the pooled minimiser
(:mod:`~lightning_flatness.functional.solvers.linearized_replicates`), solved only where the first
order does not hold (:func:`tensor_measures`); eq. 13 and eq. 5 are closed forms,
evaluated for all ``P`` at once.

**Large weights** (:func:`streamed`: ``m n >= STREAM_FROM`` coefficients per mean, times the kernel
size; an LM vocabulary, a VGG head) are reduced to their rows with curvature (:func:`curved_rows`: an
embedding table the samples looked up in few rows) and streamed with the same values: the pooled mean
and the halves formed (three ``(m, n)`` matrices) and solved one at a time, then the leave-one-out first-order
values from a second pass over the slot sums
(:func:`~lightning_flatness.functional.solvers.linearized_replicates.streamed_first_order`). Held in
memory, the ``P`` matrices and the solver's buffers for the batch of three are several times the
tensor's share of the metric's state; streamed, about one share. Where the one-at-a-time solves are
also faster than the batch, and so the threshold: ``benchmarks/RESULTS.md``, round 10.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from lightning_flatness.functional.measures import MEASURES, measure_totals
from lightning_flatness.functional.replicate_curvature import (
    _as_index,
    curvature_chunks,
    formed_curvature,
    replicate_curvature,
)
from lightning_flatness.functional.solvers.linearized_replicates import (
    linearizable,
    objective_at_minimiser,
    streamed_first_order,
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
# m n (eq. 17's coefficients per mean) from which a tensor's means are streamed and solved one at a
# time rather than held and solved together (memory and time: benchmarks/RESULTS.md, round 10)
STREAM_FROM = 1 << 17
STREAM_BUDGET = 1 << 28  # bytes of (m, n) coefficient matrices formed in one pass of the streamed path
# bytes of the P (m, n) coefficient matrices of the weights of one shape held together (tensors_measures)
BATCH_BYTES = 1 << 25
# coefficients (P m n, all problems) up to which the problems of several weights of one shape are solved in
# one call: there a solve costs about its operations' overhead, beyond it passes over the coefficients
# (a larger batch is slower than its parts: benchmarks/RESULTS.md, round 29)
SOLVE_TOGETHER_ENTRIES = 1 << 16


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


def tensor_measures(
    weight: Tensor, sums: Tensor, mix: Tensor, lam: float, jackknife: str = "linearized"
) -> dict[str, Tensor]:
    """The three measures of one weight tensor for the ``P`` means ``mix @ sums``: ``{measure: (P,)}``.

    Normalized sharpness (eq. 17): the pooled mean (problem 0) and the two halves (the last two
    problems) by the batched solver, cold, in one batch (one at a time for large weights,
    :func:`streamed`), certified to ``POOLED_RTOL = 1e-11`` relative. The leave-one-out
    replicates (problems ``1..P-3``):

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

    A weight large enough to be streamed (:func:`streamed`) first loses its rows without curvature in any
    slot (:func:`curved_rows`: they add nothing to any measure; a weight with none measures 0).

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
    return tensors_measures([weight], [sums], mix, lam, jackknife)[0]


def tensors_measures(
    weights: Sequence[Tensor], sums: Sequence[Tensor], mix: Tensor, lam: float, jackknife: str = "linearized"
) -> list[dict[str, Tensor]]:
    """:func:`tensor_measures` of several weight tensors (each with its slot sums), with the same values:
    eq. 17's problems of those held in memory go to the solver together where their shapes are equal (the
    pooled means and halves in one call, the leave-one-out means solved in another), not tensor by tensor,
    as long as a call's coefficients stay within ``SOLVE_TOGETHER_ENTRIES``. A solve of a small tensor is
    hundreds of operations, each mostly per-call overhead (the paper's MLP, two ``100 x 100`` layers; a
    ResNet's first blocks), so a batch of several costs little more than one; beyond that bound a batch
    makes passes over more coefficients than the cache holds and is slower than its parts (measured:
    ``benchmarks/RESULTS.md``, round 29). The caller bounds the memory: every weight's
    ``(P, m, n)`` coefficients are held at once (:func:`replicate_sharpness_measures`: at most
    ``BATCH_BYTES``)."""
    out: list[Optional[dict[str, Tensor]]] = [None] * len(weights)
    held: dict[tuple, list[tuple[int, Tensor, Tensor, Tensor, Tensor]]] = {}
    with intra_op_threads(sum(s.numel() for s in sums), sums[0].device):  # few, memory-bound ops: no handoffs
        for i, (weight, slot_sums) in enumerate(zip(weights, sums)):
            shape = tuple(weight.shape)
            b, square_total = _weight_coefficients(weight, lam)  # ||W||_F^2 of every row (eq. 13)
            if streamed(shape):
                alive = curved_rows(slot_sums, shape)
                if alive is not None:  # rows without curvature in any slot: eq. 5, 13, 17 have no terms there
                    if alive.numel() == 0:
                        zero = slot_sums.new_zeros(mix.shape[0])
                        out[i] = {
                            "normalized": zero,
                            "matrix_normalized": zero.clone(),
                            "hessian_trace": zero.clone(),
                        }
                        continue
                    rows = slot_sums.view(slot_sums.shape[0], shape[0], -1)[:, alive]
                    slot_sums = rows.reshape(slot_sums.shape[0], -1)
                    b, shape = b[alive], (alive.numel(), *shape[1:])
            if streamed(shape):
                # B in the solver's orientation once (contiguous transposed), not twice
                if shape[0] > shape[1]:
                    b = b.T.contiguous().T
                normalized, curvature, trace = _streamed_values(slot_sums, mix, b, shape, jackknife)
                out[i] = _measures(normalized.to(slot_sums.device), square_total, curvature, trace)
            else:
                a, trace = replicate_curvature(slot_sums, mix, shape)
                held.setdefault(shape, []).append((i, a, b, square_total, trace))
        for shape, tensors in held.items():
            values = _normalized_values_of([(a, b) for _, a, b, _, _ in tensors], shape, jackknife)
            for (i, a, _, square_total, trace), normalized in zip(tensors, values):
                out[i] = _measures(normalized.to(a.device), square_total, a.sum(dim=(1, 2)), trace)
    done = [o for o in out if o is not None]
    assert len(done) == len(out), "every weight is measured, streamed or held"
    return done


def _measures(
    normalized: Tensor, square_total: Tensor, curvature: Tensor, trace: Tensor
) -> dict[str, Tensor]:
    return {
        "normalized": normalized,
        "matrix_normalized": torch.sqrt(square_total * curvature),
        "hessian_trace": trace,
    }


def curved_rows(sums: Tensor, shape: tuple) -> Optional[Tensor]:
    """The rows (dim 0) of a weight of ``shape`` whose slot sums ``(R, numel)`` are nonzero somewhere, where
    some are not (else None): an embedding table of which the measured samples looked up few rows, a
    table no input reached. Exactly: a row without curvature in any mean adds nothing to eq. 17 (its row
    variance goes to infinity, taking ``W_ij^2 / (sigma_i sigma'_j)^2`` to 0, whatever the column
    variances), to eq. 13's ``sum max(h, 0)`` or to eq. 5, so the measures of the other rows are those of
    the whole weight (eq. 13's ``||W||_F^2`` stays the whole weight's). Two reductions over the slot sums
    (each row's largest and smallest entry; a NaN counts as curvature), no temporary of their size."""
    by_row = sums.view(sums.shape[0], shape[0], -1)
    curved = (by_row.amax(dim=(0, 2)) != 0) | (by_row.amin(dim=(0, 2)) != 0)
    if bool(curved.all()):
        return None
    return curved.nonzero().squeeze(1)


def _weight_coefficients(weight: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Eq. 17's ``B = sum_k W^2 / (2 lam)`` ``(m, n)`` and eq. 13's ``||W||_F^2``, in one ``(m, n)`` buffer
    (plus the squared weight where there is a kernel to sum over)."""
    m, n = weight.shape[0], weight.shape[1]
    squared = weight.square()
    square = squared.reshape(m, n, -1).sum(dim=2) if squared.numel() > m * n else squared.reshape(m, n)
    total = square.sum()
    return square.div_(2.0 * lam), total


def streamed(shape: tuple) -> bool:
    """Whether :func:`tensor_measures` streams a weight of ``shape`` ``(m, n, *kernel)``: from ``m n >=
    STREAM_FROM * kernel``. The streamed path holds three ``(m, n)`` matrices instead of ``P`` and
    solves one problem at a time, but reads the ``(R, numel)`` slot sums twice: with a kernel the
    second read costs ``kernel`` times more per coefficient, and the held matrices are already small
    beside the state (measured: ``benchmarks/RESULTS.md``, round 10)."""
    return shape[0] * shape[1] >= STREAM_FROM * math.prod(shape[2:])


def _streamed_values(
    sums: Tensor, mix: Tensor, b: Tensor, shape: tuple, jackknife: str
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`tensor_measures`'s eq. 17 values, ``sum A`` and trace ``(P,)`` of a weight it streams
    (:func:`streamed`), holding at most three ``(m, n)`` coefficient matrices and solving one problem at a
    time (not ``P`` matrices and a batch of three).

    The pooled mean and the halves are formed in one pass over the slot sums and solved one by one; the
    first-order leave-one-out values
    (:func:`~lightning_flatness.functional.solvers.linearized_replicates.streamed_first_order`) come
    from a second pass at the pooled minimiser; replicates the first order does not cover, or all of
    them where :func:`first_order_is_off` or ``jackknife="solved"``, are formed in groups and solved
    one at a time. The values are the in-memory path's, except that with a zero weight the two tests of
    coverage differ (``streamed_first_order``): a replicate one of them solves and the other takes to
    first order differs by the first order's error.
    """
    num = mix.shape[0]
    kept = [0] if num < 3 else [0, num - 2, num - 1]  # pooled, halves
    transpose = shape[0] > shape[1]  # the solver's orientation (fewer rows): no transposed copy per solve
    b_solved = b.T.contiguous() if transpose else b
    a, trace = replicate_curvature(sums, mix, shape, rows=kept, transpose=transpose)
    values, curvature = a.new_empty(num), a.new_empty(num)
    curvature[kept] = a.sum(dim=(1, 2))
    sols = [_solve(a[k : k + 1], b_solved, shape)[0] for k in range(len(kept))]
    values[kept] = torch.stack([s.value for s in sols])
    loo = list(range(1, num - 2))
    if not loo:
        return values, curvature, trace
    a0 = a[0].clone()
    del a
    redo = loo
    if jackknife == "linearized":
        x, y = sols[0].row_log_variance, sols[0].col_log_variance
        covered, first, curvature[loo] = streamed_first_order(
            curvature_chunks(sums, mix[loo], shape),
            b,
            a0.T if transpose else a0,
            *((y, x) if transpose else (x, y)),
            num_components=sols[0].num_components,
        )
        values[loo] = first
        uncovered = [r for r, c in zip(loo, covered.tolist()) if not c]
        values[uncovered] = _solved_rows(sums, mix, uncovered, b_solved, shape, transpose)[0]
        off = first_order_is_off(values[1 : num - 2], values[num - 2 :], values[0])
        redo = [r for r in loo if r not in uncovered] if off else []
    values[redo], curvature[redo] = _solved_rows(sums, mix, redo, b_solved, shape, transpose)
    return values, curvature, trace


def _solved_rows(
    sums: Tensor, mix: Tensor, rows: list[int], b: Tensor, shape: tuple, transpose: bool
) -> tuple[Tensor, Tensor]:
    """Eq. 17's certified values and ``sum A`` ``(len(rows),)`` of the means ``rows`` of ``mix``: formed in
    groups of at most ``STREAM_BUDGET`` bytes of coefficients (a pass over the slot sums per group;
    ``transpose``: as ``(n, m)``, with ``b`` so), solved one at a time."""
    values, curvature = sums.new_empty(len(rows)), sums.new_empty(len(rows))
    group = max(1, STREAM_BUDGET // (8 * shape[0] * shape[1]))
    for start in range(0, len(rows), group):
        picked = rows[start : start + group]
        a, _ = formed_curvature(sums, mix[picked], shape, transpose)
        values[start : start + len(picked)] = torch.stack(
            [_solve(a[k : k + 1], b, shape)[0].value for k in range(len(picked))]
        )
        curvature[start : start + len(picked)] = a.sum(dim=(1, 2))
    return values, curvature


def _normalized_values_of(
    problems: list[tuple[Tensor, Tensor]], shape: tuple, jackknife: str
) -> list[Tensor]:
    """Eq. 17 of the ``P`` problems ``(a_p, b)`` (pooled, leave-one-out, halves) of each ``(a, b)`` of
    ``problems`` (weights of one ``shape``): ``(P,)`` float64 each. Solved: the pooled mean, the halves and
    the leave-one-out means the first order does not cover (all of them where it is off, or with
    ``jackknife="solved"``), the problems of the weights together per stage (:func:`_solve_together`)."""
    plans = []
    for a, b in problems:
        num = a.shape[0]
        linear = torch.zeros(num, dtype=torch.bool)
        keep = None
        if jackknife == "linearized" and num > 3:
            covered, keep = linearizable(a[slice(1, num - 2)], b, a[0])
            linear[1 : num - 2] = covered.cpu()
        plans.append((linear, keep))
    solved = [(~linear).nonzero().squeeze(1).to(a.device) for (a, _), (linear, _) in zip(problems, plans)]
    solved_a = [a if rows.numel() == a.shape[0] else a[rows] for (a, _), rows in zip(problems, solved)]
    sols = _solve_together([(a, b) for a, (_, b) in zip(solved_a, problems)], shape)  # (all rows: no copy)
    values, redo = [], []
    for (a, b), (linear, keep), rows, found in zip(problems, plans, solved, sols):
        num = a.shape[0]
        v = a.new_empty(num)
        v[rows] = torch.stack([s.value for s in found])
        values.append(v)
        if not bool(linear.any()):
            continue
        index = linear.nonzero().squeeze(1).to(a.device)
        first = index.tolist()
        picked = _as_index(first)  # usually every leave-one-out row: a view, not a copy of (R', m, n)
        v[index] = objective_at_minimiser(
            a[picked],
            b,
            found[0].row_log_variance,  # the pooled mean's minimiser (problem 0 is always solved)
            found[0].col_log_variance,
            _replicates_of(keep, _as_index([r - 1 for r in first])),
        )
        if first_order_is_off(v[1 : num - 2], v[num - 2 :], v[0]):
            redo.append((len(values) - 1, index))  # the others are solved already
    if redo:
        again = _solve_together([(problems[t][0][index], problems[t][1]) for t, index in redo], shape)
        for (t, index), found in zip(redo, again):
            values[t][index] = torch.stack([s.value for s in found])
    return values


def _solve_together(problems: list[tuple[Tensor, Tensor]], shape: tuple) -> list[list]:
    """:func:`_solve` of each ``(a, b)`` (``(P_t, m, n)`` and ``(m, n)``, weights of one ``shape``),
    consecutive ones in one call while their coefficients total at most ``SOLVE_TOGETHER_ENTRIES``
    (stacked along the batch, each its own ``B``; the solutions split back): where a solve is per-call
    overhead, not passes over its coefficients."""
    out: list[list] = []
    start = 0
    while start < len(problems):
        stop, entries = start + 1, problems[start][0].numel()
        while stop < len(problems) and entries + problems[stop][0].numel() <= SOLVE_TOGETHER_ENTRIES:
            entries += problems[stop][0].numel()
            stop += 1
        part = problems[start:stop]
        if len(part) == 1:
            out.append(_solve(*part[0], shape))
        else:
            a = torch.cat([a for a, _ in part])
            b = torch.cat([b.expand(a_t.shape[0], *b.shape) for a_t, b in part])
            sols = _solve(a, b, shape)
            for a_t, _ in part:
                out.append(sols[: a_t.shape[0]])
                sols = sols[a_t.shape[0] :]
        start = stop
    return out


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


def _batches_of_one_shape(weights: Mapping[str, Tensor], sums: Mapping[str, Tensor], num_means: int) -> list:
    """The ``ndim >= 2`` weights of ``sums`` in lists of one shape for :func:`tensors_measures`, in order of
    first appearance: weights of a shape whose pooled means and halves of two fit one call
    (``SOLVE_TOGETHER_ENTRIES``) together while their ``num_means`` coefficient matrices hold at most
    ``BATCH_BYTES`` (a model's dozens of equal blocks are solved a few at a time, not all held at once);
    others alone, each formed just before its solve (while in cache)."""
    batches: list[list[str]] = []
    open_batch: dict[tuple, tuple[list[str], int]] = {}
    for name in sums:
        shape = tuple(weights[name].shape)
        if len(shape) < 2:
            continue
        size = 8 * num_means * shape[0] * shape[1]
        if streamed(shape) or 2 * 3 * shape[0] * shape[1] > SOLVE_TOGETHER_ENTRIES:
            batches.append([name])
            continue
        current = open_batch.get(shape)
        if current is not None and current[1] + size <= BATCH_BYTES:
            current[0].append(name)
            open_batch[shape] = (current[0], current[1] + size)
        else:
            batch = [name]
            batches.append(batch)
            open_batch[shape] = (batch, size)
    return batches


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
    measured: dict[str, dict[str, Tensor]] = {}
    for names in _batches_of_one_shape(weights, sums, mix.shape[0]):
        found = tensors_measures([weights[n] for n in names], [sums[n] for n in names], mix, lam, jackknife)
        measured.update(zip(names, found))
    per_tensor = {
        name: measured[name] if weights[name].ndim >= 2 else {"hessian_trace": mix @ s.sum(dim=1)}
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
