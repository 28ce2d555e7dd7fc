"""Which parameters count (footnote 5): weights with ndim >= 2 that multiply their input (not position
embeddings or class tokens) for every measure, and the biases and normalization parameters beside them
for the trace (eq. 5); frozen skipped, shared once; presets "weights" and "all"."""

import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from oracles import brute_force_hessian_diagonal
from torch import nn

from lightning_flatness.functional import hessian_diagonal
from lightning_flatness.functional.parameters import select_parameters


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_default_selects_weights_and_the_vectors_a_layer_rule_reads():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.BatchNorm1d(2), nn.Flatten(), nn.Linear(4, 3))
    assert list(select_parameters(model)) == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "3.weight",
        "3.bias",
    ]


class LayerScale(nn.Module):
    """A per-channel scale used through an elementwise product: no layer rule reads it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.gamma = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.fc(x) * self.gamma


def test_default_leaves_out_vectors_no_layer_rule_reads():
    model = LayerScale()
    assert list(select_parameters(model)) == ["fc.weight", "fc.bias"]
    assert list(select_parameters(model, "all")) == ["gamma", "fc.weight", "fc.bias"]


def test_default_leaves_out_vectors_stored_with_unit_dims_but_keeps_thin_weights():
    """torchvision's ConvNeXt ``layer_scale`` is ``(C, 1, 1)``: a per-channel scale like timm's 1-D
    ``gamma``, left out; a Linear with one output, a 1x1 convolution with one input channel and an
    embedding of width 1 keep their weights."""
    from torchvision.models.convnext import CNBlock

    block = CNBlock(8, layer_scale=0.5, stochastic_depth_prob=0.0)
    chosen = select_parameters(block)
    assert "layer_scale" not in chosen and "layer_scale" in select_parameters(block, "all")
    assert {"block.0.weight", "block.3.weight", "block.5.weight"} <= set(chosen)
    thin = nn.ModuleDict({"fc": nn.Linear(5, 1), "conv": nn.Conv2d(1, 4, 1), "emb": nn.Embedding(7, 1)})
    assert {"fc.weight", "conv.weight", "emb.weight"} <= set(select_parameters(thin))


@pytest.mark.parametrize("compile_", ["script", "trace"])
def test_a_torchscript_network_selects_what_its_eager_network_selects(compile_):
    """A scripted module has no ``get_submodule``, and a TorchScript module (scripted or traced) is not an
    instance of the ``torch.nn`` class it was compiled from: each submodule is read by its
    ``original_name`` (a Linear's bias and a norm's affine counted, an embedding table kept)."""
    torch.manual_seed(0)
    cases = [
        (
            nn.Sequential(
                nn.Conv2d(1, 3, 3),
                nn.BatchNorm2d(3),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(12, 8),
                nn.LayerNorm(8),
            ),
            torch.randn(2, 1, 4, 4),
        ),
        (nn.Sequential(nn.Embedding(4, 8), nn.Linear(8, 3)), torch.tensor([[0, 3]])),
    ]
    for eager, x in cases:
        compiled = torch.jit.script(eager) if compile_ == "script" else torch.jit.trace(eager, x)
        assert list(select_parameters(compiled)) == list(select_parameters(eager))
    assert list(select_parameters(cases[0][0])) == [
        f"{i}.{p}" for i in (0, 1, 4, 5) for p in ("weight", "bias")
    ]


def test_frozen_weights_are_skipped():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    assert list(select_parameters(model)) == ["0.bias", "2.weight", "2.bias"]


class WithAnEmptyWeight(nn.Module):
    """MobileBERT's LM head where the embedding is as wide as the hidden state: the extension of the decoder's
    weight, ``dense.weight``, has 0 rows, and the head multiplies by
    ``cat([decoder.weight.T, dense.weight])``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.decoder = nn.Linear(4, 5, bias=False)
        self.dense = nn.Linear(5, 0, bias=False)  # weight (0, 5)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        return h.matmul(torch.cat([self.decoder.weight.t(), self.dense.weight], dim=0))


def test_parameters_without_entries_are_skipped_and_a_named_one_is_refused():
    """An empty weight has no curvature: the presets and predicates leave it out (before, ``compute()`` failed
    reshaping its zero entries), and a measurement runs; naming it is an error that says so."""
    from lightning_flatness.measure import measure_sharpness

    model = WithAnEmptyWeight()
    assert model.dense.weight.shape == (0, 5)
    assert list(select_parameters(model)) == ["embed.weight", "embed.bias", "decoder.weight"]
    assert "dense.weight" not in select_parameters(model, "all")
    assert "dense.weight" not in select_parameters(model, lambda n, p: True)
    names = (n for n in ["decoder.weight"])  # a generator: read once
    assert list(select_parameters(model, names)) == ["decoder.weight"]
    with pytest.raises(ValueError, match="has no entries"):
        select_parameters(model, ["dense.weight"])
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(2)]
    result = measure_sharpness(model, batches, num_replicates=2)
    assert torch.isfinite(result.values["normalized"]) and float(result.values["normalized"]) > 0


def test_shared_weight_is_counted_once():
    assert list(select_parameters(Tied())) == ["a.weight", "a.bias", "b.bias"]


def test_names_and_predicate_choose_parameters():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    assert list(select_parameters(model, ["2.weight"])) == ["2.weight"]
    assert list(select_parameters(model, lambda n, p: n.startswith("0.") and p.ndim == 2)) == ["0.weight"]


@pytest.mark.parametrize(
    "parameters, message",
    [(["nope"], "not a parameter"), ("0.weight", "wrap it in a list"), ("everything", "presets")],
)
def test_bad_choices_name_the_problem(parameters, message):
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises((ValueError, TypeError), match=message):
        select_parameters(model, parameters)


def test_model_without_weight_matrices_is_an_error_with_the_fix():
    with pytest.raises(ValueError, match="pass `parameters=`"):
        select_parameters(nn.Dropout())


def test_one_dimensional_parameters_enter_the_trace_only():
    from lightning_flatness.functional.measures import sharpness_measures

    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    chosen = select_parameters(model, ["0.weight", "0.bias"])
    assert list(chosen) == ["0.weight", "0.bias"]
    diag = {"0.weight": torch.full((3, 2), 2.0), "0.bias": torch.tensor([1.0, -4.0, 0.5])}
    out = sharpness_measures(chosen, diag)
    assert set(out) == {
        "normalized",
        "matrix_normalized",
        "hessian_trace",
        "hessian_trace_weights",
        "normalized/0.weight",
        "matrix_normalized/0.weight",
        "hessian_trace/0.weight",
        "hessian_trace/0.bias",
    }
    assert float(out["hessian_trace"]) == 12.0 - 2.5 and float(out["hessian_trace_weights"]) == 12.0
    w = chosen["0.weight"].detach()
    assert float(out["matrix_normalized"]) == pytest.approx(float((w.square().sum() * 12.0).sqrt()))


def test_presets_weights_and_all():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.BatchNorm1d(2), nn.Flatten(), nn.Linear(4, 3))
    model[1].weight.requires_grad_(False)
    assert list(select_parameters(model, "weights")) == ["0.weight", "3.weight"]
    assert list(select_parameters(model, "all")) == ["0.weight", "0.bias", "1.bias", "3.weight", "3.bias"]


class Offsets(nn.Module):
    """A Linear whose name contains a marker still counts; bare added tensors with markers do not."""

    def __init__(self):
        super().__init__()
        self.position_proj = nn.Linear(3, 3)
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 3))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 3))
        self.table = nn.Parameter(torch.zeros(3, 3))

    def forward(self, x):
        return self.position_proj(x + self.pos_embed) @ self.table


def test_default_leaves_out_additive_offsets_but_keeps_multiplying_weights():
    model = Offsets()
    assert list(select_parameters(model)) == ["table", "position_proj.weight", "position_proj.bias"]
    assert list(select_parameters(model, "weights")) == [
        "pos_embed",
        "cls_token",
        "table",
        "position_proj.weight",
    ]


def test_default_selection_on_timm_and_hugging_face_models():
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    from tests.zoo_models import tiny_bert, tiny_gpt2, tiny_vit

    vit = select_parameters(tiny_vit()[0])
    assert "pos_embed" not in vit and "cls_token" not in vit and "patch_embed.proj.weight" in vit
    assert "blocks.0.attn.qkv.weight" in vit and "head.weight" in vit
    bert = select_parameters(tiny_bert()[0])
    assert "bert.embeddings.word_embeddings.weight" in bert
    assert "bert.embeddings.token_type_embeddings.weight" in bert
    assert "bert.embeddings.position_embeddings.weight" not in bert
    gpt2_model = tiny_gpt2()[0]
    gpt2 = select_parameters(gpt2_model)
    assert gpt2_model.lm_head.weight is gpt2_model.transformer.wte.weight  # tied: counted once
    assert "transformer.wte.weight" in gpt2 and "lm_head.weight" not in gpt2
    assert "transformer.wpe.weight" not in gpt2 and "transformer.h.0.attn.c_attn.weight" in gpt2


def test_register_tokens_are_left_out_like_class_tokens():
    """DINOv2 with registers (Hugging Face) concatenates ``register_tokens`` ``(1, R, D)`` to every image's
    tokens, as its class token: an additive offset, left out of the default selection; the model then takes
    the per-layer path (the concatenated copies of a selected table sent it to per-sample backward passes)."""
    pytest.importorskip("transformers")
    import warnings

    import transformers

    from lightning_flatness.measure import measure_sharpness

    config = transformers.Dinov2WithRegistersConfig(
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=8,
        patch_size=4,
        num_register_tokens=2,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = transformers.Dinov2WithRegistersForImageClassification(config).eval()
    selected = select_parameters(model)
    for offset in ("register_tokens", "cls_token", "position_embeddings", "mask_token"):
        assert f"dinov2_with_registers.embeddings.{offset}" not in selected, offset
    assert "dinov2_with_registers.embeddings.patch_embeddings.projection.weight" in selected
    g = torch.Generator().manual_seed(1)
    batches = [
        {
            "pixel_values": torch.randn(2, 3, 8, 8, generator=g),
            "labels": torch.randint(0, 3, (2,), generator=g),
        }
        for _ in range(2)
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = measure_sharpness(model, batches, num_replicates=2)
    assert result.choice.method == "hessian_sketch"
    assert not [w for w in caught if "per-layer contractions do not apply" in str(w.message)]


def test_prophetnet_ngram_embeddings_are_left_out_like_position_embeddings():
    """ProphetNet adds one row of ``ngram_embeddings`` per predicting stream to every sample's positions (a
    bias indexed by stream, the same for every sample): an additive offset, left out of the default
    selection; the model then takes the per-layer path (the table, indexed and added, sent it to per-sample
    backward passes)."""
    pytest.importorskip("transformers")
    import warnings

    import transformers

    from lightning_flatness.measure import measure_sharpness

    config = transformers.ProphetNetConfig(
        vocab_size=32,
        hidden_size=8,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        num_encoder_layers=1,
        num_decoder_layers=1,
        num_encoder_attention_heads=2,
        num_decoder_attention_heads=2,
        max_position_embeddings=16,
        ngram=2,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.ProphetNetForCausalLM(config).eval()
    selected = select_parameters(model)
    assert "prophetnet.decoder.ngram_embeddings.weight" not in selected
    assert "prophetnet.decoder.position_embeddings.weight" not in selected
    assert "lm_head.weight" in selected or "prophetnet.word_embeddings.weight" in selected
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        ids = torch.randint(3, 32, (2, 6), generator=g)
        batches.append({"input_ids": ids, "labels": ids.clone()})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = measure_sharpness(model, batches, num_replicates=2)
    assert float(result["normalized"]) > 0
    assert not [w for w in caught if "per-layer contractions do not apply" in str(w.message)]


class ScaledHead(nn.Linear):
    """Dory's LM head: a ``Linear`` with a per-output ``logit_scale`` multiplying its output."""

    def __init__(self):
        super().__init__(4, 3)
        self.logit_scale = nn.Parameter(torch.full((3,), 0.5))

    def forward(self, x):
        return super().forward(x) * self.logit_scale


def test_a_vector_a_linear_subclass_adds_is_not_taken_for_its_bias():
    """Only a Linear's ``bias`` is read by its layer rule; another 1-D parameter of a subclass is used by an
    elementwise product, so it is left out like a layer scale, and the estimators keep the per-layer path."""
    import warnings

    from lightning_flatness.functional import hessian_diagonal_groups

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), ScaledHead()).double()
    assert list(select_parameters(model)) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert "2.logit_scale" in select_parameters(model, "all")
    x, y = torch.randn(5, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hessian_diagonal_groups(model, torch.nn.functional.cross_entropy, x, y, method="gauss_newton")
    assert not [w for w in caught if "per-layer contractions do not apply" in str(w.message)]


def test_pruned_weights_and_biases_stay_selected_and_are_measured_exactly():
    """``torch.nn.utils.prune`` (and Lightning's ``ModelPruning``, which prunes biases too) renames a pruned
    ``weight`` / ``bias`` to ``weight_orig`` / ``bias_orig`` beside a mask buffer: the default selection keeps
    them in their roles (the bias fell out of it), and the exact diagonal in them is the brute-force
    Hessian's of the masked network times the mask."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    prune.l1_unstructured(net[0], "weight", 0.3)
    prune.l1_unstructured(net[0], "bias", 0.3)
    assert list(select_parameters(net)) == ["0.weight_orig", "0.bias_orig", "2.weight", "2.bias"]
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the per-layer path, no fall-back
        ours = hessian_diagonal(net, F.cross_entropy, x, y, method="exact")
    masked = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    with torch.no_grad():
        masked[0].weight.copy_(net[0].weight_orig * net[0].weight_mask)
        masked[0].bias.copy_(net[0].bias_orig * net[0].bias_mask)
        masked[2].load_state_dict(net[2].state_dict())
    truth = brute_force_hessian_diagonal(masked, F.cross_entropy, x, y, ["0.weight", "0.bias"])
    torch.testing.assert_close(
        ours["0.weight_orig"], truth["0.weight"] * net[0].weight_mask, rtol=1e-10, atol=1e-15
    )
    torch.testing.assert_close(
        ours["0.bias_orig"], truth["0.bias"] * net[0].bias_mask, rtol=1e-10, atol=1e-15
    )
