"""The zoo residual benchmark's pieces on one tiny model: the brute-force residual share it reports
is consistent, and batch / per-sample residual probes are unbiased for diag(H) - diag(GGN)."""

import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(1)
for _module in ("torchvision", "timm", "transformers"):  # the `zoo` extra
    pytest.importorskip(_module)

from benchmarks.bench_zoo_residual import residual_probes  # noqa: E402
from tests.zoo_models import tiny_vit  # noqa: E402
from tests.zoo_oracle import brute_force_ggn_diagonal, brute_force_hessian_diagonal  # noqa: E402


@pytest.mark.parametrize("per_sample", [False, True])
def test_residual_probes_are_unbiased_for_the_brute_force_residual_trace(per_sample):
    model, (x, y) = tiny_vit(n=4, dtype=torch.float64)
    names = ["blocks.0.attn.qkv.weight", "patch_embed.proj.weight"]
    residual = {
        n: h - g
        for (n, h), g in zip(
            brute_force_hessian_diagonal(model, F.cross_entropy, x, y, names).items(),
            brute_force_ggn_diagonal(model, F.cross_entropy, x, y, names).values(),
        )
    }
    gen = torch.Generator().manual_seed(0)
    runs = [residual_probes(model, F.cross_entropy, x, y, names, 16, per_sample, gen) for _ in range(6)]
    for n in names:
        traces = torch.stack([r[n].sum() for r in runs])
        se = float(traces.std()) / 6**0.5
        assert abs(float(traces.mean() - residual[n].sum())) <= 4.5 * se + 1e-9, n


def test_lm_vocabulary_quick_runs_each_row_in_its_capped_subprocess(tmp_path):
    from benchmarks import bench_lm_vocabulary

    out = bench_lm_vocabulary.main(["--quick", "--json", str(tmp_path / "lm.json")])
    rows = out["rows"]
    assert [(r["tied"], r["kind"]) for r in rows] == [(True, "training step"), (True, "measurement")]
    assert all(r["outcome"] == "ran" and r["peak_mb_above_start"] >= 0 for r in rows)
    assert rows[1]["method"] == "gauss_newton_mc" and rows[1]["normalized"] > 0
    assert out["class_draws"]["multinomial_ms"] > 0 and out["class_draws"]["inverse_cdf_ms"] > 0


def test_bench_moe_quick_measures_a_mixture_of_experts_per_layer():
    from benchmarks import bench_moe

    (row,) = bench_moe.main(["--quick", "--samples", "8", "--models", "qwen2_moe"])["rows"]
    assert row["method"] == "hessian_sketch" and not row["per_sample_path"]
    assert row["normalized"] > 0 and row["tensors"] > 0


def test_bench_hf_sweep_quick_measures_each_class_or_says_why_not(tmp_path):
    from benchmarks import bench_hf_sweep

    out = tmp_path / "sweep.json"
    only = ["--only", "DistilBertForToken", "AlbertForToken"]
    rows = bench_hf_sweep.main(["--head", "ForTokenClassification", *only, "--json", str(out)])["rows"]
    assert rows and all(r["status"] == "ok" and r["path"] == "per-layer" for r in rows.values()), rows
    assert "DistilBertForTokenClassification" in out.with_suffix(".md").read_text()


def test_bench_hf_sweep_says_why_it_measures_the_gauss_newton_diagonal(tmp_path):
    """A masked LM ties its head to the token table: ``auto`` keeps the Gauss-Newton diagonal, and the row
    says so (what keeps the sketched Hessian off it); a Hessian row has no such note."""
    from benchmarks import bench_hf_sweep

    out = tmp_path / "sweep.json"
    rows = bench_hf_sweep.main(["--head", "ForMaskedLM", "--only", "DistilBertForMasked", "--json", str(out)])
    (row,) = rows["rows"].values()
    assert row["status"] == "ok" and row["quantity"] == "gauss_newton", row
    assert "word_embeddings.weight' is used 2 times (a tied weight" in row["why_gauss_newton"], row
    assert "| Gauss-Newton: weight" in out.with_suffix(".md").read_text()
    assert bench_hf_sweep._gauss_newton_reason("the network is linear in each weight") == ""


def test_bench_hf_sweep_shrinks_mamba2_heads_to_tile_the_expanded_width():
    """Mamba-2's state-space heads (64-1280 wide at the defaults) tile the shrunk expanded width, so Mamba2,
    Bamba and Zamba2 (with its shared attention block at twice the hidden size) build and run; measured on
    the Hessian, per layer. FalconH1's tile its own state-space width."""
    import transformers

    from benchmarks import bench_hf_sweep

    for name in ("Mamba2ForCausalLM", "BambaForCausalLM", "Zamba2ForSequenceClassification"):
        cls = getattr(transformers, name)
        config = cls.config_class()
        bench_hf_sweep._shrink(config, name[name.index("For") :])
        heads, width, expand = next(
            (h, w, e)
            for h, w, e, _, _ in bench_hf_sweep.SSD_HEADS
            if hasattr(config, h) and hasattr(config, w)
        )
        assert getattr(config, heads) * getattr(config, width) == getattr(config, expand) * config.hidden_size
    config = transformers.FalconH1Config()  # its state-space width is its own, not the expansion's
    bench_hf_sweep._shrink(config, "ForCausalLM")
    assert config.mamba_n_heads * config.mamba_d_head == config.mamba_d_ssm
    row = bench_hf_sweep.measure("Mamba2ForCausalLM", "ForCausalLM", timeout=60)
    assert (row["status"], row["quantity"], row["path"]) == ("ok", "hessian", "per-layer"), row


def test_bench_hf_sweep_sets_sizes_left_unset_and_per_class_needs():
    """Sizes a configuration leaves None (Ministral's head width, Nemotron's key-value heads) and what a
    class needs besides (DiffLlama's even key-value heads, SqueezeBert's embedding width, X-MOD's language)
    are set, so these classes build and run their own forward (they were skipped)."""
    import transformers

    from benchmarks import bench_hf_sweep

    names = ("MinistralForCausalLM", "NemotronForCausalLM", "DiffLlamaForCausalLM", "SqueezeBertForMaskedLM")
    for name in (*names, "XmodForMaskedLM"):
        model = bench_hf_sweep.build(getattr(transformers, name), name[name.index("For") :])
        (batch,) = bench_hf_sweep.batches("ForMaskedLM", torch.Generator().manual_seed(0))[:1]
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert out.logits.shape[:2] == batch["input_ids"].shape, name


def test_bench_hf_sweep_builds_the_audio_classifiers_with_their_own_inputs():
    """``--head ForAudioClassification`` takes transformers' audio-classification classes (named
    ``...ForSequenceClassification`` mostly), shrinks their feature encoders (wav2vec 2.0's seven
    512-channel convolutions: skipped as not shrunk in the sequence-classification sweep) and feeds each its
    own input: raw clips, AST's spectrogram, Whisper's or Wav2Vec2-BERT's features. Each builds small and runs
    its forward; the text sweeps' configurations are left as they were."""
    import transformers

    from benchmarks import bench_hf_sweep

    names = bench_hf_sweep.audio_classifiers()
    assert {"Wav2Vec2ForSequenceClassification", "ASTForAudioClassification"} <= set(names)
    inputs = {}
    for name in names:
        model = bench_hf_sweep.build(getattr(transformers, name), bench_hf_sweep.AUDIO)
        (batch,) = bench_hf_sweep.batches(
            bench_hf_sweep.AUDIO, torch.Generator().manual_seed(0), model=model
        )[:1]
        with torch.no_grad():
            out = model(**{k: v for k, v in batch.items() if k != "labels"})
        assert out.logits.shape == (2, 3), name
        inputs[name] = {k: tuple(v.shape) for k, v in batch.items() if k != "labels"}
    assert inputs["Wav2Vec2ForSequenceClassification"] == {"input_values": (2, 400)}
    assert inputs["ASTForAudioClassification"] == {"input_values": (2, 26, 16)}
    assert inputs["WhisperForAudioClassification"] == {"input_features": (2, 16, 16)}
    assert inputs["Wav2Vec2BertForSequenceClassification"] == {"input_features": (2, 8, 16)}
    text = transformers.Wav2Vec2Config()
    bench_hf_sweep._shrink(text, "ForSequenceClassification")
    assert len(text.conv_dim) == 7 and text.num_conv_pos_embeddings == 128  # the text sweeps' shrink


def test_bench_hf_sweep_builds_the_classes_its_per_class_sizes_name():
    """The encoder's and decoder's head counts (Blenderbot's 32, PLBart's 12, Whisper's 6 do not divide the
    shrunk width), DeepSeek-V2's routing and ESM's vocabulary left unset, and what Bit, ESM, MobileBERT,
    Reformer and T5 need besides (:data:`SHRINK_CLASS`): each class builds small and runs its own forward
    (they were skipped)."""
    import transformers

    from benchmarks import bench_hf_sweep

    names = (
        "BlenderbotForCausalLM",
        "PLBartForSequenceClassification",
        "DeepseekV2ForCausalLM",
        "MobileBertForMaskedLM",
        "ReformerForSequenceClassification",
        "T5ForSequenceClassification",
        "BitForImageClassification",
        "EsmForMaskedLM",
    )
    for name in names:
        head = name[name.index("For") :]
        model = bench_hf_sweep.build(getattr(transformers, name), head)
        (batch,) = bench_hf_sweep.batches(head, torch.Generator().manual_seed(0))[:1]
        with torch.no_grad():
            out = model(**{k: v for k, v in batch.items() if k != "labels"})
        assert out.logits.shape[0] == 2 and bool(torch.isfinite(out.logits).all()), name
