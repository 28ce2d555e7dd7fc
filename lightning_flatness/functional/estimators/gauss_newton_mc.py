r"""Monte-Carlo generalized Gauss-Newton diagonal: cost independent of the number of classes,
first derivatives only.

With logits :math:`f_n`, the mean loss :math:`L = \frac1N \sum_n \ell_n(f_n)`, per-sample Jacobians
:math:`J_n = \partial f_n / \partial w` and :math:`\Lambda_n = \nabla^2_f \ell_n`, the Gauss-Newton
diagonal is

.. math:: \mathrm{diag}(G) = \frac1N \sum_n \mathrm{diag}(J_n^\top \Lambda_n J_n).

The ``"exact"`` method (:mod:`.exact`) factorises every :math:`\Lambda_n` into about ``K`` columns
(``K`` classes) and pays one backward column each. Here :math:`\Lambda_n` is replaced by a few
*sampled* signed columns with :math:`\mathbb{E}[\sum_k s_k c_{nk} c_{nk}^\top] = \Lambda_n`
(:mod:`~lightning_flatness.functional.loss_hessian_factors`; for cross-entropy ``c = p - e_y`` with
``y`` drawn from the model's softmax, as in BackPACK's ``DiagGGNMC`` [1] and the Fisher of Martens &
Grosse [2]). Then

.. math::

    \hat g = \frac1N \sum_n \sum_k s_k \,(J_n^\top c_{nk})^2, \qquad
    \mathbb{E}[\hat g] = \frac1N \sum_n \mathrm{diag}\big(J_n^\top\, \mathbb{E}[\textstyle\sum_k s_k c_{nk}
    c_{nk}^\top]\, J_n\big) = \mathrm{diag}(G),

because :math:`(J_n^\top c)^2_i = (J_n^\top c c^\top J_n)_{ii}` is linear in :math:`c c^\top`. Unbiased.

**Variance.** The draws are independent across samples, so the noise of the mean over ``N``
samples falls as ``1/N`` (and as ``1/num_mc_samples``); the jackknife over sample groups of
:class:`NormalizedSharpness` covers it together with the sampling of the data.

**Cost.** One forward pass and one batched backward pass of ``C`` columns over the batch, with the
per-layer contractions of :mod:`.exact` (Linear: ``sum_n s (g_n^2)(a_n^2)^T``; Conv: unfolded
per-sample gradients). ``C`` does not depend on ``K``: ``num_mc_samples + 2`` for ``F.cross_entropy``
(by default its two most probable classes are exact, the tail sampled; ``exact_classes=0``:
``num_mc_samples``),
``2 + 2 num_mc_samples`` for eq. 20 (:func:`normalized_softmax_cross_entropy`; two exact columns of
its rank-2 part) and ``2 num_mc_samples`` for the autograd fallback (any other loss; that fallback's own
cost grows with ``K``: see :func:`~lightning_flatness.functional.loss_hessian_factors.autograd_columns`).
Columns of more than :data:`COLUMN_ELEMENTS` entries in all (a language model's vocabulary at every
token) go backward in groups of draws, one pass each after the one recorded forward
(:func:`draw_groups`). When samples interact
inside the model or a weight is used outside Linear/Conv (timm's ``pos_embed`` / ``cls_token``,
embedding tables), the per-(sample, column) path is taken: ``N * C`` vectorised backward passes.
No double backward anywhere: it runs through fused attention (SDPA flash/efficient kernels) and
hardswish / hardsigmoid.

**What it measures.** The Gauss-Newton diagonal, which equals the Hessian diagonal only when the
network is piecewise linear in each weight (ReLU nets: see :mod:`.exact`); for transformers the
residual ``H - G`` is left out.

References:
    [1] F. Dangel, F. Kunstner, P. Hennig. BackPACK: Packing more into backprop. ICLR 2020
    (``backpack.extensions.DiagGGNMC``).
    [2] J. Martens, R. Grosse. Optimizing neural networks with Kronecker-factored approximate
    curvature. ICML 2015 (sampled targets for the Fisher).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from lightning_flatness.functional.estimators.gauss_newton import gauss_newton_from_columns
from lightning_flatness.functional.loss_hessian_factors import (
    default_exact_classes,
    default_mc_samples,
    sample_loss_hessian_columns,
)
from lightning_flatness.functional.model_io import ModelInputs

__all__ = ["COLUMN_ELEMENTS", "draw_groups", "gauss_newton_mc_diagonal"]

LossFn = Callable[[Tensor, Tensor], Tensor]
#: Bound on the entries of one group of loss-Hessian columns ``(N, D, C)`` (:func:`draw_groups`): the
#: backward columns of a group take about this many entries at the logits.
COLUMN_ELEMENTS = 2**27


def gauss_newton_mc_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: ModelInputs,
    target: Tensor,
    params: dict[str, nn.Parameter],
    *,
    num_mc_samples: int | None = None,
    generator: torch.Generator | None = None,
    exact_classes: int | None = None,
) -> dict[str, Tensor]:
    r"""Unbiased Monte-Carlo estimate of the Gauss-Newton diagonal ``diag(J^T Lambda J) / N``.

    See the module docstring for the estimator, its cost (``C`` backward columns, independent of the
    number of classes) and its variance.

    Args:
        model: the network, used in its current train/eval mode and never modified (parameters,
            buffers and ``.grad`` untouched; temporary hooks removed).
        loss_fn: ``(logits, target) -> scalar``, the mean of per-sample losses (``F.cross_entropy``,
            :func:`normalized_softmax_cross_entropy`, :class:`TokenLoss` of either, or any other
            such loss through the autograd fallback).
        inputs: a tensor, a tuple (positional arguments) or a dict (keyword arguments) with the
            samples along dim 0; the output may be a tensor, a tuple or a dict / ``ModelOutput``
            with ``"logits"`` (:func:`~lightning_flatness.functional.model_io.call_model`).
        target: ``(N,)`` class indices, ``(N, T)`` token labels for :class:`TokenLoss`, or whatever
            ``loss_fn`` takes.
        params: ``{name: parameter}`` of ``model`` (see :func:`select_parameters`).
        num_mc_samples: Monte-Carlo draws per sample (the variance falls as ``1/num_mc_samples``);
            ``None``: the loss's default
            (:data:`~lightning_flatness.functional.loss_hessian_factors.DEFAULT_MC_SAMPLES`:
            8 for eq. 20, whose indefinite Hessian makes single draws cancel between samples, else 1).
        generator: a ``torch.Generator`` on the model's device for the draws, or None for the global
            RNG (with a generator the global RNG is untouched).
        exact_classes: softmax losses only: the ``m`` most probable classes of each sample enter
            exactly, only the tail is sampled (``m`` more backward columns; variance reduction, see
            :func:`~lightning_flatness.functional.loss_hessian_factors.cross_entropy_columns`). None:
            the measured default of the loss
            (:data:`~lightning_flatness.functional.loss_hessian_factors.DEFAULT_EXACT_CLASSES`: 2 for
            ``F.cross_entropy``, 0 otherwise); 0 gives BackPACK's ``DiagGGNMC`` estimator for
            cross-entropy.

    Returns:
        ``{name: diag}`` with each parameter's shape and dtype; entries may be negative for the
        indefinite eq. 20 Hessian.

    Raises:
        ValueError: no parameters, ``num_mc_samples < 1``, a model output that is not a finite
            ``(N, ...)`` tensor, or a loss that is not a mean of per-sample losses.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1000))
        >>> x, y = torch.randn(16, 3), torch.randint(0, 1000, (16,))
        >>> params = {"0.weight": model[0].weight}
        >>> gen = torch.Generator().manual_seed(0)
        >>> est = gauss_newton_mc_diagonal(model, F.cross_entropy, x, y, params, generator=gen)
        >>> est["0.weight"].shape  # 3 backward columns (1 draw, 2 exact classes) for 1,000 classes
        torch.Size([5, 3])
    """
    if exact_classes is None:
        exact_classes = default_exact_classes(loss_fn)
    if num_mc_samples is None:
        num_mc_samples = default_mc_samples(loss_fn)

    def sampled_columns(logits: Tensor, y: Tensor) -> Iterator[tuple[Tensor, Tensor, list[str]]]:
        for columns, signs in draw_groups(loss_fn, logits, y, num_mc_samples, generator, exact_classes):
            yield (
                columns.to(logits.dtype),
                signs.to(logits.dtype).unsqueeze(0).expand(logits.shape[0], -1),
                [],
            )

    return gauss_newton_from_columns(
        model, inputs, target, params, sampled_columns, "gauss_newton_mc_diagonal"
    )


def draw_groups(
    loss_fn: LossFn,
    logits: Tensor,
    target: Tensor,
    num_mc_samples: int,
    generator: torch.Generator | None,
    exact_classes: int,
) -> Iterator[tuple[Tensor, Tensor]]:
    """The loss-Hessian columns of ``num_mc_samples`` draws
    (:func:`~lightning_flatness.functional.loss_hessian_factors.sample_loss_hessian_columns`), in groups
    of draws whose ``(N, D, C)`` columns stay within about :data:`COLUMN_ELEMENTS` entries (one group,
    the plain call, when all of them do). The groups of draws alone (``draws_only``) come first; the last
    group carries the exact columns too, as many as it has beyond its draws' width (each draw the same
    number of columns, as a group of draws alone shows). Each group's draws are rescaled from
    ``1/sqrt(its draws)`` to ``1/sqrt(num_mc_samples)``, so the groups' Gauss-Newton diagonals add up to the
    one of all draws at once (the same estimator: the draws are independent). For a language model's
    ``(N, T, V)`` logits one draw alone is two columns of the logits' size, so the groups bound the memory
    that the ``C`` backward columns take."""
    n, d = logits.shape[0], logits[0].numel()
    per_group = max(1, COLUMN_ELEMENTS // max(1, n * d) // 2)  # at most 2 columns per draw
    if per_group >= num_mc_samples:
        yield sample_loss_hessian_columns(
            loss_fn, logits, target, num_mc_samples, generator, exact_classes=exact_classes
        )
        return
    sizes = [min(per_group, num_mc_samples - start) for start in range(0, num_mc_samples, per_group)]
    width = 0  # columns per draw
    for i, draws in enumerate(sizes):
        last = i == len(sizes) - 1
        columns, signs = sample_loss_hessian_columns(
            loss_fn, logits, target, draws, generator, exact_classes=exact_classes, draws_only=not last
        )
        if not last:
            width = columns.shape[2] // draws
        columns[:, :, columns.shape[2] - width * draws :] *= math.sqrt(draws / num_mc_samples)
        yield columns, signs
