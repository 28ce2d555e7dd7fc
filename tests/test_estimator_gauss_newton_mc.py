"""Monte-Carlo Gauss-Newton diagonal: unbiased for the exact GGN diagonal (z-scores from the spread of
independent estimates), K-independent cost (backward columns counted), first derivatives only (timm ViT
with fused attention, MobileNetV3 with hardswish), dict inputs / ModelOutput (BERT), token losses (Llama)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_flatness.functional.estimators.exact import gauss_newton_diagonal
from lightning_flatness.functional.estimators.gauss_newton_mc import (
    gauss_newton_mc_diagonal,
)
from lightning_flatness.functional.losses import normalized_softmax_cross_entropy
from lightning_flatness.functional.model_io import TokenLoss, call_model
from lightning_flatness.functional.parameters import select_parameters

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- references
def brute_ggn_diagonal(model, loss_fn, inputs, target, names) -> dict[str, Tensor]:
    """diag(J^T H_f J) in float64 from the full Jacobian of all logits and the full Hessian of the mean
    loss in all logits (no per-sample or per-token assumption)."""
    out = {}
    state = {n: p.detach() for n, p in model.named_parameters()}
    state.update({n: b.clone() for n, b in model.named_buffers()})
    for name in names:
        w = state[name]

        def logits_of(v, name=name):
            return call_model(lambda *a, **k: functional_call(model, {**state, name: v}, a, k), inputs)

        f = logits_of(w)
        jac = torch.func.jacrev(logits_of)(w).reshape(f.numel(), w.numel())
        h_f = torch.autograd.functional.hessian(
            lambda z, shape=f.shape: loss_fn(z.reshape(shape), target), f.reshape(-1)
        )
        out[name] = torch.einsum("ai,ab,bi->i", jac, h_f, jac).reshape(w.shape)
    return out


def _repeated_estimates(model, loss_fn, inputs, target, params, repeats, draws, seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the per-sample path's cost warning
        runs = [
            gauss_newton_mc_diagonal(
                model, loss_fn, inputs, target, params, num_mc_samples=draws, generator=gen, **kwargs
            )
            for _ in range(repeats)
        ]
    return {n: torch.stack([r[n] for r in runs]) for n in params}


def assert_unbiased(runs: dict[str, Tensor], reference: dict[str, Tensor]) -> None:
    """Per entry, the mean of R independent estimates against the reference in standard errors (from
    their spread): max |z| < 6 and mean z^2 < 2 (about 1 when unbiased); zero-spread entries exactly."""
    zs = []
    scale = max(max(float(ref.abs().max()) for ref in reference.values()), 1e-30)  # the problem's scale
    for name, r in runs.items():
        ref = reference[name].to(r.dtype)
        mean, se = r.mean(0), r.std(0) / r.shape[0] ** 0.5
        tol = 1e3 * torch.finfo(r.dtype).eps * scale  # rounding of the dtype (a key bias has none: ~1e-39)
        random = se > tol
        torch.testing.assert_close(mean[~random], ref[~random], rtol=1e3 * torch.finfo(r.dtype).eps, atol=tol)
        zs.append(((mean - ref)[random] / se[random]).flatten())
    z = torch.cat(zs)
    assert z.numel() > 0
    assert float(z.abs().max()) < 6.0, float(z.abs().max())
    assert float(z.pow(2).mean()) < 2.0, float(z.pow(2).mean())


def _tanh_mlp(k: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, k)).double()


def _small_cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 4, 3, stride=2, groups=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    ).double()


# ----------------------------------------------------------------------------- unbiasedness
@pytest.mark.parametrize(
    "loss_fn",
    [F.cross_entropy, normalized_softmax_cross_entropy, F.mse_loss],
    ids=["cross_entropy", "normalized_softmax_ce", "mse_fallback"],
)
def test_mean_of_estimates_is_the_exact_gauss_newton_diagonal_on_a_tanh_mlp(loss_fn):
    model = _tanh_mlp()
    torch.manual_seed(2)
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, 4, dtype=torch.float64) if loss_fn is F.mse_loss else torch.randint(0, 4, (6,))
    params = dict(model.named_parameters())
    brute = brute_ggn_diagonal(model, loss_fn, x, y, params)
    exact = gauss_newton_diagonal(model, loss_fn, x, y, params).diagonal
    for name in params:  # the reference itself: exact.py's GGN diagonal is the brute-force one
        torch.testing.assert_close(exact[name], brute[name], rtol=1e-9, atol=1e-13)
    assert_unbiased(_repeated_estimates(model, loss_fn, x, y, params, repeats=300, draws=2), brute)


def test_mean_of_estimates_is_the_exact_gauss_newton_diagonal_on_a_cnn():
    model = _small_cnn()
    torch.manual_seed(3)
    x, y = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    params = dict(model.named_parameters())
    brute = brute_ggn_diagonal(model, F.cross_entropy, x, y, params)
    assert_unbiased(
        _repeated_estimates(model, F.cross_entropy, x, y, params, repeats=300, draws=1, exact_classes=0),
        brute,
    )


def test_a_biased_reference_is_detected():
    """The z-score check can fail: the same estimates against the GGN diagonal scaled by 1.1."""
    model = _tanh_mlp()
    torch.manual_seed(2)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 4, (6,))
    params = select_parameters(model)
    brute = brute_ggn_diagonal(model, F.cross_entropy, x, y, params)
    runs = _repeated_estimates(model, F.cross_entropy, x, y, params, repeats=300, draws=2)
    with pytest.raises(AssertionError):
        assert_unbiased(runs, {n: 1.1 * b for n, b in brute.items()})


def test_variance_falls_with_the_number_of_draws():
    model = _tanh_mlp()
    torch.manual_seed(4)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 4, (6,))
    params = select_parameters(model)
    v1 = _repeated_estimates(model, F.cross_entropy, x, y, params, 200, 1)["0.weight"].var(0).sum()
    v8 = _repeated_estimates(model, F.cross_entropy, x, y, params, 200, 8)["0.weight"].var(0).sum()
    assert 4.0 < float(v1 / v8) < 16.0  # 8 in expectation


# ----------------------------------------------------------------------------- cost
class _BackwardColumnCounter:
    """Counts backward columns: one per grad_outputs row of a batched torch.autograd.grad, else one."""

    def __init__(self, monkeypatch):
        self.columns = 0
        original = torch.autograd.grad

        def counting(outputs, inputs, grad_outputs=None, *args, is_grads_batched=False, **kwargs):
            if grad_outputs is not None:
                first = grad_outputs if isinstance(grad_outputs, Tensor) else grad_outputs[0]
                self.columns += first.shape[0] if is_grads_batched else 1
            else:
                self.columns += 1
            return original(outputs, inputs, grad_outputs, *args, is_grads_batched=is_grads_batched, **kwargs)

        monkeypatch.setattr(torch.autograd, "grad", counting)


@pytest.mark.parametrize("loss_fn", [F.cross_entropy, normalized_softmax_cross_entropy])
def test_backward_columns_do_not_grow_with_the_number_of_classes(monkeypatch, loss_fn):
    counts = {}
    for k in (10, 1000):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, k))
        x, y = torch.randn(16, 8), torch.randint(0, k, (16,))
        counter = _BackwardColumnCounter(monkeypatch)
        gauss_newton_mc_diagonal(
            model,
            loss_fn,
            x,
            y,
            select_parameters(model),
            num_mc_samples=2,
            generator=torch.Generator().manual_seed(0),
        )
        counts[k] = counter.columns
        monkeypatch.undo()
    # fixed columns: CE's 2 most probable classes; eq. 20's rank-2 part (one + and one - column)
    per_draw, exact = (1, 2) if loss_fn is F.cross_entropy else (2, 2)
    assert counts[10] == counts[1000] == 2 * per_draw + exact + 1  # + the batch-independence probe
    counter = _BackwardColumnCounter(monkeypatch)  # the counter sees the exact method's K columns
    gauss_newton_diagonal(model, F.cross_entropy, x, y, select_parameters(model))
    assert counter.columns >= 1000


# ----------------------------------------------------------------------------- contract
def test_model_is_untouched_works_under_inference_mode_and_leaves_the_global_rng_alone():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3))
    model.eval()
    x, y = torch.randn(4, 2, 4, 4), torch.randint(0, 3, (4,))
    params = select_parameters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with torch.inference_mode():
        a = gauss_newton_mc_diagonal(
            model, F.cross_entropy, x, y, params, generator=torch.Generator().manual_seed(5)
        )
    with torch.no_grad():
        b = gauss_newton_mc_diagonal(
            model, F.cross_entropy, x, y, params, generator=torch.Generator().manual_seed(5)
        )
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())
    for name, p in params.items():
        assert torch.equal(a[name], b[name]) and a[name].shape == p.shape and a[name].dtype == p.dtype


def test_bad_arguments_are_named():
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with pytest.raises(ValueError, match="num_mc_samples"):
        gauss_newton_mc_diagonal(model, F.cross_entropy, x, y, {"weight": model.weight}, num_mc_samples=0)
    with pytest.raises(ValueError, match="no parameters"):
        gauss_newton_mc_diagonal(model, F.cross_entropy, x, y, {})
    with pytest.raises(ValueError, match="per-sample"):
        gauss_newton_mc_diagonal(
            model, lambda z, t: F.cross_entropy(z, t, reduction="sum"), x, y, {"weight": model.weight}
        )


# ----------------------------------------------------------------------------- model zoo
def _first_derivatives_only():
    """A context in which any double backward fails (create_graph=True is refused)."""
    original = torch.autograd.grad

    def first_order(*args, **kwargs):
        if kwargs.get("create_graph"):
            raise AssertionError("double backward requested")
        return original(*args, **kwargs)

    return first_order


def test_timm_vit_with_fused_attention_is_unbiased_without_double_backward(monkeypatch):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = (
        timm.models.vision_transformer.VisionTransformer(
            img_size=8, patch_size=4, in_chans=3, embed_dim=16, depth=1, num_heads=2, num_classes=5
        )
        .eval()
        .double()
    )
    assert model.blocks[0].attn.fused_attn  # F.scaled_dot_product_attention: no double backward on CPU
    x, y = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (3,))
    params = select_parameters(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact = gauss_newton_diagonal(
            model, F.cross_entropy, x, y, params
        ).diagonal  # CE: analytic, 1st order
    monkeypatch.setattr(torch.autograd, "grad", _first_derivatives_only())
    runs = _repeated_estimates(model, F.cross_entropy, x, y, params, repeats=48, draws=2)
    assert_unbiased(runs, exact)


def test_mobilenet_v3_with_hardswish_and_se_runs_without_double_backward(monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=4).eval().double()
    with torch.no_grad():  # non-trivial logits (the default head init is tiny)
        model.classifier[-1].weight.mul_(100.0)
    x, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randint(0, 4, (2,))
    params = {
        n: p for n, p in select_parameters(model).items() if n.startswith(("features.12", "classifier"))
    }
    exact = gauss_newton_diagonal(model, F.cross_entropy, x, y, params).diagonal
    monkeypatch.setattr(torch.autograd, "grad", _first_derivatives_only())
    runs = _repeated_estimates(model, F.cross_entropy, x, y, params, repeats=40, draws=2)
    assert_unbiased(runs, exact)


def test_bert_dict_inputs_and_model_output_with_eq20_match_the_brute_force_gauss_newton():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(config).eval().double()
    ids = torch.randint(0, 50, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    y = torch.randint(0, 3, (3,))
    params = {n: p for n, p in select_parameters(model).items() if "encoder" in n or "classifier" in n}
    brute = brute_ggn_diagonal(model, normalized_softmax_cross_entropy, inputs, y, params)
    exact = gauss_newton_diagonal(model, normalized_softmax_cross_entropy, inputs, y, params).diagonal
    scale = max(float(b.abs().max()) for b in brute.values())  # (the key biases have no curvature)
    for name in params:
        torch.testing.assert_close(exact[name], brute[name], rtol=1e-8, atol=1e-10 * scale)
    assert_unbiased(
        _repeated_estimates(model, normalized_softmax_cross_entropy, inputs, y, params, 150, 2), brute
    )


@pytest.mark.parametrize("base", [F.cross_entropy, normalized_softmax_cross_entropy])
def test_causal_lm_with_token_loss_and_padding_matches_the_brute_force_gauss_newton(base):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=12,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    model = transformers.LlamaForCausalLM(config).eval().double()
    ids = torch.randint(0, 12, (3, 5))
    labels = ids.clone()
    labels[0, 3:] = -100
    loss_fn = TokenLoss(base, shift=True)
    params = {n: p for n, p in select_parameters(model).items() if "mlp" in n or "lm_head" in n}
    brute = brute_ggn_diagonal(model, loss_fn, {"input_ids": ids}, labels, params)
    exact = gauss_newton_diagonal(model, loss_fn, {"input_ids": ids}, labels, params).diagonal
    scale = max(float(b.abs().max()) for b in brute.values())
    for name in params:  # LlamaRMSNorm computes its variance in float32 whatever the model dtype
        torch.testing.assert_close(exact[name], brute[name], rtol=1e-6, atol=1e-7 * scale)
    runs = _repeated_estimates(model, loss_fn, {"input_ids": ids}, labels, params, 150, 2)
    assert_unbiased(runs, brute)


@pytest.mark.parametrize("loss_fn", [F.cross_entropy, normalized_softmax_cross_entropy])
def test_exact_classes_keep_the_estimate_unbiased(loss_fn):
    model = _tanh_mlp(k=6)
    torch.manual_seed(5)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 6, (6,))
    params = select_parameters(model)
    brute = brute_ggn_diagonal(model, loss_fn, x, y, params)
    gen = torch.Generator().manual_seed(1)
    runs = [
        gauss_newton_mc_diagonal(
            model, loss_fn, x, y, params, num_mc_samples=1, generator=gen, exact_classes=2
        )
        for _ in range(300)
    ]
    assert_unbiased({n: torch.stack([r[n] for r in runs]) for n in params}, brute)
    if loss_fn is F.cross_entropy:  # every class exact: no noise at all
        full = gauss_newton_mc_diagonal(model, loss_fn, x, y, params, generator=gen, exact_classes=6)
        for name in params:
            torch.testing.assert_close(full[name], brute[name], rtol=1e-10, atol=1e-14)


class _TokenMLP(nn.Module):
    """Keyword inputs ``features`` ``(N, T, F)``, output a dict with ``logits`` ``(N, T, V)``; ReLU, so the
    exact method applies (the GGN diagonal is the Hessian diagonal)."""

    def __init__(self):
        super().__init__()
        self.hidden, self.head = nn.Linear(3, 6), nn.Linear(6, 4)

    def forward(self, features):
        return {"logits": self.head(torch.relu(self.hidden(features)))}


def test_exact_method_takes_dict_inputs_and_token_losses_with_padding():
    from lightning_flatness.functional.estimators.exact import exact_hessian_diagonal

    torch.manual_seed(7)
    model = _TokenMLP().double()
    inputs = {"features": torch.randn(3, 5, 3, dtype=torch.float64)}
    labels = torch.randint(0, 4, (3, 5))
    labels[1, 2:] = -100
    loss_fn = TokenLoss(F.cross_entropy, shift=True)
    params = select_parameters(model)
    diag = exact_hessian_diagonal(model, loss_fn, inputs, labels, params)
    state = {n: p.detach() for n, p in model.named_parameters()}
    for name, w in params.items():

        def loss_of(v, name=name):
            return loss_fn(functional_call(model, {**state, name: v}, (), inputs)["logits"], labels)

        brute = (
            torch.func.hessian(loss_of)(w.detach()).reshape(w.numel(), w.numel()).diagonal().reshape(w.shape)
        )
        torch.testing.assert_close(diag[name], brute, rtol=1e-10, atol=1e-14)
    runs = _repeated_estimates(model, loss_fn, inputs, labels, params, 300, 1)
    assert_unbiased(runs, diag)


@pytest.mark.parametrize("method", ["gauss_newton", "gauss_newton_mc"])
def test_gauss_newton_estimators_refuse_a_model_that_draws_random_numbers(method):
    """Train-mode dropout makes the network a random function: both Gauss-Newton estimators (one shared
    pipeline) refuse it and say that the Gauss-Newton part does not apply."""
    from lightning_flatness.functional import ExactMethodNotApplicable, hessian_diagonal

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3)).train()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.raises(ExactMethodNotApplicable, match="draws random numbers") as info:
        hessian_diagonal(
            model, F.cross_entropy, x, y, method=method, generator=torch.Generator().manual_seed(0)
        )
    assert not info.value.gauss_newton_applicable
    assert set(
        hessian_diagonal(
            model.eval(),
            F.cross_entropy,
            x,
            y,
            method=method,
            parameters="weights",
            generator=torch.Generator().manual_seed(0),
        )
    ) == {"0.weight", "3.weight"}
