"""Tiny LightningModules, data and a brute-force reference for the SharpnessMonitor tests (a module of
its own so that DDP worker processes can import what they unpickle)."""

from __future__ import annotations

import random

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

IN_FEATURES, NUM_CLASSES = 10, 3


def make_dataset(num_samples: int = 256, seed: int = 0) -> TensorDataset:
    """Inputs ``(N, 10)`` and labels of a random linear teacher, from a private generator."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, IN_FEATURES, generator=g)
    teacher = torch.randn(IN_FEATURES, NUM_CLASSES, generator=g)
    y = (x @ teacher + 0.5 * torch.randn(num_samples, NUM_CLASSES, generator=g)).argmax(1)
    return TensorDataset(x, y)


class AugmentedDataset(Dataset):
    """Adds noise drawn from torch's, NumPy's and Python's global generators at every access."""

    def __init__(self, base: TensorDataset) -> None:
        self.base, self.tensors = base, base.tensors

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        noise = 0.01 * torch.randn(x.shape) + 0.01 * float(np.random.rand()) + 0.01 * random.random()
        return x + noise, y


class DataModule(pl.LightningDataModule):
    def __init__(
        self, num_samples: int = 256, batch_size: int = 32, shuffle: bool = True, augment: bool = False
    ) -> None:
        super().__init__()
        self.num_samples, self.batch_size = num_samples, batch_size
        self.shuffle, self.augment = shuffle, augment

    def setup(self, stage: str) -> None:
        self.train_set = make_dataset(self.num_samples, seed=0)
        if self.augment:
            self.train_set = AugmentedDataset(self.train_set)
        self.val_set = make_dataset(64, seed=1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=32)


class MLP(pl.LightningModule):
    """``10 -> hidden -> hidden -> 3`` ReLU MLP, optionally with BatchNorm and dropout; SGD with momentum."""

    def __init__(
        self,
        hidden: int = 16,
        batchnorm: bool = False,
        dropout: float = 0.0,
        lr: float = 0.1,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        act = {"relu": nn.ReLU, "tanh": nn.Tanh}[activation]
        layers: list[nn.Module] = [nn.Linear(IN_FEATURES, hidden)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(act())
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(hidden, hidden), act(), nn.Linear(hidden, NUM_CLASSES)]
        self.net = nn.Sequential(*layers)
        self.lr = lr
        self.training_steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class RecordPerRank(pl.Callback):
    """Writes, on every process, what the SharpnessMonitor logged (after Lightning's epoch-end sync)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_validation_end(self, trainer, pl_module):
        import json

        monitor = next(cb for cb in trainer.callbacks if hasattr(cb, "history"))
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "logged": {
                k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("sharpness/")
            },
            "history": monitor.history,
            "indices": monitor.state_dict()["indices"].tolist(),
            "seen": list(getattr(monitor, "seen", [])),
        }
        with open(f"{self.directory}/rank{trainer.global_rank}.json", "w") as f:
            json.dump(record, f)
        if trainer.global_rank == 0:
            torch.save(pl_module.state_dict(), f"{self.directory}/weights.pt")


def quiet_trainer(callbacks: list, max_epochs: int = 2, **kwargs) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar, summary or sanity check."""
    settings = dict(
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
    )
    settings.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **settings)


class Wrapped(pl.LightningModule):
    """A plain LightningModule around any network: cross-entropy, AdamW (lr 1e-2), ``val_loss`` logged."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def training_state(module: nn.Module, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
    """What a fit leaves behind, copied: weights and buffers, the optimizer's state and the global RNG (take
    it right after the fit)."""
    state = {k: v.clone() for k, v in module.state_dict().items()}
    for i, opt_state in enumerate(trainer.optimizers[0].state_dict()["state"].values()):
        state.update({f"opt.{i}.{k}": torch.as_tensor(v).clone() for k, v in opt_state.items()})
    state["rng"] = torch.random.get_rng_state()
    return state


def assert_same_training_state(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """Two :func:`training_state` s equal bit for bit."""
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def fit_with_and_without_the_monitor(build_net, data: TensorDataset) -> list[dict]:
    """Fit ``Wrapped(build_net())`` on ``data`` for 2 epochs (batches of 8, shuffled), once without and once
    with ``SharpnessMonitor(num_samples=16)``, from the same seed. Asserts that no estimator fell back to
    per-sample backward passes (it warns then) and that the two runs end bit-identical: weights, optimizer
    state and the global RNG (the measurement draws from generators of its own). Returns the monitor's
    history."""
    import warnings

    from lightning_flatness import SharpnessMonitor

    runs, history = {}, []
    for label, callbacks in [("without", []), ("with", [SharpnessMonitor(num_samples=16)])]:
        pl.seed_everything(0, verbose=False)
        module = Wrapped(build_net())
        loaders = DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = quiet_trainer(callbacks, max_epochs=2)
            trainer.fit(module, *loaders)
        assert not any("per-layer contractions do not apply" in str(w.message) for w in caught)
        runs[label] = training_state(module, trainer)
        if callbacks:
            history = callbacks[0].history
    assert_same_training_state(runs["with"], runs["without"])
    return history
