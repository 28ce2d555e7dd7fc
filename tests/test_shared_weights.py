"""Weights used by several recorded calls on the per-layer path (``layer_rules.shared``): a tied LM head
(an embedding lookup and a Linear call of one table), layers shared across depth, Hugging Face's
``Conv1D`` (``addmm``, ``layer_rules.addmm``) and LayerNorm on token rows flattened to ``(N T, C)`` (OPT).
The Gauss-Newton diagonal equals the brute-force one, and the sketches equal their per-sample path's
value draw by draw."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from sketch_paths import sketch_on_both_paths
from torch import nn
from zoo_oracle import brute_force_ggn_diagonal

from lightning_flatness.functional import select_parameters
from lightning_flatness.functional.estimators.exact import gauss_newton_diagonal
from lightning_flatness.functional.estimators.layer_rules import shared_call_groups
from lightning_flatness.functional.estimators.layer_rules.base import LayerCall
from lightning_flatness.functional.model_io import TokenLoss

F64 = torch.float64


class TiedTokens(nn.Module):
    """GPT-2 and OPT in miniature: token embedding -> ``Conv1D`` (``addmm`` on ``(N T, d)`` rows) -> ReLU ->
    Linear -> LayerNorm on the flattened rows -> an LM head tied to the embedding, ``(N, T, V)`` logits."""

    def __init__(self, vocabulary: int = 7, d: int = 4, beta: float = 1.0):
        super().__init__()
        self.emb = nn.Embedding(vocabulary, d)
        self.conv1d_weight = nn.Parameter(torch.randn(d, 5) * 0.5)  # stored (in, out), as Conv1D does
        self.conv1d_bias = nn.Parameter(torch.randn(5) * 0.1)
        self.proj = nn.Linear(5, d)
        self.norm = nn.LayerNorm(d)
        self.beta = beta

    def forward(self, ids):
        h = self.emb(ids)
        rows = h.reshape(-1, h.shape[-1])
        z = torch.addmm(self.conv1d_bias, rows, self.conv1d_weight, beta=self.beta)
        z = self.norm(self.proj(torch.relu(z))).reshape(h.shape)
        return F.linear(z, self.emb.weight)


class SharedBlock(nn.Module):
    """ALBERT in miniature: one Linear layer and one LayerNorm applied twice to ``(N, T, 4)`` tokens."""

    def __init__(self):
        super().__init__()
        self.inp, self.block = nn.Linear(3, 4), nn.Linear(4, 4)
        self.norm, self.head = nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.inp(x)
        for _ in range(2):
            h = self.norm(h + torch.tanh(self.block(h)))
        return self.head(h.mean(dim=1))


def _problem(kind: str, beta: float = 1.0):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "tied_tokens":
        model = TiedTokens(beta=beta).double().eval()
        x = torch.randint(0, 7, (6, 4), generator=g)
        y = x.clone()
        y[1, -1] = -100  # an ignored token
        return model, x, y, TokenLoss(F.cross_entropy, shift=True)
    model = SharedBlock().double().eval()
    x, y = torch.randn(6, 5, 3, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g)
    return model, x, y, F.cross_entropy


@pytest.mark.parametrize("kind", ["tied_tokens", "shared_block"])
def test_the_gauss_newton_diagonal_of_shared_weights_is_exact_on_the_per_layer_path(kind, monkeypatch):
    model, x, y, loss = _problem(kind)
    params = select_parameters(model, "all")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the per-sample path would announce itself
        ggn = gauss_newton_diagonal(model, loss, x, y, params)
    assert any("used 2 times" in issue for issue in ggn.issues)  # not the Hessian's diagonal, and said
    ref = brute_force_ggn_diagonal(model, loss, x, y, list(params))
    for name in params:
        torch.testing.assert_close(
            ggn.diagonal[name], ref[name], rtol=1e-10, atol=1e-13 * float(ref[name].abs().max())
        )
    # the cross terms of the uses matter: each call contracted on its own (a sum of squares) is far off
    import lightning_flatness.functional.estimators.layer_rules.shared as shared

    monkeypatch.setattr(shared, "shared_call_groups", lambda calls, derived=None: [])
    apart = gauss_newton_diagonal(model, loss, x, y, params).diagonal
    name = "emb.weight" if kind == "tied_tokens" else "block.weight"
    assert float((apart[name] - ref[name]).norm() / ref[name].norm()) > 0.05


def test_a_scaled_addmm_is_left_to_the_per_sample_path():
    model, x, y, loss = _problem("tied_tokens", beta=0.5)
    params = select_parameters(model, "all")
    with pytest.warns(UserWarning, match=r"per-layer contractions do not apply \(addmm"):
        ggn = gauss_newton_diagonal(model, loss, x, y, params)
    ref = brute_force_ggn_diagonal(model, loss, x, y, list(params))
    for name in params:
        torch.testing.assert_close(
            ggn.diagonal[name], ref[name], rtol=1e-10, atol=1e-13 * float(ref[name].abs().max())
        )


@pytest.mark.parametrize("chunk_size", [1, 4])
@pytest.mark.parametrize("kind", ["tied_tokens", "shared_block"])
def test_the_sketch_of_shared_weights_equals_its_per_sample_path_draw_by_draw(kind, chunk_size, monkeypatch):
    model, x, y, loss = _problem(kind)
    params = select_parameters(model, "all")
    per_layer, per_sample = sketch_on_both_paths(model, loss, x, y, params, chunk_size, monkeypatch)
    for name in params:
        scale = float(per_sample[name].abs().max())
        assert scale > 0
        torch.testing.assert_close(per_layer[name], per_sample[name], rtol=1e-10, atol=1e-13 * scale)


def test_gpt2_takes_the_per_layer_path_and_its_gauss_newton_diagonal_is_exact():
    """Hugging Face GPT-2: ``Conv1D`` layers and the LM head tied to the token embedding."""
    pytest.importorskip("transformers")
    from zoo_models import tiny_gpt2, zoo_loss

    model, (inputs, labels) = tiny_gpt2(n=4, dtype=F64)
    loss = zoo_loss("gpt2", F.cross_entropy)
    params = select_parameters(model)
    assert {"transformer.wte.weight", "transformer.h.0.attn.c_attn.weight"} <= set(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ggn = gauss_newton_diagonal(model, loss, inputs, labels, params).diagonal
    ref = brute_force_ggn_diagonal(model, loss, inputs, labels, list(params))
    for name in params:
        scale = float(ref[name].detach().abs().max())
        torch.testing.assert_close(ggn[name], ref[name].detach(), rtol=1e-9, atol=1e-12 * scale)


def _call(weight, bias=None):
    return LayerCall("linear", "m", torch.zeros(1, 1), torch.zeros(1, 1), weight, bias)


def test_calls_are_grouped_by_the_parameters_they_share_transitively():
    calls = [_call("a", "x"), _call("b"), _call("c", "x"), _call("c"), _call("d"), _call("b", "y")]
    assert shared_call_groups(calls) == [[0, 2, 3], [1, 5]]
    assert shared_call_groups([_call("a"), _call("b", "c")]) == []


def test_chunked_sketch_takes_embeddings_and_offsets_on_the_per_layer_path(monkeypatch):
    """``chunk_size > 1``: an embedding lookup and an offset added to every sample (rules with a per-sample
    contraction of their own) are chunked through their per-sample gradients, equal to the per-sample
    path draw by draw."""

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(7, 4), nn.Linear(4, 3)
            self.pos_embed = nn.Parameter(torch.randn(3, 4) * 0.3)

        def forward(self, ids):
            return self.head(torch.tanh(self.emb(ids) + self.pos_embed).mean(dim=1))

    torch.manual_seed(0)
    model = Tokens().double()
    g = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, 7, (8, 3), generator=g), torch.randint(0, 3, (8,), generator=g)
    params = select_parameters(model, "all")
    per_layer, per_sample = sketch_on_both_paths(model, F.cross_entropy, ids, y, params, 4, monkeypatch)
    for name in params:
        scale = float(per_sample[name].abs().max())
        assert scale > 0
        torch.testing.assert_close(per_layer[name], per_sample[name], rtol=1e-10, atol=1e-13 * scale)
