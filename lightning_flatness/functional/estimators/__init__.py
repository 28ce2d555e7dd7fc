"""Estimators of the Hessian diagonal of a training loss, keyed by parameter name.

Three methods, one contract (see :func:`hessian_diagonal`):

- ``"exact"`` (:mod:`.exact`): zero-variance, for networks linear in each individual weight.
- ``"hutchinson"`` (:mod:`.hutchinson`): unbiased Rademacher probes with exact Hessian-vector products.
- ``"finite_difference"`` (:mod:`.finite_difference`): the paper's Algorithm 1 / eq. 61.
"""

from lightning_flatness.functional.estimators.api import (
    METHODS,
    HessianDiagonalEstimate,
    hessian_diagonal,
    hessian_diagonal_groups,
)

__all__ = ["METHODS", "HessianDiagonalEstimate", "hessian_diagonal", "hessian_diagonal_groups"]
