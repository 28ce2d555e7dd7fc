"""Buffers a model's forward updates during a measurement (BatchNorm in training mode, a custom counter,
quantization-aware training's observers in any mode) are put back, fake-quantization observers paused, and a
BatchNorm in training mode is named in a warning."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.ao.quantization as quantization
from callback_models import fit_with_and_without_the_monitor
from torch import nn
from torch.utils.data import TensorDataset

from lightning_flatness.functional.buffer_snapshot import buffers_restored
from lightning_flatness.measure import measure_sharpness


class Counting(nn.Module):
    """Counts its calls in a buffer, in any mode (as a module keeping statistics of what it sees would)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.calls += 1
        return x


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), Counting(), nn.Linear(16, 3))


def _data(n: int = 64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _batches():
    x, y = _data()
    return [(x[i::4], y[i::4]) for i in range(4)]


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def _assert_same(before: dict[str, torch.Tensor], net: nn.Module) -> None:
    after = net.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_a_model_in_training_mode_keeps_its_buffers_and_is_warned_about_batch_statistics():
    net = _net().train()
    before = _state(net)
    with pytest.warns(
        UserWarning, match="training mode, where its BatchNorm1d normalises with the statistics"
    ):
        result = measure_sharpness(net, _batches(), num_replicates=4)
    assert result["normalized"] > 0
    _assert_same(before, net)
    assert net.training and net[1].training  # modes untouched too


def test_a_model_in_eval_mode_is_not_warned_and_a_buffer_it_updates_goes_back():
    net = _net().eval()
    before = _state(net)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        measure_sharpness(net, _batches(), num_replicates=4)
    _assert_same(before, net)  # the counter ran in every forward of the measurement, and is back at 0


def test_buffers_go_back_on_error_too():
    net = _net().train()
    with pytest.raises(KeyError), buffers_restored(net):
        net(torch.randn(8, 5))
        assert int(net[3].calls) == 1 and int(net[1].num_batches_tracked) == 1
        raise KeyError("inside")
    assert int(net[3].calls) == 0 and int(net[1].num_batches_tracked) == 0


class QuantizationAware(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = quantization.QuantStub(), quantization.DeQuantStub()
        self.fc1, self.relu, self.fc2 = nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)

    def forward(self, x):
        return self.dequant(self.fc2(self.relu(self.fc1(self.quant(x)))))


def _qat() -> nn.Module:
    torch.manual_seed(0)
    net = QuantizationAware().train()
    net.qconfig = quantization.get_default_qat_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        quantization.prepare_qat(net, inplace=True)
    net(_data()[0])  # a training forward: the observers have seen data
    return net


def test_quantization_observers_are_paused_and_left_as_training_left_them():
    net = _qat().eval()
    before = _state(net)
    first = measure_sharpness(net, _batches(), num_replicates=4)
    _assert_same(before, net)  # scales, zero points, observed ranges
    second = measure_sharpness(net, list(reversed(_batches())), num_replicates=4)
    # the observers paused: every forward quantizes with the same scales, so the batches' order is immaterial
    assert float(first["normalized"]) == pytest.approx(float(second["normalized"]), rel=1e-6)
    observers = [m for m in net.modules() if isinstance(m, quantization.FakeQuantizeBase)]
    assert observers and all(int(m.observer_enabled[0]) == 1 for m in observers)  # enabled again


def test_quantization_aware_training_is_bit_identical_with_and_without_the_monitor():
    x, y = _data()
    history = fit_with_and_without_the_monitor(_qat, TensorDataset(x, y))
    assert len(history) == 2 and all(e["normalized"] > 0 for e in history)


class CachedScale(nn.Module):
    """Creates a buffer in its first forward: under ``inference_mode`` when that is a validation step."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.register_buffer("scale", None, persistent=False)

    def forward(self, x):
        if self.scale is None:
            self.scale = torch.full((3,), 2.0)
        return self.fc(x) * self.scale


def test_a_buffer_made_under_inference_mode_is_left_alone():
    torch.manual_seed(0)
    net = CachedScale().eval()
    with torch.inference_mode():
        net(torch.zeros(1, 5))
    assert net.scale.is_inference()  # a copy back into it would raise outside inference_mode
    x, y = _data(16)
    value = measure_sharpness(net, [(x[:8], y[:8]), (x[8:], y[8:])], num_replicates=2)["normalized"]
    plain = CachedScale().eval()
    plain.load_state_dict(net.state_dict())
    plain.scale = torch.full((3,), 2.0)
    expected = measure_sharpness(plain, [(x[:8], y[:8]), (x[8:], y[8:])], num_replicates=2)["normalized"]
    assert float(value) == pytest.approx(float(expected), rel=1e-12) and float(value) > 0
