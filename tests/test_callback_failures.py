"""A measurement never stops a training run: failures surface in the dry run at fit start, or are
logged as NaN with a warning later while training goes on."""

from __future__ import annotations

import math
from typing import Optional

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from callback_models import MLP, DataModule, quiet_trainer
from out_of_memory import OutOfMemoryAbove

from lightning_flatness import SharpnessMonitor


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fit(monitor, model=None, max_epochs=3):
    pl.seed_everything(0, verbose=False)
    model = model or MLP()
    trainer = quiet_trainer([monitor], max_epochs=max_epochs)
    trainer.fit(model, DataModule())
    return trainer, model


class _BreaksAfter:
    """A loss that works for ``calls`` calls, then raises ``error`` (an estimator failure mid-run)."""

    def __init__(self, calls: int, error: Optional[Exception] = None) -> None:
        self.calls, self.count = calls, 0
        self.error = error if error is not None else RuntimeError("simulated estimator failure")

    def __call__(self, logits, target):
        self.count += 1
        if self.count > self.calls:
            raise self.error
        return F.cross_entropy(logits, target)


def _fit_breaking_after_epoch_0(loss: _BreaksAfter, monitor: SharpnessMonitor) -> tuple:
    class _Break(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                loss.calls = loss.count  # from epoch 1 on every call raises

    pl.seed_everything(0, verbose=False)
    model = MLP()
    trainer = quiet_trainer([monitor, _Break()], max_epochs=3)
    trainer.fit(model, DataModule())
    return trainer, model


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
    ],
)
def test_a_measurement_out_of_memory_even_on_single_samples_says_to_measure_less(error):
    """Out of memory (CUDA's error, or the CPU allocator's) at every size: the batches are halved down to
    single samples, then the warning says to measure fewer weights or replicates instead of asking for a
    report; training goes on."""
    loss = _BreaksAfter(calls=10**9, error=error)
    monitor = SharpnessMonitor(num_samples=32, method="exact", loss_fn=loss, batch_size=16)
    with pytest.warns(UserWarning, match="It ran out of memory .* pass fewer `parameters=`"):
        trainer, model = _fit_breaking_after_epoch_0(loss, monitor)
    assert trainer.current_epoch == 3 and model.training_steps == 24
    assert math.isnan(monitor.history[-1]["normalized"])


def test_curvature_batches_out_of_memory_are_measured_in_pieces_from_then_on():
    """Curvature batches of 16 samples (128 in 8 batches) run out of memory above 4: the first measurement
    halves its first batch twice and measures in pieces of 4, the later ones start there (no failing
    attempt); one warning; every value equal to a monitor measuring in batches of 16 within memory."""
    loss = OutOfMemoryAbove(4, F.cross_entropy)
    monitor = SharpnessMonitor(num_samples=128, method="exact", loss_fn=loss, batch_size=16)
    with pytest.warns(UserWarning, match="batch of 16 samples ran out of memory; .* pieces of at most 4"):
        trainer, _ = _fit(monitor)
    assert loss.raised == 2 and len(monitor.history) == 3
    within = SharpnessMonitor(num_samples=128, method="exact", loss_fn=F.cross_entropy, batch_size=16)
    _fit(within)
    for ours, theirs in zip(monitor.history, within.history):
        for key in ("normalized", "normalized_stderr", "hessian_trace"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key


def test_estimator_failure_mid_training_logs_nan_warns_once_and_training_goes_on():
    loss = _BreaksAfter(calls=10**9)  # the dry run and the first measurement work
    monitor = SharpnessMonitor(num_samples=32, method="exact", loss_fn=loss)
    match = "measurement failed at epoch 1 .*simulated estimator failure.* Please report it"
    with pytest.warns(UserWarning, match=match):
        trainer, model = _fit_breaking_after_epoch_0(loss, monitor)
    assert trainer.current_epoch == 3 and model.training_steps == 24  # every epoch trained
    assert math.isfinite(monitor.history[0]["normalized"])
    assert all(math.isnan(h["normalized"]) for h in monitor.history[1:])
    assert math.isnan(float(trainer.callback_metrics["sharpness/normalized"]))


def test_a_model_that_cannot_be_measured_fails_at_fit_start_before_any_training_step():
    def broken(logits, target):
        raise RuntimeError("this loss cannot be differentiated")

    model = MLP()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(
        RuntimeError, match=r"cannot measure MLP \(dry run .*this loss cannot be differentiated"
    ):
        _fit(SharpnessMonitor(num_samples=32, loss_fn=broken), model=model)
    assert model.training_steps == 0
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


class _ConvertsInTrainingStep(pl.LightningModule):
    """Images stored as uint8, converted in ``training_step`` (the network never sees them as they are)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 3)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0].float() / 255), batch[1])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_integer_images_converted_in_training_step_fail_the_dry_run_with_where_to_convert_them():
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    images = (torch.rand(32, 3, 8, 8, generator=g) * 255).to(torch.uint8)
    data = TensorDataset(images, torch.randint(0, 3, (32,), generator=g))
    trainer = quiet_trainer([SharpnessMonitor(num_samples=16)], max_epochs=1)
    with pytest.raises(
        RuntimeError, match=r"integer tensor \(uint8 \(4, 3, 8, 8\)\).*`on_after_batch_transfer`"
    ):
        trainer.fit(_ConvertsInTrainingStep(), DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    assert trainer.global_step == 0
