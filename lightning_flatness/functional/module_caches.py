r"""Weights that a model reads through a cache of its own, recomputed from the parameters in a measurement.

timm's LeViT, EfficientFormer (v1 and v2), EfficientViT (MSRA) and TinyViT gather their attention biases
from a parameter table, ``attention_biases[:, attention_bias_idxs]``, and in eval mode keep the gathered
tensor in ``attention_bias_cache`` (a dict keyed by device), filled by the first forward in eval mode: a
validation step under ``torch.inference_mode``, or the measurement's own first forward. The estimators
differentiate the parameters that :func:`torch.func.functional_call` swaps in (or the live ones); to them
a cached bias is a constant. So the table's curvature read exactly 0 (its weights are a 2-D tensor that
the normalized measures count), and the recorder met a tensor it could not trace and left the Hessian
sketch aside.

:func:`recomputed_caches` replaces every such cache (:data:`CACHE_ATTRIBUTES`) for the duration of a block
by a dict that never reports an entry, so the model gathers its biases from the parameter it is given at
every call, as it does in training mode. The values are the same (the same gather); the original caches
and their contents go back afterwards, also on error. A measurement enters it with the rest of what holds
while it runs (:mod:`~lightning_flatness.functional.measurement_context`).

Cost: one gather of the bias table per attention call, as in training.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, TypeVar

from torch import nn

from lightning_flatness.functional.module_walk import modules_of

__all__ = ["CACHE_ATTRIBUTES", "recomputed_caches"]

#: Names of the dict attributes that hold a module's tensors derived from its parameters in eval mode.
CACHE_ATTRIBUTES = ("attention_bias_cache",)

F = TypeVar("F", bound=Callable[..., Any])


class _NeverHit(dict):
    """A dict whose ``in`` is always False: code that fills a cache on a miss recomputes at every call."""

    def __contains__(self, key: object) -> bool:
        return False


@contextlib.contextmanager
def recomputed_caches(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every cache of :data:`CACHE_ATTRIBUTES` in ``model`` misses (module docstring);
    the caches are put back on exit. Nested blocks swap nothing more.

    Example:
        >>> import torch
        >>> class Biased(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.attention_biases = torch.nn.Parameter(torch.ones(2))
        ...         self.attention_bias_cache = {}
        ...     def forward(self, x):
        ...         if "cpu" not in self.attention_bias_cache:
        ...             self.attention_bias_cache["cpu"] = self.attention_biases * 1.0
        ...         return x + self.attention_bias_cache["cpu"]
        >>> net = Biased()
        >>> with torch.no_grad():
        ...     _ = net(torch.zeros(2))  # an eval forward fills the cache with a constant
        >>> with recomputed_caches(net):
        ...     net(torch.zeros(2)).sum().backward()
        >>> net.attention_biases.grad.tolist(), net.attention_bias_cache["cpu"].requires_grad
        ([1.0, 1.0], False)
    """
    swapped: list[tuple[nn.Module, str, dict]] = []
    try:
        for module in modules_of(model):
            for name in CACHE_ATTRIBUTES:
                cache = module.__dict__.get(name)
                if isinstance(cache, dict) and not isinstance(cache, _NeverHit):
                    swapped.append((module, name, cache))
                    module.__dict__[name] = _NeverHit()
        yield model
    finally:
        for module, name, cache in reversed(swapped):
            module.__dict__[name] = cache
