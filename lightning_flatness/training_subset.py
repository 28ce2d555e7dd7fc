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
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lightning_flatness.isolation import seed_global_streams

__all__ = ["TrainingSubset", "training_dataloader", "choose_indices", "chunk_sizes"]

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


class TrainingSubset:
    """Fixed training samples, fetched by index and collated in chunks.

    Args:
        loader: the training ``DataLoader`` whose ``dataset`` and ``collate_fn`` are used.

    Raises:
        TypeError: ``loader`` is not a ``DataLoader`` over an indexable dataset.
        ValueError: the dataset is empty.
    """

    def __init__(self, loader: Any) -> None:
        self.dataset, self.collate_fn = _dataset_and_collate(loader)
        self.batch_size: Optional[int] = loader.batch_size
        if len(self.dataset) == 0:
            raise ValueError(
                "the training dataset of SharpnessMonitor is empty (length 0); give the Trainer "
                f"training data or {_FIX}."
            )

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, indices: Tensor, sizes: Sequence[int], seed: Optional[int] = None) -> Iterator[Any]:
        """Collated batches of ``indices`` cut into consecutive chunks of ``sizes``; with ``seed``, each chunk
        fetched from the global random streams seeded with ``seed`` and its first index (module docstring;
        the caller holds :func:`~lightning_flatness.isolation.preserved_rng_states`)."""
        start = 0
        for size in sizes:
            chunk = indices[start : start + size].tolist()
            start += size
            if seed is not None and chunk:
                seed_global_streams(seed * _SEED_STRIDE + chunk[0])
            yield self.collate_fn([self.dataset[i] for i in chunk])


_SEED_STRIDE = 1_000_003  # a prime above any dataset index one would measure: distinct seeds per chunk
