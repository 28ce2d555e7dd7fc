"""The whole Hessian diagonal: ``parameters="all"`` covers biases and normalization scales too, and the
exact method stays exact for them (each enters the network linearly, once)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from oracles import brute_force_ggn_diagonal, brute_force_hessian_diagonal
from torch import nn

from lightning_flatness.functional import (
    hessian_diagonal,
    normalized_softmax_cross_entropy,
    select_parameters,
)


def _net(batchnorm: bool, conv: bool) -> nn.Module:
    torch.manual_seed(0)
    if conv:
        layers = [nn.Conv2d(2, 3, 3, padding=1)] + ([nn.BatchNorm2d(3)] if batchnorm else [])
        layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 4)]
    else:
        layers = [nn.Linear(5, 6)] + ([nn.BatchNorm1d(6)] if batchnorm else []) + [nn.ReLU(), nn.Linear(6, 4)]
    model = nn.Sequential(*layers).double().eval()
    for m in model.modules():  # non-trivial running statistics and affine parameters
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model


@pytest.mark.parametrize("batchnorm", [False, True], ids=["plain", "batchnorm"])
@pytest.mark.parametrize("conv", [False, True], ids=["mlp", "cnn"])
@pytest.mark.parametrize("loss_fn", [F.cross_entropy, normalized_softmax_cross_entropy], ids=["ce", "eq20"])
def test_exact_whole_diagonal_equals_brute_force_for_every_parameter(batchnorm, conv, loss_fn):
    model = _net(batchnorm, conv)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, *((2, 4, 4) if conv else (5,)), generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (12,), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no per-sample path: the batch_norm layer rule keeps the fast one
        diag = hessian_diagonal(model, loss_fn, x, y, method="exact", parameters="all")
    names = [n for n, p in model.named_parameters()]
    assert list(diag) == names  # every parameter, 1-D included
    ref = brute_force_hessian_diagonal(model, loss_fn, x, y, names)
    for name in names:
        atol = 1e-12 * float(ref[name].abs().max())
        torch.testing.assert_close(diag[name], ref[name], rtol=1e-10, atol=atol)


def test_batchnorm_scales_in_training_mode_are_refused_by_the_exact_method():
    model = _net(batchnorm=True, conv=False).train()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 4, (8,))
    with pytest.raises(ValueError, match="batch statistics"):
        hessian_diagonal(model, F.cross_entropy, x, y, method="exact", parameters="all")
    assert "1.weight" in select_parameters(model)  # a normalization scale: in the default selection


class _Normalized(nn.Module):
    """Linear -> normalization -> GELU -> Linear on ``(N, T, C)`` tokens (or ``(N, C, L)`` for group_norm)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.inp, self.out = nn.Linear(3, 6), nn.Linear(6, 4)
        self.norm = {
            "layer_norm": nn.LayerNorm(6),
            "rms_norm": nn.RMSNorm(6),
            "group_norm": nn.GroupNorm(2, 6),
        }[kind]
        for p in self.norm.parameters():
            p.data.normal_()

    def forward(self, x):
        z = self.inp(x)  # (N, T, 6)
        z = self.norm(z.transpose(1, 2)).transpose(1, 2) if self.kind == "group_norm" else self.norm(z)
        return self.out(F.gelu(z)).mean(dim=1)


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm", "group_norm"])
def test_gauss_newton_whole_diagonal_of_normalization_layers_on_the_fast_path(kind):
    torch.manual_seed(0)
    model = _Normalized(kind).double().eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 5, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (10,), generator=g)
    names = [n for n, _ in model.named_parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the per-sample path would warn about its cost
        diag = hessian_diagonal(model, F.cross_entropy, x, y, method="gauss_newton", parameters="all")
    assert list(diag) == names
    ref = brute_force_ggn_diagonal(model, F.cross_entropy, x, y, names)
    for name in names:
        atol = 1e-12 * float(ref[name].abs().max())
        torch.testing.assert_close(diag[name], ref[name], rtol=1e-10, atol=atol)
