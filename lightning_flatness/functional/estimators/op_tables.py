"""The operation tables of the exactness recorder (:mod:`.recorder`): which torch functions keep the
network piecewise linear in each weight (:data:`PIECEWISE_LINEAR_OPS`), which are linear in each argument
separately (:data:`MULTILINEAR_OPS`), which depend on the train/eval mode or draw random numbers, how a
torch function's name is read (``Tensor.__iadd__`` -> ``add``), and the static proof that an operation
keeps the samples of a batch apart (:func:`_keeps_samples_apart`). Tables only: no state, no autograd."""

from __future__ import annotations

from typing import Any, Iterator

from torch import Tensor

from lightning_flatness.functional.estimators.layer_rules import argument

__all__ = ["MULTILINEAR_OPS", "PIECEWISE_LINEAR_OPS", "SELECTION_OPS"]

_argument = argument  # the argument of a torch function call by position or keyword


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
        "view_as_complex",  # (..., 2) real pairs read as complex numbers, and back: the same entries
        "view_as_real",
        "real",  # a complex tensor's real or imaginary part
        "imag",
        "as_strided",  # a strided view (overlapping windows repeat entries): still a selection
        # discrete Fourier transforms: fixed linear maps (FNet's token mixing)
        "fft_fft",
        "fft_ifft",
        "fft_fft2",
        "fft_ifft2",
        "fft_fftn",
        "fft_ifftn",
        "fft_rfft",
        "fft_irfft",
        "fft_rfft2",
        "fft_irfft2",
        "fft_rfftn",
        "fft_irfftn",
        "fft_hfft",
        "fft_ihfft",
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
        "copy",  # x.copy_(src): x takes src's values (broadcast, cast); linear in src, x's own discarded
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
        # bags of table rows: linear in the table, times per_sample_weights (max mode: piecewise linear)
        "embedding_bag",
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


def sets_requires_grad(func: Any) -> bool:
    """Whether ``func`` is ``Tensor.requires_grad_`` or the setter of ``Tensor.requires_grad``: a flag for
    training's backward, not an operation on values. Hugging Face's ``enable_input_require_grads`` (which
    ``gradient_checkpointing_enable`` / ``activation_checkpointing_enable`` register on every text model, and
    PEFT on its adapters) calls ``requires_grad_(True)`` on the input embeddings' output from a forward hook,
    so that a checkpointed block receives an input that requires grad. In a measurement the flag changes
    no value and no derivative with respect to the selected weights: on a tensor that depends on them it
    is already set; on one that does not, setting it would make a constant look like a function of the
    weights."""
    if func is Tensor.requires_grad_:
        return True
    return (
        getattr(func, "__name__", None) == "__set__"
        and getattr(getattr(func, "__self__", None), "__name__", None) == "requires_grad"
    )


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


#: ops whose every output entry is one entry of their one tensor input, unscaled (views, permutations,
#: indexing, gathers, expansions, repeats; a subset of :data:`PIECEWISE_LINEAR_OPS`): a chain of them from
#: ``u`` to ``t`` is a selection ``t = P u`` with one 1 per row of ``P``
#: (:class:`~lightning_flatness.functional.estimators.recorder.DerivedElementwiseCall`)
SELECTION_OPS = frozenset(
    {
        "view", "reshape", "view_as", "reshape_as", "permute", "transpose", "t", "movedim", "contiguous",
        "clone", "expand", "expand_as", "unsqueeze", "squeeze", "flatten", "unflatten", "getitem",
        "index_select", "gather", "select", "narrow", "repeat", "roll", "flip",
    }
)  # fmt: skip
