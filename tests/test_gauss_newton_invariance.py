"""The Gauss-Newton diagonal transforms like the Hessian diagonal under function-preserving rescalings
(``J`` scales like the inverse weight), so normalized sharpness measured by ``auto`` on a network that is
not piecewise linear keeps the invariance the paper proves for the Hessian (Sec. 5.1), while the trace
does not. Here: scaling the weights in front of a LayerNorm, which the LayerNorm undoes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_flatness.measure import measure_sharpness


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 8), nn.LayerNorm(8, eps=1e-300), nn.GELU(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)
    ).double()


@pytest.mark.parametrize("alpha", [0.05, 3.7])
def test_gauss_newton_normalized_sharpness_is_invariant_to_the_scale_a_layernorm_undoes(alpha):
    model = _net()
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled[0].weight.mul_(alpha)
        scaled[0].bias.mul_(alpha)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=g)
    torch.testing.assert_close(scaled(x), model(x), rtol=1e-12, atol=1e-12)  # the same function
    batches = list(zip(x.tensor_split(4), y.tensor_split(4)))
    before = measure_sharpness(model, batches, num_replicates=4)
    after = measure_sharpness(scaled, batches, num_replicates=4)
    assert before.choice.method == "gauss_newton" and before.choice.quantity == "gauss_newton"
    for key in ("normalized", "normalized/0.weight", "normalized/3.weight", "normalized_stderr"):
        assert float(after[key]) == pytest.approx(float(before[key]), rel=1e-8), key
    # the trace of the rescaled layer is not invariant: it scales like 1 / alpha^2
    ratio = float(after["hessian_trace/0.weight"]) / float(before["hessian_trace/0.weight"])
    assert ratio == pytest.approx(alpha**-2, rel=1e-8)
