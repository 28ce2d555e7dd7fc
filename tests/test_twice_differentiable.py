"""twice_differentiable: same values as the fused execution, second derivatives where the fused
kernels have none, and the model and global state restored exactly (also on exceptions)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp

from lightning_flatness.functional.model_io import call_model
from lightning_flatness.functional.parameters import select_parameters
from lightning_flatness.functional.twice_differentiable import (
    composite_hardsigmoid,
    composite_hardswish,
    twice_differentiable,
)
from tests.zoo_models import SMALL, TINY, zoo_loss

torch.set_num_threads(1)
for _module in ("torchvision", "timm", "transformers"):  # the `zoo` extra
    pytest.importorskip(_module)

ALL = {**TINY, **{f"small_{k}": v for k, v in SMALL.items()}}


def _sdpa_flags():
    b = torch.backends.cuda
    return (b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled(), b.cudnn_sdp_enabled())


def _switches(model):
    fused = [(n, m.fused_attn) for n, m in model.named_modules() if hasattr(m, "fused_attn")]
    configs = [
        (n, m.config._attn_implementation)
        for n, m in model.named_modules()
        if hasattr(getattr(m, "config", None), "_attn_implementation")
    ]
    inplace = [
        (n, m.inplace) for n, m in model.named_modules() if isinstance(getattr(m, "inplace", None), bool)
    ]
    forwards = [
        (n, "forward" in m.__dict__)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.MultiheadAttention)
    ]
    return fused, configs, inplace, forwards


@pytest.mark.parametrize("name", sorted(ALL))
def test_values_equal_the_fused_execution(name):
    model, (x, _) = ALL[name]()
    with torch.no_grad():
        fused = call_model(model, x)
        assert torch.isfinite(fused).all()
        with twice_differentiable(model):
            composite = call_model(model, x)
    scale = fused.abs().max()
    assert torch.allclose(composite, fused, rtol=1e-5, atol=1e-6 * float(scale))
    assert composite.shape == fused.shape


@pytest.mark.parametrize("name", ["mobilenet_v3", "vit", "bert", "gpt2"])
def test_hessian_vector_products_fail_fused_and_match_gradient_differences_under_the_context(name):
    """Forward-over-reverse HVP: impossible on the fused kernels; under the context equal (float64) to
    the central difference of exact gradients, ``(g(w + e v) - g(w - e v)) / 2e``, an independent check."""
    model, (x, y) = TINY[name](dtype=torch.float64)
    loss_fn = zoo_loss(name, F.cross_entropy)
    params = {n: p.detach() for n, p in select_parameters(model).items()}
    v = {
        n: torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(1))
        for n, p in params.items()
    }

    def loss_of(theta):
        return loss_fn(call_model(lambda *a, **k: functional_call(model, theta, a, k), x), y)

    with pytest.raises((RuntimeError, NotImplementedError)):
        jvp(grad(loss_of), (params,), (v,))
    with twice_differentiable(model):
        _, hv = jvp(grad(loss_of), (params,), (v,))
    eps = 1e-5
    g_plus = grad(loss_of)({n: p + eps * v[n] for n, p in params.items()})
    g_minus = grad(loss_of)({n: p - eps * v[n] for n, p in params.items()})
    fd = torch.cat([((g_plus[n] - g_minus[n]) / (2 * eps)).flatten() for n in params])
    exact = torch.cat([hv[n].flatten() for n in params])
    assert float((exact - fd).norm() / fd.norm()) < 1e-5  # central difference: O(eps^2) truncation


@pytest.mark.parametrize("name", ["vit", "bert", "gpt2", "mobilenet_v3", "efficientnet", "torchvision_vit"])
def test_model_and_global_state_are_restored_also_on_exceptions(name):
    model, (x, _) = TINY[name]()
    before = (_switches(model), _sdpa_flags(), torch._C._len_torch_function_stack())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with twice_differentiable(model):
        inside = _switches(model)
        call_model(model, x)
    assert (_switches(model), _sdpa_flags(), torch._C._len_torch_function_stack()) == before
    with pytest.raises(ZeroDivisionError):
        with twice_differentiable(model):
            _ = 1 / 0
    assert (_switches(model), _sdpa_flags(), torch._C._len_torch_function_stack()) == before
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    fused, configs, inplace, forwards = inside
    assert all(value is False for _, value in fused)
    assert all(value == "eager" for _, value in configs)
    assert all(value is False for _, value in inplace)  # activations out of place inside
    assert all(installed for _, installed in forwards)  # nn.MultiheadAttention written out inside
    assert fused or configs or forwards or name in ("mobilenet_v3", "efficientnet")
    if name == "efficientnet":  # its SiLU(inplace=True) modules were switched, and are in place again
        assert inplace and all(value is True for _, value in before[0][2])
    if name == "torchvision_vit":
        assert forwards and not any(installed for _, installed in before[0][3])


def test_composite_activations_equal_torch_and_have_second_derivatives():
    x = torch.linspace(-5, 5, 1001, dtype=torch.float64)
    assert torch.allclose(composite_hardswish(x), F.hardswish(x), rtol=0, atol=1e-15)
    assert torch.allclose(composite_hardsigmoid(x), F.hardsigmoid(x), rtol=0, atol=1e-15)
    x = x[(x.abs() - 3).abs() > 1e-6].requires_grad_(True)  # off the kinks at +-3
    for module in (nn.Hardswish(), nn.Hardswish(inplace=True)):
        with twice_differentiable(module):
            (g,) = torch.autograd.grad(module(x.clone()).sum(), x, create_graph=True)
            (h,) = torch.autograd.grad(g.sum(), x)
        inside = x.detach().abs() < 3
        # hardswish = x (x + 3) / 6 on (-3, 3): first derivative (2x + 3) / 6, second 1/3; 0 or x outside
        assert torch.allclose(g, torch.where(inside, (2 * x + 3) / 6, (x > 0).double()).detach())
        assert torch.allclose(h, torch.where(inside, 1 / 3, 0.0).double())
    with twice_differentiable(nn.Hardsigmoid()):
        (g,) = torch.autograd.grad(F.hardsigmoid(x).sum(), x, create_graph=True)
    assert torch.allclose(g, torch.where(x.detach().abs() < 3, 1 / 6, 0.0).double())
    assert not g.requires_grad  # piecewise-constant first derivative: no second-order graph, d2 = 0


@pytest.mark.parametrize(
    "name, module",
    [("bert", "transformers.models.bert.modeling_bert"), ("gpt2", "transformers.models.gpt2.modeling_gpt2")],
)
def test_hugging_face_models_run_eager_attention_inside_only(name, module, monkeypatch):
    import importlib

    mod = importlib.import_module(module)
    calls, original = [], mod.eager_attention_forward
    monkeypatch.setattr(mod, "eager_attention_forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    model, (x, _) = TINY[name]()
    call_model(model, x)
    assert calls == []  # "sdpa" by default
    with twice_differentiable(model):
        call_model(model, x)
    assert len(calls) == 1  # one layer
    call_model(model, x)
    assert len(calls) == 1


def test_weight_normalization_gets_second_derivatives_that_match_gradient_differences():
    """``torch.nn.utils.parametrizations.weight_norm`` (``torch._weight_norm``): under the context,
    forward-over-reverse and double-backward Hessian-vector products both equal the central difference of
    exact gradients.
    (The kernel's own double backward does not, in PyTorch 2.14: ``node_rules.weight_functions`` found it.)"""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.utils.parametrizations.weight_norm(nn.Linear(5, 4)),
        nn.Tanh(),
        nn.utils.parametrizations.weight_norm(nn.Linear(4, 3), dim=1),
    ).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    params = {n: p.detach() for n, p in model.named_parameters()}
    v = {
        n: torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(1))
        for n, p in params.items()
    }

    def loss_of(theta):
        return F.cross_entropy(functional_call(model, theta, (x,)), y)

    eps = 1e-5
    g_plus = grad(loss_of)({n: p + eps * v[n] for n, p in params.items()})
    g_minus = grad(loss_of)({n: p - eps * v[n] for n, p in params.items()})
    fd = torch.cat([((g_plus[n] - g_minus[n]) / (2 * eps)).flatten() for n in params])
    with twice_differentiable(model):
        _, hv = jvp(grad(loss_of), (params,), (v,))
        leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        grads = torch.autograd.grad(loss_of(leaves), list(leaves.values()), create_graph=True)
        dot = sum((g * v[n]).sum() for g, n in zip(grads, leaves))
        hv_double = torch.autograd.grad(dot, list(leaves.values()))
    for got in (torch.cat([hv[n].flatten() for n in params]), torch.cat([h.flatten() for h in hv_double])):
        assert float((got - fd).norm() / fd.norm()) < 1e-5
