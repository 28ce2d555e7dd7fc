"""PyTorch's sequence modules in a Lightning fit: a sequence-first ``nn.TransformerEncoder`` classifier and an
``nn.LSTM`` classifier, each in a plain LightningModule. ``SharpnessMonitor()`` measures them on the
per-layer path (no per-sample fallback warned; the transformer's Hessian, the LSTM's Gauss-Newton diagonal)
and the training run (weights, optimizer state, the global RNG) is bit-identical with and without it: the
layout and recurrence rewrites live only inside the measurement."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from test_composite_recurrent import Classifier as RecurrentClassifier
from test_sequence_first_transformers import Classifier as TransformerClassifier
from torch import nn

MODELS = {
    "sequence-first transformer": (lambda: TransformerClassifier(batch_first=False), "hessian_sketch"),
    "lstm": (lambda: RecurrentClassifier(nn.LSTM), "gauss_newton"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_measured_on_the_per_layer_path_without_changing_the_fit(name):
    import pytorch_lightning as pl
    from callback_models import quiet_trainer
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_flatness import SharpnessMonitor

    build, method = MODELS[name]

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = build()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self.net(x), y))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randint(0, 7, (32, 5), generator=g), torch.randint(0, 3, (32,), generator=g))
    runs = {}
    for label, callbacks in [("without", []), ("with", [SharpnessMonitor(num_samples=16)])]:
        pl.seed_everything(0, verbose=False)
        module = Module()
        loaders = DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = quiet_trainer(callbacks, max_epochs=2)
            trainer.fit(module, *loaders)
        assert not any("per-layer contractions do not apply" in str(w.message) for w in caught)
        state = {k: v.clone() for k, v in module.state_dict().items()}
        for i, opt_state in enumerate(trainer.optimizers[0].state_dict()["state"].values()):
            state.update({f"opt.{i}.{k}": torch.as_tensor(v).clone() for k, v in opt_state.items()})
        state["rng"] = torch.random.get_rng_state()
        runs[label] = state
        if callbacks:
            history = callbacks[0].history
            assert len(history) == 2 and all(h["method"] == method for h in history)
            assert all(h["normalized"] > 0 for h in history)
    assert runs["with"].keys() == runs["without"].keys()
    for key in runs["without"]:
        assert torch.equal(runs["with"][key], runs["without"][key]), key
