"""The "exact" Hessian diagonal: equal to a brute-force Hessian where the GGN identity holds, the GGN
diagonal (with a warning) or an error elsewhere, and no side effects on the model."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from oracles import assert_relative_close
from oracles import brute_force_ggn_diagonal as brute_ggn_diagonal
from oracles import brute_force_hessian_diagonal as brute_hessian_diagonal
from torch import nn

from lightning_flatness.functional.estimators.exact import exact_hessian_diagonal
from lightning_flatness.functional.losses import normalized_softmax_cross_entropy
from lightning_flatness.functional.parameters import select_parameters

torch.set_num_threads(1)
LOSSES = [F.cross_entropy, normalized_softmax_cross_entropy]
LOSS_IDS = ["cross_entropy", "normalized_softmax_ce"]


# ----------------------------------------------------------------------------- models
class ResidualNet(nn.Module):
    """Conv stem, a residual block x + bn(conv(x)) with eval-mode BatchNorm, linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.relu(self.bn1(self.stem(x)))
        h = F.relu(h + self.bn2(self.conv(h)))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class PositionsNet(nn.Module):
    """A Linear layer applied at 3 positions per sample ((N, 3, 5) inputs)."""

    def __init__(self):
        super().__init__()
        self.token = nn.Linear(5, 4)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(F.relu(self.token(x)).flatten(1))


class TwiceNet(nn.Module):
    """The same Linear layer applied twice: f is quadratic in its weights."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 4)
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(F.relu(self.fc(F.relu(self.fc(F.relu(self.inp(x)))))))


class BatchCenteredNet(nn.Module):
    """Subtracts the batch mean of hidden features: linear, but the samples interact."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        return self.fc2(h - h.mean(dim=0, keepdim=True))


def _randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.3 * torch.randn(c, generator=generator, dtype=torch.float64))
            m.running_var.copy_(0.5 + torch.rand(c, generator=generator, dtype=torch.float64))
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(c, generator=generator, dtype=torch.float64))
                m.bias.copy_(0.2 * torch.randn(c, generator=generator, dtype=torch.float64))
    return model


def make_case(kind: str):
    """(model in float64, inputs, targets) for a small network of the given kind."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    n = 12
    if kind == "mlp":
        model = nn.Sequential(
            nn.Linear(6, 8),
            nn.ReLU(inplace=True),
            nn.Linear(8, 8),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(8, 4),
        )
        x = torch.randn(n, 6, generator=g)
        k = 4
    elif kind == "cnn2d":
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 12 -> 6 -> 3
            nn.Conv2d(4, 5, 2, padding="same"),
            nn.LeakyReLU(0.1),  # even kernel
            nn.AvgPool2d(2, stride=1),
            nn.Flatten(),
            nn.Linear(20, 3),
        )  # 3 -> 2
        x = torch.randn(n, 2, 12, 12, generator=g)
        k = 3
    elif kind == "cnn1d":
        model = nn.Sequential(
            nn.Conv1d(2, 4, 3, padding=2, dilation=2),
            nn.ReLU(),
            nn.Conv1d(4, 4, 3, stride=2, padding=1, groups=2, padding_mode="reflect"),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(2),
            nn.Flatten(),
            nn.Linear(8, 3),
        )
        x = torch.randn(n, 2, 9, generator=g)
        k = 3
    elif kind == "cnn3d":
        model = nn.Sequential(
            nn.Conv3d(1, 2, 2, stride=(1, 2, 1), padding=(1, 0, 1)),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(2 * 4 * 2 * 4, 3),
        )
        x = torch.randn(n, 1, 3, 4, 3, generator=g)
        k = 3
    elif kind == "residual":
        model = ResidualNet()
        x = torch.randn(n, 1, 5, 5, generator=g)
        k = 3
    elif kind == "positions":
        model = PositionsNet()
        x = torch.randn(n, 3, 5, generator=g)
        k = 3
    else:
        raise ValueError(kind)
    model = _randomize_batchnorm(model.double(), g).eval()
    y = torch.randint(0, k, (n,), generator=g)
    return model, x.double(), y


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("loss_fn", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("kind", ["mlp", "cnn2d", "cnn1d", "cnn3d", "residual", "positions"])
def test_exact_diagonal_matches_brute_force_hessian(kind, loss_fn):
    model, x, y = make_case(kind)
    layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    params = {
        f"{m}.{n}" if m else n: p
        for m, mod in model.named_modules()
        if isinstance(mod, layers)
        for n, p in mod.named_parameters(recurse=False)
    }  # weights and biases
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="exact_hessian_diagonal")  # the fast path, silently
        diag = exact_hessian_diagonal(model, loss_fn, x, y, params)
    assert_relative_close(diag, brute_hessian_diagonal(model, loss_fn, x, y, params))


def test_normalized_loss_has_negative_curvature_that_is_kept():
    model, x, y = make_case("mlp")
    params = select_parameters(model)
    diag = exact_hessian_diagonal(model, normalized_softmax_cross_entropy, x, y, params)
    assert any(bool((d < 0).any()) for d in diag.values())  # indefinite Lambda: no clipping here


def test_frozen_weight_is_left_out_and_others_still_exact():
    model, x, y = make_case("cnn2d")
    model[0].weight.requires_grad_(False)
    params = select_parameters(model)
    assert "0.weight" not in params
    diag = exact_hessian_diagonal(model, F.cross_entropy, x, y, params)
    assert set(diag) == set(params) == {"0.bias", "3.weight", "3.bias", "7.weight", "7.bias"}
    assert_relative_close(diag, brute_hessian_diagonal(model, F.cross_entropy, x, y, params))


def test_float32_in_float32_out_and_close_to_float64():
    model, x, y = make_case("mlp")
    ref = exact_hessian_diagonal(model, F.cross_entropy, x, y, select_parameters(model))
    model32 = model.float()
    diag = exact_hessian_diagonal(model32, F.cross_entropy, x.float(), y, select_parameters(model32))
    for name, d in diag.items():
        assert d.dtype == torch.float32
        assert float((d.double() - ref[name]).norm() / ref[name].norm()) < 1e-5


def test_loss_with_data_dependent_control_flow_is_handled_exactly():
    def guarded_cross_entropy(logits, target):
        if bool(logits.abs().max() > 1e6):  # data-dependent control flow: torch.func.vmap refuses it
            raise ValueError("logits overflow")
        return F.cross_entropy(logits, target)

    model, x, y = make_case("mlp")
    params = select_parameters(model)
    diag = exact_hessian_diagonal(model, guarded_cross_entropy, x, y, params)
    assert_relative_close(diag, brute_hessian_diagonal(model, F.cross_entropy, x, y, params))


def test_batch_coupling_is_detected_and_the_per_sample_path_stays_exact():
    torch.manual_seed(0)
    model = BatchCenteredNet().double().eval()
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    params = select_parameters(model)
    with pytest.warns(UserWarning, match="samples interact"):
        diag = exact_hessian_diagonal(model, F.cross_entropy, x, y, params)
    assert_relative_close(diag, brute_hessian_diagonal(model, F.cross_entropy, x, y, params))


def test_fallbacks_without_batched_backward_give_the_same_diagonal(monkeypatch):
    """Backward passes without vmap rules: the loss Hessian and the per-sample path loop instead."""
    torch.manual_seed(0)
    model = TrainBatchNormNet().double().train()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    params = select_parameters(model, "weights")
    with pytest.warns(UserWarning):
        ref = exact_hessian_diagonal(model, F.cross_entropy, x, y, params, strict=False)
    grad = torch.autograd.grad
    batched_calls = []

    def unbatched_grad(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            batched_calls.append(1)
            raise RuntimeError("no batching rule")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", unbatched_grad)
    with pytest.warns(UserWarning):
        diag = exact_hessian_diagonal(model, F.cross_entropy, x, y, params, strict=False)
    assert len(batched_calls) == 2  # the per-layer pass and the per-sample path both fell back
    assert_relative_close(diag, ref, tol=1e-13)


# ----------------------------------------------------------------------------- not exact: say so
class TanhMLP(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


class TrainBatchNormNet(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


@pytest.mark.parametrize(
    "make, train, message",
    [
        (TanhMLP, False, r"'tanh' is not piecewise linear.*module '1' \(Tanh\)"),
        (TrainBatchNormNet, True, r"batch_norm with batch statistics.*module '1' \(BatchNorm1d\)"),
        (TwiceNet, False, r"'fc.weight' is used 2 times"),
    ],
    ids=["tanh", "train_batchnorm", "weight_used_twice"],
)
def test_inexact_model_raises_when_strict_and_returns_ggn_with_warning_otherwise(make, train, message):
    torch.manual_seed(0)
    model = make().double().train(train)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    params = select_parameters(model, "weights")  # (a bias before train-mode BatchNorm has no curvature)
    with pytest.raises(ValueError, match=message) as info:
        exact_hessian_diagonal(model, F.cross_entropy, x, y, params, strict=True)
    assert "hutchinson" in str(info.value)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with pytest.warns(UserWarning, match=message):
        diag = exact_hessian_diagonal(model, F.cross_entropy, x, y, params, strict=False)
    assert_relative_close(diag, brute_ggn_diagonal(model, F.cross_entropy, x, y, params))
    hessian = brute_hessian_diagonal(model, F.cross_entropy, x, y, params)
    assert max(float((diag[n] - hessian[n]).norm() / hessian[n].norm()) for n in params) > 1e-4
    for n, b in model.named_buffers():  # train-mode BatchNorm statistics untouched
        assert torch.equal(b, buffers[n])


class SoftmaxAttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = self.q(x)
        return self.head(F.softmax(h, dim=-1) * h)


class SquareFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class CustomFunctionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(SquareFunction.apply(self.fc1(x)))


@pytest.mark.parametrize(
    "model, message",
    [
        (SoftmaxAttentionNet(), r"'softmax' is not piecewise linear"),
        (SoftmaxAttentionNet(), r"'mul' multiplies 2 weight-dependent tensors"),
        (CustomFunctionNet(), r"invisible to torch function modes \(SquareFunctionBackward"),
        (
            nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Dropout(0.3), nn.Linear(5, 3)).train(),
            r"dropout in training mode",
        ),
    ],
    ids=["softmax", "product", "custom_function", "train_dropout"],
)
def test_operation_off_the_allowlist_is_named_in_the_error(model, message):
    model = model.double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match=message):
        exact_hessian_diagonal(model, F.cross_entropy, x, y, select_parameters(model))


def test_sum_reduced_loss_is_rejected():
    model, x, y = make_case("mlp")
    with pytest.raises(ValueError, match="not the mean of per-sample losses"):
        exact_hessian_diagonal(
            model, lambda f, t: F.cross_entropy(f, t, reduction="sum"), x, y, select_parameters(model)
        )


def test_frozen_tanh_feature_extractor_before_the_selected_weights_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    params = select_parameters(model)
    diag = exact_hessian_diagonal(model, F.cross_entropy, x, y, params)  # tanh is upstream: no error
    assert_relative_close(diag, brute_hessian_diagonal(model, F.cross_entropy, x, y, params))


@pytest.mark.parametrize(
    "frozen, flag",
    [(True, "requires_grad_"), (False, "requires_grad_"), (True, "setter")],
    ids=["on-a-constant", "on-a-function-of-the-weights", "setter-on-a-constant"],
)
def test_requires_grad_set_by_a_forward_hook_leaves_the_method_exact(frozen, flag):
    """Hugging Face's ``enable_input_require_grads`` (registered by ``gradient_checkpointing_enable``, and
    by PEFT) calls ``output.requires_grad_(True)`` on the input embeddings' output from a forward hook. It
    changes no value: the network stays piecewise linear, the diagonal the brute-force Hessian's, whether
    the tensor depends on the selected weights or is a constant (a frozen first layer). The attribute's
    setter likewise (torch allows it on a leaf only: here, the constant)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    if frozen:
        model[0].requires_grad_(False)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    params = select_parameters(model)
    reference = brute_hessian_diagonal(model, F.cross_entropy, x, y, params)

    def hook(module, inputs, output):
        if flag == "setter":
            output.requires_grad = True
        else:
            output.requires_grad_(True)

    handle = model[1].register_forward_hook(hook)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="exact_hessian_diagonal")  # no fallback, no warning
            diag = exact_hessian_diagonal(model, F.cross_entropy, x, y, params)
        assert model[1](torch.zeros(2, 6, dtype=torch.float64)).requires_grad  # outside: the hook acts
    finally:
        handle.remove()
    assert_relative_close(diag, reference)


# ----------------------------------------------------------------------------- no side effects
def test_model_parameters_buffers_grads_and_hooks_are_unchanged():
    model, x, y = make_case("residual")
    model.train()  # train mode: BatchNorm would update its running statistics if we let it
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.125)
    before = {n: t.clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad(), pytest.warns(UserWarning):
        diag = exact_hessian_diagonal(model, F.cross_entropy, x, y, select_parameters(model), strict=False)
    assert all(bool(torch.isfinite(d).all()) for d in diag.values())
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.equal(t, before[n]), n
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
    assert model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_works_under_inference_mode():
    model, x, y = make_case("mlp")
    params = select_parameters(model)
    ref = exact_hessian_diagonal(model, F.cross_entropy, x, y, params)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        diag = exact_hessian_diagonal(model, F.cross_entropy, xi, yi, params)
    for name in params:
        assert torch.allclose(diag[name], ref[name], rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- the refusal's type
@pytest.mark.parametrize(
    "make, loss_fn, ggn_applies, hint",
    [
        (TanhMLP, F.cross_entropy, True, 'method="ggn_hutchinson"'),
        (
            lambda: nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 3)).train(),
            F.cross_entropy,
            False,
            'method="hutchinson"',
        ),
        (
            lambda: nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)),
            lambda f, t: F.cross_entropy(f, t, reduction="sum"),
            False,
            'method="hutchinson"',
        ),
    ],
    ids=["tanh", "train_dropout", "sum_loss"],
)
def test_refusal_is_an_exact_method_not_applicable_value_error_that_says_what_can_take_over(
    make, loss_fn, ggn_applies, hint
):
    from lightning_flatness.functional.estimators import ExactMethodNotApplicable

    torch.manual_seed(0)
    model = make().double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    with pytest.raises(ExactMethodNotApplicable) as info:
        exact_hessian_diagonal(model, loss_fn, x, y, select_parameters(model))
    assert isinstance(info.value, ValueError)
    assert info.value.gauss_newton_applicable is ggn_applies
    assert info.value.issues and all(issue in str(info.value) for issue in info.value.issues)
    assert hint in str(info.value) and ('method="ggn_hutchinson"' in str(info.value)) is ggn_applies


def test_submodule_registered_under_two_paths_keeps_its_parameter_objects():
    """torch.func.functional_call alone would leave the detached copies in the shared module's slots
    (pytorch/pytorch#164759)."""
    torch.manual_seed(0)
    shared = nn.Linear(5, 5)
    model = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), shared, nn.ReLU(), shared, nn.Linear(5, 3)).double()
    weight, bias = shared.weight, shared.bias
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match="'2.weight' is used 2 times"):
        exact_hessian_diagonal(model, F.cross_entropy, x, y, select_parameters(model))
    assert shared.weight is weight and shared.bias is bias
    assert model[2].weight is model[4].weight is weight


# ----------------------------------------------------------------------------- fast paths agree
@pytest.mark.parametrize("kind", ["mlp", "cnn1d", "residual"])
def test_analytic_cross_entropy_factorisation_equals_generic_loss_hessian_path(kind):
    """F.cross_entropy itself takes the analytic S S^T factorisation; a wrapper of it (not detected by
    identity) takes the double-backward + eigh path: same diagonal, and the GGN's logits gradient
    equals autograd's."""
    from lightning_flatness.functional.estimators.exact import gauss_newton_diagonal

    model, x, y = make_case(kind)
    params = select_parameters(model)
    analytic = exact_hessian_diagonal(model, F.cross_entropy, x, y, params)
    generic = exact_hessian_diagonal(model, lambda f, t: F.cross_entropy(f, t), x, y, params)
    assert_relative_close(analytic, generic, tol=1e-12)
    logits = model(x).detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(F.cross_entropy(logits, y), logits)
    got = gauss_newton_diagonal(model, F.cross_entropy, x, y, params).logits_grad
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


def test_ignored_targets_are_not_taken_for_the_analytic_cross_entropy_path():
    """Targets equal to ignore_index (-100) drop samples from F.cross_entropy's mean: the generic path
    must handle them, and the result is still the brute-force Hessian diagonal."""
    model, x, y = make_case("mlp")
    y = y.clone()
    y[:3] = -100
    params = select_parameters(model)
    diag = exact_hessian_diagonal(model, F.cross_entropy, x, y, params, strict=False)
    assert_relative_close(diag, brute_hessian_diagonal(model, F.cross_entropy, x, y, params))


def test_layer_path_without_batched_backward_loops_over_columns_and_gives_the_same_diagonal(monkeypatch):
    model, x, y = make_case("cnn1d")
    params = select_parameters(model)
    ref = exact_hessian_diagonal(model, F.cross_entropy, x, y, params)
    grad = torch.autograd.grad

    def unbatched_grad(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("no batching rule")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", unbatched_grad)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="exact_hessian_diagonal")  # still the layer path
        diag = exact_hessian_diagonal(model, F.cross_entropy, x, y, params)
    assert_relative_close(diag, ref, tol=1e-13)
