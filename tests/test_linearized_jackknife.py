"""The infinitesimal jackknife of eq. 17 (``jackknife="linearized"``, the metric's default): each
leave-one-out value is the replicate's objective at the pooled minimiser. Checked against the direct
formula, the slope of independently solved minima (Danskin's theorem), fully solved replicates, and
the fallbacks where the first order does not hold."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_flatness.functional import replicate_measures
from lightning_flatness.functional.replicate_measures import (
    jackknife_standard_error,
    replicate_curvature,
    replicate_sharpness_measures,
    replicate_weights,
    tensor_measures,
)
from lightning_flatness.functional.solvers import solve_normalized_sharpness_coefficients
from lightning_flatness.functional.solvers.linearized_replicates import (
    linearizable,
    objective_at_minimiser,
)

F64 = torch.float64


def _problem(m: int, n: int, seed: int, dead_row: bool = False):
    """Heavy-tailed ``A`` (log-normal sigma 1.5) and ``B`` of one ``(m, n)`` tensor; ``dead_row``: row 0
    without curvature (its ``B`` terms are driven to 0: an unattained infimum)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.exp(1.5 * torch.randn(m, n, generator=g, dtype=F64))
    b = torch.exp(torch.randn(m, n, generator=g, dtype=F64))
    if dead_row:
        a[0] = 0.0
    return a, b, g


def _dense(keep, shape):
    """``linearizable``'s component entries as a ``(P, m, n)`` mask."""
    if keep is None:
        return torch.ones(shape, dtype=torch.bool)
    if isinstance(keep, tuple):
        return keep[0][:, :, None] & keep[1][:, None, :]
    return keep


def _minimum(a: torch.Tensor, b: torch.Tensor):
    return solve_normalized_sharpness_coefficients(a[None], b, rtol=1e-13, warm_start=False)[0]


@pytest.mark.parametrize("dead_row", [False, True])
def test_objective_at_minimiser_is_the_direct_formula_over_the_component(dead_row):
    a0, b, g = _problem(7, 5, 0, dead_row)
    a = a0[None] * torch.exp(0.3 * torch.randn((4, 7, 5), generator=g, dtype=F64))
    if dead_row:
        a[:, 0] = 0.0
    covered, keep = linearizable(a, b, a0)
    assert bool(covered.all())
    assert (keep is not None) == dead_row
    sol = _minimum(a0, b)
    got = objective_at_minimiser(a, b, sol.row_log_variance, sol.col_log_variance, keep)
    rows = slice(1, None) if dead_row else slice(None)  # the dead row's terms are not in the infimum
    s = torch.exp(sol.row_log_variance[rows, None] + sol.col_log_variance[None, :])
    direct = (a[:, rows] * s + b[rows] / s).sum(dim=(1, 2))
    torch.testing.assert_close(got, direct, rtol=1e-12, atol=0)
    # at the pooled coefficients: the pooled minimum
    at_pooled = objective_at_minimiser(
        a0[None],
        b,
        sol.row_log_variance,
        sol.col_log_variance,
        None if keep is None else _dense(keep, a.shape)[:1],
    )
    torch.testing.assert_close(at_pooled[0], sol.value, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dead_row", [False, True])
def test_first_order_slope_is_the_slope_of_independently_solved_minima(dead_row):
    """Danskin's theorem: d/dt V(A0 + t D) at t = 0 is sum D exp(x*_i + y*_j), by central differences of
    minima solved cold to 1e-13."""
    a0, b, g = _problem(9, 6, 1, dead_row)
    d = a0 * torch.randn(9, 6, generator=g, dtype=F64)
    if dead_row:
        d[0] = 0.0
    sol = _minimum(a0, b)
    keep = linearizable(a0[None], b, a0)[1]  # the pooled component (the slope is linear in D)
    at = [
        objective_at_minimiser(c[None], b, sol.row_log_variance, sol.col_log_variance, keep)
        for c in (a0, a0 + d)
    ]
    slope = at[1] - at[0]
    t = 1e-4
    central = (_minimum(a0 + t * d, b).value - _minimum(a0 - t * d, b).value) / (2 * t)
    assert float(slope[0]) == pytest.approx(float(central), rel=1e-6)


def test_linearized_values_bound_the_solved_ones_from_above_with_a_second_order_gap():
    a0, b, g = _problem(12, 8, 2)
    d = a0 * 0.5 * torch.randn(12, 8, generator=g, dtype=F64)
    sol = _minimum(a0, b)
    gaps = []
    for t in (0.2, 0.1, 0.05):
        a = (a0 + t * d).clamp_min(0)[None]
        linear = objective_at_minimiser(a, b, sol.row_log_variance, sol.col_log_variance, None)
        solved = _minimum(a[0], b).value
        assert float(linear[0]) >= float(solved) * (
            1 - 1e-12
        )  # an achieved value of the replicate's objective
        gaps.append(float(linear[0] - solved))
    # second order: halving the deviation quarters the gap
    assert gaps[0] / gaps[1] == pytest.approx(4.0, rel=0.15)
    assert gaps[1] / gaps[2] == pytest.approx(4.0, rel=0.15)


def _slot_sums(shape, seed, noise, num_slots=8):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=F64)
    h = torch.exp(torch.randn(shape, generator=g, dtype=F64))
    groups = h[None] * (1 + noise * torch.randn((num_slots, *shape), generator=g, dtype=F64))
    counts = torch.full((num_slots,), 4.0, dtype=F64)
    return w, (groups * 4.0).reshape(num_slots, -1), counts


def _solved(w, sums, counts):
    """Every mean (pooled, leave-one-out, halves) solved cold and certified to 1e-11."""
    mix = replicate_weights(counts, list(range(counts.numel())))
    a, _ = replicate_curvature(sums, mix, w.shape)
    b = w.square().reshape(a.shape[1], a.shape[2], -1).sum(dim=2)
    return (
        a,
        b,
        torch.stack([s.value for s in solve_normalized_sharpness_coefficients(a, b, warm_start=False)]),
    )


def test_pooled_value_and_halves_are_solved_and_leave_one_out_values_are_first_order():
    w, sums, counts = _slot_sums((10, 6), 3, noise=0.3)
    a, b, solved = _solved(w, sums, counts)
    mix = replicate_weights(counts, list(range(8)))
    got = tensor_measures(w, sums, mix, 0.5)["normalized"]
    torch.testing.assert_close(got[0], solved[0], rtol=1e-10, atol=0)
    torch.testing.assert_close(got[9:], solved[9:], rtol=1e-10, atol=0)  # the halves
    sol = _minimum(a[0], b)
    expected = objective_at_minimiser(a[1:9], b, sol.row_log_variance, sol.col_log_variance, None)
    # the first-order value moves with the minimiser by (A_r - A_0) times its error, which the value's
    # certificate bounds only by its square root: compared to 1e-7
    torch.testing.assert_close(got[1:9], expected, rtol=1e-7, atol=0)
    assert bool((got[1:9] >= solved[1:9] * (1 - 1e-10)).all())
    se_linear, se_solved = jackknife_standard_error(got[1:9]), jackknife_standard_error(solved[1:9])
    assert float(se_linear) == pytest.approx(float(se_solved), rel=0.05)
    assert float(se_linear) > 1e-3 * float(solved[0])  # a real spread


def test_a_replicate_that_loses_a_unit_takes_its_objective_restricted_to_its_component():
    """Row 0 has curvature in slot 5 only: its leave-one-out replicate drops the unit (its component is
    a part of the pooled one). Its first-order value is its objective over its own component at the
    pooled minimiser: an upper bound of its solved minimum, close to it."""
    w, sums, counts = _slot_sums((6, 5), 4, noise=0.2)
    sums.view(8, 6, 5)[:, 0] = 0.0
    sums.view(8, 6, 5)[5, 0] = 3.0
    a, b, solved = _solved(w, sums, counts)
    covered, keep = linearizable(a[1:9], b, a[0])
    assert bool(covered.all())
    mask = _dense(keep, a[1:9].shape)
    assert keep is not None and not bool(mask[5, 0].any()) and bool(mask[4, 0].all())
    got = tensor_measures(w, sums, replicate_weights(counts, list(range(8))), 0.5)["normalized"]
    sol = _minimum(a[0], b)
    s = torch.exp(sol.row_log_variance[1:, None] + sol.col_log_variance[None, :])
    direct = (a[6, 1:] * s + b[1:] / s).sum()  # row 0 (the dropped unit) out
    assert float(got[6]) == pytest.approx(float(direct), rel=1e-7)
    assert float(solved[6]) <= float(got[6]) <= float(solved[6]) * 1.01


def test_a_replicate_where_a_unit_comes_alive_is_solved(monkeypatch):
    """Row 0's curvature sums to a negative pooled value (clipped: dead), but leaving out slot 5, its
    only negative slot, makes it positive: the replicate has a unit the pooled problem lacks, where the
    minimum has infinite slope. That replicate is solved; the others are first order (with the
    tensor-level checks off: a unit dead in one half and alive in the other trips them)."""
    monkeypatch.setattr(replicate_measures, "LINEARIZATION_TOLERANCE", math.inf)
    monkeypatch.setattr(replicate_measures, "LINEARIZATION_MAX_RELATIVE_SPREAD", math.inf)
    w, sums, counts = _slot_sums((6, 5), 7, noise=0.2)
    row = sums.view(8, 6, 5)[:, 0]
    row[:] = 1.0
    row[5] = -20.0
    a, b, solved = _solved(w, sums, counts)
    assert bool((a[0, 0] == 0).all()) and bool((a[6, 0] > 0).all())
    covered, _ = linearizable(a[1:9], b, a[0])
    assert covered.tolist() == [True] * 5 + [False] + [True] * 2
    got = tensor_measures(w, sums, replicate_weights(counts, list(range(8))), 0.5)["normalized"]
    torch.testing.assert_close(got[6], solved[6], rtol=1e-10, atol=0)
    assert not math.isclose(float(got[1]), float(solved[1]), rel_tol=1e-10)


def test_strongly_nonlinear_tensors_fall_back_to_solved_replicates():
    """Noise as large as the curvature: the half shift says the first order is off (|shift| > 0.05 (R-1)
    s.e.), so every leave-one-out value is solved and the standard error is the solved jackknife's."""
    w, sums, counts = _slot_sums((10, 6), 5, noise=3.0)
    _, _, solved = _solved(w, sums, counts)
    shift = solved[9:].mean() - solved[0]
    assert float(shift.abs()) > 0.05 * 7 * float(jackknife_standard_error(solved[1:9]))
    out, _ = replicate_sharpness_measures({"w": w}, {"w": sums}, counts, 0.5)
    assert float(out["normalized_stderr"]) == pytest.approx(
        float(jackknife_standard_error(solved[1:9])), rel=1e-9
    )


def test_linearized_standard_error_follows_the_solved_one_on_an_exact_mlp_diagonal():
    """Realistic curvature: an MLP on separable data after 200 SGD steps, exact Hessian diagonals of
    eq. 20 in 8 groups of 32 samples."""
    from lightning_flatness.functional import hessian_diagonal_groups, normalized_softmax_cross_entropy

    torch.manual_seed(0)
    x = torch.randn(512, 12, dtype=F64)
    y = (x[:, :4].argmax(dim=1) + (x[:, 4] > 1).long()) % 4
    model = torch.nn.Sequential(
        torch.nn.Linear(12, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 24),
        torch.nn.ReLU(),
        torch.nn.Linear(24, 4),
    ).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(200):
        idx = torch.arange(step * 32, step * 32 + 32) % 512
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    est = hessian_diagonal_groups(
        model, normalized_softmax_cross_entropy, x[:256], y[:256], method="exact", num_groups=8
    )
    weights = {k: p.detach() for k, p in model.named_parameters() if p.ndim >= 2}
    counts = est.group_sizes.to(F64)
    sums = {k: (est.groups[k] * counts.view(-1, 1, 1)).reshape(8, -1) for k in weights}
    outs = {
        mode: replicate_sharpness_measures(weights, sums, counts, 0.5, jackknife=mode)[0]
        for mode in ("linearized", "solved")
    }
    assert outs["linearized"]["normalized"] == outs["solved"]["normalized"]
    assert outs["linearized"]["normalized_half_shift"] == outs["solved"]["normalized_half_shift"]
    for key in ["normalized_stderr", *(f"normalized_stderr/{k}" for k in weights)]:
        assert float(outs["linearized"][key]) == pytest.approx(float(outs["solved"][key]), rel=0.05), key
    assert float(outs["solved"]["normalized_stderr"]) > 0.005 * float(outs["solved"]["normalized"])


def test_unknown_jackknife_mode_is_rejected():
    w, sums, counts = _slot_sums((3, 2), 6, noise=0.1)
    with pytest.raises(ValueError, match="jackknife must be one of"):
        replicate_sharpness_measures({"w": w}, {"w": sums}, counts, 0.5, jackknife="exact")


def test_replicates_far_from_the_pooled_mean_are_solved(monkeypatch):
    """A first-order standard error above 10% of the value (few samples per slot): the tensor's
    leave-one-out values are solved, whatever the half shift says (that check is off here)."""
    monkeypatch.setattr(replicate_measures, "LINEARIZATION_TOLERANCE", math.inf)
    w, sums, counts = _slot_sums((10, 6), 8, noise=0.2)
    sums *= torch.exp(
        1.5 * torch.randn(8, 1, generator=torch.Generator().manual_seed(1), dtype=F64)
    )  # per slot
    _, _, solved = _solved(w, sums, counts)
    mix = replicate_weights(counts, list(range(8)))
    assert float(jackknife_standard_error(solved[1:9])) > 0.1 * float(solved[0])
    got = tensor_measures(w, sums, mix, 0.5)["normalized"]
    torch.testing.assert_close(got, solved, rtol=1e-10, atol=0)
    monkeypatch.setattr(replicate_measures, "LINEARIZATION_MAX_RELATIVE_SPREAD", math.inf)
    first_order = tensor_measures(w, sums, mix, 0.5)["normalized"]
    assert bool((first_order[1:9] > solved[1:9] * (1 + 1e-9)).all())  # upper bounds, not solved


@pytest.mark.parametrize("seed", range(4))
def test_positive_weights_fast_path_equals_the_component_analysis(seed):
    """With every B positive the component is the rows and columns with a positive A: the fast path's
    coverage and entries equal those of the general component analysis (transitive closures), on
    replicates that keep, lose or gain units; and the objective from its row/column factors equals the
    one from the dense mask."""
    from lightning_flatness.functional.solvers.linearized_replicates import (
        _linearizable_components,
        _linearizable_positive_b,
    )

    g = torch.Generator().manual_seed(seed)
    a0 = torch.exp(torch.randn(9, 7, generator=g, dtype=F64))
    a0[0] = 0.0  # a dead row
    a0[:, 6] = 0.0  # a dead column
    b = torch.exp(torch.randn(9, 7, generator=g, dtype=F64))
    a = a0[None] * torch.exp(0.2 * torch.randn((6, 9, 7), generator=g, dtype=F64))
    a[1, 3] = 0.0  # loses a row
    a[2, :, 2] = 0.0  # loses a column
    a[3, 0, 1] = 1.0  # gains the dead row
    a[4, 5, 6] = 1.0  # gains the dead column
    a[5] = 0.0  # loses everything
    fast, fast_keep = _linearizable_positive_b(a, a0)
    general, general_keep = _linearizable_components(a, b, a0)
    assert fast.tolist() == general.tolist() == [True, True, True, False, False, False]
    covered = fast.nonzero().squeeze(1)
    torch.testing.assert_close(_dense(fast_keep, a.shape)[covered], _dense(general_keep, a.shape)[covered])
    sol = _minimum(a0, b)
    x, y = sol.row_log_variance, sol.col_log_variance
    pick = tuple(k[covered] for k in fast_keep)
    from_factors = objective_at_minimiser(a[covered], b, x, y, pick)
    from_mask = objective_at_minimiser(a[covered], b, x, y, _dense(fast_keep, a.shape)[covered])
    torch.testing.assert_close(from_factors, from_mask, rtol=1e-13, atol=0)


def _count_solves(monkeypatch) -> list[int]:
    """The number of problems of every call of the solver by ``replicate_measures`` from here on."""
    batches: list[int] = []
    solve = replicate_measures._solve

    def counted(a, b, shape):
        batches.append(a.shape[0])
        return solve(a, b, shape)

    monkeypatch.setattr(replicate_measures, "_solve", counted)
    return batches


def test_weights_of_one_shape_solved_together_give_each_its_own_values(monkeypatch):
    """``replicate_sharpness_measures`` hands the weights of one shape to the solver together (one batch for
    the pooled means and halves of all of them, one for the leave-one-out means solved), with the values
    each weight gets alone: a quiet tensor (first order), a noisy one (every leave-one-out solved), one
    of another shape and a convolution of the same ``(m, n)`` but another kernel (not batched)."""
    tensors = {
        "quiet": _slot_sums((10, 6), 3, noise=0.3),
        "noisy": _slot_sums((10, 6), 5, noise=3.0),
        "other": _slot_sums((6, 9), 4, noise=0.3),
        "quiet2": _slot_sums((10, 6), 6, noise=0.3),
        "conv": _slot_sums((10, 6, 3), 7, noise=0.3),
    }
    counts = tensors["quiet"][2]
    mix = replicate_weights(counts, list(range(8)))
    alone = {name: tensor_measures(w, sums, mix, 0.5) for name, (w, sums, _) in tensors.items()}
    batches = _count_solves(monkeypatch)
    out, _ = replicate_sharpness_measures(
        {n: t[0] for n, t in tensors.items()}, {n: t[1] for n, t in tensors.items()}, counts, 0.5
    )
    # (10, 6): the 3 tensors' pooled means and halves together, then the noisy one's 8 leave-one-out means
    # (the first order is off there); (6, 9) and the convolution alone
    assert sorted(batches) == sorted([3 + 3 + 3, 8, 3, 3])
    for name, values in alone.items():
        for measure, series in values.items():
            assert float(out[f"{measure}/{name}"]) == pytest.approx(float(series[0]), rel=1e-10), (
                name,
                measure,
            )
        own = jackknife_standard_error(values["normalized"][1:9])
        assert float(out[f"normalized_stderr/{name}"]) == pytest.approx(float(own), rel=1e-8), name


def test_weights_of_one_shape_go_together_within_the_batch_budget(monkeypatch):
    weights = {n: torch.zeros(4, 5, dtype=F64) for n in ("a", "b", "c")}
    weights.update({"bias": torch.zeros(4, dtype=F64), "d": torch.zeros(5, 4, dtype=F64)})
    sums = {n: torch.zeros(8, w.numel(), dtype=F64) for n, w in weights.items()}
    assert replicate_measures._batches_of_one_shape(weights, sums, 11) == [["a", "b", "c"], ["d"]]
    monkeypatch.setattr(replicate_measures, "BATCH_BYTES", 2 * 8 * 11 * 20)  # two (11, 4, 5) float64 at once
    assert replicate_measures._batches_of_one_shape(weights, sums, 11) == [["a", "b"], ["c"], ["d"]]
    # a shape whose pooled means and halves of two weights exceed one call's entries: each alone
    large = {n: torch.zeros(110, 100, dtype=F64) for n in ("e", "f")}  # 2 * 3 * 11,000 > 2^16
    large_sums = {n: torch.zeros(8, 11000, dtype=F64) for n in large}
    assert replicate_measures._batches_of_one_shape(large, large_sums, 11) == [["e"], ["f"]]


def test_weights_of_one_shape_are_solved_together_only_within_the_entries_of_one_call(monkeypatch):
    """Beyond ``SOLVE_TOGETHER_ENTRIES`` coefficients a larger batch is slower than its parts: three quiet
    ``(10, 6)`` weights with room for two in a call go as 2 + 1, with the values of one call for all."""
    tensors = {f"w{k}": _slot_sums((10, 6), 10 + k, noise=0.3) for k in range(3)}
    counts = tensors["w0"][2]
    args = ({n: t[0] for n, t in tensors.items()}, {n: t[1] for n, t in tensors.items()}, counts, 0.5)
    together, _ = replicate_sharpness_measures(*args)
    batches = _count_solves(monkeypatch)
    monkeypatch.setattr(replicate_measures, "SOLVE_TOGETHER_ENTRIES", 2 * 3 * 60)
    out, _ = replicate_sharpness_measures(*args)
    assert batches == [6, 3]
    for key, value in together.items():
        # the first-order spread moves with the pooled minimiser, whose error the certificate bounds only by
        # the value's square root (as above): 1e-7 there
        rel = 1e-7 if "_stderr" in key or "_half_shift" in key else 1e-10
        assert float(out[key]) == pytest.approx(float(value), rel=rel, abs=1e-300), key
