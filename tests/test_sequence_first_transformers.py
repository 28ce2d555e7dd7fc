"""PyTorch's sequence-first transformer modules (``batch_first=False``, their default) on the per-layer path.

:func:`batch_first_transformers` runs them batch-first between transposes during a measurement. The
outputs equal the original forward's for every module and mask kind; the modules are restored exactly; a
sequence-first encoder classifier takes the per-layer contractions (no per-sample fallback), where its
Gauss-Newton diagonal equals the brute-force one, the Hessian sketch is unbiased for the brute-force
Hessian diagonal and equals, draw by draw, the sketch of the same weights in a batch-first twin, and
``method="auto"`` measures its Hessian.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from oracles import assert_unbiased, flat
from torch import nn
from zoo_oracle import brute_force_ggn_diagonal, brute_force_hessian_diagonal

from lightning_flatness.functional import select_parameters
from lightning_flatness.functional.batch_first_transformers import batch_first_transformers
from lightning_flatness.functional.estimators.exact import gauss_newton_diagonal
from lightning_flatness.functional.estimators.hessian_sketch import hessian_sketch_diagonal
from lightning_flatness.functional.estimators.method_choice import choose_method

F64 = torch.float64
E, H, T, B = 8, 2, 5, 4


def _causal(t: int) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool).triu(1)  # True: not allowed (boolean, like the padding masks)


def _padding(b: int, s: int) -> torch.Tensor:
    mask = torch.zeros(b, s, dtype=torch.bool)
    mask[1, -2:] = True
    mask[3, -1] = True
    return mask


def _modules() -> dict[str, tuple[nn.Module, tuple, dict]]:
    """``{name: (sequence-first module, args, kwargs)}``: every rewritten class, masks of every kind."""
    g = torch.Generator().manual_seed(0)
    src, tgt, memory = (torch.randn(t, B, E, generator=g, dtype=F64) for t in (T, T - 1, T))
    enc_layer = nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, norm_first=True, activation="gelu")
    dec_layer = nn.TransformerDecoderLayer(E, H, 16, dropout=0.0)
    modules = {
        "encoder layer, causal": (enc_layer, (src,), {"src_mask": _causal(T), "is_causal": True}),
        "encoder layer, padding (keyword input)": (
            nn.TransformerEncoderLayer(E, H, 16, dropout=0.0),
            (),
            {"src": src, "src_key_padding_mask": _padding(B, T)},
        ),
        "encoder with final norm": (
            nn.TransformerEncoder(
                nn.TransformerEncoderLayer(E, H, 16, dropout=0.0),
                2,
                nn.LayerNorm(E),
                enable_nested_tensor=False,
            ),
            (src,),
            {"mask": _causal(T), "src_key_padding_mask": _padding(B, T)},
        ),
        "decoder layer, memory padding": (
            dec_layer,
            (tgt, memory),
            {"tgt_mask": _causal(T - 1), "memory_key_padding_mask": _padding(B, T)},
        ),
        "decoder": (
            nn.TransformerDecoder(nn.TransformerDecoderLayer(E, H, 16, dropout=0.0), 2),
            (tgt, memory),
            {},
        ),
        "transformer": (
            nn.Transformer(E, H, 1, 1, 16, dropout=0.0),
            (src, tgt),
            {"tgt_mask": _causal(T - 1), "src_key_padding_mask": _padding(B, T)},
        ),
    }
    for module, _, _ in modules.values():
        module.to(F64).eval()
    return modules


@pytest.mark.parametrize("name", list(_modules()))
def test_equals_the_sequence_first_forward_and_restores_the_module(name):
    module, args, kwargs = _modules()[name]
    with torch.no_grad():
        expected = module(*args, **kwargs)
        flags = [m.batch_first for m in module.modules() if hasattr(m, "batch_first")]
        with batch_first_transformers(module):
            assert "forward" in module.__dict__  # rewritten, and only the outermost module
            assert not any(
                "forward" in m.__dict__
                for m in list(module.modules())[1:]
                if type(m) is not nn.MultiheadAttention
            )
            out = module(*args, **kwargs)
            assert [m.batch_first for m in module.modules() if hasattr(m, "batch_first")] == flags
        assert "forward" not in module.__dict__
        assert [m.batch_first for m in module.modules() if hasattr(m, "batch_first")] == flags
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_leaves_batch_first_modules_unbatched_inputs_and_subclasses_alone():
    batch_first = nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True)

    class Custom(nn.TransformerEncoderLayer):
        pass

    custom = Custom(E, H, 16, dropout=0.0)
    seq_first = nn.TransformerEncoderLayer(E, H, 16, dropout=0.0).to(F64).eval()
    for module in (batch_first, custom):
        with batch_first_transformers(module):
            assert "forward" not in module.__dict__
    x = torch.randn(T, E, dtype=F64)  # unbatched: the original forward, unchanged values
    with torch.no_grad(), batch_first_transformers(seq_first):
        out = seq_first(x)
    with torch.no_grad():
        torch.testing.assert_close(out, seq_first(x), rtol=0, atol=0)


def test_restores_the_flags_when_the_forward_raises():
    layer = nn.TransformerEncoderLayer(E, H, 16, dropout=0.0).eval()
    with batch_first_transformers(layer), pytest.raises((AssertionError, RuntimeError)):
        layer(torch.randn(T, B, E + 1))  # wrong width
    assert not layer.self_attn.batch_first and "forward" not in layer.__dict__


class Classifier(nn.Module):
    """Token embedding, a 2-layer ``nn.TransformerEncoder`` in PyTorch's default sequence-first layout (or
    batch-first), mean over tokens, a linear head: as PyTorch's tutorials write it."""

    def __init__(self, batch_first: bool, vocab: int = 11, classes: int = 3):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(vocab, E)
        layer = nn.TransformerEncoderLayer(E, H, 12, dropout=0.0, activation="gelu", batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(E, classes)

    def forward(self, tokens):  # (N, T)
        h = self.embed(tokens)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.encoder(h)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(dim=1))


def _classifier(n: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    model = Classifier(batch_first=False).to(F64).eval()
    for p in model.parameters():
        p.data.mul_(1.5)
    twin = Classifier(batch_first=True).to(F64).eval()
    twin.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randint(0, 11, (n, T), generator=g), torch.randint(0, 3, (n,), generator=g)
    params = {k: v for k, v in select_parameters(model).items() if v.ndim >= 2}
    return model, twin, x, y, params


def test_a_sequence_first_encoder_takes_the_per_layer_path_with_the_exact_gauss_newton_diagonal():
    model, _, x, y, params = _classifier()
    names = list(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a per-sample fallback warns
        ggn = gauss_newton_diagonal(model, F.cross_entropy, x, y, params).diagonal
    torch.testing.assert_close(
        flat(ggn, names),
        flat(brute_force_ggn_diagonal(model, F.cross_entropy, x, y, names), names),
        rtol=1e-10,
        atol=1e-14,
    )


def test_the_hessian_sketch_is_unbiased_and_equals_the_batch_first_twin_draw_by_draw():
    model, twin, x, y, params = _classifier()
    names = list(params)
    twin_params = {k: v for k, v in select_parameters(twin).items() if k in params}

    def estimate(m, p, seed):
        return flat(
            hessian_sketch_diagonal(
                m, F.cross_entropy, x, y, p, generator=torch.Generator().manual_seed(seed), num_sketches=4
            ),
            names,
        )

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = estimate(model, params, 0)
    torch.testing.assert_close(first, estimate(twin, twin_params, 0), rtol=1e-9, atol=1e-13)
    diag = flat(brute_force_hessian_diagonal(model, F.cross_entropy, x, y, names), names)
    ggn = flat(brute_force_ggn_diagonal(model, F.cross_entropy, x, y, names), names)
    assert float((ggn - diag).norm() / diag.norm()) > 0.05  # the Hessian is not the Gauss-Newton matrix here
    est = torch.stack([first] + [estimate(model, params, seed) for seed in range(1, 40)])
    assert_unbiased(est, diag)


def test_auto_measures_the_hessian_of_a_sequence_first_encoder():
    model, twin, x, y, params = _classifier()
    choice = choose_method(model, F.cross_entropy, x, y)
    assert (choice.method, choice.quantity) == ("hessian_sketch", "hessian")
    assert choose_method(twin, F.cross_entropy, x, y).method == choice.method
