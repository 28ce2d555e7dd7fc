r"""Normalized sharpness of a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``),
without gathering the whole model.

Under ``fully_shard`` every parameter is a ``DTensor`` sharded by rows (``Shard(0)``) over a 1-D
device mesh: rank ``r`` holds rows ``chunk(r)`` of every weight, and the forward pass gathers one
module's weights at a time. ``torch.autograd.grad`` with respect to those sharded parameters fails
(the forward uses the gathered copies), and the library's estimators and metric want whole tensors.
This module measures through the FSDP module itself:

1. **Estimate** (per batch, :meth:`ShardedSharpnessMeasurement.add`). One forward pass through the
   FSDP module, with forward hooks on the ``nn.Linear`` modules whose weights are measured,
   capturing each layer's input ``a_n`` and output ``z_n``. The per-sample loss Hessians in the
   logits are factored, ``Lambda_n = sum_k s_nk c_nk c_nk^T`` (signs ``s``, as
   :mod:`~lightning_flatness.functional.estimators.exact`), and the ``K`` columns ``c_k`` are
   propagated back to every ``z`` in one batched backward pass through the FSDP module
   (``is_grads_batched``; FSDP re-gathers one module's weights at a time; a loop of ``K`` passes if
   some backward has no vmap rule). Per layer, the Gauss-Newton diagonal of the summed per-sample
   losses is the contraction

   .. math:: D = \sum_n \sum_k s_{nk} \big(g_{nk}^\top a_n\big)^{\odot 2}
             \;\overset{\text{2-D inputs}}{=}\; \sum_n \big(\textstyle\sum_k s_{nk} g_{nk}^{\odot 2}\big)
             \big(a_n^{\odot 2}\big)^\top,

   with ``g_nk = dz_n`` of column ``k`` (for inputs with extra positions, ``g^T a`` sums over them
   first). ``D`` of this rank's samples is one whole tensor; it is summed over ranks
   (``all_reduce``), this rank keeps only its own rows, and the whole tensor is freed before the
   next layer. For networks linear in each weight (ReLU, max-pool, eval-mode BatchNorm, residual
   sums) the Gauss-Newton diagonal *is* the Hessian diagonal of Algorithm 1 (see
   :mod:`~lightning_flatness.functional.estimators.exact`, which checks this; this module does not
   re-check it: measure an unsharded copy of a small version of the model with ``method="auto"``
   once to confirm that ``"exact"`` applies).
2. **Pool** (as :class:`~lightning_flatness.metric.NormalizedSharpness`): batch ``b`` of every rank
   goes to replicate slot ``b mod R``; each rank keeps ``(R, its rows, ...)`` float64 sums and the
   ``(R,)`` sample counts (identical on every rank after the all-reduce).
3. **Solve** (:meth:`ShardedSharpnessMeasurement.compute`), one weight tensor and one diagonal at a
   time (the pooled one, the ``R`` leave-one-out ones, the two half-pools), **without gathering**:
   eq. 13 and eq. 5 are sums over entries (an all-reduce of three scalars), and eq. 17 is solved
   with the tensor's larger side split over the ranks
   (:mod:`~lightning_flatness.functional.solvers.column_split`), whose Newton system eliminates
   exactly those local variables, so every rank works on ``A`` and ``B`` of its part only and the
   ranks all-reduce vectors, scalars and the ``min(m, n)^2`` float32 Schur complement (at most the
   size of the weight). A tall or square ``(m, n)`` weight (``m >= n``) is split as each rank's
   rows, transposed; a wide one as blocks of whole columns, exchanged with one ``all_to_all_single``
   per diagonal (``1/P`` of the tensor in and out). Each problem starts cold (alternating sweeps,
   then Newton: fewer Newton steps than a warm start from the pooled solution, as in the metric;
   ``benchmarks/results/linearized_jackknife.md``), certified to ``POOLED_RTOL`` and
   ``REPLICATE_RTOL`` (both ``1e-11``, as the metric).
   Gathered whole instead, one diagonal at a time next to the whole weight, and solved as before
   (:func:`~lightning_flatness.functional.solvers.solve_normalized_sharpness`; the tensors are named in
   :attr:`ShardedSharpnessMeasurement.gathered_solves`): a tall weight of which some rank holds no
   row, a wide one with fewer columns than ranks, single-row tensors, and problems where
   neither every weight nor every clipped curvature entry is non-zero (pruned weights together
   with dead units: their components need a transitive closure; dead units alone stay split).
   1-D tensors (biases) have the trace alone, from the same all-reduced sums. The totals are sums over
   tensors, so the jackknife of the total (delete-one over slots) and the half-shift are assembled
   from the per-tensor values; the result has the keys of ``NormalizedSharpness.compute()`` and is
   identical on every rank. The leave-one-out values of eq. 17 follow ``jackknife`` as in the metric
   (:func:`~lightning_flatness.functional.replicate_measures.tensor_measures`): by default each
   replicate's objective at the pooled minimiser, as split sums over the ranks (one all-reduce per
   replicate) or on the gathered tensor, where the replicate keeps the pooled component or a part of
   it, and solved otherwise or when the tensor's half shift or relative spread says the first order is
   off. (One rare case is solved here where the unsharded metric may take the first order: zero
   weights with everywhere-positive pooled curvature and a replicate that is not; its components
   would need the transitive closure.)

**Values** equal those of the unsharded model over the same samples (the tests: 1e-6 relative in
float32, 1e-9 in float64, with 2 and 4 gloo processes). **Memory per rank**: the FSDP shard, the
``R x (its rows)`` float64 sums (``1/P`` of the unsharded metric's), one batch's activations and
layer-output gradients, and at most two whole tensors at a time (a layer's contribution ``D``
while estimating; the Schur complement, reduced in place, and its Cholesky factor while solving;
a weight and one diagonal for a gathered one); the solver's ``(m, n)`` workspace is split ``1/P``
per rank (measured: ``benchmarks/results/bench_sharded_memory_issue10.md``). **Cost per batch**:
one forward and one ``K``-column batched backward pass through the FSDP module (two all-gathers of
the model, module by module), one all-reduce of each measured weight's size; per measurement and
weight tensor up to ``R + 3`` eq. 17 solves (3 where every leave-one-out value is first order),
each ``1/P`` of the ``O(m n)`` passes per Newton iteration on every rank plus the
``O(min(m, n)^3)`` factor of the Schur complement on every rank, and about 15 small all-reduces
and one of ``min(m, n)^2`` float32 per iteration; one all-reduce per first-order replicate.

**Assumptions**: every rank calls :meth:`~ShardedSharpnessMeasurement.add` the same number of times
(each call runs collectives, as FSDP's own forward does; a rank with fewer samples passes empty
batches, and the ranks agree on the number ``K`` of backward columns before running them); the
measured weights are ``nn.Linear`` weights (and biases) sharded ``Shard(0)`` over a 1-D mesh, each
used once per forward; samples do not interact (eval mode); ``loss_fn`` is a mean of per-sample
losses. Anything else raises a ``ValueError`` that names it. The ranks run the same torch build with
the same number of intra-op threads (as launchers set them): the split solve takes its decisions
from computations replicated on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_flatness.batch_split import split_batch as default_split_batch
from lightning_flatness.functional.estimators.exact import _loss_factors
from lightning_flatness.functional.loss_forms import loss_for_outputs
from lightning_flatness.functional.losses import normalized_softmax_cross_entropy
from lightning_flatness.functional.measurement_context import measurement_context
from lightning_flatness.functional.measures import MEASURES, measure_totals
from lightning_flatness.functional.model_io import arguments_for, call_model, inputs_batch_size
from lightning_flatness.functional.parameters import ParameterSelection, select_parameters
from lightning_flatness.functional.replicate_measures import (
    JACKKNIFE_MODES,
    POOLED_RTOL,
    REPLICATE_RTOL,
    first_order_is_off,
)
from lightning_flatness.functional.solvers import (
    normalized_sharpness_coefficients,
    solve_normalized_sharpness,
)
from lightning_flatness.functional.solvers.column_split import GroupColumnReduction, solve_split_coefficients
from lightning_flatness.functional.solvers.linearized_replicates import linearizable, objective_at_minimiser

__all__ = ["ShardedSharpnessMeasurement", "is_sharded", "measure_sharpness_sharded"]

LossFn = Callable[[Tensor, Tensor], Tensor]
_CHUNK_ELEMENTS = 2**22  # per-sample gradients materialised at a time (inputs with extra positions)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (FSDP2 ``fully_shard``, tensor parallel)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _row_sharded(name: str, param: Tensor) -> None:
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        raise ValueError(
            f"{name} is not sharded (a plain {type(param).__name__}); the sharded measurement "
            "needs every measured weight under fully_shard: apply fully_shard to its module (or "
            "the root), or measure an unsharded model with lightning_flatness.measure_sharpness."
        )
    if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        raise ValueError(
            f"{name} is placed as {tuple(param.placements)} on a {param.device_mesh.ndim}-D mesh; "
            "the sharded measurement supports FSDP2's default row sharding (Shard(0)) over a 1-D "
            "mesh only (no HSDP, no tensor parallelism)."
        )


class _Capture:
    """Forward hooks on the measured Linear modules: each call's input (detached) and output."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.records: dict[str, tuple[Tensor, Tensor]] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if name in self.records:
                raise ValueError(
                    f"module {name!r} ran twice in one forward pass; the sharded measurement "
                    "needs each measured weight used once (shared weights are not supported)."
                )
            self.records[name] = (args[0].detach(), output)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _weight_contribution(a: Tensor, g: Tensor, signs: Tensor) -> Tensor:
    """``sum_n sum_k s_nk (g_nk^T a_n)^2``: ``a`` ``(N, *pos, I)``, ``g`` ``(K, N, *pos, O)``,
    ``signs`` ``(N, K)``."""
    k, n = g.shape[:2]
    if a.ndim == 2:  # one position per sample: the square factorises
        s = torch.einsum("nk,kno->no", signs, g * g)
        return s.T @ (a * a)
    positions = math.prod(a.shape[1:-1])
    a = a.reshape(n, positions, a.shape[-1])  # (N, P, I)
    g = g.reshape(k, n, positions, g.shape[-1]).transpose(0, 1)  # (N, K, P, O)
    out = torch.zeros(g.shape[-1], a.shape[-1], dtype=a.dtype, device=a.device)
    chunk = max(1, _CHUNK_ELEMENTS // (k * out.numel()))
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        per_sample = torch.einsum("nkpo,npi->nkoi", g[sl], a[sl])  # per-sample gradients of each column
        out += torch.einsum("nk,nkoi->oi", signs[sl], per_sample * per_sample)
    return out


def _bias_contribution(g: Tensor, signs: Tensor) -> Tensor:
    k, n = g.shape[:2]
    gb = g.reshape(k, n, math.prod(g.shape[2:-1]), g.shape[-1]).sum(
        dim=2
    )  # (K, N, O) per-sample bias gradients
    return torch.einsum("nk,kno->o", signs, gb * gb)


class ShardedSharpnessMeasurement:
    """One measurement of a ``fully_shard`` model, fed one batch at a time on every rank.

    Args:
        model: the FSDP2 module (its measured weights ``DTensor`` s sharded ``Shard(0)``), in the mode
            to measure (``model.eval()``). Never modified: no parameter, buffer or ``.grad`` changes.
        loss_fn: ``(logits, target) -> mean loss``; default the normalized softmax cross-entropy of
            eq. 20-22.
        parameters: which weight tensors count (:func:`select_parameters`); they must belong to
            ``nn.Linear`` modules.
        lam: the ``lambda`` of eq. 17.
        num_replicates: replicate slots of the jackknife (batch ``b`` of every rank goes to slot
            ``b mod num_replicates``).
        jackknife: ``"linearized"`` (default) or ``"solved"``, as for
            :class:`~lightning_flatness.metric.NormalizedSharpness`.

    Example (run on every rank of the process group; the tests use 2 and 4 gloo processes)::

        mesh = init_device_mesh("cpu", (world_size,))
        for layer in model: fully_shard(layer, mesh=mesh) if isinstance(layer, nn.Linear) else None
        fully_shard(model, mesh=mesh)
        measurement = ShardedSharpnessMeasurement(model.eval())
        for x, y in my_share_of_the_batches:   # the same number of batches on every rank
            measurement.add(x, y)
        values = measurement.compute()          # identical on every rank
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        loss_fn: Optional[LossFn] = None,
        parameters: ParameterSelection = None,
        lam: float = 0.5,
        num_replicates: int = 8,
        jackknife: str = "linearized",
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ShardedSharpnessMeasurement needs an initialised torch.distributed process group "
                "(the one the model was sharded over); call torch.distributed.init_process_group "
                "first, or use lightning_flatness.measure_sharpness for an unsharded model."
            )
        if not isinstance(num_replicates, int) or num_replicates < 1:
            raise ValueError(f"num_replicates must be a positive int, got {num_replicates!r}.")
        if jackknife not in JACKKNIFE_MODES:
            raise ValueError(f"jackknife must be one of {JACKKNIFE_MODES}, got {jackknife!r}.")
        self.jackknife = jackknife
        self.model = model
        self.loss_fn: LossFn = normalized_softmax_cross_entropy if loss_fn is None else loss_fn
        self.lam = float(lam)
        self.num_replicates = num_replicates
        self.params = select_parameters(model, parameters)
        owners = {
            f"{prefix}.{pname}" if prefix else pname: (prefix, module, pname)
            for prefix, module in model.named_modules()
            for pname, _ in module.named_parameters(recurse=False)
        }
        self.modules: dict[str, nn.Module] = {}
        self.roles: dict[str, tuple[str, str]] = {}  # parameter name -> (module name, "weight" | "bias")
        for name, param in self.params.items():
            prefix, module, pname = owners[name]
            # fully_shard swaps the class to a subclass (FSDPLinear) that keeps Linear's forward
            linear = isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
            if not linear or pname not in ("weight", "bias"):
                raise ValueError(
                    f"{name} belongs to a {type(module).__name__}; the sharded measurement supports "
                    "nn.Linear weights and biases only (convolutions: measure an unsharded copy, or "
                    "pass `parameters=` to leave them out)."
                )
            _row_sharded(name, param)
            self.modules[prefix] = module
            self.roles[name] = (prefix, pname)
        first = next(iter(self.params.values()))
        self.mesh = first.device_mesh
        self.group = self.mesh.get_group()
        self.device = first.device
        self.sums = {
            name: torch.zeros((num_replicates, *p.to_local().shape), dtype=torch.float64, device=self.device)
            for name, p in self.params.items()
        }
        self.count = torch.zeros(num_replicates, dtype=torch.int64, device=self.device)
        self.num_batches = 0
        #: the largest number of elements held in one whole (unsharded) tensor by this module
        self.largest_whole_tensor = 0
        #: the tensors whose eq. 17 solve gathered them whole in the last ``compute()`` (module docstring)
        self.gathered_solves: set[str] = set()
        #: per weight tensor, how many leave-one-out values of eq. 17 the last ``compute()`` took to first
        #: order (the others were solved)
        self.first_order_replicates: dict[str, int] = {}

    # -- estimate -----------------------------------------------------------------------------------

    def _local_rows(self, name: str, whole: Tensor) -> Tensor:
        """This rank's rows of a whole tensor shaped like parameter ``name`` (FSDP2's chunking)."""
        from torch.distributed.tensor import distribute_tensor

        param = self.params[name]
        local = distribute_tensor(whole, self.mesh, param.placements, src_data_rank=None).to_local()
        assert local.shape == param.to_local().shape, (name, local.shape, param.to_local().shape)
        return local

    def _whole(self, name: str, local: Tensor) -> Tensor:
        """All ranks' rows of a tensor shaped like parameter ``name``, gathered whole on every rank."""
        from torch.distributed.tensor import DTensor

        param = self.params[name]
        whole = DTensor.from_local(
            local.contiguous(),
            self.mesh,
            param.placements,
            shape=param.shape,
            stride=torch.empty(param.shape, device="meta").stride(),
        ).full_tensor()
        self.largest_whole_tensor = max(self.largest_whole_tensor, whole.numel())
        return whole

    def add(self, inputs: Any, target: Tensor) -> None:
        """Estimate the Gauss-Newton diagonal of this rank's batch, sum it over ranks into the rows of
        each rank, slot ``num_batches mod R``. A collective: every rank calls it the same number of times."""
        with measurement_context(self.model):  # e.g. the user's module backward hooks: not for our columns
            self._add(inputs, target)

    def _add(self, inputs: Any, target: Tensor) -> None:
        n = inputs_batch_size(inputs)
        capture = _Capture(self.modules)
        try:
            with torch.enable_grad():
                logits = call_model(self.model, arguments_for(self.model, inputs))
        finally:
            capture.remove()
        missing = sorted(set(self.modules) - set(capture.records))
        if missing:
            raise ValueError(
                f"the forward pass did not call {missing}; measure only the weights the model uses."
            )
        if n > 0:
            factors, signs, _, issues = _loss_factors(loss_for_outputs(self.loss_fn, logits), logits, target)
            if issues:
                raise ValueError("; ".join(issues) + ".")
        else:  # an empty share still takes part in FSDP's collectives
            factors = logits.new_zeros(0, math.prod(logits.shape[1:]), 0)
            signs = logits.new_zeros(0, 0)
        # every rank must run the same number of backward passes (FSDP gathers weights in each): pad
        # this rank's K columns with zero columns up to the largest K of any rank
        k = torch.tensor([factors.shape[2]], dtype=torch.int64, device=self.device)
        dist.all_reduce(k, op=dist.ReduceOp.MAX, group=self.group)
        k = int(k[0])
        pad = k - factors.shape[2]
        factors = torch.cat([factors, factors.new_zeros(*factors.shape[:2], pad)], dim=2)
        signs = torch.cat([signs, signs.new_zeros(signs.shape[0], pad)], dim=1)
        names = list(self.modules)
        outputs = [capture.records[m][1] for m in names]
        columns = factors.permute(2, 0, 1).reshape(k, *logits.shape)
        if k == 0:
            stacked = [z.new_zeros(0, *z.shape) for z in outputs]
        else:
            try:  # all K columns in one backward pass: FSDP gathers each module's weights once
                stacked = list(
                    torch.autograd.grad(logits, outputs, columns, retain_graph=True, is_grads_batched=True)
                )
            except (
                RuntimeError,
                NotImplementedError,
            ):  # a backward without a vmap rule (the same on every rank)
                per_column = [torch.autograd.grad(logits, outputs, c, retain_graph=True) for c in columns]
                stacked = [torch.stack([c[i] for c in per_column]) for i in range(len(outputs))]
        grads = {m: g.to(torch.float64) for m, g in zip(names, stacked)}
        del stacked, logits, outputs
        signs = signs.to(torch.float64)
        slot = self.num_batches % self.num_replicates
        for name, (module_name, role) in self.roles.items():
            a, g = capture.records[module_name][0].to(torch.float64), grads[module_name]
            whole = _weight_contribution(a, g, signs) if role == "weight" else _bias_contribution(g, signs)
            self.largest_whole_tensor = max(self.largest_whole_tensor, whole.numel())
            dist.all_reduce(whole, group=self.group)  # sum over ranks' samples
            self.sums[name][slot] += self._local_rows(name, whole)
            del whole
        count = torch.tensor([n], dtype=torch.int64, device=self.device)
        dist.all_reduce(count, group=self.group)
        self.count[slot] += count[0]
        self.num_batches += 1

    # -- solve --------------------------------------------------------------------------------------

    def compute(self) -> dict[str, Tensor]:
        """Every measure on the pooled diagonal, with jackknife standard errors and half-shifts: the
        keys and meaning of :meth:`NormalizedSharpness.compute`, identical on every rank."""
        if int(self.count.sum()) == 0:
            raise RuntimeError("ShardedSharpnessMeasurement.compute() has no samples: call add() first.")
        counts = self.count.to(torch.float64)
        total = counts.sum()
        used = [int(r) for r in torch.nonzero(self.count > 0).flatten().tolist()]
        halves = [used[0::2], used[1::2]]
        self.gathered_solves = set()
        self.first_order_replicates = {}
        out: dict[str, Tensor] = {}
        loo_values: list[dict[str, Tensor]] = [{} for _ in used]
        half_values: list[dict[str, Tensor]] = [{}, {}]
        for name, sums in self.sums.items():
            solver = _TensorSolver(self, name)
            totals = sums.sum(dim=0)
            out.update(solver.measures(totals / total, POOLED_RTOL, pooled=True))
            if len(used) >= 2:
                for i, slots in enumerate(halves):
                    half_values[i].update(
                        solver.measures(sums[slots].sum(dim=0) / counts[slots].sum(), REPLICATE_RTOL)
                    )
                means = [(totals - sums[r]) / (total - counts[r]) for r in used]
                loo = self._leave_one_out(solver, means, out, half_values)
                for i, values in enumerate(loo):
                    loo_values[i].update(values)
            if solver.gathered:
                self.gathered_solves.add(name)
            del solver, totals
        for values in [out, *loo_values, *half_values]:
            per_tensor = {
                n: {m: values[f"{m}/{n}"] for m in MEASURES if f"{m}/{n}" in values} for n in self.sums
            }
            values.update(measure_totals(per_tensor))
        keys = list(out)
        nan = torch.tensor(math.nan, dtype=torch.float64, device=self.device)
        for key in keys:
            stderr_key = key.replace("/", "_stderr/", 1) if "/" in key else f"{key}_stderr"
            shift_key = key.replace("/", "_half_shift/", 1) if "/" in key else f"{key}_half_shift"
            if len(used) >= 2:
                loo = torch.stack([v[key] for v in loo_values])
                r = loo.shape[0]
                out[stderr_key] = torch.sqrt((r - 1) / r * (loo - loo.mean()).pow(2).sum())
                out[shift_key] = (half_values[0][key] + half_values[1][key]) / 2 - out[key]
            else:
                out[stderr_key], out[shift_key] = nan.clone(), nan.clone()
        out["num_samples"] = self.count.sum()
        return out

    def _leave_one_out(
        self, solver: _TensorSolver, means: list[Tensor], pooled: dict, halves: list[dict]
    ) -> list[dict[str, Tensor]]:
        """The measures of one tensor on its leave-one-out means (this rank's rows): eq. 17 to first
        order where ``jackknife="linearized"`` allows it (the rules of
        :func:`~lightning_flatness.functional.replicate_measures.tensor_measures`), solved otherwise.
        Every decision comes from all-reduced values, so every rank takes the same path."""
        first = [solver.first_order(m) if self.jackknife == "linearized" else None for m in means]
        values = [f if f is not None else solver.measures(m, REPLICATE_RTOL) for m, f in zip(means, first)]
        key = f"normalized/{solver.name}"
        if key not in pooled:  # a 1-D tensor: the trace alone
            return values
        self.first_order_replicates[solver.name] = sum(f is not None for f in first)
        if all(f is None for f in first):
            return values
        loo = torch.stack([v[key] for v in values])
        if first_order_is_off(loo, torch.stack([h[key] for h in halves]), pooled[key]):
            values = [
                v if f is None else solver.measures(m, REPLICATE_RTOL)
                for m, f, v in zip(means, first, values)
            ]
            self.first_order_replicates[solver.name] = 0
        return values

    def state_bytes(self) -> int:
        """Bytes of this rank's persistent state (the sharded replicate sums and the counts)."""
        return sum(s.numel() * s.element_size() for s in self.sums.values()) + self.count.numel() * 8


class _TensorSolver:
    """The three measures of one sharded weight tensor ``(m, n)`` for diagonals given by their local rows.

    Eq. 13 and eq. 5 from three all-reduced sums. Eq. 17 with its larger side split over the ranks
    (:func:`solve_split_coefficients`): a tall or square weight (``m >= n``) as the transposed rows of
    each rank (when every rank holds one); a wide one (``m < n``) as blocks of whole columns, which the
    ranks exchange with one ``all_to_all`` per diagonal (each sends its rows of every block: ``1/P`` of
    the tensor in, ``1/P`` out); on the gathered tensor otherwise (fewer columns than ranks, single-row
    tensors) or when neither coefficient matrix is positive everywhere. 1-D tensors have the trace
    alone, from the all-reduced sums. ``gathered`` says whether any solve gathered the tensor.
    """

    def __init__(self, owner: ShardedSharpnessMeasurement, name: str) -> None:
        self.owner, self.name = owner, name
        self.group = owner.group
        self.weight = owner.params[name].to_local().detach().to(torch.float64)  # (its rows, n)
        self.shape = tuple(owner.params[name].shape)
        world = dist.get_world_size(self.group)
        counts = torch.zeros(world, dtype=torch.int64, device=owner.device)
        counts[dist.get_rank(self.group)] = self.weight.shape[0]
        dist.all_reduce(counts, group=self.group)
        self.row_counts = [int(c) for c in counts.tolist()]  # rows of each rank (FSDP2's chunks)
        m, n = self.shape if len(self.shape) == 2 else (0, 0)
        self.layout = None
        if len(self.shape) == 2 and m >= n >= 2 and min(self.row_counts) >= 1:
            self.layout = "rows"  # this rank's rows, transposed: columns of the (n, m) problem
        elif len(self.shape) == 2 and 2 <= m < n and n >= world:
            self.layout = "columns"  # whole columns of the (m, n) problem, exchanged
            self.column_counts = [len(c) for c in torch.arange(n).tensor_split(world)]
        self.comm = GroupColumnReduction(self.group)
        self.squared = torch.stack([self.weight.square().sum()])
        self.b = None if self.layout is None else self._block(self.weight.square() / (2.0 * owner.lam))
        self.gathered = False
        self.pooled: Optional[tuple[str, Any, Any]] = None  # see measures(pooled=True)

    def _block(self, local: Tensor) -> Tensor:
        """This rank's columns of the split problem, from its rows ``local`` of a weight-shaped tensor."""
        if self.layout == "rows":
            return local.T.contiguous()
        rank = dist.get_rank(self.group)
        send = torch.cat([part.reshape(-1) for part in local.split(self.column_counts, dim=1)])
        mine = self.column_counts[rank]
        received = send.new_empty(self.shape[0] * mine)
        dist.all_to_all_single(
            received,
            send,
            output_split_sizes=[rows * mine for rows in self.row_counts],
            input_split_sizes=[local.shape[0] * cols for cols in self.column_counts],
            group=self.group,
        )
        return received.view(self.shape[0], mine)  # ranks' rows in order: the whole columns

    def _closed_forms(self, local_mean: Tensor) -> dict[str, Tensor]:
        """Eq. 13 and eq. 5 from three all-reduced sums (the trace alone for a 1-D tensor)."""
        sums = torch.cat([self.squared, torch.stack([local_mean.clamp_min(0).sum(), local_mean.sum()])])
        dist.all_reduce(sums, group=self.group)
        if len(self.shape) < 2:  # a bias or normalization scale: the trace alone (footnote 5, eq. 5)
            return {f"hessian_trace/{self.name}": sums[2]}
        return {
            f"matrix_normalized/{self.name}": torch.sqrt(sums[0] * sums[1]),
            f"hessian_trace/{self.name}": sums[2],
        }

    def measures(self, local_mean: Tensor, rtol: float, pooled: bool = False) -> dict[str, Tensor]:
        """Every measure on one mean (this rank's rows); ``pooled``: keep the eq. 17 solution (and, when
        gathered, the whole coefficients) for :meth:`first_order`."""
        values = self._closed_forms(local_mean)
        if len(self.shape) < 2:
            return values
        name = self.name
        solution = None
        if self.layout is not None:
            a = self._block(local_mean.clamp_min(0))
            solution = solve_split_coefficients(a, self.b, self.comm, rtol=rtol, shape=self.shape)
            if solution is not None and pooled:
                positive = torch.stack([(a > 0).all(), (self.b > 0).all()]).to(torch.float64)
                self.pooled = ("split", solution, self.comm.min(positive) > 0)
            del a
        if solution is not None:
            values[f"normalized/{name}"] = solution.value
            return values
        self.gathered = True
        # gathered: the weight and the diagonal whole, one at a time
        weight, mean = self.owner._whole(name, self.weight), self.owner._whole(name, local_mean)
        solution = solve_normalized_sharpness(weight, mean, self.owner.lam, rtol=rtol)
        if pooled:
            a0, b = normalized_sharpness_coefficients(weight, mean, self.owner.lam)
            self.pooled = ("gathered", solution, (weight, a0, b))
        values[f"normalized/{name}"] = solution.value
        return values

    def first_order(self, local_mean: Tensor) -> Optional[dict[str, Tensor]]:
        """The measures on a leave-one-out mean with eq. 17 to first order at the pooled minimiser
        (:mod:`~lightning_flatness.functional.solvers.linearized_replicates`), or None where the
        replicate's components are not the pooled ones or a part of them (then it must be solved)."""
        values = self._closed_forms(local_mean)
        if len(self.shape) < 2:
            return values
        if self.pooled is None:
            return None
        kind, sol, extra = self.pooled
        if kind == "gathered":
            weight, a0, b = extra
            whole = self.owner._whole(self.name, local_mean)
            a = normalized_sharpness_coefficients(weight, whole, self.owner.lam)[0][None]
            covered, keep = linearizable(a, b, a0)
            if not bool(covered[0]):
                return None
            value = objective_at_minimiser(a, b, sol.row_log_variance, sol.col_log_variance, keep)[0]
            values[f"normalized/{self.name}"] = value
            return values
        every_a, every_b = bool(extra[0]), bool(extra[1])
        a = self._block(local_mean.clamp_min(0))
        positive = a > 0
        rows0, cols0 = torch.isfinite(sol.row_log_variance), torch.isfinite(sol.col_log_variance)
        if every_b:  # the component: the rows and columns with a positive A (as solve_split_coefficients)
            rows = self.comm.max(positive.any(dim=1).to(torch.float64)) > 0
            cols = positive.any(dim=0)
            outside = torch.stack([(rows & ~rows0).any() | ~rows.any(), (cols & ~cols0).any()])
        elif every_a:  # the component is fixed by B: the same layout while every A stays positive
            rows, cols = rows0, cols0
            outside = torch.stack([~positive.all(), torch.zeros((), dtype=torch.bool, device=a.device)])
        else:
            return None
        if bool(self.comm.max(outside.to(torch.float64)).any()):  # a unit alive outside the pooled ones
            return None
        local = objective_at_minimiser(  # this rank's columns; the sum over them completes it
            a[None], self.b, sol.row_log_variance, sol.col_log_variance, (rows[None], cols[None])
        )
        (value,) = self.comm.sum(local)
        values[f"normalized/{self.name}"] = value[0]
        return values


def measure_sharpness_sharded(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    loss_fn: Optional[LossFn] = None,
    parameters: ParameterSelection = None,
    lam: float = 0.5,
    num_replicates: int = 8,
    split_batch: Callable[[Any], tuple[Any, Tensor]] = default_split_batch,
    jackknife: str = "linearized",
) -> dict[str, Tensor]:
    """:class:`ShardedSharpnessMeasurement` over this rank's ``batches`` (the same number on every
    rank); returns the values of :meth:`~ShardedSharpnessMeasurement.compute`, identical on every rank."""
    measurement = ShardedSharpnessMeasurement(
        model,
        loss_fn=loss_fn,
        parameters=parameters,
        lam=lam,
        num_replicates=num_replicates,
        jackknife=jackknife,
    )
    for batch in batches:
        inputs, target = split_batch(batch)
        measurement.add(inputs, target)
    return measurement.compute()


# -- SharpnessMonitor under FSDP2 (Lightning's ModelParallelStrategy, or fully_shard in configure_model) --


def prepare_in_callback(monitor: Any, trainer: Any, pl_module: nn.Module) -> None:
    """``SharpnessMonitor._prepare`` for a sharded module: checks the method and the weights (no dry run:
    the library's estimators cannot differentiate through ``DTensor`` parameters)."""
    if monitor.method not in ("auto", "exact"):
        raise ValueError(
            f"SharpnessMonitor(method={monitor.method!r}) cannot measure the sharded (FSDP2) "
            f"{type(pl_module).__name__}: sharded models are measured by the exact Gauss-Newton "
            "diagonal of lightning_flatness.sharded only; pass method='auto' or 'exact'."
        )
    ShardedSharpnessMeasurement(
        monitor.measured_network(pl_module),
        loss_fn=monitor.loss_fn,
        parameters=monitor.parameters,
        lam=monitor.lam,
        num_replicates=monitor.num_replicates,
        jackknife=monitor.jackknife,
    )  # raises, naming what it cannot measure
    from lightning_flatness.functional.estimators.method_choice import MethodChoice

    monitor._choice = MethodChoice(
        "exact",
        "gauss_newton",
        "the model is sharded (FSDP2): the Gauss-Newton "
        "diagonal, shard by shard (lightning_flatness.sharded)",
    )
    monitor._resolved_method = "exact"
    monitor._loss = monitor.loss_fn


def _rank_batches(
    monitor: Any, trainer: Any, pl_module: nn.Module, device: torch.device
) -> Iterator[tuple[Any, Tensor]]:
    """This rank's share of the subset (``indices[global_rank::world_size]``) as ``(inputs, target)``, in as
    many batches as every other rank (so some may be empty), through ``pl_module``'s batch-transfer hooks
    (:func:`~lightning_flatness.batch_transfer.as_training_step_gets_it`) onto ``device``."""
    from lightning_flatness.batch_transfer import as_training_step_gets_it
    from lightning_flatness.functional.model_io import select_samples
    from lightning_flatness.training_subset import chunk_sizes

    rank, world = trainer.global_rank, trainer.world_size
    indices = monitor._indices
    share = indices[rank::world]
    size = monitor._batch_size()
    largest = len(indices[0::world])
    if trainer.fast_dev_run:
        share, largest = share[:size], min(largest, size)
    count = len(chunk_sizes(largest, size, monitor.num_replicates))

    def split(batch: Any) -> Any:  # as training_step gets it: through the batch-transfer hooks
        return monitor._split(as_training_step_gets_it(trainer, pl_module, batch, device))

    for chunk in share.tensor_split(count):
        if len(chunk):
            yield split(next(monitor._subset.batches(chunk, [len(chunk)], seed=monitor._seed)))
        else:  # an empty batch of the same structure: this rank still joins the collectives
            inputs, target = split(next(monitor._subset.batches(indices[:1], [1])))
            yield select_samples(inputs, slice(0, 0), 1), target[:0]


def measure_in_callback(monitor: Any, trainer: Any, pl_module: nn.Module) -> tuple[dict[str, float], float]:
    """``SharpnessMonitor._measure`` for a sharded module: the same values (identical on every rank) and
    seconds, measured on the live module in eval mode (modes restored) and in its own parameter dtype
    (the contractions are float64), with :class:`ShardedSharpnessMeasurement`."""
    import time
    import warnings

    from lightning_flatness.isolation import autograd_tensor, gradient_enabled, preserved_rng_states

    start = time.perf_counter()
    if monitor.dataloader is not None:
        raise ValueError(
            "SharpnessMonitor(dataloader=...) is not supported for sharded (FSDP2) models, whose "
            "ranks must measure the same number of batches; let it draw its subset of the training set."
        )
    network = monitor.measured_network(pl_module)
    device = next(iter(network.parameters())).device
    modes = {m: m.training for m in pl_module.modules()}
    measurement = ShardedSharpnessMeasurement(
        network,
        loss_fn=monitor._loss,
        parameters=monitor.parameters,
        lam=monitor.lam,
        num_replicates=monitor.num_replicates,
        jackknife=monitor.jackknife,
    )
    dtype = next(iter(measurement.params.values())).dtype
    try:
        with preserved_rng_states(), gradient_enabled(device):
            pl_module.eval()
            for inputs, target in _rank_batches(monitor, trainer, pl_module, device):
                measurement.add(_to_device(inputs, device, dtype), autograd_tensor(target, device, dtype))
            values = {k: float(v) for k, v in measurement.compute().items()}
    finally:
        for module, training in modes.items():
            module.train(training)
        monitor._evaluations += 1
    if not all(math.isfinite(v) for k, v in values.items() if "/" not in k and "stderr" not in k):
        warnings.warn(
            "SharpnessMonitor: the sharded measurement is not finite (check the learning rate and data).",
            UserWarning,
            stacklevel=2,
        )
    return values, time.perf_counter() - start


def _to_device(inputs: Any, device: torch.device, dtype: torch.dtype) -> Any:
    from lightning_flatness.functional.model_io import map_inputs
    from lightning_flatness.isolation import autograd_tensor

    return map_inputs(inputs, lambda t: autograd_tensor(t, device, dtype))
