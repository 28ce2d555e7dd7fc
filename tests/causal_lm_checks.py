"""A shared check of the tests of Hugging Face causal LMs in their reference PyTorch code (the gated delta
rule, Mamba-2's scan): ``auto`` picks the sketched Hessian, the brute-force Gauss-Newton diagonal differs
from the brute-force Hessian diagonal (so the check can tell them apart), and the sketch's draws, taken on the
per-layer path (a per-sample fallback warns, and fails here), are unbiased for the Hessian diagonal."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from oracles import assert_unbiased, hessian_sketch_draws
from zoo_oracle import brute_force_ggn_diagonal, brute_force_hessian_diagonal

from lightning_flatness.functional.estimators.method_choice import choose_method
from lightning_flatness.functional.model_io import extract_logits
from lightning_flatness.measure import resolve_loss

#: transformers' notes that a fused kernel is not installed and its reference code runs
KERNEL_NOTES = ".*(causal_conv1d|flash-linear-attention|mamba_ssm|torch.jit).*"


def assert_sketch_unbiased_on_causal_lm(
    model: torch.nn.Module, ids: torch.Tensor, names: list[str], draws: int = 40, atol: float = 1e-15
) -> tuple[Callable[..., Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The check above for ``model`` on the token batch ``ids`` (its own targets, cross-entropy) in the
    weights ``names``; ``atol`` for the draws' entries without spread (a model computing in float32 bounds
    it). Returns the resolved loss, the inputs and the brute-force Gauss-Newton diagonal, for more checks."""
    inputs = {"input_ids": ids}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=KERNEL_NOTES)
        loss = resolve_loss(F.cross_entropy, model, extract_logits(model(**inputs)), ids)
        choice = choose_method(model, loss, inputs, ids)
    assert (choice.method, choice.quantity) == ("hessian_sketch", "hessian"), choice.reason
    of_outputs = lambda out, t: loss(extract_logits(out), t)  # noqa: E731
    reference = brute_force_hessian_diagonal(model, of_outputs, inputs, ids, names, chunk=32)
    ggn = brute_force_ggn_diagonal(model, of_outputs, inputs, ids, names)
    flat = lambda d: torch.cat([d[n].detach().double().flatten() for n in names])  # noqa: E731
    assert float((flat(ggn) - flat(reference)).norm() / flat(reference).norm()) > 0.05  # the residual matters
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback to per-sample passes warns
        warnings.filterwarnings("ignore", message=KERNEL_NOTES)
        sampled = hessian_sketch_draws(model, loss, inputs, ids, names, draws=draws)
    assert_unbiased(sampled.double(), flat(reference), atol=atol)
    return loss, inputs, ggn
