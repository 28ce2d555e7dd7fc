"""Loss-Hessian columns of language-model vocabularies in bounded memory: token columns formed chunk by
chunk of tokens (and mixed per token for the sketches) and Monte-Carlo draws in groups keep their
expectation (each sequence's block of the autograd Hessian of the token-mean loss in all logits, from
the draws' own spread), never hold the base columns of all tokens at once, and the Monte-Carlo
Gauss-Newton diagonal of a token model computed in groups stays unbiased for the brute-force
``diag(J^T Lambda J)``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_flatness.functional import loss_hessian_factors
from lightning_flatness.functional.estimators import exact, gauss_newton_mc
from lightning_flatness.functional.estimators.gauss_newton_mc import draw_groups, gauss_newton_mc_diagonal
from lightning_flatness.functional.loss_hessian_factors import sample_loss_hessian_columns, token_loss_columns
from lightning_flatness.functional.losses import normalized_softmax_cross_entropy
from lightning_flatness.functional.model_io import TokenLoss
from tests.oracles import brute_force_ggn_diagonal

torch.set_num_threads(1)

BASES = [F.cross_entropy, normalized_softmax_cross_entropy]


def _sequence_blocks(loss_fn, logits, target):
    """``N x`` sample ``n``'s diagonal block of the Hessian of the token-mean loss in all the logits,
    ``(N, D, D)`` in the order of ``logits[n].reshape(-1)``."""
    n = logits.shape[0]
    full = torch.autograd.functional.hessian(
        lambda z: loss_fn(z.reshape(logits.shape), target), logits.reshape(-1)
    ).reshape(n, -1, n, logits[0].numel())
    return torch.stack([full[i, :, i] for i in range(n)]) * n


def _assert_mean(outer, expected, fixed=None):
    """z-scores of the mean of per-draw estimates ``outer (S, N, D, D)`` (plus a fixed part) against
    ``expected``; deterministic entries (ignored tokens: zero) to rounding."""
    mean = outer.mean(dim=0) + (0 if fixed is None else fixed)
    se = outer.std(dim=0) / outer.shape[0] ** 0.5
    random = se > 1e-12 * expected.abs().max()
    torch.testing.assert_close(mean[~random], expected[~random], rtol=1e-10, atol=1e-12)
    z = (mean - expected)[random] / se[random]
    assert float(z.abs().max()) < 6.0, float(z.abs().max())
    assert float(z.pow(2).mean()) < 2.0, float(z.pow(2).mean())  # a wrong scale gives z in the tens


def _per_draw(cols, signs, draws, lead):
    """``draws x`` the signed outer products of each draw's columns (after ``lead`` fixed ones)."""
    per = (cols.shape[2] - lead) // draws
    c = cols[:, :, lead:].reshape(cols.shape[0], cols.shape[1], draws, per)
    s = signs[lead:].reshape(draws, per)
    return draws * torch.einsum("ndsk,sk,nesk->snde", c, s, c)


def _tokens(seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 5, (3, 4), generator=g)
    target[0, 2:] = -100  # padding
    return logits, target


@pytest.mark.parametrize("base", BASES, ids=["ce", "eq20"])
def test_token_columns_mixed_per_token_have_the_sequence_hessian_as_mean(base, monkeypatch):
    # several chunks: cross-entropy's base columns (1 a token: one draw) 8 tokens at a time, eq. 20's direct
    # sketches (2 a token) 2 at a time
    monkeypatch.setattr(loss_hessian_factors, "TOKEN_CHUNK_ELEMENTS", 2 * 5 * 4)
    monkeypatch.setattr(loss_hessian_factors, "TOKEN_SKETCH_CHUNK_ELEMENTS", 2 * 5 * 2)
    logits, target = _tokens(8)
    loss_fn = TokenLoss(base, shift=True)
    per = 1 if base is F.cross_entropy else 2  # a convex loss has no negative part
    gen = torch.Generator().manual_seed(9)
    estimates = []
    for _ in range(1500):  # independent calls: one draw, one sketch each
        cols, signs = token_loss_columns(loss_fn, logits, target, 1, gen, num_sketches=1)
        assert cols.shape == (3, 20, per) and signs.tolist() == [1.0, -1.0][:per]
        estimates.append(torch.einsum("ndk,k,nek->nde", cols, signs, cols))
    _assert_mean(torch.stack(estimates), _sequence_blocks(loss_fn, logits, target))


def test_stacked_eq20_token_columns_with_the_exact_rank_two_part_have_the_sequence_hessian_as_mean():
    """The Monte-Carlo estimator's own token columns (no sketch): eq. 20's exact rank-2 columns and the
    draws, whose normalization part shares one random vector between a draw's + and - column (alpha has
    one sign per token, so one of them carries it), stacked per sequence with random token signs."""
    logits, target = _tokens(12)
    loss_fn = TokenLoss(normalized_softmax_cross_entropy, shift=True)
    gen = torch.Generator().manual_seed(13)
    estimates = []
    for _ in range(1500):  # independent calls, one draw each: 2 exact columns and 2 drawn ones
        cols, signs = token_loss_columns(loss_fn, logits, target, 1, gen)
        assert cols.shape == (3, 20, 4) and signs.tolist() == [1.0, -1.0, 1.0, -1.0]
        estimates.append(torch.einsum("ndk,k,nek->nde", cols, signs, cols))
    _assert_mean(torch.stack(estimates), _sequence_blocks(loss_fn, logits, target))


def test_token_columns_never_hold_the_base_columns_of_all_tokens(monkeypatch):
    # two tokens of 5 logits x 4 columns (eq. 20: 2 exact + 2 per draw)
    monkeypatch.setattr(loss_hessian_factors, "TOKEN_CHUNK_ELEMENTS", 40)
    seen = []
    real = loss_hessian_factors.normalized_cross_entropy_columns

    def spy(rows, *args, **kwargs):
        seen.append(rows.shape[0])
        return real(rows, *args, **kwargs)

    monkeypatch.setitem(loss_hessian_factors.MC_LOSS_COLUMNS, normalized_softmax_cross_entropy, spy)
    logits, target = _tokens(10)
    cols, _ = token_loss_columns(
        TokenLoss(normalized_softmax_cross_entropy, shift=True), logits.float(), target
    )
    assert max(seen) == 2 and sum(seen) == int((target[:, 1:] != -100).sum())
    assert cols.dtype == torch.float32  # in the logits' dtype, not float64


@pytest.mark.parametrize(
    "loss_fn, exact_classes, lead",
    [
        (normalized_softmax_cross_entropy, 0, 2),  # the rank-2 part's two exact columns
        (normalized_softmax_cross_entropy, 1, 3),  # and one exact class
        (F.cross_entropy, 2, 2),  # two exact classes
    ],
    ids=["eq20", "eq20_exact_class", "ce"],
)
def test_draw_groups_are_the_draws_of_one_call(loss_fn, exact_classes, lead, monkeypatch):
    g = torch.Generator().manual_seed(11)
    logits, target = (
        2 * torch.randn(3, 6, generator=g, dtype=torch.float64),
        torch.randint(0, 6, (3,), generator=g),
    )
    draws = 3000
    monkeypatch.setattr(gauss_newton_mc, "COLUMN_ELEMENTS", 3 * 6 * 4)  # 2 draws per group
    groups = list(
        draw_groups(loss_fn, logits, target, draws, torch.Generator().manual_seed(12), exact_classes)
    )
    assert len(groups) == draws // 2
    single, _ = sample_loss_hessian_columns(loss_fn, logits, target, draws, None, exact_classes=exact_classes)
    last, last_signs = groups[-1]  # the exact columns come with the last group, ahead of its draws
    cols = torch.cat([last[:, :, :lead]] + [c for c, _ in groups[:-1]] + [last[:, :, lead:]], dim=2)
    signs = torch.cat([last_signs[:lead]] + [s for _, s in groups[:-1]] + [last_signs[lead:]])
    assert cols.shape == single.shape  # the exact columns once, then every draw
    fixed = torch.einsum("ndk,k,nek->nde", cols[:, :, :lead], signs[:lead], cols[:, :, :lead])
    expected = torch.stack(
        [
            torch.autograd.functional.hessian(
                lambda z, i=i: loss_fn(z.unsqueeze(0), target[i : i + 1]), logits[i]
            )
            for i in range(3)
        ]
    )
    _assert_mean(_per_draw(cols, signs, draws, lead), expected, fixed)


def _token_model(vocab: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(vocab, 4), nn.Tanh(), nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, vocab)
    ).double()


def test_monte_carlo_gauss_newton_in_groups_is_unbiased_for_a_token_model(monkeypatch):
    vocab, n, t, repeats = 40, 3, 4, 200
    model = _token_model(vocab)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (n, t), generator=g)
    y = x.clone()
    y[1, 3] = -100
    loss_fn = TokenLoss(normalized_softmax_cross_entropy, shift=True)
    params = {k: p for k, p in model.named_parameters() if k in ("2.weight", "4.weight")}
    reference = brute_force_ggn_diagonal(model, loss_fn, x, y, list(params))
    monkeypatch.setattr(gauss_newton_mc, "COLUMN_ELEMENTS", n * t * vocab * 2)  # one draw per group
    calls = []
    real = gauss_newton_mc.sample_loss_hessian_columns
    monkeypatch.setattr(
        gauss_newton_mc, "sample_loss_hessian_columns", lambda *a, **k: calls.append(a[3]) or real(*a, **k)
    )
    gen = torch.Generator().manual_seed(2)
    runs = [gauss_newton_mc_diagonal(model, loss_fn, x, y, params, generator=gen) for _ in range(repeats)]
    assert calls[:8] == [1] * 8  # eq. 20's 8 default draws, one group each
    for name in params:
        stack = torch.stack([r[name] for r in runs])
        se = stack.std(dim=0) / repeats**0.5
        assert float(((stack.mean(dim=0) - reference[name]).abs() / se).max()) < 5.0, name


class _FlippedTokenModel(nn.Module):
    """Per-sample, but not provably so (a flip along the features): the batch-independence probe runs."""

    def __init__(self, vocab: int):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, 4), nn.Linear(4, vocab)

    def forward(self, x):
        return self.head(torch.relu(self.embed(x)).flip(2))


def test_groups_of_draws_share_one_batch_independence_probe(monkeypatch):
    """The probe runs once per recorded forward, in a pass of its own for large columns, not once per group
    of draws."""
    vocab, n, t = 40, 3, 4
    torch.manual_seed(0)
    model = _FlippedTokenModel(vocab).double()
    x = torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(1))
    loss_fn = TokenLoss(normalized_softmax_cross_entropy, shift=True)
    params = dict(model.named_parameters())  # the flip acts on the embedding's output: probed
    monkeypatch.setattr(gauss_newton_mc, "COLUMN_ELEMENTS", n * t * vocab * 2)  # one draw per group
    monkeypatch.setattr(exact, "SEPARATE_PROBE_ELEMENTS", 0)
    widths = []
    real = exact._column_gradients
    monkeypatch.setattr(
        exact,
        "_column_gradients",
        lambda r, lg, o, columns: widths.append(columns.shape[0]) or real(r, lg, o, columns),
    )
    diag = gauss_newton_mc_diagonal(
        model, loss_fn, x, x.clone(), params, generator=torch.Generator().manual_seed(2)
    )
    # the probe alone, first, once; then eq. 20's 8 default draws, one group each (2 columns; the last one
    # with the 2 exact columns of the rank-2 part)
    assert widths == [1] + [2] * 7 + [4]
    monkeypatch.setattr(exact, "SEPARATE_PROBE_ELEMENTS", 2**62)  # the probe as one more column, once
    riding = gauss_newton_mc_diagonal(
        model, loss_fn, x, x.clone(), params, generator=torch.Generator().manual_seed(2)
    )
    assert widths[9:] == [2 + 1] + [2] * 6 + [4]
    for name in params:  # the same draws, the same diagonal, wherever the probe ran
        torch.testing.assert_close(diag[name], riding[name], rtol=1e-12, atol=1e-15)
