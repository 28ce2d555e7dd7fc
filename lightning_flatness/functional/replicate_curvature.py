r"""Eq. 17's clipped curvature of the pooled and replicate means, from the slot sums, chunk by chunk.

The metric keeps ``R`` replicate slots of summed estimates per weight tensor, ``(R, numel)``. Each of the
``P`` means it evaluates (pooled, leave-one-out, halves: the rows of ``mix``,
:func:`~lightning_flatness.functional.replicate_measures.replicate_weights`) enters eq. 17 as
``A_p = sum_k max(mean_p, 0)``, ``(m, n)``: clipped at zero, then summed over the kernel. The
``(P, numel)`` means are never materialised: :func:`curvature_chunks` forms them for a few whole rows
of the weight at a time (a chunk of every slot stays in cache) and yields the rows' ``A_p``;
:func:`replicate_curvature` collects all rows into ``(P, m, n)``. A caller that cannot hold ``P``
copies of ``A`` (a large weight: an LM vocabulary, a VGG head) consumes the chunks as they come.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["curvature_chunks", "formed_curvature", "replicate_curvature", "used_slots"]

_CHUNK = 1 << 15  # entries per slot in one chunk (whole rows)
_CLIPPED_CHUNK = 1 << 13  # ... of the clipping path's means (the P means stay in cache: RESULTS.md, round 15)


def used_slots(mix: Tensor) -> list[int]:
    """The slots with a positive weight in any row of ``mix`` ``(P, R)``."""
    return (mix > 0).any(dim=0).nonzero().squeeze(1).tolist()


def curvature_chunks(
    sums: Tensor, mix: Tensor, shape: Sequence[int], out: Optional[Tensor] = None
) -> Iterator[tuple[int, int, Tensor, Tensor]]:
    """For consecutive blocks of whole rows ``lo:hi`` of a weight of ``shape`` ``(m, n, *kernel)``: eq. 17's
    ``A_p = sum_k max(mean_p, 0)`` of the rows, ``(P, hi - lo, n)``, of the ``P`` means
    ``mean_p = sum_r mix_pr sums_r``, and the rows' per-slot totals ``(len(used_slots(mix)),)``.

    The means are one matrix product ``mix @ sums`` per block of a few rows (``2 P R`` flops per weight
    entry and one read of its ``(R, ·)`` slot sums, in cache: a few ops per block, faster than forming
    each set's sum slot by slot, as an earlier version did: ``benchmarks/RESULTS.md``, round 15). A mean
    whose slots are all exactly 0 is exactly 0 (no cancellation: its weights multiply the slots
    directly), which is what tells the solver an infimum is unattained. Where a chunk's slot sums are all
    ``>= 0`` (Gauss-Newton estimates of a loss convex in the outputs: cross-entropy, squared error)
    nothing is clipped, so the kernel sum commutes with the mix:
    each slot is summed over the kernel first (one matrix-vector product per slot) and the means are
    formed ``kernel`` times smaller, with the same exact zeros; a chunk with a negative (or NaN) entry
    takes the clipping path.

    Args:
        sums: ``(R, numel)`` float64 slot sums.
        mix: ``(P, R)`` non-negative float64.
        shape: the weight's shape ``(m, n, *kernel)``.
        out: optional ``(P, m * n)`` buffer that receives every chunk's ``A_p`` (the yielded chunks are
            views of it); without it the chunks share one buffer, overwritten by the next chunk.
    """
    m, n = shape[0], shape[1]
    kernel = math.prod(shape[2:])
    row = n * kernel
    used = used_slots(mix)
    every = used == list(range(sums.shape[0]))  # else each chunk's used slots are picked (no whole copy)
    weights = mix[:, used]
    num = mix.shape[0]
    rows_per = max(1, _CHUNK // max(row, 1))
    clipped_rows = min(rows_per, max(1, _CLIPPED_CHUNK // max(row, 1)))
    means = sums.new_empty(num, min(clipped_rows, m) * row)
    workspace = (sums.new_ones(kernel), sums.new_empty(num * min(clipped_rows, m) * n))
    slot_kernel_sums = sums.new_empty(len(used), min(rows_per, m) * n) if kernel > 1 else None
    buffer = out if out is not None else sums.new_empty(num, min(rows_per, m) * n)
    for lo in range(0, m, rows_per):
        hi = min(m, lo + rows_per)
        s = sums[:, lo * row : hi * row] if every else sums[used, lo * row : hi * row]
        target = out[:, lo * n : hi * n] if out is not None else buffer[:, : (hi - lo) * n]
        if slot_kernel_sums is not None and _non_negative(s):
            # nothing to clip (Gauss-Newton estimates of a convex loss): the kernel sum commutes with the
            # mix, so each slot is summed over the kernel first and the P means formed kernel times smaller
            reduced = slot_kernel_sums[:, : (hi - lo) * n]
            for k in range(s.shape[0]):  # (a matrix-vector product per slot: faster than one batched)
                torch.mv(s[k].view(-1, kernel), workspace[0], out=reduced[k])
            torch.mm(weights, reduced, out=target)
            totals = reduced.sum(dim=1)
        else:  # the means of fewer rows at a time, clipped and summed over the kernel while in cache
            for a in range(0, hi - lo, clipped_rows):
                b = min(hi - lo, a + clipped_rows)
                chunk = means[:, : (b - a) * row]
                torch.mm(weights, s[:, a * row : b * row], out=chunk)
                _kernel_sum(chunk.clamp_min_(0), kernel, target[:, a * n : b * n], workspace)
            totals = s.sum(dim=1)
        yield lo, hi, target.view(num, hi - lo, n), totals


def replicate_curvature(
    sums: Tensor,
    mix: Tensor,
    shape: Sequence[int],
    rows: Optional[list[int]] = None,
    transpose: bool = False,
) -> tuple[Tensor, Tensor]:
    """Eq. 17's ``A = sum_k max(mean_p, 0)`` ``(P', m, n)`` of the means ``rows`` of ``mix`` (all by
    default) and the trace ``sum mean_p`` ``(P,)`` of every mean, in one pass over the slot sums
    (:func:`curvature_chunks`).

    Args:
        sums: ``(R, numel)`` float64 slot sums of a tensor of ``shape`` ``(m, n, *kernel)``.
        mix: ``(P, R)`` non-negative float64
            (:func:`~lightning_flatness.functional.replicate_measures.replicate_weights`).
        rows: the means whose ``A`` is formed (they must include one over every slot, the pooled
            mean); the trace covers every row of ``mix``.
        transpose: ``A`` as ``(P', n, m)`` (:func:`formed_curvature`).
    """
    picked = mix if rows is None else mix[rows]
    used = used_slots(picked)
    if rows is not None and used != used_slots(mix):
        raise ValueError("rows must include a mean over every slot (the pooled mean) for the trace.")
    a, totals = formed_curvature(sums, picked, shape, transpose)
    return a, mix[:, used] @ totals


def formed_curvature(
    sums: Tensor, mix: Tensor, shape: Sequence[int], transpose: bool = False
) -> tuple[Tensor, Tensor]:
    """Eq. 17's ``A`` of every mean of ``mix``, ``(P, m, n)`` (``transpose``: ``(P, n, m)``, contiguous, as
    the solver takes a weight with more rows than columns), and the per-slot totals of the slots
    :func:`used_slots` ``(len(used),)``, in one pass over the slot sums."""
    m, n = shape[0], shape[1]
    a = sums.new_empty((mix.shape[0], n, m) if transpose else (mix.shape[0], m * n))
    totals = sums.new_zeros(len(used_slots(mix)))
    for lo, hi, block, chunk_totals in curvature_chunks(sums, mix, shape, out=None if transpose else a):
        totals += chunk_totals
        if transpose:  # while the block is in cache
            a[:, :, lo:hi].copy_(block.transpose(1, 2))
    return (a if transpose else a.view(-1, m, n)), totals


def _non_negative(s: Tensor) -> bool:
    """Whether every entry of the ``(R, c)`` slot sums is ``>= 0`` (False with a NaN): the first entries of
    each slot first, so that signed curvature (a Hessian estimate, eq. 20's Gauss-Newton matrix, whose
    loss Hessian is indefinite) is usually told apart without a pass over the chunk."""
    return bool(s[:, :64].amin() >= 0) and bool(s.amin() >= 0)


def _kernel_sum(clipped: Tensor, kernel: int, out: Tensor, workspace: tuple[Tensor, Tensor]) -> None:
    """``out = clipped.view(P, c // kernel, kernel).sum(2)``; a matrix-vector product with ones where the
    chunk is contiguous (faster than a reduction over a short innermost dimension on the CPU; measured
    in ``benchmarks/results/linearized_jackknife.md``)."""
    if kernel == 1:
        out.copy_(clipped)
    elif clipped.is_contiguous():
        ones, buffer = workspace
        flat = buffer[: clipped.numel() // kernel]
        torch.mv(clipped.view(-1, kernel), ones, out=flat)
        out.copy_(flat.view(out.shape))
    else:  # the last, partial chunk
        torch.sum(clipped.view(clipped.shape[0], -1, kernel), dim=2, out=out)


def _as_index(slots: list[int]):
    """``slots`` as a slice where they are evenly spaced (indexing then gives a view, not a gathered
    copy: the halves' slots, the leave-one-out rows)."""
    step = slots[1] - slots[0] if len(slots) > 1 else 1
    if step > 0 and slots == list(range(slots[0], slots[-1] + 1, step)):
        return slice(slots[0], slots[-1] + 1, step)
    return slots
