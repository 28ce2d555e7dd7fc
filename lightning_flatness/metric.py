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
import zlib
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn

from lightning_flatness.functional.estimators.api import HessianDiagonalEstimate
from lightning_flatness.functional.measures import sharpness_measures

__all__ = ["NormalizedSharpness"]

NumSamples = Union[int, Sequence[int], Tensor]
Layout = tuple[tuple[str, torch.Size], ...]

_COUNT = "count"
_SUM_PREFIX = "hessian_sum_"
_EXTRA_STATE_KEY = "_extra_state"  # torch.nn.Module's key for get_extra_state()


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
            raise TypeError(f"`num_samples` must hold integers (sample counts), got a {num_samples.dtype} "
                            f"tensor; pass e.g. torch.tensor([32, 32]) or [32, 32].")
        if num_samples.ndim > 1:
            raise ValueError(f"`num_samples` must be an int or 1-D (one count per group), got shape "
                             f"{tuple(num_samples.shape)}.")
        stacked = num_samples.ndim == 1
        sizes = num_samples.detach().reshape(-1).to(device="cpu", dtype=torch.int64)
    elif isinstance(num_samples, Sequence) and not isinstance(num_samples, str):
        bad = [n for n in num_samples if isinstance(n, bool) or not isinstance(n, (numbers.Integral, Tensor))
               or (isinstance(n, Tensor) and (n.ndim != 0 or n.is_floating_point() or n.dtype == torch.bool))]
        if bad:
            raise TypeError(f"`num_samples` must be a sequence of ints (one count per group), got "
                            f"{num_samples!r}.")
        sizes, stacked = torch.tensor([int(n) for n in num_samples], dtype=torch.int64), True
    else:
        raise TypeError(f"`num_samples` must be an int (one estimate) or a sequence/1-D tensor of ints "
                        f"(one per group), got {type(num_samples).__name__}.")
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
        raise TypeError(f"`diagonals` must be a non-empty mapping {{name: Hessian diagonal}}, got "
                        f"{type(diagonals).__name__}.")
    if not isinstance(weights, Mapping):
        raise TypeError(f"`weights` must be a mapping {{name: weight tensor}} (e.g. from "
                        f"select_parameters), got {type(weights).__name__}.")
    if set(diagonals) != set(weights):
        raise ValueError(f"`diagonals` and `weights` must name the same tensors; only in diagonals: "
                         f"{sorted(set(diagonals) - set(weights))}, only in weights: "
                         f"{sorted(set(weights) - set(diagonals))}.")
    layout = []
    for name, h in diagonals.items():
        w = weights[name]
        if not isinstance(w, Tensor) or not isinstance(h, Tensor):
            raise TypeError(f"weight and Hessian diagonal of {name!r} must be tensors, got "
                            f"{type(w).__name__} and {type(h).__name__}.")
        if not (w.is_floating_point() and h.is_floating_point()):
            raise TypeError(f"weight and Hessian diagonal of {name!r} must be floating point, got "
                            f"{w.dtype} and {h.dtype}.")
        if w.ndim < 2:
            raise ValueError(f"weight {name!r} has shape {tuple(w.shape)}; the normalized measures need "
                             f"ndim >= 2 (rows x columns; footnote 5 leaves biases out). Drop it from the "
                             f"estimates.")
        expected = (num_groups, *w.shape) if stacked else tuple(w.shape)
        if tuple(h.shape) != expected:
            how = (f"(G, *weight.shape) = {expected} for num_samples with G={num_groups} entries" if stacked
                   else f"the weight's shape {expected} for an int num_samples (pass one count per group "
                        f"for a leading group dim)")
            raise ValueError(f"Hessian diagonal of {name!r} has shape {tuple(h.shape)}; expected {how}.")
        layout.append((name, torch.Size(w.shape)))
    nonfinite = [n for n, h in diagonals.items() if not bool(torch.isfinite(h).all())]
    if nonfinite:
        raise ValueError(f"Hessian diagonals of {nonfinite} contain NaN or inf; fix the estimate (e.g. a "
                         f"smaller finite-difference step, float64) before passing it to "
                         f"NormalizedSharpness.")
    return tuple(layout)


def _derived_key(key: str, suffix: str) -> str:
    """``"normalized"`` -> ``"normalized_<suffix>"``, ``"normalized/fc.weight"`` ->
    ``"normalized_<suffix>/fc.weight"``."""
    measure, sep, rest = key.partition("/")
    return f"{measure}_{suffix}{sep}{rest}"


def _stderr_key(key: str) -> str:
    return _derived_key(key, "stderr")


def _jackknife_standard_error(leave_one_out: Tensor) -> Tensor:
    """Delete-one jackknife standard error ``sqrt((R-1)/R * sum_r (S_(-r) - mean_r S_(-r))^2)``.

    Args:
        leave_one_out: ``(R, ...)``, the statistic evaluated with replicate ``r`` left out, ``R >= 2``.
    """
    r = leave_one_out.shape[0]
    deviation = leave_one_out - leave_one_out.mean(dim=0)
    return torch.sqrt((r - 1) / r * deviation.pow(2).sum(dim=0))


def _normalized_sharpness_compute(
    weights: Mapping[str, Tensor], sums: Mapping[str, Tensor], counts: Tensor, lam: float
) -> tuple[dict[str, Tensor], int]:
    """Every measure on the pooled mean, and its jackknife standard error over the replicates.

    Args:
        weights: ``{name: W}`` float64.
        sums: ``{name: (R, numel)}`` float64, slot ``r`` holding ``sum_g n_g * diag_g`` of its groups.
        counts: ``(R,)`` int64 samples per slot.
        lam: ``lambda`` of eq. 17.

    Returns:
        The flat dict (see :meth:`NormalizedSharpness.compute`) and the number of non-empty slots
        used by the jackknife (stderr entries are NaN when it is below 2).
    """
    counts_f = counts.to(torch.float64)
    total = counts_f.sum()
    totals = {n: s.sum(dim=0) for n, s in sums.items()}
    pooled = {n: (totals[n] / total).reshape(weights[n].shape) for n in sums}
    out = sharpness_measures(weights, pooled, lam)
    used = [int(r) for r in torch.nonzero(counts > 0).flatten().tolist()]
    if len(used) >= 2:
        replicates = []
        for r in used:
            rest = total - counts_f[r]
            loo = {n: ((totals[n] - sums[n][r]) / rest).reshape(weights[n].shape) for n in sums}
            replicates.append(sharpness_measures(weights, loo, lam))
        stderr = {_stderr_key(k): _jackknife_standard_error(torch.stack([rep[k] for rep in replicates]))
                  for k in out}
        halves = [_pooled_measures(weights, sums, counts_f, used[i::2], lam) for i in (0, 1)]
        shift = {_derived_key(k, "half_shift"): (halves[0][k] + halves[1][k]) / 2 - out[k] for k in out}
    else:
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=total.device)
        stderr = {_stderr_key(k): nan.clone() for k in out}
        shift = {_derived_key(k, "half_shift"): nan.clone() for k in out}
    out.update(stderr)
    out.update(shift)
    out["num_samples"] = counts.sum()
    return out, len(used)


def _pooled_measures(
    weights: Mapping[str, Tensor], sums: Mapping[str, Tensor], counts_f: Tensor, slots: list[int], lam: float
) -> dict[str, Tensor]:
    """The measures on the pooled mean of the given replicate slots only."""
    total = counts_f[slots].sum()
    pooled = {n: (s[slots].sum(dim=0) / total).reshape(weights[n].shape) for n, s in sums.items()}
    return sharpness_measures(weights, pooled, lam)


def _normal_tensors(method: Callable) -> Callable:
    """Run ``method`` outside inference mode, so the tensors it creates stay updatable in place later
    (Lightning validates under ``torch.inference_mode``; inference tensors reject in-place updates
    outside it)."""

    @functools.wraps(method)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False):
            return method(*args, **kwargs)

    return wrapped


def _zeros_view(rows: int, cols: int, device: torch.device) -> Tensor:
    """A ``(rows, cols)`` float64 zero tensor backed by one element (a state's reset default)."""
    return torch.zeros((), dtype=torch.float64, device=device).expand(rows, cols)


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
    - ``weights``: ``{name: W}``, the weight tensors the diagonals belong to (``ndim >= 2``).
    - ``num_samples``: samples behind each estimate, used as its weight in the pooled mean.

    As output of ``compute`` (and ``forward``) the metric returns a flat dict of float64 0-dim
    tensors: ``"normalized"``, ``"matrix_normalized"``, ``"hessian_trace"`` (sums over tensors),
    ``"<measure>/<name>"`` per tensor, ``"<measure>_stderr"`` and ``"<measure>_stderr/<name>"``
    (jackknife; NaN with a one-time warning when fewer than 2 slots hold samples),
    ``"<measure>_half_shift"`` and ``"<measure>_half_shift/<name>"`` (the convergence diagnostic
    above; NaN likewise), and ``"num_samples"`` (int64, total over all updates and processes).

    Parameter names and shapes are fixed by the first update (states for them are added then), or
    up front by ``parameter_shapes``; every later update must use the same names and shapes, and
    ``reset()`` zeroes the sums but keeps this layout. Under DDP, pass ``parameter_shapes`` when a
    process may reach ``compute()`` without any ``update()``: otherwise the layouts differ and every
    process raises (rather than hang).

    State and cost: states ``hessian_sum_<i>`` (one ``(R, numel)`` float64 sum per weight tensor,
    in layout order) and ``count`` (``(R,)`` int64), i.e. ``8 R`` bytes per weight entry, plus
    ``8`` bytes per entry for the float64 copy of the latest weights (the reset defaults are
    one-element views, not copies). Synchronisation sums the states in place with
    ``torch.distributed.all_reduce`` (no all-gather: memory does not grow with the number of
    processes; torchmetrics keeps one local copy to restore after ``compute``); put the metric on
    the device of your backend (``metric.to(device)``; NCCL needs CUDA tensors). Under DDP, rank
    ``k`` starts filling slot ``k mod R`` so that single-group updates of different ranks land in
    different slots. ``update`` costs ``O(G * numel)``; ``compute`` evaluates
    ``sharpness_measures`` ``R' + 3`` times (pooled, leave-one-out, two halves). All arithmetic is
    float64 (not available on Apple MPS); ``.to(dtype)`` / ``set_dtype`` leave the states' dtypes alone. States are not in
    ``state_dict`` unless ``persistent(True)`` (torchmetrics' default); the layout always is (as
    extra state), and with persistent states the weight copy too, so a loaded metric can compute.

    The latest ``weights`` are kept as a detached float64 copy in a plain attribute: neither a
    metric state (they are not summed across processes: DDP keeps them identical on every rank) nor
    a submodule (``state_dict`` / ``.to()`` never recurse into the trained model); ``.to(device)``
    moves the copy along.

    Args:
        lam: the PAC-Bayes ``lambda`` of eq. 17 (positive; the normalized value scales as
            ``lam ** -0.5``).
        num_replicates: number ``R >= 1`` of replicate slots for the jackknife (``R = 1``: no
            standard error, least memory).
        parameter_shapes: optional ``{name: shape}`` fixing the layout at construction (e.g.
            ``{n: p.shape for n, p in select_parameters(model).items()}``); default: from the first
            update.
        kwargs: Additional keyword arguments of :class:`torchmetrics.Metric`; ``dist_sync_fn`` is
            not supported (states are reduced with ``all_reduce``).

    Example:
        >>> import torch
        >>> from lightning_flatness.metric import NormalizedSharpness
        >>> metric = NormalizedSharpness(lam=0.5, num_replicates=4)
        >>> weights = {"fc.weight": torch.tensor([[1.0, -2.0], [0.5, 3.0]])}
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

    count: Tensor

    def __init__(
        self,
        lam: float = 0.5,
        num_replicates: int = 8,
        parameter_shapes: Optional[Mapping[str, Sequence[int]]] = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("dist_sync_fn") is not None:
            raise ValueError("NormalizedSharpness does not take `dist_sync_fn`: it reduces its states with "
                             "torch.distributed.all_reduce(SUM) instead of an all-gather; drop the argument.")
        super().__init__(**kwargs)
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not (0 < float(lam) < float("inf")):
            raise ValueError(f"`lam` (lambda of eq. 17) must be a positive finite number, got {lam!r}.")
        if (isinstance(num_replicates, bool) or not isinstance(num_replicates, numbers.Integral)
                or num_replicates < 1):
            raise ValueError(f"`num_replicates` must be a positive int (8 is a good default; 1 disables the "
                             f"standard error), got {num_replicates!r}.")
        self.lam = float(lam)
        self.num_replicates = int(num_replicates)
        self._layout: Optional[Layout] = None
        self._weights: Optional[dict[str, Tensor]] = None
        self._slot_offset: Optional[int] = None
        self._persistent_mode = False
        self._warned_no_stderr = False
        self.add_state(_COUNT, default=torch.zeros(self.num_replicates, dtype=torch.int64),
                       dist_reduce_fx="sum")
        if parameter_shapes is not None:
            self._set_layout(self._layout_from_shapes(parameter_shapes))

    # -- layout ----------------------------------------------------------------------------------

    @staticmethod
    def _layout_from_shapes(parameter_shapes: Mapping[str, Sequence[int]]) -> Layout:
        if not isinstance(parameter_shapes, Mapping) or not parameter_shapes:
            raise ValueError(f"`parameter_shapes` must be a non-empty mapping {{name: shape}}, got "
                             f"{parameter_shapes!r}.")
        layout = []
        for name, shape in parameter_shapes.items():
            if not isinstance(name, str):
                raise TypeError(f"`parameter_shapes` keys must be parameter names (str), got {name!r}.")
            try:
                size = torch.Size(shape)
            except TypeError as err:
                raise TypeError(f"`parameter_shapes[{name!r}]` must be a shape (sequence of ints), got "
                                f"{shape!r}.") from err
            if len(size) < 2:
                raise ValueError(f"`parameter_shapes[{name!r}]` = {tuple(size)}; the normalized measures "
                                 f"need ndim >= 2 (footnote 5 leaves biases out).")
            layout.append((name, size))
        return tuple(layout)

    def _sum_keys(self) -> list[str]:
        return [f"{_SUM_PREFIX}{i}" for i in range(len(self._layout or ()))]

    @_normal_tensors
    def _set_layout(self, layout: Layout) -> None:
        """Fix the tensor names and shapes and add one ``(R, numel)`` float64 sum state per tensor."""
        self._layout = layout
        device = self.count.device
        for key, (_, shape) in zip(self._sum_keys(), layout):
            self.add_state(key, default=torch.zeros(self.num_replicates, shape.numel(), dtype=torch.float64,
                                                    device=device),
                           dist_reduce_fx="sum", persistent=self._persistent_mode)
            # the reset default need not hold R * numel zeros: one element, expanded
            self._defaults[key] = _zeros_view(self.num_replicates, shape.numel(), device)

    def _check_layout(self, layout: Layout, source: str) -> None:
        if self._layout is None:
            self._set_layout(layout)
            return
        if layout == self._layout:
            return
        known = dict(self._layout)
        new = dict(layout)
        if set(new) != set(known):
            raise ValueError(f"{source} names {sorted(set(new) - set(known))} not seen before and lacks "
                             f"{sorted(set(known) - set(new))}; NormalizedSharpness measures a fixed set of "
                             f"weight tensors, {list(known)}, fixed by its first update or "
                             f"`parameter_shapes`. Use a new metric for a different set.")
        changed = {n: (tuple(known[n]), tuple(new[n])) for n in new if new[n] != known[n]}
        if changed:
            raise ValueError(f"{source} changes tensor shapes {{name: (before, now)}}: {changed}; use a new "
                             f"metric for a different architecture.")
        # same names and shapes in another order: fine for update (matched by name)

    @property
    def parameter_shapes(self) -> Optional[dict[str, torch.Size]]:
        """``{name: shape}`` of the measured weight tensors, or ``None`` before the first update."""
        return None if self._layout is None else dict(self._layout)

    @property
    def weights(self) -> Optional[dict[str, Tensor]]:
        """The float64 copy of the latest weights passed to ``update`` (``None`` before any)."""
        return None if self._weights is None else dict(self._weights)

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
            weights: ``{name: W}`` with the same names, ``W.shape == shape``, ``ndim >= 2``.
            num_samples: samples behind each estimate (positive ints).
        """
        if isinstance(diagonals, HessianDiagonalEstimate):
            if num_samples is not None:
                raise ValueError("pass `num_samples` only with a mapping of diagonals; a "
                                 "HessianDiagonalEstimate carries its own group sizes.")
            diagonals, num_samples = diagonals.groups, diagonals.group_sizes
        elif num_samples is None:
            raise TypeError("`num_samples` is required with a mapping of diagonals: the number of samples "
                            "behind each estimate (an int, or one int per group).")
        sizes, stacked = _group_sizes(num_samples)
        layout = _check_estimates(diagonals, weights, sizes.numel(), stacked)
        self._check_layout(layout, "this update")

        device = self.count.device
        if self._slot_offset is None:
            self._slot_offset = self._initial_slot_offset()
        num_groups = sizes.numel()
        slots = (self._slot_offset + torch.arange(num_groups)) % self.num_replicates
        slots = slots.to(device)
        sizes = sizes.to(device)
        scale = sizes.to(torch.float64).unsqueeze(1)
        for key, (name, _) in zip(self._sum_keys(), self._layout):
            d = diagonals[name].detach().to(device=device, dtype=torch.float64).reshape(num_groups, -1)
            getattr(self, key).index_add_(0, slots, d * scale)
        self.count.index_add_(0, slots, sizes)
        self._slot_offset += num_groups
        with torch.inference_mode(False):
            self._weights = {name: weights[name].detach().to(device=device, dtype=torch.float64, copy=True)
                             for name, _ in self._layout}

    def update_from_estimate(self, estimate: HessianDiagonalEstimate, weights: Mapping[str, Tensor]) -> None:
        """``update(estimate.groups, weights, estimate.group_sizes)``: one slot per group of the estimate."""
        if not isinstance(estimate, HessianDiagonalEstimate):
            raise TypeError(f"`estimate` must be a HessianDiagonalEstimate (from hessian_diagonal_groups), "
                            f"got {type(estimate).__name__}; use update(diagonals, weights, num_samples) for "
                            f"a dict.")
        self.update(estimate, weights)

    def _forward_full_state_update(self, *args: Any, **kwargs: Any) -> Any:
        """torchmetrics' full-state ``forward`` (``dist_sync_on_step=True``) runs ``update`` twice, once
        for the global state and once for the batch value: only the first may advance the slot offset."""
        before = self._slot_offset
        value = super()._forward_full_state_update(*args, **kwargs)
        start = self._initial_slot_offset() if before is None else before
        self._slot_offset = start + (self._slot_offset - start) // 2
        return value

    def _initial_slot_offset(self) -> int:
        """Rank ``r`` starts at slot ``r mod R``, so single-group updates on different ranks fill different
        slots (the jackknife is symmetric in the slots: the start does not matter in one process)."""
        if self.distributed_available_fn():
            return torch.distributed.get_rank(self.process_group) % self.num_replicates
        return 0

    def compute(self) -> dict[str, Tensor]:
        """Every measure on the pooled Hessian diagonal, its jackknife standard error and the sample count.

        Returns:
            Flat ``{key: 0-dim tensor}``: ``"normalized"``, ``"matrix_normalized"``, ``"hessian_trace"``,
            ``"<measure>/<name>"``, ``"<measure>_stderr"``, ``"<measure>_stderr/<name>"`` (float64) and
            ``"num_samples"`` (int64).
        """
        if self._layout is None or int(self.count.sum()) == 0:
            raise RuntimeError(f"{type(self).__name__}.compute() has no samples to pool: call update() "
                               f"(or update_from_estimate()) with Hessian-diagonal estimates first (after "
                               f"reset() too).")
        if self._weights is None:
            raise RuntimeError(f"{type(self).__name__}.compute() has no weights on this process (it never "
                               f"ran update(), e.g. loaded without persistent states); call update() here "
                               f"first.")
        sums = {name: getattr(self, key) for key, (name, _) in zip(self._sum_keys(), self._layout)}
        out, used = _normalized_sharpness_compute(self._weights, sums, self.count, self.lam)
        if used < 2 and not self._warned_no_stderr:
            self._warned_no_stderr = True
            rank_zero_warn(f"{type(self).__name__}: only {used} of num_replicates={self.num_replicates} "
                           f"replicate slots hold samples, so the standard errors are NaN. Pass "
                           f"num_groups >= 2 to hessian_diagonal_groups, or update over several batches, "
                           f"with num_replicates >= 2.", UserWarning)
        return out

    @_normal_tensors
    def reset(self) -> None:
        """Zero the sums and sample counts; the layout, the latest weights and the slot offset stay."""
        super().reset()

    @_normal_tensors
    def _copy_state_dict(self) -> dict[str, Union[Tensor, list[Any]]]:
        return super()._copy_state_dict()

    # -- distributed -------------------------------------------------------------------------------

    def _layout_fingerprint(self) -> int:
        if self._layout is None:
            return 0
        text = repr((self.num_replicates, [(n, tuple(s)) for n, s in self._layout]))
        return zlib.crc32(text.encode()) + 1

    def _sync_dist(
        self, dist_sync_fn: Optional[Callable] = None, process_group: Optional[Any] = None
    ) -> None:
        """Sum the states over processes in place with ``all_reduce(SUM)`` (``dist_sync_fn`` is unused).

        ``Metric.sync`` has already cached the local states and ``unsync`` restores them. One small
        collective first compares the layouts, so that processes with different layouts all raise
        instead of deadlocking in mismatched collectives.
        """
        dist = torch.distributed
        group = process_group or self.process_group
        fingerprint = self._layout_fingerprint()
        check = torch.tensor([fingerprint, -fingerprint], dtype=torch.int64, device=self.count.device)
        dist.all_reduce(check, op=dist.ReduceOp.MAX, group=group)
        if int(check[0]) != fingerprint or -int(check[1]) != fingerprint:
            raise RuntimeError(f"{type(self).__name__} has different parameter layouts on different "
                               f"processes (this one: {self.parameter_shapes}); every process must update "
                               f"with the same weight tensors, and a process that may not update must get "
                               f"`parameter_shapes=` at construction.")
        works = []
        for key in [_COUNT, *self._sum_keys()]:
            state = getattr(self, key)
            if not state.is_contiguous():
                state = state.contiguous()
                setattr(self, key, state)
            works.append(dist.all_reduce(state, op=dist.ReduceOp.SUM, group=group, async_op=True))
        for work in works:
            work.wait()

    @_normal_tensors
    def _reduce_states(self, incoming_state: dict[str, Any]) -> None:
        """Add another state (``forward``, ``merge_state``); a state from before the layout was known
        (all counts zero) contributes zero sums."""
        incoming = dict(incoming_state)
        unknown = sorted(set(incoming) - set(self._defaults))
        if unknown:
            raise ValueError(f"cannot merge states {unknown} into {type(self).__name__} with layout "
                             f"{self.parameter_shapes}: the parameter layouts differ.")
        empty = _COUNT in incoming and int(torch.as_tensor(incoming[_COUNT]).sum()) == 0
        for key in self._sum_keys():
            if key not in incoming and empty:
                incoming[key] = torch.zeros_like(getattr(self, key))
            if key in incoming and tuple(incoming[key].shape) != tuple(getattr(self, key).shape):
                raise ValueError(f"cannot merge state {key!r} of shape {tuple(incoming[key].shape)} into "
                                 f"shape {tuple(getattr(self, key).shape)}: the parameter layouts differ.")
        super()._reduce_states(incoming)

    def merge_state(self, incoming_state: Union[dict[str, Any], Metric]) -> None:
        """Add the state of another ``NormalizedSharpness`` (same ``num_replicates`` and layout) or a dict."""
        if isinstance(incoming_state, NormalizedSharpness):
            if incoming_state.num_replicates != self.num_replicates:
                raise ValueError(f"cannot merge a metric with num_replicates={incoming_state.num_replicates} "
                                 f"into one with num_replicates={self.num_replicates}.")
            if incoming_state._layout is not None:
                if self._layout is None:
                    self._set_layout(incoming_state._layout)
                elif incoming_state._layout != self._layout:
                    raise ValueError(f"cannot merge metrics with different parameter layouts: "
                                     f"{incoming_state.parameter_shapes} into {self.parameter_shapes}.")
            if self._weights is None and incoming_state._weights is not None:
                self._weights = {n: w.to(self.count.device, copy=True)
                                 for n, w in incoming_state._weights.items()}
        super().merge_state(incoming_state)

    # -- device moves and (de)serialisation ---------------------------------------------------------

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = ()) -> torch.nn.Module:
        """Move states and the weight copy to a new device; never change their dtypes."""
        own = [_COUNT, *self._sum_keys()]
        this = super()._apply(fn, exclude_state=(*exclude_state, *own))
        device = this._device
        for key in own:
            if key in exclude_state:
                continue
            setattr(this, key, getattr(this, key).to(device))
            default = this._defaults[key]
            this._defaults[key] = _zeros_view(*default.shape, device) if key != _COUNT else default.to(device)
        if this._weights is not None:
            this._weights = {n: w.to(device) for n, w in this._weights.items()}
        return this

    def persistent(self, mode: bool = False) -> None:
        """Whether the states (and, with them, the weight copy) go into ``state_dict``; default ``False``."""
        super().persistent(mode)
        self._persistent_mode = mode

    def get_extra_state(self) -> dict[str, Any]:
        """Layout and slot offset (always), and the weight copy when the states are persistent."""
        return {
            "parameter_shapes": None if self._layout is None else [(n, list(s)) for n, s in self._layout],
            "num_replicates": self.num_replicates,
            "slot_offset": self._slot_offset,
            "weights": ({n: w.detach().clone() for n, w in self._weights.items()}
                        if self._persistent.get(_COUNT, False) and self._weights is not None else None),
        }

    @_normal_tensors
    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` saved (the layout must match if this metric has one)."""
        if not isinstance(state, Mapping):
            raise ValueError(f"{type(self).__name__} cannot read extra state {state!r}.")
        if state.get("num_replicates", self.num_replicates) != self.num_replicates:
            raise ValueError(f"the state_dict has num_replicates={state['num_replicates']}, this metric "
                             f"{self.num_replicates}; construct it with the same num_replicates.")
        shapes = state.get("parameter_shapes")
        if shapes is not None:
            layout = tuple((n, torch.Size(s)) for n, s in shapes)
            if self._layout is None:
                self._set_layout(layout)
            elif layout != self._layout:
                raise ValueError(f"the state_dict's parameter layout {dict(layout)} differs from this "
                                 f"metric's {self.parameter_shapes}; load it into a fresh metric.")
        self._slot_offset = state.get("slot_offset")
        if state.get("weights") is not None:
            self._weights = {n: w.detach().to(device=self.count.device, dtype=torch.float64, copy=True)
                             for n, w in state["weights"].items()}

    @_normal_tensors
    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Create the layout's states before loading them; copy loaded states (never alias the dict)."""
        extra = state_dict.get(prefix + _EXTRA_STATE_KEY)
        if isinstance(extra, Mapping) and extra.get("parameter_shapes") is not None and self._layout is None:
            self.set_extra_state(extra)
        dtypes = {_COUNT: torch.int64, **{key: torch.float64 for key in self._sum_keys()}}
        for key, dtype in dtypes.items():
            name = prefix + key
            if name in state_dict:
                value = torch.as_tensor(state_dict[name])
                expected = tuple(getattr(self, key).shape)
                if tuple(value.shape) != expected:
                    raise ValueError(f"state_dict entry {name!r} has shape {tuple(value.shape)}, expected "
                                     f"{expected} (num_replicates={self.num_replicates}, layout "
                                     f"{self.parameter_shapes}).")
                state_dict[name] = value.to(device=self.count.device, dtype=dtype, copy=True).contiguous()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._computed = None  # a cached result belongs to the old state
        if int(self.count.sum()) > 0:  # loaded samples count as updated (no "compute before update" warning)
            self._update_count = max(self._update_count, 1)
