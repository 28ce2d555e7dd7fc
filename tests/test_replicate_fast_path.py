"""The metric's replicate solves (Newton from the pooled optimum, pooled factor as CG preconditioner)
against fully converged cold solves, and the structured replicate curvature against explicit means."""

from __future__ import annotations

import math

import pytest
import torch

import lightning_flatness.functional.solvers.normalized as normalized_module
from lightning_flatness.functional.replicate_measures import (
    jackknife_standard_error,
    replicate_curvature,
    replicate_weights,
)
from lightning_flatness.functional.solvers import solve_normalized_sharpness_coefficients

F64 = torch.float64


def _slots(shape, clipped: bool, seed: int, num_slots: int = 8, dead: bool = False):
    """Heavy-tailed (log-normal sigma 2, row and column effects) slot sums and He weights; ``dead``:
    3 rows without curvature and 2 pruned columns (unattained infima, the components drop them)."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape[0], shape[1]
    bshape = (m, n) + (1,) * (len(shape) - 2)
    w = torch.randn(shape, generator=g, dtype=F64) * math.sqrt(2.0 / math.prod(shape[1:]))
    effects = 1.5 * torch.randn(m, 1, generator=g, dtype=F64) + torch.randn(1, n, generator=g, dtype=F64)
    h = torch.exp(effects.view(bshape) + 2.0 * torch.randn(shape, generator=g, dtype=F64))
    if clipped:  # 30% of the entries negative: clipping in every replicate
        h = torch.where(torch.rand(shape, generator=g) < 0.3, -h, h)
    if dead:
        h[:3] = 0.0
        w[:, -2:] = 0.0
    groups = h[None] * (1 + 0.5 * torch.randn((num_slots, *shape), generator=g, dtype=F64))
    counts = torch.full((num_slots,), 16.0, dtype=F64)
    return w, (groups * 16.0).reshape(num_slots, -1), counts


def _converged_values(w, sums, counts):
    """Every problem solved cold and certified to 1e-11 (no warm start, no spread tolerance)."""
    used = list(range(counts.numel()))
    mix = replicate_weights(counts, used)
    a, _ = replicate_curvature(sums, mix, w.shape)
    b = w.square().reshape(a.shape[1], a.shape[2], -1).sum(dim=2)
    sols = solve_normalized_sharpness_coefficients(a, b, rtol=1e-11, warm_start=False)
    return torch.stack([s.value for s in sols])


def _count_certified(monkeypatch) -> list[int]:
    """A list that receives, per call of the preconditioned replicate path, how many problems it certified."""
    certified: list[int] = []
    original = normalized_module.replicate_newton

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        certified.append(int(out[1].sum()))
        return out

    monkeypatch.setattr(normalized_module, "replicate_newton", counting)
    return certified


@pytest.mark.parametrize("clipped,dead", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("shape", [(64, 80), (96, 48, 3, 3)])  # m n >= _PRECONDITIONED_FROM
def test_stderr_and_half_shift_of_the_fast_path_equal_converged_solves(shape, clipped, dead, monkeypatch):
    """The warm-started batch of the solver's API (``warm_start=True``; the metric solves its batches
    cold, ``replicate_measures._solve``): the jackknife and half shift of its values."""
    certified = _count_certified(monkeypatch)
    w, sums, counts = _slots(shape, clipped, seed=3 + len(shape), dead=dead)
    a, _ = replicate_curvature(sums, replicate_weights(counts, list(range(8))), w.shape)
    b = w.square().reshape(a.shape[1], a.shape[2], -1).sum(dim=2)
    warm = torch.stack(
        [s.value for s in solve_normalized_sharpness_coefficients(a, b, rtol=1e-11, warm_start=True)]
    )
    assert certified == [10]  # every replicate certified by the fast path, none by the general solver
    ref = _converged_values(w, sums, counts)
    se = jackknife_standard_error(ref[1:9])
    shift = ref[9:].mean() - ref[0]
    out = {"normalized": warm[0], "normalized_stderr": jackknife_standard_error(warm[1:9])}
    out["normalized_half_shift"] = warm[9:].mean() - warm[0]
    assert float(out["normalized"]) == pytest.approx(float(ref[0]), rel=1e-10)
    # both sides certified to 1e-11 relative: values within 2e-11 of each other, so the standard error
    # within sqrt((R-1)/R) ||e - mean e|| <= sqrt(R-1) 2e-11 max|value| and the shift within 4e-11 max|value|
    top = float(ref.abs().max())
    assert abs(float(out["normalized_stderr"] - se)) <= math.sqrt(7) * 2e-11 * top
    assert abs(float(out["normalized_half_shift"] - shift)) <= 4e-11 * top
    assert float(se) > 1e-4 * top  # a real spread: the checks above are far below it


def test_replicate_curvature_of_a_general_mix_is_the_clipped_kernel_sum_of_its_means():
    g = torch.Generator().manual_seed(2)
    shape = torch.Size((4, 3, 2))
    sums = torch.randn(5, shape.numel(), generator=g, dtype=F64)
    mix = torch.rand(3, 5, generator=g, dtype=F64)  # not constant on its support: the dense path
    a, trace = replicate_curvature(sums, mix, shape)
    means = mix @ sums
    torch.testing.assert_close(a, means.clamp_min(0).view(3, 4, 3, 2).sum(dim=3), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(trace, means.sum(dim=1), rtol=1e-13, atol=1e-13)


def test_replicate_curvature_gives_exact_zeros_where_the_other_slots_are_zero():
    sums = torch.zeros(4, 6, dtype=F64)
    sums[1, :3] = torch.tensor([1e300, -5.0, 3.0], dtype=F64)  # only slot 1 holds these entries
    sums[:, 3:] = torch.tensor([1.0, -1.0, 2.0], dtype=F64)
    counts = torch.ones(4, dtype=F64)
    a, _ = replicate_curvature(sums, replicate_weights(counts, [0, 1, 2, 3]), torch.Size((6, 1)))
    leave_out_1 = 1 + 1  # row 2 of mix: slot 1 left out
    assert torch.equal(a[leave_out_1, :3, 0], torch.zeros(3, dtype=F64))


def test_leave_one_out_means_do_not_cancel_against_a_dominant_slot():
    """A slot far larger than the others (a batch with extreme curvature) must not swamp the means that
    leave it out: formed as the total minus the slot, they lost every other slot's contribution (1 and
    2.17 read 0 here); each mean is its own weighted sum of the slots."""
    sums = torch.tensor([[1e17, 1e17], [3.0, 5.0], [1.0, 7.0], [2.0, 1.0]], dtype=F64)
    mix = replicate_weights(torch.full((4,), 2.0, dtype=F64), [0, 1, 2, 3])
    a, trace = replicate_curvature(sums, mix, torch.Size((1, 2)))
    means = mix @ sums
    leave_out_0 = 1  # row 1 of mix: slot 0 left out
    torch.testing.assert_close(
        a[leave_out_0, 0], torch.tensor([1.0, 13.0 / 6.0], dtype=F64), rtol=1e-15, atol=0
    )
    torch.testing.assert_close(a.reshape(len(mix), -1), means.clamp_min(0), rtol=1e-15, atol=0)
    torch.testing.assert_close(trace[leave_out_0], means[leave_out_0].sum(), rtol=1e-15, atol=0)


def test_series_dual_bound_lies_between_the_taylor_bound_and_the_exact_dual_value():
    """At one Newton step from the pooled optimum of a perturbed problem: Taylor bound (second order,
    _newton) <= fourth-order bound <= AM-GM bound with C summed exactly (log1p) <= inf S."""
    from lightning_flatness.functional.solvers._newton import _dual_bound, _terms
    from lightning_flatness.functional.solvers._replicate_newton import (
        _direction_pcg,
        _pooled_preconditioner,
        _series_dual_bound,
    )

    g = torch.Generator().manual_seed(11)
    m, n = 12, 20
    a0 = torch.exp(2.0 * torch.randn(m, n, generator=g, dtype=F64))
    b = torch.exp(torch.randn(m, n, generator=g, dtype=F64))
    a0, b = a0 / a0.max(), b / b.max()
    pooled = solve_normalized_sharpness_coefficients(a0[None], b, rtol=1e-13)[0]
    x0, y0 = pooled.row_log_variance - 0.5 * math.log(float(b.max() / a0.max())), pooled.col_log_variance
    a = a0[None] * (1 + 0.3 * torch.rand(4, m, n, generator=g, dtype=F64))  # replicates
    free = torch.ones(m, dtype=torch.bool)
    free[0] = False
    x, y = x0.expand(4, m).clone(), y0.expand(4, n).clone()
    ta, tb = _terms(a, b.expand(4, m, n), x, y)
    ra, rb, ca, cb = ta.sum(2), tb.sum(2), ta.sum(1), tb.sum(1)
    val, gx, gy, r, c, gamma = ra.sum(1) + rb.sum(1), ra - rb, ca - cb, ra + rb, ca + cb, ta + tb
    px, py, solved = _direction_pcg(gamma, r, c, gx, gy, free, _pooled_preconditioner(a0, b, free, x0, y0))
    assert bool(solved.all())
    series = _series_dual_bound(ta, tb, gamma, r, c, val, gx, gy, px, py, x, y)
    taylor = _dual_bound(gamma, r, c, val, gx, gy, px, py, x, y)
    s = px[:, :, None] + py[:, None, :]
    cross = (ta * (1 + s) * torch.log1p(s) + tb * (1 - s) * torch.log1p(-s)).sum(dim=(1, 2))
    total = val + (gx * px).sum(1) + (gy * py).sum(1)
    rr = gx + r * px + torch.einsum("pij,pj->pi", gamma, py)
    rc = gy + torch.einsum("pij,pi->pj", gamma, px) + c * py
    exact = torch.exp(torch.log(total) - (cross + (x * rr).sum(1) + (y * rc).sum(1)) / total)
    truth = torch.stack(
        [s.lower_bound for s in solve_normalized_sharpness_coefficients(a, b, rtol=1e-13, warm_start=False)]
    )
    assert bool((taylor > 0).all()) and bool((taylor <= series * (1 + 1e-14)).all())
    assert bool((series <= exact * (1 + 1e-14)).all())
    assert bool((exact <= truth * (1 + 1e-13)).all())
    # and the fourth-order bound is much tighter than the second-order one
    assert bool(((truth - series) < 0.1 * (truth - taylor)).all())


@pytest.mark.slow
def test_bench_compute_ratio_quick_times_the_value_it_reports():
    """The benchmark's compute() reports the sum of the pooled solves it is timed against."""
    from benchmarks import bench_compute_ratio

    rows = bench_compute_ratio.main(["--quick", "--cases", "wrn16_4,wrn16_4_signed"])["rows"]
    assert [r["case"] for r in rows] == ["wrn16_4", "wrn16_4_signed"]
    for r in rows:
        assert r["normalized"] == pytest.approx(r["normalized_of_pooled_solves"], rel=1e-10)
        assert r["normalized_stderr"] > 0 and r["pooled_ms"] > 0 and r["compute_ms"] > 0
        assert r["compute_solved_ms"] > 0 and r["stderr_solved"] > 0
        assert r["stderr_linearized"] == r["normalized_stderr"]


def test_bench_cold_vs_warm_quick_times_every_batch():
    from benchmarks import bench_cold_vs_warm

    rows = bench_cold_vs_warm.main(["--quick", "--cases", "wrn16_4_signed"])["rows"]
    keys = {"pooled", "pooled_and_halves_warm", "pooled_and_halves_cold", "all_warm", "all_cold"}
    assert keys <= set(rows[0]) and all(rows[0][k]["ms"] > 0 for k in keys)


def test_replicates_the_fast_path_leaves_uncertified_are_finished_by_the_general_solver(monkeypatch):
    """With no CG steps allowed nothing is certified by the preconditioned path: every replicate must then
    come from the general solver, with the same values and attained flags as a cold solve."""
    import lightning_flatness.functional.solvers._replicate_newton as replicate_module

    w, sums, counts = _slots((64, 80), clipped=True, seed=9, dead=True)
    a, _ = replicate_curvature(sums, replicate_weights(counts, list(range(8))), w.shape)
    b = w.square().reshape(a.shape[1], a.shape[2], -1).sum(dim=2)
    cold = solve_normalized_sharpness_coefficients(a, b, rtol=1e-11, warm_start=False)
    monkeypatch.setattr(replicate_module, "_MAX_CG", 0)
    warm = solve_normalized_sharpness_coefficients(a, b, rtol=1e-11, warm_start=True)
    assert not any(s.attained for s in cold)  # dead rows and pruned columns: unattained infima
    for s_warm, s_cold in zip(warm, cold):
        assert float(s_warm.value) == pytest.approx(float(s_cold.value), rel=1e-10)
        assert s_warm.attained == s_cold.attained and s_warm.num_components == s_cold.num_components
        assert torch.equal(s_warm.row_log_variance.isnan(), s_cold.row_log_variance.isnan())


@pytest.mark.parametrize("dead", [False, True])
@pytest.mark.parametrize("shape", [(64, 80), (96, 48, 3, 3)])
def test_replicates_that_lose_units_of_one_slot_take_the_fast_path_and_equal_cold_solves(
    shape, dead, monkeypatch
):
    """A row (an output unit) and a column (an input unit) with curvature in one slot only, as a unit
    alive in one batch: the leave-one-out replicate of that slot loses them (its component is a strict
    part of the pooled one; the row is the pooled gauge row, the first one with curvature). Every
    replicate must still be certified by the preconditioned path and equal a cold solve, attained flags
    and the rows and columns left out (NaN) included. ``dead``: the pooled problem has dead rows and
    pruned columns too, so the fast path works on its component's rows and columns only."""
    certified = _count_certified(monkeypatch)
    w, sums, counts = _slots(shape, clipped=True, seed=21, dead=dead)
    row = 3 if dead else 0  # the first row with curvature: the pooled gauge
    view = sums.view(8, *shape)
    view[1:, row] = 0.0  # only in slot 0
    view[:3, :, 5] = 0.0  # column 5 only in slots 3..7 ...
    view[4:, :, 5] = 0.0  # ... i.e. slot 3 alone
    view[3, :, 5] = view[3, :, 5].abs()
    mix = replicate_weights(counts, list(range(8)))
    a, _ = replicate_curvature(sums, mix, w.shape)
    b = w.square().reshape(a.shape[1], a.shape[2], -1).sum(dim=2)
    assert bool((a[1, row] == 0).all()) and bool((a[4, :, 5] == 0).all())  # the parts really lose them
    warm = solve_normalized_sharpness_coefficients(a, b, rtol=1e-11, warm_start=True)
    cold = solve_normalized_sharpness_coefficients(a, b, rtol=1e-11, warm_start=False)
    assert certified == [10]
    for s_warm, s_cold in zip(warm, cold):
        assert float(s_warm.value) == pytest.approx(float(s_cold.value), rel=2e-11)
        assert s_warm.attained == s_cold.attained and s_warm.num_components == s_cold.num_components
        assert torch.equal(s_warm.row_log_variance.isnan(), s_cold.row_log_variance.isnan())
        assert torch.equal(s_warm.col_log_variance.isnan(), s_cold.col_log_variance.isnan())
    assert not warm[1].attained and not warm[4].attained and warm[2].attained == (not dead)
