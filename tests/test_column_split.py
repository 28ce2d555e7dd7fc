"""Eq. 17 solved with its columns split across 2 and 4 gloo processes (forked, about a second each)
equals the whole-problem solve (:func:`solve_normalized_sharpness_coefficients`, one process) to the
certified accuracy, is identical on every process, reduces nothing larger than the ``m x m`` Schur
complement, and hands degenerate problems (zero rows, clipped blocks) back to the caller."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from forked_ranks import fork_ranks

from lightning_flatness.functional.solvers import solve_normalized_sharpness_coefficients
from lightning_flatness.functional.solvers._newton import LOCAL, ColumnReduction
from lightning_flatness.functional.solvers.column_split import (
    GroupColumnReduction,
    solve_split_coefficients,
)


def problems() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(m, n)`` float64 coefficient pairs, ``m <= n``: heavy-tailed, badly scaled, wide, degenerate."""
    g = torch.Generator().manual_seed(3)
    out = {}
    a = torch.exp(2.0 * torch.randn(24, 24, generator=g, dtype=torch.float64))
    b = torch.exp(2.0 * torch.randn(24, 24, generator=g, dtype=torch.float64))
    out["square lognormal"] = (a, b)
    rows = torch.logspace(-6, 6, 7, dtype=torch.float64)[:, None]  # rows 12 decades apart
    out["wide, badly scaled rows"] = (
        torch.rand(7, 41, generator=g, dtype=torch.float64) * rows,
        torch.rand(7, 41, generator=g, dtype=torch.float64) / rows,
    )
    a = torch.rand(6, 30, generator=g, dtype=torch.float64)
    a[a < 0.6] = 0.0  # clipped curvature: 60% zeros, B complete
    a[0] += 0.1  # ... and every column with some curvature (one component)
    out["sparse curvature"] = (a, torch.rand(6, 30, generator=g, dtype=torch.float64))
    a, b = (torch.rand(6, 12, generator=g, dtype=torch.float64) for _ in range(2))
    a[1] *= 1e-280  # a row whose sums underflow in the sweeps (their log-sum-exp fallback)
    out["underflowing row"] = (a, b)
    a, b = (torch.rand(8, 20, generator=g, dtype=torch.float64) for _ in range(2))
    a[2], a[:, 3], a[:, 17] = 0.0, 0.0, 0.0  # dead units: a row and two columns without curvature
    out["dead units"] = (a, b)
    a, b = (torch.rand(5, 16, generator=g, dtype=torch.float64) for _ in range(2))
    a[2], b[:, 3] = 0.0, 0.0  # a dead row and a zero weight column: gathered (closure) instead
    out["degenerate"] = (a, b)
    return out


def _worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    for name, (a, b) in problems().items():
        cols = torch.arange(a.shape[1]).tensor_split(world)[rank]  # uneven splits
        comm = GroupColumnReduction()
        sol = solve_split_coefficients(a[:, cols], b[:, cols], comm, shape=(name,))
        if sol is None:
            results[name] = None
            continue
        # a perturbed problem, warm-started from this one (as the jackknife replicates are)
        g = torch.Generator().manual_seed(11)
        bumped = a * (1 + 0.3 * torch.rand(a.shape, generator=g, dtype=torch.float64))
        warm = solve_split_coefficients(bumped[:, cols], b[:, cols], comm, rtol=1e-9, start=sol)
        results[name] = {
            "value": float(sol.value),
            "lower": float(sol.lower_bound),
            "warm": float(warm.value),
            "warm_lower": float(warm.lower_bound),
            "x": sol.row_log_variance,
            "attained": sol.attained,
            "y": sol.col_log_variance,
            "largest_reduce": comm.largest,
            "calls": comm.calls,
        }
    torch.save(results, out_file)
    dist.destroy_process_group()


def run(tmp_path: Path, world: int) -> list[dict]:
    return fork_ranks(tmp_path, world, _worker, (), "column-split worker")


@pytest.mark.parametrize("world", [2, 4])
def test_split_columns_give_the_whole_problems_certified_value_on_every_process(tmp_path, world):
    records = run(tmp_path, world)
    for name, (a, b) in problems().items():
        first = records[0][name]
        if name == "degenerate":
            assert all(r[name] is None for r in records)  # handed back on every process, no deadlock
            continue
        whole = solve_normalized_sharpness_coefficients(a[None], b[None])[0]
        g = torch.Generator().manual_seed(11)  # the worker's perturbation
        bumped = a * (1 + 0.3 * torch.rand(a.shape, generator=g, dtype=torch.float64))
        whole_warm = solve_normalized_sharpness_coefficients(bumped[None], b[None])[0]
        for r in records:  # identical on every process
            assert r[name]["value"] == first["value"] and r[name]["warm"] == first["warm"], name
            assert torch.allclose(r[name]["x"], first["x"], rtol=0, atol=0, equal_nan=True), name
        # both certified: value within rtol of its own lower bound, and of the whole solve
        assert first["lower"] <= first["value"] <= first["lower"] * (1 + 1e-11), name
        assert first["value"] == pytest.approx(float(whole.value), rel=3e-11), name
        assert whole.num_components == 1, name  # the cases the split solve must not hand back
        assert first["warm_lower"] <= first["warm"] <= first["warm_lower"] * (1 + 1e-9), name
        assert first["warm"] == pytest.approx(float(whole_warm.value), rel=2e-9), name
        # the log-variances (up to the gauge, fixed at row 0 in both) are those of the whole problem
        y = torch.cat([r[name]["y"] for r in records])
        x_whole, y_whole = whole.row_log_variance, whole.col_log_variance
        assert first["attained"] == whole.attained, name
        assert torch.equal(first["x"].isnan(), x_whole.isnan()) and torch.equal(y.isnan(), y_whole.isnan())
        t = float(first["x"].nan_to_num()[0] - x_whole.nan_to_num()[0])
        assert torch.allclose(first["x"] - t, x_whole, atol=1e-5, equal_nan=True), name
        assert torch.allclose(y + t, y_whole, atol=1e-5, equal_nan=True), name
        # nothing larger than the m x m Schur complement crosses processes
        assert all(r[name]["largest_reduce"] == a.shape[0] ** 2 for r in records), name


class _SplitIntoOne(ColumnReduction):
    """A 'split' over one process: the distributed code paths (in-place Schur complement, the
    log-sum-exp over split columns) with every reduction the identity."""

    distributed = True


@pytest.mark.parametrize("comm", [LOCAL, _SplitIntoOne()], ids=["local", "split-paths"])
def test_without_splitting_the_base_reduction_solves_the_whole_problem(comm):
    for name, (a, b) in problems().items():
        sol = solve_split_coefficients(a, b, comm)
        if name == "degenerate":
            assert sol is None
            continue
        whole = solve_normalized_sharpness_coefficients(a[None], b[None])[0]
        assert float(sol.value) == pytest.approx(float(whole.value), rel=3e-11), name


def test_refuses_a_single_row_and_non_finite_coefficients():
    with pytest.raises(ValueError, match="at least 2 rows"):
        solve_split_coefficients(torch.ones(1, 4), torch.ones(1, 4), LOCAL)
    with pytest.raises(ValueError, match="non-finite"):
        solve_split_coefficients(torch.full((2, 4), float("inf")), torch.ones(2, 4), LOCAL)
