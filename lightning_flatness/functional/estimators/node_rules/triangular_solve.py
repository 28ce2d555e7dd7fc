r"""A triangular solve, ``X = A^{-1} B`` (``torch.linalg.solve_triangular(A, B, upper=..., left=True,
unitriangular=...)``): the gated delta rule's UT transform (Qwen3-Next, Qwen3.5, OLMo hybrid), where both
the system ``A`` and the right-hand side ``B`` depend on the weights.

Only the triangle the solve reads enters (``A``'s lower or upper triangle; without its diagonal when
``unitriangular``: the diagonal is then 1), so write ``A`` for that part (plus the unit diagonal) and
``P`` for the projection onto it. Along a direction ``(dA, dB)``, ``X' = A^{-1} (dB - P(dA) X) =: beta``
and ``X'' = -2 A^{-1} P(dA) beta``, so with adjoint ``G`` the Hessian of ``<G, X>`` has the quadratic form

.. math:: \langle G, X'' \rangle = 2 \langle -\bar G, \alpha \beta \rangle, \qquad
          \bar G = A^{-\top} G, \quad \alpha = P(dA), \quad \beta = A^{-1} (dB - P(dA) X):

a matrix product of two linear functions of the direction, with adjoint ``-bar G``. Its columns in
``(alpha, beta)`` are matmul's (:func:`~.products.matmul_columns`: ``+`` column ``(c_alpha, c_beta)``,
``-`` column ``(c_alpha, -c_beta)``, the same random signs), pulled back to ``(A, B)`` by the adjoint of
``d -> (alpha, beta)``: ``c_A = P(c_alpha - (A^{-\top} c_beta) X^\top)``, ``c_B = A^{-\top} c_beta``. If
``E[c' c'^T] = M'`` in ``(alpha, beta)`` then ``E[L^T c' c'^T L] = L^T M' L`` is the Hessian in ``(A, B)``
(``L`` the linear map). With ``B`` constant only ``c_A`` is kept; with ``A`` constant the solve is linear
(no curvature). Cost: two matrix products of the op's size (matmul's) and two triangular solves per
column. ``left=False`` (``X A = B``) is not covered.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_flatness.functional.estimators.layer_rules.base import argument
from lightning_flatness.functional.estimators.node_rules.base import NodeCall, NodeRule, register_node_rule
from lightning_flatness.functional.estimators.node_rules.products import _sum_to, matmul_columns

__all__ = ["TriangularSolveRule"]


class TriangularSolveRule(NodeRule):
    ops = ("linalg_solve_triangular",)
    own_pair = True

    @staticmethod
    def _operands(call: NodeCall) -> tuple[object, object]:
        return argument(call.args, call.kwargs, 0, ("A", "input")), argument(
            call.args, call.kwargs, 1, ("B",)
        )

    def accepts(self, call: NodeCall) -> bool:
        a, b = self._operands(call)
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and call.kwargs.get("left", True) is True
            and "upper" in call.kwargs  # keyword-only in torch: always given
            and a.ndim >= 2
            and b.ndim >= 2
            and a is not b
            and any(t is a or t is b for t in call.inputs)
        )

    def columns(
        self, call: NodeCall, adjoint: Tensor, generator: Optional[torch.Generator]
    ) -> tuple[list[Optional[Tensor]], list[Optional[Tensor]]]:
        a, b = self._operands(call)
        assert isinstance(a, Tensor) and isinstance(b, Tensor)
        upper, unit = bool(call.kwargs["upper"]), bool(call.kwargs.get("unitriangular", False))
        varies = {id(t) for t in call.inputs}
        if id(a) not in varies:  # linear in B: no curvature
            return [None] * len(call.inputs), [None] * len(call.inputs)
        system = a.detach().to(adjoint.dtype)
        solution = call.output.detach().to(adjoint.dtype)

        def transposed_solve(rhs: Tensor) -> Tensor:  # A^{-T} rhs
            return torch.linalg.solve_triangular(system.mT, rhs, upper=not upper, unitriangular=unit)

        def project(t: Tensor) -> Tensor:  # onto the triangle the solve reads
            return t.triu(1 if unit else 0) if upper else t.tril(-1 if unit else 0)

        full = solution.shape[:-2] + system.shape[-2:]  # the system broadcast over the batch, summed below
        c_alpha, c_beta = matmul_columns(-transposed_solve(adjoint), full, solution.shape, generator)
        back = transposed_solve(c_beta)  # A^{-T} c_beta
        c_a_shared, c_a_beta = project(c_alpha), project(back @ solution.mT)
        by_id = {
            id(a): (_sum_to(c_a_shared - c_a_beta, a.shape), _sum_to(c_a_shared + c_a_beta, a.shape)),
            id(b): (_sum_to(back, b.shape), _sum_to(-back, b.shape)),
        }
        return [by_id[id(t)][0] for t in call.inputs], [by_id[id(t)][1] for t in call.inputs]


register_node_rule(TriangularSolveRule())
