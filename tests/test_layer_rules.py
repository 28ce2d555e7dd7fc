"""The per-layer contraction: its two evaluations (position pairs, per-sample gradients) agree with an
explicit per-sample computation, and the exact diagonal is the brute-force one whichever is chosen."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracles import brute_force_ggn_diagonal, brute_force_hessian_diagonal
from torch import nn

import lightning_flatness.functional.estimators.layer_rules.contraction as contraction
from lightning_flatness.functional import hessian_diagonal, select_parameters
from lightning_flatness.functional.estimators.layer_rules import LAYER_RULES, position_pair_contraction
from lightning_flatness.functional.estimators.layer_rules.base import LayerCall, sum_trailing_dims
from lightning_flatness.functional.estimators.layer_rules.contraction import pair_products
from lightning_flatness.functional.estimators.layer_rules.conv import cropped_squared_gradients, live_taps


def test_position_pairs_equal_the_signed_sum_of_squared_per_sample_gradients():
    g = torch.Generator().manual_seed(0)
    n, groups, inputs, outputs, k, positions = 5, 2, 3, 4, 3, 6
    a = torch.randn(n, groups, inputs, positions, generator=g, dtype=torch.float64)
    grad = torch.randn(n, groups, k * outputs, positions, generator=g, dtype=torch.float64)
    signs = torch.randn(n, k, generator=g, dtype=torch.float64).sign()
    per_sample = torch.einsum("ngcp,ngip->ngci", grad, a).reshape(n, groups, k, outputs, inputs)
    expected = torch.einsum("nk,ngkoi->goi", signs, per_sample**2)
    torch.testing.assert_close(position_pair_contraction(a, grad, signs, k), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("memory_order", "dims"),
    [
        ((0, 1, 2, 3), (2, 3)),  # contiguous, two trailing dims (as a 2-D convolution's positions)
        ((1, 0, 2, 3), (2, 3)),  # the first two dims swapped in memory (the tape's sample-major (N, K))
        ((1, 0, 2, 3), (-1,)),
        ((2, 0, 1, 3), (3,)),  # leading dims in any memory order
        ((0, 1, 2, 3), (1, 3)),  # not trailing: the reduction kernel
        ((0, 1, 3, 2), (3,)),  # trailing dim not contiguous: the reduction kernel
    ],
)
def test_sum_over_trailing_dims_equals_the_reduction_in_every_layout(memory_order, dims):
    g = torch.Generator().manual_seed(5)
    shape = (3, 4, 5, 7)
    stored = torch.randn([shape[d] for d in memory_order], generator=g, dtype=torch.float64)
    t = stored.permute(*[memory_order.index(d) for d in range(4)])  # shape (3, 4, 5, 7), strided as stored
    assert t.shape == shape
    torch.testing.assert_close(sum_trailing_dims(t, dims), t.sum(dim=dims), rtol=1e-14, atol=1e-14)
    sliced = t[:, ::2]  # leading dims that do not merge into one row index
    torch.testing.assert_close(sum_trailing_dims(sliced, dims), sliced.sum(dim=dims), rtol=1e-14, atol=1e-14)
    empty = t[:, :, :, :0]  # no positions: zeros, as the reduction gives
    torch.testing.assert_close(sum_trailing_dims(empty, dims), empty.sum(dim=dims), rtol=0, atol=0)


@pytest.mark.parametrize("positions", [1, 2, 5])
def test_pair_products_are_the_triu_pairs_of_positions(positions):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 7, positions, generator=g, dtype=torch.float64).transpose(-1, -2)  # strided
    first, second = torch.triu_indices(positions, positions)
    expected = torch.stack(
        [x[..., p, :] * x[..., q, :] for p, q in zip(first.tolist(), second.tolist())], dim=-2
    )
    torch.testing.assert_close(pair_products(x), expected, rtol=0, atol=0)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1, groups=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * 2 * 2, 5),
        )
        .double()
        .eval()
    )


def _assert_exact_equals_brute_force(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """``method="exact"`` over every parameter equals the float64 brute-force Hessian diagonal."""
    names = list(select_parameters(model, "all"))
    diag = hessian_diagonal(model, F.cross_entropy, x, y, method="exact", parameters="all")
    ref = brute_force_hessian_diagonal(model, F.cross_entropy, x, y, names)
    for name in names:
        torch.testing.assert_close(diag[name], ref[name], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("pairs", [True, False], ids=["position_pairs", "per_sample"])
def test_exact_diagonal_equals_brute_force_on_either_contraction_path(pairs, monkeypatch):
    monkeypatch.setattr(contraction, "use_position_pairs", lambda positions, inputs, k: pairs)
    model = _cnn()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=g)
    _assert_exact_equals_brute_force(model, x, y)


def test_the_choice_takes_pairs_only_for_few_positions_and_wide_inputs():
    assert contraction.use_position_pairs(positions=4, inputs=2304, k=10)  # ResNet-18, late stage
    assert not contraction.use_position_pairs(positions=36, inputs=5, k=10)  # 1-D LeNet, first conv
    assert not contraction.use_position_pairs(positions=64, inputs=576, k=10)  # ResNet-18, first stage
    assert set(LAYER_RULES) >= {"linear", "conv1d", "conv2d", "conv3d"}


class _Bag(nn.Module):
    """Embedding (with a padding row, ids repeated within a sample) -> mean over positions -> ReLU MLP."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(7, 4, padding_idx=0)
        self.head = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))

    def forward(self, ids):
        return self.head(self.table(ids).mean(dim=1))


def test_embedding_rule_gives_the_exact_diagonal_on_the_per_layer_path():
    import warnings

    torch.manual_seed(0)
    model = _Bag().double().eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 7, (9, 5), generator=g)
    ids[0, :3] = 0  # padding positions: no gradient to row 0
    ids[1] = 4  # one id at every position of a sample: its per-sample gradients sum before squaring
    y = torch.randint(0, 3, (9,), generator=g)
    names = list(select_parameters(model, "all"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the per-sample path would announce itself
        diag = hessian_diagonal(model, F.cross_entropy, ids, y, method="exact", parameters="all")
    ref = brute_force_hessian_diagonal(model, F.cross_entropy, ids, y, names)
    for name in names:
        torch.testing.assert_close(diag[name], ref[name], rtol=1e-10, atol=1e-13)
    assert float(diag["table.weight"][4].abs().sum()) > 0 and float(diag["table.weight"][0].abs().sum()) == 0


def test_bert_word_and_token_type_embeddings_stay_on_the_per_layer_path():
    import warnings

    pytest.importorskip("transformers")
    from zoo_models import tiny_bert
    from zoo_oracle import brute_force_ggn_diagonal

    from lightning_flatness.functional import normalized_softmax_cross_entropy

    model, (inputs, labels) = tiny_bert(n=4, dtype=torch.float64)
    params = select_parameters(model)
    assert "bert.embeddings.word_embeddings.weight" in params
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diag = hessian_diagonal(
            model, normalized_softmax_cross_entropy, inputs, labels, method="gauss_newton"
        )
    names = ["bert.embeddings.word_embeddings.weight", "bert.embeddings.token_type_embeddings.weight"]
    ref = brute_force_ggn_diagonal(model, normalized_softmax_cross_entropy, inputs, labels, names)
    for name in names:
        torch.testing.assert_close(
            diag[name], ref[name], rtol=1e-9, atol=1e-12 * float(ref[name].abs().max())
        )


@pytest.mark.parametrize(
    "spatial, kernel, stride, padding, dilation, groups",
    [
        ((1, 1), (3, 3), 1, 1, 1, 1),  # ResNet-18 layer4 on CIFAR: only the centre tap is live
        ((2, 2), (3, 3), 2, 1, 1, 2),  # stride 2 onto a 1x1 map: a 2x2 block of taps
        ((3, 2), (5, 3), 1, 2, 1, 1),  # different live ranges per dim
        ((2,), (3,), 1, 2, 2, 1),  # dilated 1-D: the crop's left padding is 2 - 1 * 2 = 0
        ((4, 4), (3, 3), 1, 1, 1, 1),  # every tap live: no crop
    ],
)
def test_cropped_dead_taps_equal_the_full_contraction(spatial, kernel, stride, padding, dilation, groups):
    nd = len(spatial)
    conv = getattr(F, f"conv{nd}d")
    g = torch.Generator().manual_seed(3)
    n, k, cin, cout = 4, 3, 4, 6
    x = torch.randn(n, cin, *spatial, generator=g, dtype=torch.float64)
    w = torch.randn(cout, cin // groups, *kernel, dtype=torch.float64)
    out = conv(x, w, None, stride, padding, dilation, groups)
    call = LayerCall(
        f"conv{nd}d", "m", x, out, "w", None,
        stride=(stride,) * nd, padding=((padding, padding),) * nd, dilation=(dilation,) * nd, groups=groups,
    )  # fmt: skip
    grad = torch.randn(k, *out.shape, generator=g, dtype=torch.float64)
    signs = torch.randn(n, k, generator=g, dtype=torch.float64).sign()
    # independent: per-sample weight gradients of <grad_nk, conv(x_n, w)> by autograd, squared, signed
    expected = torch.zeros_like(w)
    for i in range(n):
        for j in range(k):
            wi = w.clone().requires_grad_(True)
            (gw,) = torch.autograd.grad(
                (conv(x[i : i + 1], wi, None, stride, padding, dilation, groups) * grad[j, i]).sum(), wi
            )
            expected += signs[i, j] * gw**2
    cropped = cropped_squared_gradients(call, grad, signs, kernel)
    full = contraction.factor_contraction(LAYER_RULES[call.op], call, grad, signs, kernel).reshape(w.shape)
    torch.testing.assert_close(full, expected, rtol=1e-12, atol=1e-12)
    live = live_taps(call, kernel, spatial, tuple(out.shape[2:]))
    if all(stop - start == size for (start, stop), size in zip(live, kernel)):
        assert cropped is None
        return
    torch.testing.assert_close(cropped.reshape(w.shape), expected, rtol=1e-12, atol=1e-12)
    dead = torch.ones(kernel, dtype=torch.bool)
    dead[tuple(slice(start, stop) for start, stop in live)] = False
    assert (expected[..., dead] == 0).all() and dead.any()  # the taps left out have zero gradients


def test_exact_diagonal_equals_brute_force_with_dead_taps():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4, 3),
    ).double().eval()  # fmt: skip
    g = torch.Generator().manual_seed(5)
    # 2x2 -> 1x1 -> 1x1: taps that read only padding in both convolutions
    x = torch.randn(5, 2, 2, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=g)
    _assert_exact_equals_brute_force(model, x, y)


@pytest.mark.parametrize(
    "spatial, kernel, stride, padding, dilation, groups",
    [
        ((2, 2), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),  # ResNet-18 layer3 on CIFAR
        ((4, 4), (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), 2),  # stride 2, groups
        ((3, 4), (2, 3), (1, 2), ((0, 1), (1, 0)), (1, 1), 1),  # asymmetric padding (a cropped kernel)
        ((5, 5), (3, 2), (1, 1), ((2, 2), (0, 1)), (2, 1), 1),  # dilation, mixed padding
        ((8, 8), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),  # 64 positions: the strided view
    ],
)
def test_unfold_kernel_and_strided_view_give_the_same_columns(
    spatial, kernel, stride, padding, dilation, groups, monkeypatch
):
    from lightning_flatness.functional.estimators.layer_rules import conv as conv_rule

    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 4, *spatial, generator=g, dtype=torch.float64)
    call = LayerCall(
        "conv2d", "m", x, x, "w", None, stride=stride, padding=padding, dilation=dilation, groups=groups
    )
    monkeypatch.setattr(conv_rule, "UNFOLD_KERNEL_MAX_POSITIONS", 0)
    view = conv_rule.unfold(x, call, kernel)
    monkeypatch.setattr(conv_rule, "UNFOLD_KERNEL_MAX_POSITIONS", 10**9)
    library = conv_rule.unfold(x, call, kernel)
    assert library.shape == view.shape and torch.equal(library, view)
    # independent: column p of sample n is the padded input patch the convolution reads at output p
    xp = F.pad(x, (padding[1][0], padding[1][1], padding[0][0], padding[0][1]))
    oh, ow = (
        (xp.shape[2] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1,
        (xp.shape[3] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1,
    )
    assert view.shape[-1] == oh * ow
    for p in (0, oh * ow - 1):
        i, j = divmod(p, ow)
        rows = slice(i * stride[0], i * stride[0] + dilation[0] * (kernel[0] - 1) + 1, dilation[0])
        cols = slice(j * stride[1], j * stride[1] + dilation[1] * (kernel[1] - 1) + 1, dilation[1])
        patch = xp[:, :, rows, cols].reshape(3, groups, -1)
        torch.testing.assert_close(view[..., p], patch, rtol=0, atol=0)


class _TwiceOnOnePixel(nn.Module):
    """One padded 3x3 convolution applied twice to a 1x1 map (8 dead taps; the second call's block is
    added onto the first call's contribution), between a stride-2 convolution and a linear head."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.down(x))
        h = torch.relu(self.shared(h))
        h = torch.relu(self.shared(h))
        return self.head(h.flatten(1))


@pytest.mark.parametrize("method", ["exact", "gauss_newton_sketch"])
def test_dead_tap_blocks_add_onto_a_shared_weight(method):
    torch.manual_seed(7)
    model = _TwiceOnOnePixel().double().eval()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 2, 2, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (4,), generator=g)
    names = list(select_parameters(model, "all"))
    params = dict(model.named_parameters())
    ref = brute_force_ggn_diagonal(model, F.cross_entropy, x, y, names)
    if method == "exact":  # the exact Gauss-Newton diagonal (a shared weight: not the Hessian's)
        from lightning_flatness.functional.estimators.exact import gauss_newton_diagonal

        diag = gauss_newton_diagonal(model, F.cross_entropy, x, y, params).diagonal
        for name in names:
            torch.testing.assert_close(diag[name], ref[name], rtol=1e-10, atol=1e-13)
        return
    # the sketch: the mean of many estimates against the brute-force Gauss-Newton diagonal
    from lightning_flatness.functional.estimators.gauss_newton_sketch import gauss_newton_sketch_diagonal

    gen = torch.Generator().manual_seed(9)
    runs = [
        gauss_newton_sketch_diagonal(model, F.cross_entropy, x, y, params, generator=gen) for _ in range(300)
    ]
    w = "shared.weight"
    stack = torch.stack([r[w] for r in runs])
    se = stack.std(dim=0) / 300**0.5
    live = se > 0
    assert live.sum() >= 8 and (stack[:, ~live] == 0).all() and (ref[w][~live] == 0).all()
    assert ((stack.mean(dim=0) - ref[w])[live].abs() / se[live]).max() < 5.0
