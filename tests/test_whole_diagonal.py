"""The whole Hessian diagonal: ``parameters="all"`` covers biases and normalization scales too, and the
exact method stays exact for them (each enters the network linearly, once)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from oracles import brute_force_hessian_diagonal
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
        warnings.simplefilter("ignore")  # the per-sample path for normalization scales is announced
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
    assert "1.weight" not in select_parameters(model)  # 1-D: not in the default selection
