"""Multiple choice as Hugging Face trains it (``*ForMultipleChoice``: ``input_ids`` ``(N, choices, T)``, one
label per sample, logits ``(N, choices)``). The model runs its encoder on ``(N * choices, T)`` rows, so
every layer, the embedding lookups included, sees several rows per sample along dim 0, sample-major: the
per-layer contractions read them as more positions of each sample (``EmbeddingRule.regroup``) and BERT's
default token types, a buffer expanded to those rows, count as per-sample data. Values against float64
brute force; rows in another order are caught by the batch-independence probe."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from expectation import assert_unbiased_traces  # noqa: E402
from zoo_models import tiny_bert_multiple_choice  # noqa: E402
from zoo_oracle import brute_force_ggn_diagonal  # noqa: E402

from lightning_flatness.functional import normalized_softmax_cross_entropy  # noqa: E402
from lightning_flatness.functional.estimators.gauss_newton import gauss_newton_exact_diagonal  # noqa: E402
from lightning_flatness.functional.parameters import select_parameters  # noqa: E402
from lightning_flatness.measure import measure_sharpness  # noqa: E402


def _bert_multiple_choice(n: int = 4, token_types: bool = False):
    model, (inputs, labels) = tiny_bert_multiple_choice(n, dtype=torch.float64, token_types=token_types)
    return model, inputs, labels


@pytest.mark.parametrize("token_types", [False, True])
def test_the_gauss_newton_diagonal_takes_the_per_layer_path_and_equals_brute_force(token_types):
    model, inputs, labels = _bert_multiple_choice(token_types=token_types)
    _assert_per_layer_gauss_newton_equals_brute_force(
        model, inputs, labels, "bert.embeddings.token_type_embeddings.weight"
    )


def _assert_per_layer_gauss_newton_equals_brute_force(model, inputs, labels, token_types: str) -> None:
    """The exact Gauss-Newton diagonal of every selected parameter (``token_types``, the token-type table,
    among them) takes the per-layer path (the per-sample fallback warns) and equals the float64 brute
    force (the choice head's bias shifts every choice alike: 0 up to rounding)."""
    params = select_parameters(model)
    assert token_types in params
    truth = brute_force_ggn_diagonal(model, normalized_softmax_cross_entropy, inputs, labels, list(params))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diag = gauss_newton_exact_diagonal(model, normalized_softmax_cross_entropy, inputs, labels, params)
    scale = max(float(t.detach().abs().max()) for t in truth.values())
    for name in params:
        torch.testing.assert_close(diag[name], truth[name].detach(), rtol=1e-9, atol=1e-12 * scale)


def test_auto_measures_the_hessian_and_the_sketch_is_unbiased():
    """auto takes the sketched Hessian on the per-layer path; over 8 seeds its estimates agree in expectation
    with the brute-force Hessian diagonal (:func:`expectation.assert_unbiased_traces`)."""
    model, inputs, labels = _bert_multiple_choice()
    batches = [
        {**{k: v[i : i + 1] for k, v in inputs.items()}, "labels": labels[i : i + 1]} for i in range(4)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        result = measure_sharpness(model, batches, num_replicates=4)
    assert (result.choice.method, result.choice.quantity) == ("hessian_sketch", "hessian")
    names = [n for n, p in select_parameters(model).items() if p.ndim >= 2]
    assert_unbiased_traces(model, normalized_softmax_cross_entropy, inputs, labels, names, min_random=4)


def test_an_embedding_over_sample_minor_rows_is_caught_by_the_probe():
    """Token ids laid out ``(T * N, ...)`` (row ``r`` of sample ``r % N``) have a multiple of the batch along
    dim 0 but not sample-major: the probe sees sample 0's rows beyond its group, the estimator falls back to
    per-sample backward passes (with a warning), and the values stay exact."""

    class SampleMinor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table, self.head = torch.nn.Embedding(7, 3), torch.nn.Linear(3 * 4, 5)

        def forward(self, ids):  # ids (N, T=4)
            n, t = ids.shape
            rows = torch.tanh(self.table(ids.T.reshape(t * n)))  # row r: sample r % n
            return self.head(rows.reshape(t, n, -1).transpose(0, 1).reshape(n, -1))

    torch.manual_seed(0)
    model = SampleMinor().double()
    ids, y = torch.randint(0, 7, (3, 4), generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 3])
    params = dict(model.named_parameters())
    truth = brute_force_ggn_diagonal(model, F.cross_entropy, ids, y, list(params))
    with pytest.warns(UserWarning, match="samples interact|per-layer contractions do not apply"):
        diag = gauss_newton_exact_diagonal(model, F.cross_entropy, ids, y, params)
    for k in params:
        torch.testing.assert_close(diag[k], truth[k].detach(), rtol=1e-10, atol=1e-14)


def test_default_token_types_filled_by_the_model_keep_the_per_layer_path():
    """RoFormer (like MegatronBERT, MobileBERT, RemBERT, I-BERT) fills its default token types itself,
    ``torch.zeros(input_shape)`` over the ``(N * 3, T)`` rows, not a buffer expanded to them: rows all
    alike, so per-sample data (before, their lookup was taken for a function of the weights and every
    estimator fell back to per-sample backward passes). The exact Gauss-Newton diagonal on the per-layer
    path equals the float64 brute force."""
    import transformers

    torch.manual_seed(0)
    config = transformers.RoFormerConfig(
        vocab_size=32,
        hidden_size=8,
        embedding_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.RoFormerForMultipleChoice(config).double().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 32, (4, 3, 6), generator=g)
    inputs, labels = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.tensor([0, 2, 1, 2])
    _assert_per_layer_gauss_newton_equals_brute_force(
        model, inputs, labels, "roformer.embeddings.token_type_embeddings.weight"
    )


def test_a_constant_fill_that_is_not_shaped_like_the_data_stays_a_shared_offset():
    """The counterpart of the rule above: ids ``torch.zeros(8)`` looked up in a table and added to every
    sample's 8 positions (rows a multiple of the batch of 4, all alike, but of no data tensor's shape) are an
    offset shared by the samples, not per-sample data: the per-layer path (the loose rule sent it to the
    probe, which found the samples interacting, and to per-sample backward passes) and the float64 brute
    force."""
    from oracles import brute_force_ggn

    class SharedOffset(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.table = torch.nn.Linear(3, 5), torch.nn.Embedding(2, 5)
            self.head = torch.nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (N, 8, 3)
            h = self.inp(x) + self.table(torch.zeros(8, dtype=torch.long, device=x.device))
            return self.head(torch.relu(h).mean(1))

    torch.manual_seed(0)
    model = SharedOffset().double()
    x, y = torch.randn(4, 8, 3, dtype=torch.float64), torch.randint(0, 3, (4,))
    params = select_parameters(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the per-sample fallback warns
        diag = gauss_newton_exact_diagonal(model, normalized_softmax_cross_entropy, x, y, params)
    truth = brute_force_ggn(model, normalized_softmax_cross_entropy, x, y, list(params)).diagonal()
    got = torch.cat([diag[n].reshape(-1) for n in params])
    torch.testing.assert_close(got, truth, rtol=1e-9, atol=1e-14)
