r"""In-place division by a weight-dependent tensor, evaluated out of place, for the Hessian sketch's recorded
forward pass only.

A mixture-of-experts router renormalizes its top-``k`` weights in place (Mixtral's
``router_top_value /= router_top_value.sum(-1, keepdim=True)``, Qwen3-MoE's with ``norm_topk_prob``). The
division's own curvature (:mod:`~lightning_flatness.functional.estimators.node_rules.division`) needs the
numerator before the division and an autograd handle on it, and an in-place division leaves neither, so the
recorder listed it as uncovered and ``auto`` measured the Gauss-Newton diagonal.

:class:`OutOfPlaceDivision` evaluates ``x /= y`` and ``x.div_(y)`` (``y`` a tensor that requires grad) as
``x.copy_(torch.div(x.clone(), y))``: the division runs out of place on a copy of the numerator (which the
recorder sees, with its node rule) and the result is written back into ``x``, so that ``x`` and every view
or alias of it hold the same values as after the in-place division, and autograd differentiates the same
function. Entered inside the recorder, like
:class:`~lightning_flatness.functional.explicit_sdpa.ExplicitAttention`, so that the recorder sees the three
operations it issues. Cost: one copy of ``x``. Integer division (``rounding_mode``) passes through.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["OutOfPlaceDivision"]

_IN_PLACE = (Tensor.__itruediv__, Tensor.div_, Tensor.true_divide_, Tensor.divide_)


class OutOfPlaceDivision(TorchFunctionMode):
    """Evaluates in-place divisions by a tensor that requires grad out of place, written back (module
    docstring); every other call passes through unchanged.

    Example:
        >>> import torch
        >>> w = torch.tensor([1.0, 3.0], requires_grad=True)
        >>> x = w * 2
        >>> with OutOfPlaceDivision():
        ...     x /= x.sum()
        >>> x
        tensor([0.2500, 0.7500], grad_fn=<CopyBackwards>)
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _IN_PLACE and len(args) == 2 and not kwargs:
            x, y = args
            if isinstance(x, Tensor) and isinstance(y, Tensor) and y.requires_grad:
                return x.copy_(torch.div(x.clone(), y))
        return func(*args, **kwargs)
