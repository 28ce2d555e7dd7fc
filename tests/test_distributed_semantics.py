"""Multi-process (and multi-node) semantics of ``SharpnessMonitor``: the subset is partitioned by
*global* rank over the *global* world size, probe seeds follow ``(seed, evaluation, global rank)``,
every process logs the same value, equal to one process's, and each of ``P`` processes does ``1/P``
of the curvature work (counted: samples x probes per rank, by wrapping the estimator, not timed).

Nodes are invisible to the callback: Lightning numbers processes ``global_rank = node_rank *
devices + local_rank`` over ``world_size = num_nodes * devices``, and the callback reads only those
two. The first test plays rank 3 of 2 nodes x 2 devices with a stand-in trainer; the second runs 4
real gloo processes (``ddp_fork``, as ``tests/test_callback_ddp.py``).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from callback_models import MLP, DataModule, make_dataset
from oracles import brute_force_measures
from torch.utils.data import DataLoader

import lightning_flatness.measure as measure_module
from lightning_flatness.callback import SharpnessMonitor
from lightning_flatness.training_subset import TrainingSubset, choose_indices


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _expected_probe_seed(seed: int, evaluation: int, rank: int) -> int:
    """The documented rule, written out independently of the callback."""
    state = np.random.SeedSequence([seed, evaluation, rank]).generate_state(1, np.uint64)[0]
    return int(state) & (2**63 - 1)


def test_shares_partition_the_subset_by_global_rank_and_probe_seeds_follow_the_global_rank():
    dataset = make_dataset(100)
    monitor = SharpnessMonitor(num_samples=40, batch_size=4, num_replicates=2, seed=7)
    monitor._subset = TrainingSubset(DataLoader(dataset, batch_size=8))
    monitor._indices = choose_indices(len(dataset), 40, seed=7)
    shares = []
    for node in range(2):
        for local in range(2):  # Lightning's numbering with num_nodes=2, devices=2
            trainer = SimpleNamespace(
                global_rank=node * 2 + local,
                local_rank=local,
                node_rank=node,
                world_size=4,
                fast_dev_run=False,
            )
            batches, total = monitor._rank_batches(trainer)
            rows = torch.cat([x for x, _ in batches])
            assert total == 3  # 10 samples in at least num_replicates=2 batches of at most 4
            shares.append(rows)
            seed = monitor._probe_generator(torch.device("cpu"), trainer.global_rank).initial_seed()
            assert seed == _expected_probe_seed(7, 0, node * 2 + local)
    # the four shares are disjoint and together are exactly the subset, rank r holding indices[r::4]
    for rank, rows in enumerate(shares):
        assert torch.equal(rows, dataset.tensors[0][monitor._indices[rank::4]])
    together = torch.cat(shares)
    assert together.shape[0] == 40 and torch.unique(together, dim=0).shape[0] == 40
    # ranks 1 and 3 have the same local rank on different nodes: different probes
    seeds = {monitor._probe_generator(torch.device("cpu"), r).initial_seed() for r in range(4)}
    assert len(seeds) == 4


class _Work:
    """Wraps the estimator that the front door calls, recording each call's samples, probes and seed."""

    calls: list[dict] = []

    def __init__(self, real):
        self.real = real

    def __call__(self, model, loss_fn, inputs, target, **kwargs):
        generator = kwargs.get("generator")
        _Work.calls.append(
            {
                "method": kwargs["method"],
                "samples": int(target.shape[0]),
                "probes": int(kwargs["num_probes"]) if kwargs["method"] != "exact" else 1,
                "seed": None if generator is None else generator.initial_seed(),
            }
        )
        return self.real(model, loss_fn, inputs, target, **kwargs)


class _Record(pl.Callback):
    """Forgets the dry runs at train start; at validation end writes this rank's work and values."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_start(self, trainer, pl_module):
        _Work.calls.clear()

    def on_validation_end(self, trainer, pl_module):
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, SharpnessMonitor)]
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "calls": list(_Work.calls),
            "logged": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("sharp")},
            "indices": monitors[0].state_dict()["indices"].tolist(),
        }
        with open(f"{self.directory}/rank{trainer.global_rank}.json", "w") as f:
            json.dump(record, f)
        if trainer.global_rank == 0:
            torch.save(pl_module.state_dict(), f"{self.directory}/weights.pt")


def run_processes(directory, processes: int, num_samples: int = 64, num_probes: int = 4) -> list[dict]:
    """Fit one epoch on ``processes`` gloo processes with an exact and a Hutchinson monitor; the records."""
    pl.seed_everything(0, verbose=False)
    monitors = [
        SharpnessMonitor(
            num_samples=num_samples,
            batch_size=8,
            dtype="float64",
            seed=3,
            method="exact",
            num_replicates=2,
            log_images=False,
        ),
        SharpnessMonitor(
            num_samples=num_samples,
            batch_size=8,
            dtype="float64",
            seed=3,
            method="hutchinson",
            num_probes=num_probes,
            num_replicates=2,
            prefix="sharpness_hutchinson",
            log_images=False,
        ),
    ]
    strategy = "ddp_fork" if processes > 1 else "auto"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=processes,
        strategy=strategy,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_train_batches=2,
        limit_val_batches=1,
        callbacks=[*monitors, _Record(str(directory))],
    )
    real = measure_module.hessian_diagonal_groups
    measure_module.hessian_diagonal_groups = _Work(real)
    try:
        trainer.fit(MLP(), DataModule(batch_size=16))
    finally:
        measure_module.hessian_diagonal_groups = real
    return [json.loads((directory / f"rank{r}.json").read_text()) for r in range(processes)]


def work_per_rank(record: dict, method: str) -> int:
    """Samples x probes of ``method`` done by one rank."""
    return sum(c["samples"] * c["probes"] for c in record["calls"] if c["method"] == method)


@pytest.mark.slow
def test_four_gloo_processes_log_the_single_process_value_and_each_does_a_quarter_of_the_work(tmp_path):
    records = run_processes(tmp_path, 4)
    assert [r["world_size"] for r in records] == [4] * 4
    # bit-identical logged values on every rank, for both methods
    assert all(r["logged"] == records[0]["logged"] for r in records)
    # exact: the value of one process over the same 64 samples (brute-force float64 Hessian)
    model = MLP()
    model.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    data = DataModule()
    data.setup("fit")
    idx = torch.tensor(records[0]["indices"])
    reference = brute_force_measures(model, data.train_set.tensors[0][idx], data.train_set.tensors[1][idx])
    for key in ("normalized", "matrix_normalized", "hessian_trace"):
        assert records[0]["logged"][f"sharpness/{key}"] == pytest.approx(reference[key], rel=1e-9), key
    # work: 64 samples (x 4 probes for Hutchinson) split evenly, 1/4 per rank
    assert [work_per_rank(r, "exact") for r in records] == [64 // 4] * 4
    assert [work_per_rank(r, "hutchinson") for r in records] == [64 * 4 // 4] * 4
    # probes: from the generator of (seed, evaluation 0, global rank)
    for r in records:
        seeds = {c["seed"] for c in r["calls"] if c["method"] == "hutchinson"}
        assert seeds == {_expected_probe_seed(3, 0, r["rank"])}
