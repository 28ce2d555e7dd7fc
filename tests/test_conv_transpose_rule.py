"""The transposed-convolution layer rule (``layer_rules/conv_transpose.py``) against the brute-force Hessian:
every geometry, both losses, and no fall-back to per-sample backward passes."""

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

GEOMETRIES = {
    "1d": dict(nd=1, cin=3, cout=4, kernel=3),
    "2d stride 2": dict(nd=2, cin=3, cout=4, kernel=3, stride=2),
    "2d padding, output padding": dict(nd=2, cin=2, cout=3, kernel=3, stride=2, padding=1, output_padding=1),
    "2d dilation": dict(nd=2, cin=2, cout=3, kernel=2, dilation=2),
    "2d groups": dict(nd=2, cin=4, cout=6, kernel=2, stride=2, groups=2),
    "2d rectangular kernel, no bias": dict(nd=2, cin=2, cout=3, kernel=(2, 3), stride=(1, 2), bias=False),
    "3d": dict(nd=3, cin=2, cout=2, kernel=2, stride=2),
}


class Decoder(nn.Module):
    """A convolution, a ReLU, the transposed convolution under test, a ReLU and a linear head."""

    def __init__(self, nd: int, cin: int, cout: int, kernel, size: int, **options) -> None:
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1]
        transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[nd - 1]
        self.conv = conv(2, cin, 1)
        self.up = transposed(cin, cout, kernel, **options)
        with torch.no_grad():
            out = self.up(self.conv(torch.zeros(1, 2, *(size,) * nd)))
        self.head = nn.Linear(out.numel(), 3)

    def forward(self, x):
        return self.head(torch.relu(self.up(torch.relu(self.conv(x)))).flatten(1))


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("loss_fn", [F.cross_entropy, normalized_softmax_cross_entropy], ids=["ce", "eq20"])
def test_the_exact_diagonal_of_a_transposed_convolution_equals_the_brute_force_hessian(geometry, loss_fn):
    torch.manual_seed(0)
    options = dict(GEOMETRIES[geometry])
    nd, size = options["nd"], 3 if options["nd"] == 3 else 4
    net = Decoder(size=size, **options).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, *(size,) * nd, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    names = [n for n in select_parameters(net) if n.startswith("up.")]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fall-back to per-sample backward passes
        ours = hessian_diagonal(net, loss_fn, x, y, method="exact", parameters=names)
    truth = brute_force_hessian_diagonal(net, loss_fn, x, y, names)
    for name in names:
        assert ours[name].shape == truth[name].shape
        torch.testing.assert_close(ours[name], truth[name], rtol=1e-10, atol=1e-14)
    assert float(truth["up.weight"].abs().sum()) > 0
