"""Models as users have them, beyond one class per sample: dense prediction (semantic segmentation:
``(N, K, H, W)`` logits, ``(N, H, W)`` targets with void pixels, torchvision's ``{"out", "aux"}`` outputs)
and encoder-decoder language models (Hugging Face T5 / BART trained with ``labels`` only).

References are independent: brute-force float64 Hessians (``tests/oracles.py``), autograd Hessians of the
loss in the logits, and the models' own losses."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from oracles import assert_relative_close, brute_force_hessian_diagonal
from torch import nn
from zoo_models import seq2seq_model

from lightning_flatness.batch_split import split_batch
from lightning_flatness.functional import hessian_diagonal_groups, normalized_softmax_cross_entropy
from lightning_flatness.functional.estimators.loss_factors import _token_loss_factors
from lightning_flatness.functional.loss_forms import split_ignore_index
from lightning_flatness.functional.loss_hessian_factors import token_loss_columns
from lightning_flatness.functional.model_io import TokenLoss, extract_logits, with_decoder_inputs
from lightning_flatness.measure import measure_sharpness, position_class_dim, resolve_loss

F64 = torch.float64
VOID = 255


class TinySegmentation(nn.Module):
    """A ReLU conv net (linear in each weight: its Hessian diagonal is its Gauss-Newton diagonal) returning
    torchvision's segmentation output ``{"out": (N, K, H, W), "aux": ...}``."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.body = nn.Conv2d(2, 4, 3, padding=1)
        self.head = nn.Conv2d(4, classes, 1)
        self.aux = nn.Conv2d(4, classes, 1)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return {"out": self.head(h), "aux": self.aux(h)}


def _segmentation_batch(n: int = 3, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 4, 5, generator=g, dtype=F64)
    y = torch.randint(0, classes, (n, 4, 5), generator=g)
    y[0, 0, :3] = VOID  # void pixels, as in VOC / Cityscapes
    y[2, 3, 1] = VOID
    return x, y


def test_extract_logits_reads_torchvision_segmentation_outputs():
    out, aux = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)
    assert extract_logits({"out": out, "aux": aux}) is out
    assert extract_logits({"logits": aux, "out": out}) is aux  # Hugging Face's key first
    with pytest.raises(TypeError, match="none of 'logits', 'out' or 'start_logits' and 'end_logits'"):
        extract_logits({"pred": out})


def test_position_class_dim_tells_sequences_from_dense_outputs():
    net = nn.Linear(1, 1)
    assert position_class_dim(net, torch.zeros(2, 5, 7), torch.zeros(2, 5, dtype=torch.long)) == -1
    assert position_class_dim(net, torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long)) == 1
    assert position_class_dim(net, torch.zeros(2, 3, 9), torch.zeros(2, 9, dtype=torch.long)) == 1  # 1-D
    assert (
        position_class_dim(net, torch.zeros(2, 4, 4), torch.zeros(2, 4, dtype=torch.long)) == -1
    )  # ambiguous
    assert position_class_dim(net, torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)) is None
    assert position_class_dim(net, torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)) is None  # regression


def test_split_ignore_index_of_the_losses_segmentation_trains_with():
    module, index = split_ignore_index(nn.CrossEntropyLoss(ignore_index=VOID, label_smoothing=0.1))
    assert index == VOID and module.ignore_index == -100 and module.label_smoothing == 0.1
    assert split_ignore_index(functools.partial(F.cross_entropy, ignore_index=VOID)) == (
        F.cross_entropy,
        VOID,
    )
    assert split_ignore_index(F.cross_entropy) == (F.cross_entropy, -100)
    other = functools.partial(F.cross_entropy, ignore_index=VOID, reduction="sum")
    assert split_ignore_index(other) == (other, -100)  # not a mean over pixels: left alone


@pytest.mark.parametrize(
    "loss_fn",
    [nn.CrossEntropyLoss(ignore_index=VOID), functools.partial(F.cross_entropy, ignore_index=VOID)],
    ids=["module", "partial"],
)
def test_resolved_segmentation_loss_is_the_training_loss(loss_fn):
    model = TinySegmentation().double()
    x, y = _segmentation_batch()
    logits = extract_logits(model(x))
    resolved = resolve_loss(loss_fn, model, logits, y)
    assert isinstance(resolved, TokenLoss) and resolved.class_dim == 1 and resolved.ignore_index == VOID
    assert resolved.base is F.cross_entropy  # the closed forms apply
    torch.testing.assert_close(resolved(logits, y), loss_fn(logits, y), rtol=1e-14, atol=0)


@pytest.mark.parametrize("base", [F.cross_entropy, normalized_softmax_cross_entropy])
def test_token_factors_of_dense_outputs_are_the_loss_hessian_in_the_logits_layout(base):
    """The exact factors, in the order of ``logits[n].reshape(-1)`` (class-major), against the autograd
    Hessian of the pixel-mean loss in the logits, per sample, times N (the estimators' 1/N convention)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 2, 3, generator=g, dtype=F64)
    y = torch.randint(0, 3, (2, 2, 3), generator=g)
    y[1, 0, 2] = VOID
    loss = TokenLoss(base, ignore_index=VOID, class_dim=1)
    factors, signs, _, _ = _token_loss_factors(loss, logits, y, need_grad=False)
    hess = torch.autograd.functional.hessian(lambda z: loss(z.view_as(logits), y), logits.reshape(-1))
    d = logits[0].numel()
    for n in range(2):
        block = hess[n * d : (n + 1) * d, n * d : (n + 1) * d] * 2
        torch.testing.assert_close((factors[n] * signs[n]) @ factors[n].T, block, rtol=1e-10, atol=1e-12)


def test_token_columns_of_dense_outputs_are_unbiased_for_the_loss_hessian():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 2, 2, generator=g, dtype=F64)
    y = torch.randint(0, 3, (2, 2, 2), generator=g)
    y[0, 1, 1] = VOID
    loss = TokenLoss(F.cross_entropy, ignore_index=VOID, class_dim=1)
    cols, signs = token_loss_columns(loss, logits, y, 4000, torch.Generator().manual_seed(3))
    hess = torch.autograd.functional.hessian(lambda z: loss(z.view_as(logits), y), logits.reshape(-1))
    d = logits[0].numel()
    for n in range(2):
        estimate = (cols[n] * signs) @ cols[n].T
        block = hess[n * d : (n + 1) * d, n * d : (n + 1) * d] * 2
        # 4000 draws: entries within a few percent of the largest (a layout error is off by the whole entry)
        assert float((estimate - block).abs().max()) < 0.1 * float(block.abs().max())
        torch.testing.assert_close(estimate.diagonal(), block.diagonal(), rtol=0.1, atol=0.02 * block.max())


@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(ignore_index=VOID),
        TokenLoss(normalized_softmax_cross_entropy, ignore_index=VOID, class_dim=1),
    ],
    ids=["cross_entropy", "eq20"],
)
def test_exact_method_on_a_segmentation_net_equals_the_brute_force_hessian(loss_fn):
    model = TinySegmentation().double()
    x, y = _segmentation_batch()
    resolved = resolve_loss(loss_fn, model, extract_logits(model(x)), y)
    names = ["body.weight", "head.weight"]
    estimate = hessian_diagonal_groups(model, resolved, x, y, method="exact", parameters=names).mean()
    reference = brute_force_hessian_diagonal(
        model, lambda out, t: resolved(extract_logits(out), t), x, y, names
    )
    assert_relative_close(estimate, reference, tol=1e-10)


def test_measure_sharpness_on_a_segmentation_net_with_void_pixels_agrees_with_the_exact_method():
    """At the defaults ``auto`` samples the Gauss-Newton diagonal (60 outputs per image: exact factors
    would cost a backward pass per output); its values agree with the exact method's within their own
    error bars. The default loss (eq. 20) knows no void label: a clear error names the fix."""
    torch.manual_seed(0)  # the weights, whatever the tests before left in the global RNG
    model = TinySegmentation().double().eval()
    batches = [_segmentation_batch(seed=s) for s in range(16)]
    with pytest.raises(ValueError, match=f"got {VOID}.*ignore_index={VOID}"):
        measure_sharpness(model, batches[:2], num_replicates=2)
    loss = nn.CrossEntropyLoss(ignore_index=VOID)
    auto = measure_sharpness(model, batches, loss_fn=loss, generator=torch.Generator().manual_seed(0))
    exact = measure_sharpness(model, batches, loss_fn=loss, method="exact")
    assert auto.choice.method == "gauss_newton_mc" and auto.choice.quantity == "hessian"
    for key in ("normalized", "hessian_trace"):
        assert abs(float(auto[key] - exact[key])) < 2 * float(auto[f"{key}_stderr"]), key
        assert float(exact[f"{key}_stderr"]) < 0.1 * float(exact[key])  # a real comparison


def test_dense_targets_at_another_resolution_than_the_logits_name_the_fix():
    model = TinySegmentation().double()
    x, _ = _segmentation_batch()
    logits = extract_logits(model(x))
    with pytest.raises(ValueError, match="differ in resolution.*F.interpolate.*ForSemanticSegmentation"):
        resolve_loss(F.cross_entropy, model, logits, torch.zeros(3, 8, 10, dtype=torch.long))


def _seq2seq_batches(count: int = 4, audio: bool = False):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        labels = torch.randint(3, 32, (2, 5), generator=g)
        labels[1, -2:] = -100  # padding of the shorter target
        if audio:  # log-mel features (N, mel bins, 2 x source positions)
            out.append({"input_features": torch.randn(2, 8, 32, generator=g), "labels": labels})
        else:
            out.append({"input_ids": torch.randint(3, 32, (2, 7), generator=g), "labels": labels})
    return out


@pytest.mark.parametrize("kind", ["t5", "bart", "whisper"])
def test_encoder_decoder_models_trained_with_labels_only(kind):
    pytest.importorskip("transformers")
    model = seq2seq_model(kind)
    batch = _seq2seq_batches(1, audio=kind == "whisper")[0]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    completed = with_decoder_inputs(model, inputs, batch["labels"])
    logits = extract_logits(model(**completed))
    loss = resolve_loss(normalized_softmax_cross_entropy, model, logits, batch["labels"])
    assert isinstance(loss, TokenLoss) and not loss.shift and loss.class_dim == -1
    # the measured loss reads the logits as the model's own training loss does
    ce = resolve_loss(F.cross_entropy, model, logits, batch["labels"])
    torch.testing.assert_close(ce(logits, batch["labels"]), model(**batch).loss, rtol=1e-6, atol=0)
    # labels only, or decoder inputs given: the same measurement
    if kind == "whisper":  # the model's own shift (its forward derives the decoder inputs so)
        from transformers.models.whisper.modeling_whisper import shift_tokens_right

        derive = lambda labels: shift_tokens_right(labels, 2, 1)  # noqa: E731
    else:
        derive = lambda labels: model.prepare_decoder_input_ids_from_labels(labels=labels)  # noqa: E731
    torch.testing.assert_close(completed["decoder_input_ids"], derive(batch["labels"]), rtol=0, atol=0)
    batches = _seq2seq_batches(audio=kind == "whisper")
    given = [{**b, "decoder_input_ids": derive(b["labels"])} for b in batches]
    a = measure_sharpness(model, batches, num_replicates=2, generator=torch.Generator().manual_seed(0))
    b = measure_sharpness(model, given, num_replicates=2, generator=torch.Generator().manual_seed(0))
    assert float(a["normalized"]) > 0 and torch.equal(a["normalized"], b["normalized"])
    assert with_decoder_inputs(nn.Linear(1, 1), inputs, batch["labels"]) is inputs  # other models: unchanged


@pytest.mark.parametrize("head", ["ForSequenceClassification", "ForQuestionAnswering"])
def test_encoder_decoder_classifiers_derive_their_decoder_inputs_themselves(head):
    """BART's classifier and span head build their decoder's inputs from ``input_ids``; their labels are
    classes or a span, not a sequence to shift: the measurement leaves the inputs alone (deriving them from
    the labels failed) and measures the model's own loss."""
    pytest.importorskip("transformers")
    model = seq2seq_model("bart", head=head)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        ids = torch.randint(3, 32, (2, 7), generator=g)
        ids[:, -1] = model.config.eos_token_id
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if head == "ForSequenceClassification":
            batch["labels"] = torch.randint(0, 3, (2,), generator=g)
        else:
            batch["start_positions"] = torch.randint(0, 3, (2,), generator=g)
            batch["end_positions"] = batch["start_positions"] + 2
        batches.append(batch)
    inputs, target = split_batch(batches[0])
    assert with_decoder_inputs(model, inputs, target) is inputs
    logits = extract_logits(model(**inputs))
    ce = resolve_loss(F.cross_entropy, model, logits, target)
    torch.testing.assert_close(ce(logits, target), model(**batches[0]).loss, rtol=1e-6, atol=0)
    result = measure_sharpness(model, batches, num_replicates=2)
    assert float(result["normalized"]) > 0


def test_a_bart_classifier_measures_the_hessian_of_its_shared_token_table():
    """BART's token table is looked up by the encoder and the decoder (``model.shared``), and no Linear call
    reads it (the classifier has no LM head): ``auto`` takes the sketched Hessian (the Gauss-Newton
    diagonal before, for a weight used twice), and the table's sketched diagonal is unbiased for the
    brute-force Hessian diagonal, from which the Gauss-Newton diagonal differs there."""
    pytest.importorskip("transformers")
    from oracles import assert_unbiased, hessian_sketch_draws
    from zoo_oracle import brute_force_ggn_diagonal, brute_force_hessian_diagonal

    from lightning_flatness.functional.estimators.method_choice import choose_method

    torch.manual_seed(0)
    model = seq2seq_model("bart", head="ForSequenceClassification").double()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32, (4, 7), generator=g)
    ids[:, -1] = model.config.eos_token_id
    inputs, target = {"input_ids": ids}, torch.randint(0, 3, (4,), generator=g)
    loss = resolve_loss(F.cross_entropy, model, extract_logits(model(**inputs)), target)
    choice = choose_method(model, loss, inputs, target)
    assert (choice.method, choice.quantity) == ("hessian_sketch", "hessian"), choice.reason
    names = ["model.shared.weight"]
    of_outputs = lambda out, t: loss(extract_logits(out), t)  # noqa: E731
    reference = (
        brute_force_hessian_diagonal(model, of_outputs, inputs, target, names)[names[0]].detach().flatten()
    )
    ggn = brute_force_ggn_diagonal(model, of_outputs, inputs, target, names)[names[0]].detach().flatten()
    assert float((ggn - reference).norm() / reference.norm()) > 0.05  # the residual reaches the table
    assert_unbiased(hessian_sketch_draws(model, loss, inputs, target, names), reference)


class _Config:
    semantic_loss_ignore_index = VOID


class TinyForSemanticSegmentation(nn.Module):
    """Hugging Face's layout: a ReLU conv net whose logits come at half the labels' resolution, read by a
    loss that upsamples them bilinearly and skips ``config.semantic_loss_ignore_index``."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.config = _Config()
        self.body = nn.Conv2d(2, 4, 3, padding=1, stride=2)
        self.head = nn.Conv2d(4, classes, 1)

    def forward(self, x):
        return {"logits": self.head(torch.relu(self.body(x)))}

    def loss(self, logits, labels):  # Hugging Face's, as SegformerForSemanticSegmentation computes it
        up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(up, labels, ignore_index=VOID)


def _upsampled_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 2, 6, 8, generator=g, dtype=F64)
    y = torch.randint(0, 3, (3, 6, 8), generator=g)
    y[0, :2] = VOID
    return x, y


@pytest.mark.parametrize("base", [F.cross_entropy, normalized_softmax_cross_entropy])
def test_upsampling_token_factors_are_the_hessian_of_the_upsampled_loss_in_the_low_resolution_logits(base):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 2, 3, generator=g, dtype=F64)
    y = torch.randint(0, 3, (2, 4, 6), generator=g)
    y[1, 0] = VOID
    loss = TokenLoss(base, ignore_index=VOID, class_dim=1, output_size=(4, 6))
    factors, signs, _, _ = _token_loss_factors(loss, logits, y, need_grad=False)
    hess = torch.autograd.functional.hessian(lambda z: loss(z.view_as(logits), y), logits.reshape(-1))
    d = logits[0].numel()
    assert factors.shape[1] == d
    for n in range(2):
        block = hess[n * d : (n + 1) * d, n * d : (n + 1) * d] * 2
        torch.testing.assert_close((factors[n] * signs[n]) @ factors[n].T, block, rtol=1e-10, atol=1e-12)
    # unbiased over calls (each call mixes the tokens' columns, eq. 20's exact ones too, with fresh signs)
    gen, calls = torch.Generator().manual_seed(5), 800
    total = torch.zeros(2, d, d, dtype=F64)
    for _ in range(calls):
        cols, col_signs = token_loss_columns(loss, logits, y, 4, gen)
        total += torch.einsum("ndc,c,nec->nde", cols, col_signs, cols)
    for n in range(2):
        block = hess[n * d : (n + 1) * d, n * d : (n + 1) * d] * 2
        assert float((total[n] / calls - block).abs().max()) < 0.15 * float(block.abs().max())


def test_hugging_face_segmentation_is_measured_as_its_own_loss_reads_it():
    """Logits at half the labels' resolution: resolve_loss upsamples them as the model's loss does and
    skips its void label; the measured loss is the model's own, and the exact method equals the
    brute-force Hessian diagonal of that loss."""
    model = TinyForSemanticSegmentation().double()
    x, y = _upsampled_batch()
    logits = extract_logits(model(x))
    assert logits.shape[2:] == (3, 4)
    resolved = resolve_loss(F.cross_entropy, model, logits, y)
    assert isinstance(resolved, TokenLoss) and resolved.output_size == (6, 8)
    assert resolved.ignore_index == VOID  # from the model's config
    torch.testing.assert_close(resolved(logits, y), model.loss(logits, y), rtol=1e-14, atol=0)
    names = ["body.weight", "head.weight"]
    estimate = hessian_diagonal_groups(model, resolved, x, y, method="exact", parameters=names).mean()
    reference = brute_force_hessian_diagonal(
        model, lambda out, t: model.loss(extract_logits(out), t), x, y, names
    )
    assert_relative_close(estimate, reference, tol=1e-10)
    result = measure_sharpness(model, [_upsampled_batch(s) for s in range(4)], num_replicates=2)
    assert float(result["normalized"]) > 0 and float(result["normalized_stderr"]) > 0
