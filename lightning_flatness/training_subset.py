"""The fixed subset of training samples on which ``SharpnessMonitor`` measures curvature.

The Trainer's own training loader is never iterated: under DDP its sampler reshuffles every
epoch, creating an iterator draws from the global RNG, and with persistent workers a new iterator
resets the training iterator. Instead, the dataset and collate function are read off the training
``DataLoader`` object and samples are fetched by index, ``collate_fn([dataset[i] for i in chunk])``,
with no sampler, no workers and no random numbers of the training run's. A dataset whose ``__getitem__``
draws random numbers (augmentations: random crops, flips) gets the same draws at every measurement: each
chunk's fetch starts from the global streams seeded from the monitor's seed and the chunk's first index
(:func:`~lightning_flatness.isolation.seed_global_streams`), so the measured inputs are fixed, one draw of
the augmented distribution, and a curve moves with the weights only.

**Which samples.** The training loss averages over the samples the training loader's *sampler* draws, which
need not be the whole dataset: a ``SubsetRandomSampler`` (or a plain list of indices) trains on part of it
(a train/validation split of one dataset), a ``WeightedRandomSampler`` reweights it (class balancing).
:func:`training_population` reads these (also inside the ``DistributedSamplerWrapper`` Lightning puts around
them under DDP) and the subset is drawn from that population: uniformly without replacement from the
sampler's indices, or by the sampler's weights (with replacement where the sampler draws so, so that the
subset is an i.i.d. draw of the training distribution). Another sampler is not read: the subset is then
drawn from the whole dataset, and the monitor says so once. A Trainer that limits the batches per epoch
(``overfit_batches``; ``limit_train_batches`` with a sampler of fixed order) trains on the first batches
only, and the subset is drawn from those (:func:`limited_population`).

**Datasets that only work in the loader's workers** (a file handle or a per-worker resource opened by
``worker_init_fn``): where fetching in the main process raises on the first measurement and the training
loader has workers, the chunks are fetched by a loader with the same workers, ``worker_init_fn`` and
multiprocessing context (started per measurement, seeded from the monitor's seed: the draws of
augmentations are fixed per worker rather than per chunk); where that fails too, or the loader has no
workers, a :class:`SubsetFetchError` names the problem and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from lightning_flatness.isolation import seed_global_streams

__all__ = [
    "Population",
    "SubsetFetchError",
    "TrainingSubset",
    "training_dataloader",
    "training_population",
    "choose_indices",
    "chunk_sizes",
    "limited_population",
]

_FIX = "pass the samples to measure on explicitly with `SharpnessMonitor(dataloader=...)`"


def training_dataloader(trainer: Any) -> Any:
    """The training loader object of ``trainer`` (never iterated), or ``None`` when there is none.

    Looks at ``trainer.train_dataloader`` (set once ``fit`` has built its loaders), then at the
    training data source of the fit loop: the loader passed to ``trainer.fit``, or the
    ``train_dataloader()`` hook of the datamodule or LightningModule, which is called once here.
    """
    loader = getattr(trainer, "train_dataloader", None)
    if loader is not None:
        return loader
    source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
    if source is None or getattr(source, "instance", None) is None or not source.is_defined():
        return None
    return source.dataloader()


def _dataset_and_collate(loader: Any) -> tuple[Sequence, Callable[[list], Any]]:
    if not isinstance(loader, DataLoader):
        raise TypeError(
            "SharpnessMonitor can only draw its subset from a single torch DataLoader, but the "
            f"training data is a {type(loader).__name__}; {_FIX}."
        )
    dataset = loader.dataset
    indexable = hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
    if isinstance(dataset, IterableDataset) or not indexable:
        raise TypeError(
            "SharpnessMonitor needs an indexable training dataset (with __len__ and __getitem__) "
            f"to draw a fixed subset from, got {type(dataset).__name__}; {_FIX}."
        )
    if loader.batch_size is None and loader.batch_sampler is None:
        raise TypeError(
            f"the training DataLoader has automatic batching disabled (batch_size=None), so its "
            f"dataset yields whole batches; {_FIX}."
        )
    return dataset, loader.collate_fn


def choose_indices(num_items: int, num_samples: int, seed: int) -> Tensor:
    """``min(num_samples, num_items)`` distinct indices in ``[0, num_items)``, uniformly at random.

    Drawn from a private ``torch.Generator`` seeded with ``seed``: the global RNG is not touched,
    and the same arguments give the same indices on every process.

    Example:
        >>> idx = choose_indices(10, 4, seed=0)
        >>> idx.shape, bool((idx < 10).all()), len(set(idx.tolist()))
        (torch.Size([4]), True, 4)
    """
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(num_items, generator=generator)[:num_samples]


def merged_chunks(sizes: Sequence[int], batch_size: int) -> list[int]:
    """How many consecutive chunks of ``sizes`` go into each batch of at most ``batch_size`` samples (greedy;
    a chunk larger than ``batch_size`` is a batch of its own): the replicate groups of each batch when an
    estimator takes several groups in one pass.

    Example:
        >>> merged_chunks([64] * 8, 128), merged_chunks([32] * 8, 128), merged_chunks([125] * 8, 128)
        ([2, 2, 2, 2], [4, 4], [1, 1, 1, 1, 1, 1, 1, 1])
    """
    counts: list[int] = []
    held = 0
    for size in sizes:
        if counts and held + size <= batch_size:
            counts[-1] += 1
            held += size
        else:
            counts.append(1)
            held = size
    return counts


def chunk_sizes(total: int, batch_size: int, min_chunks: int) -> list[int]:
    """Cut ``total`` samples into near-equal chunks of at most ``batch_size``, and at least
    ``min_chunks`` of them (fewer only when ``total < min_chunks``: then one sample each).

    Example:
        >>> chunk_sizes(512, 128, min_chunks=8)
        [64, 64, 64, 64, 64, 64, 64, 64]
        >>> chunk_sizes(10, 4, min_chunks=2), chunk_sizes(3, 4, min_chunks=8)
        ([4, 3, 3], [1, 1, 1])
    """
    if total <= 0:
        return []
    count = min(total, max(min_chunks, -(-total // batch_size)))
    return [total // count + (1 if i < total % count else 0) for i in range(count)]


class SubsetFetchError(RuntimeError):
    """The monitor could not fetch its training samples by index (raised at the dry run, before training)."""


@dataclass(frozen=True)
class Population:
    """The samples the training loader draws from, and how: the distribution the training loss averages over.

    Attributes:
        size: how many dataset indices it has (``len(dataset)`` for the whole dataset).
        indices: ``(size,)`` int64 dataset indices, or None for ``0 .. size - 1``.
        weights: ``(size,)`` float64 sampling weights of those indices, or None (uniform).
        replacement: the weighted draw is with replacement (as ``WeightedRandomSampler``'s default).
        sampler: the class name of the sampler read (or of the one not read).
        known: whether the sampler was read; otherwise the population is the whole dataset by default.
    """

    size: int
    indices: Optional[Tensor] = None
    weights: Optional[Tensor] = None
    replacement: bool = False
    sampler: str = "SequentialSampler"
    known: bool = True
    #: the sampler yields its indices in the same order every epoch (``SequentialSampler``, a list of
    #: indices), so that a limit on the batches per epoch trains on the first ones only
    ordered: bool = False
    #: where a limit on the batches per epoch restricted the population: why, for :meth:`describe`
    limited_by: str = ""

    def choose(self, num_samples: int, seed: int) -> Tensor:
        """``num_samples`` dataset indices drawn from the population with a private generator seeded with
        ``seed``: uniformly without replacement (all of them when there are fewer; the same draw as
        :func:`choose_indices` for the whole dataset), or by the weights (with replacement where
        ``replacement``: repeats are then part of the i.i.d. draw; without it, at most the indices of positive
        weight)."""
        if self.weights is None:
            picked = choose_indices(self.size, num_samples, seed)
        else:
            generator = torch.Generator().manual_seed(int(seed))
            count = num_samples if self.replacement else min(num_samples, int((self.weights > 0).sum()))
            picked = torch.multinomial(self.weights, count, replacement=self.replacement, generator=generator)
        return picked if self.indices is None else self.indices[picked]

    def describe(self) -> str:
        """Where the subset comes from, for a message: e.g. ``"the 800 indices of the training loader's
        SubsetRandomSampler"``."""
        if self.limited_by:
            return f"the first {self.size} samples the training loader yields ({self.limited_by})"
        if not self.known:
            return (
                f"the whole training dataset ({self.size} samples), uniformly: the training loader's sampler "
                f"{self.sampler} is not one it reads (SubsetRandomSampler, WeightedRandomSampler, a list of "
                "indices)"
            )
        if self.weights is not None:
            how = "with replacement" if self.replacement else "without replacement"
            return f"the {self.size} weighted indices of the training loader's {self.sampler} ({how})"
        if self.indices is not None:
            return f"the {self.size} indices of the training loader's {self.sampler}"
        return f"the whole training dataset ({self.size} samples)"


_WHOLE_DATASET = (SequentialSampler, RandomSampler, DistributedSampler)


def training_population(loader: DataLoader) -> Population:
    """The :class:`Population` of ``loader``'s sampler (module docstring), for an indexable dataset.

    Reads ``SubsetRandomSampler`` and plain sequences of indices (their indices), ``WeightedRandomSampler``
    (its weights and replacement), and the whole dataset for ``SequentialSampler``, ``RandomSampler`` and
    ``DistributedSampler``; sees through Lightning's ``DistributedSamplerWrapper`` and a custom batch
    sampler's ``sampler``. Anything else: the whole dataset, ``known=False``.

    Raises:
        ValueError: the sampler's indices or weights do not fit the dataset, or select nothing.
    """
    size = len(loader.dataset)  # type: ignore[arg-type]
    sampler = _index_sampler(loader)
    name = type(sampler if sampler is not None else loader.batch_sampler).__name__
    if isinstance(sampler, WeightedRandomSampler):
        weights = torch.as_tensor(sampler.weights, dtype=torch.float64).flatten()
        if weights.numel() > size or not bool((weights >= 0).all()) or not bool((weights > 0).any()):
            raise ValueError(
                f"the training loader's WeightedRandomSampler has {weights.numel()} weights for a dataset of "
                f"{size} samples (non-negative, some positive, at most one per sample are needed to draw "
                f"the monitor's subset from them); {_FIX}."
            )
        return Population(
            weights.numel(), weights=weights, replacement=bool(sampler.replacement), sampler=name
        )
    indices = _sampler_indices(sampler)
    if indices is not None:
        if indices.numel() == 0 or int(indices.min()) < 0 or int(indices.max()) >= size:
            raise ValueError(
                f"the training loader's {name} selects {indices.numel()} indices, not all in [0, {size}) "
                f"(the dataset's length); {_FIX}."
            )
        ordered = not isinstance(sampler, SubsetRandomSampler)
        return Population(indices.numel(), indices=indices, sampler=name, ordered=ordered)
    ordered = isinstance(sampler, SequentialSampler)
    return Population(size, sampler=name, known=isinstance(sampler, _WHOLE_DATASET), ordered=ordered)


def limited_population(
    population: Population, loader: DataLoader, limit_batches: float, overfit_batches: float
) -> Population:
    """``population`` as a Trainer that limits the batches per epoch trains on it. With ``overfit_batches``
    Lightning replaces the sampler by a ``SequentialSampler`` over the dataset and trains on the first
    batches only; with ``limit_train_batches`` below the whole loader, a sampler of fixed order
    (:attr:`Population.ordered`) also gives the first batches only, every epoch (a shuffling one gives other
    batches each epoch: the whole population). An int limit is a number of batches, a float a fraction of
    the loader's (rounded down, as Lightning does). Unchanged where nothing is limited."""
    overfit = overfit_batches > 0
    limit = overfit_batches if overfit else limit_batches
    if not overfit and not population.ordered:
        return population
    total = len(loader)
    batches = int(limit) if isinstance(limit, int) else int(total * float(limit))
    if batches >= total or batches < 1 or loader.batch_size is None:
        return population
    count = batches * loader.batch_size
    setting = f"overfit_batches={overfit_batches}" if overfit else f"limit_train_batches={limit_batches}"
    why = f"the {batches} batches of {loader.batch_size} that {setting} trains on"
    if overfit:  # sequential over the dataset, whatever the sampler was
        size = min(count, len(loader.dataset))  # type: ignore[arg-type]
        return Population(size, sampler="SequentialSampler", ordered=True, limited_by=why)
    if population.indices is None:
        return Population(
            min(count, population.size), sampler=population.sampler, ordered=True, limited_by=why
        )
    kept = population.indices[:count]
    return Population(kept.numel(), indices=kept, sampler=population.sampler, ordered=True, limited_by=why)


def _index_sampler(loader: DataLoader) -> Any:
    """The sampler that yields ``loader``'s sample indices: its batch sampler's ``sampler``
    (``loader.sampler`` under the default one; None for a custom batch sampler without one); Lightning's
    ``DistributedSamplerWrapper`` (DDP) replaced by the sampler it wraps."""
    batch_sampler = loader.batch_sampler
    sampler = loader.sampler if batch_sampler is None else getattr(batch_sampler, "sampler", None)
    wrapped = getattr(getattr(sampler, "dataset", None), "_sampler", None)  # DistributedSamplerWrapper
    if isinstance(sampler, DistributedSampler) and wrapped is not None:
        return wrapped
    return sampler


def _sampler_indices(sampler: Any) -> Optional[Tensor]:
    """The indices of a ``SubsetRandomSampler`` or of a plain sequence used as sampler (a list, range, tuple
    or 1-D integer tensor of indices), as int64; None for any other sampler, or for keys that are not
    integers (a dataset indexed by names)."""
    if isinstance(sampler, SubsetRandomSampler):
        source: Any = sampler.indices
    elif isinstance(sampler, (list, tuple, range)) or (
        isinstance(sampler, Tensor) and sampler.ndim == 1 and not sampler.is_floating_point()
    ):
        source = sampler
    else:
        return None
    if isinstance(source, Tensor):
        return source.detach().to("cpu", torch.int64).flatten()
    values = list(source)
    if not all(
        isinstance(v, int) or (isinstance(v, Tensor) and v.numel() == 1 and not v.is_floating_point())
        for v in values
    ):
        return None  # keys of another kind (a dataset indexed by names): not read
    return torch.as_tensor([int(v) for v in values], dtype=torch.int64)


class TrainingSubset:
    """Fixed training samples, fetched by index and collated in chunks.

    Args:
        loader: the training ``DataLoader`` whose ``dataset``, ``collate_fn`` and sampler (the population,
            :func:`training_population`) are used, and whose workers fetch where the main process cannot.

    Raises:
        TypeError: ``loader`` is not a ``DataLoader`` over an indexable dataset.
        ValueError: the dataset is empty, or its sampler selects nothing.
    """

    def __init__(self, loader: Any) -> None:
        self.dataset, self.collate_fn = _dataset_and_collate(loader)
        self.batch_size: Optional[int] = loader.batch_size
        if len(self.dataset) == 0:
            raise ValueError(
                "the training dataset of SharpnessMonitor is empty (length 0); give the Trainer "
                f"training data or {_FIX}."
            )
        self.population = training_population(loader)
        self._workers = {
            "num_workers": loader.num_workers,
            "worker_init_fn": loader.worker_init_fn,
            "multiprocessing_context": loader.multiprocessing_context,
            "timeout": loader.timeout,
        }
        if loader.num_workers > 0:
            self._workers["prefetch_factor"] = loader.prefetch_factor
        self.in_workers = False  # the first fetch decides (module docstring)
        self._fetched = False
        self.notice: Optional[str] = None  # why the chunks are fetched by workers, for the caller to say once

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, indices: Tensor, sizes: Sequence[int], seed: Optional[int] = None) -> Iterator[Any]:
        """Collated batches of ``indices`` cut into consecutive chunks of ``sizes``; with ``seed``, each chunk
        fetched from the global random streams seeded with ``seed`` and its first index (module docstring;
        the caller holds :func:`~lightning_flatness.isolation.preserved_rng_states`), or by the loader's
        workers where the main process cannot fetch (decided on the first fetch)."""
        chunks, start = [], 0
        for size in sizes:
            chunks.append(indices[start : start + size].tolist())
            start += size
        chunks = [c for c in chunks if c]
        if not chunks:
            return
        if self.in_workers:
            yield from self._worker_batches(chunks, seed)
            return
        for k, chunk in enumerate(chunks):
            if seed is not None:
                seed_global_streams(seed * _SEED_STRIDE + chunk[0])
            try:
                batch = self.collate_fn([self.dataset[i] for i in chunk])
            except Exception as err:
                if self._fetched:  # the main process could fetch before: the dataset's own failure
                    raise
                self._fetched = True
                yield from self._fetch_in_workers(chunks[k:], seed, err)
                return
            self._fetched = True
            yield batch

    def _fetch_in_workers(
        self, chunks: list[list[int]], seed: Optional[int], err: Exception
    ) -> Iterator[Any]:
        """The first fetch raised ``err`` in the main process: the chunks from the loader's workers, or a
        :class:`SubsetFetchError`."""
        failed = (
            f"SharpnessMonitor fetches its training samples by index in the main process, "
            f"collate_fn([dataset[i] for i in chunk]), and {type(self.dataset).__name__}[{chunks[0][0]}] "
            f"raised {type(err).__name__}: {err}"
        )
        if self._workers["num_workers"] == 0:
            raise SubsetFetchError(
                f"{failed}. Make the dataset indexable outside a DataLoader, or {_FIX}."
            ) from err
        workers = self._workers["num_workers"]
        batches = self._worker_batches(chunks, seed)
        try:
            first = next(batches)
        except Exception as worker_err:
            raise SubsetFetchError(
                f"{failed}; fetched by {workers} workers of the training loader's settings (worker_init_fn, "
                f"multiprocessing context) it raised {type(worker_err).__name__}: {worker_err}. "
                f"{_FIX[0].upper() + _FIX[1:]}."
            ) from worker_err
        self.in_workers = True
        self.notice = (
            f"{failed}; it fetches them with the training loader's workers instead (up to {workers} started "
            "per measurement, with its worker_init_fn), seeded from the monitor's seed."
        )
        yield first
        yield from batches

    def _worker_batches(self, chunks: list[list[int]], seed: Optional[int]) -> Iterator[Any]:
        """The chunks collated by a loader with the training loader's workers, in order: the batch sampler
        is the list of chunks, the worker seeds come from a private generator seeded with ``seed``."""
        settings = dict(self._workers)
        settings["num_workers"] = min(settings["num_workers"], len(chunks))
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed) % 2**63)
        loader = DataLoader(
            self.dataset, batch_sampler=chunks, collate_fn=self.collate_fn, generator=generator, **settings
        )
        yield from loader


_SEED_STRIDE = 1_000_003  # a prime above any dataset index one would measure: distinct seeds per chunk
