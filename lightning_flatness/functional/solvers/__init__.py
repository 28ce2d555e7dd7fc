"""Per-tensor sharpness measures: eq. 17 (normalized), eq. 13 (matrix-normalized), eq. 5 (trace)."""

from lightning_flatness.functional.solvers.matrix_normalized import hessian_trace, matrix_normalized_sharpness
from lightning_flatness.functional.solvers.normalized import (
    NormalizedSharpnessSolution,
    normalized_sharpness,
    normalized_sharpness_coefficients,
    solve_normalized_sharpness,
    solve_normalized_sharpness_batch,
    solve_normalized_sharpness_coefficients,
)

__all__ = [
    "NormalizedSharpnessSolution",
    "hessian_trace",
    "matrix_normalized_sharpness",
    "normalized_sharpness",
    "normalized_sharpness_coefficients",
    "solve_normalized_sharpness",
    "solve_normalized_sharpness_batch",
    "solve_normalized_sharpness_coefficients",
]
