"""The reproduction setup (data, label noise, reference models) and the command
examples/reproduce_random_labels.py, run end to end in --quick mode."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_flatness.datasets import make_mnist1d, randomize_labels
from lightning_flatness.reference_models import lenet1d, mlp

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "reproduce_random_labels.py"


def test_randomize_labels_corrupts_the_requested_fraction_deterministically_and_nested_across_ratios():
    labels = torch.arange(1000) % 10
    chosen = {}
    for ratio in (0.0, 0.3, 1.0):
        noisy = randomize_labels(labels, ratio, 10, seed=5)
        assert torch.equal(noisy, randomize_labels(labels, ratio, 10, seed=5))
        # replaced entries: uniform over all 10 classes, so about 1/10 of them keep their label by chance
        changed = noisy != labels
        assert 0.85 * ratio * 1000 <= int(changed.sum()) <= ratio * 1000
        chosen[ratio] = changed
    assert not bool(chosen[0.3][~chosen[1.0]].any())  # the noisier set contains the less noisy one
    assert not torch.equal(
        randomize_labels(labels, 0.3, 10, seed=6), randomize_labels(labels, 0.3, 10, seed=5)
    )
    assert torch.equal(labels, torch.arange(1000) % 10)  # input untouched
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        randomize_labels(labels, 1.5, 10, seed=0)


def test_make_mnist1d_is_deterministic_balanced_and_leaves_the_global_rngs_alone():
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    a = make_mnist1d(num_samples=400, seed=3)
    assert np.random.rand() == expected_next
    b = make_mnist1d(num_samples=400, seed=3)
    assert a.x_train.shape == (320, 40) and a.x_test.shape == (80, 40) and a.num_classes == 10
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert torch.bincount(torch.cat([a.y_train, a.y_test])).tolist() == [40] * 10
    assert abs(float(torch.cat([a.x_train, a.x_test]).mean())) < 1e-6


def test_reference_models_have_the_papers_layer_sizes():
    shapes = [tuple(p.shape) for p in mlp().parameters() if p.ndim == 2]
    assert shapes == [(100, 40), (100, 100), (100, 100), (10, 100)]  # three hidden layers of 100 (Sec. 6.1)
    convs = [tuple(p.shape) for p in lenet1d().parameters() if p.ndim >= 2]
    assert convs == [(6, 1, 5), (16, 6, 5), (120, 112), (84, 120), (10, 84)]  # LeNet-5's widths
    assert all(p.ndim == 1 for p in lenet1d().parameters() if p.ndim < 2)  # every layer has a bias


def _load_script():
    spec = importlib.util.spec_from_file_location("reproduce_random_labels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_reproduction_writes_finite_results_and_normalized_sharpness_survives_the_rescaling_attack(
    tmp_path,
):
    script = _load_script()
    threads = torch.get_num_threads()
    try:
        rows = script.main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # main() sets 1 thread; leave the session as it was

    with open(tmp_path / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == 6  # 3 ratios x 2 architectures x 1 seed
    assert {r["arch"] for r in table} == {"mlp", "lenet1d"}
    measures = ("normalized", "matrix_normalized", "hessian_trace")
    for r in table:
        for key in (
            ("gap", "train_acc_noisy", "test_acc") + measures + tuple(m + "_rescaled" for m in measures)
        ):
            assert math.isfinite(float(r[key])), (key, r[key])
        for m in measures:
            assert float(r[m]) > 0 and float(r[m + "_stderr"]) >= 0
        # the attack preserves the function (float64) ...
        assert float(r["rescaled_output_rel_change"]) < 1e-10
        # ... and normalized sharpness (eq. 17), but not the Hessian trace (eq. 5)
        assert float(r["normalized_rescaled"]) == pytest.approx(float(r["normalized"]), rel=1e-8)
        assert abs(float(r["hessian_trace_rescaled"]) / float(r["hessian_trace"]) - 1) > 1e-3
        assert float(r["gap"]) == pytest.approx(float(r["train_acc_noisy"]) - float(r["test_acc"]), abs=1e-12)

    report = (tmp_path / "results.md").read_text()
    for needle in (
        "Pearson",
        "Spearman",
        "Kendall",
        "Command:",
        "Machine:",
        "Runtime:",
        "| mlp |",
        "| lenet1d |",
    ):
        assert needle in report
    for name in ("scatter_before.png", "scatter_after.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
