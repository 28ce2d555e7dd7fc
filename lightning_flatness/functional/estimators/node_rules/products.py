r"""Products of two weight-dependent tensors: elementwise ``z = x * y`` (squeeze-excitation gates, GELU's
tanh form, gated units) and ``Z = X @ Y`` (attention's ``q k^T`` and ``p v``).

The op is bilinear: with adjoint ``G``, the Hessian of ``<G, z>`` in ``(x, y)`` has zero diagonal blocks
and the quadratic form ``2 sum_t G_t dx_t dy_t`` over the product's terms ``t`` (elementwise: one term per
output entry; matmul: one per ``(i, j, l)`` with ``dx = dX_il``, ``dy = dY_lj``). By polarization,
``2 a b = ((a + b)^2 - (a - b)^2) / 2``, each term is a ``+`` column ``sqrt(|G_t| / 2) (e_x + s_t e_y)``
and a ``-`` column ``sqrt(|G_t| / 2) (e_x - s_t e_y)``, ``s_t = sign(G_t)``. Mixing the terms with random
signs ``eps_t`` that are uncorrelated across terms keeps the expectation:

- elementwise: one Rademacher sign per output entry, then each column summed over the dimensions
  its input was broadcast along; ``O(numel)``;
- matmul: ``eps_ijl = alpha_il beta_jl`` (products of independent Rademacher matrices are pairwise
  uncorrelated), so ``c_X = alpha o (sqrt(|G| / 2) @ beta)`` and
  ``c_Y = beta o ((s sqrt(|G| / 2))^T @ alpha)``
  (transposed into ``Y``'s layout): two matrix products of the op's own size per column.

The ``+`` and ``-`` columns share their random signs (``c^- = (c_x, -c_y)`` for ``c^+ = (c_x, c_y)``): then
``(G^+)^2 - (G^-)^2 = 4 (J_x^T c_x)(J_y^T c_y)`` exactly for the op's own part of the two gradients, so the
squares of each side, which only cancel on average with independent draws, cancel draw by draw
(measured: ``benchmarks/results/hessian_sketch.md``, item 2). A tensor multiplied by itself
(``x * x``) gets both columns added, which gives ``2 G`` as it should.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_flatness.functional.estimators.node_rules.base import (
    NodeCall,
    NodeRule,
    rademacher,
    register_node_rule,
)

__all__ = ["ElementwiseProductRule", "MatmulRule", "matmul_columns", "product_columns"]


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    return t if t.shape == shape else t.sum_to_size(shape)


def product_columns(
    coefficient: Tensor, x_shape: torch.Size, y_shape: torch.Size, generator: Optional[torch.Generator]
) -> tuple[Tensor, Tensor]:
    """``(c_x, c_y)`` for the quadratic form ``2 sum_t coefficient_t dx_t dy_t`` of an elementwise product
    (broadcast to ``coefficient``'s shape): ``sqrt(|coefficient| / 2)`` times one Rademacher sign per term,
    with ``sign(coefficient)`` on ``y``'s side, each summed to its input's shape. The ``+`` column is
    ``(c_x, c_y)``, the ``-`` one ``(c_x, -c_y)`` (module docstring)."""
    root = (coefficient.abs() / 2).sqrt()
    sign = torch.where(coefficient < 0, -1.0, 1.0).to(coefficient.dtype)
    mixed = root * rademacher(coefficient, generator)
    return _sum_to(mixed, x_shape), _sum_to(sign * mixed, y_shape)


class ElementwiseProductRule(NodeRule):
    ops = ("mul", "multiply")
    own_pair = True

    def accepts(self, call: NodeCall) -> bool:
        return (
            len(call.inputs) == 2
            and len(call.args) >= 2
            and all(isinstance(a, Tensor) for a in call.args[:2])
        )

    def columns(
        self, call: NodeCall, adjoint: Tensor, generator: Optional[torch.Generator]
    ) -> tuple[list[Optional[Tensor]], list[Optional[Tensor]]]:
        x, y = call.inputs
        cx, cy = product_columns(adjoint, x.shape, y.shape, generator)
        return [cx, cy], [cx, -cy]


class MatmulRule(NodeRule):
    ops = ("matmul", "bmm")
    own_pair = True

    def accepts(self, call: NodeCall) -> bool:
        if len(call.inputs) != 2 or len(call.args) < 2:
            return False
        x, y = call.args[0], call.args[1]
        return (
            x is call.inputs[0]
            and y is call.inputs[1]
            and x.ndim >= 2
            and y.ndim >= 2
            and call.output.shape
            == torch.broadcast_shapes(x.shape[:-2], y.shape[:-2]) + (x.shape[-2], y.shape[-1])
        )

    def columns(
        self, call: NodeCall, adjoint: Tensor, generator: Optional[torch.Generator]
    ) -> tuple[list[Optional[Tensor]], list[Optional[Tensor]]]:
        x, y = call.inputs
        cx, cy = matmul_columns(adjoint, x.shape, y.shape, generator)
        return [cx, cy], [cx, -cy]


def matmul_columns(
    adjoint: Tensor, x_shape: torch.Size, y_shape: torch.Size, generator: Optional[torch.Generator]
) -> tuple[Tensor, Tensor]:
    """``(c_x, c_y)`` of ``Z = X @ Y`` (batched, broadcast) with adjoint ``G`` (module docstring): two matrix
    products of the op's size; the ``+`` column is ``(c_x, c_y)``, the ``-`` one ``(c_x, -c_y)``."""
    batch = adjoint.shape[:-2]
    m, n = adjoint.shape[-2:]
    k = x_shape[-1]
    root = (adjoint.abs() / 2).sqrt()  # (..., m, n)
    signed = torch.where(adjoint < 0, -root, root)
    alpha = rademacher(adjoint, generator, (*batch, m, k))
    beta = rademacher(adjoint, generator, (*batch, n, k))
    cx = _sum_to(alpha * (root @ beta), x_shape)  # (..., m, k): sum_j eps_ijl sqrt(|G_ij| / 2)
    cy = _sum_to((beta * (signed.transpose(-1, -2) @ alpha)).transpose(-1, -2), y_shape)  # (..., k, n)
    return cx, cy


register_node_rule(ElementwiseProductRule())
register_node_rule(MatmulRule())
