"""``linear`` (``nn.Linear``, any leading dims): the per-sample gradient of column ``k`` is
``sum_p g_kp a_p^T`` over the positions ``p`` (the leading dims between the batch and the features)."""

from __future__ import annotations

from torch import Tensor

from lightning_flatness.functional.estimators.layer_rules.base import (
    LayerCall,
    LayerRule,
    register_layer_rule,
)

__all__ = ["LinearRule"]


class LinearRule(LayerRule):
    """``y = a W^T + b`` with ``a`` of shape ``(N, *positions, I)``."""

    op = "linear"

    def is_batched(self, call: LayerCall, n: int) -> bool:
        return call.inputs.ndim >= 2 and call.inputs.shape[0] == n and call.output.shape[0] == n

    def bias_position_dims(self, grad: Tensor) -> tuple[int, ...]:
        return tuple(range(2, grad.ndim - 1))

    def factors(self, call: LayerCall, grad: Tensor, kernel: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        k, n = grad.shape[:2]
        a = call.inputs.reshape(n, 1, -1, call.inputs.shape[-1]).transpose(2, 3)
        g = grad.reshape(k, n, 1, -1, grad.shape[-1]).permute(1, 2, 0, 4, 3)  # (N, 1, K, O, P)
        return a, g.reshape(n, 1, -1, g.shape[-1])

    def single_position(self, call: LayerCall) -> bool:
        return call.inputs.ndim == 2


register_layer_rule(LinearRule())
