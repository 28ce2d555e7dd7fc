"""The front door: measure the sharpness of any model from any training loop, no Lightning needed.

:func:`measure_sharpness` runs the whole measurement (choose the curvature estimator, estimate the
Hessian diagonal batch by batch, pool the estimates with error bars, solve eq. 13 and 17);
:class:`SharpnessMeasurement` is the same one batch at a time, for callers that own the loop (the
Lightning callback, which partitions the batches across processes and reports progress).

``method="auto"`` is resolved once, on the first batch, by :func:`choose_method`; the choice and its
reason are stated in :attr:`SharpnessMeasurement.choice`. Imports point one way: this module uses
the metric and the functional core, and the callback uses this module.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_flatness.batch_split import split_batch as default_split_batch
from lightning_flatness.functional.backward_hooks import TensorHooksLeftOut
from lightning_flatness.functional.dense_experts import dense_experts
from lightning_flatness.functional.estimators import HessianDiagonalEstimate, hessian_diagonal_groups
from lightning_flatness.functional.estimators.method_choice import MethodChoice, choose_method
from lightning_flatness.functional.estimators.registry import ESTIMATORS
from lightning_flatness.functional.loss_forms import (
    are_probabilities,
    hessian_twin,
    loss_for_outputs,
    single_output_mse_loss,
    split_ignore_index,
    standard_loss,
)
from lightning_flatness.functional.loss_hessian_factors import ELEMENTWISE_LOSSES, is_probability_target
from lightning_flatness.functional.losses import normalized_softmax_cross_entropy
from lightning_flatness.functional.measurement_context import measurement_context
from lightning_flatness.functional.model_io import (
    TokenLoss,
    arguments_for,
    call_model,
    group_bounds,
    input_tensors,
    inputs_batch_size,
    logits_without_gradient,
    map_inputs,
    outputs_of_first_samples,
    samples_along_dim0,
    select_samples,
    with_decoder_inputs,
)
from lightning_flatness.functional.parameters import (
    ParameterSelection,
    matrix_stacks,
    select_parameters,
    split_matrix_stacks,
)
from lightning_flatness.isolation import autograd_tensor, floating_point_in
from lightning_flatness.metric import NormalizedSharpness, all_finite

__all__ = [
    "SharpnessMeasurement",
    "SharpnessResult",
    "check_targets",
    "classifier_problem",
    "is_causal_lm",
    "listed",
    "measure_sharpness",
    "position_class_dim",
    "resolve_loss",
    "semantic_segmentation_model",
    "unreached_parameters",
    "zero_sharpness_message",
]

LossFn = Callable[[Tensor, Tensor], Tensor]

#: Class-name endings of causal language models (Hugging Face), whose labels are the inputs shifted by one.
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
#: Class-name endings of Hugging Face classifiers whose loss follows ``config.problem_type`` (transformers'
#: ``ForSequenceClassificationLoss``: cross-entropy, squared error or binary cross-entropy).
CLASSIFIER_SUFFIXES = (
    "ForSequenceClassification",
    "ForImageClassification",
    "ForVideoClassification",
    "ForAudioClassification",
)


def classifier_problem(model: nn.Module, target: Tensor) -> Optional[tuple[str, int, bool]]:
    """``(problem_type, num_labels, declared)`` of the first Hugging Face classifier in ``model`` (class name
    ending in one of :data:`CLASSIFIER_SUFFIXES`): its ``config.problem_type`` (``declared``), else the type
    its loss infers, as transformers does: ``"regression"`` for one label, ``"single_label_classification"``
    for ``int32`` / ``int64`` labels, else ``"multi_label_classification"``. None for other models."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if type(module).__name__.endswith(CLASSIFIER_SUFFIXES) and hasattr(config, "num_labels"):
            labels = int(config.num_labels)
            problem = getattr(config, "problem_type", None)
            if problem is not None:
                return str(problem), labels, True
            if labels == 1:
                problem = "regression"
            elif target.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
            return problem, labels, False
    return None


def _classifier_loss(loss_fn: LossFn, model: nn.Module, logits: Tensor, target: Tensor) -> LossFn:
    """The default loss (eq. 20) where it applies; for a Hugging Face classifier trained for regression or
    multi-label classification (:func:`classifier_problem`), where eq. 20's class targets do not exist,
    the model's own loss, with a warning that says so. Float labels that are class probabilities (a
    mixup or cutmix collate, trained with a soft-target cross-entropy of the user's) keep eq. 20 unless
    ``config.problem_type`` declares multi-label classification."""
    if loss_fn is not normalized_softmax_cross_entropy:
        return loss_fn
    found = classifier_problem(model, target)
    if found is None:
        return loss_fn
    problem, labels, declared = found
    if problem == "multi_label_classification" and not declared and is_probability_target(logits, target):
        return loss_fn
    own: Optional[LossFn] = None
    if problem == "regression":
        own, name = (
            (single_output_mse_loss, "MSELoss on the squeezed logits")
            if labels == 1
            else (F.mse_loss, "MSELoss")
        )
    elif problem == "multi_label_classification":
        own, name = F.binary_cross_entropy_with_logits, "BCEWithLogitsLoss"
    if own is None:
        return loss_fn
    warnings.warn(
        f"the model is a Hugging Face classifier trained for {problem} (config.problem_type, or inferred "
        f"from num_labels={labels} and the labels' dtype {target.dtype}, as transformers does): the default "
        f"loss, eq. 20's normalized softmax cross-entropy, needs one class per sample, so the measurement "
        f"uses the model's own loss, {name}. Pass `loss_fn=` to measure another.",
        stacklevel=3,
    )
    return own


def check_targets(loss_fn: LossFn, logits: Tensor, target: Tensor) -> None:
    """The targets fit the loss, checked at the dry run where a mismatch would measure a loss that was
    never trained (or fail later with a message that does not name the fix). Raises ``ValueError``
    naming the loss or target shape to pass instead:

    - a softmax loss (eq. 20, the cross-entropy) on ``(N, 1)`` logits: a softmax over one class is constant;
    - integer targets of a softmax loss on ``(N, K)`` logits that are not one class index per sample,
      ``(N,)`` (an answer span against the start logits alone, from a question-answering model that
      returns a tuple);
    - float targets of a softmax loss on ``(N, K)`` logits that are not class probabilities, rows ``>= 0``
      summing to 1 (mixup, cutmix): regression values or multi-hot labels would be read as unnormalised
      class weights;
    - an elementwise loss (``F.mse_loss``, ``F.binary_cross_entropy_with_logits``) with targets of another
      shape than the logits but as many entries (``(N,)`` against ``(N, 1)``): ``F.mse_loss`` broadcasts
      them to ``(N, N)``, pairing every sample with every target."""
    name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    if any(loss_fn is f for f in ELEMENTWISE_LOSSES):
        if target.shape != logits.shape and target.numel() == logits.numel():
            single = (
                "single_output_bce_with_logits_loss"
                if loss_fn is F.binary_cross_entropy_with_logits
                else "single_output_mse_loss"
            )
            raise ValueError(
                f"the loss {name} compares outputs {tuple(logits.shape)} with targets {tuple(target.shape)} "
                "entry by entry; targets of another shape are broadcast against the outputs (F.mse_loss: to "
                "every pair of samples), which is not the mean of per-sample losses. Pass targets of the "
                "outputs' shape (`target.view_as(logits)` in `split_batch`), or, for one output per sample "
                f"and (N,) targets, `loss_fn=lightning_flatness.functional.loss_forms.{single}`."
            )
        return
    if not _softmax_loss(loss_fn) or logits.ndim != 2:
        return
    if are_probabilities(logits, 1):
        raise ValueError(
            f"the loss is a softmax cross-entropy ({name}) over logits, but the model's outputs "
            f"{tuple(logits.shape)} are probabilities (every row in [0, 1], summing to 1: a softmax inside "
            "the network); scored as logits they measure a loss that was never trained. Return the logits "
            "(or log-probabilities) from the measured network (its forward; for SharpnessMonitor also "
            "`measured_network`), or pass `loss_fn=lambda p, y: normalized_softmax_cross_entropy(p.log(), "
            "y)` (eq. 20 of the log-probabilities is eq. 20 of the logits: it ignores the shift)."
        )
    if logits.shape[1] == 1:
        raise ValueError(
            f"the loss is a softmax cross-entropy ({name}) over classes, but the model has one output per "
            f"sample (logits {tuple(logits.shape)}), over which a softmax is constant. For a binary "
            "classifier with one logit pass `loss_fn=nn.BCEWithLogitsLoss()` (float targets of the logits' "
            "shape) or, for (N,) targets (a training_step that squeezes the logits), "
            "`loss_fn=lightning_flatness.functional.loss_forms.single_output_bce_with_logits_loss`; for "
            "regression `loss_fn=F.mse_loss` (or `single_output_mse_loss`); or return two logits per sample."
        )
    if not target.is_floating_point():
        if target.shape != logits.shape[:1]:
            raise ValueError(
                f"the loss is a softmax cross-entropy ({name}) over the classes of logits "
                f"{tuple(logits.shape)}, which takes one class index per sample, (N,), but the targets are "
                f"{tuple(target.shape)}. " + _INDEX_TARGET_HINT
            )
        return
    if is_probability_target(logits, target):
        return
    raise ValueError(
        f"the loss is a softmax cross-entropy ({name}), which reads float targets as class probabilities "
        f"((N, K) rows >= 0 summing to 1), but the targets {tuple(target.shape)} ({target.dtype}) for logits "
        f"{tuple(logits.shape)} are not. For regression targets pass `loss_fn=F.mse_loss` (targets of the "
        "logits' shape), for multi-label targets `loss_fn=nn.BCEWithLogitsLoss()`, for class indices "
        "integer targets."
    )


_INDEX_TARGET_HINT = (
    "An answer span (start_positions, end_positions) is scored on the start and end logits together: a "
    "question-answering model that returns a tuple (return_dict=False) gives only its first entry, so "
    "return a dict or ModelOutput with 'start_logits' and 'end_logits' (return_dict=True). Otherwise pass "
    "targets of shape (N,) from `split_batch`, or the loss that fits them as `loss_fn`."
)


def _softmax_loss(loss_fn: LossFn) -> bool:
    """Eq. 20 or the cross-entropy (label smoothing included: :func:`hessian_twin`), in standard form."""
    return loss_fn is normalized_softmax_cross_entropy or hessian_twin(loss_fn) is F.cross_entropy


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is or contains a causal language model (a Hugging Face ``*ForCausalLM`` or
    ``*LMHeadModel``), whose loss pairs position ``t`` with label ``t + 1``."""
    return any(type(m).__name__.endswith(CAUSAL_LM_SUFFIXES) for m in model.modules())


def resolve_loss(loss_fn: LossFn, model: nn.Module, logits: Tensor, target: Tensor) -> LossFn:
    """``loss_fn`` as it applies to this model's outputs: wrapped in a
    :class:`~lightning_flatness.functional.model_io.TokenLoss` (a mean over the non-ignored tokens or
    pixels) when the target holds class indices per position: logits ``(N, T, V)`` with targets
    ``(N, T)`` (sequences; shifted by one for causal LMs), or logits ``(N, K, *positions)`` with targets
    ``(N, *positions)`` (dense prediction such as semantic segmentation, ``class_dim=1``, as
    ``F.cross_entropy`` reads them; for 3-D logits only where the sequence reading does not fit). A
    Hugging Face semantic-segmentation model (:func:`semantic_segmentation_model`) whose logits come at a
    lower resolution than its labels is read as its own loss reads it: the logits upsampled to the labels
    (``TokenLoss(output_size=...)``); any other resolution mismatch is an error naming the fix. The
    ignored index is the loss's own (``nn.CrossEntropyLoss(ignore_index=255)``, a ``functools.partial``
    of ``F.cross_entropy`` with ``ignore_index``;
    :func:`~lightning_flatness.functional.loss_forms.split_ignore_index`), else, for such a model, its
    ``config.semantic_loss_ignore_index``, else ``-100``. Unless it already is a ``TokenLoss``; then in its
    standard form
    (:func:`~lightning_flatness.functional.loss_forms.loss_for_outputs`: ``nn.CrossEntropyLoss()`` is
    ``F.cross_entropy``, ``F.nll_loss`` on log-probabilities is ``F.cross_entropy``, and on anything else
    an error). The default eq. 20 on a Hugging Face classifier trained for regression or multi-label
    classification is that model's own loss (:func:`classifier_problem`, with a warning); float targets
    of a softmax loss that are not class probabilities, and others that do not fit the loss, are an error
    (:func:`check_targets`)."""
    loss_fn = _classifier_loss(loss_fn, model, logits, target)
    class_dim = None if isinstance(loss_fn, TokenLoss) else position_class_dim(model, logits, target)
    if class_dim == -1 and _unaligned_sequences(model, logits, target) and not _reads_rows(loss_fn):
        class_dim = None  # a loss over whole sequences of the user's own (CTC): used as given
    output_size = None
    segmentation = None  # looked up only where it decides something, and at most once
    if class_dim is None and logits.ndim >= 4 and _dense_at_another_resolution(logits, target):
        segmentation = semantic_segmentation_model(model)
        if segmentation is None:
            raise ValueError(
                f"the logits {tuple(logits.shape)} and the per-pixel targets {tuple(target.shape)} differ in "
                "resolution; return logits at the targets' size from the measured network, e.g. a `forward` "
                "(or, for SharpnessMonitor, `measured_network`) that applies `F.interpolate(logits, "
                "size=target.shape[-2:], mode='bilinear', align_corners=False)`, or targets at the logits' "
                "size (Hugging Face's *ForSemanticSegmentation models are upsampled as their loss does)."
            )
        class_dim, output_size = 1, tuple(target.shape[1:])
    if class_dim is not None:
        base, ignore_index = split_ignore_index(loss_fn)
        if ignore_index == -100 and class_dim == 1:  # a segmentation model's own loss skips its void label
            if segmentation is None:
                segmentation = semantic_segmentation_model(model)
            if segmentation is not None:
                ignore_index = int(getattr(segmentation.config, "semantic_loss_ignore_index", -100))
        shift = class_dim == -1 and is_causal_lm(model)
        loss_fn = TokenLoss(base, shift, ignore_index, class_dim, output_size)
    loss_fn = loss_for_outputs(loss_fn, logits)
    check_targets(loss_fn, logits, target)
    return loss_fn


def _unaligned_sequences(model: nn.Module, logits: Tensor, target: Tensor) -> bool:
    """Sequence logits ``(N, T, V)`` with integer targets ``(N, L)``, ``L != T``, of a model that is not a
    causal LM (whose labels are shifted): a CTC model's transcripts, not one class per position."""
    return (
        logits.ndim == 3
        and target.ndim == 2
        and not target.is_floating_point()
        and target.shape[1] != logits.shape[1]
        and not is_causal_lm(model)
    )


def _reads_rows(loss_fn: LossFn) -> bool:
    """Whether ``loss_fn`` (with its ignored index split off) is a classification loss of one row of logits
    against one class, which :class:`~lightning_flatness.functional.model_io.TokenLoss` applies per
    position: eq. 20, the cross-entropy in its forms, ``F.nll_loss``."""
    base = standard_loss(split_ignore_index(loss_fn)[0])
    return _softmax_loss(base) or base is F.nll_loss


def semantic_segmentation_model(model: nn.Module) -> Optional[nn.Module]:
    """The first Hugging Face semantic-segmentation model in ``model`` (class name ending in
    ``ForSemanticSegmentation``: Segformer, BEiT, DPT, MobileViT, UperNet, ...), else None. Their loss
    upsamples the logits bilinearly to the labels (``align_corners=False``) and skips
    ``config.semantic_loss_ignore_index``; :func:`resolve_loss` reads them so."""
    for module in model.modules():
        if type(module).__name__.endswith("ForSemanticSegmentation") and hasattr(module, "config"):
            return module
    return None


def _dense_at_another_resolution(logits: Tensor, target: Tensor) -> bool:
    """Integer targets ``(N, *positions')`` beside logits ``(N, K, *positions)`` with ``positions' !=
    positions`` (as many position dims)."""
    return (
        not target.is_floating_point()
        and target.ndim == logits.ndim - 1
        and target.shape[0] == logits.shape[0]
        and tuple(target.shape[1:]) != tuple(logits.shape[2:])
    )


def position_class_dim(model: nn.Module, logits: Tensor, target: Tensor) -> Optional[int]:
    """Where the classes of per-position targets are: ``-1`` for sequence logits ``(N, T, V)`` with
    targets ``(N, T)`` (any ``T`` for a causal LM, whose labels are shifted), ``1`` for dense logits
    ``(N, K, *positions)`` with targets ``(N, *positions)``; None when the target is not class indices
    per position (one class per sample, probabilities, regression targets)."""
    if target.is_floating_point() or target.ndim < 2 or target.shape[0] != logits.shape[0]:
        return None
    if logits.ndim == 3 and target.ndim == 2 and (target.shape[1] == logits.shape[1] or is_causal_lm(model)):
        return -1
    if logits.ndim >= 3 and tuple(target.shape[1:]) == tuple(logits.shape[2:]):
        return 1
    return -1 if logits.ndim == 3 and target.ndim == 2 else None


@dataclass
class SharpnessResult:
    """What :func:`measure_sharpness` returns.

    Attributes:
        values: the flat dict of :meth:`NormalizedSharpness.compute` (``"normalized"``,
            ``"normalized_stderr"``, ``"normalized/<name>"``, ..., ``"num_samples"``).
        choice: the estimator used, what its expectation is (``"hessian"`` or ``"gauss_newton"``)
            and why it was chosen.
        seconds: wall time of the whole measurement.
        extra: ``"skipped_batches"`` (not finite: nothing pooled) and ``"float64_batches"`` (their
            curvature overflowed the model's dtype; estimated in float64,
            :meth:`SharpnessMeasurement.add`).
    """

    values: dict[str, Tensor]
    choice: MethodChoice
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Tensor:
        return self.values[key]


def _measuring(method: Callable[..., Any]) -> Callable[..., Any]:
    """A :class:`SharpnessMeasurement` method run as a measurement runs the model
    (:func:`~lightning_flatness.functional.measurement_context.measurement_context`), with its
    mixture-of-experts modules written out densely
    (:func:`~lightning_flatness.functional.dense_experts.dense_experts`; the same function): every forward
    pass of a measurement then runs in any dtype, where ``torch._grouped_mm``, their default, has no float64
    kernel on the CPU (``SharpnessMonitor(dtype="float64")`` on a model trained in float32)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with measurement_context(self.model), dense_experts(self.model):
            return method(self, *args, **kwargs)

    return wrapper


class SharpnessMeasurement:
    """One measurement, fed one batch at a time: ``add(inputs, target)`` per batch, then ``compute()``.

    Each batch is one independent estimate and goes into the next replicate slot of a
    :class:`NormalizedSharpness` (round-robin), so ``num_replicates`` batches or more give the
    jackknife standard error over samples (and probes). The model is never modified; see the
    estimator contract in ``docs/design.md``.

    Args:
        model: the network, called on ``inputs`` as
            :func:`~lightning_flatness.functional.model_io.call_model` does.
        loss_fn: ``(logits, target) -> mean loss``; default the normalized-softmax-cross-entropy of
            eq. 20-22. For ``(N, T, V)`` outputs it is applied per token; ``nn.CrossEntropyLoss()``,
            ``nn.NLLLoss()`` and ``F.nll_loss`` on log-probabilities take their standard forms
            (:func:`resolve_loss`).
        method: ``"auto"`` (see :func:`choose_method`) or a registered estimator name.
        parameters: which weight tensors count (:func:`select_parameters`).
        lam: lambda of eq. 17.
        num_replicates: replicate slots of the jackknife.
        jackknife: ``"linearized"`` (default) or ``"solved"``: how the metric obtains the leave-one-out
            values of eq. 17 (:class:`~lightning_flatness.metric.NormalizedSharpness`).
        num_probes: probes per batch for probe-based estimators.
        num_mc_samples: Monte-Carlo draws per sample for the Monte-Carlo Gauss-Newton estimator
            (``None``: the loss's default).
        num_sketches: independent sketches of ``"gauss_newton_sketch"`` and ``"hessian_sketch"``
            (``None``: the estimator's default; benchmarks/RESULTS.md, round 6, measures what a second
            one buys).
        generator: source of probes and Monte-Carlo draws (never the global RNG when given).
        relative_step: finite differences only (Appendix C).
        choice: a choice made earlier (e.g. in a dry run); skips ``choose_method``.
        resolve_sequence_loss: look at the first batch's output to wrap ``loss_fn`` for sequence
            outputs and settle ``F.nll_loss`` (:func:`resolve_loss`; one forward pass on two samples).
            ``False`` when the caller has resolved it already, as the callback does once per run.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        loss_fn: Optional[LossFn] = None,
        method: str = "auto",
        parameters: ParameterSelection = None,
        lam: float = 0.5,
        num_replicates: int = 8,
        num_probes: int = 64,
        num_mc_samples: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        relative_step: float = 1e-3,
        choice: Optional[MethodChoice] = None,
        num_sketches: Optional[int] = None,
        jackknife: str = "linearized",
        resolve_sequence_loss: bool = True,
    ) -> None:
        self.model = model
        self.loss_fn: LossFn = normalized_softmax_cross_entropy if loss_fn is None else loss_fn
        self.method = method
        self.parameters = parameters
        self.num_probes = num_probes
        self.num_mc_samples = num_mc_samples
        self.num_sketches = num_sketches
        self.generator = generator
        self.relative_step = relative_step
        self.choice: Optional[MethodChoice] = choice
        if choice is None and method != "auto":
            self.choice = MethodChoice.named(method)
        params = select_parameters(model, parameters)
        _warn_if_batch_statistics(model)
        #: the parameters that are stacks of expert matrices, ``{name: E}``: measured expert by expert
        self.stacks = matrix_stacks(model, params)
        #: the tensors the measures count: the selected parameters, each expert stack split into its experts
        #: (``"<name>.<e>"``, :func:`~lightning_flatness.functional.parameters.split_matrix_stacks`)
        self.weights = split_matrix_stacks({n: p.detach() for n, p in params.items()}, self.stacks)
        device = next(iter(self.weights.values())).device
        self.metric = NormalizedSharpness(
            lam=lam,
            num_replicates=num_replicates,
            jackknife=jackknife,
            parameter_shapes={n: w.shape for n, w in self.weights.items()},
        ).to(device)
        self.num_batches = 0
        #: why a batch's estimate was not finite although its loss was (:meth:`add`), else None
        self.nonfinite_curvature: Optional[str] = None
        #: batches whose curvature overflowed the measurement's dtype and were estimated in float64
        self.float64_batches = 0
        #: once an estimate ran out of memory: the most samples estimated at once (:meth:`add` halves a batch
        #: that runs out of memory and estimates larger ones in pieces of this size from then on), else None
        self.memory_batch_size: Optional[int] = None
        #: the batch size whose estimate first ran out of memory, else None
        self.out_of_memory_at: Optional[int] = None
        self._loss_resolved = not resolve_sequence_loss
        #: whether :meth:`add_groups` estimates a batch's groups in one pass: None until tried, False once the
        #: method has no such pass or it did not apply to this model (or failed: out of memory), then the
        #: groups go one by one (a caller may carry it from an earlier measurement, as the callback does)
        self.one_pass_groups: Optional[bool] = None
        #: the most samples of this model that one pass of :meth:`add_groups` takes (the smallest any batch
        #: reported, :attr:`~lightning_flatness.functional.estimators.registry.OnePassGroups.max_samples`):
        #: a caller may fetch batches of up to that many samples; None until a batch went in one pass
        self.one_pass_samples: Optional[int] = None

    def _model_inputs(self, inputs: Any, target: Tensor) -> Any:
        """``inputs`` as the model is called with them: arranged for its signature
        (:func:`~lightning_flatness.functional.model_io.arguments_for`), with an encoder-decoder's decoder
        inputs derived from the labels
        (:func:`~lightning_flatness.functional.model_io.with_decoder_inputs`)."""
        return with_decoder_inputs(self.model, arguments_for(self.model, inputs), target)

    @_measuring
    def resolve(self, inputs: Any, target: Tensor) -> MethodChoice:
        """The estimator for this model and loss (``method="auto"``: decided on this batch, once)."""
        return self._resolve(self._model_inputs(inputs, target), target)

    def _resolve(self, inputs: Any, target: Tensor) -> MethodChoice:
        """:meth:`resolve` on inputs already arranged (:meth:`_model_inputs`)."""
        if not self._loss_resolved:
            logits = outputs_of_first_samples(self.model, inputs, 2)
            self.loss_fn = resolve_loss(self.loss_fn, self.model, logits, target[:2])
            self._loss_resolved = True
        if self.choice is None:
            self.choice = choose_method(self.model, self.loss_fn, inputs, target, parameters=self.parameters)
        return self.choice

    @_measuring
    def estimate(self, inputs: Any, target: Tensor, num_groups: int = 1):
        """The Hessian-diagonal estimate of one batch (one group; with ``num_groups``, that many contiguous
        groups from one pass where the method has one, else the method's own split), without adding it."""
        inputs = self._model_inputs(inputs, target)
        choice = self._resolve(inputs, target)
        return hessian_diagonal_groups(
            self.model,
            self.loss_fn,
            inputs,
            target,
            method=choice.method,
            num_probes=self.num_probes,
            num_groups=num_groups,
            generator=self.generator,
            parameters=self.parameters,
            strict=True,
            relative_step=self.relative_step,
            num_mc_samples=self.num_mc_samples,
            num_sketches=self.num_sketches,
        )

    @_measuring
    def loss_is_finite(self, inputs: Any, target: Tensor) -> bool:
        """Whether the logits and the loss of this batch are finite (one forward pass, no gradient)."""
        logits = logits_without_gradient(self.model, self._model_inputs(inputs, target))
        with torch.no_grad():
            return bool(torch.isfinite(logits).all()) and bool(
                torch.isfinite(self.loss_fn(logits, target)).all()
            )

    def _finite_loss(self, inputs: Any, target: Tensor) -> bool:
        """:meth:`loss_is_finite`, False where the forward itself fails (then nothing is said about it)."""
        try:
            return self.loss_is_finite(inputs, target)
        except Exception:
            return False

    @_measuring
    def add(self, inputs: Any, target: Tensor) -> bool:
        """Estimate on one batch and pool it; ``False`` (nothing pooled) when the loss or the estimate is
        NaN or infinite (an estimate that overflowed a dtype narrower than float64 is first redone in
        float64: :meth:`_overflow_in_float64`; one that ran out of memory, in pieces:
        :meth:`_estimate_within_memory`). Other errors of the estimator are raised."""
        try:
            estimate = self._estimate_within_memory(inputs, target)
        except (ValueError, RuntimeError):
            try:
                finite = self.loss_is_finite(inputs, target)
            except Exception:  # the forward itself fails: report the estimator's error
                finite = True
            if not finite:
                return False
            raise
        if not all(all_finite(g) for g in estimate.groups.values()):
            retried = self._overflow_in_float64(inputs, target, estimate)
            if retried is None:
                return False
            estimate = retried
        # the estimate is the parameters' own; the measures count each expert
        self.metric.update(self._per_expert(estimate), self.weights)
        self.num_batches += 1
        return True

    def add_groups(self, inputs: Any, target: Tensor, num_groups: int) -> bool:
        """:meth:`add` of a batch that holds ``num_groups`` replicate groups, contiguous as
        ``torch.tensor_split`` cuts it, each pooled into its own slot: in one pass over the batch where the
        method has one and it applies (the exact method, :mod:`~lightning_flatness.functional.estimators.
        exact_groups`: one forward, one loss factorisation and one backward pass for all groups), else
        group by group, as :meth:`add` of each group would (also where the one-pass estimate fails, runs
        out of memory or is not finite: the groups then get :meth:`add`'s float64 and memory fallbacks).
        ``False`` as soon as a group's loss or estimate is not finite (the groups before it pooled).

        Raises:
            ValueError: some input tensor does not hold the batch's samples along dim 0 (the 1-D token
                list of ``nn.EmbeddingBag`` with ``offsets``): the batch cannot be cut into groups; add each
                group with :meth:`add`.
        """
        n = int(target.shape[0])
        if not samples_along_dim0(inputs, n):
            shapes = [tuple(t.shape) for t in input_tensors(inputs)]
            raise ValueError(
                f"add_groups cuts a batch into groups of samples along dim 0, but its input tensors {shapes} "
                f"do not all hold the {n} samples of the target there (a 1-D token list with offsets, a "
                "constant beside the batch); pass each group as a batch of its own to add()."
            )
        if num_groups > 1 and self.one_pass_groups is not False and self.memory_batch_size is None:
            estimate = self._one_pass_estimate(inputs, target, num_groups)
            if estimate is not None:
                self.metric.update(self._per_expert(estimate), self.weights)
                self.num_batches += num_groups
                return True
        for part in group_bounds(n, num_groups):
            if not self.add(select_samples(inputs, slice(*part), n), target[part[0] : part[1]]):
                return False
        return True

    def _one_pass_estimate(self, inputs: Any, target: Tensor, num_groups: int) -> Optional[Any]:
        """The groups' estimate from one call: from one pass, or, where the model has none (remembered for
        the next batches), from the method's own group-by-group estimates in that call; None where the method
        has no one-pass function, or the call failed or is not finite (then :meth:`add_groups` goes group by
        group, where each failure is handled or raised as :meth:`add` does)."""
        try:
            if self.one_pass_groups is None:  # the first batch: has the method a one-pass function at all?
                self._resolve(self._model_inputs(inputs, target), target)
                if ESTIMATORS[self.choice.method].groups_target is None:
                    self.one_pass_groups = False
                    return None
            estimate = self.estimate(inputs, target, num_groups)
        except (ValueError, RuntimeError):  # (out of memory, a refusal): group by group from now on
            self.one_pass_groups = False
            return None
        self.one_pass_groups = bool(estimate.one_pass)
        if estimate.one_pass_samples is not None:
            known = self.one_pass_samples
            self.one_pass_samples = min(estimate.one_pass_samples, known or estimate.one_pass_samples)
        return estimate if all(all_finite(g) for g in estimate.groups.values()) else None

    def _per_expert(self, estimate: Any) -> Any:
        """``estimate`` with stacks of expert matrices split into one tensor per expert, as the weights."""
        if not self.stacks:
            return estimate
        return dataclasses.replace(estimate, groups=split_matrix_stacks(estimate.groups, self.stacks, dim=1))

    def _estimate_within_memory(self, inputs: Any, target: Tensor) -> HessianDiagonalEstimate:
        """:meth:`estimate`, in pieces of at most :attr:`memory_batch_size` samples once an estimate ran out
        of memory: a batch whose estimate runs out of memory (:func:`is_out_of_memory`) is estimated again
        in two halves (recursively, down to single samples), and the pieces' estimates are pooled by their
        sizes (:func:`pooled_estimate`: the same mean over the batch's samples or tokens; a stochastic
        estimator's draws differ). The estimators hold a few backward columns of a batch's activations at
        once, more than a training step of as many samples (benchmarks/RESULTS.md, round 20)."""
        n = inputs_batch_size(inputs)
        if self.memory_batch_size is not None and n > self.memory_batch_size:
            return self._estimate_in_pieces(inputs, target, n, self.memory_batch_size)
        try:
            return self.estimate(inputs, target)
        except RuntimeError as err:
            if n < 2 or not is_out_of_memory(err):
                raise
        # outside the handler: the failed attempt's tensors went with the exception's frames
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.out_of_memory_at is None:
            self.out_of_memory_at = n
        self.memory_batch_size = -(-n // 2)
        return self._estimate_in_pieces(inputs, target, n, self.memory_batch_size)

    def _estimate_in_pieces(self, inputs: Any, target: Tensor, n: int, size: int) -> HessianDiagonalEstimate:
        pieces = [
            self._estimate_within_memory(
                select_samples(inputs, slice(start, start + size), n), target[start : start + size]
            )
            for start in range(0, n, size)
        ]
        return pooled_estimate(pieces)

    def _overflow_in_float64(self, inputs: Any, target: Tensor, estimate: Any) -> Optional[Any]:
        """The batch's estimate again in float64 where ``estimate`` is not finite although the loss is, in a
        narrower dtype: the curvature overflowed it (:func:`curvature_overflow_message`: eq. 20's
        curvature grows like ``1 / scale^2`` of the logits, which can be tiny at initialisation:
        ``benchmarks/RESULTS.md``, round 18). The model's floating tensors and the inputs are cast for
        this one estimate (:func:`~lightning_flatness.isolation.floating_point_in`: no copy of the
        model stays, nothing of the model changes), with the same method and the next draws of the
        generator; a finite result counts in :attr:`float64_batches`. None, with
        :attr:`nonfinite_curvature` saying why, where the loss is not finite (then nothing is said),
        the curvature is not finite in float64 either, or the float64 estimate fails (an op without a
        float64 kernel)."""
        if self.nonfinite_curvature is not None or not self._finite_loss(inputs, target):
            return None  # a later batch of a measurement that already failed: no second float64 pass
        groups = list(estimate.groups.values())
        failed = ""
        if groups[0].dtype != torch.float64:
            try:
                with floating_point_in(self.model, torch.float64):
                    retried = self.estimate(map_inputs(inputs, _in_float64), _in_float64(target))
            except (RuntimeError, ValueError, TypeError, NotImplementedError) as err:
                failed = f" Estimating it in float64 failed ({type(err).__name__}: {err})."
            else:
                if all(all_finite(g) for g in retried.groups.values()):
                    self.float64_batches += 1
                    return retried
                groups = list(retried.groups.values())
        self.nonfinite_curvature = curvature_overflow_message(groups) + failed
        return None

    def compute(self) -> dict[str, Tensor]:
        """Every measure, its standard error and half-shift, per tensor and in total (see the metric)."""
        return self.metric.compute()


def _in_float64(t: Tensor) -> Tensor:
    return autograd_tensor(t, t.device, torch.float64)


def curvature_overflow_message(estimates: Iterable[Tensor]) -> str:
    """Why a curvature estimate is NaN or infinite where the loss is finite. In float32 (or narrower) the
    likely cause is overflow: eq. 20 is invariant to the logits' scale, so its Hessian grows like
    ``1 / scale^2``, and a network whose logits are tiny (a deep network at initialisation) can have
    curvature beyond float32's range (measured on Hugging Face's MobileNetV2: ``benchmarks/RESULTS.md``,
    round 16). :meth:`SharpnessMeasurement.add` then estimates the batch in float64; this message is for
    what remains (float64 overflowing too, or failing)."""
    dtype = next(iter(estimates)).dtype
    if dtype == torch.float64:
        return (
            "the curvature estimate is NaN or infinite in float64 although the loss is finite; please report "
            "it with the model."
        )
    return (
        f"the curvature estimate is NaN or infinite in {dtype} although the loss is finite: its entries "
        f"likely exceed {dtype}'s range ({torch.finfo(dtype).max:.1e}). The default loss (eq. 20) is "
        "invariant to the logits' scale, so its curvature grows like 1 / scale^2 where the logits are tiny "
        "(a network at initialisation)."
    )


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` says that memory ran out: CUDA's ``torch.OutOfMemoryError``, or the CPU allocator's
    error (where the kernel refuses the allocation rather than killing the process)."""
    message = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or any(
        m in message for m in ("out of memory", "can't allocate memory", "cannot allocate memory")
    )


def pooled_estimate(pieces: list[HessianDiagonalEstimate]) -> HessianDiagonalEstimate:
    """One-group estimates of disjoint pieces of a batch as one estimate of the whole batch: their diagonals
    weighted by their sizes (samples, or valid tokens), the sizes and probes summed."""
    sizes = torch.cat([p.group_sizes for p in pieces])
    weights = sizes.to(torch.float64) / sizes.sum()
    groups = {
        name: sum(w.to(p.groups[name].dtype) * p.groups[name] for w, p in zip(weights, pieces))
        for name in pieces[0].groups
    }
    return dataclasses.replace(
        pieces[0],
        groups=groups,
        group_sizes=sizes.sum().reshape(1),
        num_probes=sum(p.num_probes for p in pieces),
    )


def out_of_memory_message(first: int, size: int) -> str:
    """What :meth:`SharpnessMeasurement.add` did after an estimate ran out of memory."""
    return (
        f"the curvature estimate of a batch of {first} samples ran out of memory; batches are estimated in "
        f"pieces of at most {size} sample(s) instead (the same samples; a stochastic estimator's draws "
        f"differ). Pass `batch_size={size}` or less to skip the failing attempt."
    )


def float64_batches_message(count: int, total: int, dtype: torch.dtype) -> str:
    """What :meth:`SharpnessMeasurement.add` did with batches whose curvature overflowed ``dtype``."""
    return (
        f"the curvature of {count} of {total} batch(es) overflowed {dtype} although the loss was finite "
        "(tiny logits: eq. 20's curvature grows like 1 / scale^2 of the logits, as at initialisation); "
        "they were estimated in float64 instead, at float64's cost. The values are unaffected."
    )


def zero_sharpness_message(values: dict[str, Any]) -> Optional[str]:
    """Why a normalized sharpness of exactly 0 is right, when it is (else None). A flat 0 curve looks like
    a failure, but eq. 17 is 0 for a zero weight and for a tensor without curvature, and constant logits
    give both: a classifier head initialised at zero (or zero features before it) makes the logits
    constant in every other weight, and eq. 20's loss has no curvature at constant logits (its
    standardisation of the logits is constant there)."""
    if float(values["normalized"]) != 0.0:
        return None
    return (
        "normalized sharpness is 0 in every weight tensor (Hessian trace "
        f"{float(values['hessian_trace']):.4g}). Eq. 17 is 0 for a zero weight and for a tensor without "
        "curvature, which is what constant logits give: a classifier head initialised at zero (timm's Hiera "
        "and Sequencer) or zero features before it, and eq. 20's loss has no curvature at constant logits. "
        "The values are right; they become informative once training has moved those weights."
    )


#: half shift of normalized sharpness, relative to the value, from which a stochastic estimate is flagged as
#: not converged (:func:`not_converged_message`), whatever its standard error
NOT_CONVERGED_SHIFT = 0.05


def not_converged_message(values: dict[str, Any], method: str) -> Optional[str]:
    """Why a stochastic estimate of normalized sharpness has not converged, when its half shift says so
    (else None, and None for a deterministic method).

    Eq. 17 is nonlinear in the Hessian diagonal, so the noise of a stochastic estimator (probes, sketches,
    Monte-Carlo columns) biases it upwards, and the jackknife standard error, which sees only the random
    part, does not cover that bias. The samples' own fluctuation about the training loss's curvature does
    the same (a deterministic method has only that part, and is not flagged: its value is exact for the
    samples measured); the half shift holds both parts, and on untrained networks the samples' part can
    be most of it (``benchmarks/RESULTS.md``, round 23). The half shift (``normalized_half_shift``: the
    mean of the two halves' values, each with half of the samples and probes, minus the pooled value) is
    a lower bound on it for a bias falling like ``n ** -alpha``, ``0 < alpha <= 1``
    (``b(n/2) - b(n) = (2^alpha - 1) b(n)``). Its random part is of second order (for a linear statistic
    the halves average to the pooled value exactly), so the shift is flagged where it exceeds
    ``NOT_CONVERGED_SHIFT = 5%`` of the value as well as where it exceeds twice the standard error: on few
    samples the standard error of a noisy estimate is large too, and the second test alone missed large
    biases (``benchmarks/RESULTS.md``, round 22)."""
    if method not in ESTIMATORS or not ESTIMATORS[method].stochastic:
        return None
    keys = ("normalized", "normalized_stderr", "normalized_half_shift")
    value, stderr, shift = (float(values.get(key, math.nan)) for key in keys)
    if not math.isfinite(shift) or shift <= 0:
        return None
    significant = math.isfinite(stderr) and shift > 2 * stderr
    large = math.isfinite(value) and value > 0 and shift > NOT_CONVERGED_SHIFT * value
    if not (significant or large):
        return None
    share = f" ({100 * shift / value:.0f}% of {value:.4g})" if value > 0 else ""
    than = (
        f"more than twice its standard error {stderr:.2g}"
        if significant
        else f"more than {100 * NOT_CONVERGED_SHIFT:.0f}% of it (standard error {stderr:.2g})"
    )
    return (
        f"the {method} estimate of normalized sharpness has not converged: halving the probes and samples "
        f"raises it by {shift:.3g}{share}, {than}, so noise (the estimator's and the samples') biases it "
        "upwards, by about that much or more"
    )


def unreached_parameters(
    model: nn.Module, inputs: Any, target: Tensor, parameters: ParameterSelection = None
) -> list[str]:
    """The selected parameters (:func:`select_parameters`) that ``model``'s logits do not depend on: autograd
    finds no path from them to the logits, so their curvature is 0 in every measure. A trained parameter among
    them is applied outside the measured network (a head that ``training_step`` calls after ``forward``, a
    tuple output whose first entry is not the logits) or only in training mode (an auxiliary head).

    One forward and one backward pass on ``inputs`` (arranged as :class:`SharpnessMeasurement` arranges them),
    run as a measurement runs the model (``measurement_context``), with the forward's tensor hooks left out.
    """
    params = select_parameters(model, parameters)
    arranged = with_decoder_inputs(model, arguments_for(model, inputs), target)
    with measurement_context(model), dense_experts(model), torch.enable_grad(), TensorHooksLeftOut():
        logits = call_model(model, arranged)
        if not logits.requires_grad:
            return list(params)
        grads = torch.autograd.grad(logits.sum(), list(params.values()), allow_unused=True)
    return [name for name, grad in zip(params, grads) if grad is None]


def listed(names: list[str], first: int = 5) -> str:
    """``names`` for a message: the first ``first``, comma-separated, and how many more."""
    more = len(names) - first
    return ", ".join(names[:first]) + (f" and {more} more" if more > 0 else "")


def _warn_if_unreached(model: nn.Module, inputs: Any, target: Tensor, parameters: ParameterSelection) -> None:
    """Warn when the logits do not depend on some measured tensors (:func:`unreached_parameters`, on the
    samples given); nothing where that check fails (the measurement itself then raises with its own
    message)."""
    try:
        names = unreached_parameters(model, inputs, target, parameters)
    except Exception:
        return
    if names:
        warnings.warn(
            f"measure_sharpness: the logits do not depend on {len(names)} of the measured tensors "
            f"({listed(names)}): "
            "their curvature is 0 in every measure. If the model's output is not the logits the training "
            "loss scores (features returned first in a tuple, a head applied outside the model), pass the "
            "network that returns the logits; otherwise leave these tensors out with `parameters=`.",
            stacklevel=3,
        )


def _warn_if_batch_statistics(model: nn.Module) -> None:
    """Warn when a BatchNorm of ``model`` is in training mode: it normalises with each batch's statistics."""
    names = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if m.training and isinstance(m, nn.modules.batchnorm._BatchNorm)
        }
    )
    if names:
        warnings.warn(
            f"the model is measured in training mode, where its {', '.join(names)} normalises with the "
            "statistics of each batch: the samples of a batch interact (per-sample passes, slower), the "
            "values depend on how the samples are batched, and the network is not the one that predicts. "
            "Its running statistics are left as they were. Call model.eval() first to measure the network "
            "as it predicts (SharpnessMonitor does).",
            UserWarning,
            stacklevel=3,
        )


def measure_sharpness(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    loss_fn: Optional[LossFn] = None,
    method: str = "auto",
    parameters: ParameterSelection = None,
    lam: float = 0.5,
    num_replicates: int = 8,
    num_probes: int = 64,
    num_mc_samples: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    split_batch: Callable[[Any], tuple[Any, Tensor]] = default_split_batch,
    relative_step: float = 1e-3,
    jackknife: str = "linearized",
    num_sketches: Optional[int] = None,
) -> SharpnessResult:
    """Normalized sharpness (eq. 17), matrix-normalized sharpness (eq. 13) and Hessian trace (eq. 5)
    of ``model`` on the training samples in ``batches``, with jackknife error bars.

    Args:
        model: the network, in the mode to be measured (``model.eval()`` for a deterministic
            function; BatchNorm then uses its running statistics). Never modified.
        batches: an iterable of batches (a DataLoader, a list of ``(inputs, target)``); each batch is
            one replicate group, so pass at least ``num_replicates`` batches for standard errors. A
            stochastic estimator (``auto`` on a network that is not piecewise linear) needs hundreds of
            samples: its noise biases the normalized measures upwards, much more on tens of samples (a
            warning says when the half shift shows it; ``benchmarks/RESULTS.md``, round 22).
        split_batch: turns a batch into ``(inputs, target)``; the default understands tuples, dicts
            with ``x``/``y``-like keys and Hugging Face dicts (``input_ids``, ..., ``labels``).
        Others: as :class:`SharpnessMeasurement`.

    Returns:
        :class:`SharpnessResult`: ``values`` (the metric's dict), ``choice`` (method, what it
        estimates and why), ``seconds``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(4)]
        >>> result = measure_sharpness(model, data, num_replicates=4)
        >>> result.choice.method, result.choice.quantity
        ('exact', 'hessian')
        >>> float(result["normalized"]) > 0, int(result["num_samples"])
        (True, 64)
    """
    start = time.perf_counter()
    measurement = SharpnessMeasurement(
        model,
        loss_fn=loss_fn,
        method=method,
        parameters=parameters,
        lam=lam,
        num_replicates=num_replicates,
        num_probes=num_probes,
        num_mc_samples=num_mc_samples,
        generator=generator,
        relative_step=relative_step,
        jackknife=jackknife,
        num_sketches=num_sketches,
    )
    skipped, checked = 0, False
    for batch in batches:
        inputs, target = split_batch(batch)
        n = inputs_batch_size(inputs)
        if n == 0:
            continue
        if not checked:  # a head applied outside the model, features first in a tuple: said once
            checked = True
            _warn_if_unreached(model, select_samples(inputs, slice(0, 2), n), target[:2], parameters)
        if not measurement.add(inputs, target):
            skipped += 1
    if measurement.num_batches == 0:
        raise ValueError(
            "measure_sharpness got no batch with a finite curvature estimate "
            f"({skipped} non-finite); "
            + (
                measurement.nonfinite_curvature
                if measurement.nonfinite_curvature is not None
                else "pass training batches on which the loss is finite."
            )
        )
    if measurement.memory_batch_size is not None:
        assert measurement.out_of_memory_at is not None
        message = out_of_memory_message(measurement.out_of_memory_at, measurement.memory_batch_size)
        warnings.warn(f"measure_sharpness: {message}", UserWarning, stacklevel=2)
    if measurement.float64_batches:
        dtype = next(iter(measurement.weights.values())).dtype
        message = float64_batches_message(measurement.float64_batches, measurement.num_batches, dtype)
        warnings.warn(f"measure_sharpness: {message}", UserWarning, stacklevel=2)
    if skipped and measurement.nonfinite_curvature is not None:
        warnings.warn(
            f"measure_sharpness skipped {skipped} batch(es): {measurement.nonfinite_curvature}",
            UserWarning,
            stacklevel=2,
        )
    values = measurement.compute()
    assert measurement.choice is not None
    message = zero_sharpness_message(values)
    if message is not None:
        warnings.warn(message, UserWarning, stacklevel=2)
    message = not_converged_message(values, measurement.choice.method)
    if message is not None:
        warnings.warn(
            f"measure_sharpness: {message} (values['normalized_half_shift']). Pass more samples (batches), "
            "raise num_probes (num_sketches for the sketched methods), or use an exact method ('exact' for "
            "ReLU-type networks, else 'gauss_newton' for the Gauss-Newton diagonal).",
            UserWarning,
            stacklevel=2,
        )
    return SharpnessResult(
        values,
        measurement.choice,
        time.perf_counter() - start,
        {"skipped_batches": skipped, "float64_batches": measurement.float64_batches},
    )
