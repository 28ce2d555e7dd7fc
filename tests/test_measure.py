"""The Lightning-free front door: measure_sharpness / SharpnessMeasurement, choose_method, and models
as users have them (dict inputs, ModelOutput-like outputs, sequence outputs)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from oracles import brute_force_hessian_diagonal, brute_force_measures
from out_of_memory import OutOfMemoryAbove
from torch import nn

from lightning_flatness import NormalizedSharpness
from lightning_flatness.functional import hessian_diagonal_groups, normalized_softmax_cross_entropy
from lightning_flatness.functional.estimators.method_choice import MethodChoice, choose_method
from lightning_flatness.functional.model_io import TokenLoss, call_model, extract_logits
from lightning_flatness.measure import (
    SharpnessMeasurement,
    is_causal_lm,
    measure_sharpness,
    not_converged_message,
    resolve_loss,
)


def _mlp(activation=nn.ReLU, classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 7), activation(), nn.Linear(7, 6), activation(), nn.Linear(6, classes)
    ).double()


def _data(num_batches=4, size=12, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 5, generator=g, dtype=torch.float64),
            torch.randint(0, classes, (size,), generator=g),
        )
        for _ in range(num_batches)
    ]


def test_measure_sharpness_equals_the_metric_fed_by_hand_and_the_brute_force_hessian():
    model, batches = _mlp(), _data()
    result = measure_sharpness(model, batches, num_replicates=4)
    assert result.choice == MethodChoice("exact", "hessian", result.choice.reason)
    weights = dict(model.named_parameters())  # the default selection: weights and the biases beside them
    metric = NormalizedSharpness(num_replicates=4, parameter_shapes={n: p.shape for n, p in weights.items()})
    for x, y in batches:
        metric.update_from_estimate(
            hessian_diagonal_groups(model, normalized_softmax_cross_entropy, x, y), weights
        )
    by_hand = metric.compute()
    assert set(result.values) == set(by_hand)
    for key in by_hand:
        torch.testing.assert_close(result[key], by_hand[key], rtol=0, atol=0)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    ref = brute_force_measures(model, x, y)
    for measure in ("normalized", "matrix_normalized", "hessian_trace", "hessian_trace_weights"):
        assert float(result[measure]) == pytest.approx(ref[measure], rel=1e-10)
    diag = brute_force_hessian_diagonal(model, normalized_softmax_cross_entropy, x, y, list(weights))
    everything = sum(float(d.sum()) for d in diag.values())  # eq. 5: every parameter, biases included
    only_weights = sum(float(d.sum()) for n, d in diag.items() if d.ndim >= 2)
    assert float(result["hessian_trace"]) == pytest.approx(everything, rel=1e-10)
    assert float(result["hessian_trace_weights"]) == pytest.approx(only_weights, rel=1e-10)
    assert abs(everything - only_weights) > 1e-3 * abs(everything)  # the biases carry curvature here
    assert "normalized/0.bias" not in result.values and "hessian_trace/0.bias" in result.values
    assert result.seconds > 0 and int(result["num_samples"]) == 48


class _Arctan(nn.Module):
    """An arctangent of a weight-dependent tensor: no node rule covers it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.a(x) * torch.atan(self.b(x))


def test_choose_method_exact_for_piecewise_linear_hessian_sketch_or_gauss_newton_otherwise():
    x, y = _data(1)[0]
    relu = choose_method(_mlp(), normalized_softmax_cross_entropy, x, y)
    assert (relu.method, relu.quantity) == ("exact", "hessian")
    assert "piecewise linear" in relu.reason and "3 outputs" in relu.reason
    tanh = choose_method(_mlp(nn.Tanh), normalized_softmax_cross_entropy, x, y)
    assert (tanh.method, tanh.quantity) == ("hessian_sketch", "hessian")
    assert "(tanh)" in tanh.reason
    arctan = choose_method(_Arctan().double(), normalized_softmax_cross_entropy, x[:, :4], y)
    assert (arctan.method, arctan.quantity) == ("gauss_newton", "gauss_newton")
    assert "'atan'" in arctan.reason and "does not apply" in arctan.reason
    wide_x, wide_y = _data(1, classes=48)[0]
    many = choose_method(_mlp(classes=48), normalized_softmax_cross_entropy, wide_x, wide_y)
    assert (many.method, many.quantity) == ("gauss_newton_sketch", "hessian")  # GGN == H for a ReLU network
    assert "48 outputs" in many.reason and "structured factors" in many.reason
    assert MethodChoice.named("gauss_newton_mc").quantity == "gauss_newton"
    assert MethodChoice.named("hutchinson").label == "hutchinson (hessian)"
    with pytest.raises(ValueError, match="unknown method 'newton'"):
        MethodChoice.named("newton")


class _KeywordNet(nn.Module):
    """Called with keyword arguments; returns a dict with ``logits`` (like a Hugging Face model)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, features, scale=None):
        logits = self.net(features * scale)
        return {"logits": logits, "hidden": features}


def test_dict_inputs_and_dict_outputs_give_the_same_values_as_plain_tensors():
    net = _mlp()
    batches = _data()
    plain = measure_sharpness(net, batches, num_replicates=4)
    keyword = _KeywordNet(net)
    dict_batches = [
        {"features": x, "scale": torch.ones(len(x), 1, dtype=x.dtype), "labels": y} for x, y in batches
    ]

    def split(batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch["labels"]

    result = measure_sharpness(keyword, dict_batches, num_replicates=4, split_batch=split)
    pairs = measure_sharpness(keyword, [split(b) for b in dict_batches], num_replicates=4)  # (dict, target)
    for key in plain.values:
        name = key.replace("/", "/net.", 1) if "/" in key and key.split("/", 1)[1][0].isdigit() else key
        torch.testing.assert_close(result[name], plain[key], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(pairs[name], plain[key], rtol=1e-12, atol=1e-14)
    with pytest.raises(TypeError, match=r"got str; .*for `measure_sharpness`, pass `split_batch=`"):
        measure_sharpness(keyword, [("features", y) for _, y in batches], num_replicates=4)


class _WholeDict(nn.Module):
    """Takes a dict batch whole, ``forward(self, batch)`` (a LightningModule written so)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, batch):
        return self.net(batch["features"] * batch["scale"])


class _TwoParts(nn.Module):
    """The features in two parts, as two positional arguments."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, a, b):
        return self.net(torch.cat([a, b], dim=1))


class _PartsWhole(_TwoParts):
    """The features in two parts, as one sequence of views, ``forward(self, parts)``."""

    def forward(self, parts):  # type: ignore[override]
        return self.net(torch.cat(list(parts), dim=1))


@pytest.mark.parametrize(
    "kind", ["dict taken whole", "tuple as arguments", "tuple taken whole", "list taken whole"]
)
def test_dict_and_tuple_inputs_are_passed_as_the_forward_signature_takes_them(kind):
    """``(inputs, target)`` batches whose inputs are a dict or a tuple/list: keyword or positional arguments
    where ``forward`` takes them so, else one argument (``model_io.arguments_for``): the plain values."""
    net = _mlp()
    batches = _data()
    plain = measure_sharpness(net, batches, num_replicates=4)
    if kind == "dict taken whole":
        model = _WholeDict(net)
        pairs = [({"features": x, "scale": torch.ones(len(x), 1, dtype=x.dtype)}, y) for x, y in batches]
    else:
        model = _TwoParts(net) if kind == "tuple as arguments" else _PartsWhole(net)
        sequence = list if kind == "list taken whole" else tuple
        pairs = [(sequence([x[:, :2], x[:, 2:]]), y) for x, y in batches]
    result = measure_sharpness(model, pairs, num_replicates=4)
    assert (result.choice.method, result.choice.quantity) == ("exact", "hessian")
    for key in plain.values:
        name = key.replace("/", "/net.", 1) if "/" in key and key.split("/", 1)[1][0].isdigit() else key
        torch.testing.assert_close(result[name], plain[key], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("compile_", ["script", "trace"])
def test_a_torchscript_network_measures_the_gauss_newton_diagonal_of_its_eager_network(compile_):
    """TorchScript runs its operations where torch function modes cannot see them: `auto` says so and
    measures the Gauss-Newton diagonal by autograd, the eager network's (here its Hessian: ReLU)."""
    net, batches = _mlp(), _data()
    eager = measure_sharpness(net, batches, num_replicates=4)
    assert (eager.choice.method, eager.choice.quantity) == ("exact", "hessian")
    compiled = torch.jit.script(net) if compile_ == "script" else torch.jit.trace(net, batches[0][0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # per-layer contractions do not apply: autograd
        result = measure_sharpness(compiled, batches, num_replicates=4)
    assert (result.choice.method, result.choice.quantity) == ("gauss_newton", "gauss_newton")
    assert "invisible to torch function modes" in result.choice.reason
    assert set(result.values) == set(eager.values)
    for key, value in eager.values.items():
        torch.testing.assert_close(result[key], value, rtol=1e-10, atol=1e-12)


def test_extract_logits_reads_tensors_tuples_dicts_and_names_the_fix():
    t = torch.zeros(2, 3)
    assert extract_logits(t) is t and extract_logits((t, 1)) is t and extract_logits({"logits": t}) is t
    with pytest.raises(TypeError, match="'logits' entry"):
        extract_logits({"scores": t})
    assert call_model(lambda a, b: a + b, (t, t)).shape == (2, 3)
    # a dataclass's attribute, a namedtuple's named field wherever it lies (torchvision's InceptionOutputs)
    from collections import namedtuple
    from dataclasses import dataclass

    @dataclass
    class Output:
        features: torch.Tensor
        logits: torch.Tensor

    features = torch.ones(2, 8)
    assert extract_logits(Output(features, t)) is t
    assert extract_logits(namedtuple("Outputs", ["features", "logits"])(features, t)) is t
    assert extract_logits(namedtuple("Pair", ["a", "b"])(t, features)) is t  # no named field: the first
    with pytest.raises(TypeError, match="'logits' attribute"):
        extract_logits(object())


class _FeaturesFirst(nn.Module):
    """Returns ``(features, logits)``: the first entry is not the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        features = self.body(x)
        return features, self.head(features)


def test_measure_sharpness_names_the_tensors_the_logits_do_not_depend_on():
    torch.manual_seed(0)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    with pytest.warns(
        UserWarning, match=r"do not depend on 2 of the measured tensors \(head.weight, head.bias\)"
    ):
        measure_sharpness(_FeaturesFirst().eval(), batches, num_replicates=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same network returning its logits: nothing to say
        measure_sharpness(
            nn.Sequential(_FeaturesFirst().body, _FeaturesFirst().head).eval(), batches, num_replicates=2
        )


class _TinyForCausalLM(nn.Module):
    """Embedding -> Linear over the vocabulary: logits (N, T, V)."""

    def __init__(self, vocab=7, width=5):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width).double()
        self.head = nn.Linear(width, vocab).double()

    def forward(self, input_ids, attention_mask=None):
        return (self.head(torch.relu(self.embed(input_ids))),)


def test_sequence_outputs_use_a_shifted_token_loss_for_causal_lms_with_padding_ignored():
    model = _TinyForCausalLM()
    ids = torch.randint(0, 7, (3, 6), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, 4:] = -100
    logits = call_model(model, {"input_ids": ids})
    loss = resolve_loss(normalized_softmax_cross_entropy, model, logits, labels)
    assert isinstance(loss, TokenLoss) and loss.shift and is_causal_lm(model)
    valid = labels[:, 1:] != -100
    expected = normalized_softmax_cross_entropy(logits[:, :-1][valid], labels[:, 1:][valid])
    torch.testing.assert_close(loss(logits, labels), expected, rtol=1e-14, atol=0)
    assert loss.num_tokens(labels).tolist() == [3, 5, 5]
    not_causal = nn.Sequential(nn.Identity())
    assert not resolve_loss(F.cross_entropy, not_causal, logits, labels).shift
    assert resolve_loss(F.cross_entropy, not_causal, logits[:, 0], labels[:, 0]) is F.cross_entropy


def test_measurement_skips_non_finite_batches_and_reports_them():
    model = _mlp()
    good = _data(4)
    bad = (torch.full((12, 5), float("nan"), dtype=torch.float64), torch.zeros(12, dtype=torch.long))
    measurement = SharpnessMeasurement(model, method="exact", num_replicates=4)
    assert not measurement.add(*bad)
    for x, y in good:
        assert measurement.add(x, y)
    assert int(measurement.compute()["num_samples"]) == 48
    with pytest.raises(ValueError, match="no batch with a finite curvature"):
        measure_sharpness(
            model,
            [(torch.randn(4, 5, dtype=torch.float64), torch.zeros(4, dtype=torch.long))],
            loss_fn=lambda logits, target: F.cross_entropy(logits, target) * float("inf"),
        )


def _tiny_logits():
    """The MLP with its last layer (weight and bias) scaled by ``1e-21``, in float32, and the batches in
    float32. Eq. 20 is invariant to the logits' scale, so the normalized sharpness is the unscaled model's
    (its curvature scales by ``1e42``, the weight's square by ``1e-42``), but the biases' curvature,
    ``~1e42``, exceeds float32's range while the loss is finite."""
    model, batches = _mlp(), _data()
    reference = float(measure_sharpness(model, batches, method="exact", num_replicates=4)["normalized"])
    with torch.no_grad():
        model[-1].weight.mul_(1e-21)
        model[-1].bias.mul_(1e-21)
    scaled = float(measure_sharpness(model, batches, method="exact", num_replicates=4)["normalized"])
    assert scaled == pytest.approx(reference, rel=1e-8)
    tiny = model.float()
    single = [(x.float(), y) for x, y in batches]
    assert all(torch.isfinite(normalized_softmax_cross_entropy(tiny(x), y)) for x, y in single)
    return tiny, single, reference


def test_curvature_that_overflows_float32_is_estimated_in_float64_with_a_warning():
    """Each float32 batch whose curvature overflows is estimated again in float64 (its weights and inputs
    cast for that estimate): the value is the unscaled model's (to float32's rounding of the weights), a
    warning says what happened, the result counts the batches, and the model is left in float32."""
    tiny, single, reference = _tiny_logits()
    weight = tiny[-1].weight
    with pytest.warns(UserWarning, match=r"4 of 4 batch\(es\) overflowed torch\.float32.*float64 instead"):
        result = measure_sharpness(tiny, single, method="exact", num_replicates=4)
    assert float(result["normalized"]) == pytest.approx(reference, rel=1e-5)
    assert result.extra == {"skipped_batches": 0, "float64_batches": 4}
    assert tiny[-1].weight is weight and weight.dtype == torch.float32


def test_when_the_float64_estimate_fails_too_the_error_names_both(monkeypatch):
    """A float64 estimate that fails (an op without a float64 kernel, here simulated) leaves the batch out;
    with no batch left the error explains the overflow and the failure."""
    from lightning_flatness import measure

    tiny, single, _ = _tiny_logits()
    estimate = measure.SharpnessMeasurement.estimate

    def float32_only(self, inputs, target):
        if inputs.dtype == torch.float64:
            raise RuntimeError("no float64 kernel")
        return estimate(self, inputs, target)

    monkeypatch.setattr(measure.SharpnessMeasurement, "estimate", float32_only)
    with pytest.raises(
        ValueError, match=r"in torch\.float32 although the loss is finite.*float64 failed.*no float64 kernel"
    ):
        measure_sharpness(tiny, single, method="exact", num_replicates=4)


def test_auto_on_many_classes_samples_the_gauss_newton_part_within_its_error_bars_of_the_hessian():
    """A ReLU network with 40 classes at initialisation, eq. 20 loss (its logit Hessian is indefinite, the
    hard case for sampling): auto picks the sketch of the structured loss Hessian (its Gauss-Newton
    diagonal == Hessian diagonal here) and its default sketches keep normalized sharpness unbiased within a
    few percent."""
    from oracles import brute_force_measures as oracle

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 40)
    ).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 5, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(5, 40, generator=g, dtype=torch.float64)).argmax(1)  # a teacher's labels
    ref = oracle(model, x, y)
    batches = list(zip(x.tensor_split(8), y.tensor_split(8)))
    errors = []
    for seed in range(4):
        result = measure_sharpness(model, batches, generator=torch.Generator().manual_seed(seed))
        assert result.choice.method == "gauss_newton_sketch" and result.choice.quantity == "hessian"
        for measure in ("normalized", "hessian_trace"):
            error = float(result[measure]) - ref[measure]
            assert abs(error) < 3 * float(result[f"{measure}_stderr"]), (seed, measure, error)
        errors.append(float(result["normalized"]) / ref["normalized"] - 1)
    assert abs(sum(errors) / len(errors)) < 0.05, errors


@pytest.mark.parametrize("loss_fn", [None, F.cross_entropy], ids=["eq20", "cross_entropy"])
def test_a_zero_initialised_head_gives_zero_normalized_sharpness_and_says_why(loss_fn):
    """A classifier head initialised at zero (timm's Hiera and Sequencer): the logits are constant in every
    other weight and the head is zero, so eq. 17 is 0 in every tensor. That is the right value, and a
    warning says so; the trace is the head's curvature (none for eq. 20 at constant logits)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    nn.init.zeros_(model[2].weight)
    nn.init.zeros_(model[2].bias)
    batches = [(torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))) for _ in range(4)]
    with pytest.warns(UserWarning, match="normalized sharpness is 0 in every weight tensor"):
        result = measure_sharpness(model, batches, num_replicates=4, loss_fn=loss_fn, method="gauss_newton")
    assert float(result["normalized"]) == 0.0
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    names = ["0.weight", "2.weight"]
    reference = brute_force_hessian_diagonal(model, loss_fn or normalized_softmax_cross_entropy, x, y, names)
    assert float(reference["0.weight"].abs().max()) == 0.0  # no curvature behind a zero head
    trace = float(reference["2.weight"].sum())
    assert (trace > 0) == (loss_fn is F.cross_entropy)
    torch.testing.assert_close(result["hessian_trace_weights"], torch.tensor(trace, dtype=torch.float64))
    model[2].weight.data.normal_()  # a trained head: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (
            float(measure_sharpness(model, batches, num_replicates=4, method="gauss_newton")["normalized"])
            > 0
        )


def test_an_unconverged_stochastic_estimate_is_flagged_by_its_half_shift_as_the_callback_does():
    """One Hutchinson probe per group on a ReLU MLP: the noise biases normalized sharpness upwards (here 3x)
    by more than its error bar. measure_sharpness warns (the callback's check, not_converged_message), the
    half shift is a positive lower bound on the bias against the brute-force Hessian, and the exact method
    on the same batches raises no such warning. Then the check's two tests on values given directly."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    ).double()
    g = torch.Generator().manual_seed(100)
    batches = [
        (torch.randn(16, 10, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g))
        for _ in range(8)
    ]
    generator = torch.Generator().manual_seed(0)
    with pytest.warns(UserWarning, match="hutchinson estimate of normalized sharpness has not converged"):
        result = measure_sharpness(
            model, batches, method="hutchinson", num_probes=1, parameters="weights", generator=generator
        )
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    bias = float(result["normalized"]) - brute_force_measures(model, x, y)["normalized"]
    assert bias > 2 * float(result["normalized_stderr"])
    assert 0 < float(result["normalized_half_shift"]) <= bias
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = measure_sharpness(model, batches, method="exact", parameters="weights")
    assert not_converged_message(exact.values, "exact") is None  # deterministic: never flagged
    # the two tests of a stochastic estimate: the shift above two standard errors or above 5% of the value
    values = {"normalized": 10.0, "normalized_stderr": 1.0, "normalized_half_shift": 0.4}
    assert not_converged_message(values, "hutchinson") is None
    assert not_converged_message({**values, "normalized_half_shift": 0.6}, "exact") is None  # deterministic
    relative = not_converged_message({**values, "normalized_half_shift": 0.6}, "hessian_sketch")
    assert "raises it by 0.6 (6% of 10), more than 5% of it" in relative
    significant = not_converged_message(
        {**values, "normalized": 100.0, "normalized_half_shift": 2.5}, "hutchinson"
    )
    assert "raises it by 2.5 (2% of 100), more than twice its standard error 1" in significant
    assert (
        not_converged_message({**values, "normalized": 100.0, "normalized_half_shift": 2.0}, "hutchinson")
        is None
    )
    falls = {**values, "normalized_half_shift": -3.0}  # the value falls on halving: nothing to flag
    assert not_converged_message(falls, "hutchinson") is None
    assert not_converged_message({**values, "normalized_half_shift": float("nan")}, "hutchinson") is None


@pytest.mark.parametrize("method", ["exact", "hessian_sketch"])
def test_a_batch_whose_estimate_runs_out_of_memory_is_estimated_in_halves_pooled_by_samples(method):
    """The first batch of 12 fails at 12 and 6 samples and is estimated in pieces of 3; the later batches go
    to pieces of 3 at once (no failing attempt). The exact pooled values equal those of an unconstrained
    measurement to rounding (the pieces' estimates pooled by their sizes); the stochastic ones are finite;
    a warning says what happened and which `batch_size` avoids it."""
    model, batches = _mlp(), _data(num_batches=4, size=12)
    loss = OutOfMemoryAbove(3, normalized_softmax_cross_entropy)
    with pytest.warns(UserWarning, match="batch of 12 samples ran out of memory; .* pieces of at most 3"):
        result = measure_sharpness(
            model, batches, loss_fn=loss, method=method, num_replicates=4, generator=torch.Generator()
        )
    assert int(result["num_samples"]) == 48 and loss.raised == 2
    if method == "hessian_sketch":
        assert float(result["normalized"]) > 0
        return
    reference = measure_sharpness(model, batches, method="exact", num_replicates=4)
    for key, value in reference.values.items():
        torch.testing.assert_close(result[key], value, rtol=1e-12, atol=1e-15)


def test_an_estimate_out_of_memory_on_one_sample_raises():
    """Nothing left to halve: the error itself."""
    model, batches = _mlp(), _data(num_batches=1, size=4)
    with pytest.raises(torch.OutOfMemoryError):
        measure_sharpness(
            model, batches, loss_fn=OutOfMemoryAbove(0, normalized_softmax_cross_entropy), method="exact"
        )


def test_token_batches_out_of_memory_are_pooled_by_their_valid_tokens():
    """A causal LM whose samples have 2 to 5 valid tokens: pieces of a batch weigh by their tokens, so the
    pooled values equal those of the unconstrained measurement (the loss sees tokens, not samples: above 9
    it runs out of memory)."""
    model = _TinyForCausalLM()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 7, (4, 6), generator=g)
        labels = ids.clone()
        labels[0, 3:], labels[1, 5:] = -100, -100
        batches.append({"input_ids": ids, "labels": labels})
    loss = OutOfMemoryAbove(9, normalized_softmax_cross_entropy)
    with pytest.warns(UserWarning, match="batch of 4 samples ran out of memory"):
        result = measure_sharpness(model, batches, loss_fn=loss, method="exact", num_replicates=2)
    reference = measure_sharpness(model, batches, method="exact", num_replicates=2)
    assert loss.raised > 0 and int(result["num_samples"]) == int(reference["num_samples"]) == 2 * (
        2 + 4 + 5 + 5
    )
    for key, value in reference.values.items():
        torch.testing.assert_close(result[key], value, rtol=1e-12, atol=1e-15)
