"""SharpnessMonitor under DDP: 2 CPU processes (gloo) log the same value, equal to the single-process
exact value over the same samples, each process measuring only its share.

``ddp_fork`` rather than ``ddp_spawn``: the same code path (DDPStrategy, gloo, all-reduce) without
re-importing torch and Lightning in each process (11 s instead of 30 s here); ``strategy="ddp"``
would re-run pytest in the second process."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from callback_models import MLP, DataModule, RecordPerRank
from oracles import brute_force_measures

from lightning_flatness.callback import SharpnessMonitor


class CountingMonitor(SharpnessMonitor):
    """Records the size of every batch it splits (the dry run's first, then the measurement's)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[int] = []

    def split_batch(self, batch):
        inputs, target = super().split_batch(batch)
        self.seen.append(int(inputs.shape[0]))
        return inputs, target


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_every_ddp_process_logs_the_single_process_exact_value_over_the_same_samples(tmp_path):
    pl.seed_everything(0, verbose=False)
    monitor = CountingMonitor(num_samples=64, batch_size=16, dtype="float64", seed=None)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[monitor, RecordPerRank(str(tmp_path))],
    )
    trainer.fit(MLP(), DataModule())
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in records] == [2, 2]
    # same subset on both ranks (the random seed was broadcast from rank 0)
    assert records[0]["indices"] == records[1]["indices"] and len(records[0]["indices"]) == 64
    # each rank split its own 32 samples (after a 4-sample dry run), not all 64
    for r in records:
        assert r["seen"][0] == 4 and sum(r["seen"][1:]) == 32
    # every rank computed and logged bit-identical values
    assert records[0]["logged"] == records[1]["logged"]
    assert records[0]["history"][-1]["normalized"] == records[1]["history"][-1]["normalized"]
    assert records[0]["logged"]["sharpness/normalized"] == records[0]["history"][-1]["normalized"]
    assert records[0]["history"][-1]["num_samples"] == 64
    # ... equal to the exact value of one process over the same 64 samples (brute-force Hessian)
    model = MLP()
    model.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    dataset = DataModule()
    dataset.setup("fit")
    idx = torch.tensor(records[0]["indices"])
    ref = brute_force_measures(model, dataset.train_set.tensors[0][idx], dataset.train_set.tensors[1][idx])
    for key in ("normalized", "matrix_normalized", "hessian_trace", "normalized/net.2.weight"):
        assert records[0]["logged"][f"sharpness/{key}"] == pytest.approx(ref[key], rel=1e-9)
