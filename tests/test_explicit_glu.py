"""``F.glu`` (the convolution module of Conformers: wav2vec 2.0's Conformer, Wav2Vec2-BERT) written out as a
product with a sigmoid for the sketched Hessian diagonal. The explicit form is the kernel's function (values,
gradients, a Hessian-vector product); a Conformer convolution module then gets ``auto``'s Hessian sketch on
the per-layer path, unbiased for the brute-force Hessian diagonal (it measured the Gauss-Newton diagonal: no
node rule covered ``glu``)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from oracles import assert_unbiased, brute_force_hessian, hessian_sketch_draws
from torch import nn
from zoo_oracle import brute_force_ggn_diagonal

from lightning_flatness.functional.estimators.method_choice import choose_method
from lightning_flatness.functional.explicit_glu import ExplicitGlu, explicit_glu

F64 = torch.float64


@pytest.mark.parametrize("dim", [-1, 1, 0])
def test_equals_the_kernel_with_its_derivatives(dim):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 8, generator=g, dtype=F64, requires_grad=True)
    u = torch.randn_like(F.glu(x, dim))
    torch.testing.assert_close(explicit_glu(x, dim), F.glu(x, dim), rtol=1e-15, atol=1e-15)
    with ExplicitGlu():
        torch.testing.assert_close(F.glu(x, dim), F.glu(x.detach(), dim), rtol=1e-15, atol=1e-15)
        torch.testing.assert_close(nn.GLU(dim)(x), F.glu(x.detach(), dim), rtol=1e-15, atol=1e-15)

    def loss(glu):
        return lambda z: (torch.tanh(glu(z, dim)) * u).sum()

    v = torch.randn_like(x)
    for got, want in zip(
        torch.autograd.functional.hvp(loss(explicit_glu), x.detach(), v),
        torch.autograd.functional.hvp(loss(F.glu), x.detach(), v),
    ):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_an_odd_size_raises_as_the_kernel_does():
    x = torch.randn(2, 5)
    with pytest.raises(RuntimeError, match="Halving dimension must be even"):
        F.glu(x)
    with pytest.raises(RuntimeError, match="Halving dimension must be even"):
        explicit_glu(x)


class ConformerConvolution(nn.Module):
    """A Conformer's convolution module, small: LayerNorm, pointwise convolution to twice the width, GLU over
    the channels, depthwise convolution, SiLU, pointwise convolution, residual; then a mean-pooled head."""

    def __init__(self, width: int = 4, kernel: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.pointwise_in = nn.Conv1d(width, 2 * width, 1)
        self.glu = nn.GLU(dim=1)
        self.depthwise = nn.Conv1d(width, width, kernel, padding=kernel // 2, groups=width)
        self.pointwise_out = nn.Conv1d(width, width, 1)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, width) -> (N, classes)
        h = self.norm(x).transpose(1, 2)
        h = self.pointwise_out(F.silu(self.depthwise(self.glu(self.pointwise_in(h)))))
        return self.head((x + h.transpose(1, 2)).mean(dim=1))


def test_a_conformer_convolution_module_takes_the_hessian_sketch_unbiased():
    torch.manual_seed(0)
    model = ConformerConvolution().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 6, 4, generator=g, dtype=F64), torch.randint(0, 3, (5,), generator=g)
    choice = choose_method(model, F.cross_entropy, x, y)
    assert (choice.method, choice.quantity) == ("hessian_sketch", "hessian"), choice.reason
    names = ["pointwise_in.weight", "depthwise.weight", "pointwise_out.weight", "head.weight"]
    truth = brute_force_hessian(model, F.cross_entropy, x, y, names).diagonal().detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback to per-sample passes warns
        draws = hessian_sketch_draws(model, F.cross_entropy, x, y, names)
    assert_unbiased(draws, truth)
    ggn = brute_force_ggn_diagonal(model, F.cross_entropy, x, y, names)
    gauss_newton = torch.cat([ggn[n].detach().flatten() for n in names])
    assert float((gauss_newton - truth).norm() / truth.norm()) > 0.05  # the Gauss-Newton diagonal is not it
