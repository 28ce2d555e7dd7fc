"""Estimators of the Hessian diagonal of a training loss, keyed by parameter name.

One contract (see :func:`hessian_diagonal`), every method registered in :mod:`.registry`:

- ``"exact"`` (:mod:`.exact`): zero-variance, for networks linear in each individual weight; raises
  :class:`ExactMethodNotApplicable` for others.
- ``"gauss_newton"``, ``"gauss_newton_sketch"``, ``"gauss_newton_mc"`` (:mod:`.gauss_newton`,
  :mod:`.gauss_newton_sketch`, :mod:`.gauss_newton_mc`): the Gauss-Newton diagonal of any network,
  exactly, sketched or sampled.
- ``"hessian_sketch"`` (:mod:`.hessian_sketch`): the Hessian diagonal of networks built from the ops of
  :mod:`.node_rules` (GELU, LayerNorm, attention, ...), unbiased, first derivatives only.
- ``"ggn_hutchinson"`` (:mod:`.ggn_hutchinson`): any network; the exact Gauss-Newton diagonal plus
  unbiased Rademacher probes of the residual ``H - GGN``.
- ``"hutchinson"`` (:mod:`.hutchinson`): unbiased Rademacher probes with exact Hessian-vector products.
- ``"finite_difference"`` (:mod:`.finite_difference`): the paper's Algorithm 1 / eq. 61.

``method="auto"`` (:mod:`.method_choice`) picks one from a recorded forward pass.
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
