"""Data for the paper's random-label experiments (Tsuzuku et al. 2020, Sec. 6.1, Appendix E.1), CPU-sized.

MNIST is replaced by MNIST-1D (Greydanus, 2020): 40-sample 1-D signals of the ten digits, generated
offline and deterministically by the ``mnist1d`` package (install the ``examples`` extra). It is
small enough to train the paper's MLP and a LeNet-style CNN (1-D convolutions) to near-100% training
accuracy on fully random labels within seconds on a CPU, while a CNN still clearly beats an MLP on
it, so the architectures differ as in the paper.
"""

from __future__ import annotations

import random
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["ClassificationData", "make_mnist1d", "randomize_labels"]


class ClassificationData(NamedTuple):
    """A train/test split: inputs ``(N, D)`` floating point, labels ``(N,)`` int64."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int


def make_mnist1d(
    num_samples: int = 5000, *, train_split: float = 0.8, seed: int = 42, dtype: torch.dtype = torch.float32
) -> ClassificationData:
    """Generate MNIST-1D offline with the reference generator of the ``mnist1d`` package.

    The defaults are the package's (5000 samples, 4000 train / 1000 test, length 40, seed 42), which
    give the published dataset. Generation takes about a second. The package seeds NumPy's and
    Python's global generators; their states are restored afterwards, so callers' streams are not
    disturbed.

    Args:
        num_samples: total number of signals (train + test), a multiple of 10 for balanced classes.
        train_split: fraction used for training (the first ``train_split * num_samples``).
        seed: the generator's seed; the same seed gives the same data.
        dtype: floating dtype of the inputs.

    Returns:
        :class:`ClassificationData` with inputs ``(N, 40)`` (standardised over the whole dataset)
        and labels in ``[0, 10)``.

    Raises:
        ImportError: ``mnist1d`` is not installed.

    Example:
        >>> data = make_mnist1d(num_samples=200)
        >>> data.x_train.shape, data.x_test.shape, data.num_classes
        (torch.Size([160, 40]), torch.Size([40, 40]), 10)
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "make_mnist1d needs the `mnist1d` package; install it with "
            "`pip install mnist1d` (or the `examples` extra of lightning_flatness)."
        ) from err
    if not 0.0 < train_split < 1.0:
        raise ValueError(f"`train_split` must lie in (0, 1), got {train_split!r}.")
    if num_samples < 20:
        raise ValueError(f"`num_samples` must be at least 20 (two per class), got {num_samples!r}.")
    args = get_dataset_args()
    args.num_samples = int(num_samples)
    args.train_split = float(train_split)
    args.seed = int(seed)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return ClassificationData(
        x_train=torch.as_tensor(raw["x"], dtype=dtype),
        y_train=torch.as_tensor(raw["y"], dtype=torch.int64),
        x_test=torch.as_tensor(raw["x_test"], dtype=dtype),
        y_test=torch.as_tensor(raw["y_test"], dtype=torch.int64),
        num_classes=int(len(raw["templates"]["y"])),
    )


def randomize_labels(labels: Tensor, ratio: float, num_classes: int, *, seed: int) -> Tensor:
    """Replace a fraction ``ratio`` of the labels by uniformly random classes (Sec. 6.1).

    Exactly ``round(ratio * N)`` samples, chosen uniformly without replacement, get a label drawn
    uniformly from all ``num_classes`` classes, as in Zhang et al. (2017): a random label may equal
    the true one, so at ``ratio = 1`` about ``1 / num_classes`` of the labels are still correct and
    the labels carry no information about the inputs. The choice depends only on ``seed`` (a private
    ``torch.Generator``; the global RNG is untouched), and for one seed the corrupted set grows with
    ``ratio`` (the first ``round(ratio * N)`` entries of one permutation).

    Args:
        labels: ``(N,)`` int64 class indices.
        ratio: fraction in ``[0, 1]`` to corrupt.
        num_classes: number of classes ``K``.
        seed: seed of the corruption.

    Returns:
        A new ``(N,)`` int64 tensor; ``labels`` is not modified.

    Example:
        >>> y = torch.arange(10) % 3
        >>> noisy = randomize_labels(y, 0.3, num_classes=3, seed=0)
        >>> int((noisy != y).sum()) <= 3, torch.equal(randomize_labels(y, 0.0, 3, seed=0), y)
        (True, True)
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"`ratio` of random labels must lie in [0, 1], got {ratio!r}.")
    if labels.ndim != 1:
        raise ValueError(f"`labels` must be a 1-D tensor of class indices, got shape {tuple(labels.shape)}.")
    n = labels.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=gen)
    random_classes = torch.randint(0, num_classes, (n,), generator=gen, dtype=torch.int64)
    chosen = order[: int(round(ratio * n))]
    noisy = labels.clone()
    noisy[chosen] = random_classes[chosen].to(labels.device)
    return noisy
