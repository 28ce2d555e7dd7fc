r"""All sharpness measures on a pooled Hessian-diagonal estimate and on its jackknife replicates, batched.

Given ``R`` replicate slots of summed estimates (slot ``r``: ``sum_g n_g diag_g`` over its groups and
``N_r = sum_g n_g``), every measure of :func:`~lightning_flatness.functional.sharpness_measures` is
evaluated on ``P = R' + 3`` means of one shape per weight tensor: the pooled mean ``sum / N``, the
``R'`` leave-one-out means ``(sum - slot_r) / (N - N_r)`` of the non-empty slots, and the means of
their even and odd halves. The means are never materialised: eq. 17's coefficients of all ``P``
problems come from per-slot kernel sums (linear) plus a clipping correction on the entries where
some slot is negative; the ``P`` eq. 17 problems of a tensor are solved as one batched Newton
iteration warm-started from the pooled solution
(:func:`~lightning_flatness.functional.solvers.solve_normalized_sharpness_coefficients`); eq. 13
and eq. 5 are closed forms, evaluated for all ``P`` at once.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor

from lightning_flatness.functional.measures import MEASURES, measure_totals
from lightning_flatness.functional.solvers.normalized import (
    intra_op_threads,
    solve_normalized_sharpness_coefficients,
)

__all__ = ["jackknife_standard_error", "replicate_sharpness_measures"]

POOLED_RTOL = 1e-11  # certified relative accuracy of the pooled value (the solver's default)
REPLICATE_RTOL = 1e-9  # ... of the leave-one-out and half values (their spread is ~1e-2 relative)


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


def replicate_curvature(sums: Tensor, mix: Tensor, shape: torch.Size) -> tuple[Tensor, Tensor]:
    """Eq. 17's ``A = sum_k max(mean_p, 0)`` ``(P, m, n)`` and the trace ``sum mean_p`` ``(P,)`` of the
    ``P`` means ``mean_p = sum_r mix_pr sums_r``, without materialising the ``(P, numel)`` means.

    With ``mix >= 0``, ``mean_p < 0`` only at entries where some slot is negative: ``A_p`` is the
    linear kernel sum ``mix @ (kernel sums of the slots)`` wherever no slot is negative, and the
    clipped sum of the means, computed directly, on the ``(i, j)`` that hold a negative slot value.
    Cost: two passes over the ``(R, numel)`` sums, plus ``O(P R kernel)`` per such ``(i, j)`` (none
    for exact, non-negative GGN diagonals).

    Args:
        sums: ``(R, numel)`` float64 slot sums of a tensor of ``shape`` ``(m, n, *kernel)``.
        mix: ``(P, R)`` non-negative float64 (:func:`replicate_weights`).
    """
    num_slots = sums.shape[0]
    m, n = shape[0], shape[1]
    kernel = math.prod(shape[2:])
    by_kernel = sums.view(num_slots, m * n, kernel)
    slot_kernel_sums = by_kernel.sum(dim=2)  # (R, m n)
    lin = mix @ slot_kernel_sums  # (P, m n)
    trace = mix @ slot_kernel_sums.sum(dim=1)
    # (i, j) with a negative entry in some slot: their clipped sums are computed from the means directly
    # (adding max(-x, 0) to the linear sum x would leave rounding residue, e.g. -1e-18 or +1e-18 where the
    # clipped sum is exactly 0, and an exact zero is what tells the solver an infimum is unattained)
    touched = (by_kernel.amin(dim=(0, 2)) < 0).nonzero().squeeze(1)  # (T,) indices into m n
    if touched.numel():
        means = torch.einsum("pr,rtk->ptk", mix, by_kernel[:, touched])  # (P, T, kernel)
        lin[:, touched] = means.clamp_min_(0).sum(dim=2)
    return lin.view(-1, m, n), trace


def tensor_measures(weight: Tensor, sums: Tensor, mix: Tensor, lam: float) -> dict[str, Tensor]:
    """The three measures of one weight tensor for the ``P`` means ``mix @ sums``: ``{measure: (P,)}``.

    Normalized sharpness (eq. 17) by the batched solver on the coefficient matrices (problem 0,
    the pooled mean, cold, certified to ``POOLED_RTOL = 1e-11`` relative; the others warm-started
    from it, certified to ``REPLICATE_RTOL = 1e-9``);
    matrix-normalized sharpness (eq. 13) ``sqrt(||W||_F^2 sum max(h, 0))`` and the trace (eq. 5)
    ``sum h`` in closed form.

    Args:
        weight: ``(m, n, *kernel)`` float64.
        sums: ``(R, numel)`` float64 slot sums.
        mix: ``(P, R)`` (:func:`replicate_weights`).
        lam: ``lambda`` of eq. 17.
    """
    with intra_op_threads(sums.numel(), sums.device):  # few, memory-bound ops: no thread handoffs
        a, trace = replicate_curvature(sums, mix, weight.shape)
        b = weight.square().reshape(a.shape[1], a.shape[2], -1).sum(dim=2) / (2.0 * lam)
        sols = solve_normalized_sharpness_coefficients(
            a, b, shape=tuple(weight.shape), rtol=POOLED_RTOL, replicate_rtol=REPLICATE_RTOL
        )
    return {
        "normalized": torch.stack([s.value for s in sols]).to(sums.device),
        "matrix_normalized": torch.sqrt(weight.square().sum() * a.sum(dim=(1, 2))),
        "hessian_trace": trace,
    }


def replicate_sharpness_measures(
    weights: Mapping[str, Tensor], sums: Mapping[str, Tensor], counts: Tensor, lam: float
) -> tuple[dict[str, Tensor], int]:
    """Every measure on the pooled mean, its jackknife standard error and its half-sample shift.

    Args:
        weights: ``{name: W}`` float64 (1-D tensors enter the trace only).
        sums: ``{name: (R, numel)}`` float64, slot ``r`` holding ``sum_g n_g * diag_g`` of its groups.
        counts: ``(R,)`` samples per slot (any numeric dtype).
        lam: ``lambda`` of eq. 17.

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
    counts_f = counts.to(torch.float64)
    used = [int(r) for r in torch.nonzero(counts_f > 0).flatten().tolist()]
    mix = replicate_weights(counts_f, used)
    per_tensor = {
        name: tensor_measures(weights[name], s, mix, lam)
        if weights[name].ndim >= 2
        else {"hessian_trace": mix @ s.sum(dim=1)}
        for name, s in sums.items()
    }  # 1-D tensors (biases, normalization scales) enter the trace only (footnote 5; eq. 5 counts them)
    series: dict[str, Tensor] = dict(measure_totals(per_tensor))  # key -> (P,)
    for measure in MEASURES:
        series.update({f"{measure}/{n}": v[measure] for n, v in per_tensor.items() if measure in v})
    out: dict[str, Tensor] = {}
    for key, values in series.items():
        out[key] = values[0]
    for key, values in series.items():
        if len(used) >= 2:
            loo, halves = values[1 : 1 + len(used)], values[1 + len(used) :]
            out[derived_key(key, "stderr")] = jackknife_standard_error(loo)
            out[derived_key(key, "half_shift")] = halves.mean() - values[0]
        else:
            out[derived_key(key, "stderr")] = values.new_tensor(math.nan)
            out[derived_key(key, "half_shift")] = values.new_tensor(math.nan)
    return out, len(used)
