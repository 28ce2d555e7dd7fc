"""A model whose own ``forward`` enters ``torch.autocast``: a measurement computes it in the dtype of its
tensors (as for a network trained in 16-bit mixed precision, whose autocast the training loop enters), so
every estimator runs and measures the full-precision network; training keeps its autocast."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from callback_models import MLP, DataModule, assert_same_training_state, quiet_trainer, training_state
from oracles import brute_force_measures
from paired_measurements import KEYS, measured_alike
from torch import nn

from lightning_flatness import SharpnessMonitor
from lightning_flatness.functional.estimators.registry import ESTIMATORS
from lightning_flatness.functional.model_io import model_autocast_disabled


class _Autocast(nn.Module):
    """``net`` run under ``torch.autocast`` (bfloat16 on the CPU), its logits cast back to float32."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.net(x).float()


def _half_dtype(module: nn.Module, x: torch.Tensor) -> torch.dtype:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return module(x).dtype


def test_autocast_entered_in_the_block_is_disabled_and_restored_after_it_also_on_error():
    linear = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    assert _half_dtype(linear, x) == torch.bfloat16
    with model_autocast_disabled():
        assert _half_dtype(linear, x) == torch.float32
        with torch.amp.autocast("cpu", torch.bfloat16, True):  # positional, the torch.amp name
            assert linear(x).dtype == torch.float32
        with model_autocast_disabled():  # nested
            assert _half_dtype(linear, x) == torch.float32
        assert _half_dtype(linear, x) == torch.float32
    assert _half_dtype(linear, x) == torch.bfloat16
    with pytest.raises(ValueError, match="inside"):
        with model_autocast_disabled():
            raise ValueError("inside")
    assert _half_dtype(linear, x) == torch.bfloat16


@pytest.mark.parametrize("method", ["auto", *ESTIMATORS])
def test_every_estimator_measures_the_full_precision_network(method):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    data = [(torch.randn(16, 5), torch.randint(0, 3, (16,))) for _ in range(4)]
    model = _Autocast(net)
    assert model(data[0][0]).dtype == torch.float32 and net(data[0][0]).dtype == torch.float32

    plain, autocast = measured_alike([net, model], data, method)
    assert autocast.choice == plain.choice
    for key in KEYS:
        assert float(autocast[key]) == pytest.approx(float(plain[key]), rel=1e-6)  # same draws, float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(data[0][0]).dtype == torch.bfloat16  # autocast works again after the measurement


class _AutocastMLP(MLP):
    """The test MLP with its forward under bfloat16 autocast, trained so."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.net(x).float()


def test_a_lightning_module_with_autocast_in_forward_is_measured_in_full_precision_and_trains_unchanged():
    runs = {}
    for label, callbacks in [("without", []), ("with", [SharpnessMonitor(num_samples=32)])]:
        pl.seed_everything(0, verbose=False)
        model, dm = _AutocastMLP(), DataModule()
        trainer = quiet_trainer(callbacks, max_epochs=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, dm)
        runs[label] = training_state(model, trainer)
        if callbacks:
            monitor = callbacks[0]
            assert [h["method"] for h in monitor.history] == ["exact", "exact"]
            idx = monitor.state_dict()["indices"]
            x, y = dm.train_set.tensors[0][idx], dm.train_set.tensors[1][idx]
            ref = brute_force_measures(model.net, x, y)  # the float32 network, no autocast
            assert monitor.history[-1]["normalized"] == pytest.approx(ref["normalized"], rel=1e-4)
    assert_same_training_state(runs["with"], runs["without"])
