"""CUDA checks (``pytest -m cuda``, run by ``benchmarks/gpu_check.sh``; skipped without a GPU).

Every value computed on the GPU is compared with an independent CPU float64 computation: a
brute-force Hessian (``torch.func.hessian``) for the estimators, the metric on CPU tensors for the
metric, and the brute-force measures of the trained weights for the callback under ``16-mixed`` and
``bf16-mixed`` training. Tolerances: 1e-9 relative for float64 on the GPU (only summation order
differs), 1e-4 for float32 (TF32 is switched off in the fixture so that matmuls are true float32).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from lightning_flatness.functional import (
    hessian_diagonal,
    normalized_softmax_cross_entropy,
    select_parameters,
)
from lightning_flatness.isolation import preserved_rng_states
from lightning_flatness.measure import measure_sharpness
from lightning_flatness.metric import NormalizedSharpness

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by benchmarks/gpu_check.sh)"),
]


@pytest.fixture(autouse=True)
def _true_float32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _mlp(activation: type = nn.ReLU) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), activation(), nn.Linear(8, 5), activation(), nn.Linear(5, 3)).eval()


def _convnet() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 3, 3, stride=2),
        nn.Flatten(),
        nn.Linear(3, 3),
    ).eval()


def _data(shape: tuple, n: int = 12, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 3, (n,), generator=g)


def _brute_force_diagonal(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """CPU float64 Hessian diagonal of the normalized softmax-CE, one full Hessian per tensor."""
    net = copy.deepcopy(model).cpu().double()
    out = {}
    for name, w in select_parameters(net).items():

        def loss_of(v, name=name):
            logits = torch.func.functional_call(net, {name: v}, (x.cpu().double(),), tie_weights=False)
            return normalized_softmax_cross_entropy(logits, y.cpu())

        out[name] = (
            torch.func.hessian(loss_of)(w.detach()).reshape(w.numel(), w.numel()).diagonal().reshape(w.shape)
        )
    return out


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("build, shape", [(_mlp, (6,)), (_convnet, (2, 6, 6))], ids=["mlp", "convnet"])
def test_exact_estimator_on_cuda_equals_cpu_float64_brute_force(build, shape, dtype, rel):
    model, (x, y) = build(), _data(shape)
    reference = _brute_force_diagonal(model, x, y)
    gpu = copy.deepcopy(model).to("cuda", dtype)
    estimate = hessian_diagonal(
        gpu, normalized_softmax_cross_entropy, x.to("cuda", dtype), y.cuda(), method="exact"
    )
    for name, ref in reference.items():
        assert estimate[name].device.type == "cuda" and estimate[name].dtype == dtype
        scale = ref.abs().max()
        assert torch.allclose(estimate[name].cpu().double(), ref, rtol=0, atol=rel * float(scale)), name


def test_ggn_hutchinson_on_cuda_is_exact_for_relu_networks_with_a_cuda_generator():
    """For a ReLU network H = GGN, so the Hutchinson remainder is zero whatever the probes."""
    model, (x, y) = _mlp(), _data((6,))
    reference = _brute_force_diagonal(model, x, y)
    gpu = copy.deepcopy(model).to("cuda", torch.float64)
    generator = torch.Generator(device="cuda").manual_seed(0)
    estimate = hessian_diagonal(
        gpu,
        normalized_softmax_cross_entropy,
        x.cuda().double(),
        y.cuda(),
        method="ggn_hutchinson",
        num_probes=8,
        generator=generator,
    )
    for name, ref in reference.items():
        assert estimate[name].device.type == "cuda"
        assert torch.allclose(estimate[name].cpu(), ref, rtol=0, atol=1e-9 * float(ref.abs().max())), name


def _joint_hessian(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, dict[str, slice]]:
    """CPU float64 Hessian over all selected weights at once (Hutchinson probes all of them jointly)."""
    net = copy.deepcopy(model).cpu().double()
    weights = {n: w.detach() for n, w in select_parameters(net).items()}
    spans, start = {}, 0
    for name, w in weights.items():
        spans[name] = slice(start, start + w.numel())
        start += w.numel()

    def loss_of(flat):
        params = {n: flat[spans[n]].reshape(w.shape) for n, w in weights.items()}
        logits = torch.func.functional_call(net, params, (x.cpu().double(),), tie_weights=False)
        return normalized_softmax_cross_entropy(logits, y.cpu())

    return torch.func.hessian(loss_of)(torch.cat([w.flatten() for w in weights.values()])), spans


def test_hutchinson_on_cuda_draws_probes_from_the_cuda_generator_and_converges_to_the_brute_force_diagonal():
    model, (x, y) = _mlp(nn.Tanh), _data((6,))
    hessian, spans = _joint_hessian(model, x, y)
    gpu = copy.deepcopy(model).to("cuda", torch.float64)
    probes = 4096

    def run(seed: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator(device="cuda").manual_seed(seed)
        return hessian_diagonal(
            gpu,
            normalized_softmax_cross_entropy,
            x.cuda().double(),
            y.cuda(),
            method="hutchinson",
            num_probes=probes,
            generator=generator,
        )

    cuda_rng = torch.cuda.get_rng_state()
    first, again = run(0), run(0)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)  # the global CUDA stream is never used
    # Rademacher: the per-entry variance of one probe is sum_{j != i} H_ij^2; 5 standard errors per entry
    off_diagonal = hessian - torch.diag(hessian.diagonal())
    std = (off_diagonal.pow(2).sum(dim=1) / probes).sqrt()
    for name, span in spans.items():
        assert first[name].device.type == "cuda"
        assert torch.equal(first[name], again[name])
        error = (first[name].cpu().flatten() - hessian.diagonal()[span]).abs()
        assert bool((error <= 5 * std[span] + 1e-12).all()), (name, float((error / std[span]).max()))


def test_metric_states_and_solve_on_cuda_equal_the_cpu_metric():
    g = torch.Generator().manual_seed(3)
    shapes = {"a": (5, 4), "b": (3, 5)}
    weights = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    groups = {n: torch.rand((4, *s), generator=g, dtype=torch.float64) - 0.1 for n, s in shapes.items()}
    sizes = [3, 4, 5, 6]
    cpu = NormalizedSharpness(shapes, num_replicates=4)
    cpu.update(groups, weights, sizes)
    gpu = NormalizedSharpness(shapes, num_replicates=4).cuda()
    gpu.update({n: t.cuda() for n, t in groups.items()}, {n: w.cuda() for n, w in weights.items()}, sizes)
    assert gpu.count.device.type == "cuda"
    expected, got = cpu.compute(), gpu.compute()
    for key, value in expected.items():
        assert got[key].device.type == "cuda"
        assert float(got[key]) == pytest.approx(float(value), rel=1e-12, abs=1e-15), key


def test_measure_sharpness_keeps_its_states_on_the_models_cuda_device():
    model, (x, y) = _mlp(), _data((6,), n=32)
    batches = [(x[i : i + 8].cuda().double(), y[i : i + 8].cuda()) for i in range(0, 32, 8)]
    result = measure_sharpness(copy.deepcopy(model).to("cuda", torch.float64), batches, num_replicates=4)
    from lightning_flatness.functional import sharpness_measures

    weights = {n: p.detach() for n, p in select_parameters(copy.deepcopy(model).double()).items()}
    reference = sharpness_measures(weights, _brute_force_diagonal(model, x, y))
    assert result["normalized"].device.type == "cuda"
    for key in ("normalized", "matrix_normalized", "hessian_trace"):
        assert float(result[key]) == pytest.approx(float(reference[key]), rel=1e-9), key


def test_preserved_rng_states_restores_the_cuda_generator():
    torch.cuda.init()
    before = torch.cuda.get_rng_state()
    with preserved_rng_states():
        torch.randn(10, device="cuda")
    assert torch.equal(torch.cuda.get_rng_state(), before)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("dtype, rel", [("float64", 1e-9), ("float32", 1e-4)])
def test_callback_under_mixed_precision_on_one_gpu_measures_the_full_precision_value(
    tmp_path, precision, dtype, rel
):
    pl = pytest.importorskip("pytorch_lightning")
    from callback_models import MLP, DataModule, RecordPerRank
    from oracles import brute_force_measures

    from lightning_flatness.callback import SharpnessMonitor

    pl.seed_everything(0, verbose=False)
    monitor = SharpnessMonitor(num_samples=64, batch_size=16, dtype=dtype)
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision=precision,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[monitor, RecordPerRank(str(tmp_path))],
    )
    trainer.fit(MLP(), DataModule())
    record = json.loads((tmp_path / "rank0.json").read_text())
    model = MLP()
    model.load_state_dict(
        {k: v.cpu() for k, v in torch.load(tmp_path / "weights.pt", weights_only=True).items()}
    )
    data = DataModule()
    data.setup("fit")
    idx = torch.tensor(record["indices"])
    reference = brute_force_measures(model, data.train_set.tensors[0][idx], data.train_set.tensors[1][idx])
    for key in ("normalized", "matrix_normalized", "hessian_trace", "normalized/net.2.weight"):
        assert record["logged"][f"sharpness/{key}"] == pytest.approx(reference[key], rel=rel), key
    assert trainer.precision == precision
