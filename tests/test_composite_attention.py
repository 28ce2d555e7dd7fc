"""``nn.MultiheadAttention`` written out in explicit operations (``composite_attention``): the same
function as PyTorch's ``F.multi_head_attention_forward`` for every option it covers, the original
forward for the others, and the modules restored exactly after a measurement. A model's own call of
``F.multi_head_attention_forward`` (WavLM: separate projections) written out too, and measured on the
per-layer path."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_flatness.functional.composite_attention import (
    ExplicitAttentionCalls,
    composite_attention_call,
    composite_multi_head_attention,
    explicit_multi_head_attention,
    writes_out,
)

F64 = torch.float64
E, H, B, L, S = 8, 2, 3, 4, 5


def _module(batch_first: bool, **kwargs) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, **kwargs).to(F64).eval()
    with torch.no_grad():  # PyTorch zero-initialises the biases: random, so that every term shows
        for p in mha.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return mha


def _inputs(batch_first: bool, kind: str):
    g = torch.Generator().manual_seed(1)

    def seq(t):
        shape = (B, t, E) if batch_first else (t, B, E)
        return torch.randn(shape, generator=g, dtype=F64)

    q = seq(L)
    if kind == "self":
        return q, q, q
    kv = seq(S)
    if kind == "cross":  # key is value (decoder cross-attention)
        return q, kv, kv
    return q, kv, seq(S)  # three distinct tensors


def _masks(kind: str, kind_of_inputs: str):
    g = torch.Generator().manual_seed(2)
    s = L if kind_of_inputs == "self" else S
    causal = torch.triu(torch.ones(L, s, dtype=torch.bool), diagonal=1)
    padding = torch.zeros(B, s, dtype=torch.bool)
    padding[0, -1] = padding[2, -2:] = True  # never a whole row
    if kind == "none":
        return {}
    if kind == "bool_2d":
        return {"attn_mask": causal}
    if kind == "float_3d":
        return {"attn_mask": torch.randn(B * H, L, s, generator=g, dtype=F64)}
    if kind == "bool_padding":
        return {"key_padding_mask": padding}
    if kind == "float_both":
        float_padding = torch.zeros(B, s, dtype=F64).masked_fill(padding, float("-inf"))
        return {"attn_mask": torch.randn(L, s, generator=g, dtype=F64), "key_padding_mask": float_padding}
    if kind == "causal_hint":
        return {"attn_mask": causal, "is_causal": True}
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "batch_first,inputs,masks",
    [
        case
        for case in itertools.product(
            (True, False),
            ("self", "cross", "distinct"),
            ("none", "bool_2d", "float_3d", "bool_padding", "float_both", "causal_hint"),
        )
        if case[2] != "causal_hint" or case[1] == "self"  # a causal mask: as many keys as queries
    ],
)
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
def test_equals_pytorch_multi_head_attention(batch_first, inputs, masks, need_weights, average):
    mha = _module(batch_first)
    q, k, v = _inputs(batch_first, inputs)
    kwargs = {**_masks(masks, inputs), "need_weights": need_weights, "average_attn_weights": average}
    assert writes_out(mha, q)
    out, weights = composite_multi_head_attention(mha, q, k, v, **kwargs)
    ref_out, ref_weights = mha(q, k, v, **kwargs)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    if need_weights:
        torch.testing.assert_close(weights, ref_weights, rtol=1e-12, atol=1e-12)
    else:
        assert weights is None and ref_weights is None


def test_the_causal_hint_without_weights_applies_the_causal_mask_itself():
    """With ``is_causal`` (no key padding, no weights asked for) PyTorch's attention kernel applies its
    own causal mask and ignores ``attn_mask``'s values: the composite does the same."""
    mha = _module(True)
    q, k, v = _inputs(True, "self")
    anything = torch.zeros(L, L, dtype=F64)  # not causal: ignored under the hint
    out, _ = composite_multi_head_attention(
        mha, q, k, v, attn_mask=anything, need_weights=False, is_causal=True
    )
    causal = torch.triu(torch.ones(L, L, dtype=torch.bool), diagonal=1)
    torch.testing.assert_close(
        out, mha(q, k, v, attn_mask=causal, need_weights=False)[0], rtol=1e-12, atol=1e-12
    )
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        composite_multi_head_attention(mha, q, k, v, is_causal=True)


@pytest.mark.parametrize(
    "kwargs,train,unbatched",
    [
        ({"add_bias_kv": True}, False, False),
        ({"add_zero_attn": True}, False, False),
        ({"kdim": 6, "vdim": 6}, False, False),
        ({"dropout": 0.5}, True, False),
        ({}, False, True),
    ],
)
def test_what_it_does_not_write_out_runs_the_original_forward(kwargs, train, unbatched):
    mha = _module(True, **kwargs).train(train)
    q = torch.randn(L, E, dtype=F64) if unbatched else torch.randn(B, L, E, dtype=F64)
    kv = q if "kdim" not in kwargs else torch.randn(*q.shape[:-1], 6, dtype=F64)
    assert not writes_out(mha, q)
    torch.manual_seed(3)
    expected = mha(q, kv, kv)[0]
    with explicit_multi_head_attention(mha):
        assert "forward" in mha.__dict__
        torch.manual_seed(3)
        torch.testing.assert_close(mha(q, kv, kv)[0], expected, rtol=0, atol=0)


def test_installed_for_the_block_only_and_restored_on_exceptions():
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, batch_first=True).to(F64).eval()
    replaced = _module(True)
    own = replaced.forward
    replaced.forward = own  # a forward already replaced on the instance is kept as it is
    model = nn.ModuleList([layer, replaced])
    x = torch.randn(B, L, E, dtype=F64)
    expected = layer(x)
    with explicit_multi_head_attention(model):
        assert "forward" in layer.self_attn.__dict__ and replaced.forward is own
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert "forward" not in layer.self_attn.__dict__ and replaced.forward is own
    with pytest.raises(ValueError, match="boom"):
        with explicit_multi_head_attention(model):
            raise ValueError("boom")
    assert "forward" not in layer.self_attn.__dict__


def test_a_transformer_encoder_is_recorded_in_explicit_operations_and_measured_as_a_hessian():
    """``nn.TransformerEncoder`` (batch first, GELU) in a classifier: the recorder sees the projections as
    Linear layers (the per-layer path, no per-sample backward passes) and ``auto`` measures the Hessian."""
    import warnings

    from lightning_flatness.functional import normalized_softmax_cross_entropy
    from lightning_flatness.functional.estimators.hessian_sketch import hessian_sketch_diagonal
    from lightning_flatness.functional.estimators.method_choice import choose_method
    from lightning_flatness.functional.parameters import select_parameters

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, activation="gelu", batch_first=True)
    model = (
        nn.Sequential(
            nn.Linear(3, E),
            nn.TransformerEncoder(layer, 1, enable_nested_tensor=False),
            nn.Flatten(),
            nn.Linear(L * E, 4),
        )
        .to(F64)
        .eval()
    )
    x, y = torch.randn(6, L, 3, dtype=F64), torch.randint(0, 4, (6,))
    choice = choose_method(model, normalized_softmax_cross_entropy, x, y)
    assert choice.method == "hessian_sketch", choice.reason
    params = select_parameters(model)
    assert "1.layers.0.self_attn.in_proj_weight" in params and "1.layers.0.self_attn.in_proj_bias" in params
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the per-sample fallback warns
        est = hessian_sketch_diagonal(
            model, F.cross_entropy, x, y, params, generator=torch.Generator().manual_seed(0)
        )
    assert set(est) == set(params) and all(torch.isfinite(v).all() for v in est.values())


def _call_arguments(separate: bool, masks: str, need_weights: bool) -> dict:
    """Arguments of ``F.multi_head_attention_forward`` for self-attention on ``(L, B, E)``: the packed
    projection, or three separate ones with their biases concatenated (as WavLM calls it)."""
    mha = _module(batch_first=False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(L, B, E, generator=g, dtype=F64)
    weights = mha.in_proj_weight.detach().chunk(3)
    kwargs = dict(
        query=x,
        key=x,
        value=x,
        embed_dim_to_check=E,
        num_heads=H,
        in_proj_weight=torch.empty(0) if separate else mha.in_proj_weight.detach(),
        in_proj_bias=torch.cat(mha.in_proj_bias.detach().chunk(3)),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.1,
        out_proj_weight=mha.out_proj.weight.detach(),
        out_proj_bias=mha.out_proj.bias.detach(),
        training=False,
        need_weights=need_weights,
        **_masks(masks, "self"),
    )
    if separate:
        kwargs.update(use_separate_proj_weight=True, q_proj_weight=weights[0])
        kwargs.update(k_proj_weight=weights[1], v_proj_weight=weights[2])
    return kwargs


@pytest.mark.parametrize("separate", [True, False], ids=["separate", "packed"])
@pytest.mark.parametrize("masks", ["none", "float_3d", "bool_padding", "float_both"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_a_models_own_call_is_written_out_as_the_same_function(separate, masks, need_weights):
    """``F.multi_head_attention_forward`` called in a model's code (WavLM: separate projections, biases
    concatenated, a float mask per sample and head), written out: the same outputs and weights."""
    kwargs = _call_arguments(separate, masks, need_weights)
    expected = F.multi_head_attention_forward(**kwargs)
    got = composite_attention_call((), kwargs)
    with ExplicitAttentionCalls():
        moded = F.multi_head_attention_forward(**kwargs)
    for result in (got, moded):
        torch.testing.assert_close(result[0], expected[0], rtol=1e-13, atol=1e-13)
        if need_weights:
            torch.testing.assert_close(result[1], expected[1], rtol=1e-13, atol=1e-13)
        else:
            assert result[1] is None and expected[1] is None
    positional = list(kwargs.values())[:14]  # the same call with its leading arguments by position
    rest = {k: v for k, v in list(kwargs.items())[14:]}
    torch.testing.assert_close(composite_attention_call(tuple(positional), rest)[0], expected[0])


@pytest.mark.parametrize(
    "change", [{"bias_k": "k"}, {"add_zero_attn": True}, {"training": True}, {"static_k": "k"}]
)
def test_a_call_it_does_not_write_out_runs_the_original(change):
    kwargs = _call_arguments(True, "none", False)
    extra = dict(change)
    for key, value in extra.items():
        if value == "k":
            extra[key] = torch.randn(1, 1, E, dtype=F64) if key == "bias_k" else torch.randn(B * H, L, E // H)
    if "bias_k" in extra:
        extra["bias_v"] = torch.randn(1, 1, E, dtype=F64)
    kwargs.update(extra)
    assert composite_attention_call((), kwargs) is None


class FunctionalAttention(nn.Module):
    """WavLM's attention in miniature: three projections and an output projection as Linear layers, handed to
    ``F.multi_head_attention_forward`` with ``use_separate_proj_weight=True`` and the biases concatenated,
    and WavLM's gated position bias as the float mask: a relative-position embedding looked up on a constant
    grid of buckets (a function of its weight alone), repeated per sample to ``(N H, L, L)`` and multiplied by
    a gate computed from the hidden states."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(E, E), nn.Linear(E, E), nn.Linear(E, E)
        self.out_proj = nn.Linear(E, E)
        self.gate = nn.Linear(E, H)
        self.rel_attn_embed = nn.Embedding(2 * L - 1, H)
        self.register_buffer("buckets", torch.arange(L)[None, :] - torch.arange(L)[:, None] + L - 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, L, E)
        n = h.shape[0]
        position_bias = self.rel_attn_embed(self.buckets).permute([2, 0, 1])  # (H, L, L)
        position_bias = position_bias.unsqueeze(0).repeat(n, 1, 1, 1).view(n * H, L, L)
        gate = torch.sigmoid(self.gate(h)).transpose(1, 2).reshape(n * H, L, 1)
        mask = gate * position_bias
        x = h.transpose(0, 1)
        out, _ = F.multi_head_attention_forward(
            x, x, x, E, H, torch.empty([0]),
            torch.cat((self.q_proj.bias, self.k_proj.bias, self.v_proj.bias)),
            None, None, False, 0.0, self.out_proj.weight, self.out_proj.bias, self.training,
            None, need_weights=True, attn_mask=mask, use_separate_proj_weight=True,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight,
        )  # fmt: skip
        return out.transpose(0, 1)


class FunctionalAttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, E)
        self.attention = FunctionalAttention()
        self.head = nn.Linear(L * E, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, 3) -> (N, 4)
        h = torch.tanh(self.embed(x))
        return self.head(torch.tanh(h + self.attention(h)).flatten(1))


@pytest.mark.parametrize("method", ["gauss_newton", "hessian_sketch"])
def test_a_models_own_attention_call_takes_the_per_layer_path(method):
    """Before the call was written out, its projections' weights were used by one opaque op, and the position
    embedding by a product with the data that no rule read (its function repeated per sample): every
    estimator took one backward pass per sample and column, and ``auto`` measured the Gauss-Newton diagonal.
    Now no fallback (the embedding included): the exact Gauss-Newton diagonal (projections' weights and their
    concatenated biases) equals the float64 brute force, and ``auto``'s sketched Hessian is unbiased for the
    brute-force Hessian."""
    import warnings

    from expectation import assert_unbiased_traces
    from zoo_oracle import brute_force_ggn_diagonal

    from lightning_flatness.functional import hessian_diagonal_groups
    from lightning_flatness.functional.estimators.method_choice import choose_method
    from lightning_flatness.functional.parameters import select_parameters

    torch.manual_seed(0)
    model = FunctionalAttentionNet().to(F64).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, L, 3, generator=g, dtype=F64), torch.randint(0, 4, (5,), generator=g)
    names = list(select_parameters(model, "all"))
    expected = {"attention.k_proj.weight", "attention.k_proj.bias", "attention.rel_attn_embed.weight"}
    assert expected <= set(names)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the per-sample fallback warns
        if method == "gauss_newton":
            est = hessian_diagonal_groups(model, F.cross_entropy, x, y, method=method, parameters=names)
            truth = brute_force_ggn_diagonal(model, F.cross_entropy, x, y, names)
            # one scale: the key bias has no curvature (softmax ignores a shift of a query's scores)
            scale = max(float(truth[n].abs().max()) for n in names)
            assert float(truth["attention.v_proj.bias"].abs().max()) > 1e-3 * scale
            for n in names:
                assert float((est.groups[n][0] - truth[n]).abs().max()) <= 1e-10 * scale, n
        else:
            assert choose_method(model, F.cross_entropy, x, y).method == "hessian_sketch"
            assert_unbiased_traces(model, F.cross_entropy, x, y, names)
