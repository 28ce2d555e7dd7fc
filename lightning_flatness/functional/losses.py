"""Surrogate losses for sharpness (Tsuzuku et al. 2020, Sec. 5.4, eq. 20-22)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["normalized_softmax_cross_entropy", "normalize_logits"]


def normalize_logits(logits: Tensor) -> Tensor:
    r"""Standardise each row of logits: eq. 21-22, shifted by its mean.

    .. math:: f'(z) = \frac{f(z) - \mu}{\sqrt{\frac1K \sum_i (f(z)[i] - \mu)^2}}

    Eq. 22 divides ``f`` (not ``f - mu``) by the standard deviation; softmax is invariant to the
    shift, so subtracting ``mu`` changes no loss value and keeps the logits well conditioned.

    Degenerate rows: when a sample's logits are all equal (standard deviation at most
    ``16 * eps * max|f|`` of its dtype, i.e. zero up to rounding), the normalised logits are defined
    as all zeros, so the softmax is uniform and the loss is ``ln K``, the limit of every
    non-degenerate neighbourhood's *value* (the loss is bounded by the uniform case on that ray);
    gradients there are zero and finite.

    Args:
        logits: ``(N, K)`` with ``K >= 2``.

    Returns:
        ``(N, K)`` tensor, each row with mean 0 and population variance 1 (or all zeros).
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"normalized_softmax_cross_entropy expects logits of shape (N, K) with K >= 2 classes, "
            f"got shape {tuple(logits.shape)}; flatten extra dimensions into the batch first."
        )
    centred = logits - logits.mean(dim=1, keepdim=True)
    var = centred.pow(2).mean(dim=1, keepdim=True)
    scale = logits.detach().abs().amax(dim=1, keepdim=True)
    degenerate = (
        var.detach().sqrt() <= 16 * torch.finfo(logits.dtype).eps * scale + torch.finfo(logits.dtype).tiny
    )
    # Replace the variance *before* the square root so that no inf/NaN reaches the backward pass.
    safe_std = torch.where(degenerate, torch.ones_like(var), var).sqrt()
    return torch.where(degenerate, torch.zeros_like(centred), centred / safe_std)


def normalized_softmax_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    r"""Normalized-softmax-cross-entropy, eq. 20-22, averaged over the batch.

    .. math:: \ell(z) = -\ln \frac{\exp(f'(z)[y_z])}{\sum_i \exp(f'(z)[i])}

    with ``f'`` the logits standardised per sample (:func:`normalize_logits`). The loss is invariant
    to multiplying a sample's logits by any positive constant and to adding any constant to them
    (Sec. 5.4, conditions 1 and 2), which is what makes normalized sharpness comparable between
    models of equal accuracy. Its Hessian in the logits is indefinite in general.

    Cost: O(N K). Twice differentiable wherever a sample's logits are not all equal.

    Args:
        logits: ``(N, K)`` unnormalised scores.
        target: ``(N,)`` integer class indices in ``[0, K)``.

    Returns:
        Scalar tensor: the mean loss over the ``N`` samples.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[1.0, 2.0, 4.0], [0.0, 0.0, 0.0]])
        >>> target = torch.tensor([2, 1])
        >>> loss = normalized_softmax_cross_entropy(logits, target)
        >>> torch.allclose(loss, normalized_softmax_cross_entropy(10 * logits - 3, target))
        True
        >>> round(float(normalized_softmax_cross_entropy(logits[1:], target[1:])), 4)  # ln 3
        1.0986
    """
    return F.cross_entropy(normalize_logits(logits), target)
