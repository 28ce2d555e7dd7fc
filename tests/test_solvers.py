"""The eq. 17 solver, eq. 13 and eq. 5 against independent computations (scipy, closed forms).

The independent reference for eq. 17 minimises the log-variance objective with scipy's L-BFGS-B
(analytic gradient, tight tolerances) on every strongly connected component of the arc graph,
found with scipy.sparse.csgraph (a different algorithm from the library's boolean closure). Cases
whose infimum is not attained are also checked against closed forms and against L-BFGS on the
unreduced problem, which can only approach the infimum from above.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import minimize, minimize_scalar
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from lightning_flatness.functional.solvers import (
    hessian_trace,
    matrix_normalized_sharpness,
    normalized_sharpness,
    normalized_sharpness_coefficients,
    solve_normalized_sharpness,
)

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # the solver must certify every case

F64 = torch.float64


def lbfgs_minimum(w: np.ndarray, h: np.ndarray, lam: float = 0.5, maxiter: int = 200_000) -> float:
    """min over (x, y) of sum_ijk max(h,0) e^{x_i+y_j} + W^2/(2 lam) e^{-x_i-y_j}, from the raw tensors."""
    m, n = w.shape[:2]
    extra = (1,) * (w.ndim - 2)
    a = np.maximum(h, 0.0)
    b = w**2 / (2 * lam)

    def f(z):
        u = (z[:m, None] + z[None, m:]).reshape((m, n) + extra)
        ta, tb = a * np.exp(u), b * np.exp(-u)
        d = (ta - tb).reshape(m, n, -1).sum(axis=2)
        return ta.sum() + tb.sum(), np.concatenate([d.sum(axis=1), d.sum(axis=0)])

    options = dict(maxiter=maxiter, maxcor=30, ftol=1e-16, gtol=1e-14)
    res = minimize(f, np.zeros(m + n), jac=True, method="L-BFGS-B", options=options)
    # restart once from the result: L-BFGS-B's stopping rule can trigger early on flat objectives
    res = minimize(f, res.x, jac=True, method="L-BFGS-B", options=options)
    return float(res.fun)


def reference_infimum(a: np.ndarray, b: np.ndarray) -> float:
    """Infimum of eq. 17 from (m, n) coefficients: L-BFGS on each strongly connected component."""
    m, n = a.shape
    adj = np.zeros((m + n, m + n))
    adj[:m, m:] = a > 0  # row i -> column j
    adj[m:, :m] = (b > 0).T  # column j -> row i
    ncomp, labels = connected_components(csr_matrix(adj), directed=True, connection="strong")
    total = 0.0
    for k in range(ncomp):
        r, c = labels[:m] == k, labels[m:] == k
        if r.any() and c.any():
            total += lbfgs_minimum(np.sqrt(b[np.ix_(r, c)]), a[np.ix_(r, c)])
    return total


def coefficients_np(w: torch.Tensor, h: torch.Tensor, lam: float = 0.5):
    m, n = w.shape[:2]
    a = h.clamp_min(0).reshape(m, n, -1).sum(-1).numpy()
    b = (w**2 / (2 * lam)).reshape(m, n, -1).sum(-1).numpy()
    return a, b


def from_coefficients(a, b):
    """(W, h) whose eq. 17 coefficients at lam = 0.5 are exactly (A, B)."""
    a, b = torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64)
    return b.sqrt(), a


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rel(a, b):
    return abs(float(a) - float(b)) / abs(float(b))


# ----------------------------------------------------------------------------------------------
# agreement with the independent optimiser


@pytest.mark.parametrize("shape, seed", [((7, 5), 0), ((20, 30), 1), ((31, 12), 2), ((1, 9), 3), ((9, 1), 4)])
def test_matches_lbfgs_on_random_matrices(shape, seed):
    g = gen(seed)
    w = torch.randn(shape, generator=g, dtype=F64)
    h = torch.rand(shape, generator=g, dtype=F64)
    ref = lbfgs_minimum(w.numpy(), h.numpy())
    assert rel(normalized_sharpness(w, h), ref) <= 1e-9


@pytest.mark.parametrize("seed, spread", [(0, 1.0), (1, 3.0), (2, 6.0)])
def test_matches_lbfgs_on_heavy_tailed_matrices(seed, spread):
    # Cauchy weights and log-normal curvature spanning many orders of magnitude, ~30% clipped
    g = gen(seed)
    w = torch.tan(math.pi * (torch.rand(15, 22, generator=g, dtype=F64) - 0.5))
    h = torch.exp(spread * torch.randn(15, 22, generator=g, dtype=F64))
    h = h * torch.sign(torch.randn(15, 22, generator=g, dtype=F64) + 0.5)
    ref = reference_infimum(*coefficients_np(w, h))
    assert rel(normalized_sharpness(w, h), ref) <= 1e-9


@pytest.mark.parametrize("shape, lam", [((6, 4, 3, 3), 0.5), ((5, 3, 1, 1), 1.0), ((4, 3, 2, 5, 2), 0.1)])
def test_matches_lbfgs_on_conv_shapes_with_kernel_dims_sharing_a_variance(shape, lam):
    g = gen(sum(shape))
    w = torch.randn(shape, generator=g, dtype=F64)
    h = torch.randn(shape, generator=g, dtype=F64) + 0.3  # negative entries are clipped by the solver
    ref = lbfgs_minimum(w.numpy(), h.numpy(), lam=lam)  # objective over the full kernel, not pre-summed
    assert rel(normalized_sharpness(w, h, lam=lam), ref) <= 1e-9


def _degenerate_case(kind: str, g):
    w = torch.randn(12, 16, generator=g, dtype=F64)
    h = torch.rand(12, 16, generator=g, dtype=F64) + 0.05
    if kind == "zero_rows_h":  # dead ReLU units: no curvature
        h[[2, 7]] = 0.0
    elif kind == "zero_cols_h":
        h[:, [0, 5, 6]] = 0.0
    elif kind == "zero_rows_w":  # pruned output channels
        w[[1, 11]] = 0.0
    elif kind == "zero_cols_w":
        w[:, [3, 15]] = 0.0
    elif kind == "mixed_dead":
        h[[2, 7]] = 0.0
        w[:, [3, 15]] = 0.0
        w[4] = 0.0
        h[:, 9] = -1.0
    elif kind == "isolated_zeros_h":  # clipped negative curvature inside normal rows and columns
        h[torch.rand(12, 16, generator=g) < 0.4] *= -1
    elif kind == "isolated_zeros_w":  # unstructured pruning
        w[torch.rand(12, 16, generator=g) < 0.5] = 0.0
    elif kind == "sparse_both":  # both kinds of isolated zeros: several components
        h[torch.rand(12, 16, generator=g) < 0.6] = 0.0
        w[torch.rand(12, 16, generator=g) < 0.6] = 0.0
    elif kind == "rank_one_patterns":
        h = torch.outer(torch.rand(12, generator=g, dtype=F64), torch.rand(16, generator=g, dtype=F64))
        h[:, :4] = 0.0
        w = torch.outer(torch.randn(12, generator=g, dtype=F64), torch.randn(16, generator=g, dtype=F64))
    return w, h


@pytest.mark.parametrize(
    "kind",
    [
        "zero_rows_h",
        "zero_cols_h",
        "zero_rows_w",
        "zero_cols_w",
        "mixed_dead",
        "isolated_zeros_h",
        "isolated_zeros_w",
        "sparse_both",
        "rank_one_patterns",
    ],
)
def test_matches_reference_on_degenerate_matrices(kind):
    w, h = _degenerate_case(kind, gen(hash(kind) % 1000))
    ref = reference_infimum(*coefficients_np(w, h))
    value = normalized_sharpness(w, h)
    assert torch.isfinite(value)
    assert rel(value, ref) <= 1e-9


@pytest.mark.parametrize("seed", range(25))
def test_matches_reference_on_random_sparsity_patterns(seed):
    # small matrices with random zero patterns in A and B: every graph structure (several
    # components, unattained infima, value 0) occurs; L-BFGS on the unreduced problem can only
    # come down to the infimum from above
    g = gen(1000 + seed)
    m, n = (int(v) for v in torch.randint(1, 7, (2,), generator=g))
    pa, pb = 0.7 * torch.rand(2, generator=g)
    a = torch.rand(m, n, generator=g, dtype=F64) * (torch.rand(m, n, generator=g) > pa)
    b = torch.rand(m, n, generator=g, dtype=F64) * (torch.rand(m, n, generator=g) > pb)
    value = float(normalized_sharpness(*from_coefficients(a, b)))
    ref = reference_infimum(a.numpy(), b.numpy())
    assert value == pytest.approx(ref, rel=1e-9, abs=1e-300)
    assert value <= lbfgs_minimum(b.sqrt().numpy(), a.numpy(), maxiter=100) * (1 + 1e-12)


# ----------------------------------------------------------------------------------------------
# unattained infima with known values


def test_one_by_two_with_a_curvature_free_column_reduces_to_the_other_entry():
    # S = a e^{x+y1} + b1 e^{-x-y1} + b2 e^{-x-y2}: y2 -> inf removes the last term
    a, b1, b2 = 2.0, 3.0, 7.0
    sol = solve_normalized_sharpness(*from_coefficients([[a, 0.0]], [[b1, b2]]))
    assert rel(sol.value, 2 * math.sqrt(a * b1)) <= 1e-12
    assert not sol.attained


def test_two_by_two_triangular_pattern_splits_into_two_diagonal_entries():
    # A[0, 1] = 0 and B[1, 0] = 0: the cross terms can both be driven to 0
    a = [[1.0, 0.0], [3.0, 4.0]]
    b = [[2.0, 5.0], [0.0, 6.0]]
    sol = solve_normalized_sharpness(*from_coefficients(a, b))
    assert rel(sol.value, 2 * math.sqrt(2.0) + 2 * math.sqrt(24.0)) <= 1e-12
    assert sol.num_components == 2 and not sol.attained


def test_block_triangular_pattern_equals_sum_of_diagonal_blocks():
    # three diagonal blocks; above them only W (B), below them only curvature (A); rows and
    # columns shuffled so the structure is hidden
    g = gen(7)
    sizes = [(3, 4), (5, 2), (4, 6)]
    m, n = sum(s[0] for s in sizes), sum(s[1] for s in sizes)
    a, b = np.zeros((m, n)), np.zeros((m, n))
    r0 = np.cumsum([0] + [s[0] for s in sizes])
    c0 = np.cumsum([0] + [s[1] for s in sizes])
    expected = 0.0
    for k, (p, q) in enumerate(sizes):
        ak = torch.rand(p, q, generator=g, dtype=F64).numpy() + 0.1
        bk = torch.rand(p, q, generator=g, dtype=F64).numpy() + 0.1
        a[r0[k] : r0[k + 1], c0[k] : c0[k + 1]] = ak
        b[r0[k] : r0[k + 1], c0[k] : c0[k + 1]] = bk
        expected += lbfgs_minimum(np.sqrt(bk), ak)
        for j in range(len(sizes)):
            block = 10 * torch.rand(p, sizes[j][1], generator=g, dtype=F64).numpy()
            if j > k:
                b[r0[k] : r0[k + 1], c0[j] : c0[j + 1]] = block
            elif j < k:
                a[r0[k] : r0[k + 1], c0[j] : c0[j + 1]] = block
    pr, pc = torch.randperm(m, generator=g).numpy(), torch.randperm(n, generator=g).numpy()
    a, b = a[pr][:, pc], b[pr][:, pc]
    sol = solve_normalized_sharpness(*from_coefficients(a, b))
    assert rel(sol.value, expected) <= 1e-9
    assert sol.num_components == 3 and not sol.attained
    assert float(sol.value) <= lbfgs_minimum(np.sqrt(b), a, maxiter=100) * (1 + 1e-12)


def test_weak_coupling_between_blocks_converges_to_the_split_value():
    # the 2x2 triangular pattern with a tiny coupling eps: attained, but at |x| ~ log(1/eps);
    # the value lies between the split value (eps = 0) and it plus O(sqrt(eps))
    split = 2 * math.sqrt(2.0) + 2 * math.sqrt(24.0)
    for eps in (1e-6, 1e-16, 1e-40):
        a = [[1.0, eps], [3.0, 4.0]]
        sol = solve_normalized_sharpness(*from_coefficients(a, [[2.0, 5.0], [0.0, 6.0]]))
        assert sol.attained and sol.num_components == 1
        assert split * (1 - 1e-12) <= float(sol.value) <= split + 10 * math.sqrt(eps) + 1e-9 * split


# ----------------------------------------------------------------------------------------------
# closed forms and bounds


@pytest.mark.parametrize(
    "w, h, lam", [(3.0, 2.0, 0.5), (-0.01, 1e4, 2.0), (1e3, 1e-9, 0.1), (2.0, -1.0, 0.5)]
)
def test_one_by_one_closed_form(w, h, lam):
    value = normalized_sharpness(torch.tensor([[w]], dtype=F64), torch.tensor([[h]], dtype=F64), lam=lam)
    assert float(value) == pytest.approx(2 * abs(w) * math.sqrt(max(h, 0.0) / (2 * lam)), rel=1e-14, abs=0)


def test_separable_variance_ratio_attains_the_per_parameter_optimum():
    # if B_ij / A_ij = u_i v_j, the per-entry optimal variances sqrt(B/A) are row x column, so
    # eq. 17 equals sum_ij 2 sqrt(A_ij B_ij)
    g = gen(3)
    a = torch.rand(25, 18, generator=g, dtype=F64) + 0.01
    u, v = torch.rand(25, generator=g, dtype=F64) * 9 + 0.1, torch.rand(18, generator=g, dtype=F64) + 1
    b = a * torch.outer(u, v)
    value = normalized_sharpness(*from_coefficients(a, b))
    assert rel(value, (2 * (a * b).sqrt()).sum()) <= 1e-12


def test_lies_between_per_parameter_and_single_variance_values():
    g = gen(11)
    for lam in (0.5, 2.0):
        w = torch.randn(10, 8, 3, 3, generator=g, dtype=F64)
        h = torch.randn(10, 8, 3, 3, generator=g, dtype=F64) + 0.5
        a, b = normalized_sharpness_coefficients(w, h, lam)
        per_parameter = (2 * (h.clamp_min(0) * w**2 / (2 * lam)).sqrt()).sum()
        value = normalized_sharpness(w, h, lam=lam)
        single = math.sqrt(2 / lam) * matrix_normalized_sharpness(w, h)  # eq. 12
        assert per_parameter <= value <= single
        assert (2 * (a * b).sqrt()).sum() <= value  # per (channel pair) optimum: also a lower bound


def test_value_scales_as_inverse_square_root_of_lambda():
    g = gen(5)
    w, h = torch.randn(9, 7, 3, 3, generator=g, dtype=F64), torch.rand(9, 7, 3, 3, generator=g, dtype=F64)
    base = normalized_sharpness(w, h, lam=0.5) * math.sqrt(0.5)
    for lam in (1e-3, 0.1, 1.0, 50.0):
        assert rel(normalized_sharpness(w, h, lam=lam) * math.sqrt(lam), base) <= 1e-11


def test_invariant_to_row_and_column_rescaling():
    # Sec. 5.1: W[i] *= alpha_i, h[i] /= alpha_i^2 (and columns) leaves eq. 17 unchanged,
    # while the trace changes
    g = gen(9)
    w = torch.randn(16, 12, 3, 3, generator=g, dtype=F64)
    h = torch.randn(16, 12, 3, 3, generator=g, dtype=F64) + 0.4
    alpha = torch.exp(3 * torch.randn(16, 1, 1, 1, generator=g, dtype=F64))
    beta = torch.exp(3 * torch.randn(1, 12, 1, 1, generator=g, dtype=F64))
    w2, h2 = w * alpha * beta, h / (alpha * beta) ** 2
    assert rel(normalized_sharpness(w2, h2), normalized_sharpness(w, h)) <= 1e-10
    assert rel(hessian_trace(h2), hessian_trace(h)) > 1e-2


def test_transposing_the_weight_gives_the_same_value():
    g = gen(2)
    w, h = torch.randn(13, 40, generator=g, dtype=F64), torch.randn(13, 40, generator=g, dtype=F64)
    assert rel(normalized_sharpness(w.T, h.T), normalized_sharpness(w, h)) <= 1e-12


def test_value_is_monotone_in_curvature_and_weights():
    g = gen(4)
    w, h = torch.randn(8, 9, generator=g, dtype=F64), torch.randn(8, 9, generator=g, dtype=F64)
    base = normalized_sharpness(w, h)
    assert normalized_sharpness(w, h + torch.rand(8, 9, generator=g, dtype=F64)) >= base
    assert normalized_sharpness(1.1 * w, h) >= base


# ----------------------------------------------------------------------------------------------
# the certificate and the returned variances


def test_certified_gap_and_returned_log_variances_reproduce_the_value():
    g = gen(6)
    w = torch.randn(30, 20, 3, 3, generator=g, dtype=F64)
    h = torch.exp(2 * torch.randn(30, 20, 3, 3, generator=g, dtype=F64))
    sol = solve_normalized_sharpness(w, h, lam=0.7, rtol=1e-12)
    assert sol.attained and sol.num_components == 1
    assert sol.lower_bound <= sol.value <= sol.lower_bound * (1 + 1e-12)
    var = torch.exp(sol.row_log_variance[:, None] + sol.col_log_variance[None, :])[..., None, None]
    direct = (h * var + w**2 / (2 * 0.7 * var)).sum()  # eq. 17 at the returned sigma, sigma'
    assert rel(direct, sol.value) <= 1e-12
    grad_rows = (h * var - w**2 / (2 * 0.7 * var)).sum(dim=(1, 2, 3))
    assert grad_rows.abs().max() <= 1e-6 * sol.value  # stationary


def test_rows_outside_every_component_get_nan_variances():
    w = torch.ones(3, 4, dtype=F64)
    h = torch.ones(3, 4, dtype=F64)
    h[1] = 0.0  # dead unit: its variance runs to infinity
    sol = solve_normalized_sharpness(w, h)
    assert torch.isnan(sol.row_log_variance[1]) and torch.isfinite(sol.row_log_variance[[0, 2]]).all()
    assert not sol.attained


# ----------------------------------------------------------------------------------------------
# dtypes, zeros and errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_result_has_the_input_dtype(dtype):
    g = gen(1)
    w, h = torch.randn(6, 5, 3, generator=g).to(dtype), torch.rand(6, 5, 3, generator=g).to(dtype)
    for fn in (
        lambda: normalized_sharpness(w, h),
        lambda: matrix_normalized_sharpness(w, h),
        lambda: hessian_trace(h),
    ):
        out = fn()
        assert out.dtype == dtype and out.shape == ()


def test_float32_inputs_are_solved_in_float64():
    g = gen(8)
    w, h = torch.randn(20, 10, generator=g), torch.rand(20, 10, generator=g)
    assert rel(normalized_sharpness(w, h), normalized_sharpness(w.double(), h.double()).float()) <= 1e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_zero_inputs_give_zero_without_nan(dtype):
    w, h = torch.randn(5, 4, 3, 3, dtype=dtype), torch.randn(5, 4, 3, 3, dtype=dtype)
    zw, zh = torch.zeros_like(w), torch.zeros_like(h)
    for args in ((w, zh), (zw, h), (zw, zh), (w, -h.abs())):
        value = normalized_sharpness(*args)
        assert value.item() == 0.0
    assert matrix_normalized_sharpness(w, torch.zeros_like(h)).item() == 0.0
    assert normalized_sharpness(torch.zeros(0, 3, dtype=dtype), torch.zeros(0, 3, dtype=dtype)).item() == 0.0


def test_extreme_scales_do_not_overflow():
    g = gen(12)
    w = torch.randn(10, 7, generator=g, dtype=F64) * 1e150
    h = torch.rand(10, 7, generator=g, dtype=F64) * 1e-250
    value = normalized_sharpness(w, h)
    ref = normalized_sharpness(w * 1e-150, h * 1e250) * 1e150 * 1e-125  # scales as |W| sqrt(h)
    assert rel(value, ref) <= 1e-12


def test_invalid_inputs_raise_with_the_fix():
    w = torch.randn(3, 4)
    with pytest.raises(ValueError, match="ndim >= 2"):
        normalized_sharpness(torch.randn(4), torch.rand(4))
    with pytest.raises(ValueError, match="shape"):
        normalized_sharpness(w, torch.rand(4, 3))
    with pytest.raises(ValueError, match="lam"):
        normalized_sharpness(w, torch.rand(3, 4), lam=0.0)
    with pytest.raises(ValueError, match="non-finite"):
        normalized_sharpness(w, torch.full((3, 4), float("nan")))


def test_gradients_are_not_tracked():
    w = torch.randn(4, 3, requires_grad=True)
    assert not normalized_sharpness(w, torch.rand(4, 3)).requires_grad


# ----------------------------------------------------------------------------------------------
# eq. 13 and eq. 5


def test_matrix_normalized_sharpness_is_eq13_with_clipping():
    g = gen(13)
    w, h = torch.randn(7, 6, 3, 3, generator=g, dtype=F64), torch.randn(7, 6, 3, 3, generator=g, dtype=F64)
    expected = math.sqrt(float((w.numpy() ** 2).sum()) * float(np.maximum(h.numpy(), 0).sum()))
    assert rel(matrix_normalized_sharpness(w, h), expected) <= 1e-14


def test_single_variance_optimum_of_eq10_is_sqrt_2_over_lambda_times_eq13():
    g = gen(14)
    w, h = torch.randn(7, 6, generator=g, dtype=F64), torch.rand(7, 6, generator=g, dtype=F64)
    lam = 0.3
    hsum, wsq = float(h.sum()), float((w**2).sum())
    res = minimize_scalar(
        lambda t: hsum * math.exp(t) + wsq / (2 * lam) * math.exp(-t), bracket=(-5, 5), tol=1e-12
    )
    assert rel(math.sqrt(2 / lam) * matrix_normalized_sharpness(w, h), res.fun) <= 1e-10


def test_hessian_trace_is_the_unclipped_sum():
    h = torch.tensor([[1.0, -0.5], [2.0, 0.0]], dtype=F64)
    assert hessian_trace(h).item() == 2.5
    assert hessian_trace(torch.randn(5, 3, dtype=F64) * 0 - 1).item() == -15.0


def test_no_warnings_on_wrn_like_layer():
    # a realistic large conv layer: He-init weights, log-normal curvature with clipped entries
    g = gen(15)
    w = torch.randn(128, 64, 3, 3, generator=g, dtype=F64) * math.sqrt(2 / (64 * 9))
    h = 1e-3 * torch.exp(1.5 * torch.randn(128, 64, 3, 3, generator=g, dtype=F64))
    h[torch.rand(h.shape, generator=g) < 0.3] *= -1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = solve_normalized_sharpness(w, h)
    assert sol.value - sol.lower_bound <= 1e-11 * sol.lower_bound


@pytest.mark.parametrize("warm_start", [False, True])
def test_batch_solves_cold_by_default_or_warm_on_request_with_the_same_certified_values(warm_start):
    """``solve_normalized_sharpness_batch``: every problem certified to ``rtol`` against its own single
    solve, whether the replicates start cold (the default) or from problem 0's optimum."""
    from lightning_flatness.functional.solvers import solve_normalized_sharpness_batch

    g = torch.Generator().manual_seed(4)
    w = torch.randn(7, 5, 3, generator=g, dtype=torch.float64)
    h = torch.exp(torch.randn(7, 5, 3, generator=g, dtype=torch.float64)) - 0.3  # some clipped
    diagonals = torch.stack(
        [h, *(h * (1 + 0.4 * torch.rand(7, 5, 3, generator=g, dtype=torch.float64)) for _ in range(3))]
    )
    sols = solve_normalized_sharpness_batch(w, diagonals, warm_start=warm_start)
    for p, sol in enumerate(sols):
        single = solve_normalized_sharpness(w, diagonals[p])
        assert float(sol.value) == pytest.approx(float(single.value), rel=3e-11)
        assert float(sol.lower_bound) <= float(sol.value) <= float(sol.lower_bound) * (1 + 1e-11)
