r"""All sharpness measures on a pooled Hessian-diagonal estimate and on its jackknife replicates, batched.

Given ``R`` replicate slots of summed estimates (slot ``r``: ``sum_g n_g diag_g`` over its groups and
``N_r = sum_g n_g``), every measure of :func:`~lightning_flatness.functional.sharpness_measures` is
evaluated on ``P = R' + 3`` means of one shape per weight tensor: the pooled mean ``sum / N``, the
``R'`` leave-one-out means ``(sum - slot_r) / (N - N_r)`` of the non-empty slots, and the means of
their even and odd halves. The ``P`` eq. 17 problems of a tensor are solved as one batched Newton
iteration warm-started from the pooled solution
(:func:`~lightning_flatness.functional.solvers.solve_normalized_sharpness_batch`); eq. 13 and
eq. 5 are closed forms, evaluated for all ``P`` at once.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor

from lightning_flatness.functional.measures import MEASURES
from lightning_flatness.functional.solvers.normalized import solve_normalized_sharpness_batch

__all__ = ["jackknife_standard_error", "replicate_sharpness_measures"]


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


def replicate_means(sums: Tensor, counts: Tensor, used: list[int]) -> Tensor:
    """``(P, numel)`` means: pooled, then (when ``len(used) >= 2``) the leave-one-out means of the
    ``used`` slots and the means of their even and odd halves.

    Args:
        sums: ``(R, numel)`` float64 slot sums.
        counts: ``(R,)`` float64 samples per slot.
        used: the non-empty slots.
    """
    total, n = sums.sum(dim=0), counts.sum()
    rows = [(total / n)[None]]
    if len(used) >= 2:
        idx = torch.tensor(used, device=sums.device)
        rows.append((total[None] - sums[idx]) / (n - counts[idx])[:, None])
        for half in (idx[0::2], idx[1::2]):
            rows.append((sums[half].sum(dim=0) / counts[half].sum())[None])
    return torch.cat(rows)


def tensor_measures(weight: Tensor, means: Tensor, lam: float) -> dict[str, Tensor]:
    """The three measures of one weight tensor for ``P`` Hessian diagonals: ``{measure: (P,)}``.

    Normalized sharpness (eq. 17) by the batched solver, certified to ``1e-11`` relative;
    matrix-normalized sharpness (eq. 13) ``sqrt(||W||_F^2 sum max(h, 0))`` and the trace (eq. 5)
    ``sum h`` in closed form. Cost ``O(P numel)`` plus the solver's Newton iterations.

    Args:
        weight: ``(m, n, *kernel)`` float64.
        means: ``(P, numel)`` float64 Hessian diagonals.
        lam: ``lambda`` of eq. 17.
    """
    diagonals = means.view(means.shape[0], *weight.shape)
    sols = solve_normalized_sharpness_batch(weight, diagonals, lam)
    return {
        "normalized": torch.stack([s.value for s in sols]).to(means.device),
        "matrix_normalized": torch.sqrt(weight.square().sum() * means.clamp_min(0).sum(dim=1)),
        "hessian_trace": means.sum(dim=1),
    }


def replicate_sharpness_measures(
    weights: Mapping[str, Tensor], sums: Mapping[str, Tensor], counts: Tensor, lam: float
) -> tuple[dict[str, Tensor], int]:
    """Every measure on the pooled mean, its jackknife standard error and its half-sample shift.

    Args:
        weights: ``{name: W}`` float64.
        sums: ``{name: (R, numel)}`` float64, slot ``r`` holding ``sum_g n_g * diag_g`` of its groups.
        counts: ``(R,)`` samples per slot (any numeric dtype).
        lam: ``lambda`` of eq. 17.

    Returns:
        The flat dict ``{key: 0-dim float64}`` with ``"<measure>"`` (sum over tensors),
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
    per_tensor = {name: tensor_measures(weights[name], replicate_means(s, counts_f, used), lam)
                  for name, s in sums.items()}
    names = list(sums)
    out: dict[str, Tensor] = {}
    series: dict[str, Tensor] = {}  # key -> (P,)
    for measure in MEASURES:
        series[measure] = torch.stack([per_tensor[n][measure] for n in names]).sum(dim=0)
        for n in names:
            series[f"{measure}/{n}"] = per_tensor[n][measure]
    for key, values in series.items():
        out[key] = values[0]
    for key, values in series.items():
        if len(used) >= 2:
            loo, halves = values[1:1 + len(used)], values[1 + len(used):]
            out[derived_key(key, "stderr")] = jackknife_standard_error(loo)
            out[derived_key(key, "half_shift")] = halves.mean() - values[0]
        else:
            out[derived_key(key, "stderr")] = values.new_tensor(math.nan)
            out[derived_key(key, "half_shift")] = values.new_tensor(math.nan)
    return out, len(used)
