"""``linear`` (``nn.Linear``, any leading dims): the per-sample gradient of column ``k`` is
``sum_p g_kp a_p^T`` over the positions ``p`` (the leading dims between the batch and the features)."""

from __future__ import annotations

import dataclasses

from torch import Tensor

from lightning_flatness.functional.estimators.layer_rules.base import (
    LayerCall,
    LayerRule,
    register_layer_rule,
)

__all__ = ["LinearRule"]


class LinearRule(LayerRule):
    """``y = a W^T + b`` with ``a`` of shape ``(N, *positions, I)``, or ``(N k, *positions, I)`` with ``k``
    rows per sample (:meth:`regroup`)."""

    op = "linear"
    sliceable = True

    def is_batched(self, call: LayerCall, n: int) -> bool:
        rows = call.inputs.shape[0] if call.inputs.ndim >= 2 else -1
        return rows > 0 and rows % n == 0 and call.output.shape[0] == rows

    def regroup(self, call: LayerCall, grad: Tensor, n: int) -> tuple[LayerCall, Tensor]:
        """``(n k, *positions, I)`` rows as ``(n, k * positions, I)``: each sample's ``k`` rows are more
        positions of one per-sample gradient (a linear map acts on rows alike)."""
        inputs = call.inputs.reshape(n, -1, call.inputs.shape[-1])
        return dataclasses.replace(call, inputs=inputs), grad.reshape(grad.shape[0], n, -1, grad.shape[-1])

    def bias_position_dims(self, grad: Tensor) -> tuple[int, ...]:
        return tuple(range(2, grad.ndim - 1))

    def factors(self, call: LayerCall, grad: Tensor, kernel: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        k, n = grad.shape[:2]
        a = call.inputs.reshape(n, 1, -1, call.inputs.shape[-1]).transpose(2, 3)
        g = grad.reshape(k, n, 1, -1, grad.shape[-1]).permute(1, 2, 0, 4, 3)  # (N, 1, K, O, P)
        return a, g.reshape(n, 1, -1, g.shape[-1])

    def positionwise_factors(self, call: LayerCall, grad: Tensor) -> tuple[Tensor, Tensor]:
        k, n = grad.shape[:2]
        return call.inputs.reshape(n, -1, call.inputs.shape[-1]), grad.reshape(k, n, -1, grad.shape[-1])

    def single_position(self, call: LayerCall) -> bool:
        return call.inputs.ndim == 2


register_layer_rule(LinearRule())
