"""What holds while a measurement runs the model, entered in one place.

For the duration of a block, and put back exactly on exit (also on error):

- code compiled with ``torch.compile`` runs eagerly
  (:func:`~lightning_flatness.functional.model_io.compiled_code_eager`: nothing compiled, the training
  run's compile cache untouched);
- ``torch.autocast`` contexts entered by the model's own code run disabled
  (:func:`~lightning_flatness.functional.model_io.model_autocast_disabled`: the full-precision network);
- eval-mode caches of tensors derived from the parameters miss
  (:func:`~lightning_flatness.functional.module_caches.recomputed_caches`: the estimators see the bias
  tables they differentiate);
- module backward hooks are suspended
  (:func:`~lightning_flatness.functional.backward_hooks.backward_hooks_suspended`: they would see the
  estimators' columns as gradients);
- embedding tables with ``max_norm`` hold their renormalised rows and do not renormalise
  (:func:`~lightning_flatness.functional.embedding_renorm.renormalised_tables`: their ``forward`` would
  change the live table);
- reentrant activation checkpointing (``torch.utils.checkpoint(..., use_reentrant=True)``) runs its
  function directly (:func:`~lightning_flatness.functional.reentrant_checkpoint.checkpoints_run_directly`:
  the estimators' ``torch.autograd.grad`` cannot pass it);
- the buffers the model's forward updates (BatchNorm's running statistics in training mode,
  quantization observers in any mode) go back to their values on exit, and fake-quantization observers
  are paused (:func:`~lightning_flatness.functional.buffer_snapshot.buffers_restored`);
- the plain attributes that carry tensor state from call to call (a stateful recurrent network's hidden
  state, kept features), and the attributes rebound beside them, go back to their objects on exit
  (:func:`~lightning_flatness.functional.module_attributes.attributes_restored`).

On a normal exit it checks that no parameter was changed in place meanwhile (a ``forward`` that writes
to its weights, e.g. ``F.embedding(..., max_norm=)`` called directly): a measurement must leave the
weights as it found them, so such a change raises :class:`ParametersChangedInPlace` naming the tensors.

The estimators' front door (``hessian_diagonal_groups``), ``choose_method``, ``SharpnessMeasurement`` and the
callback's ``measurement_view`` enter it; a nested block for the same model enters nothing more.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any, Callable, TypeVar

from torch import Tensor, nn

from lightning_flatness.functional.backward_hooks import backward_hooks_suspended
from lightning_flatness.functional.buffer_snapshot import buffers_restored
from lightning_flatness.functional.embedding_renorm import renormalised_tables
from lightning_flatness.functional.model_io import compiled_code_eager, model_autocast_disabled
from lightning_flatness.functional.module_attributes import attributes_restored
from lightning_flatness.functional.module_caches import recomputed_caches
from lightning_flatness.functional.module_walk import walked_once, walking
from lightning_flatness.functional.reentrant_checkpoint import checkpoints_run_directly

__all__ = ["ParametersChangedInPlace", "in_measurement_context", "measurement_context"]

F = TypeVar("F", bound=Callable[..., Any])


class ParametersChangedInPlace(RuntimeError):
    """The model changed some of its parameters in place while a measurement ran it."""


def _versions(modules: list[nn.Module]) -> list[tuple[Tensor, int]]:
    """``(parameter, its version counter)`` for the plain-tensor parameters of ``modules``."""
    return [
        (p, p._version)
        for m in modules
        for p in m._parameters.values()
        if (type(p) is nn.Parameter or type(p) is Tensor) and not p.is_inference()  # (no version counter)
    ]


def _check_unchanged(model: nn.Module, versions: list[tuple[Tensor, int]]) -> None:
    if all(p._version == version for p, version in versions):
        return
    changed_ids = {id(p) for p, version in versions if p._version != version}
    changed = [name for name, p in model.named_parameters() if id(p) in changed_ids]
    raise ParametersChangedInPlace(
        f"the model changed {len(changed)} of its parameters in place while the measurement ran its "
        f"forward: {changed[:5]}. A measurement must leave the weights as it found them, so it stops "
        "here; the values of these tensors have changed. Typical cause: a forward that writes to its "
        "weights (F.embedding(..., max_norm=) called directly: use nn.Embedding(max_norm=), which the "
        "measurement handles; a clamp_ or renorm_ of a weight). Move the change out of forward (e.g. "
        "into on_before_optimizer_step / on_train_batch_end), or measure the model without it."
    )


@contextlib.contextmanager
def measurement_context(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` is run as a measurement runs it (module docstring). A block nested in one
    for the same model (``SharpnessMeasurement.add`` -> ``hessian_diagonal_groups``) enters nothing more."""
    if walking(model):  # inside a measurement of this model already: its walk is open
        yield model
        return
    with (
        walked_once(model) as modules,
        compiled_code_eager(),
        model_autocast_disabled(),
        checkpoints_run_directly(),
        recomputed_caches(model),
        backward_hooks_suspended(model),
        renormalised_tables(model),
        buffers_restored(model),
        attributes_restored(model),
    ):
        versions = _versions(modules)
        yield model
        _check_unchanged(model, versions)


def in_measurement_context(function: F) -> F:
    """``function(model, ...)`` run inside :func:`measurement_context` of its first argument."""

    @functools.wraps(function)
    def wrapper(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with measurement_context(model):
            return function(model, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
