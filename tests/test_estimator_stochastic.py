"""Stochastic Hessian-diagonal estimators: Hutchinson (exact HVPs) and finite differences (eq. 61).

The reference is a brute-force Hessian from ``torch.autograd.functional.hessian`` (plain reverse
mode, row by row; independent of the ``torch.func`` machinery the estimators use), in float64 on
tiny networks. Statistical checks use fixed seeds and thresholds a few standard errors wide.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from oracles import brute_force_hessian, flat
from torch import Tensor, nn

from lightning_flatness.functional.estimators.finite_difference import (
    finite_difference_hessian_diagonal,
    finite_difference_steps,
)
from lightning_flatness.functional.estimators.hutchinson import hutchinson_hessian_diagonal
from lightning_flatness.functional.parameters import select_parameters

torch.set_num_threads(1)

ESTIMATORS = {
    "hutchinson": hutchinson_hessian_diagonal,
    "finite_difference": finite_difference_hessian_diagonal,
}


# --------------------------------------------------------------------------- reference and models
def mlp(activation: type[nn.Module], seed: int = 0, width: int = 12) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, width), activation(), nn.Linear(width, width), activation(), nn.Linear(width, 3)
    ).double()


def data(seed: int = 1, n: int = 32) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


class Problem:
    """A model, a batch, its selected weights and the exact Hessian in them."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, loss_fn=F.cross_entropy):
        self.model, self.x, self.y, self.loss_fn = model, x, y, loss_fn
        self.params = select_parameters(model)
        self.names = list(self.params)
        self.hessian = brute_force_hessian(model, loss_fn, x, y, self.names)
        self.diag = self.hessian.diagonal()

    def estimate(self, method: str, num_probes: int, seed: int, **kw) -> Tensor:
        fn = ESTIMATORS[method]
        g = torch.Generator().manual_seed(seed)
        return flat(
            fn(
                self.model,
                self.loss_fn,
                self.x,
                self.y,
                self.params,
                num_probes=num_probes,
                generator=g,
                **kw,
            ),
            self.names,
        )

    def rel_error(self, estimate: Tensor) -> float:
        return float((estimate - self.diag).norm() / self.diag.norm())

    def probe_variance(self, method: str, relative_step: float = 1e-3) -> Tensor:
        """Per-entry variance of one probe (the docstrings' formulas)."""
        H = self.hessian
        off = H.pow(2).sum(1) - H.diagonal().pow(2)
        if method == "hutchinson":  # Rademacher: sum_{j != i} H_ij^2
            return off
        steps = finite_difference_steps(self.params, relative_step)  # Gaussian, per-tensor r
        r = torch.cat([torch.full((self.params[n].numel(),), steps[n], dtype=H.dtype) for n in self.names])
        scaled = (H * r[None, :] / r[:, None]).pow(2)
        return 2 * H.diagonal().pow(2) + scaled.sum(1) - H.diagonal().pow(2)


def z_scores(problem: Problem, method: str, repeats: int, probes_each: int, **kw) -> tuple[Tensor, float]:
    """z-scores of the mean of ``repeats`` independent calls, SE from their spread; and the trace's z."""
    est = torch.stack([problem.estimate(method, probes_each, seed=100 + r, **kw) for r in range(repeats)])
    mean, se = est.mean(0), est.std(0) / math.sqrt(repeats)
    degenerate = se == 0  # e.g. dead ReLU units: every probe gives the exact value 0
    assert torch.allclose(mean[degenerate], problem.diag[degenerate], atol=1e-12)
    z = (mean - problem.diag)[~degenerate] / se[~degenerate]
    traces = est.sum(1)
    z_trace = float((traces.mean() - problem.diag.sum()) / (traces.std() / math.sqrt(repeats)))
    return z, z_trace


@pytest.fixture(scope="module")
def tanh_problem() -> Problem:
    return Problem(mlp(nn.Tanh), *data())


@pytest.fixture(scope="module")
def softplus_problem() -> Problem:
    return Problem(mlp(nn.Softplus, seed=3), *data(seed=4))


@pytest.fixture(scope="module")
def relu_problem() -> Problem:
    return Problem(mlp(nn.ReLU, seed=5), *data(seed=6))


# --------------------------------------------------------------------------- unbiasedness and error
@pytest.mark.parametrize("problem_name", ["tanh_problem", "relu_problem"])
def test_hutchinson_is_unbiased_within_standard_errors(problem_name, request):
    problem = request.getfixturevalue(problem_name)
    z, z_trace = z_scores(problem, "hutchinson", repeats=48, probes_each=16)
    # Unbiased: z ~ N(0, 1) entry by entry (E|z| = 0.80), none beyond 5 SE, the trace within 4.5 SE
    # (v^T H v is skewed, so its t-statistic has a heavier tail than N(0, 1)).
    assert 0.55 < z.abs().mean() < 1.1, z.abs().mean()
    assert z.abs().max() < 5.0, z.abs().max()
    assert abs(z_trace) < 4.5, z_trace


@pytest.mark.parametrize("problem_name", ["tanh_problem", "softplus_problem"])
def test_finite_difference_is_unbiased_on_smooth_networks(problem_name, request):
    problem = request.getfixturevalue(problem_name)
    z, z_trace = z_scores(problem, "finite_difference", repeats=48, probes_each=16)
    assert 0.55 < z.abs().mean() < 1.1, z.abs().mean()
    assert z.abs().max() < 5.0, z.abs().max()
    assert abs(z_trace) < 4.5, z_trace


@pytest.mark.parametrize(
    "method, problem_name",
    [
        ("hutchinson", "tanh_problem"),
        ("hutchinson", "relu_problem"),
        ("finite_difference", "softplus_problem"),
    ],
)
def test_error_shrinks_like_inverse_sqrt_probes_as_the_variance_formula_predicts(
    method, problem_name, request
):
    problem = request.getfixturevalue(problem_name)
    var = problem.probe_variance(method)
    rms_error = {}
    for probes in (64, 1024):
        sq = [problem.rel_error(problem.estimate(method, probes, seed=s)) ** 2 for s in range(4)]
        rms_error[probes] = math.sqrt(sum(sq) / len(sq))
        predicted = math.sqrt(float(var.sum()) / probes) / float(problem.diag.norm())
        assert 0.75 < rms_error[probes] / predicted < 1.3, (probes, rms_error[probes], predicted)
    assert 3.2 < rms_error[64] / rms_error[1024] < 5.0, rms_error  # sqrt(1024 / 64) = 4


def test_finite_difference_is_worse_than_hutchinson_on_relu_networks_because_of_kinks():
    """Measured here (256 probes, mean of 4 seeds): relative L2 error of Hutchinson 0.58, of eq. 61
    at relative_step=1e-3 17.5, of eq. 61 at relative_step=1e-9 0.60.

    Between theta +- r*eps some ReLU units flip, the gradient jumps by O(1) and the difference
    divided by 2r is O(1/r): rare, huge terms. With a step too small to cross any kink (float64)
    the finite difference is back to a Gaussian Hutchinson estimate, proving the excess is the kinks.
    """
    p = Problem(mlp(nn.ReLU, seed=0, width=20), *data(seed=1, n=64))  # 580 weights
    hutch = [p.rel_error(p.estimate("hutchinson", 256, seed=s)) for s in range(4)]
    fd = [p.rel_error(p.estimate("finite_difference", 256, seed=s)) for s in range(4)]
    fd_tiny = [
        p.rel_error(p.estimate("finite_difference", 256, seed=s, relative_step=1e-9)) for s in range(4)
    ]
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    assert mean(fd) > 5 * mean(hutch), (mean(fd), mean(hutch))
    predicted_fd_tiny = math.sqrt(float(p.probe_variance("finite_difference").sum()) / 256) / float(
        p.diag.norm()
    )
    assert 0.75 < mean(fd_tiny) / predicted_fd_tiny < 1.3, (mean(fd_tiny), predicted_fd_tiny)


def test_estimates_restricted_to_selected_tensors_match_the_full_hessian_diagonal(tanh_problem):
    p = tanh_problem
    name = p.names[1]
    offset = p.params[p.names[0]].numel()
    sub = p.diag[offset : offset + p.params[name].numel()]
    for method, fn in ESTIMATORS.items():
        est = fn(
            p.model,
            p.loss_fn,
            p.x,
            p.y,
            {name: p.params[name]},
            num_probes=2048,
            generator=torch.Generator().manual_seed(0),
        )
        assert list(est) == [name]
        # The sub-block's probe variance sums only over the selected tensor; 2048 probes: ~5% error.
        assert float((est[name].reshape(-1) - sub).norm() / sub.norm()) < 0.15, method


# --------------------------------------------------------------------------- contract
@pytest.mark.parametrize("method", list(ESTIMATORS))
def test_same_generator_seed_gives_identical_results_and_leaves_global_rng_alone(method, tanh_problem):
    p = tanh_problem
    state = torch.get_rng_state()
    a = p.estimate(method, 40, seed=7, chunk_size=16)
    b = p.estimate(method, 40, seed=7, chunk_size=16)
    c = p.estimate(method, 40, seed=8, chunk_size=16)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("method", list(ESTIMATORS))
def test_global_rng_drives_the_probes_without_a_generator(method, tanh_problem):
    p = tanh_problem
    fn = ESTIMATORS[method]
    torch.manual_seed(11)
    a = flat(fn(p.model, p.loss_fn, p.x, p.y, p.params, num_probes=8), p.names)
    torch.manual_seed(11)
    b = flat(fn(p.model, p.loss_fn, p.x, p.y, p.params, num_probes=8), p.names)
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", list(ESTIMATORS))
def test_vectorised_and_looped_probes_give_the_same_estimate(method, tanh_problem):
    p = tanh_problem
    a = p.estimate(method, 24, seed=3, chunk_size=10)
    b = p.estimate(method, 24, seed=3, chunk_size=10, vectorize=False)
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("method", list(ESTIMATORS))
def test_model_parameters_buffers_grads_and_mode_are_untouched_under_no_grad(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.Tanh(), nn.Linear(10, 3)).double().train()
    x, y = data()
    model[0].weight.grad = torch.ones_like(model[0].weight)  # one .grad set, the others None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # finite differences fall back to a loop for train-mode BatchNorm
        est = ESTIMATORS[method](
            model,
            F.cross_entropy,
            x,
            y,
            select_parameters(model),
            num_probes=8,
            generator=torch.Generator().manual_seed(0),
        )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. running stats, num_batches_tracked
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert model[3].weight.grad is None and model[0].bias.grad is None
    assert model.training and model[1].training
    assert all(t.isfinite().all() and not t.requires_grad for t in est.values())


@pytest.mark.parametrize("method", list(ESTIMATORS))
def test_train_mode_batchnorm_uses_batch_statistics_and_stays_unbiased(method):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double().train()
    problem = Problem(model, *data(seed=3, n=24))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z, z_trace = z_scores(problem, method, repeats=32, probes_each=16)
    assert 0.55 < z.abs().mean() < 1.1 and z.abs().max() < 5.0 and abs(z_trace) < 4.5, (
        z.abs().mean(),
        z_trace,
    )


def test_result_has_the_parameters_names_shapes_and_dtypes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    x, y = torch.randn(4, 2, 6, 6), torch.randint(0, 5, (4,))
    params = select_parameters(model)
    for fn in ESTIMATORS.values():
        est = fn(
            model, F.cross_entropy, x, y, params, num_probes=4, generator=torch.Generator().manual_seed(0)
        )
        assert list(est) == list(params)
        assert all(est[n].shape == p.shape and est[n].dtype == torch.float32 for n, p in params.items())


def test_invalid_arguments_name_the_fix(tanh_problem):
    p = tanh_problem
    with pytest.raises(ValueError, match="num_probes"):
        hutchinson_hessian_diagonal(p.model, p.loss_fn, p.x, p.y, p.params, num_probes=0)
    with pytest.raises(ValueError, match="relative_step"):
        finite_difference_hessian_diagonal(p.model, p.loss_fn, p.x, p.y, p.params, relative_step=0.0)
    with pytest.raises(ValueError, match="select_parameters"):
        hutchinson_hessian_diagonal(
            p.model, p.loss_fn, p.x, p.y, {"0.weight": torch.zeros(12, 6)}, num_probes=2
        )
    with pytest.raises(ValueError, match="scalar"):
        hutchinson_hessian_diagonal(
            p.model, lambda o, t: F.cross_entropy(o, t, reduction="none"), p.x, p.y, p.params, num_probes=2
        )


def test_finite_difference_step_is_relative_to_the_rms_entry_of_each_tensor():
    w = torch.tensor([[3.0, -4.0], [0.0, 0.0]])  # ||W||_F = 5, numel 4 -> RMS 2.5
    steps = finite_difference_steps({"w": w, "zero": torch.zeros(3, 3)}, relative_step=1e-3)
    assert steps == {"w": pytest.approx(2.5e-3, rel=1e-12), "zero": pytest.approx(1e-3, rel=1e-12)}


# --------------------------------------------------------------------------- fallbacks
class _CubeNoFunctorch(torch.autograd.Function):
    """x**3 as an old-style autograd.Function: twice differentiable, unsupported by torch.func."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 3 * x**2


class _SoftplusOnceDifferentiable(torch.autograd.Function):
    """softplus with a first derivative only (like a fused kernel without double backward)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.softplus(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


class _Apply(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _twin_models(custom_fn, plain_fn) -> tuple[nn.Module, nn.Module]:
    def build(fn):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), _Apply(fn), nn.Linear(8, 3)).double()

    return build(custom_fn), build(plain_fn)


def test_hutchinson_falls_back_to_double_backward_when_vmap_fails_with_the_same_estimate():
    custom, plain = _twin_models(lambda t: _CubeNoFunctorch.apply(t * 0.3), lambda t: (t * 0.3) ** 3)
    x, y = data()
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref = hutchinson_hessian_diagonal(
            plain, F.cross_entropy, x, y, select_parameters(plain), num_probes=20, generator=g(), chunk_size=8
        )
    assert not [w for w in caught if "falling back" in str(w.message)]  # the plain model takes the vmap path
    with pytest.warns(UserWarning, match="falling back to a loop of double-backward"):
        est = hutchinson_hessian_diagonal(
            custom,
            F.cross_entropy,
            x,
            y,
            select_parameters(custom),
            num_probes=20,
            generator=g(),
            chunk_size=8,
        )
    for n in ref:
        assert torch.allclose(est[n], ref[n], rtol=1e-10, atol=1e-13)


def test_finite_difference_works_without_double_backward_and_hutchinson_says_to_use_it():
    custom, plain = _twin_models(_SoftplusOnceDifferentiable.apply, F.softplus)
    x, y = data()
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    ref = finite_difference_hessian_diagonal(
        plain, F.cross_entropy, x, y, select_parameters(plain), num_probes=20, generator=g(), chunk_size=8
    )
    with pytest.warns(UserWarning, match="falling back to a loop of gradient evaluations"):
        est = finite_difference_hessian_diagonal(
            custom,
            F.cross_entropy,
            x,
            y,
            select_parameters(custom),
            num_probes=20,
            generator=g(),
            chunk_size=8,
        )
    for n in ref:
        assert torch.allclose(est[n], ref[n], rtol=1e-9, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="method='finite_difference'"):
            hutchinson_hessian_diagonal(
                custom, F.cross_entropy, x, y, select_parameters(custom), num_probes=4
            )


def test_finite_difference_warns_about_dropout_in_train_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.1), nn.Linear(8, 3)).double().train()
    x, y = data()
    with pytest.warns(UserWarning, match="model.eval"):
        finite_difference_hessian_diagonal(
            model, F.cross_entropy, x, y, select_parameters(model), num_probes=2
        )


# --------------------------------------------------------------------------- public dispatcher
def test_dispatcher_groups_spread_is_consistent_with_their_error(tanh_problem):
    from lightning_flatness.functional.estimators.api import hessian_diagonal, hessian_diagonal_groups

    p = tanh_problem
    x, y = data(seed=9, n=64)
    exact = brute_force_hessian(p.model, p.loss_fn, x, y, p.names).diagonal()
    out = hessian_diagonal_groups(
        p.model,
        p.loss_fn,
        x,
        y,
        method="hutchinson",
        num_probes=512,
        num_groups=4,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.method == "hutchinson" and out.num_probes == 512 and out.group_sizes.tolist() == [16] * 4
    groups = torch.cat([out.groups[n].reshape(4, -1) for n in p.names], 1)
    mean = flat(out.mean(), p.names)
    stderr2 = groups.var(0) / 4  # the groups are independent (disjoint samples and probes)
    # Squared error of the pooled mean vs. the squared standard error the groups report: ratio ~1.
    ratio = float((mean - exact).pow(2).sum() / stderr2.sum())
    assert 0.4 < ratio < 2.5, ratio
    one = hessian_diagonal(
        p.model,
        p.loss_fn,
        x,
        y,
        method="finite_difference",
        num_probes=8,
        generator=torch.Generator().manual_seed(0),
    )
    assert list(one) == p.names
