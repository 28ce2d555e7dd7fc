r"""``baddbmm`` of two weight-dependent batches, ``Z = beta C + alpha X @ Y``: attention scores with an
additive bias in one call (Hugging Face BLOOM: ``alibi.baddbmm(q, k^T, beta=1, alpha=1/sqrt(d))``).

``beta C`` is linear (and ``C``, the ALiBi bias, does not depend on the weights there); the product is
matmul's (:mod:`.products`) with the adjoint scaled by ``alpha``: columns
:func:`~.products.matmul_columns` of ``alpha G``. Covered: ``batch1`` and ``batch2`` weight-dependent and
distinct, ``input`` not.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_flatness.functional.estimators.layer_rules.base import argument
from lightning_flatness.functional.estimators.node_rules.base import NodeCall, NodeRule, register_node_rule
from lightning_flatness.functional.estimators.node_rules.products import matmul_columns

__all__ = ["BaddbmmRule"]


def _operands(call: NodeCall) -> tuple[Optional[Tensor], Optional[Tensor], float]:
    """``(batch1, batch2, alpha)`` of the call (``torch.baddbmm(input, batch1, batch2, *, beta, alpha)`` or
    ``input.baddbmm(batch1, batch2, ...)``, positional or by keyword)."""
    x = argument(call.args, call.kwargs, 1, ("batch1",))
    y = argument(call.args, call.kwargs, 2, ("batch2",))
    return x, y, call.kwargs.get("alpha", 1)


class BaddbmmRule(NodeRule):
    ops = ("baddbmm",)
    own_pair = True

    def accepts(self, call: NodeCall) -> bool:
        x, y, alpha = _operands(call)
        return (
            len(call.inputs) == 2
            and x is call.inputs[0]
            and y is call.inputs[1]
            and x is not y
            and isinstance(alpha, (int, float))
        )

    def columns(
        self, call: NodeCall, adjoint: Tensor, generator: Optional[torch.Generator]
    ) -> tuple[list[Optional[Tensor]], list[Optional[Tensor]]]:
        x, y, alpha = _operands(call)
        assert x is not None and y is not None
        cx, cy = matmul_columns(adjoint * float(alpha), x.shape, y.shape, generator)
        return [cx, cy], [cx, -cy]


register_node_rule(BaddbmmRule())
