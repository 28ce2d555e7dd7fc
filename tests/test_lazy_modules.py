"""Lazy modules (``nn.LazyLinear``, ...): parameters that the model's first forward creates. The monitor waits
for them (its checks and dry run run after the first training step); the functional layer says what to do."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from callback_models import Wrapped, fit_with_and_without_the_monitor, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_flatness import SharpnessMonitor
from lightning_flatness.functional.parameters import uninitialized_parameters
from lightning_flatness.measure import measure_sharpness


def lazy_net() -> nn.Module:
    return nn.Sequential(nn.LazyLinear(16), nn.LazyBatchNorm1d(), nn.ReLU(), nn.Linear(16, 3))


def _data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_an_uninitialized_lazy_model_is_refused_with_what_to_do():
    net = lazy_net()
    assert uninitialized_parameters(net) == [
        "0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"
    ]  # fmt: skip
    x, y = _data().tensors
    with pytest.raises(
        ValueError, match=r"lazy modules have not created.*'0.weight'.*run the model on a batch"
    ):
        measure_sharpness(net, [(x, y)])
    net(x)
    assert uninitialized_parameters(net) == []
    assert measure_sharpness(
        net.eval(), [(x[i::2], y[i::2]) for i in range(2)], num_replicates=2
    ).choice.method == ("exact")


def test_training_a_lazy_model_is_measured_and_bit_identical_with_and_without_the_monitor():
    history = fit_with_and_without_the_monitor(lazy_net, _data())
    assert len(history) == 2 and {entry["method"] for entry in history} == {"exact"}
    assert all(entry["normalized"] > 0 for entry in history)


class LazyWritingNet(nn.Module):
    """A lazy layer, and a forward that renormalises a table in place (refused by the dry run)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.LazyLinear(3)
        self.table = nn.Parameter(torch.randn(4, 5) * 3)

    def forward(self, x):
        scale = F.embedding(torch.arange(4), self.table, max_norm=1.0).sum()
        return self.fc(x) * scale


def test_a_dry_run_after_the_first_step_says_when_it_failed():
    torch.manual_seed(0)
    data = _data()
    trainer = quiet_trainer([SharpnessMonitor(num_samples=16)], max_epochs=1)
    with pytest.raises(
        RuntimeError, match="dry run on .* samples after training step 1, which created the lazy"
    ):
        trainer.fit(Wrapped(LazyWritingNet()), DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    assert trainer.global_step == 1
