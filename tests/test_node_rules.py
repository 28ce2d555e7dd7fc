"""Node rules of the sketched Hessian diagonal: the mean of ``c+ c+^T - c- c-^T`` over many draws equals
the Hessian of ``<g, op(inputs)>`` in the inputs, computed by ``torch.func.hessian`` (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_flatness.functional.estimators.node_rules import NODE_RULES, NodeCall

F64 = torch.float64
DRAWS = 4000


def _call(op, func, args, kwargs, inputs):
    out = func(*args, **kwargs)
    return NodeCall(op, "test", func, args, kwargs, list(inputs), out)


def _dense_hessian(func, args, kwargs, inputs, adjoint):
    sizes = [t.numel() for t in inputs]
    flat = torch.cat([t.detach().reshape(-1) for t in inputs])

    def scalar(vec):
        parts = [p.view(t.shape) for p, t in zip(torch.split(vec, sizes), inputs)]
        swap = {id(t): p for t, p in zip(inputs, parts)}
        new_args = tuple(swap.get(id(a), a) if isinstance(a, torch.Tensor) else a for a in args)
        return (func(*new_args, **kwargs) * adjoint).sum()

    return torch.func.hessian(scalar)(flat)


def _sampled(call, adjoint, draws=DRAWS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total, total_sq = 0.0, 0.0
    for _ in range(draws):
        plus, minus = NODE_RULES[call.op].columns(call, adjoint, gen)
        cp = torch.cat([p.reshape(-1) for p in plus])
        cm = torch.cat([m.reshape(-1) for m in minus])
        outer = torch.outer(cp, cp) - torch.outer(cm, cm)
        total = total + outer
        total_sq = total_sq + outer * outer
    mean = total / draws
    se = ((total_sq / draws - mean * mean).clamp_min(0) / draws).sqrt()
    return mean, se


def _check(call, adjoint):
    dense = _dense_hessian(call.func, call.args, call.kwargs, call.inputs, adjoint)
    mean, se = _sampled(call, adjoint)
    scale = float(dense.abs().max())
    assert scale > 0
    z = (mean - dense).abs() / (se + 1e-12 * scale)
    assert float(z.max()) < 6.0, float(z.max())
    assert float((mean - dense).abs().max()) < 0.1 * scale


def _leaf(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g, dtype=F64, requires_grad=True)
    return base * 1.0  # a non-leaf, as inside a network


@pytest.mark.parametrize(
    "op,func,kwargs",
    [
        ("gelu", F.gelu, {}),
        ("gelu", F.gelu, {"approximate": "tanh"}),
        ("tanh", torch.tanh, {}),
        ("silu", F.silu, {}),
        ("sigmoid", torch.sigmoid, {}),
        ("hardswish", F.hardswish, {}),
        ("softplus", F.softplus, {}),
        ("log_sigmoid", F.logsigmoid, {}),
    ],
)
def test_elementwise_rules(op, func, kwargs):
    a = _leaf(3, 4) * 2
    adjoint = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    _check(_call(op, func, (a,), kwargs, [a]), adjoint)


def test_pow_rule():
    a = _leaf(2, 3)
    adjoint = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    _check(_call("pow", torch.pow, (a, 3.0), {}, [a]), adjoint)


@pytest.mark.parametrize("shapes", [((2, 3), (2, 3)), ((2, 3, 4), (2, 3, 1)), ((4,), (2, 3, 4))])
def test_elementwise_product_rule(shapes):
    x, y = _leaf(*shapes[0], seed=0), _leaf(*shapes[1], seed=1)
    out_shape = torch.broadcast_shapes(x.shape, y.shape)
    adjoint = torch.randn(out_shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    _check(_call("mul", torch.mul, (x, y), {}, [x, y]), adjoint)


def test_matmul_rule():
    x, y = _leaf(2, 3, 4, seed=0), _leaf(2, 4, 3, seed=1)
    adjoint = torch.randn(2, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    _check(_call("matmul", torch.matmul, (x, y), {}, [x, y]), adjoint)


@pytest.mark.parametrize("op,func", [("softmax", torch.softmax), ("log_softmax", torch.log_softmax)])
def test_softmax_rules(op, func):
    a = _leaf(2, 5) * 1.5
    adjoint = torch.randn(2, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    _check(_call(op, func, (a, -1), {}, [a]), adjoint)


@pytest.mark.parametrize("dim,keepdim", [(-1, False), (1, True), ((1,), False)])
def test_logsumexp_rule(dim, keepdim):
    a = _leaf(2, 5, 3) * 1.5
    shape = torch.logsumexp(a, dim, keepdim=keepdim).shape
    adjoint = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    _check(_call("logsumexp", torch.logsumexp, (a, dim, keepdim), {}, [a]), adjoint)


@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm_rule(affine):
    a = _leaf(2, 3, 4) * 2 + 0.5
    weight = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(3)) if affine else None
    adjoint = torch.randn(2, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    _check(_call("layer_norm", F.layer_norm, (a, (3, 4), weight, None, 1e-3), {}, [a]), adjoint)


@pytest.mark.parametrize("affine", [False, True])
def test_group_norm_rule(affine):
    a = _leaf(2, 4, 3) * 2 + 0.5  # (N, C, L): 2 groups of 2 channels x 3 positions
    weight = torch.randn(4, dtype=F64, generator=torch.Generator().manual_seed(3)) if affine else None
    adjoint = torch.randn(2, 4, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    _check(_call("group_norm", F.group_norm, (a, 2, weight, None, 1e-3), {}, [a]), adjoint)


@pytest.mark.parametrize("affine,eps", [(False, 1e-3), (True, None)])
def test_rms_norm_rule(affine, eps):
    a = _leaf(2, 3, 4) * 2 + 0.5
    weight = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(3)) if affine else None
    adjoint = torch.randn(2, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    _check(_call("rms_norm", F.rms_norm, (a, (3, 4), weight, eps), {}, [a]), adjoint)


@pytest.mark.parametrize("dim", [1, -1])
def test_l2_normalize_rule(dim):
    a = _leaf(2, 3, 4) * 2 + 0.5
    adjoint = torch.randn(2, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    _check(_call("normalize", F.normalize, (a,), {"dim": dim}, [a]), adjoint)


def test_l2_normalize_rule_with_a_zero_slice():
    """A zero slice (the keys of a padded window in Swin V2, whose key bias is zero) is in the op's linear
    region: finite, zero columns there (not 0 / 0), and the others still match the dense Hessian."""
    a = _leaf(2, 3, 4) * 2 + 0.5
    mask = torch.ones(2, 3, 1, dtype=F64)
    mask[1, 2] = 0.0
    a = a * mask
    adjoint = torch.randn(2, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    call = _call("normalize", F.normalize, (a,), {"dim": -1}, [a])
    plus, minus = NODE_RULES["normalize"].columns(call, adjoint, torch.Generator().manual_seed(0))
    assert all(torch.isfinite(c[0]).all() for c in (plus, minus))
    assert float(plus[0][1, 2].abs().sum() + minus[0][1, 2].abs().sum()) == 0.0
    _check(call, adjoint)


@pytest.mark.parametrize(
    "op,func,args,kwargs",
    [
        ("linalg_vector_norm", torch.linalg.vector_norm, (2,), {"dim": (1, 2), "keepdim": True}),
        ("linalg_vector_norm", torch.linalg.vector_norm, (), {"dim": -1}),
        ("norm", torch.norm, (), {"p": 2, "dim": (1, 2), "keepdim": True}),
        ("norm", torch.norm, (), {"dim": 1}),  # the default "fro" over one dim: the 2-norm
    ],
)
def test_vector_norm_rule(op, func, args, kwargs):
    """ConvNeXt V2's global response normalization: the 2-norm of each sample's channel over positions."""
    a = _leaf(2, 3, 4) * 2 + 0.5
    out_shape = func(a, *args, **kwargs).shape
    adjoint = torch.randn(out_shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    _check(_call(op, func, (a, *args), kwargs, [a]), adjoint)


def test_vector_norm_rule_refuses_norms_it_does_not_cover():
    a = _leaf(2, 3, 4)
    refused = [
        ("linalg_vector_norm", torch.linalg.vector_norm, (a,), {}),  # over everything: across the samples
        ("linalg_vector_norm", torch.linalg.vector_norm, (a,), {"dim": (0, 1)}),
        ("linalg_vector_norm", torch.linalg.vector_norm, (a, 1), {"dim": 1}),  # the 1-norm
        ("norm", torch.norm, (a,), {"p": "nuc", "dim": (1, 2)}),
        ("linalg_vector_norm", torch.linalg.vector_norm, (a,), {"dim": 1, "dtype": F64}),
    ]
    for op, func, args, kwargs in refused:
        assert not NODE_RULES[op].accepts(_call(op, func, args, kwargs, [a])), (op, args[1:], kwargs)


@pytest.mark.parametrize(
    "shapes, x_varies",
    [(((2, 3), (2, 3)), True), (((2, 3, 4), (2, 3, 1)), True), (((2, 3), (2, 3)), False)],
    ids=["same_shape", "broadcast_denominator", "constant_numerator"],
)
def test_division_rule(shapes, x_varies):
    """``x / y`` with a weight-dependent denominator (EfficientViT's linear-attention normalization)."""
    x = _leaf(*shapes[0], seed=0) if x_varies else torch.randn(*shapes[0], dtype=F64)
    y = _leaf(*shapes[1], seed=1).abs() + 0.5
    out_shape = torch.broadcast_shapes(x.shape, y.shape)
    adjoint = torch.randn(out_shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    inputs = [x, y] if x_varies else [y]
    _check(_call("div", torch.div, (x, y), {}, inputs), adjoint)


def test_reversed_division_rule():
    y = _leaf(2, 3, seed=1).abs() + 0.5
    adjoint = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    _check(_call("rdiv", torch.Tensor.__rtruediv__, (y, 3.0), {}, [y]), adjoint)


@pytest.mark.parametrize(
    "equation, shapes",
    [
        ("bhid,bhjd->bhij", ((2, 2, 3, 4), (2, 2, 5, 4))),  # attention scores
        ("bhij,bhjd->bhid", ((2, 2, 3, 5), (2, 2, 5, 4))),  # attention-weighted values
        ("ik,kj->ij", ((3, 4), (4, 2))),
    ],
)
def test_einsum_rule(equation, shapes):
    x, y = _leaf(*shapes[0], seed=0), _leaf(*shapes[1], seed=1)
    out_shape = torch.einsum(equation, x, y).shape
    adjoint = torch.randn(out_shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    call = _call("einsum", lambda eq, a, b: torch.einsum(eq, a, b), (equation, x, y), {}, [x, y])
    _check(call, adjoint)


def test_einsum_rule_refuses_patterns_it_does_not_cover():
    x, y = _leaf(3, 3, seed=0), _leaf(3, 4, seed=1)
    for equation in ("ii,ij->j", "...k,kj->...j", "ik,kj"):
        call = _call("einsum", torch.einsum, (equation, x, y), {}, [x, y])
        assert not NODE_RULES["einsum"].accepts(call), equation


def test_baddbmm_rule():
    """``beta C + alpha X @ Y`` (BLOOM's attention scores with the ALiBi bias): matmul's rule, scaled by
    ``alpha``; the bias ``C`` enters linearly."""
    x, y = _leaf(3, 2, 4, seed=0), _leaf(3, 4, 5, seed=1)
    c = torch.randn(3, 2, 5, dtype=F64, generator=torch.Generator().manual_seed(3))
    adjoint = torch.randn(3, 2, 5, dtype=F64, generator=torch.Generator().manual_seed(2))
    call = _call("baddbmm", torch.baddbmm, (c, x, y), {"beta": 1.3, "alpha": 0.7}, [x, y])
    assert NODE_RULES["baddbmm"].accepts(call)
    _check(call, adjoint)


def test_baddbmm_rule_reads_keyword_operands_and_refuses_a_weight_dependent_bias():
    x, y = _leaf(3, 2, 4, seed=0), _leaf(3, 4, 5, seed=1)
    c = _leaf(3, 2, 5, seed=2)
    method_form = _call(
        "baddbmm", torch.Tensor.baddbmm, (c.detach(),), {"batch1": x, "batch2": y, "alpha": 0.5}, [x, y]
    )
    assert NODE_RULES["baddbmm"].accepts(method_form)
    plus, minus = NODE_RULES["baddbmm"].columns(method_form, torch.ones(3, 2, 5, dtype=F64), None)
    assert [p.shape for p in plus] == [x.shape, y.shape] and torch.equal(minus[1], -plus[1])
    assert not NODE_RULES["baddbmm"].accepts(_call("baddbmm", torch.baddbmm, (c, x, y), {}, [c, x, y]))


@pytest.mark.parametrize(
    "upper, unit, b_varies, shapes",
    [
        (False, True, True, ((2, 4, 4), (2, 4, 3))),  # the gated delta rule's UT transform
        (True, False, True, ((3, 3), (3, 2))),
        (False, False, False, ((2, 3, 3), (2, 3, 2))),
        (False, True, True, ((1, 3, 3), (2, 3, 2))),  # a system broadcast over the batch
    ],
    ids=["lower-unit", "upper", "constant-rhs", "broadcast-system"],
)
def test_triangular_solve_rule(upper, unit, b_varies, shapes):
    """``A^{-1} B`` with a weight-dependent system: only the triangle the solve reads has curvature."""
    a = _leaf(*shapes[0], seed=0) * 0.4 + 2.0 * torch.eye(shapes[0][-1], dtype=F64)
    b = _leaf(*shapes[1], seed=1) if b_varies else torch.randn(*shapes[1], dtype=F64)
    kwargs = {"upper": upper, "unitriangular": unit}
    out_shape = torch.linalg.solve_triangular(a, b, **kwargs).shape
    adjoint = torch.randn(out_shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    inputs = [a, b] if b_varies else [a]
    call = _call("linalg_solve_triangular", torch.linalg.solve_triangular, (a, b), kwargs, inputs)
    assert NODE_RULES["linalg_solve_triangular"].accepts(call)
    _check(call, adjoint)


def test_triangular_solve_rule_refuses_what_it_does_not_cover():
    a, b = _leaf(3, 3, seed=0) + 2.0 * torch.eye(3, dtype=F64), _leaf(2, 3, seed=1)
    right = _call(
        "linalg_solve_triangular",
        torch.linalg.solve_triangular,
        (a, b),
        {"upper": False, "left": False},
        [a, b],
    )
    assert not NODE_RULES["linalg_solve_triangular"].accepts(right)
    rule = NODE_RULES["linalg_solve_triangular"]
    b3 = _leaf(3, 2, seed=1)
    linear = _call(
        "linalg_solve_triangular", torch.linalg.solve_triangular, (a.detach(), b3), {"upper": True}, [b3]
    )
    assert rule.accepts(linear) and rule.columns(linear, torch.ones(3, 2, dtype=F64), None) == (
        [None],
        [None],
    )


def test_log_sigmoid_is_recorded_under_its_rule():
    """``F.logsigmoid`` reaches torch function modes as ``log_sigmoid`` (a router's log-probabilities): a
    network using it takes the sketched Hessian, whose node rule for it is the elementwise one."""
    from lightning_flatness.functional.estimators.method_choice import choose_method

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LogSigmoid(), torch.nn.Linear(4, 3)).double()
    x, y = torch.randn(4, 3, dtype=F64), torch.tensor([0, 1, 2, 1])
    assert "log_sigmoid" in NODE_RULES
    assert choose_method(model, F.cross_entropy, x, y).method == "hessian_sketch"
