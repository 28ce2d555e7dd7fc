"""The "ggn_hutchinson" Hessian diagonal: exact Gauss-Newton diagonal plus Hutchinson probes of the
residual R = H - GGN. Unbiased, with the residual's (smaller) variance, exact where the GGN identity
holds, and no side effects.

References are brute force in float64 on tiny networks: the full Hessian from
``torch.autograd.functional.hessian`` and the full GGN ``J^T Lambda J`` from the Jacobian of all
logits and the Hessian of the mean loss in all logits (no per-sample assumption).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from oracles import brute_force_ggn, brute_force_hessian, flat
from torch import Tensor, nn

from lightning_flatness.functional import METHODS, hessian_diagonal_groups
from lightning_flatness.functional.estimators import ExactMethodNotApplicable
from lightning_flatness.functional.estimators.exact import exact_hessian_diagonal, gauss_newton_diagonal
from lightning_flatness.functional.estimators.ggn_hutchinson import ggn_hutchinson_hessian_diagonal
from lightning_flatness.functional.estimators.hutchinson import hutchinson_hessian_diagonal
from lightning_flatness.functional.parameters import select_parameters

torch.set_num_threads(1)


# --------------------------------------------------------------------------- reference and models
class Problem:
    """A model, a batch, its selected weights, and brute-force H, GGN and R = H - GGN in them."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, loss_fn=F.cross_entropy):
        self.model, self.x, self.y, self.loss_fn = model, x, y, loss_fn
        self.params = select_parameters(model, "weights")
        self.names = list(self.params)
        self.hessian = brute_force_hessian(model, loss_fn, x, y, self.names)
        self.ggn = brute_force_ggn(model, loss_fn, x, y, self.names)
        self.residual = self.hessian - self.ggn
        self.diag = self.hessian.diagonal()
        sizes = [self.params[n].numel() for n in self.names]
        self.offsets = dict(zip(self.names, torch.tensor([0, *sizes]).cumsum(0).tolist()))
        self.sizes = dict(zip(self.names, sizes))

    def block(self, name: str) -> slice:
        return slice(self.offsets[name], self.offsets[name] + self.sizes[name])

    def estimate(self, num_probes: int, seed: int, fn=ggn_hutchinson_hessian_diagonal, **kw) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        est = fn(
            self.model, self.loss_fn, self.x, self.y, self.params, num_probes=num_probes, generator=g, **kw
        )
        return flat(est, self.names)

    def rel_error(self, estimate: Tensor) -> float:
        return float((estimate - self.diag).norm() / self.diag.norm())

    def probe_variance(self, matrix: Tensor, probed: list[str]) -> Tensor:
        """Per-entry variance of one Rademacher probe restricted to ``probed``: sum_{j != i} M_ij^2."""
        mask = torch.zeros(matrix.shape[0], dtype=torch.bool)
        for name in probed:
            mask[self.block(name)] = True
        m = matrix * mask[:, None] * mask[None, :]
        return m.pow(2).sum(1) - m.diagonal().pow(2)


def mlp(activation: type[nn.Module], seed: int = 0, width: int = 12) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, width), activation(), nn.Linear(width, width), activation(), nn.Linear(width, 3)
    ).double()


def data(seed: int = 1, n: int = 32) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


class TwiceNet(nn.Module):
    """The same Linear layer applied twice: the output is quadratic in its weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.inp = nn.Linear(6, 5)
        self.fc = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(F.relu(self.fc(F.relu(self.fc(F.relu(self.inp(x)))))))


def trained_tanh_problem() -> Problem:
    """A tanh MLP fitted (Adam, 300 steps) to labels of a random teacher: a near-minimum."""
    model = mlp(nn.Tanh, seed=2)
    x, _ = data(seed=3, n=64)
    teacher = torch.randn(6, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = (x @ teacher).argmax(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    return Problem(model, x, y)


@pytest.fixture(scope="module")
def tanh_problem() -> Problem:
    return Problem(mlp(nn.Tanh), *data())


@pytest.fixture(scope="module")
def twice_problem() -> Problem:
    return Problem(TwiceNet().double(), *data(seed=2))


@pytest.fixture(scope="module")
def train_batchnorm_problem() -> Problem:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double().train()
    return Problem(model, *data(seed=3, n=24))


def quiet(fn, *args, **kwargs):
    """Call ``fn`` with the per-sample-path cost warning (weights used twice, coupled samples) silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*per-layer contractions do not apply")
        return fn(*args, **kwargs)


# --------------------------------------------------------------------------- the decomposition
@pytest.mark.parametrize(
    "problem_name, free",
    [
        ("tanh_problem", {"4.weight"}),  # the last layer: only Linear after it
        ("twice_problem", {"inp.weight", "head.weight"}),  # ReLU and Linear downstream of inp; fc used twice
        ("train_batchnorm_problem", {"3.weight"}),  # batch statistics make the output nonlinear in 0.weight
    ],
    ids=["tanh", "weight_used_twice", "train_batchnorm"],
)
def test_gauss_newton_part_is_the_brute_force_ggn_and_the_residual_vanishes_exactly_where_claimed(
    problem_name, free, request
):
    p = request.getfixturevalue(problem_name)
    ggn = quiet(gauss_newton_diagonal, p.model, p.loss_fn, p.x, p.y, p.params)
    est = flat(ggn.diagonal, p.names)
    assert float((est - p.ggn.diagonal()).norm() / p.ggn.diagonal().norm()) < 1e-10
    assert torch.allclose(
        ggn.logits_grad, torch.func.grad(lambda f: p.loss_fn(f, p.y))(p.model(p.x)), rtol=1e-12
    )
    assert ggn.issues and not ggn.loss_issues and not ggn.random_ops
    assert {n for n, why in ggn.tensor_issues.items() if not why} == free
    scale = float(p.diag.abs().max())
    for name in p.names:
        r = p.residual.diagonal()[p.block(name)]
        if name in free:
            assert float(r.abs().max()) < 1e-12 * scale, name  # diag(R) = 0: no probes needed there
        else:
            assert float(r.abs().max()) > 1e-4 * scale, name  # the check is not vacuous


# --------------------------------------------------------------------------- unbiasedness and error
@pytest.mark.parametrize("problem_name", ["tanh_problem", "twice_problem", "train_batchnorm_problem"])
def test_unbiased_within_standard_errors(problem_name, request):
    p = request.getfixturevalue(problem_name)
    repeats = 40
    est = torch.stack([quiet(p.estimate, 16, seed=100 + r) for r in range(repeats)])
    mean, se = est.mean(0), est.std(0) / math.sqrt(repeats)
    noiseless = se == 0  # tensors with diag(R) = 0: exact
    assert torch.allclose(mean[noiseless], p.diag[noiseless], rtol=1e-10, atol=1e-14)
    z = (mean - p.diag)[~noiseless] / se[~noiseless]
    assert 0.55 < z.abs().mean() < 1.1, z.abs().mean()  # E|z| = 0.80 for N(0, 1)
    assert z.abs().max() < 5.0, z.abs().max()
    traces = est.sum(1)
    assert abs(float((traces.mean() - p.diag.sum()) / (traces.std() / math.sqrt(repeats)))) < 4.5


def test_error_shrinks_like_the_residual_variance_formula(tanh_problem):
    """Per-entry variance of one probe: sum_{j != i} R_ij^2 over the probed tensors (module docstring)."""
    p = tanh_problem
    var = p.probe_variance(p.residual, ["0.weight", "2.weight"])
    for probes in (64, 1024):
        sq = [p.rel_error(p.estimate(probes, seed=s)) ** 2 for s in range(4)]
        predicted = math.sqrt(float(var.sum()) / probes) / float(p.diag.norm())
        assert 0.75 < math.sqrt(sum(sq) / len(sq)) / predicted < 1.3, (probes, sq, predicted)


def test_error_is_far_below_plain_hutchinson_at_equal_probes_near_a_minimum():
    """Measured (training loss 4e-4): relative L2 error at 64 probes, mean of 6 seeds, 0.070 against
    Hutchinson's 0.33, a ratio of 4.7 (the variance formulas predict 4.75); at initialisation
    (tanh_problem) 0.36 against 0.78, a ratio of 2.2."""
    p = trained_tanh_problem()
    hutch = [p.rel_error(p.estimate(64, seed=s, fn=hutchinson_hessian_diagonal)) for s in range(6)]
    ggn = [p.rel_error(p.estimate(64, seed=s)) for s in range(6)]
    ratio = sum(hutch) / sum(ggn)
    assert ratio > 3.5, (sum(hutch) / 6, sum(ggn) / 6)
    # and the variance formulas predict it
    predicted = math.sqrt(
        float(p.probe_variance(p.hessian, p.names).sum())
        / float(p.probe_variance(p.residual, ["0.weight", "2.weight"]).sum())
    )
    assert 0.7 < ratio / predicted < 1.4, (ratio, predicted)


def test_relu_network_gives_the_exact_diagonal_with_zero_variance():
    p = Problem(mlp(nn.ReLU, seed=5), *data(seed=6))
    a, b = p.estimate(8, seed=0), p.estimate(8, seed=1)
    exact = flat(exact_hessian_diagonal(p.model, p.loss_fn, p.x, p.y, p.params), p.names)
    assert torch.equal(a, b) and torch.equal(a, exact)
    assert p.rel_error(a) < 1e-12
    # residual products alone would be noisy: diag(R) = 0 but R couples the layers
    assert float(p.residual.diagonal().abs().max()) < 1e-14
    assert float(p.probe_variance(p.residual, p.names).sum().sqrt()) > 0.1 * float(p.diag.norm())


# --------------------------------------------------------------------------- contract
def test_same_generator_seed_gives_identical_results_and_leaves_global_rng_alone(tanh_problem):
    p = tanh_problem
    state = torch.get_rng_state()
    a = p.estimate(40, seed=7, chunk_size=16)
    b = p.estimate(40, seed=7, chunk_size=16)
    c = p.estimate(40, seed=8, chunk_size=16)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    looped = p.estimate(40, seed=7, chunk_size=16, vectorize=False)
    assert torch.allclose(a, looped, rtol=1e-10, atol=1e-14)


def test_model_parameters_buffers_grads_and_mode_are_untouched_under_no_grad():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.Tanh(), nn.Linear(10, 3)).double().train()
    x, y = data()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        est = quiet(
            ggn_hutchinson_hessian_diagonal,
            model,
            F.cross_entropy,
            x,
            y,
            select_parameters(model, "weights"),
            num_probes=8,
            generator=torch.Generator().manual_seed(0),
        )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. running stats
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert model[3].weight.grad is None and model[0].bias.grad is None
    assert model.training and model[1].training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert list(est) == ["0.weight", "3.weight"]
    assert all(t.isfinite().all() and not t.requires_grad and t.dtype == torch.float64 for t in est.values())


def test_float32_model_gives_float32_close_to_float64(tanh_problem):
    p = tanh_problem
    model32 = mlp(nn.Tanh).float()
    est = ggn_hutchinson_hessian_diagonal(
        model32,
        F.cross_entropy,
        p.x.float(),
        p.y,
        select_parameters(model32, "weights"),
        num_probes=16,
        generator=torch.Generator().manual_seed(3),
    )
    assert all(t.dtype == torch.float32 for t in est.values())
    assert float((flat(est, p.names).double() - p.estimate(16, seed=3)).norm() / p.diag.norm()) < 1e-5


def test_invalid_uses_name_the_fix(tanh_problem):
    p = tanh_problem
    with pytest.raises(ValueError, match="method='hutchinson'"):
        ggn_hutchinson_hessian_diagonal(
            p.model, lambda f, t: F.cross_entropy(f, t, reduction="sum"), p.x, p.y, p.params, num_probes=4
        )
    dropout = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Dropout(0.2), nn.Linear(5, 3)).double().train()
    with pytest.raises(ValueError, match=r"'dropout' in module '2'.*model.eval\(\)"):
        ggn_hutchinson_hessian_diagonal(
            dropout, F.cross_entropy, p.x, p.y, select_parameters(dropout, "weights"), num_probes=4
        )
    with pytest.raises(ValueError, match="num_probes"):
        ggn_hutchinson_hessian_diagonal(p.model, p.loss_fn, p.x, p.y, p.params, num_probes=0)


def test_dispatcher_runs_it_per_group_and_the_exact_refusal_points_to_it(tanh_problem):
    p = tanh_problem
    assert "ggn_hutchinson" in METHODS
    out = hessian_diagonal_groups(
        p.model,
        p.loss_fn,
        p.x,
        p.y,
        method="ggn_hutchinson",
        parameters="weights",
        num_probes=256,
        num_groups=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.method == "ggn_hutchinson" and out.num_probes == 256 and out.group_sizes.tolist() == [16, 16]
    g = torch.Generator().manual_seed(0)  # the groups draw their probes in turn from one generator
    for group, part in enumerate((slice(0, 16), slice(16, 32))):
        alone = ggn_hutchinson_hessian_diagonal(
            p.model, p.loss_fn, p.x[part], p.y[part], p.params, num_probes=128, generator=g
        )
        assert all(torch.equal(out.groups[n][group], alone[n]) for n in p.names)
    halves = [Problem(p.model, p.x[part], p.y[part]) for part in (slice(0, 16), slice(16, 32))]
    variance = sum(0.25 * h.probe_variance(h.residual, ["0.weight", "2.weight"]).sum() / 128 for h in halves)
    assert p.rel_error(flat(out.mean(), p.names)) < 3 * math.sqrt(float(variance)) / float(p.diag.norm())
    with pytest.raises(ExactMethodNotApplicable, match="ggn_hutchinson") as info:
        exact_hessian_diagonal(p.model, p.loss_fn, p.x, p.y, p.params)
    assert info.value.gauss_newton_applicable and any("tanh" in issue for issue in info.value.issues)


def test_submodule_registered_under_two_paths_keeps_its_parameters_and_is_estimated():
    """torch.func.functional_call leaves its inputs in such a submodule's slots (pytorch/pytorch#164759)."""
    torch.manual_seed(0)
    shared = nn.Linear(5, 5)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(5, 3)).double()
    before = {id(m): dict(m._parameters) for m in model.modules()}
    p = Problem(model, *data(seed=9, n=16))
    assert p.names == ["0.weight", "2.weight", "5.weight"]  # the shared weight counted once
    est = torch.stack([quiet(p.estimate, 64, seed=s) for s in range(8)])
    for m in model.modules():
        assert all(m._parameters[k] is v for k, v in before[id(m)].items())
    se = est.std(0) / math.sqrt(8)
    z = ((est.mean(0) - p.diag) / se)[se > 0]
    assert z.abs().max() < 5.0 and z.abs().mean() < 1.2, z.abs()
