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

__all__ = ["instance_forwards", "instance_methods", "replaceable"]


def replaceable(module: nn.Module, name: str = "forward") -> bool:
    """Whether ``module`` still runs its class's method ``name`` (no instance attribute replaces it)."""
    return name not in module.__dict__


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
    with instance_methods((m, "forward", fn) for m, fn in replacements):
        yield


@contextlib.contextmanager
def instance_methods(replacements: Iterable[tuple[nn.Module, str, Callable[..., Any]]]) -> Iterator[None]:
    """:func:`instance_forwards` for any method: within the block, each ``module`` of ``(module, name, fn)``
    runs ``fn(module, ...)`` for ``module.<name>(...)`` (a module whose callers use other methods than
    ``forward``: JetMoE's mixture of attention heads, ``map`` and ``reduce``)."""
    installed = [(m, name, fn) for m, name, fn in replacements if replaceable(m, name)]
    try:
        for m, name, fn in installed:
            setattr(m, name, types.MethodType(fn, m))
        yield
    finally:
        for m, name, _ in installed:
            m.__dict__.pop(name, None)
