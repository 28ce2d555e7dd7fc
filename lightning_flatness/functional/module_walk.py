"""One walk over a model's modules per measurement, shared by everything that looks for modules of a kind.

A measurement prepares the model in several independent steps (backward hooks suspended, caches bypassed,
attention, recurrent and mixture-of-experts modules run in explicit operations, ...), each of which looks at
every module, and the recorder does so again for every forward it records. :func:`modules_of` gives them the
list that :func:`walked_once` took when the measurement began (``model.modules()``, in its order), instead of
a fresh walk each: on the paper's MLP the walks were about 3 us each, a dozen of them per exact call. None of
these steps adds or removes modules, so the list stays right for the block.

Outside such a block (or for another module than the one it was entered for), :func:`modules_of` walks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["modules_of", "walked_once", "walking"]

_WALKS: dict[int, list[nn.Module]] = {}  # id(model) -> its modules, inside walked_once(model)


def modules_of(model: nn.Module) -> list[nn.Module]:
    """``list(model.modules())``: the walk taken by the enclosing :func:`walked_once` block, if any."""
    walk = _WALKS.get(id(model))
    return list(model.modules()) if walk is None else walk


def walking(model: nn.Module) -> bool:
    """Whether a :func:`walked_once` block for ``model`` is open (a measurement of it is under way)."""
    return id(model) in _WALKS


@contextlib.contextmanager
def walked_once(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Within the block, :func:`modules_of` ``(model)`` returns the modules walked on entry (nested blocks for
    the same model walk nothing more).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> with walked_once(net) as walk:
        ...     modules_of(net) is walk, len(walk)
        (True, 3)
    """
    if id(model) in _WALKS:
        yield _WALKS[id(model)]
        return
    walk = _WALKS[id(model)] = list(model.modules())
    try:
        yield walk
    finally:
        del _WALKS[id(model)]
