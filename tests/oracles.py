"""Independent float64 brute-force references shared by the tests: full Hessians, Gauss-Newton
matrices and their diagonals by ``torch.func`` / ``torch.autograd.functional`` on small models, and
the sharpness measures computed from them.

Nothing here uses the package's estimators: a reference is the literal definition (second
derivatives of the mean loss, all other parameters and buffers held fixed), at a cost of
``O(P^2)`` memory and ``P`` backward passes for ``P`` parameters, so keep the models tiny.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_flatness.functional import (
    normalized_softmax_cross_entropy,
    select_parameters,
    sharpness_measures,
)

__all__ = [
    "flat",
    "flat_logits",
    "brute_force_hessian",
    "brute_force_ggn",
    "brute_force_hessian_diagonal",
    "brute_force_ggn_diagonal",
    "brute_force_measures",
    "assert_relative_close",
    "assert_unbiased",
    "hessian_sketch_draws",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


def flat(diag: dict[str, Tensor], names: Sequence[str]) -> Tensor:
    """Concatenate the flattened tensors ``diag[name]`` in the order of ``names``."""
    return torch.cat([diag[n].reshape(-1) for n in names])


def flat_logits(
    model: nn.Module, x: Tensor, names: Sequence[str]
) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """``(logits_of, w0)``: the model's output as a pure function of the concatenated, flattened tensors
    ``names`` (every other parameter fixed, buffers cloned at each call so train-mode BatchNorm cannot
    change the model) and the current value ``w0`` of that vector.

    Works on a deep copy: ``functional_call`` may leave tensors in shared submodules (pytorch #164759).
    """
    model = copy.deepcopy(model)
    named = dict(model.named_parameters())
    fixed = {n: p.detach() for n, p in named.items() if n not in names}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]

    def logits_of(flat_w: Tensor) -> Tensor:
        chosen = {n: part.view(s) for n, part, s in zip(names, torch.split(flat_w, sizes), shapes)}
        return functional_call(model, {**fixed, **chosen, **{n: b.clone() for n, b in buffers.items()}}, (x,))

    return logits_of, torch.cat([named[n].detach().reshape(-1) for n in names])


def brute_force_hessian(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, names: Sequence[str]
) -> Tensor:
    """Full Hessian ``(P, P)`` of ``loss_fn(model(x), y)`` in the concatenated tensors ``names``."""
    logits_of, w0 = flat_logits(model, x, names)
    return torch.autograd.functional.hessian(lambda w: loss_fn(logits_of(w), y), w0, vectorize=True)


def brute_force_ggn(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, names: Sequence[str]) -> Tensor:
    """Full generalized Gauss-Newton matrix ``J^T Lambda J`` ``(P, P)``: ``J`` the Jacobian of all logits in
    the tensors ``names``, ``Lambda`` the full Hessian of the loss in all logits (no per-sample
    assumption)."""
    logits_of, w0 = flat_logits(model, x, names)
    f0 = logits_of(w0).detach()
    jac = torch.autograd.functional.jacobian(logits_of, w0, vectorize=True).reshape(f0.numel(), -1)
    lam = torch.autograd.functional.hessian(
        lambda z: loss_fn(z.reshape(f0.shape), y), f0.reshape(-1), vectorize=True
    )
    return jac.T @ lam @ jac


def _split(vector: Tensor, model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    named = dict(model.named_parameters())
    parts = torch.split(vector, [named[n].numel() for n in names])
    return {n: part.reshape(named[n].shape) for n, part in zip(names, parts)}


def brute_force_hessian_diagonal(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, names: Sequence[str]
) -> dict[str, Tensor]:
    """``{name: diag of the Hessian}`` in each tensor's shape; one Hessian per tensor (its diagonal block)."""
    return {
        n: _split(brute_force_hessian(model, loss_fn, x, y, [n]).diagonal(), model, [n])[n] for n in names
    }


def brute_force_ggn_diagonal(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, names: Sequence[str]
) -> dict[str, Tensor]:
    """``{name: diag of J^T Lambda J}`` in each tensor's shape (see :func:`brute_force_ggn`)."""
    return {n: _split(brute_force_ggn(model, loss_fn, x, y, [n]).diagonal(), model, [n])[n] for n in names}


def brute_force_measures(
    module: nn.Module,
    inputs: Tensor,
    target: Tensor,
    loss_fn: LossFn = normalized_softmax_cross_entropy,
    curvature: str = "hessian",
) -> dict[str, float]:
    """All measures (``sharpness_measures``) from the brute-force Hessian diagonal (or, with
    ``curvature="gauss_newton"``, the brute-force ``J^T Lambda J`` diagonal) of the float64 loss of
    ``module`` in eval mode, in its selected weights (``select_parameters``)."""
    net = copy.deepcopy(module).double().eval()
    names = list(select_parameters(net))
    weights = {n: p.detach() for n, p in net.named_parameters() if n in names}
    oracle = {"hessian": brute_force_hessian_diagonal, "gauss_newton": brute_force_ggn_diagonal}[curvature]
    diagonals = oracle(net, loss_fn, inputs.double(), target, names)
    return {k: float(v) for k, v in sharpness_measures(weights, diagonals).items()}


def assert_relative_close(
    estimate: dict[str, Tensor], reference: dict[str, Tensor], tol: float = 1e-10
) -> None:
    """Same keys, shapes and dtypes, and ``||estimate - reference|| <= tol ||reference||`` per tensor
    (with a nonzero reference, so that the check cannot pass vacuously)."""
    assert estimate.keys() == reference.keys()
    for name, ref in reference.items():
        est = estimate[name]
        assert est.shape == ref.shape and est.dtype == ref.dtype, name
        err = float((est - ref).norm() / ref.norm())
        assert ref.norm() > 0 and err <= tol, f"{name}: relative error {err:.3e}"


def assert_unbiased(
    est: Tensor, diag: Tensor, atol: float = 1e-15, spread_required: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """``est`` ``(draws, P)`` independent estimates of the reference ``diag`` ``(P,)``: entries without spread
    (no random column reaches them: exact) equal ``diag`` (``rtol=1e-9``, ``atol``), the others' means lie
    within 5 standard errors of it. ``spread_required``: some entry must have spread. Returns the mean, the
    standard errors and the mask of the entries with spread."""
    mean, se = est.mean(0), est.std(0) / math.sqrt(est.shape[0])
    live = se > 1e-12 * diag.abs().max()
    torch.testing.assert_close(mean[~live], diag[~live], rtol=1e-9, atol=atol)
    assert bool(live.any()) or not spread_required, "no entry has spread: nothing random was tested"
    if bool(live.any()):
        assert float(((mean - diag)[live] / se[live]).abs().max()) < 5.0
    return mean, se, live


def hessian_sketch_draws(
    model: nn.Module, loss_fn: LossFn, inputs, target: Tensor, names: Sequence[str], draws: int = 40
) -> Tensor:
    """``draws`` independent ``method="hessian_sketch"`` estimates (4 sketches each, generators seeded
    ``0 .. draws - 1``) of the weights ``names``, flattened in that order: ``(draws, P)``, for
    :func:`assert_unbiased`."""
    from lightning_flatness.functional import hessian_diagonal

    return torch.stack(
        [
            flat(
                hessian_diagonal(
                    model,
                    loss_fn,
                    inputs,
                    target,
                    method="hessian_sketch",
                    parameters=list(names),
                    num_sketches=4,
                    generator=torch.Generator().manual_seed(r),
                ),
                names,
            )
            for r in range(draws)
        ]
    )
