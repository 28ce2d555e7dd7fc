"""CI smoke tests of the benchmarks: each script's ``--quick`` mode runs end to end and its outputs
are finite and consistent. No timing assertions (the timings of a shared CI machine are noise);
the values checked are properties of the computations, not of the machine.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_accuracy_reference_groups_pool_to_the_full_set_exact_measures():
    """The accuracy benchmark's shortcut (exact diagonals of 32-sample groups, subsets as means of
    groups) gives the same normalized sharpness as the exact method run on the samples directly."""
    from benchmarks.bench_accuracy import Reference
    from benchmarks.common import trained_model, weight_parameters
    from lightning_flatness.functional import (
        hessian_diagonal,
        normalized_softmax_cross_entropy,
        sharpness_measures,
    )

    torch.set_num_threads(1)
    model, x, y, _ = trained_model("mlp", epochs=1)
    ref = Reference(model, x, y, lam=0.5, seed=0, num_samples=128)
    weights = {n: p.detach() for n, p in weight_parameters(model).items()}
    direct = sharpness_measures(
        weights, hessian_diagonal(model, normalized_softmax_cross_entropy, ref.x, ref.y), 0.5
    )
    assert ref.measures["normalized"] == pytest.approx(float(direct["normalized"]), rel=1e-4)
    groups = torch.tensor([1, 3])  # a subset: samples 32..63 and 96..127
    xs, ys = ref.samples(groups)
    subset = sharpness_measures(
        weights, hessian_diagonal(model, normalized_softmax_cross_entropy, xs, ys), 0.5
    )
    assert ref.exact_measures(groups)["normalized"] == pytest.approx(float(subset["normalized"]), rel=1e-4)


@pytest.mark.slow
def test_accuracy_quick_reports_finite_errors_nested_probe_costs_and_valid_coverage(tmp_path):
    from benchmarks import bench_accuracy

    out = tmp_path / "accuracy.json"
    results = bench_accuracy.main(["--quick", "--json", str(out), "--plot", str(tmp_path / "acc.png")])
    assert json.loads(out.read_text())["models"]["mlp"]["reference"]["normalized"] > 0
    assert (tmp_path / "acc.png").stat().st_size > 0
    res = results["models"]["mlp"]
    assert res["reference"]["normalized"] > 0 and _finite(res["reference"]["normalized"])
    assert [r["samples"] for r in res["data_part"]] == [64, 128]
    assert all(_finite(r["rms_total"], r["rms_largest"]) and r["rms_total"] >= 0 for r in res["data_part"])
    for method in ("hutchinson", "finite_difference"):
        rows = [r for r in res["probe_part"] if r["method"] == method]
        assert [r["probes"] for r in rows] == [4, 8]
        # cumulative cost of nested probes never decreases
        assert rows[0]["seconds"] <= rows[1]["seconds"]
        assert all(_finite(r["rms_probe_total"], r["rms_total_vs_full"]) for r in rows)
    cov = {r["method"]: r for r in res["coverage"]}
    assert set(cov) == {"exact", "hutchinson", "finite_difference"}
    for row in cov.values():
        assert 0.0 <= row["cover_1se_total"] <= row["cover_2se_total"] <= 1.0
        assert row["median_rel_stderr"] > 0 and _finite(row["median_rel_stderr"], row["rms_error"])


def test_accuracy_fd_study_quick_compares_both_precisions_against_exact():
    from benchmarks import bench_accuracy

    rows = bench_accuracy.main(["--fd-study", "--quick"])["rows"]
    assert {r["dtype"] for r in rows} == {"float32", "float64"}
    assert {(r["method"], r["relative_step"]) for r in rows} == {
        ("hutchinson", None),
        ("finite_difference", 1e-2),
        ("finite_difference", 1e-3),
    }
    assert all(_finite(r["error_total"], r["error_trace"]) and r["error_total"] >= 0 for r in rows)
    # same probes, same model: Hutchinson's error hardly depends on the precision
    hutch = {r["dtype"]: r["error_trace"] for r in rows if r["method"] == "hutchinson"}
    assert hutch["float32"] == pytest.approx(hutch["float64"], rel=1e-3, abs=1e-4)


@pytest.mark.slow
def test_backpack_quick_exact_matches_float64_and_skips_missing_backpack(tmp_path):
    from benchmarks import bench_backpack

    results = bench_backpack.main(["--quick", "--json", str(tmp_path / "bp.json")])
    res = results["models"]["mlp"]
    assert res["values"]["ours_exact_float32_vs_float64"] < 1e-5
    if results["backpack_skipped"] is None:  # BackPACK importable: the values must agree with it
        assert res["values"]["ours_exact"] < 1e-5
    else:
        assert not any(k.startswith("backpack") for k in res["times"])
    for method in ("gradient", "ours_exact", "ours_hutchinson", "pyhessian_probe", "ours_finite_difference"):
        assert res["times"][method]["median"] > 0
    assert res["memory"]["ours_exact"]["peak_mib"] >= 0  # the subprocess measurement ran


@pytest.mark.slow
def test_backpack_warm_quick_times_both_and_agrees_with_backpack(tmp_path):
    from benchmarks import bench_backpack_warm

    out = tmp_path / "warm.json"
    results = bench_backpack_warm.main(["--quick", "--json", str(out)])
    res = results["models"]["mlp"]
    assert res["ms"]["ours_exact"] > 0
    if results["backpack_skipped"] is None:  # BackPACK importable: the same diagonal, and a ratio
        assert res["relative_difference"] < 1e-5
        assert res["backpack_over_ours"] == pytest.approx(
            res["ms"]["backpack_diag_ggn_exact"] / res["ms"]["ours_exact"]
        )
    else:
        assert set(res["ms"]) == {"ours_exact"}
    assert "| mlp | 2 |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_callback_quick_measures_every_epoch_with_the_exact_method():
    from benchmarks import bench_callback

    results = bench_callback.main(["--quick"])
    qs = results["quickstart"]
    assert qs["evaluations"] == qs["epochs"] == 2
    assert qs["method"] == "exact"
    assert _finite(qs["overhead"], qs["eval_in_steps"], qs["rel_stderr_last"]) and qs["rel_stderr_last"] > 0
    row = results["cifar_epoch"][0]
    assert row["steps"] == 40 and row["evaluations"] == 1
    assert row["num_samples_for_5pct"] >= 512


@pytest.mark.slow
def test_scaling_quick_counts_allreduce_bytes_once_and_allgather_bytes_per_process(tmp_path):
    from benchmarks import bench_scaling

    results = bench_scaling.main(["--quick", "--plot", str(tmp_path / "scaling.png")])
    assert all(r["ms"] > 0 and _finite(r["ms"]) for r in results["widths"] + results["samples"])
    assert any(r.get("peak_mib") is not None for r in results["widths"])
    ddp = {r["sync"]: r for r in results["ddp"]}
    ours, gather = ddp["ours"], ddp["torchmetrics_all_gather"]
    assert ours["processes"] == gather["processes"] == 2
    # all_reduce moves each state once (plus a few bytes of layout check); no all-gather
    assert ours["all_reduce_mib"] == pytest.approx(ours["state_mib"], rel=1e-3)
    assert ours["all_gather_out_mib"] == 0
    # torchmetrics' default gathers one copy of every state per process
    assert gather["all_gather_out_mib"] == pytest.approx(2 * gather["state_mib"], rel=1e-3)
    assert (tmp_path / "scaling.png").stat().st_size > 0


@pytest.mark.slow
def test_solver_quick_prints_a_result_row_per_scenario(capsys):
    from benchmarks import bench_solver

    bench_solver.main(["--quick"])
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and " ms " in ln]
    assert len(rows) >= 1


@pytest.mark.slow
def test_measurement_profile_quick_times_every_piece_of_compute(tmp_path):
    """The profile's worker (a subprocess importing this tree) reports the MLP measurement and the pieces
    of compute() it times, each within compute()."""
    from benchmarks import bench_resnet18_measurement_profile as profile

    out = profile.main(["--quick", "--json", str(tmp_path / "p.json")])
    (row,) = out["runs"]["mlp"]["after"]
    assert row["compute_ms"] > 0 and row["add_ms"] > 0
    assert _finite(row["normalized"], row["normalized_stderr"]) and row["normalized"] > 0
    pieces = row["compute_pieces_ms"]
    assert set(pieces) == {"curvature", "cold_solve", "general_warm_solve", "replicate_newton"}
    assert pieces["curvature"] > 0 and pieces["cold_solve"] > 0
    # nested timers, and the median of 2 computes is their mean: the pieces fit inside compute()
    assert sum(pieces.values()) <= 1.01 * row["compute_ms"]


def test_bench_callback_mlp_parts_quick_times_every_configuration():
    from benchmarks import bench_callback_mlp_parts
    from lightning_flatness import SharpnessMonitor

    extra = ["num_samples=128", "defaults, state_key formed at every read"]
    rows = bench_callback_mlp_parts.main(["--quick", "--configs", *bench_callback_mlp_parts.CONFIGS, *extra])[
        "rows"
    ]
    assert [r["config"] for r in rows] == [*bench_callback_mlp_parts.CONFIGS, *extra]
    assert "state_key" not in SharpnessMonitor.__dict__  # the old key's stand-in is gone after its fit
    monitor = SharpnessMonitor(num_samples=48)
    assert bench_callback_mlp_parts._key_formed_at_every_read(monitor) == monitor.state_key
    assert all(0 < r["rel_stderr"] < 1 for r in rows[2:])  # every monitored fit reports its error
    assert rows[0]["overhead_cpu"] == 0.0
    assert all(r["step_seconds"] > 0 and r["validation_seconds_per_epoch"] > 0 for r in rows)
    # the measurement runs inside validation: every configuration with the monitor spends more there than
    # the fits without it (the smaller of the two: one run each, and a first fit in a loaded worker process
    # once took 163 ms a validation against 5.5 ms for the next)
    monitors = [r for r in rows if r["config"] not in ("no callback", "an empty Callback")]
    without = min(r["validation_seconds_per_epoch"] for r in rows[:2])
    assert all(r["validation_seconds_per_epoch"] > without for r in monitors)


def test_bench_mlp_measurement_quick_times_both_parts_of_one_exact_measurement():
    from benchmarks import bench_mlp_measurement

    out = bench_mlp_measurement.main(["--quick"])
    assert out["estimate_ms"] > 0 and out["compute_ms"] > 0 and out["repeats"] == 1
    assert _finite(out["normalized"]) and out["normalized"] > 0
    assert out["samples_per_batch"] == 512
    smaller = bench_mlp_measurement.main(["--quick", "--samples-per-batch", "128"])  # the same groups
    assert smaller["samples_per_batch"] == 128
    assert smaller["normalized"] == pytest.approx(out["normalized"], rel=1e-6)
    lenet = bench_mlp_measurement.main(["--quick", "--model", "lenet"])
    assert lenet["model"] == "lenet" and _finite(lenet["normalized"]) and lenet["normalized"] > 0


def test_bench_column_tape_quick_gives_equal_sums_in_both_arms():
    pytest.importorskip("torchvision")
    from benchmarks import bench_column_tape

    row = bench_column_tape.main(["--quick"])["10"]
    assert row["tape_seconds"] > 0 and row["autograd_seconds"] > 0
    assert row["sums"]["tape"] == pytest.approx(row["sums"]["autograd"], rel=1e-5)


def test_bench_first_order_spread_quick_compares_both_jackknifes_per_tensor():
    pytest.importorskip("torchvision")
    from benchmarks import bench_first_order_spread

    out = bench_first_order_spread.main(["--quick", "--models", "resnet"])
    assert out["rows"] and all(r["rel_se"] > 0 and r["se_ratio"] > 0 for r in out["rows"])
    assert sum(b["tensors"] for b in out["bands"]) == len(out["rows"])


def test_bench_hessian_sketch_quick_compares_estimators_with_the_brute_force_hessian(tmp_path):
    pytest.importorskip("timm")
    from benchmarks import bench_hessian_sketch

    out = bench_hessian_sketch.main(["--quick", "--json", str(tmp_path / "hs.json")])
    row = out["models"]["vit"]["untrained"]
    assert row["normalized_H"] > 0 and _finite(row["ggn_share"])
    assert {"gauss_newton_sketch", "hessian_sketch:1", "hessian_sketch:4"} <= set(row["estimators"])
    assert all(_finite(e["bias"]) and e["seconds"] > 0 for e in row["estimators"].values())
    # what the metric reports on the estimators' batches, and on the exact diagonals of the same batches
    assert all(e["stderr"] > 0 and _finite(e["half_shift"]) for e in row["estimators"].values())
    assert all(_finite(e["bias_from_clipped_entries"]) for e in row["estimators"].values())
    assert (
        row["exact"]["stderr"] > 0 and _finite(row["exact"]["half_shift"]) and 0 <= row["clipped_share"] <= 1
    )
    assert (tmp_path / "hs.md").read_text().count("| vit | untrained |") == 4


def test_bench_hessian_sketch_cost_quick_times_both_sketches_and_a_training_step():
    pytest.importorskip("timm")
    from benchmarks import bench_hessian_sketch_cost

    out = bench_hessian_sketch_cost.main(["--quick", "--sketches", "2", "--one-pass-too"])
    timed = {"gauss_newton_sketch", "hessian_sketch:2", "hessian_sketch:2 one pass"}
    assert set(out["median_seconds"]) == {"train_step", *timed}
    assert out["ratio_to_gauss_newton_sketch"]["gauss_newton_sketch"] == 1.0
    assert all(v > 0 for v in out["training_steps_per_512_samples"].values())
    assert set(out["peak_rss_mib"]) == timed and all(v > 0 for v in out["peak_rss_mib"].values())
    # the same draws with all columns in one pass: the same diagonal (the quick model is one group anyway)
    assert 0 <= out["grouped_against_one_pass_relative_difference"]["hessian_sketch:2"] < 1e-5


@pytest.mark.slow
def test_reach_quick_measures_the_hessian_on_the_per_layer_path(tmp_path):
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    from benchmarks import bench_reach

    out = tmp_path / "reach.json"
    results = bench_reach.main(["--quick", "--json", str(out)])
    assert set(results["models"]) == set(bench_reach.QUICK)
    for name, row in json.loads(out.read_text())["models"].items():
        assert row["status"] == "ok", (name, row)
        expected = ("hessian_sketch", "hessian", "per-layer")
        assert (row["method"], row["quantity"], row["path"]) == expected, name
        assert _finite(row["normalized"]) and row["normalized"] > 0
    assert "| timm vit_tiny (patch 4) |" in out.with_suffix(".md").read_text()


def test_tied_lm_quick_takes_the_per_layer_path_on_gpt2(tmp_path):
    pytest.importorskip("transformers")
    from benchmarks import bench_tied_lm

    out = tmp_path / "tied.json"
    results = bench_tied_lm.main(["--quick", "--json", str(out)])
    row = results["models"]["GPT-2 (tied head, Conv1D)"]
    assert (row["method"], row["quantity"], row["path"]) == ("gauss_newton_mc", "gauss_newton", "per-layer")
    assert _finite(row["squared_norm"]) and row["squared_norm"] > 0
    assert "| GPT-2 (tied head, Conv1D) |" in out.with_suffix(".md").read_text()


def test_torch_sequence_models_quick_take_the_per_layer_path_like_their_batch_first_twins(tmp_path):
    from benchmarks import bench_torch_sequence_models

    out = tmp_path / "sequence.json"
    results = bench_torch_sequence_models.main(["--quick", "--json", str(out)])
    assert len(results["models"]) == 4
    for name, row in results["models"].items():
        first, twin = row["sequence-first"], row["batch-first"]
        quantity = (
            "gauss_newton" if "LSTM" in name or "GRU" in name else "hessian"
        )  # recurrent: a weight per step
        assert (first["quantity"], first["path"]) == (quantity, "per-layer")
        assert (
            twin["method"] == first["method"] and _finite(first["squared_norm"]) and first["squared_norm"] > 0
        )
        assert row["max_difference_relative_to_largest_entry"] < 1e-5
        assert f"| {name} | sequence-first |" in out.with_suffix(".md").read_text()


def test_compute_large_quick_reports_the_pooled_value_and_bounded_memory(tmp_path):
    """A case in a fresh process reports ``compute()``'s value equal to one pooled solve's, and a peak
    memory that is finite; the sweep reports held and streamed values equal to rounding."""
    from benchmarks import bench_compute_large

    torch.set_num_threads(1)
    out = bench_compute_large.main(["--quick", "--json", str(tmp_path / "large.json")])
    (row,) = out["rows"]
    assert not out["failed"]
    assert row["normalized"] == pytest.approx(row["pooled_value"], rel=1e-9)
    assert _finite(row["compute_peak_extra_mib"], row["compute_s"], row["normalized_stderr"])
    assert (tmp_path / "large.md").exists()
    sweep = bench_compute_large.main(["--sweep", "--quick"])["sweep"]
    assert [r["shape"] for r in sweep] == [[100, 100], [256, 256]]
    assert all(r["max_rel_diff"] < 1e-9 and not r["streamed_by_default"] for r in sweep)


def test_vgg16_measurement_quick_measures_a_vgg_with_a_small_classifier(tmp_path):
    from benchmarks import bench_vgg16_measurement

    out = bench_vgg16_measurement.main(["--quick", "--json", str(tmp_path / "vgg.json")])
    assert out["error"] is None and out["method"] == "gauss_newton_sketch"
    assert _finite(out["normalized"], out["normalized_stderr"], out["peak_rss_gib"])
    assert out["largest_weight"] == [512, 512, 3, 3]


def test_loss_forms_quick_measure_nonzero_and_the_compiled_model_compiles_nothing(tmp_path):
    from benchmarks import bench_loss_forms

    out = tmp_path / "loss_forms.json"
    results = bench_loss_forms.main(
        ["--quick", "--repeats", "1", "--compile-backend", "eager", "--json", str(out)]
    )
    rows = {(r["model"], r["loss_fn"]): r for r in results["rows"]}
    assert len(rows) == 13 and all(r["normalized"] > 0 and _finite(r["normalized"]) for r in rows.values())
    # the module form is the functional one: same method and, with the same weights and seed, the same value
    a, b = (
        rows[("MLP, 1000 classes", "F.cross_entropy")],
        rows[("MLP, 1000 classes", "nn.CrossEntropyLoss()")],
    )
    assert a["method"] == b["method"] == "gauss_newton_sketch" and a["normalized"] == b["normalized"]
    compiled = results["compiled"]
    assert compiled["graphs_compiled_by_measurements"] == 0
    assert compiled["normalized"] == compiled["normalized_eager_model"]
    assert "| word-LM LSTM" in out.with_suffix(".md").read_text()


def test_replicate_curvature_quick_gives_the_same_values_on_both_paths(tmp_path):
    from benchmarks import bench_replicate_curvature

    out = bench_replicate_curvature.main(["--quick", "--json", str(tmp_path / "rc.json")])
    assert [r["slot_sums"] for r in out["rows"]] == ["non-negative", "signed (30% negative)"]
    assert all(r["same_values"] and r["allowed_ms"] > 0 for r in out["rows"])
    assert (tmp_path / "rc.md").read_text().count("\n| ") == 3


def test_linear_sample_gradients_quick_gives_equal_gradients_both_ways(tmp_path):
    from benchmarks import bench_linear_sample_gradients

    out = bench_linear_sample_gradients.main(["--quick", "--json", str(tmp_path / "linear.json")])
    assert len(out["rows"]) == 1
    row = out["rows"][0]
    assert row["max_abs_difference"] < 1e-4 and row["one_product_ms"] > 0 and row["sample_by_sample_ms"] > 0
