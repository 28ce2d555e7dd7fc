r"""Nonlinear functions of the selected weights alone (reparametrizations): the exact diagonal of their own
curvature, for the sketched Hessian diagonal (:mod:`..hessian_sketch`).

A layer whose weight is ``W' = phi(W)``, computed from the weights alone, contributes to the Hessian in
``W`` (the second-order adjoint identity of
:mod:`~lightning_flatness.functional.estimators.node_rules.base`) the term

.. math:: M_\phi = \sum_i G_i \nabla^2_W \phi_i(W), \qquad G = \partial L / \partial W',

besides what reaches ``W'`` from the loss and the other operations (those are pulled back through
``phi``'s Jacobian: :mod:`..layer_rules.shared`). ``G`` is the gradient of the mean loss, not a per-sample
quantity, so ``M_phi`` has no sampling noise to average: a rule gives ``diag(M_phi)`` exactly, added once
per estimate. One rule per op, registered in :data:`WEIGHT_FUNCTION_RULES`; the recorder
(:mod:`..recorder`) consults it for every nonlinear op on weights alone whose input is a selected weight
itself (or a reshape of it), and names the others as uncovered.

Built in:

- ``batch_norm`` in training mode on a weight: weight standardization (timm's ``StdConv2d`` and
  ``ScaledStdConv2d``: NFNets, BiT), ``u = gamma (w - mean w) / sqrt(var w + eps) + beta`` per channel of
  ``input.reshape(1, C, -1)``. ``M`` is the centred normalization's
  (:func:`~.normalization_curvature.normalization_diagonal`) with ``r = G gamma``; ``u`` is linear in
  ``gamma`` and ``beta``, whose own diagonal terms are zero;
- ``_weight_norm``: weight normalization (``torch.nn.utils.parametrizations.weight_norm``), ``w = g v /
  ||v||``: the uncentred normalization's ``M`` (:class:`WeightNormalization`).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_flatness.functional.estimators.layer_rules.base import argument
from lightning_flatness.functional.estimators.node_rules.normalization_curvature import normalization_diagonal

__all__ = ["WEIGHT_FUNCTION_RULES", "WeightFunctionRule", "covered_input", "register_weight_function_rule"]


class WeightFunctionRule:
    """The exact curvature diagonal of one op on weights alone. Subclasses implement the two methods."""

    #: the op names this rule covers, as the recorder sees them
    ops: tuple[str, ...] = ()

    def input_of(self, args: tuple, kwargs: dict) -> Optional[Tensor]:
        """The argument whose curvature the rule gives (the weight), or None when the call is not covered."""
        raise NotImplementedError

    def diagonal(self, args: tuple, kwargs: dict, adjoint: Tensor) -> Tensor:
        """``diag(M)`` shaped like :meth:`input_of`'s tensor, for the output's adjoint ``adjoint``."""
        raise NotImplementedError


class WeightStandardization(WeightFunctionRule):
    ops = ("batch_norm",)

    def input_of(self, args: tuple, kwargs: dict) -> Optional[Tensor]:
        x = argument(args, kwargs, 0, ("input",))
        training = argument(args, kwargs, 5, ("training",), False)
        if not isinstance(x, Tensor) or x.ndim < 2 or not training:
            return None
        if any(
            argument(args, kwargs, i, (k,)) is not None for i, k in ((1, "running_mean"), (2, "running_var"))
        ):
            return None  # running statistics would be updated: not a pure function of the weight
        return x

    def diagonal(self, args: tuple, kwargs: dict, adjoint: Tensor) -> Tensor:
        x = argument(args, kwargs, 0, ("input",))
        gamma = argument(args, kwargs, 3, ("weight",))
        eps = float(argument(args, kwargs, 7, ("eps",), 1e-5))
        channels = x.shape[1]
        rows = x.detach().transpose(0, 1).reshape(channels, -1).to(torch.float64)  # (C, N * spatial)
        r = adjoint.detach().transpose(0, 1).reshape(channels, -1).to(torch.float64)
        if gamma is not None:
            r = r * gamma.detach().reshape(channels, 1).to(torch.float64)
        diag = normalization_diagonal(rows, r, eps, centered=True)
        moved = diag.reshape(channels, x.shape[0], *x.shape[2:]).transpose(0, 1)
        return moved.reshape(x.shape).to(x.dtype)


class WeightNormalization(WeightFunctionRule):
    """``torch._weight_norm(v, g, dim)`` (``torch.nn.utils.parametrizations.weight_norm``):
    ``w = g v / ||v||`` with the norm over every dim but ``dim`` (over all of ``v`` for ``dim=-1``). Per
    slice ``a`` of ``D`` entries, ``a / ||a|| = u / sqrt(D)`` with ``u`` the RMS normalization of ``a``
    without ``eps``, so ``M`` is the uncentred normalization's with ``r = G g / sqrt(D)``; ``w`` is linear
    in ``g``."""

    ops = ("_weight_norm",)

    def input_of(self, args: tuple, kwargs: dict) -> Optional[Tensor]:
        v = argument(args, kwargs, 0, ("v",))
        return v if isinstance(v, Tensor) and v.ndim >= 1 else None

    def diagonal(self, args: tuple, kwargs: dict, adjoint: Tensor) -> Tensor:
        v = argument(args, kwargs, 0, ("v",))
        g = argument(args, kwargs, 1, ("g",))
        dim = int(argument(args, kwargs, 2, ("dim",), 0))
        f64 = torch.float64
        if dim == -1:  # one norm over the whole tensor
            rows, r = v.detach().reshape(1, -1).to(f64), adjoint.detach().reshape(1, -1).to(f64)
            gain = g.detach().reshape(1, 1).to(f64)
        else:
            rows = v.detach().movedim(dim, 0).reshape(v.shape[dim], -1).to(f64)
            r = adjoint.detach().movedim(dim, 0).reshape(v.shape[dim], -1).to(f64)
            gain = g.detach().reshape(-1, 1).to(f64)
        r = r * gain / math.sqrt(rows.shape[1])
        diag = normalization_diagonal(rows, r, 0.0, centered=False)
        if dim == -1:
            return diag.reshape(v.shape).to(v.dtype)
        moved = v.movedim(dim, 0).shape
        return diag.reshape(moved).movedim(0, dim).to(v.dtype)


#: ``{op name: rule}``.
WEIGHT_FUNCTION_RULES: dict[str, WeightFunctionRule] = {}


def register_weight_function_rule(rule: WeightFunctionRule) -> WeightFunctionRule:
    """Add ``rule`` under each of its ``ops``."""
    for op in rule.ops:
        WEIGHT_FUNCTION_RULES[op] = rule
    return rule


register_weight_function_rule(WeightStandardization())
register_weight_function_rule(WeightNormalization())


def covered_input(name: str, args: tuple, kwargs: dict) -> Optional[Any]:
    """``(rule, input)`` when a registered rule covers this call, else None."""
    rule = WEIGHT_FUNCTION_RULES.get(name)
    if rule is None:
        return None
    x = rule.input_of(args, kwargs)
    return None if x is None else (rule, x)
