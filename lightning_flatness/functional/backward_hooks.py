"""Module backward hooks suspended while a measurement differentiates the model.

A module backward hook (``register_full_backward_hook``, ``register_full_backward_pre_hook``, the older
``register_backward_hook``, and their global versions in ``torch.nn.modules.module``) is called by every
backward pass through the module, the estimators' included: it would receive the measurement's columns
(per-sample Gauss-Newton columns, probes) as if they were training gradients, and a library that keeps
state from them (per-sample gradient accumulators such as Opacus', gradient statistics, saliency maps)
would have that state changed by a measurement. A hook that changes the gradient (a clip, a reversal)
changes what the estimators compute, which is the Hessian of the loss, not of the hooks. And PyTorch runs
a module with such hooks through a custom autograd ``Function``, which the recorder cannot see, so the
per-layer fast paths stepped aside.

:func:`backward_hooks_suspended` takes every such hook out of the model's modules (and the global ones)
for the duration of a block and puts them back in their order on exit, also on error; the handles the
user holds stay valid. The global hooks are process-wide: another Python thread's backward passes during
the block run without them too (a training loop runs the measurement between its steps, on its own
thread). Forward hooks are not touched: they are part of the function being measured.
Tensor hooks that a ``forward`` registers on its intermediate tensors (``register_hook``, ``retain_grad``)
are left out likewise: by the recorder in the recorded forwards, by :class:`TensorHooksLeftOut` in the
forwards without gradient (where torch refuses them) and in those of the estimators that differentiate by
autograd alone (Hutchinson, finite differences). Not in the sharded FSDP2 measurement, whose forward
registers FSDP's own tensor hooks.
A measurement enters it with the rest of what holds while it runs
(:mod:`~lightning_flatness.functional.measurement_context`). Cost: one walk over the modules per call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_flatness.functional.module_walk import modules_of

__all__ = [
    "TensorHooksLeftOut",
    "backward_hooks_suspended",
    "left_out_tensor_hook",
    "registers_tensor_hook",
]

#: the tensor methods by which a forward asks for gradients of an intermediate tensor in training's backward
_TENSOR_HOOK_METHODS = frozenset(
    {Tensor.register_hook, Tensor.retain_grad, Tensor.register_post_accumulate_grad_hook}
)

F = TypeVar("F", bound=Callable[..., Any])


def _taken(hooks: dict) -> list:
    """``hooks``' entries, in order, removed from it (the dict object stays: handles refer to it)."""
    items = list(hooks.items())
    hooks.clear()
    return items


def _put_back(hooks: dict, items: list) -> None:
    """``items`` back into ``hooks`` in their order, before any hook added meanwhile."""
    added = list(hooks.items())
    hooks.clear()
    hooks.update(items)
    hooks.update(added)


@contextlib.contextmanager
def backward_hooks_suspended(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, no module backward hook of ``model`` (nor a global one) runs (module docstring).

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(2, 1)
        >>> calls = []
        >>> handle = layer.register_full_backward_hook(lambda module, grad_in, grad_out: calls.append(1))
        >>> with backward_hooks_suspended(layer):
        ...     layer(torch.ones(1, 2)).sum().backward()
        >>> layer(torch.ones(1, 2)).sum().backward()
        >>> len(calls), len(layer._backward_hooks)
        (1, 1)
    """
    globals_ = torch.nn.modules.module
    suspended: list[tuple[dict, list]] = []
    try:
        for hooks in (globals_._global_backward_hooks, globals_._global_backward_pre_hooks):
            if hooks:
                suspended.append((hooks, _taken(hooks)))
        for module in modules_of(model):
            for hooks in (module._backward_hooks, module._backward_pre_hooks):
                if hooks:
                    suspended.append((hooks, _taken(hooks)))
        yield model
    finally:
        for hooks, items in reversed(suspended):
            _put_back(hooks, items)


def registers_tensor_hook(func: Any) -> bool:
    """Whether ``func`` is ``Tensor.register_hook``, ``Tensor.retain_grad`` or
    ``Tensor.register_post_accumulate_grad_hook``: a forward's request for the gradient of an intermediate
    tensor in training's backward (a saliency map, gradient statistics). A measurement leaves it out, as
    it suspends module backward hooks; in a forward without gradient torch would refuse it outright."""
    try:
        return func in _TENSOR_HOOK_METHODS
    except TypeError:  # an unhashable callable
        return False


class _NoHandle:
    """What a left-out ``register_hook`` returns: a handle whose ``remove()`` has nothing to remove."""

    def remove(self) -> None:
        return None


def left_out_tensor_hook(func: Any) -> Any:
    """What a left-out :func:`registers_tensor_hook` call returns: None for ``retain_grad``, else a handle."""
    return None if func is Tensor.retain_grad else _NoHandle()


class TensorHooksLeftOut(TorchFunctionMode):
    """Within the block, :func:`registers_tensor_hook` calls do nothing (every other operation runs as it is):
    for the measurement's forward passes without gradient, where torch would refuse them on a tensor that
    does not require grad, and for those of the autograd-only estimators (``functional_loss``), whose
    backward passes would call them. (The recorded forwards leave them out in the recorder's own mode.)
    Cost: one Python call per operation of those forwards (measured: ``benchmarks/RESULTS.md``, round 25).

    Example:
        >>> import torch
        >>> with torch.no_grad(), TensorHooksLeftOut():
        ...     x = torch.ones(2) * 2
        ...     x.retain_grad()  # refused outside the block: x does not require grad
        ...     x.register_hook(lambda g: g).remove()
        >>> x
        tensor([2., 2.])
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        if registers_tensor_hook(func):
            return left_out_tensor_hook(func)
        return func(*args, **(kwargs or {}))
