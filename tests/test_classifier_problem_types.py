"""The default loss on classifiers that are not single-label: Hugging Face's sequence (image, audio, video)
classifiers train for regression or multi-label classification when ``config.problem_type`` says so, or
when their loss infers it from ``num_labels`` and the labels' dtype. Eq. 20 needs one class per sample,
so the measurement takes the model's own loss there (with a warning), and any other float target of a
softmax loss is an error naming the fix, where it used to be read as unnormalised class weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from zoo_models import bert_head  # noqa: E402
from zoo_oracle import brute_force_ggn_diagonal  # noqa: E402

from lightning_flatness.functional import normalized_softmax_cross_entropy, select_parameters  # noqa: E402
from lightning_flatness.functional.loss_forms import single_output_mse_loss  # noqa: E402
from lightning_flatness.functional.measures import sharpness_measures  # noqa: E402
from lightning_flatness.functional.model_io import call_model  # noqa: E402
from lightning_flatness.measure import classifier_problem, measure_sharpness, resolve_loss  # noqa: E402


def _classifier(num_labels: int, problem_type=None):
    torch.manual_seed(0)
    model = bert_head("ForSequenceClassification", num_labels=num_labels, problem_type=problem_type)
    return model.double().eval()


def _batches(labels: torch.Tensor, size: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 32, (labels.shape[0], 6), generator=g)
    return [
        {
            "input_ids": ids[i : i + size],
            "attention_mask": torch.ones_like(ids[i : i + size]),
            "labels": labels[i : i + size],
        }
        for i in range(0, labels.shape[0], size)
    ]


def _labels(kind: str, n: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    if kind == "regression":
        return torch.randn(n, generator=g, dtype=torch.float64)
    if kind == "regression3":
        return torch.randn(n, 3, generator=g, dtype=torch.float64)
    return (torch.rand(n, 4, generator=g) > 0.5).double()  # multi-hot


@pytest.mark.parametrize(
    "kind, num_labels, declared, problem, loss",
    [
        ("regression", 1, None, "regression", single_output_mse_loss),  # one label: regression
        ("regression", 1, "regression", "regression", single_output_mse_loss),
        ("regression3", 3, "regression", "regression", F.mse_loss),  # (undeclared: multi-label, below)
        ("multilabel", 4, None, "multi_label_classification", F.binary_cross_entropy_with_logits),
        (
            "multilabel",
            4,
            "multi_label_classification",
            "multi_label_classification",
            F.binary_cross_entropy_with_logits,
        ),
    ],
)
def test_the_default_loss_is_the_models_own_where_eq_20_does_not_apply(
    kind, num_labels, declared, problem, loss
):
    """The problem type is read from the config when declared, else inferred as transformers infers it
    (float labels and several outputs: multi-label); the resolved loss is the model's own, to rounding; the
    measurement warns and equals one with that loss passed explicitly."""
    model = _classifier(num_labels, declared)
    labels = _labels(kind)
    batch = _batches(labels, 8)[0]
    assert classifier_problem(model, labels) == (problem, num_labels, declared is not None)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = call_model(model, inputs)
    with pytest.warns(UserWarning, match=f"trained for {problem}"):
        resolved = resolve_loss(normalized_softmax_cross_entropy, model, logits, labels)
    assert resolved is loss
    own = model(**batch).loss.detach()  # (sets config.problem_type when it was not declared)
    assert model.config.problem_type == problem
    assert float(resolved(logits, labels).detach()) == pytest.approx(float(own), rel=1e-12)
    with pytest.warns(UserWarning, match=f"trained for {problem}"):
        default = measure_sharpness(
            _classifier(num_labels, declared), _batches(labels), method="gauss_newton"
        )
    explicit = measure_sharpness(
        _classifier(num_labels), _batches(labels), method="gauss_newton", loss_fn=loss
    )
    assert float(default["normalized"]) == pytest.approx(float(explicit["normalized"]), rel=1e-12)


def test_single_output_regression_is_measured_exactly():
    """``num_labels=1``: ``(N, 1)`` logits against ``(N,)`` labels (``F.mse_loss`` would broadcast them to
    ``(N, N)``); the exact Gauss-Newton measurement equals the float64 brute force of the model's loss."""
    model, labels = _classifier(1), _labels("regression")
    with pytest.warns(UserWarning, match="trained for regression"):
        result = measure_sharpness(model, _batches(labels), method="gauss_newton", num_replicates=4)
    names = list(select_parameters(model))
    batch = _batches(labels, 8)[0]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    diag = brute_force_ggn_diagonal(model, single_output_mse_loss, inputs, labels, names)
    weights = {n: p.detach() for n, p in model.named_parameters() if n in names}
    ref = sharpness_measures(weights, {k: v.detach() for k, v in diag.items()})
    for measure in ("normalized", "matrix_normalized", "hessian_trace"):
        assert float(result[measure]) == pytest.approx(float(ref[measure]), rel=1e-9), measure


def test_single_label_classifiers_keep_eq_20():
    model = _classifier(4)
    labels = torch.tensor([0, 3, 1, 2])
    assert classifier_problem(model, labels) == ("single_label_classification", 4, False)
    logits = call_model(model, {k: v for k, v in _batches(labels, 4)[0].items() if k != "labels"})
    assert (
        resolve_loss(normalized_softmax_cross_entropy, model, logits, labels)
        is normalized_softmax_cross_entropy
    )


def test_float_targets_that_are_not_class_probabilities_are_an_error_naming_the_fix():
    net = torch.nn.Linear(3, 4)
    x = torch.randn(8, 3)
    for target in (torch.randn(8), torch.randn(8, 4), (torch.rand(8, 4) > 0.5).float()):
        batches = [(x[i : i + 2], target[i : i + 2]) for i in range(0, 8, 2)]
        with pytest.raises(ValueError, match=r"not\. For regression targets pass `loss_fn=F\.mse_loss`"):
            measure_sharpness(net, batches)
        with pytest.raises(ValueError, match="BCEWithLogitsLoss"):
            measure_sharpness(net, batches, loss_fn=F.cross_entropy)
    probabilities = torch.softmax(torch.randn(8, 4), dim=1)  # mixup-like targets stay class probabilities
    result = measure_sharpness(net, [(x[i : i + 2], probabilities[i : i + 2]) for i in range(0, 8, 2)])
    assert float(result["normalized"]) > 0


@pytest.mark.parametrize("declared", [False, True])
def test_class_probabilities_keep_eq_20_unless_multi_label_is_declared(declared):
    """Float labels that are class probabilities (a mixup collate) on a classifier that does not declare
    its problem type are still class targets: eq. 20 is kept; declared multi-label takes the model's loss."""
    model = _classifier(4, "multi_label_classification" if declared else None)
    labels = torch.softmax(
        torch.randn(8, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64), 1
    )
    logits = call_model(model, {k: v for k, v in _batches(labels, 8)[0].items() if k != "labels"})
    if declared:
        with pytest.warns(UserWarning, match="trained for multi_label_classification"):
            resolved = resolve_loss(normalized_softmax_cross_entropy, model, logits, labels)
        assert resolved is F.binary_cross_entropy_with_logits
    else:
        assert (
            resolve_loss(normalized_softmax_cross_entropy, model, logits, labels)
            is normalized_softmax_cross_entropy
        )


def test_targets_that_do_not_fit_the_loss_are_an_error_at_the_dry_run_naming_the_fix():
    """One output per sample: a softmax over it is constant (eq. 20 by default, int or float targets);
    ``(N,)`` targets of an elementwise loss on ``(N, 1)`` outputs broadcast (``F.mse_loss``: to
    ``(N, N)``)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    x = torch.randn(8, 3)
    for target in (torch.randint(0, 2, (8,)), torch.randint(0, 2, (8,)).float()):
        with pytest.raises(ValueError, match=r"one output per sample .* `loss_fn=nn\.BCEWithLogitsLoss\(\)`"):
            measure_sharpness(net, [(x[i : i + 2], target[i : i + 2]) for i in range(0, 8, 2)])
    values = torch.randn(8)
    for loss, named in [
        (F.mse_loss, "single_output_mse_loss"),
        (torch.nn.MSELoss(), "single_output_mse_loss"),
        (F.binary_cross_entropy_with_logits, "single_output_bce_with_logits_loss"),
    ]:
        with pytest.raises(ValueError, match=rf"targets of another shape are broadcast .*{named}"):
            measure_sharpness(net, [(x[i : i + 2], values[i : i + 2]) for i in range(0, 8, 2)], loss_fn=loss)
    fitted = measure_sharpness(
        net, [(x[i : i + 2], values[i : i + 2]) for i in range(0, 8, 2)], loss_fn=single_output_mse_loss
    )
    reshaped = measure_sharpness(
        net, [(x[i : i + 2], values[i : i + 2, None]) for i in range(0, 8, 2)], loss_fn=F.mse_loss
    )
    assert float(fitted["normalized"]) == pytest.approx(float(reshaped["normalized"]), rel=1e-9)
