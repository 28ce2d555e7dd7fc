"""Large weights: ``tensor_measures`` streams the replicate means (two passes over the slot sums, one
problem solved at a time) instead of holding ``P`` coefficient matrices. Checked against the in-memory
path on the same slot sums in every branch (first order covered, units that die or come alive in a
replicate, the tensor-level fallback to solved replicates, ``jackknife="solved"``, zero weights, few
slots, convolution kernels, many chunks), and against independently solved means."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_flatness.functional import replicate_curvature as curvature_module
from lightning_flatness.functional import replicate_measures
from lightning_flatness.functional.replicate_curvature import curvature_chunks, formed_curvature
from lightning_flatness.functional.replicate_measures import (
    replicate_curvature,
    replicate_weights,
    tensor_measures,
)
from lightning_flatness.functional.solvers import solve_normalized_sharpness_coefficients

F64 = torch.float64


def _slot_sums(shape, seed: int, noise: float = 0.3, num_slots: int = 8, per_slot: float = 8.0):
    """Heavy-tailed curvature (log-normal sigma 1.5 with row effects) in ``num_slots`` noisy slots."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=F64)
    bshape = (shape[0],) + (1,) * (len(shape) - 1)
    h = torch.exp(
        torch.randn(bshape, generator=g, dtype=F64) + 1.5 * torch.randn(shape, generator=g, dtype=F64)
    )
    groups = h[None] * (1 + noise * torch.randn((num_slots, *shape), generator=g, dtype=F64))
    counts = torch.full((num_slots,), per_slot, dtype=F64)
    return w, (groups * per_slot).reshape(num_slots, -1), counts


def _both(monkeypatch, w, sums, counts, jackknife="linearized", used=None):
    """``tensor_measures`` in memory and streamed, on the same inputs."""
    mix = replicate_weights(counts, list(range(counts.numel())) if used is None else used)
    monkeypatch.setattr(replicate_measures, "STREAM_FROM", math.inf)
    held = tensor_measures(w, sums, mix, 0.5, jackknife)
    monkeypatch.setattr(replicate_measures, "STREAM_FROM", 0)
    streamed = tensor_measures(w, sums, mix, 0.5, jackknife)
    return held, streamed


def _assert_same(held, streamed, first_order_rtol=1e-8):
    """Pooled and halves certified (1e-10); first-order leave-one-out values at the pooled minimiser,
    which each path certifies on its own (``first_order_rtol``); the closed forms to rounding."""
    for key in ("matrix_normalized", "hessian_trace"):
        torch.testing.assert_close(streamed[key], held[key], rtol=1e-13, atol=0)
    got, want = streamed["normalized"], held["normalized"]
    torch.testing.assert_close(got[[0, -2, -1]], want[[0, -2, -1]], rtol=1e-10, atol=0)
    torch.testing.assert_close(got[1:-2], want[1:-2], rtol=first_order_rtol, atol=0)


def _solved_means(w, sums, counts):
    """Every mean solved cold and certified (the reference of the solved paths)."""
    mix = replicate_weights(counts, list(range(counts.numel())))
    a, _ = replicate_curvature(sums, mix, w.shape)
    b = w.square().reshape(a.shape[1], a.shape[2], -1).sum(dim=2)
    return torch.stack([s.value for s in solve_normalized_sharpness_coefficients(a, b, warm_start=False)])


@pytest.mark.parametrize("shape", [(12, 9), (9, 12), (6, 5, 3, 3)])
def test_streamed_equals_in_memory_where_the_first_order_covers_every_replicate(monkeypatch, shape):
    w, sums, counts = _slot_sums(shape, 0)
    monkeypatch.setattr(curvature_module, "_CHUNK", 20)  # many chunks of whole rows, a partial last one
    held, streamed = _both(monkeypatch, w, sums, counts)
    _assert_same(held, streamed)
    solved = _solved_means(w, sums, counts)
    assert bool((streamed["normalized"][1:-2] >= solved[1:-2] * (1 - 1e-10)).all())  # upper bounds


def test_units_that_die_or_come_alive_in_a_replicate(monkeypatch):
    """Row 0's curvature lives in slot 5 only: it dies when slot 5 is left out (covered: the component
    shrinks). Row 1 is clipped dead in the pooled mean by slot 2 alone: leaving slot 2 out brings it
    alive, so that replicate gains a unit and is solved."""
    monkeypatch.setattr(replicate_measures, "LINEARIZATION_TOLERANCE", math.inf)
    monkeypatch.setattr(replicate_measures, "LINEARIZATION_MAX_RELATIVE_SPREAD", math.inf)
    w, sums, counts = _slot_sums((7, 6), 1, noise=0.2)
    view = sums.view(8, 7, 6)
    view[:, 0] = 0.0
    view[5, 0] = 3.0
    view[:, 1] = 1.0
    view[2, 1] = -20.0
    monkeypatch.setattr(curvature_module, "_CHUNK", 12)
    held, streamed = _both(monkeypatch, w, sums, counts)
    _assert_same(held, streamed)
    solved = _solved_means(w, sums, counts)
    torch.testing.assert_close(streamed["normalized"][3], solved[3], rtol=1e-10, atol=0)  # slot 2 out
    assert not math.isclose(float(streamed["normalized"][1]), float(solved[1]), rel_tol=1e-10)


@pytest.mark.parametrize("jackknife", ["linearized", "solved"])
def test_solved_replicates_when_the_first_order_is_off_or_requested(monkeypatch, jackknife):
    """Noise as large as the curvature: the half shift trips the tensor-level check, so every
    leave-one-out value is solved (as with ``jackknife="solved"``)."""
    w, sums, counts = _slot_sums((10, 6), 2, noise=3.0)
    held, streamed = _both(monkeypatch, w, sums, counts, jackknife)
    solved = _solved_means(w, sums, counts)
    torch.testing.assert_close(held["normalized"], solved, rtol=1e-10, atol=0)
    torch.testing.assert_close(streamed["normalized"], solved, rtol=1e-10, atol=0)
    _assert_same(held, streamed, first_order_rtol=1e-10)


def test_zero_weights_keep_the_first_order_where_the_component_is_unchanged(monkeypatch):
    """A pruned column (``B = 0``: a dead end, in no component) and an isolated zero weight: every
    replicate keeps the pooled component, so both paths take the same first-order values."""
    w, sums, counts = _slot_sums((8, 7), 3)
    w[:, 2] = 0.0
    w[4, 5] = 0.0
    held, streamed = _both(monkeypatch, w, sums, counts)
    _assert_same(held, streamed)
    solved = _solved_means(w, sums, counts)
    first = streamed["normalized"][1:-2]
    assert bool((first >= solved[1:-2] * (1 - 1e-10)).all()) and not torch.equal(first, solved[1:-2])


@pytest.mark.parametrize("hubs", [True, False])
def test_zero_weights_and_a_replicate_that_loses_an_arc(monkeypatch, hubs):
    """Entry (3, 4) lives in slot 6 only: leaving slot 6 out loses that arc of the pooled component.
    With one zero weight, hub rows and columns (``B`` arcs to and from every pooled unit) keep the
    replicate connected, so it stays first order (as in memory); with a zero weight in every row there
    is no hub row, so the streamed path cannot prove the component and solves that replicate."""
    monkeypatch.setattr(replicate_measures, "LINEARIZATION_TOLERANCE", math.inf)
    monkeypatch.setattr(replicate_measures, "LINEARIZATION_MAX_RELATIVE_SPREAD", math.inf)
    w, sums, counts = _slot_sums((8, 9), 6)
    if hubs:
        w[0, 0] = 0.0
    else:
        w[torch.arange(8), torch.arange(8)] = 0.0
    view = sums.view(8, 8, 9)
    view[:, 3, 4] = 0.0
    view[6, 3, 4] = 2.0
    held, streamed = _both(monkeypatch, w, sums, counts)
    solved = _solved_means(w, sums, counts)
    torch.testing.assert_close(
        streamed["normalized"][[0, -2, -1]], held["normalized"][[0, -2, -1]], rtol=1e-10, atol=0
    )
    assert not math.isclose(float(streamed["normalized"][1]), float(solved[1]), rel_tol=1e-10)  # first order
    if hubs:
        torch.testing.assert_close(streamed["normalized"][7], held["normalized"][7], rtol=1e-8, atol=0)
        assert not math.isclose(float(streamed["normalized"][7]), float(solved[7]), rel_tol=1e-10)
    else:
        torch.testing.assert_close(streamed["normalized"][7], solved[7], rtol=1e-10, atol=0)


def test_zero_weights_with_a_pooled_problem_of_two_components_solve_every_replicate(monkeypatch):
    """Zero blocks of ``B`` and clipped blocks of ``A``: the pooled problem has two components, so every
    leave-one-out mean is solved (equal to independent solves)."""
    monkeypatch.setattr(replicate_measures, "LINEARIZATION_TOLERANCE", math.inf)
    monkeypatch.setattr(replicate_measures, "LINEARIZATION_MAX_RELATIVE_SPREAD", math.inf)
    w, sums, counts = _slot_sums((8, 6), 7)
    w[:4, 3:] = 0.0
    w[4:, :3] = 0.0
    sums.view(8, 8, 6)[:, :4, 3:] = -1.0  # clipped: no arcs between the blocks
    sums.view(8, 8, 6)[:, 4:, :3] = -1.0
    held, streamed = _both(monkeypatch, w, sums, counts)
    torch.testing.assert_close(streamed["normalized"], _solved_means(w, sums, counts), rtol=1e-10, atol=0)


def test_few_and_skipped_slots(monkeypatch):
    """Three used slots of five (slot 1 and 4 empty), and a single used slot (no replicates)."""
    w, sums, counts = _slot_sums((9, 8), 4, num_slots=5)
    counts[[1, 4]] = 0.0
    sums[[1, 4]] = 0.0
    held, streamed = _both(monkeypatch, w, sums, counts, used=[0, 2, 3])
    assert held["normalized"].shape == (6,)
    _assert_same(held, streamed)
    counts[[2, 3]] = 0.0
    sums[[2, 3]] = 0.0
    held, streamed = _both(monkeypatch, w, sums, counts, used=[0])
    assert streamed["normalized"].shape == (1,)
    torch.testing.assert_close(streamed["normalized"], held["normalized"], rtol=1e-10, atol=0)


def test_curvature_chunks_cover_every_row_once_and_match_replicate_curvature(monkeypatch):
    w, sums, counts = _slot_sums((7, 4, 3), 5)
    mix = replicate_weights(counts, list(range(8)))
    monkeypatch.setattr(curvature_module, "_CHUNK", 25)  # 2 rows of 12 entries per chunk
    a, trace = replicate_curvature(sums, mix, w.shape)
    bounds, blocks = [], []
    for lo, hi, block, _totals in curvature_chunks(sums, mix, w.shape):
        bounds.append((lo, hi))
        blocks.append(block.clone())
    assert bounds == [(0, 2), (2, 4), (4, 6), (6, 7)]
    torch.testing.assert_close(torch.cat(blocks, dim=1), a, rtol=0, atol=0)
    means = (mix @ sums).view(-1, 7, 4, 3)
    torch.testing.assert_close(a, means.clamp_min(0).sum(dim=3), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(trace, means.sum(dim=(1, 2, 3)), rtol=1e-13, atol=0)
    transposed, totals = formed_curvature(sums, mix, w.shape, transpose=True)
    assert transposed.is_contiguous()
    torch.testing.assert_close(transposed, a.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(totals, sums.view(8, -1).sum(dim=1), rtol=1e-13, atol=0)
    picked, trace_all = replicate_curvature(sums, mix, w.shape, rows=[0, 9, 10])
    torch.testing.assert_close(picked, a[[0, 9, 10]], rtol=0, atol=0)
    torch.testing.assert_close(trace_all, trace, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pooled mean"):
        replicate_curvature(sums, mix, w.shape, rows=[1])


@pytest.mark.parametrize("structured", [True, False])
def test_non_negative_chunks_sum_the_kernel_first_with_the_clipped_values(monkeypatch, structured):
    """Chunks whose slot sums are all >= 0 (a Gauss-Newton estimate) are summed over the kernel per slot
    before the means are formed (nothing to clip); chunks with a negative entry clip each mean first.
    One tensor with both kinds of chunk, exact zeros where a unit lives in one slot only, and a kernel:
    every ``A`` against the clipped kernel sums of explicit means."""
    w, sums, counts = _slot_sums((7, 4, 3), 5)
    sums = sums.abs()
    sums.view(8, 7, 4, 3)[:, 5] *= torch.linspace(-1.0, 1.0, 8, dtype=F64)[:, None, None]  # signed rows
    sums.view(8, 7, 4, 3)[[0, 1, 3, 4, 5, 6, 7], 1, 2] = 0.0  # (1, 2): alive in slot 2 only
    g = torch.Generator().manual_seed(3)
    mix = (
        replicate_weights(counts, list(range(8)))
        if structured
        else torch.rand(4, 8, generator=g, dtype=F64)  # any non-negative mix: the product per chunk
    )
    monkeypatch.setattr(curvature_module, "_CHUNK", 25)  # 2 rows per chunk: rows 4-5 signed, the rest not
    seen = []
    original_kernel_sum = curvature_module._kernel_sum

    def spy(clipped, *args):  # the clipping path: which chunks took it
        seen.append(clipped.shape[1] // 12)
        return original_kernel_sum(clipped, *args)

    monkeypatch.setattr(curvature_module, "_kernel_sum", spy)
    a, trace = replicate_curvature(sums, mix, w.shape)
    assert seen == [2]  # only the chunk of rows 4-5
    means = (mix @ sums).view(-1, 7, 4, 3)
    torch.testing.assert_close(a, means.clamp_min(0).sum(dim=3), rtol=1e-13, atol=0)
    torch.testing.assert_close(trace, means.sum(dim=(1, 2, 3)), rtol=1e-13, atol=0)
    if structured:
        assert bool((a[1:9, 1, 2] == 0).sum() == 1) and float(a[3, 1, 2]) == 0.0  # slot 2 left out: exactly 0
        assert bool((a[:, 5] >= 0).all())


def test_the_non_negativity_check_reads_past_the_first_entries():
    s = torch.rand(2, 200, dtype=F64)
    assert curvature_module._non_negative(s)
    s[1, 150] = -1e-300  # after the first 64 entries of the slot
    assert not curvature_module._non_negative(s)
    s[1, 150] = math.nan
    assert not curvature_module._non_negative(s)


@pytest.mark.parametrize("seed", range(12))
def test_streamed_coverage_with_zero_weights_implies_the_exact_component_analysis(seed):
    """Soundness of the streamed test on random sparse problems (zero weights, lost and new ``A`` entries):
    every replicate it covers has, by the exact analysis (transitive closures), one component with the
    pooled rows and columns, and its first-order value is its objective over that component at the
    pooled minimiser. (The in-memory test asks for the same entries too, so it solves a replicate that
    gains an ``A`` entry where ``B = 0``; the first order holds there as well.)"""
    from lightning_flatness.functional.solvers._components import component_layout
    from lightning_flatness.functional.solvers.linearized_replicates import (
        objective_at_minimiser,
        streamed_first_order,
    )

    g = torch.Generator().manual_seed(seed)
    m, n = 7, 6
    b = torch.exp(torch.randn(m, n, generator=g, dtype=F64))
    b *= torch.rand(m, n, generator=g) > 0.2 + 0.05 * (seed % 4)
    a0 = torch.exp(torch.randn(m, n, generator=g, dtype=F64)) * (torch.rand(m, n, generator=g) > 0.3)
    a = a0[None] * torch.exp(0.2 * torch.randn((10, m, n), generator=g, dtype=F64))
    a *= torch.rand((10, m, n), generator=g) > 0.08  # lost entries
    a += (torch.rand((10, m, n), generator=g) > 0.95) * torch.rand((10, m, n), generator=g, dtype=F64)  # new
    (sol,) = solve_normalized_sharpness_coefficients(a0[None], b, rtol=1e-13, warm_start=False)
    blocks = [(lo, min(m, lo + 2), a[:, lo : lo + 2]) for lo in range(0, m, 2)]
    covered, values, _ = streamed_first_order(
        blocks, b, a0, sol.row_log_variance, sol.col_log_variance, sol.num_components
    )
    keep, free = component_layout(a, b[None].expand_as(a))
    keep = torch.ones_like(a, dtype=torch.bool) if keep is None else keep
    rows0, cols0 = torch.isfinite(sol.row_log_variance), torch.isfinite(sol.col_log_variance)
    for r in covered.nonzero().squeeze(1).tolist():
        assert int((keep[r].any(dim=1) & ~free[r]).sum()) == 1  # one component
        assert torch.equal(keep[r].any(dim=1), rows0) and torch.equal(keep[r].any(dim=0), cols0)
        expected = objective_at_minimiser(
            a[r : r + 1], b, sol.row_log_variance, sol.col_log_variance, keep[r : r + 1]
        )
        torch.testing.assert_close(values[r : r + 1], expected, rtol=1e-12, atol=1e-12)
    assert int(covered.sum()) > 0 or seed in (3, 6, 10)  # the test is not vacuous


def _split(batch, parts: int) -> list:
    inputs, target = batch
    n = target.shape[0]
    step = n // parts
    if isinstance(inputs, dict):  # Hugging Face batches: the labels in the dict
        return [
            {**{k: v[i : i + step] for k, v in inputs.items()}, "labels": target[i : i + step]}
            for i in range(0, n, step)
        ]
    return [(inputs[i : i + step], target[i : i + step]) for i in range(0, n, step)]


@pytest.mark.parametrize("checks", [True, False])
@pytest.mark.parametrize("name", ["resnet", "vit", "gpt2"])
def test_a_zoo_model_measures_the_same_streamed(monkeypatch, name, checks):
    """Real curvature (dead units, tokens absent from a batch, a tied embedding): ``measure_sharpness``
    with every linear weight streamed (``STREAM_FROM = 16``) against every weight held, the same draws.
    On 16 samples the tensor-level checks send most leave-one-out values to the solver; without them
    (``checks=False``) the first-order values of both paths are compared."""
    if not checks:
        monkeypatch.setattr(replicate_measures, "LINEARIZATION_TOLERANCE", math.inf)
        monkeypatch.setattr(replicate_measures, "LINEARIZATION_MAX_RELATIVE_SPREAD", math.inf)
    from lightning_flatness.measure import measure_sharpness
    from tests.zoo_models import CAUSAL_LM, TINY

    model, batch = TINY[name](n=16, seed=1, dtype=F64)
    batches = _split(batch, 8)
    out = {}
    for mode, threshold in (("held", math.inf), ("streamed", 16)):
        monkeypatch.setattr(replicate_measures, "STREAM_FROM", threshold)
        out[mode] = measure_sharpness(model, batches, generator=torch.Generator().manual_seed(0)).values
    streamed_shapes = [
        p.shape for p in model.parameters() if p.ndim >= 2 and replicate_measures.streamed(tuple(p.shape))
    ]
    assert streamed_shapes  # with STREAM_FROM = 16 still set
    for key, held in out["held"].items():
        if key.startswith(("normalized_stderr", "normalized_half_shift")):
            tol = 1e-6 * float(out["held"]["normalized"])  # first-order values at two certified minimisers
            assert abs(float(out["streamed"][key]) - float(held)) <= tol, key
        elif torch.is_tensor(held) and held.dtype.is_floating_point:
            torch.testing.assert_close(out["streamed"][key], held, rtol=1e-9, atol=1e-12, msg=key)
    assert name not in CAUSAL_LM or any(s[0] >= 32 for s in streamed_shapes)  # the vocabulary


def test_rows_without_curvature_in_any_slot_are_left_out_with_the_same_measures(monkeypatch):
    """An embedding table whose measured samples looked up few rows: the streamed path solves the curved
    rows alone (``curved_rows``), and every measure equals the in-memory path's on the whole weight
    (eq. 13 keeps the whole weight's norm)."""
    w, sums, counts = _slot_sums((40, 12), seed=7)
    dead = torch.ones(40, dtype=torch.bool)
    dead[[2, 5, 6, 19, 33]] = False
    sums.view(8, 40, 12)[:, dead] = 0.0
    kept = replicate_measures.curved_rows(sums, (40, 12))
    assert kept is not None and kept.tolist() == [2, 5, 6, 19, 33]
    held, streamed = _both(monkeypatch, w, sums, counts)
    _assert_same(held, streamed)
    assert bool((held["normalized"] > 0).all())


def test_a_weight_without_curvature_measures_zero_without_a_solve(monkeypatch):
    """A table no input reached (LUKE's entity embeddings on text alone): every measure of every mean is 0,
    as the in-memory path's solver finds, without forming or solving anything."""
    w, sums, counts = _slot_sums((30, 10), seed=8)
    sums.zero_()
    held, streamed = _both(monkeypatch, w, sums, counts)
    for key in ("normalized", "matrix_normalized", "hessian_trace"):
        assert torch.equal(streamed[key], torch.zeros_like(streamed[key]))
        torch.testing.assert_close(held[key], streamed[key], rtol=0, atol=0)
