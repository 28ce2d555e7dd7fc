"""Normalized-softmax-cross-entropy (eq. 20-22): value, invariances, degenerate rows."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_flatness.functional.losses import normalize_logits, normalized_softmax_cross_entropy


def _reference_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 20-22 written out literally: f' = f / std(f) (population std), then -log softmax."""
    std = logits.var(dim=1, unbiased=False, keepdim=True).sqrt()
    scaled = logits / std
    log_prob = scaled - torch.logsumexp(scaled, dim=1, keepdim=True)
    return -log_prob.gather(1, target[:, None]).mean()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 7, generator=g, dtype=torch.float64) * 3, torch.randint(0, 7, (32,), generator=g)


def test_matches_literal_equations_20_to_22(batch):
    logits, target = batch
    torch.testing.assert_close(
        normalized_softmax_cross_entropy(logits, target), _reference_loss(logits, target), rtol=1e-13, atol=0
    )


@pytest.mark.parametrize("scale", [1e-3, 0.5, 7.0, 1e4])
@pytest.mark.parametrize("shift", [-100.0, 0.0, 3.5])
def test_invariant_to_positive_scaling_and_shifting_of_logits(batch, scale, shift):
    logits, target = batch
    ref = normalized_softmax_cross_entropy(logits, target)
    torch.testing.assert_close(
        normalized_softmax_cross_entropy(scale * logits + shift, target), ref, rtol=1e-10, atol=0
    )


def test_per_sample_scaling_and_shifting_also_leave_loss_unchanged(batch):
    logits, target = batch
    g = torch.Generator().manual_seed(1)
    a = torch.rand(32, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    b = torch.randn(32, 1, generator=g, dtype=torch.float64) * 10
    torch.testing.assert_close(
        normalized_softmax_cross_entropy(a * logits + b, target),
        normalized_softmax_cross_entropy(logits, target),
        rtol=1e-10,
        atol=0,
    )


def test_cross_entropy_is_not_scale_invariant(batch):
    """The reason eq. 20 exists (Sec. 5.4): plain cross-entropy changes with the logit scale."""
    logits, target = batch
    assert abs(float(F.cross_entropy(2 * logits, target) - F.cross_entropy(logits, target))) > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equal_logits_give_log_k_and_finite_gradients(dtype):
    logits = torch.full((3, 5), 0.1, dtype=dtype, requires_grad=True)
    target = torch.tensor([0, 2, 4])
    loss = normalized_softmax_cross_entropy(logits, target)
    assert math.isclose(loss.item(), math.log(5), rel_tol=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(grad).all()


def test_normalized_logits_have_zero_mean_unit_variance(batch):
    z = normalize_logits(batch[0])
    torch.testing.assert_close(z.mean(1), torch.zeros(32, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        z.var(1, unbiased=False), torch.ones(32, dtype=torch.float64), atol=1e-12, rtol=0
    )


def test_hessian_in_logits_matches_finite_differences_of_gradient():
    """Second derivatives (what the sharpness estimators use) are right, not just values."""
    g = torch.Generator().manual_seed(3)
    f = torch.randn(4, generator=g, dtype=torch.float64)
    y = torch.tensor([1])
    hess = torch.func.hessian(lambda v: normalized_softmax_cross_entropy(v[None], y))(f)
    grad = torch.func.grad(lambda v: normalized_softmax_cross_entropy(v[None], y))
    eps = 1e-6
    fd = torch.stack(
        [(grad(f + eps * e) - grad(f - eps * e)) / (2 * eps) for e in torch.eye(4, dtype=torch.float64)]
    )
    torch.testing.assert_close(hess, fd, rtol=1e-6, atol=1e-8)


def test_rejects_wrong_logit_shape():
    with pytest.raises(ValueError, match="shape \\(N, K\\)"):
        normalized_softmax_cross_entropy(torch.randn(5), torch.tensor([0]))
