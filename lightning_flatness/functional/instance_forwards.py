"""Replace modules' ``forward`` on the instance for the duration of a ``with`` block; restore them exactly.

The measurement-only rewrites of :mod:`.composite_attention`, :mod:`.composite_recurrent`,
:mod:`.batch_first_transformers`, :mod:`.explicit_activations`, :mod:`.dense_experts` and
:mod:`.rms_norm_modules` share this: the replacement is an instance attribute (the class is never touched,
other instances are unaffected), and on exit, also on exceptions, the attribute is removed so that the class's
``forward`` applies again. A module whose ``forward`` was already replaced on the instance (by the user, or by
another rewrite entered first) is left alone.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch import nn

__all__ = ["instance_forwards", "replaceable"]


def replaceable(module: nn.Module) -> bool:
    """Whether ``module`` still runs its class's ``forward`` (no instance attribute replaces it)."""
    return "forward" not in module.__dict__


@contextlib.contextmanager
def instance_forwards(replacements: Iterable[tuple[nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    """Within the block, each ``module`` of ``(module, forward)`` runs ``forward(module, *args, **kwargs)``.

    Example:
        >>> import torch
        >>> layer = torch.nn.Identity()
        >>> with instance_forwards([(layer, lambda self, x: 2 * x)]):
        ...     inside = layer(torch.ones(1))
        >>> inside, layer(torch.ones(1)), "forward" in layer.__dict__
        (tensor([2.]), tensor([1.]), False)
    """
    installed = [(m, fn) for m, fn in replacements if replaceable(m)]
    try:
        for m, fn in installed:
            m.forward = types.MethodType(fn, m)
        yield
    finally:
        for m, _ in installed:
            m.__dict__.pop("forward", None)
