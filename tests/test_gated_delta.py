"""The gated delta rule of Qwen3-Next, Qwen3.5 and OLMo's hybrid (Hugging Face's reference PyTorch
implementation, ``torch_chunk_gated_delta_rule``): its UT transform solves a triangular system whose matrix
and right-hand side both depend on the weights. With a node rule for the solve
(:mod:`~lightning_flatness.functional.estimators.node_rules.triangular_solve`), ``auto`` measures the
Hessian there (the Gauss-Newton diagonal before), on the per-layer path, unbiased for the brute-force
Hessian diagonal of the linear-attention weights."""

from __future__ import annotations

import pytest
import torch
from causal_lm_checks import assert_sketch_unbiased_on_causal_lm

transformers = pytest.importorskip("transformers")


def _tiny_qwen3_next() -> torch.nn.Module:
    """One linear-attention layer (gated delta rule) with a dense MLP, vocabulary 32, float64, eval mode."""
    config = transformers.Qwen3NextConfig(
        vocab_size=32,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        layer_types=["linear_attention"],
        mlp_only_layers=[0],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        linear_conv_kernel_dim=2,
        linear_key_head_dim=4,
        linear_value_head_dim=4,
        linear_num_key_heads=1,
        linear_num_value_heads=2,
        use_cache=False,  # a cache of linear-attention layers alone cannot tell its length
    )
    torch.manual_seed(0)
    return transformers.Qwen3NextForCausalLM(config).double().eval()


def test_the_gated_delta_rule_takes_the_hessian_sketch_unbiased():
    model = _tiny_qwen3_next()
    ids = torch.randint(1, 32, (3, 6), generator=torch.Generator().manual_seed(1))
    attention = "model.layers.0.linear_attn."
    names = [
        attention + n
        for n in ("in_proj_qkvz.weight", "in_proj_ba.weight", "conv1d.weight", "out_proj.weight")
    ]
    assert_sketch_unbiased_on_causal_lm(model, ids, names)
