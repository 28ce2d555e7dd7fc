"""Models as users have them: inputs that are tensors, tuples or dicts; outputs that are tensors,
tuples, dicts or Hugging Face ``ModelOutput``; and token-level losses for sequence outputs.

Every estimator calls the network through :func:`call_model`, so a torchvision, timm or Hugging Face
model needs no wrapper:

- ``inputs`` a ``Tensor``: ``model(inputs)``; a tuple or list: ``model(*inputs)``; a dict (any
  ``Mapping``, e.g. ``{"input_ids": ..., "attention_mask": ...}``): ``model(**inputs)``.
- the output a ``Tensor``: the logits; a ``Mapping`` (``dict``, ``ModelOutput``) with a ``"logits"``
  entry: that entry; a tuple or list: its first entry (recursively).

A *sample* is index ``i`` along dim 0 of every tensor in ``inputs`` that has the batch size there
(other entries, e.g. a shared mask, are passed whole). Shapes: logits ``(N, K)`` for classifiers,
``(N, T, V)`` for sequence models (see :class:`TokenLoss`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_flatness.functional.backward_hooks import TensorHooksLeftOut

__all__ = [
    "ModelInputs",
    "TokenLoss",
    "arguments_for",
    "call_model",
    "compiled_code_eager",
    "extract_logits",
    "input_tensors",
    "inputs_batch_size",
    "logits_without_gradient",
    "group_bounds",
    "map_inputs",
    "model_autocast_disabled",
    "outputs_of_first_samples",
    "samples_along_dim0",
    "select_samples",
    "split_samples",
    "with_decoder_inputs",
]

#: What a model is called with: a tensor, a tuple/list of positional arguments or a dict of keyword arguments.
ModelInputs = Union[Tensor, Sequence[Any], Mapping[str, Any]]


def map_inputs(inputs: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor in ``inputs`` (tensor, tuple/list or dict), keeping the structure."""
    if isinstance(inputs, Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return {k: map_inputs(v, fn) for k, v in inputs.items()}  # BatchEncoding etc. become plain dicts
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(map_inputs(v, fn) for v in inputs)
    return inputs


def input_tensors(inputs: Any) -> list[Tensor]:
    """Every tensor in ``inputs`` (tensor, tuple/list or dict, nested), in dict order, then position."""
    found: list[Tensor] = []

    def collect(t: Tensor) -> Tensor:
        found.append(t)
        return t

    map_inputs(inputs, collect)
    return found


def inputs_batch_size(inputs: Any) -> int:
    """The number of samples: dim 0 of the first tensor in ``inputs`` (dict order, then position)."""
    for t in input_tensors(inputs):
        if t.ndim > 0:
            return int(t.shape[0])
    raise TypeError(
        f"the model inputs contain no tensor with a batch dimension (got {type(inputs).__name__}); "
        "pass a tensor, a tuple of tensors or a dict of tensors with samples along dim 0."
    )


def samples_along_dim0(inputs: Any, n: int) -> bool:
    """Whether every tensor of ``inputs`` with a dim holds ``n`` samples along dim 0: the layout in which a
    batch can be cut into groups of samples. Not so for ``nn.EmbeddingBag``'s 1-D token list beside its
    ``offsets``, or a constant passed beside the batch.

    Example:
        >>> import torch
        >>> samples_along_dim0((torch.zeros(4, 3), torch.zeros(4)), 4), samples_along_dim0(torch.zeros(9), 4)
        (True, False)
    """
    return all(t.shape[0] == n for t in input_tensors(inputs) if t.ndim > 0)


def select_samples(inputs: Any, index: Union[slice, Tensor], batch_size: Optional[int] = None) -> Any:
    """The samples ``index`` of every tensor whose dim 0 is the batch; other entries pass whole."""
    n = inputs_batch_size(inputs) if batch_size is None else batch_size
    return map_inputs(inputs, lambda t: t[index] if t.ndim > 0 and t.shape[0] == n else t)


def group_bounds(n: int, num_groups: int) -> list[tuple[int, int]]:
    """The ``(start, stop)`` sample ranges of the ``num_groups`` contiguous groups that ``torch.tensor_split``
    cuts ``n`` samples into: the groups of :func:`split_samples` and of the estimators'
    ``hessian_diagonal_groups``.

    Example:
        >>> group_bounds(10, 3)
        [(0, 4), (4, 7), (7, 10)]
    """
    sizes = [n // num_groups + (1 if g < n % num_groups else 0) for g in range(num_groups)]
    starts = [sum(sizes[:g]) for g in range(num_groups)]
    return [(start, start + size) for start, size in zip(starts, sizes)]


def split_samples(inputs: Any, sections: int) -> list[Any]:
    """``inputs`` cut into ``sections`` contiguous groups of samples (as ``torch.tensor_split``)."""
    n = inputs_batch_size(inputs)
    return [select_samples(inputs, slice(lo, hi), n) for lo, hi in group_bounds(n, sections)]


#: Keys of a model's dict output that hold the logits, in order of preference: Hugging Face's
#: ``ModelOutput`` and dicts (``"logits"``), torchvision's segmentation models (``"out"``, beside an
#: optional auxiliary head ``"aux"`` that the measurement leaves out, as evaluation does).
LOGIT_KEYS = ("logits", "out")
#: Keys of the span logits of an extractive question-answering model (Hugging Face's
#: ``QuestionAnsweringModelOutput``), read where no key of :data:`LOGIT_KEYS` is present.
SPAN_LOGIT_KEYS = ("start_logits", "end_logits")


def extract_logits(output: Any) -> Tensor:
    """The logits in a model's output: a tensor, ``output["logits"]`` (else ``output["out"]``) of a
    dict/``ModelOutput`` (:data:`LOGIT_KEYS`), the ``logits`` (``out``) attribute of a dataclass or field of a
    namedtuple (wherever it lies), or the first entry of a tuple/list. An extractive
    question-answering output (``start_logits`` and ``end_logits``, each ``(N, T)``,
    :data:`SPAN_LOGIT_KEYS`) gives ``(N, 2, T)``: two rows of ``T`` position logits per sample, the
    layout of a sequence output, scored per row against the ``(N, 2)`` answer span
    (:func:`lightning_flatness.batch_split.span_target`)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        for key in LOGIT_KEYS:
            if key in output:
                return extract_logits(output[key])
        if all(isinstance(output.get(key), Tensor) for key in SPAN_LOGIT_KEYS):
            return torch.stack([output[key] for key in SPAN_LOGIT_KEYS], dim=1)
        raise TypeError(
            f"the model returned a {type(output).__name__} with keys {sorted(map(str, output))} and "
            "none of 'logits', 'out' or 'start_logits' and 'end_logits'; return the logits (a tensor), "
            "or a dict/ModelOutput with a 'logits' entry."
        )
    for key in LOGIT_KEYS:  # a named field (a namedtuple's, wherever it lies), a dataclass's attribute
        value = getattr(output, key, None)
        if isinstance(value, Tensor) and (
            not isinstance(output, tuple) or key in getattr(output, "_fields", ())
        ):
            return value
    if isinstance(output, (tuple, list)) and output:
        return extract_logits(output[0])
    raise TypeError(
        f"cannot find logits in a model output of type {type(output).__name__}; return a tensor, a "
        "tuple whose first entry is the logits, a dict/ModelOutput with a 'logits' entry, or an object "
        "with a 'logits' attribute."
    )


_eager_depth = 0


@contextlib.contextmanager
def compiled_code_eager() -> Iterator[None]:
    """Inside the block, code compiled with ``torch.compile`` (a compiled model, a LightningModule whose
    ``forward`` Lightning compiled, ``nn.Module.compile()``) runs its original Python eagerly
    (``torch.compiler.set_stance("force_eager")``).

    A measurement runs the forward under the estimators' recorder (a ``TorchFunctionMode``), in eval
    mode, with and without gradient: compiled, each of those would be traced and compiled anew, the
    recording code traced with it, and the model's compile cache filled towards its recompile limit
    (past which a frame whose guards fail, e.g. on a new input shape in training, runs uncompiled).
    Eager, the measurement is the eager model's, and the training run's compiled code and cache are
    untouched (measured: ``benchmarks/RESULTS.md``, round 11). Nested blocks only check a counter; without
    ``torch.compiler.set_stance`` (torch < 2.6) it does nothing. Cost: one ``set_stance`` per outermost
    block.
    """
    global _eager_depth
    set_stance = getattr(torch.compiler, "set_stance", None)
    if _eager_depth or set_stance is None:
        yield
        return
    _eager_depth += 1
    try:
        with set_stance("force_eager"):
            yield
    finally:
        _eager_depth -= 1


_autocast_depth = 0


@contextlib.contextmanager
def model_autocast_disabled() -> Iterator[None]:
    """Inside the block, ``torch.autocast`` contexts that the model's own code enters (``with
    torch.autocast("cuda", dtype=torch.bfloat16):`` in a ``forward``; ``torch.cuda.amp.autocast`` and
    ``torch.cpu.amp.autocast`` too) are entered disabled, so the measurement computes the network in the
    dtype of its tensors, as it does for a network trained in 16-bit mixed precision (whose autocast the
    training loop enters, outside the measurement). With the model's autocast, its layers would return
    16-bit outputs from float32 weights: the per-layer contractions would mix dtypes, and the curvature would
    carry 16-bit rounding.

    ``autocast``'s constructor is wrapped for the block (its ``enabled`` set to False) and restored on exit,
    also on error; an autocast object made before the block (a decorator applied at import) keeps its
    setting. The wrapper is process-wide: an autocast that another Python thread makes during the block is
    disabled too (a training loop runs the measurement between its steps, on its own thread). Nested
    blocks only check a counter. Cost: none per operation.
    """
    global _autocast_depth
    if _autocast_depth:
        yield
        return
    cls = torch.amp.autocast_mode.autocast
    original = cls.__init__

    def disabled(
        self: Any, device_type: str, dtype: Any = None, enabled: bool = True, cache_enabled: Any = None
    ):
        original(self, device_type, dtype=dtype, enabled=False, cache_enabled=cache_enabled)

    _autocast_depth += 1
    cls.__init__ = disabled  # type: ignore[method-assign]
    try:
        yield
    finally:
        cls.__init__ = original  # type: ignore[method-assign]
        _autocast_depth -= 1


def arguments_for(model: Callable[..., Any], inputs: Any) -> Any:
    """``inputs`` as :func:`call_model` should pass them to ``model``: unchanged, except that a dict or a
    tuple/list that ``model``'s signature does not take as keyword or positional arguments, but does take
    as one positional argument, is wrapped into a 1-tuple (then ``model(inputs)``).

    A batch ``(inputs, target)`` whose inputs are a dict (a tokenizer's ``BatchEncoding`` beside the labels)
    is called ``model(**inputs)`` by a Hugging Face model, but a LightningModule may take it whole,
    ``forward(self, inputs)``; likewise a list of views, ``forward(self, views)``. The signature tells them
    apart (``forward``'s, bound: no call, no guess); a signature that takes anything (``*args, **kwargs``:
    a compiled or wrapped module) or none keeps the default reading. A dict with columns that ``forward``
    does not name (a dataset's ``idx``, raw ``text`` beside the token ids) is passed as the keyword
    arguments it does name, when those bind (as Hugging Face's ``Trainer`` removes unused columns).

    Example:
        >>> import torch
        >>> class Whole(torch.nn.Module):
        ...     def forward(self, batch):
        ...         return batch["x"] * 2
        >>> inputs = {"x": torch.ones(2, 1), "mask": torch.ones(2, 1)}
        >>> arguments = arguments_for(Whole(), inputs)
        >>> arguments == (inputs,), call_model(Whole(), arguments).shape
        (True, torch.Size([2, 1]))
        >>> class Named(torch.nn.Module):
        ...     def forward(self, input_ids, attention_mask=None):
        ...         return input_ids * attention_mask
        >>> sorted(arguments_for(Named(), {"input_ids": 1, "attention_mask": 2, "idx": 3, "text": "a"}))
        ['attention_mask', 'input_ids']
        >>> pair = (torch.ones(2, 1), torch.ones(2, 1))
        >>> arguments_for(torch.nn.Bilinear(1, 1, 1), pair) is pair  # forward(input1, input2): positional
        True
    """
    if not isinstance(inputs, (Mapping, tuple, list)):
        return inputs
    try:
        signature = inspect.signature(getattr(model, "forward", model))
    except (TypeError, ValueError):  # a builtin or an object without a signature
        return inputs
    try:
        if isinstance(inputs, Mapping):
            signature.bind(**inputs)
        else:
            signature.bind(*inputs)
        return inputs
    except TypeError:
        pass
    if isinstance(inputs, Mapping):  # columns forward does not name (an index, raw text): left out
        taken = {k: v for k, v in inputs.items() if k in signature.parameters}
        try:
            if taken:
                signature.bind(**taken)
                return taken
        except TypeError:
            pass
    try:
        signature.bind(inputs)
    except TypeError:  # neither: the call raises the model's own error
        return inputs
    return (inputs,)


def call_model(model: Callable[..., Any], inputs: Any) -> Tensor:
    """``model`` called on ``inputs`` (tensor: positional; tuple/list: ``*args``; dict: ``**kwargs``),
    returning the logits (see :func:`extract_logits`)."""
    if isinstance(inputs, Mapping):
        out = model(**inputs)
    elif isinstance(inputs, (tuple, list)):
        out = model(*inputs)
    else:
        out = model(inputs)
    return extract_logits(out)


#: Class-name endings of Hugging Face encoder-decoder heads that build their decoder's inputs from
#: ``input_ids`` (their labels are classes or answer spans): :func:`with_decoder_inputs` leaves them alone.
ENCODER_DECODER_INPUT_HEADS = ("ForSequenceClassification", "ForQuestionAnswering", "ForTokenClassification")


def with_decoder_inputs(model: nn.Module, inputs: Any, target: Tensor) -> Any:
    """``inputs`` with the ``decoder_input_ids`` of an encoder-decoder model (Hugging Face T5, BART, Whisper,
    ...) when they are missing: such a model is trained as its docs show, ``model(**batch)`` with ``labels``,
    from which it derives its decoder's inputs (the labels shifted right, ``-100`` as padding). The
    measurement calls the model without the labels (they are the target), so it derives them the same way,
    for the first module of ``model`` (a LightningModule wrapping it too) whose config says it is an
    encoder-decoder: with its ``prepare_decoder_input_ids_from_labels`` where it has one, else as the
    models without one do in their ``forward`` (Whisper, Speech2Text, Blenderbot): the labels shifted right
    by one, ``decoder_start_token_id`` first, ``-100`` replaced by ``pad_token_id``. Encoder-decoder
    classifiers and span heads (class names ending in :data:`ENCODER_DECODER_INPUT_HEADS`: BART's and T5's
    sequence classification and question answering) derive their decoder's inputs from ``input_ids``
    themselves, and their labels are classes or spans, not a sequence: their inputs are left as they are,
    as are those of any other model or input structure, or targets that are not a sequence ``(N, L)``."""
    if not isinstance(inputs, Mapping) or "decoder_input_ids" in inputs or "decoder_inputs_embeds" in inputs:
        return inputs
    for module in model.modules():
        config = getattr(module, "config", None)
        if not getattr(config, "is_encoder_decoder", False):
            continue
        if type(module).__name__.endswith(ENCODER_DECODER_INPUT_HEADS) or target.ndim != 2:
            return inputs
        prepare = getattr(module, "prepare_decoder_input_ids_from_labels", None)
        if prepare is not None:
            return {**inputs, "decoder_input_ids": prepare(labels=target)}
        start, pad = getattr(config, "decoder_start_token_id", None), getattr(config, "pad_token_id", None)
        if start is None or pad is None:
            return inputs
        shifted = target.new_full(target.shape, int(start))
        shifted[:, 1:] = target[:, :-1]
        return {**inputs, "decoder_input_ids": shifted.masked_fill_(shifted == -100, int(pad))}
    return inputs


def logits_without_gradient(model: Callable[..., Any], inputs: Any) -> Tensor:
    """:func:`call_model` without gradient (the measurement's looks at the outputs: their layout, whether
    they are finite), with the tensor hooks a ``forward`` registers left out
    (:class:`~lightning_flatness.functional.backward_hooks.TensorHooksLeftOut`: torch refuses them on a
    tensor that does not require grad)."""
    with torch.no_grad(), TensorHooksLeftOut():
        return call_model(model, inputs)


def outputs_of_first_samples(model: Callable[..., Any], inputs: Any, count: int = 2) -> Tensor:
    """The logits of ``model`` on the first ``count`` samples of ``inputs`` (one forward pass without
    gradient, :func:`logits_without_gradient`): what the front doors look at to settle the loss and its
    layout."""
    n = inputs_batch_size(inputs)
    return logits_without_gradient(model, select_samples(inputs, slice(0, min(n, count)), n))


#: ``F.interpolate`` modes of :class:`TokenLoss`'s upsampling, by the number of position dims.
_INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}


class TokenLoss(nn.Module):
    r"""A classification loss applied per token (or pixel) of sequence or dense outputs, averaged over
    the valid ones.

    For logits ``(N, T, V)`` and targets ``(N, T)`` (class indices, ``ignore_index`` marks padding),
    the loss is ``base(logits[valid], target[valid])`` over the ``M`` valid tokens, i.e. the mean
    per-token loss, as Hugging Face computes it. With ``shift=True`` (causal language models,
    ``labels = input_ids``) position ``t`` predicts token ``t + 1``: logits ``[:, :-1]`` are paired
    with targets ``[:, 1:]``. With ``class_dim=1``, dense prediction in PyTorch's layout (semantic
    segmentation): logits ``(N, K, *positions)`` (e.g. ``(N, K, H, W)``) and targets ``(N, *positions)``,
    each position's ``K`` logits one row, as ``F.cross_entropy`` reads them. For ``(N, K)`` logits it is
    ``base`` on the non-ignored rows.

    ``base`` must be a mean of per-row losses on ``(M, K)`` logits, e.g. ``F.cross_entropy`` or
    :func:`normalized_softmax_cross_entropy`, so the total is ``(1/M) sum_tokens loss_t``: its
    Hessian is the token-weighted mean of per-token Hessians, and a sequence (an image) is one sample
    for the error bars.

    Cost: that of ``base`` on ``M`` rows.

    Args:
        base: the per-row loss.
        shift: pair position ``t`` with target ``t + 1`` (causal LMs; ``class_dim=-1`` only).
        ignore_index: the target value of positions left out.
        class_dim: where the classes are: ``-1`` (the last dim, ``(N, T, V)``) or ``1`` (``(N, K, ...)``).
        output_size: dense outputs only: the targets' positions, when the logits come at a lower
            resolution and the loss upsamples them first, as Hugging Face's semantic-segmentation models
            do (``F.interpolate``, ``"bilinear"`` for 2-D positions, ``align_corners=False``). A linear map
            of the logits, so the loss's Hessian in them is ``U^T Lambda U``: its columns are formed at
            the targets' resolution and pulled back by the adjoint of the upsampling
            (:meth:`output_layout`).
    """

    def __init__(
        self,
        base: Callable[[Tensor, Tensor], Tensor],
        shift: bool = False,
        ignore_index: int = -100,
        class_dim: int = -1,
        output_size: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        if class_dim not in (-1, 1):
            raise ValueError(
                f"TokenLoss: class_dim must be -1 (sequences) or 1 (dense outputs), got {class_dim!r}."
            )
        if shift and class_dim == 1:
            raise ValueError("TokenLoss: shift=True pairs sequence positions; it needs class_dim=-1.")
        if output_size is not None and (class_dim != 1 or not 1 <= len(output_size) <= 3):
            raise ValueError(
                "TokenLoss: output_size (the targets' 1, 2 or 3 position dims) applies to dense outputs, "
                f"class_dim=1; got output_size={output_size!r} with class_dim={class_dim}."
            )
        self.base = base
        self.shift = bool(shift)
        self.ignore_index = int(ignore_index)
        self.class_dim = int(class_dim)
        self.output_size = None if output_size is None else tuple(int(s) for s in output_size)

    def with_base(self, base: Callable[[Tensor, Tensor], Tensor]) -> TokenLoss:
        """The same layout (shift, ignored index, class dim, output size) around another per-row loss."""
        return TokenLoss(base, self.shift, self.ignore_index, self.class_dim, self.output_size)

    def _resized(self, logits: Tensor) -> bool:
        return (
            self.output_size is not None and logits.ndim >= 3 and tuple(logits.shape[2:]) != self.output_size
        )

    def scored_logits(self, logits: Tensor) -> Tensor:
        """The logits the rows are read from: upsampled to :attr:`output_size` where it is set and differs."""
        if not self._resized(logits):
            return logits
        mode = _INTERPOLATION[len(self.output_size)]  # type: ignore[arg-type]
        return F.interpolate(logits, size=self.output_size, mode=mode, align_corners=False)

    def num_positions(self, logits: Tensor) -> int:
        """Rows per sample of ``logits``: ``T`` for ``(N, T, V)``, ``prod(positions)`` for dense outputs
        (``class_dim=1``; of :attr:`output_size` where set), 1 for ``(N, K)``."""
        if logits.ndim == 2:
            return 1
        if self.class_dim == -1:
            return logits.shape[1]
        return math.prod(self.output_size if self.output_size is not None else logits.shape[2:])

    def output_layout(self, per_position: Tensor, logits: Tensor) -> Tensor:
        """``(N, P, K, C)`` (per sample, scored position and class) as ``(N, D, C)`` in the order of the
        logits' own flattening ``logits[n].reshape(-1)``: position-major for ``class_dim=-1``,
        class-major for dense outputs, and pulled back through the upsampling where the rows were
        upsampled (:attr:`output_size`; the adjoint of ``F.interpolate``, by autograd: it is linear)."""
        n, p, k, c = per_position.shape
        if self.class_dim == 1:
            per_position = per_position.transpose(1, 2)
        columns = per_position.reshape(n, p * k, c)
        if not self._resized(logits):
            return columns
        low = tuple(logits.shape[2:])
        at_targets = columns.reshape(n, k, *self.output_size, c).movedim(-1, 2)  # type: ignore[misc]
        with torch.inference_mode(False), torch.enable_grad():
            z = torch.zeros(n, k * c, *low, dtype=columns.dtype, device=columns.device, requires_grad=True)
            (back,) = torch.autograd.grad(
                self.scored_logits(z),
                z,
                at_targets.reshape(n, k * c, *self.output_size).clone(),  # type: ignore[misc]
            )
        return back.reshape(n, k, c, *low).movedim(2, -1).reshape(n, k * math.prod(low), c)

    def rows(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Valid ``(M, K)`` logit rows, their ``(M,)`` targets and ``(M,)`` sample (sequence) indices."""
        if logits.ndim >= 3 and self.class_dim == 1:
            logits = self.scored_logits(logits)
            n, k = logits.shape[0], logits.shape[1]
            if tuple(target.shape) != (n, *logits.shape[2:]):
                raise ValueError(
                    f"TokenLoss(class_dim=1) needs targets (N, *positions) = {(n, *logits.shape[2:])} for "
                    f"logits (N, K, *positions) {tuple(logits.shape)}, got {tuple(target.shape)}."
                )
            positions = self.num_positions(logits)
            sample = torch.arange(n, device=logits.device).repeat_interleave(positions)
            logits = logits.reshape(n, k, positions).transpose(1, 2).reshape(n * positions, k)
            target = target.reshape(n * positions)
        elif logits.ndim == 3:
            if target.ndim != 2 or target.shape[0] != logits.shape[0]:
                raise ValueError(
                    f"TokenLoss needs targets (N, T) for logits (N, T, V), got {tuple(target.shape)} "
                    f"and {tuple(logits.shape)}."
                )
            if self.shift:
                logits, target = logits[:, :-1], target[:, 1:]
            if target.shape[1] != logits.shape[1]:
                raise ValueError(
                    f"TokenLoss: {logits.shape[1]} positions of logits but {target.shape[1]} of "
                    "targets; pass labels aligned with the logits (shift=True shifts by one), or, for a "
                    "loss over whole sequences (CTC: transcripts shorter than the outputs), that loss as "
                    "`loss_fn`."
                )
            n, t = target.shape
            sample = torch.arange(n, device=logits.device).repeat_interleave(t)
            logits, target = logits.reshape(n * t, -1), target.reshape(n * t)
        elif logits.ndim == 2:
            sample = torch.arange(logits.shape[0], device=logits.device)
        else:
            raise ValueError(
                f"TokenLoss expects logits (N, K), (N, T, V) or, with class_dim=1, (N, K, *positions); "
                f"got {tuple(logits.shape)}."
            )
        valid = target != self.ignore_index
        return logits[valid], target[valid], sample[valid]

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        rows, labels, _ = self.rows(logits, target)
        if rows.shape[0] == 0:
            raise ValueError("TokenLoss: every target is ignore_index; the batch has no token to score.")
        return self.base(rows, labels)

    def num_tokens(self, target: Tensor) -> Tensor:
        """``(N,)`` number of valid tokens of each sample (the weight of a sequence in the mean)."""
        if target.ndim == 2 and self.shift:
            target = target[:, 1:]
        valid = target != self.ignore_index
        return valid.reshape(valid.shape[0], -1).sum(dim=1)

    def extra_repr(self) -> str:
        name = getattr(self.base, "__name__", type(self.base).__name__)
        dense = ", class_dim=1" if self.class_dim == 1 else ""
        dense += f", output_size={self.output_size}" if self.output_size is not None else ""
        return f"base={name}, shift={self.shift}, ignore_index={self.ignore_index}{dense}"
