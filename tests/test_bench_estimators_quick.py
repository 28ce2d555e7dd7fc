"""Smoke tests of the estimator benchmarks of issue 8 (``--quick``): they run end to end, their values
are finite, and the properties that do not depend on the machine hold (BackPACK's ``DiagGGNExact``
equals our exact diagonal; our Monte-Carlo estimator with BackPACK's settings reproduces BackPACK's
``DiagGGNMC`` values on the same draws)."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def test_bench_diagggnmc_quick_matches_backpack_where_the_estimators_coincide():
    pytest.importorskip("backpack")
    from benchmarks import bench_diagggnmc

    rows = {r["estimator"]: r for r in bench_diagggnmc.main(["--quick"])["rows"]}
    assert rows["BackPACK DiagGGNExact"]["diag_rel_l2"] < 1e-5  # float32 rounding only
    ours, theirs = rows["ours mc D1 m0"], rows["BackPACK MC 1"]
    assert ours["diag_values"] == pytest.approx(theirs["diag_values"], rel=1e-4)
    assert all(math.isfinite(r["ms"]) and r["ms"] > 0 for r in rows.values())


def test_bench_resnet18_1000_quick_runs_against_the_exact_reference():
    from benchmarks import bench_resnet18_1000

    rows = bench_resnet18_1000.main(["--quick"])["tiny"]
    assert {r["option"] for r in rows} == {"mc", "sketch:1"}
    assert all(math.isfinite(r["ns_bias"]) and 0 <= r["diag_rel_l2"] < 10 for r in rows)
