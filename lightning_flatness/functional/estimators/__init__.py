"""Estimators of the Hessian diagonal of a training loss, keyed by parameter name.

Four methods, one contract (see :func:`hessian_diagonal`):

- ``"exact"`` (:mod:`.exact`): zero-variance, for networks linear in each individual weight; raises
  :class:`ExactMethodNotApplicable` for others.
- ``"ggn_hutchinson"`` (:mod:`.ggn_hutchinson`): any network; the exact Gauss-Newton diagonal plus
  unbiased Rademacher probes of the residual ``H - GGN`` (low variance near a minimum).
- ``"hutchinson"`` (:mod:`.hutchinson`): unbiased Rademacher probes with exact Hessian-vector products.
- ``"finite_difference"`` (:mod:`.finite_difference`): the paper's Algorithm 1 / eq. 61.
"""

from lightning_flatness.functional.estimators.api import (
    METHODS,
    HessianDiagonalEstimate,
    estimator_spec,
    hessian_diagonal,
    hessian_diagonal_groups,
)
from lightning_flatness.functional.estimators.exact import ExactMethodNotApplicable
from lightning_flatness.functional.estimators.registry import ESTIMATORS, EstimatorSpec, register_estimator

__all__ = [
    "ESTIMATORS",
    "METHODS",
    "EstimatorSpec",
    "ExactMethodNotApplicable",
    "HessianDiagonalEstimate",
    "estimator_spec",
    "hessian_diagonal",
    "hessian_diagonal_groups",
    "register_estimator",
]
