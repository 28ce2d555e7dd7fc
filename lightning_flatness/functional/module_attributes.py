"""Plain attributes that a model's forward rebinds to carry state, put back after a measurement.

Some models keep state between calls in plain module attributes, outside their parameters and buffers:
a stateful recurrent network carries its last hidden state to the next batch (``self.hidden = (h.detach(),
c.detach())``), a model keeps its last features for ``training_step`` (``self.features = x``). The
measurement's forwards would leave their own values there, so that the next training step would start from
the measured batch's hidden state (training changed), or fail on its batch size.

:func:`attributes_restored` copies each module's attribute dictionary (``module.__dict__``: references, not
the values) on entry. On exit (also on error), a module that rebound an attribute holding tensors (a tensor,
or a tuple, list or dict with a tensor, before or after) gets every attribute it rebound meanwhile bound to
its object from entry again, the others with it (a tensor cache and the length it was built for go back
together). Attributes created meanwhile stay, and modules that rebound no tensor are left alone: lazy
set-up in a first forward pairs a new or flipped flag with changes made in place elsewhere (Hugging Face's
output-capturing hooks), which a rollback of the flag alone would make inconsistent. Registered parameters,
buffers and submodules live in their own dictionaries and are left to the rest of the measurement context
(:mod:`~lightning_flatness.functional.buffer_snapshot` puts buffer values back). Objects changed in place
(a list appended to) are not covered: only rebinding.

Cost: a shallow copy of each module's attribute dictionary on entry, one identity comparison per attribute
on exit (a few microseconds per module).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

from lightning_flatness.functional.module_walk import modules_of

__all__ = ["attributes_restored"]

_MISSING = object()


def _holds_tensors(value: Any) -> bool:
    """A tensor, or a tuple, list or dict with a tensor among its entries (one level)."""
    if isinstance(value, Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(isinstance(v, Tensor) for v in value)
    if isinstance(value, dict):
        return any(isinstance(v, Tensor) for v in value.values())
    return False


@contextlib.contextmanager
def attributes_restored(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the modules of ``model`` may rebind or add plain attributes; on exit a module that
    rebound tensor state holds the objects it held on entry again (module docstring).

    Example:
        >>> import torch
        >>> class Stateful(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.hidden, self.calls = torch.zeros(1), 0
        ...     def forward(self, x):
        ...         self.hidden, self.calls = self.hidden + x, self.calls + 1
        ...         return self.hidden
        >>> net = Stateful()
        >>> with attributes_restored(net):
        ...     _ = net(torch.ones(1)), net(torch.ones(1))
        ...     inside = net.calls, net.hidden.item()
        >>> inside, (net.calls, net.hidden.item())
        ((2, 2.0), (0, 0.0))
    """
    saved = [(module.__dict__, dict(module.__dict__)) for module in modules_of(model)]
    try:
        yield model
    finally:
        for now, before in saved:
            rebound = [(k, v) for k, v in before.items() if now.get(k, _MISSING) is not v]
            if any(_holds_tensors(v) or _holds_tensors(now.get(k)) for k, v in rebound):
                for key, value in rebound:
                    now[key] = value
