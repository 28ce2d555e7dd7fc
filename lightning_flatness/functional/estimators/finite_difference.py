r"""The paper's Hessian-diagonal estimator (Algorithm 1, Appendix C eq. 60-61): Gaussian probes and
central differences of gradients, with a step per weight tensor scaled by its norm.

With :math:`\epsilon \sim \mathcal N(0, I)` and a step :math:`r_W` per weight tensor :math:`W`,

.. math::
    \hat h = \epsilon \odot
        \frac{\nabla L(\theta + r \odot \epsilon) - \nabla L(\theta - r \odot \epsilon)}{2 r},
    \qquad r_W = \texttt{relative\_step} \cdot \frac{\lVert W \rVert_F}{\sqrt{\operatorname{numel}(W)}},

i.e. ``r_W`` is ``relative_step`` times the root-mean-square entry of ``W`` (Appendix C chooses
``r`` "per weight matrix according to their Frobenius norm"; a tensor of zeros gets
``r_W = relative_step``). Bias: for a loss with three continuous derivatives, the central
difference is :math:`2 H (r \odot \epsilon) + O(r^3)` (even orders cancel), so
:math:`\mathbb E[\hat h_i] = \sum_j H_{ij} (r_j / r_i)\, \mathbb E[\epsilon_i \epsilon_j] + O(r^2)
= H_{ii} + O(r^2)`: unbiased up to :math:`O(r^2)`. On ReLU networks the gradient jumps where a
unit changes sign between :math:`\theta \pm r\epsilon`; those kinks add a bias and heavy-tailed
noise that the exact Hessian-vector products of :mod:`.hutchinson` do not have, whatever the
probe count; with a step small enough to cross no kink (float64) the error falls to what the
variance below predicts (measured: ``benchmarks/results/bench_accuracy_fd_study.md``).

Variance of one probe, per entry (Gaussian, quadratic part):
:math:`\operatorname{Var}[\hat h_i] = 2 H_{ii}^2 + \sum_{j \ne i} H_{ij}^2 (r_j / r_i)^2`, the
first term being absent for Rademacher probes (:math:`\operatorname{Var}[\epsilon_i^2] = 2`).

Use it to reproduce the paper, or for models with operations that have a gradient but no double
backward / forward-mode derivative (fused attention kernels): only first-order gradients are taken.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from lightning_flatness.functional.estimators._functional_model import (
    accumulation_dtype,
    functional_loss,
    mean_over_probes,
    rms,
)
from lightning_flatness.functional.model_io import ModelInputs
from lightning_flatness.functional.twice_differentiable import twice_differentiable

__all__ = ["finite_difference_hessian_diagonal", "finite_difference_steps"]

LossFn = Callable[[Tensor, Tensor], Tensor]

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def finite_difference_steps(params: Mapping[str, Tensor], relative_step: float = 1e-3) -> dict[str, float]:
    """The step ``r_W = relative_step * ||W||_F / sqrt(numel(W))`` of each weight tensor (Appendix C).

    A tensor whose entries are all zero gets ``r_W = relative_step`` (its RMS is taken as 1).

    Args:
        params: ``{name: W}``.
        relative_step: the step relative to the root-mean-square entry, > 0.

    Returns:
        ``{name: r_W}`` as Python floats.

    Example:
        >>> finite_difference_steps({"w": torch.full((2, 8), 3.0)}, relative_step=1e-3)
        {'w': 0.003}
    """
    if not isinstance(relative_step, (int, float)) or not math.isfinite(relative_step) or relative_step <= 0:
        raise ValueError(
            f"`relative_step` must be a finite number > 0 (default 1e-3), got {relative_step!r}."
        )
    return {n: relative_step * (rms(p) or 1.0) for n, p in params.items()}


def finite_difference_hessian_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: ModelInputs,
    target: Tensor,
    params: dict[str, nn.Parameter],
    *,
    num_probes: int = 64,
    generator: Optional[torch.Generator] = None,
    relative_step: float = 1e-3,
    chunk_size: Optional[int] = None,
    vectorize: bool = True,
) -> dict[str, Tensor]:
    r"""Hessian diagonal by the paper's Algorithm 1 / eq. 61: the mean over ``num_probes`` Gaussian
    probes of :math:`\epsilon \odot (\nabla L(\theta + r\epsilon) - \nabla L(\theta - r\epsilon)) / 2r`
    (module docstring: bias :math:`O(r^2)` plus ReLU kinks, variance per entry).

    :math:`L` is ``loss_fn(model(inputs), target)`` (a batch mean) as a function of the tensors in
    ``params``; the other parameters and the buffers are held fixed. The perturbed weights are
    copies passed through ``torch.func.functional_call``; the model's own tensors never change.

    Implementation: both gradients of ``chunk_size`` probes at once, ``torch.func.vmap`` over
    ``torch.func.grad`` (first-order derivatives only). When ``vmap`` cannot batch the model
    (missing batching rule, in-place updates such as train-mode BatchNorm's running statistics),
    a :class:`UserWarning` names the error and the same probes are evaluated in a loop of
    ``torch.autograd.grad`` calls.

    Cost: ``2 * num_probes`` gradient evaluations (forward + backward; measured per probe:
    ``benchmarks/RESULTS.md``, item 2); memory about
    ``2 * chunk_size`` times that of one gradient.

    Assumptions: ``r`` is small enough for the curvature to be constant over ``theta +- r eps``
    and large enough for round-off: the difference carries an error of about
    ``u * |grad L| / r`` (``u`` the unit round-off, 6e-8 in float32), so do not shrink
    ``relative_step`` much below 1e-3 in float32. Dropout left in train mode draws different
    masks at ``theta + r eps`` and ``theta - r eps`` and ruins the difference (warned for
    ``nn.Dropout`` modules; call ``model.eval()``).

    Args:
        model: used as it is (train/eval mode respected); its parameters, buffers and ``.grad``
            are never modified.
        loss_fn: ``(logits, target) -> scalar`` mean loss over the batch.
        inputs: what the model is called with (:func:`call_model`): a ``(N, ...)`` tensor, a tuple of
            positional arguments or a dict of keyword arguments (Hugging Face batches).
        target: ``(N, ...)`` tensor (``(N, T)`` token targets for ``(N, T, V)`` logits with
            :class:`TokenLoss`).
        params: ``{name: parameter}`` from ``select_parameters(model)``.
        num_probes: number of Gaussian probes (>= 1).
        generator: source of the probes; when given, the global RNG is not touched. The same
            generator state, ``num_probes`` and ``chunk_size`` give identical results.
        relative_step: ``r_W`` relative to the root-mean-square entry of each tensor (see
            :func:`finite_difference_steps`).
        chunk_size: probes per ``vmap`` call; default keeps ``chunk_size * numel`` below
            ``2**22`` (at most 16 probes).
        vectorize: ``False`` skips ``vmap`` and loops over the probes from the start (for models
            ``vmap`` cannot batch; avoids the warning).

    Returns:
        ``{name: diag}`` with ``params``' keys, each of the parameter's shape and dtype, detached.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1, bias=False)
        >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
        >>> exact = 2 * x.pow(2).mean(0)  # mean squared error: H = 2 X^T X / N
        >>> params = dict(model.named_parameters())
        >>> mse = lambda out, t: (out - t).pow(2).mean()
        >>> def error(num_probes):
        ...     g = torch.Generator().manual_seed(0)
        ...     est = finite_difference_hessian_diagonal(
        ...         model, mse, x, y, params, num_probes=num_probes, generator=g
        ...     )
        ...     return float((est["weight"][0] - exact).norm() / exact.norm())
        >>> error(4) > error(4096)
        True
        >>> error(4096) < 0.1
        True
    """
    steps = finite_difference_steps(params, relative_step)
    dropouts = [type(m).__name__ for m in model.modules() if isinstance(m, _DROPOUT) and m.training]
    if dropouts:
        warnings.warn(
            f"finite_difference_hessian_diagonal: {type(model).__name__} has {dropouts[0]} in train "
            f"mode, which draws different masks at theta + r*eps and theta - r*eps and ruins the "
            f"difference; call model.eval() first.",
            UserWarning,
            stacklevel=2,
        )
    # First derivatives suffice here; the composite execution lets vmap batch the probes through
    # kernels (fused attention) that have no batching rule or forward-mode derivative.
    with torch.enable_grad(), twice_differentiable(model):
        loss_of, primals = functional_loss(model, loss_fn, inputs, target, params)
        return mean_over_probes(
            primals,
            num_probes,
            chunk_size,
            "gaussian",
            generator,
            _vmapped_chunk(loss_of, primals, steps) if vectorize else None,
            lambda: _looped_chunk(loss_of, primals, steps),
            "finite_difference_hessian_diagonal",
            model,
            "a loop of gradient evaluations",
        )


def _one_probe_estimate(eps: Tensor, g_plus: Tensor, g_minus: Tensor, step: float) -> Tensor:
    return eps * (g_plus - g_minus) / (2.0 * step)


def _vmapped_chunk(
    loss_of: Callable[[dict[str, Tensor]], Tensor], primals: dict[str, Tensor], steps: dict[str, float]
) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
    """``eps (C, *shape) -> sum over the C probes of the eq. 61 term``, one vmapped call."""
    grad_fn = grad(loss_of)

    def one_probe(eps: dict[str, Tensor]) -> dict[str, Tensor]:
        g_plus = grad_fn({n: p + steps[n] * eps[n] for n, p in primals.items()})
        g_minus = grad_fn({n: p - steps[n] * eps[n] for n, p in primals.items()})
        return {n: _one_probe_estimate(eps[n], g_plus[n], g_minus[n], steps[n]) for n in eps}

    batched = vmap(one_probe, randomness="different")

    def chunk(probes: dict[str, Tensor]) -> dict[str, Tensor]:
        out = batched(probes)
        return {n: out[n].sum(0, dtype=accumulation_dtype(out[n].dtype)) for n in out}

    return chunk


def _looped_chunk(
    loss_of: Callable[[dict[str, Tensor]], Tensor], primals: dict[str, Tensor], steps: dict[str, float]
) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
    """``eps (C, *shape) -> sum over the C probes of the eq. 61 term``, one probe at a time."""
    names = list(primals)

    def gradient(sign: float, eps: dict[str, Tensor]) -> dict[str, Tensor]:
        theta = {n: (primals[n] + sign * steps[n] * eps[n]).requires_grad_(True) for n in names}
        grads = torch.autograd.grad(loss_of(theta), [theta[n] for n in names], allow_unused=True)
        return {n: torch.zeros_like(theta[n]) if g is None else g for n, g in zip(names, grads)}

    def chunk(probes: dict[str, Tensor]) -> dict[str, Tensor]:
        sums = {n: torch.zeros_like(p, dtype=accumulation_dtype(p.dtype)) for n, p in primals.items()}
        count = probes[names[0]].shape[0]
        for k in range(count):
            eps = {n: probes[n][k] for n in names}
            g_plus, g_minus = gradient(1.0, eps), gradient(-1.0, eps)
            for n in names:
                sums[n] += _one_probe_estimate(eps[n], g_plus[n], g_minus[n], steps[n])
        return sums

    return chunk
