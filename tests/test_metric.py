"""Tests of ``NormalizedSharpness``: pooling, jackknife error bars, state handling, DDP reduction."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_flatness.functional.estimators.api import HessianDiagonalEstimate
from lightning_flatness.functional.measures import sharpness_measures
from lightning_flatness.functional.solvers import solve_normalized_sharpness
from lightning_flatness.metric import NormalizedSharpness

torch.set_num_threads(1)

SHAPES = {"fc1.weight": (6, 4), "fc2.weight": (3, 6)}


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in SHAPES.items()}


def _diagonals(num_groups: int | None, seed: int) -> dict[str, torch.Tensor]:
    """Random Hessian diagonals (some entries negative), ``(G, *shape)`` or ``(*shape)``."""
    gen = torch.Generator().manual_seed(seed)
    lead = () if num_groups is None else (num_groups,)
    return {
        n: torch.rand((*lead, *s), generator=gen, dtype=torch.float64) * 2 - 0.3 for n, s in SHAPES.items()
    }


def _measure_keys(out: dict) -> list[str]:
    return [k for k in out if "_stderr" not in k and "_half_shift" not in k and k != "num_samples"]


def _assert_dicts_close(actual: dict, expected: dict, rtol: float = 1e-12) -> None:
    assert set(actual) == set(expected)
    for key in expected:
        torch.testing.assert_close(
            actual[key].to(torch.float64),
            expected[key].to(torch.float64),
            rtol=rtol,
            atol=0.0,
            equal_nan=True,
            msg=lambda m, k=key: f"{k}: {m}",
        )


def _objective_at(weight, diagonal, x, y, lam):
    """Eq. 17's objective ``sum max(h, 0) e^(x_i + y_j) + W^2 / (2 lam) e^-(x_i + y_j)`` of a 2-D tensor."""
    s = np.exp(x.numpy()[:, None] + y.numpy()[None, :])
    return float(np.sum(np.maximum(diagonal, 0.0) * s + weight.numpy() ** 2 / (2 * lam) / s))


def _hand_jackknife(weights, groups, num_replicates, lam=0.5, linearized=False):
    """Independent evaluation from ``groups = [(slot, n, {name: diag})]``: (values, stderrs) as floats.

    ``linearized``: the leave-one-out values of eq. 17 are the replicate's objective at the pooled
    minimiser (the infinitesimal jackknife) instead of its minimum."""
    names = list(weights)
    sums = {r: {n: np.zeros(weights[n].shape) for n in names} for r in range(num_replicates)}
    counts = np.zeros(num_replicates)
    for slot, n_samples, diag in groups:
        counts[slot] += n_samples
        for n in names:
            sums[slot][n] += n_samples * diag[n].numpy()
    total = {n: sum(sums[r][n] for r in range(num_replicates)) for n in names}
    pooled = {n: torch.from_numpy(total[n] / counts.sum()) for n in names}
    values = {k: v.item() for k, v in sharpness_measures(weights, pooled, lam).items()}
    used = [r for r in range(num_replicates) if counts[r] > 0]
    loo = []
    for r in used:
        mean = {n: torch.from_numpy((total[n] - sums[r][n]) / (counts.sum() - counts[r])) for n in names}
        rep = {k: v.item() for k, v in sharpness_measures(weights, mean, lam).items()}
        if linearized:
            for n in names:
                sol = solve_normalized_sharpness(weights[n], pooled[n], lam)
                rep[f"normalized_linear/{n}"] = _objective_at(
                    weights[n], mean[n].numpy(), sol.row_log_variance, sol.col_log_variance, lam
                )
        loo.append(rep)
    if linearized and len(used) >= 2:  # the documented checks: |half shift| > 0.05 (R' - 1) s.e. or
        # s.e. > 0.1 value -> solved
        halves = []
        for half in (used[0::2], used[1::2]):
            mean = {n: torch.from_numpy(sum(sums[r][n] for r in half) / counts[half].sum()) for n in names}
            halves.append(sharpness_measures(weights, mean, lam))
        for n in names:
            key = f"normalized/{n}"
            linear = np.array([rep[f"normalized_linear/{n}"] for rep in loo])
            spread = math.sqrt((len(used) - 1) / len(used) * np.sum((linear - linear.mean()) ** 2))
            shift = (halves[0][key].item() + halves[1][key].item()) / 2 - values[key]
            if abs(shift) <= 0.05 * (len(used) - 1) * spread and spread <= 0.1 * values[key]:
                for rep in loo:
                    rep[key] = rep[f"normalized_linear/{n}"]
        for rep in loo:
            rep["normalized"] = sum(rep[f"normalized/{n}"] for n in names)
    stderr = {}
    for key in values:
        x = np.array([rep[key] for rep in loo])
        m = len(x)
        stderr[key] = math.sqrt((m - 1) / m * np.sum((x - x.mean()) ** 2)) if m >= 2 else float("nan")
    return values, stderr


def _stderr_key(key: str) -> str:
    measure, sep, rest = key.partition("/")
    return f"{measure}_stderr{sep}{rest}"


# ---------------------------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------------------------


def test_pooled_result_is_sharpness_of_sample_weighted_mean_diagonal():
    w = _weights()
    d1, d2 = _diagonals(None, 1), _diagonals(None, 2)
    metric = NormalizedSharpness(SHAPES, lam=0.7, num_replicates=4)
    metric.update(d1, w, num_samples=3)
    metric.update(d2, w, num_samples=13)
    out = metric.compute()
    expected = sharpness_measures(w, {n: (3 * d1[n] + 13 * d2[n]) / 16 for n in SHAPES}, lam=0.7)
    _assert_dicts_close({k: out[k] for k in _measure_keys(out)}, expected)
    assert out["num_samples"].item() == 16
    assert all(v.dtype == torch.float64 and v.ndim == 0 for k, v in out.items() if k != "num_samples")
    assert {k for k in out if "_stderr" in k} == {_stderr_key(k) for k in expected}
    # solved in inference mode, returned as normal tensors: usable in place and under autograd
    assert not any(v.is_inference() for v in out.values())
    out["normalized"].add_(0.0)


def test_two_single_batches_equal_one_update_with_stacked_groups():
    w = _weights()
    d1, d2 = _diagonals(None, 1), _diagonals(None, 2)
    separate = NormalizedSharpness(SHAPES, num_replicates=4)
    separate.update(d1, w, 3)
    separate.update(d2, w, torch.tensor(13))
    stacked = NormalizedSharpness(SHAPES, num_replicates=4)
    stacked.update({n: torch.stack([d1[n], d2[n]]) for n in SHAPES}, w, [3, 13])
    _assert_dicts_close(separate.compute(), stacked.compute())


def test_update_from_estimate_equals_update_with_groups_and_sizes():
    w = _weights()
    groups = _diagonals(3, 5)
    sizes = torch.tensor([5, 6, 7])
    estimate = HessianDiagonalEstimate(groups=groups, group_sizes=sizes, method="hutchinson", num_probes=24)
    a, b, c = (NormalizedSharpness(SHAPES, num_replicates=4) for _ in range(3))
    a.update_from_estimate(estimate, w)
    b.update(estimate, w)
    c.update(groups, w, sizes)
    _assert_dicts_close(a.compute(), c.compute())
    _assert_dicts_close(b.compute(), c.compute())


def test_groups_fill_replicate_slots_round_robin():
    w = _weights()
    metric = NormalizedSharpness(SHAPES, num_replicates=4)
    for k in range(5):  # single groups: slots 0, 1, 2, 3, 0
        metric.update(_diagonals(None, k), w, num_samples=10 + k)
    metric.update(_diagonals(3, 9), w, num_samples=[1, 2, 3])  # slots 1, 2, 3
    assert metric.count.tolist() == [10 + 14, 11 + 1, 12 + 2, 13 + 3]
    metric.update(_diagonals(6, 10), w, num_samples=[1] * 6)  # slots 0, 1, 2, 3, 0, 1
    assert metric.count.tolist() == [24 + 2, 12 + 2, 14 + 1, 16 + 1]


def test_pooled_exact_group_diagonals_equal_full_batch_exact_diagonal():
    """With exact estimates of a ReLU MLP, the sample-weighted pool of unequal groups is the
    Hessian diagonal of the mean loss over the whole batch."""
    from lightning_flatness.functional import hessian_diagonal, hessian_diagonal_groups, select_parameters

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3)).double()
    x, y = torch.randn(22, 5, dtype=torch.float64), torch.randint(0, 3, (22,))
    estimate = hessian_diagonal_groups(model, F.cross_entropy, x, y, method="exact", num_groups=4)
    assert estimate.group_sizes.tolist() == [6, 6, 5, 5]
    params = select_parameters(model)
    metric = NormalizedSharpness(params, num_replicates=4)
    metric.update_from_estimate(estimate, params)
    out = metric.compute()
    full = hessian_diagonal(model, F.cross_entropy, x, y, method="exact")
    expected = sharpness_measures({n: p.detach() for n, p in params.items()}, full)
    _assert_dicts_close({k: out[k] for k in _measure_keys(out)}, expected, rtol=1e-9)
    assert out["num_samples"].item() == 22
    assert all(math.isfinite(out[_stderr_key(k)].item()) and out[_stderr_key(k)].item() > 0 for k in expected)


# ---------------------------------------------------------------------------------------------
# jackknife
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("jackknife", ["linearized", "solved"])
def test_stderr_equals_hand_computed_delete_one_jackknife(jackknife):
    w = _weights(3)
    metric = NormalizedSharpness(SHAPES, lam=0.5, num_replicates=3, jackknife=jackknife)
    groups = []
    # update A: 2 groups -> slots 0, 1; B: 1 group -> slot 2; C: 2 groups -> slots 0, 1; D: 1 -> slot 2
    plan = [([4, 9], 0), ([6], 2), ([5, 3], 0), ([8], 2)]
    for seed, (sizes, first_slot) in enumerate(plan):
        d = _diagonals(len(sizes), 20 + seed)
        metric.update(d, w, sizes)
        groups += [((first_slot + g) % 3, n, {k: v[g] for k, v in d.items()}) for g, n in enumerate(sizes)]
    out = metric.compute()
    values, stderr = _hand_jackknife(w, groups, 3, linearized=jackknife == "linearized")
    for key in values:
        assert out[key].item() == pytest.approx(values[key], rel=1e-12)
        # a first-order value moves with the pooled minimiser by (A_r - A_0) times its error, which the
        # certificate of the pooled value bounds only by its square root
        rel = 1e-7 if jackknife == "linearized" and key.startswith("normalized") else 1e-10
        assert out[_stderr_key(key)].item() == pytest.approx(stderr[key], rel=rel)
        assert stderr[key] > 0


def test_half_shift_is_mean_of_measures_on_even_and_odd_slots_minus_pooled_value():
    w = _weights(4)
    metric = NormalizedSharpness(SHAPES, num_replicates=5)
    sizes = [3, 6, 4, 5, 7]
    d = _diagonals(len(sizes), 40)
    metric.update(d, w, sizes)  # slots 0..4
    out = metric.compute()

    def pooled(slots):
        total = sum(sizes[i] for i in slots)
        mean = {k: sum(sizes[i] * v[i] for i in slots) / total for k, v in d.items()}
        return sharpness_measures(
            {k: v.double() for k, v in w.items()}, {k: v.double() for k, v in mean.items()}
        )

    full, even, odd = pooled(range(5)), pooled([0, 2, 4]), pooled([1, 3])
    for key in full:
        measure, sep, rest = key.partition("/")
        shift = out[f"{measure}_half_shift{sep}{rest}"].item()
        assert shift == pytest.approx(((even[key] + odd[key]) / 2 - full[key]).item(), rel=1e-9, abs=1e-12)


def test_half_shift_reveals_the_upward_bias_that_probe_noise_gives_normalized_sharpness():
    """Unbiased but noisy diagonals bias normalized sharpness upwards; the jackknife misses it, the
    half shift sees at least part of it (0 < shift <= bias on average)."""
    g = torch.Generator().manual_seed(5)
    w = {"fc.weight": torch.randn(30, 20, generator=g, dtype=torch.float64)}
    true_h = torch.rand(30, 20, generator=g, dtype=torch.float64) * 0.2
    truth = sharpness_measures(w, {"fc.weight": true_h})["normalized"].item()
    biases, shifts, stderrs = [], [], []
    for _ in range(20):
        noisy = true_h + torch.randn(8, 30, 20, generator=g, dtype=torch.float64)  # 8 groups, noise >> h
        metric = NormalizedSharpness(w, num_replicates=8)
        metric.update({"fc.weight": noisy}, w, [10] * 8)
        out = metric.compute()
        biases.append(out["normalized"].item() - truth)
        shifts.append(out["normalized_half_shift"].item())
        stderrs.append(out["normalized_stderr"].item())
    bias, shift = np.mean(biases), np.mean(shifts)
    assert bias > 3 * np.mean(stderrs)  # the error bar alone would be dishonest here
    assert 0.3 * bias < shift <= bias  # measured: 0.43-0.50 of the bias (alpha = 1/2 predicts 0.41)


def test_jackknife_uses_only_replicate_slots_that_hold_samples():
    w = _weights(4)
    metric = NormalizedSharpness(SHAPES, num_replicates=8)
    d = _diagonals(3, 30)
    metric.update(d, w, [2, 5, 4])  # slots 0, 1, 2 of 8
    out = metric.compute()
    groups = [(g, n, {k: v[g] for k, v in d.items()}) for g, n in enumerate([2, 5, 4])]
    values, stderr = _hand_jackknife(w, groups, 8, linearized=True)
    for key in values:
        rel = 1e-7 if key.startswith("normalized") else 1e-10  # as in the test above
        assert out[_stderr_key(key)].item() == pytest.approx(stderr[key], rel=rel)


def test_stderr_is_nan_with_one_warning_when_a_single_slot_holds_samples():
    w = _weights()
    metric = NormalizedSharpness(SHAPES, num_replicates=1)
    metric.update(_diagonals(None, 1), w, 8)
    with pytest.warns(UserWarning, match="standard errors are NaN"):
        out = metric.compute()
    assert all(math.isnan(v.item()) for k, v in out.items() if "_stderr" in k or "_half_shift" in k)
    assert all(math.isfinite(out[k].item()) for k in _measure_keys(out))
    metric.update(_diagonals(None, 2), w, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = metric.compute()
    assert math.isnan(again["normalized_stderr"].item())


@pytest.fixture(scope="module")
def noisy_trials():
    """Repeated experiments: 8 single-group updates of a known diagonal plus iid Gaussian noise."""
    gen = torch.Generator().manual_seed(7)
    shape, noise, num_trials, num_batches = (6, 5), 0.15, 120, 8
    true_diag = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
    weight = torch.randn(shape, generator=gen, dtype=torch.float64)
    rows = []
    for _ in range(num_trials):
        metric = NormalizedSharpness({"w": shape}, num_replicates=num_batches)
        for _ in range(num_batches):
            estimate = true_diag + noise * torch.randn(shape, generator=gen, dtype=torch.float64)
            metric.update({"w": estimate}, {"w": weight}, num_samples=16)
        out = metric.compute()
        rows.append(
            [
                out[k].item()
                for k in ("hessian_trace", "hessian_trace_stderr", "normalized", "normalized_stderr")
            ]
        )
    trials = np.array(rows)
    true_trace_std = math.sqrt(shape[0] * shape[1] * noise**2 / num_batches)
    return trials, true_trace_std, true_diag.sum().item()


def test_trace_stderr_matches_true_standard_deviation_of_the_estimator(noisy_trials):
    trials, true_std, true_trace = noisy_trials
    # the trace is linear: the jackknife is the classic standard error, whose square is unbiased
    rms_stderr = math.sqrt(np.mean(trials[:, 1] ** 2))
    assert rms_stderr == pytest.approx(true_std, rel=0.10)
    assert np.std(trials[:, 0], ddof=1) == pytest.approx(true_std, rel=0.2)
    assert np.mean(trials[:, 0]) == pytest.approx(true_trace, abs=4 * true_std / math.sqrt(len(trials)))


def test_normalized_stderr_matches_spread_of_normalized_sharpness_over_trials(noisy_trials):
    trials, _, _ = noisy_trials
    empirical = np.std(trials[:, 2], ddof=1)
    assert empirical > 0
    assert math.sqrt(np.mean(trials[:, 3] ** 2)) == pytest.approx(empirical, rel=0.25)


# ---------------------------------------------------------------------------------------------
# state handling
# ---------------------------------------------------------------------------------------------


def test_compute_without_samples_raises_and_reset_clears_samples():
    w = _weights()
    metric = NormalizedSharpness(SHAPES, num_replicates=4)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="no samples to pool"):
        metric.compute()
    metric.update(_diagonals(2, 1), w, [3, 4])
    first = metric.compute()
    metric.reset()
    assert metric.count.sum().item() == 0
    assert all(s.abs().sum().item() == 0 for s in metric.hessian_sums().values())
    assert metric.parameter_shapes == {n: torch.Size(s) for n, s in SHAPES.items()}
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="no samples to pool"):
        metric.compute()
    metric.update(_diagonals(2, 1), w, [3, 4])
    _assert_dicts_close(metric.compute(), first)


def test_state_is_one_flat_sum_laid_out_at_construction_with_a_one_element_default():
    metric = NormalizedSharpness(num_replicates=8, parameter_shapes={"w": (100, 50), "v": (3, 4, 2, 2)})
    assert list(metric.metric_state) == ["accumulator"]
    assert metric.accumulator.shape == (1, 1) and metric.accumulator.dtype == torch.float64  # compact default
    assert {n: tuple(s.shape) for n, s in metric.hessian_sums().items()} == {"w": (8, 5000), "v": (8, 48)}
    assert metric.count.tolist() == [0] * 8
    metric.update(
        {"w": torch.ones(100, 50), "v": torch.ones(3, 4, 2, 2)},
        {"w": torch.ones(100, 50), "v": torch.ones(3, 4, 2, 2)},
        3,
    )
    assert metric.accumulator.shape == (8, 5049) and metric.count.tolist() == [3] + [0] * 7
    assert metric.hessian_sums()["v"][0].tolist() == [3.0] * 48
    metric.reset()
    assert metric.accumulator.shape == (1, 1) and metric.count.sum().item() == 0


def test_state_dict_round_trip_restores_result_and_accumulation():
    w = _weights()
    metric = NormalizedSharpness(SHAPES, lam=0.3, num_replicates=4)
    metric.persistent(True)
    metric.update(_diagonals(3, 1), w, [3, 4, 5])
    state = metric.state_dict()
    assert {"accumulator", "_extra_state"} == set(state)
    restored = NormalizedSharpness(SHAPES, lam=0.3, num_replicates=4)
    restored.load_state_dict(state)
    _assert_dicts_close(restored.compute(), metric.compute())
    more = _diagonals(None, 2)
    metric.update(more, w, 6)
    restored.update(more, w, 6)
    _assert_dicts_close(restored.compute(), metric.compute())
    assert restored.count.tolist() == metric.count.tolist()
    stale = NormalizedSharpness(SHAPES, lam=0.3, num_replicates=4)
    stale.update(_diagonals(2, 3), w, [2, 2])
    stale.compute()  # cached
    stale.load_state_dict(metric.state_dict())
    _assert_dicts_close(stale.compute(), metric.compute())


def test_non_persistent_state_dict_keeps_only_the_layout():
    metric = NormalizedSharpness(SHAPES, num_replicates=4)
    metric.update(_diagonals(None, 1), _weights(), 5)
    state = metric.state_dict()
    assert set(state) == {"_extra_state"}
    restored = NormalizedSharpness(SHAPES, num_replicates=4)
    restored.load_state_dict(state)
    assert restored.parameter_shapes == metric.parameter_shapes
    assert restored.count.sum().item() == 0 and restored.weights is None


def test_load_state_dict_rejects_other_num_replicates_or_layout():
    metric = NormalizedSharpness(SHAPES, num_replicates=4)
    metric.persistent(True)
    metric.update(_diagonals(None, 1), _weights(), 5)
    with pytest.raises(ValueError, match="num_replicates"):
        NormalizedSharpness(SHAPES, num_replicates=3).load_state_dict(metric.state_dict())
    other = NormalizedSharpness(
        num_replicates=4, parameter_shapes={"fc1.weight": (6, 4), "fc2.weight": (3, 7)}
    )
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(metric.state_dict())


def test_forward_returns_batch_value_and_accumulates_globally():
    w = _weights()
    d1, d2 = _diagonals(2, 1), _diagonals(2, 2)
    metric = NormalizedSharpness(SHAPES, num_replicates=4)
    batch1 = metric(d1, w, [3, 4])
    batch2 = metric(d2, w, [5, 6])
    only1, only2, both = (NormalizedSharpness(SHAPES, num_replicates=4) for _ in range(3))
    only1.update(d1, w, [3, 4])
    only2.update(d2, w, [5, 6])
    both.update(d1, w, [3, 4])
    both.update(d2, w, [5, 6])
    _assert_dicts_close(batch1, only1.compute())
    _assert_dicts_close(batch2, only2.compute())  # slots 2, 3 instead of 0, 1: the jackknife is symmetric
    _assert_dicts_close(metric.compute(), both.compute())


def test_forward_fills_replicate_slots_round_robin():
    w = _weights()
    metric = NormalizedSharpness(SHAPES, num_replicates=4)
    for k in range(6):  # slots 0, 1, 2, 3, 0, 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # single-group batch values have no stderr
            metric(_diagonals(None, k), w, num_samples=1 + k)
    assert metric.count.tolist() == [1 + 5, 2 + 6, 3, 4]


def test_merge_state_equals_one_metric_over_all_updates():
    w = _weights()
    a, b, both = (NormalizedSharpness(SHAPES, num_replicates=4) for _ in range(3))
    a.update(_diagonals(2, 1), w, [3, 4])
    b.update(_diagonals(2, 2), w, [5, 6])
    a.merge_state(b)
    both.update(_diagonals(2, 1), w, [3, 4])
    both.update(_diagonals(2, 2), w, [5, 6])
    # both put the second update into slots 2, 3; b (fresh) into slots 0, 1: the pooled values agree
    out, ref = a.compute(), both.compute()
    _assert_dicts_close({k: out[k] for k in _measure_keys(out)}, {k: ref[k] for k in _measure_keys(ref)})
    assert out["num_samples"].item() == 18


def test_metric_keeps_a_detached_copy_of_the_weights_and_no_submodule():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    from lightning_flatness.functional import select_parameters

    params = select_parameters(model)
    metric = NormalizedSharpness(params, num_replicates=2)
    metric.update({n: torch.rand(2, *p.shape) for n, p in params.items()}, params, [4, 4])
    assert list(metric.children()) == []
    assert list(metric.parameters()) == []
    assert all(not k.startswith(("0.", "2.")) for k in metric.state_dict())
    before = {n: w.clone() for n, w in metric.weights.items()}
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    assert all(torch.equal(metric.weights[n], before[n]) for n in before)
    assert all(not w.requires_grad and w.dtype == torch.float64 for w in metric.weights.values())


def test_dtype_casts_keep_float64_states_and_device_moves_carry_the_state():
    w = _weights()
    metric = NormalizedSharpness(SHAPES, num_replicates=4)
    metric.update(_diagonals(2, 1), w, [3, 4])
    expected = metric.compute()
    metric.float()
    assert metric.accumulator.dtype == torch.float64 and metric.count.dtype == torch.int64
    metric.set_dtype(torch.float16)  # an explicit cast rounds the current sums; updates return to float64
    metric.update(_diagonals(2, 2), w, [5, 6])
    assert metric.accumulator.dtype == torch.float64
    metric.reset()
    metric.update(_diagonals(2, 1), w, [3, 4])
    _assert_dicts_close(metric.compute(), expected)
    metric.to("meta")
    assert metric.accumulator.device.type == "meta"


def test_states_made_under_inference_mode_accept_updates_outside_it():
    """Lightning validates under torch.inference_mode; the states must stay updatable afterwards."""
    w = _weights()
    metric, reference = (
        NormalizedSharpness(SHAPES, num_replicates=4),
        NormalizedSharpness(SHAPES, num_replicates=4),
    )
    with torch.inference_mode():
        metric.update(_diagonals(2, 1), w, [3, 4])  # creates the sum states
        metric.compute()
        metric(_diagonals(2, 2), w, [5, 6])  # forward: reset + reduce
    metric.update(_diagonals(None, 3), w, 7)
    for seed, sizes in [(1, [3, 4]), (2, [5, 6])]:
        reference.update(_diagonals(2, seed), w, sizes)
    reference.update(_diagonals(None, 3), w, 7)
    _assert_dicts_close(metric.compute(), reference.compute())
    with torch.inference_mode():
        metric.reset()
    metric.update(_diagonals(2, 1), w, [3, 4])
    assert metric.count.sum().item() == 7


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lam": 0.0}, "lam"),
        ({"lam": -1.0}, "lam"),
        ({"lam": float("inf")}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"lam": True}, "lam"),
        ({"lam": "0.5"}, "lam"),
        ({"num_replicates": 0}, "num_replicates"),
        ({"num_replicates": 2.0}, "num_replicates"),
        ({"num_replicates": True}, "num_replicates"),
        ({"parameter_shapes": {"b": ()}}, "scalar"),
        ({"parameter_shapes": {}}, "non-empty"),
        ({"parameter_shapes": {"w": (2, 3)}, "dist_sync_on_step": True}, "dist_sync_on_step"),
        ({"parameter_shapes": {"w": (2, 3)}, "dist_sync_fn": lambda x, group=None: [x]}, "all_reduce"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NormalizedSharpness(**kwargs)


def test_constructor_without_parameter_shapes_names_the_fix():
    with pytest.raises(TypeError, match=r"needs `parameter_shapes`.*select_parameters"):
        NormalizedSharpness(num_replicates=4)
    metric = NormalizedSharpness({n: torch.zeros(s) for n, s in SHAPES.items()})  # tensors give their shapes
    assert metric.parameter_shapes == {n: torch.Size(s) for n, s in SHAPES.items()}


@pytest.mark.parametrize(
    ("num_samples", "error", "match"),
    [
        (0, ValueError, "at least one sample"),
        (-3, ValueError, "at least one sample"),
        ([4, 0], ValueError, "at least one sample"),
        ([], ValueError, "empty"),
        (2.5, TypeError, "int"),
        (True, TypeError, "bool"),
        (torch.tensor([1.0, 2.0]), TypeError, "integers"),
        (torch.ones(2, 1, dtype=torch.int64), ValueError, "1-D"),
        ([1, 2, 3], ValueError, "expected"),
        ([3], ValueError, "expected"),
        (None, TypeError, "required"),
    ],
)
def test_update_rejects_bad_num_samples(num_samples, error, match):
    metric = NormalizedSharpness(SHAPES)
    with pytest.raises(error, match=match):
        metric.update(_diagonals(2, 1), _weights(), num_samples)


def test_update_rejects_mismatched_names_shapes_and_bad_values():
    w = _weights()
    metric = NormalizedSharpness(SHAPES)
    with pytest.raises(ValueError, match="same tensors"):
        metric.update(_diagonals(None, 1), {"fc1.weight": w["fc1.weight"]}, 4)
    with pytest.raises(ValueError, match="shape"):
        metric.update({**_diagonals(None, 1), "fc1.weight": torch.rand(4, 6, dtype=torch.float64)}, w, 4)
    bad = _diagonals(None, 1)
    bad["fc2.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        metric.update(bad, w, 4)
    assert metric.count.sum().item() == 0 and metric.weights is None  # failed updates change nothing

    metric.update(_diagonals(None, 1), w, 4)
    other = {"fc1.weight": torch.rand(6, 4), "fc3.weight": torch.rand(3, 6)}
    with pytest.raises(ValueError, match="not in `parameter_shapes`"):
        metric.update(other, other, 4)
    resized = {"fc1.weight": torch.rand(6, 5), "fc2.weight": torch.rand(3, 6)}
    with pytest.raises(ValueError, match="changes tensor shapes"):
        metric.update(resized, resized, 4)
    estimate = HessianDiagonalEstimate(
        groups=_diagonals(1, 2), group_sizes=torch.tensor([4]), method="exact", num_probes=0
    )
    with pytest.raises(ValueError, match="only with a mapping"):
        metric.update(estimate, w, 4)
    with pytest.raises(TypeError, match="HessianDiagonalEstimate"):
        metric.update_from_estimate(_diagonals(None, 1), w)
    reordered = dict(reversed(list(_diagonals(None, 3).items())))
    metric.update(reordered, w, 4)  # same names and shapes in another order are matched by name
    assert metric.count.sum().item() == 8


def test_parameter_shapes_fix_the_layout_before_any_update():
    metric = NormalizedSharpness(num_replicates=2, parameter_shapes=SHAPES)
    assert metric.parameter_shapes == {n: torch.Size(s) for n, s in SHAPES.items()}
    with pytest.raises(ValueError, match="changes tensor shapes"):
        bad = {"fc1.weight": torch.rand(6, 5), "fc2.weight": torch.rand(3, 6)}
        metric.update(bad, bad, 4)
    metric.update(_diagonals(None, 1), _weights(), 4)
    assert metric.count.tolist() == [4, 0]


# ---------------------------------------------------------------------------------------------
# distributed
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_gloo_processes_agree_with_one_process_over_all_data_using_all_reduce(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        import ddp_metric_worker as worker
    finally:
        sys.path.pop(0)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    init_file = tmp_path / "store"
    outs = [tmp_path / f"rank{r}.pt" for r in range(2)]
    script = str(Path(worker.__file__))
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(r), "2", str(init_file), str(outs[r])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("DDP worker timed out (deadlock?)")
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    res = [torch.load(o) for o in outs]

    # reference: one process over all data; rank r starts at slot r, groups then go round-robin
    w = worker.weights()
    groups = []
    single = NormalizedSharpness(worker.SHAPES, lam=worker.LAM, num_replicates=worker.NUM_REPLICATES)
    for rank in range(2):
        slot = rank
        for diagonals, sizes in worker.rank_updates(rank):
            single.update(diagonals, w, sizes)
            for g, n in enumerate(sizes):
                groups.append((slot % worker.NUM_REPLICATES, n, {k: v[g] for k, v in diagonals.items()}))
                slot += 1
    expected = single.compute()
    values, stderr = _hand_jackknife(w, groups, worker.NUM_REPLICATES, worker.LAM, linearized=True)
    for r in range(2):
        out = res[r]["result"]
        assert set(out) == set(expected)
        _assert_dicts_close(out, res[0]["result"], rtol=0.0)  # identical on both ranks
        _assert_dicts_close(
            {k: out[k] for k in _measure_keys(out)}, {k: expected[k] for k in _measure_keys(expected)}
        )
        for key in values:
            rel = 1e-7 if key.startswith("normalized") else 1e-10  # first-order replicates, as above
            assert out[_stderr_key(key)].item() == pytest.approx(stderr[key], rel=rel)
        assert out["num_samples"].item() == sum(sum(s) for u in worker.UPDATE_SIZES.values() for s in u)
        assert torch.equal(res[r]["count_after_compute"], res[r]["local_count"])  # local state restored
        # one sync = one all_reduce(SUM) of the (R, F + 1) float64 state, whatever torchmetrics does around it
        state_bytes = worker.NUM_REPLICATES * (sum(math.prod(s) for s in worker.SHAPES.values()) + 1) * 8
        assert res[r]["sync_calls"] == [("torch.float64", state_bytes, str(torch.distributed.ReduceOp.SUM))]
        assert res[r]["fixed_sync_calls"] == res[r]["sync_calls"]  # also with a process that never updated
        assert res[r]["direct_sync_calls"] == res[r]["sync_calls"]  # and for metric.sync() called directly
    only0 = NormalizedSharpness(worker.SHAPES, lam=worker.LAM, num_replicates=worker.NUM_REPLICATES)
    only0.update(worker.rank_updates(0)[0][0], w, worker.rank_updates(0)[0][1])
    with pytest.warns(UserWarning, match="standard errors are NaN"):  # a single group
        _assert_dicts_close(res[0]["fixed_result"], only0.compute())
    assert "no weights on this process" in res[1]["fixed_result"]


def test_replicates_with_whole_kernels_clipped_equal_the_measures_of_the_explicit_means():
    """Regression: depthwise (C, 1, k, k) and conv tensors whose curvature is mostly negative (an eq. 20
    Gauss-Newton diagonal at initialisation), so that whole kernels clip to exactly 0 in some means. The
    batched replicate path must equal sharpness_measures on the explicitly formed means (it gave NaN)."""
    from lightning_flatness.functional import sharpness_measures

    g = torch.Generator().manual_seed(11)
    shapes = {"dw": (16, 1, 3, 3), "conv": (8, 3, 3, 3), "fc": (5, 16)}
    weights = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    r = 8
    groups = {n: torch.randn((r, *s), generator=g, dtype=torch.float64) - 0.8 for n, s in shapes.items()}
    groups["dw"][:, :4] = -torch.rand((r, 4, 1, 3, 3), generator=g, dtype=torch.float64)  # whole kernels < 0
    sizes = torch.tensor([2] * r)
    metric = NormalizedSharpness(shapes, num_replicates=r)
    metric.update(groups, weights, sizes)
    out = metric.compute()
    assert all(bool(torch.isfinite(v)) for v in out.values())
    pooled = {n: d.mean(dim=0) for n, d in groups.items()}
    loo = [{n: torch.cat([d[:i], d[i + 1 :]]).mean(dim=0) for n, d in groups.items()} for i in range(r)]
    ref = sharpness_measures(weights, pooled, lam=0.5)
    ref_loo = torch.stack([sharpness_measures(weights, m, lam=0.5)["normalized"] for m in loo])
    torch.testing.assert_close(out["normalized"], ref["normalized"], rtol=1e-9, atol=0)
    for n in shapes:
        torch.testing.assert_close(out[f"normalized/{n}"], ref[f"normalized/{n}"], rtol=1e-9, atol=1e-15)
    expected_stderr = torch.sqrt((r - 1) / r * (ref_loo - ref_loo.mean()).pow(2).sum())
    torch.testing.assert_close(out["normalized_stderr"], expected_stderr, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("case", ["resnet", "mobilenet"])
def test_saved_cases_of_the_negative_zero_defect_give_finite_replicates(case):
    """Slot sums saved by benchmarks/bench_zoo_auto.py where the clipped kernel sums came out as -1e-17
    instead of 0 and the replicates were NaN or -350 (benchmarks/RESULTS.md): now exact zeros, and every
    replicate is finite and close to the pooled value; the pooled value equals the explicit solve."""
    from pathlib import Path

    from lightning_flatness.functional import normalized_sharpness
    from lightning_flatness.functional.replicate_measures import (
        replicate_curvature,
        replicate_weights,
        tensor_measures,
    )

    path = (
        Path(__file__).resolve().parents[1]
        / "benchmarks"
        / "results"
        / f"bug_replicate_curvature_{case}_case.pt"
    )
    d = torch.load(path, weights_only=False)
    mix = replicate_weights(d["counts"], list(range(len(d["counts"]))))
    a, _ = replicate_curvature(d["sums"], mix, d["W"].shape)
    assert float(a.min()) == 0.0  # exact zeros, no negative residue
    values = tensor_measures(d["W"], d["sums"], mix, 0.5)["normalized"]
    assert bool(torch.isfinite(values).all()) and bool((values > 0).all())
    assert float((values / values[0]).max()) < 1.5 and float((values / values[0]).min()) > 0.6
    pooled = (d["sums"].sum(0) / d["counts"].sum()).reshape(d["W"].shape)
    assert float(values[0]) == pytest.approx(float(normalized_sharpness(d["W"], pooled, 0.5)), rel=1e-9)


def test_updates_add_in_place_and_copy_the_weights_only_when_they_change():
    w = torch.randn(3, 4, dtype=torch.float64)
    h = torch.rand(3, 4, dtype=torch.float64)
    metric = NormalizedSharpness({"w": w.shape}, num_replicates=2)
    metric.update({"w": h}, {"w": w}, 2)
    metric.update({"w": 3 * h}, {"w": w}, 2)
    state, kept = metric.accumulator, metric._weights["w"]
    metric.update({"w": h}, {"w": w}, 4)  # the same unchanged weights: the kept copy serves
    assert metric.accumulator is state and metric._weights["w"] is kept  # in place, no new copies
    torch.testing.assert_close(metric.hessian_sums()["w"], torch.stack([2 * h + 4 * h, 6 * h]).reshape(2, -1))
    w.mul_(2)  # changed in place: its version counter moves, so it is copied again
    metric.update({"w": h}, {"w": w}, 2)
    assert torch.equal(metric.weights["w"], w) and metric._weights["w"] is not kept
    fresh = torch.randn(3, 4, dtype=torch.float64)  # another tensor (even with an equal version): copied
    metric.update({"w": h}, {"w": fresh}, 2)
    assert torch.equal(metric.weights["w"], fresh)
    metric.reset()
    metric.update({"w": h}, {"w": fresh}, 2)  # after reset: the compact default is replaced, not written
    torch.testing.assert_close(metric.hessian_sums()["w"].sum(dim=0), 2 * h.reshape(-1))


def test_a_released_state_buffer_is_overwritten_by_the_next_metric_with_identical_results():
    """release_state() hands over the full-size buffer; a metric given it by reuse_state() writes its
    state there (no new allocation) and computes exactly what a metric with a fresh state computes."""
    first = NormalizedSharpness(SHAPES, num_replicates=4)
    first.update(_diagonals(4, seed=1), _weights(0), [3, 2, 4, 1])
    first.compute()
    buffer = first.release_state()
    assert buffer is not None and tuple(buffer.shape) == first.state_shape == (4, 6 * 4 + 3 * 6 + 1)
    assert first.accumulator is not buffer and first.accumulator.numel() == 1  # reset to the compact default
    assert first.release_state() is None  # nothing of its own any more
    unused = NormalizedSharpness(SHAPES, num_replicates=4)
    unused.reuse_state(buffer)
    assert unused.release_state() is buffer  # no update wrote into it: handed back as it was given

    reused, fresh = (
        NormalizedSharpness(SHAPES, num_replicates=4),
        NormalizedSharpness(SHAPES, num_replicates=4),
    )
    reused.reuse_state(buffer)
    for metric in (reused, fresh):
        metric.update(_diagonals(4, seed=2), _weights(1), [2, 2, 2, 2])
        metric.update(_diagonals(2, seed=3), _weights(1), [5, 1])
    assert reused.accumulator.data_ptr() == buffer.data_ptr()  # written into the handed-over buffer
    assert torch.equal(reused.accumulator, fresh.accumulator)  # the old sums are gone, not added to
    got, expected = reused.compute(), fresh.compute()
    assert set(got) == set(expected)
    assert all(
        torch.equal(got[k], expected[k]) or bool(got[k].isnan() & expected[k].isnan()) for k in expected
    )


def test_reuse_state_rejects_a_buffer_of_another_layout():
    metric = NormalizedSharpness(SHAPES, num_replicates=4)
    metric.reuse_state(None)  # nothing to reuse: a no-op
    with pytest.raises(ValueError, match=r"reuse_state needs a contiguous float64 tensor of shape \(4, 43\)"):
        metric.reuse_state(torch.zeros(8, 43, dtype=torch.float64))
    with pytest.raises(ValueError, match="same parameter_shapes and num_replicates"):
        metric.reuse_state(torch.zeros(4, 43, dtype=torch.float32))
    with pytest.raises(ValueError, match="contiguous float64"):
        metric.reuse_state(torch.zeros(43, 4, dtype=torch.float64).T)


def test_one_dimensional_tensors_enter_the_trace_and_its_error_bars_only():
    """A bias beside a weight: ``hessian_trace`` and its jackknife count both, ``hessian_trace_weights`` the
    weight alone (both against a by-hand delete-one jackknife of the slot means), and the normalized
    measures equal those of a metric that never saw the bias."""
    gen = torch.Generator().manual_seed(3)
    w, b = (
        torch.randn(3, 4, generator=gen, dtype=torch.float64),
        torch.randn(3, generator=gen, dtype=torch.float64),
    )
    both = NormalizedSharpness({"w": w.shape, "b": b.shape}, num_replicates=4)
    alone = NormalizedSharpness({"w": w.shape}, num_replicates=4)
    slot_w, slot_b = [], []
    for _ in range(4):  # one update per slot, 3 samples each
        hw, hb = (
            torch.randn(3, 4, generator=gen, dtype=torch.float64),
            torch.randn(3, generator=gen, dtype=torch.float64),
        )
        both.update({"w": hw, "b": hb}, {"w": w, "b": b}, 3)
        alone.update({"w": hw}, {"w": w}, 3)
        slot_w.append(float(hw.sum()))
        slot_b.append(float(hb.sum()))
    out, ref = both.compute(), alone.compute()

    def jackknife(values):
        loo = [(sum(values) - v) / 3 for v in values]  # equal slot sizes: means of the other three
        mean = sum(loo) / 4
        return math.sqrt(3 / 4 * sum((x - mean) ** 2 for x in loo))

    totals = [a + c for a, c in zip(slot_w, slot_b)]
    assert float(out["hessian_trace"]) == pytest.approx(sum(totals) / 4, rel=1e-12)
    assert float(out["hessian_trace_weights"]) == pytest.approx(sum(slot_w) / 4, rel=1e-12)
    assert float(out["hessian_trace/b"]) == pytest.approx(sum(slot_b) / 4, rel=1e-12)
    assert float(out["hessian_trace_stderr"]) == pytest.approx(jackknife(totals), rel=1e-10)
    assert float(out["hessian_trace_weights_stderr"]) == pytest.approx(jackknife(slot_w), rel=1e-10)
    halves = (slot_w[0] + slot_w[2]) / 2, (slot_w[1] + slot_w[3]) / 2
    shift = sum(halves) / 2 - sum(slot_w) / 4
    assert float(out["hessian_trace_weights_half_shift"]) == pytest.approx(
        shift, abs=1e-12 * abs(sum(slot_w))
    )
    for key in ("normalized", "normalized_stderr", "matrix_normalized", "matrix_normalized_stderr"):
        assert float(out[key]) == pytest.approx(float(ref[key]), rel=1e-12), key
    assert "normalized/b" not in out and "matrix_normalized/b" not in out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_equals_the_elementwise_check(dtype):
    from lightning_flatness.metric import all_finite

    big = torch.finfo(dtype).max
    cases = [
        torch.ones(5, dtype=dtype),
        torch.full((4,), big, dtype=dtype),  # finite entries whose sum overflows the dtype (and float64's)
        torch.tensor([1.0, float("nan")], dtype=dtype),
        torch.tensor([float("inf"), 1.0], dtype=dtype),
        torch.tensor([float("inf"), -float("inf")], dtype=dtype),
        torch.tensor([-float("inf")], dtype=dtype),
        torch.zeros(0, dtype=dtype),
    ]
    for t in cases:
        assert all_finite(t) == bool(torch.isfinite(t).all()), t
