"""Embedding tables with ``max_norm`` (their forward renormalises rows in place): measured at the renormalised
table without changing the live one; any other in-place change of a parameter by a forward is refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from callback_models import Wrapped, fit_with_and_without_the_monitor, quiet_trainer
from oracles import brute_force_hessian_diagonal
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_flatness import SharpnessMonitor
from lightning_flatness.functional import hessian_diagonal
from lightning_flatness.functional.embedding_renorm import renormalised_tables
from lightning_flatness.functional.measurement_context import ParametersChangedInPlace
from lightning_flatness.measure import measure_sharpness

MAX_NORM = 1.0


class TableNet(nn.Module):
    """Ids ``(N, 3)`` -> a table with ``max_norm`` -> ReLU MLP: piecewise linear in every weight (exact).
    ``functional=True`` looks the table up with ``F.embedding(..., max_norm=)`` in ``forward`` instead."""

    def __init__(self, functional: bool = False, bag: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.emb = (nn.EmbeddingBag if bag else nn.Embedding)(30, 4, max_norm=MAX_NORM)
        self.fc1 = nn.Linear(4 if bag else 12, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, ids):
        if self.functional:
            h = F.embedding(ids, self.emb.weight, max_norm=MAX_NORM)
        else:
            h = self.emb(ids)
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


def renormalised_by_hand(net: nn.Module) -> nn.Module:
    """A copy whose table holds its rows rescaled as ``embedding_renorm_`` documents (norm above
    ``max_norm``: times ``max_norm / (norm + 1e-7)``) and looks rows up without ``max_norm``."""
    out = copy.deepcopy(net)
    with torch.no_grad():
        w = out.emb.weight
        norms = w.norm(dim=1, keepdim=True)
        w.mul_(torch.where(norms > MAX_NORM, MAX_NORM / (norms + 1e-7), torch.ones_like(norms)))
    out.emb.max_norm = None
    return out


def _data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 30, (n, 3), generator=g), torch.randint(0, 3, (n,), generator=g)


def test_the_table_is_renormalised_inside_and_put_back_bit_for_bit():
    torch.manual_seed(0)
    net = TableNet()
    before = net.emb.weight.detach().clone()
    expected = renormalised_by_hand(net).emb.weight
    assert (before.norm(dim=1) > MAX_NORM).sum() > 20  # most rows above the bound: the case matters
    with renormalised_tables(net):
        assert net.emb.max_norm is None
        torch.testing.assert_close(net.emb.weight, expected, rtol=1e-6, atol=0)
        with renormalised_tables(net):  # nested: nothing more changes
            torch.testing.assert_close(net.emb.weight, expected, rtol=1e-6, atol=0)
        net(_data()[0])
    assert torch.equal(net.emb.weight, before) and net.emb.max_norm == MAX_NORM
    with pytest.raises(KeyError), renormalised_tables(net):  # put back on error too
        raise KeyError("inside")
    assert torch.equal(net.emb.weight, before) and net.emb.max_norm == MAX_NORM


@pytest.mark.parametrize("bag", [False, True], ids=["Embedding", "EmbeddingBag"])
def test_a_max_norm_table_is_measured_at_its_renormalised_rows_and_left_unchanged(bag):
    torch.manual_seed(0)
    net = TableNet(bag=bag).double()
    x, y = _data()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    reference = renormalised_by_hand(net)
    if not bag:  # autograd has no double backward of embedding_bag: the bag is compared with its twin below
        names = ["emb.weight", "fc1.weight"]
        ours = hessian_diagonal(net, F.cross_entropy, x, y, method="exact", parameters=names)
        truth = brute_force_hessian_diagonal(reference, F.cross_entropy, x, y, names)
        for name in names:
            torch.testing.assert_close(ours[name], truth[name], rtol=1e-10, atol=1e-13)
    batches = [_data(16, seed) for seed in range(4)]
    measured, expected = (
        measure_sharpness(model, batches, num_replicates=4, generator=torch.Generator().manual_seed(0))
        for model in (net, reference)
    )
    assert measured.choice.method == expected.choice.method == "exact"
    for key in ("normalized", "matrix_normalized", "hessian_trace", "normalized_stderr"):
        torch.testing.assert_close(measured[key], expected[key], rtol=1e-12, atol=0)
    for name, value in before.items():
        assert torch.equal(dict(net.named_parameters())[name], value), name
    assert net.emb.max_norm == MAX_NORM


def test_a_forward_that_changes_a_parameter_in_place_is_refused_by_name():
    torch.manual_seed(0)
    net = TableNet(functional=True)
    with pytest.raises(ParametersChangedInPlace, match=r"\['emb.weight'\].*nn.Embedding\(max_norm=\)"):
        measure_sharpness(net, [_data(16, seed) for seed in range(2)], num_replicates=2)
    # the same network with the table as a module is measured
    assert (
        measure_sharpness(TableNet(), [_data(16, seed) for seed in range(2)], num_replicates=2)["normalized"]
        > 0
    )


def test_training_with_a_max_norm_table_is_bit_identical_with_and_without_the_monitor():
    history = fit_with_and_without_the_monitor(TableNet, TensorDataset(*_data()))
    assert len(history) == 2 and all(entry["normalized"] > 0 for entry in history)
    assert {entry["method"] for entry in history} == {"exact"}


def test_the_monitor_refuses_a_forward_that_changes_its_weights_before_training():
    torch.manual_seed(0)
    module = Wrapped(TableNet(functional=True))
    data = TensorDataset(*_data())
    trainer = quiet_trainer([SharpnessMonitor(num_samples=16)], max_epochs=1)
    with pytest.raises(RuntimeError, match="dry run.*changed 1 of its parameters in place.*emb.weight"):
        trainer.fit(module, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    assert trainer.global_step == 0
