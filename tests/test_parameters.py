"""Which parameters count (footnote 5): weights with ndim >= 2, frozen skipped, shared once."""

import pytest
import torch
from torch import nn

from lightning_flatness.functional.parameters import select_parameters


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_default_selects_weights_with_ndim_at_least_two():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.BatchNorm1d(2), nn.Flatten(), nn.Linear(4, 3))
    assert list(select_parameters(model)) == ["0.weight", "3.weight"]


def test_frozen_weights_are_skipped():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    assert list(select_parameters(model)) == ["2.weight"]


def test_shared_weight_is_counted_once():
    assert list(select_parameters(Tied())) == ["a.weight"]


def test_names_and_predicate_choose_parameters():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    assert list(select_parameters(model, ["2.weight"])) == ["2.weight"]
    assert list(select_parameters(model, lambda n, p: n.startswith("0.") and p.ndim == 2)) == ["0.weight"]


@pytest.mark.parametrize(
    "parameters, message",
    [(["nope"], "not a parameter"), (["0.bias"], "1-D"), ("0.weight", "wrap it in a list")],
)
def test_bad_choices_name_the_problem(parameters, message):
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises((ValueError, TypeError), match=message):
        select_parameters(model, parameters)


def test_model_without_weight_matrices_is_an_error_with_the_fix():
    with pytest.raises(ValueError, match="pass `parameters=`"):
        select_parameters(nn.BatchNorm1d(3))
