"""Tiny random-weight models built by torchvision, timm and Hugging Face ``transformers`` exactly as
those libraries build them (their own classes and configs, no download), each with a synthetic batch.

Every builder seeds the global RNG, returns ``(model, batch)`` with the model in ``eval()`` mode (no
dropout; BatchNorm on running statistics) and ``batch = (inputs, target)``, ``inputs`` being what the
model is called with (a tensor, or a dict of keyword arguments for ``transformers``) and ``target``
the labels (``(N,)`` class indices, or ``(N, T)`` token ids with ``-100`` on padding for the causal LM,
whose loss is :class:`TokenLoss` with ``shift=True``).

Two sizes:

- ``TINY`` builders: a few hundred to a few thousand weights, so that a float64 brute-force Hessian
  diagonal (one Hessian-vector product per weight, :mod:`tests.zoo_oracle`) takes seconds.
- ``SMALL`` builders: the libraries' standard architectures at their smallest standard depth
  (torchvision ``ResNet(BasicBlock, [1, 1, 1, 1])``, ``mobilenet_v3_small(width_mult=0.25)``) on
  small inputs, for "builds and runs" checks.

What each exercises: ResNet (BatchNorm, residual sums, ReLU, max-pool), MobileNetV3 (depthwise conv,
squeeze-excitation, hardswish, hardsigmoid), EfficientNet (in-place SiLU, squeeze-excitation with
sigmoid), torchvision's ViT (``nn.MultiheadAttention``), Swin (windowed attention: several rows per
sample along dim 0), ViT (patch conv, LayerNorm, GELU, fused attention, ``cls_token``, ``pos_embed``),
ConvNeXt (depthwise 7x7 conv, channels-last LayerNorm, GELU, layer scale), ConvNeXt V2 (global response
normalization: a 2-norm over the positions), BERT (embedding tables, attention mask, ``token_type_ids``,
pooler tanh, ``SequenceClassifierOutput``; outside ``TINY``, :data:`TASK_HEADS`: question answering's
span logits and targets, multiple choice's rows, regression and multi-label classifiers) and GPT-2
(``Conv1D``, causal attention, tied LM head, token logits ``(N, T, V)``). Beyond ``TINY``,
:func:`seq2seq_model` (T5, BART, Whisper trained with ``labels`` only) and :func:`segformer_model`
(low-resolution logits upsampled by the loss) build models for the reach tests.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NUM_CLASSES = 5


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


def _images(n: int, size: int, seed: int, channels: int = 3) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, channels, size, size, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return x, y


def _finish(model: nn.Module, batch: Any, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    model = model.to(dtype).eval()
    if isinstance(batch[0], Tensor):
        inputs = batch[0].to(dtype)
    else:
        inputs = batch[0]
    return model, (inputs, batch[1])


# ---------------------------------------------------------------- torchvision


def tiny_resnet(n: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32):
    """torchvision ``BasicBlock``s (BatchNorm, residual, strided downsample) in a 4-8 channel stem/stage
    net: 3x3 conv stem, ``BasicBlock(4, 4)``, ``BasicBlock(4, 8, stride=2, downsample)``, average pool,
    ``Linear(8, 5)``. torchvision's ``ResNet`` class fixes 64 base channels, too many for brute force."""
    from torchvision.models.resnet import BasicBlock, conv1x1

    _seed(seed)
    down = nn.Sequential(conv1x1(4, 8, 2), nn.BatchNorm2d(8))
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        BasicBlock(4, 4),
        BasicBlock(4, 8, stride=2, downsample=down),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, NUM_CLASSES),
    )
    _randomize_batchnorm(model, seed)
    return _finish(model, _images(n, 6, seed), dtype)


def small_resnet(n: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32):
    """torchvision ``ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5)`` on 16x16 inputs (4.9M weights)."""
    from torchvision.models.resnet import BasicBlock, ResNet

    _seed(seed)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=NUM_CLASSES)
    return _finish(model, _images(n, 16, seed), dtype)


def tiny_mobilenet_v3(n: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32):
    """torchvision ``MobileNetV3`` with a two-block setting (SE + hardswish/hardsigmoid, depthwise
    convs, one residual block), ``last_channel=16``, on 8x8 inputs."""
    from torchvision.models.mobilenetv3 import InvertedResidualConfig, MobileNetV3

    _seed(seed)
    setting = [
        InvertedResidualConfig(8, 3, 16, 8, True, "HS", 1, 1, 1.0),  # SE, hardswish, residual
        InvertedResidualConfig(8, 3, 16, 8, True, "RE", 2, 1, 1.0),  # SE, ReLU, stride 2
    ]
    model = MobileNetV3(setting, last_channel=16, num_classes=NUM_CLASSES, dropout=0.0)
    _randomize_batchnorm(model, seed)
    return _finish(model, _images(n, 8, seed), dtype)


def small_mobilenet_v3(n: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32):
    """torchvision ``mobilenet_v3_small(width_mult=0.25, num_classes=5)`` on 32x32 inputs."""
    from torchvision.models import mobilenet_v3_small

    _seed(seed)
    model = mobilenet_v3_small(width_mult=0.25, num_classes=NUM_CLASSES)
    _randomize_batchnorm(model, seed)
    return _finish(model, _images(n, 32, seed), dtype)


def tiny_efficientnet(n: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32):
    """torchvision ``EfficientNet`` with a two-block setting (``MBConv``: depthwise conv, squeeze-excitation
    with SiLU and sigmoid, ``SiLU(inplace=True)`` after every BatchNorm, stochastic depth, one residual
    block), ``last_channel=16``, on 8x8 inputs."""
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig

    _seed(seed)
    setting = [MBConvConfig(1, 3, 1, 8, 8, 1), MBConvConfig(2, 3, 2, 8, 8, 1)]
    model = EfficientNet(setting, dropout=0.0, last_channel=16, num_classes=NUM_CLASSES)
    _randomize_batchnorm(model, seed)
    return _finish(model, _images(n, 8, seed), dtype)


def tiny_torchvision_vit(n: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32):
    """torchvision ``VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2,
    hidden_dim=8, mlp_dim=16, num_classes=5)``: ``nn.MultiheadAttention`` (one fused
    ``F.multi_head_attention_forward`` call), LayerNorm, GELU, class token, position embedding."""
    from torchvision.models.vision_transformer import VisionTransformer

    _seed(seed)
    model = VisionTransformer(
        image_size=8,
        patch_size=4,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        mlp_dim=16,
        num_classes=NUM_CLASSES,
    )
    with torch.no_grad():  # torchvision zero-initialises the head: random, so that every weight has curvature
        model.heads.head.weight.normal_(0.0, 0.5)
    return _finish(model, _images(n, 8, seed), dtype)


def _tiny_swin_network(**blocks: Any) -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        patch_size=[2, 2],
        embed_dim=8,
        depths=[1, 1],
        num_heads=[1, 2],
        window_size=[2, 2],
        num_classes=NUM_CLASSES,
        **blocks,
    )


def tiny_swin(n: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32):
    """torchvision ``SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[1, 1], num_heads=[1, 2],
    window_size=[2, 2], num_classes=5)`` on 8x8 inputs: windowed attention, whose projections see the
    windows of all samples along dim 0 (``(N * windows, tokens, C)``), shifted windows, patch merging,
    relative position bias, LayerNorm, GELU."""
    _seed(seed)
    return _finish(_tiny_swin_network(), _images(n, 8, seed), dtype)


def tiny_swin_v2(n: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32):
    """:func:`tiny_swin`'s network with torchvision's V2 blocks (``SwinTransformerBlockV2``,
    ``PatchMergingV2``) on 10x10 inputs: cosine attention (``F.normalize`` of queries and keys, a clamped,
    exponentiated logit scale; the windows padded, so that the keys of the padding are zero) and the
    continuous position bias ``16 sigmoid(MLP(grid))``, a function of the MLP's weights alone."""
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2

    _seed(seed)
    model = _tiny_swin_network(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2)
    return _finish(model, _images(n, 10, seed), dtype)


def _randomize_batchnorm(model: nn.Module, seed: int) -> None:
    """Give eval-mode BatchNorm non-trivial running statistics and affine parameters (at init they
    are the identity, which would hide errors in how the estimators treat them)."""
    g = torch.Generator().manual_seed(seed + 7)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            with torch.no_grad():
                m.weight.copy_(0.8 + 0.4 * torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))


# ---------------------------------------------------------------- timm


def tiny_vit(n: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32):
    """timm ``VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2,
    mlp_ratio=2, num_classes=5)``: LayerNorm, GELU, fused attention, ``cls_token``, ``pos_embed``."""
    from timm.models.vision_transformer import VisionTransformer

    _seed(seed)
    model = VisionTransformer(
        img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0, num_classes=NUM_CLASSES
    )
    return _finish(model, _images(n, 8, seed), dtype)


def tiny_convnext(n: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32):
    """timm ``ConvNeXt(depths=(1, 1, 1, 1), dims=(4, 4, 8, 8), ls_init_value=0.5)`` on 32x32 inputs (timm
    always builds four stages, each halving the 8x8 stem output): depthwise 7x7
    conv, channels-last LayerNorm, GELU MLP, layer scale. ``ls_init_value`` is raised from timm's 1e-6
    so that the blocks' curvature is not 1e-12 of the rest (a trained ConvNeXt has O(1) scales)."""
    from timm.models.convnext import ConvNeXt

    _seed(seed)
    model = ConvNeXt(
        in_chans=3, num_classes=NUM_CLASSES, depths=(1, 1, 1, 1), dims=(4, 4, 8, 8), ls_init_value=0.5
    )
    return _finish(model, _images(n, 32, seed), dtype)


def tiny_convnext_v2(n: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32):
    """timm ConvNeXt V2's block (``use_grn=True``, no layer scale: ``convnextv2_*``) at
    :func:`tiny_convnext`'s size: the global response normalization (each channel's 2-norm over the
    positions, divided by its mean over the channels, ``addcmul``) inside the MLP. Its scale and shift
    are drawn from U(0.5, 1.5) (timm starts them at zero, where the normalization is the identity and has
    no curvature)."""
    from timm.models.convnext import ConvNeXt

    _seed(seed)
    model = ConvNeXt(
        in_chans=3,
        num_classes=NUM_CLASSES,
        depths=(1, 1, 1, 1),
        dims=(4, 4, 8, 8),
        ls_init_value=None,
        use_grn=True,
        conv_mlp=False,
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".grn." in name:
                p.uniform_(0.5, 1.5)
    return _finish(model, _images(n, 32, seed), dtype)


# ---------------------------------------------------------------- transformers

VOCAB, SEQ = 32, 6


def _token_batch(n: int, seed: int, pad_last: bool = True) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    if pad_last:  # every other sequence ends with two padding tokens
        mask[1::2, -2:] = 0
        ids[1::2, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def bert_head(head: str, **config: Any) -> nn.Module:
    """A tiny BERT (hidden 8, 1 layer, 2 heads, vocabulary 32, no dropout) with the ``transformers`` head
    ``Bert<head>``; ``config`` adds to or overrides the configuration."""
    import transformers

    settings = dict(
        vocab_size=VOCAB,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    settings.update(config)
    return getattr(transformers, f"Bert{head}")(transformers.BertConfig(**settings))


def _two_segment_batch(n: int, seed: int) -> dict[str, Tensor]:
    """:func:`_token_batch` with ``token_type_ids`` marking a second segment in the second half."""
    inputs = _token_batch(n, seed)
    inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    inputs["token_type_ids"][:, SEQ // 2 :] = 1
    return inputs


def tiny_bert(n: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``BertForSequenceClassification`` (hidden 8, 1 layer, 2 heads, vocabulary 32, 5 labels) on dict
    inputs ``input_ids``/``attention_mask``/``token_type_ids``; the target is the ``labels`` tensor."""
    _seed(seed)
    model = bert_head("ForSequenceClassification", num_labels=NUM_CLASSES)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=torch.Generator().manual_seed(seed + 2))
    return _finish(model, (_two_segment_batch(n, seed), labels), dtype)


def tiny_bert_problem(
    kind: str, n: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32, declared: bool = False
):
    """``BertForSequenceClassification`` trained for ``kind``: ``"regression"`` (one label, float targets
    ``(N,)``) or ``"multi_label_classification"`` (5 labels, float multi-hot targets ``(N, 5)``), the
    loss transformers takes for such labels (``config.problem_type`` set only where ``declared``)."""
    _seed(seed)
    labels = 1 if kind == "regression" else NUM_CLASSES
    model = bert_head("ForSequenceClassification", num_labels=labels, problem_type=kind if declared else None)
    g = torch.Generator().manual_seed(seed + 2)
    target = (
        torch.randn(n, generator=g) if kind == "regression" else (torch.rand(n, labels, generator=g) > 0.5)
    )
    return _finish(model, (_two_segment_batch(n, seed), target.to(dtype)), dtype)


def tiny_bert_question_answering(n: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``BertForQuestionAnswering`` (the encoder of :func:`tiny_bert`) on dict inputs; the target is the
    answer span ``(N, 2)`` (start, end; every position inside the sequence), as the measurement reads a
    batch's ``start_positions`` and ``end_positions`` (:func:`span_batch` builds that batch; loss:
    ``TokenLoss(base)`` on the ``(N, 2, T)`` span logits). Its output is a ``QuestionAnsweringModelOutput``
    (``start_logits``, ``end_logits``, each ``(N, T)``)."""
    _seed(seed)
    model = bert_head("ForQuestionAnswering")
    g = torch.Generator().manual_seed(seed + 2)
    start = torch.randint(0, SEQ - 2, (n,), generator=g)
    span = torch.stack([start, start + torch.randint(0, 2, (n,), generator=g)], dim=1)
    return _finish(model, (_two_segment_batch(n, seed), span), dtype)


def tiny_bert_multiple_choice(
    n: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32, token_types: bool = False
):
    """``BertForMultipleChoice`` (the encoder of :func:`tiny_bert`) on dict inputs ``(N, 3, T)``: 3 candidate
    texts per sample, one label ``(N,)``; logits ``(N, 3)``. The model runs its encoder on ``(N * 3, T)``
    rows (several rows per sample along dim 0); without ``token_types`` it expands its own buffer of zero
    token types to those rows."""
    _seed(seed)
    model = bert_head("ForMultipleChoice")
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(1, VOCAB, (n, 3, SEQ), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if token_types:
        inputs["token_type_ids"] = (torch.arange(SEQ) >= SEQ // 2).long().expand_as(ids).contiguous()
    return _finish(model, (inputs, torch.randint(0, 3, (n,), generator=g)), dtype)


def span_batch(inputs: dict[str, Tensor], span: Tensor) -> dict[str, Tensor]:
    """A question-answering batch as Hugging Face's data collators give it: the inputs and the ``(N, 2)``
    answer span as ``start_positions`` and ``end_positions``."""
    return {**inputs, "start_positions": span[:, 0], "end_positions": span[:, 1]}


def tiny_gpt2(n: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``GPT2LMHeadModel`` (8-dim, 1 layer, 2 heads, vocabulary 32, tied LM head) on dict inputs
    ``input_ids``/``attention_mask``; the target is ``labels = input_ids`` with ``-100`` on padding
    (score it with ``TokenLoss(base, shift=True)``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=8,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )
    model = GPT2LMHeadModel(config)
    inputs = _token_batch(n, seed)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return _finish(model, (inputs, labels), dtype)


#: ``tiny_moe`` kinds: Hugging Face causal LMs with an experts module (``use_experts_implementation``, or
#: Llama 4's or JetMoE's own layers)
MIXTURES_OF_EXPERTS = ("mixtral", "qwen3_moe", "qwen2_moe", "gpt_oss", "llama4", "jetmoe")


def tiny_moe(kind: str, n: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A mixture-of-experts causal LM (8-dim, 1 layer, 3 experts, top 2; untied head) on dict inputs, the
    target ``labels`` as :func:`tiny_gpt2`'s: ``"mixtral"`` (gate and up stacked, no biases; its router
    renormalizes the top-2 weights in place), ``"qwen3_moe"`` (``norm_topk_prob``: in place too),
    ``"qwen2_moe"`` (no renormalization, as Qwen1.5-MoE; a shared expert behind a sigmoid gate) or
    ``"gpt_oss"`` (transposed stacks with bias stacks, its own clamped gate), or ``"llama4"`` (Llama 4's own
    layer: every expert on every token by ``torch.bmm``, scaled by sigmoid router scores, a shared expert, top
    1; rotary embeddings in complex numbers, L2-normalized queries and keys), or ``"jetmoe"`` (JetMoE: a
    mixture of attention heads, whose experts project the queries and the outputs, beside the feed-forward
    mixture; experts on token rows sorted by expert; its output biases drawn, not zero). The decorated
    experts run HF's ``"eager"`` implementation (a loop over the experts): ``torch._grouped_mm``, the
    default, has no float64 kernel on the CPU, and the loop is the oracle's independent path."""
    import transformers

    _seed(seed)
    common = dict(
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        vocab_size=VOCAB,
        max_position_embeddings=16,
        tie_word_embeddings=False,
        intermediate_size=4,
        num_experts_per_tok=2,
    )
    if kind == "mixtral":
        config = transformers.MixtralConfig(num_local_experts=3, **common)
        model = transformers.MixtralForCausalLM(config)
    elif kind == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            num_experts=3, moe_intermediate_size=4, norm_topk_prob=True, **common
        )
        model = transformers.Qwen3MoeForCausalLM(config)
    elif kind == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(
            num_experts=3, moe_intermediate_size=4, shared_expert_intermediate_size=4, **common
        )
        model = transformers.Qwen2MoeForCausalLM(config)
    elif kind == "gpt_oss":
        config = transformers.GptOssConfig(num_local_experts=3, layer_types=["full_attention"], **common)
        model = transformers.GptOssForCausalLM(config)
    elif kind == "llama4":
        common.update(num_experts_per_tok=1, intermediate_size_mlp=4)
        config = transformers.Llama4TextConfig(
            num_local_experts=3, layer_types=["full_attention"], no_rope_layers=[1], **common
        )
        model = transformers.Llama4ForCausalLM(config)
    elif kind == "jetmoe":
        config = transformers.JetMoeConfig(
            num_local_experts=3,
            num_key_value_heads=2,
            kv_channels=4,
            **{
                k: v
                for k, v in common.items()
                if k not in ("num_attention_heads", "num_key_value_heads", "head_dim")
            },
        )
        model = transformers.JetMoeForCausalLM(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0.0, 0.1)
    else:
        raise ValueError(f"unknown kind {kind!r}; one of {MIXTURES_OF_EXPERTS}")
    model.config._experts_implementation = "eager"
    inputs = _token_batch(n, seed)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return _finish(model, (inputs, labels), dtype)


def seq2seq_model(kind: str, vocab: int = 32, head: str = "ForConditionalGeneration") -> nn.Module:
    """A tiny Hugging Face encoder-decoder model in eval mode, as trained with ``labels`` only (the model
    derives its decoder inputs from them): ``"t5"``, ``"bart"`` (both with
    ``prepare_decoder_input_ids_from_labels``) or ``"whisper"`` (without: its ``forward`` shifts the labels
    right, ``decoder_start_token_id=1``, ``pad_token_id=2``; inputs ``input_features (N, 8, 32)``). For
    ``"bart"``, another ``head`` (``"ForSequenceClassification"``, 3 labels; ``"ForQuestionAnswering"``):
    a classifier or span head that derives its decoder inputs from ``input_ids``."""
    import transformers

    if kind == "t5":
        cfg = transformers.T5Config(
            d_model=16,
            d_ff=32,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=2,
            d_kv=8,
            vocab_size=vocab,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
        return transformers.T5ForConditionalGeneration(cfg).eval()
    layers = dict(
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        vocab_size=vocab,
    )
    if kind == "whisper":
        cfg = transformers.WhisperConfig(
            **layers,
            num_mel_bins=8,
            max_source_positions=16,
            max_target_positions=16,
            decoder_start_token_id=1,
            pad_token_id=2,
            bos_token_id=1,
            eos_token_id=2,
        )
        return transformers.WhisperForConditionalGeneration(cfg).eval()
    config = transformers.BartConfig(**layers, max_position_embeddings=32, num_labels=3)
    return getattr(transformers, f"Bart{head}")(config).eval()


def segformer_model(classes: int = 3) -> nn.Module:
    """A tiny Hugging Face ``SegformerForSemanticSegmentation`` (two stages, 8 and 16 channels): logits at a
    quarter of the input's resolution, upsampled to the labels by its loss, void label 255."""
    import transformers

    cfg = transformers.SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        num_labels=classes,
    )
    return transformers.SegformerForSemanticSegmentation(cfg).eval()


# ---------------------------------------------------------------- transformers: audio classifiers

#: the tiny configuration of the audio classifiers of :func:`tiny_audio_classifier` (each family sets what it
#: has): a two-layer feature encoder of 4 channels (total stride 10), hidden size 8, one layer, two heads
AUDIO_TINY = dict(
    hidden_size=8,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=16,
    num_labels=3,
    conv_dim=(4, 4),
    conv_kernel=(10, 3),
    conv_stride=(5, 2),
    num_conv_pos_embeddings=3,
    num_conv_pos_embedding_groups=2,
    classifier_proj_size=4,
    conv_depthwise_kernel_size=3,
    feature_projection_input_dim=6,
    output_hidden_size=8,
    mask_time_prob=0.0,
    layerdrop=0.0,
    num_buckets=8,
    max_bucket_distance=16,
)


def tiny_audio_classifier(name: str, n: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32):
    """The ``transformers`` audio classifier ``name`` (``Wav2Vec2ForSequenceClassification``, ...) at
    :data:`AUDIO_TINY`, its random weights scaled up (weights x2, vectors shifted) so that every nonlinearity
    bends, on dict inputs as its feature extractor gives them: ``input_values``, ``n`` clips of 60 samples, or
    ``input_features``, ``n`` x 6 frames (Wav2Vec2-BERT); the target is the ``labels`` tensor (3 classes)."""
    import transformers

    cls = getattr(transformers, name)
    config = cls.config_class()
    for key, value in AUDIO_TINY.items():
        if hasattr(config, key):
            setattr(config, key, value)
    if hasattr(config, "num_feat_extract_layers"):
        config.num_feat_extract_layers = len(AUDIO_TINY["conv_dim"])
    _seed(seed)
    model = cls(config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0) if p.ndim >= 2 else p.add_(0.2 * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed + 1)
    if model.main_input_name == "input_features":
        shape: tuple[int, ...] = (n, 6, config.feature_projection_input_dim)
    else:
        shape = (n, 60)
    inputs = {model.main_input_name: torch.randn(*shape, generator=g).to(dtype)}
    return model, (inputs, torch.randint(0, 3, (n,), generator=g))


TINY: dict[str, Callable[..., tuple[nn.Module, Any]]] = {
    "resnet": tiny_resnet,
    "mobilenet_v3": tiny_mobilenet_v3,
    "efficientnet": tiny_efficientnet,
    "torchvision_vit": tiny_torchvision_vit,
    "swin": tiny_swin,
    "vit": tiny_vit,
    "convnext": tiny_convnext,
    "convnext_v2": tiny_convnext_v2,
    "bert": tiny_bert,
    "gpt2": tiny_gpt2,
}

SMALL: dict[str, Callable[..., tuple[nn.Module, Any]]] = {
    "resnet": small_resnet,
    "mobilenet_v3": small_mobilenet_v3,
}

#: Task heads beyond ``TINY``'s classifiers and LM: extractive question answering (its batches carry the
#: span: :func:`span_batch`) and multiple choice.
TASK_HEADS: dict[str, Callable[..., tuple[nn.Module, Any]]] = {
    "bert_qa": tiny_bert_question_answering,
    "bert_mc": tiny_bert_multiple_choice,
    "bert_regression": functools.partial(tiny_bert_problem, "regression"),
    "bert_multilabel": functools.partial(tiny_bert_problem, "multi_label_classification"),
}
QUESTION_ANSWERING = frozenset({"bert_qa"})


def single_output_squared_error(outputs: Tensor, target: Tensor) -> Tensor:
    """:func:`~lightning_flatness.functional.loss_forms.single_output_mse_loss` written out, for the
    oracles: ``torch.func``'s forward-over-reverse of ``F.mse_loss`` fails in torch 2.14 ("ZeroTensors are
    immutable")."""
    n = outputs.shape[0]
    return (outputs.reshape(n) - target.reshape(n).to(outputs.dtype)).square().mean()


#: Heads measured with their own loss whatever the base (``measure.classifier_problem``), as the oracles
#: and the benchmarks' training take it.
OWN_LOSS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "bert_regression": single_output_squared_error,
    "bert_multilabel": F.binary_cross_entropy_with_logits,
}

#: Mixture-of-experts causal LMs by name (:func:`tiny_moe`), as the benchmarks take them.
MIXTURE_OF_EXPERTS_MODELS: dict[str, Callable[..., tuple[nn.Module, Any]]] = {
    kind: functools.partial(tiny_moe, kind) for kind in ("qwen2_moe", "mixtral", "llama4")
}

#: Models whose target is a token sequence (loss: ``TokenLoss(base, shift=True)``).
CAUSAL_LM = frozenset({"gpt2", *MIXTURE_OF_EXPERTS_MODELS})


def zoo_loss(name: str, base: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss to use with zoo model ``name``: ``base`` itself, ``TokenLoss(base, shift=True)`` (causal
    LMs), ``TokenLoss(base)`` (the two span rows of a question-answering model) or, for a regression or
    multi-label head, the model's own loss (:data:`OWN_LOSS`)."""
    from lightning_flatness.functional.model_io import TokenLoss

    if name in QUESTION_ANSWERING:
        return TokenLoss(base)
    if name in OWN_LOSS:  # eq. 20 does not apply: the measurement takes the model's own loss
        return OWN_LOSS[name]
    return TokenLoss(base, shift=True) if name in CAUSAL_LM else base
