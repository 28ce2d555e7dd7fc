"""The measurement's progress shows in Lightning's RichProgressBar and TQDMProgressBar, and training
with either bar gives the same (bit-identical) sharpness history as training without one."""

from __future__ import annotations

import io
import re

import pytest
import pytorch_lightning as pl
from callback_models import MLP, DataModule
from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar

from lightning_flatness.callback import SharpnessMonitor


def _progress(text: str) -> list[tuple[int, int]]:
    """Every ``done/total`` shown on a line of the measurement's bar, in order."""
    return [(int(a), int(b)) for a, b in re.findall(r"Sharpness \(exact\)[^\r\n]*?(\d+)/(\d+)", text)]


def _assert_advances_to_completion(text: str) -> int:
    """Rich redraws on every advance (the reporter refreshes): every step up to the total shows."""
    steps = _progress(text)
    assert steps, "the measurement's progress never showed"
    total = steps[-1][1]
    assert total > 1 and steps[-1] == (total, total)
    assert {done for done, _ in steps} >= set(range(1, total + 1))  # it advanced one batch at a time
    return total


def _fit(bar, num_samples: int = 60, batch_size: int = 20) -> tuple[SharpnessMonitor, pl.Trainer]:
    monitor = SharpnessMonitor(num_samples=num_samples, batch_size=batch_size, dtype="float64", seed=7)
    pl.seed_everything(0, verbose=False)
    callbacks = [monitor] if bar is None else [monitor, bar]
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=bar is not None,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
    )
    trainer.fit(MLP(), DataModule())
    return monitor, trainer


def test_rich_and_tqdm_bars_show_the_measurement_and_leave_training_unchanged(capsys):
    pytest.importorskip("rich", reason="rich is in the `test` extra")  # RichProgressBar raises without it
    plain, _ = _fit(None)
    capsys.readouterr()

    console = io.StringIO()
    rich_bar = RichProgressBar(
        console_kwargs={"file": console, "force_terminal": True, "width": 160, "color_system": None}
    )
    with_rich, trainer = _fit(rich_bar)
    assert trainer.progress_bar_callback is rich_bar
    total = _assert_advances_to_completion(console.getvalue())

    with_tqdm, trainer = _fit(TQDMProgressBar())
    assert isinstance(trainer.progress_bar_callback, TQDMProgressBar)
    out = capsys.readouterr()
    steps = _progress(out.out + out.err)  # tqdm rate-limits redraws and erases the bar (leave=False)
    assert steps and {t for _, t in steps} == {total} and steps[0] == (0, total)

    for monitor in (with_rich, with_tqdm):
        assert [h["normalized"] for h in monitor.history] == [h["normalized"] for h in plain.history]
        assert [h["hessian_trace"] for h in monitor.history] == [h["hessian_trace"] for h in plain.history]
