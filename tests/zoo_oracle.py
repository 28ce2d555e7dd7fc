r"""Float64 brute-force oracles for the zoo models (:mod:`tests.zoo_models`): the Hessian diagonal of
the mean loss in the selected weights, and the exact generalized Gauss-Newton diagonal.

Both evaluate the model through :func:`call_model` (tensor, tuple or dict inputs; ``ModelOutput``
outputs) under :func:`twice_differentiable`, with :func:`torch.func.functional_call` on the selected
weights (other parameters and buffers fixed; eval-mode models). Independent of the estimators: no
code of :mod:`lightning_flatness.functional.estimators` is used.

- :func:`brute_force_hessian_diagonal`: :math:`H_{ii} = e_i^\top H e_i`, one exact Hessian-vector
  product (forward-over-reverse) per weight, vmapped over chunks of unit vectors. Cost ``P`` HVPs
  for ``P`` weights.
- :func:`brute_force_ggn_diagonal`: :math:`\operatorname{diag}(J^\top \Lambda J)` with the full
  Jacobian :math:`J = \partial z / \partial w` of the flattened logits (``torch.func.jacrev``) and
  the full Hessian :math:`\Lambda = \partial^2 L / \partial z^2` of the loss in the logits
  (``torch.func.hessian``). Cost ``N K`` backward passes and an ``(NK)^2`` matrix.
- :func:`brute_force_full_hessian`: the whole Hessian (``P x P``), for variance formulas.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, jvp, vmap

from lightning_flatness.functional.model_io import call_model
from lightning_flatness.functional.twice_differentiable import twice_differentiable

LossFn = Callable[[Tensor, Tensor], Tensor]


def _to64(inputs: Any) -> Any:
    if isinstance(inputs, Tensor):
        return inputs.double() if inputs.is_floating_point() else inputs
    if isinstance(inputs, dict):
        return {k: _to64(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to64(v) for v in inputs)
    return inputs


def _logits_fn(model: nn.Module, inputs: Any, names: list[str]) -> Callable[[dict[str, Tensor]], Tensor]:
    model64 = model  # caller passes a float64 model
    x = _to64(inputs)

    def logits_of(theta: dict[str, Tensor]) -> Tensor:
        return call_model(lambda *a, **k: functional_call(model64, theta, a, k), x)

    return logits_of


def _float64_model(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double().eval()


def brute_force_hessian_diagonal(
    model: nn.Module, loss_fn: LossFn, inputs: Any, target: Tensor, names: list[str], chunk: int = 128
) -> dict[str, Tensor]:
    """``{name: diag H}`` (float64) of ``loss_fn(model(inputs), target)`` in the parameters ``names``."""
    model = _float64_model(model)
    named = dict(model.named_parameters())
    primals = {n: named[n].detach() for n in names}
    logits_of = _logits_fn(model, inputs, names)
    sizes = [primals[n].numel() for n in names]
    total = sum(sizes)
    with twice_differentiable(model):
        grad_fn = grad(lambda th: loss_fn(logits_of(th), target))

        def hvp(v: dict[str, Tensor]) -> dict[str, Tensor]:
            return jvp(grad_fn, (primals,), (v,))[1]

        batched = vmap(hvp)
        diag = torch.empty(total, dtype=torch.float64)
        for start in range(0, total, chunk):
            idx = torch.arange(start, min(total, start + chunk))
            eye = torch.zeros(len(idx), total, dtype=torch.float64)
            eye[torch.arange(len(idx)), idx] = 1.0
            v = dict(
                zip(
                    names,
                    (t.reshape(len(idx), *primals[n].shape) for n, t in zip(names, eye.split(sizes, dim=1))),
                )
            )
            hv = batched(v)
            flat = torch.cat([hv[n].reshape(len(idx), -1) for n in names], dim=1)
            diag[idx] = flat[torch.arange(len(idx)), idx]
    return {n: d.reshape(primals[n].shape) for n, d in zip(names, diag.split(sizes))}


def brute_force_ggn_diagonal(
    model: nn.Module, loss_fn: LossFn, inputs: Any, target: Tensor, names: list[str]
) -> dict[str, Tensor]:
    """``{name: diag(J^T Lambda J)}`` (float64): the exact Gauss-Newton diagonal in ``names``."""
    model = _float64_model(model)
    named = dict(model.named_parameters())
    primals = {n: named[n].detach() for n in names}
    logits_of = _logits_fn(model, inputs, names)
    with twice_differentiable(model):
        z = logits_of(primals).detach()
        lam = hessian(lambda zz: loss_fn(zz, target))(z).reshape(z.numel(), z.numel())
        jac = jacrev(lambda th: logits_of(th).reshape(-1), chunk_size=16)(primals)  # bounded memory
    out = {}
    for n in names:
        j = jac[n].reshape(z.numel(), -1).double()  # (NK, P_n); float64 where a model casts its logits down
        out[n] = ((lam.double() @ j) * j).sum(0).reshape(primals[n].shape)
    return out


def brute_force_full_hessian(
    model: nn.Module, loss_fn: LossFn, inputs: Any, target: Tensor, names: list[str]
) -> Tensor:
    """The ``(P, P)`` float64 Hessian in the concatenated flattened parameters ``names``."""
    model = _float64_model(model)
    named = dict(model.named_parameters())
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]
    flat0 = torch.cat([named[n].detach().reshape(-1) for n in names])
    logits_of = _logits_fn(model, inputs, names)

    def loss_flat(flat: Tensor) -> Tensor:
        theta = {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        return loss_fn(logits_of(theta), target)

    with twice_differentiable(model):
        return hessian(loss_flat)(flat0)


def brute_force_full_ggn(
    model: nn.Module, loss_fn: LossFn, inputs: Any, target: Tensor, names: list[str]
) -> Tensor:
    """The ``(P, P)`` float64 Gauss-Newton matrix ``J^T Lambda J`` in the concatenated parameters
    ``names``."""
    model = _float64_model(model)
    named = dict(model.named_parameters())
    primals = {n: named[n].detach() for n in names}
    logits_of = _logits_fn(model, inputs, names)
    with twice_differentiable(model):
        z = logits_of(primals).detach()
        lam = hessian(lambda zz: loss_fn(zz, target))(z).reshape(z.numel(), z.numel())
        jac = jacrev(lambda th: logits_of(th).reshape(-1), chunk_size=16)(primals)  # bounded memory
    j = torch.cat([jac[n].reshape(z.numel(), -1) for n in names], dim=1)
    return j.T @ lam @ j
