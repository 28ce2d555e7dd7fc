r"""Exact Hessian diagonal for networks that are piecewise linear in each individual weight.

The diagonal :math:`\mathrm{diag}(H)` of the Hessian of the mean loss is what Algorithm 1 of the
paper estimates by finite differences (eq. 61) and what eq. 13 and eq. 17 consume. For the networks
the paper studies it can be computed exactly, with zero variance, from the generalized Gauss-Newton
(GGN) identity. With logits :math:`f_n = f(x_n; w) \in \mathbb{R}^D`, per-sample losses
:math:`\ell_n` and the mean loss :math:`L = \frac1N \sum_n \ell_n(f_n)`,

.. math::

    \frac{\partial^2 L}{\partial w_i^2}
    = \frac1N \sum_n \Big( J_{n,i}^\top \Lambda_n J_{n,i}
      + \nabla_{f}\ell_n^\top \frac{\partial^2 f_n}{\partial w_i^2} \Big),
    \qquad J_{n,i} = \frac{\partial f_n}{\partial w_i},\;
    \Lambda_n = \nabla^2_{f} \ell_n .

If :math:`f` is piecewise linear in every *single* weight :math:`w_i` (ReLU / LeakyReLU, max and
average pooling, eval-mode BatchNorm, residual sums, flatten, eval-mode dropout between Linear /
Conv layers, each weight used once), then :math:`\partial^2 f_n / \partial w_i^2 = 0` almost
everywhere: the weight enters one affine map, and everything downstream is a composition of
piecewise-linear maps. The second term vanishes and ``diag(H) = diag(J^T Lambda J) / N`` exactly.
``Lambda_n`` need not be positive semi-definite (it is indefinite for the normalized
softmax-cross-entropy, eq. 20); the identity holds regardless.

Algorithm (BackPACK's ``DiagGGNExact`` [1] with a signed symmetric factorisation of ``Lambda``):

1. one forward pass; every ``linear`` / ``conv{1,2,3}d`` call whose weight or bias is selected is
   recorded (its input ``a`` and output ``z``, passed on to the model without a copy unless the
   model changes it in place);
2. signed factors of ``Lambda_n`` (:mod:`.loss_factors`): for ``F.cross_entropy`` with its defaults
   the analytic rank-``(C - 1)`` factorisation ``Lambda_n = S_n S_n^T`` through a Householder
   reflection (one column fewer than BackPACK's ``diag(sqrt(p_n)) - p_n sqrt(p_n)^T``), with no double
   backward and no eigendecomposition; for eq. 20 the closed-form ``Lambda_n`` eigendecomposed on the
   complement of the constant shift (at most ``D - 1`` columns); for any other loss ``Lambda_n`` from
   ``D`` double-backward passes through the loss only (batched; the Hessian of a mean of per-sample
   losses in the logits is block-diagonal) and its eigendecomposition
   ``Lambda_n = sum_k s_nk u_nk u_nk^T``;
3. the columns ``v_n = sqrt(|s_nk| / N) u_nk`` for every eigen-index ``k`` (at most ``D``; directions
   with ``|s| ~ 0`` for every sample, such as the constant shift of cross-entropy, are dropped) are
   propagated from the logits of all samples in one batched backward pass, giving ``g_nk = dz_n``
   for every recorded layer output ``z``: the columns folded into the batch, ``(K N, ...)``, through
   hand-written backward formulas where every operation has one (Linear, Conv, ReLU, pooling,
   eval-mode BatchNorm, residual sums, reshapes: :mod:`.layer_rules.column_backward`; each layer is
   then contracted as soon as its gradient is complete), else autograd's ``is_grads_batched``;
4. per layer, the per-sample gradient of ``v_n^T f_n`` is ``g_n a_n^T`` (Linear; summed over extra
   leading positions) or ``g_n unfold(a_n)^T`` (Conv, per group); its square, weighted by
   ``sign(s_nk)``, is summed over samples and ``k``. For a plain Linear layer the square factorises:
   ``sum_n sign_n (g_n^2)(a_n^2)^T``, one matrix product. With few positions ``P`` per sample (small
   feature maps) the square of the sum over positions is expanded into position pairs, again one
   matrix product and no per-sample gradients (:func:`~.layer_rules.contraction.position_pair_contraction`);
   convolutions with few input channels get their per-sample gradients from one grouped
   convolution backward (:func:`~.layer_rules.conv.grouped_squared_gradients`).

**Cost.** One forward pass (two when the model changes a recorded layer output in place), one
batched backward pass of ``K (+ 1) <= D + 1`` columns over the batch (``D`` = outputs per sample,
``K = C - 1`` for cross-entropy over ``C`` classes; the extra column is the batch-independence
check, below, where it is needed), and per layer and ``k`` a contraction costing about one
weight-gradient computation
(``O(N * out * in)`` for Linear, ``O(N * C_out * C_in * k * L)`` for Conv). Memory: the graph of one
forward pass, the stored inputs (Conv inputs unfolded: ``prod(kernel_size)`` times larger), the
layer-output gradients of all ``K`` columns at once and per-sample gradients of at most ``2**18``
elements at a time (``2**20`` on the grouped-convolution path).

**Checks: the result is never silently wrong.** During the forward a
:class:`torch.overrides.TorchFunctionMode` sees every torch function applied to a tensor that
depends on the selected weights and compares it with an allowlist (:data:`PIECEWISE_LINEAR_OPS`,
:data:`MULTILINEAR_OPS`; see there for the reasoning). Anything else (``tanh``, ``sigmoid``,
``gelu``, ``softmax`` inside the model, ``layer_norm``, ``batch_norm`` with batch statistics,
attention, products or quotients of two weight-dependent tensors, train-mode dropout, a weight used
twice, a tensor produced by an operation the mode could not see) makes the GGN differ from the
Hessian: with ``strict=True`` an :class:`ExactMethodNotApplicable` (a :class:`ValueError`) names the
operation and the module, with ``strict=False`` a :class:`UserWarning` does and the **GGN diagonal**
is returned. :func:`gauss_newton_diagonal` returns the GGN diagonal of any model without the check,
with the reasons, per weight tensor, for ``method="ggn_hutchinson"`` (:mod:`.ggn_hutchinson`), which
adds an unbiased estimate of the difference. Operations before
the first selected weight are not restricted (a frozen tanh feature extractor is fine). The loss
must be the mean of per-sample losses (checked on values: the batch loss against its two halves).
The per-layer contractions further need samples not to interact after the first selected layer.
When every operation on weight-dependent tensors provably keeps the samples apart (Linear, Conv,
pooling, eval-mode BatchNorm, elementwise operations and residual sums, ``flatten`` from dim 1,
padding of the non-batch dims, all with the batch along dim 0: :func:`_keeps_samples_apart`), that
holds by construction; otherwise one backward column from sample 0 checks that no other sample's
layer outputs receive gradient. When that fails (train-mode BatchNorm, a batch mean inside the model,
sequence-first layouts) or a weight is
used outside ``linear`` / ``conv``, the per-(sample, k) path is taken instead: ``N * K`` vectorised
backward passes (with a warning about the cost), still exact for the GGN.

**Models and losses as users have them.** ``inputs`` may be a tensor, a tuple (positional
arguments) or a dict (keyword arguments, e.g. Hugging Face batches), and the output a tensor, a tuple
or a dict / ``ModelOutput`` with ``"logits"`` (:mod:`~lightning_flatness.functional.model_io`). With
:class:`~lightning_flatness.functional.model_io.TokenLoss` on ``(N, T, V)`` logits a sequence is one
sample: its loss Hessian is block-diagonal over its tokens, factorised with ``T * K`` columns
(:func:`_token_loss_factors`), weighted by the token-mean of the loss.

**Limitations.** ``D x D`` eigendecompositions per sample: meant for classification-sized outputs
(for a ``K``-independent estimate see :mod:`.gauss_newton_mc`).
The per-layer path covers ``linear`` (any leading dims) and ``conv1d/2d/3d`` with any stride,
padding (including ``"same"`` and non-zero padding modes), dilation and groups; the allowlist is
conservative (``x * y`` of two weight-dependent tensors is flagged even when they depend on
different weights, where the diagonal would still be exact).

References:
    [1] F. Dangel, F. Kunstner, P. Hennig. BackPACK: Packing more into backprop. ICLR 2020
    (``backpack.extensions.DiagGGNExact``).
    [2] N. N. Schraudolph. Fast curvature matrix-vector products for second-order gradient
    descent. Neural Computation 14(7), 2002 (the generalized Gauss-Newton matrix).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_flatness.functional.composite_attention import explicit_multi_head_attention
from lightning_flatness.functional.estimators.layer_rules import (
    LAYER_RULES,
    LayerCall,
    SharedCalls,
    accumulate_layer,
    accumulate_shared,
    argument,
)
from lightning_flatness.functional.estimators.layer_rules.column_backward import ColumnTape
from lightning_flatness.functional.estimators.loss_factors import (  # noqa: F401  (re-exported)
    _cross_entropy_factors,
    _loss_factors,
    _per_sample_loss_hessians,
    _plain_class_targets,
    _signed_factors,
    _token_loss_factors,
)
from lightning_flatness.functional.estimators.node_rules import NODE_RULES, NodeCall
from lightning_flatness.functional.model_io import (
    ModelInputs,
    extract_logits,
    inputs_batch_size,
    map_inputs,
)

__all__ = [
    "exact_hessian_diagonal",
    "ExactMethodNotApplicable",
    "gauss_newton_diagonal",
    "GaussNewtonDiagonal",
    "PIECEWISE_LINEAR_OPS",
    "MULTILINEAR_OPS",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


class ExactMethodNotApplicable(ValueError):
    """The Hessian diagonal of this model and loss is not its Gauss-Newton diagonal.

    Raised by :func:`exact_hessian_diagonal` with ``strict=True`` (a :class:`ValueError`, so
    ``except ValueError`` still catches it). The message names every reason and the alternatives.

    Attributes:
        issues: the reasons, one string each (an operation off the allowlist and its module, a
            weight used twice, a loss that is not a mean of per-sample losses, ...).
        gauss_newton_applicable: whether ``method="ggn_hutchinson"`` can take over: False when the
            loss is not a mean of per-sample losses or the model draws random numbers (train-mode
            dropout), where its exact Gauss-Newton part does not apply either.
    """

    def __init__(self, message: str, issues: tuple[str, ...] = (), gauss_newton_applicable: bool = True):
        super().__init__(message)
        self.issues = tuple(issues)
        self.gauss_newton_applicable = bool(gauss_newton_applicable)


#: Operations that are piecewise linear jointly in all their tensor arguments, so any number of
#: arguments may depend on the weights. Selections, reshapes, concatenations and copies move
#: entries around (linear); sums, means, average pooling, linear interpolation and padding form
#: fixed linear combinations; ReLU, LeakyReLU, hardtanh, clamp, abs, max / min (elementwise or
#: reductions, max pooling), sorting and top-k are linear between kinks; floor / round / sign are
#: piecewise constant. Dropout and batch_norm are listed in :data:`_MODE_DEPENDENT_OPS` instead.
PIECEWISE_LINEAR_OPS = frozenset(
    {
        # a table lookup: linear in the table (the ids are integers)
        "embedding",
        # additive and sign
        "add",
        "sub",
        "rsub",
        "neg",
        "negative",
        "positive",
        "abs",
        "absolute",
        # piecewise-linear activations
        "relu",
        "relu6",
        "leaky_relu",
        "hardtanh",
        "hardsigmoid",
        "threshold",
        "clamp",
        "clip",
        "clamp_min",
        "clamp_max",
        "maximum",
        "minimum",
        "fmax",
        "fmin",
        "floor",
        "ceil",
        "round",
        "trunc",
        "fix",
        "sign",
        "sgn",
        "nan_to_num",
        # reductions and selections
        "max",
        "min",
        "amax",
        "amin",
        "sum",
        "mean",
        "nansum",
        "cumsum",
        "diff",
        "trace",
        "sort",
        "msort",
        "topk",
        "kthvalue",
        # pooling and resampling (fixed linear combinations or maxima of the inputs)
        "max_pool1d",
        "max_pool2d",
        "max_pool3d",
        "max_pool1d_with_indices",
        "max_pool2d_with_indices",
        "max_pool3d_with_indices",
        "adaptive_max_pool1d",
        "adaptive_max_pool2d",
        "adaptive_max_pool3d",
        "adaptive_max_pool1d_with_indices",
        "adaptive_max_pool2d_with_indices",
        "adaptive_max_pool3d_with_indices",
        "avg_pool1d",
        "avg_pool2d",
        "avg_pool3d",
        "adaptive_avg_pool1d",
        "adaptive_avg_pool2d",
        "adaptive_avg_pool3d",
        "interpolate",
        "upsample",
        "upsample_nearest",
        "upsample_bilinear",
        "pixel_shuffle",
        "pixel_unshuffle",
        "channel_shuffle",
        "unfold",
        "fold",
        "pad",
        # shape, copy and indexing
        "view",
        "view_as",
        "reshape",
        "reshape_as",
        "flatten",
        "unflatten",
        "ravel",
        "permute",
        "transpose",
        "swapaxes",
        "swapdims",
        "t",
        "T",
        "mT",
        "movedim",
        "moveaxis",
        "squeeze",
        "unsqueeze",
        "contiguous",
        "expand",
        "expand_as",
        "broadcast_to",
        "repeat",
        "repeat_interleave",
        "tile",
        "narrow",
        "select",
        "getitem",
        "setitem",
        "split",
        "split_with_sizes",
        "chunk",
        "unbind",
        "tensor_split",
        "cat",
        "concat",
        "concatenate",
        "stack",
        "hstack",
        "vstack",
        "flip",
        "fliplr",
        "flipud",
        "roll",
        "rot90",
        "diagonal",
        "diag_embed",
        "tril",
        "triu",
        "clone",
        "to",
        "type",
        "type_as",
        "float",
        "double",
        "detach",
        "index_select",
        "gather",
        "take_along_dim",
        "masked_fill",
        "masked_select",
        "where",
        "scatter",
        "scatter_add",
        "index_add",
        "index_copy",
        "index_put",
        "masked_scatter",
    }
)

#: Operations linear in each tensor argument separately (products): exact only when at most one
#: of their multiplicative arguments depends on the weights (``x * mask`` is linear in ``x``;
#: ``x * x`` is quadratic). A selected weight passed as the ``weight`` of ``linear`` / ``conv`` does
#: not count: it is the one variable of that layer and is checked to be used only once. Additive
#: arguments (``bias`` of linear / conv, ``input`` of ``addmm``-like ops) are not counted either.
MULTILINEAR_OPS = frozenset(
    {
        "mul",
        "multiply",
        "matmul",
        "mm",
        "bmm",
        "mv",
        "dot",
        "vdot",
        "inner",
        "outer",
        "ger",
        "einsum",
        "tensordot",
        "kron",
        "linear",
        "bilinear",
        "prelu",
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "addmm",
        "addmv",
        "baddbmm",
        "addbmm",
        "addcmul",
    }
)

# ops with an additive tensor argument: (position, keyword) excluded from the product count
_ADDITIVE_ARGUMENT = {
    **{op: (2, "bias") for op in ("linear", "conv1d", "conv2d", "conv3d", "bilinear")},
    **{op: (2, "bias") for op in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")},
    **{op: (0, "input") for op in ("addmm", "addmv", "baddbmm", "addbmm", "addcmul")},
}

# Exact only in evaluation mode: (position, keywords) of the `training` flag. batch_norm with
# training=True normalises by batch statistics, a nonlinear function of the weights that also
# couples the samples; dropout with training=True multiplies by a fresh random mask on every call.
_MODE_DEPENDENT_OPS = {
    "batch_norm": (5, ("training",)),
    "dropout": (2, ("training", "train")),
    "dropout1d": (2, ("training",)),
    "dropout2d": (2, ("training",)),
    "dropout3d": (2, ("training",)),
    "alpha_dropout": (2, ("training", "train")),
    "feature_alpha_dropout": (2, ("training", "train")),
}
_MODE_DEFAULT = {"batch_norm": False}  # F.dropout defaults to training=True

# quotients: linear in the numerator only
_DIVISIONS = {"div": 1, "divide": 1, "true_divide": 1, "rdiv": 0}  # position of the denominator

_DUNDER_ALIASES = {
    "__add__": "add",
    "__radd__": "add",
    "__iadd__": "add",
    "__sub__": "sub",
    "__isub__": "sub",
    "__rsub__": "rsub",
    "__mul__": "mul",
    "__rmul__": "mul",
    "__imul__": "mul",
    "__truediv__": "div",
    "__itruediv__": "div",
    "__div__": "div",
    "__idiv__": "div",
    "__rtruediv__": "rdiv",
    "__rdiv__": "rdiv",
    "__matmul__": "matmul",
    "__rmatmul__": "matmul",
    "__neg__": "neg",
    "__pos__": "positive",
    "__abs__": "abs",
    "__getitem__": "getitem",
    "__setitem__": "setitem",
    "__pow__": "pow",
    "__rpow__": "pow",
    "__ipow__": "pow",
}

_BATCHED_BACKWARD_ELEMENTS = 2**24  # bound on gradient elements of one batched backward (per-sample path)
_HUTCHINSON_HINT = (
    'use method="ggn_hutchinson" (the exact Gauss-Newton diagonal plus Hutchinson probes of '
    'the remainder: unbiased, low variance) or method="hutchinson" (any twice-differentiable '
    "model), or pass strict=False to get the generalized Gauss-Newton diagonal with a warning"
)
_HUTCHINSON_ONLY_HINT = (
    'use method="hutchinson" (any twice-differentiable model; the Gauss-Newton part of '
    '"ggn_hutchinson" does not apply here either), or pass strict=False to get the '
    "generalized Gauss-Newton diagonal with a warning"
)
# functions that draw random numbers: the model is then not a fixed function of its weights
_RANDOM_FUNCTIONS = frozenset(
    {
        "rand",
        "randn",
        "randint",
        "rand_like",
        "randn_like",
        "randint_like",
        "randperm",
        "bernoulli",
        "normal",
        "uniform",
        "multinomial",
        "poisson",
        "exponential",
        "geometric",
        "log_normal",
        "cauchy",
        "random",
        "rrelu",
    }
)


_OP_NAMES: dict[Any, str] = {}  # torch function -> canonical name (the recorder sees few distinct ones)


#: ops whose random draws depend on their arguments or that always draw (see ``_draws_random_numbers``)
_MAY_DRAW_RANDOM_NUMBERS = frozenset({*_RANDOM_FUNCTIONS, *_MODE_DEPENDENT_OPS, "rrelu"})


def _op_name(func: Any) -> str:
    """Canonical name of a torch function: ``Tensor.__iadd__`` -> ``add``, ``relu_`` -> ``relu`` (cached)."""
    try:
        return _OP_NAMES[func]
    except (KeyError, TypeError):  # TypeError: an unhashable callable
        pass
    name = _canonical_op_name(func)
    try:
        _OP_NAMES[func] = name
    except TypeError:
        pass
    return name


def _canonical_op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":  # property getter such as Tensor.T: the name is the descriptor's
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    name = name.split(".")[0]  # OpOverload names: "tanh.default"
    if name in _DUNDER_ALIASES:
        return _DUNDER_ALIASES[name]
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]  # in-place variant
    return name


def _tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor in a nest of tuples, lists and dicts."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _requiring_grad(args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensors in ``args`` and ``kwargs`` (nested in tuples, lists, dicts) that require grad; flat
    arguments, the common case, without the generator of :func:`_tensors`."""
    found = []
    for group in (args, kwargs.values()):
        for item in group:
            if isinstance(item, Tensor):
                if item.requires_grad:
                    found.append(item)
            elif isinstance(item, (tuple, list, dict)):
                found.extend(t for t in _tensors(item) if t.requires_grad)
    return found


_argument = argument  # the argument of a torch function call by position or keyword


# Operations that never combine entries of different samples when dim 0 is the batch, for the
# static batch-independence proof (_keeps_samples_apart): {name: spatial dims} (-1: any shape with
# the batch first). Linear acts on the last dim; convolutions and pooling on the channels and
# spatial dims of (N, C, *S) inputs; eval-mode batch_norm per channel.
_PER_SAMPLE_LAYERS = {
    "linear": -1,
    **{f"conv{d}d": d for d in (1, 2, 3)},
    **{f"{kind}_pool{d}d": d for kind in ("max", "avg", "adaptive_max", "adaptive_avg") for d in (1, 2, 3)},
    **{f"{kind}_pool{d}d_with_indices": d for kind in ("max", "adaptive_max") for d in (1, 2, 3)},
    "batch_norm": -1,
}
# Elementwise operations (the output entry (n, ...) reads input entries of sample n only, when every
# weight-dependent argument has the output's number of dims and the batch first).
_ELEMENTWISE = frozenset(
    {
        *("add", "sub", "rsub", "mul", "neg", "negative", "positive", "abs", "absolute"),
        *("relu", "relu6", "leaky_relu", "hardtanh", "threshold", "clamp", "clip", "clamp_min", "clamp_max"),
        *("dropout", "dropout1d", "dropout2d", "dropout3d", "clone", "contiguous", "detach"),
    }
)


def _keeps_samples_apart(
    name: str, args: tuple, kwargs: dict, dependent: list[Tensor], outputs: list[Tensor], n: int
) -> bool:
    """Whether this call provably keeps the ``n`` samples apart: every output entry of sample ``i``
    depends on weight-dependent input entries of sample ``i`` only (dim 0 is the batch). A sufficient,
    conservative test (per-sample layers, elementwise ops, ``flatten`` from dim 1, padding of the
    non-batch dims; eval mode); anything
    else (reductions, indexing, reshapes, concatenation, ...) returns False and the
    batch-independence probe of :func:`_diagonal_by_layers` decides instead."""
    if any(o.ndim == 0 or o.shape[0] != n for o in outputs):
        return False
    if any(t.ndim == 0 or t.shape[0] != n for t in dependent):
        return False
    if name in _PER_SAMPLE_LAYERS:
        spatial = _PER_SAMPLE_LAYERS[name]
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, Tensor) or x.ndim < (2 if spatial < 0 else spatial + 2):
            return False
        if name == "batch_norm":  # batch statistics couple the samples
            return not _argument(args, kwargs, 5, ("training",), False)
        return True
    if name in _ELEMENTWISE:
        if name.startswith("dropout") and _argument(args, kwargs, 2, ("training", "train"), True):
            return False  # a fresh mask: flagged anyway; not claimed here
        return all(t.ndim == outputs[0].ndim for t in dependent)
    if name == "flatten":
        start = _argument(args, kwargs, 1, ("start_dim",), 0)
        return isinstance(start, int) and start >= 1
    if name == "pad":  # pads (any mode) only the trailing dims it is given pairs for
        pads = _argument(args, kwargs, 1, ("pad",), ())
        return len(dependent) == 1 and len(pads) // 2 <= dependent[0].ndim - 1
    return False


class _ForwardRecorder(TorchFunctionMode):
    """Records the selected layers' calls and every operation on weight-dependent tensors.

    A tensor depends on the selected weights iff it requires grad: the forward runs with every
    other parameter and the inputs detached.
    """

    def __init__(self, leaves: dict[str, Tensor], clone_outputs: bool = False, batch_size: int = -1):
        super().__init__()
        self.leaves = leaves
        # whether every operation on weight-dependent tensors provably keeps the samples (dim 0 of
        # size batch_size) apart (see _keeps_samples_apart); then the batch-independence probe is
        # not needed
        self.batch_size = batch_size
        self.samples_apart = batch_size >= 1
        # give the model a clone of each recorded layer output (else the output itself; then an
        # in-place change of it, seen by its version counter, calls for a forward with clones)
        self.clone_outputs = clone_outputs
        self.names_by_id = {id(t): n for n, t in leaves.items()}
        self.module_stack: list[str] = []
        self.calls: list[LayerCall] = []
        self.uses: dict[str, list[str]] = {n: [] for n in leaves}  # parameter -> ops using it
        self.other_uses: dict[str, list[str]] = {n: [] for n in leaves}
        self.issues: list[str] = []
        self.random_ops: list[str] = []  # calls that draw random numbers (train-mode dropout, rand, ...)
        self._seen_nodes: dict[int, Any] = {}  # grad_fn nodes of outputs of observed operations
        # the operations with hand-written backward formulas for the K columns folded into the batch
        # (layer_rules.column_backward), with the copies of the layer outputs as identities
        self.tape = ColumnTape(set(self.names_by_id))
        # with record_nodes (the sketched Hessian diagonal): every flagged operation that a node rule
        # covers (its local curvature, node_rules), and the flagged ones that none covers
        self.nodes: Optional[list[NodeCall]] = None
        self.uncovered: list[str] = []
        # with record_nodes: linear calls of a selected weight on a weight-dependent input, as
        # products (h, W) (node_rules.tied_linear: their curvature matters for a weight used twice)
        self.weight_products: list[NodeCall] = []
        # functions of the selected weights alone (a transpose, a clone, weight standardization or
        # normalization): {id: (tensor, the leaves' names)}; a layer call that takes one as its weight or
        # bias is recorded under a name of its own, {name: (tensor, leaves' names)} in derived_weights, and
        # its per-sample gradients are pulled back to the leaves (layer_rules.shared)
        self.derived: dict[int, tuple[Tensor, frozenset[str]]] = {}
        self.derived_weights: dict[str, tuple[Tensor, tuple[str, ...]]] = {}
        self._derived_names: dict[int, str] = {}
        # recorded layer outputs (and the copies given to the model) -> (output, call): a selected bias added
        # to one right after (``x @ W.T + b``) becomes the call's bias
        self._call_of_output: dict[int, tuple[Tensor, LayerCall]] = {}

    # -- bookkeeping -----------------------------------------------------------------------
    def where(self) -> str:
        return self.module_stack[-1] if self.module_stack else "the model's forward"

    def mark_seen(self, tensors: Iterable[Tensor]) -> None:
        for t in tensors:
            if t.grad_fn is not None:
                self._seen_nodes[id(t.grad_fn)] = t.grad_fn

    def produced_by_seen_op(self, t: Tensor) -> bool:
        return t.grad_fn is None or id(t.grad_fn) in self._seen_nodes

    def flag(self, message: str) -> None:
        entry = f"{message} in {self.where()}"
        if entry not in self.issues:
            self.issues.append(entry)

    # -- the mode --------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dependent = _requiring_grad(args, kwargs)
        # producers are checked before the call: an in-place op replaces its input's grad_fn
        unseen = [  # (functions of the weights are known by identity: an in-place change is theirs)
            t.grad_fn for t in dependent if id(t) not in self.derived and not self.produced_by_seen_op(t)
        ]
        out = func(*args, **kwargs)
        name = _op_name(func)
        if name in _MAY_DRAW_RANDOM_NUMBERS and self._draws_random_numbers(name, args, kwargs):
            entry = f"{name!r} in {self.where()}"
            if entry not in self.random_ops:
                self.random_ops.append(entry)
        if isinstance(out, Tensor):
            if not out.requires_grad:
                return out  # constant w.r.t. the selected weights: nothing to check
            out_tensors = [out]
        else:
            out_tensors = list(_tensors(out)) if out is not None else list(_tensors(args[:1]))
            if not any(t.requires_grad for t in out_tensors):
                return out
        weights_only = all(self._is_weight(t) for t in dependent)
        if weights_only and not unseen and not self._takes_data(name, args, kwargs):
            self._derive(name, args, kwargs, dependent, out_tensors)
            return out
        if self.samples_apart and not _keeps_samples_apart(
            name,
            args,
            kwargs,
            [t for t in dependent if not self._is_weight(t)],  # the selected weights are shared
            out_tensors,
            self.batch_size,
        ):
            self.samples_apart = False
        if unseen:  # a gradient path the tape cannot see: only autograd follows it
            self.tape.reject()
        for node in unseen:
            self.flag(
                f"a tensor produced by an operation invisible to torch function modes "
                f"({type(node).__name__}, e.g. a custom autograd.Function) reaches {name!r}"
            )
        call = self._record_layer_call(name, args, kwargs, out) if name in LAYER_RULES else None
        absorbed = self._added_bias(args, kwargs, dependent) if name == "add" else None
        for t in dependent:
            if t is absorbed:
                continue
            param = self.names_by_id.get(id(t))
            if param is not None and (
                call is None or t is not self._leaf(call.weight) and t is not self._leaf(call.bias)
            ):
                self.other_uses[param].append(f"{name!r} in {self.where()}")
            elif id(t) in self.derived and (
                call is None or self._derived_names.get(id(t)) not in (call.weight, call.bias)
            ):
                for leaf in sorted(self.derived[id(t)][1]):
                    self.other_uses[leaf].append(f"{name!r} (on a function of the weight) in {self.where()}")
        recorded: Optional[NodeCall] = None
        if self._check_exactness(name, args, kwargs, dependent) and self.nodes is not None:
            recorded = self._record_node(name, func, args, kwargs, dependent, out)
        self.tape.record(name, func, args, kwargs, out)
        if call is not None or recorded is not None:
            if self.clone_outputs:
                copy = out.clone()  # in-place ops downstream (ReLU(inplace=True)) must not change z
                self.tape.record_copy(out, copy)
                out = copy
                out_tensors = [out]
            if call is not None:
                call.version = call.output._version
                self._call_of_output[id(out)] = (out, call)
            if recorded is not None:  # its output stays the op's, for its adjoint (node_rules)
                recorded.versions[-1] = recorded.output._version
        self.mark_seen(out_tensors)
        return out

    def outputs_changed_in_place(self) -> bool:
        """Whether the model changed a recorded layer output, or a recorded op's output, in place (its
        version counter moved; e.g. ``result += input`` after an activation)."""
        return any(call.output._version != call.version for call in self.calls) or any(
            node.output._version != node.versions[-1] for node in self.nodes or []
        )

    def _added_bias(self, args: tuple, kwargs: dict, dependent: list[Tensor]) -> Optional[Tensor]:
        """In ``z + b`` (or ``b + z``) with ``z`` a recorded layer output without a bias and ``b`` a 1-D
        selected weight (or function of one) that the layer's rule takes as its bias (``x @ W.T + b``,
        Falcon's ``FalconLinear``): ``b``, now the call's bias; else None."""
        if len(dependent) != 2 or len(args) != 2 or kwargs.get("alpha", 1) != 1:
            return None
        z, b = args
        if not isinstance(z, Tensor) or not isinstance(b, Tensor):
            return None
        if self._is_weight(z):
            z, b = b, z
        found = self._call_of_output.get(id(z))
        if found is None or found[0] is not z or not self._is_weight(b) or b.ndim != 1:
            return None
        call = found[1]
        if call.bias is not None or not LAYER_RULES[call.op].accepts_added_bias(call, b):
            return None
        bias = call.bias = self._weight_name(b)
        assert bias is not None  # b is a weight
        for leaf in self.derived_weights[bias][1] if bias in self.derived_weights else (bias,):
            self.uses[leaf].append(f"'add' (the bias of {call.op!r}) in {self.where()}")
        return b

    def _is_weight(self, t: Tensor) -> bool:
        """A selected weight, or a function of the selected weights alone."""
        return id(t) in self.names_by_id or id(t) in self.derived

    def _derive(
        self, name: str, args: tuple, kwargs: dict, dependent: list[Tensor], outputs: list[Tensor]
    ) -> None:
        """An op on selected weights only (``W.T``, ``bias.clone()``, weight standardization,
        ``torch._weight_norm``): its outputs are weights too, functions of the same leaves. Nothing is
        recorded for the backward columns (they never reach such an op); a nonlinear op makes the Hessian
        differ from the Gauss-Newton matrix, which is flagged."""
        sources = frozenset().union(*(self._sources(t) for t in dependent))
        for t in outputs:
            if t.requires_grad and id(t) not in self.names_by_id:
                self.derived[id(t)] = (t, sources)
                self.tape.leaf_ids.add(id(t))
        if not self._linear_in_the_weights(name, args, kwargs, dependent):
            self.flag(
                f"{name!r} makes a selected weight a nonlinear function of the weights (a reparametrized "
                "weight: weight standardization or normalization)"
            )
            entry = f"{name!r} in {self.where()} (a nonlinear function of the weights alone)"
            if self.nodes is not None and entry not in self.uncovered:
                self.uncovered.append(entry)  # no node rule samples a weight's own reparametrization
        self.mark_seen(outputs)

    def _sources(self, t: Tensor) -> frozenset[str]:
        """The selected weights that ``t`` (a weight or a function of weights) depends on."""
        return frozenset({self.names_by_id[id(t)]}) if id(t) in self.names_by_id else self.derived[id(t)][1]

    def _takes_data(self, name: str, args: tuple, kwargs: dict) -> bool:
        """Whether ``name`` is a layer rule's op whose input is not a weight (``F.linear(x, W)`` with an input
        that needs no gradient: a layer call, not a function of the weights)."""
        if name not in LAYER_RULES:
            return False
        inputs = _argument(args, kwargs, *LAYER_RULES[name].input_argument)
        return not (isinstance(inputs, Tensor) and inputs.requires_grad and self._is_weight(inputs))

    def _linear_in_the_weights(self, name: str, args: tuple, kwargs: dict, dependent: list[Tensor]) -> bool:
        """Whether an op on weights alone keeps the result linear in each individual weight: a linear op
        (:data:`PIECEWISE_LINEAR_OPS`, zeroing), a division by a constant, or a product whose factors
        depend on disjoint sets of weights (``B @ A`` of a low-rank update; not ``W @ W.T``)."""
        if name in PIECEWISE_LINEAR_OPS or name == "zero":
            return True
        if name in _DIVISIONS:
            denominator = _argument(args, kwargs, _DIVISIONS[name], ("other",))
            return not (isinstance(denominator, Tensor) and denominator.requires_grad)
        if name in MULTILINEAR_OPS:
            additive = _ADDITIVE_ARGUMENT.get(name)
            skip = _argument(args, kwargs, additive[0], (additive[1],)) if additive else None
            seen: set[str] = set()
            for t in dependent:
                if t is not skip:
                    sources = self._sources(t)
                    if seen & sources:
                        return False
                    seen |= sources
            return True
        return False

    def _weight_name(self, t: Any) -> Optional[str]:
        """The name of a layer call's weight or bias argument ``t``: a selected weight's, the name given to a
        function of the selected weights (registered in :attr:`derived_weights`), or None."""
        if not isinstance(t, Tensor):
            return None
        name = self.names_by_id.get(id(t))
        if name is not None or id(t) not in self.derived:
            return name
        name = self._derived_names.get(id(t))
        if name is None:
            tensor, sources = self.derived[id(t)]
            name = f"{'+'.join(sorted(sources))} (a function of it, #{len(self.derived_weights)})"
            self._derived_names[id(t)] = name
            self.derived_weights[name] = (tensor, tuple(sorted(sources)))
        return name

    @staticmethod
    def _draws_random_numbers(name: str, args: tuple, kwargs: dict) -> bool:
        if name in _MODE_DEPENDENT_OPS and name != "batch_norm":
            position, keys = _MODE_DEPENDENT_OPS[name]
            return bool(_argument(args, kwargs, position, keys, True))
        if name == "rrelu":  # random slopes in training mode only
            return bool(_argument(args, kwargs, 3, ("training",), False))
        return name in _RANDOM_FUNCTIONS

    def _leaf(self, name: Optional[str]) -> Optional[Tensor]:
        return self.leaves.get(name) if name is not None else None

    def _record_layer_call(self, name, args, kwargs, out) -> Optional[LayerCall]:
        rule = LAYER_RULES[name]
        weight = _argument(args, kwargs, *rule.weight_argument)
        bias = _argument(args, kwargs, *rule.bias_argument) if rule.bias_argument else None
        inputs = _argument(args, kwargs, *rule.input_argument)
        if not isinstance(inputs, Tensor):
            return None
        weight_name, bias_name = self._weight_name(weight), self._weight_name(bias)
        if weight_name is None and bias_name is None:
            return None
        detached = inputs.detach() if inputs.requires_grad else inputs
        call = LayerCall(name, self.where(), detached, out, weight_name, bias_name)
        rule.record(call, args, kwargs, weight)
        self._call_of_output[id(out)] = (out, call)
        if self.nodes is not None and name == "linear" and weight_name is not None and inputs.requires_grad:
            product = NodeCall("linear", self.where(), F.linear, args, kwargs, [inputs, weight], out)
            self.weight_products.append(product)
        for param in (weight_name, bias_name):
            if param in self.derived_weights:
                for leaf in self.derived_weights[param][1]:
                    self.uses[leaf].append(f"{name!r} (through a function of the weight) in {self.where()}")
            elif param is not None:
                self.uses[param].append(f"{name!r} in {self.where()}")
        self.calls.append(call)
        return call

    def _record_node(
        self, name: str, func: Any, args: tuple, kwargs: dict, dependent: list[Tensor], out: Any
    ) -> Optional[NodeCall]:
        """Record a flagged operation for its node rule (:mod:`.node_rules`), or note it as uncovered;
        the recorded call, or None."""
        rule = NODE_RULES.get(name)
        inputs = [t for t in dependent if id(t) not in self.names_by_id]
        call = None
        in_place = any(t is out for t in inputs)  # its input is gone: the curvature cannot be evaluated
        if rule is not None and isinstance(out, Tensor) and inputs and not in_place:
            call = NodeCall(name, self.where(), func, args, kwargs, inputs, out)
        if rule is None or call is None or not rule.accepts(call):
            entry = f"{name!r} in {self.where()}" + (" (in place)" if in_place else "")
            if entry not in self.uncovered:
                self.uncovered.append(entry)
            return None
        cast(list, self.nodes).append(call)
        return call

    def _check_exactness(self, name: str, args: tuple, kwargs: dict, dependent: list[Tensor]) -> bool:
        """Flag ``name`` when it makes the network nonlinear in a weight; whether it did."""
        if name in PIECEWISE_LINEAR_OPS:
            return False
        if name in _MODE_DEPENDENT_OPS:
            position, keys = _MODE_DEPENDENT_OPS[name]
            training = _argument(args, kwargs, position, keys, _MODE_DEFAULT.get(name, True))
            if training:
                what = (
                    "batch_norm with batch statistics (BatchNorm in training mode or without running "
                    "stats: a nonlinear function of the weights that couples the samples)"
                    if name == "batch_norm"
                    else f"{name} in training mode (a random mask)"
                )
                self.flag(f"{what}; call model.eval() first")
            # the affine weight and bias may be selected leaves themselves (each enters linearly, once:
            # y = weight * normalized(input) + bias with running statistics); anything else that depends
            # on the weights (statistics, or affine parameters computed from weights) is not exact
            extra = [
                t
                for t in dependent
                if t is not _argument(args, kwargs, 0, ("input",)) and id(t) not in self.names_by_id
            ]
            if extra:
                self.flag(f"{name!r} with weight-dependent affine parameters or statistics")
            return bool(training or extra)
        if name in _DIVISIONS:
            denominator = _argument(args, kwargs, _DIVISIONS[name], ("other",))
            if isinstance(denominator, Tensor) and denominator.requires_grad:
                self.flag(f"division by a weight-dependent tensor ({name!r})")
                return True
            return False
        if name in MULTILINEAR_OPS:
            additive = _ADDITIVE_ARGUMENT.get(name)
            skip = _argument(args, kwargs, additive[0], (additive[1],)) if additive else None
            factors = [t for t in dependent if t is not skip and not self._is_weight(t)]
            if len(factors) > 1:
                self.flag(
                    f"{name!r} multiplies {len(factors)} weight-dependent tensors (not linear in each weight)"
                )
            return len(factors) > 1
        self.flag(
            f"{name!r} is not piecewise linear (not on the allowlist PIECEWISE_LINEAR_OPS / MULTILINEAR_OPS)"
        )
        return True


def _fast_path_blockers(recorder: _ForwardRecorder, leaves: dict[str, Tensor], n: int) -> list[str]:
    """Reasons the per-layer contractions do not apply: they need every use of a selected weight to be a
    call of a layer rule's op (a weight used by several such calls is contracted from their summed
    per-sample gradients: :mod:`.layer_rules.shared`), with the samples along dim 0."""
    reasons = []
    for name in leaves:
        if recorder.other_uses[name]:
            reasons.append(f"{name!r} is used by {recorder.other_uses[name][0]}")
    for call in recorder.calls:
        if not LAYER_RULES[call.op].is_batched(call, n):
            reasons.append(
                f"{call.op} in {call.module} does not have the batch (size {n}) along dim 0 "
                f"(input shape {tuple(call.inputs.shape)})"
            )
    return reasons


def rows_of_other_samples(t: Tensor, n: int) -> Tensor:
    """The entries of ``t`` that belong to samples ``1..n-1``, which a probe on sample 0's logits must not
    reach: ``t[1:]`` when dim 0 is the batch; with ``n k`` rows along dim 0 (``k`` per sample, sample-
    major, as windowed attention lays them out), the rows from ``k`` on. Rows in any other order put
    some of sample 0's rows there too, so the probe flags them, as it must (the per-layer contractions
    read the rows sample-major: :meth:`~.layer_rules.base.LayerRule.regroup`)."""
    return t.reshape(n, -1)[1:]


def _interaction_probe(logits: Tensor) -> Tensor:
    """A random output gradient on sample 0 only (zero elsewhere), for the batch-independence check."""
    probe = torch.zeros_like(logits)
    probe[0] = _probe_values(tuple(logits.shape[1:]), logits.dtype, logits.device)
    return probe


@functools.lru_cache(maxsize=32)
def _probe_values(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The batch-independence probe's output gradient on sample 0 (zero on the others): fixed
    standard-normal values (seed 0), drawn once per shape (read-only)."""
    generator = torch.Generator(device=device).manual_seed(0)
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)


class _Diagonal(dict):
    """``{name: diagonal}`` filled by the contractions: the first contribution is stored as it is
    (:func:`~.layer_rules.contraction.accumulate_layer`); a rule's own contraction that adds in place
    (``diag[name] += ...``, ``index_add_``) gets zeros on first access."""

    def __init__(self, leaves: dict[str, Tensor]):
        super().__init__()
        self.leaves = leaves

    def __missing__(self, name: str) -> Tensor:
        value = self[name] = torch.zeros_like(self.leaves[name])
        return value


def _diagonal_by_layers(
    recorder: _ForwardRecorder, logits: Tensor, factors: Tensor, signs: Tensor, leaves: dict[str, Tensor]
) -> tuple[Optional[dict[str, Tensor]], list[str]]:
    """The fast path: one backward pass of all ``K`` columns at once (:func:`_column_gradients`), then
    per-layer contractions; without a probe column and with the folded-batch backward of
    :mod:`.layer_rules.column_backward`, each layer is contracted as soon as the pass reaches it.

    The batch-independence probe (:func:`_probe_values`) is one more column of the same pass:
    returns ``(None, layers)`` with the layers whose outputs of samples ``1..N-1`` receive gradient
    from sample 0's logits (the contractions do not apply), else ``(diag, [])``.
    """
    calls = recorder.calls
    n, k = logits.shape[0], factors.shape[2]
    outputs = [c.output for c in calls]
    # the batch-independence probe as column k, unless every operation kept the samples apart
    probe = 1 if n >= 2 and calls and not recorder.samples_apart else 0
    if probe:
        columns = logits.new_zeros(k + probe, n, factors.shape[1])
        columns[:k] = factors.permute(2, 0, 1)
        columns[k, 0] = _probe_values(tuple(logits.shape[1:]), logits.dtype, logits.device).reshape(-1)
    else:
        columns = factors.permute(2, 0, 1)  # (K, N, D): a view, sample-major for cross-entropy's factors
    columns = columns.reshape(k + probe, *logits.shape)
    diag = _Diagonal(leaves)  # filled by the first contribution to each tensor
    unit_signs = bool((signs == 1).all())

    def contract_one(i: int, g: Tensor) -> None:
        accumulate_layer(calls[i], g, signs, diag, leaves, unit_signs)

    derived = recorder.derived_weights

    def contract_group(group: list[LayerCall], group_grads: list[Tensor]) -> None:
        accumulate_shared(group, group_grads, signs, diag, leaves, n, derived=derived)

    if not probe:  # each layer contracted as soon as the folded-batch backward reaches it
        consume = SharedCalls(calls, contract_one, contract_group, derived)
        if recorder.tape.backward(logits, columns, outputs, consume) is not None:
            consume.finish()
            return {
                name: diag[name] if name in diag else torch.zeros_like(t) for name, t in leaves.items()
            }, []
    grads = _column_gradients(recorder, logits, outputs, columns)
    if columns.shape[0] > k:
        # one flag per layer, one sync
        reached = [rows_of_other_samples(g[k], n).any() for g in grads if g is not None]
        if reached and bool(torch.stack(reached).any()):
            mixing = [
                f"{c.op} in {c.module}"
                for c, g in zip(calls, grads)
                if g is not None and bool(rows_of_other_samples(g[k], n).any())
            ]
            return None, mixing
    consume = SharedCalls(calls, contract_one, contract_group, derived)
    for i, g in enumerate(grads):
        if g is not None:
            consume(i, g[:k])
    consume.finish()
    return {name: diag[name] if name in diag else torch.zeros_like(t) for name, t in leaves.items()}, []


def _column_gradients(
    recorder: _ForwardRecorder, logits: Tensor, outputs: list[Tensor], columns: Tensor
) -> Sequence[Optional[Tensor]]:
    """``(K, *z.shape)`` gradients of the ``K`` output columns at each recorded layer output ``z``
    (``None`` where ``z`` does not reach the logits): by the folded-batch backward of
    :class:`~.layer_rules.column_backward.ColumnTape` when every operation has a formula there, else
    by autograd (``is_grads_batched``; a loop over the columns if some backward has no vmap rule)."""
    grads = recorder.tape.backward(logits, columns, outputs)
    if grads is not None:
        return grads
    return _batched_backward(logits, outputs, columns)


def _batched_backward(
    logits: Tensor | Sequence[Tensor], targets: list[Tensor], vectors: Tensor | Sequence[Tensor]
) -> Sequence[Optional[Tensor]]:
    """``autograd.grad`` of ``logits`` to ``targets`` for each of ``vectors`` ``(K, *logits.shape)``, stacked
    as ``(K, *target.shape)`` (``None`` for a target the logits do not depend on): vmapped
    (``is_grads_batched``), or a loop over the vectors when some backward has no vmap rule. ``logits``
    may be several tensors, with one ``(K, *shape)`` stack of vectors each (the backward of the sum)."""
    try:
        return torch.autograd.grad(
            logits, targets, vectors, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    except (RuntimeError, NotImplementedError):  # some backward lacks a vmap rule: loop
        count = vectors.shape[0] if isinstance(vectors, Tensor) else vectors[0].shape[0]
        per_vector = [
            torch.autograd.grad(
                logits,
                targets,
                vectors[k] if isinstance(vectors, Tensor) else [v[k] for v in vectors],
                retain_graph=True,
                allow_unused=True,
            )
            for k in range(count)
        ]
        return tuple(
            None if per_vector[0][j] is None else torch.stack([p[j] for p in per_vector])
            for j in range(len(targets))
        )


def _diagonal_per_sample(
    logits: Tensor, factors: Tensor, signs: Tensor, leaves: dict[str, Tensor]
) -> dict[str, Tensor]:
    """One vectorised backward per (sample, k) pair: the GGN diagonal for any graph."""
    n, dim, k = factors.shape
    tol_mask = factors.abs().sum(dim=1) > 0  # (N, K) pairs with a nonzero factor
    pairs = tol_mask.nonzero()
    names = list(leaves)
    diag = {name: torch.zeros_like(t) for name, t in leaves.items()}
    numel = sum(t.numel() for t in leaves.values()) + logits.numel()
    chunk = max(1, _BATCHED_BACKWARD_ELEMENTS // numel)
    for start in range(0, pairs.shape[0], chunk):
        idx = pairs[start : start + chunk]
        vectors = torch.zeros(idx.shape[0], n, dim, dtype=logits.dtype, device=logits.device)
        vectors[torch.arange(idx.shape[0]), idx[:, 0]] = factors[idx[:, 0], :, idx[:, 1]]
        vectors = vectors.reshape(idx.shape[0], *logits.shape)
        sign = signs[idx[:, 0], idx[:, 1]]
        grads: Sequence[Optional[Tensor]]
        try:
            grads = torch.autograd.grad(
                logits,
                [leaves[m] for m in names],
                vectors,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        except (RuntimeError, NotImplementedError):  # some backward lacks a vmap rule: loop
            per_vector = [
                torch.autograd.grad(
                    logits, [leaves[m] for m in names], v, retain_graph=True, allow_unused=True
                )
                for v in vectors
            ]
            grads = [
                None if per_vector[0][j] is None else torch.stack([p[j] for p in per_vector])
                for j in range(len(names))
            ]
        for name, g in zip(names, grads):
            if g is not None:
                diag[name] += torch.tensordot(sign, g * g, dims=1)
    return diag


class _ModuleNames:
    """Keeps the path of the module being run (for messages), with two global forward hooks
    (``register_module_forward_pre_hook`` / ``register_module_forward_hook``) that look each module up
    in a table of ``model``'s modules: two registrations per forward instead of two per module.
    Modules outside ``model`` are ignored."""

    def __init__(self, model: nn.Module, stack: list[str]):
        labels = {}
        for path, module in model.named_modules():
            kind = type(module).__name__
            labels[id(module)] = f"module {path!r} ({kind})" if path else f"{kind}.forward"

        def enter(module: nn.Module, *_: Any) -> None:
            label = labels.get(id(module))
            if label is not None:
                stack.append(label)

        def leave(module: nn.Module, *_: Any) -> None:  # returns None: the output is left as it is
            label = labels.get(id(module))
            if label is not None and stack and stack[-1] == label:
                stack.pop()

        self.handles = [
            torch.nn.modules.module.register_module_forward_pre_hook(enter),
            torch.nn.modules.module.register_module_forward_hook(leave, always_call=True),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def exact_hessian_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: ModelInputs,
    target: Tensor,
    params: dict[str, nn.Parameter],
    *,
    strict: bool = True,
) -> dict[str, Tensor]:
    r"""Exact diagonal of the Hessian of ``loss_fn(model(inputs), target)`` in ``params``.

    ``diag(H) = diag(J^T Lambda J) / N`` (GGN identity, module docstring), exact when the network
    is piecewise linear in each individual weight; this is the ``diag(H)`` of Algorithm 1 / eq. 61
    of the paper without its finite-difference and sampling error.

    Cost: one forward, one batched backward of ``K <= D`` columns (``D`` outputs per sample;
    ``C - 1`` for cross-entropy) plus one for the batch-independence check where the operations do not
    prove it, and per layer a weight-gradient-sized contraction per column. Zero variance. When
    samples interact inside the model or a weight is used outside a layer rule's op:
    ``N * K`` vectorised backward passes instead (warned).

    Assumptions: ``loss_fn`` is the mean of per-sample losses (checked on values) or a
    :class:`TokenLoss` (a mean over valid tokens); the model returns ``(N, ...)`` logits (a tensor, or
    in a tuple / dict / ``ModelOutput``); each selected tensor is the weight or bias of one call of a
    layer rule's op (``linear``, ``conv{1,2,3}d``, ``embedding``, normalization affine parameters) and
    everything downstream of the selected weights is on the allowlist (:data:`PIECEWISE_LINEAR_OPS`,
    :data:`MULTILINEAR_OPS`, eval-mode batch_norm and dropout), checked during the forward.

    Args:
        model: the network, used in its current train/eval mode and never modified (parameters,
            buffers and ``.grad`` untouched; temporary hooks are removed).
        loss_fn: ``(logits, target) -> scalar``, the mean of per-sample losses.
        inputs: ``(N, ...)`` inputs: a tensor, a tuple of positional arguments or a dict of keyword
            arguments (samples along dim 0; see :func:`~lightning_flatness.functional.model_io.call_model`).
        target: ``(N, ...)`` targets (``(N, T)`` token labels for :class:`TokenLoss`).
        params: ``{name: parameter}`` of ``model`` (see :func:`select_parameters`).
        strict: when the Hessian differs from the GGN (an operation off the allowlist, a weight used
            twice, train-mode BatchNorm or dropout, a loss that is not a per-sample mean): raise
            :class:`ExactMethodNotApplicable` (``True``) or warn and return the GGN diagonal
            (``False``).

    Returns:
        ``{name: diag}`` with each parameter's shape and dtype; entries may be negative.

    Raises:
        ExactMethodNotApplicable: with ``strict=True``, when the result would not be the Hessian
            diagonal (a :class:`ValueError`; its ``gauss_newton_applicable`` says whether
            ``method="ggn_hutchinson"`` can take over).
        ValueError: when the model output is not a finite ``(N, ...)`` tensor.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
        >>> model = model.double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> diag = exact_hessian_diagonal(model, F.cross_entropy, x, y, {"0.weight": model[0].weight})
        >>> loss = lambda w: F.cross_entropy(torch.func.functional_call(model, {"0.weight": w}, (x,)), y)
        >>> brute = torch.func.hessian(loss)(model[0].weight).reshape(15, 15).diagonal()
        >>> torch.allclose(diag["0.weight"].flatten(), brute, rtol=1e-12, atol=1e-14)
        True
    """
    if not params:
        raise ValueError("exact_hessian_diagonal got no parameters; pass the weights to differentiate.")
    with torch.inference_mode(False), torch.enable_grad():
        x, y = _autograd_inputs(inputs, target)
        forward = _record_forward(model, x, params, "exact_hessian_diagonal")
        factors, signs, _, loss_issues = _loss_factors(loss_fn, forward.logits.detach(), y, need_grad=False)
        issues = forward.issues + loss_issues
        if issues:
            message = (
                "exact_hessian_diagonal: the Hessian diagonal of this model is not the Gauss-Newton "
                "diagonal, because: "
                + "; ".join(issues[:8])
                + (f"; and {len(issues) - 8} more" if len(issues) > 8 else "")
                + "."
            )
            ggn_applies = not loss_issues and not forward.recorder.random_ops
            if strict:
                hint = _HUTCHINSON_HINT if ggn_applies else _HUTCHINSON_ONLY_HINT
                raise ExactMethodNotApplicable(
                    f"{message} To estimate it, {hint}.", tuple(issues), ggn_applies
                )
            warnings.warn(
                f"{message} Returning the generalized Gauss-Newton diagonal instead.",
                UserWarning,
                stacklevel=2,
            )
        diag = _ggn_diagonal(forward, factors, signs, issues, "exact_hessian_diagonal", stacklevel=3)
    return {name: _as_result(d, params[name]) for name, d in diag.items()}


def _as_result(d: Tensor, param: Tensor) -> Tensor:
    """``d`` detached, in ``param``'s dtype (no extra op when it is already both)."""
    return d if d.dtype == param.dtype and not d.requires_grad else d.detach().to(param.dtype)


# ----------------------------------------------------------------------------- shared stages
@dataclass
class _RecordedForward:
    """One forward pass under :class:`_ForwardRecorder` and what it found."""

    recorder: _ForwardRecorder
    logits: Tensor  # in the graph of `leaves`
    leaves: dict[str, Tensor]
    issues: list[str]  # reasons the model is not piecewise linear in each selected weight


def _autograd_inputs(inputs: ModelInputs, target: Tensor) -> tuple[ModelInputs, Tensor]:
    """Inputs (a tensor, tuple or dict of them) and targets usable under autograd (inference tensors
    are cloned, the rest detached)."""
    x = map_inputs(inputs, lambda t: t.clone() if t.is_inference() else t.detach())
    y = target.clone() if target.is_inference() else target
    return x, y


@contextlib.contextmanager
def _module_tensors_swapped(
    model: nn.Module, leaves: Mapping[str, Tensor], params: Mapping[str, Tensor]
) -> Iterator[None]:
    """For the block, every parameter slot of ``model``'s modules holds the leaf of its selected
    parameter (``leaves[name]`` for ``params[name]``) or a detached alias, and every buffer slot a
    clone (train-mode BatchNorm updates the clone). Slots are matched by tensor identity, so tied
    weights and submodules registered under two paths get the same replacement, and the original
    objects are put back afterwards: what ``torch.func.functional_call`` does, without its per-name
    lookups (and without pytorch/pytorch#164759, see
    :func:`~._functional_model.restore_module_tensors`).

    Raises:
        ValueError: a tensor of ``params`` is not a parameter of ``model``.
    """
    replacement = {id(params[name]): leaf for name, leaf in leaves.items()}
    slots: list[tuple[dict[str, Any], str, Tensor, bool]] = []  # (store, name, original, is buffer)
    for module in model.modules():
        for store, is_buffer in ((module._parameters, False), (module._buffers, True)):
            for name, tensor in store.items():
                if tensor is not None:
                    slots.append((cast(dict[str, Any], store), name, tensor, is_buffer))
    swapped: dict[int, Tensor] = {}
    for slot, name, tensor, is_buffer in slots:
        new = swapped.get(id(tensor))
        if new is None:
            new = replacement.get(id(tensor))
            if new is None:
                new = tensor.clone() if is_buffer else tensor.detach()
            swapped[id(tensor)] = new
        slot[name] = new
    try:
        missing = [name for name in leaves if id(params[name]) not in swapped]
        if missing:
            raise ValueError(
                f"{missing} are not parameters of the model; select them from model.named_parameters()."
            )
        yield
    finally:
        for slot, name, tensor, _ in slots:
            slot[name] = tensor


#: models seen changing a recorded layer output in place (Conv -> BatchNorm -> ReLU(inplace=True)):
#: their next forwards copy the outputs at once instead of running twice. Only a hint: without it
#: the version check still catches the change.
_IN_PLACE_MODELS: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _changes_outputs_in_place(model: nn.Module) -> bool:
    try:
        return _IN_PLACE_MODELS.get(model, False)
    except TypeError:  # not weak-referenceable
        return False


def _remember_in_place_changes(model: nn.Module) -> None:
    try:
        _IN_PLACE_MODELS[model] = True
    except TypeError:
        pass


def _call(model: nn.Module, x: ModelInputs) -> Any:
    """``model`` called on ``x`` as :func:`call_model` would call it (raw output)."""
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def _record_forward(
    model: nn.Module, x: ModelInputs, params: dict[str, nn.Parameter], caller: str, record_nodes: bool = False
) -> _RecordedForward:
    """Run ``model(x)`` with fresh leaves for ``params`` (everything else detached, buffers cloned),
    recording the selected layers' calls and every operation on weight-dependent tensors (with
    ``record_nodes``, also the nonlinear ones as :class:`~.node_rules.NodeCall` s, in
    ``recorder.nodes``, and those no node rule covers in ``recorder.uncovered``).

    The recorded layer outputs (and recorded ops' outputs) are passed on to the model as they are (no
    copy); when the model changes one in place (``nn.ReLU(inplace=True)`` right after a Linear layer,
    ``result += input`` after an activation), the forward is run again with copies, so that the
    recorded output stays the layer's (the op's). ``nn.MultiheadAttention``
    modules run their forward in explicit operations
    (:func:`~lightning_flatness.functional.composite_attention.explicit_multi_head_attention`), so that
    their projections are recorded as Linear layers instead of one opaque call.
    """
    leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
    n = inputs_batch_size(x)
    copied = _changes_outputs_in_place(model)
    for clone_outputs in (True,) if copied else (False, True):  # copies if a layer output changes in place
        recorder = _ForwardRecorder(leaves, clone_outputs, n)
        if record_nodes:
            recorder.nodes = []
        module_names = _ModuleNames(model, recorder.module_stack)
        try:
            with (
                _module_tensors_swapped(model, leaves, params),
                explicit_multi_head_attention(model),
                recorder,
            ):
                output = _call(model, x)
        finally:
            module_names.remove()
        if clone_outputs or not recorder.outputs_changed_in_place():
            break
    if clone_outputs and not copied:
        _remember_in_place_changes(model)
    try:
        logits = extract_logits(output)
    except TypeError as err:
        raise ValueError(f"{caller}: {err}") from None
    if logits.ndim == 0 or logits.shape[0] != n:
        raise ValueError(
            f"the model output has shape {tuple(logits.shape)} for {n} samples; "
            f"{caller} needs the samples along dim 0."
        )
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("the model output contains NaN or inf; the Hessian diagonal is undefined there.")
    issues = list(recorder.issues)
    if logits.requires_grad and not recorder.produced_by_seen_op(logits):
        issues.append(
            f"the model output comes from an operation invisible to torch function modes "
            f"({type(logits.grad_fn).__name__})"
        )
    for name in leaves:
        uses = recorder.uses[name] + recorder.other_uses[name]
        if len(uses) > 1:
            issues.append(
                f"weight {name!r} is used {len(uses)} times in one forward "
                f"({'; '.join(uses[:3])}): the output is not linear in each of its entries"
            )
    return _RecordedForward(recorder, logits, leaves, issues)


def _ggn_diagonal(
    forward: _RecordedForward, factors: Tensor, signs: Tensor, issues: list[str], caller: str, stacklevel: int
) -> dict[str, Tensor]:
    """``diag(J^T Lambda J) / N`` from a recorded forward and the signed factors of the per-sample loss
    Hessians: the per-layer contractions where they apply, else the per-(sample, k) path (warned:
    its cost). The batch-independence probe rides along the per-layer backward pass."""
    recorder, logits, leaves = forward.recorder, forward.logits, forward.leaves
    factors = factors / math.sqrt(logits.shape[0])  # the loss is a mean over samples
    blockers = _fast_path_blockers(recorder, leaves, logits.shape[0])
    if any("invisible" in issue for issue in issues):  # it may hide a weight use: the safe path
        blockers.append("an operation invisible to the checks")
    diag = None
    if not blockers:
        diag, mixing = _diagonal_by_layers(recorder, logits, factors, signs, leaves)
        blockers = [
            f"samples interact (or rows along dim 0 are not grouped by sample) after {layer}"
            for layer in mixing
        ]
    if blockers:
        warnings.warn(
            f"{caller}: per-layer contractions do not apply "
            f"({'; '.join(blockers[:3])}); computing the diagonal with up to "
            f"{logits.shape[0]} x {factors.shape[2]} backward passes.",
            UserWarning,
            stacklevel=stacklevel,
        )
        return _diagonal_per_sample(logits, factors, signs, leaves)
    # no blockers left: _diagonal_by_layers ran and found no mixing, so it returned the diagonal
    assert diag is not None
    return diag


@dataclass
class GaussNewtonDiagonal:
    r"""The Gauss-Newton diagonal of a model and loss, and what separates it from the Hessian's.

    With logits :math:`f`, the mean loss :math:`L` and :math:`g = \nabla_f L`,
    :math:`H = J^\top \Lambda J + R` with the residual :math:`R = \sum_{n,c} g_{nc} \nabla^2_w f_{nc}`
    (module docstring). :func:`~.ggn_hutchinson.ggn_hutchinson_hessian_diagonal` adds an unbiased
    estimate of ``diag(R)`` to ``diagonal``.

    Attributes:
        diagonal: ``{name: diag(J^T Lambda J) / N}``, each with the parameter's shape and dtype.
        issues: why ``diag(H)`` may differ from ``diagonal`` (empty: it does not, ``diag(R) = 0``).
        loss_issues: the loss is not a mean of per-sample losses (then ``diagonal`` uses the wrong
            ``Lambda`` and ``H != GGN + R`` on the diagonal).
        random_ops: calls in the forward that draw random numbers (train-mode dropout, ``rand``):
            the model is then a different function at every call.
        tensor_issues: ``{name: reasons}``: why ``diag(R)`` may be nonzero on that tensor, from one
            recorded forward per tensor with only that tensor variable. Empty for a tensor in which
            the network is piecewise linear (e.g. the last layer of a tanh MLP): ``diag(R) = 0`` there.
        logits_grad: ``g = dL/df`` with the logits' shape, detached: the coefficients of ``R``.
    """

    diagonal: dict[str, Tensor]
    issues: list[str]
    loss_issues: list[str]
    random_ops: list[str]
    tensor_issues: dict[str, list[str]]
    logits_grad: Tensor


def gauss_newton_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: ModelInputs,
    target: Tensor,
    params: dict[str, nn.Parameter],
    *,
    caller: str = "gauss_newton_diagonal",
) -> GaussNewtonDiagonal:
    """Diagonal of the generalized Gauss-Newton matrix ``J^T Lambda J / N`` of any model, with the
    reasons it may differ from the Hessian diagonal, overall and per tensor (never refused).

    The same computation as :func:`exact_hessian_diagonal` (one forward, one batched backward of
    ``K <= D`` columns,
    per-layer contractions or the per-(sample, k) path, which is warned about: its cost) without
    the eligibility check. When the model is not piecewise linear in each weight, one extra
    recorded forward per selected tensor (no backward) finds the tensors in which it is.

    Args:
        model, loss_fn, inputs, target, params: as for :func:`exact_hessian_diagonal`.
        caller: the name used in messages.

    Returns:
        :class:`GaussNewtonDiagonal`.

    Raises:
        ValueError: no parameters, or the model output is not a finite ``(N, ...)`` tensor.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> params = {"0.weight": model[0].weight, "2.weight": model[2].weight}
        >>> ggn = gauss_newton_diagonal(model, F.cross_entropy, x, y, params)
        >>> ggn.diagonal["0.weight"].shape, ggn.logits_grad.shape
        (torch.Size([5, 3]), torch.Size([8, 2]))
        >>> {name: bool(reasons) for name, reasons in ggn.tensor_issues.items()}  # diag(R) != 0 possible?
        {'0.weight': True, '2.weight': False}
    """
    if not params:
        raise ValueError(f"{caller} got no parameters; pass the weights to differentiate.")
    with torch.inference_mode(False), torch.enable_grad():
        x, y = _autograd_inputs(inputs, target)
        forward = _record_forward(model, x, params, caller)
        factors, signs, logits_grad, loss_issues = _loss_factors(loss_fn, forward.logits.detach(), y)
        issues = forward.issues + loss_issues
        random_ops = list(forward.recorder.random_ops)
        diag = _ggn_diagonal(forward, factors, signs, issues, caller, stacklevel=3)
        diag = {name: d.detach().to(params[name].dtype) for name, d in diag.items()}
        model_issues = forward.issues
        del forward  # free the graph before the per-tensor forwards
        if not model_issues:  # piecewise linear in each weight: diag(R) = 0 everywhere
            tensor_issues: dict[str, list[str]] = {name: [] for name in params}
        else:
            tensor_issues = {
                name: _record_forward(model, x, {name: p}, caller).issues for name, p in params.items()
            }
    assert logits_grad is not None  # need_grad=True
    return GaussNewtonDiagonal(diag, issues, loss_issues, random_ops, tensor_issues, logits_grad)
