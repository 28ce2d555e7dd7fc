"""The stochastic estimators call models on tensor, tuple and dict inputs (``call_model``) and read
logits from tuples, dicts and ``(N, T, V)`` token outputs: same estimate as the plain-tensor model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_flatness.functional.estimators.finite_difference import finite_difference_hessian_diagonal
from lightning_flatness.functional.estimators.hutchinson import hutchinson_hessian_diagonal
from lightning_flatness.functional.model_io import TokenLoss, map_inputs

torch.set_num_threads(1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class TwoInputs(Net):
    """``model(x, scale)`` / ``model(x=..., scale=...)`` returning a dict with logits."""

    def forward(self, x, scale):  # noqa: D102
        return {"logits": super().forward(x * scale), "hidden": x}


@pytest.mark.parametrize("estimator", [hutchinson_hessian_diagonal, finite_difference_hessian_diagonal])
def test_tuple_and_dict_inputs_give_the_plain_tensor_estimate(estimator):
    torch.manual_seed(0)
    plain = Net().double()
    two = TwoInputs().double()
    two.load_state_dict(plain.state_dict())
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 3, (16,))
    scale = torch.full((16, 1), 2.0, dtype=torch.float64)
    runs = []
    for model, inputs in ((plain, 2.0 * x), (two, (x, scale)), (two, {"x": x, "scale": scale})):
        params = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
        with torch.inference_mode():  # inference tensors are cloned, not rejected
            frozen = map_inputs(inputs, torch.clone)
        assert all(
            t.is_inference()
            for t in (
                [frozen]
                if isinstance(frozen, torch.Tensor)
                else (frozen.values() if isinstance(frozen, dict) else frozen)
            )
        )
        runs.append(
            estimator(
                model,
                F.cross_entropy,
                frozen,
                y,
                params,
                num_probes=8,
                generator=torch.Generator().manual_seed(1),
            )
        )
    for other in runs[1:]:
        for n in runs[0]:
            assert torch.allclose(other[n], runs[0][n], rtol=1e-10, atol=1e-12)


def test_token_logits_with_token_loss_equal_the_flattened_classifier():
    """(N, T, V) logits under TokenLoss (ignore_index -100) equal the classifier on the valid rows."""
    torch.manual_seed(0)
    model = Net().double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (4, 5))
    y[1, 3:] = -100
    valid = y != -100
    params = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    tokens = hutchinson_hessian_diagonal(
        model,
        TokenLoss(F.cross_entropy),
        x,
        y,
        params,
        num_probes=8,
        generator=torch.Generator().manual_seed(2),
    )
    rows = hutchinson_hessian_diagonal(
        model,
        F.cross_entropy,
        x[valid],
        y[valid],
        params,
        num_probes=8,
        generator=torch.Generator().manual_seed(2),
    )
    for n in params:
        assert torch.allclose(tokens[n], rows[n], rtol=1e-10, atol=1e-12)
