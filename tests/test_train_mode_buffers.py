"""A model measured in training mode: the buffers its modules update in forward (BatchNorm's running
statistics, a custom counter) are put back, and the BatchNorm case is named in a warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_flatness.functional.train_mode_buffers import train_mode_buffers_restored
from lightning_flatness.measure import measure_sharpness


class Counting(nn.Module):
    """Counts its training-mode calls in a buffer (as a module keeping an exponential average would)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        if self.training:
            self.calls += 1
        return x


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), Counting(), nn.Linear(16, 3))


def _batches():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g)
    return [(x[i::4], y[i::4]) for i in range(4)]


def test_a_model_in_training_mode_keeps_its_buffers_and_is_warned_about_batch_statistics():
    net = _net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.warns(
        UserWarning, match="training mode, where its BatchNorm1d normalises with the statistics"
    ):
        result = measure_sharpness(net, _batches(), num_replicates=4)
    assert result["normalized"] > 0
    after = net.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert net.training and net[1].training  # modes untouched too


def test_a_model_in_eval_mode_is_not_warned_and_its_buffers_are_not_copied():
    net = _net().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        measure_sharpness(net, _batches(), num_replicates=4)
    # eval-mode modules: nothing to put back, so an update made inside stays (nothing was copied)
    with train_mode_buffers_restored(net):
        net[3].calls += 5
    assert int(net[3].calls) == 5


def test_buffers_go_back_on_error_too():
    net = _net().train()
    with pytest.raises(KeyError), train_mode_buffers_restored(net):
        net(torch.randn(8, 5))
        assert int(net[3].calls) == 1 and int(net[1].num_batches_tracked) == 1
        raise KeyError("inside")
    assert int(net[3].calls) == 0 and int(net[1].num_batches_tracked) == 0
