"""``addmm`` with a weight as its second factor: Hugging Face's ``Conv1D`` (GPT-2, its relatives),
``y = b + x W`` with ``x`` ``(rows, I)`` and the weight stored as ``(I, O)``.

The transpose of :mod:`.linear`: the per-sample gradient of column ``k`` is ``sum_p a_p g_kp^T``, the
transpose of Linear's ``sum_p g_kp a_p^T``, so the rule is :class:`~.linear.LinearRule` with the result
laid out as ``(I, O)`` (:meth:`AddmmRule.as_weight`). ``Conv1D`` flattens its input to ``(N T, I)``
before the call, ``T`` rows per sample in sample-major order: the rows are read per sample as Linear's
grouped rows are (:meth:`~.linear.LinearRule.regroup`), which the batch-independence probe checks.

Recorded only when the weight (``mat2``) is a selected leaf and ``input`` is the bias (a selected leaf
or a constant); ``beta`` and ``alpha`` other than 1 are left to the per-sample path.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from lightning_flatness.functional.estimators.layer_rules.base import LayerCall, argument, register_layer_rule
from lightning_flatness.functional.estimators.layer_rules.linear import LinearRule

__all__ = ["AddmmRule"]


class AddmmRule(LinearRule):
    """``addmm(input = bias (O,), mat1 = x (N T, I), mat2 = W (I, O), *, beta=1, alpha=1)``."""

    op = "addmm"
    input_argument = (1, ("mat1",))
    weight_argument = (2, ("mat2",))
    bias_argument: Optional[tuple[int, tuple[str, ...]]] = (0, ("input",))

    def record(self, call: LayerCall, args: tuple, kwargs: dict, weight: Optional[Tensor]) -> None:
        bias = argument(args, kwargs, 0, ("input",))
        scaled = kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1
        # a scaled product, or a weight that is not the second factor (then its rows meet the samples)
        if scaled or weight is None or weight.ndim != 2 or isinstance(bias, Tensor) and bias.ndim > 1:
            call.samples_interact = True

    def is_batched(self, call: LayerCall, n: int) -> bool:
        return not call.samples_interact and super().is_batched(call, n)

    def as_weight(self, value: Tensor, shape: tuple[int, ...]) -> Tensor:
        """``(..., 1, O, I)`` -> ``(..., I, O)``: the weight is stored transposed."""
        return value.reshape(*value.shape[:-3], shape[1], shape[0]).transpose(-1, -2)


register_layer_rule(AddmmRule())
