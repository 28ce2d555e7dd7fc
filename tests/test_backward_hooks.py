"""Module backward hooks during a measurement: suspended (they would take the estimators' columns for
gradients, and a custom autograd Function would hide the layers from the recorder), put back after."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from callback_models import MLP, DataModule, quiet_trainer
from paired_measurements import KEYS, measured_alike
from torch import nn

from lightning_flatness import SharpnessMonitor
from lightning_flatness.functional.backward_hooks import backward_hooks_suspended
from lightning_flatness.functional.estimators.registry import ESTIMATORS


def _backward(module: nn.Module) -> None:
    module(torch.ones(3, 4)).sum().backward()


def test_every_kind_of_backward_hook_is_suspended_and_put_back_in_order():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    calls: list[str] = []
    handles = [
        net[0].register_full_backward_hook(lambda m, gi, go: calls.append("full")),
        net[0].register_full_backward_hook(lambda m, gi, go: calls.append("full, second")),
        net[2].register_full_backward_pre_hook(lambda m, go: calls.append("pre")),
        nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: calls.append("global")),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        legacy = nn.Sequential(nn.Linear(4, 2))
        handles.append(legacy[0].register_backward_hook(lambda m, gi, go: calls.append("legacy")))
    try:
        with backward_hooks_suspended(net), backward_hooks_suspended(legacy):
            with backward_hooks_suspended(net):  # nested: nothing more to take
                _backward(net)
            _backward(net)
            _backward(legacy)
        assert calls == []
        _backward(net)
        assert calls.count("global") >= 2 and "pre" in calls
        assert calls.index("full") < calls.index("full, second")  # the order is kept
        calls.clear()
        _backward(legacy)
        assert "legacy" in calls
        with pytest.raises(RuntimeError, match="inside"):
            with backward_hooks_suspended(net):
                raise RuntimeError("inside")
        calls.clear()
        handles[0].remove()  # the user's handles still work
        _backward(net)
        assert "full" not in calls and "full, second" in calls
    finally:
        for handle in handles:
            handle.remove()


class _ScaledGradients(nn.Module):
    """A ReLU MLP whose middle layer has a backward hook that halves its input gradient and counts calls."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        self.calls = 0
        self.net[2].register_full_backward_hook(self._halve)

    def _halve(self, module, grad_input, grad_output):
        self.calls += 1
        return tuple(None if g is None else 0.5 * g for g in grad_input)

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("method", ["auto", *ESTIMATORS])
def test_estimators_measure_the_loss_not_the_hooks_and_leave_them_alone(method):
    """The hook changes training's gradients, not the loss: every estimator measures the hook-free network
    (the same draws), `auto` picks what it picks without the hook (exact), and the hook is never called."""
    model = _ScaledGradients()
    plain = _ScaledGradients()
    plain.net[2]._backward_hooks.clear()
    data = [(torch.randn(16, 5), torch.randint(0, 3, (16,))) for _ in range(4)]

    hooked, reference = measured_alike([model, plain], data, method)
    assert hooked.choice == reference.choice
    for key in KEYS:
        assert float(hooked[key]) == float(reference[key])
    assert model.calls == 0
    F.cross_entropy(model(data[0][0]), data[0][1]).backward()
    assert model.calls == 1  # still registered


class _HookedMLP(MLP):
    """The test MLP with a backward hook on its middle layer that counts the backward passes through it."""

    def __init__(self) -> None:
        super().__init__()
        self.backward_calls = 0
        self.net[2].register_full_backward_hook(self._count)

    def _count(self, module, grad_input, grad_output):
        self.backward_calls += 1


def _hook_calls_with_and_without_the_monitor(build, calls: str) -> dict[str, tuple[int, int]]:
    """``(hook calls, training steps)`` of a 2-epoch fit of ``build()`` without and with the monitor (which
    must measure the exact Hessian: the hooks hide nothing from it)."""
    counts = {}
    for label, callbacks in [("without", []), ("with", [SharpnessMonitor(num_samples=32)])]:
        pl.seed_everything(0, verbose=False)
        model = build()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quiet_trainer(callbacks, max_epochs=2).fit(model, DataModule())
        counts[label] = (getattr(model, calls), model.training_steps)
        if callbacks:
            assert [h["method"] for h in callbacks[0].history] == ["exact", "exact"]
    return counts


def test_a_fit_calls_a_backward_hook_for_its_training_steps_only():
    counts = _hook_calls_with_and_without_the_monitor(_HookedMLP, "backward_calls")
    assert counts["with"] == counts["without"] == (16, 16)


class _SavesGradients(nn.Module):
    """A ReLU MLP whose forward asks for its hidden layer's gradient (a saliency map): ``retain_grad`` and
    a tensor hook that records the gradient, unconditionally (torch refuses both without gradient)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        self.saved: list[torch.Tensor] = []

    def forward(self, x):
        h = self.net[:2](x)
        h.retain_grad()
        h.register_hook(self.saved.append)
        return self.net[2:](h)


@pytest.mark.parametrize("method", ["auto", *ESTIMATORS])
def test_tensor_hooks_a_forward_registers_are_left_out(method):
    """``retain_grad`` and ``register_hook`` in ``forward``: the gradient-free forwards of the measurement no
    longer fail on them, the recorded ones leave them out (the exact method applies: ReLU), the values are
    the plain network's and no gradient of the measurement is recorded."""
    model = _SavesGradients()
    data = [(torch.randn(16, 5), torch.randint(0, 3, (16,))) for _ in range(4)]
    hooked, reference = measured_alike([model, model.net], data, method)
    assert hooked.choice == reference.choice
    assert method != "auto" or hooked.choice.method == "exact"
    for key in KEYS:
        assert float(hooked[key]) == float(reference[key])
    assert model.saved == []
    F.cross_entropy(model(data[0][0]), data[0][1]).backward()
    assert len(model.saved) == 1  # training's backward still records


class _GuardedSaliencyMLP(MLP):
    """The test MLP keeping and counting its hidden gradient in training, as saliency code guards it."""

    def __init__(self) -> None:
        super().__init__()
        self.saved = 0

    def _count(self, grad):
        self.saved += 1

    def forward(self, x):
        h = self.net[:2](x)
        if h.requires_grad:
            h.retain_grad()
            h.register_hook(self._count)
        return self.net[2:](h)


def test_a_fit_records_tensor_hook_gradients_of_its_training_steps_only():
    counts = _hook_calls_with_and_without_the_monitor(_GuardedSaliencyMLP, "saved")
    assert counts["with"] == counts["without"] == (16, 16)
