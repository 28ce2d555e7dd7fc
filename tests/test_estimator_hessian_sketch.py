"""The sketched Hessian diagonal (``method="hessian_sketch"``): unbiased for the brute-force float64
Hessian diagonal (not only its Gauss-Newton part) on a network with every node rule, on tiny zoo
models, and refused where a term is not covered."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from oracles import assert_unbiased, brute_force_ggn, brute_force_hessian, flat
from torch import Tensor, nn

from lightning_flatness.functional import hessian_diagonal_groups, normalized_softmax_cross_entropy
from lightning_flatness.functional.estimators.exact import ExactMethodNotApplicable
from lightning_flatness.functional.estimators.gauss_newton_sketch import gauss_newton_sketch_diagonal
from lightning_flatness.functional.estimators.hessian_sketch import hessian_sketch_diagonal
from lightning_flatness.functional.estimators.registry import ESTIMATORS
from lightning_flatness.functional.parameters import select_parameters

torch.set_num_threads(1)
F64 = torch.float64


class TinyBlock(nn.Module):
    """Embedding Linear -> LayerNorm -> one-head attention (softmax of q k^T, times v) -> GELU MLP ->
    squeeze-excitation gate (x * sigmoid(W x)) -> tanh -> mean over tokens -> head: every node rule."""

    def __init__(self, d: int = 4, classes: int = 3):
        super().__init__()
        self.embed = nn.Linear(3, d)
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.gate = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:  # x (N, T, 3)
        h = self.norm(self.embed(x))
        attn = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 2.0, dim=-1)
        h = h + attn @ self.v(h)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        h = torch.tanh(h * torch.sigmoid(self.gate(h)))
        return self.head(h.mean(dim=1))


def _problem(loss_fn, seed: int = 0, n: int = 6):
    torch.manual_seed(seed)
    model = TinyBlock().double().eval()
    for p in model.parameters():
        p.data.mul_(1.5)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 3, 3, generator=g, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=g)
    params = {k: v for k, v in select_parameters(model).items() if v.ndim >= 2}
    names = list(params)
    hessian = brute_force_hessian(model, loss_fn, x, y, names)
    return model, x, y, params, names, hessian


def _estimates(model, loss_fn, x, y, params, names, repeats: int, **options) -> Tensor:
    """``repeats`` independent estimates (generators seeded ``0 .. repeats - 1``), ``(repeats, P)``."""
    return torch.stack(
        [
            flat(
                hessian_sketch_diagonal(
                    model, loss_fn, x, y, params, generator=torch.Generator().manual_seed(r), **options
                ),
                names,
            )
            for r in range(repeats)
        ]
    )


def _unbiased_on_the_path_it_takes(model, x, y, per_layer: bool = False):
    """Cross-entropy, the ``ndim >= 2`` weights: the estimator warns that it takes per-sample backward
    passes (``per_layer``: it does not warn, it takes the per-layer path), and 40 estimates of 4 sketches
    are unbiased for the brute-force Hessian diagonal. Returns the ``(params, names, diagonal)`` it used."""
    params = {k: v for k, v in select_parameters(model).items() if v.ndim >= 2}
    names = list(params)
    diag = brute_force_hessian(model, F.cross_entropy, x, y, names).diagonal()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hessian_sketch_diagonal(model, F.cross_entropy, x, y, params)
    fallback = any("per-layer contractions do not apply" in str(w.message) for w in caught)
    assert fallback is not per_layer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_unbiased(_estimates(model, F.cross_entropy, x, y, params, names, 40, num_sketches=4), diag)
    return params, names, diag


@pytest.mark.parametrize("exact_loss_factors", [None, False], ids=["exact-loss-factors", "sketched-loss"])
@pytest.mark.parametrize("loss_fn", [normalized_softmax_cross_entropy, F.cross_entropy])
def test_unbiased_for_the_hessian_diagonal(loss_fn, exact_loss_factors):
    model, x, y, params, names, hessian = _problem(loss_fn)
    diag = hessian.diagonal()
    ggn = brute_force_ggn(model, loss_fn, x, y, names).diagonal()
    assert float((ggn - diag).norm() / diag.norm()) > 0.05  # the residual matters here
    est = _estimates(
        model, loss_fn, x, y, params, names, 40, num_sketches=8, exact_loss_factors=exact_loss_factors
    )
    mean, se, live = assert_unbiased(est, diag)
    z_ggn = (mean - ggn)[live] / se[live]  # the same estimates are far from the Gauss-Newton diagonal
    assert float(z_ggn.abs().max()) > 8.0


def test_unbiased_through_group_norm_and_rms_norm():
    """Conv -> GroupNorm (weight-dependent statistics, timm's PoolFormer) -> GELU -> Linear -> RMSNorm ->
    head: ``auto`` measures the Hessian, and the estimate is unbiased for the brute-force diagonal and far
    from the Gauss-Newton one."""
    from lightning_flatness.functional.estimators.method_choice import choose_method

    class Norms(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 4, 3, padding=1)
            self.group = nn.GroupNorm(2, 4)
            self.fc = nn.Linear(4 * 5, 6)
            self.rms = nn.RMSNorm(6, eps=1e-3)
            self.head = nn.Linear(6, 3)

        def forward(self, x):  # x (N, 2, 5)
            h = F.gelu(self.group(self.conv(x)))
            return self.head(self.rms(self.fc(h.flatten(1))))

    torch.manual_seed(0)
    model = Norms().double().eval()
    with torch.no_grad():
        model.group.weight.uniform_(0.5, 1.5)
        model.rms.weight.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 2, 5, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g)
    choice = choose_method(model, F.cross_entropy, x, y)
    assert choice.method == "hessian_sketch" and "group_norm" in choice.reason and "rms_norm" in choice.reason
    params = {k: v for k, v in select_parameters(model).items() if v.ndim >= 2}
    names = list(params)
    diag = brute_force_hessian(model, F.cross_entropy, x, y, names).diagonal()
    ggn = brute_force_ggn(model, F.cross_entropy, x, y, names).diagonal()
    mean, se, live = assert_unbiased(
        _estimates(model, F.cross_entropy, x, y, params, names, 40, num_sketches=8), diag
    )
    assert float(((mean - ggn)[live] / se[live]).abs().max()) > 8.0


def test_equals_the_gauss_newton_estimators_on_a_piecewise_linear_network():
    """No op to add: with the loss's exact factors the exact Gauss-Newton (= Hessian) diagonal, with the
    loss's sketch the Gauss-Newton sketch's value for the same random signs."""
    from lightning_flatness.functional.estimators.gauss_newton import gauss_newton_exact_diagonal

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4)).double()
    x, y = torch.randn(9, 5, dtype=F64), torch.randint(0, 4, (9,))
    params = select_parameters(model)
    for loss_fn in (normalized_softmax_cross_entropy, F.cross_entropy):
        exact = gauss_newton_exact_diagonal(model, loss_fn, x, y, params)
        a = hessian_sketch_diagonal(model, loss_fn, x, y, params)  # small: exact loss factors
        b = hessian_sketch_diagonal(
            model, loss_fn, x, y, params, generator=torch.Generator().manual_seed(3), exact_loss_factors=False
        )
        c = gauss_newton_sketch_diagonal(
            model, loss_fn, x, y, params, generator=torch.Generator().manual_seed(3)
        )
        for name in params:
            torch.testing.assert_close(a[name], exact[name], rtol=1e-10, atol=1e-14)
            torch.testing.assert_close(b[name], c[name], rtol=1e-10, atol=1e-14)


#: how far (in the ratio below) the Gauss-Newton diagonal must be on some tensor: GPT-2's residual is
#: smaller against the sketch's noise on 3 samples (its largest ratio is 9, its Hessian ratios below 1.3)
GGN_CONTRAST = {"gpt2": 8.0}


@pytest.mark.parametrize(
    "name", ["vit", "bert", "mobilenet_v3", "efficientnet", "torchvision_vit", "swin", "gpt2", "convnext_v2"]
)
def test_zoo_models_are_unbiased_for_the_hessian(name):
    """32 independent estimates of 32 sketches each on 3 samples: per weight tensor, the squared distance
    of their mean from the brute-force Hessian diagonal is what their own spread predicts (about 1 when
    unbiased; below 5 here: the noise is heavy-tailed), while from the Gauss-Newton diagonal it is far
    larger on some tensor. Tensors with no nonlinear op downstream (the head) come out exact (the loss's
    exact factors on these small models). GPT-2's tied LM head takes the per-sample path with the tied
    weight's own columns (:mod:`~lightning_flatness.functional.estimators.node_rules.tied_linear`)."""
    from tests.zoo_models import TINY, zoo_loss
    from tests.zoo_oracle import brute_force_ggn_diagonal, brute_force_hessian_diagonal

    model, (x, y) = TINY[name](n=3, seed=0, dtype=F64)
    loss_fn = zoo_loss(name, normalized_softmax_cross_entropy)
    params = {k: v for k, v in select_parameters(model).items() if v.ndim >= 2}
    h = brute_force_hessian_diagonal(model, loss_fn, x, y, list(params))
    g = brute_force_ggn_diagonal(model, loss_fn, x, y, list(params))
    repeats = 32
    runs = [
        hessian_sketch_diagonal(
            model, loss_fn, x, y, params, generator=torch.Generator().manual_seed(r), num_sketches=32
        )
        for r in range(repeats)
    ]
    ratio_h, ratio_g = {}, {}
    for k in params:
        est = torch.stack([r[k] for r in runs])
        mean, var = est.mean(0), est.var(0) / repeats
        if float(var.sum()) <= 1e-24 * float(mean.pow(2).sum()):  # no op upstream of it: exact (the head)
            torch.testing.assert_close(mean, h[k].detach(), rtol=1e-9, atol=1e-12)
            continue
        ratio_h[k] = float((mean - h[k].detach()).pow(2).sum() / var.sum())
        ratio_g[k] = float((mean - g[k].detach()).pow(2).sum() / var.sum())
    assert max(ratio_h.values()) < 5.0, ratio_h
    assert max(ratio_g.values()) > GGN_CONTRAST.get(name, 20.0), ratio_g


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_transformers_activation_checkpointing_leaves_the_choice_and_the_sketch_alone(name):
    """``gradient_checkpointing_enable()`` on a Hugging Face text model registers a forward hook that sets
    ``requires_grad`` on the input embeddings' output (``enable_input_require_grads``); in eval mode nothing
    is checkpointed. `auto` picks what it picks without it (BERT: the sketched Hessian, not the
    Gauss-Newton diagonal) and the sketch draws the same diagonal, to the last bit."""
    from lightning_flatness.functional.estimators.method_choice import choose_method
    from tests.zoo_models import TINY, zoo_loss

    pytest.importorskip("transformers")
    loss_fn = zoo_loss(name, normalized_softmax_cross_entropy)
    out = []
    for checkpointing in (False, True):
        model, (x, y) = TINY[name](n=3, seed=0, dtype=F64)
        if checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # transformers 5: a deprecated alias
                model.gradient_checkpointing_enable()
            model.eval()
            assert model.get_input_embeddings()._forward_hooks  # the hook is there
        params = {k: v for k, v in select_parameters(model).items() if v.ndim >= 2}
        choice = choose_method(model, loss_fn, x, y)
        diag = hessian_sketch_diagonal(
            model, loss_fn, x, y, params, generator=torch.Generator().manual_seed(0)
        )
        out.append((choice.method, choice.quantity, diag))
    assert out[0][:2] == out[1][:2]
    assert out[1][1] == ("hessian" if name == "bert" else out[1][1])
    for k, d in out[0][2].items():
        torch.testing.assert_close(out[1][2][k], d, rtol=0, atol=0)


def test_registered_and_reachable_from_the_front_door():
    spec = ESTIMATORS["hessian_sketch"]
    assert spec.quantity == "hessian" and spec.stochastic
    model, x, y, params, names, hessian = _problem(F.cross_entropy, n=8)
    est = hessian_diagonal_groups(
        model,
        F.cross_entropy,
        x,
        y,
        method="hessian_sketch",
        num_groups=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert est.method == "hessian_sketch"
    assert set(names) <= set(est.groups)


class TiedLM(nn.Module):
    """Token embedding -> Linear -> tanh -> an LM head tied to the embedding (GPT-2's ``wte``), logits
    averaged over the positions."""

    def __init__(self, vocabulary: int = 7, d: int = 4):
        super().__init__()
        self.emb, self.fc = nn.Embedding(vocabulary, d), nn.Linear(d, d)
        self.head = nn.Linear(d, vocabulary, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:  # (N, T)
        return self.head(torch.tanh(self.fc(self.emb(ids)))).mean(dim=1)


class SharedLayer(nn.Module):
    """One Linear applied twice (ALBERT's shared layers): its second use reads its own first output."""

    def __init__(self):
        super().__init__()
        self.w, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.w(torch.tanh(self.w(x)))))


@pytest.mark.parametrize("kind", ["tied_lm_head", "shared_layer"])
def test_a_weight_used_twice_is_unbiased_for_the_hessian(kind, monkeypatch):
    """A tied LM head and a shared layer: ``method="hessian_sketch"`` measures the Hessian, on the
    per-layer path (the calls' per-sample gradients summed: ``layer_rules.shared``) with the columns of the
    tied weight's Linear call as a product of its input and the weight (``node_rules.tied_linear``), which
    enter at the weight itself. The estimate is unbiased for the brute-force diagonal and equals the
    per-sample path's draw by draw; without those columns the same draws are far off (the curvature that
    couples the weight's two uses). ``auto`` keeps the Gauss-Newton diagonal there (those columns are
    noisy) and says why."""
    import lightning_flatness.functional.estimators.hessian_sketch as module
    from lightning_flatness.functional.estimators.method_choice import choose_method

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "tied_lm_head":
        model = TiedLM().double()
        x, y = torch.randint(0, 7, (5, 3), generator=g), torch.randint(0, 7, (5,), generator=g)
    else:
        model = SharedLayer().double()
        x, y = torch.randn(5, 4, generator=g, dtype=F64), torch.randint(0, 3, (5,), generator=g)
    choice = choose_method(model, F.cross_entropy, x, y)
    assert choice.quantity == "gauss_newton" and "a tied weight: method='hessian_sketch'" in choice.reason
    params, names, diag = _unbiased_on_the_path_it_takes(model, x, y, per_layer=True)
    per_layer = _estimates(model, F.cross_entropy, x, y, params, names, 3, num_sketches=2)
    with monkeypatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch.setattr(module, "_fast_path_blockers", lambda *args: ["the per-sample path, forced"])
        per_sample = _estimates(model, F.cross_entropy, x, y, params, names, 3, num_sketches=2)
    torch.testing.assert_close(per_layer, per_sample, rtol=1e-10, atol=1e-14 * float(diag.abs().max()))
    monkeypatch.setattr(module, "_tied_products", lambda forward: [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = _estimates(model, F.cross_entropy, x, y, params, names, 40, num_sketches=4)
    mean, se = est.mean(0), est.std(0) / math.sqrt(est.shape[0])
    live = se > 1e-12 * diag.abs().max()
    assert float(((mean - diag)[live] / se[live]).abs().max()) > 20.0


@pytest.mark.parametrize(
    "case", ["sketched-loss", "exact-loss-factors", "tied_lm_head", "gauss_newton_chunks"]
)
def test_columns_sent_back_in_groups_equal_one_pass_draw_by_draw(case, monkeypatch):
    """Autograd's batched backward of the per-layer path holds every layer output's gradient for all columns
    of a pass, and the ops' columns are allocated per sketch, so the sketches and then the columns go
    through in groups of about ``BATCHED_COLUMN_ELEMENTS`` entries. Forced to one sketch and one column per
    pass, the estimate equals the one-pass estimate of the same draws: with the loss's sketched columns
    (signs per column; three groups of one sketch), with its exact factors (signs per sample; one group),
    with a tied weight's columns at the weight itself, and for the Gauss-Newton sketch's sample chunks off
    its column tape."""
    import lightning_flatness.functional.estimators.gauss_newton_sketch as module
    from lightning_flatness.functional.estimators.layer_rules.column_backward import ColumnTape

    g = torch.Generator().manual_seed(1)
    if case == "tied_lm_head":
        torch.manual_seed(0)
        model, loss_fn = TiedLM().double(), F.cross_entropy
        x, y = torch.randint(0, 7, (5, 3), generator=g), torch.randint(0, 7, (5,), generator=g)
        params = {k: v for k, v in select_parameters(model).items() if v.ndim >= 2}
    else:
        loss_fn = F.cross_entropy if case == "gauss_newton_chunks" else normalized_softmax_cross_entropy
        model, x, y, params, _, _ = _problem(loss_fn)
    options = {"exact_loss_factors": False} if case == "sketched-loss" else {}

    def estimate() -> dict[str, Tensor]:
        seed = torch.Generator().manual_seed(3)
        if case == "gauss_newton_chunks":
            return gauss_newton_sketch_diagonal(
                model, F.cross_entropy, x, y, params, chunk_size=2, generator=seed, num_sketches=3
            )
        return hessian_sketch_diagonal(
            model, loss_fn, x, y, params, generator=seed, num_sketches=3, **options
        )

    passes: list[int] = []
    batched = module._batched_backward

    def counted(roots, outputs, stacks):
        passes.append(stacks[0].shape[0])
        return batched(roots, outputs, stacks)

    monkeypatch.setattr(module, "_batched_backward", counted)
    if case == "gauss_newton_chunks":  # off the column tape, onto autograd's batched backward
        monkeypatch.setattr(ColumnTape, "backward", lambda self, *args, **kwargs: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one_pass = estimate()
        columns = passes[0]
        assert passes == [columns] and columns > 1
        monkeypatch.setattr(module, "BATCHED_COLUMN_ELEMENTS", 1)
        grouped = estimate()
    assert passes[1:] == [1] * columns
    for name, value in one_pass.items():
        torch.testing.assert_close(grouped[name], value, rtol=1e-12, atol=1e-15 * float(value.abs().max()))


class SharedTokenTable(nn.Module):
    """An encoder-decoder whose token table is looked up by both stacks (BART's and T5's ``shared``): the
    first half of each row of ids is the source, the second the target; the target's embeddings attend to
    the encoded source (a softmax of their product), so the curvature of the nonlinear ops couples the
    table's two lookups, but no Linear call reads the table."""

    def __init__(self, vocabulary: int = 6, d: int = 3, classes: int = 3):
        super().__init__()
        self.emb, self.enc, self.head = nn.Embedding(vocabulary, d), nn.Linear(d, d), nn.Linear(d, classes)

    def forward(self, ids: Tensor) -> Tensor:  # (N, 2T)
        source, target = ids.chunk(2, dim=1)
        encoded = torch.tanh(self.enc(self.emb(source)))  # (N, T, d)
        queries = self.emb(target)
        attended = torch.softmax(queries @ encoded.transpose(1, 2), dim=-1) @ encoded
        return self.head(torch.tanh(attended + queries)).mean(dim=1)


def test_a_table_looked_up_twice_takes_the_hessian_sketch_unbiased(monkeypatch):
    """A weight used twice by embedding lookups only has no coupling columns of its own (no Linear call
    reads it): ``auto`` takes the sketched Hessian (the Gauss-Newton diagonal before), on the per-layer
    path, unbiased for the brute-force Hessian diagonal, whose table entries the Gauss-Newton diagonal
    misses; the bound on coupling columns does not apply to it."""
    import lightning_flatness.functional.estimators.hessian_sketch as module
    from lightning_flatness.functional.estimators.method_choice import choose_method

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = SharedTokenTable().double()
    x, y = torch.randint(0, 6, (6, 4), generator=g), torch.randint(0, 3, (6,), generator=g)
    choice = choose_method(model, F.cross_entropy, x, y)
    assert (choice.method, choice.quantity) == ("hessian_sketch", "hessian"), choice.reason
    params, names, diag = _unbiased_on_the_path_it_takes(model, x, y, per_layer=True)
    table = slice(0, params["emb.weight"].numel())  # names in selection order: the table first
    assert names[0] == "emb.weight"
    ggn = brute_force_ggn(model, F.cross_entropy, x, y, names).diagonal()
    assert float((ggn - diag)[table].norm() / diag[table].norm()) > 0.05  # the residual reaches the table
    monkeypatch.setattr(module, "TIED_COLUMN_ELEMENTS", 100)
    hessian_sketch_diagonal(model, F.cross_entropy, x, y, params)  # no coupling columns: not refused


def test_refuses_a_weight_used_twice_by_other_ops_or_too_large(monkeypatch):
    import lightning_flatness.functional.estimators.hessian_sketch as module

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return self.w(torch.tanh(x @ self.w.weight))  # a matmul use: no rule for the pair

    model = Mixed().double()
    x, y = torch.randn(5, 4, dtype=F64), torch.randint(0, 4, (5,))
    with pytest.raises(ExactMethodNotApplicable, match="'w.weight' is used 2 times.*not only by Linear"):
        hessian_sketch_diagonal(model, F.cross_entropy, x, y, select_parameters(model))
    monkeypatch.setattr(module, "TIED_COLUMN_ELEMENTS", 100)
    shared = SharedLayer().double()
    with pytest.raises(
        ExactMethodNotApplicable, match="'w.weight' is used 2 times \\(a tied weight\\).*exceed 100"
    ):
        hessian_sketch_diagonal(shared, F.cross_entropy, x, y[:5] % 3, select_parameters(shared))


def test_refuses_an_operation_without_a_node_rule():
    class Arctan(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x) * torch.atan(self.b(x))

    model = Arctan().double()
    x, y = torch.randn(5, 4, dtype=F64), torch.randint(0, 4, (5,))
    with pytest.raises(ExactMethodNotApplicable, match="'atan'.*no node rule"):
        hessian_sketch_diagonal(model, F.cross_entropy, x, y, select_parameters(model))


def test_unbiased_through_attention_written_with_einsum():
    """Scores and weighted values as ``einsum`` of two activations (``node_rules.einsum``): on the per-layer
    path, unbiased for the brute-force Hessian diagonal."""

    class EinsumAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.head = nn.Linear(3, 12), nn.Linear(4, 3)

        def forward(self, x):  # (N, T=4, 3)
            q, k, v = self.qkv(x).reshape(x.shape[0], 4, 3, 1, 4).unbind(dim=2)  # (N, T, heads=1, 4)
            scores = torch.einsum("nihd,njhd->nhij", q, k)
            out = torch.einsum("nhij,njhd->nihd", torch.softmax(scores, dim=-1), v)
            return self.head(out.mean(dim=(1, 2)))

    torch.manual_seed(0)
    model = EinsumAttention().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 4, 3, generator=g, dtype=F64), torch.randint(0, 3, (5,), generator=g)
    _unbiased_on_the_path_it_takes(model, x, y, per_layer=True)


def test_refuses_train_mode_dropout():
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 3)).double().train()
    x, y = torch.randn(5, 4, dtype=F64), torch.randint(0, 3, (5,))
    with pytest.raises(ExactMethodNotApplicable, match="dropout"):
        hessian_sketch_diagonal(model, F.cross_entropy, x, y, select_parameters(model))


def test_leaves_the_model_unchanged():
    from tests.zoo_models import TINY

    model, (x, y) = TINY["vit"](n=2, seed=0, dtype=F64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fused = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    hessian_sketch_diagonal(model, normalized_softmax_cross_entropy, x, y, select_parameters(model))
    assert fused == [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_refuses_an_operation_whose_input_does_not_have_the_samples_first():
    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x).t()).t())

    model = Transposed().double()
    x, y = torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,))
    with pytest.raises(ExactMethodNotApplicable, match="'tanh'.*without the 6 samples along dim 0"):
        hessian_sketch_diagonal(model, F.cross_entropy, x, y, select_parameters(model))


def test_a_layer_with_the_samples_along_dim_1_takes_the_per_sample_path():
    """A Linear layer applied sequence-first ``(T, N, C)`` (``T`` not a multiple of ``N``), its nonlinear
    ops batch-first: per-sample backward passes, unbiased for the Hessian."""

    class SequenceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(3, 4), nn.Linear(4, 3)

        def forward(self, x):  # x (N, T=5, 3)
            h = self.a(x.transpose(0, 1)).transpose(0, 1)  # the layer sees (T, N, 3)
            return self.head(torch.tanh(h).mean(dim=1))

    torch.manual_seed(0)
    model = SequenceFirst().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 5, 3, generator=g, dtype=F64), torch.randint(0, 3, (4,), generator=g)
    _unbiased_on_the_path_it_takes(model, x, y)


def test_an_in_place_activation_module_runs_out_of_place_for_the_measurement():
    """``nn.SiLU(inplace=True)`` (torchvision's and timm's EfficientNets) is switched to out of place for
    the measurement (``twice_differentiable``) and back afterwards: unbiased for the Hessian."""
    from lightning_flatness.functional.estimators.method_choice import choose_method

    torch.manual_seed(0)
    act = nn.SiLU(inplace=True)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), act, nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 4, generator=g, dtype=F64), torch.randint(0, 3, (5,), generator=g)
    choice = choose_method(model, F.cross_entropy, x, y)
    assert (choice.method, choice.quantity) == ("hessian_sketch", "hessian"), choice.reason
    params = {k: v for k, v in select_parameters(model).items() if v.ndim >= 2}
    names = list(params)
    diag = brute_force_hessian(model, F.cross_entropy, x, y, names).diagonal()
    assert_unbiased(_estimates(model, F.cross_entropy, x, y, params, names, 40, num_sketches=4), diag)
    assert act.inplace is True


def test_an_in_place_call_in_forward_code_is_refused_and_auto_falls_back():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(F.silu(self.a(x), inplace=True))  # no module flag to switch

    model = InPlace().double()
    x, y = torch.randn(5, 4, dtype=F64), torch.randint(0, 3, (5,))
    with pytest.raises(ExactMethodNotApplicable, match=r"'silu' in .*\(in place\): no node rule"):
        hessian_sketch_diagonal(model, F.cross_entropy, x, y, select_parameters(model))
    from lightning_flatness.functional.estimators.method_choice import choose_method

    choice = choose_method(model, F.cross_entropy, x, y)
    assert (choice.method, choice.quantity) == ("gauss_newton", "gauss_newton")
    assert "(in place)" in choice.reason


def test_an_operation_whose_input_is_changed_in_place_later_is_refused():
    class Later(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            h = self.a(x) * 1.0
            z = torch.tanh(h)
            h.mul_(2.0)  # after tanh has used it
            return self.b(z + h)

    model = Later().double()
    x, y = torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,))
    with pytest.raises(ExactMethodNotApplicable, match="'tanh'.*changed in place later"):
        hessian_sketch_diagonal(model, F.cross_entropy, x, y, select_parameters(model))


def test_an_operation_whose_output_is_changed_in_place_later_is_measured():
    """``result += input`` after an activation (torchvision's EfficientNetV2 ``FusedMBConv``): the forward
    is run again with the op's output copied for the model, so its adjoint is the op's: unbiased."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            h = self.c(x)
            z = F.silu(self.a(h))
            z += h  # in place, on the activation's output
            return self.b(z)

    torch.manual_seed(0)
    model = Residual().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 4, generator=g, dtype=F64), torch.randint(0, 3, (5,), generator=g)
    params = {k: v for k, v in select_parameters(model).items() if v.ndim >= 2}
    names = list(params)
    diag = brute_force_hessian(model, F.cross_entropy, x, y, names).diagonal()
    assert_unbiased(_estimates(model, F.cross_entropy, x, y, params, names, 40, num_sketches=4), diag)


def test_per_sample_backward_path_is_unbiased_too():
    """A weight expanded to the batch and multiplied with the data (a copy per sample: no layer rule reads
    it; broadcast, the product is a layer, ``weight_stack_products``): per-sample backward passes, with the
    ops' columns masked to each sample and the loss's exact factors' per-sample signs."""

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 5)
            self.w = nn.Parameter(torch.randn(5, 4) / 2)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            copies = self.w.expand(x.shape[0], -1, -1)
            return self.head(torch.tanh((torch.tanh(self.a(x)).unsqueeze(2) * copies).sum(dim=1)))

    torch.manual_seed(0)
    model = Plain().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 3, generator=g, dtype=F64), torch.randint(0, 3, (5,), generator=g)
    params = {k: v for k, v in select_parameters(model).items() if v.ndim >= 2}
    names = list(params)
    diag = brute_force_hessian(model, F.cross_entropy, x, y, names).diagonal()
    with pytest.warns(UserWarning, match="per-layer contractions do not apply"):
        first = hessian_sketch_diagonal(model, F.cross_entropy, x, y, params, num_sketches=4)
    assert set(first) == set(names)
    assert_unbiased(_estimates(model, F.cross_entropy, x, y, params, names, 40, num_sketches=4), diag)


def test_num_sketches_reaches_the_estimator_from_the_front_door_and_measure_sharpness(hessian_sketch_calls):
    """(From the callback: ``tests/test_callback.py``.)"""
    from lightning_flatness.functional import hessian_diagonal
    from lightning_flatness.measure import measure_sharpness

    model, x, y, params, names, hessian = _problem(F.cross_entropy, n=8)
    hessian_diagonal(model, F.cross_entropy, x, y, method="hessian_sketch", num_sketches=3)
    measure_sharpness(model, [(x[:4], y[:4]), (x[4:], y[4:])], num_replicates=2, num_sketches=2)
    assert hessian_sketch_calls == [3, 2, 2]  # auto chose hessian_sketch (tanh, GELU, attention)
    with pytest.raises(ValueError, match="`num_sketches` must be a positive int"):
        hessian_diagonal(model, F.cross_entropy, x, y, method="hessian_sketch", num_sketches=0)


def test_a_tensor_multiplied_by_itself_gets_both_columns():
    """``h * h``: the product rule's two columns land on the same tensor and add up to ``2 G``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _Square(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g)
    params = {k: v for k, v in select_parameters(model).items() if v.ndim >= 2}
    names = list(params)
    diag = brute_force_hessian(model, F.cross_entropy, x, y, names).diagonal()
    ggn = brute_force_ggn(model, F.cross_entropy, x, y, names).diagonal()
    est = _estimates(model, F.cross_entropy, x, y, params, names, 4, num_sketches=2)
    # one unit per weight row and one op: every draw is exact (each entry's square of a Rademacher sign)
    torch.testing.assert_close(
        est.std(0), torch.zeros_like(diag), rtol=0, atol=1e-12 * float(diag.abs().max())
    )
    torch.testing.assert_close(est.mean(0), diag, rtol=1e-9, atol=1e-12)
    assert float((ggn - diag).abs().max()) > 0.1 * float(diag.abs().max())  # the product's own term matters


class _Square(nn.Module):
    def forward(self, h: Tensor) -> Tensor:
        return h * h


class _SliceAssembled(nn.Module):
    """Features assembled in place into slices of a fresh buffer, as multi-head latent attention assembles its
    keys (``buf[..., :d].copy_(k_nope)``; also ``buf[:, d:] = ...``), or (``in_place=False``) concatenated."""

    def __init__(self, in_place: bool = True) -> None:
        super().__init__()
        self.in_place = in_place
        self.a, self.b, self.head = nn.Linear(4, 3), nn.Linear(4, 2), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        if not self.in_place:
            return self.head(torch.cat([self.a(x), torch.tanh(self.b(x))], dim=-1))
        buf = x.new_empty(x.shape[0], 5)
        buf[:, :3].copy_(self.a(x))
        buf[:, 3:] = torch.tanh(self.b(x))
        return self.head(buf)


def test_features_written_into_slices_of_a_buffer_keep_the_per_layer_path():
    """The buffer's ``CopySlices`` is the in-place ops' own (marked seen), so the estimators keep the
    per-layer path (before, "an operation invisible to the checks" sent them to per-sample backward
    passes): the exact Gauss-Newton diagonal equals the float64 brute force of the concatenating twin, and
    the sketched Hessian its brute-force Hessian (exactly where no random column reaches, else unbiased)."""
    torch.manual_seed(0)
    model, twin = _SliceAssembled().double(), _SliceAssembled(in_place=False).double()
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    names = [n for n, _ in model.named_parameters()]
    loss = normalized_softmax_cross_entropy
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a per-sample fallback warns
        ggn = hessian_diagonal_groups(model, loss, x, y, method="gauss_newton").groups
        draws = [
            hessian_sketch_diagonal(
                model, loss, x, y, dict(model.named_parameters()), generator=torch.Generator().manual_seed(s)
            )
            for s in range(64)
        ]
    truth = brute_force_ggn(twin, loss, x, y, names).diagonal()
    torch.testing.assert_close(flat({n: g[0] for n, g in ggn.items()}, names), truth, rtol=1e-10, atol=1e-14)
    # (entries no random column reaches are exact: equal to the Hessian to 1e-9)
    hessian = brute_force_hessian(twin, loss, x, y, names).diagonal()
    assert_unbiased(torch.stack([flat(d, names) for d in draws]), hessian, spread_required=False)


class _ContinuousPositionBias(nn.Module):
    """Attention with Swin V2's continuous position bias: ``16 sigmoid(MLP(coords))``, an MLP on a constant
    grid (a function of its weights alone), added to the scores. Its hidden width equals the batch size, so
    that its (unselected) bias is as long as the batch, which is no per-sample data."""

    def __init__(self, dim: int = 4, tokens: int = 3, heads: int = 2, hidden: int = 6) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.cpb = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, heads, bias=False))
        self.register_buffer("coords", torch.randn(tokens * tokens, 2))
        self.head = nn.Linear(dim * tokens, 3)
        self.heads, self.tokens = heads, tokens

    def forward(self, x: Tensor) -> Tensor:  # x (N, T, dim)
        n, t, _ = x.shape
        bias = 16 * torch.sigmoid(self.cpb(self.coords)).view(t, t, self.heads).permute(2, 0, 1)

        def split(z: Tensor) -> Tensor:
            return z.view(n, t, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        attention = torch.softmax(q @ k.transpose(-1, -2) + bias.unsqueeze(0), dim=-1)
        return self.head((attention @ v).transpose(1, 2).reshape(n, -1))


def test_a_nonlinear_function_of_the_weights_alone_through_attention_is_unbiased():
    """Swin V2's position bias: the sigmoid of an MLP on a constant grid. ``auto`` measures the Hessian on
    the per-layer path, the estimate is unbiased for the brute-force Hessian diagonal, and the MLP's
    weights are far from their Gauss-Newton diagonal (the sigmoid's own curvature, taken exactly through
    the MLP: ``hessian_sketch._derived_elementwise_diagonals``)."""
    from lightning_flatness.functional.estimators.method_choice import choose_method

    torch.manual_seed(0)
    model = _ContinuousPositionBias().double().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 4, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g)
    assert choose_method(model, F.cross_entropy, x, y).method == "hessian_sketch"
    params, names, diag = _unbiased_on_the_path_it_takes(model, x, y, per_layer=True)
    ggn = brute_force_ggn(model, F.cross_entropy, x, y, names).diagonal()
    mlp = torch.cat(
        [torch.full((p.numel(),), k.startswith("cpb."), dtype=torch.bool) for k, p in params.items()]
    )
    assert float((ggn - diag)[mlp].norm() / diag[mlp].norm()) > 0.2


class _ClassBiasMLP(nn.Module):
    """Logits ``head(x) + 16 sigmoid(MLP(coords))``: a per-class bias computed by an MLP on a constant grid.
    Linear in each weight except through the sigmoid of a function of the weights alone."""

    def __init__(self, classes: int = 3, hidden: int = 6) -> None:
        super().__init__()
        self.head = nn.Linear(4, classes)
        self.cpb = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, 1, bias=False))
        self.register_buffer("coords", torch.randn(classes, 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x) + 16 * torch.sigmoid(self.cpb(self.coords)).view(1, -1)


@pytest.mark.parametrize("rowwise", [True, False], ids=["per-row-jacobians", "graph-backward-per-entry"])
def test_the_curvature_of_a_function_of_the_weights_alone_is_exact(rowwise, monkeypatch):
    """Where nothing but the loss and that sigmoid is curved, the sketch with the loss's exact factors is the
    Hessian diagonal itself (to rounding): the Gauss-Newton part exact, and the sigmoid's term taken exactly
    through the MLP, which is far from nothing here. Both ways of taking it: the MLP's per-row Jacobians
    (it is a module called on a constant grid), and one backward pass through the graph per entry."""
    from lightning_flatness.functional.estimators import hessian_sketch

    taken = []
    rows = hessian_sketch._rowwise_squared_jacobian
    monkeypatch.setattr(
        hessian_sketch,
        "_rowwise_squared_jacobian",
        lambda *a: taken.append(1) or rows(*a) if rowwise else None,
    )
    torch.manual_seed(0)
    model = _ClassBiasMLP().double().eval()
    with torch.no_grad():
        model.cpb[2].weight.mul_(15.0)  # the sigmoid's inputs near +-1.5, where its curvature is large
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=g, dtype=F64)
    y = torch.zeros(6, dtype=torch.long)  # one class: the mean loss's gradient at the bias is far from 0
    params = {k: v for k, v in select_parameters(model).items() if v.ndim >= 2}
    names = list(params)
    diag = brute_force_hessian(model, F.cross_entropy, x, y, names).diagonal()
    ggn = brute_force_ggn(model, F.cross_entropy, x, y, names).diagonal()
    mlp = torch.cat(
        [torch.full((p.numel(),), k.startswith("cpb."), dtype=torch.bool) for k, p in params.items()]
    )
    assert float((diag - ggn)[mlp].norm() / diag[mlp].norm()) > 0.3
    est = flat(hessian_sketch_diagonal(model, F.cross_entropy, x, y, params), names)
    torch.testing.assert_close(est, diag, rtol=1e-9, atol=1e-12)
    assert bool(taken) is rowwise


def test_torchvision_swin_v2_measures_the_hessian_unbiased():
    """torchvision's Swin V2 blocks at a tiny size, with padded windows: ``auto`` measures the Hessian (the
    position-bias MLP's sigmoid taken exactly, the padding's zero keys in ``F.normalize``'s linear region),
    and the estimates of the attention's and the position-bias MLP's weights are unbiased for the
    brute-force Hessian's traces."""
    from expectation import assert_unbiased_traces

    from lightning_flatness.functional.estimators.method_choice import choose_method
    from tests.zoo_models import tiny_swin_v2

    model, (x, y) = tiny_swin_v2(n=3, dtype=F64)
    assert choose_method(model, normalized_softmax_cross_entropy, x, y).method == "hessian_sketch"
    names = [f"features.1.0.attn.{w}" for w in ("qkv.weight", "cpb_mlp.0.weight", "cpb_mlp.2.weight")]
    names.append("features.3.0.attn.qkv.weight")
    assert_unbiased_traces(model, normalized_softmax_cross_entropy, x, y, names, seeds=8)
