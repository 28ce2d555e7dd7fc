"""Weights read through a module's own eval-mode cache (timm's attention-bias tables) are differentiated
during a measurement: against the brute-force Gauss-Newton diagonal of the uncached function."""

from __future__ import annotations

import pytest
import torch
from oracles import brute_force_ggn_diagonal
from torch import nn

from lightning_flatness.functional import (
    hessian_diagonal_groups,
    normalized_softmax_cross_entropy,
    select_parameters,
)
from lightning_flatness.functional.module_caches import recomputed_caches
from lightning_flatness.measure import measure_sharpness

F64 = torch.float64


class CachedBiasAttention(nn.Module):
    """timm's LeViT pattern: ``attention_biases[:, attention_bias_idxs]`` added to the attention scores,
    kept in ``attention_bias_cache`` in eval mode; then mean pooling and a linear head."""

    def __init__(self, tokens: int = 3, width: int = 4, classes: int = 3):
        super().__init__()
        self.qk = nn.Linear(width, 2 * width, bias=False)
        self.attention_biases = nn.Parameter(torch.randn(1, 2 * tokens - 1))
        idx = torch.arange(tokens)
        self.register_buffer(
            "attention_bias_idxs", (idx[:, None] - idx[None, :] + tokens - 1), persistent=False
        )
        self.attention_bias_cache: dict[str, torch.Tensor] = {}
        self.head = nn.Linear(width, classes)

    def biases(self, device: torch.device) -> torch.Tensor:
        if self.training:
            return self.attention_biases[:, self.attention_bias_idxs]
        key = str(device)
        if key not in self.attention_bias_cache:
            self.attention_bias_cache[key] = self.attention_biases[:, self.attention_bias_idxs]
        return self.attention_bias_cache[key]

    def forward(self, x):
        q, k = self.qk(x).chunk(2, dim=-1)
        scores = q @ k.transpose(-2, -1) + self.biases(x.device)
        return self.head((scores.softmax(-1) @ x).mean(1))


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 4, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g)


def test_a_cached_bias_table_gets_its_curvature_after_an_eval_forward_under_inference_mode():
    torch.manual_seed(0)
    model = CachedBiasAttention().double().eval()
    x, y = _data()
    with torch.inference_mode():  # a validation step: fills the cache with a constant
        model(x)
    cache = model.attention_bias_cache
    cached = cache["cpu"]
    names = ["qk.weight", "attention_biases", "head.weight"]
    estimate = hessian_diagonal_groups(
        model, normalized_softmax_cross_entropy, x, y, method="gauss_newton", parameters=names
    ).mean()
    reference_model = CachedBiasAttention().double()
    reference_model.load_state_dict(model.state_dict())
    reference_model.train()  # no cache: the function the weights define
    reference = brute_force_ggn_diagonal(reference_model, normalized_softmax_cross_entropy, x, y, names)
    assert float(reference["attention_biases"].abs().max()) > 1e-6  # the table has curvature
    for name in names:
        torch.testing.assert_close(estimate[name], reference[name], rtol=1e-9, atol=1e-14)
    assert model.attention_bias_cache is cache and model.attention_bias_cache["cpu"] is cached  # restored


def test_recomputed_caches_restore_the_caches_also_on_error_and_nest():
    model = CachedBiasAttention()
    cache = model.attention_bias_cache
    with pytest.raises(RuntimeError, match="boom"):
        with recomputed_caches(model):
            with recomputed_caches(model):  # nested: nothing more swapped
                inner = model.attention_bias_cache
                assert inner is not cache and "cpu" not in inner
            assert model.attention_bias_cache is inner
            raise RuntimeError("boom")
    assert model.attention_bias_cache is cache


def test_timm_levit_attention_biases_are_measured_after_a_validation_forward():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("levit_128s", num_classes=10, img_size=64).eval()
    tables = [p for n, p in model.named_parameters() if n.endswith("attention_biases")]
    with torch.no_grad():  # as after training: timm initialises the tables and the residual branches'
        for p in tables:  # last BatchNorm scales at zero
            p.normal_()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.fill_(1.0)
    batches = [(torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))) for _ in range(2)]
    with torch.inference_mode():
        model(batches[0][0])
    result = measure_sharpness(model, batches, num_replicates=2, method="gauss_newton_sketch")
    keys = [k for k in result.values if k.startswith("normalized/") and k.endswith("attention_biases")]
    selected = [
        n for n, p in select_parameters(model).items() if n.endswith("attention_biases") and p.ndim > 1
    ]
    assert sorted(k.split("/", 1)[1] for k in keys) == sorted(selected) and len(selected) >= len(tables) // 2
    assert all(float(result[k]) > 0 for k in keys)  # a Gauss-Newton sketch of a non-zero table: positive
