"""The MNIST-1D examples of SharpnessMonitor: the training script and the LightningCLI YAML config."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import yaml

from lightning_flatness import SharpnessMonitor

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread (as the training script sets): tiny models on a shared CPU run 10x slower
    with more. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_script_stops_on_the_sharpness_budget_and_reports_the_cost(tmp_path):
    example = _load("train_mnist1d_monitor")
    out = example.main(
        ["--max-epochs", "4", "--max-sharpness", "0.5", "--logdir", str(tmp_path), "--no-progress-bar"]
    )
    assert out["stopped_early"] and out["epochs"] == 1  # any network is sharper than 0.5
    first = out["history"][0]
    assert first["method"] == "exact" and first["num_samples"] == 512 and math.isfinite(first["normalized"])
    assert out["measure_seconds"] > 0 and out["step_seconds"] > 0
    assert any(tmp_path.rglob("events.out.tfevents.*"))


def test_yaml_cli_example_trains_mnist1d_with_the_monitor(tmp_path):
    settings = yaml.safe_load((EXAMPLES / "cli_config.yaml").read_text())
    assert settings["trainer"]["callbacks"][0]["class_path"] == "lightning_flatness.SharpnessMonitor"
    cli = _load("cli").main(
        [
            "fit",
            "--config",
            str(EXAMPLES / "cli_config.yaml"),
            "--trainer.max_epochs=2",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--data.num_samples=1000",
        ]
    )
    (monitor,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, SharpnessMonitor)]
    assert monitor.num_samples == 512 and len(monitor.history) == 2
    assert monitor.history[-1]["method"] == "exact"
    assert float(cli.trainer.callback_metrics["sharpness/normalized"]) == monitor.history[-1]["normalized"]
    assert any(tmp_path.rglob("events.out.tfevents.*"))
