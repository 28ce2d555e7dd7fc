r"""Batched products with a stack of weight matrices, as a grouped convolution, for the estimators' recorded
forward pass only.

Some mixture-of-experts and grouped layers multiply token rows by a stack of ``G`` weight matrices with
``torch.bmm``: Llama 4's experts (``Llama4TextExperts``: every expert on every token row, scaled by its
router score, ``bmm(x (E, T, H), gate_up_proj (E, H, 2I))``), Inkling's shared experts, DeepSeek-V4's grouped
output projection (``bmm`` on a view of the weight). No layer rule reads ``bmm`` (its dim 0 is the group, not
the samples), so every estimator fell back to one backward pass per sample and column, and ``auto`` measured
the Gauss-Newton diagonal.

:class:`WeightStackProducts` evaluates ``bmm(x, W)`` with ``x`` ``(G, R, I)`` computed from the data and ``W``
``(G, I, O)`` a selected weight, or a function of the selected weights alone (as the recorder knows them), as
the same function in the operations the per-layer contractions read: a 1x1 convolution with ``G`` groups over
the ``R`` rows,

.. math:: y_{g r} = W_g^\top x_{g r} \quad\Longleftrightarrow\quad
          \mathrm{conv1d}\big(x^{(R,\, G I,\, 1)},\ W^{\top}{}^{(G O,\, I,\, 1)},\ \mathrm{groups}=G\big),

the rows ``R`` (``N T`` token rows, sample-major) as the convolution's batch, which its layer rule reads per
sample (:meth:`~lightning_flatness.functional.estimators.layer_rules.conv.ConvRule.regroup`, checked by the
batch-independence probe), and the weight's transpose and reshape pulled back to it exactly
(:mod:`~lightning_flatness.functional.estimators.layer_rules.shared`). The same values and derivatives of
every order (a reordering of the same products); the result is made contiguous, as ``bmm``'s is. Entered
inside the recorder, like :class:`~lightning_flatness.functional.out_of_place_division.OutOfPlaceDivision`,
so that the recorder sees the operations it issues. Every other call passes through unchanged. Cost: a copy
of ``x`` and of the output into the convolution's layout.

``torch.einsum`` of data and a weight (Funnel's relative attention: queries against position encodings
projected by a weight, ``binh,tnh->bnit``, and against segment embeddings) is the same kind of product once
its indices are laid out as groups, rows, contracted and output indices (:func:`einsum_as_stack_product`),
and runs as the same convolution.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["WeightStackProducts", "einsum_as_stack_product", "stack_product_as_convolution"]

_BATCHED_PRODUCTS = (torch.bmm, Tensor.bmm)


def stack_product_as_convolution(x: Tensor, weight: Tensor) -> Tensor:
    """``torch.bmm(x, weight)`` for ``x`` ``(G, R, I)`` and ``weight`` ``(G, I, O)``, as a 1x1 convolution
    with ``G`` groups over the ``R`` rows (module docstring): ``(G, R, O)``, contiguous.

    Example:
        >>> import torch
        >>> x, w = torch.randn(3, 5, 4), torch.randn(3, 4, 2)
        >>> torch.allclose(stack_product_as_convolution(x, w), torch.bmm(x, w), atol=1e-6)
        True
    """
    groups, rows, inputs = x.shape
    outputs = weight.shape[2]
    columns = x.transpose(0, 1).reshape(rows, groups * inputs, 1)
    kernel = weight.transpose(1, 2).reshape(groups * outputs, inputs, 1)
    out = F.conv1d(columns, kernel, groups=groups)  # (R, G O, 1)
    return out.view(rows, groups, outputs).transpose(0, 1).contiguous()


def einsum_as_stack_product(equation: str, x: Tensor, weight: Tensor) -> Optional[Tensor]:
    """``torch.einsum(equation, x, weight)`` as :func:`stack_product_as_convolution`, or None where the
    equation is not a product of the two: each index of ``weight`` either shared with ``x`` and the output
    (a group ``G``), shared with ``x`` alone (contracted, ``I``) or in the output alone (``O``); each of ``x``
    shared with ``weight`` or in the output (a row ``R``); no index repeated in an operand, no ellipsis.
    ``x`` is laid out ``(G, R, I)`` with its rows in its own order (sample-major where ``x`` has its samples
    first: Funnel's ``binh,tnh->bnit`` of queries and a projection of position encodings), ``weight``
    ``(G, I, O)``, and the product is put back in the output's order (a view).

    Example:
        >>> import torch
        >>> x, w = torch.randn(2, 5, 3, 4), torch.randn(6, 3, 4)
        >>> y = einsum_as_stack_product("binh,tnh->bnit", x, w)
        >>> torch.allclose(y, torch.einsum("binh,tnh->bnit", x, w), atol=1e-6)
        True
    """
    spec = equation.replace(" ", "")
    if "..." in spec or "->" not in spec or spec.count(",") != 1:
        return None
    inputs, out = spec.split("->")
    xs, ws = inputs.split(",")
    if len(xs) != x.ndim or len(ws) != weight.ndim or any(len(set(t)) != len(t) for t in (xs, ws, out)):
        return None
    if set(out) - set(xs) - set(ws):
        return None
    groups = [i for i in ws if i in xs and i in out]
    contracted = [i for i in ws if i in xs and i not in out]
    outputs = [i for i in ws if i not in xs]
    rows = [i for i in xs if i not in ws]
    if any(i not in out for i in outputs + rows):
        return None  # an index summed over one operand alone
    size = dict(zip(xs, x.shape)) | dict(zip(ws, weight.shape))
    if any(dict(zip(xs, x.shape))[i] != dict(zip(ws, weight.shape))[i] for i in groups + contracted):
        return None

    def count(indices: list[str]) -> int:
        return math.prod(size[i] for i in indices)

    a = x.permute([xs.index(i) for i in groups + rows + contracted])
    a = a.reshape(count(groups), count(rows), count(contracted))
    b = weight.permute([ws.index(i) for i in groups + contracted + outputs])
    b = b.reshape(count(groups), count(contracted), count(outputs))
    product = stack_product_as_convolution(a, b)  # (G, R, O)
    laid = groups + rows + outputs
    product = product.view([size[i] for i in laid])
    return product.permute([laid.index(i) for i in out])


def _einsum_operands(func: Any, args: tuple, kwargs: dict) -> Optional[tuple[Any, Any]]:
    """The two operands of ``torch.einsum(equation, a, b)`` or ``torch.einsum(equation, [a, b])``, or None."""
    if func is not torch.einsum or kwargs or not args or not isinstance(args[0], str):
        return None
    operands = args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    return (operands[0], operands[1]) if len(operands) == 2 else None


class WeightStackProducts(TorchFunctionMode):
    """Evaluates ``bmm(x, W)`` as :func:`stack_product_as_convolution` where ``is_weight(W)`` and not
    ``is_weight(x)`` (module docstring); every other call passes through unchanged.

    Also ``torch.einsum(equation, x, W)`` (two operands, either call form) where ``x`` is computed from the
    data, as :func:`einsum_as_stack_product` lays it out; a constant ``x`` (position encodings) times a
    weight is a function of the weights alone and stays an ``einsum``.

    Args:
        is_weight: whether a tensor is a selected weight or a function of the selected weights alone (the
            recorder's own test).
        is_data: whether a tensor is computed from the data (the recorder's); by default, whether it
            requires grad.

    Example:
        >>> import torch
        >>> w = torch.randn(2, 3, 4, requires_grad=True)
        >>> x = torch.randn(2, 6, 3)
        >>> with WeightStackProducts(lambda t: t is w):
        ...     y = torch.bmm(x, w)
        >>> type(y.grad_fn).__name__, torch.allclose(y, torch.bmm(x, w), atol=1e-6)
        ('CloneBackward0', True)
    """

    def __init__(
        self, is_weight: Callable[[Tensor], bool], is_data: Optional[Callable[[Tensor], bool]] = None
    ) -> None:
        super().__init__()
        self.is_weight = is_weight
        self.is_data = is_data

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _BATCHED_PRODUCTS and len(args) == 2 and not kwargs:
            x, w = args
            if (
                isinstance(x, Tensor)
                and isinstance(w, Tensor)
                and x.ndim == 3
                and w.ndim == 3
                and x.shape[0] == w.shape[0]
                and x.shape[2] == w.shape[1]
                and x.dtype == w.dtype
                and not x.is_complex()
                and self.is_weight(w)
                and not self.is_weight(x)
            ):
                return stack_product_as_convolution(x, w)
        operands = _einsum_operands(func, args, kwargs)
        if operands is not None:
            x, w = operands
            if (
                isinstance(x, Tensor)
                and isinstance(w, Tensor)
                and x.dtype == w.dtype
                and x.is_floating_point()
                and self.is_weight(w)
                and not self.is_weight(x)
                and (x.requires_grad if self.is_data is None else self.is_data(x))
            ):
                out = einsum_as_stack_product(args[0], x, w)
                if out is not None:
                    return out
        return func(*args, **kwargs)
