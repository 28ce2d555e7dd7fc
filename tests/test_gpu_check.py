"""``benchmarks/gpu_check.sh`` on a CPU machine: its skip path, its syntax, and its Python stages
(imported, and their pure parts checked on synthetic inputs)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = ("ddp_nccl", "fsdp_lightning", "fsdp2_sharded", "bench_cost")


def _load(name: str):
    sys.path.insert(0, str(SCRIPT.parent / "gpu"))
    try:
        spec = importlib.util.spec_from_file_location(
            f"gpu_check_{name}", SCRIPT.parent / "gpu" / f"{name}.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPT.parent / "gpu"))


def test_gpu_check_script_is_valid_bash_and_names_every_stage_script():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    for name in STAGES:
        assert f"benchmarks/gpu/{name}.py" in text and (SCRIPT.parent / "gpu" / f"{name}.py").is_file(), name
    assert "pytest -m cuda" in text


def test_gpu_check_without_cuda_says_so_exits_0_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PY": sys.executable, "GPU_CHECK_OUT": str(out)}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout
    assert not out.exists()


@pytest.mark.parametrize("name", STAGES)
def test_gpu_check_python_stage_imports_without_cuda(name):
    module = _load(name)
    assert callable(module.main)


def test_ddp_stage_comparison_flags_rank_disagreement_and_one_process_mismatch():
    compare = _load("ddp_nccl").compare
    logged = {"sharpness/normalized": 2.0, "sharpness/matrix_normalized": 3.0, "sharpness/hessian_trace": 4.0}
    reference = {"normalized": 2.0, "matrix_normalized": 3.0, "hessian_trace": 4.0}
    assert compare([{"logged": logged}, {"logged": dict(logged)}], reference)["ok"]
    other = {**logged, "sharpness/normalized": 2.0 + 1e-12}
    result = compare([{"logged": logged}, {"logged": other}], reference)
    assert not result["ok"] and not result["identical_on_all_ranks"]
    result = compare([{"logged": logged}], {**reference, "hessian_trace": 4.0 * (1 + 1e-6)})
    assert not result["ok"] and result["relative_error_vs_one_process"]["hessian_trace"] == pytest.approx(
        1e-6, rel=1e-3
    )


def test_cost_stage_table_reports_train_step_units_and_failures():
    table = _load("bench_cost").table
    results = {
        "device": "X",
        "torch": "t",
        "cuda": "c",
        "models": {
            "m": {
                "parameters": 10,
                "train_step_seconds": 0.5,
                "float32": {
                    "method": "exact",
                    "seconds": 2.0,
                    "train_steps": 4.0,
                    "normalized": 1.5,
                    "normalized_stderr": 0.1,
                },
                "float64": {"error": "RuntimeError: out of memory"},
            }
        },
    }
    text = table(results)
    assert "| m | 10 | 0.5000 | float32 | exact | 2.000 | 4.0 |" in text
    assert "failed: RuntimeError: out of memory" in text


@pytest.mark.slow
def test_cost_stage_runs_on_the_cpu_in_quick_mode(tmp_path):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = _load("bench_cost").main(
            [
                "--device",
                "cpu",
                "--quick",
                "--repeats",
                "1",
                "--models",
                "vit_small",
                "--json",
                str(tmp_path / "cost.json"),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    entry = results["models"]["vit_small"]
    # GELU, softmax, layer norm: not piecewise linear, so auto measures the sketched Hessian diagonal
    assert entry["float32"]["method"] == "hessian_sketch"
    assert entry["float32"]["train_steps"] == pytest.approx(
        entry["float32"]["seconds"] / entry["train_step_seconds"]
    )
    # same probes (same generator seed) in both precisions: the values agree to float32 accuracy
    assert entry["float32_relative_difference"] < 1e-4
    assert (tmp_path / "cost.json").is_file()
