"""``SharpnessMonitor``: normalized sharpness (Tsuzuku et al. 2020, eq. 17) of the training loss,
measured at the end of every validation (of every training epoch in a fit without validation) and logged for
TensorBoard, early stopping and checkpointing.

The callback only orchestrates: the curvature comes from
:func:`lightning_flatness.functional.hessian_diagonal_groups`, the measures and their error bars from
:class:`lightning_flatness.metric.NormalizedSharpness`. The namespace-independent logic lives in
:class:`SharpnessMonitorBase`; :class:`SharpnessMonitor` binds it to ``pytorch_lightning`` and
:mod:`lightning_flatness.lightning_namespace` to ``lightning.pytorch``.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import warnings
from collections.abc import Iterable
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_flatness import sharded
from lightning_flatness.batch_split import batch_layout_hint
from lightning_flatness.batch_split import split_batch as _default_split_batch
from lightning_flatness.batch_transfer import as_training_step_gets_it
from lightning_flatness.callback_logging import bar_chart_figure, figure_to_image
from lightning_flatness.functional import ExactMethodNotApplicable, select_parameters
from lightning_flatness.functional.dense_experts import dense_experts
from lightning_flatness.functional.estimators.method_choice import MethodChoice
from lightning_flatness.functional.estimators.registry import ESTIMATORS
from lightning_flatness.functional.losses import normalized_softmax_cross_entropy
from lightning_flatness.functional.measures import MEASURES, TOTALS, tensor_measure_names
from lightning_flatness.functional.model_io import (
    arguments_for,
    input_tensors,
    inputs_batch_size,
    logits_without_gradient,
    map_inputs,
    samples_along_dim0,
    select_samples,
    with_decoder_inputs,
)
from lightning_flatness.functional.parameters import uninitialized_parameters
from lightning_flatness.functional.replicate_measures import JACKKNIFE_MODES
from lightning_flatness.input_check import FirstCallInputs, InputSummary, input_differences, summarize
from lightning_flatness.isolation import (
    autograd_tensor,
    gradient_enabled,
    measurement_view,
    preserved_rng_states,
    resolve_dtype,
    seed_global_streams,
)
from lightning_flatness.logger_media import MediaContext, PerLayerTable, log_per_layer_media, per_layer_table
from lightning_flatness.measure import (
    SharpnessMeasurement,
    float64_batches_message,
    is_out_of_memory,
    listed,
    not_converged_message,
    out_of_memory_message,
    resolve_loss,
    unreached_parameters,
    zero_sharpness_message,
)
from lightning_flatness.memory import PeakMemory
from lightning_flatness.metric import all_finite
from lightning_flatness.progress import progress_reporter
from lightning_flatness.sharded import is_sharded
from lightning_flatness.training_subset import (
    TrainingSubset,
    chunk_sizes,
    limited_population,
    merged_chunks,
    training_dataloader,
)

__all__ = ["SharpnessMonitor", "SharpnessMonitorBase"]

LossFn = Callable[[Tensor, Tensor], Tensor]
ParameterSelection = Union[None, list[str], Callable[[str, Tensor], bool]]

_AUTO = "auto"
_DEFAULT_BATCH_SIZE = 128
_DRY_RUN_SAMPLES = 4
_RELATIVE_ERROR_ADVICE = 0.05


def _nth(n: int) -> str:
    """``"2nd "`` for ``every_n_epochs=2``, ``""`` for 1 (the words of a message)."""
    if n == 1:
        return ""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix} "


def defines_forward(module: nn.Module) -> bool:
    """Whether ``module``'s class defines ``forward`` (not ``nn.Module``'s or ``LightningModule``'s stubs)."""
    name = getattr(type(module).forward, "__qualname__", "")
    return name not in ("Module._forward_unimplemented", "LightningModule.forward")


def network_without_forward(pl_module: nn.Module) -> Optional[tuple[str, nn.Module]]:
    """``(name, child)`` where ``pl_module`` defines no ``forward`` and exactly one of its children holds
    every parameter that requires grad (``self.model`` of a module whose ``training_step`` calls
    ``self.model(x)``); else None."""
    if defines_forward(pl_module) or any(p.requires_grad for p in pl_module.parameters(recurse=False)):
        return None
    trained = [
        (name, child)
        for name, child in pl_module.named_children()
        if any(p.requires_grad for p in child.parameters())
    ]
    return trained[0] if len(trained) == 1 else None


def _is_weight_averaging(callback: Any) -> bool:
    """Whether ``callback`` is Lightning's ``WeightAveraging`` or a subclass (``EMAWeightAveraging``), in
    either namespace (``pytorch_lightning`` or ``lightning.pytorch``)."""
    return any(
        c.__name__ == "WeightAveraging" and c.__module__.endswith("callbacks.weight_averaging")
        for c in type(callback).__mro__
    )


def _is_nonnegative_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0


def _is_positive_int(value: Any) -> bool:
    return _is_nonnegative_int(value) and value >= 1


# the arguments that form SharpnessMonitorBase.state_key, in its order (checkpoints keep states under it)
_STATE_KEY_ARGUMENTS = ("prefix", "method", "num_samples", "num_probes", "lam", "seed", "dtype")


def _integer_inputs_hint(inputs: Any, err: BaseException) -> str:
    """Where the dry run failed on a dtype and the inputs hold small integer tensors (images as ``uint8``, not
    the ``int64`` ids of a token model): the likely cause, a conversion that ``training_step`` makes, and
    where the monitor would see it."""
    small = [t for t in input_tensors(inputs) if t.dtype in (torch.uint8, torch.int8, torch.int16)]
    if not small or "type" not in str(err):
        return ""
    return (
        f"The inputs include an integer tensor ({str(small[0].dtype).removeprefix('torch.')} "
        f"{tuple(small[0].shape)}) that the network does not take as it is: if `training_step` converts it "
        "(e.g. `x.float() / 255`), make that conversion in the LightningModule's `on_after_batch_transfer` "
        "(the monitor's batches go through the batch-transfer hooks) or in `split_batch`. "
    )


class SharpnessMonitorBase:
    r"""The logic of :class:`SharpnessMonitor`, independent of the Lightning namespace.

    Subclassed together with a Lightning ``Callback`` class; see :class:`SharpnessMonitor` for the
    documentation of the arguments.
    """

    #: Python logger for one-line reports (a child of the namespace's logger, so Lightning prints it).
    _logger_name = "pytorch_lightning.callbacks.sharpness_monitor"

    def __init__(
        self,
        *,
        method: str = _AUTO,
        num_samples: int = 512,
        batch_size: Optional[int] = None,
        num_probes: int = 64,
        dataloader: Optional[Iterable] = None,
        loss_fn: Optional[LossFn] = None,
        parameters: ParameterSelection = None,
        lam: float = 0.5,
        num_replicates: int = 8,
        jackknife: str = "linearized",
        every_n_epochs: int = 1,
        dtype: Union[str, torch.dtype] = "float32",
        seed: Optional[int] = 0,
        prefix: str = "sharpness",
        log_per_layer: bool = True,
        log_images: bool = True,
        images_every_n_evaluations: Optional[int] = None,
        prog_bar: bool = True,
        relative_step: float = 1e-3,
        num_sketches: Optional[int] = None,
    ) -> None:
        super().__init__()
        if method != _AUTO and method not in ESTIMATORS:
            raise ValueError(
                f"SharpnessMonitor got method={method!r}; choose 'auto' (chosen per model by "
                "lightning_flatness.functional.estimators.method_choice.choose_method) or one of "
                f"{list(ESTIMATORS)}."
            )
        if not _is_positive_int(num_samples):
            raise ValueError(
                f"SharpnessMonitor got num_samples={num_samples!r}; pass a positive number of "
                "training samples to measure on (default 512)."
            )
        if batch_size is not None and not _is_positive_int(batch_size):
            raise ValueError(
                f"SharpnessMonitor got batch_size={batch_size!r}; pass a positive int (samples "
                f"per curvature batch) or None for {_DEFAULT_BATCH_SIZE}."
            )
        if not _is_positive_int(num_replicates):
            raise ValueError(
                f"SharpnessMonitor got num_replicates={num_replicates!r}; pass a positive int "
                "(>= 2 for standard errors, default 8)."
            )
        if jackknife not in JACKKNIFE_MODES:
            raise ValueError(
                f"SharpnessMonitor got jackknife={jackknife!r}; pass 'linearized' (leave-one-out values "
                "of eq. 17 to first order at the pooled optimum, the default) or 'solved' (every one "
                "solved)."
            )
        if not _is_positive_int(num_probes):
            raise ValueError(
                f"SharpnessMonitor got num_probes={num_probes!r}; pass a positive number of "
                "Rademacher probes per sample group for the stochastic methods (default 64)."
            )
        if num_sketches is not None and not _is_positive_int(num_sketches):
            raise ValueError(
                f"SharpnessMonitor got num_sketches={num_sketches!r}; pass a positive int (independent "
                "sketches of 'gauss_newton_sketch' and 'hessian_sketch') or None for their default."
            )
        if dataloader is not None and (
            isinstance(dataloader, (str, bytes)) or not hasattr(dataloader, "__iter__")
        ):
            raise TypeError(
                f"SharpnessMonitor got dataloader of type {type(dataloader).__name__}; pass an "
                "iterable of batches (e.g. a torch DataLoader) or None to draw a subset of the "
                "training set."
            )
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(
                f"SharpnessMonitor got loss_fn of type {type(loss_fn).__name__}; pass a callable "
                f"(logits, target) -> mean loss, or None for normalized_softmax_cross_entropy."
            )
        selectable = callable(parameters) or isinstance(parameters, Iterable)
        if (
            parameters is not None
            and parameters not in ("weights", "all")
            and (isinstance(parameters, str) or not selectable)
        ):
            raise TypeError(
                f"SharpnessMonitor got parameters={parameters!r}; pass None (the default selection: "
                "weights that multiply their input, without position embeddings and class tokens, and "
                "the biases and normalization parameters beside them), 'weights' (every tensor with "
                "ndim >= 2), 'all', a list of parameter names, or a predicate "
                "(name, parameter) -> bool."
            )
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam <= 0:
            raise ValueError(
                f"SharpnessMonitor got lam={lam!r}; the lambda of eq. 17 must be a positive "
                "finite number (default 0.5)."
            )
        if images_every_n_evaluations is not None and not _is_positive_int(images_every_n_evaluations):
            raise ValueError(
                f"SharpnessMonitor got images_every_n_evaluations={images_every_n_evaluations!r}; "
                "pass a positive int (1: a bar chart at every measurement) or None (default: one "
                "chart, of the last measurement, at the end of training)."
            )
        if not _is_positive_int(every_n_epochs):
            raise ValueError(f"SharpnessMonitor got every_n_epochs={every_n_epochs!r}; pass a positive int.")
        if seed is not None and not _is_nonnegative_int(seed):
            raise ValueError(
                f"SharpnessMonitor got seed={seed!r}; pass a non-negative int, or None for a "
                "random seed (kept in the callback's state)."
            )
        if not isinstance(prefix, str) or not prefix.strip("/") or prefix != prefix.strip("/"):
            raise ValueError(
                f"SharpnessMonitor got prefix={prefix!r}; pass a non-empty name without leading "
                "or trailing '/', e.g. 'sharpness'."
            )
        if (
            isinstance(relative_step, bool)
            or not isinstance(relative_step, (int, float))
            or not relative_step > 0
        ):
            raise ValueError(f"SharpnessMonitor got relative_step={relative_step!r}; pass a positive float.")
        self.method = method
        self.num_samples = int(num_samples)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.num_probes = int(num_probes)
        self.num_sketches = None if num_sketches is None else int(num_sketches)
        self.dataloader = dataloader
        self.loss_fn: LossFn = normalized_softmax_cross_entropy if loss_fn is None else loss_fn
        if parameters is not None and not callable(parameters) and not isinstance(parameters, str):
            parameters = list(parameters)
        self.parameters = parameters
        self.lam = float(lam)
        self.num_replicates = int(num_replicates)
        self.jackknife = jackknife
        self.every_n_epochs = int(every_n_epochs)
        self.dtype = resolve_dtype(dtype)
        self.seed = None if seed is None else int(seed)
        self.prefix = prefix
        self.log_per_layer = bool(log_per_layer)
        self.log_images = bool(log_images)
        self.images_every_n_evaluations = (
            None if images_every_n_evaluations is None else int(images_every_n_evaluations)
        )
        self.prog_bar = bool(prog_bar)
        self.relative_step = float(relative_step)
        #: One dict per evaluation: ``epoch``, ``global_step``, ``method``, ``seconds`` and every value
        #: of :meth:`NormalizedSharpness.compute` (``normalized``, ``normalized/<name>``, ...).
        self.history: list[dict[str, Any]] = []
        # state (saved in checkpoints)
        self._seed: Optional[int] = self.seed
        self._indices: Optional[Tensor] = None
        self._dataset_size: Optional[int] = None
        self._resolved_method: Optional[str] = None if method == _AUTO else method
        self._evaluations = 0
        # per run
        self._subset: Optional[TrainingSubset] = None
        self._prepared = False
        self._warned: set[str] = set()
        self._layouts_written: set[int] = set()
        self._undrawn_chart: Optional[dict[str, Any]] = None  # the last measurement, if not charted yet
        self._measured_names: Optional[list[str]] = None  # the tensors of the last measurement
        self._state_buffer: Optional[Tensor] = None  # the last metric's state, for the next (CPU only)
        # the most samples per estimate once an estimate ran out of memory (SharpnessMeasurement)
        self._memory_batch_size: Optional[int] = None
        # False once a measurement found that its batches' groups cannot be estimated in one pass (the model,
        # or memory): later measurements fetch one group per batch (SharpnessMeasurement.one_pass_groups)
        self._one_pass_groups: Optional[bool] = None
        # the most samples one pass takes for this model (SharpnessMeasurement.one_pass_samples), once the dry
        # run (or a measurement) found it: with the default batch_size, measurements fetch batches that large
        self._one_pass_samples: Optional[int] = None
        self._generator: Optional[torch.Generator] = None  # this evaluation's probes
        self._choice: Optional[MethodChoice] = None if method == _AUTO else MethodChoice.named(method)
        self._loss: LossFn = self.loss_fn  # resolved at the dry run (TokenLoss for sequence outputs)
        # the network's inputs in the first training step and in the dry run (lightning_flatness.input_check)
        self._training_inputs: Optional[FirstCallInputs] = None
        self._measured_inputs: Optional[dict[str, InputSummary]] = None
        self._inputs_compared = False
        self._training_dataset: Any = None  # the training loader's dataset at the fit's first measurement

    # -- public hooks for subclasses ----------------------------------------------------------------

    def split_batch(self, batch: Any) -> tuple[Any, Tensor]:
        """Split one batch into ``(inputs, target)``; the network is called on ``inputs`` as
        :func:`~lightning_flatness.functional.model_io.call_model` does (a tensor, ``*tuple`` or
        ``**dict``) and must return the logits (or a tuple/dict/``ModelOutput`` holding them).

        The default (:func:`lightning_flatness.batch_split.split_batch`) takes the first two entries
        of a tuple/list; for a Hugging Face dict (with ``"input_ids"``, ``"pixel_values"``, ...) the
        target under ``"labels"`` (or another target key; else the answer span of
        ``"start_positions"`` and ``"end_positions"``) and every other entry as keyword inputs;
        for any other dict the first present of the keys ``"inputs"``, ``"input"``, ``"x"``,
        ``"features"``, ``"image"``, ``"images"``, ``"data"`` (inputs) and ``"target"``,
        ``"targets"``, ``"y"``, ``"label"``, ``"labels"`` (target). Override it for other batches.
        """
        return _default_split_batch(batch)

    def measured_network(self, pl_module: nn.Module) -> nn.Module:
        """The network whose curvature is measured: by default ``pl_module`` itself. It is called on the
        inputs of :meth:`split_batch` and must return the logits. Override it to measure a submodule,
        e.g. ``return pl_module.net``.

        It is measured in place, with no copy, through
        :func:`lightning_flatness.isolation.measurement_view`: eval mode and, where the training
        dtype differs from ``dtype``, cast copies of just those tensors, both only during the
        measurement. Its weights, buffers and ``.grad`` are never changed; its forward hooks run, its
        backward hooks are suspended while the estimators differentiate it
        (:mod:`~lightning_flatness.functional.backward_hooks`). A
        module whose forward hooks change its state (e.g. ``torch.nn.utils.spectral_norm``) can be
        measured on a copy instead: ``return copy.deepcopy(pl_module)``. The dry run warns when the
        network's output does not depend on some of the trained tensors it measures (a head that
        ``training_step`` applies after ``forward``: the output measured is then not the trained logits).

        A LightningModule that defines no ``forward`` (its ``training_step`` calls ``self.model(x)``) is
        measured through the one child module that holds all its trained parameters, if there is one
        (:func:`network_without_forward`; said once at the dry run).
        """
        child = network_without_forward(pl_module)
        return pl_module if child is None else child[1]

    # -- state ------------------------------------------------------------------------------------

    @property
    def subset_indices(self) -> Optional[Tensor]:
        """The dataset indices of the training samples the monitor measures (a copy): drawn once at the first
        fit from the samples the training loader draws (:mod:`~lightning_flatness.training_subset`) and kept
        in checkpoints, so that the same samples can be measured elsewhere (e.g. with
        :func:`~lightning_flatness.measure.measure_sharpness` on ``dataset[i]``); None before the first fit
        and with ``dataloader=``. A sampler with replacement may draw an index more than once."""
        return None if self._indices is None else self._indices.clone()

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint, from the arguments that identify it (two
        monitors with different settings keep separate states). Formed once and kept until one of those
        arguments is set again: Lightning reads it on every hook call it dispatches, several per training
        step, for its profiler's label."""
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self.__dict__["_state_key"] = self._formed_state_key()
        return key

    def _formed_state_key(self) -> str:
        """The state key formed from the arguments of ``_STATE_KEY_ARGUMENTS`` (Lightning's format; the dtype
        by its name without ``torch.``)."""
        values = {name: getattr(self, name) for name in _STATE_KEY_ARGUMENTS}
        values["dtype"] = str(values["dtype"]).removeprefix("torch.")
        return self._generate_state_key(**values)  # type: ignore[attr-defined]

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _STATE_KEY_ARGUMENTS:
            self.__dict__.pop("_state_key", None)
        super().__setattr__(name, value)

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self._seed,
            "indices": None if self._indices is None else self._indices.clone(),
            "dataset_size": self._dataset_size,
            "method": self._resolved_method,
            # what the method measures on this network (a Gauss-Newton estimator measures the Hessian of a
            # piecewise-linear one): not derivable from the method's name alone
            "quantity": None if self._choice is None else self._choice.quantity,
            "evaluations": self._evaluations,
            "history": [dict(entry) for entry in self.history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._seed = state_dict["seed"]
        indices = state_dict["indices"]
        self._indices = None if indices is None else torch.as_tensor(indices, dtype=torch.int64).clone()
        self._dataset_size = state_dict["dataset_size"]
        if self.method == _AUTO or state_dict["method"] == self.method:
            self._resolved_method = state_dict["method"]
            quantity = state_dict.get("quantity")  # absent from checkpoints of earlier versions
            if self._resolved_method in ESTIMATORS and quantity is not None:
                self._choice = MethodChoice(self._resolved_method, quantity, "restored from a checkpoint")
            elif self.method == _AUTO:  # the dry run chooses again (and states what it measures)
                self._choice = None
        self._evaluations = int(state_dict["evaluations"])
        self.history = [dict(entry) for entry in state_dict["history"]]

    # -- Lightning hooks ----------------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage not in ("fit", "validate"):
            return
        self._subset, self._prepared, self._layouts_written = None, False, set()
        self._undrawn_chart, self._memory_batch_size, self._one_pass_groups = None, None, None
        self._one_pass_samples = None
        self._training_inputs, self._measured_inputs, self._inputs_compared = None, None, False
        self._training_dataset = None
        self._measured_names = None
        # this fit may train another network than the last one this monitor watched (a sweep reusing it):
        # its messages are said for it, and `auto` chooses again in the dry run (a resumed fit gets the
        # checkpoint's choice back: load_state_dict comes after setup)
        if stage == "fit":
            self._warned = set()
            if self.method == _AUTO:
                self._choice, self._resolved_method = None, None
        clash = [
            cb
            for cb in trainer.callbacks
            if isinstance(cb, SharpnessMonitorBase) and cb is not self and cb.prefix == self.prefix
        ]
        if clash:
            raise ValueError(
                f"{len(clash) + 1} SharpnessMonitor callbacks log under the same prefix "
                f"{self.prefix!r}; give each its own `prefix=` (e.g. "
                "prefix='sharpness_hutchinson')."
            )
        if not trainer.loggers:
            self._warn_once(
                trainer,
                "no_logger",
                "SharpnessMonitor: the Trainer has no logger, so the values go only to "
                f"trainer.callback_metrics['{self.prefix}/normalized'] (and monitor.history); "
                "pass e.g. logger=TensorBoardLogger('logs') to the Trainer to record the curves.",
            )
        if stage == "fit" and not self._validation_runs(trainer):
            self._say_measured_at_training_epoch_end(trainer)
        elif stage == "fit":
            self._say_which_weights_with_averaging(trainer)
        if any(True for _ in pl_module.parameters()) and not uninitialized_parameters(pl_module):
            self._check_parameters(pl_module)  # else built later (configure_model, lazy modules): in _prepare
        if self._seed is None:
            self._seed = int(trainer.strategy.broadcast(secrets.randbits(62), src=0))
        with preserved_rng_states():  # a train_dataloader() hook may draw random numbers
            self._resolve_data(trainer, final=False)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if uninitialized_parameters(pl_module):  # lazy modules: created by the first forward
            self._info_once(
                trainer,
                "lazy",
                "SharpnessMonitor: the model's lazy modules create their parameters in its first forward, "
                "so the checks and the dry run wait for the end of the first training step.",
            )
            return
        self._prepare(trainer, pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._inputs_compared or self._training_inputs is not None or self.dataloader is not None:
            return
        network = self.measured_network(pl_module)
        compiled = getattr(pl_module, "_compiler_ctx", None) or getattr(network, "_compiled_call_impl", None)
        if compiled:  # a hook would make the compiled code recompile: no comparison
            self._inputs_compared = True
            return
        self._training_inputs = FirstCallInputs(network)  # removes itself after the first call

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._prepared and not uninitialized_parameters(pl_module):
            self._prepare(trainer, pl_module)  # deferred by on_fit_start: the lazy modules' first forward ran
        if not self._inputs_compared and self._training_inputs is not None:
            self._compare_inputs(trainer)

    def _compare_inputs(self, trainer: Any) -> None:
        """Say once when the network's inputs in the first training step differ in scale or kind from the
        monitor's (:mod:`~lightning_flatness.input_check`): a transform that ``training_step`` applies."""
        assert self._training_inputs is not None
        self._training_inputs.remove()
        training, self._inputs_compared = self._training_inputs.summary, True
        if training is None or self._measured_inputs is None:
            return
        found = input_differences(training, self._measured_inputs)
        if found:
            self._warn_once(
                trainer,
                "inputs",
                "SharpnessMonitor: the network's inputs differ between training and the monitor's batches: "
                + "; ".join(found)
                + ". A transform that training_step applies to the batch before calling the network (a "
                "scaling, a normalisation) does not reach the monitor's samples, so the network would be "
                "measured on inputs it is not trained on: move it into on_after_batch_transfer (the monitor "
                "applies the batch-transfer hooks) or into the dataset, or override `split_batch`.",
            )

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if not self._prepared and trainer.state.fn == "validate":
            self._prepare(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._should_run(trainer):
            self._measure_and_log(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """The measurement of a fit without a validation loop (:meth:`_validation_runs`), in the same place
        of the epoch as validation's: Lightning calls ``EarlyStopping`` and ``ModelCheckpoint`` after the
        other callbacks' ``on_train_epoch_end``, so they see the values of the epoch whatever the order of
        ``Trainer(callbacks=...)``."""
        if not self._validation_runs(trainer) and self._should_run(trainer):
            self._say_measured_at_training_epoch_end(trainer)  # (an empty validation loader shows only now)
            self._measure_and_log(trainer, pl_module)

    def _say_measured_at_training_epoch_end(self, trainer: Any) -> None:
        self._info_once(
            trainer,
            "no_validation",
            "SharpnessMonitor: this fit has no validation loop (no val_dataloader or validation_step, "
            "limit_val_batches=0, or an empty validation loader), so it measures at the end of every "
            f"{_nth(self.every_n_epochs)}training epoch instead of at the end of validation.",
        )

    def _measure_and_log(self, trainer: Any, pl_module: Any) -> None:
        if not self._prepared:
            self._prepare(trainer, pl_module)
        self._say_if_the_training_set_changed(trainer)
        values, seconds = self._measure(trainer, pl_module)
        self._record(trainer, values, seconds)
        self._log(trainer, pl_module, values, seconds)

    def _say_if_the_training_set_changed(self, trainer: Any) -> None:
        """Once, when the training loader reads another dataset object than at the fit's first measurement
        (``reload_dataloaders_every_n_epochs`` with a new dataset: a curriculum, progressive resizing): the
        monitor keeps its samples, so that the curve stays comparable. (The first measurement sets the
        reference: a ``train_dataloader()`` hook that builds its dataset at every call gives the monitor's
        subset another object than the trainer's from the start.)"""
        loader = getattr(trainer, "train_dataloader", None) if trainer.state.fn == "fit" else None
        if self._subset is None or not isinstance(loader, DataLoader):
            return
        if self._training_dataset is None:
            self._training_dataset = loader.dataset
        elif loader.dataset is not self._training_dataset:
            self._warn_once(
                trainer,
                "dataset_changed",
                "SharpnessMonitor: the training loader now reads another dataset "
                f"({type(loader.dataset).__name__}) than at the fit's first measurement (reloaded data "
                "loaders); the monitor keeps measuring the samples it drew then, so that the curve stays "
                "comparable. To measure the new samples (a curriculum, images at a new resolution), pass "
                "them with `SharpnessMonitor(dataloader=...)`.",
            )

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._undrawn_chart is not None:  # the last measurement's bar chart, unless drawn already
            entry, self._undrawn_chart = self._undrawn_chart, None
            self._log_chart(trainer, entry, entry["global_step"], entry["epoch"])

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._state_buffer = None  # the kept metric state is freed with the run

    # -- preparation --------------------------------------------------------------------------------

    def _say_which_weights_with_averaging(self, trainer: Any) -> None:
        """Lightning's ``WeightAveraging`` (EMA) swaps the averaged weights in at the start of validation and
        back in its ``on_validation_epoch_end``, so which weights this callback's ``on_validation_epoch_end``
        measures follows the order of ``Trainer(callbacks=...)``: say which, and how to get the other."""
        averaging = [cb for cb in trainer.callbacks if _is_weight_averaging(cb)]
        if not averaging:
            return
        name = type(averaging[0]).__name__
        first = trainer.callbacks.index(self) < trainer.callbacks.index(averaging[0])
        if first:
            measured = f"the averaged weights that validation uses ({name} has swapped them in)"
            other = f"after {name} to measure the weights training updates"
        else:
            measured = f"the weights training updates ({name} has swapped the averaged ones out again)"
            other = f"before {name} to measure the averaged weights that validation uses"
        self._warn_once(
            trainer,
            "weight_averaging",
            f"SharpnessMonitor comes {'before' if first else 'after'} {name} in the Trainer's callbacks, so "
            f"it measures {measured}; put it {other}.",
        )

    @staticmethod
    def _validation_runs(trainer: Any) -> bool:
        """Whether the fit runs a validation loop, where the monitor measures: Lightning runs none without a
        ``val_dataloader``, without ``validation_step`` or with ``limit_val_batches=0``
        (``trainer.enable_validation``), nor when the validation loader, once loaded, has no batches."""
        if trainer.limit_val_batches == 0 or getattr(trainer, "enable_validation", True) is False:
            return False
        val_loop = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "val_loop", None)
        loaded = getattr(val_loop, "_combined_loader", None) is not None
        return not (loaded and bool(getattr(val_loop, "skip", False)))

    def _check_parameters(self, pl_module: nn.Module) -> None:
        try:
            chosen = select_parameters(pl_module, self.parameters)
        except (ValueError, TypeError) as err:
            raise type(err)(f"SharpnessMonitor cannot measure {type(pl_module).__name__}: {err}") from err
        if not any(p.ndim >= 2 for p in chosen.values()):
            raise ValueError(
                f"SharpnessMonitor cannot measure {type(pl_module).__name__}: the selected parameters "
                f"{list(chosen)[:5]} hold no weight tensor with ndim >= 2 (rows x columns), so normalized "
                "sharpness (eq. 17), the monitored value, would be an empty sum; unfreeze a weight matrix "
                "or choose the tensors with `parameters=`."
            )

    def _resolve_data(self, trainer: Any, final: bool) -> None:
        "Find the samples to measure on; ``final=False`` (at ``setup``) defers hook errors to ``_prepare``."
        world = trainer.world_size
        if self.dataloader is not None:
            size = len(self.dataloader) if hasattr(self.dataloader, "__len__") else None
            if size == 0:
                raise ValueError(
                    "SharpnessMonitor got an empty `dataloader` (no batches); pass a loader "
                    "with at least one batch of training samples."
                )
            if size is not None and size < world:
                raise ValueError(
                    f"SharpnessMonitor's `dataloader` has {size} batches for {world} processes; "
                    "each process measures its share of the batches (batch i on rank i % "
                    f"{world}): pass at least {world} batches."
                )
            return
        if self._subset is not None:
            return
        try:
            loader = training_dataloader(trainer)
        except Exception as err:
            if not final:  # e.g. the LightningModule builds its dataset in its own setup(), which runs later
                return
            raise RuntimeError(
                "SharpnessMonitor could not get the training dataloader to draw its subset "
                f"from ({type(err).__name__}: {err}); pass the samples explicitly with "
                f"`SharpnessMonitor(dataloader=...)`."
            ) from err
        if loader is None:
            raise ValueError(
                "SharpnessMonitor needs training samples, but the Trainer has no training data "
                f"during trainer.{trainer.state.fn}(); define train_dataloader() in the "
                "LightningModule or datamodule, or pass `SharpnessMonitor(dataloader=...)`."
            )
        self._subset = TrainingSubset(loader)
        self._subset.population = limited_population(
            self._subset.population,
            loader,
            getattr(trainer, "limit_train_batches", 1.0),
            getattr(trainer, "overfit_batches", 0),
        )
        if self._indices is None:
            self._choose_subset()
        if min(len(self._indices), self.num_samples) < world:
            raise ValueError(
                f"SharpnessMonitor has {len(self._indices)} samples for {world} processes; each "
                "process needs at least one: raise num_samples or use a larger training set."
            )

    def _choose_subset(self) -> None:
        assert self._subset is not None and self._seed is not None
        self._dataset_size = self._subset.population.size
        self._indices = self._subset.population.choose(self.num_samples, self._seed)

    def _prepare(self, trainer: Any, pl_module: Any) -> None:
        """Checks before the first measurement: data, parameters, batch splitting, and the method."""
        with preserved_rng_states():
            self._resolve_data(trainer, final=True)
        self._check_parameters(pl_module)
        if self._subset is not None and self._dataset_size != self._subset.population.size:
            self._warn_once(
                trainer,
                "resized",
                f"SharpnessMonitor: the training set has {self._subset.population.size} samples but the "
                f"subset in the checkpoint was drawn from {self._dataset_size}; drawing a new "
                "subset (the curve's next points are not comparable with the previous ones).",
            )
            self._choose_subset()
        if is_sharded(pl_module):  # FSDP2: measured shard by shard (lightning_flatness.sharded), no dry run
            sharded.prepare_in_callback(self, trainer, pl_module)
            self._prepared = True
            return
        population = self._subset.population if self._subset is not None else None
        if population is not None and (
            population.indices is not None
            or population.weights is not None
            or population.limited_by
            or not population.known
        ):
            advice = (
                ""
                if population.known
                else "; if it restricts or weights the training samples, pass the samples to measure with "
                "`SharpnessMonitor(dataloader=...)`"
            )
            self._info_once(
                trainer,
                "population",
                f"SharpnessMonitor draws its subset from {population.describe()}{advice}.",
            )
        device = pl_module.device
        child = network_without_forward(pl_module)
        if child is not None and type(self).measured_network is SharpnessMonitorBase.measured_network:
            self._info_once(
                trainer,
                "no_forward",
                f"SharpnessMonitor: {type(pl_module).__name__} defines no forward, so it measures its "
                f"submodule '{child[0]}' ({type(child[1]).__name__}), which holds all the trained "
                "parameters; the logged names are relative to it. Override `measured_network` to measure "
                "another network.",
            )
        with preserved_rng_states(), gradient_enabled(device):
            batch = next(self._rank_batches(trainer, dry_run=True)[0], None)
            if self._subset is not None and self._subset.notice is not None:
                self._info_once(trainer, "workers", self._subset.notice)
            if batch is None:
                raise ValueError(
                    "SharpnessMonitor's `dataloader` yielded no batch on rank "
                    f"{trainer.global_rank}; pass a loader with at least one batch per process."
                )
            inputs, target = self._split(as_training_step_gets_it(trainer, pl_module, batch, device))
            n = inputs_batch_size(inputs)
            if not samples_along_dim0(inputs, len(target)):  # (a token list with offsets): a batch cannot be
                self._one_pass_groups = False  # cut into groups, so each is fetched as a batch of its own
            layout_hint = batch_layout_hint(inputs, len(target))  # (for the error below, of the whole batch)
            inputs = self._to_device(select_samples(inputs, slice(0, _DRY_RUN_SAMPLES), n), device)
            target = autograd_tensor(target[:_DRY_RUN_SAMPLES], device, self.dtype)
            self._measured_inputs = summarize(inputs)
            try:
                with measurement_view(self.measured_network(pl_module), self.dtype) as network:
                    with dense_experts(network):  # any dtype (measure._measuring)
                        logits = logits_without_gradient(
                            network, with_decoder_inputs(network, arguments_for(network, inputs), target)
                        )
                    with warnings.catch_warnings(record=True) as said:  # said once, on rank zero
                        warnings.simplefilter("always")
                        self._loss = resolve_loss(self.loss_fn, network, logits, target)
                    for warning in said:
                        self._warn_once(trainer, f"loss: {warning.message}", str(warning.message))
                    self._estimate(trainer, pl_module, network, inputs, target, dry_run=True)
                    self._learn_one_pass(network, inputs, target)
                    unreached = unreached_parameters(network, inputs, target, self.parameters)
            except Exception as err:
                steps = trainer.global_step
                when, after = (
                    ("before training", "training has not started")
                    if steps == 0
                    else (
                        f"after training step {steps}, which created the lazy modules' parameters",
                        "training stops here",
                    )
                )
                if not defines_forward(self.measured_network(pl_module)):
                    raise RuntimeError(
                        f"SharpnessMonitor cannot measure {type(pl_module).__name__}: it defines no forward, "
                        "and no single child module holds all its trained parameters, so the monitor does "
                        "not know which network maps the inputs to the logits. Define forward(self, x) on "
                        "the LightningModule, or override `SharpnessMonitor.measured_network` to return that "
                        f"network; {after}."
                    ) from err
                raise RuntimeError(
                    f"SharpnessMonitor cannot measure {type(pl_module).__name__} (dry run on "
                    f"{min(n, _DRY_RUN_SAMPLES)} samples {when}): {type(err).__name__}: {err} "
                    f"{_integer_inputs_hint(inputs, err)}{layout_hint[:1].upper()}{layout_hint[1:]}"
                    "Pass another `method=`, `loss_fn=` or `parameters=`, or override `split_batch` / "
                    f"`measured_network`; {after}."
                ) from err
        if unreached:
            self._warn_once(trainer, "unreached", self._unreached_message(pl_module, unreached))
        if self._choice is not None and self.method == _AUTO and "fallback" not in self._warned:
            message = (
                f"SharpnessMonitor(method='auto') measures with {self._choice.label}: {self._choice.reason}."
            )
            if self._choice.quantity != "hessian":  # not the paper's quantity: say it loudly
                self._warn_once(
                    trainer,
                    "choice",
                    f"{message} The logged values are normalized sharpness of "
                    "the Gauss-Newton diagonal, not of the Hessian diagonal (benchmarks/RESULTS.md "
                    "has the measured difference on the model zoo); history['method'] says so.",
                )
            elif ESTIMATORS[self._choice.method].stochastic:  # random error and a bias: say it loudly
                self._warn_once(
                    trainer,
                    "choice",
                    f"{message} It is stochastic: the normalized measures are "
                    f"biased upwards by its noise, which '{self.prefix}/normalized_half_shift' "
                    "bounds from below (benchmarks/RESULTS.md has the measured biases).",
                )
            else:
                self._info_once(trainer, "choice", message)
        self._prepared = True

    def _unreached_message(self, pl_module: Any, names: list[str]) -> str:
        return (
            f"SharpnessMonitor: the measured network's output does not depend on {len(names)} of the trained "
            f"parameters it measures ({listed(names)}): their curvature is 0 in every measure. If "
            f"training_step applies them after {type(pl_module).__name__}'s forward (a classifier head "
            "called outside forward), the monitor scores forward's output as the logits, which is not the "
            "function training scores: make forward return the logits, or override `measured_network`. If "
            "they act only in training mode (an auxiliary head), leave them out with `parameters=`."
        )

    def _to_device(self, inputs: Any, device: torch.device) -> Any:
        return map_inputs(inputs, lambda t: autograd_tensor(t, device, self.dtype))

    def _measurement(self, network: nn.Module, generator: Optional[torch.Generator], num_probes: int) -> Any:
        return SharpnessMeasurement(
            network,
            loss_fn=self._loss,
            method=self.method,
            parameters=self.parameters,
            lam=self.lam,
            num_replicates=self.num_replicates,
            jackknife=self.jackknife,
            num_probes=num_probes,
            num_sketches=self.num_sketches,
            generator=generator,
            relative_step=self.relative_step,
            choice=self._choice,
            resolve_sequence_loss=False,  # resolved once, in the dry run
        )

    def _estimate(
        self,
        trainer: Any,
        pl_module: Any,
        network: nn.Module,
        inputs: Any,
        target: Tensor,
        dry_run: bool = False,
        measurement: Any = None,
        groups: int = 1,
    ) -> bool:
        """Estimate on one batch (``groups`` replicate groups, :meth:`_rank_batches`) and pool it into
        ``measurement``; resolves ``method="auto"`` on the dry run (:func:`choose_method`).

        Returns whether the loss and the estimate were finite. If the exact method refuses the model
        after all (a loss that is not a mean of per-sample losses is found only by the estimator),
        ``"ggn_hutchinson"`` (plain ``"hutchinson"`` when the Gauss-Newton part does not apply
        either) takes over for the rest of the run, with a warning. Probes come from this
        evaluation's private generator (a throwaway one in the dry run).
        """
        probes, generator = self.num_probes, None
        if dry_run:
            probes, generator = 1, torch.Generator(device=target.device).manual_seed(0)
        else:
            if self._generator is None:
                self._generator = self._probe_generator(target.device, trainer.global_rank)
            generator = self._generator
        if measurement is None:
            measurement = self._measurement(network, generator, probes)
        try:
            ok = (
                measurement.add(inputs, target)
                if groups == 1
                else measurement.add_groups(inputs, target, groups)
            )
        except (ValueError, RuntimeError) as err:
            if not dry_run or self.method != _AUTO or not isinstance(err, ExactMethodNotApplicable):
                raise
            method = "ggn_hutchinson" if err.gauss_newton_applicable else "hutchinson"
            self._choice = MethodChoice(
                method, ESTIMATORS[method].quantity, f"the exact method refused: {err}"
            )
            self._resolved_method = method
            self._warn_once(trainer, "fallback", self._fallback_message(pl_module, err))
            return self._estimate(trainer, pl_module, network, inputs, target, dry_run)
        self._choice = measurement.choice
        self._resolved_method = measurement.choice.method
        return ok

    def _learn_one_pass(self, network: nn.Module, inputs: Any, target: Tensor) -> None:
        """The dry run's samples once more, in 2 replicate groups, where the method estimates groups in one
        pass (:attr:`~lightning_flatness.functional.estimators.registry.EstimatorSpec.groups_target`): how
        many samples that pass takes (:meth:`_rank_batches`), or that this model has none, is then known
        before the first measurement, which fetches its batches accordingly (also where the training batches
        are no larger than a replicate group, so that no measurement would ever merge two groups to find
        out). An optimisation only: any failure here leaves the batches as they were (the dry run itself
        succeeded)."""
        if not self._groups_may_pass_at_once() or target.ndim == 0 or target.shape[0] < 2:
            return
        try:
            probe = self._measurement(network, torch.Generator(device=target.device).manual_seed(0), 1)
            probe.add_groups(inputs, target, 2)
        except Exception:  # (group by group the same as the dry run's estimate; nothing to learn)
            return
        self._remember_one_pass(probe)

    def _groups_may_pass_at_once(self) -> bool:
        """Whether the resolved method estimates several replicate groups in one pass and this model was not
        found without one."""
        method = ESTIMATORS.get(self._resolved_method or "")
        return method is not None and method.groups_target is not None and self._one_pass_groups is not False

    def _remember_one_pass(self, measurement: Any) -> None:
        """Carry what ``measurement`` found about the one pass to the next measurements."""
        if measurement.one_pass_groups is False:
            self._one_pass_groups = False
        elif measurement.one_pass_samples is not None:
            self._one_pass_samples = measurement.one_pass_samples

    def _fallback_message(self, pl_module: Any, err: Exception) -> str:
        assert self._choice is not None
        return (
            f"SharpnessMonitor(method='auto'): the exact Hessian diagonal does not apply to "
            f"{type(pl_module).__name__} ({err}) Falling back to {self._choice.label} with "
            f"num_probes={self.num_probes}. Its Hessian diagonal is unbiased, but normalized and "
            "matrix-normalized sharpness are nonlinear in it, so probe noise biases them upwards; the "
            f"logged standard errors ('{self.prefix}/normalized_stderr') cover only the random part, and "
            f"'{self.prefix}/normalized_half_shift' bounds the bias from below. Measured biases per "
            "method and probe count: benchmarks/RESULTS.md."
        )

    # -- measurement --------------------------------------------------------------------------------

    def _should_run(self, trainer: Any) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.fast_dev_run or trainer.state.fn != "fit":
            return True
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _batch_size(self) -> int:
        """Samples per curvature batch: ``batch_size``, else the default capped at the training
        DataLoader's batch size (a measurement then holds the activations of no more samples at once than
        a training step: a language model trained on 8 sequences is not measured on 64)."""
        if self.batch_size is not None:
            return self.batch_size
        training = self._subset.batch_size if self._subset is not None else None
        return min(_DEFAULT_BATCH_SIZE, training) if training else _DEFAULT_BATCH_SIZE

    def _rank_batches(
        self, trainer: Any, dry_run: bool = False, groups: bool = False
    ) -> tuple[Iterator[Any], Optional[int]]:
        """This process's batches and their number: its share of the subset (``indices[rank::world]``)
        or of the user's loader (batch ``i`` on rank ``i % world``); one batch under ``fast_dev_run``.

        ``groups``: ``(batch, replicate groups)`` pairs. The subset is cut into (at least ``num_replicates``)
        chunks of at most the batch size, one replicate group each; where the method estimates several
        groups in one pass (:attr:`~lightning_flatness.functional.estimators.registry.EstimatorSpec.
        groups_target`: the exact method), consecutive chunks are fetched as one batch of at most the batch
        size (512 samples: 4 batches of 2 groups of 64, not 8 batches of 64), so the estimator's fixed cost
        is paid per batch, not per group; each group keeps its samples and its slot. With the default
        ``batch_size``, once the dry run (:meth:`_learn_one_pass`) or a measurement found how many samples one
        pass of this model takes (its own bound on its backward columns and the layer inputs it holds,
        :attr:`~lightning_flatness.functional.estimators.registry.OnePassGroups.max_samples`), batches of up
        to that many (the paper's MLP: its 512 samples in one batch of 8 groups). Once the dry run or a
        measurement found that the model's groups cannot be estimated in one pass, one group per batch."""
        rank, world = trainer.global_rank, trainer.world_size
        one = dry_run or bool(trainer.fast_dev_run)
        if self.dataloader is not None:
            loader = self.dataloader

            def own_batches() -> Iterator[Any]:
                assert self._seed is not None
                seed_global_streams(self._seed)  # the loader's shuffling, workers' seeds, augmentations
                for i, batch in enumerate(loader):
                    if i % world == rank:
                        yield batch
                        if one:
                            return

            total = None
            if hasattr(loader, "__len__"):
                total = 1 if one else len(range(rank, len(loader), world))
            return ((b, 1) for b in own_batches()) if groups else own_batches(), total
        assert self._subset is not None and self._indices is not None
        share = self._indices[rank::world]
        size = self._batch_size()
        if one:
            share = share[: _DRY_RUN_SAMPLES if dry_run else size]
        sizes = [len(share)] if dry_run else chunk_sizes(len(share), size, self.num_replicates)
        if not groups:
            return self._subset.batches(share, sizes, seed=self._seed), len(sizes)
        one_pass = self._groups_may_pass_at_once()
        merge = size
        if one_pass and self.batch_size is None and self._one_pass_samples is not None:
            merge = max(size, self._one_pass_samples)  # as many as one pass takes (the pass's own bound)
        counts = merged_chunks(sizes, merge) if one_pass else [1] * len(sizes)
        starts = [sum(counts[:b]) for b in range(len(counts))]
        merged = [sum(sizes[s : s + c]) for s, c in zip(starts, counts)]
        return zip(self._subset.batches(share, merged, seed=self._seed), counts), len(merged)

    def _split(self, batch: Any) -> tuple[Any, Tensor]:
        inputs, target = self.split_batch(batch)
        try:
            n = inputs_batch_size(inputs)
        except TypeError:
            n = -1
        if not isinstance(target, Tensor) or target.ndim == 0 or target.shape[0] != n:
            raise TypeError(
                f"{type(self).__name__}.split_batch returned {type(inputs).__name__} and "
                f"{type(target).__name__} {tuple(getattr(target, 'shape', ()))}; it must return "
                "(inputs, target): inputs a tensor, tuple or dict of tensors and target a tensor, "
                "with the same number of samples along dim 0."
            )
        return inputs, target

    def _probe_generator(self, device: torch.device, rank: int) -> torch.Generator:
        """A private generator for this evaluation's probes, determined by (seed, evaluation, rank): a
        resumed run draws the same probes as an uninterrupted one, and ranks draw different ones."""
        sequence = np.random.SeedSequence([int(self._seed), self._evaluations, rank])
        seed = sequence.generate_state(1, np.uint64)[0]
        return torch.Generator(device=device).manual_seed(int(seed) & (2**63 - 1))

    def _measure(self, trainer: Any, pl_module: Any) -> tuple[dict[str, float], float]:
        """Every measure over this evaluation's samples, identical on all processes, and the seconds
        spent; ``values["peak_memory_mb"]`` is this process's peak memory during the measurement
        (resident set size on CPU, CUDA allocation on a GPU; sampled, see :class:`PeakMemory`)."""
        start = time.perf_counter()
        with PeakMemory(pl_module.device) as peak:
            if is_sharded(pl_module):  # FSDP2: measured shard by shard (lightning_flatness.sharded)
                values = sharded.measure_in_callback(self, trainer, pl_module)[0]
            else:
                values = self._measure_values(trainer, pl_module)
        memory = peak.cuda_mb if peak.cuda_mb is not None else peak.rss_mb
        values["peak_memory_mb"] = math.nan if memory is None else float(memory)
        return values, time.perf_counter() - start

    def _measure_values(self, trainer: Any, pl_module: Any) -> dict[str, float]:
        device = pl_module.device
        batches, total = self._rank_batches(trainer, groups=True)
        nonfinite = False
        failure: Optional[BaseException] = None
        with preserved_rng_states(), gradient_enabled(device):
            with measurement_view(self.measured_network(pl_module), self.dtype) as network:
                self._generator = self._probe_generator(device, trainer.global_rank)
                measurement = self._measurement(network, self._generator, self.num_probes)
                measurement.memory_batch_size = self._memory_batch_size  # an earlier measurement's, if any
                measurement.one_pass_groups = self._one_pass_groups
                measurement.metric.reuse_state(self._take_state_buffer(measurement.metric))
                weights = measurement.weights
                self._say_if_the_selection_changed(trainer, list(weights))
                nonfinite = not all(all_finite(w) for w in weights.values())
                description = f"Sharpness ({self._resolved_method or 'exact'})"
                todo = [] if nonfinite else batches  # non-finite weights: nothing to measure
                with progress_reporter(trainer, total, description) as advance:
                    for batch, groups in todo:
                        try:
                            inputs, target = self._split(
                                as_training_step_gets_it(trainer, pl_module, batch, device)
                            )
                            inputs = self._to_device(inputs, device)
                            target = autograd_tensor(target, device, self.dtype)
                            ok = self._estimate(
                                trainer,
                                pl_module,
                                network,
                                inputs,
                                target,
                                measurement=measurement,
                                groups=groups,
                            )
                        except Exception as err:  # a measurement never stops training: warn and log NaN
                            failure, ok = err, False
                        if not ok:
                            nonfinite = True
                            break
                        advance(1)
            self._remember_one_pass(measurement)
            if measurement.out_of_memory_at is not None:
                assert measurement.memory_batch_size is not None
                self._memory_batch_size = measurement.memory_batch_size
                message = out_of_memory_message(measurement.out_of_memory_at, measurement.memory_batch_size)
                self._warn_once(
                    trainer, "memory", f"SharpnessMonitor (epoch {trainer.current_epoch}): {message}"
                )
            if measurement.float64_batches:
                message = float64_batches_message(
                    measurement.float64_batches, measurement.num_batches, self.dtype
                )
                self._warn_once(
                    trainer, "float64", f"SharpnessMonitor (epoch {trainer.current_epoch}): {message}"
                )
            # one collective, so every process takes the same branch below
            any_nonfinite = trainer.strategy.reduce_boolean_decision(nonfinite, all=False)
            values = None
            if not any_nonfinite:
                try:
                    values = {k: float(v) for k, v in measurement.compute().items()}
                except Exception as err:  # e.g. the solver: identical on every rank, so no rank hangs
                    failure = err
                zero = None if values is None else zero_sharpness_message(values)
                if zero is not None:
                    self._warn_once(
                        trainer, "zero", f"SharpnessMonitor (epoch {trainer.current_epoch}): {zero}"
                    )
            self._keep_state_buffer(measurement.metric)
        self._evaluations += 1
        if values is None:
            if failure is not None:
                self._warn_once(
                    trainer,
                    "failure",
                    f"SharpnessMonitor: the measurement failed at epoch {trainer.current_epoch} "
                    f"({type(failure).__name__}: {failure}); logging NaN for '{self.prefix}/*' and "
                    f"continuing training. {self._failure_advice(failure)}",
                )
            else:
                overflow = measurement.nonfinite_curvature
                self._warn_once(
                    trainer,
                    "nonfinite",
                    f"SharpnessMonitor: at epoch {trainer.current_epoch} {overflow} Logging NaN for "
                    f"'{self.prefix}/*' and continuing."
                    if overflow is not None
                    else "SharpnessMonitor: the loss or its curvature is NaN or infinite at epoch "
                    f"{trainer.current_epoch} (weights, inputs or loss_fn produce non-finite "
                    f"values); logging NaN for '{self.prefix}/*' and continuing. Check the learning "
                    "rate and the data.",
                )
            per_tensor = [(m, n) for n, w in weights.items() for m in tensor_measure_names(w.shape)]
            keys = [
                *TOTALS,
                *(f"{m}_stderr" for m in TOTALS),
                *(f"{m}_half_shift" for m in TOTALS),
                *(f"{m}/{n}" for m, n in per_tensor),
                *(f"{m}_stderr/{n}" for m, n in per_tensor),
            ]
            values = {k: float("nan") for k in keys}
            values["num_samples"] = 0.0
        return values

    def _say_if_the_selection_changed(self, trainer: Any, names: list[str]) -> None:
        """Warn (once per new selection) when the measured tensors differ from the last measurement's: the
        default selection follows ``requires_grad``, so unfreezing a backbone (``BackboneFinetuning``) adds
        its tensors, and the totals step where it happens."""
        previous, self._measured_names = self._measured_names, names
        if previous is None or previous == names:
            return
        added = [n for n in names if n not in previous]
        removed = [n for n in previous if n not in names]
        self._warn_once(
            trainer,
            f"selection {names}",
            f"SharpnessMonitor (epoch {trainer.current_epoch}): the measured tensors changed since the last "
            f"measurement (added {len(added)}: {added[:5]}; removed {len(removed)}: {removed[:5]}), as when "
            "layers are unfrozen or frozen: the default selection measures the parameters that require grad. "
            f"The totals ('{self.prefix}/normalized', ...) step here; the per-tensor curves are unaffected. "
            "For totals of one composition throughout, pass `parameters=` with the tensors trained all "
            "along.",
        )

    @staticmethod
    def _failure_advice(failure: BaseException) -> str:
        """What to do about a failed measurement: where it ran out of memory although curvature batches are
        halved down to single samples when their estimates do (:class:`SharpnessMeasurement`), measure less
        (the metric's state, ``8 num_replicates`` bytes per weight entry, and the estimators' columns grow
        with the selected weights); else a report or another method."""
        if is_out_of_memory(failure):
            return (
                "It ran out of memory (curvature batches are halved down to single samples where their "
                "estimates do; the metric's state takes 8 * num_replicates bytes per measured weight entry): "
                "pass fewer `parameters=` or a smaller `num_replicates`."
            )
        return "Please report it with the model, or pass another `method=`."

    def _keep_state_buffer(self, metric: Any) -> None:
        """On the CPU, keep the metric's state buffer for the next measurement
        (:meth:`NormalizedSharpness.reuse_state`: a fresh one costs page faults at every measurement;
        CUDA's caching allocator recycles device memory by itself, so nothing is kept there)."""
        buffer = metric.release_state()
        self._state_buffer = buffer if buffer is not None and buffer.device.type == "cpu" else None

    def _take_state_buffer(self, metric: Any) -> Optional[Tensor]:
        """The kept buffer if it fits ``metric``'s state (same layout), else None (and it is dropped)."""
        buffer, self._state_buffer = self._state_buffer, None
        if buffer is None or tuple(buffer.shape) != metric.state_shape:
            return None
        return buffer

    # -- reporting ----------------------------------------------------------------------------------

    def _record(self, trainer: Any, values: dict[str, float], seconds: float) -> None:
        entry = {
            "epoch": int(trainer.current_epoch),
            "global_step": int(trainer.global_step),
            "method": self._resolved_method,
            "seconds": float(seconds),
            **values,
        }
        self.history.append(entry)
        value, stderr = values.get("normalized", math.nan), values.get("normalized_stderr", math.nan)
        stochastic = self._resolved_method in ESTIMATORS and ESTIMATORS[self._resolved_method].stochastic
        if "relative_error" not in self._warned and math.isfinite(stderr) and value > 0:
            self._warned.add("relative_error")
            relative = stderr / value
            advice = ""
            if relative > _RELATIVE_ERROR_ADVICE:
                advice = (
                    " Raise num_samples for a smaller error (it falls like 1/sqrt(num_samples))"
                    + self._samples_for_target(relative, int(values.get("num_samples", 0)), seconds)
                    + (
                        "; and num_probes (num_sketches for the sketched methods) for stochastic methods."
                        if stochastic
                        else "."
                    )
                )
            bias = ", random part only: estimator noise also biases it upwards" if stochastic else ""
            self._info(
                trainer,
                f"SharpnessMonitor: first {self._resolved_method} measurement normalized = "
                f"{value:.4g} +- {stderr:.2g} (relative standard error {100 * relative:.1f}%"
                f"{bias}) over {int(values.get('num_samples', 0))} samples in {seconds:.2f} s."
                f"{advice}",
            )

        unconverged = not_converged_message(values, self._resolved_method or "")
        if unconverged is not None:
            self._warn_once(
                trainer,
                "not_converged",
                f"SharpnessMonitor: {unconverged} (logged as '{self.prefix}/normalized_half_shift'). Raise "
                "num_probes (num_sketches for the sketched methods) or num_samples, or use an exact method "
                "('exact' for ReLU-type networks, else 'gauss_newton' for the Gauss-Newton diagonal).",
            )

    def _log(self, trainer: Any, pl_module: Any, values: dict[str, float], seconds: float) -> None:
        p = self.prefix
        dtype = torch.float32 if pl_module.device.type == "mps" else torch.float64

        def tensor(x: float) -> Tensor:
            return torch.tensor(x, dtype=dtype, device=pl_module.device)

        scalars = {f"{p}/{m}": values[m] for m in TOTALS if m != "normalized"}
        if self.num_replicates >= 2:
            scalars.update({f"{p}/{m}_stderr": values[f"{m}_stderr"] for m in TOTALS})
            scalars[f"{p}/normalized_half_shift"] = values["normalized_half_shift"]
        scalars[f"{p}/seconds"] = seconds
        scalars[f"{p}/peak_memory_mb"] = values["peak_memory_mb"]
        per_layer = {}
        if self.log_per_layer:
            per_layer = {
                f"{p}/{k}": v for k, v in values.items() if "/" in k and k.split("/", 1)[0] in MEASURES
            }
        # The values are identical on every process (the metric all-reduces its sums); reduce_fx="max" with
        # sync_dist keeps them bit-exact (a mean would divide a sum); `seconds` becomes the slowest rank's.
        common = dict(on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")
        pl_module.log(f"{p}/normalized", tensor(values["normalized"]), prog_bar=self.prog_bar, **common)
        pl_module.log_dict({k: tensor(v) for k, v in {**scalars, **per_layer}.items()}, **common)
        self._log_media(trainer, values)

    def _log_media(self, trainer: Any, values: dict[str, float]) -> None:
        """The per-layer table (every measurement) and bar chart (on the schedule of
        ``images_every_n_evaluations``), through each logger's own API (lightning_flatness.logger_media)."""
        if not self.log_per_layer or not trainer.is_global_zero or not trainer.loggers:
            return
        step, epoch = trainer.global_step, trainer.current_epoch
        log_per_layer_media(trainer, self._media(per_layer_table(values, MEASURES), step, epoch))
        if not self.log_images:
            return
        every = self.images_every_n_evaluations
        if trainer.state.fn != "fit" or (every is not None and (self._evaluations - 1) % every == 0):
            self._undrawn_chart = None
            self._log_chart(trainer, values, step, epoch)
        else:  # drawn at the end of training unless another measurement comes first
            self._undrawn_chart = {**values, "global_step": step, "epoch": epoch}

    def _log_chart(self, trainer: Any, values: dict[str, Any], step: int, epoch: int) -> None:
        """The per-layer bar chart of normalized sharpness (matplotlib) of one measurement's ``values``."""
        if not self.log_per_layer or not self.log_images or not trainer.is_global_zero or not trainer.loggers:
            return
        per_layer = {k.split("/", 1)[1]: v for k, v in values.items() if k.startswith("normalized/")}
        errors = {k.split("/", 1)[1]: v for k, v in values.items() if k.startswith("normalized_stderr/")}
        figure = bar_chart_figure(
            per_layer, f"normalized sharpness per layer, epoch {epoch}", "normalized sharpness", errors
        )
        if figure is None:
            self._info_once(
                trainer,
                "no_matplotlib",
                "SharpnessMonitor: matplotlib is not installed, so the per-layer bar chart image is "
                "skipped (pip install matplotlib).",
            )
            return
        empty = PerLayerTable(["layer"], [])  # the table went out with the measurement
        log_per_layer_media(trainer, self._media(empty, step, epoch, figure, figure_to_image(figure)))

    def _media(
        self, table: PerLayerTable, step: int, epoch: int, figure: Any = None, image: Any = None
    ) -> MediaContext:
        return MediaContext(
            prefix=self.prefix,
            measures=tuple(MEASURES),
            step=step,
            epoch=epoch,
            table=table,
            figure=figure,
            image=image,
            layouts_written=self._layouts_written,
        )

    def _warn_once(self, trainer: Any, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        if trainer.is_global_zero:
            warnings.warn(message, UserWarning, stacklevel=3)

    def _samples_for_target(self, relative: float, num_samples: int, seconds: float) -> str:
        """How many samples would bring a relative standard error ``relative`` measured on ``num_samples``
        down to ``_RELATIVE_ERROR_ADVICE`` (``n (relative / target)^2``), and at about what time per
        measurement (proportional: the curvature dominates on large models); or that the training set is
        too small for it."""
        if num_samples <= 0:
            return ""
        needed = math.ceil(num_samples * (relative / _RELATIVE_ERROR_ADVICE) ** 2)
        target = f"{100 * _RELATIVE_ERROR_ADVICE:.0f}%"
        if self._dataset_size is not None and needed > self._dataset_size:
            return (
                f": {target} would take about {needed} samples, more than the {self._dataset_size} of the "
                "training set"
            )
        scaled = seconds * needed / num_samples
        return f": about {needed} would bring it to {target}, at about {scaled:.2g} s per measurement"

    def _info(self, trainer: Any, message: str) -> None:
        if trainer.is_global_zero:
            logging.getLogger(self._logger_name).info(message)

    def _info_once(self, trainer: Any, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self._info(trainer, message)


class SharpnessMonitor(SharpnessMonitorBase, pl.Callback):
    r"""Measure normalized sharpness (Tsuzuku et al. 2020, eq. 17) of the training loss at the end of
    each validation, and log it with its per-layer values for TensorBoard, early stopping and
    checkpointing.

    Three lines::

        from lightning_flatness import SharpnessMonitor
        trainer = Trainer(callbacks=[SharpnessMonitor()], logger=TensorBoardLogger("runs"))
        trainer.fit(model, datamodule)  # then: tensorboard --logdir runs

    Normalized sharpness usually grows while a network fits its training set, so to stop a run
    that has become too sharp use ``EarlyStopping(monitor="sharpness/normalized", mode="min",
    divergence_threshold=budget, patience=max_epochs)``; ``ModelCheckpoint(monitor=...,
    mode="min")`` keeps the flattest model. With ``every_n_epochs > 1`` the other epochs log nothing:
    give such callbacks a matching frequency or ``strict=False``. A NaN measurement is logged as NaN
    (``EarlyStopping(check_finite=True)`` then stops the run).

    **When**: in ``on_validation_epoch_end``, so ``EarlyStopping`` / ``ModelCheckpoint`` see the value
    in the same epoch; every ``every_n_epochs`` epochs (and at every ``trainer.validate()``); never
    during the sanity check; on one batch under ``fast_dev_run``. A fit without a validation loop (no
    ``val_dataloader`` or ``validation_step``, ``limit_val_batches=0``) is measured in
    ``on_train_epoch_end`` instead, which Lightning calls before ``EarlyStopping``'s and
    ``ModelCheckpoint``'s: they see the value in the same epoch too.

    **On what**: the Hessian of the training loss ``L_S`` (``loss_fn``, by default the
    normalized-softmax-cross-entropy of eq. 20-22) of ``pl_module(inputs)``, on ``num_samples``
    training samples drawn once with the callback's own seeded generator (their indices,
    :attr:`subset_indices`, are kept in the callback's state, so every point of the curve uses the same
    samples), fetched by index from
    the training ``DataLoader``'s dataset with its ``collate_fn`` (the training loader itself is
    never iterated). They are drawn from the samples the loader's sampler draws: the indices of a
    ``SubsetRandomSampler`` (a train split of one dataset), by the weights of a ``WeightedRandomSampler``
    (:func:`~lightning_flatness.training_subset.training_population`); a dataset that only the loader's
    workers can read (a ``worker_init_fn`` opens it) is fetched by such workers. Or on every batch of
    ``dataloader`` when given. Either way each batch goes through the batch-transfer hooks the
    LightningModule or the datamodule overrides, as ``training_step`` gets it
    (:mod:`~lightning_flatness.batch_transfer`). Under DDP each process takes its
    share (``indices[rank::world_size]``, or batch ``i`` of ``dataloader`` on rank
    ``i % world_size``) and the metric sums the estimates over processes: every process gets the
    same value, equal to the single-process value over the same samples.

    **How**: on the live network, without a copy (:meth:`measured_network`,
    :func:`~lightning_flatness.isolation.measurement_view`), in eval mode for the duration of the
    measurement (dropout off, BatchNorm with running statistics) and in ``dtype`` (float32 or
    float64, whatever the training precision: only the tensors whose dtype differs are cast, into
    temporary copies), with
    gradients enabled locally (also inside ``trainer.validate()``'s inference mode), through
    :class:`~lightning_flatness.measure.SharpnessMeasurement` (the front door that plain training
    loops use too). Batches may be tensors, tuples or dicts (Hugging Face keyword batches included,
    :meth:`split_batch`); outputs may be tensors, tuples, dicts or ``ModelOutput`` with ``logits``;
    ``(N, T, V)`` sequence outputs are scored per token (``-100`` ignored, shifted by one for causal
    LMs; :func:`~lightning_flatness.measure.resolve_loss`). ``method="auto"`` is decided once, in a
    dry run on a few samples at fit start, by
    :func:`~lightning_flatness.functional.estimators.method_choice.choose_method`: the zero-variance
    ``"exact"`` method when the network is linear in each weight (ReLU/max-pool/eval-BatchNorm
    networks) with few outputs, a sketched or sampled Gauss-Newton part when the network is big or the
    outputs are many, and for other networks the sketched Hessian diagonal (``"hessian_sketch"``) where
    its operation rules apply, else their Gauss-Newton diagonal; the choice, what it estimates
    (Hessian or Gauss-Newton diagonal) and why are reported once and kept in :attr:`history`
    (``"method"``). Each process cuts its share into at least ``num_replicates`` batches of at most
    ``batch_size`` samples; :class:`NormalizedSharpness` pools the batches (one replicate group
    each) and gives each measure a jackknife standard error (sample noise, and probe noise for the
    stochastic methods).

    **Failures**: anything that keeps the model from being measured (a batch that cannot be split,
    a loss that cannot be differentiated, an output without logits) raises in the dry run at fit
    start, before the first training step. A failure later (an estimator error at some epoch) is
    reported once as a warning and logged as NaN; training goes on.

    **Invisible to training**: the live model (weights, buffers, ``.grad``, modes, hooks), the
    optimizer and every global RNG stream (torch CPU/CUDA/MPS, NumPy, Python) are exactly as before;
    probes come from a private generator determined by ``(seed, evaluation, rank)``.

    **Logged keys** (``pl_module.log`` with ``sync_dist``; ``<p>`` is ``prefix``):

    - ``<p>/normalized``: normalized sharpness, eq. 17 (the key to monitor; lower is flatter);
    - ``<p>/matrix_normalized``: matrix-normalized sharpness, eq. 13;
    - ``<p>/hessian_trace``: trace of the Hessian, eq. 5, over every measured parameter: the weights
      and, by default, the biases and normalization parameters beside them (not invariant to
      rescaling; for comparison);
    - ``<p>/hessian_trace_weights``: the same trace over the weight tensors (``ndim >= 2``) alone,
      the tensors the normalized measures count;
    - ``<p>/<measure>_stderr``: jackknife standard errors;
    - ``<p>/normalized_half_shift``: how much the value rises when half of the samples and probes
      are used (a convergence diagnostic: for the stochastic methods a lower bound on the upward
      bias that probe noise causes, which the standard error does not include; a warning is given
      once when it exceeds twice the standard error or 5% of the value,
      :func:`~lightning_flatness.measure.not_converged_message`);
    - ``<p>/seconds``: wall time of the measurement (slowest process);
    - ``<p>/peak_memory_mb``: peak memory during the measurement (largest over processes): resident
      set size on CPU, CUDA allocation on a GPU, sampled every 5 ms
      (:class:`~lightning_flatness.memory.PeakMemory`);
    - ``<p>/<measure>/<parameter name>``: per tensor, named after its module path (e.g.
      ``sharpness/normalized/net.0.weight``); 1-D tensors (biases, normalization scales) have
      ``hessian_trace`` alone (footnote 5).

    Each logger also gets the per-layer values as a table (at every measurement) and a per-layer bar
    chart (with matplotlib; by default one, of the last measurement, at the end of training: see
    ``images_every_n_evaluations``) through its own API (:mod:`lightning_flatness.logger_media`):
    TensorBoard (plus a custom-scalars layout with the per-layer curves of each measure on one
    chart), W&B, MLflow and CSVLogger (files beside ``metrics.csv``). Without a logger the values still reach
    ``trainer.callback_metrics`` and :attr:`history`.

    **Cost** (``num_samples`` training samples per measurement): ``"exact"``: one forward and about
    ``K`` backward columns per sample for ``K`` outputs; ``"hutchinson"``: ``num_probes``
    Hessian-vector products per sample group (about ``2 * num_probes`` gradient evaluations);
    ``"ggn_hutchinson"``: both. Measured costs, in seconds and in training steps, per model and
    method: ``benchmarks/RESULTS.md``. Trade accuracy for time with ``num_samples`` (the sampling
    error falls like ``1 / sqrt(num_samples)``; it is the logged standard error for the exact
    method), ``num_probes`` and ``every_n_epochs``.

    **Accuracy**: the exact method has no probe noise; its standard error is the sampling error of
    the subset. Hutchinson's Hessian diagonal (and ``<p>/hessian_trace``) is unbiased, but the
    normalized measures are nonlinear in the diagonal (clipping, square roots, the minimum of eq.
    17), so probe noise biases them upwards, shrinking like ``1 / sqrt(num_probes)``.
    ``"ggn_hutchinson"`` probes only the difference between the Hessian and its Gauss-Newton part
    (computed exactly), which has far less noise near a minimum. The jackknife standard error does
    not include this bias; the logged ``<p>/normalized_half_shift`` bounds it from below (see
    :class:`NormalizedSharpness`) and a warning says when it exceeds twice the standard error or 5% of
    the value.
    Measured biases per method and probe count: ``benchmarks/RESULTS.md``. Compare stochastic
    values only at equal settings.

    Args:
        method: ``"auto"`` (default, see **How**) or a registered estimator
            (:data:`~lightning_flatness.functional.estimators.registry.ESTIMATORS`): ``"exact"``,
            ``"ggn_hutchinson"``, ``"hutchinson"``, ``"finite_difference"`` (the paper's Algorithm 1), ...
        num_samples: training samples in the fixed subset (default 512; all if the set is smaller).
        batch_size: at most this many samples per curvature batch (memory; default 128, or the training
            DataLoader's batch size where that is smaller); each process cuts its share into at least
            ``num_replicates`` batches, one replicate group each. By default, where the exact method takes
            several groups in one pass, a batch holds as many groups as that pass takes within its own
            bound on its backward columns and the layer inputs it holds (``exact_groups.
            ONE_PASS_COLUMN_ELEMENTS`` entries: tens of MB), learnt in the dry run at fit start; a given
            ``batch_size`` is kept.
        num_probes: Rademacher probes per sample for the stochastic methods (default 64).
        num_sketches: independent sketches of ``"gauss_newton_sketch"`` and ``"hessian_sketch"``
            (``None``: their default, 1 for up to 32 outputs): the cost grows linearly, the
            noise-driven bias of the normalized measures falls about like ``1 / num_sketches``
            (benchmarks/RESULTS.md, round 6).
        dataloader: measure on all batches of this iterable instead of a training subset (it is
            iterated at every evaluation; pass an unsharded loader under DDP). Its batches go through the
            batch-transfer hooks the LightningModule or datamodule overrides, as the training batches do.
        loss_fn: ``(logits, target) -> mean loss``; default
            :func:`~lightning_flatness.functional.normalized_softmax_cross_entropy`.
            ``nn.CrossEntropyLoss()`` and ``nn.NLLLoss()`` are read as their functional forms, and
            ``F.nll_loss`` on a model that ends in ``log_softmax`` as ``F.cross_entropy`` on its
            log-probabilities (:mod:`~lightning_flatness.functional.loss_forms`).
        parameters: which tensors count: ``None`` (the default of
            :func:`~lightning_flatness.functional.select_parameters`: every tensor with ``ndim >= 2``
            that requires grad except additive offsets such as position embeddings and class tokens,
            plus the biases and normalization parameters beside them, which enter the trace only;
            frozen ones are skipped, shared ones counted once), ``"weights"`` (every ``ndim >= 2``
            tensor), ``"all"`` (every parameter that requires grad), a list of names as in
            ``pl_module.named_parameters()``, or a predicate ``(name, parameter) -> bool``.
        lam: the ``lambda`` of eq. 17 (default 0.5).
        num_replicates: replicate groups for the jackknife standard error (default 8; 1 disables it).
        jackknife: ``"linearized"`` (default: the leave-one-out values of eq. 17 to first order at the
            pooled optimum where that holds) or ``"solved"`` (every one solved); see
            :class:`~lightning_flatness.metric.NormalizedSharpness`.
        every_n_epochs: measure at the end of every ``n``-th epoch's validation (in a fit without a
            validation loop, at the end of every ``n``-th training epoch).
        dtype: ``"float32"`` (default) or ``"float64"``: precision of the curvature computation. A batch
            whose curvature overflows float32 while its loss is finite (tiny logits at initialisation) is
            estimated in float64 anyway, with one warning per fit.
        seed: seed of the subset and the probes; ``None`` draws one (kept in the state).
        prefix: prefix of the logged keys (two monitors need two prefixes).
        log_per_layer: log the per-layer values (scalars, the per-layer table, the TensorBoard layout).
        log_images: log the per-layer bar chart of normalized sharpness to every logger.
        images_every_n_evaluations: when to draw that chart (matplotlib; a chart can cost more than
            the measurement of a small network, ``benchmarks/results/bench_callback_overhead.md``):
            ``None`` (default) draws one chart, of the last measurement, at the end of training
            (``on_train_end``, logged at that measurement's step); ``n`` draws the chart of the
            1st, ``(n+1)``-th, ... measurement when it is made, and the last one at the end of
            training if it was not drawn (``1``: every measurement). Under ``trainer.validate()``
            every measurement is drawn. Scalars and the per-layer table go out at every measurement.
        prog_bar: show ``<p>/normalized`` in the progress bar.
        relative_step: step of ``"finite_difference"`` relative to each tensor's RMS entry.

    Attributes:
        history: one dict per measurement (``epoch``, ``global_step``, ``method``, ``seconds`` and all
            values), saved in checkpoints. Kept by the processes that run the fit: a fit that Lightning
            launches in new processes (``strategy="ddp_spawn"``, ``"ddp_fork"``, ``"ddp_notebook"``) leaves
            the launching process's monitor without it, since Lightning sends back only
            ``trainer.callback_metrics`` (the last values); the logger keeps the curves.

    Raises:
        ValueError, TypeError: invalid arguments (at construction); no measurable weights, no or empty
            training data, or a batch :meth:`split_batch` cannot split (before training starts).

    Example:
        >>> import torch, pytorch_lightning as pl
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> class Lit(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         layers = [torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)]
        ...         self.net = torch.nn.Sequential(*layers)
        ...     def forward(self, x):
        ...         return self.net(x)
        ...     def training_step(self, batch, _):
        ...         return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])
        ...     def validation_step(self, batch, _):
        ...         pass
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
        >>> data = DataLoader(TensorDataset(x, y), batch_size=16)
        >>> monitor = SharpnessMonitor(num_samples=32)
        >>> trainer = pl.Trainer(max_epochs=2, callbacks=[monitor], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Lit(), data, data)
        >>> len(monitor.history), monitor.history[-1]["method"], monitor.history[-1]["num_samples"]
        (2, 'exact', 32.0)
        >>> "sharpness/normalized" in trainer.callback_metrics
        True
    """
