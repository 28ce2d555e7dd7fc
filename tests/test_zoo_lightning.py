"""Models as users have them, inside a plain LightningModule, with ``SharpnessMonitor()`` at its defaults
(only the subset is small): torchvision (BatchNorm, residual, SE, hardswish), timm (ViT: LayerNorm, GELU,
fused attention, class token, position embedding; ConvNeXt: depthwise conv, layer scale) and Hugging Face
(a BERT classifier on dict batches with ``SequenceClassifierOutput``; a GPT-2 causal LM whose logits are
``(N, T, V)``). No user code beyond the LightningModule: the batches, outputs, token-level loss and the
method are handled by the library. Values are checked against float64 brute force of what the logged
method says it measured (Hessian or Gauss-Newton diagonal)."""

from __future__ import annotations

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

for _module in ("torchvision", "timm", "transformers"):  # the `zoo` extra
    pytest.importorskip(_module)

from callback_models import assert_same_training_state, quiet_trainer, training_state  # noqa: E402
from zoo_models import (  # noqa: E402
    TINY,
    segformer_model,
    seq2seq_model,
    span_batch,
    tiny_audio_classifier,
    tiny_bert_multiple_choice,
    tiny_bert_problem,
    tiny_bert_question_answering,
    tiny_moe,
)
from zoo_oracle import brute_force_ggn_diagonal, brute_force_hessian_diagonal  # noqa: E402

from lightning_flatness import SharpnessMonitor  # noqa: E402
from lightning_flatness.functional import normalized_softmax_cross_entropy, select_parameters  # noqa: E402
from lightning_flatness.functional.estimators.registry import ESTIMATORS  # noqa: E402
from lightning_flatness.functional.measures import sharpness_measures  # noqa: E402
from lightning_flatness.functional.model_io import TokenLoss, select_samples  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ImageClassifier(pl.LightningModule):
    """How a torchvision/timm classifier is usually trained with Lightning."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class HuggingFaceModule(pl.LightningModule):
    """How the Hugging Face docs train with Lightning: dict batches with ``labels``, the model's own loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **batch):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        return self(**batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self(**batch).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class _DictDataset(Dataset):
    """Samples as Hugging Face datasets give them: the inputs' entries and ``labels`` (or, where ``labels``
    is a dict, its entries: a question-answering span)."""

    def __init__(self, inputs: dict, labels) -> None:
        self.inputs = inputs
        self.targets = labels if isinstance(labels, dict) else {"labels": labels}

    def __len__(self) -> int:
        return len(next(iter(self.targets.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in {**self.inputs, **self.targets}.items()}


class _Data(pl.LightningDataModule):
    def __init__(self, dataset) -> None:
        super().__init__()
        self.dataset = dataset

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=8, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.dataset, batch_size=8)


def _module_and_data(name: str):
    model, (inputs, target) = TINY[name](n=24)
    model.train()
    if isinstance(inputs, dict):
        return HuggingFaceModule(model), _DictDataset(inputs, target), inputs, target
    return ImageClassifier(model), TensorDataset(inputs, target), inputs, target


# what auto measures: exact Hessian where the network is piecewise linear in each weight, else the
# sketched Hessian diagonal where its node rules cover every operation, else the Gauss-Newton diagonal
# (GPT-2: its LM head is tied to the token embedding, a weight used twice, which auto leaves to the
# Gauss-Newton diagonal; sampled for its T * V outputs)
EXPECTED = {
    "resnet": ("exact", "hessian"),
    "mobilenet_v3": ("hessian_sketch", "hessian"),
    "efficientnet": ("hessian_sketch", "hessian"),  # SiLU(inplace=True): run out of place for the measurement
    "torchvision_vit": ("hessian_sketch", "hessian"),  # nn.MultiheadAttention, written out
    "swin": ("hessian_sketch", "hessian"),  # windows of all samples along dim 0
    "vit": ("hessian_sketch", "hessian"),
    "convnext": ("hessian_sketch", "hessian"),
    "convnext_v2": ("hessian_sketch", "hessian"),  # the 2-norm of its global response normalization
    "bert": ("hessian_sketch", "hessian"),
    "gpt2": ("gauss_newton_mc", "gauss_newton"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(TINY) - {"convnext_v2"}))  # ConvNeXt's run, with one op more: its
def test_zoo_model_in_a_plain_lightning_module_is_measured_at_the_defaults(name):  # choice is checked below
    module, dataset, inputs, target = _module_and_data(name)
    monitor = SharpnessMonitor(num_samples=16, dtype="float64")
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer([monitor], max_epochs=2)
    trainer.fit(module, _Data(dataset))
    assert trainer.current_epoch == 2 and len(monitor.history) == 2
    last = monitor.history[-1]
    method, quantity = EXPECTED[name]
    assert last["method"] == method and monitor._choice.quantity == quantity
    assert all(math.isfinite(h["normalized"]) and h["normalized"] > 0 for h in monitor.history), (
        monitor.history
    )
    if name != "gpt2":  # the causal LM counts valid tokens: see the next test
        assert last["num_samples"] == 16
    names = list(select_parameters(module))
    assert sorted(k.split("/", 1)[1] for k in last if k.startswith("hessian_trace/")) == sorted(names)
    weight_names = [n for n in names if module.get_parameter(n).ndim >= 2]
    assert sorted(k.split("/", 1)[1] for k in last if k.startswith("normalized/")) == sorted(weight_names)
    assert len(weight_names) < len(names)  # biases and normalization parameters: in the trace only
    offsets = ("pos_embed", "cls_token", "class_token", "position")
    assert not any(marker in n for n in names for marker in offsets)  # additive offsets
    if method == "gauss_newton_mc":
        assert last["normalized_stderr"] > 0
        return
    idx = monitor.state_dict()["indices"]
    x = select_samples(inputs, idx, len(target)) if isinstance(inputs, dict) else inputs[idx]
    y = target[idx]
    net = module.double().eval()
    oracle = brute_force_hessian_diagonal if quantity == "hessian" else brute_force_ggn_diagonal
    diag = oracle(net, normalized_softmax_cross_entropy, x, y, names)
    weights = {n: p.detach() for n, p in net.named_parameters() if n in names}
    ref = sharpness_measures(weights, diag)
    if ESTIMATORS[method].stochastic:  # unbiased for the trace (linear in the diagonal), on the same samples
        assert abs(last["hessian_trace"] - float(ref["hessian_trace"])) < 4 * last["hessian_trace_stderr"]
        return
    # deterministic methods: equal to the float64 brute force of the quantity they claim, on the same samples
    for measure in ("normalized", "matrix_normalized", "hessian_trace", "hessian_trace_weights"):
        assert last[measure] == pytest.approx(float(ref[measure]), rel=1e-7), measure


def test_convnext_v2_is_measured_with_the_hessian():
    """ConvNeXt V2 differs from ConvNeXt (whose Lightning run is above) by its global response
    normalization: ``auto`` picks what :data:`EXPECTED` says for it (the sketch's node rule for the 2-norm;
    its values are checked against the brute-force Hessian in ``test_estimator_hessian_sketch.py``)."""
    from lightning_flatness.functional.estimators.method_choice import choose_method

    model, (inputs, target) = TINY["convnext_v2"](n=4)
    choice = choose_method(model, normalized_softmax_cross_entropy, inputs, target)
    assert (choice.method, choice.quantity) == EXPECTED["convnext_v2"], choice.reason
    assert "norm" in choice.reason


def test_causal_lm_is_scored_per_token_with_the_shift_and_padding_ignored():
    """The GPT-2 run measures the token-level loss (shifted, -100 ignored): its per-group weights are the
    valid tokens, so num_samples counts tokens."""
    module, dataset, inputs, target = _module_and_data("gpt2")
    monitor = SharpnessMonitor(num_samples=16)
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer([monitor], max_epochs=1)
    trainer.fit(module, _Data(dataset))
    assert isinstance(monitor._loss, TokenLoss) and monitor._loss.shift
    idx = monitor.state_dict()["indices"]
    valid_tokens = int((target[idx][:, 1:] != -100).sum())
    assert monitor.history[-1]["num_samples"] == valid_tokens


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet", "torchvision_vit", "swin"])
def test_training_of_a_zoo_model_is_bit_identical_with_and_without_the_monitor(name):
    """The measurement switches modules for its duration (activations out of place, nn.MultiheadAttention
    written out, attention on its math path): the training run, its BatchNorm buffers and optimizer
    state are bit-identical with and without the monitor, and the switches are back after the fit."""
    runs = {}
    for label, callbacks in [("without", []), ("with", [SharpnessMonitor(num_samples=16)])]:
        pl.seed_everything(0, verbose=False)
        module, dataset, _, _ = _module_and_data(name)
        trainer = quiet_trainer(callbacks, max_epochs=2)
        trainer.fit(module, _Data(dataset))
        state = {k: v.clone() for k, v in module.state_dict().items()}
        for i, opt_state in enumerate(trainer.optimizers[0].state_dict()["state"].values()):
            state.update({f"opt.{i}.{k}": torch.as_tensor(v).clone() for k, v in opt_state.items()})
        runs[label] = state
        if callbacks:
            assert len(callbacks[0].history) == 2 and callbacks[0].history[-1]["method"] == "hessian_sketch"
        assert not any(
            "forward" in m.__dict__ for m in module.modules() if isinstance(m, torch.nn.MultiheadAttention)
        )
        assert all(m.inplace for m in module.modules() if isinstance(m, torch.nn.SiLU))
    assert_same_training_state(runs["with"], runs["without"])


@pytest.mark.slow
def test_bert_trained_with_activation_checkpointing_is_measured_with_the_hessian_and_left_bit_identical():
    """``gradient_checkpointing_enable()`` (the Hugging Face docs' memory saver) checkpoints the encoder's
    layers in training and sets ``requires_grad`` on the input embeddings' output from a forward hook. The
    measurement (eval mode: nothing checkpointed) measures the sketched Hessian as without it; the
    checkpointed training run is bit-identical with and without the monitor."""
    runs = {}
    for label, callbacks in [("without", []), ("with", [SharpnessMonitor(num_samples=16)])]:
        pl.seed_everything(0, verbose=False)
        module, dataset, _, _ = _module_and_data("bert")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5: a deprecated alias
            module.model.gradient_checkpointing_enable()
        trainer = quiet_trainer(callbacks, max_epochs=2)
        trainer.fit(module, _Data(dataset))
        runs[label] = {k: v.clone() for k, v in module.state_dict().items()}
        if callbacks:
            history = callbacks[0].history
            assert [h["method"] for h in history] == ["hessian_sketch"] * 2
            assert all(math.isfinite(h["normalized"]) for h in history)
    assert_same_training_state(runs["with"], runs["without"])


class SegmentationModule(pl.LightningModule):
    """How torchvision's segmentation reference trains: ``model(x)["out"]``, void pixels (255) ignored."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)  # {"out": (N, K, H, W)}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x)["out"], y, ignore_index=255)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x)["out"], y, ignore_index=255))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.mark.slow
def test_torchvision_segmentation_model_is_measured_per_pixel_with_its_void_label():
    import torchvision

    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, 32, 32, generator=g)
    y = torch.randint(0, 3, (24, 32, 32), generator=g)
    y[:, :3] = 255  # a void border
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(num_classes=3, weights_backbone=None)
    monitor = SharpnessMonitor(num_samples=16, loss_fn=torch.nn.CrossEntropyLoss(ignore_index=255))
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer([monitor], max_epochs=2)
    trainer.fit(SegmentationModule(model), _Data(TensorDataset(x, y)))
    loss = monitor._loss
    assert isinstance(loss, TokenLoss) and loss.class_dim == 1 and loss.ignore_index == 255
    assert loss.base is F.cross_entropy  # the closed forms, per pixel
    assert len(monitor.history) == 2 and all(math.isfinite(h["normalized"]) for h in monitor.history)
    assert monitor.history[-1]["method"] == "hessian_sketch"  # hardswish: the Hessian, sketched
    idx = monitor.state_dict()["indices"]
    assert monitor.history[-1]["num_samples"] == int((y[idx] != 255).sum())  # weighted by scored pixels


def test_encoder_decoder_model_trained_with_labels_only_is_measured_at_the_defaults():
    """T5 as the Hugging Face docs train it (``input_ids`` and ``labels``; the model's own loss): the
    monitor derives the decoder inputs from the labels and scores the decoder's logits per token."""
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(3, 32, (24, 7), generator=g)}
    labels = torch.randint(3, 32, (24, 5), generator=g)
    labels[::3, -2:] = -100
    monitor = SharpnessMonitor(num_samples=16)
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer([monitor], max_epochs=2)
    trainer.fit(HuggingFaceModule(seq2seq_model("t5")), _Data(_DictDataset(inputs, labels)))
    assert (
        isinstance(monitor._loss, TokenLoss) and not monitor._loss.shift
    )  # aligned with the decoder's logits
    assert len(monitor.history) == 2 and all(h["normalized"] > 0 for h in monitor.history)
    idx = monitor.state_dict()["indices"]
    assert monitor.history[-1]["num_samples"] == int((labels[idx] != -100).sum())


def test_hugging_face_segformer_trained_with_labels_only_is_measured_at_the_defaults():
    """Segformer as the Hugging Face docs train it (``pixel_values`` and full-resolution ``labels`` with a
    void label; the model's own loss upsamples its quarter-resolution logits): the monitor reads the
    loss the same way, with its default eq. 20, and weights the groups by the scored pixels."""
    g = torch.Generator().manual_seed(0)
    inputs = {"pixel_values": torch.randn(24, 3, 32, 32, generator=g)}
    labels = torch.randint(0, 3, (24, 32, 32), generator=g)
    labels[:, :4] = 255  # config.semantic_loss_ignore_index
    monitor = SharpnessMonitor(num_samples=16)
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer([monitor], max_epochs=2)
    trainer.fit(HuggingFaceModule(segformer_model(3)), _Data(_DictDataset(inputs, labels)))
    loss = monitor._loss
    assert isinstance(loss, TokenLoss) and loss.output_size == (32, 32) and loss.ignore_index == 255
    assert len(monitor.history) == 2 and all(h["normalized"] > 0 for h in monitor.history)
    idx = monitor.state_dict()["indices"]
    assert monitor.history[-1]["num_samples"] == int((labels[idx] != 255).sum())


def test_hugging_face_question_answering_model_is_measured_at_the_defaults():
    """BERT for extractive question answering as the Hugging Face docs train it (dict batches with
    ``start_positions`` and ``end_positions``, the model's own loss): the monitor reads the span logits as
    two rows of position logits per sample, measures the Hessian with the sketch, and counts two scored
    rows per sample; the trace is within 4 standard errors of the float64 brute force on its subset."""
    model, (inputs, span) = tiny_bert_question_answering(24)
    monitor = SharpnessMonitor(num_samples=16, dtype="float64")
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer([monitor], max_epochs=2)
    module = HuggingFaceModule(model.train())  # its dropout is 0
    positions = span_batch({}, span)  # start_positions, end_positions
    trainer.fit(module, _Data(_DictDataset(inputs, positions)))
    assert isinstance(monitor._loss, TokenLoss) and not monitor._loss.shift
    last = monitor.history[-1]
    assert len(monitor.history) == 2 and last["method"] == "hessian_sketch"
    assert monitor._choice.quantity == "hessian" and last["num_samples"] == 32
    assert all(math.isfinite(h["normalized"]) and h["normalized"] > 0 for h in monitor.history)
    idx = monitor.state_dict()["indices"]
    x = select_samples(inputs, idx, 24)
    y = span[idx]
    names = list(select_parameters(module))
    diag = brute_force_hessian_diagonal(
        module.double().eval(), TokenLoss(normalized_softmax_cross_entropy), x, y, names
    )
    trace = sum(float(d.detach().sum()) for d in diag.values())
    assert abs(last["hessian_trace"] - trace) < 4 * last["hessian_trace_stderr"]


def _fit_on_the_per_layer_path(model, inputs, labels) -> SharpnessMonitor:
    """Two epochs of ``model`` as the Hugging Face docs train it, with ``SharpnessMonitor`` at its defaults
    (16 samples); asserts that no estimator fell back to per-sample backward passes (its warning)."""
    monitor = SharpnessMonitor(num_samples=16)
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer([monitor], max_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(HuggingFaceModule(model.train()), _Data(_DictDataset(inputs, labels)))
    assert not any("per-layer contractions do not apply" in str(w.message) for w in caught)
    return monitor


def test_hugging_face_multiple_choice_model_is_measured_at_the_defaults():
    """BERT for multiple choice (``input_ids`` ``(N, 3, T)``, the model's own loss): its encoder's
    ``(N * 3, T)`` rows take the per-layer path (no per-sample fallback warning), and the monitor measures
    the Hessian with the sketch, one sample per question."""
    model, (inputs, labels) = tiny_bert_multiple_choice(24)
    monitor = _fit_on_the_per_layer_path(model, inputs, labels)
    last = monitor.history[-1]
    assert len(monitor.history) == 2 and last["method"] == "hessian_sketch" and last["num_samples"] == 16
    assert all(math.isfinite(h["normalized"]) and h["normalized"] > 0 for h in monitor.history)


def test_hugging_face_multi_label_classifier_is_measured_with_its_own_loss():
    """A BERT classifier with float multi-hot labels (transformers trains it with BCEWithLogitsLoss): the
    monitor, at its defaults, says so and measures that loss, not eq. 20."""
    model, (inputs, labels) = tiny_bert_problem("multi_label_classification", 24)
    monitor = SharpnessMonitor(num_samples=16)
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer([monitor], max_epochs=1)
    with pytest.warns(UserWarning, match="trained for multi_label_classification"):
        trainer.fit(HuggingFaceModule(model.train()), _Data(_DictDataset(inputs, labels)))
    assert monitor._loss is F.binary_cross_entropy_with_logits
    assert math.isfinite(monitor.history[-1]["normalized"]) and monitor.history[-1]["normalized"] > 0


def test_hugging_face_mixture_of_experts_is_measured_at_the_defaults():
    """A Qwen2-MoE causal LM as Hugging Face builds it (experts by ``torch._grouped_mm``), trained on its own
    loss: the monitor measures the sketched Hessian on the per-layer path (no per-sample fallback), each
    expert as its own weight matrix, and the trace is within 4 standard errors of the float64 brute force
    on its subset (the oracle runs the experts' ``"eager"`` loop: ``_grouped_mm`` has no float64 kernel)."""
    model, (inputs, labels) = tiny_moe("qwen2_moe", n=24)
    model.config._experts_implementation = "grouped_mm"  # the default of a model built by transformers
    monitor = _fit_on_the_per_layer_path(model, inputs, labels)
    last = monitor.history[-1]
    assert len(monitor.history) == 2 and last["method"] == "hessian_sketch"
    experts = sorted(k for k in last if k.startswith("normalized/") and ".experts." in k)
    assert [k.rsplit(".", 2)[-2:] for k in experts] == [
        [p, str(e)] for p in ("down_proj", "gate_up_proj") for e in range(3)
    ]
    assert all(math.isfinite(h["normalized"]) and h["normalized"] > 0 for h in monitor.history)
    idx = monitor.state_dict()["indices"]
    x, y = select_samples(inputs, idx, 24), labels[idx]
    module64 = HuggingFaceModule(model).double().eval()
    model.config._experts_implementation = "eager"
    names = list(select_parameters(module64))
    diag = brute_force_hessian_diagonal(
        module64, TokenLoss(normalized_softmax_cross_entropy, shift=True), x, y, names
    )
    trace = sum(float(d.detach().sum()) for d in diag.values())
    assert abs(last["hessian_trace"] - trace) < 4 * last["hessian_trace_stderr"]
    model.config._experts_implementation = "grouped_mm"  # no float64 kernel: measured densely in float64
    wide = SharpnessMonitor(num_samples=16, dtype="float64")
    quiet_trainer([wide], max_epochs=1).fit(
        HuggingFaceModule(model.float().train()), _Data(_DictDataset(inputs, labels))
    )
    assert math.isfinite(wide.history[-1]["normalized"]) and wide.history[-1]["normalized"] > 0


def test_training_of_a_mixture_of_experts_is_bit_identical_with_and_without_the_monitor():
    """The measurement runs the experts densely (an instance ``forward`` for its duration) and evaluates the
    router's in-place division out of place: the training run (weights, optimizer state, RNG) is bit-identical
    with and without the monitor, and the experts run their own forward again after the fit."""
    from lightning_flatness.functional.parameters import is_experts_module

    runs = {}
    for label, callbacks in [("without", []), ("with", [SharpnessMonitor(num_samples=16)])]:
        pl.seed_everything(0, verbose=False)
        model, (inputs, labels) = tiny_moe("qwen3_moe", n=24)
        model.config._experts_implementation = "grouped_mm"
        module = HuggingFaceModule(model.train())
        trainer = quiet_trainer(callbacks, max_epochs=2)
        trainer.fit(module, _Data(_DictDataset(inputs, labels)))
        runs[label] = training_state(module, trainer)
        if callbacks:
            assert len(callbacks[0].history) == 2 and callbacks[0].history[-1]["method"] == "hessian_sketch"
        assert not any("forward" in m.__dict__ for m in module.modules() if is_experts_module(m))
    assert_same_training_state(runs["with"], runs["without"])


def test_llama4_is_measured_on_the_per_layer_path_and_its_training_is_bit_identical():
    """Llama 4 (its own mixture-of-experts layer by ``torch.bmm``, RMS norms and an L2 norm written out,
    complex rotary embeddings): the monitor at its defaults measures the sketched Hessian with no per-
    sample fallback, with its layer written token by token and its norms as one op for the measurements
    only; the training run (weights, optimizer state, RNG) is bit-identical with and without it, and every
    module runs its own forward after the fit."""
    from lightning_flatness.functional.dense_experts import is_llama4_moe
    from lightning_flatness.functional.rms_norm_modules import is_rms_norm_candidate

    runs = {}
    for label, callbacks in [("without", []), ("with", [SharpnessMonitor(num_samples=16)])]:
        pl.seed_everything(0, verbose=False)
        model, (inputs, labels) = tiny_moe("llama4", n=24)
        module = HuggingFaceModule(model.train())
        trainer = quiet_trainer(callbacks, max_epochs=2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, _Data(_DictDataset(inputs, labels)))
        assert not any("per-layer contractions do not apply" in str(w.message) for w in caught)
        runs[label] = training_state(module, trainer)
        if callbacks:
            history = callbacks[0].history
            assert len(history) == 2 and history[-1]["method"] == "hessian_sketch"
            assert all(math.isfinite(h["normalized"]) and h["normalized"] > 0 for h in history)
        rewritten = [m for m in module.modules() if is_llama4_moe(m) or is_rms_norm_candidate(m)]
        assert len(rewritten) >= 4 and not any("forward" in m.__dict__ for m in rewritten)
    assert_same_training_state(runs["with"], runs["without"])


def _fit_audio_classifier(callbacks: list) -> tuple[pl.LightningModule, dict, dict, torch.Tensor, list]:
    """wav2vec 2.0's Conformer fitted for 2 epochs on 24 padded clips (dict batches of ``input_values``,
    ``attention_mask``, ``labels``: a third of the second clip of every pair is padding), with ``callbacks``:
    the module, its final training state (weights, buffers, optimizer state), the inputs and targets, and
    the warnings of the fit."""
    pl.seed_everything(0, verbose=False)
    model, (inputs, target) = tiny_audio_classifier("Wav2Vec2ConformerForSequenceClassification", n=24)
    mask = torch.ones(inputs["input_values"].shape, dtype=torch.long)
    mask[1::2, -20:] = 0
    inputs = {**inputs, "attention_mask": mask}
    module = HuggingFaceModule(model.train())
    trainer = quiet_trainer(callbacks, max_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, _Data(_DictDataset(inputs, target)))
    assert trainer.current_epoch == 2
    state = {k: v.clone() for k, v in module.state_dict().items()}
    for i, opt_state in enumerate(trainer.optimizers[0].state_dict()["state"].values()):
        state.update({f"opt.{i}.{k}": torch.as_tensor(v).clone() for k, v in opt_state.items()})
    return module, state, inputs, target, caught


@pytest.mark.slow
def test_hugging_face_audio_classifier_is_measured_at_the_defaults():
    """wav2vec 2.0's Conformer (relative attention, a convolution module with GLU) on dict batches of padded
    clips, trained with its own loss: ``auto`` measures the sketched Hessian on the per-layer path, the logged
    Hessian trace is unbiased for the float64 brute force on the same samples (within 4 standard errors) at
    the last measurement, and the training run is bit-identical with and without the monitor."""
    monitor = SharpnessMonitor(num_samples=16, dtype="float64")
    module, state, inputs, target, caught = _fit_audio_classifier([monitor])
    assert not [w for w in caught if "per-layer contractions do not apply" in str(w.message)]
    assert len(monitor.history) == 2
    assert (monitor._choice.method, monitor._choice.quantity) == ("hessian_sketch", "hessian")
    last = monitor.history[-1]
    assert last["num_samples"] == 16 and math.isfinite(last["normalized"]) and last["normalized"] > 0
    assert_same_training_state(state, _fit_audio_classifier([])[1])
    idx = monitor.state_dict()["indices"]
    names = list(select_parameters(module))
    net = module.double().eval()
    diag = brute_force_hessian_diagonal(
        net, normalized_softmax_cross_entropy, select_samples(inputs, idx, len(target)), target[idx], names
    )
    truth = sum(float(d.sum()) for d in diag.values())
    assert abs(last["hessian_trace"] - truth) < 4 * last["hessian_trace_stderr"]
