r"""What a node rule is: the local curvature of one nonlinear operation, as random signed columns.

The Hessian of a loss computed by a graph of operations is a sum over its operations (the second-order
adjoint identity; Dangel, Kunstner and Hennig 2020 use it block by block as "Hessian backpropagation"):

.. math:: \nabla^2_w L = J_f^\top \Lambda J_f + \sum_{\text{ops } z = \phi(a)} J_a^\top M_a J_a, \qquad
          M_a = \sum_i \frac{\partial L}{\partial z_i} \nabla^2_a z_i,

with ``f`` the logits, :math:`\Lambda` the loss Hessian in the logits, ``a`` the op's weight-dependent
inputs and :math:`J_a = \partial a / \partial w`. Ops linear in each input (Linear, Conv, sums,
reshapes, eval BatchNorm, ReLU almost everywhere) have ``M_a = 0``: their sum is the Gauss-Newton
matrix. For a weight used once, the diagonal of ``J_a^T M_a J_a`` is what the Gauss-Newton diagonal
misses (the residual).

A :class:`NodeRule` knows one op's :math:`M_a` in closed form and draws one ``+`` and one ``-``
column :math:`c^\pm` (tensors shaped like the op's inputs) with

.. math:: \mathbb{E}[c^+ c^{+\top}] - \mathbb{E}[c^- c^{-\top}] = M_a,

so that the squared per-sample gradients of ``sum_a <c_a^+, a>`` minus those of ``sum_a <c_a^-, a>``
estimate the residual diagonal without bias (:mod:`..hessian_sketch`). One rule per module, registered
in :data:`NODE_RULES` by the op name the recorder sees (``exact._op_name``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lightning_flatness.functional.loss_hessian_factors import _rademacher

__all__ = ["NODE_RULES", "NodeCall", "NodeRule", "rademacher", "register_node_rule"]


@dataclass
class NodeCall:
    """One recorded call of an op with a node rule.

    Attributes:
        op: the op name (a key of :data:`NODE_RULES`).
        module: where it was called (for messages).
        func, args, kwargs: the call, to evaluate the op again on detached values.
        inputs: the weight-dependent, non-leaf tensor arguments ``a`` (in the graph), in order.
        output: the op's output ``z`` (in the graph).
        versions: the version counters of ``inputs`` and then ``output`` at construction (right after
            the call): an in-place change of any of them later voids the call.
    """

    op: str
    module: str
    func: Callable[..., Any]
    args: tuple
    kwargs: dict
    inputs: list[Tensor]
    output: Tensor
    versions: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.versions = [t._version for t in (*self.inputs, self.output)]

    def changed_in_place(self) -> bool:
        return any(t._version != v for t, v in zip((*self.inputs, self.output), self.versions))


class NodeRule:
    """The local curvature of one op. Subclasses implement :meth:`accepts` and :meth:`columns`."""

    #: the op names this rule covers, as the recorder sees them
    ops: tuple[str, ...] = ()
    #: whether the ``+`` and ``-`` columns share their random signs (products: their own squares then
    #: cancel draw by draw), so that they get a pair of backward columns of their own
    #: (:mod:`~lightning_flatness.functional.estimators.hessian_sketch`)
    own_pair: bool = False

    def accepts(self, call: NodeCall) -> bool:
        """Whether this call is covered (e.g. a unary op with one weight-dependent input)."""
        raise NotImplementedError

    def columns(
        self, call: NodeCall, adjoint: Tensor, generator: Optional[torch.Generator]
    ) -> tuple[list[Optional[Tensor]], list[Optional[Tensor]]]:
        """One ``+`` and one ``-`` column per input of ``call`` (None: zero), shaped like the inputs, with
        ``E[c+ c+^T] - E[c- c-^T] = M`` for ``M`` the Hessian in the inputs of ``<adjoint, op(inputs)>``."""
        raise NotImplementedError


#: ``{op name: rule}``.
NODE_RULES: dict[str, NodeRule] = {}


def register_node_rule(rule: NodeRule, *, replace: bool = False) -> NodeRule:
    """Register ``rule`` under each of its ``ops`` (``replace=True`` to override)."""
    for op in rule.ops:
        if op in NODE_RULES and not replace:
            raise ValueError(
                f"a node rule for {op!r} is already registered; pass replace=True to override it."
            )
        NODE_RULES[op] = rule
    return rule


def rademacher(like: Tensor, generator: Optional[torch.Generator], shape: Optional[tuple] = None) -> Tensor:
    """Independent +-1 entries of ``like``'s dtype and device (``shape`` or ``like.shape``): the draw of
    the loss columns' sketches (:func:`~lightning_flatness.functional.loss_hessian_factors._rademacher`)."""
    return _rademacher(tuple(like.shape) if shape is None else shape, like, generator)


def split_signs(values: Tensor) -> tuple[Tensor, Tensor]:
    """``(sqrt(max(v, 0)), sqrt(max(-v, 0)))``."""
    return values.clamp_min(0).sqrt(), (-values).clamp_min(0).sqrt()


def replace_inputs(call: NodeCall, values: list[Tensor]) -> tuple[tuple, dict]:
    """``call``'s arguments with its ``inputs`` replaced by ``values`` (matched by identity) and every
    other tensor detached."""
    swap = {id(t): v for t, v in zip(call.inputs, values)}

    def fix(obj: Any) -> Any:
        if isinstance(obj, Tensor):
            return swap.get(id(obj), obj.detach())
        if isinstance(obj, (tuple, list)):
            return type(obj)(fix(o) for o in obj)
        if isinstance(obj, dict):
            return {k: fix(v) for k, v in obj.items()}
        return obj

    return fix(call.args), fix(call.kwargs)
