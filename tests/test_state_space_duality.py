"""Mamba-2's state-space duality (Hugging Face's reference PyTorch scan, ``torch_forward``: chunked
segment sums of ``A dt``, their exponentials, einsums of the chunks; shared by Mamba2, Bamba,
GraniteMoeHybrid and Zamba2). ``auto`` measures the Hessian there on the per-layer path, unbiased for the
brute-force Hessian diagonal, in float32 and in float64: the model runs its scan and its logits in float32
whatever its dtype, so in float64 the sketch's signs (in the logits' dtype) met float64 layer gradients and
the per-layer contraction failed."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from oracles import assert_unbiased, hessian_sketch_draws

from lightning_flatness.functional import hessian_diagonal
from lightning_flatness.functional.estimators.method_choice import choose_method
from lightning_flatness.functional.model_io import extract_logits
from lightning_flatness.measure import resolve_loss

transformers = pytest.importorskip("transformers")

MIXER = "backbone.layers.0.mixer."
NAMES = [MIXER + n for n in ("in_proj.weight", "conv1d.weight", "out_proj.weight", "A_log", "dt_bias")]


def _tiny_mamba2(dtype: torch.dtype) -> torch.nn.Module:
    """One Mamba-2 layer: 2 heads of width 4 tiling the expanded width 8, state 3, chunks of 4 (a sequence
    of 6 spans two), untied head, vocabulary 16, eval mode."""
    config = transformers.Mamba2Config(
        vocab_size=16,
        hidden_size=4,
        state_size=3,
        num_hidden_layers=1,
        expand=2,
        num_heads=2,
        head_dim=4,
        n_groups=1,
        conv_kernel=2,
        chunk_size=4,
        tie_word_embeddings=False,
        use_cache=False,
    )
    torch.manual_seed(0)
    return transformers.Mamba2ForCausalLM(config).to(dtype).eval()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_chunked_scan_takes_the_hessian_sketch_unbiased(dtype):
    from zoo_oracle import brute_force_ggn_diagonal, brute_force_hessian_diagonal

    model = _tiny_mamba2(dtype)
    ids = torch.randint(0, 16, (3, 6), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers: no fused kernels installed, the reference scan runs
        loss = resolve_loss(F.cross_entropy, model, extract_logits(model(**inputs)), ids)
        choice = choose_method(model, loss, inputs, ids)
    assert (choice.method, choice.quantity) == ("hessian_sketch", "hessian"), choice.reason
    of_outputs = lambda out, t: loss(extract_logits(out), t)  # noqa: E731
    reference = brute_force_hessian_diagonal(model, of_outputs, inputs, ids, NAMES, chunk=32)
    ggn = brute_force_ggn_diagonal(model, of_outputs, inputs, ids, NAMES)
    flat = lambda d: torch.cat([d[n].detach().double().flatten() for n in NAMES])  # noqa: E731
    assert float((flat(ggn) - flat(reference)).norm() / flat(reference).norm()) > 0.05  # the residual matters
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback to per-sample passes warns
        warnings.filterwarnings("ignore", message=".*(causal_conv1d|mamba_ssm|torch.jit).*")
        draws = hessian_sketch_draws(model, loss, inputs, ids, NAMES, draws=16)
        exact = hessian_diagonal(model, loss, inputs, ids, method="gauss_newton", parameters=NAMES)
    # the model's float32 scan bounds the agreement, whatever its dtype
    assert_unbiased(draws.double(), flat(reference), atol=1e-6)
    torch.testing.assert_close(flat(exact), flat(ggn), rtol=1e-4, atol=1e-6 * float(flat(ggn).abs().max()))
