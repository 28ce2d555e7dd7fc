"""Reentrant activation checkpointing run as plain calls during a measurement.

``torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=True)`` (what an unset ``use_reentrant`` still
means, with a warning, and what older code, DeepSpeed and ``checkpoint_sequential`` callers pass) runs ``fn``
under ``no_grad`` inside a custom autograd Function and recomputes it in that Function's backward, with
``backward()`` on its own. That breaks every estimator of a measurement: ``torch.autograd.grad`` through such
a Function raises ("incompatible with .grad()"), and where no input of ``fn`` requires grad (a checkpointed
first block), its weights get no gradient at all: a curvature of exactly 0, measured without an error.

:func:`checkpoints_run_directly` makes ``CheckpointFunction.apply(fn, preserve_rng_state, *args)`` return
``fn(*args)`` for the duration of a block: the same values (the network is in eval mode, where
checkpointing changes no value; the RNG-state handling matters for dropout in training only), differentiable
by the estimators, which keep the activations anyway. The non-reentrant variant (``use_reentrant=False``)
works with ``torch.autograd.grad`` and is left as it is. Training, outside the block, checkpoints as
configured.

The replacement is process-wide, like :func:`~lightning_flatness.functional.model_io.model_autocast_disabled`:
a checkpoint another Python thread runs during the block runs directly too. Nested blocks only count.
Cost: none per operation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch.utils import checkpoint as _checkpoint

__all__ = ["checkpoints_run_directly"]

_depth = 0


def _direct(cls: Any, run_function: Any, preserve_rng_state: bool, *args: Any) -> Any:
    return run_function(*args)


@contextlib.contextmanager
def checkpoints_run_directly() -> Iterator[None]:
    """Within the block, reentrant ``torch.utils.checkpoint`` calls run their function directly (module
    docstring); restored on exit, also on error.

    Example:
        >>> import torch
        >>> from torch.utils.checkpoint import checkpoint
        >>> layer = torch.nn.Linear(2, 1)
        >>> with checkpoints_run_directly():
        ...     out = checkpoint(layer, torch.ones(1, 2), use_reentrant=True)
        >>> [g.shape for g in torch.autograd.grad(out.sum(), [layer.weight])]  # .grad() works inside
        [torch.Size([1, 2])]
    """
    global _depth
    if _depth:
        yield
        return
    cls = _checkpoint.CheckpointFunction
    own = cls.__dict__.get("apply")  # None: the inherited Function.apply
    _depth += 1
    cls.apply = classmethod(_direct)
    try:
        yield
    finally:
        if own is None:
            del cls.apply
        else:
            cls.apply = own
        _depth -= 1
