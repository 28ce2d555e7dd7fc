"""SharpnessMonitor in fits without a validation loop: measured at the end of every training epoch.

Lightning runs no validation without a ``val_dataloader``, without ``validation_step``, with
``limit_val_batches=0``, or when the validation loader has no batches; the monitor, which measures at the end
of validation, then measures in ``on_train_epoch_end``. The values are checked against the brute-force
Hessian measures of the final weights (``oracles.brute_force_measures``), training against the run without the
monitor, and early stopping and checkpointing against the logged curve.
"""

from __future__ import annotations

import logging
import math

import pytest
import pytorch_lightning as pl
import torch
from callback_models import MLP, DataModule, assert_same_training_state, quiet_trainer, training_state
from oracles import brute_force_measures
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_flatness.callback import SharpnessMonitor


class TrainOnlyData(DataModule):
    """The test data module without ``val_dataloader``."""

    val_dataloader = pl.LightningDataModule.val_dataloader


class EmptyValidationData(DataModule):
    """A validation loader without batches."""

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long)), batch_size=4)


class MLPWithoutValidationStep(MLP):
    validation_step = pl.LightningModule.validation_step


class ModesAfterTheMonitor(pl.Callback):
    """Records, after the monitor's ``on_train_epoch_end``, whether every module is in train mode."""

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen.append(all(m.training for m in pl_module.modules()))


NO_VALIDATION = {
    "limit_val_batches=0": (MLP, DataModule, dict(limit_val_batches=0)),
    "no val_dataloader": (MLP, TrainOnlyData, {}),
    "no validation_step": (MLPWithoutValidationStep, DataModule, {}),
    "empty validation loader": (MLP, EmptyValidationData, {}),
}


@pytest.mark.filterwarnings("ignore:.*(val_dataloader|validation_step|zero|does not have many workers).*")
@pytest.mark.parametrize("case", list(NO_VALIDATION))
def test_a_fit_without_validation_is_measured_at_the_end_of_every_training_epoch(case, caplog):
    module_class, data_class, trainer_kwargs = NO_VALIDATION[case]
    monitor = SharpnessMonitor(num_samples=64, dtype="float64", batch_size=32)
    modes = ModesAfterTheMonitor()
    pl.seed_everything(0, verbose=False)
    model, data = module_class(), data_class()
    trainer = quiet_trainer([monitor, modes], max_epochs=3, **trainer_kwargs)
    with caplog.at_level(logging.INFO, logger=SharpnessMonitor._logger_name):
        trainer.fit(model, data)
    assert [h["epoch"] for h in monitor.history] == [0, 1, 2]
    assert [h["global_step"] for h in monitor.history] == [8, 16, 24]  # 256 samples in batches of 32
    said = [r.getMessage() for r in caplog.records if "no validation loop" in r.getMessage()]
    assert len(said) == 1 and "end of every training epoch" in said[0]
    # the last measurement is of the final weights, on the monitor's subset of the training set
    idx = monitor.subset_indices
    x, y = data.train_set.tensors[0][idx], data.train_set.tensors[1][idx]
    reference = brute_force_measures(model, x, y)
    for key in ("normalized", "matrix_normalized", "hessian_trace", "normalized/net.0.weight"):
        assert math.isclose(monitor.history[-1][key], reference[key], rel_tol=1e-10), key
    logged = trainer.callback_metrics["sharpness/normalized"]
    assert float(logged) == pytest.approx(monitor.history[-1]["normalized"], rel=1e-12)
    assert modes.seen == [True] * 3  # the measurement (in eval mode) put train mode back


def test_every_n_epochs_counts_training_epochs_without_validation():
    monitor = SharpnessMonitor(num_samples=32, every_n_epochs=2)
    pl.seed_everything(0, verbose=False)
    quiet_trainer([monitor], max_epochs=5, limit_val_batches=0).fit(MLP(), DataModule())
    assert [h["epoch"] for h in monitor.history] == [1, 3]


def test_with_validation_the_training_epoch_end_measures_nothing():
    monitor = SharpnessMonitor(num_samples=32)
    pl.seed_everything(0, verbose=False)
    quiet_trainer([monitor], max_epochs=2).fit(MLP(), DataModule())
    assert [h["epoch"] for h in monitor.history] == [0, 1]  # one measurement per epoch, not two


def test_training_without_validation_is_bit_identical_with_and_without_the_monitor():
    states = {}
    for name, callbacks in [("without", []), ("with", [SharpnessMonitor(num_samples=64)])]:
        pl.seed_everything(0, verbose=False)
        model = MLP(batchnorm=True, dropout=0.3)
        trainer = quiet_trainer(callbacks, max_epochs=3, limit_val_batches=0)
        trainer.fit(model, DataModule(augment=True))
        states[name] = training_state(model, trainer)
        if callbacks:
            assert len(callbacks[0].history) == 3
    assert_same_training_state(states["with"], states["without"])


@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
def test_early_stopping_and_checkpointing_listed_first_see_the_epoch_value_without_validation(tmp_path):
    """``EarlyStopping`` and ``ModelCheckpoint`` before the monitor in ``callbacks=``: Lightning runs them
    after the other callbacks' ``on_train_epoch_end``, so they read each epoch's value (``strict=True``
    would raise on a missing key)."""
    stopping = EarlyStopping(monitor="sharpness/normalized", mode="min", patience=10, strict=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="sharpness/normalized", mode="min", save_top_k=1)
    monitor = SharpnessMonitor(num_samples=32)
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer(
        [stopping, checkpoint, monitor], max_epochs=4, limit_val_batches=0, enable_checkpointing=True
    )
    trainer.fit(MLP(lr=0.5), DataModule())
    values = [h["normalized"] for h in monitor.history]
    assert len(values) == 4
    best = min(range(4), key=values.__getitem__)
    assert float(checkpoint.best_model_score) == pytest.approx(values[best], rel=1e-6)
    assert f"epoch={best}-" in checkpoint.best_model_path
    assert float(stopping.best_score) == pytest.approx(values[best], rel=1e-6)
