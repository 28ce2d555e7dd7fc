"""A layer norm whose affine weight is computed from the parameter (Nemotron's ``LayerNorm1P``:
``layer_norm(x, shape, weight + 1, bias)``, zero-centred gamma). The op is linear in that weight, as in a
plain parameter, so only its input carries the normalization's curvature: ``auto`` measures the Hessian
with the layer norm's node rule (it measured the Gauss-Newton diagonal: the function of the weight counted
as a second input no rule covered), unbiased for the brute-force Hessian diagonal."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from causal_lm_checks import assert_sketch_unbiased_on_causal_lm
from oracles import assert_unbiased, brute_force_hessian, hessian_sketch_draws
from torch import nn

from lightning_flatness.functional.estimators.method_choice import choose_method

F64 = torch.float64


class LayerNorm1P(nn.LayerNorm):
    """``LayerNorm`` with a zero-centred scale: ``weight + 1`` multiplies the normalized input."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


def test_a_layer_norm_with_a_weight_plus_one_takes_the_hessian_sketch_unbiased():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), LayerNorm1P(6), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[2].weight.normal_(0.0, 0.5)
        model[2].bias.normal_(0.0, 0.5)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 4, generator=g, dtype=F64), torch.randint(0, 3, (5,), generator=g)
    choice = choose_method(model, F.cross_entropy, x, y)
    assert (choice.method, choice.quantity) == ("hessian_sketch", "hessian"), choice.reason
    names = ["0.weight", "2.weight", "2.bias", "3.weight"]
    truth = brute_force_hessian(model, F.cross_entropy, x, y, names).diagonal()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback to per-sample passes warns
        draws = hessian_sketch_draws(model, F.cross_entropy, x, y, names)
    assert_unbiased(draws, truth)


@pytest.mark.slow
def test_nemotron_takes_the_hessian_sketch_unbiased():
    transformers = pytest.importorskip("transformers")
    config = transformers.NemotronConfig(
        vocab_size=32,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        tie_word_embeddings=False,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.NemotronForCausalLM(config).double().eval()
    with torch.no_grad():  # zero-centred scales away from zero
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    ids = torch.randint(1, 32, (3, 6), generator=torch.Generator().manual_seed(1))
    names = [n for n, _ in model.named_parameters() if ".layers.0." in n]
    assert_sketch_unbiased_on_causal_lm(model, ids, names, draws=16)
