"""Hugging Face BLOOM: its GELU is a custom autograd Function (``BloomGelu``) and its attention scores one
``baddbmm`` with the ALiBi bias. During a measurement the GELU runs as ``F.gelu(approximate="tanh")``
(:mod:`~lightning_flatness.functional.explicit_activations`) and ``baddbmm`` has a node rule, so a tiny
BLOOM (float64, random weights) takes the per-layer contractions: its Gauss-Newton diagonal equals the
brute-force one, the Hessian sketch is unbiased for the brute-force Hessian diagonal, and ``auto`` measures
the Hessian where the LM head is untied (the Gauss-Newton diagonal where it is tied, as for GPT-2)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from oracles import assert_unbiased, flat
from zoo_models import VOCAB, _token_batch
from zoo_oracle import brute_force_ggn_diagonal, brute_force_hessian_diagonal

from lightning_flatness.functional import select_parameters
from lightning_flatness.functional.estimators.exact import gauss_newton_diagonal
from lightning_flatness.functional.estimators.hessian_sketch import hessian_sketch_diagonal
from lightning_flatness.functional.estimators.method_choice import choose_method
from lightning_flatness.functional.explicit_activations import explicit_activations
from lightning_flatness.functional.model_io import TokenLoss

pytest.importorskip("transformers")
F64 = torch.float64
LOSS = TokenLoss(F.cross_entropy, shift=True)


@pytest.fixture(autouse=True)
def _softmax_in_float64(monkeypatch):
    """BLOOM computes its attention softmax in float32 (``F.softmax(..., dtype=torch.float32)``) whatever
    the model's dtype: in these float64 checks it is computed in float64, so that the brute force and the
    estimators are compared at float64 rounding."""
    from transformers.models.bloom import modeling_bloom

    class Functional:
        def __getattr__(self, name):
            return getattr(F, name)

        @staticmethod
        def softmax(x, dim=None, dtype=None):
            return F.softmax(x, dim=dim)

    monkeypatch.setattr(modeling_bloom, "F", Functional())


def tiny_bloom(n: int = 6, tie: bool = False, seed: int = 0):
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(seed)
    config = BloomConfig(vocab_size=VOCAB, hidden_size=8, n_layer=1, n_head=2, tie_word_embeddings=tie)
    model = BloomForCausalLM(config).to(F64).eval()
    for p in model.parameters():
        p.data.add_(0.3 * torch.randn_like(p))  # LayerNorm scales and biases away from 1 and 0
    inputs = _token_batch(n, seed)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return model, inputs, labels


def test_bloom_gelu_runs_as_the_tanh_gelu_and_is_restored():
    from transformers.models.bloom.modeling_bloom import BloomGelu

    act = BloomGelu()
    x = torch.linspace(-6, 6, 101, dtype=F64, requires_grad=True)
    with explicit_activations(act):
        out = act(x)
        assert type(out.grad_fn).__name__ == "GeluBackward0"  # a PyTorch op, not the custom Function
    torch.testing.assert_close(out, act(x), rtol=0, atol=5e-10)  # sqrt(2 / pi) against 0.79788456
    assert "forward" not in act.__dict__


def test_a_tiny_bloom_takes_the_per_layer_path():
    model, x, y = tiny_bloom(tie=True)
    params = {k: v for k, v in select_parameters(model).items() if v.ndim >= 2}
    names = list(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a per-sample fallback warns
        ggn = gauss_newton_diagonal(model, LOSS, x, y, params).diagonal
    with explicit_activations(model):  # the brute force differentiates the same function twice
        expected = brute_force_ggn_diagonal(model, LOSS, x, y, names)
    torch.testing.assert_close(flat(ggn, names), flat(expected, names), rtol=1e-9, atol=1e-14)
    assert choose_method(model, LOSS, x, y).quantity == "gauss_newton"  # tied LM head


def test_the_hessian_sketch_of_an_untied_bloom_is_unbiased_and_auto_picks_it():
    """160 estimates (4 sketches each): no entry's mean more than 5 standard errors from the brute-force
    Hessian diagonal, and each tensor's mean within 35% of it (norm), where the Gauss-Newton diagonal is
    off by more than 100% on every tensor but the LM head. (The estimates are heavy-tailed: with 40 of
    them the largest of the 1,024 z-scores reached 5.8, with 400 it is 3.4; the worst tensor's norm error
    of a 160-estimate mean ranged over 0.14-0.27 in 8 independent blocks of seeds.) The ``baddbmm`` rule's own
    columns are checked against ``torch.func.hessian`` in ``test_node_rules.py``; in this one-layer model
    their share of the diagonal is below the noise of 160 estimates."""
    model, x, y = tiny_bloom(tie=False)
    params = {k: v for k, v in select_parameters(model).items() if v.ndim >= 2}
    names = list(params)
    assert choose_method(model, LOSS, x, y).method == "hessian_sketch"
    with explicit_activations(model):
        hessian = {k: v.detach() for k, v in brute_force_hessian_diagonal(model, LOSS, x, y, names).items()}
        ggn = {k: v.detach() for k, v in brute_force_ggn_diagonal(model, LOSS, x, y, names).items()}

    def estimate(seed):
        generator = torch.Generator().manual_seed(seed)
        return hessian_sketch_diagonal(model, LOSS, x, y, params, generator=generator, num_sketches=4)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a per-sample fallback warns
        runs = [estimate(seed) for seed in range(160)]
    est = torch.stack([flat(r, names) for r in runs])
    diag = flat(hessian, names)
    assert_unbiased(est, diag)
    for k in names:
        mean_k = torch.stack([r[k] for r in runs]).mean(0)
        assert float((mean_k - hessian[k]).norm() / hessian[k].norm()) < 0.35, k
        if k != "lm_head.weight":
            assert float((ggn[k] - hessian[k]).norm() / hessian[k].norm()) > 1.0, k
