"""Sketched Gauss-Newton diagonal (``gauss_newton_sketch``): unbiased for the brute-force float64
``diag(J^T Lambda J)`` (z-scores of the mean of many estimates, from their own spread) for per-sample
chunks, sign-mixed chunks and whole-batch chunks, with exact and Monte-Carlo base columns, for
cross-entropy and eq. 20, through the per-layer path and the any-graph path (train-mode BatchNorm:
samples interact); exact when the loss Hessian has rank one; the mixing identity of
``sketch_columns``; the registry entry; the model left untouched."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_flatness.functional.estimators import hessian_diagonal_groups
from lightning_flatness.functional.estimators.gauss_newton_sketch import (
    gauss_newton_sketch_diagonal,
    sketch_columns,
)
from lightning_flatness.functional.estimators.registry import ESTIMATORS
from lightning_flatness.functional.losses import normalized_softmax_cross_entropy
from tests.oracles import brute_force_ggn_diagonal

torch.set_num_threads(1)


def _conv_net(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(2, 3, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(3))
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 6)]
    return nn.Sequential(*layers).double()


def _data(n: int = 9, k: int = 6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, k, (n,), generator=g)


def _max_z(model, loss_fn, x, y, repeats, **kwargs) -> float:
    """Largest |mean - brute force| / (sd / sqrt(repeats)) over all entries of all weights and biases."""
    params = dict(model.named_parameters())
    reference = brute_force_ggn_diagonal(model, loss_fn, x, y, list(params))
    gen = torch.Generator().manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the any-graph path's cost warning
        runs = [
            gauss_newton_sketch_diagonal(model, loss_fn, x, y, params, generator=gen, **kwargs)
            for _ in range(repeats)
        ]
    worst, noisy, total = 0.0, 0, 0
    scale = max(float(r.abs().max()) for r in reference.values())
    for name in params:
        stack = torch.stack([r[name] for r in runs])
        se = stack.std(dim=0) / repeats**0.5
        error = (stack.mean(dim=0) - reference[name]).abs()
        # entries without curvature (a conv bias before train-mode BatchNorm): rounding only
        quiet = se <= 1e-9 * scale
        assert bool((error[quiet] <= 1e-9 * scale).all())
        noisy, total = noisy + int((~quiet).sum()), total + se.numel()
        if bool((~quiet).any()):
            worst = max(worst, float((error[~quiet] / se[~quiet]).max()))
    assert noisy >= 0.8 * total, "entries without noise: the test would not test them"
    return worst


@pytest.mark.parametrize("loss_fn", [F.cross_entropy, normalized_softmax_cross_entropy])
@pytest.mark.parametrize(
    "chunk_size, max_exact_outputs, structured",
    [(1, 32, True), (4, 32, True), (9, 32, True), (1, 0, True), (4, 0, True), (4, 0, False)],
    ids=["B1", "B4", "batch", "B1-structured", "B4-structured", "B4-mc"],
)
def test_unbiased_against_brute_force(loss_fn, chunk_size, max_exact_outputs, structured, monkeypatch):
    # 87 entries (weights and biases), 300 estimates: |z| < 5 everywhere (the mutations tried, e.g. a
    # dropped negative part or Rademacher signs shared across the samples of a chunk, give |z| of 11-174).
    # Above max_exact_outputs: the structured exact factors of the loss Hessian, or (structure switched
    # off, as for losses without one) the Monte-Carlo base columns.
    if not structured:
        from lightning_flatness.functional.estimators import gauss_newton_sketch

        monkeypatch.setattr(gauss_newton_sketch, "loss_hessian_structure", lambda *a: None)
    model = _conv_net()
    x, y = _data()
    z = _max_z(model, loss_fn, x, y, 300, chunk_size=chunk_size, max_exact_outputs=max_exact_outputs)
    assert z < 5.0


def test_unbiased_when_samples_interact():
    # train-mode BatchNorm: J_n depends on the other samples; the chunk gradients come from whole
    # backward passes (the any-graph path), still unbiased for the brute-force J^T Lambda J
    model = _conv_net(bn=True).train()
    x, y = _data()
    with pytest.warns(UserWarning, match="per-layer contractions do not apply"):
        params = {n: p for n, p in model.named_parameters() if p.ndim > 1}
        gauss_newton_sketch_diagonal(model, F.cross_entropy, x, y, params, chunk_size=3)
    assert _max_z(model, F.cross_entropy, x, y, 200, chunk_size=3) < 5.0


def test_exact_for_a_rank_one_loss_hessian():
    # one output and MSE: Lambda_n = 2 (one column), so per-sample chunks carry no noise at all
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 1)).double()
    x, _ = _data(6)
    y = torch.randn(6, 1, dtype=torch.float64)
    params = {n: p for n, p in model.named_parameters()}
    est = gauss_newton_sketch_diagonal(model, F.mse_loss, x, y, params, chunk_size=1)
    reference = brute_force_ggn_diagonal(model, F.mse_loss, x, y, list(params))
    for name in params:
        torch.testing.assert_close(est[name], reference[name], rtol=1e-10, atol=1e-14)


def test_sketch_columns_mix_to_the_signed_sum():
    # E[sum_j s'_j v_j v_j^T] = sum_k s_k c_k c_k^T: the average over many sketches converges to it
    g = torch.Generator().manual_seed(0)
    columns = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    signs = torch.tensor([[1.0, -1.0, 2.0], [1.0, 1.0, -0.5]], dtype=torch.float64)
    mixed, mixed_signs = sketch_columns(columns, signs, 20000, g)
    assert mixed.shape == (2, 4, 40000) and mixed_signs.tolist() == [1.0, -1.0] * 20000
    got = torch.einsum("ndj,j,nej->nde", mixed, mixed_signs, mixed)
    want = torch.einsum("ndk,nk,nek->nde", columns, signs, columns)
    scale = torch.einsum("ndk,nek->nde", columns.abs(), columns.abs()) * 3
    assert float(((got - want).abs() / scale).max()) < 5 * 2 / 20000**0.5  # the CLT's sd is <= 2 / sqrt(S)
    # all signs positive (cross-entropy): one column per sketch
    only, only_signs = sketch_columns(columns, torch.ones(3, dtype=torch.float64), 2, g)
    assert only.shape == (2, 4, 2) and only_signs.tolist() == [1.0, 1.0]


def test_registered_and_model_untouched():
    spec = ESTIMATORS["gauss_newton_sketch"]
    assert spec.quantity == "gauss_newton" and spec.stochastic
    model = _conv_net(bn=True).eval()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data(8)
    est = hessian_diagonal_groups(
        model,
        F.cross_entropy,
        x,
        y,
        method="gauss_newton_sketch",
        num_groups=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert est.groups["0.weight"].shape == (2, 3, 2, 3, 3) and est.method == "gauss_newton_sketch"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(bool((p.grad == 0).all()) for p in model.parameters())


def test_rejects_bad_options():
    model = _conv_net()
    x, y = _data()
    params = {"0.weight": model[0].weight}
    with pytest.raises(ValueError, match="chunk_size"):
        gauss_newton_sketch_diagonal(model, F.cross_entropy, x, y, params, chunk_size=0)
    with pytest.raises(ValueError, match="num_sketches"):
        gauss_newton_sketch_diagonal(model, F.cross_entropy, x, y, params, num_sketches=0)


def test_auto_sketches_big_networks_only():
    from lightning_flatness.functional.estimators.method_choice import SKETCH_MIN_WORK, choose_method

    torch.manual_seed(0)
    x, y = torch.randn(2, 1024), torch.tensor([1, 7])
    # 1024 * 512 + 512 + 512 * 10 + 10 = 529,930 parameters (weights and biases) x 10 outputs = 5.3e6
    # >= 2**22: sketched
    big = nn.Sequential(nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10))
    choice = choose_method(big, normalized_softmax_cross_entropy, x, y)
    assert (choice.method, choice.quantity) == ("gauss_newton_sketch", "hessian")
    assert "sketched" in choice.reason and "5.3e+06" in choice.reason
    # a threshold one above that work: exact
    small = choose_method(big, normalized_softmax_cross_entropy, x, y, sketch_min_work=5_299_301)
    assert small.method == "exact"
    assert 5_299_300 >= SKETCH_MIN_WORK
    smooth = nn.Sequential(nn.Linear(1024, 512), nn.Tanh(), nn.Linear(512, 10))
    choice = choose_method(smooth, normalized_softmax_cross_entropy, x, y)
    assert (choice.method, choice.quantity) == ("hessian_sketch", "hessian")  # tanh has a node rule

    class Arctan(nn.Module):  # an op without a node rule (arctan): the Gauss-Newton sketch
        def __init__(self):
            super().__init__()
            self.a, self.c = nn.Linear(1024, 512), nn.Linear(512, 10)

        def forward(self, inputs):
            return self.c(torch.atan(self.a(inputs)))

    choice = choose_method(Arctan(), normalized_softmax_cross_entropy, x, y)
    assert (choice.method, choice.quantity) == ("gauss_newton_sketch", "gauss_newton")
    # many outputs: the sketch of the structured loss Hessian for cross-entropy, eq. 20 and MSE, whatever
    # the work; the Monte-Carlo estimator for a loss without a structure (Huber)
    wide = nn.Sequential(nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 48))
    for loss_fn in (normalized_softmax_cross_entropy, F.cross_entropy):
        choice = choose_method(wide, loss_fn, x, torch.tensor([1, 40]))
        assert choice.method == "gauss_newton_sketch" and "structured" in choice.reason
    tiny_wide = nn.Sequential(nn.Linear(1024, 2), nn.ReLU(), nn.Linear(2, 48))
    assert choose_method(tiny_wide, F.cross_entropy, x, torch.tensor([1, 40])).method == "gauss_newton_sketch"
    assert choose_method(wide, F.mse_loss, x, torch.randn(2, 48)).method == "gauss_newton_sketch"
    assert choose_method(wide, F.huber_loss, x, torch.randn(2, 48)).method == "gauss_newton_mc"


class _Reshaped(nn.Module):
    """``x.reshape(N, -1)``: keeps the samples apart, but not an operation the static proof knows."""

    def forward(self, x):
        return x.reshape(x.shape[0], -1)


class _BatchCentered(nn.Module):
    """Subtracts the batch mean: every sample's output depends on every other sample."""

    def forward(self, x):
        return x - x.mean(dim=0, keepdim=True)


def _probe_counting(monkeypatch) -> list[int]:
    from lightning_flatness.functional.estimators import gauss_newton_sketch

    calls: list[int] = []
    original = gauss_newton_sketch.samples_interact

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(gauss_newton_sketch, "samples_interact", counted)
    return calls


@pytest.mark.parametrize(
    "middle, probed, interact",
    [
        (nn.Flatten(), False, False),  # every operation provably per sample: no probe
        (_Reshaped(), True, False),  # not proved: the probe runs and finds no interaction
        (nn.Sequential(nn.Flatten(), _BatchCentered()), True, True),  # not proved, interaction found
    ],
    ids=["proved", "probed-apart", "probed-interacting"],
)
def test_interaction_probe_only_where_not_proved(monkeypatch, middle, probed, interact):
    calls = _probe_counting(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), middle, nn.Linear(3 * 16, 6)
    ).double()
    model.eval()
    x, y = _data()
    params = dict(model.named_parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gauss_newton_sketch_diagonal(model, F.cross_entropy, x, y, params, generator=torch.Generator())
    assert bool(calls) == probed
    assert any("per-layer contractions do not apply" in str(w.message) for w in caught) == interact
    if not interact:  # the per-layer path, still unbiased for the brute-force diagonal
        assert _max_z(model, F.cross_entropy, x, y, 200, chunk_size=1) < 5.0


def test_a_loss_without_curvature_in_any_sample_gives_zeros_not_an_error():
    """Eq. 20 on logits that are all equal (torchvision's ViT zero-initialises its head) has no
    curvature by definition (``normalize_logits``): no factor columns at all. Every estimator returns
    zeros, as the exact method does."""
    from lightning_flatness.functional import normalized_softmax_cross_entropy
    from lightning_flatness.functional.estimators.exact import exact_hessian_diagonal
    from lightning_flatness.functional.estimators.hessian_sketch import hessian_sketch_diagonal

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).double()
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.zero_()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 5, (6,))
    params = dict(model.named_parameters())
    estimates = [
        gauss_newton_sketch_diagonal(model, normalized_softmax_cross_entropy, x, y, params),
        hessian_sketch_diagonal(
            model, normalized_softmax_cross_entropy, x, y, params, exact_loss_factors=False
        ),
        hessian_sketch_diagonal(
            model, normalized_softmax_cross_entropy, x, y, params, exact_loss_factors=True
        ),
    ]
    relu = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5)).double()
    relu.load_state_dict(model.state_dict())
    estimates.append(
        exact_hessian_diagonal(relu, normalized_softmax_cross_entropy, x, y, dict(relu.named_parameters()))
    )
    for est in estimates:
        assert set(est) == set(params)
        for k, v in est.items():
            assert v.shape == params[k].shape and bool((v == 0).all()), (k, v)
