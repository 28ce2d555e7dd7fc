"""Layers whose weight or bias is a function of the selected weights alone: a transpose (Falcon's
``x @ W.T + b``), a cloned bias with entries zeroed (torchvision's Swin V2), a low-rank update ``W0 + B A``,
weight standardization (timm's ``StdConv2d``, NFNets) and weight normalization (``torch.nn.utils.
parametrizations.weight_norm``). The per-layer contractions take them: the per-sample gradients of the
function are pulled back to the weights (``layer_rules.shared``). The Gauss-Newton diagonal equals the
brute-force one; where the function is linear the exact method still returns the Hessian's diagonal, and
where it is not that is said."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from oracles import assert_unbiased
from sketch_paths import sketch_on_both_paths
from torch import nn
from zoo_oracle import brute_force_ggn_diagonal, brute_force_hessian_diagonal

from lightning_flatness.functional import select_parameters
from lightning_flatness.functional.estimators.exact import (
    ExactMethodNotApplicable,
    exact_hessian_diagonal,
    gauss_newton_diagonal,
)
from lightning_flatness.functional.estimators.method_choice import choose_method

F64 = torch.float64


class StdConv(nn.Conv2d):
    """timm's ``StdConv2d``: the weight standardized per output channel by ``F.batch_norm``."""

    def forward(self, x):
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=1e-6
        ).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class TransposedLinear(nn.Linear):
    """Falcon's ``FalconLinear``: ``x @ W.T``, then the bias added."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class ZeroedBias(nn.Linear):
    """torchvision's ``ShiftedWindowAttentionV2``: the bias cloned and part of it zeroed."""

    def forward(self, x):
        bias = self.bias.clone()
        bias[2:4].zero_()
        return F.linear(x, self.weight, bias)


class LowRank(nn.Module):
    """A frozen weight plus a trained low-rank update ``B A`` (LoRA)."""

    def __init__(self, n_in: int, n_out: int, rank: int = 2):
        super().__init__()
        self.base = nn.Linear(n_in, n_out)
        self.base.weight.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, n_in) * 0.3)
        self.lora_b = nn.Parameter(torch.randn(n_out, rank) * 0.3)

    def forward(self, x):
        return F.linear(x, self.base.weight + self.lora_b @ self.lora_a, self.base.bias)


class Linear(nn.Module):
    """Piecewise linear in each weight: only linear functions of the weights."""

    def __init__(self):
        super().__init__()
        self.fc, self.zb, self.head = TransposedLinear(6, 7), ZeroedBias(7, 5), LowRank(5, 3)

    def forward(self, x):
        return self.head(torch.relu(self.zb(torch.relu(self.fc(x)))))


class Reparametrized(nn.Module):
    """Weight standardization and weight normalization before the linear ones."""

    def __init__(self):
        super().__init__()
        self.conv = StdConv(2, 4, 3, padding=1)
        self.wn = nn.utils.parametrizations.weight_norm(nn.Linear(16, 6))
        self.rest = Linear()

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean(dim=2).flatten(1)
        return self.rest(torch.relu(self.wn(h)))


def _data(model: nn.Module):
    g = torch.Generator().manual_seed(1)
    shape = (6, 2, 4, 4) if isinstance(model, Reparametrized) else (6, 6)
    return torch.randn(*shape, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g)


def _close(diag, ref, names):
    for name in names:
        scale = float(ref[name].detach().abs().max())
        assert scale > 0, name
        torch.testing.assert_close(diag[name], ref[name].detach(), rtol=1e-10, atol=1e-13 * scale)


def test_linear_functions_of_the_weights_keep_the_exact_hessian_on_the_per_layer_path():
    torch.manual_seed(0)
    model = Linear().double()
    x, y = _data(model)
    params = select_parameters(model, "all")
    assert {"head.lora_a", "head.lora_b", "fc.bias", "zb.bias"} <= set(params)
    assert "head.base.weight" not in params  # frozen
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither the per-sample path nor an inexact model would stay quiet
        diag = exact_hessian_diagonal(model, F.cross_entropy, x, y, params)
    _close(diag, brute_force_hessian_diagonal(model, F.cross_entropy, x, y, list(params)), params)
    assert float(diag["zb.bias"][2:4].abs().max()) == 0  # the zeroed entries have no curvature


def test_nonlinear_reparametrizations_are_named_and_their_gauss_newton_diagonal_is_exact():
    torch.manual_seed(0)
    model = Reparametrized().double().eval()
    x, y = _data(model)
    params = select_parameters(model, "all")
    assert {"conv.weight", "wn.parametrizations.weight.original1"} <= set(params)
    with pytest.raises(ExactMethodNotApplicable, match="'batch_norm' computes a weight nonlinearly"):
        exact_hessian_diagonal(model, F.cross_entropy, x, y, params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ggn = gauss_newton_diagonal(model, F.cross_entropy, x, y, params)
    assert any("'_weight_norm' computes a weight nonlinearly" in issue for issue in ggn.issues)
    assert not any("batch statistics" in issue for issue in ggn.issues)  # not taken for train-mode BN
    _close(ggn.diagonal, brute_force_ggn_diagonal(model, F.cross_entropy, x, y, list(params)), params)
    choice = choose_method(model, F.cross_entropy, x, y)  # node_rules.weight_functions covers both
    assert (choice.method, choice.quantity) == ("hessian_sketch", "hessian")
    normed = nn.Sequential(
        nn.utils.parametrizations.weight_norm(nn.Linear(5, 6)), nn.ReLU(), nn.Linear(6, 3)
    ).double()  # nonlinear in a weight function only: no op of the forward to name, the reason names it
    choice = choose_method(normed, F.cross_entropy, torch.randn(4, 5, dtype=F64), torch.tensor([0, 1, 2, 0]))
    assert (choice.method, choice.quantity) == ("hessian_sketch", "hessian")
    assert "not linear in each weight ('_weight_norm' computes a weight nonlinearly" in choice.reason


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_the_sketch_equals_its_per_sample_path_draw_by_draw(chunk_size, monkeypatch):
    torch.manual_seed(0)
    model = Reparametrized().double().eval()
    x, y = _data(model)
    params = select_parameters(model, "all")
    per_layer, per_sample = sketch_on_both_paths(
        model, F.cross_entropy, x, y, params, chunk_size, monkeypatch
    )
    _close(per_layer, per_sample, params)


def test_a_weight_multiplied_by_itself_is_not_taken_for_linear():
    class Squared(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.head = nn.Parameter(torch.randn(4, 4) / 2), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.relu(F.linear(x, self.w @ self.w.T)))

    torch.manual_seed(0)
    model = Squared().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 4, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g)
    params = select_parameters(model)
    with pytest.raises(ExactMethodNotApplicable, match="'matmul' computes a weight nonlinearly"):
        exact_hessian_diagonal(model, F.cross_entropy, x, y, params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ggn = gauss_newton_diagonal(model, F.cross_entropy, x, y, params).diagonal
    _close(ggn, brute_force_ggn_diagonal(model, F.cross_entropy, x, y, list(params)), params)


def test_a_head_tied_through_a_transpose_is_one_weight_with_the_embedding():
    """``h @ E.T`` (a hand-written tied LM head): the transpose's per-sample gradients are pulled back and
    summed with the lookup's before squaring."""

    class TiedByTranspose(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(7, 4), nn.Linear(4, 4)

        def forward(self, ids):
            return (torch.tanh(self.fc(self.emb(ids))) @ self.emb.weight.T).mean(dim=1)

    torch.manual_seed(0)
    model = TiedByTranspose().double()
    g = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, 7, (6, 3), generator=g), torch.randint(0, 7, (6,), generator=g)
    params = select_parameters(model, "all")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ggn = gauss_newton_diagonal(model, F.cross_entropy, ids, y, params)
    assert any("'emb.weight' is used 2 times" in issue for issue in ggn.issues)
    _close(ggn.diagonal, brute_force_ggn_diagonal(model, F.cross_entropy, ids, y, list(params)), params)


class PositionBiases(nn.Module):
    """A learned position embedding added to the tokens and Swin V2's continuous position bias: a small MLP
    on a constant grid (a function of its weights alone), squashed and added to the attention logits."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(3, 4), nn.Linear(4, 3)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 4) * 0.3)
        self.bias_mlp = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 1))
        self.register_buffer("grid", torch.randn(5, 5, 2, generator=torch.Generator().manual_seed(3)))

    def forward(self, x):  # (N, T=5, 3)
        h = self.embed(x) + self.pos_embed
        scores = h @ h.transpose(1, 2) + 4 * torch.sigmoid(self.bias_mlp(self.grid)).squeeze(-1)
        return self.head((torch.softmax(scores, dim=-1) @ h).mean(dim=1))


def test_offsets_broadcast_over_the_samples_take_the_per_layer_path():
    torch.manual_seed(0)
    model = PositionBiases().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 5, 3, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g)
    params = select_parameters(model, "all")
    assert {"pos_embed", "bias_mlp.0.weight", "bias_mlp.2.weight"} <= set(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ggn = gauss_newton_diagonal(model, F.cross_entropy, x, y, params)
    assert any("'sigmoid' computes a weight nonlinearly" in issue for issue in ggn.issues)
    _close(ggn.diagonal, brute_force_ggn_diagonal(model, F.cross_entropy, x, y, list(params)), params)


def test_a_position_embedding_keeps_a_piecewise_linear_network_exact():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Linear(3, 4), nn.Linear(4 * 5, 3)
            self.pos_embed = nn.Parameter(torch.randn(5, 4) * 0.3)  # (T, D): broadcast over the samples

        def forward(self, x):
            return self.head(torch.relu(self.embed(x) + self.pos_embed).flatten(1))

    torch.manual_seed(0)
    model = Tokens().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 5, 3, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g)
    params = select_parameters(model, "all")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diag = exact_hessian_diagonal(model, F.cross_entropy, x, y, params)
    _close(diag, brute_force_hessian_diagonal(model, F.cross_entropy, x, y, list(params)), params)


def test_a_weight_combined_with_the_inputs_outside_a_layer_is_not_taken_for_a_function_of_the_weights():
    """``(x[:, :, None] * W).sum(1)`` on the raw inputs: the result depends on the data, so it is not a
    function of the weights (whose layer calls would describe nothing). The product of the data and the
    weight is a layer now, as ``einsum(x, W)`` is (``tests/test_weight_stack_products.py``): the per-layer
    path, exact."""

    class RawProduct(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.head = nn.Parameter(torch.randn(3, 4) / 2), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.relu((x.unsqueeze(2) * self.w).sum(dim=1)))

    torch.manual_seed(0)
    model = RawProduct().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g)
    params = select_parameters(model, "all")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback to per-sample passes warns
        diag = exact_hessian_diagonal(model, F.cross_entropy, x, y, params)
    _close(diag, brute_force_hessian_diagonal(model, F.cross_entropy, x, y, list(params)), params)


def test_a_reparametrized_network_is_measured_in_a_lightning_fit_without_changing_it():
    """Weight standardization, weight normalization, a transposed weight, a zeroed bias copy and a low-rank
    update, in a plain LightningModule: ``SharpnessMonitor()`` measures on the per-layer path (no
    per-sample fallback warned) and the training run (weights, optimizer state, the global RNG) is
    bit-identical with and without it."""
    from callback_models import fit_with_and_without_the_monitor
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 2, 4, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
    history = fit_with_and_without_the_monitor(Reparametrized, data)
    assert len(history) == 2 and history[-1]["method"] == "hessian_sketch"
    assert all(h["normalized"] > 0 for h in history)


class ScaledStdConv(nn.Conv2d):
    """timm's ``ScaledStdConv2d`` (NFNets): the standardized weight times a per-channel gain, inside
    ``F.batch_norm``'s affine weight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, self.out_channels).view(-1, 1, 1, 1))

    def forward(self, x):
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1),
            None,
            None,
            weight=(self.gain * 0.7).view(-1),
            training=True,
            momentum=0.0,
            eps=1e-4,
        ).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class Standardized(nn.Module):
    """Two weight-standardized convolutions (plain and scaled with a gain), GELU, a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = StdConv(2, 4, 3, padding=1), ScaledStdConv(4, 3, 3, padding=1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = self.conv2(F.gelu(self.conv1(x)))
        return self.head(F.gelu(h).mean(dim=(2, 3)))


def _assert_sketch_unbiased(model, x, y, params, hessian, draws: int = 60) -> None:
    """``draws`` Hessian sketches (4 sketches each) on the per-layer path (a per-sample fallback would warn):
    per tensor, entries without spread equal the brute-force ``hessian``, the others' means lie within 5
    standard errors of it."""
    from lightning_flatness.functional.estimators.hessian_sketch import hessian_sketch_diagonal

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runs = [
            hessian_sketch_diagonal(
                model,
                F.cross_entropy,
                x,
                y,
                params,
                generator=torch.Generator().manual_seed(s),
                num_sketches=4,
            )
            for s in range(draws)
        ]
    for name in params:  # (a head with no operation after it is exact: no spread)
        est = torch.stack([r[name].reshape(-1) for r in runs])
        assert_unbiased(est, hessian[name].detach().reshape(-1), atol=1e-14, spread_required=False)


@pytest.mark.parametrize("with_gain", [False, True])
def test_weight_standardization_curvature_is_exact(with_gain):
    """The rule's ``diag(M)`` for ``<G, batch_norm(W.reshape(1, C, -1), training=True)>`` equals the diagonal
    of ``torch.func.hessian`` of that scalar."""
    from lightning_flatness.functional.estimators.node_rules.weight_functions import WEIGHT_FUNCTION_RULES

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 2, 3, 3, generator=g, dtype=F64)
    adjoint = torch.randn(1, 4, 18, generator=g, dtype=F64)
    gamma = torch.linspace(0.5, 2.0, 4, dtype=F64) if with_gain else None

    def scalar(flat):
        out = F.batch_norm(flat.view(1, 4, 18), None, None, weight=gamma, training=True, eps=1e-4)
        return (out * adjoint).sum()

    expected = torch.func.hessian(scalar)(w.reshape(-1)).diagonal()
    args, kwargs = (w.reshape(1, 4, -1), None, None), {"weight": gamma, "training": True, "eps": 1e-4}
    rule = WEIGHT_FUNCTION_RULES["batch_norm"]
    assert rule.input_of(args, kwargs) is args[0]
    got = rule.diagonal(args, kwargs, adjoint)
    torch.testing.assert_close(
        got.reshape(-1), expected, rtol=1e-10, atol=1e-12 * float(expected.abs().max())
    )


def test_weight_standardized_networks_get_the_hessian_sketch_unbiased_for_the_hessian():
    """NFNet-style convolutions: ``auto`` now measures the Hessian (``hessian_sketch``), whose mean over draws
    equals the brute-force Hessian diagonal, far from the Gauss-Newton one on the standardized weights."""
    torch.manual_seed(0)
    model = Standardized().double().eval()
    x, y = _data(Reparametrized())
    params = {k: v for k, v in select_parameters(model).items() if v.ndim >= 2}
    assert set(params) == {"conv1.weight", "conv2.weight", "head.weight"}  # the gain (C, 1, 1, 1) is not
    names = list(params)
    choice = choose_method(model, F.cross_entropy, x, y)
    assert (choice.method, choice.quantity) == ("hessian_sketch", "hessian")
    hessian = brute_force_hessian_diagonal(model, F.cross_entropy, x, y, names)
    ggn = brute_force_ggn_diagonal(model, F.cross_entropy, x, y, names)
    _assert_sketch_unbiased(model, x, y, params, hessian)
    for name in ("conv1.weight", "conv2.weight"):
        gap = (ggn[name] - hessian[name]).norm() / hessian[name].norm()
        assert float(gap) > 0.2, name  # the Gauss-Newton diagonal misses the standardization's curvature


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_weight_normalization_curvature_is_exact(dim):
    """``diag(M)`` for ``<G, torch._weight_norm(v, g, dim)>`` in ``v`` equals ``torch.func.hessian``'s."""
    from lightning_flatness.functional.estimators.node_rules.weight_functions import WEIGHT_FUNCTION_RULES

    gen = torch.Generator().manual_seed(0)
    v = torch.randn(4, 3, 2, generator=gen, dtype=F64)
    shape = () if dim == -1 else [v.shape[i] if i == dim else 1 for i in range(3)]
    g = torch.randn(shape, generator=gen, dtype=F64)
    adjoint = torch.randn(4, 3, 2, generator=gen, dtype=F64)
    reduce = (0, 1, 2) if dim == -1 else tuple(i for i in range(3) if i != dim)
    torch.testing.assert_close(  # the reference below is torch._weight_norm written out
        torch._weight_norm(v, g, dim), g * v / v.square().sum(dim=reduce, keepdim=True).sqrt()
    )

    def scalar(flat):  # (torch._weight_norm has no forward-mode derivative for torch.func.hessian)
        w = flat.view(4, 3, 2)
        return (g * w / w.square().sum(dim=reduce, keepdim=True).sqrt() * adjoint).sum()

    expected = torch.func.hessian(scalar)(v.reshape(-1)).diagonal()
    rule = WEIGHT_FUNCTION_RULES["_weight_norm"]
    got = rule.diagonal((v, g, dim), {}, adjoint)
    torch.testing.assert_close(
        got.reshape(-1), expected, rtol=1e-10, atol=1e-12 * float(expected.abs().max())
    )


def test_weight_normalized_and_standardized_network_is_unbiased_for_the_hessian():
    """The network of both reparametrizations (weight standardization, ``weight_norm``): ``auto`` measures the
    Hessian, and the sketch's mean over draws equals the brute-force Hessian diagonal."""
    torch.manual_seed(0)
    model = Reparametrized().double().eval()
    for p in model.parameters():
        p.data.mul_(1.5)
    x, y = _data(model)
    params = select_parameters(model, "all")
    names = list(params)
    assert choose_method(model, F.cross_entropy, x, y, parameters="all").quantity == "hessian"
    hessian = brute_force_hessian_diagonal(model, F.cross_entropy, x, y, names)  # (weight_norm written out)
    _assert_sketch_unbiased(model, x, y, params, hessian)
