"""Plain attributes that a model's forward rebinds, put back after a measurement.

Some models keep state between calls in plain module attributes, outside their parameters and buffers:
a stateful recurrent network carries its last hidden state to the next batch (``self.hidden = (h.detach(),
c.detach())``), a model keeps its last features or attention maps for ``training_step`` or a logger
(``self.last_features = x``), counts its calls (``self.calls += 1``). The measurement's forwards would leave
their own values there, so that the next training step would start from the measured batch's hidden state
(training changed), or fail on its batch size.

:func:`attributes_restored` copies each module's attribute dictionary (``module.__dict__``: references, not
the values) on entry and, on exit (also on error), binds every attribute rebound meanwhile to its object from
entry again and removes the attributes created meanwhile. Registered parameters, buffers and submodules live
in their own dictionaries (``_parameters``, ``_buffers``, ``_modules``) and are left to the rest of the
measurement context (:mod:`~lightning_flatness.functional.buffer_snapshot` puts buffer values back). Objects
changed in place (a list appended to, a tensor attribute written into) are not covered: only rebinding.

Cost: a shallow copy of each module's attribute dictionary on entry, one identity comparison per attribute
on exit (a few microseconds per module).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from lightning_flatness.functional.module_walk import modules_of

__all__ = ["attributes_restored"]

_MISSING = object()


@contextlib.contextmanager
def attributes_restored(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the modules of ``model`` may rebind or add plain attributes; on exit each holds the
    objects it held on entry, and no other (module docstring).

    Example:
        >>> import torch
        >>> class Stateful(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.calls = 0
        ...     def forward(self, x):
        ...         self.calls += 1
        ...         self.last = x
        ...         return x
        >>> net = Stateful()
        >>> with attributes_restored(net):
        ...     _ = net(torch.ones(1)), net(torch.ones(1))
        ...     inside = net.calls
        >>> inside, net.calls, hasattr(net, "last")
        (2, 0, False)
    """
    saved = [(module.__dict__, dict(module.__dict__)) for module in modules_of(model)]
    try:
        yield model
    finally:
        for now, before in saved:
            if len(now) == len(before) and all(now.get(k, _MISSING) is v for k, v in before.items()):
                continue
            for key in [k for k in now if k not in before]:
                del now[key]
            for key, value in before.items():
                if now.get(key, _MISSING) is not value:
                    now[key] = value
