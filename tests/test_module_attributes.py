"""Plain module attributes a forward rebinds (a stateful recurrent network's carried hidden state, kept
features, call counters): a measurement puts them back, so training goes on from the state it left."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from callback_models import assert_same_training_state, quiet_trainer, training_state
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_flatness import SharpnessMonitor
from lightning_flatness.functional.module_attributes import attributes_restored
from lightning_flatness.measure import measure_sharpness


class Stateful(pl.LightningModule):
    """Carries its LSTM state from batch to batch as an attribute (stateful training), keeps its last features
    and counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 3)
        self.hidden = None
        self.calls = 0

    def forward(self, x):
        state = self.hidden if self.hidden is not None and self.hidden[0].shape[1] == x.shape[0] else None
        out, (h, c) = self.lstm(x, state)
        self.hidden = (h.detach(), c.detach())
        self.calls += 1
        self.features = out[:, -1]
        return self.head(self.features)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(64, 6, 4, generator=g), torch.randint(0, 3, (64,), generator=g))


def test_a_stateful_network_trains_bit_identically_with_the_monitor():
    data, runs, modules = _data(), {}, {}
    for label, callbacks in [("without", []), ("with", [SharpnessMonitor(num_samples=16, batch_size=8)])]:
        pl.seed_everything(0, verbose=False)
        module = Stateful()
        trainer = quiet_trainer(callbacks, max_epochs=2)
        trainer.fit(module, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
        runs[label], modules[label] = training_state(module, trainer), module
        if callbacks:
            assert len(callbacks[0].history) == 2 and callbacks[0].history[-1]["normalized"] > 0
    assert_same_training_state(runs["with"], runs["without"])
    ours, theirs = modules["with"], modules["without"]
    assert ours.calls == theirs.calls == 16  # the training steps' calls only
    assert all(torch.equal(a, b) for a, b in zip(ours.hidden, theirs.hidden))
    assert torch.equal(ours.features, theirs.features)


def test_measure_sharpness_leaves_the_attributes_as_it_found_them():
    module = Stateful().eval()
    x, y = _data().tensors
    module(x[:8])
    hidden, features = module.hidden, module.features
    measure_sharpness(module, [(x[:16], y[:16]), (x[16:32], y[16:32])], num_replicates=2)
    assert module.calls == 1 and module.hidden is hidden and module.features is features


def test_rebound_tensor_state_is_restored_and_other_modules_and_new_attributes_are_left_alone():
    module = Stateful()
    lazy = nn.Linear(4, 4)
    lazy.installed = False  # a lazy set-up flag (its hooks, made in place, would not be rolled back)

    def set_up(mod, args):
        mod.installed = True

    lazy.register_forward_pre_hook(set_up)
    both = nn.ModuleDict({"stateful": module, "lazy": lazy})
    before = dict(module.__dict__)
    with attributes_restored(both):
        module(torch.randn(2, 6, 4))
        lazy(torch.randn(2, 4))
        assert module.calls == 1 and module.hidden is not None
    assert module.calls == 0 and module.hidden is None  # the rebound state, the counter with it
    assert "features" in module.__dict__  # created meanwhile: stays
    assert all(module.__dict__[k] is v for k, v in before.items())
    assert lazy.installed  # rebound no tensor: left alone


def test_a_torchmetrics_metric_a_forward_updates_keeps_training_counts():
    """A model that updates a torchmetrics metric in its forward: the measurement's forwards used to add
    their batches to the metric's counts (true positives 4 -> 40); the metric states are attributes it
    rebinds, so they go back."""
    from torchmetrics.classification import MulticlassAccuracy

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
            self.accuracy = MulticlassAccuracy(3)

        def forward(self, x):
            out = self.net(x)
            self.accuracy.update(out.argmax(1), torch.zeros(len(x), dtype=torch.long))
            return out

    torch.manual_seed(0)
    model = Counting().eval()
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    model(x[:4])
    before = {k: v.clone() for k, v in model.accuracy.metric_state.items()}
    measure_sharpness(model, [(x[:16], y[:16]), (x[16:], y[16:])], num_replicates=2)
    after = model.accuracy.metric_state
    assert int(before["tp"].sum() + before["fn"].sum()) == 4  # the one training-like call
    assert all(torch.equal(before[k], after[k]) for k in before)
