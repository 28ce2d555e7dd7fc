"""``F.scaled_dot_product_attention`` called in a model's own code (nanoGPT style): written out for the
sketched Hessian diagonal. The explicit form equals the fused kernel for every mask kind; a small causal
transformer then gets ``auto``'s Hessian sketch on the per-layer path, unbiased for the brute-force Hessian
diagonal."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from oracles import assert_unbiased, flat
from torch import nn
from zoo_oracle import brute_force_ggn_diagonal, brute_force_hessian_diagonal

from lightning_flatness.functional import select_parameters
from lightning_flatness.functional.estimators.hessian_sketch import hessian_sketch_diagonal
from lightning_flatness.functional.estimators.method_choice import choose_method
from lightning_flatness.functional.explicit_sdpa import (
    ExplicitAttention,
    explicit_scaled_dot_product_attention,
)

F64 = torch.float64


def _qkv(heads_kv: int = 2, length: int = 5, source: int = 5):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, length, 4, generator=g, dtype=F64)
    k = torch.randn(3, heads_kv, source, 4, generator=g, dtype=F64)
    v = torch.randn(3, heads_kv, source, 4, generator=g, dtype=F64)
    return q, k, v


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"is_causal": True},
        {"scale": 0.3},
        {"attn_mask": "bool"},
        {"attn_mask": "float"},
        {"cross": True},
        {"enable_gqa": True},
    ],
    ids=["plain", "causal", "scale", "bool-mask", "float-mask", "cross-attention", "gqa"],
)
def test_equals_the_fused_kernel(options):
    options = dict(options)
    q, k, v = _qkv(
        heads_kv=1 if options.get("enable_gqa") else 2, source=7 if options.pop("cross", False) else 5
    )
    if options.get("attn_mask") == "bool":
        options["attn_mask"] = torch.rand(5, k.shape[-2], generator=torch.Generator().manual_seed(1)) > 0.3
        options["attn_mask"][:, 0] = True  # every query sees a key
    elif options.get("attn_mask") == "float":
        options["attn_mask"] = torch.randn(
            5, k.shape[-2], generator=torch.Generator().manual_seed(1), dtype=F64
        )
    expected = F.scaled_dot_product_attention(q, k, v, **options)
    torch.testing.assert_close(explicit_scaled_dot_product_attention(q, k, v, **options), expected)
    with ExplicitAttention():
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, **options), expected)


def test_calls_with_dropout_keep_the_fused_kernel():
    q, k, v = _qkv()
    torch.manual_seed(3)
    expected = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    with ExplicitAttention():
        got = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no dropout"):
        explicit_scaled_dot_product_attention(q, k, v, dropout_p=0.5)


class TinyGPT(nn.Module):
    """nanoGPT's block, small: token and position embeddings, LayerNorm, causal self-attention through
    ``F.scaled_dot_product_attention``, a GELU MLP, a head on the last token."""

    def __init__(self, vocab: int = 11, width: int = 8, heads: int = 2, length: int = 5, classes: int = 3):
        super().__init__()
        self.heads = heads
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Parameter(0.3 * torch.randn(length, width))
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens):
        b, t = tokens.shape
        h = self.tok(tokens) + self.pos[:t]
        q, k, v = (
            z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(self.ln1(h)).chunk(3, dim=-1)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        h = h + self.proj(y)
        h = h + self.out(F.gelu(self.fc(self.ln2(h))))
        return self.head(h[:, -1])


def test_a_hand_written_transformer_gets_the_hessian_sketch_unbiased_for_the_hessian():
    torch.manual_seed(0)
    model = TinyGPT().to(F64).eval()
    for p in model.parameters():
        p.data.mul_(1.5)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 11, (6, 5), generator=g), torch.randint(0, 3, (6,), generator=g)
    params = {k: v for k, v in select_parameters(model).items() if v.ndim >= 2}
    names = list(params)
    choice = choose_method(model, F.cross_entropy, x, y)
    assert (choice.method, choice.quantity) == ("hessian_sketch", "hessian")
    hessian = brute_force_hessian_diagonal(model, F.cross_entropy, x, y, names)
    ggn = brute_force_ggn_diagonal(model, F.cross_entropy, x, y, names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a per-sample fallback warns
        generators = [torch.Generator().manual_seed(s) for s in range(60)]
        runs = [
            hessian_sketch_diagonal(model, F.cross_entropy, x, y, params, generator=gen, num_sketches=4)
            for gen in generators
        ]
    diag = flat(hessian, names).detach()
    assert_unbiased(torch.stack([flat(r, names) for r in runs]), diag, atol=1e-14)
    assert float((flat(ggn, names) - diag).norm() / diag.norm()) > 0.05  # the Gauss-Newton diagonal is not it
