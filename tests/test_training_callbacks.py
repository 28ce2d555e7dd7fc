"""The monitor as Lightning users set up training: callbacks that change what is trained (``WeightAveraging``
swaps averaged weights in for validation, so which weights are measured follows the callbacks' order, and the
monitor says which; ``BackboneFinetuning`` adds tensors to the default selection, and the monitor says so), a
LightningModule without ``forward``, and dict batches with columns ``forward`` does not take."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from callback_models import Wrapped, quiet_trainer
from pytorch_lightning.callbacks import BackboneFinetuning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_flatness import SharpnessMonitor

WeightAveraging = pytest.importorskip("pytorch_lightning.callbacks").WeightAveraging


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g))


def _fit(order: str) -> tuple[list[float], list[str]]:
    data = _data()
    pl.seed_everything(0, verbose=False)
    monitor = SharpnessMonitor(num_samples=32)
    callbacks = {
        "monitor first": [monitor, WeightAveraging()],
        "averaging first": [WeightAveraging(), monitor],
        "no averaging": [monitor],
    }[order]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(callbacks, max_epochs=3).fit(
            Wrapped(nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))),
            DataLoader(data, batch_size=8, shuffle=True),
            DataLoader(data, batch_size=8),
        )
    said = [str(w.message) for w in caught if "WeightAveraging in the Trainer's callbacks" in str(w.message)]
    return [entry["normalized"] for entry in monitor.history], said


def test_the_monitor_says_which_weights_it_measures_beside_weight_averaging():
    plain, said_plain = _fit("no averaging")
    after, said_after = _fit("averaging first")
    before, said_before = _fit("monitor first")
    assert said_plain == []
    assert len(said_after) == 1 and "after WeightAveraging" in said_after[0]
    assert "measures the weights training updates" in said_after[0]
    assert len(said_before) == 1 and "measures the averaged weights that validation uses" in said_before[0]
    # WeightAveraging leaves the training weights alone until the fit ends: measured after it, the curve is
    # the one without it, bit for bit; measured before it, the curve is of other weights (the averages)
    assert after == plain
    assert len(before) == 3 and before[0] != plain[0] and before[1:] != plain[1:]


class Finetuned(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(5, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def test_unfreezing_a_backbone_adds_its_tensors_and_the_monitor_says_the_totals_step():
    pl.seed_everything(0, verbose=False)
    monitor = SharpnessMonitor(num_samples=32)
    data = _data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer([BackboneFinetuning(unfreeze_backbone_at_epoch=2), monitor], max_epochs=4).fit(
            Finetuned(), DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=8)
        )
    said = [str(w.message) for w in caught if "the measured tensors changed" in str(w.message)]
    assert (
        len(said) == 1
        and "(epoch 2)" in said[0]
        and "added 2: ['backbone.0.weight', 'backbone.0.bias']" in said[0]
    )
    tensors = [
        sorted(k.split("/", 1)[1] for k in entry if k.startswith("normalized/")) for entry in monitor.history
    ]
    assert tensors == [["head.weight"]] * 2 + [["backbone.0.weight", "head.weight"]] * 2
    for entry in monitor.history:  # the total is the sum of the measured tensors' values
        parts = [v for k, v in entry.items() if k.startswith("normalized/")]
        assert entry["normalized"] == pytest.approx(sum(parts), rel=1e-12)


class WithoutForward(pl.LightningModule):
    """The Lightning pattern without ``forward``: ``training_step`` calls ``self.model`` (and, with
    ``second``, another trained module the monitor cannot choose between)."""

    def __init__(self, second: bool = False) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
        self.criterion = nn.CrossEntropyLoss()  # a child without parameters: not a candidate
        if second:
            self.projector = nn.Linear(3, 3)

    def training_step(self, batch, batch_idx):
        return self.criterion(self.model(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class WithForward(WithoutForward):
    def forward(self, x):
        return self.model(x)


def test_a_module_without_forward_is_measured_through_its_trained_child():
    data, histories = _data(), {}
    for cls in (WithoutForward, WithForward):
        pl.seed_everything(0, verbose=False)
        monitor = SharpnessMonitor(num_samples=16)
        quiet_trainer([monitor], max_epochs=2).fit(
            cls(), DataLoader(data, batch_size=8), DataLoader(data, batch_size=8)
        )
        histories[cls.__name__] = monitor.history
    ours, reference = histories["WithoutForward"], histories["WithForward"]
    assert [e["normalized"] for e in ours] == [e["normalized"] for e in reference] and ours[0][
        "normalized"
    ] > 0
    assert "normalized/0.weight" in ours[0] and "normalized/model.0.weight" in reference[0]


def test_a_module_without_forward_and_two_trained_children_is_refused_with_the_fix():
    data = _data()
    trainer = quiet_trainer([SharpnessMonitor(num_samples=16)], max_epochs=1)
    with pytest.raises(
        RuntimeError, match="defines no forward.*override `SharpnessMonitor.measured_network`"
    ):
        trainer.fit(
            WithoutForward(second=True), DataLoader(data, batch_size=8), DataLoader(data, batch_size=8)
        )
    assert trainer.global_step == 0


class Columns(torch.utils.data.Dataset):
    """Dict samples as a tokenized dataset gives them: token ids, a mask, the label, and, with ``extra``,
    columns ``forward`` does not take (an index, the raw text)."""

    def __init__(self, extra: bool) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids, self.labels = (
            torch.randint(0, 20, (64, 5), generator=g),
            torch.randint(0, 3, (64,), generator=g),
        )
        self.extra = extra

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        sample = {"input_ids": self.ids[i], "attention_mask": torch.ones(5), "labels": self.labels[i]}
        if self.extra:
            sample.update(idx=i, text=f"sample {i}")
        return sample


class TokenClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(20, 4), nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids) * attention_mask[..., None]
        return self.fc(torch.relu(h.mean(dim=1)))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_dict_batches_with_columns_forward_does_not_take_are_measured_without_them():
    histories = []
    for extra in (False, True):
        pl.seed_everything(0, verbose=False)
        monitor = SharpnessMonitor(num_samples=32)
        data = Columns(extra)
        quiet_trainer([monitor], max_epochs=2).fit(
            TokenClassifier(), DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=8)
        )
        histories.append(monitor.history)
    plain, extra = histories
    assert [e["method"] for e in extra] == ["exact", "exact"]
    assert [e["normalized"] for e in extra] == [e["normalized"] for e in plain] and plain[0]["normalized"] > 0


class HeadOutsideForward(pl.LightningModule):
    """``forward`` returns features and ``training_step`` applies the head (``"outside"``); or the head inside
    ``forward`` (``"inside"``); or an auxiliary head that only training mode uses (``"auxiliary"``)."""

    def __init__(self, layout: str) -> None:
        super().__init__()
        self.layout = layout
        self.backbone = nn.Sequential(nn.Linear(5, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)
        if layout == "auxiliary":
            self.aux = nn.Linear(16, 3)

    def forward(self, x):
        features = self.backbone(x)
        if self.layout == "outside":
            return features
        logits = self.head(features)
        return logits + self.aux(features) if self.layout == "auxiliary" and self.training else logits

    def training_step(self, batch, batch_idx):
        out = self(batch[0])
        return F.cross_entropy(self.head(out) if self.layout == "outside" else out, batch[1])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    "layout, parameters, unreached",
    [
        ("outside", None, ["head.weight", "head.bias"]),
        ("inside", None, []),
        ("auxiliary", None, ["aux.weight", "aux.bias"]),
        ("auxiliary", ["backbone.0.weight", "head.weight"], []),
    ],
)
def test_trained_parameters_the_measured_output_does_not_depend_on_are_named(layout, parameters, unreached):
    data = _data()
    pl.seed_everything(0, verbose=False)
    monitor = SharpnessMonitor(num_samples=16, parameters=parameters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer([monitor], max_epochs=1).fit(
            HeadOutsideForward(layout), DataLoader(data, batch_size=8), DataLoader(data, batch_size=8)
        )
    said = [str(w.message) for w in caught if "does not depend on" in str(w.message)]
    if not unreached:
        assert said == []
        return
    assert len(said) == 1 and f"({', '.join(unreached)})" in said[0] and "`measured_network`" in said[0]
    for name in unreached:  # what the message says: their curvature is 0 in every measure
        assert monitor.history[0][f"hessian_trace/{name}"] == 0.0
