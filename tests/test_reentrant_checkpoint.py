"""Reentrant activation checkpointing (``torch.utils.checkpoint(..., use_reentrant=True)``) in a model's
forward: run directly while the estimators differentiate the model, so that ``torch.autograd.grad`` passes
it and a checkpointed first block keeps its curvature."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from callback_models import fit_with_and_without_the_monitor
from oracles import brute_force_hessian_diagonal
from torch import nn
from torch.utils.checkpoint import CheckpointFunction, checkpoint
from torch.utils.data import TensorDataset

from lightning_flatness.functional import hessian_diagonal, select_parameters
from lightning_flatness.functional.reentrant_checkpoint import checkpoints_run_directly


class Checkpointed(nn.Module):
    """``stem`` (optional) -> a checkpointed block -> head; ``reentrant=None`` runs the block plainly."""

    def __init__(self, stem: bool = True, reentrant: bool | None = True) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4) if stem else nn.Identity()
        self.block = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)
        self.reentrant = reentrant

    def forward(self, x):
        h = self.stem(x)
        h = (
            self.block(h)
            if self.reentrant is None
            else checkpoint(self.block, h, use_reentrant=self.reentrant)
        )
        return self.head(h)


def _data(n: int = 32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("stem", [True, False], ids=["after a stem", "first block"])
@pytest.mark.parametrize("method", ["exact", "hessian_sketch", "ggn_hutchinson"])
def test_reentrant_checkpointing_is_measured_as_the_plain_network(stem, method):
    torch.manual_seed(0)
    net = Checkpointed(stem=stem).double()
    x, y = _data()
    names = list(select_parameters(net))
    ours = hessian_diagonal(
        net, F.cross_entropy, x, y, method=method, generator=torch.Generator().manual_seed(0)
    )
    net.reentrant = None
    plain = hessian_diagonal(
        net, F.cross_entropy, x, y, method=method, generator=torch.Generator().manual_seed(0)
    )
    truth = brute_force_hessian_diagonal(net, F.cross_entropy, x, y, names)
    for name in names:
        torch.testing.assert_close(ours[name], plain[name], rtol=1e-12, atol=1e-15)
        if method != "ggn_hutchinson":  # piecewise linear: the sketch's Hessian part is exact as well
            torch.testing.assert_close(ours[name], truth[name], rtol=1e-10, atol=1e-13)
    assert float(ours["block.0.weight"].abs().sum()) > 0


def test_the_replacement_is_undone_on_exit_also_on_error():
    with pytest.raises(KeyError), checkpoints_run_directly():
        with checkpoints_run_directly():  # nested: nothing more
            assert "apply" in CheckpointFunction.__dict__
        raise KeyError("inside")
    assert "apply" not in CheckpointFunction.__dict__  # the inherited Function.apply again
    x = torch.ones(1, 2, requires_grad=True)
    out = checkpoint(nn.Linear(2, 1), x, use_reentrant=True)
    with pytest.raises(RuntimeError, match="incompatible with .grad"):  # torch's own behaviour, back
        torch.autograd.grad(out.sum(), [x])


def test_training_with_reentrant_checkpointing_is_measured_and_bit_identical():
    x, y = _data(64)
    history = fit_with_and_without_the_monitor(Checkpointed, TensorDataset(x.float(), y))
    assert len(history) == 2 and {e["method"] for e in history} == {"exact"}
    assert all(e["normalized"] > 0 for e in history)
