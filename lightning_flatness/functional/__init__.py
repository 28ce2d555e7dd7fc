"""Functional core: losses (eq. 20-22), Hessian-diagonal estimators, solvers for eq. 13 and 17.

Nothing here imports Lightning; everything works from a plain PyTorch training loop.
"""

from lightning_flatness.functional.estimators import (
    METHODS,
    ExactMethodNotApplicable,
    HessianDiagonalEstimate,
    hessian_diagonal,
    hessian_diagonal_groups,
)
from lightning_flatness.functional.losses import normalize_logits, normalized_softmax_cross_entropy
from lightning_flatness.functional.measures import sharpness_measures
from lightning_flatness.functional.parameters import select_parameters
from lightning_flatness.functional.solvers import (
    hessian_trace,
    matrix_normalized_sharpness,
    normalized_sharpness,
)

__all__ = [
    "METHODS",
    "ExactMethodNotApplicable",
    "HessianDiagonalEstimate",
    "hessian_diagonal",
    "hessian_diagonal_groups",
    "hessian_trace",
    "matrix_normalized_sharpness",
    "normalize_logits",
    "normalized_sharpness",
    "normalized_softmax_cross_entropy",
    "select_parameters",
    "sharpness_measures",
]
