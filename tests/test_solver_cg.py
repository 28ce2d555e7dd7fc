"""Newton directions by conjugate gradients (``_newton._conjugate_gradients``), the large-problem path.

The path is forced on small problems by lowering ``_newton._CG_FROM`` (the ``m`` from which it is
taken) and checked against the factorised path and against scipy's L-BFGS per strongly connected
component (``tests/test_solvers.py``'s independent reference): heavy tails, isolated and clipped
zeros, dead rows and columns, conv, wide and skinny shapes, estimated diagonals, batched
replicates and the iteration cap. The linear solve itself is checked against a dense float64 solve,
and the fallback to the factorisation when conjugate gradients do not converge.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import lightning_flatness.functional.solvers._newton as newton_module
from benchmarks.solver_stress import stress_cases
from lightning_flatness.functional.solvers import solve_normalized_sharpness, solve_normalized_sharpness_batch
from tests.test_solvers import coefficients_np, reference_infimum

F64 = torch.float64
CASES = stress_cases("small", seed=0)
DENSE = 10**9  # a threshold no test problem reaches: the factorised path


@pytest.fixture
def cg_steps(monkeypatch):
    """Counts the Gram products ``Gs (Gs^T v)`` taken inside conjugate gradients (one per step, one per
    true-residual check)."""
    count = [0]
    original = newton_module._gram_times
    inside = [False]
    cg = newton_module._conjugate_gradients

    def counting_cg(*args, **kwargs):
        inside[0] = True
        try:
            return cg(*args, **kwargs)
        finally:
            inside[0] = False

    def counting_gram(*args, **kwargs):
        count[0] += inside[0]
        return original(*args, **kwargs)

    monkeypatch.setattr(newton_module, "_conjugate_gradients", counting_cg)
    monkeypatch.setattr(newton_module, "_gram_times", counting_gram)
    return count


def _solve(w, h, cg_from, monkeypatch, **kwargs):
    monkeypatch.setattr(newton_module, "_CG_FROM", cg_from)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # certified: no iteration-cap warning
        return solve_normalized_sharpness(w, h, **kwargs)


@pytest.mark.parametrize("name", sorted(set(CASES) - {"depthwise"}))  # (depthwise: m = 1, closed form)
def test_cg_path_matches_factorised_path_and_lbfgs_with_a_certified_gap(name, monkeypatch, cg_steps):
    w, h = CASES[name]
    dense = _solve(w, h, DENSE, monkeypatch)
    assert cg_steps[0] == 0
    sol = _solve(w, h, 2, monkeypatch)
    assert cg_steps[0] > 0  # the path was taken
    assert sol.lower_bound <= sol.value <= sol.lower_bound * (1 + 1e-11)
    # both values certified to 1e-11 of the infimum: each lies within the other's certificate
    assert sol.lower_bound * (1 - 1e-12) <= dense.value <= sol.value * (1 + 1e-11)
    assert dense.lower_bound * (1 - 1e-12) <= sol.value <= dense.value * (1 + 1e-11)
    ref = reference_infimum(*coefficients_np(w, h))
    assert abs(float(sol.value) - ref) <= 1e-9 * ref
    assert (sol.num_components, sol.attained) == (dense.num_components, dense.attained)
    assert torch.equal(sol.row_log_variance.isnan(), dense.row_log_variance.isnan())


def test_cg_path_on_dead_rows_columns_and_clipped_zeros_together(monkeypatch, cg_steps):
    """Several components (a pruned block, dead units, 60% clipped curvature): the path solves each
    component's gauge-grounded system; values against the reference."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(14, 11, generator=g, dtype=F64)
    h = torch.exp(2.0 * torch.randn(14, 11, generator=g, dtype=F64))
    h[torch.rand(14, 11, generator=g) < 0.6] *= -1.0
    h[3] = 0.0  # a dead row
    w[:, 7] = 0.0  # a pruned column
    w[:5, 8:] = 0.0  # and a pruned block
    sol = _solve(w, h, 2, monkeypatch)
    assert cg_steps[0] > 0
    dense = _solve(w, h, DENSE, monkeypatch)
    ref = reference_infimum(*coefficients_np(w, h))
    assert abs(float(sol.value) - ref) <= 1e-9 * ref
    assert abs(float(sol.value - dense.value)) <= 2e-11 * float(dense.value)
    assert sol.value <= sol.lower_bound * (1 + 1e-11)


def test_cg_path_in_batched_replicate_solves(monkeypatch, cg_steps):
    w, h = CASES["clipped_90pct"]
    g = torch.Generator().manual_seed(11)
    noise = torch.randn((4, *h.shape), generator=g, dtype=F64) * h.abs().mean()
    diagonals = torch.cat([h[None], h[None] + 0.3 * noise])
    monkeypatch.setattr(newton_module, "_CG_FROM", 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sols = solve_normalized_sharpness_batch(w, diagonals)
    assert cg_steps[0] > 0
    monkeypatch.setattr(newton_module, "_CG_FROM", DENSE)
    for p, sol in enumerate(sols):
        single = solve_normalized_sharpness(w, diagonals[p])
        assert abs(float(sol.value - single.value)) <= 2e-11 * float(single.value)
        assert sol.lower_bound <= sol.value <= sol.lower_bound * (1 + 1e-11)


def test_cg_path_iteration_cap_keeps_a_valid_certificate_and_warns(monkeypatch):
    """The weakly coupled two-block problem of ``tests/test_solver_stress.py`` needs several Newton
    steps; capped at 2 on the CG path, the value is an upper bound and the bound a lower one."""
    from tests.test_solver_stress import _hard_problem

    w, h = _hard_problem()
    exact = _solve(w, h, DENSE, monkeypatch)
    monkeypatch.setattr(newton_module, "_CG_FROM", 2)
    with pytest.warns(RuntimeWarning, match=r"max_iter=2\)"):
        capped = solve_normalized_sharpness(w, h, max_iter=2)
    assert capped.value >= exact.value * (1 - 1e-12)
    assert capped.lower_bound <= exact.value * (1 + 1e-12)
    full = _solve(w, h, 2, monkeypatch)
    assert abs(float(full.value - exact.value)) <= 2e-11 * float(exact.value)


def _scaled_system(seed: int, num: int = 3, m: int = 12, n: int = 17):
    """``Gs = D_r^{-1/2} G D_c^{-1/2}`` of random heavy-tailed ``G`` (as in ``_direction``); row 0: the
    gauge."""
    g = torch.Generator().manual_seed(seed)
    gamma = torch.exp(2.0 * torch.randn(num, m, n, generator=g, dtype=F64))
    r, c = gamma.sum(2), gamma.sum(1)
    free = torch.ones(num, m, dtype=torch.bool)
    free[:, 0] = False
    gs = gamma * (free * r.rsqrt())[:, :, None] * c.rsqrt()[:, None, :]
    rhs = torch.randn(num, m, generator=g, dtype=F64) * free
    return gs, rhs, free


def _dense_solution(gs, rhs, free):
    k = torch.eye(gs.shape[1], dtype=F64) - gs @ gs.mT
    out = torch.zeros_like(rhs)
    for p in range(gs.shape[0]):
        f = free[p]
        out[p, f] = torch.linalg.solve(k[p][f][:, f], rhs[p, f])
    return out


def test_conjugate_gradients_solve_the_scaled_schur_system_to_float64_accuracy():
    gs, rhs, free = _scaled_system(0)
    polish = torch.tensor([True, True, False])
    z, solved = newton_module._conjugate_gradients(gs, rhs, free, polish)
    assert bool(solved.all())
    exact = _dense_solution(gs, rhs, free)
    scale = exact.abs().amax(dim=1, keepdim=True)
    err = ((z - exact).abs() / scale).amax(dim=1)
    assert bool((err[:2] <= 1e-11).all())  # polished: to _REFINE_TOL in the residual
    residual = (rhs - z + newton_module._gram_times(gs, z)).abs().amax(dim=1) / rhs.abs().amax(dim=1)
    assert float(residual[2]) <= newton_module._CG_FORCING  # unpolished: to the forcing term only
    assert bool((z[~free] == 0).all())


def test_unconverged_conjugate_gradients_fall_back_to_the_factorisation(monkeypatch):
    gs, rhs, free = _scaled_system(1)
    polish = torch.ones(3, dtype=torch.bool)
    monkeypatch.setattr(newton_module, "_MAX_CG", 1)
    z_cg, solved = newton_module._conjugate_gradients(gs, rhs, free, polish)
    assert not bool(solved.any())  # one step cannot reach 1e-13 on this system
    z, accurate = newton_module._solve_scaled(gs, rhs, free, polish, cg_from=2)
    assert bool(accurate.all())
    exact = _dense_solution(gs, rhs, free)
    torch.testing.assert_close(z, exact, rtol=1e-10, atol=1e-10 * float(exact.abs().max()))


def _split_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    from lightning_flatness.functional.solvers.column_split import (
        GroupColumnReduction,
        solve_split_coefficients,
    )
    from tests.test_column_split import problems

    torch.set_num_threads(1)
    newton_module._CG_FROM = 2  # this process's copy of the module: the path on every rank
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    for name, (a, b) in problems().items():
        cols = torch.arange(a.shape[1]).tensor_split(world)[rank]
        comm = GroupColumnReduction()
        sol = solve_split_coefficients(a[:, cols], b[:, cols], comm, shape=(name,))
        if sol is not None:
            results[name] = (float(sol.value), float(sol.lower_bound), sol.row_log_variance, comm.largest)
    torch.save(results, out_file)
    dist.destroy_process_group()


def test_cg_path_with_columns_split_across_processes(tmp_path):
    """Split columns (2 gloo processes): identical on every process, certified, equal to the whole
    factorised solve, and no ``m x m`` all-reduce (conjugate gradients reduce ``m``-vectors)."""
    from forked_ranks import fork_ranks

    from lightning_flatness.functional.solvers import solve_normalized_sharpness_coefficients
    from tests.test_column_split import problems

    records = fork_ranks(tmp_path, 2, _split_worker, (), "column-split CG worker")
    assert set(records[0]) == set(problems()) - {"degenerate"}
    for name, (value, lower, x, largest) in records[0].items():
        a, b = problems()[name]
        assert records[1][name][0] == value and torch.equal(records[1][name][2].nan_to_num(), x.nan_to_num())
        assert lower <= value <= lower * (1 + 1e-11), name
        whole = solve_normalized_sharpness_coefficients(a[None], b[None])[0]  # m < 256: factorised
        assert value == pytest.approx(float(whole.value), rel=3e-11), name
        assert largest <= 2 * a.shape[0] < a.shape[0] ** 2, name  # (row sums of two kinds at once)
