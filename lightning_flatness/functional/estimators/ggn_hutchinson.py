r"""Hutchinson's estimator with the exact Gauss-Newton diagonal as control variate.

With logits :math:`f_n = f(x_n; w)`, the mean loss :math:`L = \frac1N \sum_n \ell_n(f_n)`, the
Jacobian :math:`J = \partial f / \partial w` and :math:`g = \nabla_f L` (``g_n = \nabla \ell_n / N``),
the Hessian splits into the generalized Gauss-Newton matrix and a residual:

.. math::

    H = \underbrace{J^\top \Lambda J}_{\text{GGN}} + R, \qquad
    R = \sum_{n, c} g_{nc}\, \nabla^2_w f_{nc}, \qquad
    \Lambda = \nabla^2_f L \ (\text{block-diagonal}, \Lambda_n / N).

The estimator is

.. math:: \hat h = \operatorname{diag}(J^\top \Lambda J) + \frac1P \sum_{p=1}^P v_p \odot (R v_p),

with the first term computed exactly (the machinery of ``method="exact"``, :mod:`.exact`) and
``P`` Rademacher probes ``v_p`` for the second.

**Unbiased.** :math:`\mathbb{E}[v_i (Rv)_i] = \sum_j R_{ij}\,\mathbb{E}[v_i v_j] = R_{ii}`, so
:math:`\mathbb{E}[\hat h] = \operatorname{diag}(\mathrm{GGN}) + \operatorname{diag}(R)
= \operatorname{diag}(H)`. It stays unbiased when the probe entries of some tensors are set to zero
(``E[v_i v_j] = 0`` for ``j != i`` either way), which is done below for the tensors with
``diag(R) = 0``.

**The residual product in one Hessian-vector product.** :math:`R` is the Hessian in :math:`w` of
the scalar :math:`\phi(w) = \sum_{n,c} g_{nc} f_{nc}(w)` with :math:`g` held fixed at the current
weights (differentiate twice: :math:`\nabla^2 \phi = \sum g_{nc} \nabla^2 f_{nc}`). So
:math:`R v = (H - J^\top \Lambda J) v` is one forward-over-reverse product of :math:`\phi`: exactly
Hutchinson's cost per probe, reusing :func:`~.hutchinson.hutchinson_hessian_diagonal` (vmapped
over chunks of probes, with its double-backward fallback), instead of forming :math:`Hv` and
:math:`J^\top \Lambda J v` (a further JVP and VJP) and subtracting two large vectors.

**Variance.** Per entry and probe, :math:`\operatorname{Var}[v_i (Rv)_i] = \sum_{j \ne i} R_{ij}^2`
over the probed entries, against :math:`\sum_{j \ne i} H_{ij}^2` for plain Hutchinson. :math:`R` is
weighted by the loss gradient in the logits, small where the training loss is nearly minimised
(near zero for a fitted sample under cross-entropy), while the GGN part, which dominates ``H`` there,
carries no noise at all. Zero variance, and no probes evaluated, when the network is piecewise
linear in each weight (``method="exact"`` applies: ``diag(R) = 0``). Note that the residual
products alone would not be noise-free there: ``diag(R) = 0`` but :math:`R` has off-diagonal
blocks (:math:`\partial^2 f / \partial W_1 \partial W_2 \ne 0` between layers of a ReLU MLP). For
the same reason, tensors in which the network is piecewise linear (the last Linear layer of a tanh
MLP; anything upstream of which only piecewise-linear operations follow) get ``diag(R) = 0``
exactly and are left out of the probes, which removes their cross terms from the others' variance.

**Cost.** That of ``method="exact"`` (one forward, ``K <= D`` backward passes for ``D`` outputs per
sample, per-layer contractions) plus, when some tensor has a nonzero residual, one recorded forward
per selected tensor (no backward) and ``num_probes`` Hessian-vector products of :math:`\phi` over
the tensors with a residual (each about 2 gradient evaluations, as Hutchinson's). When a weight is
used twice or samples interact inside the model (train-mode BatchNorm), the Gauss-Newton part
takes ``N * K`` vectorised backward passes instead (warned).

**Assumptions.** The loss is a mean of per-sample losses (checked; else the Gauss-Newton part uses
the wrong :math:`\Lambda`: use ``method="hutchinson"``), twice differentiable in the logits, and the
model is deterministic (train-mode dropout or random draws in the forward raise: ``model.eval()``).

References: the GGN and its residual: N. N. Schraudolph, Neural Computation 14(7), 2002; J. Martens,
"New insights and perspectives on the natural gradient method", JMLR 21, 2020 (Sec. 8). Control
variates for Hutchinson's estimator: R. A. Meyer, C. Musco, C. Musco, D. P. Woodruff, "Hutch++",
SOSA 2021 (a low-rank part computed exactly, the rest probed).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from lightning_flatness.functional.estimators._functional_model import restore_module_tensors
from lightning_flatness.functional.estimators.exact import gauss_newton_diagonal
from lightning_flatness.functional.estimators.hutchinson import hutchinson_hessian_diagonal
from lightning_flatness.functional.model_io import ModelInputs

__all__ = ["ggn_hutchinson_hessian_diagonal"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _contraction(logits: Tensor, coefficients: Tensor) -> Tensor:
    """``phi = sum_{n,c} g_nc f_nc``: its Hessian in the weights is the residual ``R`` (``g`` fixed)."""
    return (logits * coefficients).sum()


def ggn_hutchinson_hessian_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: ModelInputs,
    target: Tensor,
    params: dict[str, nn.Parameter],
    *,
    num_probes: int = 64,
    generator: Optional[torch.Generator] = None,
    chunk_size: Optional[int] = None,
    vectorize: bool = True,
) -> dict[str, Tensor]:
    r"""Unbiased, low-variance estimate of the Hessian diagonal: the exact Gauss-Newton diagonal
    plus Hutchinson's estimate of the residual, ``diag(GGN) + mean_p v_p * (R v_p)`` (module
    docstring: decomposition, proof, variance, cost).

    :math:`H` is the Hessian of ``loss_fn(model(inputs), target)`` (a batch mean) in the tensors of
    ``params``; the other parameters and the buffers are held fixed. This is the ``diag(H)`` that
    eq. 13 and eq. 17 of the paper consume (Algorithm 1 / eq. 61 estimate it by finite differences).

    The residual's Hessian-vector products run under :func:`twice_differentiable` (inside
    :func:`hutchinson_hessian_diagonal`), so fused attention and hardswish/hardsigmoid are no
    obstacle; the Gauss-Newton part needs first derivatives only.

    Cost: ``method="exact"``'s (``K`` backward passes for ``K`` outputs per sample) plus
    ``num_probes`` Hessian-vector products (about 2 gradient evaluations each) over the tensors
    whose residual diagonal may be nonzero; none when the network is piecewise linear in each
    weight, where the result is the exact diagonal (zero variance).

    Args:
        model: used as it is (train/eval mode respected; no dropout in train mode); its parameters,
            buffers and ``.grad`` are never modified.
        loss_fn: ``(logits, target) -> scalar``, the mean of per-sample losses over the batch.
        inputs: what the model is called with (:func:`call_model`): a ``(N, ...)`` tensor, a tuple of
            positional arguments or a dict of keyword arguments (Hugging Face batches).
        target: ``(N, ...)`` tensor (``(N, T)`` token targets for ``(N, T, V)`` logits with
            :class:`TokenLoss`).
        params: ``{name: parameter}`` from ``select_parameters(model)``.
        num_probes: Rademacher probes of the residual (>= 1; unused when it is zero).
        generator: source of the probes; when given, the global RNG is not touched. The same
            generator state, ``num_probes`` and ``chunk_size`` give identical results.
        chunk_size: probes per ``vmap`` call (as for :func:`hutchinson_hessian_diagonal`).
        vectorize: ``False`` evaluates the probes in a double-backward loop instead of ``vmap``.

    Returns:
        ``{name: diag}`` with ``params``' keys, each of the parameter's shape and dtype, detached.
        Entries may be negative.

    Raises:
        ValueError: the loss is not a mean of per-sample losses, or the model draws random numbers
            in its forward (train-mode dropout); ``num_probes`` is not a positive int; the model
            output is not a finite ``(N, ...)`` tensor.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
        ... ).double()
        >>> x, y = torch.randn(32, 3, dtype=torch.float64), torch.randint(0, 2, (32,))
        >>> params = {"0.weight": model[0].weight}
        >>> loss = lambda w: F.cross_entropy(torch.func.functional_call(model, {"0.weight": w}, (x,)), y)
        >>> exact = torch.func.hessian(loss)(model[0].weight.detach()).reshape(12, 12).diagonal().detach()
        >>> def error(num_probes):
        ...     g = torch.Generator().manual_seed(0)
        ...     est = ggn_hutchinson_hessian_diagonal(model, F.cross_entropy, x, y, params,
        ...                                           num_probes=num_probes, generator=g)
        ...     return float((est["0.weight"].flatten() - exact).norm() / exact.norm())
        >>> error(4096) < error(16) < 0.2
        True
    """
    if not isinstance(num_probes, int) or isinstance(num_probes, bool) or num_probes < 1:
        raise ValueError(f"`num_probes` must be a positive int, got {num_probes!r}.")
    name = "ggn_hutchinson_hessian_diagonal"
    with torch.enable_grad():
        ggn = gauss_newton_diagonal(model, loss_fn, inputs, target, params, caller=name)
        if ggn.loss_issues:
            raise ValueError(
                f"{name}: {ggn.loss_issues[0]}. The Gauss-Newton part needs a mean of per-sample "
                f"losses; use method='hutchinson' for any other loss."
            )
        if ggn.random_ops:
            draws = "; ".join(ggn.random_ops[:3])
            raise ValueError(
                f"{name}: the model draws random numbers in its forward ({draws}), so it is a "
                f"different function at every call; call model.eval() first (or use "
                f"method='hutchinson', which averages the Hessian over the random draws)."
            )
        noisy = {n: p for n, p in params.items() if ggn.tensor_issues[n]}
        if not noisy:
            return ggn.diagonal
        with restore_module_tensors(model):  # functional_call and shared submodules (see there)
            residual = hutchinson_hessian_diagonal(
                model,
                _contraction,
                inputs,
                ggn.logits_grad,
                noisy,
                num_probes=num_probes,
                generator=generator,
                chunk_size=chunk_size,
                vectorize=vectorize,
            )
    return {n: d + residual[n].to(d.dtype) if n in residual else d for n, d in ggn.diagonal.items()}
