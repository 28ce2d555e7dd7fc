"""The eq. 17 solver on adversarial inputs, its iteration cap, and its batched replicate solves.

Each stress case (``benchmarks/solver_stress.py``: heavy tails, isolated and clipped zeros, dead rows
and columns, depthwise, wide and skinny shapes, Hutchinson and finite-difference estimates) is
checked against scipy's L-BFGS on the log-variances, per strongly connected component
(``tests/test_solvers.py``'s independent reference), to 1e-9 relative; the benchmark times the
same cases at layer sizes.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from benchmarks.solver_stress import stress_cases
from lightning_flatness.functional.solvers import (
    normalized_sharpness,
    solve_normalized_sharpness,
    solve_normalized_sharpness_batch,
)
from tests.test_solvers import coefficients_np, reference_infimum

F64 = torch.float64
CASES = stress_cases("small", seed=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_stress_case_matches_lbfgs_reference_with_a_certified_gap(name):
    w, h = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no iteration-cap warning on any stress case
        sol = solve_normalized_sharpness(w, h)
    ref = reference_infimum(*coefficients_np(w, h))
    assert abs(float(sol.value) - ref) <= 1e-9 * ref
    assert sol.lower_bound <= sol.value <= sol.lower_bound * (1 + 1e-11)


def _hard_problem(seed: int = 3):
    """Two blocks coupled by a single weak entry: the optimum lies ~ log(1/eps) nats out, so the
    damped Newton iteration needs several steps (the trust region caps each at 8 nats)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(6, 6, generator=g, dtype=F64) + 0.1
    b = torch.rand(6, 6, generator=g, dtype=F64) + 0.1
    a[:3, 3:] = 0.0
    a[0, 5] = 1e-60  # weak link
    b[3:, :3] = 0.0
    return b.sqrt(), a  # (W, h) with coefficients (a, b) at lam = 0.5


def test_iteration_cap_returns_a_certified_upper_bound_and_warns_once_naming_shape_and_gap():
    w, h = _hard_problem()
    exact = solve_normalized_sharpness(w, h)
    assert exact.iterations > 2
    with pytest.warns(
        RuntimeWarning,
        match=r"max_iter=2\) on a weight tensor of shape \(6, 6\) with a certified relative gap",
    ) as record:
        capped = solve_normalized_sharpness(w, h, max_iter=2)
    assert len([r for r in record if r.category is RuntimeWarning]) == 1
    assert capped.iterations == 2
    assert capped.value >= exact.value * (1 - 1e-12)  # an achieved value: an upper bound
    assert capped.lower_bound <= exact.value * (1 + 1e-12)  # the certificate stays valid
    # batched: one warning for the batch, not one per problem
    with pytest.warns(RuntimeWarning, match="problem") as record:
        solve_normalized_sharpness_batch(w, torch.stack([h, 2 * h, 3 * h]), max_iter=1)
    assert len([r for r in record if r.category is RuntimeWarning]) == 1


def test_iteration_cap_must_be_a_positive_int():
    w, h = CASES["lognormal_sigma1"]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_iter"):
            solve_normalized_sharpness(w, h, max_iter=bad)


@pytest.mark.parametrize(
    "name",
    [
        "lognormal_sigma3_conv",
        "clipped_90pct",
        "dead_rows_and_columns",
        "hutchinson_estimate",
        "depthwise",
        "skinny",
    ],
)
def test_batched_replicate_solves_equal_separate_solves_and_stay_certified(name):
    """Jackknife-like replicates (the pooled diagonal plus perturbed copies with other zero patterns),
    solved as one batch warm-started from the first, agree with separate cold solves."""
    w, h = CASES[name]
    g = torch.Generator().manual_seed(11)
    noise = torch.randn((5, *h.shape), generator=g, dtype=F64) * h.abs().mean()
    diagonals = torch.cat([h[None], h[None] + 0.3 * noise])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sols = solve_normalized_sharpness_batch(w, diagonals)
    for p, sol in enumerate(sols):
        single = solve_normalized_sharpness(w, diagonals[p])
        assert abs(float(sol.value) - float(single.value)) <= 1e-10 * float(single.value)
        assert sol.lower_bound <= sol.value <= sol.lower_bound * (1 + 1e-11)
        assert sol.attained == single.attained and sol.num_components == single.num_components


def test_batch_rejects_a_diagonal_stack_of_the_wrong_shape():
    w, h = CASES["lognormal_sigma1"]
    with pytest.raises(ValueError, match=r"\(P, \*weight.shape\)"):
        solve_normalized_sharpness_batch(w, h)


def test_float32_factorisation_is_refined_to_float64_accuracy():
    """Curvature spanning 1e-12..1e12 makes the float32 Schur complement useless on its own; the
    result must still be certified to 1e-11 and agree with the scipy reference."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(20, 30, generator=g, dtype=F64)
    h = torch.exp(9.0 * torch.randn(20, 30, generator=g, dtype=F64)).clamp(1e-12, 1e12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = solve_normalized_sharpness(w, h)
    ref = reference_infimum(*coefficients_np(w, h))
    assert abs(float(sol.value) - ref) <= 1e-9 * ref
    assert sol.value <= sol.lower_bound * (1 + 1e-11)
    assert np.isfinite(float(normalized_sharpness(w.float(), h.float())))


def test_small_solves_run_on_one_intra_op_thread_and_restore_the_setting():
    import lightning_flatness.functional.solvers.normalized as normalized_module

    w, h = CASES["lognormal_sigma3_conv"]
    seen = []
    original = normalized_module._solve_threads_set

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        normalized_module._solve_threads_set = spy
        value = normalized_sharpness(w, h)
        assert torch.get_num_threads() == 2 and seen == [1]
    finally:
        normalized_module._solve_threads_set = original
        torch.set_num_threads(threads)
    assert torch.equal(value, normalized_sharpness(w, h))


def test_replicate_curvature_equals_clipped_kernel_sums_of_explicit_means():
    from lightning_flatness.functional.replicate_measures import replicate_curvature, replicate_weights

    g = torch.Generator().manual_seed(8)
    shape = torch.Size((5, 4, 3, 2))
    sums = torch.randn(6, shape.numel(), generator=g, dtype=F64) + 0.5  # some slots negative
    sums[:, :7] = sums[:, :7].abs()  # and some entries non-negative in every slot
    counts = torch.tensor([3.0, 5.0, 0.0, 2.0, 4.0, 1.0], dtype=F64)
    used = [0, 1, 3, 4, 5]
    mix = replicate_weights(counts, used)
    a, trace = replicate_curvature(sums, mix, shape)
    total, n = sums.sum(0), counts.sum()
    means = [total / n] + [(total - sums[r]) / (n - counts[r]) for r in used]
    means += [sums[h].sum(0) / counts[h].sum() for h in ([0, 3, 5], [1, 4])]
    assert a.shape == (len(means), 5, 4)
    for p, mean in enumerate(means):
        torch.testing.assert_close(
            a[p], mean.clamp_min(0).view(shape).sum(dim=(2, 3)), rtol=1e-13, atol=1e-13
        )
        torch.testing.assert_close(trace[p], mean.sum(), rtol=1e-13, atol=1e-13)
