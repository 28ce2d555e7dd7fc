"""A training set whose ``__getitem__`` augments at random: the monitor's fixed subset gets the same draws at
every measurement (the measured inputs are fixed, the curve moves with the weights only), and training's
random streams are left as they were."""

from __future__ import annotations

import random

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from callback_models import Wrapped, assert_same_training_state, quiet_trainer, training_state
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_flatness import SharpnessMonitor


class Augmented(Dataset):
    """64 samples of 5 features, each fetch jittered by torch, NumPy and ``random`` draws (as random crops,
    albumentations and hand-written flips draw)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        jitter = 0.3 * torch.randn(5) + float(np.random.uniform(-0.2, 0.2)) + random.uniform(-0.2, 0.2)
        return self.x[i] + jitter, self.y[i]


class Frozen(Wrapped):
    """Trained with a learning rate of 0: the weights never move, so every measurement sees one network."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(module_cls, with_loader: bool, monitor: bool = True):
    pl.seed_everything(0, verbose=False)
    data = Augmented()
    loader = DataLoader(data, batch_size=8, shuffle=True)
    callbacks = []
    if monitor:
        own = DataLoader(data, batch_size=16, shuffle=True) if with_loader else None
        callbacks = [SharpnessMonitor(num_samples=32, dataloader=own, num_replicates=2)]
    module = module_cls(nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)))
    trainer = quiet_trainer(callbacks, max_epochs=3)
    trainer.fit(module, loader, DataLoader(data, batch_size=8))
    return (callbacks[0].history if monitor else None), training_state(module, trainer)


@pytest.mark.parametrize("with_loader", [False, True], ids=["training subset", "own dataloader"])
def test_augmented_samples_get_the_same_draws_at_every_measurement(with_loader):
    history, _ = _fit(Frozen, with_loader)
    values = [entry["normalized"] for entry in history]
    assert len(values) == 3 and values[0] > 0
    assert values[1] == values[0] and values[2] == values[0]  # one network, one set of inputs: one value


def test_augmented_training_is_bit_identical_with_and_without_the_monitor():
    _, with_monitor = _fit(Wrapped, with_loader=False)
    _, without = _fit(Wrapped, with_loader=False, monitor=False)
    assert_same_training_state(with_monitor, without)
