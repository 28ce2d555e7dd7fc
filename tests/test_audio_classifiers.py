"""Hugging Face audio classifiers as their documentation builds them (random weights, tiny configurations,
random clips; the ``zoo`` extra): wav2vec 2.0 (convolutional feature encoder with GroupNorm, grouped
positional convolution under weight norm, transformer, mean-pooled head), its Conformer variant (relative
attention: queries against position encodings projected by a weight; a convolution module with GLU),
Wav2Vec2-BERT (spectrogram features, Conformer layers) and WavLM (its attention calls
``F.multi_head_attention_forward`` itself, with a gated relative position bias: a function of an embedding
weight repeated per sample, multiplied by a gate of the data).

``auto`` measures the Hessian (it measured the Gauss-Newton diagonal of the last three: ``glu`` had no node
rule; the relative scores' weight, the attention call's projections and the repeated position bias sent every
estimator to per-sample passes), the sketched Hessian is unbiased for the brute-force Hessian diagonal of
weights across the network, from which the Gauss-Newton diagonal differs, and it runs on the per-layer
path."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from oracles import assert_unbiased, hessian_sketch_draws
from zoo_models import tiny_audio_classifier
from zoo_oracle import brute_force_ggn_diagonal, brute_force_hessian_diagonal

from lightning_flatness.functional.estimators.method_choice import choose_method
from lightning_flatness.functional.model_io import extract_logits

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

F64 = torch.float64

#: per class: the weights checked against brute force (a few from each kind of layer)
CHECKED = {
    "Wav2Vec2ForSequenceClassification": (
        "wav2vec2.feature_extractor.conv_layers.1.conv.weight",
        "wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original1",
        "wav2vec2.encoder.layers.0.attention.k_proj.weight",
        "wav2vec2.encoder.layers.0.feed_forward.intermediate_dense.weight",
        "projector.weight",
    ),
    "Wav2Vec2ConformerForSequenceClassification": (
        "wav2vec2_conformer.encoder.layers.0.self_attn.linear_pos.weight",
        "wav2vec2_conformer.encoder.layers.0.self_attn.linear_q.weight",
        "wav2vec2_conformer.encoder.layers.0.conv_module.pointwise_conv1.weight",
        "wav2vec2_conformer.encoder.layers.0.conv_module.depthwise_conv.weight",
        "projector.weight",
    ),
    "Wav2Vec2BertForSequenceClassification": (
        "wav2vec2_bert.feature_projection.projection.weight",
        "wav2vec2_bert.encoder.layers.0.self_attn.linear_q.weight",
        "wav2vec2_bert.encoder.layers.0.conv_module.pointwise_conv1.weight",
        "wav2vec2_bert.encoder.layers.0.conv_module.depthwise_conv.weight",
        "projector.weight",
    ),
    "WavLMForSequenceClassification": (
        "wavlm.feature_extractor.conv_layers.1.conv.weight",
        "wavlm.encoder.layers.0.attention.k_proj.weight",
        "wavlm.encoder.layers.0.attention.v_proj.weight",
        "wavlm.encoder.layers.0.attention.gru_rel_pos_linear.weight",
        "wavlm.encoder.layers.0.attention.rel_attn_embed.weight",
        "projector.weight",
    ),
}


def _loss(outputs, target):
    return F.cross_entropy(extract_logits(outputs), target)


#: the classes measured again on padded clips (``attention_mask``: their feature extractors return one)
PADDED = (
    "Wav2Vec2ConformerForSequenceClassification",
    "Wav2Vec2BertForSequenceClassification",
    "WavLMForSequenceClassification",
)


@pytest.mark.parametrize(
    "name, padded", [(n, False) for n in CHECKED] + [(n, True) for n in PADDED], ids=lambda v: str(v)
)
def test_audio_classifiers_take_the_hessian_sketch_unbiased(name, padded):
    """Also on padded clips: the models zero the hidden states at padded frames in place, and the per-layer
    path holds there too."""
    model, (inputs, y) = tiny_audio_classifier(name, n=4, dtype=F64)
    if padded:  # the second and fourth clips end early
        (key,) = inputs
        mask = torch.ones(inputs[key].shape[:2], dtype=torch.long)
        mask[1, -mask.shape[1] // 3 :] = 0
        mask[3, -mask.shape[1] // 2 :] = 0
        inputs = {**inputs, "attention_mask": mask}
    names = list(CHECKED[name])
    choice = choose_method(model, F.cross_entropy, inputs, y)
    assert (choice.method, choice.quantity) == ("hessian_sketch", "hessian"), choice.reason
    reference = brute_force_hessian_diagonal(model, _loss, inputs, y, names, chunk=32)
    ggn = brute_force_ggn_diagonal(model, _loss, inputs, y, names)
    flat = lambda d: torch.cat([d[n].detach().flatten() for n in names])  # noqa: E731
    assert float((flat(ggn) - flat(reference)).norm() / flat(reference).norm()) > 0.05  # the residual matters
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        draws = hessian_sketch_draws(model, F.cross_entropy, inputs, y, names)
    fallbacks = [str(w.message) for w in caught if "per-layer contractions do not apply" in str(w.message)]
    assert not fallbacks, fallbacks[:1]
    # entries no random column reaches are exact: to rounding of the largest entry
    assert_unbiased(draws, flat(reference), atol=1e-12 * float(flat(reference).abs().max()))
