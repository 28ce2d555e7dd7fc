r"""``z = x + b`` with ``b`` a selected weight, or a function of the selected weights, broadcast over the
samples: a learned position embedding added to the tokens (timm's ``pos_embed`` when selected), a relative
position bias added to the attention logits (Swin V2's, computed by a small MLP from a constant grid), a
bias added after a product written by hand (Falcon's ``x @ W.T + b``).

Recorded by the exactness recorder for ``add`` (not dispatched by op name). ``b`` aligned to the right of
``z`` ``(N, *rest)`` has size 1 along dim 0; the per-sample gradient of column ``k`` is the output
gradient of sample ``n`` summed over the dims ``b`` is broadcast along (and over a sample's rows when dim 0
holds several per sample, sample-major: windowed attention), so

.. math:: D_b = \sum_{n,k} s_{nk} \Big(\sum_{\text{broadcast}} g_{nk}\Big)^2 .

Cost ``O(K N |z|)``, one pass over the output gradients. The op is linear in ``b``: an offset keeps the
network piecewise linear in it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from lightning_flatness.functional.estimators.layer_rules.base import (
    LayerCall,
    LayerRule,
    SampleGradients,
    register_layer_rule,
)

__all__ = ["OffsetRule"]


class OffsetRule(LayerRule):
    """The offset ``b`` of ``x + b`` as a call's weight (``options["padded"]``: ``b``'s shape padded with
    leading ones to ``z``'s number of dims)."""

    op = "offset"
    bias_argument = None

    def is_batched(self, call: LayerCall, n: int) -> bool:
        rows = call.output.shape[0]
        return rows > 0 and rows % n == 0

    def regroup(self, call: LayerCall, grad: Tensor, n: int) -> Optional[tuple[LayerCall, Tensor]]:
        """``(n r, *rest)`` rows, ``r`` per sample in sample-major order, as ``(n, r, *rest)``; the offset,
        broadcast along the rows too, is summed over them with its other broadcast dims."""
        rows = call.output.shape[0] // n
        padded = (1, 1, *call.options["padded"][1:])
        inputs = call.inputs.reshape(n, rows, *call.inputs.shape[1:])
        regrouped = dataclasses.replace(call, inputs=inputs, options={**call.options, "padded": padded})
        return regrouped, grad.reshape(grad.shape[0], n, rows, *grad.shape[2:])

    @staticmethod
    def per_sample(call: LayerCall, grad: Tensor) -> Tensor:
        """``(K, N, b.numel())``: each sample's output gradients ``(K, N, *rest)`` summed over ``b``'s
        broadcast dims."""
        k, n = grad.shape[:2]
        padded = call.options["padded"]
        dims = [1 + i for i, size in enumerate(padded) if i > 0 and size == 1 and grad.shape[1 + i] != 1]
        return (grad.sum(dim=dims) if dims else grad).reshape(k, n, -1)

    def accumulate(
        self, call: LayerCall, grad: Tensor, signs: Tensor, diag: dict[str, Tensor], leaves: dict[str, Tensor]
    ) -> bool:
        assert call.weight is not None
        s = self.per_sample(call, grad)
        value = torch.einsum("nk,knx->x", signs.to(s.dtype), s * s).reshape(leaves[call.weight].shape)
        if call.weight in diag:
            diag[call.weight] += value
        else:
            diag[call.weight] = value
        return True

    def sample_gradients(self, call: LayerCall, grad: Tensor, shape: tuple[int, ...]) -> SampleGradients:
        s = self.per_sample(call, grad)

        def weight(samples: slice) -> Tensor:
            return s[:, samples].transpose(0, 1).clone()  # a new tensor (the contract of SampleGradients)

        def bias(samples: slice) -> Tensor:
            raise ValueError("an offset has no bias")

        return SampleGradients(weight, bias)


register_layer_rule(OffsetRule())
