"""All sharpness measures of a network from one set of Hessian-diagonal estimates."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from lightning_flatness.functional.solvers import (
    hessian_trace,
    matrix_normalized_sharpness,
    normalized_sharpness,
)

__all__ = ["sharpness_measures", "MEASURES"]

MEASURES = ("normalized", "matrix_normalized", "hessian_trace")


def sharpness_measures(
    weights: Mapping[str, Tensor], diagonals: Mapping[str, Tensor], lam: float = 0.5
) -> dict[str, Tensor]:
    """Normalized sharpness (eq. 17), matrix-normalized sharpness (eq. 13) and the Hessian trace
    (eq. 5), in total and per weight tensor.

    Args:
        weights: ``{name: W}`` weight tensors (``ndim >= 2``; 1-D tensors raise ``ValueError``).
        diagonals: ``{name: diag H}`` with the same names and shapes (unclipped; the normalized
            measures clip negative entries to 0 as Algorithm 1 does, the trace does not).
        lam: the PAC-Bayes ``lambda`` of eq. 17 (the value scales as ``lam ** -0.5``).

    Returns:
        Flat ``{key: scalar}``: ``"normalized"``, ``"matrix_normalized"``, ``"hessian_trace"`` (sums
        over tensors) and ``"<measure>/<name>"`` for each tensor, in the weights' dtype.
    """
    missing = set(weights) ^ set(diagonals)
    if missing:
        raise ValueError(
            f"weights and Hessian diagonals must name the same tensors; unmatched: {sorted(missing)}."
        )
    flat = [n for n, w in weights.items() if w.ndim < 2]
    if flat:
        raise ValueError(
            f"normalized sharpness needs weight tensors with ndim >= 2 (rows x columns), but {flat} "
            f"are 1-D (biases, normalisation scales: footnote 5 leaves them out); their Hessian "
            f"diagonal is fine, but measure only tensors with ndim >= 2 (select_parameters with "
            f"the default or parameters='weights')."
        )
    out: dict[str, Tensor] = {}
    for name, w in weights.items():
        h = diagonals[name]
        if h.shape != w.shape:
            raise ValueError(
                f"Hessian diagonal of {name!r} has shape {tuple(h.shape)}, weight has {tuple(w.shape)}."
            )
        out[f"normalized/{name}"] = normalized_sharpness(w, h, lam=lam)
        out[f"matrix_normalized/{name}"] = matrix_normalized_sharpness(w, h)
        out[f"hessian_trace/{name}"] = hessian_trace(h)
    for measure in MEASURES:
        out[measure] = torch.stack([out[f"{measure}/{n}"] for n in weights]).sum()
    return out
