"""Batched products with a stack of weight matrices (``torch.bmm(x, W)``, ``W`` ``(G, I, O)``) on the
per-layer path (:mod:`lightning_flatness.functional.weight_stack_products`), and Llama 4's mixture-of-experts
layer written token by token (:func:`lightning_flatness.functional.dense_experts.llama4_moe_forward`).

- The grouped 1x1 convolution is the same function as ``bmm``: values, gradients and Hessian-vector products.
- Layers as Llama 4's experts, Inkling's shared experts and DeepSeek-V4's grouped output projection build them
  (a stack on repeated token rows; a view and transpose of a Linear weight): the exact Gauss-Newton diagonal
  takes no per-sample fallback and equals the float64 brute force, and the sketched Hessian is unbiased for
  the brute-force Hessian.
- ``torch.einsum`` of data and a weight (Funnel's relative attention: ``binh,tnh->bnit`` with a projection of
  position encodings, ``bind,snd->bnis`` with segment embeddings) is the same product, and takes the
  per-layer path with the exact Gauss-Newton diagonal and the unbiased sketched Hessian.
- A batched weight as ``matmul``'s right factor, broadcast over the samples (the Conformer's relative
  attention: queries ``(N, H, T, d)`` against position encodings projected by a weight, ``(1, H, d, S)``), is
  the same product, and takes the per-layer path with the exact Gauss-Newton diagonal and the unbiased
  sketched Hessian.
- ``bmm`` or an elementwise product of data with a function of the weights repeated over the samples (WavLM's
  position bias, SEW-D's position projections) runs per sample with one block: the same function; a stack
  whose blocks are merely equal (not a repeat) is left alone.
- Llama 4's layer written token by token returns the model's own outputs, and the class forward afterwards."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from expectation import assert_unbiased_traces
from torch import nn
from zoo_oracle import brute_force_ggn_diagonal

from lightning_flatness.functional import hessian_diagonal_groups
from lightning_flatness.functional.dense_experts import dense_experts, is_llama4_moe
from lightning_flatness.functional.parameters import select_parameters
from lightning_flatness.functional.weight_stack_products import (
    WeightStackProducts,
    batched_matmul_as_stack_product,
    einsum_as_stack_product,
    matmul_as_stack_product,
    product_as_stack_product,
    repeated_over_samples,
    stack_product_as_convolution,
)

F64 = torch.float64
GROUPS, HIDDEN, WIDTH, CLASSES = 3, 4, 5, 3


def _same_derivatives(new, ref, x: torch.Tensor, w: torch.Tensor) -> None:
    """The gradients of two scalar functions of ``(x, w)`` and a Hessian-vector product agree."""
    vjp, hvp = torch.autograd.functional.vjp, torch.autograd.functional.hvp
    for got, want in zip(vjp(new, (x, w))[1], vjp(ref, (x, w))[1]):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14)
    v = (torch.randn_like(x), torch.randn_like(w))
    for got, want in zip(hvp(new, (x, w), v)[1], hvp(ref, (x, w), v)[1]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_the_grouped_convolution_is_the_batched_product():
    """Values, the gradient in both factors and a Hessian-vector product of a function through the product."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(GROUPS, 7, HIDDEN, generator=g, dtype=F64)
    w = torch.randn(GROUPS, HIDDEN, WIDTH, generator=g, dtype=F64)
    u = torch.randn(GROUPS, 7, WIDTH, generator=g, dtype=F64)

    def f(product, x, w):
        return (torch.tanh(product(x, w)) * u).sum()

    ref, new = functools.partial(f, torch.bmm), functools.partial(f, stack_product_as_convolution)
    assert stack_product_as_convolution(x, w).is_contiguous()
    torch.testing.assert_close(stack_product_as_convolution(x, w), torch.bmm(x, w), rtol=1e-14, atol=1e-14)
    _same_derivatives(new, ref, x, w)


def test_only_a_weight_as_the_right_factor_is_rewritten():
    """A product of two data tensors (attention scores) and a weight on the left pass through as ``bmm``."""
    w = torch.randn(GROUPS, HIDDEN, WIDTH, requires_grad=True)
    x = torch.randn(GROUPS, 6, HIDDEN, requires_grad=True)
    with WeightStackProducts(lambda t: t is w):
        kept = torch.bmm(x, x.transpose(1, 2))
        rewritten = torch.bmm(x, w)
        left = torch.bmm(w.transpose(1, 2), x.transpose(1, 2))
    assert type(kept.grad_fn).__name__ == "BmmBackward0"
    assert type(left.grad_fn).__name__ == "BmmBackward0"
    assert type(rewritten.grad_fn).__name__ != "BmmBackward0"
    torch.testing.assert_close(rewritten, torch.bmm(x, w))


@pytest.mark.parametrize(
    "equation,x_shape,w_shape",
    [
        ("binh,tnh->bnit", (2, 5, 3, 4), (6, 3, 4)),  # Funnel: queries and projected position encodings
        ("bind,snd->bnis", (2, 5, 3, 4), (2, 3, 4)),  # Funnel: segment embeddings
        ("ibh,hnd->ibnd", (5, 2, 4), (4, 3, 2)),  # XLNet: a head projection (no group)
        ("bth,ho->bot", (2, 5, 4), (4, 3)),  # a plain projection, output reordered
    ],
)
def test_an_einsum_of_data_and_a_weight_is_the_same_product(equation, x_shape, w_shape):
    """Values, gradients in both operands and a Hessian-vector product, as :func:`torch.einsum`; under the
    mode the call is rewritten (both operand forms) only where the weight is the second operand."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*x_shape, generator=g, dtype=F64)
    w = torch.randn(*w_shape, generator=g, dtype=F64)
    u = torch.randn(torch.einsum(equation, x, w).shape, generator=g, dtype=F64)

    def f(product, x, w):
        return (torch.tanh(product(equation, x, w)) * u).sum()

    ref, new = functools.partial(f, torch.einsum), functools.partial(f, einsum_as_stack_product)
    torch.testing.assert_close(einsum_as_stack_product(equation, x, w), torch.einsum(equation, x, w))
    _same_derivatives(new, ref, x, w)
    leaf, data = w.clone().requires_grad_(True), x.clone().requires_grad_(True)
    xs, rest = equation.split(",")
    ws, out = rest.split("->")
    with WeightStackProducts(lambda t: t is leaf):
        listed = torch.einsum(equation, [data, leaf])
        swapped = torch.einsum(f"{ws},{xs}->{out}", leaf, data)  # the weight first: left as it is
        constant = torch.einsum(equation, x, leaf)  # no gradient: a function of the weight alone
    assert _convolved(listed) and not _convolved(swapped) and not _convolved(constant)
    torch.testing.assert_close(listed, torch.einsum(equation, x, w))


def _convolved(t: torch.Tensor) -> bool:
    """Whether a convolution is in ``t``'s autograd graph."""
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "Convolution" in type(node).__name__:
            return True
        stack.extend(n for n, _ in node.next_functions)
    return False


@pytest.mark.parametrize(
    "equation",
    ["bij,jk->b", "bii,ik->bk", "...j,jk->...k", "bj,jk,kl->bl", "bj,jk"],
)
def test_an_einsum_it_cannot_lay_out_as_a_product_is_left_alone(equation):
    """Indices summed over one operand alone, repeated indices, ellipses, three operands, implicit output."""
    if equation.count(",") != 1 or "->" not in equation or "..." in equation:
        assert einsum_as_stack_product(equation, torch.randn(2, 3), torch.randn(3, 4)) is None
        return
    x = torch.randn(2, 3, 3) if equation.startswith(("bij", "bii")) else torch.randn(2, 3)
    assert einsum_as_stack_product(equation, x, torch.randn(3, 4)) is None


class FunnelLikeAttention(nn.Module):
    """Funnel's relative-position attention in miniature: the position encodings projected by a weight alone
    (``td,dnh->tnh``), then scored against the queries with ``torch.einsum`` (``binh,tnh->bnit``), and the
    tokens' segment scores against a segment-embedding weight (``bind,snd->bnis``)."""

    def __init__(self, tokens: int = 4, heads: int = 2, head_dim: int = 3) -> None:
        super().__init__()
        self.q = nn.Linear(HIDDEN, heads * head_dim)
        self.r_kernel = nn.Parameter(torch.randn(HIDDEN, heads, head_dim) / 2)
        self.seg_embed = nn.Parameter(torch.randn(2, heads, head_dim) / 2)
        self.register_buffer("positions", torch.randn(tokens, HIDDEN))
        self.heads, self.head_dim = heads, head_dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, T, HIDDEN) -> (N, heads, T, T + 2)
        q = self.q(h).view(*h.shape[:2], self.heads, self.head_dim)
        r = torch.einsum("td,dnh->tnh", self.positions, self.r_kernel)
        position = torch.einsum("binh,tnh->bnit", q, r)
        segment = torch.einsum("bind,snd->bnis", q, self.seg_embed)
        return torch.cat([position, segment], dim=-1)


class FunnelLikeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(2, HIDDEN)
        self.attention = FunnelLikeAttention()
        self.head = nn.Linear(2 * 4 * 6, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 4, 2) -> (N, CLASSES)
        scores = self.attention(torch.tanh(self.embed(x)))
        return self.head(torch.tanh(scores).flatten(1))


@pytest.mark.parametrize("method", ["gauss_newton", "hessian_sketch"])
def test_einsums_of_data_and_weights_take_the_per_layer_path(method):
    """Before the einsum's rewrite, ``r_kernel`` and ``seg_embed`` sent every estimator to one backward pass
    per sample and column. Now no fallback: the exact Gauss-Newton diagonal equals the float64 brute force,
    and the sketched Hessian is unbiased for the brute-force Hessian."""
    model, x, y, names = _problem(FunnelLikeNet)
    assert {"attention.r_kernel", "attention.seg_embed"} <= set(names)
    if method == "gauss_newton":
        _per_layer_and_equal_to_the_brute_force_ggn(model, x, y, names)
    else:
        _per_layer_and_unbiased(model, x, y, names)


class StackedExperts(nn.Module):
    """Llama 4's experts: every expert on every token row, the rows repeated ``G`` times and scaled by softmax
    router scores, ``bmm`` with the stack ``(G, H, O)`` as stored, summed over the experts."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(HIDDEN, GROUPS, bias=False)
        self.up = nn.Parameter(torch.randn(GROUPS, HIDDEN, WIDTH) / 2)
        self.down = nn.Parameter(torch.randn(GROUPS, WIDTH, HIDDEN) / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, HIDDEN)
        scores = torch.softmax(self.router(rows), dim=-1)  # (R, G)
        routed = rows.repeat(GROUPS, 1) * scores.transpose(0, 1).reshape(-1, 1)
        inner = torch.tanh(torch.bmm(routed.view(GROUPS, -1, HIDDEN), self.up))
        out = torch.bmm(inner, self.down).sum(dim=0)
        return out.view(x.shape)


class GroupedLinear(nn.Linear):
    """DeepSeek-V4's grouped projection: ``G`` groups of ``HIDDEN`` inputs, each to ``WIDTH`` outputs, by
    ``bmm`` on a view and transpose of a Linear weight ``(G WIDTH, HIDDEN)``."""

    def __init__(self) -> None:
        super().__init__(HIDDEN, GROUPS * WIDTH, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, G, HIDDEN) -> (N, T, G, WIDTH)
        w = self.weight.view(GROUPS, -1, HIDDEN).transpose(1, 2)
        y = torch.bmm(x.reshape(-1, GROUPS, HIDDEN).transpose(0, 1), w).transpose(0, 1)
        return y.reshape(*x.shape[:-1], -1)


class StackNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(2, HIDDEN)
        self.experts = StackedExperts()
        self.grouped = GroupedLinear()
        self.head = nn.Linear(GROUPS * WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, 2) -> (N, CLASSES)
        h = torch.tanh(self.embed(x))
        h = h + self.experts(h)
        grouped = self.grouped(h.unsqueeze(2).expand(-1, -1, GROUPS, -1))
        return self.head(torch.tanh(grouped).flatten(2).mean(dim=1))


def _problem(net: type, n: int = 5):
    """``net()`` in float64 with a batch of ``n`` sequences of 4 tokens, and its selected parameters."""
    torch.manual_seed(0)
    model = net().double().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 4, 2, generator=g, dtype=F64), torch.randint(0, CLASSES, (n,), generator=g)
    return model, x, y, list(select_parameters(model))


def _fallbacks(caught: list) -> list[str]:
    return [str(w.message) for w in caught if "per-layer contractions do not apply" in str(w.message)]


def _per_layer_and_equal_to_the_brute_force_ggn(model: nn.Module, x, y, names: list[str]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = hessian_diagonal_groups(model, F.cross_entropy, x, y, method="gauss_newton", parameters=names)
    assert not _fallbacks(caught)
    truth = brute_force_ggn_diagonal(model, F.cross_entropy, x, y, names)
    for n in names:
        scale = float(truth[n].abs().max())
        assert scale > 0 and float((est.groups[n][0] - truth[n]).abs().max()) <= 1e-10 * scale, n


def _per_layer_and_unbiased(model: nn.Module, x, y, names: list[str]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_unbiased_traces(model, F.cross_entropy, x, y, names)
    assert not _fallbacks(caught)


def test_the_gauss_newton_diagonal_of_weight_stacks_is_per_layer_and_equals_brute_force():
    model, x, y, names = _problem(StackNet)
    assert {"experts.up", "experts.down", "grouped.weight"} <= set(names)
    _per_layer_and_equal_to_the_brute_force_ggn(model, x, y, names)


class SharedStack(nn.Module):
    """Inkling's shared experts: the token rows expanded to the ``G`` experts, ``bmm`` with the stack, then
    the activation on token-major rows (where the sketch's node rules read the samples along dim 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack = nn.Parameter(torch.randn(GROUPS, HIDDEN, WIDTH) / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, HIDDEN) -> (N, T, G WIDTH)
        rows = x.reshape(1, -1, HIDDEN).expand(GROUPS, -1, -1)
        out = torch.bmm(rows, self.stack).transpose(0, 1)  # (R, G, WIDTH)
        return torch.tanh(out).reshape(*x.shape[:-1], -1)


class TokenMajorStackNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(2, HIDDEN)
        self.shared = SharedStack()
        self.grouped = GroupedLinear()
        self.head = nn.Linear(GROUPS * WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, 2) -> (N, CLASSES)
        h = torch.tanh(self.embed(x))
        shared = self.shared(h).view(*h.shape[:2], GROUPS, WIDTH)[..., :HIDDEN]
        grouped = self.grouped(shared)
        return self.head(torch.tanh(grouped).flatten(2).mean(dim=1))


def test_the_sketched_hessian_of_weight_stacks_is_per_layer_and_unbiased():
    """The sketch's node rules need the samples along dim 0 of every nonlinear operation's input: here the
    products with the stacks are followed by operations on token-major rows (as DeepSeek-V4's grouped
    projection; Llama 4's layer is written token by token for it, tested in test_mixture_of_experts.py)."""
    model, x, y, names = _problem(TokenMajorStackNet)
    assert {"shared.stack", "grouped.weight"} <= set(names)
    _per_layer_and_unbiased(model, x, y, names)


def test_llama4_moe_written_token_by_token_is_the_models_function():
    """The layer's output and router logits, float64, on a batch of 4 sequences; the class forward after."""
    pytest.importorskip("transformers")
    from zoo_models import tiny_moe

    model, (inputs, _) = tiny_moe("llama4", dtype=F64)
    layer = next(m for m in model.modules() if is_llama4_moe(m))
    hidden = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    own, own_logits = layer(hidden)
    with dense_experts(model):
        written, logits = layer(hidden)
        whole = model(**inputs).logits
    assert "forward" not in layer.__dict__
    torch.testing.assert_close(written, own, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(logits, own_logits, rtol=0, atol=0)
    torch.testing.assert_close(whole, model(**inputs).logits, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(
    "x_shape,w_shape",
    [
        ((2, 3, 5, 1), (3, 1, 4)),  # Mamba's A[None, :, None, :] * dt[..., None]: groups, rows, outputs
        ((2, 3, 5), (3, 1)),  # a scale per channel
        ((2, 3, 5), (1, 5)),  # a scale per position, broadcast over channels
    ],
)
def test_a_product_of_data_and_a_weight_is_the_same_product(x_shape, w_shape):
    """``x * W`` (``W`` broadcast over the samples) as a grouped convolution: values, gradients and a
    Hessian-vector product; under the mode rewritten in either operand order, not where the weight has the
    samples' dim or where both factors are data."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*x_shape, generator=g, dtype=F64)
    w = torch.randn(*w_shape, generator=g, dtype=F64)
    u = torch.randn(torch.broadcast_shapes(x.shape, w.shape), generator=g, dtype=F64)

    def f(product, x, w):
        return (torch.tanh(product(x, w)) * u).sum()

    ref, new = functools.partial(f, torch.mul), functools.partial(f, product_as_stack_product)
    torch.testing.assert_close(product_as_stack_product(x, w), x * w, rtol=1e-14, atol=1e-14)
    _same_derivatives(new, ref, x, w)
    leaf, data = w.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with WeightStackProducts(lambda t: t is leaf):
        right, left, operator = data * leaf, torch.mul(leaf, data), leaf * data
        both = data * data
    assert _convolved(right) and _convolved(left) and _convolved(operator) and not _convolved(both)
    torch.testing.assert_close(right, x * w)
    assert product_as_stack_product(x, torch.randn(2, *w_shape[1:], dtype=F64)[: x_shape[0]]) is None


def test_a_weight_as_the_left_factor_of_matmul_is_the_same_product():
    """``W @ x`` (Mamba's ``dt_proj.weight @ time_step``) as a grouped convolution; ``x @ W`` keeps its own
    layer rule (``layer_rules.matmul``) and passes through."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, HIDDEN, 6, generator=g, dtype=F64)
    w = torch.randn(WIDTH, HIDDEN, generator=g, dtype=F64)
    u = torch.randn(2, WIDTH, 6, generator=g, dtype=F64)

    def f(product, x, w):
        return (torch.tanh(product(x, w)) * u).sum()

    ref = functools.partial(f, lambda x, w: w @ x)
    new = functools.partial(f, lambda x, w: matmul_as_stack_product(w, x))
    _same_derivatives(new, ref, x, w)
    leaf, data = w.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with WeightStackProducts(lambda t: t is leaf):
        left = leaf @ data
        right = data.transpose(1, 2) @ leaf.T
    assert _convolved(left) and not _convolved(right)
    torch.testing.assert_close(left, w @ x)


class SelectiveScanStep(nn.Module):
    """Mamba's selective state-space step without its scan: time steps ``dt = softplus(W_dt @ x)`` (a weight
    as matmul's left factor), ``A = -exp(A_log)`` (a function of a weight alone) multiplying them
    elementwise, ``exp(A dt)`` mixed with the inputs, then a head."""

    def __init__(self, channels: int = 3, states: int = 2, classes: int = 3):
        super().__init__()
        self.dt_proj = nn.Linear(channels, channels, bias=False)
        self.A_log = nn.Parameter(torch.randn(channels, states) * 0.5)
        self.head = nn.Linear(channels * states, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, T)
        dt = F.softplus(self.dt_proj.weight @ x)  # (N, C, T)
        decay = torch.exp(-torch.exp(self.A_log)[None, :, None, :] * dt[..., None])  # (N, C, T, S)
        state = (decay * x[..., None]).mean(dim=2)  # (N, C, S)
        return self.head(state.flatten(1))


def test_a_selective_scan_step_takes_the_per_layer_path_unbiased():
    """Both of Mamba's products with a weight on a toy, in float64: no per-sample fallback, and the sketched
    Hessian diagonal is unbiased for the brute-force one (the exponential of ``A_log`` exactly)."""
    from oracles import assert_unbiased, brute_force_hessian, hessian_sketch_draws

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = SelectiveScanStep().double()
    x, y = torch.randn(5, 3, 4, generator=g, dtype=F64), torch.randint(0, 3, (5,), generator=g)
    names = ["dt_proj.weight", "A_log", "head.weight"]
    truth = brute_force_hessian(model, F.cross_entropy, x, y, names).diagonal()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback to per-sample passes warns
        draws = hessian_sketch_draws(model, F.cross_entropy, x, y, names)
    assert_unbiased(draws, truth)


def test_mamba_takes_the_per_layer_path(monkeypatch):
    """Hugging Face's Mamba (its reference PyTorch scan, untied head): ``A = -exp(A_log)`` multiplies the
    time steps elementwise and ``dt_proj.weight`` multiplies them from the left, which sent every estimator
    to per-sample backward passes. In float32 both are products the per-layer path reads: no fallback, and
    draw by draw the per-sample path's estimates. In float64 the model computes ``A`` in float32
    (``A_log.float()``), a product of two dtypes that is left as it is: the per-sample passes, whose float32
    columns and float64 gradients are now squared in one dtype (they failed), give the same draws, and the
    exact Gauss-Newton diagonal of both paths agrees (the exact method's per-sample passes failed too)."""
    transformers = pytest.importorskip("transformers")
    from oracles import hessian_sketch_draws

    import lightning_flatness.functional.estimators.hessian_sketch as module
    from lightning_flatness.functional import hessian_diagonal
    from lightning_flatness.functional.model_io import extract_logits
    from lightning_flatness.measure import resolve_loss

    config = transformers.MambaConfig(
        vocab_size=16,
        hidden_size=4,
        state_size=3,
        num_hidden_layers=1,
        expand=2,
        conv_kernel=2,
        time_step_rank=2,
        tie_word_embeddings=False,
        use_cache=False,
    )
    ids = torch.randint(0, 16, (3, 5), generator=torch.Generator().manual_seed(1))
    names = ["backbone.layers.0.mixer.A_log", "backbone.layers.0.mixer.dt_proj.weight"]
    draws, fallbacks, gauss_newton = {}, {}, {}
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        model = transformers.MambaForCausalLM(config).to(dtype).eval()
        loss = resolve_loss(F.cross_entropy, model, extract_logits(model(input_ids=ids)), ids)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            draws[dtype] = hessian_sketch_draws(model, loss, {"input_ids": ids}, ids, names, draws=3)
            exact = hessian_diagonal(
                model, loss, {"input_ids": ids}, ids, method="gauss_newton", parameters=names
            )
        gauss_newton[dtype] = torch.cat([exact[n].double().flatten() for n in names])
        fallbacks[dtype] = any("per-layer contractions do not apply" in str(w.message) for w in caught)
        if dtype == torch.float32:
            with monkeypatch.context() as patch, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                patch.setattr(module, "_fast_path_blockers", lambda *args: ["the per-sample path, forced"])
                forced = hessian_sketch_draws(model, loss, {"input_ids": ids}, ids, names, draws=3)
            scale = float(forced.abs().max())
            torch.testing.assert_close(draws[dtype], forced, rtol=1e-3, atol=2e-3 * scale)  # float32 sums
    assert fallbacks == {torch.float32: False, torch.float64: True}
    # the exact Gauss-Newton diagonal (no draws): per-layer in float32, per-sample passes in float64
    scale = float(gauss_newton[torch.float64].abs().max())
    torch.testing.assert_close(
        gauss_newton[torch.float32], gauss_newton[torch.float64], rtol=1e-4, atol=1e-5 * scale
    )
    scale = float(draws[torch.float64].abs().max())
    torch.testing.assert_close(
        draws[torch.float32].double(), draws[torch.float64], rtol=1e-3, atol=1e-3 * scale
    )


@pytest.mark.parametrize(
    "x_shape, w_shape",
    [
        ((2, 3, 5, 4), (1, 3, 4, 6)),
        ((2, 3, 5, 4), (3, 4, 6)),
        ((2, 3, 5, 4), (1, 1, 4, 6)),
        ((2, 5, 4), (1, 4, 6)),
    ],
)
def test_a_batched_weight_as_the_right_factor_of_matmul_is_the_same_product(x_shape, w_shape):
    """``x @ W`` with ``W`` of 3 or more dims broadcast over the samples: values, gradients and a
    Hessian-vector product; a weight not broadcast over the samples, or a 2-D one (a layer rule's), passes
    through."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*x_shape, generator=g, dtype=F64)
    w = torch.randn(*w_shape, generator=g, dtype=F64)
    u = torch.randn(*x_shape[:-1], w_shape[-1], generator=g, dtype=F64)

    def f(product, x, w):
        return (torch.tanh(product(x, w)) * u).sum()

    ref = functools.partial(f, lambda x, w: x @ w)
    new = functools.partial(f, batched_matmul_as_stack_product)
    _same_derivatives(new, ref, x, w)
    leaf, data = w.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with WeightStackProducts(lambda t: t is leaf):
        batched = data @ leaf
        per_sample = data @ leaf.expand(*x_shape[:-2], *w_shape[-2:]) * 1.0  # a function of it, not broadcast
    assert _convolved(batched) and not _convolved(per_sample)
    torch.testing.assert_close(batched, x @ w)
    assert batched_matmul_as_stack_product(x, torch.randn(x_shape[0], *w_shape[-2:], dtype=F64)) is None
    assert batched_matmul_as_stack_product(x, torch.randn(*w_shape[-2:], dtype=F64)) is None  # a layer rule's


class RelativeAttentionScores(nn.Module):
    """The Conformer's relative-position scores in miniature: queries from the data, ``(N, H, T, d)``, against
    position encodings (a buffer) projected by a Linear layer and laid out ``(1, H, d, S)``, with
    ``torch.matmul``, then the skew that aligns the relative positions (pad, view, slice)."""

    def __init__(self, tokens: int = 4, heads: int = 2, head_dim: int = 3) -> None:
        super().__init__()
        self.q = nn.Linear(HIDDEN, heads * head_dim)
        self.linear_pos = nn.Linear(HIDDEN, heads * head_dim, bias=False)
        self.register_buffer("positions", torch.randn(1, 2 * tokens - 1, HIDDEN))
        self.heads, self.head_dim = heads, head_dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, T, HIDDEN) -> (N, H, T, T)
        n, t = h.shape[:2]
        q = self.q(h).view(n, t, self.heads, self.head_dim).transpose(1, 2)
        p = self.linear_pos(self.positions).view(1, 2 * t - 1, self.heads, self.head_dim).permute(0, 2, 3, 1)
        scores = torch.matmul(q, p)  # (N, H, T, 2T - 1)
        shape = scores.shape
        scores = F.pad(scores, (1, 0)).view(*shape[:2], shape[3] + 1, shape[2])
        return scores[..., 1:, :].view(shape)[..., :t]


class RelativeAttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(2, HIDDEN)
        self.attention = RelativeAttentionScores()
        self.head = nn.Linear(2 * 4 * 4, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 4, 2) -> (N, CLASSES)
        scores = self.attention(torch.tanh(self.embed(x)))
        return self.head(torch.tanh(scores).flatten(1))


class PaddedRelativeAttentionNet(RelativeAttentionNet):
    """:class:`RelativeAttentionNet` with its embedding's output zeroed in place at a padded position (as
    wav2vec 2.0's Conformer zeroes the hidden states where ``attention_mask`` pads a clip): a layer output
    changed in place, so the recorder runs the forward again on copies of the layer outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h[1:, -1] = 0.0  # the last token of every sample but the first is padding
        scores = self.attention(torch.tanh(h))
        return self.head(torch.tanh(scores).flatten(1))


@pytest.mark.parametrize("net", [RelativeAttentionNet, PaddedRelativeAttentionNet], ids=["plain", "padded"])
@pytest.mark.parametrize("method", ["gauss_newton", "hessian_sketch"])
def test_relative_attention_scores_take_the_per_layer_path(method, net):
    """Before the rewrite, ``linear_pos`` (a batched right factor of ``matmul``) sent every estimator to one
    backward pass per sample and column. Now no fallback: the exact Gauss-Newton diagonal equals the float64
    brute force, and the sketched Hessian is unbiased for the brute-force Hessian. Also where a layer output
    is changed in place (padding): the copies the recorder hands the model then count as data, as the
    outputs did (before, the rewrite did not see the queries as data there and the estimators fell back)."""
    model, x, y, names = _problem(net)
    assert "attention.linear_pos.weight" in names
    if method == "gauss_newton":
        _per_layer_and_equal_to_the_brute_force_ggn(model, x, y, names)
    else:
        _per_layer_and_unbiased(model, x, y, names)


def test_a_function_of_the_weights_repeated_over_the_samples_is_found_by_its_repeat():
    """The block of one sample where the tensor is a repeat by the batch size along dim 0 (through views that
    merge dim 0 with later dims and transposes of other dims); None for a repeat by another factor, a
    transpose of dim 0, a view that splits dim 0, or a stack whose
    blocks are equal without a repeat behind them (Llama 4's experts initialised alike: each expert is its own
    weight, and reading one block for all would lose the others' gradients)."""
    u = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    w = u.unsqueeze(0).repeat(5, 1, 1, 1).view(10, 3, 4)
    assert torch.equal(repeated_over_samples(w, 5), u)
    assert torch.equal(repeated_over_samples(u.repeat(5, 1, 1).transpose(-1, -2), 5), u.transpose(-1, -2))
    assert repeated_over_samples(w, 2) is None  # not the batch size's repeat
    assert repeated_over_samples(u.repeat(5, 1, 1).transpose(0, 1), 5) is None
    assert repeated_over_samples(u.repeat(5, 1, 1).view(5, 24), 5) is None  # a view that splits dim 0
    stack = torch.cat([u.detach()] * 5).requires_grad_(True)  # equal blocks, but a leaf
    assert repeated_over_samples(stack, 5) is None
    assert repeated_over_samples(u.repeat(5, 1, 1) * 1.0, 5) is None  # an op between: not proved a repeat
    from lightning_flatness.functional.weight_stack_products import _saved

    node = w.grad_fn.next_functions[0][0]  # the repeat behind the view
    assert _saved(node, "_saved_repeats") == ((5, 1, 1, 1),)
    assert _saved(node, "_saved_repeats", "_no_such_attribute") is None  # another PyTorch: nothing proved


@pytest.mark.parametrize("product", ["bmm", "mul", "rmul"])
def test_a_product_with_a_repeated_function_of_the_weights_is_the_same_product(product):
    """Values, gradients and a Hessian-vector product in both the data and the repeated weight's source, for
    ``bmm(x, W)`` (SEW-D) and ``x * W`` in either order (WavLM); the product runs as a grouped convolution."""
    n, k = 3, 2
    g = torch.Generator().manual_seed(0)
    u = torch.randn(k, 4, 5, generator=g, dtype=F64)
    x = torch.randn(n * k, 6, 4, generator=g, dtype=F64) if product == "bmm" else None
    if product != "bmm":
        u = torch.randn(k, 6, 6, generator=g, dtype=F64)
        x = torch.randn(n * k, 6, 1, generator=g, dtype=F64)
    out_shape = torch.bmm(x, u.repeat(n, 1, 1)).shape if product == "bmm" else (n * k, 6, 6)
    v = torch.randn(out_shape, generator=g, dtype=F64)

    def apply(x, w):
        return {"bmm": lambda: torch.bmm(x, w), "mul": lambda: x * w, "rmul": lambda: w * x}[product]()

    def f(x, u, mode: bool):
        w = u.unsqueeze(0).repeat(n, 1, 1, 1).view(n * k, *u.shape[1:])
        if not mode:
            return (torch.tanh(apply(x, w)) * v).sum()
        with WeightStackProducts(lambda t: t is w, batch_size=n):
            return (torch.tanh(apply(x, w)) * v).sum()

    _same_derivatives(functools.partial(f, mode=True), functools.partial(f, mode=False), x, u)
    leaf = u.clone().requires_grad_(True)
    w = leaf.unsqueeze(0).repeat(n, 1, 1, 1).view(n * k, *u.shape[1:])
    data = x.clone().requires_grad_(True)
    with WeightStackProducts(lambda t: t is w, batch_size=n):
        rewritten = apply(data, w)
    with WeightStackProducts(lambda t: t is w, batch_size=1):  # one sample: nothing repeated
        plain = apply(data, w)
    assert _convolved(rewritten) and (product == "bmm" or not _convolved(plain))
    torch.testing.assert_close(rewritten, apply(x, u.repeat(n, 1, 1)))
