"""Batches normalised in Lightning's batch-transfer hooks (``on_before_batch_transfer``,
``on_after_batch_transfer``, of the LightningModule or of the datamodule): the monitor measures the inputs
``training_step`` gets, the same values as a dataset normalised beforehand; an augmentation the hook applies
only in training does not reach the measurement, as it does not reach validation."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from callback_models import Wrapped, assert_same_training_state, quiet_trainer, training_state
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_flatness import SharpnessMonitor
from lightning_flatness.batch_transfer import as_training_step_gets_it, hook_owner

SHIFT, SCALE = 3.0, 5.0  # raw inputs are normalised as (x - SHIFT) / SCALE before the network sees them


def _raw() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = SHIFT + SCALE * torch.randn(64, 5, generator=g)
    return TensorDataset(x, torch.randint(0, 3, (64,), generator=g))


def _normalised() -> TensorDataset:
    x, y = _raw().tensors
    return TensorDataset((x - SHIFT) / SCALE, y)


def _normalise(batch):
    x, y = batch
    return (x - SHIFT) / SCALE, y


class Still(Wrapped):
    """Trained with a learning rate of 0: one network at every measurement, whatever the training batches."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class AfterTransfer(Wrapped):
    """Normalises in ``on_after_batch_transfer``, and jitters the inputs there in training only."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = _normalise(batch)
        if self.trainer.training:
            x = x + 0.1 * torch.randn_like(x)
        return x, y


class BeforeTransferData(pl.LightningDataModule):
    """A datamodule whose ``on_before_batch_transfer`` normalises the raw batches."""

    def train_dataloader(self):
        return DataLoader(_raw(), batch_size=8, shuffle=True)

    def val_dataloader(self):
        return DataLoader(_raw(), batch_size=8)

    def on_before_batch_transfer(self, batch, dataloader_idx):
        return _normalise(batch)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))


class StillAfterTransfer(AfterTransfer, Still):
    pass


def _fit(kind: str, monitor: bool = True, still: bool = True, validation: bool = True):
    pl.seed_everything(0, verbose=False)
    callbacks = [SharpnessMonitor(num_samples=32, num_replicates=2)] if monitor else []
    trainer = quiet_trainer(callbacks, max_epochs=2, **({} if validation else {"limit_val_batches": 0}))
    wrapped = Still if still else Wrapped
    if kind == "module hook":
        module = (StillAfterTransfer if still else AfterTransfer)(_net())
        trainer.fit(module, DataLoader(_raw(), batch_size=8, shuffle=True), DataLoader(_raw(), batch_size=8))
    elif kind == "datamodule hook":
        module = wrapped(_net())
        trainer.fit(module, datamodule=BeforeTransferData())
    else:  # the same inputs, normalised in the dataset
        module = wrapped(_net())
        trainer.fit(
            module,
            DataLoader(_normalised(), batch_size=8, shuffle=True),
            DataLoader(_normalised(), batch_size=8),
        )
    return (callbacks[0].history if monitor else None), training_state(module, trainer)


def test_the_hooks_are_found_where_lightning_finds_them():
    trainer = quiet_trainer([], max_epochs=1)
    module = AfterTransfer(_net())
    assert hook_owner(trainer, module, "on_after_batch_transfer") is module
    assert hook_owner(trainer, module, "on_before_batch_transfer") is None
    assert hook_owner(trainer, Wrapped(_net()), "transfer_batch_to_device") is None
    batch = (torch.ones(2, 5), torch.zeros(2, dtype=torch.long))
    assert as_training_step_gets_it(trainer, Wrapped(_net()), batch, torch.device("cpu")) is batch  # no hook


@pytest.mark.parametrize("validation", [True, False], ids=["at validation", "at the training epoch's end"])
@pytest.mark.parametrize("kind", ["module hook", "datamodule hook"])
def test_batches_normalised_in_the_transfer_hooks_are_measured_as_training_step_gets_them(kind, validation):
    """Measured at the end of validation, or of the training epoch in a fit without validation: either way the
    hooks run as in validation (``trainer.training`` False), so the jitter of training stays out."""
    ours, _ = _fit(kind, validation=validation)
    reference, _ = _fit("normalised dataset", validation=validation)
    keys = ["normalized", "normalized_stderr", "hessian_trace"]
    assert len(ours) == 2 and ours[0]["normalized"] > 0
    for mine, theirs in zip(ours, reference):  # one network (lr 0); no training jitter in the measurement
        for key in keys:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6), key


@pytest.mark.parametrize("validation", [True, False], ids=["at validation", "at the training epoch's end"])
def test_training_is_bit_identical_with_a_hook_that_draws_random_numbers(validation):
    _, with_monitor = _fit("module hook", still=False, validation=validation)
    _, without = _fit("module hook", monitor=False, still=False, validation=validation)
    assert_same_training_state(with_monitor, without)


class NormalisesInTrainingStep(Still):
    """Normalises (``"normalise"``) or jitters by a few percent (``"jitter"``) in ``training_step``, before
    calling the network."""

    def __init__(self, net: nn.Module, transform: str) -> None:
        super().__init__(net)
        self.transform = transform

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = _normalise((x, y))[0] if self.transform == "normalise" else x * (1 + 0.05 * torch.randn_like(x))
        return torch.nn.functional.cross_entropy(self(x), y)


@pytest.mark.parametrize("transform", ["normalise", "jitter"])
def test_a_transform_in_training_step_that_the_monitor_cannot_see_is_named(transform):
    import warnings

    pl.seed_everything(0, verbose=False)
    monitor = SharpnessMonitor(num_samples=16, num_replicates=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer([monitor], max_epochs=1).fit(
            NormalisesInTrainingStep(_net(), transform),
            DataLoader(_raw(), batch_size=8),
            DataLoader(_raw(), batch_size=8),
        )
    said = [str(w.message) for w in caught if "differ between training" in str(w.message)]
    if transform == "jitter":  # an augmentation of a few percent is not a transform the monitor misses
        assert said == []
        return
    assert len(said) == 1 and "on_after_batch_transfer" in said[0]
    # the statistics it names, computed here from the data: the first training batch (no shuffling) as
    # training_step normalises it, the dry run's first samples of the monitor's subset as they are
    x = _raw().tensors[0].to(torch.float64)
    trained, measured = (x[:8] - SHIFT) / SCALE, x[monitor.subset_indices[:4]]
    assert (
        f"'input' has mean {float(trained.mean()):.3g} and standard deviation {float(trained.std()):.3g} "
        f"in training_step's call, {float(measured.mean()):.3g} and {float(measured.std()):.3g} in the "
        "monitor's batch"
    ) in said[0]


def test_inputs_transformed_in_the_hooks_are_not_named():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit("module hook")
        _fit("datamodule hook")
    assert not [w for w in caught if "differ between training" in str(w.message)]


def test_input_differences_name_scale_offset_and_kind():
    from lightning_flatness.input_check import InputSummary, input_differences, summarize

    images = torch.rand(4, 3, 8, 8)
    assert input_differences(summarize(images), summarize(images * 1.1)) == []  # an augmentation's change
    assert input_differences(summarize(images), summarize(images * 255)) != []  # a scaling
    assert input_differences(summarize(images), summarize(images + 3.0)) != []  # an offset
    ids = {"input_ids": torch.randint(0, 9, (4, 5)), "pixel_values": images}
    assert input_differences(summarize(ids), summarize(ids)) == []
    kinds = input_differences({"input": InputSummary(False)}, summarize(images))
    assert kinds == ["'input' is integer in training_step's call and floating point in the monitor's batch"]
