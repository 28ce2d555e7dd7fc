"""RMS norms written out in elementary operations run as one ``F.rms_norm`` for the Hessian sketch
(:mod:`lightning_flatness.functional.rms_norm_modules`).

- The forms models write (Llama's ``weight * normalized``, Gemma's ``(1 + weight)`` in float32, Llama 4's L2
  norm without a scale) run as ``F.rms_norm`` with the same values; a module with an epsilon that is not an
  RMS norm (a centred norm) keeps its own forward; the modules are restored afterwards.
- The sketched Hessian through a written-out RMS norm is unbiased for the brute-force Hessian; on an untrained
  Llama 4 its error against the brute-force Hessian diagonal is many times smaller with the norms as one op
  (the pieces' curvatures, sampled one by one, cancel only on average)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from expectation import assert_unbiased_traces
from torch import nn
from torch.overrides import TorchFunctionMode
from zoo_oracle import brute_force_hessian_diagonal

import lightning_flatness.functional.estimators.recorder as recorder_module
from lightning_flatness.functional import hessian_diagonal_groups
from lightning_flatness.functional.parameters import select_parameters
from lightning_flatness.functional.rms_norm_modules import is_rms_norm_candidate, rms_norms_as_one_op

F64 = torch.float64


class LlamaNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class GemmaNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.rand(d) - 0.5)

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class L2Norm(nn.Module):  # Llama 4's norm of queries and keys: no scale
    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


class CentredNorm(nn.Module):  # has an epsilon and a weight, but centres: not an RMS norm
    def __init__(self, d: int) -> None:
        super().__init__()
        self.eps = 1e-5
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        c = x - x.mean(-1, keepdim=True)
        return self.weight * c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + self.eps)


class OpNames(TorchFunctionMode):
    """The names of the ops whose output requires grad (the function computed, not the checks without
    gradients)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.requires_grad:
            self.names.append(getattr(func, "__name__", str(func)))
        return out


def test_written_out_rms_norms_run_as_one_op_with_the_same_values():
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 8) * 0.02).requires_grad_()
    for norm in (LlamaNorm(8), GemmaNorm(8), L2Norm(), LlamaNorm(8).double()):
        assert is_rms_norm_candidate(norm)
        inputs = x.to(next(norm.parameters(), x).dtype)  # (a float64 copy keeps requiring grad)
        own = norm(inputs)
        with rms_norms_as_one_op(norm), OpNames() as ops:
            written = norm(inputs)
        assert "rms_norm" in ops.names, type(norm).__name__
        assert "forward" not in norm.__dict__
        torch.testing.assert_close(written, own, rtol=1e-5, atol=1e-6)
    centred = CentredNorm(8)
    assert is_rms_norm_candidate(centred)  # a candidate by its attributes, but its output tells it apart
    with rms_norms_as_one_op(centred), OpNames() as ops:
        kept = centred(x)
    assert "rms_norm" not in ops.names
    torch.testing.assert_close(kept, centred(x), rtol=0, atol=0)
    assert not is_rms_norm_candidate(nn.RMSNorm(8)) and not is_rms_norm_candidate(nn.LayerNorm(8))


class InputPrecisionNorm(LlamaNorm):
    """Llama's norm in the input's precision (float64 here: the oracles compare to float64 rounding)."""

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


class TinyLM(nn.Module):
    """An embedding of scale 0.02 (Hugging Face's initialisation) into a written-out RMS norm, a GELU layer
    and a head: a classifier of ``(N, T)`` token ids, its logits averaged over the positions."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.norm = InputPrecisionNorm(6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(F.gelu(self.mid(self.norm(self.embed(ids))))).mean(dim=1)


def _tiny_lm():
    torch.manual_seed(0)
    model = TinyLM().double().eval()
    g = torch.Generator().manual_seed(1)
    return model, torch.randint(0, 12, (8, 5), generator=g), torch.randint(0, 3, (8,), generator=g)


def test_the_sketch_through_a_written_out_rms_norm_is_unbiased():
    model, ids, y = _tiny_lm()
    assert_unbiased_traces(model, F.cross_entropy, ids, y, list(select_parameters(model)), min_random=3)


def test_one_rms_norm_op_cuts_the_sketch_noise_on_an_untrained_llama(monkeypatch):
    """Hugging Face's Llama 4 (tiny, untrained: weights of scale 0.02; RMS norms and the L2 norm of queries
    and keys written out): the squared error of the sketched Hessian diagonal against the brute force,
    summed over the selected weights and averaged over 8 seeds, with the norms' pieces sampled one by one
    (the rewrite switched off) and with each norm as one op."""
    pytest.importorskip("transformers")
    from zoo_models import tiny_moe

    from lightning_flatness.functional import normalized_softmax_cross_entropy
    from lightning_flatness.functional.model_io import call_model
    from lightning_flatness.measure import resolve_loss

    model, (inputs, labels) = tiny_moe("llama4", n=4, dtype=F64)
    loss = resolve_loss(normalized_softmax_cross_entropy, model, call_model(model, inputs), labels)
    names = list(select_parameters(model))
    truth = brute_force_hessian_diagonal(model, loss, inputs, labels, names)

    def error() -> float:
        total = 0.0
        for seed in range(8):
            est = hessian_diagonal_groups(
                model,
                loss,
                inputs,
                labels,
                method="hessian_sketch",
                parameters=names,
                generator=torch.Generator().manual_seed(seed),
            ).groups
            total += sum(float((est[n][0] - truth[n]).square().sum()) for n in names)
        return total

    as_one_op = error()
    monkeypatch.setattr(recorder_module, "rms_norms_as_one_op", _unchanged)
    pieces = error()
    assert as_one_op < 0.05 * pieces, (as_one_op, pieces)


class _unchanged:  # the context manager switched off
    def __init__(self, model: nn.Module) -> None:
        pass

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
