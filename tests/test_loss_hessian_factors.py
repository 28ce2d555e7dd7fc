"""Loss-Hessian columns: the eq. 20 Hessian decomposition against autograd, and E[sum_k s_k c_k c_k^T]
equal to the per-sample Hessian of the loss in the logits (statistically, from the draws' own spread)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_flatness.functional import loss_hessian_factors
from lightning_flatness.functional.loss_hessian_factors import (
    MC_LOSS_COLUMNS,
    autograd_columns,
    cross_entropy_columns,
    normalized_cross_entropy_columns,
    normalized_cross_entropy_logit_hessian,
    sample_loss_hessian_columns,
)
from lightning_flatness.functional.losses import normalized_softmax_cross_entropy
from lightning_flatness.functional.model_io import TokenLoss

torch.set_num_threads(1)


def _autograd_per_sample_hessians(loss_fn, logits, target):
    """``(N, D, D)``: Hessian of the loss of each sample alone, by torch.autograd.functional.hessian."""
    out = []
    for i in range(logits.shape[0]):
        h = torch.autograd.functional.hessian(
            lambda z, y=target[i : i + 1]: loss_fn(z.unsqueeze(0), y), logits[i]
        )
        out.append(h.reshape(logits[i].numel(), logits[i].numel()))
    return torch.stack(out)


def _draw_estimates(cols, signs, draws):
    """Per-draw estimates ``draws * sum_{k in draw} s_k c_k c_k^T``, ``(S, N, D, D)``; the columns of a
    draw are consecutive (the last ``per * draws`` columns)."""
    per = (cols.shape[2]) // draws
    c = cols[:, :, -per * draws :].reshape(cols.shape[0], cols.shape[1], draws, per)
    s = signs[-per * draws :].reshape(draws, per)
    return draws * torch.einsum("ndsk,sk,nesk->snde", c, s, c)


def _assert_unbiased(per_draw, expected, fixed=None):
    """z-scores of the mean of the draws against ``expected`` (plus a deterministic ``fixed`` part)."""
    mean = per_draw.mean(dim=0) + (0 if fixed is None else fixed)
    se = per_draw.std(dim=0) / per_draw.shape[0] ** 0.5
    random = se > 1e-12 * expected.abs().max()
    torch.testing.assert_close(mean[~random], expected[~random], rtol=1e-10, atol=1e-12)
    z = (mean - expected)[random] / se[random]
    if z.numel() == 0:  # every entry deterministic (e.g. a one-class tail)
        return
    assert float(z.abs().max()) < 6.0, float(z.abs().max())
    assert float(z.pow(2).mean()) < 2.0, float(z.pow(2).mean())


@pytest.mark.parametrize("k,scale", [(2, 1.0), (5, 3.0), (13, 0.2), (7, 30.0)])
def test_normalized_cross_entropy_hessian_decomposition_matches_autograd(k, scale):
    torch.manual_seed(k)
    logits = scale * torch.randn(6, k, dtype=torch.float64) + 5.0
    target = torch.randint(0, k, (6,))
    closed = normalized_cross_entropy_logit_hessian(logits, target)
    brute = _autograd_per_sample_hessians(normalized_softmax_cross_entropy, logits, target)
    torch.testing.assert_close(closed, brute, rtol=0, atol=1e-12 * max(1.0, float(brute.abs().max())))


def test_normalized_cross_entropy_hessian_is_zero_on_degenerate_rows():
    logits = torch.tensor([[2.0, 2.0, 2.0], [1.0, 0.0, -1.0]], dtype=torch.float64)
    target = torch.tensor([0, 1])
    closed = normalized_cross_entropy_logit_hessian(logits, target)
    assert bool((closed[0] == 0).all()) and float(closed[1].abs().max()) > 0
    cols, _ = normalized_cross_entropy_columns(logits, target, 3, torch.Generator().manual_seed(0))
    assert bool((cols[0] == 0).all())


def test_cross_entropy_columns_are_unbiased_for_the_softmax_hessian():
    torch.manual_seed(0)
    logits, target = torch.randn(3, 6, dtype=torch.float64), torch.randint(0, 6, (3,))
    p = torch.softmax(logits, 1)
    expected = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    cols, signs = cross_entropy_columns(logits, target, 4000, torch.Generator().manual_seed(1))
    assert cols.shape == (3, 6, 4000) and bool((signs == 1).all())
    _assert_unbiased(_draw_estimates(cols, signs, 4000), expected)


@pytest.mark.parametrize("exact_classes", [2, 5])
def test_cross_entropy_exact_classes_sample_only_the_tail(exact_classes):
    torch.manual_seed(1)
    logits, target = 2 * torch.randn(3, 6, dtype=torch.float64), torch.randint(0, 6, (3,))
    p = torch.softmax(logits, 1)
    expected = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    draws = 4000
    cols, signs = cross_entropy_columns(
        logits, target, draws, torch.Generator().manual_seed(2), exact_classes=exact_classes
    )
    assert cols.shape[2] == exact_classes + draws
    top = cols[:, :, :exact_classes]
    fixed = torch.einsum("ndk,nek->nde", top, top)
    _assert_unbiased(_draw_estimates(cols, signs, draws), expected, fixed)


def test_cross_entropy_with_every_class_exact_has_no_noise():
    torch.manual_seed(2)
    logits, target = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 5, (4,))
    p = torch.softmax(logits, 1)
    cols, signs = cross_entropy_columns(logits, target, 1, torch.Generator().manual_seed(0), exact_classes=5)
    torch.testing.assert_close(
        torch.einsum("ndk,k,nek->nde", cols, signs, cols),
        torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1),
        rtol=0,
        atol=1e-15,
    )


@pytest.mark.parametrize("k", [3, 8])
@pytest.mark.parametrize("exact_low_rank", [True, False])
def test_normalized_cross_entropy_columns_are_unbiased_for_the_autograd_hessian(k, exact_low_rank):
    torch.manual_seed(k)
    logits, target = 2 * torch.randn(3, k, dtype=torch.float64), torch.randint(0, k, (3,))
    expected = _autograd_per_sample_hessians(normalized_softmax_cross_entropy, logits, target)
    draws = 4000
    cols, signs = normalized_cross_entropy_columns(
        logits, target, draws, torch.Generator().manual_seed(3), exact_low_rank=exact_low_rank
    )
    lead = 2 if exact_low_rank else 0  # the rank-2 part B as two fixed columns, + then -
    assert cols.shape == (3, k, 2 * draws + lead)
    assert signs.tolist()[:4] == [1.0, -1.0, 1.0, -1.0]
    fixed = _fixed_part(cols, signs, lead) if lead else None
    _assert_unbiased(_draw_estimates(cols, signs, draws), expected, fixed)


def _fixed_part(cols, signs, lead):
    """``sum_k s_k c_k c_k^T`` over the ``lead`` deterministic leading columns, ``(N, D, D)``."""
    return torch.einsum("ndk,k,nek->nde", cols[:, :, :lead], signs[:lead], cols[:, :, :lead])


def test_normalized_cross_entropy_columns_with_exact_classes_are_unbiased():
    torch.manual_seed(4)
    logits, target = 2 * torch.randn(3, 6, dtype=torch.float64), torch.randint(0, 6, (3,))
    expected = _autograd_per_sample_hessians(normalized_softmax_cross_entropy, logits, target)
    draws = 4000
    cols, signs = normalized_cross_entropy_columns(
        logits, target, draws, torch.Generator().manual_seed(5), exact_classes=2
    )
    _assert_unbiased(_draw_estimates(cols, signs, draws), expected, _fixed_part(cols, signs, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalized_cross_entropy_columns_keep_the_logits_dtype(dtype):
    """Formed in the logits' dtype (float32 for a float32 model: the backward pass takes them in it)."""
    logits, target = torch.randn(4, 9, dtype=dtype), torch.randint(0, 9, (4,))
    cols, signs = normalized_cross_entropy_columns(logits, target, 3, torch.Generator().manual_seed(0))
    assert cols.dtype == signs.dtype == dtype
    reference, _ = normalized_cross_entropy_columns(
        logits.double(), target, 3, torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(cols.double(), reference, rtol=0, atol=1e-5 if dtype == torch.float32 else 0)


def test_random_bits_are_fair_independent_and_reproducible():
    count = 56 * 20_000 + 3  # not a whole number of 56-bit words
    bits = loss_hessian_factors._random_bits(count, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert bits.shape == (count,) and bits.dtype == torch.bool
    x = bits.double() * 2 - 1
    for lag in (1, 7, 8, 55, 56, 57):  # neighbours within a byte, across bytes and across words
        assert abs(float((x[lag:] * x[:-lag]).mean())) < 5 / count**0.5, lag
    # each of the 56 bit positions of a word is fair (a constant bit, e.g. a word's top one, has mean -1)
    per_position = x[: 56 * 20_000].reshape(20_000, 56).mean(dim=0)
    assert float(per_position.abs().max()) < 5 / 20_000**0.5
    again = loss_hessian_factors._random_bits(count, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(bits, again)


@pytest.mark.parametrize(
    "draws, sketches, exact_classes", [(1, 1, 0), (3, 2, 0), (8, 1, 1), (10, 1, 0)], ids=str
)
def test_direct_sketches_of_eq20_columns_are_unbiased_for_the_autograd_hessian(
    draws, sketches, exact_classes
):
    """normalized_cross_entropy_sketch: the sketches of the Monte-Carlo columns formed without them (the
    draws' normalization parts as one binomial vector per sketch: 1 to 8 bits, and two bytes for 10)."""
    torch.manual_seed(draws)
    k = 6
    logits, target = 2 * torch.randn(3, k, dtype=torch.float64), torch.randint(0, k, (3,))
    expected = _autograd_per_sample_hessians(normalized_softmax_cross_entropy, logits, target)
    gen = torch.Generator().manual_seed(4)
    estimates = []
    for _ in range(3000):
        cols, signs = loss_hessian_factors.normalized_cross_entropy_sketch(
            logits, target, draws, sketches, gen, exact_classes=exact_classes
        )
        assert cols.shape == (3, k, 2 * sketches) and signs.tolist() == [1.0, -1.0] * sketches
        estimates.append(torch.einsum("ndc,c,nec->nde", cols, signs, cols))
    _assert_unbiased(torch.stack(estimates), expected)


@pytest.mark.parametrize("trials", [1, 3, 8, 10])
def test_binomial_counts_have_the_binomial_law(trials):
    counts = loss_hessian_factors._binomial_counts(200_000, trials, torch.Generator().manual_seed(0), "cpu")
    x = counts.double()
    assert int(counts.min()) >= 0 and int(counts.max()) <= trials
    se = (trials / 4 / 200_000) ** 0.5
    assert abs(float(x.mean()) - trials / 2) < 5 * se
    assert abs(float(x.var()) / (trials / 4) - 1) < 0.02  # 5 standard errors of a sample variance
    frequencies = torch.bincount(counts.long(), minlength=trials + 1).double() / 200_000
    law = torch.tensor([math.comb(trials, i) / 2**trials for i in range(trials + 1)], dtype=torch.float64)
    assert float((frequencies - law).abs().max()) < 0.005


def test_exact_low_rank_columns_carry_the_rank_two_part_without_noise():
    """The two fixed columns reproduce B = Lambda - J_g Cov[p - e_y] J_g - alpha P exactly."""
    torch.manual_seed(9)
    k = 7
    logits, target = 3 * torch.randn(4, k, dtype=torch.float64), torch.randint(0, k, (4,))
    cols, signs = normalized_cross_entropy_columns(logits, target, 1, torch.Generator().manual_seed(0))
    lam = normalized_cross_entropy_logit_hessian(logits, target)
    u = logits - logits.mean(1, keepdim=True)
    s = u.pow(2).mean(1, keepdim=True).sqrt()
    u = u / s
    p = torch.softmax(u, 1)
    eye = torch.eye(k, dtype=torch.float64)
    centre = eye - 1.0 / k
    jg = (centre - u.unsqueeze(2) * u.unsqueeze(1) / k) / s.unsqueeze(2)
    cov = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    r = p - F.one_hot(target, k).to(p.dtype)
    alpha = -(r * u).sum(1) / (s.squeeze(1) ** 2 * k)
    rank_two = lam - jg @ cov @ jg - alpha.reshape(4, 1, 1) * centre
    torch.testing.assert_close(_fixed_part(cols, signs, 2), rank_two, rtol=1e-10, atol=1e-12)


def test_autograd_columns_are_unbiased_for_mse_and_indefinite_losses():
    torch.manual_seed(5)
    logits = torch.randn(3, 4, dtype=torch.float64)
    draws = 4000
    for loss_fn, target in [
        (F.mse_loss, torch.randn(3, 4, dtype=torch.float64)),
        (normalized_softmax_cross_entropy, torch.randint(0, 4, (3,))),
    ]:
        expected = _autograd_per_sample_hessians(loss_fn, logits, target)
        cols, signs = autograd_columns(loss_fn, logits, target, draws, torch.Generator().manual_seed(6))
        _assert_unbiased(_draw_estimates(cols, signs, draws), expected)


def test_autograd_columns_refuse_a_sum_reduced_loss():
    logits, target = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="per-sample"):
        autograd_columns(lambda z, y: F.cross_entropy(z, y, reduction="sum"), logits, target, 1)


@pytest.mark.parametrize("base", [F.cross_entropy, normalized_softmax_cross_entropy])
@pytest.mark.parametrize("chunked", [False, True], ids=["one_chunk", "token_chunks"])
def test_token_loss_columns_are_unbiased_for_the_sequence_hessian(base, chunked, monkeypatch):
    """Stacked token columns: E[sum_k s_k C C^T] = N * (block of sequence n of the full Hessian of the
    token-mean loss in all logits), ignored and shifted-out positions included; formed in one chunk or
    token by token."""
    if chunked:
        monkeypatch.setattr(loss_hessian_factors, "TOKEN_CHUNK_ELEMENTS", 5)
    torch.manual_seed(6)
    n, t, v = 3, 4, 5
    # moderate logits: a class of tiny probability may never be drawn, and then the spread of the draws
    # underestimates the standard error (unbiased, but too heavy-tailed for a z-score)
    logits = torch.randn(n, t, v, dtype=torch.float64)
    target = torch.randint(0, v, (n, t))
    target[0, 2:] = -100
    loss_fn = TokenLoss(base, shift=True)
    # every column of a draw carries random signs per token: sample eq. 20's rank-2 part too, so that all
    # columns belong to draws (the fixed-column mode is tested on plain rows above)
    monkeypatch.setattr(loss_hessian_factors, "EXACT_LOW_RANK", False)
    full = torch.autograd.functional.hessian(
        lambda z: loss_fn(z.reshape(n, t, v), target), logits.reshape(-1)
    )
    full = full.reshape(n, t * v, n, t * v)
    blocks = torch.stack([full[i, :, i] for i in range(n)]) * n
    assert float(full[0, :, 1].abs().max()) == 0.0  # sequences do not interact
    draws = 3000
    cols, signs = sample_loss_hessian_columns(
        loss_fn, logits, target, draws, torch.Generator().manual_seed(7)
    )
    assert cols.shape[:2] == (n, t * v)
    _assert_unbiased(_draw_estimates(cols, signs, draws), blocks)


def test_registry_is_keyed_by_the_loss_function():
    assert MC_LOSS_COLUMNS[F.cross_entropy] is cross_entropy_columns
    assert MC_LOSS_COLUMNS[normalized_softmax_cross_entropy] is normalized_cross_entropy_columns


def test_columns_are_reproducible_and_leave_the_global_rng_alone():
    logits, target = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 6, (4,))
    regression_target = torch.randn(4, 6, dtype=torch.float64)
    state = torch.get_rng_state()
    for loss_fn in (F.cross_entropy, normalized_softmax_cross_entropy, F.mse_loss):
        y = regression_target if loss_fn is F.mse_loss else target
        a = sample_loss_hessian_columns(loss_fn, logits, y, 3, torch.Generator().manual_seed(11))[0]
        b = sample_loss_hessian_columns(loss_fn, logits, y, 3, torch.Generator().manual_seed(11))[0]
        c = sample_loss_hessian_columns(loss_fn, logits, y, 3, torch.Generator().manual_seed(12))[0]
        assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_arguments_are_named():
    logits, target = torch.randn(2, 3), torch.tensor([0, 5])
    with pytest.raises(ValueError, match="num_mc_samples"):
        cross_entropy_columns(logits, torch.tensor([0, 1]), 0)
    with pytest.raises(ValueError, match="TokenLoss"):
        cross_entropy_columns(logits, target, 1)


@pytest.mark.parametrize("inverse_cdf", [False, True], ids=["multinomial", "inverse_cdf"])
def test_class_draws_follow_the_weights_and_skip_zero_classes(inverse_cdf, monkeypatch):
    """Class draws of the softmax columns (``torch.multinomial`` up to MULTINOMIAL_MAX_CLASSES classes, the
    inverse CDF above): frequencies within 5 binomial s.e. of the normalized weights, never a class of
    weight 0, a valid class for a row of zeros (whose columns have zero weight)."""
    from lightning_flatness.functional.loss_hessian_factors import _draw_classes

    if inverse_cdf:
        monkeypatch.setattr(loss_hessian_factors, "MULTINOMIAL_MAX_CLASSES", 0)
    weights = torch.tensor(
        [[0.0, 0.1, 0.0, 0.6, 0.3], [2.0, 0.0, 1.0, 1.0, 0.0], [0.0] * 5], dtype=torch.float64
    )
    draws = 40000
    classes = _draw_classes(weights, draws, torch.Generator().manual_seed(0))
    assert classes.shape == (3, draws) and bool(((classes >= 0) & (classes < 5)).all())
    for row in range(2):
        p = weights[row] / weights[row].sum()
        freq = torch.bincount(classes[row], minlength=5).double() / draws
        assert bool((freq[p == 0] == 0).all())
        se = (p * (1 - p) / draws).sqrt()
        assert float(((freq - p).abs() / se.clamp_min(1e-12))[p > 0].max()) < 5.0
