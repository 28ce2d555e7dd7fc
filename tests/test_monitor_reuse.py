"""One SharpnessMonitor passed to several fits (a sweep that builds a new network per run and reuses the
callback): ``method="auto"`` chooses again for each fit, while a fit resumed from a checkpoint keeps the
checkpoint's choice, so that its curve continues with the method it started with."""

from __future__ import annotations

import warnings

import pytorch_lightning as pl
import torch
from callback_models import MLP, DataModule, quiet_trainer
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_flatness.callback import SharpnessMonitor


def _fit(monitor: SharpnessMonitor, activation: str) -> list[str]:
    """One epoch of ``MLP(activation=...)`` with ``monitor``; the warnings' messages."""
    pl.seed_everything(0, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer([monitor], max_epochs=1).fit(MLP(activation=activation), DataModule())
    return [str(w.message) for w in caught]


def test_a_reused_monitor_chooses_the_method_again_for_each_fit():
    reused = SharpnessMonitor(num_samples=32)
    _fit(reused, "relu")
    assert reused.history[-1]["method"] == "exact"  # piecewise linear: its Hessian exactly
    said = _fit(reused, "tanh")
    fresh = SharpnessMonitor(num_samples=32)
    _fit(fresh, "tanh")
    # the tanh network is measured as a fresh monitor measures it, not by the fallback of the relu network's
    # choice (the exact method refused, then the Gauss-Newton diagonal by Hutchinson probes)
    assert reused.history[-1]["method"] == fresh.history[-1]["method"] == "hessian_sketch"
    assert not any("refused" in message for message in said)
    assert any("measures with hessian_sketch" in message for message in said)  # the choice is said per fit
    _fit(reused, "relu")
    assert reused.history[-1]["method"] == "exact"
    assert [h["epoch"] for h in reused.history] == [0, 0, 0]  # the history of every fit, in order


def test_a_resumed_fit_keeps_the_method_of_its_checkpoint(tmp_path):
    """The checkpoint's choice (here set to the Gauss-Newton sketch, a valid choice for the piecewise-linear
    MLP, where ``auto`` would choose ``exact``) survives the new fit's reset."""
    monitor = SharpnessMonitor(num_samples=32)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer([monitor, checkpoint], max_epochs=1, enable_checkpointing=True)
    trainer.fit(MLP(), DataModule())
    assert monitor.history[-1]["method"] == "exact"
    path = tmp_path / "epoch=0.ckpt"
    saved = torch.load(path, weights_only=False)
    state = saved["callbacks"][monitor.state_key]
    state["method"], state["quantity"] = "gauss_newton_sketch", "hessian"
    torch.save(saved, path)

    resumed = SharpnessMonitor(num_samples=32)
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer([resumed], max_epochs=2)
    trainer.fit(MLP(), DataModule(), ckpt_path=str(path))
    assert [(h["epoch"], h["method"]) for h in resumed.history] == [(0, "exact"), (1, "gauss_newton_sketch")]
