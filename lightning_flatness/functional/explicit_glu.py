r"""``F.glu`` (``nn.GLU``) in explicit operations, for the sketched Hessian diagonal only.

The gated linear unit halves its input along ``dim`` and gates the first half by the sigmoid of the second,

.. math:: \mathrm{glu}(x) = a \odot \sigma(b), \qquad (a, b) = x\ \text{split in two along}\ \texttt{dim},

as the convolution modules of Conformers do (wav2vec 2.0's Conformer, Wav2Vec2-BERT: pointwise
convolution, GLU, depthwise convolution). The estimators' recorder sees ``glu`` as one operation, which no
node rule covers, so the sketched Hessian diagonal did not apply and ``auto`` measured the Gauss-Newton
diagonal. :class:`ExplicitGlu` is a :class:`torch.overrides.TorchFunctionMode` entered *inside* the
recorder (as :class:`~lightning_flatness.functional.explicit_sdpa.ExplicitAttention` is): it evaluates each
``glu`` call as two ``narrow`` views, a ``sigmoid`` and a product, each with a node rule (the product's
curvature couples ``a`` and ``b``; the sigmoid's own is elementwise). The same function, with derivatives
of every order; values equal the kernel's to float rounding (tested). Cost: that of the kernel's forward, in
three ops instead of one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["ExplicitGlu", "explicit_glu"]


def explicit_glu(input: Tensor, dim: int = -1) -> Tensor:
    """``F.glu(input, dim)`` as ``a * sigmoid(b)`` with ``a``, ``b`` the two halves of ``input`` along
    ``dim`` (module docstring); the same error as ``F.glu`` for an odd size.

    Example:
        >>> import torch
        >>> x = torch.randn(2, 6, 3)
        >>> torch.allclose(explicit_glu(x, 1), torch.nn.functional.glu(x, 1))
        True
    """
    size = input.shape[dim]
    if size % 2:
        raise RuntimeError(f"Halving dimension must be even, but dimension {dim} is size {size}")
    half = size // 2
    return input.narrow(dim, 0, half) * torch.sigmoid(input.narrow(dim, half, half))


class ExplicitGlu(TorchFunctionMode):
    """Evaluates ``F.glu`` calls (``nn.GLU`` calls it) by :func:`explicit_glu`; every other call passes
    through unchanged."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.glu:
            names = ("input", "dim")
            bound = dict(zip(names, args))
            bound.update(kwargs)
            return explicit_glu(**bound)
        return func(*args, **kwargs)
