"""``matmul`` with a weight as its right factor: ``y = x @ W`` with ``x`` ``(N, *positions, I)`` and
``W`` ``(I, O)``, a selected weight or a function of one (Falcon's ``FalconLinear`` computes
``x @ self.weight.T``; the transpose is pulled back to the weight, :mod:`.shared`).

Laid out as :mod:`.addmm` (the weight stored as ``(I, O)``), without a bias. Only a 2-D right factor is
recorded; a weight as the left factor, or a batched right factor, is left to the per-sample path.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from lightning_flatness.functional.estimators.layer_rules.addmm import AddmmRule
from lightning_flatness.functional.estimators.layer_rules.base import LayerCall, register_layer_rule

__all__ = ["MatmulRule"]


class MatmulRule(AddmmRule):
    """``matmul(input = x (N, *positions, I), other = W (I, O))``."""

    op = "matmul"
    input_argument = (0, ("input",))
    weight_argument = (1, ("other",))
    bias_argument: Optional[tuple[int, tuple[str, ...]]] = None

    def record(self, call: LayerCall, args: tuple, kwargs: dict, weight: Optional[Tensor]) -> None:
        if weight is None or weight.ndim != 2 or call.inputs.ndim < 2:
            call.samples_interact = True  # not a layer's layout: the per-sample path handles it


register_layer_rule(MatmulRule())
