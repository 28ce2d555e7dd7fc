"""The monitor's subset comes from the samples the training loader draws: a ``SubsetRandomSampler`` (or a list
of indices) that trains on part of a dataset, a ``WeightedRandomSampler`` that reweights it, also inside the
wrapper Lightning puts around them under DDP; and a dataset that only works in the loader's workers is fetched
by such workers, or refused with the fix."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from callback_models import Wrapped, assert_same_training_state, quiet_trainer, training_state
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    Sampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from lightning_flatness import SharpnessMonitor
from lightning_flatness.training_subset import (
    SubsetFetchError,
    TrainingSubset,
    choose_indices,
    training_population,
)


def _data(n: int = 96) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g))


class _Every(Sampler):
    """A custom sampler the monitor does not read."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


def test_the_population_is_what_the_sampler_draws_from():
    data = _data(20)
    whole = training_population(DataLoader(data, batch_size=4, shuffle=True))
    assert (whole.size, whole.indices, whole.weights, whole.known) == (20, None, None, True)
    assert torch.equal(whole.choose(8, seed=3), choose_indices(20, 8, seed=3))  # the draw of earlier versions

    subset = training_population(DataLoader(data, batch_size=4, sampler=SubsetRandomSampler([3, 5, 7, 11])))
    assert subset.size == 4 and subset.indices.tolist() == [3, 5, 7, 11]
    as_list = training_population(DataLoader(data, batch_size=4, sampler=[2, 4, 6]))
    assert as_list.indices.tolist() == [2, 4, 6]

    weights = [0.0] * 10 + [1.0] * 10
    weighted = training_population(DataLoader(data, batch_size=4, sampler=WeightedRandomSampler(weights, 20)))
    assert weighted.replacement and torch.equal(weighted.weights, torch.tensor(weights, dtype=torch.float64))

    # Lightning's DDP wrapper around a user's sampler, and a custom batch sampler's own sampler
    wrapped = DistributedSamplerWrapper(SubsetRandomSampler([1, 2, 3]), num_replicas=2, rank=0)
    assert training_population(DataLoader(data, batch_size=4, sampler=wrapped)).indices.tolist() == [1, 2, 3]
    batches = BatchSampler(SubsetRandomSampler([8, 9]), batch_size=2, drop_last=False)
    assert training_population(DataLoader(data, batch_sampler=batches)).indices.tolist() == [8, 9]

    named = training_population(DataLoader(data, batch_size=4, sampler=["a", "b"]))  # keys, not indices
    assert named.indices is None and not named.known
    other = training_population(DataLoader(data, batch_size=4, sampler=_Every(20)))
    assert other.size == 20 and other.indices is None and not other.known
    assert "_Every is not one it reads" in other.describe()


def test_a_sampler_that_does_not_fit_the_dataset_is_refused_with_the_fix():
    data = _data(10)
    with pytest.raises(ValueError, match=r"selects 2 indices, not all in \[0, 10\).*dataloader="):
        training_population(DataLoader(data, batch_size=4, sampler=SubsetRandomSampler([3, 12])))
    with pytest.raises(ValueError, match="WeightedRandomSampler has 10 weights.*dataloader="):
        training_population(DataLoader(data, batch_size=4, sampler=WeightedRandomSampler([0.0] * 10, 5)))


def test_subsets_are_drawn_from_the_population_by_its_weights():
    data = _data(30)
    picked = training_population(DataLoader(data, batch_size=4, sampler=SubsetRandomSampler(range(10, 20))))
    chosen = picked.choose(6, seed=1)
    assert len(set(chosen.tolist())) == 6 and all(10 <= i < 20 for i in chosen.tolist())
    assert sorted(picked.choose(50, seed=1).tolist()) == list(range(10, 20))  # all of them when fewer

    weights = torch.tensor([0.0, 1.0, 3.0] * 10)
    drawn = training_population(DataLoader(data, batch_size=4, sampler=WeightedRandomSampler(weights, 30)))
    many = drawn.choose(4000, seed=0)
    assert many.numel() == 4000 and not bool((many % 3 == 0).any())  # never a sample of weight 0
    share = float((many % 3 == 2).double().mean())  # weight 3 against 1: three quarters of the draws
    assert abs(share - 0.75) < 0.03
    without = training_population(
        DataLoader(data, batch_size=4, sampler=WeightedRandomSampler(weights, 30, replacement=False))
    )
    distinct = without.choose(100, seed=0).tolist()
    assert len(distinct) == 20 and len(set(distinct)) == 20 and all(i % 3 for i in distinct)


def _poisoned(held_out: list[int]) -> TensorDataset:
    """Samples outside the training loader's population are NaN: measuring any of them gives NaN values."""
    data = _data()
    x = data.tensors[0].clone()
    x[held_out] = float("nan")
    return TensorDataset(x, data.tensors[1])


@pytest.mark.parametrize("kind", ["subset", "weighted"])
def test_the_monitor_measures_the_samples_training_draws_and_leaves_training_bit_identical(kind):
    held_out = list(range(0, 96, 3))
    train = [i for i in range(96) if i % 3]
    data = _poisoned(held_out)
    runs, monitor = {}, None
    for label in ("without", "with"):
        pl.seed_everything(0, verbose=False)
        if kind == "subset":
            sampler = SubsetRandomSampler(train, generator=torch.Generator().manual_seed(0))
        else:
            weights = torch.tensor([0.0 if i % 3 == 0 else 1.0 + (i % 3) for i in range(96)])
            sampler = WeightedRandomSampler(weights, 64, generator=torch.Generator().manual_seed(0))
        callbacks = [SharpnessMonitor(num_samples=24, num_replicates=2)] if label == "with" else []
        module = Wrapped(nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)))
        trainer = quiet_trainer(callbacks, max_epochs=2)
        trainer.fit(
            module, DataLoader(data, batch_size=8, sampler=sampler), DataLoader(_data(16), batch_size=8)
        )
        runs[label] = training_state(module, trainer)
        monitor = callbacks[0] if callbacks else monitor
    assert_same_training_state(runs["with"], runs["without"])
    assert monitor is not None and set(monitor.subset_indices.tolist()) <= set(train)
    assert (
        torch.equal(monitor.subset_indices, monitor._indices)
        and monitor.subset_indices is not monitor._indices
    )
    assert len(monitor.history) == 2
    assert all(
        torch.isfinite(torch.tensor(entry["normalized"])) and entry["normalized"] > 0
        for entry in monitor.history
    )


class _WorkerOnly(Dataset):
    """Readable only after ``open_in_worker`` ran in a DataLoader worker (a file handle opened per worker)."""

    def __init__(self, data: TensorDataset) -> None:
        self.data, self.handle = data, None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.handle[i]


def open_in_worker(_: int) -> None:
    info = torch.utils.data.get_worker_info()
    info.dataset.handle = info.dataset.data


def _fit_worker_only(dataset: Dataset, workers: int):
    pl.seed_everything(0, verbose=False)
    monitor = SharpnessMonitor(num_samples=32, num_replicates=2)
    module = Wrapped(nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)))
    trainer = quiet_trainer([monitor], max_epochs=2)
    init = open_in_worker if workers else None
    trainer.fit(
        module, DataLoader(dataset, batch_size=8, shuffle=True, num_workers=workers, worker_init_fn=init)
    )
    return monitor


def test_a_dataset_that_only_works_in_the_loaders_workers_is_fetched_by_such_workers():
    data = _data()
    ours = _fit_worker_only(_WorkerOnly(data), workers=2)
    plain = _fit_worker_only(data, workers=0)  # the same samples, readable in the main process
    keys = ["normalized", "normalized_stderr", "hessian_trace"]
    assert [[e[k] for k in keys] for e in ours.history] == [[e[k] for k in keys] for e in plain.history]
    assert ours._subset is not None and ours._subset.in_workers and not plain._subset.in_workers
    assert list(ours._subset.batches(torch.zeros(0, dtype=torch.long), [], seed=0)) == []  # an empty share


def test_a_dataset_the_main_process_cannot_read_without_workers_is_refused_with_the_fix():
    with pytest.raises(SubsetFetchError, match=r"_WorkerOnly\[\d+\] raised TypeError.*dataloader="):
        _fit_worker_only(_WorkerOnly(_data()), workers=0)


def test_workers_that_fail_too_are_named_in_the_error():
    subset = TrainingSubset(
        DataLoader(_WorkerOnly(_data()), batch_size=8, num_workers=1)
    )  # no worker_init_fn
    with pytest.raises(SubsetFetchError, match="fetched by 1 workers.*raised TypeError"):
        next(subset.batches(torch.arange(8), [8], seed=0))


@pytest.mark.parametrize(
    "settings, shuffle, first",
    [
        ({"overfit_batches": 2}, True, 16),  # Lightning trains on the first 2 batches, shuffling turned off
        ({"limit_train_batches": 3}, False, 24),  # a sequential loader: the first 3 batches every epoch
        ({"limit_train_batches": 0.25}, False, 24),  # 12 batches of 8: a quarter is 3
        ({"limit_train_batches": 3}, True, None),  # shuffled: other batches every epoch, the whole set
    ],
)
def test_a_trainer_that_limits_the_batches_is_measured_on_the_ones_it_trains_on(settings, shuffle, first):
    data = _poisoned([] if first is None else list(range(first, 96)))
    pl.seed_everything(0, verbose=False)
    monitor = SharpnessMonitor(num_samples=12, num_replicates=2)
    module = Wrapped(nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)))
    trainer = quiet_trainer([monitor], max_epochs=1, **settings)
    val = DataLoader(_data(16), batch_size=8)
    trainer.fit(module, DataLoader(data, batch_size=8, shuffle=shuffle), val)
    drawn = monitor.subset_indices.tolist()
    assert len(drawn) == 12 and monitor.history and monitor.history[-1]["normalized"] > 0
    if first is None:
        assert max(drawn) >= 24 and monitor._subset.population.size == 96
    else:
        assert max(drawn) < first and monitor._subset.population.size == first


class _BuildsItsData(Wrapped):
    """Builds a new dataset object at every ``train_dataloader()`` call (the tutorials' pattern); with
    ``grow``, a larger one each time (a curriculum)."""

    def __init__(self, grow: bool) -> None:
        super().__init__(nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)))
        self.grow, self.calls = grow, 0

    def train_dataloader(self):
        self.calls += 1
        return DataLoader(_data(32 + (16 * self.calls if self.grow else 0)), batch_size=8, shuffle=True)

    def val_dataloader(self):
        return DataLoader(_data(16), batch_size=8)


@pytest.mark.parametrize("reload", [0, 1])
def test_a_training_set_reloaded_with_other_samples_is_said_once_and_the_subset_kept(reload):
    import warnings

    pl.seed_everything(0, verbose=False)
    monitor = SharpnessMonitor(num_samples=16, num_replicates=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer([monitor], max_epochs=3, reload_dataloaders_every_n_epochs=reload).fit(
            _BuildsItsData(grow=True)
        )
    said = [str(w.message) for w in caught if "reads another dataset" in str(w.message)]
    assert len(monitor.history) == 3
    if reload:
        assert len(said) == 1 and "keeps measuring the samples it drew then" in said[0]
        assert monitor._subset.population.size == 48  # the first dataset's
    else:  # a new object at every call, but no reload during the fit: nothing to say
        assert said == []
