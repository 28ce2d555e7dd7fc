"""Extractive question answering as Hugging Face trains it: ``*ForQuestionAnswering`` models called on dict
batches with the answer span in ``start_positions`` / ``end_positions``, returning
``QuestionAnsweringModelOutput`` (``start_logits``, ``end_logits``). The span logits are read as two rows
of position logits per sample, ``(N, 2, T)``, against the ``(N, 2)`` span, so the measured loss is the
model's own ``(start loss + end loss) / 2``; values against float64 brute force."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from expectation import assert_unbiased_traces  # noqa: E402
from zoo_models import span_batch, tiny_bert_question_answering  # noqa: E402
from zoo_oracle import brute_force_ggn_diagonal  # noqa: E402

from lightning_flatness.batch_split import span_target, split_batch  # noqa: E402
from lightning_flatness.functional import normalized_softmax_cross_entropy, select_parameters  # noqa: E402
from lightning_flatness.functional.measures import sharpness_measures  # noqa: E402
from lightning_flatness.functional.model_io import TokenLoss, call_model, extract_logits  # noqa: E402
from lightning_flatness.measure import measure_sharpness, resolve_loss  # noqa: E402

SEQ = 6


def _model_and_batch(n: int = 8, dtype: torch.dtype = torch.float64):
    model, (inputs, span) = tiny_bert_question_answering(n, dtype=dtype)
    return model, span_batch(inputs, span)


def _batches(batch: dict, size: int) -> list[dict]:
    n = batch["input_ids"].shape[0]
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


def test_the_answer_span_is_the_target_and_the_rest_the_keyword_inputs():
    _, batch = _model_and_batch()
    inputs, target = split_batch(batch)
    assert sorted(inputs) == ["attention_mask", "input_ids", "token_type_ids"]
    assert torch.equal(target, torch.stack([batch["start_positions"], batch["end_positions"]], dim=1))
    # labels, where present, stay the target (a model trained on another head)
    _, labels = split_batch({**batch, "labels": torch.zeros(8, dtype=torch.long)})
    assert labels.shape == (8,)


def test_positions_outside_the_sequence_are_clamped_and_ignored_as_the_models_loss_does():
    """ForQuestionAnsweringLoss clamps positions to [0, T] and ignores T."""
    start = torch.tensor([-3, 0, 5, 6, 40])
    end = torch.tensor([[2], [6], [5], [7], [1]])  # (N, 1), as multi-GPU batches may carry them
    assert span_target(start, end, SEQ).tolist() == [[0, 2], [0, -100], [5, 5], [-100, -100], [-100, 1]]
    with pytest.raises(ValueError, match="no sequence to read it from"):
        split_batch(
            {"pixel_values": torch.zeros(2, 3), "start_positions": start[:2], "end_positions": start[:2]}
        )


def test_span_logits_are_two_rows_of_position_logits_per_sample():
    model, batch = _model_and_batch()
    inputs, _ = split_batch(batch)
    output = model(**inputs)
    logits = extract_logits(output)
    assert logits.shape == (8, 2, SEQ)
    assert torch.equal(logits[:, 0], output.start_logits) and torch.equal(logits[:, 1], output.end_logits)
    assert torch.equal(call_model(model, inputs), logits)


def test_the_measured_loss_is_the_models_own_loss():
    model, batch = _model_and_batch()
    batch["start_positions"][0], batch["end_positions"][0] = SEQ + 3, SEQ  # a span outside: both ignored
    inputs, target = split_batch(batch)
    logits = call_model(model, inputs)
    loss = resolve_loss(F.cross_entropy, model, logits, target)
    assert isinstance(loss, TokenLoss) and not loss.shift and loss.ignore_index == -100
    own = model(**batch).loss
    assert float(loss(logits, target).detach()) == pytest.approx(float(own), rel=1e-12)
    # as many starts as ends scored: the same weights; otherwise the mean over the scored rows
    target[1, 1] = -100
    rows = logits.reshape(-1, SEQ)[target.reshape(-1) != -100]
    expected = F.cross_entropy(rows, target.reshape(-1)[target.reshape(-1) != -100])
    assert float(loss(logits, target).detach()) == pytest.approx(float(expected), rel=1e-12)


def test_a_span_model_returning_a_tuple_is_an_error_at_the_dry_run_naming_the_fix():
    """``return_dict=False``: the output is ``(start_logits, end_logits)``, whose first entry alone would be
    scored against the ``(N, 2)`` span; the dry run names the fix instead of failing in the loss."""
    model, batch = _model_and_batch()
    model.config.return_dict = False
    assert isinstance(model(**split_batch(batch)[0]), tuple)
    with pytest.raises(ValueError, match=r"targets are \(2, 2\).*return_dict=True"):
        measure_sharpness(model, _batches(batch, 2))
    model.config.return_dict = True
    assert float(measure_sharpness(model, _batches(batch, 2))["normalized"]) > 0


def test_the_exact_gauss_newton_diagonal_of_a_span_model_equals_brute_force():
    model, batch = _model_and_batch()
    result = measure_sharpness(model, _batches(batch, 2), method="gauss_newton", num_replicates=4)
    assert int(result["num_samples"]) == 16  # two scored rows per sample
    names = list(select_parameters(model))
    inputs, target = split_batch(batch)
    diag = brute_force_ggn_diagonal(model, TokenLoss(normalized_softmax_cross_entropy), inputs, target, names)
    weights = {n: p.detach() for n, p in model.named_parameters() if n in names}
    ref = sharpness_measures(weights, diag)
    for measure in ("normalized", "matrix_normalized", "hessian_trace"):
        assert float(result[measure]) == pytest.approx(float(ref[measure]), rel=1e-9), measure


def test_auto_measures_the_hessian_of_a_span_model_without_bias():
    """auto takes the sketched Hessian (the stacked span logits are recorded like the model's own ops); its
    estimates on one batch agree in expectation with the brute-force Hessian diagonal
    (:func:`expectation.assert_unbiased_traces`)."""
    model, batch = _model_and_batch()
    result = measure_sharpness(model, _batches(batch, 2), num_replicates=4)
    assert (result.choice.method, result.choice.quantity) == ("hessian_sketch", "hessian")
    inputs, target = split_batch(batch)
    names = [n for n, p in select_parameters(model).items() if p.ndim >= 2]
    assert_unbiased_traces(
        model, TokenLoss(normalized_softmax_cross_entropy), inputs, target, names, min_random=5
    )
