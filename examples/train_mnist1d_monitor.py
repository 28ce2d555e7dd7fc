"""Train the paper's MLP on MNIST-1D with SharpnessMonitor, TensorBoard and early stopping on sharpness.

    python examples/train_mnist1d_monitor.py          # about a minute on one CPU core, offline
    tensorboard --logdir runs                          # curves: SCALARS, CUSTOM SCALARS, IMAGES

The network is the MLP of Sec. 6.1 (three hidden layers of 100 ReLU units; MNIST-1D's 40 inputs in
place of MNIST's 784), trained with Adam (lr 1e-3, batch 128) as in Appendix E.1. After every
validation, ``SharpnessMonitor`` measures the normalized sharpness (eq. 17) of the training loss on
512 fixed training samples with the exact Hessian diagonal (the network is linear in each weight)
and logs it, with per-layer values, for TensorBoard.

Normalized sharpness grows steadily while the network fits the training set (from about 75 after
one epoch to 350 after 60 here), and a sharper minimum generalizes worse (Sec. 6). ``EarlyStopping``
therefore stops the run once the sharpness exceeds a budget (``--max-sharpness 250``, its
``divergence_threshold``): with the defaults that happens after about 35 epochs, where the
validation loss is near its minimum (1.02 around epochs 25-32, rising to 1.09 by epoch 44).

At the end the script prints the cost of one measurement, in seconds and in training steps, and
the total run time. Use ``--method hutchinson``, ``--num-samples`` and ``--num-probes`` to trade
accuracy for time.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_flatness import SharpnessMonitor
from lightning_flatness.datasets import make_mnist1d
from lightning_flatness.reference_models import mlp


class MNIST1DDataModule(pl.LightningDataModule):
    """MNIST-1D (4000 training / 1000 test signals of length 40), generated offline."""

    def __init__(self, batch_size: int = 128, num_samples: int = 5000, seed: int = 42) -> None:
        super().__init__()
        self.batch_size, self.num_samples, self.seed = batch_size, num_samples, seed

    def setup(self, stage: str) -> None:
        if not hasattr(self, "train_set"):
            data = make_mnist1d(self.num_samples, seed=self.seed)
            self.train_set = TensorDataset(data.x_train, data.y_train)
            self.val_set = TensorDataset(data.x_test, data.y_test)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=1000)


class LitClassifier(pl.LightningModule):
    """The paper's MLP (``reference_models.mlp``), cross-entropy, Adam."""

    def __init__(self, hidden: int = 100, depth: int = 3, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = mlp(in_features=40, hidden=hidden, depth=depth, num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}_loss", loss, prog_bar=stage == "val")
        self.log(f"{stage}_acc", (logits.argmax(1) == y).float().mean(), prog_bar=stage == "val")
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class StepTimer(pl.Callback):
    """Wall time of the training steps (forward, backward, optimizer), to express other costs in steps."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int
    ) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def parse_args(argv: Any = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-epochs", type=int, default=60)
    parser.add_argument(
        "--max-sharpness",
        type=float,
        default=250.0,
        help="stop once sharpness/normalized exceeds this budget",
    )
    parser.add_argument(
        "--method", default="auto", choices=["auto", "exact", "hutchinson", "finite_difference"]
    )
    parser.add_argument(
        "--num-samples", type=int, default=512, help="training samples the Hessian is taken over"
    )
    parser.add_argument("--num-probes", type=int, default=64, help="stochastic methods only")
    parser.add_argument("--logdir", default="runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress-bar", action="store_true")
    return parser.parse_args(argv)


def main(argv: Any = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed)
    monitor = SharpnessMonitor(method=args.method, num_samples=args.num_samples, num_probes=args.num_probes)
    timer = StepTimer()
    # mode="min": lower is flatter; stop when it exceeds the budget (patience never triggers)
    stopper = EarlyStopping(
        monitor="sharpness/normalized",
        mode="min",
        divergence_threshold=args.max_sharpness,
        patience=args.max_epochs,
    )
    logger = TensorBoardLogger(args.logdir, name="mnist1d_mlp")
    trainer = pl.Trainer(
        max_epochs=args.max_epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[monitor, stopper, timer],
        log_every_n_steps=10,
        enable_progress_bar=not args.no_progress_bar,
        enable_model_summary=False,
    )
    trainer.fit(LitClassifier(), MNIST1DDataModule())
    total = time.perf_counter() - start

    history = monitor.history
    steps = timer.seconds[10:] or timer.seconds  # skip the warm-up steps
    step = sum(steps) / len(steps)
    measures = [h["seconds"] for h in history[1:]] or [history[0]["seconds"]]  # skip the first (warm-up)
    measure = sum(measures) / len(measures)
    print(
        f"\n{len(history)} epochs in {total:.1f} s (stopped early: {trainer.should_stop}); val loss "
        f"{float(trainer.callback_metrics['val_loss']):.3f}, val acc "
        f"{float(trainer.callback_metrics['val_acc']):.3f}"
    )
    print(
        f"one measurement ({history[-1]['method']}, {int(history[-1]['num_samples'])} samples): "
        f"{measure:.3f} s = {measure / step:.0f} training steps of {step * 1e3:.1f} ms (batch 128)"
    )
    print(
        f"normalized sharpness: first {history[0]['normalized']:.4g}, last {history[-1]['normalized']:.4g} "
        f"+- {history[-1]['normalized_stderr']:.2g} (jackknife standard error over the 512 samples)"
    )
    for key in sorted(k for k in history[-1] if k.startswith("normalized/")):
        print(f"  {key:28s} {history[-1][key]:.4g}")
    print(f"tensorboard --logdir {args.logdir}")
    return {
        "history": history,
        "total_seconds": total,
        "measure_seconds": measure,
        "step_seconds": step,
        "epochs": len(history),
        "stopped_early": bool(trainer.should_stop),
    }


if __name__ == "__main__":
    main()
