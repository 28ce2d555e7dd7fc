"""``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` in explicit operations during a measurement.

:func:`composite_recurrent` equals the modules' own forward (outputs, final states and gradients) in every
configuration it writes out, and leaves the others to the original; :func:`explicit_recurrent_layers`
restores the modules. A recurrent classifier then takes the per-layer contractions (its recurrent weights
are used once per time step: summed per sample before squaring): its Gauss-Newton diagonal equals the
brute-force one, the Hessian sketch (on request) is unbiased for the brute-force Hessian diagonal, and
``method="auto"`` measures the Gauss-Newton diagonal, naming the weight used at every step.
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
from lightning_flatness.functional.composite_recurrent import (
    composite_recurrent,
    explicit_recurrent_layers,
    writes_out,
)
from lightning_flatness.functional.estimators.exact import gauss_newton_diagonal
from lightning_flatness.functional.estimators.hessian_sketch import hessian_sketch_diagonal
from lightning_flatness.functional.estimators.method_choice import choose_method

F64 = torch.float64
IN, H, T, B = 3, 4, 5, 2

CONFIGS = {
    "lstm": (nn.LSTM, {}),
    "lstm 2 layers bidirectional seq-first": (nn.LSTM, {"num_layers": 2, "bidirectional": True}),
    "lstm no bias, initial state": (nn.LSTM, {"bias": False}),
    "gru": (nn.GRU, {}),
    "gru 2 layers bidirectional, initial state": (nn.GRU, {"num_layers": 2, "bidirectional": True}),
    "rnn tanh": (nn.RNN, {}),
    "rnn relu 2 layers": (nn.RNN, {"nonlinearity": "relu", "num_layers": 2}),
}


def _case(name: str):
    cls, options = CONFIGS[name]
    torch.manual_seed(0)
    batch_first = "seq-first" not in name
    module = cls(IN, H, batch_first=batch_first, **options).to(F64).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn((B, T, IN) if batch_first else (T, B, IN), generator=g, dtype=F64, requires_grad=True)
    hx = None
    if "initial state" in name:
        shape = (module.num_layers * (2 if module.bidirectional else 1), B, H)
        h0 = torch.randn(shape, generator=g, dtype=F64)
        hx = (h0, torch.randn(shape, generator=g, dtype=F64)) if cls is nn.LSTM else h0
    return module, x, hx


def _flat_outputs(out) -> list[torch.Tensor]:
    output, state = out
    return [output, *(state if isinstance(state, tuple) else (state,))]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_equals_the_module_in_values_and_gradients(name):
    module, x, hx = _case(name)
    assert writes_out(module, x)
    expected = _flat_outputs(module(x, hx))
    got = _flat_outputs(composite_recurrent(module, x, hx))
    for e, o in zip(expected, got):
        assert o.shape == e.shape
        torch.testing.assert_close(o, e, rtol=1e-12, atol=1e-12)
    weights = [x, *module.parameters()]
    probe = [torch.randn_like(e) for e in expected]
    grads_expected = torch.autograd.grad(expected, weights, probe)
    grads_got = torch.autograd.grad(got, weights, probe)
    for e, o in zip(grads_expected, grads_got):
        torch.testing.assert_close(o, e, rtol=1e-10, atol=1e-12)


def test_leaves_what_it_does_not_write_out_to_the_original_and_restores_the_modules():
    lstm = nn.LSTM(IN, H, num_layers=2, dropout=0.5)
    x = torch.randn(T, B, IN)
    assert writes_out(lstm.eval(), x)
    assert not writes_out(lstm.train(), x)  # dropout between layers, in training mode
    assert not writes_out(nn.LSTM(IN, H, proj_size=2), x)
    assert not writes_out(nn.GRU(IN, H), torch.randn(T, IN))  # unbatched
    packed = nn.utils.rnn.pack_padded_sequence(x, [T, T - 2])
    assert not writes_out(nn.GRU(IN, H), packed)

    class Custom(nn.LSTM):
        pass

    model = nn.ModuleDict({"gru": nn.GRU(IN, H), "custom": Custom(IN, H)})
    with explicit_recurrent_layers(model):
        assert "forward" in model["gru"].__dict__ and "forward" not in model["custom"].__dict__
        out_packed, _ = model["gru"](packed)  # the original forward: a PackedSequence out
        assert isinstance(out_packed, nn.utils.rnn.PackedSequence)
    assert "forward" not in model["gru"].__dict__


class Classifier(nn.Module):
    """Token embedding -> a recurrent layer -> its last output -> linear head."""

    def __init__(self, cls: type, vocab: int = 7, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, IN)
        self.rnn = cls(IN, H, batch_first=True)
        self.head = nn.Linear(H, classes)

    def forward(self, tokens):
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out[:, -1])


def _classifier(cls: type, n: int = 6):
    torch.manual_seed(0)
    model = Classifier(cls).to(F64).eval()
    for p in model.parameters():
        p.data.mul_(2.0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 7, (n, T), generator=g), torch.randint(0, 3, (n,), generator=g)
    params = {k: v for k, v in select_parameters(model).items() if v.ndim >= 2}
    return model, x, y, params


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_the_gauss_newton_diagonal_takes_the_per_layer_path_and_is_exact(cls):
    model, x, y, params = _classifier(cls)
    names = list(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a per-sample fallback warns
        ggn = gauss_newton_diagonal(model, F.cross_entropy, x, y, params).diagonal
    expected = brute_force_ggn_diagonal(model, F.cross_entropy, x, y, names)
    torch.testing.assert_close(flat(ggn, names), flat(expected, names), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_the_hessian_sketch_is_unbiased_on_request(cls):
    model, x, y, params = _classifier(cls)
    names = list(params)
    diag = flat(brute_force_hessian_diagonal(model, F.cross_entropy, x, y, names), names)
    ggn = flat(brute_force_ggn_diagonal(model, F.cross_entropy, x, y, names), names)
    assert float((ggn - diag).norm() / diag.norm()) > 0.05  # the residual matters here

    def estimate(seed):
        generator = torch.Generator().manual_seed(seed)
        return flat(hessian_sketch_diagonal(model, F.cross_entropy, x, y, params, generator=generator), names)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = torch.stack([estimate(seed) for seed in range(60)])
    assert_unbiased(est, diag)


def test_auto_measures_the_gauss_newton_diagonal_and_names_the_recurrent_weight():
    model, x, y, _ = _classifier(nn.LSTM)
    choice = choose_method(model, F.cross_entropy, x, y)
    assert choice.quantity == "gauss_newton"
    assert "'rnn.weight_hh_l0' is used 5 times" in choice.reason
    assert "'lstm'" not in choice.reason  # no longer one opaque operation
