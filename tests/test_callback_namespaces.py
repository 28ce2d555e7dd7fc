"""SharpnessMonitor with the unified ``lightning`` package (``lightning.pytorch``) and its LightningCLI."""

from __future__ import annotations

import lightning.pytorch as lp  # the unified package: in the `test` extra
import pytest
import torch
import torch.nn.functional as F
from callback_models import make_dataset
from oracles import brute_force_measures
from torch import nn
from torch.utils.data import DataLoader

from lightning_flatness.lightning_namespace import SharpnessMonitor as LightningSharpnessMonitor


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class LitMLP(lp.LightningModule):
    """A ``lightning.pytorch`` module (the ``pytorch_lightning`` Trainer would reject it)."""

    def __init__(self, hidden: int = 12, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(10, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Data(lp.LightningDataModule):
    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage):
        self.train_set, self.val_set = make_dataset(128, seed=0), make_dataset(32, seed=1)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=32)


def test_lightning_pytorch_trainer_runs_its_namespace_monitor_with_exact_values():
    assert issubclass(LightningSharpnessMonitor, lp.Callback)
    monitor = LightningSharpnessMonitor(num_samples=64, dtype="float64")
    lp.seed_everything(0, verbose=False)
    model, data = LitMLP(), Data()
    trainer = lp.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[monitor],
    )
    trainer.fit(model, data)
    idx = monitor.state_dict()["indices"]
    ref = brute_force_measures(model, data.train_set.tensors[0][idx], data.train_set.tensors[1][idx])
    assert [h["epoch"] for h in monitor.history] == [0, 1]
    logged = float(trainer.callback_metrics["sharpness/normalized"])
    assert logged == pytest.approx(ref["normalized"], rel=1e-9)


def test_lightning_cli_type_checks_callbacks_so_each_namespace_needs_its_own_class(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    def config(class_path: str) -> dict:
        return {
            "trainer": {
                "max_epochs": 1,
                "logger": False,
                "enable_checkpointing": False,
                "enable_progress_bar": False,
                "enable_model_summary": False,
                "default_root_dir": str(tmp_path),
                "callbacks": [
                    {
                        "class_path": class_path,
                        "init_args": {"num_samples": 32, "loss_fn": "torch.nn.functional.cross_entropy"},
                    }
                ],
            }
        }

    cli = LightningCLI(
        LitMLP, Data, args=config("lightning_flatness.lightning_namespace.SharpnessMonitor"), run=False
    )
    (monitor,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, LightningSharpnessMonitor)]
    assert monitor.loss_fn is F.cross_entropy and monitor.num_samples == 32
    cli.trainer.fit(cli.model, cli.datamodule)
    assert len(monitor.history) == 1 and "sharpness/normalized" in cli.trainer.callback_metrics
    with pytest.raises(SystemExit):  # the pytorch_lightning class is not a lightning.pytorch Callback
        LightningCLI(LitMLP, Data, args=config("lightning_flatness.SharpnessMonitor"), run=False)
