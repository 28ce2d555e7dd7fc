"""Reach, swept: ``measure_sharpness`` at its defaults on every Hugging Face model class with a given head
(issue 8).

``bench_reach`` runs a curated list with hand-written tiny configurations. This sweep takes every class of
``transformers`` whose name ends in ``--head`` (``ForCausalLM``, ``ForMaskedLM``, ``ForTokenClassification``,
``ForSequenceClassification``, ``ForImageClassification``, ``ForQuestionAnswering``, ``ForMultipleChoice``),
or, for ``--head ForAudioClassification``, the audio classifiers of ``AutoModelForAudioClassification``
(random clips as their feature extractors give them, :func:`audio_inputs`; the audio attributes
:data:`SHRINK_AUDIO` and a three-layer feature encoder, :data:`AUDIO_FEATURE_ENCODER`),
builds it from its configuration class's defaults shrunk by attribute name (hidden sizes 16, one layer, two
heads, a vocabulary of 64, 3 labels, 32x32 images: :data:`SHRINK`, each attribute set only where the
configuration has it as an int; per-stage lists of hierarchical vision models, :data:`SHRINK_PER_STAGE`, with
64x64 images for their four stages; width and depth multipliers, :data:`SHRINK_MULTIPLIERS`;
sub-configurations too) and set up as the models' documentation does (two labels for question answering, a
padding token for a sequence classifier, one layer of each kind of a hybrid, a key head per query head for
multi-head latent attention, no generation cache: training), with random weights, and measures 4 samples in
batches of 2 (random tokens of length 8, ending in the end-of-sequence token for a sequence classifier, or
random images; the labels the head trains on: the tokens for a causal LM, a few masked positions for a masked
LM, a class per token or per sample, an answer span, or one of 3 candidate texts).

A class is **skipped** when the shrunk configuration does not build or the model's own forward fails on the
batch (a configuration the shrinking broke, not a measurement), and **timed out** after ``--timeout``
seconds. A failure inside the measurement is a row with its error. Rows: the method ``auto`` chose, the
quantity (Hessian or Gauss-Newton diagonal), whether the estimator fell back to per-sample backward
passes (its warning), and, where ``auto`` measures the Gauss-Newton diagonal of a network that is not linear
in each weight, what keeps the sketched Hessian diagonal off it (from the choice's reason).

Run from the repository root (needs the ``zoo`` extra), one head per run, e.g.
``python -m benchmarks.bench_hf_sweep --head ForCausalLM --json benchmarks/results/bench_hf_sweep_clm.json``
"""

from __future__ import annotations

import signal
import sys
import time
import traceback
import warnings
from typing import Any, Optional

import torch

from benchmarks.common import base_parser, setup, write_json_and_markdown

HEADS = (
    "ForCausalLM",
    "ForMaskedLM",
    "ForTokenClassification",
    "ForSequenceClassification",
    "ForImageClassification",
    "ForQuestionAnswering",
    "ForMultipleChoice",
    "ForAudioClassification",
)

#: the audio classifiers (``ForAudioClassification``): ``transformers``' own list for the audio-classification
#: task (``AutoModelForAudioClassification``), which names most of them ``...ForSequenceClassification``
AUDIO = "ForAudioClassification"

#: configuration attributes set where a configuration has them as ints (the shrunk tiny configuration)
SHRINK = dict(
    hidden_size=16,
    num_hidden_layers=1,
    num_layers=1,
    n_layer=1,
    n_layers=1,
    num_attention_heads=2,
    n_head=2,
    n_heads=2,
    num_key_value_heads=1,
    intermediate_size=32,
    ffn_dim=32,
    d_model=16,
    d_ff=32,
    n_embd=16,
    vocab_size=64,
    max_position_embeddings=64,
    n_positions=64,
    num_labels=3,
    image_size=32,
    patch_size=8,
    num_channels=3,
    head_dim=8,
    embed_dim=16,
    dim=16,
    hidden_dim=32,
    encoder_layers=1,
    decoder_layers=1,
    num_experts=4,
    num_local_experts=4,
    moe_intermediate_size=16,
    kv_lora_rank=8,
    q_lora_rank=8,
    qk_rope_head_dim=4,
    qk_nope_head_dim=4,
    v_head_dim=8,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    rotary_dim=4,
    pooler_hidden_size=16,
    window_size=2,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
)

#: configuration attributes of the audio classifiers (``ForAudioClassification`` only), set as :data:`SHRINK`:
#: the positional convolution of wav2vec 2.0's family (kernel 128 in 16 groups by default), its classifier's
#: projection, the Conformer's depthwise kernel, Wav2Vec2-BERT's adapter and features, Whisper's mel bins,
#: frames (2 per position) and encoder, AST's spectrogram (time frames by mel bins)
SHRINK_AUDIO = dict(
    num_conv_pos_embeddings=4,
    num_conv_pos_embedding_groups=2,
    classifier_proj_size=8,
    conv_depthwise_kernel_size=3,
    output_hidden_size=16,
    feature_projection_input_dim=16,
    num_mel_bins=16,
    max_source_positions=8,
    max_length=26,
    encoder_ffn_dim=32,
)

#: the feature encoder of wav2vec 2.0's family (seven 512-channel convolutions, total stride 320 by default):
#: three of 16 channels, total stride 20, set together where a configuration has all three as sequences
AUDIO_FEATURE_ENCODER = dict(conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2))

#: list- or tuple-valued configuration attributes of hierarchical models (per stage), shrunk entry by entry
#: where a configuration has them as sequences of ints: blocks per stage to 1, channels per stage divided
#: by 128 (at least 8; equal entries stay equal, as a stage's input and the previous stage's output must),
#: heads per stage to 2
SHRINK_PER_STAGE = dict(
    depths=lambda v: 1,
    depth=lambda v: 1,
    num_block_repeats=lambda v: 1,
    stage_num_blocks=lambda v: 1,
    n_attn_blocks=lambda v: 1,
    hidden_sizes=lambda v: max(8, 8 * (v // 128)),
    embed_dims=lambda v: max(8, 8 * (v // 128)),
    embed_dim=lambda v: max(8, 8 * (v // 128)),
    neck_hidden_sizes=lambda v: max(8, 8 * (v // 128)),
    base_attn_unit_dims=lambda v: max(8, 8 * (v // 128)),
    in_channels=lambda v: max(8, 8 * (v // 128)),
    out_channels=lambda v: max(8, 8 * (v // 128)),
    stage_in_channels=lambda v: max(8, 8 * (v // 128)),
    stage_mid_channels=lambda v: max(8, 8 * (v // 128)),
    stage_out_channels=lambda v: max(8, 8 * (v // 128)),
    num_heads=lambda v: 2,
    num_attention_heads=lambda v: 2,
    image_size=lambda v: 32,
)

#: width and depth multipliers (floats) of scaled convolutional families (EfficientNet, MobileNet, MobileViT)
SHRINK_MULTIPLIERS = dict(
    width_coefficient=0.25, depth_coefficient=0.5, depth_multiplier=0.25, width_multiplier=0.25
)


#: configuration attributes set where a configuration leaves them None and its model does not derive them
#: (Ministral's and HunYuan's head width, Nemotron's key-value heads, DeepSeek-V2's routing: experts per token
#: and groups; ESM's vocabulary); sizes as :data:`SHRINK`'s
SHRINK_UNSET = dict(
    head_dim=8, num_key_value_heads=1, num_experts_per_tok=2, n_group=1, topk_group=1, vocab_size=64
)

#: per configuration class: what its shrunk configuration must also set (DiffLlama's differential attention
#: splits the key-value heads in two; SqueezeBert has no projection from its embedding width; X-MOD routes
#: through a language adapter it must be told; Bit, DeepSeek-V2, ESM, MobileBERT, Reformer and T5 as
#: commented)
SHRINK_CLASS = {
    "BitConfig": dict(num_groups=4),  # GroupNorm's groups: 32 do not divide the shrunk stages' 8-64 channels
    "DeepseekV2Config": dict(n_routed_experts=4),
    "DiffLlamaConfig": dict(num_key_value_heads=2),
    "EsmConfig": dict(mask_token_id=4, pad_token_id=1),  # ESM-2's token dropout reads the mask token
    "MobileBertConfig": dict(embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16),
    # Reformer: axial position embeddings summing to the width and tiling 8 tokens; short chunks
    "ReformerConfig": dict(
        axial_pos_shape=(4, 2),
        axial_pos_embds_dim=(8, 8),
        attn_layers=("local", "lsh"),
        local_attn_chunk_length=4,
        lsh_attn_chunk_length=4,
        attention_head_size=8,
        feed_forward_size=32,
        num_buckets=2,
    ),
    "T5Config": dict(decoder_start_token_id=0),  # T5's classifier and span heads decode from it
    "SqueezeBertConfig": dict(embedding_size=SHRINK["hidden_size"]),
    "XmodConfig": dict(default_language="en_XX"),
}

#: a class whose shrunk model is larger than this is skipped (an attribute the shrinking does not know)
MAX_PARAMETERS = 2_000_000


class _TimedOut(Exception):
    pass


def _alarm(*_: Any) -> None:
    raise _TimedOut()


def _set(config: Any, key: str, value: Any) -> None:
    try:
        setattr(config, key, value)
    except Exception:  # a read-only property of the configuration
        pass


def _shrink(config: Any, head: str = "") -> None:
    """:data:`SHRINK`, :data:`SHRINK_PER_STAGE` and :data:`SHRINK_MULTIPLIERS` applied to ``config`` and its
    sub-configurations (a text or vision tower's), and what ``head`` needs as its documentation sets it up:
    two labels (start and end logits) for question answering, a padding token for a sequence classifier
    (a decoder-only one finds each sequence's last token by it)."""
    for key, value in {**SHRINK, **(SHRINK_AUDIO if head == AUDIO else {})}.items():
        current = getattr(config, key, None)
        if isinstance(current, int) and not isinstance(current, bool):
            _set(config, key, value)
    for key, value in SHRINK_UNSET.items():
        if key in vars(config) and getattr(config, key) is None:
            _set(config, key, value)
    for key, value in SHRINK_CLASS.get(type(config).__name__, {}).items():
        _set(config, key, value)
    if head == "ForQuestionAnswering" and isinstance(getattr(config, "num_labels", None), int):
        _set(config, "num_labels", 2)
    if head == "ForSequenceClassification" and getattr(config, "pad_token_id", 0) is None:
        _set(config, "pad_token_id", SHRINK["pad_token_id"])
    for key, rule in SHRINK_PER_STAGE.items():
        current = getattr(config, key, None)
        if isinstance(current, (list, tuple)) and current and all(type(v) is int for v in current):
            _set(config, key, type(current)(rule(v) for v in current))
    for key, value in SHRINK_MULTIPLIERS.items():
        if isinstance(getattr(config, key, None), float):
            _set(config, key, value)
    if isinstance(getattr(config, "depths", None), (list, tuple)):  # hierarchical: more tokens than a ViT's
        _set(config, "patch_size", 4)
        _set(config, "image_size", 64)  # a window of 2 in each of 4 stages
        if isinstance(getattr(config, "num_stages", None), int):  # num_hidden_layers' alias, shrunk above
            _set(config, "num_stages", len(config.depths))
    if isinstance(getattr(config, "kv_lora_rank", None), int):  # multi-head latent attention (DeepSeek-V3)
        if isinstance(getattr(config, "qk_rope_head_dim", None), int) and hasattr(config, "head_dim"):
            _set(config, "head_dim", config.qk_rope_head_dim)  # the rotary part of a head
        if hasattr(config, "num_key_value_heads"):  # a key per head, as eager attention assumes
            _set(config, "num_key_value_heads", config.num_attention_heads)
    if isinstance(getattr(config, "use_cache", None), bool):  # training, as the docs fine-tune: no generation
        _set(config, "use_cache", False)  # cache (a hybrid's layer of each kind may hold no attention cache)
    if isinstance(getattr(config, "num_experts_per_tok", None), int):
        config.num_experts_per_tok = min(config.num_experts_per_tok, 2)
    if isinstance(getattr(config, "layer_types", None), list):  # one layer of each kind (a hybrid's too)
        kinds = list(dict.fromkeys(config.layer_types))
        _set(config, "layer_types", kinds)  # a read-only property (Mamba, Jamba): derived from the depth
        if config.layer_types == kinds:
            for key in ("num_hidden_layers", "num_layers"):
                if isinstance(getattr(config, key, None), int):
                    _set(config, key, len(kinds))
    _shrink_ssd_heads(config)  # after the layer kinds (Zamba2's hybrid layers)
    if head == AUDIO and all(
        isinstance(getattr(config, k, None), (list, tuple)) for k in AUDIO_FEATURE_ENCODER
    ):
        for key, value in AUDIO_FEATURE_ENCODER.items():
            _set(config, key, type(getattr(config, key))(value))
        _set(config, "num_feat_extract_layers", len(AUDIO_FEATURE_ENCODER["conv_dim"]))
    for key in list(vars(config)):
        sub = getattr(config, key, None)
        if sub is not config and type(sub).__name__.endswith("Config") and hasattr(sub, "to_dict"):
            _shrink(sub, head)


#: Mamba-2's state-space heads (Mamba2, Bamba, GraniteMoeHybrid, Zamba2): (heads, head width, expansion,
#: groups, state size) attribute names; the heads must tile the expanded width ``expansion * hidden_size``
SSD_HEADS = (
    ("num_heads", "head_dim", "expand", "n_groups", "state_size"),
    ("mamba_n_heads", "mamba_d_head", "mamba_expand", "mamba_n_groups", "mamba_d_state"),
    ("n_mamba_heads", "mamba_headdim", "mamba_expand", "mamba_ngroups", "mamba_d_state"),
)


def _shrink_ssd_heads(config: Any) -> None:
    """Heads of width 8 tiling the shrunk expanded width (FalconH1's own state-space width where it sets
    one), one group, a state of 16 (the defaults' 64-1280 wide heads do not divide a 32-wide expansion);
    Zamba2's shared attention block, which reads the hidden state and the embeddings side by side, at twice
    the hidden size, and its hybrid layers where the shrunk layer kinds put them."""
    for heads, width, expand, groups, state in SSD_HEADS:
        if all(
            isinstance(getattr(config, k, None), int) for k in (heads, width, groups, state)
        ) and isinstance(getattr(config, expand, None), (int, float)):
            expanded = getattr(config, "mamba_d_ssm", None)  # FalconH1: the state-space width, set apart
            if not isinstance(expanded, int):
                expanded = int(getattr(config, expand) * config.hidden_size)
            _set(config, width, 8)
            _set(config, heads, expanded // 8)
            _set(config, groups, 1)
            _set(config, state, 16)
    if isinstance(getattr(config, "attention_hidden_size", None), int) and hasattr(config, "mamba_headdim"):
        _set(config, "attention_hidden_size", 2 * config.hidden_size)
        _set(config, "attention_head_dim", 2 * config.hidden_size // config.num_attention_heads)
        kinds = getattr(config, "layers_block_type", None)
        if isinstance(kinds, list):
            _set(config, "hybrid_layer_ids", [i for i, k in enumerate(kinds) if k == "hybrid"])


def build(cls: Any, head: str = "") -> torch.nn.Module:
    """``cls`` from its configuration class's defaults, shrunk (:data:`SHRINK`), random weights, eval mode;
    a ``ValueError`` where the shrunk model still has more than :data:`MAX_PARAMETERS` parameters."""
    config = cls.config_class()
    _shrink(config, head)
    torch.manual_seed(0)
    model = cls(config).eval()
    count = sum(p.numel() for p in model.parameters())
    if count > MAX_PARAMETERS:
        raise ValueError(f"not shrunk: {count:,} parameters")
    return model


def audio_inputs(model: torch.nn.Module, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Two random clips as the model's feature extractor gives them: a waveform of 400 samples
    (``input_values``, wav2vec 2.0's family), a spectrogram of ``max_length`` frames by ``num_mel_bins``
    (``input_values``, AST), or features: Whisper's ``num_mel_bins`` by twice ``max_source_positions`` frames,
    Wav2Vec2-BERT's 8 frames of ``feature_projection_input_dim``."""
    config, name = model.config, model.main_input_name
    if name == "input_features" and hasattr(config, "feature_projection_input_dim"):
        shape: tuple[int, ...] = (2, 8, config.feature_projection_input_dim)
    elif name == "input_features":
        shape = (2, config.num_mel_bins, 2 * config.max_source_positions)
    elif hasattr(config, "num_mel_bins"):
        shape = (2, config.max_length, config.num_mel_bins)
    else:
        shape = (2, 400)
    return {name: torch.randn(*shape, generator=g)}


def batches(
    head: str, g: torch.Generator, image_size: int = 32, model: Optional[torch.nn.Module] = None
) -> list[dict[str, torch.Tensor]]:
    out = []
    for _ in range(2):
        if head == AUDIO:
            assert model is not None
            batch = audio_inputs(model, g)
            batch["labels"] = torch.randint(0, 3, (2,), generator=g)
        elif head == "ForImageClassification":
            batch = {"pixel_values": torch.randn(2, 3, image_size, image_size, generator=g)}
            batch["labels"] = torch.randint(0, 3, (2,), generator=g)
        else:
            shape = (2, 3, 8) if head == "ForMultipleChoice" else (2, 8)  # 3 candidate texts per sample
            ids = torch.randint(3, 64, shape, generator=g)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            if head == "ForCausalLM":
                batch["labels"] = ids.clone()
            elif head == "ForMaskedLM":
                labels = torch.full_like(ids, -100)
                labels[:, 2] = ids[:, 2]
                batch["labels"] = labels
            elif head == "ForTokenClassification":
                batch["labels"] = torch.randint(0, 3, (2, 8), generator=g)
            elif head == "ForQuestionAnswering":  # the answer span
                start = torch.randint(0, 6, (2,), generator=g)
                batch["start_positions"], batch["end_positions"] = start, start + 2
            else:  # sequences end in the end-of-sequence token as tokenizers write them (BART reads it)
                ids[..., -1] = SHRINK["eos_token_id"]
                batch["labels"] = torch.randint(0, 3, (2,), generator=g)
        out.append(batch)
    return out


def _fallback_reason(message: str) -> str:
    """What sent an estimator to the per-sample path, from its warning."""
    return message.partition("do not apply (")[2].split("); computing")[0][:200]


def _gauss_newton_reason(reason: str) -> str:
    """Why ``auto`` measures the Gauss-Newton diagonal of a network that is not linear in each weight: what
    keeps the sketched Hessian diagonal off it, from the choice's reason."""
    return reason.partition("sketched Hessian diagonal does not apply (")[2].split("); Hutchinson")[0][:200]


def measure(name: str, head: str, timeout: int) -> dict[str, Any]:
    import transformers

    from lightning_flatness.measure import measure_sharpness

    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        try:
            model = build(getattr(transformers, name), head)
            size = getattr(model.config, "image_size", 32)
            size = size if isinstance(size, int) else size[0]
            data = batches(head, torch.Generator().manual_seed(0), size, model)
            with torch.no_grad():
                model(**{k: v for k, v in data[0].items() if k != "labels"})
        except _TimedOut:
            raise
        except Exception as err:
            return {"status": "skipped", "why": f"{type(err).__name__}: {err}"[:200]}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = measure_sharpness(model, data, num_replicates=2)
        fallbacks = [m for m in map(str, (w.message for w in caught)) if "contractions do not apply" in m]
        return {
            "status": "ok",
            "method": result.choice.method,
            "quantity": result.choice.quantity,
            "path": "per-sample" if fallbacks else "per-layer",
            "why": _fallback_reason(fallbacks[0]) if fallbacks else "",
            "why_gauss_newton": _gauss_newton_reason(result.choice.reason)
            if result.choice.quantity != "hessian"
            else "",
            "normalized": float(result.values["normalized"]),
            "seconds": time.perf_counter() - start,
        }
    except _TimedOut:
        return {"status": "timed out", "seconds": timeout}
    except Exception as err:  # a sweep: every failure is a row, not a stop
        return {
            "status": "failed",
            "error": f"{type(err).__name__}: {err}"[:400],
            "where": traceback.format_exc().strip().splitlines()[-3:],
        }
    finally:
        signal.alarm(0)


def markdown(results: dict[str, Any]) -> str:
    rows = results["rows"]
    counts = {
        s: sum(r["status"] == s for r in rows.values()) for s in ("ok", "failed", "timed out", "skipped")
    }
    measured = [r for r in rows.values() if r["status"] == "ok"]
    lines = [
        f"# Reach, swept: Hugging Face `*{results['head']}` classes at the defaults (issue 8)",
        "",
        f"Command: `{results['command']}`  ",
        f"transformers {results['transformers']}; {len(rows)} classes: {counts['ok']} measured, "
        f"{counts['failed']} failed in the measurement, {counts['timed out']} timed out, {counts['skipped']} "
        "skipped (the shrunk configuration or the model's own forward fails).",
        "",
        f"Of the measured: {sum(r['quantity'] == 'hessian' for r in measured)} the Hessian, "
        f"{sum(r['quantity'] != 'hessian' for r in measured)} the Gauss-Newton diagonal; "
        f"{sum(r['path'] == 'per-sample' for r in measured)} on the per-sample path.",
        "",
        "| class | status | `auto` picks | measures | path | seconds "
        "| error / why skipped / why per-sample / why the Gauss-Newton diagonal |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        gauss_newton = r.get("why_gauss_newton") and f"Gauss-Newton: {r['why_gauss_newton']}"
        note = (r.get("error") or r.get("why") or gauss_newton or "").replace("|", "/")[:160]
        seconds = f"{r['seconds']:.1f}" if "seconds" in r else ""
        lines.append(
            f"| {name} | {r['status']} | {r.get('method', '')} | {r.get('quantity', '')} "
            f"| {r.get('path', '')} | {seconds} | {note} |"
        )
    return "\n".join(lines) + "\n"


def audio_classifiers() -> list[str]:
    """The class names of ``transformers``' audio-classification task
    (``AutoModelForAudioClassification``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES

    return list(MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES.values())


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    import transformers

    p = base_parser(__doc__)
    p.add_argument("--head", choices=HEADS, default="ForCausalLM")
    p.add_argument("--timeout", type=int, default=60, help="seconds per class")
    p.add_argument("--only", nargs="*", default=None, help="classes whose name contains one of these")
    args = p.parse_args(argv)
    setup(args)
    names = sorted(
        n
        for n in (audio_classifiers() if args.head == AUDIO else dir(transformers))
        if (args.head == AUDIO or n.endswith(args.head))
        and not n.startswith(("TF", "Flax", "Auto"))
        and isinstance(getattr(transformers, n, None), type)
    )
    if args.only:
        names = [n for n in names if any(o in n for o in args.only)]
    if args.quick:
        names = names[:3]
    command = " ".join(
        ["python -m benchmarks.bench_hf_sweep"] + list(argv if argv is not None else sys.argv[1:])
    )
    rows: dict[str, Any] = {}
    for name in names:
        rows[name] = measure(name, args.head, args.timeout)
        r = rows[name]
        print(name, r["status"], r.get("method", ""), r.get("path", ""), r.get("error", "")[:200], flush=True)
    results = {"command": command, "head": args.head, "transformers": transformers.__version__, "rows": rows}
    write_json_and_markdown(args.json, results, markdown)
    return results


if __name__ == "__main__":
    main()
