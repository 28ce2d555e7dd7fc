"""The exact method's speed paths compute what the plain ones do: the rank-(C-1) cross-entropy factors,
the grouped-convolution per-sample gradients, the identity-matched parameter swap of the forward and
the sign-free contraction, each against float64 brute force or an explicit formula."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from oracles import assert_relative_close
from oracles import brute_force_hessian_diagonal as brute_hessian_diagonal
from torch import nn

import lightning_flatness.functional.estimators.exact as exact
import lightning_flatness.functional.estimators.layer_rules.base as layer_rules_base
import lightning_flatness.functional.estimators.layer_rules.contraction as contraction
import lightning_flatness.functional.estimators.layer_rules.conv as conv
from lightning_flatness.functional.estimators.exact import _cross_entropy_factors, exact_hessian_diagonal
from lightning_flatness.functional.estimators.layer_rules import (
    LayerCall,
    accumulate_layer,
    accumulate_shared,
)
from lightning_flatness.functional.estimators.layer_rules.column_backward import ColumnTape
from lightning_flatness.functional.estimators.loss_factors import (
    _loss_factors,
    _normalized_cross_entropy_factors,
    _per_sample_loss_hessians,
)
from lightning_flatness.functional.losses import normalized_softmax_cross_entropy
from lightning_flatness.functional.parameters import select_parameters

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- cross-entropy factors
@pytest.mark.parametrize("classes", [2, 3, 10])
def test_cross_entropy_factors_have_rank_c_minus_1_and_reproduce_the_softmax_hessian(classes):
    """S S^T = diag(p) - p p^T to float64 round-off, also where one class has almost all the mass
    (the reflection's u = sqrt(p) + e_C has |u|^2 >= 2 whichever class it is)."""
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(9, classes, generator=g, dtype=torch.float64)
    logits[0, -1] = 60.0  # p_C ~ 1: the reflected axis itself
    logits[1, 0] = 60.0  # p_C ~ 0
    logits[2] = 0.0  # uniform
    p = torch.softmax(logits, dim=1)
    factors = _cross_entropy_factors(p)
    assert factors.shape == (9, classes, classes - 1)
    hessian = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    torch.testing.assert_close(factors @ factors.transpose(1, 2), hessian, rtol=0, atol=1e-15)


def test_single_class_cross_entropy_has_zero_curvature():
    p = torch.ones(4, 1, dtype=torch.float64)
    assert torch.equal(_cross_entropy_factors(p), torch.zeros(4, 1, 1, dtype=torch.float64))


# ----------------------------------------------------------------------------- eq. 20 factors
def _eq20_logits(classes: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(12, classes, generator=g, dtype=torch.float64)
    logits[0, 0] = 40.0  # one class far ahead: p almost one-hot
    logits[1] = 2.5  # all equal: degenerate row, zero curvature and gradient
    logits[2] *= 1e-3  # small spread: large curvature (1 / s^2)
    return logits.to(dtype), torch.randint(0, classes, (12,), generator=g)


@pytest.mark.parametrize("classes", [2, 3, 10, 33])
def test_normalized_cross_entropy_factors_reproduce_the_autograd_hessian(classes):
    """sum_k sign_k c_k c_k^T equals eq. 20's per-sample logit Hessian by double backward (float64),
    with at most K - 1 columns (the shift direction is exactly null), including a degenerate row."""
    logits, target = _eq20_logits(classes)
    factors, signs, _ = _normalized_cross_entropy_factors(logits, target)
    assert factors.shape[:2] == (12, classes) and factors.shape[2] <= classes - 1
    rebuilt = torch.einsum("nkc,nc,nlc->nkl", factors, signs, factors)
    brute, _, issues = _per_sample_loss_hessians(normalized_softmax_cross_entropy, logits, target)
    assert not issues
    # relative to each sample's curvature scale, at least 1 / s^2 (K = 2 has zero curvature: the
    # normalized logits are always +-1, and both sides are rounding of terms of size 1 / s^2)
    terms = 1 / logits.var(dim=1, unbiased=False).clamp_min(1e-300).reshape(-1, 1, 1)
    scale = torch.maximum(brute.abs().amax(dim=(1, 2), keepdim=True), terms)
    assert bool(((rebuilt - brute).abs() <= 1e-12 * scale).all())
    assert torch.equal(rebuilt[1], torch.zeros_like(rebuilt[1]))
    assert float((factors.transpose(1, 2) @ torch.ones(classes, dtype=torch.float64)).abs().max()) < 1e-12


def test_normalized_cross_entropy_gradient_matches_autograd():
    logits, target = _eq20_logits(10)
    _, _, grad, issues = _loss_factors(normalized_softmax_cross_entropy, logits, target)
    f = logits.clone().requires_grad_(True)
    (brute,) = torch.autograd.grad(normalized_softmax_cross_entropy(f, target), f)
    assert not issues
    torch.testing.assert_close(grad, brute, rtol=1e-12, atol=1e-16)


def test_normalized_cross_entropy_factors_keep_the_logits_dtype():
    """float32 logits: computed in float64, returned in float32, as close to the float64 Hessian as
    float32 rounding of the factors allows."""
    logits, target = _eq20_logits(10, torch.float32)
    factors, signs, grad, _ = _loss_factors(normalized_softmax_cross_entropy, logits, target)
    assert factors.dtype == signs.dtype == grad.dtype == torch.float32
    brute, _, _ = _per_sample_loss_hessians(normalized_softmax_cross_entropy, logits.double(), target)
    rebuilt = torch.einsum("nkc,nc,nlc->nkl", factors.double(), signs.double(), factors.double())
    scale = brute.abs().amax(dim=(1, 2), keepdim=True)
    assert bool(((rebuilt - brute).abs() <= 1e-5 * scale).all())


# ----------------------------------------------------------------------------- grouped convolutions
class _Convs(nn.Module):
    """Convolutions with every geometry the grouped path must reproduce: stride with a leftover input
    column, 'same' padding with an even kernel (asymmetric), dilation, groups, a padding mode."""

    def __init__(self, dims: int):
        super().__init__()
        conv_cls = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
        pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}[dims]
        self.body = nn.Sequential(
            conv_cls(1, 4, 3, stride=2),  # 1 channel, 8 -> 3 (one input column left over)
            nn.ReLU(),
            conv_cls(4, 4, 2, padding="same", groups=2),  # 2 channels per group, asymmetric padding
            nn.ReLU(),
            conv_cls(4, 3, 2, dilation=2, padding=1, padding_mode="reflect"),
            nn.ReLU(),
            pool(2),
            nn.Flatten(),
            nn.Linear(3 * 2**dims, 3),
        )

    def forward(self, x):
        return self.body(x)


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("loss_fn", [F.cross_entropy, normalized_softmax_cross_entropy], ids=["ce", "eq20"])
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "per-sample-chunks"])
def test_grouped_convolution_path_equals_brute_force(dims, loss_fn, chunked, monkeypatch):
    """Forced on for every convolution (float64 here; the default takes it for float32 only), with
    unit signs (cross-entropy) and signed ones (eq. 20's indefinite loss Hessian), the samples in one
    chunk or one per chunk."""
    if chunked:
        monkeypatch.setattr(conv, "GROUPED_CHUNK_ELEMENTS", 1)
    chosen = []

    def always(channels_per_group, grad):
        chosen.append(channels_per_group)
        return True

    monkeypatch.setattr(conv, "use_grouped_convolution", always)
    torch.manual_seed(0)
    model = _Convs(dims).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 1, *([8] * dims), generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=g)
    params = select_parameters(model, "all")
    diag = exact_hessian_diagonal(model, loss_fn, x, y, params)
    assert sorted(chosen) == [1, 2, 4]
    assert_relative_close(diag, brute_hessian_diagonal(model, loss_fn, x, y, list(params)), tol=1e-10)


def test_grouped_convolution_is_the_default_for_few_channels_in_float32_only():
    cpu32 = torch.zeros(1)
    assert conv.use_grouped_convolution(1, cpu32)
    assert conv.use_grouped_convolution(conv.GROUPED_MAX_CHANNELS, cpu32)
    assert not conv.use_grouped_convolution(conv.GROUPED_MAX_CHANNELS + 1, cpu32)
    assert not conv.use_grouped_convolution(1, cpu32.double())


def test_float32_default_paths_match_float64_brute_force():
    """The 1-D LeNet shape: a 1-channel first convolution (grouped path), a 6-channel one (im2col) and
    Linear layers, in float32 against the float64 brute force."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(1, 6, 5),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(6, 8, 5),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Flatten(),
        nn.Linear(16, 10),
        nn.ReLU(),
        nn.Linear(10, 4),
    ).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1, 20, generator=g)
    y = torch.randint(0, 4, (16,), generator=g)
    diag = exact_hessian_diagonal(model, F.cross_entropy, x, y, select_parameters(model, "all"))
    model64 = model.double()
    names = list(select_parameters(model64, "all"))
    ref = brute_hessian_diagonal(model64, F.cross_entropy, x.double(), y, names)
    assert all(d.dtype == torch.float32 for d in diag.values())
    assert_relative_close({n: d.double() for n, d in diag.items()}, ref, tol=1e-5)


# ----------------------------------------------------------------------------- contraction signs
def test_unit_sign_shortcut_equals_the_weighted_sum():
    """accumulate_layer with unit_signs=True (weights skipped) equals the signed sum with all signs +1,
    for the single-position Linear path and the per-sample path."""
    g = torch.Generator().manual_seed(0)
    n, k = 6, 3
    calls = [
        (torch.randn(n, 4, generator=g, dtype=torch.float64), (k, n, 5)),
        (torch.randn(n, 2, 4, generator=g, dtype=torch.float64), (k, n, 2, 5)),
    ]
    for inputs, grad_shape in calls:
        leaves = {"w": torch.zeros(5, 4, dtype=torch.float64), "b": torch.zeros(5, dtype=torch.float64)}
        call = LayerCall("linear", "m", inputs, torch.zeros(()), "w", "b")
        grad = torch.randn(*grad_shape, generator=g, dtype=torch.float64)
        signs = torch.ones(n, k, dtype=torch.float64)
        fast = {name: torch.zeros_like(t) for name, t in leaves.items()}
        slow = {name: torch.zeros_like(t) for name, t in leaves.items()}
        accumulate_layer(call, grad, signs, fast, leaves, unit_signs=True)
        accumulate_layer(call, grad, signs, slow, leaves, unit_signs=False)
        per_sample = torch.einsum("kn...o,n...i->knoi", grad, inputs)  # (K, N, O, I)
        expected = {
            "w": (per_sample**2).sum(dim=(0, 1)),
            "b": (grad.reshape(k, n, -1, 5).sum(2) ** 2).sum((0, 1)),
        }
        for name in leaves:
            torch.testing.assert_close(fast[name], expected[name], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(slow[name], expected[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["linear", "addmm"])
@pytest.mark.parametrize("samplewise", [False, True], ids=["one_product", "sample_by_sample"])
def test_per_sample_gradients_of_a_linear_map_on_positions_equal_their_definition(
    op, samplewise, monkeypatch
):
    """Linear (and addmm, the weight stored transposed) on several positions per sample: the signed sum of
    squared per-sample gradients, alone (accumulate_layer) and with a second use of the weight summed in
    before squaring (accumulate_shared: a tied weight), equals ``sum_{n,k} s_nk (sum_p g_nkp a_np^T)^2``,
    whether the per-sample gradients come from one product over the samples or sample by sample from the
    output gradients as they lie (``SAMPLEWISE_MIN_ENTRIES``)."""
    monkeypatch.setattr(layer_rules_base, "SAMPLEWISE_MIN_ENTRIES", 0 if samplewise else 10**9)
    taken = []
    real = layer_rules_base.samplewise_gradients
    monkeypatch.setattr(layer_rules_base, "samplewise_gradients", lambda *a: taken.append(1) or real(*a))
    monkeypatch.setattr(contraction, "samplewise_gradients", layer_rules_base.samplewise_gradients)
    g = torch.Generator().manual_seed(0)
    n, k, p, i, o = 5, 3, 4, 6, 7
    inputs = [torch.randn(n, p, i, generator=g, dtype=torch.float64) for _ in range(2)]
    grads = [torch.randn(k, n, p, o, generator=g, dtype=torch.float64) for _ in range(2)]
    signs = torch.randn(n, k, generator=g, dtype=torch.float64).sign()
    shape = (o, i) if op == "linear" else (i, o)
    leaves = {"w": torch.zeros(*shape, dtype=torch.float64)}

    def call(x):
        rows = x if op == "linear" else x.reshape(n * p, i)  # addmm: (N T, I) rows, regrouped per sample
        return LayerCall(op, "m", rows, torch.zeros(rows.shape[0], o), "w", None)

    def expected(terms):
        per_sample = sum(torch.einsum("knpo,npi->knoi", gr, x) for x, gr in terms)
        value = torch.einsum("nk,knoi->oi", signs, per_sample**2)
        return value if op == "linear" else value.T

    def flat(gr):
        return gr if op == "linear" else gr.reshape(k, n * p, o)

    alone: dict = {}
    accumulate_layer(call(inputs[0]), flat(grads[0]), signs, alone, leaves, unit_signs=False)
    torch.testing.assert_close(alone["w"], expected([(inputs[0], grads[0])]), rtol=1e-12, atol=1e-12)
    tied: dict = {}
    accumulate_shared([call(x) for x in inputs], [flat(gr) for gr in grads], signs, tied, leaves, n)
    torch.testing.assert_close(tied["w"], expected(list(zip(inputs, grads))), rtol=1e-12, atol=1e-12)
    assert bool(taken) == samplewise


# ----------------------------------------------------------------------------- the forward's swap
def test_tied_weights_are_one_weight_used_twice_and_the_model_is_restored():
    """A weight shared by two modules (tied) is replaced in both slots by the same leaf: flagged as
    used twice, and every slot holds the original object afterwards."""
    torch.manual_seed(0)
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    model = nn.Sequential(first, nn.ReLU(), second, nn.ReLU(), nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match="'0.weight' is used 2 times"):
        exact_hessian_diagonal(model, F.cross_entropy, x, y, select_parameters(model))
    assert model[0].weight is model[2].weight is first.weight
    assert isinstance(model[0].weight, nn.Parameter)


def test_a_parameter_of_another_model_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    other = nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match="not parameters of the model"):
        exact_hessian_diagonal(model, F.cross_entropy, x, y, {"0.weight": other.weight})
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


# ----------------------------------------------------------------------------- layer outputs not copied
@pytest.mark.parametrize("inplace", [False, True])
def test_layer_outputs_are_copied_only_when_the_model_changes_them_in_place(inplace):
    """The forward passes each recorded layer output on as it is; a model that changes one in place
    (ReLU(inplace=True) right after a Linear layer) gets a second forward with copies, and both give
    the brute-force diagonal."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=inplace), nn.Linear(6, 3)).double()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (7,), generator=g)
    params = select_parameters(model, "all")
    diag = exact_hessian_diagonal(model, F.cross_entropy, x, y, params)
    assert len(calls) == (2 if inplace else 1)
    calls.clear()
    assert_relative_close(diag, brute_hessian_diagonal(model, F.cross_entropy, x, y, list(params)), tol=1e-10)


# ----------------------------------------------------------------------------- batch independence
class _FlippedBatch(nn.Module):
    """Hidden features of sample i feed the head of sample N - 1 - i: the samples interact, with
    every shape unchanged."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)).flip(0))


def _batched_columns(monkeypatch) -> list[int]:
    """Records how many columns each batched backward pass of the per-layer path carries (the
    folded-batch backward of layer_rules.column_backward or autograd's is_grads_batched)."""
    counts = []
    tape_backward = ColumnTape.backward
    grad = torch.autograd.grad

    def counting_tape(self, logits, columns, wanted, consume=None):
        result = tape_backward(self, logits, columns, wanted, consume)
        if result is not None:
            counts.append(columns.shape[0])
        return result

    def counting(outputs, inputs, grad_outputs=None, **kwargs):
        if kwargs.get("is_grads_batched") and isinstance(grad_outputs, torch.Tensor):
            counts.append(grad_outputs.shape[0])
        return grad(outputs, inputs, grad_outputs, **kwargs)

    monkeypatch.setattr(ColumnTape, "backward", counting_tape)
    monkeypatch.setattr(torch.autograd, "grad", counting)
    return counts


def test_per_sample_operations_prove_batch_independence_and_skip_the_probe(monkeypatch):
    """Linear, Conv, pooling, eval-mode BatchNorm, ReLU, residual sums, flatten and padding keep the
    samples apart by construction: the backward pass carries the C - 1 columns only."""
    counts = _batched_columns(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1, padding_mode="reflect"),
        nn.BatchNorm1d(4),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).double()
    model.eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 2, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (6,), generator=g)
    params = select_parameters(model)  # the weights (BatchNorm's scale is used outside linear / conv)
    diag = exact_hessian_diagonal(model, F.cross_entropy, x, y, params)
    assert counts == [3]  # C - 1 = 3 columns, no probe
    monkeypatch.undo()
    assert_relative_close(diag, brute_hessian_diagonal(model, F.cross_entropy, x, y, list(params)), tol=1e-10)


class _FlippedFeatures(nn.Module):
    """A flip along the features: per-sample, but not provably so (the probe must run, and pass)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)).flip(1))


@pytest.mark.parametrize("separate", [False, True], ids=["probe_column", "probe_pass"])
@pytest.mark.parametrize("model_cls", [_FlippedBatch, _FlippedFeatures], ids=["samples_mix", "samples_apart"])
def test_the_probe_finds_interacting_samples_and_the_diagonal_stays_exact(model_cls, separate, monkeypatch):
    """A flip keeps every shape: not provably per-sample, so the probe runs. Along the batch it finds the
    interaction and the per-sample path gives the exact diagonal; along the features it passes and the
    per-layer contractions do. The probe rides with the columns, or (many column entries,
    ``SEPARATE_PROBE_ELEMENTS``) takes a pass of its own first."""
    if separate:
        monkeypatch.setattr(exact, "SEPARATE_PROBE_ELEMENTS", 0)
    counts = _batched_columns(monkeypatch)
    torch.manual_seed(0)
    model = model_cls().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    params = select_parameters(model, "all")
    mixes = model_cls is _FlippedBatch
    with pytest.warns(UserWarning, match="per-layer contractions do not apply") if mixes else nullcontext():
        diag = exact_hessian_diagonal(model, F.cross_entropy, x, y, params)
    if mixes:  # the probe alone, or C - 1 = 2 columns and the probe; then per-sample passes
        assert counts[0] == (1 if separate else 2 + 1)
    else:  # the probe's pass, then the 2 columns alone; or both in one pass
        assert counts == ([1, 2] if separate else [2 + 1])
    monkeypatch.undo()
    assert_relative_close(diag, brute_hessian_diagonal(model, F.cross_entropy, x, y, list(params)), tol=1e-10)


@pytest.mark.parametrize(
    "name, args, kwargs, expected",
    [
        ("flatten", (torch.zeros(4, 3, 2), 1), {}, True),
        ("flatten", (torch.zeros(4, 3, 2),), {}, False),  # start_dim 0 merges the samples
        ("pad", (torch.zeros(4, 3, 2), (1, 1)), {}, True),
        ("pad", (torch.zeros(4, 3, 2), (1, 1, 0, 0, 1, 1)), {}, False),  # pads the batch dim
        ("batch_norm", (torch.zeros(4, 3), None, None, None, None, False), {}, True),
        ("batch_norm", (torch.zeros(4, 3), None, None, None, None, True), {}, False),  # batch statistics
        ("linear", (torch.zeros(4),), {}, False),  # no batch dim
        ("conv1d", (torch.zeros(3, 4),), {}, False),  # unbatched (C, L) input
        ("mean", (torch.zeros(4, 3),), {}, False),  # reductions are never claimed
    ],
)
def test_the_batch_independence_rules_are_conservative(name, args, kwargs, expected):
    from lightning_flatness.functional.estimators.op_tables import _keeps_samples_apart

    x = args[0]
    out = x.flatten(1) if name == "flatten" and len(args) > 1 else x
    assert _keeps_samples_apart(name, args, kwargs, [x], [out], 4) is expected
