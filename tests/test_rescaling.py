"""Function-preserving rescalings (Dinh et al. 2017; Sec. 5.1, Appendix A, Sec. 7.3) and the invariances they
test: normalized sharpness (eq. 17) survives both, matrix-normalized sharpness (eq. 13) survives layer scaling
only, the Hessian trace (eq. 5) survives neither."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_flatness.functional import (
    hessian_diagonal,
    normalized_softmax_cross_entropy,
    select_parameters,
    sharpness_measures,
)
from lightning_flatness.reference_models import lenet1d, mlp
from lightning_flatness.rescaling import (
    appendix_a_example,
    hidden_sizes,
    random_function_preserving_rescaling,
    random_rescale_layers,
    random_rescale_rows_columns,
    rescale_layers,
    rescale_rows_columns,
)

DT = torch.float64


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def _small_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return mlp(in_features=6, hidden=7, depth=3, num_classes=4).to(DT)


def _conv2d_net() -> nn.Sequential:
    torch.manual_seed(1)
    return (
        nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.LeakyReLU(0.1),
            nn.MaxPool2d(2),
            nn.Conv2d(3, 4, 3),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Dropout(0.5),
            nn.Flatten(),
            nn.Linear(4 * 2 * 2, 5),
            nn.ReLU(),
            nn.Linear(5, 3),
        )
        .to(DT)
        .eval()
    )


def _lenet1d() -> nn.Sequential:
    torch.manual_seed(2)
    return lenet1d(length=20, channels=(3, 4), hidden=(6, 5), kernel_size=3, num_classes=4).to(DT)


NETS = {
    "mlp": (_small_mlp, (9, 6)),
    "conv2d": (_conv2d_net, (9, 2, 12, 12)),
    "lenet1d": (_lenet1d, (9, 20)),
}


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("rescale", ["layers", "rows_columns", "both"])
def test_random_rescalings_preserve_outputs_to_float64_precision(name, rescale):
    make, shape = NETS[name]
    net = make()
    x = torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(4)
    fn = {
        "layers": random_rescale_layers,
        "rows_columns": random_rescale_rows_columns,
        "both": random_function_preserving_rescaling,
    }[rescale]
    new = fn(net, generator=gen, log10_range=(-2.0, 2.0))
    assert _relative_error(new(x), net(x)) <= 1e-12
    changed = [not torch.allclose(a, b) for a, b in zip(new.parameters(), net.parameters())]
    assert sum(changed) >= len(hidden_sizes(net)) + 1  # the attack really moved the weights


def test_row_column_scaling_divides_rows_and_multiplies_columns_including_flattened_channel_blocks():
    net = _conv2d_net()
    alphas = [
        torch.tensor([2.0, 0.5, 4.0], dtype=DT),
        torch.tensor([3.0, 0.25, 5.0, 0.1], dtype=DT),
        torch.linspace(0.5, 2.0, 5, dtype=DT),
    ]
    new = rescale_rows_columns(net, alphas)
    conv1, conv2, fc1, fc2 = (net[i] for i in (0, 3, 8, 10))
    new1, new2, newf1, newf2 = (new[i] for i in (0, 3, 8, 10))
    a1, a2, a3 = alphas
    # eq. 15: rows (output channels) and biases of hidden layers divided by alpha
    torch.testing.assert_close(new1.weight, conv1.weight / a1[:, None, None, None], rtol=1e-15, atol=0)
    torch.testing.assert_close(new1.bias, conv1.bias / a1, rtol=1e-15, atol=0)
    # eq. 16 for a convolution: input channel j of the next layer multiplied by alpha_j
    torch.testing.assert_close(
        new2.weight, conv2.weight * a1[None, :, None, None] / a2[:, None, None, None], rtol=1e-15, atol=0
    )
    # after Flatten of 4 channels x (2 x 2): columns 4c .. 4c + 3 belong to channel c
    for c in range(4):
        torch.testing.assert_close(
            newf1.weight[:, 4 * c : 4 * c + 4],
            fc1.weight[:, 4 * c : 4 * c + 4] * a2[c] / a3[:, None],
            rtol=1e-15,
            atol=0,
        )
    torch.testing.assert_close(newf1.bias, fc1.bias / a3, rtol=1e-15, atol=0)
    # the output layer: columns only, bias untouched
    torch.testing.assert_close(newf2.weight, fc2.weight * a3[None, :], rtol=1e-15, atol=0)
    torch.testing.assert_close(newf2.bias, fc2.bias, rtol=0, atol=0)


def test_layer_scaling_multiplies_each_weight_by_its_factor_and_each_bias_by_the_cumulative_product():
    net = _small_mlp()
    factors = [10.0, 0.5, 0.4, 0.5]  # product 1
    new = rescale_layers(net, factors)
    cumulative = 1.0
    for i, f in enumerate(factors):
        cumulative *= f
        torch.testing.assert_close(new[2 * i].weight, f * net[2 * i].weight, rtol=1e-14, atol=0)
        torch.testing.assert_close(new[2 * i].bias, cumulative * net[2 * i].bias, rtol=1e-14, atol=0)


def test_random_layer_factors_have_product_one_and_follow_the_generator():
    net = _small_mlp()
    a = random_rescale_layers(net, generator=torch.Generator().manual_seed(7), log10_range=(-1.0, 1.0))
    b = random_rescale_layers(net, generator=torch.Generator().manual_seed(7), log10_range=(-1.0, 1.0))
    ratios = [float(a[i].weight[0, 0].detach() / net[i].weight[0, 0].detach()) for i in (0, 2, 4, 6)]
    assert math.prod(ratios) == pytest.approx(1.0, rel=1e-12)
    assert all(10**-2 <= r <= 10**2 for r in ratios) and max(ratios) / min(ratios) > 1.5
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_rescaling_returns_a_copy_and_leaves_the_original_untouched():
    net = _lenet1d()
    before = [p.detach().clone() for p in net.parameters()]
    new = random_function_preserving_rescaling(net, generator=torch.Generator().manual_seed(0))
    assert new is not net
    for p, q in zip(net.parameters(), before):
        assert torch.equal(p, q)


@pytest.mark.parametrize("between", [nn.Tanh(), nn.BatchNorm1d(5), nn.Sigmoid()])
def test_rescaling_refuses_layers_that_are_not_positively_homogeneous(between):
    net = nn.Sequential(nn.Linear(3, 5), between, nn.Linear(5, 2))
    with pytest.raises(ValueError, match="would change the function"):
        rescale_rows_columns(net, [2.0])


def test_rescaling_rejects_bad_factors_with_messages_that_name_the_fix():
    net = _small_mlp()
    with pytest.raises(ValueError, match="product of the layer scaling factors"):
        rescale_layers(net, [2.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="expected 3 alphas"):
        rescale_rows_columns(net, [1.0])
    with pytest.raises(ValueError, match="must be finite and > 0"):
        rescale_rows_columns(net, [1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match=r"shape \(7,\)"):
        rescale_rows_columns(net, [torch.ones(3), 1.0, 1.0])
    with pytest.raises(TypeError, match="nn.Sequential"):
        rescale_rows_columns(nn.Linear(2, 2), [])
    with pytest.raises(ValueError, match="without a Flatten"):
        rescale_rows_columns(nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Linear(4, 2)), [1.0])


def test_anything_before_the_first_and_after_the_last_layer_is_allowed():
    net = nn.Sequential(nn.Tanh(), nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Softmax(dim=1)).to(DT)
    x = torch.randn(5, 3, dtype=DT)
    new = rescale_rows_columns(net, [torch.tensor([0.1, 1.0, 10.0, 3.0])])
    assert _relative_error(new(x), net(x)) <= 1e-12


# --- Appendix A.1 -----------------------------------------------------------------------------------------


def _norms(w: torch.Tensor) -> tuple[float, float]:
    w = w.detach()
    return float(torch.linalg.matrix_norm(w, ord=2)), float(w.pow(2).sum())


def test_appendix_a_row_column_scaling_reproduces_eq_38_to_43_and_preserves_the_function():
    ex = appendix_a_example()
    w = lambda net: (net[0].weight.detach(), net[2].weight.detach())  # noqa: E731
    w1, w2 = w(ex.initial)
    # eq. 34-35: ||W1||_F = sqrt(30) = 5.477; the printed "||W1||_2 ~ 5.48" is that Frobenius norm, the
    # spectral norm is 5.465 (for W2 both round to 13.19)
    assert _norms(w1) == (pytest.approx(5.465, abs=5e-4), pytest.approx(30.0, rel=1e-14))
    assert math.sqrt(_norms(w1)[1]) == pytest.approx(5.48, abs=5e-3)
    assert _norms(w2) == (pytest.approx(13.19, abs=5e-3), pytest.approx(174.0, rel=1e-14))  # eq. 36-37
    torch.testing.assert_close(
        w(ex.first_step)[0], torch.tensor([[0.1, 0.2], [3.0, 4.0]], dtype=DT)
    )  # eq. 38
    torch.testing.assert_close(
        w(ex.first_step)[1], torch.tensor([[50.0, 6.0], [70.0, 8.0]], dtype=DT)
    )  # eq. 39
    w1, w2 = w(ex.second_step)
    torch.testing.assert_close(w1, torch.tensor([[0.1, 0.2], [30.0, 40.0]], dtype=DT))  # eq. 40
    torch.testing.assert_close(w2, torch.tensor([[50.0, 0.6], [70.0, 0.8]], dtype=DT))  # eq. 41
    assert _norms(w1) == (pytest.approx(50.00, abs=5e-3), pytest.approx(2500.05, rel=1e-12))  # eq. 42-43
    # the norms of eq. 41's W2 (the paper's eq. 44-45 print other numbers, see the next test)
    assert _norms(w2) == (pytest.approx(86.03, abs=5e-3), pytest.approx(7401.0, rel=1e-12))
    x = torch.randn(50, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    assert _relative_error(ex.second_step(x), ex.initial(x)) <= 1e-12


def test_appendix_a_printed_w2_norms_are_those_of_row_scaled_w2_which_changes_the_function():
    # Eq. 44-45 print ||W2||_F^2 = 6101.13 and ||W2||_2 = 78.11: the norms of W2 with its *rows* scaled by
    # 10 and 0.1, not of eq. 41 (columns scaled). Row-scaling W2 is not function-preserving.
    ex = appendix_a_example()
    rows_scaled = torch.tensor([[5.0, 6.0], [7.0, 8.0]], dtype=DT) * torch.tensor([[10.0], [0.1]], dtype=DT)
    assert _norms(rows_scaled) == (pytest.approx(78.11, abs=5e-3), pytest.approx(6101.13, rel=1e-12))
    wrong = appendix_a_example().second_step
    with torch.no_grad():
        wrong[2].weight.copy_(rows_scaled)
    x = torch.rand(50, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    assert _relative_error(wrong(x), ex.initial(x)) > 0.5


# --- Sec. 7.3: two branches -------------------------------------------------------------------------------


class TwoBranch(nn.Module):
    """``y = ReLU(W1 x) + ReLU(W2 x)`` (eq. 26)."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor):
        super().__init__()
        self.branch1 = nn.Linear(w1.shape[1], w1.shape[0], bias=False).to(w1.dtype)
        self.branch2 = nn.Linear(w2.shape[1], w2.shape[0], bias=False).to(w2.dtype)
        with torch.no_grad():
            self.branch1.weight.copy_(w1)
            self.branch2.weight.copy_(w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.branch1(x)) + torch.relu(self.branch2(x))


def _sec_7_3_networks() -> tuple[torch.Tensor, TwoBranch, TwoBranch]:
    w = torch.randn(4, 6, dtype=DT, generator=torch.Generator().manual_seed(5))
    halves = TwoBranch(w / 2, w / 2)  # eq. 27
    moved = TwoBranch(w, torch.zeros_like(w))  # eq. 29-30
    return w, halves, moved


def test_sec_7_3_splitting_a_weight_into_two_branches_preserves_the_function():
    w, halves, moved = _sec_7_3_networks()
    x = torch.randn(30, 6, dtype=DT, generator=torch.Generator().manual_seed(6))
    single = torch.relu(x @ w.T)
    assert _relative_error(halves(x), single) <= 1e-15
    assert _relative_error(moved(x), single) <= 1e-15


# --- invariances of the sharpness measures (exact Hessian diagonal, float64) ------------------------------

INVARIANCE_NETS = {"mlp": (_small_mlp, (64, 6)), "lenet1d": (_lenet1d, (64, 20))}


def _data(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    shape = INVARIANCE_NETS[name][1]
    gen = torch.Generator().manual_seed(11)
    return torch.randn(*shape, dtype=DT, generator=gen), torch.randint(0, 4, (shape[0],), generator=gen)


def _diagonals(net: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn) -> dict[str, torch.Tensor]:
    return hessian_diagonal(net, loss_fn, x, y, method="exact")


def _measures(net: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=normalized_softmax_cross_entropy):
    weights = {n: p.detach() for n, p in select_parameters(net).items()}
    return sharpness_measures(weights, _diagonals(net, x, y, loss_fn))


def _layer_factors(net: nn.Module) -> list[float]:
    n = len(hidden_sizes(net)) + 1
    raw = [10.0 ** (1.5 * math.sin(3.0 * i + 1.0)) for i in range(n)]
    geometric_mean = math.prod(raw) ** (1.0 / n)
    return [r / geometric_mean for r in raw]


def _unit_alphas(net: nn.Module) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(12)
    return [10.0 ** (4.0 * torch.rand(k, dtype=DT, generator=gen) - 2.0) for k in hidden_sizes(net)]


@pytest.mark.parametrize("name", sorted(INVARIANCE_NETS))
def test_normalized_sharpness_invariant_to_layer_and_row_column_rescaling(name):
    net = INVARIANCE_NETS[name][0]()
    x, y = _data(name)
    base = _measures(net, x, y)
    for rescaled in (rescale_layers(net, _layer_factors(net)), rescale_rows_columns(net, _unit_alphas(net))):
        after = _measures(rescaled, x, y)
        assert float(base["normalized"]) > 0
        for key in base:
            if key.startswith("normalized"):  # the total and every tensor's share
                assert float(after[key]) == pytest.approx(float(base[key]), rel=1e-8), key


@pytest.mark.parametrize("name", sorted(INVARIANCE_NETS))
def test_matrix_normalized_sharpness_invariant_to_layer_scaling_but_not_to_row_column_scaling(name):
    net = INVARIANCE_NETS[name][0]()
    x, y = _data(name)
    base = _measures(net, x, y)
    layered = _measures(rescale_layers(net, _layer_factors(net)), x, y)
    assert float(layered["matrix_normalized"]) == pytest.approx(float(base["matrix_normalized"]), rel=1e-8)
    unit = _measures(rescale_rows_columns(net, _unit_alphas(net)), x, y)
    assert abs(float(unit["matrix_normalized"]) / float(base["matrix_normalized"]) - 1) > 0.1


@pytest.mark.parametrize("name", sorted(INVARIANCE_NETS))
def test_hessian_trace_scales_by_inverse_square_layer_factor_under_layer_scaling(name):
    net = INVARIANCE_NETS[name][0]()
    x, y = _data(name)
    factors = _layer_factors(net)
    base = _measures(net, x, y, F.cross_entropy)
    after = _measures(rescale_layers(net, factors), x, y, F.cross_entropy)
    names = list(select_parameters(net, "weights"))
    for weight_name, factor in zip(names, factors):  # d2L/d(aw)^2 = d2L/dw^2 / a^2
        key = f"hessian_trace/{weight_name}"
        assert float(after[key]) == pytest.approx(float(base[key]) / factor**2, rel=1e-9)
    assert abs(float(after["hessian_trace"]) / float(base["hessian_trace"]) - 1) > 0.1


@pytest.mark.parametrize("name", sorted(INVARIANCE_NETS))
def test_hessian_diagonal_rows_scale_by_alpha_squared_and_columns_by_inverse_under_row_column_scaling(name):
    net = INVARIANCE_NETS[name][0]()
    x, y = _data(name)
    alphas = _unit_alphas(net)
    base = _diagonals(net, x, y, normalized_softmax_cross_entropy)
    after = _diagonals(rescale_rows_columns(net, alphas), x, y, normalized_softmax_cross_entropy)
    names = list(select_parameters(net, "weights"))
    for i, weight_name in enumerate(names):
        h = base[weight_name]
        extra = [1] * (h.ndim - 2)
        row = alphas[i] ** 2 if i < len(alphas) else torch.ones(h.shape[0], dtype=DT)
        col = alphas[i - 1] ** -2 if i > 0 else torch.ones(1, dtype=DT)
        if i > 0 and h.shape[1] != alphas[i - 1].numel():  # Linear after Flatten: one block per channel
            col = col.repeat_interleave(h.shape[1] // alphas[i - 1].numel())
        predicted = h * row.reshape(-1, 1, *extra) * col.reshape(1, -1, *extra)
        torch.testing.assert_close(
            after[weight_name], predicted, rtol=1e-9, atol=1e-12 * float(predicted.abs().max())
        )


def test_sec_7_3_normalized_and_matrix_normalized_sharpness_agree_for_every_split_of_two_branches():
    # The measures of a network are summed over its weight tensors (sharpness_measures' totals), so here
    # over the two branches. W/2 in both branches: each branch has the single network's Hessian diagonal
    # and half its weights; eq. 17 and eq. 13 are homogeneous of degree 1 in |W|, so the halves add up to
    # the single value. W and 0: the zero branch contributes 0 (zero weights, zero curvature). The Hessian
    # trace doubles instead.
    w, halves, moved = _sec_7_3_networks()
    single = nn.Sequential(nn.Linear(6, 4, bias=False), nn.ReLU()).to(DT)
    with torch.no_grad():
        single[0].weight.copy_(w)
    gen = torch.Generator().manual_seed(13)
    x, y = torch.randn(40, 6, dtype=DT, generator=gen), torch.randint(0, 4, (40,), generator=gen)
    ref = _measures(single, x, y)
    for net in (halves, moved):
        got = _measures(net, x, y)
        for key in ("normalized", "matrix_normalized"):
            assert float(got[key]) == pytest.approx(float(ref[key]), rel=1e-8), key
    assert float(_measures(halves, x, y)["hessian_trace"]) == pytest.approx(
        2 * float(ref["hessian_trace"]), rel=1e-10
    )
    assert float(_measures(moved, x, y)["hessian_trace"]) == pytest.approx(
        float(ref["hessian_trace"]), rel=1e-10
    )
