"""Structured exact loss Hessians (``StructuredLossHessian``): the dense form equals the autograd
Hessian of each sample's loss (cross-entropy and eq. 20, float64), the low-rank part has rank <= 4,
the sketch's mean equals the Hessian within its own standard errors, and the sketched Gauss-Newton
diagonal above ``max_exact_outputs`` (which now mixes these exact factors) stays unbiased for the
brute-force ``diag(J^T Lambda J)``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_flatness.functional.estimators.gauss_newton_sketch import gauss_newton_sketch_diagonal
from lightning_flatness.functional.loss_hessian_factors import (
    loss_hessian_structure,
    normalized_cross_entropy_structure,
    sample_loss_hessian_columns,
    softmax_cross_entropy_structure,
)
from lightning_flatness.functional.losses import normalized_softmax_cross_entropy
from tests.oracles import brute_force_ggn_diagonal

torch.set_num_threads(1)


def _autograd_hessians(loss_fn, logits, target):
    """``(N, K, K)``: the Hessian of ``loss_fn(z_n[None], y_n[None])`` in ``z_n``, by double backward."""
    return torch.stack(
        [
            torch.autograd.functional.hessian(
                lambda z, t=target[n : n + 1]: loss_fn(z.unsqueeze(0), t), logits[n]
            )
            for n in range(logits.shape[0])
        ]
    )


@pytest.mark.parametrize("k", [3, 7, 40])
@pytest.mark.parametrize(
    "loss_fn, structure",
    [
        (F.cross_entropy, softmax_cross_entropy_structure),
        (normalized_softmax_cross_entropy, normalized_cross_entropy_structure),
    ],
    ids=["ce", "eq20"],
)
def test_dense_form_is_the_autograd_hessian(k, loss_fn, structure):
    g = torch.Generator().manual_seed(k)
    logits = 2 * torch.randn(6, k, generator=g, dtype=torch.float64)
    target = torch.randint(0, k, (6,), generator=g)
    st = structure(logits, target)
    expected = _autograd_hessians(loss_fn, logits, target)
    assert st.low.shape[2] <= 4
    torch.testing.assert_close(st.dense(), expected, rtol=1e-10, atol=1e-12)
    assert loss_hessian_structure(loss_fn, logits, target) is not None


def test_degenerate_rows_of_eq20_get_a_zero_hessian():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    st = normalized_cross_entropy_structure(logits, torch.tensor([0, 1]))
    dense = st.dense()
    assert float(dense[0].abs().max()) == 0.0
    assert float(dense[1].abs().max()) > 1e-3


def test_no_structure_for_other_losses():
    logits, target = torch.randn(3, 5), torch.randn(3, 5)
    assert loss_hessian_structure(F.smooth_l1_loss, logits, target) is None
    # the softmax losses need (N, K) logits; the elementwise ones take any shape
    assert loss_hessian_structure(F.cross_entropy, torch.randn(3, 5, 2), torch.zeros(3, 2).long()) is None
    assert loss_hessian_structure(F.mse_loss, torch.randn(3, 5, 2), torch.randn(3, 5, 2)) is not None


_ELEMENTWISE = [
    (F.mse_loss, lambda g, shape: torch.randn(shape, generator=g, dtype=torch.float64)),
    (
        F.binary_cross_entropy_with_logits,
        lambda g, shape: torch.rand(shape, generator=g, dtype=torch.float64),
    ),
]


@pytest.mark.parametrize("shape", [(5, 7), (5, 2, 3, 2)], ids=["flat", "dense"])
@pytest.mark.parametrize("loss_fn, draw_target", _ELEMENTWISE, ids=["mse", "bce"])
def test_elementwise_structures_are_the_autograd_hessians(loss_fn, draw_target, shape):
    """``Lambda_n`` of a mean over output entries: the diagonal the structure states, against the Hessian
    of the batch loss in all outputs (block ``n`` is ``Lambda_n / N``), for outputs of any shape."""
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(shape, generator=g, dtype=torch.float64)
    target = draw_target(g, shape)
    n, d = shape[0], logits[0].numel()
    full = torch.autograd.functional.hessian(lambda z: loss_fn(z.reshape(shape), target), logits.reshape(-1))
    blocks = torch.stack([full[i * d : (i + 1) * d, i * d : (i + 1) * d] for i in range(n)]) * n
    assert float(full.abs().sum() - blocks.abs().sum() / n) < 1e-12  # no coupling between samples
    st = loss_hessian_structure(loss_fn, logits, target)
    torch.testing.assert_close(st.dense(), blocks, rtol=1e-12, atol=1e-15)
    cols, signs = sample_loss_hessian_columns(loss_fn, logits, target, 4000, torch.Generator().manual_seed(1))
    assert cols.shape == (n, d, 4000) and bool((signs == 1).all())
    mean = torch.einsum("nkc,nlc->nkl", cols, cols)  # the mean of 4000 one-draw outer products
    torch.testing.assert_close(
        mean.diagonal(dim1=1, dim2=2), blocks.diagonal(dim1=1, dim2=2), rtol=1e-12, atol=1e-15
    )
    off = mean - torch.diag_embed(mean.diagonal(dim1=1, dim2=2))
    assert float(off.abs().max()) < 6 * float(blocks.max()) / 4000**0.5  # Rademacher: zero in expectation


@pytest.mark.parametrize("loss_fn", [F.cross_entropy, normalized_softmax_cross_entropy], ids=["ce", "eq20"])
def test_sketch_mean_is_the_hessian(loss_fn):
    g = torch.Generator().manual_seed(0)
    n, k = 3, 30
    logits = 2 * torch.randn(n, k, generator=g, dtype=torch.float64)
    target = torch.randint(0, k, (n,), generator=g)
    st = loss_hessian_structure(loss_fn, logits, target)
    sketches = 2000
    cols, signs = st.sketch(sketches, torch.Generator().manual_seed(1))
    per = cols.shape[2] // sketches
    assert per == (1 if loss_fn is F.cross_entropy else 2)  # CE: no negative part
    cols = cols * sketches**0.5  # one sketch each
    outer = torch.einsum("nkc,c,nlc->cnkl", cols, signs, cols).reshape(sketches, per, n, k, k).sum(dim=1)
    mean, se = outer.mean(dim=0), outer.std(dim=0) / sketches**0.5
    expected = _autograd_hessians(loss_fn, logits, target)
    z = (mean - expected).abs() / se.clamp_min(1e-15)
    assert float(z.max()) < 5.5  # 2,700 entries; a dropped part or a wrong scale gives z in the hundreds


def _mlp(k: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, k)).double()


@pytest.mark.parametrize("loss_fn", [F.cross_entropy, normalized_softmax_cross_entropy], ids=["ce", "eq20"])
def test_sketch_estimator_above_the_exact_factor_limit_is_unbiased(loss_fn):
    # 40 outputs > MAX_EXACT_FACTOR_OUTPUTS: the structured factors are mixed (no class sampling)
    k, n, repeats = 40, 6, 300
    model = _mlp(k)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, k, (n,), generator=g)
    params = dict(model.named_parameters())
    reference = brute_force_ggn_diagonal(model, loss_fn, x, y, list(params))
    gen = torch.Generator().manual_seed(2)
    runs = [gauss_newton_sketch_diagonal(model, loss_fn, x, y, params, generator=gen) for _ in range(repeats)]
    worst = 0.0
    for name in params:
        stack = torch.stack([r[name] for r in runs])
        se = stack.std(dim=0) / repeats**0.5
        worst = max(worst, float(((stack.mean(dim=0) - reference[name]).abs() / se).max()))
    assert worst < 5.0


def test_structured_sketch_is_less_noisy_than_sampled_base_columns(monkeypatch):
    # the reason for the structure: at many classes, class sampling leaves most output rows unseen
    from lightning_flatness.functional.estimators import gauss_newton_sketch

    k, n = 200, 16
    model = _mlp(k)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, k, (n,), generator=g)
    params = {"2.weight": model[2].weight}
    reference = brute_force_ggn_diagonal(model, F.cross_entropy, x, y, list(params))["2.weight"]

    def error() -> float:
        gen = torch.Generator().manual_seed(4)
        est = gauss_newton_sketch_diagonal(model, F.cross_entropy, x, y, params, generator=gen)["2.weight"]
        return float((est - reference).norm() / reference.norm())

    structured = error()
    monkeypatch.setattr(gauss_newton_sketch, "loss_hessian_structure", lambda *a: None)
    sampled = error()
    assert structured < 0.5 * sampled


@pytest.mark.parametrize("loss_fn, draw_target", _ELEMENTWISE, ids=["mse", "bce"])
def test_elementwise_sketch_of_dense_outputs_is_unbiased_and_chosen_by_auto(loss_fn, draw_target):
    """A convolutional network with ``(N, 2, 5, 5)`` outputs (50 > 32 per sample): ``auto`` sketches the
    Gauss-Newton part from the exact diagonal ``Lambda`` (before: sampled autograd columns, an ``O(D^3)``
    eigendecomposition per sample), and the sketch is unbiased for the brute-force ``diag(J^T Lambda J)``."""
    from lightning_flatness.functional.estimators.method_choice import choose_method

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1)).double()
    n, repeats = 4, 300
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 5, 5, generator=g, dtype=torch.float64)
    y = draw_target(g, (n, 2, 5, 5))
    choice = choose_method(model, loss_fn, x, y)
    assert choice.method == "gauss_newton_sketch" and "structured factors" in choice.reason
    params = {k: v for k, v in model.named_parameters() if v.ndim > 1}
    reference = brute_force_ggn_diagonal(model, loss_fn, x, y, list(params))
    gen = torch.Generator().manual_seed(2)
    runs = [gauss_newton_sketch_diagonal(model, loss_fn, x, y, params, generator=gen) for _ in range(repeats)]
    for name in params:
        stack = torch.stack([r[name] for r in runs])
        se = stack.std(dim=0) / repeats**0.5
        assert float(((stack.mean(dim=0) - reference[name]).abs() / se).max()) < 5.0, name


def _mixed_targets(g: torch.Generator, n: int, k: int) -> torch.Tensor:
    """Mixup rows ``0.7 e_a + 0.3 e_b`` and one Dirichlet row: class probabilities summing to 1."""
    a, b = torch.randint(0, k, (n,), generator=g), torch.randint(0, k, (n,), generator=g)
    q = 0.7 * F.one_hot(a, k).double() + 0.3 * F.one_hot(b, k).double()
    q[0] = torch.distributions.Dirichlet(torch.ones(k, dtype=torch.float64)).sample()
    return q


@pytest.mark.parametrize(
    "loss_fn, structure",
    [
        (F.cross_entropy, softmax_cross_entropy_structure),
        (normalized_softmax_cross_entropy, normalized_cross_entropy_structure),
    ],
    ids=["ce", "eq20"],
)
def test_probability_targets_take_the_closed_forms(loss_fn, structure):
    """Mixup/cutmix targets: the structures and eq. 20's closed-form Hessian equal the autograd Hessians
    (they raised before), and the exact estimator's closed-form factors and gradient equal brute force."""
    from lightning_flatness.functional.estimators.exact import gauss_newton_diagonal
    from lightning_flatness.functional.loss_hessian_factors import normalized_cross_entropy_logit_hessian
    from tests.oracles import assert_relative_close, brute_force_hessian_diagonal

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    k = 7
    logits = 2 * torch.randn(6, k, generator=g, dtype=torch.float64)
    target = _mixed_targets(g, 6, k)
    expected = _autograd_hessians(loss_fn, logits, target)
    torch.testing.assert_close(structure(logits, target).dense(), expected, rtol=1e-10, atol=1e-12)
    if loss_fn is normalized_softmax_cross_entropy:
        torch.testing.assert_close(
            normalized_cross_entropy_logit_hessian(logits, target), expected, rtol=1e-10, atol=1e-12
        )
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, k)).double()
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    params = {n: p for n, p in model.named_parameters() if p.ndim == 2}
    ggn = gauss_newton_diagonal(model, loss_fn, x, target, params)
    assert not ggn.loss_issues
    reference = brute_force_hessian_diagonal(model, loss_fn, x, target, list(params))
    assert_relative_close(ggn.diagonal, reference, tol=1e-10)  # ReLU net: Hessian = Gauss-Newton
    z = model(x).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(z, target), z)
    torch.testing.assert_close(ggn.logits_grad, grad, rtol=1e-10, atol=1e-14)
    # label smoothing on top of probability targets: q = (1 - eps) t + eps / K
    if loss_fn is not F.cross_entropy:
        return
    ggn_smoothed = gauss_newton_diagonal(model, nn.CrossEntropyLoss(label_smoothing=0.1), x, target, params)
    (grad,) = torch.autograd.grad(F.cross_entropy(z, target, label_smoothing=0.1), z)
    torch.testing.assert_close(ggn_smoothed.logits_grad, grad, rtol=1e-10, atol=1e-14)
    assert_relative_close(ggn_smoothed.diagonal, reference, tol=1e-10)  # smoothing: the same Hessian


def test_rows_that_are_not_probabilities_keep_the_autograd_path():
    """Soft targets whose rows do not sum to 1 scale the cross-entropy Hessian by the row sum: no closed
    form, the autograd factors, still exact."""
    from lightning_flatness.functional.estimators.exact import gauss_newton_diagonal
    from lightning_flatness.functional.loss_hessian_factors import is_probability_target
    from tests.oracles import assert_relative_close, brute_force_hessian_diagonal

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    target = 2 * _mixed_targets(g, 6, 5)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5)).double()
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    assert not is_probability_target(model(x), target)
    params = {n: p for n, p in model.named_parameters() if p.ndim == 2}
    ggn = gauss_newton_diagonal(model, F.cross_entropy, x, target, params)
    assert_relative_close(
        ggn.diagonal, brute_force_hessian_diagonal(model, F.cross_entropy, x, target, list(params)), tol=1e-10
    )


@pytest.mark.parametrize("shape", [(5, 40), (5, 2, 3, 3)], ids=["flat", "dense"])
@pytest.mark.parametrize("loss_fn, draw_target", _ELEMENTWISE, ids=["mse", "bce"])
def test_exact_factors_of_elementwise_losses_against_brute_force(loss_fn, draw_target, shape, monkeypatch):
    """The exact method's closed-form diagonal factors (no eigendecomposition): the Gauss-Newton diagonal
    and gradient equal brute force; on a ReLU network, the Hessian diagonal too."""
    from lightning_flatness.functional.estimators import loss_factors
    from lightning_flatness.functional.estimators.exact import gauss_newton_diagonal
    from lightning_flatness.functional.estimators.loss_factors import _loss_factors
    from tests.oracles import assert_relative_close, brute_force_hessian_diagonal

    def no_fallback(*args):
        raise AssertionError("the autograd fallback was taken")

    monkeypatch.setattr(loss_factors, "_per_sample_loss_hessians", no_fallback)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    out = int(torch.tensor(shape[1:]).prod())
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, out), nn.Unflatten(1, shape[1:])).double()
    x = torch.randn(shape[0], 4, generator=g, dtype=torch.float64)
    y = draw_target(g, shape)
    factors, signs, _, issues = _loss_factors(loss_fn, model(x).detach(), y)
    assert factors.shape == (shape[0], out, out) and not issues and bool((signs == 1).all())
    params = {n: p for n, p in model.named_parameters() if p.ndim == 2}
    ggn = gauss_newton_diagonal(model, loss_fn, x, y, params)
    assert_relative_close(
        ggn.diagonal, brute_force_ggn_diagonal(model, loss_fn, x, y, list(params)), tol=1e-12
    )
    assert_relative_close(
        ggn.diagonal, brute_force_hessian_diagonal(model, loss_fn, x, y, list(params)), tol=1e-12
    )
    z = model(x).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(z, y), z)
    torch.testing.assert_close(ggn.logits_grad, grad, rtol=1e-12, atol=1e-15)
