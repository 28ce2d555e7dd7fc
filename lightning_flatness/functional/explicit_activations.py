r"""Activation modules that hide a standard activation in a custom autograd Function, run as that
activation for a measurement only.

Some model libraries compute an activation inside a ``torch.autograd.Function`` with a hand-written
backward, e.g. Hugging Face's ``BloomGelu`` (BLOOM), which returns ``GeLUFunction.apply(x)``, the tanh
approximation of GELU. The estimators' recorder, a :class:`torch.overrides.TorchFunctionMode`, cannot see
through such a call (its output comes from a backward node the recorder did not record), so every
estimator fell back to per-sample backward passes, and the hand-written backward has no second
derivative for the Hessian sketch.

:func:`explicit_activations` runs each such module as the activation it computes, in one PyTorch op with
a node rule, for the duration of a ``with`` block (:data:`EXPLICIT_ACTIVATIONS`, keyed by the module's
class name and module path, so that no optional library is imported):

- ``BloomGelu``: ``F.gelu(x, approximate="tanh")``, i.e. ``x / 2 (1 + tanh(sqrt(2 / pi) (x + 0.044715
  x^3)))``. BLOOM's code writes ``sqrt(2 / pi)`` as ``0.79788456``, so the values differ in the last
  digits of float64 only, below float32 rounding (``tests/test_bloom.py`` bounds the difference).

On exit the modules are restored exactly (the instance ``forward`` attribute removed), also on exceptions.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_flatness.functional.instance_forwards import instance_forwards
from lightning_flatness.functional.module_walk import modules_of

__all__ = ["EXPLICIT_ACTIVATIONS", "explicit_activations"]

#: ``{(module path, class name): the activation it computes}``.
EXPLICIT_ACTIVATIONS: dict[tuple[str, str], Callable[[Tensor], Tensor]] = {
    ("transformers.models.bloom.modeling_bloom", "BloomGelu"): lambda x: F.gelu(x, approximate="tanh"),
}


def _activation(module: nn.Module) -> Callable[[Tensor], Tensor] | None:
    kind = type(module)
    return EXPLICIT_ACTIVATIONS.get((kind.__module__, kind.__name__))


@contextlib.contextmanager
def explicit_activations(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every module of ``model`` listed in :data:`EXPLICIT_ACTIVATIONS` runs the
    activation it computes (module docstring); a module whose ``forward`` was replaced on the instance
    already keeps it.

    Example:
        >>> import torch
        >>> class Hidden(torch.autograd.Function):  # a custom Function the recorder cannot see into
        ...     @staticmethod
        ...     def forward(ctx, x):
        ...         return torch.tanh(x)
        >>> class HiddenTanh(torch.nn.Module):
        ...     def forward(self, x):
        ...         return Hidden.apply(x)
        >>> EXPLICIT_ACTIVATIONS[(HiddenTanh.__module__, "HiddenTanh")] = torch.tanh
        >>> act = HiddenTanh()
        >>> with explicit_activations(act):
        ...     grad_fn = type(act(torch.ones(1, requires_grad=True)).grad_fn).__name__
        >>> grad_fn, "forward" in act.__dict__
        ('TanhBackward0', False)
        >>> del EXPLICIT_ACTIVATIONS[(HiddenTanh.__module__, "HiddenTanh")]
    """

    def forward(fn: Callable[[Tensor], Tensor]) -> Callable[..., Any]:
        return lambda self, x: fn(x)

    found = [(m, fn) for m in modules_of(model) if (fn := _activation(m)) is not None]
    with instance_forwards((m, forward(fn)) for m, fn in found):
        yield model
