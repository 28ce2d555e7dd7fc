"""PyTorch's sequence modules in a Lightning fit: a sequence-first ``nn.TransformerEncoder`` classifier and an
``nn.LSTM`` classifier, each in a plain LightningModule. ``SharpnessMonitor()`` measures them on the
per-layer path (no per-sample fallback warned; the transformer's Hessian, the LSTM's Gauss-Newton diagonal)
and the training run (weights, optimizer state, the global RNG) is bit-identical with and without it: the
layout and recurrence rewrites live only inside the measurement."""

from __future__ import annotations

import pytest
import torch
from test_composite_recurrent import Classifier as RecurrentClassifier
from test_sequence_first_transformers import Classifier as TransformerClassifier
from torch import nn

MODELS = {
    "sequence-first transformer": (lambda: TransformerClassifier(batch_first=False), "hessian_sketch"),
    "lstm": (lambda: RecurrentClassifier(nn.LSTM), "gauss_newton"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_measured_on_the_per_layer_path_without_changing_the_fit(name):
    from callback_models import fit_with_and_without_the_monitor
    from torch.utils.data import TensorDataset

    build, method = MODELS[name]
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randint(0, 7, (32, 5), generator=g), torch.randint(0, 3, (32,), generator=g))
    history = fit_with_and_without_the_monitor(build, data)
    assert len(history) == 2 and all(h["method"] == method for h in history)
    assert all(h["normalized"] > 0 for h in history)
