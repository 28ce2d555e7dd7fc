"""All sharpness measures of a network from one set of Hessian-diagonal estimates."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from lightning_flatness.functional.solvers import (
    hessian_trace,
    matrix_normalized_sharpness,
    normalized_sharpness,
)

__all__ = [
    "sharpness_measures",
    "measure_totals",
    "tensor_measure_names",
    "MEASURES",
    "TOTALS",
    "WEIGHTS_TRACE",
]

MEASURES = ("normalized", "matrix_normalized", "hessian_trace")
#: eq. 5 restricted to the weight tensors the normalized measures count (``ndim >= 2``)
WEIGHTS_TRACE = "hessian_trace_weights"
#: the keys of the totals: every measure summed over its tensors, and the weights-only trace
TOTALS = (*MEASURES, WEIGHTS_TRACE)


def tensor_measure_names(shape: Sequence[int]) -> tuple[str, ...]:
    """The per-tensor measures of a tensor of ``shape``: all three for ``ndim >= 2``; the trace alone for
    1-D tensors (biases, normalization scales: footnote 5 leaves them out of eq. 13 and 17, eq. 5 counts
    every parameter)."""
    return MEASURES if len(shape) >= 2 else ("hessian_trace",)


def measure_totals(per_tensor: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The totals ``{key: value}`` for every key of :data:`TOTALS` from ``{name: {measure: value}}``.

    Each measure is summed over the tensors that have it (:func:`tensor_measure_names`; ``0`` when none
    has it); :data:`WEIGHTS_TRACE` sums the trace over the tensors that have the normalized measure. The
    values may be scalars or equally shaped series (replicates), summed elementwise.
    """
    like = next(iter(next(iter(per_tensor.values())).values()))
    zero = torch.zeros_like(like)

    def total(measure: str, names: list[str]) -> Tensor:
        return torch.stack([per_tensor[n][measure] for n in names]).sum(dim=0) if names else zero.clone()

    weights = [n for n, m in per_tensor.items() if "normalized" in m]
    out = {m: total(m, [n for n, v in per_tensor.items() if m in v]) for m in MEASURES}
    out[WEIGHTS_TRACE] = total("hessian_trace", weights)
    return out


def sharpness_measures(
    weights: Mapping[str, Tensor], diagonals: Mapping[str, Tensor], lam: float = 0.5
) -> dict[str, Tensor]:
    """Normalized sharpness (eq. 17), matrix-normalized sharpness (eq. 13) and the Hessian trace
    (eq. 5), in total and per tensor.

    Args:
        weights: ``{name: W}`` parameter tensors. Tensors with ``ndim >= 2`` get all three measures;
            1-D tensors (biases, normalization scales) enter the trace only (footnote 5 leaves them
            out of eq. 13 and 17; eq. 5 counts every parameter). A tensor with ``ndim >= 3`` is read as
            a convolution's (one variance per dim 0 and dim 1 entry, the rest a kernel); a stack of
            expert matrices is split into its experts first
            (:func:`~lightning_flatness.functional.parameters.split_matrix_stacks` on both dicts, as
            :class:`~lightning_flatness.measure.SharpnessMeasurement` does).
        diagonals: ``{name: diag H}`` with the same names and shapes (unclipped; the normalized
            measures clip negative entries to 0 as Algorithm 1 does, the trace does not).
        lam: the PAC-Bayes ``lambda`` of eq. 17 (the value scales as ``lam ** -0.5``).

    Returns:
        Flat ``{key: scalar}`` in the weights' dtype: ``"normalized"``, ``"matrix_normalized"``,
        ``"hessian_trace"`` (sums over the tensors that have each: the trace over all of them, eq. 5),
        ``"hessian_trace_weights"`` (the trace over the ``ndim >= 2`` tensors only) and
        ``"<measure>/<name>"`` for each tensor and each of its measures.

    Example:
        >>> import torch
        >>> w = {"fc.weight": torch.ones(2, 2), "fc.bias": torch.ones(2)}
        >>> h = {"fc.weight": torch.full((2, 2), 0.5), "fc.bias": torch.full((2,), 0.25)}
        >>> out = sharpness_measures(w, h)
        >>> float(out["hessian_trace"]), float(out["hessian_trace_weights"]), "normalized/fc.bias" in out
        (2.5, 2.0, False)
    """
    missing = set(weights) ^ set(diagonals)
    if missing:
        raise ValueError(
            f"weights and Hessian diagonals must name the same tensors; unmatched: {sorted(missing)}."
        )
    per_tensor: dict[str, dict[str, Tensor]] = {}
    for name, w in weights.items():
        h = diagonals[name]
        if h.shape != w.shape:
            raise ValueError(
                f"Hessian diagonal of {name!r} has shape {tuple(h.shape)}, weight has {tuple(w.shape)}."
            )
        per_tensor[name] = {"hessian_trace": hessian_trace(h)}
        if w.ndim >= 2:
            per_tensor[name]["normalized"] = normalized_sharpness(w, h, lam=lam)
            per_tensor[name]["matrix_normalized"] = matrix_normalized_sharpness(w, h)
    out = {f"{m}/{n}": values[m] for m in MEASURES for n, values in per_tensor.items() if m in values}
    out.update(measure_totals(per_tensor))
    return out
