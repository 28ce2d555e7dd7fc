"""Reach: ``measure_sharpness`` at its defaults (``method="auto"``) on models as torchvision, timm and
Hugging Face ``transformers`` build them, with random weights and synthetic batches, no user code.

For each model: whether the measurement runs, which method ``auto`` picks and what it measures (the
Hessian or its Gauss-Newton part), whether the estimator takes the per-layer path or falls back to
per-sample backward passes (it warns then), and the time of one measurement of ``--samples`` samples
in batches of 2 (small inputs: this is a reach table, not a cost benchmark; costs are in
``bench_hessian_sketch_cost.py`` and ``bench_callback_resnet18.py``). Images are 32x32 unless a model
needs more; texts are 8 tokens from a 64-word vocabulary, causal LMs scored per token. Segmentation
models get per-pixel classes with a void border (255) and their training loss,
``nn.CrossEntropyLoss(ignore_index=255)``; encoder-decoder models get Hugging Face's training batch
(``input_ids`` and ``labels`` only); token classifiers per-token labels with padding (``-100``);
question-answering models the answer span (``start_positions``, ``end_positions``); multiple-choice
models 3 candidate texts per sample; regression and multi-label classifiers float labels (the model's
own loss is measured).

Run: ``python -m benchmarks.bench_reach --json benchmarks/results/bench_reach.json`` (writes
``bench_reach.md`` beside the JSON; needs the ``zoo`` extra). ``--quick``: three small models.
"""

from __future__ import annotations

import time
import traceback
import warnings
from typing import Any, Callable

import torch

from benchmarks.common import (
    base_parser,
    command_line,
    environment,
    estimator_path,
    setup,
    write_json_and_markdown,
)
from lightning_flatness.measure import measure_sharpness

Builder = Callable[[], tuple[torch.nn.Module, tuple[str, int]]]


def _torchvision(name: str, size: int = 32, task: str = "image", **kw: Any) -> Builder:
    def build():
        import torchvision

        return torchvision.models.get_model(name, num_classes=10, **kw), (task, size)

    return build


def _timm(name: str, size: int = 32, **kw: Any) -> Builder:
    def build():
        import timm

        return timm.create_model(name, num_classes=10, **kw), ("image", size)

    return build


def _zoo(builder: str, task: str, *args: Any) -> Builder:
    """A tiny model of ``tests/zoo_models.py`` (the reach tests' own builders)."""

    def build():
        from tests import zoo_models

        return getattr(zoo_models, builder)(*args), (task, 32)

    return build


def _timm_sized(name: str, size: int = 64) -> Builder:
    """A timm model at ``size`` pixels: ``img_size=size`` where the model takes it (position tables,
    windows), else as built."""

    def build():
        import timm

        try:
            model = timm.create_model(name, num_classes=10, img_size=size)
        except TypeError:
            model = timm.create_model(name, num_classes=10)
        return model, ("image", size)

    return build


#: More timm families (round 12), at 64 pixels.
TIMM_SWEEP = (
    "mobilenetv4_conv_small hiera_tiny_224 eva02_tiny_patch14_224 focalnet_tiny_srf hgnetv2_b0 davit_tiny "
    "twins_svt_small convmixer_768_32 res2net50_26w_4s resnest14d sequencer2d_s volo_d1_224 nest_tiny "
    "gcvit_xxtiny inception_next_tiny mambaout_femto rdnet_tiny starnet_s050 ghostnetv2_100 repghostnet_050 "
    "tiny_vit_5m_224 efficientformerv2_s0 vit_relpos_small_patch16_224 cspresnet50 dpn68 hrnet_w18_small "
    "lcnet_050 mobileone_s0 regnetz_b16 selecsls42b skresnet18 vovnet39a xcit_nano_12_p16_224 convit_tiny "
    "pit_ti_224 visformer_tiny coat_lite_tiny"
).split()


def _hf(model_class: str, config_class: str, task: str, **config: Any) -> Builder:
    def build():
        import transformers

        cfg = getattr(transformers, config_class)(**config)
        return getattr(transformers, model_class)(cfg), (task, 32)

    return build


_TEXT = dict(num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=64)
_DECODER = dict(hidden_size=16, num_key_value_heads=1, **_TEXT)

MODELS: dict[str, Builder] = {
    "torchvision resnet18": _torchvision("resnet18"),
    "torchvision mobilenet_v2 (0.25)": _torchvision("mobilenet_v2", width_mult=0.25),
    "torchvision mobilenet_v3_small (0.25)": _torchvision("mobilenet_v3_small", width_mult=0.25),
    "torchvision efficientnet_b0": _torchvision("efficientnet_b0"),
    "torchvision efficientnet_v2_s": _torchvision("efficientnet_v2_s"),
    "torchvision regnet_y_400mf": _torchvision("regnet_y_400mf"),
    "torchvision shufflenet_v2_x0_5": _torchvision("shufflenet_v2_x0_5"),
    "torchvision squeezenet1_1": _torchvision("squeezenet1_1"),
    "torchvision densenet121": _torchvision("densenet121"),
    "torchvision mnasnet0_5": _torchvision("mnasnet0_5"),
    "torchvision convnext_tiny": _torchvision("convnext_tiny"),
    "torchvision swin_t": _torchvision("swin_t"),
    "torchvision vit_b_16 (224)": _torchvision("vit_b_16", size=224),
    "timm resnet18": _timm("resnet18"),
    "timm resnet50d": _timm("resnet50d"),
    "timm efficientnet_b0": _timm("efficientnet_b0"),
    "timm mobilenetv3_small_050": _timm("mobilenetv3_small_050"),
    "timm vit_tiny (patch 4)": _timm("vit_tiny_patch16_224", img_size=32, patch_size=4),
    "timm deit_tiny (patch 4)": _timm("deit_tiny_patch16_224", img_size=32, patch_size=4),
    "timm cait_xxs24 (patch 4)": _timm("cait_xxs24_224", img_size=32, patch_size=4),
    "timm beit_base (2 blocks)": _timm("beit_base_patch16_224", img_size=32, patch_size=8, depth=2),
    "timm convnext_atto": _timm("convnext_atto"),
    "timm swin_tiny (window 4)": _timm("swin_tiny_patch4_window7_224", img_size=32, window_size=4),
    "timm regnety_002": _timm("regnety_002"),
    "timm ghostnet_100": _timm("ghostnet_100"),
    "timm rexnet_100": _timm("rexnet_100"),
    "timm poolformer_s12": _timm("poolformer_s12"),
    "timm edgenext_xx_small (64)": _timm("edgenext_xx_small", size=64),
    "timm coatnet_nano (64)": _timm("coatnet_nano_rw_224", size=64, img_size=64),
    "timm maxvit_nano (64)": _timm("maxvit_nano_rw_256", size=64, img_size=64),
    "timm mixer_s16 (32)": _timm("mixer_s16_224", img_size=32),
    "timm levit_128s (224)": _timm("levit_128s", size=224),
    "timm efficientvit_b0 (64)": _timm("efficientvit_b0", size=64),
    "timm nf_resnet26 (weight standardization)": _timm("nf_resnet26"),
    "timm resnetv2_50x1_bit (weight standardization)": _timm("resnetv2_50x1_bit"),
    "torchvision swin_v2_t": _torchvision("swin_v2_t"),
    "torchvision maxvit_t (224)": _torchvision("maxvit_t", size=224),
    "torchvision googlenet (64)": _torchvision("googlenet", size=64, aux_logits=False, init_weights=True),
    "torchvision inception_v3 (75)": _torchvision(
        "inception_v3", size=75, aux_logits=False, init_weights=True
    ),
    "torchvision resnext50_32x4d": _torchvision("resnext50_32x4d"),
    "torchvision mobilenet_v3_large": _torchvision("mobilenet_v3_large"),
    "timm mobilevit_xxs (64)": _timm("mobilevit_xxs", size=64),
    "timm pvt_v2_b0 (64)": _timm("pvt_v2_b0", size=64),
    "timm crossvit_tiny (240)": _timm("crossvit_tiny_240", size=240),
    "timm xception41 (64)": _timm("xception41", size=64),
    "timm dla34": _timm("dla34"),
    "timm repvgg_a0": _timm("repvgg_a0"),
    "timm fastvit_t8 (64)": _timm("fastvit_t8", size=64),
    "timm tnt_s (224)": _timm("tnt_s_patch16_224", size=224),
    "transformers BERT": _hf("BertForSequenceClassification", "BertConfig", "text", hidden_size=16, **_TEXT),
    "transformers DistilBERT": _hf(
        "DistilBertForSequenceClassification",
        "DistilBertConfig",
        "text",
        dim=16,
        n_layers=1,
        n_heads=2,
        hidden_dim=32,
        vocab_size=64,
    ),
    "transformers RoBERTa": _hf(
        "RobertaForSequenceClassification", "RobertaConfig", "text", hidden_size=16, **_TEXT
    ),
    "transformers ELECTRA": _hf(
        "ElectraForSequenceClassification", "ElectraConfig", "text", hidden_size=16, embedding_size=8, **_TEXT
    ),
    "transformers DeBERTa-v2": _hf(
        "DebertaV2ForSequenceClassification", "DebertaV2Config", "text", hidden_size=16, **_TEXT
    ),
    "transformers ALBERT (shared layers)": _hf(
        "AlbertForSequenceClassification",
        "AlbertConfig",
        "text",
        hidden_size=16,
        embedding_size=8,
        **{**_TEXT, "num_hidden_layers": 2},
    ),
    "transformers GPT-2 (tied head)": _hf(
        "GPT2LMHeadModel", "GPT2Config", "lm", n_embd=16, n_layer=1, n_head=2, vocab_size=64
    ),
    "transformers OPT (tied head)": _hf(
        "OPTForCausalLM",
        "OPTConfig",
        "lm",
        hidden_size=16,
        num_hidden_layers=1,
        ffn_dim=32,
        num_attention_heads=2,
        vocab_size=64,
        word_embed_proj_dim=16,
    ),
    "transformers Llama": _hf("LlamaForCausalLM", "LlamaConfig", "lm", **_DECODER),
    "transformers Llama (tied head)": _hf(
        "LlamaForCausalLM", "LlamaConfig", "lm", tie_word_embeddings=True, **_DECODER
    ),
    "transformers Qwen2": _hf("Qwen2ForCausalLM", "Qwen2Config", "lm", **_DECODER),
    "transformers Mistral": _hf("MistralForCausalLM", "MistralConfig", "lm", **_DECODER),
    "transformers Falcon": _hf(
        "FalconForCausalLM",
        "FalconConfig",
        "lm",
        hidden_size=16,
        num_attention_heads=2,
        num_hidden_layers=1,
        vocab_size=64,
    ),
    "transformers Gemma (tied head)": _hf("GemmaForCausalLM", "GemmaConfig", "lm", head_dim=8, **_DECODER),
    "transformers ModernBERT": _hf(
        "ModernBertForSequenceClassification",
        "ModernBertConfig",
        "text",
        hidden_size=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
        **_TEXT,
    ),
    "transformers ViT (image)": _hf(
        "ViTForImageClassification",
        "ViTConfig",
        "image",
        hidden_size=16,
        num_attention_heads=2,
        num_hidden_layers=1,
        intermediate_size=32,
        image_size=32,
        patch_size=8,
        num_labels=10,
    ),
    "transformers DINOv2 with registers (image)": _hf(
        "Dinov2WithRegistersForImageClassification",
        "Dinov2WithRegistersConfig",
        "image",
        hidden_size=16,
        num_attention_heads=2,
        num_hidden_layers=1,
        mlp_ratio=2,
        image_size=32,
        patch_size=8,
        num_labels=10,
        num_register_tokens=2,
    ),
    "transformers Llama 4 (mixture of experts, its own layer)": _hf(
        "Llama4ForCausalLM",
        "Llama4TextConfig",
        "lm",
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        vocab_size=64,
        num_local_experts=4,
        num_experts_per_tok=1,
        intermediate_size=16,
        intermediate_size_mlp=16,
        layer_types=["full_attention"],
        no_rope_layers=[1],
    ),
    "transformers BLOOM (tied head)": _hf(
        "BloomForCausalLM", "BloomConfig", "lm", hidden_size=16, n_layer=1, n_head=2, vocab_size=64
    ),
    "transformers GPT-NeoX": _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", "lm", hidden_size=16, **_TEXT),
    "transformers GPT-J": _hf(
        "GPTJForCausalLM", "GPTJConfig", "lm", n_embd=16, n_layer=1, n_head=2, rotary_dim=4, vocab_size=64
    ),
    "transformers XLM-RoBERTa": _hf(
        "XLMRobertaForSequenceClassification", "XLMRobertaConfig", "text", hidden_size=16, **_TEXT
    ),
    "transformers Qwen3": _hf("Qwen3ForCausalLM", "Qwen3Config", "lm", head_dim=8, **_DECODER),
    "transformers Mamba": _hf(
        "MambaForCausalLM",
        "MambaConfig",
        "lm",
        hidden_size=16,
        num_hidden_layers=1,
        vocab_size=64,
        state_size=4,
    ),
    "transformers Swin (image)": _hf(
        "SwinForImageClassification",
        "SwinConfig",
        "image",
        image_size=32,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1],
        num_heads=[2, 2],
        window_size=4,
        num_labels=10,
    ),
    "torchvision lraspp_mobilenet_v3_large (segmentation)": _torchvision(
        "lraspp_mobilenet_v3_large", task="segmentation", weights_backbone=None
    ),
    "torchvision deeplabv3_mobilenet_v3_large (segmentation, aux head)": _torchvision(
        "deeplabv3_mobilenet_v3_large", task="segmentation", weights_backbone=None, aux_loss=True
    ),
    "torchvision fcn_resnet50 (segmentation)": _torchvision(
        "fcn_resnet50", task="segmentation", weights_backbone=None
    ),
    "transformers T5 (encoder-decoder, labels only)": _zoo("seq2seq_model", "seq2seq", "t5", 64),
    "transformers BART (encoder-decoder, labels only)": _zoo("seq2seq_model", "seq2seq", "bart", 64),
    "transformers Whisper (encoder-decoder, labels only)": _zoo(
        "seq2seq_model", "seq2seq_audio", "whisper", 64
    ),
    "transformers Segformer (semantic segmentation, labels only)": _zoo(
        "segformer_model", "segmentation_hf", 10
    ),
    "transformers LUKE (500,000-entity table, text only)": _hf(
        "LukeForSequenceClassification", "LukeConfig", "text", hidden_size=16, **_TEXT
    ),
    "transformers BERT regression (1 label)": _hf(
        "BertForSequenceClassification", "BertConfig", "regression", hidden_size=16, num_labels=1, **_TEXT
    ),
    "transformers BERT multi-label": _hf(
        "BertForSequenceClassification", "BertConfig", "multilabel", hidden_size=16, num_labels=5, **_TEXT
    ),
    "transformers ViT (image) multi-label": _hf(
        "ViTForImageClassification",
        "ViTConfig",
        "image_multilabel",
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=8,
        num_labels=5,
    ),
    "transformers BERT token classification": _hf(
        "BertForTokenClassification", "BertConfig", "tokens", hidden_size=16, num_labels=5, **_TEXT
    ),
    **{
        f"transformers {label} {task}": _hf(f"{prefix}For{head}", f"{prefix}Config", kind, **config)
        for task, head, kind in [
            ("question answering", "QuestionAnswering", "span"),
            ("multiple choice", "MultipleChoice", "choices"),
        ]
        for label, prefix, config in [
            ("BERT", "Bert", dict(hidden_size=16, **_TEXT)),
            ("RoBERTa", "Roberta", dict(hidden_size=16, **_TEXT)),
            ("ALBERT", "Albert", dict(hidden_size=16, embedding_size=8, **_TEXT)),
            ("ELECTRA", "Electra", dict(hidden_size=16, embedding_size=8, **_TEXT)),
            ("DeBERTa-v2", "DebertaV2", dict(hidden_size=16, **_TEXT)),
            ("DistilBERT", "DistilBert", dict(dim=16, n_layers=1, n_heads=2, hidden_dim=32, vocab_size=64)),
        ]
    },
    "transformers Phi": _hf(
        "PhiForCausalLM", "PhiConfig", "lm", hidden_size=16, **{k: v for k, v in _TEXT.items()}
    ),
    **{  # mixtures of experts: 4 experts, top 2 (the experts run by torch._grouped_mm, as built)
        f"transformers {label} (mixture of experts)": _hf(
            f"{prefix}ForCausalLM", f"{prefix}Config", "lm", **config
        )
        for label, prefix, config in [
            ("Mixtral", "Mixtral", dict(num_local_experts=4, intermediate_size=16)),
            (
                "Qwen2-MoE",
                "Qwen2Moe",
                dict(num_experts=4, moe_intermediate_size=8, shared_expert_intermediate_size=8),
            ),
            ("Qwen3-MoE", "Qwen3Moe", dict(num_experts=4, moe_intermediate_size=8, norm_topk_prob=True)),
            ("OLMoE", "Olmoe", dict(num_experts=4, intermediate_size=16)),
            ("Granite-MoE", "GraniteMoe", dict(num_local_experts=4, intermediate_size=16)),
            (
                "GPT-OSS",
                "GptOss",
                dict(num_local_experts=4, intermediate_size=16, layer_types=["full_attention"]),
            ),
        ]
        for config in [
            dict(
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                vocab_size=64,
                num_experts_per_tok=2,
                tie_word_embeddings=False,
                **config,
            )
        ]
    },
}
MODELS.update({f"timm {name} (64)": _timm_sized(name) for name in TIMM_SWEEP})
MODELS["timm efficientformer_l1 (224)"] = _timm("efficientformer_l1", size=224)  # fixed attention-bias table
MODELS["timm convnextv2_atto"] = _timm("convnextv2_atto")  # global response normalization
MODELS["timm swinv2_tiny (window 4, 64)"] = _timm(
    "swinv2_tiny_window8_256", size=64, img_size=64, window_size=4
)  # the position-bias MLP's sigmoid
MODELS["transformers MobileNetV2 (image; logits near 1e-27 at initialisation)"] = _hf(
    "MobileNetV2ForImageClassification",
    "MobileNetV2Config",
    "image",
    depth_multiplier=0.35,
    image_size=32,
    num_labels=10,
)
MODELS["transformers ConvNeXt V2 (image)"] = _hf(
    "ConvNextV2ForImageClassification",
    "ConvNextV2Config",
    "image",
    hidden_sizes=[8, 16, 24, 32],
    depths=[1, 1, 1, 1],
    image_size=32,
    num_labels=10,
)
# a token table looked up by the encoder and the decoder, no LM head (round 19)
MODELS["transformers BART classifier (token table shared by encoder and decoder)"] = _zoo(
    "seq2seq_model", "text_eos", "bart", 64, "ForSequenceClassification"
)
MODELS["transformers MT5 classifier (token table shared by encoder and decoder)"] = _hf(
    "MT5ForSequenceClassification",
    "MT5Config",
    "text_eos",
    d_model=16,
    d_ff=32,
    num_layers=1,
    num_decoder_layers=1,
    num_heads=2,
    d_kv=8,
    vocab_size=64,
    eos_token_id=2,
    decoder_start_token_id=0,
    pad_token_id=0,
)
MODELS["transformers Qwen3-Next (gated delta rule)"] = _hf(  # its UT transform's triangular solve
    "Qwen3NextForCausalLM",
    "Qwen3NextConfig",
    "lm",
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    layer_types=["linear_attention", "full_attention"],
    mlp_only_layers=[0, 1],
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    linear_conv_kernel_dim=2,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    vocab_size=64,
)
MODELS["transformers FNet (Fourier token mixing)"] = _hf(
    "FNetForSequenceClassification", "FNetConfig", "text", hidden_size=16, **_TEXT
)
MODELS["transformers Mamba-2 (state-space duality)"] = _hf(  # chunked segment sums, reference PyTorch scan
    "Mamba2ForCausalLM",
    "Mamba2Config",
    "lm",
    hidden_size=16,
    num_hidden_layers=1,
    num_heads=4,  # heads of width 8 tiling the expanded width 2 * 16
    head_dim=8,
    n_groups=1,
    state_size=16,
    vocab_size=64,
)
MODELS["transformers Bamba (Mamba-2 and attention)"] = _hf(
    "BambaForCausalLM",
    "BambaConfig",
    "lm",
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    attn_layer_indices=[1],
    num_attention_heads=2,
    num_key_value_heads=1,
    mamba_n_heads=4,
    mamba_d_head=8,
    mamba_d_state=16,
    vocab_size=64,
)
MODELS["transformers JetMoE (mixtures of experts and of attention heads)"] = _hf(
    "JetMoeForCausalLM",
    "JetMoeConfig",
    "lm",
    hidden_size=16,
    num_hidden_layers=1,
    num_key_value_heads=2,
    kv_channels=8,
    intermediate_size=32,
    num_local_experts=4,
    num_experts_per_tok=2,
    vocab_size=64,
)
MODELS["torchvision r3d_18 (video, 3-D convolutions)"] = _torchvision("r3d_18", task="video")
MODELS["torchvision r2plus1d_18 (video, factorized 3-D convolutions)"] = _torchvision(
    "r2plus1d_18", task="video"
)
MODELS["torchvision swin3d_t (video, 64)"] = _torchvision("swin3d_t", size=64, task="video")
_AUDIO = dict(  # wav2vec 2.0's family: a three-layer feature encoder (total stride 20), one layer of width 16
    hidden_size=16,
    conv_dim=(16, 16, 16),
    conv_kernel=(10, 3, 3),
    conv_stride=(5, 2, 2),
    num_conv_pos_embeddings=4,
    num_conv_pos_embedding_groups=2,
    classifier_proj_size=8,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
)
MODELS["transformers wav2vec 2.0 (audio classifier)"] = _hf(
    "Wav2Vec2ForSequenceClassification", "Wav2Vec2Config", "audio", **_AUDIO
)
MODELS["transformers HuBERT (audio classifier)"] = _hf(
    "HubertForSequenceClassification", "HubertConfig", "audio", **_AUDIO
)
MODELS["transformers WavLM (audio; its own attention call, gated position bias)"] = _hf(
    "WavLMForSequenceClassification", "WavLMConfig", "audio", **_AUDIO
)
MODELS["transformers wav2vec 2.0 Conformer (audio; relative attention, GLU)"] = _hf(
    "Wav2Vec2ConformerForSequenceClassification", "Wav2Vec2ConformerConfig", "audio", **_AUDIO,
    conv_depthwise_kernel_size=3,
)  # fmt: skip
MODELS["transformers Wav2Vec2-BERT (audio features; GLU)"] = _hf(
    "Wav2Vec2BertForSequenceClassification",
    "Wav2Vec2BertConfig",
    "audio_features",
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    feature_projection_input_dim=16,
    output_hidden_size=16,
    conv_depthwise_kernel_size=3,
    classifier_proj_size=8,
)
MODELS["transformers AST (audio spectrogram)"] = _hf(
    "ASTForAudioClassification",
    "ASTConfig",
    "spectrogram",
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    patch_size=8,
    max_length=26,
    num_mel_bins=16,
)
QUICK = ("torchvision mobilenet_v3_small (0.25)", "timm vit_tiny (patch 4)", "transformers BERT")


def _batches(spec: tuple[str, int], samples: int) -> list[Any]:
    kind, size = spec
    g = torch.Generator().manual_seed(0)
    out: list[Any] = []
    for _ in range(samples // 2):
        if kind == "image":
            out.append((torch.randn(2, 3, size, size, generator=g), torch.randint(0, 10, (2,), generator=g)))
        elif kind == "video":  # (N, channels, 4 frames, size, size)
            clip = torch.randn(2, 3, 4, size, size, generator=g)
            out.append((clip, torch.randint(0, 10, (2,), generator=g)))
        elif kind in ("audio", "audio_features", "spectrogram"):  # as the feature extractors give them
            shape = {"audio": (2, 400), "audio_features": (2, 8, 16), "spectrogram": (2, 26, 16)}[kind]
            key = "input_features" if kind == "audio_features" else "input_values"
            out.append(
                {key: torch.randn(*shape, generator=g), "labels": torch.randint(0, 2, (2,), generator=g)}
            )
        elif kind == "segmentation":  # per-pixel classes, a void border (255) as in VOC, the training loss
            target = torch.randint(0, 10, (2, size, size), generator=g)
            target[:, :2] = 255
            out.append((torch.randn(2, 3, size, size, generator=g), target))
        elif kind == "segmentation_hf":  # Hugging Face's batch: full-resolution labels, a void border
            labels = torch.randint(0, 10, (2, size, size), generator=g)
            labels[:, :2] = 255
            out.append({"pixel_values": torch.randn(2, 3, size, size, generator=g), "labels": labels})
        elif kind.startswith("seq2seq"):  # Hugging Face's training batch: decoder inputs from the labels
            labels = torch.randint(3, 64, (2, 6), generator=g)
            labels[1, -2:] = -100
            if kind == "seq2seq_audio":  # log-mel features (N, mel bins, frames)
                out.append({"input_features": torch.randn(2, 8, 32, generator=g), "labels": labels})
            else:
                out.append({"input_ids": torch.randint(3, 64, (2, 8), generator=g), "labels": labels})
        elif kind == "span":  # extractive question answering: the answer's start and end positions
            ids = torch.randint(0, 64, (2, 8), generator=g)
            start = torch.randint(0, 6, (2,), generator=g)
            out.append(
                {
                    "input_ids": ids,
                    "attention_mask": torch.ones_like(ids),
                    "start_positions": start,
                    "end_positions": start + 2,
                }
            )
        elif kind in ("regression", "multilabel"):  # float labels: one value, or multi-hot over 5 labels
            ids = torch.randint(0, 64, (2, 8), generator=g)
            labels = (
                torch.randn(2, generator=g) if kind == "regression" else torch.rand(2, 5, generator=g).round()
            )
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        elif kind == "image_multilabel":
            labels = torch.rand(2, 5, generator=g).round()
            out.append({"pixel_values": torch.randn(2, 3, size, size, generator=g), "labels": labels})
        elif kind == "choices":  # multiple choice: 3 candidate texts per sample, one label
            ids = torch.randint(0, 64, (2, 3, 8), generator=g)
            labels = torch.randint(0, 3, (2,), generator=g)
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        elif kind == "tokens":  # one class per token, the padding of the shorter sequence ignored
            ids = torch.randint(0, 64, (2, 8), generator=g)
            labels = torch.randint(0, 5, (2, 8), generator=g)
            labels[1, -3:] = -100
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        elif kind == "text_eos":  # a sequence classifier that reads the end token (BART, T5): id 2
            ids = torch.randint(3, 64, (2, 8), generator=g)
            ids[:, -1] = 2
            labels = torch.randint(0, 2, (2,), generator=g)
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        else:
            ids = torch.randint(0, 64, (2, 8), generator=g)
            labels = ids.clone() if kind == "lm" else torch.randint(0, 2, (2,), generator=g)
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def measure(name: str, samples: int) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        model, spec = MODELS[name]()
        model = model.eval()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = (
                {"loss_fn": torch.nn.CrossEntropyLoss(ignore_index=255)} if spec[0] == "segmentation" else {}
            )
            result = measure_sharpness(model, _batches(spec, samples), num_replicates=2, **loss)
        return {
            "status": "ok",
            "method": result.choice.method,
            "quantity": result.choice.quantity,
            **estimator_path(caught),
            "reason": result.choice.reason,
            "normalized": float(result.values["normalized"]),
            "weights": sum(p.numel() for p in model.parameters()),
            "seconds": time.perf_counter() - start,
        }
    except Exception as err:  # a reach table: every failure is a row, not a stop
        return {
            "status": "failed",
            "error": f"{type(err).__name__}: {err}"[:500],
            "where": traceback.format_exc().strip().splitlines()[-3:],
            "seconds": time.perf_counter() - start,
        }


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        "# Reach: `measure_sharpness` at its defaults on library models (issue 8)",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {env['cpu']} ({env['nproc']} cores), torch {env['torch']}, {env['threads']} thread(s).",
        "",
        "| model | weights | runs | `auto` picks | measures | path | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results["models"].items():
        if r["status"] != "ok":
            lines.append(f"| {name} | | **failed**: {r['error'][:160]} | | | | {r['seconds']:.1f} |")
            continue
        path = r["path"] if r["path"] == "per-layer" else f"per-sample ({r['fallback'][:140]}...)"
        row = [
            name,
            f"{r['weights']:,}",
            "yes",
            f"`{r['method']}`",
            r["quantity"],
            path,
            f"{r['seconds']:.1f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict[str, Any]:
    p = base_parser(__doc__)
    p.add_argument("--samples", type=int, default=4, help="samples per measurement, in batches of 2")
    p.add_argument("--models", nargs="*", default=None, help="names (default: all, or three with --quick)")
    p.add_argument(
        "--timm-sweep",
        action="store_true",
        help="only the timm families of TIMM_SWEEP, LeViT and EfficientFormer",
    )
    args = p.parse_args(argv)
    setup(args)
    names = args.models or (list(QUICK) if args.quick else list(MODELS))
    if args.timm_sweep:
        names = [
            n
            for n in MODELS
            if n.startswith("timm ")
            and (n.split()[1] in TIMM_SWEEP or "levit" in n or "efficientformer" in n)
        ]
    command = command_line("benchmarks.bench_reach", argv)
    results: dict[str, Any] = {"command": command, "environment": environment(), "models": {}}
    for name in names:
        results["models"][name] = r = measure(name, args.samples)
        summary = f"{r['method']} ({r['quantity']}), {r['path']}" if r["status"] == "ok" else r["error"][:200]
        print(f"{name}: {summary}, {r['seconds']:.1f} s", flush=True)
    write_json_and_markdown(args.json, results, markdown)
    return results


if __name__ == "__main__":
    main()
