"""Mixture-of-experts layers.

- The measures: an experts module's ``(E, O, I)`` weight stack is ``E`` weight matrices, each measured on its
  own (eq. 13, 17), and its ``(E, O)`` bias stack ``E`` biases (trace only). Values against independent eq. 17
  solves of each expert's slice, and the invariance the layout exists for: rescaling one hidden unit of one
  expert (a function-preserving change) leaves the measured value unchanged, where the stack read as one
  ``ndim >= 3`` tensor (one variance per expert and per output unit) moves.
- The estimators: Hugging Face's experts run densely in the recorded forward
  (:mod:`lightning_flatness.functional.dense_experts`): the same function as the routed computation, on the
  per-layer path, with the Gauss-Newton diagonal equal to the float64 brute force and the sketched Hessian
  unbiased for it (the oracles run Hugging Face's own ``"eager"`` loop over the experts)."""

from __future__ import annotations

import contextlib
import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from expectation import assert_unbiased_traces
from torch import nn
from zoo_oracle import brute_force_ggn_diagonal

from lightning_flatness.functional import hessian_diagonal_groups, normalized_softmax_cross_entropy
from lightning_flatness.functional.dense_experts import dense_experts
from lightning_flatness.functional.estimators.method_choice import choose_method
from lightning_flatness.functional.model_io import call_model
from lightning_flatness.functional.parameters import (
    is_experts_module,
    matrix_stacks,
    select_parameters,
    split_matrix_stacks,
)
from lightning_flatness.functional.solvers import solve_normalized_sharpness
from lightning_flatness.measure import measure_sharpness, resolve_loss

F64 = torch.float64
EXPERTS, HIDDEN, WIDTH, CLASSES = 3, 4, 5, 3


class DenseExperts(nn.Module):
    """Experts as Hugging Face stores them (``gate_up_proj`` ``(E, 2I, H)``, ``down_proj`` ``(E, H, I)``, a
    bias stack ``(E, H)``; the decorator's ``num_experts``, ``has_gate``, ``is_transposed``), mixed by dense
    routing weights: ``sum_e r_e down_e(silu(gate_e x) * up_e x) + b_e``."""

    num_experts, has_gate, is_transposed = EXPERTS, True, False

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(EXPERTS, 2 * WIDTH, HIDDEN) / 2)
        self.down_proj = nn.Parameter(torch.randn(EXPERTS, HIDDEN, WIDTH) / 2)
        self.down_proj_bias = nn.Parameter(torch.randn(EXPERTS, HIDDEN) / 4)

    def forward(self, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(x.shape)
        for e in range(EXPERTS):
            gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e], self.down_proj_bias[e])
            out = out + routing[:, e : e + 1] * y
        return out


class TinyMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, HIDDEN)
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.router.num_experts = EXPERTS  # as a Hugging Face router: the attribute alone is not a stack
        self.experts = DenseExperts()
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        return self.head(h + self.experts(h, torch.softmax(self.router(h), dim=-1)))


def _model_and_batches(seed: int = 0):
    torch.manual_seed(seed)
    model = TinyMoE().to(F64).eval()
    x, y = torch.randn(16, 6, dtype=F64), torch.randint(0, CLASSES, (16,))
    return model, [(x[i : i + 4], y[i : i + 4]) for i in range(0, 16, 4)]


def _pooled_diagonal(model: nn.Module, batches: list) -> dict[str, torch.Tensor]:
    """The sample-weighted mean of the exact Gauss-Newton diagonal over the batches, per parameter."""
    sums: dict[str, torch.Tensor] = {}
    for x, y in batches:
        est = hessian_diagonal_groups(model, normalized_softmax_cross_entropy, x, y, method="gauss_newton")
        for k, v in est.mean().items():
            sums[k] = sums.get(k, 0) + v * x.shape[0]
    total = sum(x.shape[0] for x, _ in batches)
    return {k: v / total for k, v in sums.items()}


def test_the_stacks_of_an_experts_module_are_found_and_split_into_views():
    model, _ = _model_and_batches()
    params = select_parameters(model)
    stacks = matrix_stacks(model, params)
    assert stacks == {
        "experts.gate_up_proj": EXPERTS,
        "experts.down_proj": EXPERTS,
        "experts.down_proj_bias": 3,
    }
    split = split_matrix_stacks(dict(params), stacks)
    assert [k for k in split if k.startswith("experts.down_proj.")] == [
        f"experts.down_proj.{e}" for e in range(3)
    ]
    w = model.experts.gate_up_proj
    assert split["experts.gate_up_proj.1"].shape == (2 * WIDTH, HIDDEN)
    assert split["experts.gate_up_proj.1"].data_ptr() == w[1].data_ptr()  # a view, no copy
    assert "router.weight" in split and "experts.gate_up_proj" not in split
    with pytest.raises(ValueError, match="stack of 3 expert tensors"):
        split_matrix_stacks({"experts.down_proj": torch.zeros(2, 4, 5)}, stacks)


def test_weight_stacks_of_other_experts_modules_are_found_by_their_num_experts():
    """Llama 4's and JetMoE's expert layers (``num_experts``, ``(E, ., .)`` weights, not Hugging Face's
    decorator): their 3-D weights are stacks; a 2-D ``(E, H)`` weight beside ``num_experts`` is a router's."""

    class ParallelExperts(nn.Module):
        num_experts = 4

        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, 6, 5))
            self.router = nn.Parameter(torch.zeros(4, 5))
            self.other = nn.Parameter(torch.zeros(3, 6, 5))

    model = nn.ModuleDict({"moe": ParallelExperts()})
    assert matrix_stacks(model, ["moe.weight", "moe.router", "moe.other"]) == {"moe.weight": 4}


def test_each_expert_is_measured_as_its_own_weight_matrix():
    model, batches = _model_and_batches()
    result = measure_sharpness(model, batches, method="gauss_newton", num_replicates=4)
    h = _pooled_diagonal(model, batches)
    total = 0.0
    for name in ("experts.gate_up_proj", "experts.down_proj"):
        w = model.get_parameter(name).detach()
        for e in range(EXPERTS):
            key = f"{name}.{e}"
            expected = float(solve_normalized_sharpness(w[e], h[name][e]).value)
            assert float(result.values[f"normalized/{key}"]) == pytest.approx(expected, rel=1e-9)
            frob = float(w[e].square().sum() * h[name][e].clamp_min(0).sum())
            assert float(result.values[f"matrix_normalized/{key}"]) == pytest.approx(
                math.sqrt(frob), rel=1e-9
            )
            total += expected
    for e in range(EXPERTS):  # the bias rows: biases (footnote 5), in the trace only
        key = f"experts.down_proj_bias.{e}"
        assert f"normalized/{key}" not in result.values
        expected = float(h["experts.down_proj_bias"][e].sum())
        assert float(result.values[f"hessian_trace/{key}"]) == pytest.approx(expected, rel=1e-9)
    others = sum(
        float(v) for k, v in result.values.items() if k.startswith("normalized/") and "/experts." not in k
    )
    assert float(result.values["normalized"]) == pytest.approx(total + others, rel=1e-9)
    assert float(result.values["hessian_trace"]) == pytest.approx(
        sum(float(v.sum()) for v in h.values()), rel=1e-9
    )


def test_rescaling_one_hidden_unit_of_one_expert_leaves_the_measure_unchanged():
    """Scale expert 1's up-projection row ``i`` by ``a`` and its down-projection column ``i`` by ``1 / a``:
    the same function (``silu(gate) * up`` is linear in ``up``). Per expert the optimal variances absorb the
    factors; read as one ``(E, O, I)`` tensor, the stack shares its row variances between the experts."""
    model, batches = _model_and_batches()
    before = measure_sharpness(model, batches, method="gauss_newton", num_replicates=4)
    whole_before = _whole_stack_value(model, batches)
    x = batches[0][0]
    reference = model(x)
    with torch.no_grad():
        model.experts.gate_up_proj[1, WIDTH + 2] *= 8.0
        model.experts.down_proj[1, :, 2] /= 8.0
    assert torch.allclose(model(x), reference, rtol=1e-12, atol=1e-12)
    after = measure_sharpness(model, batches, method="gauss_newton", num_replicates=4)
    assert float(after.values["normalized"]) == pytest.approx(float(before.values["normalized"]), rel=1e-8)
    whole_after = _whole_stack_value(model, batches)
    assert abs(whole_after / whole_before - 1) > 0.01  # the layout the split replaces is not invariant


def _whole_stack_value(model: nn.Module, batches: list) -> float:
    """Eq. 17 of the two expert stacks read as ``ndim >= 3`` tensors (one variance per expert and per
    output unit, the input units a kernel), as the measures read them before."""
    h = _pooled_diagonal(model, batches)
    return sum(
        float(solve_normalized_sharpness(model.get_parameter(n).detach(), h[n]).value)
        for n in ("experts.gate_up_proj", "experts.down_proj")
    )


def test_a_hugging_face_mixture_of_experts_is_measured_expert_by_expert():
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=8,
        vocab_size=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        head_dim=8,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    assert matrix_stacks(model, select_parameters(model)) == {
        "model.layers.0.mlp.experts.gate_up_proj": 4,
        "model.layers.0.mlp.experts.down_proj": 4,
    }  # the router (``num_experts``, weight (E, H)) is a weight matrix
    ids = torch.randint(3, 64, (4, 8))
    batches = [{"input_ids": ids[i : i + 2], "labels": ids[i : i + 2]} for i in (0, 2)]
    result = measure_sharpness(model, batches, num_replicates=2)
    experts = [k for k in result.values if k.startswith("normalized/model.layers.0.mlp.experts.")]
    assert len(experts) == 8 and all(math.isfinite(float(result.values[k])) for k in experts)
    assert "normalized/model.layers.0.mlp.gate.weight" in result.values


# ------------------------------------------------------------------ the estimators: dense experts


def _moe(kind: str, n: int = 4):
    pytest.importorskip("transformers")
    from zoo_models import tiny_moe

    model, (inputs, labels) = tiny_moe(kind, n=n, dtype=F64)
    loss = resolve_loss(normalized_softmax_cross_entropy, model, call_model(model, inputs), labels)
    return model, inputs, labels, loss


def _per_sample_fallbacks(caught: list) -> list[str]:
    return [str(w.message) for w in caught if "per-layer contractions do not apply" in str(w.message)]


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "qwen2_moe", "gpt_oss"])
def test_dense_experts_compute_the_routed_function(kind):
    """Mixtral (gate and up stacked), Qwen3-MoE, GPT-OSS (transposed stacks, bias stacks, its own gate):
    random routing of 7 tokens to 2 of 3 experts; restored exactly afterwards."""
    model, _, _, _ = _moe(kind)
    experts = next(m for m in model.modules() if is_experts_module(m))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 8, generator=g, dtype=F64)
    index = torch.stack([torch.randperm(3, generator=g)[:2] for _ in range(7)])
    weights = torch.rand(7, 2, generator=g, dtype=F64)
    routed = experts(hidden, index, weights)
    with dense_experts(model):
        dense = experts(hidden, index, weights)
    assert "forward" not in experts.__dict__
    torch.testing.assert_close(dense, routed, rtol=1e-12, atol=1e-14)


def _experts_layer_weights(model: nn.Module) -> list[str]:
    """The feed-forward mixture's weights, and JetMoE's attention experts (router, query, output stacks)."""
    return [
        n for n in select_parameters(model) if any(k in n for k in (".mlp.", ".feed_forward.", ".experts."))
    ]


def test_jetmoe_mixtures_written_densely_compute_the_routed_function():
    """JetMoE's feed-forward mixture and its mixture of attention heads (``map`` projects the queries of each
    token's top-2 experts, ``reduce`` their outputs), every expert on every token in the recorded forward:
    the model's values (float64, random inputs), the routing weights computed as its router does; every
    method restored afterwards."""
    from lightning_flatness.functional.dense_experts import is_jetmoe_mixture

    model, _, _, _ = _moe("jetmoe")
    ffn, attention = [m for m in model.modules() if is_jetmoe_mixture(m)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g, dtype=F64)
    slots = torch.randn(2, 5, 2, 8, generator=g, dtype=F64)
    queries, logits, routing = attention.map(x)
    routed = (ffn(x), queries, logits, attention.reduce(slots, routing))
    with dense_experts(model):
        assert "forward" in vars(ffn) and {"map", "reduce"} <= set(vars(attention))  # written out
        queries, logits, routing = attention.map(x)
        dense = (ffn(x), queries, logits, attention.reduce(slots, routing))
    assert not {"forward", "map", "reduce"} & (set(vars(ffn)) | set(vars(attention)))
    for a, b in zip(dense, routed):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "gpt_oss", "llama4", "jetmoe"])
def test_the_gauss_newton_diagonal_of_a_mixture_of_experts_is_per_layer_and_equals_brute_force(kind):
    """Router and expert stacks (bias stacks too; Llama 4's stacks multiplied by ``torch.bmm``; JetMoE's
    attention experts, on rows sorted by expert in its own forward), the exact
    Gauss-Newton diagonal: no per-sample fallback, equal to the float64 brute force of the model's own forward
    (to the float32 routing weights these models compute)."""
    model, inputs, labels, loss = _moe(kind)
    names = _experts_layer_weights(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = hessian_diagonal_groups(model, loss, inputs, labels, method="gauss_newton", parameters=names)
    assert not _per_sample_fallbacks(caught)
    truth = brute_force_ggn_diagonal(model, loss, inputs, labels, names)
    for n in names:
        scale = float(truth[n].abs().max())
        assert scale > 0 and float((est.groups[n][0] - truth[n]).abs().max()) <= 1e-5 * scale, n


@pytest.mark.parametrize("kind", ["qwen2_moe", "qwen3_moe", "mixtral", "llama4", "jetmoe"])
def test_auto_measures_the_hessian_of_mixtures_of_experts_without_bias(kind):
    """Qwen2-MoE (Qwen1.5-MoE's layout: a shared expert behind a sigmoid gate), Qwen3-MoE with
    ``norm_topk_prob`` and Mixtral (their routers renormalize the top-k weights in place, evaluated out of
    place for the sketch: :mod:`lightning_flatness.functional.out_of_place_division`), Llama 4 (its layer
    written token by token, :func:`~lightning_flatness.functional.dense_experts.llama4_moe_forward`; rotary
    embeddings in complex numbers), JetMoE (both mixtures written out: every expert on every token): every
    operation of the router and the dense experts has a node rule, so
    ``auto`` takes the sketched Hessian, on the per-layer path; its traces are unbiased for the brute-force
    Hessian's over 8 seeds."""
    model, inputs, labels, loss = _moe(kind)
    assert choose_method(model, loss, inputs, labels).method == "hessian_sketch"
    names = _experts_layer_weights(model)
    if kind == "llama4":  # its attention too: queries and keys rotated as complex numbers
        names += [n for n in select_parameters(model) if ".self_attn." in n]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_unbiased_traces(model, loss, inputs, labels, names, min_random=3)
    assert not _per_sample_fallbacks(caught)


def test_in_place_division_evaluated_out_of_place_is_the_same_function():
    """``x /= y`` and ``x.div_(y)`` under :class:`OutOfPlaceDivision`: the same values (a view of ``x`` sees
    them too), gradient and Hessian-vector product as the in-place division; a division by a constant, or
    by a tensor that does not require grad, passes through as it is."""
    from lightning_flatness.functional.out_of_place_division import OutOfPlaceDivision

    def f(w, rewrite, method):
        x = torch.stack([w[0] * w[1], w[1] + 2.0, w[2].exp()])
        view = x[1:]
        with OutOfPlaceDivision() if rewrite else contextlib.nullcontext():
            if method == "operator":
                x /= x.sum()
            else:
                x.div_(w[:3].square().sum())
            x /= 2.0  # by a constant: passes through
        return (x * torch.tensor([1.0, -2.0, 3.0], dtype=F64)).sum() + view.square().sum()

    w0 = torch.tensor([0.3, -1.2, 0.7], dtype=F64)
    v = torch.tensor([1.0, 0.5, -2.0], dtype=F64)
    for method in ("operator", "div_"):
        ref, new = (functools.partial(f, rewrite=r, method=method) for r in (False, True))
        assert float(new(w0)) == pytest.approx(float(ref(w0)), rel=1e-15)
        one = torch.tensor(1.0, dtype=F64)
        vjp = torch.autograd.functional.vjp
        hvp = torch.autograd.functional.hvp
        torch.testing.assert_close(vjp(new, w0, one)[1], vjp(ref, w0, one)[1], rtol=1e-13, atol=0)
        torch.testing.assert_close(hvp(new, w0, v)[1], hvp(ref, w0, v)[1], rtol=1e-13, atol=0)


def test_a_mixture_of_experts_built_with_grouped_mm_is_measured_in_float64():
    """``torch._grouped_mm``, the experts' default implementation, has no float64 kernel on the CPU, so the
    model's own forward fails in float64; every forward of a measurement runs the experts densely, so it
    measures, with the values of the same model on Hugging Face's ``"eager"`` loop."""
    model, inputs, labels, _ = _moe("qwen2_moe", n=8)
    batches = [{**{k: v[i : i + 4] for k, v in inputs.items()}, "labels": labels[i : i + 4]} for i in (0, 4)]
    model.config._experts_implementation = "grouped_mm"
    with pytest.raises(RuntimeError, match="Double"):
        model(**batches[0])
    grouped = measure_sharpness(model, batches, num_replicates=2, generator=torch.Generator().manual_seed(0))
    model.config._experts_implementation = "eager"
    eager = measure_sharpness(model, batches, num_replicates=2, generator=torch.Generator().manual_seed(0))
    assert grouped.choice.method == "hessian_sketch"
    assert float(grouped["normalized"]) == pytest.approx(float(eager["normalized"]), rel=1e-12)
