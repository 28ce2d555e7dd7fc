"""Mamba-2's state-space duality (Hugging Face's reference PyTorch scan, ``torch_forward``: chunked
segment sums of ``A dt``, their exponentials, einsums of the chunks; shared by Mamba2, Bamba,
GraniteMoeHybrid and Zamba2). ``auto`` measures the Hessian there on the per-layer path, unbiased for the
brute-force Hessian diagonal, in float32 and in float64: the model runs its scan and its logits in float32
whatever its dtype, so in float64 the sketch's signs (in the logits' dtype) met float64 layer gradients and
the per-layer contraction failed."""

from __future__ import annotations

import pytest
import torch
from causal_lm_checks import assert_sketch_unbiased_on_causal_lm

from lightning_flatness.functional import hessian_diagonal

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
    model = _tiny_mamba2(dtype)
    ids = torch.randint(0, 16, (3, 6), generator=torch.Generator().manual_seed(1))
    # the model's float32 scan bounds the agreement of the entries without spread, whatever its dtype
    loss, inputs, ggn = assert_sketch_unbiased_on_causal_lm(model, ids, NAMES, draws=16, atol=1e-6)
    exact = hessian_diagonal(model, loss, inputs, ids, method="gauss_newton", parameters=NAMES)
    flat = lambda d: torch.cat([d[n].detach().double().flatten() for n in NAMES])  # noqa: E731
    torch.testing.assert_close(flat(exact), flat(ggn), rtol=1e-4, atol=1e-6 * float(flat(ggn).abs().max()))
