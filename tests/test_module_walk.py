"""One walk over the modules per measurement (functional/module_walk.py), shared by every step that looks for
modules of a kind, and the same selection of parameters as ``named_parameters`` gives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_flatness.functional import hessian_diagonal, select_parameters
from lightning_flatness.functional.module_walk import modules_of, walked_once, walking


class Counting(nn.Sequential):
    """Counts the walks over its modules (``modules()``; ``named_modules`` is what ``modules`` calls)."""

    walks = 0

    def modules(self):
        Counting.walks += 1
        return super().modules()


def test_an_exact_call_walks_the_modules_once_and_gives_the_same_diagonal():
    torch.manual_seed(0)
    net = Counting(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    Counting.walks = 0
    ours = hessian_diagonal(net, F.cross_entropy, x, y, method="exact")
    assert Counting.walks == 1  # twelve steps look for modules of a kind: one walk for all
    plain = nn.Sequential(*net)
    for name, value in hessian_diagonal(plain, F.cross_entropy, x, y, method="exact").items():
        assert torch.equal(ours[name], value), name


def test_the_walk_is_the_one_taken_on_entry_and_only_for_its_model():
    net = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU()))
    assert not walking(net)
    with walked_once(net) as walk:
        assert walking(net) and not walking(net[1])
        assert modules_of(net) is walk and walk == list(net.modules())
        with walked_once(net) as inner:
            assert inner is walk
        assert modules_of(net[1]) == list(net[1].modules()) and modules_of(net[1]) is not walk
    assert modules_of(net) is not walk and not walking(net)  # a fresh walk outside


def test_the_default_selection_follows_named_parameters_order_and_sharing():
    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    net = nn.Sequential(nn.Embedding(5, 3), shared, nn.LayerNorm(3), nn.Sequential(shared), nn.Linear(3, 2))
    net.pos_embed = nn.Parameter(torch.zeros(1, 4, 3))  # an additive offset: left out
    net.scale = nn.Parameter(torch.ones(3, 1, 1))  # a vector stored with unit dims: left out
    chosen = select_parameters(net)
    expected = ["0.weight", "1.weight", "1.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert list(chosen) == expected
    named = dict(net.named_parameters())
    assert all(chosen[n] is named[n] for n in expected)
