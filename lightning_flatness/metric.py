"""``NormalizedSharpness``: a torchmetrics ``Metric`` that pools Hessian-diagonal estimates over
batches and processes and reports normalized sharpness (eq. 17), matrix-normalized sharpness
(eq. 13) and the Hessian trace (eq. 5), each with a jackknife standard error.

The curvature work (Hessian-vector products, GGN diagonals) belongs to
:mod:`lightning_flatness.functional`: torchmetrics runs ``update()`` with gradients disabled, so
the metric receives estimates and only sums them.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn

from lightning_flatness.functional.estimators.api import HessianDiagonalEstimate
from lightning_flatness.functional.replicate_measures import JACKKNIFE_MODES, replicate_sharpness_measures

__all__ = ["NormalizedSharpness", "all_finite", "all_reduce_sum"]

NumSamples = Union[int, Sequence[int], Tensor]
Layout = tuple[tuple[str, torch.Size], ...]

_STATE = (
    "accumulator"  # the one metric state: (R, F + 1) float64, F = total weight entries, last column = counts
)


# ----------------------------------------------------------------------------------------------
# Pure functions (the metric class only holds state and calls these)
# ----------------------------------------------------------------------------------------------


def _group_sizes(num_samples: NumSamples) -> tuple[Tensor, bool]:
    """``num_samples`` as a ``(G,)`` int64 tensor, and whether the diagonals carry a group dim."""
    if isinstance(num_samples, bool) or (isinstance(num_samples, Tensor) and num_samples.dtype == torch.bool):
        raise TypeError(f"`num_samples` must be an int or a sequence of ints, got the bool {num_samples!r}.")
    if isinstance(num_samples, numbers.Integral):
        sizes, stacked = torch.tensor([int(num_samples)], dtype=torch.int64), False
    elif isinstance(num_samples, Tensor):
        if num_samples.is_floating_point() or num_samples.is_complex():
            raise TypeError(
                f"`num_samples` must hold integers (sample counts), got a {num_samples.dtype} "
                f"tensor; pass e.g. torch.tensor([32, 32]) or [32, 32]."
            )
        if num_samples.ndim > 1:
            raise ValueError(
                f"`num_samples` must be an int or 1-D (one count per group), got shape "
                f"{tuple(num_samples.shape)}."
            )
        stacked = num_samples.ndim == 1
        sizes = num_samples.detach().reshape(-1).to(device="cpu", dtype=torch.int64)
    elif isinstance(num_samples, Sequence) and not isinstance(num_samples, str):
        bad = [
            n
            for n in num_samples
            if isinstance(n, bool)
            or not isinstance(n, (numbers.Integral, Tensor))
            or (isinstance(n, Tensor) and (n.ndim != 0 or n.is_floating_point() or n.dtype == torch.bool))
        ]
        if bad:
            raise TypeError(
                f"`num_samples` must be a sequence of ints (one count per group), got {num_samples!r}."
            )
        sizes, stacked = torch.tensor([int(n) for n in num_samples], dtype=torch.int64), True
    else:
        raise TypeError(
            f"`num_samples` must be an int (one estimate) or a sequence/1-D tensor of ints "
            f"(one per group), got {type(num_samples).__name__}."
        )
    if sizes.numel() == 0:
        raise ValueError("`num_samples` is empty: pass one sample count per group (at least one group).")
    if bool((sizes < 1).any()):
        raise ValueError(f"every group needs at least one sample, got num_samples={sizes.tolist()}.")
    return sizes, stacked


def _check_estimates(
    diagonals: Mapping[str, Tensor], weights: Mapping[str, Tensor], num_groups: int, stacked: bool
) -> Layout:
    """Validate one update; return its layout ``((name, weight shape), ...)`` in ``diagonals`` order."""
    if not isinstance(diagonals, Mapping) or not diagonals:
        raise TypeError(
            f"`diagonals` must be a non-empty mapping {{name: Hessian diagonal}}, got "
            f"{type(diagonals).__name__}."
        )
    if not isinstance(weights, Mapping):
        raise TypeError(
            f"`weights` must be a mapping {{name: weight tensor}} (e.g. from "
            f"select_parameters), got {type(weights).__name__}."
        )
    if set(diagonals) != set(weights):
        raise ValueError(
            f"`diagonals` and `weights` must name the same tensors; only in diagonals: "
            f"{sorted(set(diagonals) - set(weights))}, only in weights: "
            f"{sorted(set(weights) - set(diagonals))}."
        )
    layout = []
    for name, h in diagonals.items():
        w = weights[name]
        if not isinstance(w, Tensor) or not isinstance(h, Tensor):
            raise TypeError(
                f"weight and Hessian diagonal of {name!r} must be tensors, got "
                f"{type(w).__name__} and {type(h).__name__}."
            )
        if not (w.is_floating_point() and h.is_floating_point()):
            raise TypeError(
                f"weight and Hessian diagonal of {name!r} must be floating point, got "
                f"{w.dtype} and {h.dtype}."
            )
        if w.ndim < 1:
            raise ValueError(
                f"weight {name!r} is a scalar; pass parameter tensors (1-D tensors enter the "
                f"Hessian trace only, ndim >= 2 ones every measure)."
            )
        expected = (num_groups, *w.shape) if stacked else tuple(w.shape)
        if tuple(h.shape) != expected:
            how = (
                f"(G, *weight.shape) = {expected} for num_samples with G={num_groups} entries"
                if stacked
                else f"the weight's shape {expected} for an int num_samples (pass one count per group "
                f"for a leading group dim)"
            )
            raise ValueError(f"Hessian diagonal of {name!r} has shape {tuple(h.shape)}; expected {how}.")
        layout.append((name, torch.Size(w.shape)))
    nonfinite = [n for n, h in diagonals.items() if not all_finite(h)]
    if nonfinite:
        raise ValueError(
            f"Hessian diagonals of {nonfinite} contain NaN or inf; fix the estimate (e.g. a "
            f"smaller finite-difference step, float64) before passing it to "
            f"NormalizedSharpness."
        )
    return tuple(layout)


def all_finite(tensor: Tensor) -> bool:
    """Whether every entry of ``tensor`` is finite, exactly ``torch.isfinite(tensor).all()``, by one sum in
    its own dtype (tens of times faster on CPU than the elementwise mask): a NaN or an infinity makes the
    sum non-finite, so a finite sum proves every entry finite; only a non-finite sum (a non-finite entry,
    or finite entries whose sum overflows) is settled entry by entry."""
    if not tensor.is_floating_point():
        return bool(torch.isfinite(tensor).all())
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def all_reduce_sum(
    tensor: Tensor, group: Optional[Any] = None, shape: Optional[Sequence[int]] = None
) -> list[Tensor]:
    """``dist_sync_fn`` for sum states: one ``all_reduce(SUM)`` of a contiguous copy, returned as ``[sum]``.

    torchmetrics calls ``dist_sync_fn(state, group=...)`` per state and reduces the returned list
    with the state's ``dist_reduce_fx`` (``"sum"`` over one element: the identity), so the sync is a
    single collective whose memory does not grow with the number of processes (the default,
    ``gather_all_tensors``, holds one copy per process). ``shape``: broadcast the state to this
    shape first (a compact default state of a process that never updated).
    """
    full = tensor if shape is None else tensor.expand(*shape)
    reduced = full.clone(memory_format=torch.contiguous_format)
    torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM, group=group)
    return [reduced]


def _layout_from_shapes(parameter_shapes: Any) -> Layout:
    """Validate ``parameter_shapes`` (``{name: shape or tensor}``) into a layout."""
    if parameter_shapes is None:
        raise TypeError(
            "NormalizedSharpness needs `parameter_shapes`, the {name: shape} of the weight tensors it "
            "measures, to lay out its state at construction (every process must agree on it); "
            "pass e.g. {n: p.shape for n, p in select_parameters(model).items()}."
        )
    if not isinstance(parameter_shapes, Mapping) or not parameter_shapes:
        raise ValueError(
            f"`parameter_shapes` must be a non-empty mapping {{name: shape}}, got {parameter_shapes!r}."
        )
    layout = []
    for name, shape in parameter_shapes.items():
        if not isinstance(name, str):
            raise TypeError(f"`parameter_shapes` keys must be parameter names (str), got {name!r}.")
        if isinstance(shape, Tensor):
            shape = shape.shape
        try:
            size = torch.Size(shape)
        except TypeError as err:
            raise TypeError(
                f"`parameter_shapes[{name!r}]` must be a shape (sequence of ints) or a tensor, got {shape!r}."
            ) from err
        if len(size) < 1:
            raise ValueError(
                f"`parameter_shapes[{name!r}]` = {tuple(size)} is a scalar; pass parameter tensors "
                f"(1-D tensors enter the Hessian trace only, ndim >= 2 ones every measure)."
            )
        layout.append((name, size))
    return tuple(layout)


# ----------------------------------------------------------------------------------------------
# The metric
# ----------------------------------------------------------------------------------------------


class NormalizedSharpness(Metric):
    r"""Normalized sharpness (eq. 17), matrix-normalized sharpness (eq. 13) and the Hessian trace
    (eq. 5) of a network, from Hessian-diagonal estimates pooled over batches and processes.

    Each ``update`` brings ``G`` independent estimates ``diag_g`` of the Hessian diagonal of the
    mean loss over ``n_g`` samples (e.g. from
    :func:`~lightning_flatness.functional.hessian_diagonal_groups`), plus the current weights. The
    metric keeps ``R = num_replicates`` accumulators (*replicate slots*): group ``g`` of an update
    goes into slot ``(offset + g) mod R`` and the offset advances by ``G`` per update, so
    single-group updates go round-robin over the slots. Slot ``r`` holds
    ``sum_g n_g * diag_g`` and ``N_r = sum_g n_g``. ``compute()`` evaluates every measure of
    :func:`~lightning_flatness.functional.sharpness_measures` on the pooled mean
    ``sum_r sum_g n_g diag_g / N`` (the Hessian diagonal of the mean loss over all ``N`` samples
    seen, if each estimate is unbiased) and on the leave-one-out means
    ``(sum - slot_r) / (N - N_r)`` of the ``R'`` non-empty slots, and reports the delete-one
    jackknife standard error ``sqrt((R'-1)/R' * sum_r (S_(-r) - mean_r S_(-r))^2)``. It covers the
    probe noise of stochastic estimators and the sampling noise of the training points, and follows
    the nonlinearity (clipping, square roots, the eq. 17 minimum) of the measures. For the
    (linear) trace it equals the classic standard error of the mean of ``R'`` equal-sized slots;
    the formula assumes slots of similar size (round-robin over equal batches gives that).

    The jackknife does not see the *bias* that estimator noise causes in the nonlinear measures
    (an unbiased but noisy diagonal gives an upward-biased normalized sharpness: clipping and square
    roots turn noise into signal). As a diagnostic, ``"<measure>_half_shift"`` is the mean of the
    measure on each half of the non-empty slots (even and odd), minus the pooled value: the change
    when the samples and probes are halved. If the bias falls like ``n ** -alpha`` in the sample or
    probe count ``n`` with ``0 < alpha <= 1``, its expectation is ``(2 ** alpha - 1)`` times the
    bias of the pooled value, i.e. a lower bound on it (at ``alpha = 1/2``, 41% of it). A shift large
    against the standard error means the estimate has not converged: raise the probes or samples,
    or use an exact method. It is 0 in expectation for the (linear) trace.

    As input to ``update`` / ``forward`` the metric accepts:

    - ``diagonals``: ``{name: (*shape)}`` one estimate over ``num_samples`` (int) samples, or
      ``{name: (G, *shape)}`` with ``num_samples`` a length-``G`` sequence / 1-D tensor; or a
      :class:`~lightning_flatness.functional.HessianDiagonalEstimate` (then no ``num_samples``).
    - ``weights``: ``{name: W}``, the parameter tensors the diagonals belong to (``ndim >= 2``:
      every measure; 1-D, such as biases and normalization scales: the trace alone, footnote 5).
    - ``num_samples``: samples behind each estimate, used as its weight in the pooled mean.

    As output of ``compute`` (and ``forward``) the metric returns a flat dict of float64 0-dim
    tensors: ``"normalized"``, ``"matrix_normalized"``, ``"hessian_trace"`` (sums over tensors: the
    trace over every tensor, eq. 5), ``"hessian_trace_weights"`` (the trace over the ``ndim >= 2``
    tensors), ``"<measure>/<name>"`` per tensor and measure, ``"<measure>_stderr"`` and
    ``"<measure>_stderr/<name>"`` (jackknife; NaN with a one-time warning when fewer than 2 slots
    hold samples), ``"<measure>_half_shift"`` and ``"<measure>_half_shift/<name>"`` (the convergence
    diagnostic above; NaN likewise), and ``"num_samples"`` (int64, total over all updates and processes).

    Parameter names and shapes are fixed at construction by ``parameter_shapes`` (required: the
    callback and any training loop know them, and every process must lay out the same state);
    every update must use those names and shapes (in any order), and ``reset()`` zeroes the sums.

    State and cost: one state, ``accumulator``, an ``(R, F + 1)`` float64 tensor (a ``(1, 1)`` zero
    default until the first update, broadcast on use) added with
    torchmetrics' public ``add_state(..., dist_reduce_fx="sum")``: columns ``0..F-1`` hold the slot
    sums of all weight tensors in layout order (``F`` = total weight entries; per-tensor views from
    :meth:`hessian_sums`) and the last column the sample counts (:attr:`count`; exact in float64
    up to ``2**53`` samples). That is ``8 R`` bytes per weight entry, plus ``8`` bytes per entry for
    the float64 copy of the latest weights. The first update after construction or ``reset()`` makes
    the state full-size (one copy of the default; the default itself is never written); later
    updates add each estimate into its slot's columns in place, converting to float64 on the fly
    (no float64 copy of the estimate). Synchronisation goes through
    torchmetrics' public ``dist_sync_fn``, set to :func:`all_reduce_sum`: one ``all_reduce(SUM)``
    per sync, memory flat in the number of processes (no all-gather). Put the metric on the device of
    your backend (``metric.to(device)``; NCCL needs CUDA tensors). Under DDP, rank ``k`` starts filling slot
    ``k mod R`` so that single-group updates of different ranks land in different slots.
    ``update`` costs ``O(G * numel)``; ``compute`` forms ``R' + 3`` means per tensor (pooled,
    leave-one-out, two halves), solves eq. 17 for the pooled mean and the halves as one cold batch
    (alternating sweeps, then Newton), and takes the leave-one-out values to first order at the pooled
    minimiser (``jackknife``). A large weight (an LM vocabulary, a VGG head:
    :func:`~lightning_flatness.functional.replicate_measures.streamed`) is streamed instead, with the
    same values: ``compute`` then holds about one more state's worth of that tensor at its peak, not
    several. Arithmetic is float64 (not available on Apple MPS). The state is not in
    ``state_dict`` unless ``persistent(True)`` (torchmetrics' default); the layout always is (as
    extra state, checked on load), and with a persistent state the weight copy too, so a loaded
    metric can compute. ``compute_with_cache`` defaults to ``False`` (a loaded or merged state is
    never shadowed by a cached result); ``dist_sync_on_step=True`` is not supported.

    The latest ``weights`` are kept as a detached float64 copy in a plain attribute: neither a
    metric state (they are not summed across processes: DDP keeps them identical on every rank) nor
    a submodule (``state_dict`` / ``.to()`` never recurse into the trained model); ``compute``
    moves the copy to the state's device.

    Args:
        parameter_shapes: ``{name: shape}`` (or ``{name: tensor}``) of the measured weight tensors,
            e.g. ``{n: p.shape for n, p in select_parameters(model).items()}``; required.
        lam: the PAC-Bayes ``lambda`` of eq. 17 (positive; the normalized value scales as
            ``lam ** -0.5``).
        num_replicates: number ``R >= 1`` of replicate slots for the jackknife (``R = 1``: no
            standard error, least memory).
        jackknife: how the leave-one-out values of eq. 17 are obtained. ``"linearized"`` (default):
            the infinitesimal jackknife, each replicate's eq. 17 objective at the pooled minimiser
            (exact to first order in the replicate's deviation by Danskin's theorem, an upper bound
            of its minimum; a replicate where a unit comes alive is solved, and so are all replicates of
            a tensor whose half shift or relative spread shows the first order off); how closely
            its standard error follows the solved one is measured in
            ``benchmarks/results/linearized_jackknife.md``. ``"solved"``: every replicate solved and certified
            to 1e-11 relative, several times the cost of the pooled solve. The values of the
            measures, the half-shifts and the eq. 13 / eq. 5 standard errors are the same in both.
        kwargs: Additional keyword arguments of :class:`torchmetrics.Metric` (not ``dist_sync_fn``:
            the metric sets it to :func:`all_reduce_sum`; not ``dist_sync_on_step=True``).

    Example:
        >>> import torch
        >>> from lightning_flatness.metric import NormalizedSharpness
        >>> weights = {"fc.weight": torch.tensor([[1.0, -2.0], [0.5, 3.0]])}
        >>> metric = NormalizedSharpness({"fc.weight": (2, 2)}, lam=0.5, num_replicates=4)
        >>> for batch in range(4):  # one exact Hessian diagonal per batch of 32 samples
        ...     metric.update({"fc.weight": torch.full((2, 2), 0.1 * (batch + 1))}, weights, num_samples=32)
        >>> out = metric.compute()
        >>> round(out["hessian_trace"].item(), 6), round(out["hessian_trace_stderr"].item(), 4)
        (1.0, 0.2582)
        >>> out["num_samples"]
        tensor(128)
        >>> sorted(k for k in out if k.startswith("normalized"))  # doctest: +NORMALIZE_WHITESPACE
        ['normalized', 'normalized/fc.weight', 'normalized_half_shift', 'normalized_half_shift/fc.weight',
         'normalized_stderr', 'normalized_stderr/fc.weight']
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    accumulator: Tensor

    def __init__(
        self,
        parameter_shapes: Optional[Mapping[str, Union[Sequence[int], Tensor]]] = None,
        lam: float = 0.5,
        num_replicates: int = 8,
        jackknife: str = "linearized",
        **kwargs: Any,
    ) -> None:
        if kwargs.get("dist_sync_on_step"):
            raise ValueError(
                "NormalizedSharpness does not support dist_sync_on_step=True (each forward would run "
                "update twice and the eq. 17 solves on synced states); call compute() when a "
                "value is needed."
            )
        if kwargs.get("dist_sync_fn") is not None:
            raise ValueError(
                "NormalizedSharpness synchronises with its own `dist_sync_fn` (all_reduce_sum: one "
                "all_reduce, memory flat in the number of processes); drop the argument."
            )
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not (0 < float(lam) < float("inf")):
            raise ValueError(f"`lam` (lambda of eq. 17) must be a positive finite number, got {lam!r}.")
        if (
            isinstance(num_replicates, bool)
            or not isinstance(num_replicates, numbers.Integral)
            or num_replicates < 1
        ):
            raise ValueError(
                f"`num_replicates` must be a positive int (8 is a good default; 1 disables the "
                f"standard error), got {num_replicates!r}."
            )
        if jackknife not in JACKKNIFE_MODES:
            raise ValueError(
                f"`jackknife` must be 'linearized' (leave-one-out values of eq. 17 to first order at "
                f"the pooled minimiser, the default) or 'solved' (every one solved and certified), "
                f"got {jackknife!r}."
            )
        layout = _layout_from_shapes(parameter_shapes)
        offsets = [0, *torch.tensor([shape.numel() for _, shape in layout]).cumsum(0).tolist()]
        shape = (int(num_replicates), offsets[-1] + 1)
        kwargs.setdefault(
            "compute_with_cache", False
        )  # a loaded or merged state is never shadowed by a cache
        super().__init__(dist_sync_fn=functools.partial(all_reduce_sum, shape=shape), **kwargs)
        self.lam = float(lam)
        self.num_replicates = int(num_replicates)
        self.jackknife = jackknife
        self._layout: Layout = layout
        self._offsets = offsets
        self._shape = shape
        self._weights: Optional[dict[str, Tensor]] = None
        self._weight_sources: Optional[dict[str, tuple[Tensor, int]]] = None  # what _weights was copied from
        self._slot_offset: Optional[int] = None
        self._states_persistent = False
        self._warned_no_stderr = False
        self._spare: Optional[Tensor] = None  # a released state buffer, overwritten by the first update
        # default: one (1, 1) zero, broadcast to (R, F + 1) on use (no idle full-size copy for reset);
        # the first update copies it to full size; later updates add in place
        self.add_state(_STATE, default=torch.zeros(1, 1, dtype=torch.float64), dist_reduce_fx="sum")

    # -- layout ----------------------------------------------------------------------------------

    def _check_layout(self, layout: Layout, source: str) -> None:
        if layout == self._layout:
            return
        known, new = dict(self._layout), dict(layout)
        if set(new) != set(known):
            raise ValueError(
                f"{source} names {sorted(set(new) - set(known))} not in `parameter_shapes` and lacks "
                f"{sorted(set(known) - set(new))}; NormalizedSharpness measures the fixed set of "
                f"weight tensors given at construction, {list(known)}. Use a new metric for a "
                f"different set."
            )
        changed = {n: (tuple(known[n]), tuple(new[n])) for n in new if new[n] != known[n]}
        if changed:
            raise ValueError(
                f"{source} changes tensor shapes {{name: (parameter_shapes, now)}}: {changed}; use a "
                f"new metric for a different architecture."
            )
        # same names and shapes in another order: fine (matched by name)

    @property
    def state_shape(self) -> tuple[int, int]:
        """``(R, F + 1)``: the shape of the full state (``R`` slots of ``F`` summed entries and a count)."""
        return (int(self._shape[0]), int(self._shape[1]))

    @property
    def parameter_shapes(self) -> dict[str, torch.Size]:
        """``{name: shape}`` of the measured weight tensors (fixed at construction)."""
        return dict(self._layout)

    @property
    def weights(self) -> Optional[dict[str, Tensor]]:
        """The float64 copy of the latest weights passed to ``update`` (``None`` before any)."""
        return None if self._weights is None else dict(self._weights)

    def _full_state(self) -> Tensor:
        """The state as ``(R, F + 1)`` (a broadcast view of the compact default before any update)."""
        acc = self.accumulator
        return acc if acc.shape == self._shape else acc.expand(*self._shape)

    @property
    def count(self) -> Tensor:
        """``(R,)`` int64 samples per replicate slot (a copy; the state is ``accumulator``)."""
        return self._full_state()[:, -1].round().to(torch.int64)

    def hessian_sums(self) -> dict[str, Tensor]:
        """``{name: (R, numel)}`` float64 views of the summed estimates, slot ``r`` holding
        ``sum_g n_g diag_g``."""
        acc = self._full_state()
        return {
            name: acc[:, self._offsets[i] : self._offsets[i + 1]] for i, (name, _) in enumerate(self._layout)
        }

    # -- update / compute ---------------------------------------------------------------------------

    def update(
        self,
        diagonals: Union[Mapping[str, Tensor], HessianDiagonalEstimate],
        weights: Mapping[str, Tensor],
        num_samples: Optional[NumSamples] = None,
    ) -> None:
        """Add Hessian-diagonal estimates, weighted by their sample counts, and keep the weights.

        Args:
            diagonals: ``{name: (*shape)}`` (one estimate; ``num_samples`` an int) or
                ``{name: (G, *shape)}`` (``G`` independent group estimates; ``num_samples`` a length-``G``
                sequence or 1-D tensor), or a ``HessianDiagonalEstimate`` (``num_samples`` omitted).
            weights: ``{name: W}`` with the same names, ``W.shape == shape``, ``ndim >= 1``.
            num_samples: samples behind each estimate (positive ints).
        """
        if isinstance(diagonals, HessianDiagonalEstimate):
            if num_samples is not None:
                raise ValueError(
                    "pass `num_samples` only with a mapping of diagonals; a "
                    "HessianDiagonalEstimate carries its own group sizes."
                )
            diagonals, num_samples = diagonals.groups, diagonals.group_sizes
        elif num_samples is None:
            raise TypeError(
                "`num_samples` is required with a mapping of diagonals: the number of samples "
                "behind each estimate (an int, or one int per group)."
            )
        sizes, stacked = _group_sizes(num_samples)
        layout = _check_estimates(diagonals, weights, sizes.numel(), stacked)
        self._check_layout(layout, "this update")

        acc = self._full_state()
        if acc.dtype != torch.float64:  # after set_dtype(): the sums were rounded, keep adding in float64
            acc = acc.to(torch.float64)
        device = acc.device
        if self._slot_offset is None:
            self._slot_offset = self._initial_slot_offset()
        num_groups = sizes.numel()
        slots = ((self._slot_offset + torch.arange(num_groups)) % self.num_replicates).tolist()
        with torch.inference_mode(False):  # normal tensors: Lightning validates under inference_mode
            if not (self.accumulator is acc and acc._base is None and not acc.is_inference()):
                # out of place (the compact default, a view or an inference tensor stays as it is): one
                # copy, into a buffer handed over by reuse_state() where there is one
                spare, self._spare = self._spare, None
                if spare is not None and spare.device == acc.device:
                    acc = spare.copy_(acc)
                else:
                    acc = acc.clone(memory_format=torch.contiguous_format)
            # each group's estimate straight into its slot's columns (float64 on the fly: no block copy)
            for (name, _), lo, hi in zip(self._layout, self._offsets, self._offsets[1:]):
                h = diagonals[name].detach().reshape(num_groups, -1)
                for g, slot in enumerate(slots):
                    acc[slot, lo:hi].add_(h[g].to(device=device), alpha=float(sizes[g]))
            for g, slot in enumerate(slots):
                acc[slot, -1] += float(sizes[g])
            if self.accumulator is not acc:
                self.accumulator = acc
            if not self._same_weights(
                weights
            ):  # copy unless they are the tensors of the last copy, unchanged
                self._weights = {
                    name: weights[name].detach().to(device=device, dtype=torch.float64, copy=True)
                    for name, _ in self._layout
                }
                self._weight_sources = {
                    name: (weights[name], weights[name]._version) for name, _ in self._layout
                }
        self._slot_offset += num_groups

    def release_state(self) -> Optional[Tensor]:
        """Reset the metric and hand over its full-size ``(R, F + 1)`` float64 state buffer, for
        :meth:`reuse_state` of a later metric with the same layout: its own state, or before any update
        the buffer given to :meth:`reuse_state` (``None`` when there is neither, or the state is a view
        or an inference tensor). The metric no longer refers to the buffer; the caller owns it (its
        values are this metric's sums until overwritten)."""
        acc = self.accumulator
        own = (
            acc.shape == self._shape
            and acc.dtype == torch.float64
            and acc._base is None
            and not acc.is_inference()
            and acc.is_contiguous()
        )
        spare, self._spare = self._spare, None
        self.reset()
        return acc if own else spare

    def reuse_state(self, buffer: Optional[Tensor]) -> None:
        """Let the first :meth:`update` after this call write its state into ``buffer`` (from
        :meth:`release_state` of a metric with the same ``parameter_shapes`` and ``num_replicates``)
        instead of a freshly allocated one; ``None`` does nothing.

        A fresh state is ``R x (F + 1)`` float64 (715 MB for a ResNet-18 at ``R = 8``); on the CPU each
        allocation of that size comes from the operating system and is paid again in page faults at its
        first write, which costs several times a pass over a buffer already mapped (measured in
        ``benchmarks/results/measurement_cost_round5.md``). The buffer is overwritten, not added to.

        Raises:
            ValueError: ``buffer`` is not a contiguous float64 tensor of this metric's state shape.
        """
        if buffer is None:
            return
        if (
            not isinstance(buffer, Tensor)
            or tuple(buffer.shape) != self.state_shape
            or buffer.dtype != torch.float64
            or not buffer.is_contiguous()
        ):
            raise ValueError(
                f"reuse_state needs a contiguous float64 tensor of shape {self.state_shape} (this metric's "
                f"state: {self.num_replicates} slots x {self._shape[1] - 1} weights + 1 count), got "
                f"{type(buffer).__name__} {tuple(getattr(buffer, 'shape', ()))} "
                f"{getattr(buffer, 'dtype', '')}; pass what release_state() of a metric with the same "
                "parameter_shapes and num_replicates returned."
            )
        self._spare = buffer

    def _same_weights(self, weights: Mapping[str, Tensor]) -> bool:
        """Whether ``weights`` are the very tensors of the kept copy, not modified since (version counter;
        the references held keep their ids from being reused)."""
        sources = self._weight_sources
        return (
            self._weights is not None
            and sources is not None
            and all(sources[n][0] is weights[n] and sources[n][1] == weights[n]._version for n in sources)
        )

    def update_from_estimate(self, estimate: HessianDiagonalEstimate, weights: Mapping[str, Tensor]) -> None:
        """``update(estimate.groups, weights, estimate.group_sizes)``: one slot per group of the estimate."""
        if not isinstance(estimate, HessianDiagonalEstimate):
            raise TypeError(
                f"`estimate` must be a HessianDiagonalEstimate (from hessian_diagonal_groups), "
                f"got {type(estimate).__name__}; use update(diagonals, weights, num_samples) for "
                f"a dict."
            )
        self.update(estimate, weights)

    def _initial_slot_offset(self) -> int:
        """Rank ``r`` starts at slot ``r mod R``, so single-group updates on different ranks fill different
        slots (the jackknife is symmetric in the slots: the start does not matter in one process)."""
        if self.distributed_available_fn():
            return torch.distributed.get_rank(self.process_group) % self.num_replicates
        return 0

    def compute(self) -> dict[str, Tensor]:
        """Every measure on the pooled Hessian diagonal, its jackknife standard error and the sample count.

        Eq. 17 for the pooled mean and the two halves of each tensor is solved as one cold batch; the
        leave-one-out values follow ``jackknife`` (see the class docstring).

        Returns:
            Flat ``{key: 0-dim tensor}``: ``"normalized"``, ``"matrix_normalized"``, ``"hessian_trace"``,
            ``"hessian_trace_weights"``, ``"<measure>/<name>"``, ``"<measure>_stderr"``,
            ``"<measure>_stderr/<name>"``, ``"<measure>_half_shift"``, ``"<measure>_half_shift/<name>"``
            (float64) and ``"num_samples"`` (int64).
        """
        count = self.count
        if int(count.sum()) == 0:
            raise RuntimeError(
                f"{type(self).__name__}.compute() has no samples to pool: call update() "
                f"(or update_from_estimate()) with Hessian-diagonal estimates first (after "
                f"reset() too)."
            )
        if self._weights is None:
            raise RuntimeError(
                f"{type(self).__name__}.compute() has no weights on this process (it never "
                f"ran update(), e.g. loaded without persistent states); call update() here "
                f"first."
            )
        device = self.accumulator.device
        weights = {n: w.to(device) for n, w in self._weights.items()}
        # the solves are thousands of small operations: in inference mode each skips autograd's view and
        # version bookkeeping (measured: benchmarks/RESULTS.md, round 28); the values are then copied out
        # as normal tensors (a few dozen scalars), usable anywhere
        with torch.inference_mode():
            inferred, used = replicate_sharpness_measures(
                weights, self.hessian_sums(), count, self.lam, self.jackknife
            )
        out = {key: value.clone() for key, value in inferred.items()}
        out["num_samples"] = count.sum()
        if used < 2 and not self._warned_no_stderr:
            self._warned_no_stderr = True
            rank_zero_warn(
                f"{type(self).__name__}: only {used} of num_replicates={self.num_replicates} "
                f"replicate slots hold samples, so the standard errors are NaN. Pass "
                f"num_groups >= 2 to hessian_diagonal_groups, or update over several batches, "
                f"with num_replicates >= 2.",
                UserWarning,
            )
        return out

    def sync(
        self,
        dist_sync_fn: Optional[Any] = None,
        process_group: Optional[Any] = None,
        should_sync: bool = True,
        distributed_available: Optional[Any] = None,
    ) -> None:
        """torchmetrics' ``sync``, with this metric's ``dist_sync_fn`` (one ``all_reduce``) as the default
        also when called directly (``Metric.sync`` itself defaults to an all-gather)."""
        super().sync(
            dist_sync_fn=dist_sync_fn or self.dist_sync_fn,
            process_group=process_group,
            should_sync=should_sync,
            distributed_available=distributed_available,
        )

    def merge_state(self, incoming_state: Union[dict[str, Any], Metric]) -> None:
        """Add the state of another ``NormalizedSharpness`` (same ``num_replicates`` and layout) or a dict."""
        if isinstance(incoming_state, NormalizedSharpness):
            if incoming_state.num_replicates != self.num_replicates:
                raise ValueError(
                    f"cannot merge a metric with num_replicates={incoming_state.num_replicates} "
                    f"into one with num_replicates={self.num_replicates}."
                )
            if incoming_state._layout != self._layout:
                raise ValueError(
                    f"cannot merge metrics with different parameter layouts: "
                    f"{incoming_state.parameter_shapes} into {self.parameter_shapes}."
                )
            if self._weights is None and incoming_state._weights is not None:
                self._weights = {
                    n: w.to(self.accumulator.device, copy=True) for n, w in incoming_state._weights.items()
                }
                self._weight_sources = None
        elif isinstance(incoming_state, Mapping) and _STATE in incoming_state:
            shape = tuple(torch.as_tensor(incoming_state[_STATE]).shape)
            if shape not in (self._shape, (1, 1)):
                raise ValueError(
                    f"cannot merge state {_STATE!r} of shape {shape} into shape "
                    f"{self._shape}: the parameter layouts differ."
                )
        super().merge_state(incoming_state)

    # -- (de)serialisation ------------------------------------------------------------------------

    def persistent(self, mode: bool = False) -> None:
        """Whether the state (and, with it, the weight copy) goes into ``state_dict``; default ``False``."""
        super().persistent(mode)
        self._states_persistent = mode

    def get_extra_state(self) -> dict[str, Any]:
        """Layout and slot offset (always), and the weight copy when the state is persistent."""
        return {
            "parameter_shapes": [(n, list(s)) for n, s in self._layout],
            "num_replicates": self.num_replicates,
            "slot_offset": self._slot_offset,
            "weights": (
                {n: w.detach().clone() for n, w in self._weights.items()}
                if self._states_persistent and self._weights is not None
                else None
            ),
        }

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` saved (the layout and ``num_replicates`` must match)."""
        if not isinstance(state, Mapping):
            raise ValueError(f"{type(self).__name__} cannot read extra state {state!r}.")
        if state.get("num_replicates", self.num_replicates) != self.num_replicates:
            raise ValueError(
                f"the state_dict has num_replicates={state['num_replicates']}, this metric "
                f"{self.num_replicates}; construct it with the same num_replicates."
            )
        shapes = state.get("parameter_shapes")
        if shapes is not None:
            layout = tuple((n, torch.Size(s)) for n, s in shapes)
            if layout != self._layout:
                raise ValueError(
                    f"the state_dict's parameter layout {dict(layout)} differs from this "
                    f"metric's {self.parameter_shapes} (a different shape); construct it with the "
                    f"same parameter_shapes."
                )
        self._slot_offset = state.get("slot_offset")
        if state.get("weights") is not None:
            with torch.inference_mode(False):
                self._weights = {
                    n: w.detach().to(device=self.accumulator.device, dtype=torch.float64, copy=True)
                    for n, w in state["weights"].items()
                }
            self._weight_sources = None
