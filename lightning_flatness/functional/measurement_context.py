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
  estimators' columns as gradients).

The estimators' front door (``hessian_diagonal_groups``), ``choose_method``, ``SharpnessMeasurement`` and the
callback's ``measurement_view`` enter it; a nested block for the same model enters nothing more.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any, Callable, TypeVar

from torch import nn

from lightning_flatness.functional.backward_hooks import backward_hooks_suspended
from lightning_flatness.functional.model_io import compiled_code_eager, model_autocast_disabled
from lightning_flatness.functional.module_caches import recomputed_caches

__all__ = ["in_measurement_context", "measurement_context"]

F = TypeVar("F", bound=Callable[..., Any])


_ENTERED: set[int] = set()  # ids of the models inside a measurement context (nested blocks enter nothing)


@contextlib.contextmanager
def measurement_context(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` is run as a measurement runs it (module docstring). A block nested in one
    for the same model (``SharpnessMeasurement.add`` -> ``hessian_diagonal_groups``) enters nothing more."""
    if id(model) in _ENTERED:
        yield model
        return
    _ENTERED.add(id(model))
    try:
        with (
            compiled_code_eager(),
            model_autocast_disabled(),
            recomputed_caches(model),
            backward_hooks_suspended(model),
        ):
            yield model
    finally:
        _ENTERED.discard(id(model))


def in_measurement_context(function: F) -> F:
    """``function(model, ...)`` run inside :func:`measurement_context` of its first argument."""

    @functools.wraps(function)
    def wrapper(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with measurement_context(model):
            return function(model, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
