r"""Hutchinson's estimator of the Hessian diagonal: Rademacher probes, exact Hessian-vector products.

Let :math:`H` be the Hessian of the mean training loss in the selected weights and :math:`v` a
Rademacher vector (independent entries :math:`\pm 1`). The estimator is

.. math:: \hat h = v \odot (H v), \qquad \mathbb{E}[\hat h] = \operatorname{diag}(H).

Proof: :math:`\mathbb{E}[\hat h_i] = \sum_j H_{ij}\,\mathbb{E}[v_i v_j]`, and
:math:`\mathbb{E}[v_i v_j] = \delta_{ij}` for independent zero-mean unit-variance entries, so
:math:`\mathbb{E}[\hat h_i] = H_{ii}`. :math:`\square`

Variance of one probe, per entry: :math:`\hat h_i = H_{ii} + \sum_{j \ne i} H_{ij} v_i v_j` with
:math:`v_i^2 = 1`, so :math:`\operatorname{Var}[\hat h_i] = \sum_{j \ne i} H_{ij}^2` (the sum runs
over the selected weights only). The mean of ``num_probes`` probes has this divided by
``num_probes``: the error falls like ``1 / sqrt(num_probes)`` and is large per entry when the
Hessian has heavy off-diagonal rows: on small ReLU MLPs the relative error of the whole diagonal is
still of order one at hundreds of probes (measured errors and costs: ``benchmarks/RESULTS.md``,
items 1 and 2). Use several groups (:func:`hessian_diagonal_groups`) for an
error bar.

References: C. Bekas, E. Kokiopoulou, Y. Saad, "An estimator for the diagonal of a matrix",
Applied Numerical Mathematics 57 (2007); J. Martens, I. Sutskever, K. Swersky, "Estimating the
Hessian by back-propagating curvature", ICML 2012; the same estimator in curvlinops
(``curvlinops/diagonal/hutchinson.py``, F. Dangel et al.).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional, cast

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from lightning_flatness.functional.estimators._functional_model import (
    accumulation_dtype,
    first_line,
    functional_loss,
    mean_over_probes,
)
from lightning_flatness.functional.model_io import ModelInputs
from lightning_flatness.functional.twice_differentiable import twice_differentiable

if TYPE_CHECKING:
    from torch.autograd.graph import Node

__all__ = ["hutchinson_hessian_diagonal"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def hutchinson_hessian_diagonal(
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
    r"""Unbiased estimate of the Hessian diagonal, the mean of ``num_probes`` Rademacher probes
    :math:`v \odot (H v)` (module docstring: estimator, proof, variance, references).

    :math:`H` is the Hessian of ``loss_fn(model(inputs), target)`` (a batch mean) in the tensors of
    ``params``; the other parameters and the buffers are held fixed.

    Implementation: exact Hessian-vector products by forward-over-reverse differentiation,
    ``torch.func.jvp`` of ``torch.func.grad`` of the functional loss, batched over ``chunk_size``
    probes at once by ``torch.func.vmap`` (no Python loop over probes).

    Cost: each probe costs about as much as 2-3 gradient evaluations (one forward and one
    backward pass, each carrying a tangent), i.e. ``num_probes`` Hessian-vector products (measured
    gradient evaluations per probe: ``benchmarks/RESULTS.md``, item 2); memory about ``chunk_size``
    times that of one Hessian-vector product. The first forward-mode call in a process also spends a
    few seconds while torch loads its JVP decompositions.
    Train-mode BatchNorm is handled by ``vmap`` (batch statistics; the running statistics are
    updated only in throw-away clones).

    Twice-differentiable execution: the products run under :func:`twice_differentiable` (SDPA on
    its math backend, timm ``fused_attn = False``, Hugging Face eager attention, composite
    hardswish/hardsigmoid), restored on return; the values are those of the fused kernels to float
    rounding, so torchvision, timm and Hugging Face models need no change.

    Fallback: when ``torch.func`` cannot handle the model (an operation without a batching rule
    or forward-mode derivative, an ``autograd.Function`` without ``setup_context``/``jvp``; or
    ``F.mse_loss(reduction="mean")``, whose forward-over-reverse derivative fails with
    "ZeroTensors are immutable" in current torch, pytorch/pytorch#123996), a
    :class:`UserWarning` names the error and the same probes are evaluated in a loop: one gradient
    with ``create_graph=True``, then one double-backward product per probe. Same estimate (same
    probes for the same ``generator`` state), slower. If double backward is impossible too
    (``@once_differentiable`` functions), a :class:`RuntimeError` says to use
    ``method="finite_difference"``.

    Assumptions: the loss is twice differentiable in the selected weights almost everywhere
    (ReLU's kinks are a null set; its Hessian there is that of the piecewise-linear network).
    Stochastic layers left in train mode (dropout) draw a new mask per probe from the global RNG,
    so the result estimates the diagonal averaged over masks.

    Args:
        model: used as it is (train/eval mode respected); its parameters, buffers and ``.grad``
            are never modified.
        loss_fn: ``(logits, target) -> scalar`` mean loss over the batch.
        inputs: what the model is called with (:func:`call_model`): a ``(N, ...)`` tensor, a tuple of
            positional arguments or a dict of keyword arguments (Hugging Face batches).
        target: ``(N, ...)`` tensor (``(N, T)`` token targets for ``(N, T, V)`` logits with
            :class:`TokenLoss`).
        params: ``{name: parameter}`` from ``select_parameters(model)``.
        num_probes: number of Rademacher probes (>= 1).
        generator: source of the probes; when given, the global RNG is not touched (unless the
            model itself draws random numbers, e.g. dropout in train mode). The same generator
            state, ``num_probes`` and ``chunk_size`` give identical results (the probes are drawn
            chunk by chunk, so another ``chunk_size`` draws other probes).
        chunk_size: probes per ``vmap`` call; default keeps ``chunk_size * numel`` below
            ``2**22`` (at most 16 probes).
        vectorize: ``False`` skips ``vmap`` and uses the double-backward loop from the start
            (for models ``vmap`` cannot batch; avoids the warning).

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
        ...     est = hutchinson_hessian_diagonal(
        ...         model, mse, x, y, params, num_probes=num_probes, generator=g
        ...     )
        ...     return float((est["weight"][0] - exact).norm() / exact.norm())
        >>> error(4) > error(4096)
        True
        >>> error(4096) < 0.05
        True
    """
    with torch.enable_grad(), twice_differentiable(model):
        loss_of, primals = functional_loss(model, loss_fn, inputs, target, params)
        return mean_over_probes(
            primals,
            num_probes,
            chunk_size,
            "rademacher",
            generator,
            _vmapped_chunk(loss_of, primals) if vectorize else None,
            lambda: _looped_chunk(loss_of, primals, model),
            "hutchinson_hessian_diagonal",
            model,
            "a loop of double-backward Hessian-vector products",
        )


def _vmapped_chunk(
    loss_of: Callable[[dict[str, Tensor]], Tensor], primals: dict[str, Tensor]
) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
    """``probes (C, *shape) -> sum over the C probes of v * Hv``, one vmapped forward-over-reverse call."""
    grad_fn = grad(loss_of)

    def one_probe(v: dict[str, Tensor]) -> dict[str, Tensor]:
        _, hv = cast("tuple[Any, Any]", jvp(grad_fn, (primals,), (v,)))  # a pair without has_aux
        return {n: v[n] * hv[n] for n in v}

    batched = vmap(one_probe, randomness="different")

    def chunk(probes: dict[str, Tensor]) -> dict[str, Tensor]:
        out = batched(probes)
        return {n: out[n].sum(0, dtype=accumulation_dtype(out[n].dtype)) for n in out}

    return chunk


def _looped_chunk(
    loss_of: Callable[[dict[str, Tensor]], Tensor], primals: dict[str, Tensor], model: nn.Module
) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
    """``probes (C, *shape) -> sum over the C probes of v * Hv`` by double backward, one probe at a time.

    The gradient graph is built once (``create_graph=True``, at the first call) and reused by every
    probe. When double backward is impossible (``once_differentiable`` functions, some fused
    kernels) the error says to use ``method="finite_difference"``.
    """
    names = list(primals)
    theta = {n: p.clone().requires_grad_(True) for n, p in primals.items()}
    graph: list = []  # [grads, indices of the gradients that depend on the weights], built lazily

    def chunk(probes: dict[str, Tensor]) -> dict[str, Tensor]:
        sums = {n: torch.zeros_like(p, dtype=accumulation_dtype(p.dtype)) for n, p in primals.items()}
        try:
            if not graph:
                grads = torch.autograd.grad(
                    loss_of(theta), [theta[n] for n in names], create_graph=True, allow_unused=True
                )
                # Weights whose gradient does not depend on any selected weight have zero Hessian rows.
                live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
                _check_twice_differentiable([grads[i] for i in live])
                graph.extend([grads, live])
            grads, live = graph
            for k in range(probes[names[0]].shape[0] if live else 0):
                v = [probes[n][k] for n in names]
                hv = torch.autograd.grad(
                    [grads[i] for i in live],
                    [theta[n] for n in names],
                    grad_outputs=[v[i] for i in live],
                    retain_graph=True,
                    allow_unused=True,
                )
                for n, vi, hvi in zip(names, v, hv):
                    if hvi is not None:
                        sums[n] += vi * hvi
        except (RuntimeError, NotImplementedError) as err:
            raise RuntimeError(
                f"hutchinson_hessian_diagonal needs Hessian-vector products through "
                f"{type(model).__name__}, but "
                f"double backward failed ({first_line(err)}); use method='finite_difference', which needs "
                f"first derivatives only."
            ) from err
        return sums

    return chunk


def _check_twice_differentiable(grads: list[Tensor]) -> None:
    """Raise if the gradient's graph holds a ``once_differentiable`` node.

    Double backward does not fail there by itself: the node hangs off a detached leaf, the engine
    prunes it, and the Hessian-vector products would silently miss every path through it.
    """
    seen: set[Node] = set()
    stack: list[Optional[Node]] = [g.grad_fn for g in grads if g.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name() == "torch::autograd::Error":  # the DelayedError that once_differentiable inserts
            raise RuntimeError(
                "the gradient passes through a function marked @once_differentiable, which "
                "has no second derivative"
            )
        stack.extend(fn for fn, _ in node.next_functions)
