"""The per-layer contraction: its two evaluations (position pairs, per-sample gradients) agree with an
explicit per-sample computation, and the exact diagonal is the brute-force one whichever is chosen."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracles import brute_force_hessian_diagonal
from torch import nn

import lightning_flatness.functional.estimators.layer_rules.contraction as contraction
from lightning_flatness.functional import hessian_diagonal, select_parameters
from lightning_flatness.functional.estimators.layer_rules import LAYER_RULES, position_pair_contraction
from lightning_flatness.functional.estimators.layer_rules.contraction import pair_products


def test_position_pairs_equal_the_signed_sum_of_squared_per_sample_gradients():
    g = torch.Generator().manual_seed(0)
    n, groups, inputs, outputs, k, positions = 5, 2, 3, 4, 3, 6
    a = torch.randn(n, groups, inputs, positions, generator=g, dtype=torch.float64)
    grad = torch.randn(n, groups, k * outputs, positions, generator=g, dtype=torch.float64)
    signs = torch.randn(n, k, generator=g, dtype=torch.float64).sign()
    per_sample = torch.einsum("ngcp,ngip->ngci", grad, a).reshape(n, groups, k, outputs, inputs)
    expected = torch.einsum("nk,ngkoi->goi", signs, per_sample**2)
    torch.testing.assert_close(position_pair_contraction(a, grad, signs, k), expected, rtol=1e-12, atol=1e-12)



@pytest.mark.parametrize("positions", [1, 2, 5])
def test_pair_products_are_the_triu_pairs_of_positions(positions):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 7, positions, generator=g, dtype=torch.float64).transpose(-1, -2)  # strided
    first, second = torch.triu_indices(positions, positions)
    expected = torch.stack([x[..., p, :] * x[..., q, :] for p, q in zip(first.tolist(), second.tolist())], dim=-2)
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


@pytest.mark.parametrize("pairs", [True, False], ids=["position_pairs", "per_sample"])
def test_exact_diagonal_equals_brute_force_on_either_contraction_path(pairs, monkeypatch):
    monkeypatch.setattr(contraction, "use_position_pairs", lambda positions, inputs, k: pairs)
    model = _cnn()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=g)
    names = list(select_parameters(model, "all"))
    diag = hessian_diagonal(model, F.cross_entropy, x, y, method="exact", parameters="all")
    ref = brute_force_hessian_diagonal(model, F.cross_entropy, x, y, names)
    for name in names:
        torch.testing.assert_close(diag[name], ref[name], rtol=1e-10, atol=1e-13)


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
