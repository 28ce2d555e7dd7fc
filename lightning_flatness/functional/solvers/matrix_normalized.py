r"""Matrix-normalized sharpness (eq. 13) and the Hessian trace (eq. 5) of one weight tensor."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["hessian_trace", "matrix_normalized_sharpness"]


def _result_dtype(*tensors: Tensor) -> torch.dtype:
    """The inputs' promoted floating dtype (the default dtype for integer inputs)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype if dtype.is_floating_point else torch.get_default_dtype()


def _float64(t: Tensor) -> Tensor:
    """Detached float64 copy for the solvers; on the CPU for devices without float64 (Apple MPS)."""
    t = t.detach()
    if t.device.type == "mps":
        t = t.cpu()
    return t.to(torch.float64)


def _to_result(value: Tensor, dtype: torch.dtype, like: Tensor) -> Tensor:
    """Cast a float64 result to ``dtype`` and move it to ``like``'s device."""
    return value.to(dtype).to(like.device)


def matrix_normalized_sharpness(weight: Tensor, hessian_diagonal: Tensor) -> Tensor:
    r"""Matrix-normalized sharpness of one weight tensor: its term of eq. 13.

    .. math:: \sqrt{\|W\|_F^2 \, H}, \qquad H = \sum_{w \in W} \max\Big(\frac{\partial^2
              \mathcal{L}}{\partial w^2}, 0\Big)

    (eq. 9 with Algorithm 1's clipping of negative diagonal entries). Relation to eq. 17: with a
    single variance ``sigma^2`` for the whole tensor, the minimum of eq. 10,
    ``min_sigma H sigma^2 + ||W||_F^2 / (2 lam sigma^2)``, is ``sqrt(2 / lam)`` times this value
    (eq. 11-12); eq. 13 drops that constant. So
    ``normalized_sharpness(W, h, lam) <= sqrt(2 / lam) * matrix_normalized_sharpness(W, h)``, with
    equality at ``lam = 2`` and when ``W^2 / h`` is constant.

    Cost ``O(numel)``, computed in float64. Any shape (1-D tensors are allowed here).

    Args:
        weight: the weight tensor ``W``.
        hessian_diagonal: the diagonal of the Hessian for ``W``, same shape, unclipped.

    Returns:
        0-dim tensor in the inputs' floating dtype.

    Example:
        >>> import torch
        >>> w = torch.tensor([[3.0, 4.0]])                 # ||W||_F^2 = 25
        >>> h = torch.tensor([[4.0, -1.0]])                # clipped sum 4
        >>> matrix_normalized_sharpness(w, h)
        tensor(10.)
    """
    if hessian_diagonal.shape != weight.shape:
        raise ValueError(
            f"Hessian diagonal has shape {tuple(hessian_diagonal.shape)} but the weight has "
            f"{tuple(weight.shape)}; pass the diagonal of this weight tensor."
        )
    dtype = _result_dtype(weight, hessian_diagonal)
    w, h = _float64(weight), _float64(hessian_diagonal)
    return _to_result(torch.sqrt(w.square().sum() * h.clamp_min(0).sum()), dtype, weight)


def hessian_trace(hessian_diagonal: Tensor) -> Tensor:
    r"""Trace of the Hessian restricted to one tensor: eq. 5's sharpness measure, ``sum(h)``.

    No clipping: negative curvature counts with its sign, as in the trace. Not invariant to
    rescalings of the weights (Dinh et al.; Sec. 5.1), which is the point of comparing it with the
    normalized measures. Summed in float64. Cost ``O(numel)``.

    Args:
        hessian_diagonal: the Hessian diagonal of one tensor (any shape).

    Returns:
        0-dim tensor in the input's floating dtype.

    Example:
        >>> import torch
        >>> hessian_trace(torch.tensor([[1.0, -0.5], [2.0, 0.0]]))
        tensor(2.5000)
    """
    dtype = _result_dtype(hessian_diagonal)
    return _to_result(_float64(hessian_diagonal).sum(), dtype, hessian_diagonal)
