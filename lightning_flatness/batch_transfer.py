"""The monitor's batches as ``training_step`` receives them: Lightning's batch-transfer hooks applied.

Lightning hands every batch through three hooks before ``training_step``: ``on_before_batch_transfer``,
``transfer_batch_to_device`` and ``on_after_batch_transfer``, defined by the LightningModule or by the
datamodule (whose override wins, as in Lightning). Users normalise, reshape or cast inputs there (the
documented place for GPU-side transforms). The monitor fetches its samples itself (dataset and collate
function, :mod:`~lightning_flatness.training_subset`), so without these hooks it would measure the
network on inputs training never sees. :func:`as_training_step_gets_it` applies the overridden ones, in
Lightning's order, with ``dataloader_idx=0``; where none is overridden the batch is returned as it is.

The hooks run as in validation, where the monitor measures: with ``trainer.training`` False (the trainer's
stage is set to validating for the calls where it was training: the dry run at fit start, a fit without
validation measured at the end of its training epochs), so a hook that augments only ``if
self.trainer.training`` (Lightning's documented pattern) does not augment the measured batches, as it does
not augment validation batches; its other transforms apply. Called right after a batch is fetched, within
the monitor's seeded random streams, so random draws in a hook are fixed per chunk like those of the dataset.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch

__all__ = ["BATCH_HOOKS", "as_training_step_gets_it", "hook_owner"]

#: The batch-transfer hooks, in the order Lightning calls them.
BATCH_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")

_LIGHTNING_PACKAGES = ("pytorch_lightning.", "lightning.pytorch.", "lightning.fabric.")


def _overrides(obj: Any, name: str) -> bool:
    """Whether the class of ``obj`` (or a base of it outside Lightning) defines ``name``: in either namespace,
    ``pytorch_lightning`` or ``lightning.pytorch``."""
    for klass in type(obj).__mro__:
        if name in vars(klass):
            return not klass.__module__.startswith(_LIGHTNING_PACKAGES)
    return False


def hook_owner(trainer: Any, pl_module: Any, name: str) -> Optional[Any]:
    """The object whose override of hook ``name`` Lightning calls: the datamodule's if it overrides it, else
    the LightningModule's; None when neither does."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and _overrides(datamodule, name):
        return datamodule
    if _overrides(pl_module, name):
        return pl_module
    return None


def as_training_step_gets_it(trainer: Any, pl_module: Any, batch: Any, device: torch.device) -> Any:
    """``batch`` through the overridden batch-transfer hooks of ``pl_module`` and ``trainer.datamodule``, in
    Lightning's order (the default ``transfer_batch_to_device`` moves it to ``device`` where only another hook
    is overridden); ``batch`` itself where none is. A few Python calls where none is overridden."""
    before, transfer, after = (hook_owner(trainer, pl_module, name) for name in BATCH_HOOKS)
    if before is None and transfer is None and after is None:
        return batch
    with _validating(trainer):
        if before is not None:
            batch = before.on_before_batch_transfer(batch, 0)
        batch = (transfer if transfer is not None else pl_module).transfer_batch_to_device(batch, device, 0)
        if after is not None:
            batch = after.on_after_batch_transfer(batch, 0)
    return batch


@contextmanager
def _validating(trainer: Any) -> Iterator[None]:
    """The trainer's stage set to validating where it is training (Lightning's ``RunningStage``, either
    namespace), put back on exit: what a hook sees of the trainer in validation."""
    state = getattr(trainer, "state", None)
    stage = getattr(state, "stage", None)
    if getattr(stage, "value", None) != "train":
        yield
        return
    state.stage = type(stage).VALIDATING
    try:
        yield
    finally:
        state.stage = stage
