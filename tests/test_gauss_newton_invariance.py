"""The Gauss-Newton diagonal transforms like the Hessian diagonal under function-preserving rescalings
(``J`` scales like the inverse weight), and so does the sketched Hessian diagonal, draw by draw, so
normalized sharpness measured on a network that is not piecewise linear keeps the invariance the paper
proves for the Hessian (Sec. 5.1), while the trace does not. Here: scaling the weights in front of a
LayerNorm, which the LayerNorm undoes."""

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


@pytest.mark.parametrize("method", ["gauss_newton", "auto"])
@pytest.mark.parametrize("alpha", [0.05, 3.7])
def test_normalized_sharpness_is_invariant_to_the_scale_a_layernorm_undoes(alpha, method):
    """Both the Gauss-Newton diagonal and ``auto``'s sketched Hessian diagonal (with the same random
    signs: every column it sends into the rescaled layer scales like the inverse weight)."""
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
    before, after = (
        measure_sharpness(
            net, batches, num_replicates=4, method=method, generator=torch.Generator().manual_seed(2)
        )
        for net in (model, scaled)
    )
    expected = ("gauss_newton", "gauss_newton") if method == "gauss_newton" else ("hessian_sketch", "hessian")
    assert (before.choice.method, before.choice.quantity) == expected
    for key in ("normalized", "normalized/0.weight", "normalized/3.weight", "normalized_stderr"):
        assert float(after[key]) == pytest.approx(float(before[key]), rel=1e-8), key
    # the trace of the rescaled layer is not invariant: it scales like 1 / alpha^2
    ratio = float(after["hessian_trace/0.weight"]) / float(before["hessian_trace/0.weight"])
    assert ratio == pytest.approx(alpha**-2, rel=1e-8)
