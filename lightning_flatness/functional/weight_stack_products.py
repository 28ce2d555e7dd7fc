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
and runs as the same convolution. So do two more products of data and a weight that no layer rule reads, as
Mamba's selective scan writes them (:func:`matmul_as_stack_product`, :func:`product_as_stack_product`): a
2-D weight as ``matmul``'s left factor (``dt_proj.weight @ x``; ``x @ W`` has a layer rule of its own) and an
elementwise product with a weight broadcast over the samples (``A[None, :, None, :] * dt[..., None]`` with
``A = -exp(A_log)``, a function of the weight alone: its exponential's curvature is taken exactly by the
sketched Hessian, as for any elementwise function of the weights); and a batched weight as ``matmul``'s right
factor, broadcast over the samples (the Conformer's relative attention, ``q @ P`` with ``P`` ``(1, H, d, S)``
the position encodings projected by a weight: :func:`batched_matmul_as_stack_product`); and ``bmm`` or an
elementwise product with a function of the weights repeated over the samples (WavLM's gated position bias,
SEW-D's disentangled attention: :func:`repeated_over_samples`), per sample with one block. Factors of two
dtypes are left as they are.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = [
    "WeightStackProducts",
    "einsum_as_stack_product",
    "batched_matmul_as_stack_product",
    "repeated_over_samples",
    "matmul_as_stack_product",
    "product_as_stack_product",
    "stack_product_as_convolution",
]

_BATCHED_PRODUCTS = (torch.bmm, Tensor.bmm)
_MATMULS = (torch.matmul, Tensor.matmul, Tensor.__matmul__)
_PRODUCTS = (torch.mul, torch.multiply, Tensor.mul, Tensor.multiply, Tensor.__mul__, Tensor.__rmul__)
_ALL_PRODUCTS = _BATCHED_PRODUCTS + _PRODUCTS  # checked on every op of a recorded forward: built once


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


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def matmul_as_stack_product(weight: Tensor, x: Tensor) -> Optional[Tensor]:
    """``torch.matmul(weight, x)`` for a 2-D ``weight`` ``(O, I)`` and ``x`` ``(..., I, T)`` computed from the
    data (Mamba's ``dt_proj.weight @ x``), as :func:`einsum_as_stack_product` of the same product; None for
    other shapes. (``x @ W`` has a layer rule of its own: ``layer_rules.matmul``.)

    Example:
        >>> import torch
        >>> w, x = torch.randn(4, 3), torch.randn(2, 3, 5)
        >>> torch.allclose(matmul_as_stack_product(w, x), w @ x, atol=1e-6)
        True
    """
    if weight.ndim != 2 or x.ndim < 2 or x.ndim > len(_LETTERS) - 1 or x.shape[-2] != weight.shape[1]:
        return None
    rows = _LETTERS[: x.ndim]  # x's indices; "z" the output's, the weight's rows
    return einsum_as_stack_product(f"{rows},z{rows[-2]}->{rows[:-2]}z{rows[-1]}", x, weight)


def batched_matmul_as_stack_product(x: Tensor, weight: Tensor) -> Optional[Tensor]:
    """``torch.matmul(x, weight)`` for ``x`` ``(N, ..., T, I)`` computed from the data and a batched
    ``weight`` ``(..., I, O)`` of 3 or more dims broadcast over the samples (its leading dims each 1 or
    ``x``'s), as :func:`einsum_as_stack_product` of the same products: the weight's leading dims longer than 1
    are groups (the Conformer's relative attention: queries ``(N, H, T, d)`` against the position encodings
    projected by a weight, ``(1, H, d, S)``, one matrix per head); None for other shapes. (A 2-D ``weight``
    has a layer rule: ``layer_rules.matmul``.)

    Example:
        >>> import torch
        >>> x, w = torch.randn(2, 3, 5, 4), torch.randn(1, 3, 4, 6)
        >>> torch.allclose(batched_matmul_as_stack_product(x, w), x @ w, atol=1e-6)
        True
    """
    if (
        weight.ndim < 3
        or x.ndim < weight.ndim
        or x.ndim > len(_LETTERS) - 3
        or x.shape[-1] != weight.shape[-2]
    ):
        return None
    lead = x.ndim - 2
    w_lead = (1,) * (x.ndim - weight.ndim) + tuple(weight.shape[:-2])
    if w_lead[0] != 1 or any(w not in (1, n) for w, n in zip(w_lead, x.shape)):
        return None
    groups = [d for d in range(lead) if w_lead[d] > 1]
    letters = _LETTERS[:lead]  # x's leading indices; "x", "y", "z": rows, contracted, outputs
    ws = "".join(letters[d] for d in groups) + "yz"
    wv = weight.reshape([w_lead[d] for d in groups] + list(weight.shape[-2:]))
    return einsum_as_stack_product(f"{letters}xy,{ws}->{letters}xz", x, wv)


def product_as_stack_product(x: Tensor, weight: Tensor) -> Optional[Tensor]:
    """``x * weight`` (broadcast) for ``x`` with the samples along dim 0 and ``weight`` broadcast there, as
    :func:`einsum_as_stack_product` of the same products: the dims where both are longer than 1 are groups,
    those where ``x`` alone is are rows, those where ``weight`` alone is are outputs (a grouped 1x1
    convolution with one input channel per group: Mamba's ``A[None, :, None, :] * dt[..., None]``); None
    where ``weight`` is not broadcast over dim 0 or the shapes do not broadcast.

    Example:
        >>> import torch
        >>> x, w = torch.randn(2, 3, 5, 1), torch.randn(3, 1, 4)
        >>> torch.allclose(product_as_stack_product(x, w), x * w, atol=1e-6)
        True
    """
    try:
        shape = torch.broadcast_shapes(x.shape, weight.shape)
    except RuntimeError:
        return None
    if len(shape) > len(_LETTERS) or len(shape) < 2 or len(shape) != x.ndim:
        return None
    w_shape = (1,) * (len(shape) - weight.ndim) + tuple(weight.shape)
    if w_shape[0] != 1:
        return None
    xs = ws = out = ""
    x_keep: list[int] = []
    w_keep: list[int] = []
    for d, letter in enumerate(_LETTERS[: len(shape)]):
        in_x, in_w = x.shape[d] > 1 or w_shape[d] == 1, w_shape[d] > 1
        out += letter
        if in_x:
            xs, x_keep = xs + letter, x_keep + [d]
        if in_w:
            ws, w_keep = ws + letter, w_keep + [d]
    if not ws:
        return None
    xv = x.reshape([x.shape[d] for d in x_keep])
    wv = weight.reshape(w_shape).reshape([w_shape[d] for d in w_keep])
    return einsum_as_stack_product(f"{xs},{ws}->{out}", xv, wv)


#: autograd nodes between a repeat and its use that keep dim 0 where it is (views, reshapes, copies;
#: transposes of other dims are checked): :func:`repeated_over_samples`
_SHAPE_NODES = frozenset(
    {"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "CloneBackward0", "TransposeBackward0"}
)


def _saved(node: Any, *names: str) -> Optional[tuple[Any, ...]]:
    """The values autograd saved on ``node`` under ``names`` (private attributes of its nodes), or None where
    one is missing (another PyTorch version): then :func:`repeated_over_samples` proves nothing."""
    values = tuple(getattr(node, name, None) for name in names)
    return None if any(v is None for v in values) else values


def repeated_over_samples(weight: Tensor, n: int) -> Optional[Tensor]:
    """For ``weight`` ``(n k, ...)``, a function of the weights alone repeated over ``n`` samples sample-major
    (``u.repeat(n, ...)``, then views that merge dim 0 with the dims after it, transposes of other dims and
    copies: WavLM's position bias, ``(H, T, T)`` repeated to ``(N H, T, T)``; SEW-D's position projections,
    ``(H, S, d)`` to ``(N H, S, d)``), the block of one sample, ``(k, ...)``: a view of ``weight``, and the
    same function of the weights as every other block (each is a copy of ``u``, in the same layout); None
    where ``weight`` is not such a repeat (no ``repeat`` by ``n`` along dim 0 behind it through such nodes,
    a view that splits dim 0) or its blocks differ (checked as well).

    Example:
        >>> import torch
        >>> u = torch.randn(2, 3, 3, requires_grad=True)
        >>> w = u.unsqueeze(0).repeat(4, 1, 1, 1).view(8, 3, 3)
        >>> torch.equal(repeated_over_samples(w, 4), u), repeated_over_samples(w, 2) is None
        (True, True)
    """
    if n < 2 or weight.ndim < 1 or weight.shape[0] % n:
        return None
    node, rows = weight.grad_fn, weight.shape[0]  # rows: dim 0 where the walk is
    while node is not None and type(node).__name__ in _SHAPE_NODES:
        name = type(node).__name__
        if name == "TransposeBackward0":  # the dims saved as unsigned: -1 is 2^64 - 1
            saved = _saved(node, "_saved_dim0", "_saved_dim1")
            if saved is None or 0 in ((d - 2**64 if d >= 2**63 else d) % weight.ndim for d in saved):
                return None
        elif name != "CloneBackward0":  # a view: dim 0 merged with the dims after it, never split
            (sizes,) = _saved(node, "_saved_self_sym_sizes") or ((),)
            before = int(sizes[0]) if sizes else 0
            if before == 0 or rows % before:
                return None
            rows = before
        node = node.next_functions[0][0]
    if node is None or type(node).__name__ != "RepeatBackward0":
        return None
    saved = _saved(node, "_saved_repeats", "_saved_self_sym_sizes")
    if saved is None:
        return None
    repeats, sizes = tuple(saved[0]), tuple(saved[1])
    leading = sizes[0] if len(sizes) == len(repeats) else 1  # more repeats than dims: new leading dims of 1
    if repeats[:1] != (n,) or rows != n * int(leading):
        return None
    blocks = weight.reshape(n, weight.shape[0] // n, *weight.shape[1:])
    if not torch.equal(blocks, blocks[:1].expand_as(blocks)):
        return None
    return blocks[0]


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
        self,
        is_weight: Callable[[Tensor], bool],
        is_data: Optional[Callable[[Tensor], bool]] = None,
        batch_size: int = 0,
    ) -> None:
        super().__init__()
        self.is_weight = is_weight
        self.is_data = is_data
        self.batch_size = batch_size

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _ALL_PRODUCTS and len(args) == 2 and not kwargs:
            out = self._product_with_a_repeat(func, *args)
            if out is not None:
                return out
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
        if func in _MATMULS and len(args) == 2 and not kwargs and self._data_and_weight(args[1], args[0]):
            out = matmul_as_stack_product(args[0], args[1])  # a weight as the left factor
            if out is not None:
                return out
        if func in _MATMULS and len(args) == 2 and not kwargs and self._data_and_weight(args[0], args[1]):
            out = batched_matmul_as_stack_product(args[0], args[1])  # a batched weight as the right factor
            if out is not None:
                return out
        if func in _PRODUCTS and len(args) == 2 and not kwargs:
            for x, w in (args, args[::-1]):
                if self._data_and_weight(x, w):
                    out = product_as_stack_product(x, w)
                    if out is not None:
                        return out
        operands = _einsum_operands(func, args, kwargs)
        if operands is not None and self._data_and_weight(*operands):
            out = einsum_as_stack_product(args[0], *operands)
            if out is not None:
                return out
        return func(*args, **kwargs)

    def _product_with_a_repeat(self, func: Any, a: Any, b: Any) -> Optional[Tensor]:
        """``bmm(x, W)`` or ``x * W`` (either order) where ``W`` is a function of the weights repeated over
        the samples (:func:`repeated_over_samples`) and ``x`` has the same ``n k`` rows: per sample, the
        product with the one block, as the grouped product of :func:`einsum_as_stack_product` (the rows of
        ``x`` in ``n`` blocks of ``k``), back in the ``(n k, ...)`` layout. None otherwise."""
        n = self.batch_size
        pairs = ((a, b),) if func in _BATCHED_PRODUCTS else ((a, b), (b, a))
        for x, w in pairs:
            if not self._data_and_weight(x, w) or x.ndim != w.ndim or x.shape[0] != w.shape[0]:
                continue
            block = repeated_over_samples(w, n)
            if block is None:
                continue
            rows = x.reshape(n, x.shape[0] // n, *x.shape[1:])
            if func in _BATCHED_PRODUCTS:
                if x.ndim != 3 or x.shape[2] != w.shape[1]:
                    return None
                out = einsum_as_stack_product("bgtc,gco->bgto", rows, block)
            else:
                out = product_as_stack_product(rows, block.unsqueeze(0))
            if out is not None:
                return out.reshape(x.shape[0], *out.shape[2:])
        return None

    def _data_and_weight(self, x: Any, w: Any) -> bool:
        """Whether ``x`` is computed from the data and ``w`` is a selected weight or a function of the
        selected weights alone, both floating tensors of one dtype."""
        return (
            isinstance(x, Tensor)
            and isinstance(w, Tensor)
            and x.dtype == w.dtype
            and x.is_floating_point()
            and self.is_weight(w)
            and not self.is_weight(x)
            and (x.requires_grad if self.is_data is None else self.is_data(x))
        )
