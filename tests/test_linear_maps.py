"""Fixed linear maps that the exactness recorder reads as piecewise linear: discrete Fourier transforms with
the real part of their output (FNet's token mixing) and strided views with overlapping windows
(Longformer's and LED's sliding-window attention, ``as_strided``). A ReLU network built with them is linear
in each weight, so its Hessian diagonal is the exact Gauss-Newton diagonal; with smooth ops beside them the
sketched Hessian diagonal applies and is unbiased."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from oracles import assert_unbiased, brute_force_hessian, flat, hessian_sketch_draws
from torch import Tensor, nn

from lightning_flatness.functional import hessian_diagonal
from lightning_flatness.functional.estimators.method_choice import choose_method
from lightning_flatness.functional.parameters import select_parameters

F64 = torch.float64


class FourierMixer(nn.Module):
    """Tokens -> Linear -> the real part of a 2-D FFT over (positions, features) -> activation -> Linear,
    averaged over the positions (FNet's block without its normalizations)."""

    def __init__(self, activation=torch.relu):
        super().__init__()
        self.a, self.head, self.activation = nn.Linear(3, 4), nn.Linear(4, 3), activation

    def forward(self, x: Tensor) -> Tensor:  # (N, T, 3)
        mixed = torch.fft.fftn(self.a(x), dim=(1, 2)).real
        return self.head(self.activation(mixed)).mean(dim=1)


class SlidingWindows(nn.Module):
    """Overlapping windows of 3 positions with stride 1 as a strided view of each sample's sequence, as
    Longformer's sliding chunks are, then a Linear over each window and an activation."""

    def __init__(self, activation=torch.relu):
        super().__init__()
        self.a, self.head, self.activation = nn.Linear(2, 3), nn.Linear(9, 3), activation

    def forward(self, x: Tensor) -> Tensor:  # (N, T, 2)
        h = self.a(x).contiguous()  # (N, T, 3)
        n, t, c = h.shape
        windows = h.as_strided((n, t - 2, 3, c), (t * c, c, c, 1)).reshape(n, t - 2, 3 * c)
        return self.head(self.activation(windows)).mean(dim=1)


def _problem(model_cls, activation):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = model_cls(activation).double()
    features = 3 if model_cls is FourierMixer else 2
    x, y = torch.randn(5, 6, features, generator=g, dtype=F64), torch.randint(0, 3, (5,), generator=g)
    names = [k for k, v in select_parameters(model).items() if v.ndim >= 2]
    return model, x, y, names


@pytest.mark.parametrize("model_cls", [FourierMixer, SlidingWindows])
def test_a_relu_network_with_them_is_linear_in_each_weight(model_cls):
    model, x, y, names = _problem(model_cls, torch.relu)
    choice = choose_method(model, F.cross_entropy, x, y)
    assert choice.method == "exact" and choice.quantity == "hessian", choice.reason
    truth = brute_force_hessian(model, F.cross_entropy, x, y, names).diagonal()
    exact = hessian_diagonal(model, F.cross_entropy, x, y, method="exact", parameters=names)
    torch.testing.assert_close(flat(exact, names), truth, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("model_cls", [FourierMixer, SlidingWindows])
def test_with_smooth_ops_the_sketched_hessian_applies_unbiased(model_cls):
    model, x, y, names = _problem(model_cls, F.gelu)
    choice = choose_method(model, F.cross_entropy, x, y)
    assert choice.method == "hessian_sketch" and choice.quantity == "hessian", choice.reason
    truth = brute_force_hessian(model, F.cross_entropy, x, y, names).diagonal()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback to per-sample passes
        draws = hessian_sketch_draws(model, F.cross_entropy, x, y, names)
    assert_unbiased(draws, truth)


def test_fnet_measures_the_hessian():
    """Hugging Face's FNet (its Fourier token mixing, ``fft_fftn(...).real``): the Gauss-Newton diagonal
    before, the sketched Hessian now."""
    transformers = pytest.importorskip("transformers")
    config = transformers.FNetConfig(
        vocab_size=32, hidden_size=8, num_hidden_layers=1, intermediate_size=16, max_position_embeddings=16
    )
    torch.manual_seed(0)
    model = transformers.FNetForSequenceClassification(config).eval()
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    choice = choose_method(model, F.cross_entropy, {"input_ids": ids}, torch.tensor([0, 1]))
    assert choice.method == "hessian_sketch", choice.reason


class AcrossSamples(nn.Module):
    """A strided view whose rows straddle two samples (sample ``i`` and ``i + 1``): the samples interact."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(2, 3), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:  # (N, 2)
        h = torch.relu(self.a(x)).contiguous()  # (N, 3)
        n = h.shape[0]
        pairs = h.as_strided((n - 1, 6), (3, 1))  # rows i and i + 1 side by side
        return self.head(torch.cat([pairs, pairs[-1:]]))  # N rows again


def test_a_strided_view_across_samples_is_caught_and_stays_exact():
    """``as_strided`` is not proved to keep the samples apart: the batch-independence probe sees the rows
    that straddle two samples, and the exact method takes per-sample passes, equal to brute force."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = AcrossSamples().double()
    x, y = torch.randn(5, 2, generator=g, dtype=F64), torch.randint(0, 3, (5,), generator=g)
    names = ["a.weight", "head.weight"]
    truth = brute_force_hessian(model, F.cross_entropy, x, y, names).diagonal()
    with pytest.warns(UserWarning, match="samples interact|per-layer contractions do not apply"):
        exact = hessian_diagonal(model, F.cross_entropy, x, y, method="exact", parameters=names)
    torch.testing.assert_close(flat(exact, names), truth, rtol=1e-10, atol=1e-14)
