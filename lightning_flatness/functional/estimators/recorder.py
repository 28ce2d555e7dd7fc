"""The recorded forward pass shared by the exact and sketched estimators: one run of the model under a
torch function mode (:class:`_ForwardRecorder`) with fresh leaves for the selected weights, which records

- every call of a layer rule's op whose weight or bias is a selected weight, or a function of the selected
  weights alone (a transpose, a cloned bias, weight standardization), as a
  :class:`~.layer_rules.base.LayerCall` for the per-layer contractions, and every selected weight (or
  function of weights) added to the data and broadcast over the samples (an ``offset`` call: a position
  embedding, a relative position bias). A tensor is a function of the weights when no tensor computed from
  the model's inputs (followed by identity, from the inputs on) or with one row per sample enters it; an
  output computed that way blocks the per-layer path;
- every operation on weight-dependent tensors, checked against the tables of :mod:`.op_tables`: the
  reasons the Hessian diagonal differs from the Gauss-Newton diagonal (``issues``), the weights used
  outside a layer rule's op (``other_uses``), the random draws, and with ``record_nodes`` the nonlinear
  operations as :class:`~.node_rules.NodeCall` s for :mod:`.hessian_sketch`;
- the operations of the folded-column backward pass (:class:`~.layer_rules.column_backward.ColumnTape`).

Also here: the checks that decide between the per-layer path and per-sample backward passes
(:func:`_fast_path_blockers`, the batch-independence probe's rows: :func:`rows_of_other_samples`).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_flatness.functional.backward_hooks import left_out_tensor_hook, registers_tensor_hook
from lightning_flatness.functional.batch_first_transformers import batch_first_transformers
from lightning_flatness.functional.composite_attention import (
    ExplicitAttentionCalls,
    explicit_multi_head_attention,
)
from lightning_flatness.functional.composite_recurrent import explicit_recurrent_layers
from lightning_flatness.functional.dense_experts import dense_experts
from lightning_flatness.functional.estimators.layer_rules import LAYER_RULES, LayerCall
from lightning_flatness.functional.estimators.layer_rules.column_backward import ColumnTape
from lightning_flatness.functional.estimators.node_rules import NODE_RULES, NodeCall
from lightning_flatness.functional.estimators.node_rules.elementwise import UNARY_OPS
from lightning_flatness.functional.estimators.node_rules.weight_functions import (
    WeightFunctionRule,
    covered_input,
)
from lightning_flatness.functional.estimators.op_tables import (
    _ADDITIVE_ARGUMENT,
    _DIVISIONS,
    _MAY_DRAW_RANDOM_NUMBERS,
    _MODE_DEFAULT,
    _MODE_DEPENDENT_OPS,
    _RANDOM_FUNCTIONS,
    MULTILINEAR_OPS,
    PIECEWISE_LINEAR_OPS,
    SELECTION_OPS,
    _argument,
    _keeps_samples_apart,
    _op_name,
    _requiring_grad,
    _tensors,
    sets_requires_grad,
)
from lightning_flatness.functional.explicit_activations import explicit_activations
from lightning_flatness.functional.explicit_glu import ExplicitGlu
from lightning_flatness.functional.explicit_sdpa import ExplicitAttention
from lightning_flatness.functional.model_io import ModelInputs, extract_logits, inputs_batch_size, map_inputs
from lightning_flatness.functional.module_walk import modules_of
from lightning_flatness.functional.out_of_place_division import OutOfPlaceDivision
from lightning_flatness.functional.rms_norm_modules import rms_norms_as_one_op
from lightning_flatness.functional.weight_stack_products import WeightStackProducts

__all__ = ["rows_of_other_samples"]


@dataclass
class WeightFunctionCall:
    """One recorded nonlinear op on a selected weight alone (:mod:`.node_rules.weight_functions`)."""

    op: str
    rule: WeightFunctionRule
    args: tuple
    kwargs: dict
    output: Tensor
    weight: str  # the selected weight the op's input holds entry for entry


#: most entries of a function of the weights alone (or of the tensor it selects from) whose elementwise
#: nonlinear op's curvature the sketched Hessian diagonal takes exactly (one backward pass through the
#: weights' function per entry, batched:
#: :func:`~lightning_flatness.functional.estimators.hessian_sketch._derived_elementwise_diagonals`)
DERIVED_ELEMENTWISE_MAX_ENTRIES = 1 << 15


@dataclass
class DerivedElementwiseCall:
    """One recorded unary elementwise nonlinear op (:data:`~.node_rules.elementwise.UNARY_OPS`) on a
    function of the selected weights alone that no rule of :mod:`.node_rules.weight_functions` covers (the
    sigmoid of Swin V2's position-bias MLP): ``node.inputs[0]`` is that function ``t``, in the graph;
    ``sources`` the selected weights it depends on; ``root`` the tensor ``u`` that ``t`` selects from
    (``t = P u`` by :data:`SELECTION_OPS`: Swin V2's bias table gathered for every pair of positions), or
    ``t`` itself. With ``P`` a selection, ``P^T D P`` is diagonal for a diagonal ``D``, so the op's term
    ``J_t^T D J_t`` is ``J_u^T diag(P^T d) J_u``: taken on ``u``'s fewer entries."""

    node: NodeCall
    sources: tuple[str, ...]
    root: Tensor
    #: where ``root`` is the output of a module called on constants (Swin V2's position-bias MLP on its
    #: grid): ``(module, positional arguments, its parameters and buffers as they were in the call)``
    producer: Optional[tuple[nn.Module, tuple, dict[str, Tensor]]] = None


class _ForwardRecorder(TorchFunctionMode):
    """Records the selected layers' calls and every operation on weight-dependent tensors.

    A tensor depends on the selected weights iff it requires grad: the forward runs with every
    other parameter and the inputs detached.
    """

    def __init__(
        self,
        leaves: dict[str, Tensor],
        clone_outputs: bool = False,
        batch_size: int = -1,
        data: Iterable[Tensor] = (),
    ):
        super().__init__()
        self.leaves = leaves
        # ids of the tensors computed from the model's inputs (``data``) or from constants with one row per
        # sample, weight-dependent or not: an op on selected weights and other constants alone is a function
        # of the weights. An id is dropped when an op produces a new tensor from other arguments (a freed
        # data tensor's id reused)
        self.data_ids: set[int] = {id(t) for t in data}
        #: the shapes of the tensors computed from the data (a constant of one of them, its rows all alike,
        #: is per-sample data: :meth:`_holds_rows_per_sample`)
        self.data_shapes: set[tuple[int, ...]] = {tuple(t.shape) for t in data}
        #: the ids of the model's own parameters and buffers (as swapped in for the forward): never per-sample
        #: data, whatever their shape (a bias as long as the batch)
        self.module_tensor_ids: set[int] = set()
        # whether the model's output was a function of the weights alone (set by _record_forward): then
        # the layer calls do not describe it, and the per-layer path does not apply
        self.output_is_weight_function = False
        # whether every operation on weight-dependent tensors provably keeps the samples (dim 0 of
        # size batch_size) apart (see _keeps_samples_apart); then the batch-independence probe is
        # not needed
        self.batch_size = batch_size
        self.samples_apart = batch_size >= 1
        # whether the batch-independence probe has run on this recorded forward and found the samples apart
        # (later groups of columns through the same forward skip it)
        self.probe_passed = False
        # give the model a clone of each recorded layer output (else the output itself; then an
        # in-place change of it, seen by its version counter, calls for a forward with clones)
        self.clone_outputs = clone_outputs
        self.names_by_id = {id(t): n for n, t in leaves.items()}
        self.module_stack: list[str] = []
        self.calls: list[LayerCall] = []
        self.uses: dict[str, list[str]] = {n: [] for n in leaves}  # parameter -> ops using it
        self.other_uses: dict[str, list[str]] = {n: [] for n in leaves}
        self.issues: list[str] = []
        self.random_ops: list[str] = []  # calls that draw random numbers (train-mode dropout, rand, ...)
        self._seen_nodes: dict[int, Any] = {}  # grad_fn nodes of outputs of observed operations
        # the operations with hand-written backward formulas for the K columns folded into the batch
        # (layer_rules.column_backward), with the copies of the layer outputs as identities
        self.tape = ColumnTape(set(self.names_by_id))
        # with record_nodes (the sketched Hessian diagonal): every flagged operation that a node rule
        # covers (its local curvature, node_rules), and the flagged ones that none covers
        self.nodes: Optional[list[NodeCall]] = None
        self.uncovered: list[str] = []
        # with record_nodes: linear calls of a selected weight on a weight-dependent input, as
        # products (h, W) (node_rules.tied_linear: their curvature matters for a weight used twice)
        self.weight_products: list[NodeCall] = []
        # functions of the selected weights alone (a transpose, a clone, weight standardization or
        # normalization): {id: (tensor, the leaves' names)}; a layer call that takes one as its weight or
        # bias is recorded under a name of its own, {name: (tensor, leaves' names)} in derived_weights, and
        # its per-sample gradients are pulled back to the leaves (layer_rules.shared)
        self.derived: dict[int, tuple[Tensor, frozenset[str]]] = {}
        self.derived_weights: dict[str, tuple[Tensor, tuple[str, ...]]] = {}
        self._derived_names: dict[int, str] = {}
        # with record_nodes: nonlinear functions of one selected weight alone that a rule of
        # node_rules.weight_functions covers (weight standardization): their curvature's exact diagonal
        self.weight_functions: list[WeightFunctionCall] = []
        # ... and unary elementwise ones on any function of the weights alone (DerivedElementwiseCall)
        self.derived_elementwise: list[DerivedElementwiseCall] = []
        # {id of a function of the weights: (it, the tensor it selects from by SELECTION_OPS)}, both kept
        # alive (an entry counts only for the tensor itself: ids of freed tensors are reused)
        self._selected_from: dict[int, tuple[Tensor, Tensor]] = {}
        # {id of a function of the weights alone output by a module called on constants: (it, the
        # DerivedElementwiseCall's producer)}, filled by _ModuleNames' hook
        self.module_outputs: dict[int, tuple[Tensor, tuple[nn.Module, tuple, dict[str, Tensor]]]] = {}

    # -- bookkeeping -----------------------------------------------------------------------
    def where(self) -> str:
        return self.module_stack[-1] if self.module_stack else "the model's forward"

    def mark_seen(self, tensors: Iterable[Tensor]) -> None:
        for t in tensors:
            if t.grad_fn is not None:
                self._seen_nodes[id(t.grad_fn)] = t.grad_fn

    def produced_by_seen_op(self, t: Tensor) -> bool:
        return t.grad_fn is None or id(t.grad_fn) in self._seen_nodes

    def flag(self, message: str) -> None:
        entry = f"{message} in {self.where()}"
        if entry not in self.issues:
            self.issues.append(entry)

    # -- the mode --------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if sets_requires_grad(func):  # a flag for training's checkpointed backward: left as it is
            return args[0] if func is Tensor.requires_grad_ else None
        if registers_tensor_hook(func):  # training's hooks are not the measurement's (backward_hooks)
            return left_out_tensor_hook(func)
        dependent = _requiring_grad(args, kwargs)
        # producers are checked before the call: an in-place op replaces its input's grad_fn
        unseen = [  # (functions of the weights are known by identity: an in-place change is theirs)
            t.grad_fn for t in dependent if id(t) not in self.derived and not self.produced_by_seen_op(t)
        ]
        out = func(*args, **kwargs)
        from_data = _holds_any(args, kwargs, self.data_ids) or self._holds_rows_per_sample(args, kwargs)
        produced = [out] if isinstance(out, Tensor) else _tensors(out)
        if from_data:
            for t in produced:
                self.data_ids.add(id(t))
                self.data_shapes.add(tuple(t.shape))
                self.derived.pop(id(t), None)  # a function of the weights changed in place by data
        elif self.data_ids:  # a new tensor: its id, if a freed data tensor had it, is no longer data
            self.data_ids.difference_update(id(t) for t in produced)
        name = _op_name(func)
        if name in _MAY_DRAW_RANDOM_NUMBERS and self._draws_random_numbers(name, args, kwargs):
            entry = f"{name!r} in {self.where()}"
            if entry not in self.random_ops:
                self.random_ops.append(entry)
        if isinstance(out, Tensor):
            if not out.requires_grad:
                return out  # constant w.r.t. the selected weights: nothing to check
            out_tensors = [out]
        else:
            out_tensors = list(_tensors(out)) if out is not None else list(_tensors(args[:1]))
            if not any(t.requires_grad for t in out_tensors):
                return out
        if not from_data and not unseen and all(self._is_weight(t) for t in dependent):
            # selected weights and constants only (W.T, a position-bias MLP on a constant grid)
            self._derive(name, func, args, kwargs, dependent, out_tensors)
            return out
        if self.samples_apart and not _keeps_samples_apart(
            name,
            args,
            kwargs,
            [t for t in dependent if not self._is_weight(t)],  # the selected weights are shared
            out_tensors,
            self.batch_size,
        ):
            self.samples_apart = False
        if unseen:  # a gradient path the tape cannot see: only autograd follows it
            self.tape.reject()
        for node in unseen:
            self.flag(
                f"a tensor produced by an operation invisible to torch function modes "
                f"({type(node).__name__}, e.g. a custom autograd.Function) reaches {name!r}"
            )
        call = self._record_layer_call(name, args, kwargs, out) if name in LAYER_RULES else None
        if name == "add" and isinstance(out, Tensor):
            call = self._record_offset(args, kwargs, out)  # x + pos_embed, x @ W.T + b: the offset's own call
        for t in dependent:
            param = self.names_by_id.get(id(t))
            if param is not None and (
                call is None or t is not self._leaf(call.weight) and t is not self._leaf(call.bias)
            ):
                self.other_uses[param].append(f"{name!r} in {self.where()}")
            elif id(t) in self.derived and (
                call is None or self._derived_names.get(id(t)) not in (call.weight, call.bias)
            ):
                for leaf in sorted(self.derived[id(t)][1]):
                    self.other_uses[leaf].append(f"{name!r} (on a function of the weight) in {self.where()}")
        recorded: Optional[NodeCall] = None
        if self._check_exactness(name, args, kwargs, dependent) and self.nodes is not None:
            recorded = self._record_node(name, func, args, kwargs, dependent, out)
        self.tape.record(name, func, args, kwargs, out)
        if call is not None or recorded is not None:
            if self.clone_outputs:
                copy = out.clone()  # in-place ops downstream (ReLU(inplace=True)) must not change z
                self.tape.record_copy(out, copy)
                if id(out) in self.data_ids:  # the copy the model goes on with is data as the output was
                    self.data_ids.add(id(copy))
                out = copy
                out_tensors = [out]
            if call is not None:
                call.version = call.output._version
            if recorded is not None:  # its output stays the op's, for its adjoint (node_rules)
                recorded.versions[-1] = recorded.output._version
        self.mark_seen(out_tensors)
        self._mark_bases_written_through_views(args, out_tensors)
        return out

    def _mark_bases_written_through_views(self, args: tuple, out_tensors: list[Tensor]) -> None:
        """An in-place op on a view (``buf[..., :d].copy_(x)``, ``buf[idx] = x``: multi-head latent
        attention assembles its keys so) gives the view's *base* a new ``grad_fn`` (``CopySlices``) that
        no op returned: it is this op's, so it is marked seen. The column tape does not follow a base
        through its views, so it steps aside (autograd's backward is exact there)."""
        target = args[0] if args and isinstance(args[0], Tensor) else None
        if target is None or target._base is None or not any(t is target for t in out_tensors):
            return
        base = target._base
        if base.grad_fn is not None and id(base.grad_fn) not in self._seen_nodes:
            self.mark_seen([base])
            self.tape.reject()

    def outputs_changed_in_place(self) -> bool:
        """Whether the model changed a recorded layer output, or a recorded op's output, in place (its
        version counter moved; e.g. ``result += input`` after an activation)."""
        return any(call.output._version != call.version for call in self.calls) or any(
            node.output._version != node.versions[-1] for node in self.nodes or []
        )

    def _data_and_weight(self, args: tuple, kwargs: dict) -> Optional[tuple[Tensor, Tensor]]:
        """``(x, b)`` of ``add(x, b)`` or ``add(b, x)`` with ``b`` a selected weight (or a function of the
        weights) and ``x`` not; None for any other ``add`` (``alpha``, two weights, no weight)."""
        if len(args) != 2 or kwargs.get("alpha", 1) != 1:
            return None
        x, b = args
        if not isinstance(x, Tensor) or not isinstance(b, Tensor):
            return None
        if self._is_weight(x):
            x, b = b, x
        return (x, b) if self._is_weight(b) and not self._is_weight(x) else None

    def _holds_rows_per_sample(self, args: tuple, kwargs: dict) -> bool:
        """Whether a constant argument has one row per sample along dim 0 (BERT's default token types, a
        buffer expanded to the batch), or several rows per sample that are all alike (a multiple-choice
        model's ``N * choices`` rows): a buffer row expanded to them (stride 0), or a fill such as RoFormer's
        and MegatronBERT's default token types, ``torch.zeros(input_shape)``, of the shape of a tensor
        computed from the data (the ``(N * choices, T)`` token ids; alike, no order of the rows can be
        wrong, and a constant of another shape, a table shared by the samples, is not taken for data):
        per-sample data, not a constant of a function of the weights. The model's own parameters and buffers
        are not (an unselected bias as long as the batch, in a position-bias MLP)."""
        n = self.batch_size
        for group in (args, kwargs.values()):
            for item in group:
                if (
                    isinstance(item, Tensor)
                    and not item.requires_grad
                    and item.ndim > 0
                    and id(item) not in self.module_tensor_ids
                ):
                    rows = item.shape[0]
                    if rows == n or (rows > n and rows % n == 0 and self._alike_rows_of_data(item)):
                        return True
        return False

    def _alike_rows_of_data(self, t: Tensor) -> bool:
        """Whether every row of ``t`` along dim 0 is the same: a row expanded to them (stride 0), or a fill
        of the shape of a tensor computed from the data (one comparison pass, for those only)."""
        if t.stride(0) == 0:
            return True
        return tuple(t.shape) in self.data_shapes and bool((t == t.reshape(-1)[0]).all())

    def _record_offset(self, args: tuple, kwargs: dict, out: Tensor) -> Optional[LayerCall]:
        """``x + b`` with ``x`` weight-dependent data and ``b`` a selected weight (or a function of the
        weights) broadcast over the samples (a position embedding, a relative position bias): a call of
        the ``offset`` rule (:mod:`.layer_rules.offset`), or None."""
        operands = self._data_and_weight(args, kwargs)
        if operands is None:
            return None
        x, b = operands
        if not x.requires_grad or not 0 < b.ndim <= out.ndim:
            return None
        padded = (1,) * (out.ndim - b.ndim) + tuple(b.shape)
        if padded[0] != 1:  # one offset per sample is not a weight shared by the samples
            return None
        name = self._weight_name(b)
        assert name is not None  # b is a weight
        call = LayerCall("offset", self.where(), out.detach(), out, name, None, options={"padded": padded})
        for leaf in self.derived_weights[name][1] if name in self.derived_weights else (name,):
            self.uses[leaf].append(f"'add' (an offset) in {self.where()}")
        self.calls.append(call)
        return call

    def is_data(self, t: Tensor) -> bool:
        """Whether ``t`` was computed from the model's inputs (or constants with one row per sample)."""
        return id(t) in self.data_ids

    def _is_weight(self, t: Tensor) -> bool:
        """A selected weight, or a function of the selected weights alone."""
        return id(t) in self.names_by_id or id(t) in self.derived

    def _derive(
        self, name: str, func: Any, args: tuple, kwargs: dict, dependent: list[Tensor], outputs: list[Tensor]
    ) -> None:
        """An op on selected weights only (``W.T``, ``bias.clone()``, weight standardization,
        ``torch._weight_norm``): its outputs are weights too, functions of the same leaves. Nothing is
        recorded for the backward columns (they never reach such an op); a nonlinear op makes the Hessian
        differ from the Gauss-Newton matrix, which is flagged."""
        sources = frozenset().union(*(self._sources(t) for t in dependent))
        for t in outputs:
            if t.requires_grad and id(t) not in self.names_by_id:
                self.derived[id(t)] = (t, sources)
                self.tape.leaf_ids.add(id(t))
        if (
            name in SELECTION_OPS
            and len(dependent) == 1
            and len(outputs) == 1
            and args
            and args[0] is dependent[0]
        ):
            self._selected_from[id(outputs[0])] = (outputs[0], self._selection_root(dependent[0]))
        if not self._linear_in_the_weights(name, args, kwargs, dependent):
            self.flag(
                f"{name!r} computes a weight nonlinearly from the selected weights alone (a "
                "reparametrization: weight standardization or normalization, a position-bias MLP)"
            )
            if self.nodes is not None:
                self._record_weight_function(name, func, args, kwargs, dependent, outputs)
        self.mark_seen(outputs)

    def _record_weight_function(
        self, name: str, func: Any, args: tuple, kwargs: dict, dependent: list[Tensor], outputs: list[Tensor]
    ) -> None:
        """A nonlinear op on weights alone, for the sketched Hessian: recorded when a rule of
        :mod:`.node_rules.weight_functions` covers it and its input is one selected weight entry for entry
        (the weight or a reshape of it), or when it is a unary elementwise op (its curvature is then taken
        exactly through the function of the weights that is its input: :class:`DerivedElementwiseCall`,
        up to :data:`DERIVED_ELEMENTWISE_MAX_ENTRIES` entries), else noted as uncovered."""
        covered = covered_input(name, args, kwargs)
        leaf = self._leaf_of_view(covered[1]) if covered is not None else None
        if covered is not None and leaf is not None and len(outputs) == 1:
            self.weight_functions.append(WeightFunctionCall(name, covered[0], args, kwargs, outputs[0], leaf))
            return
        if (
            name in UNARY_OPS
            and len(dependent) == 1
            and len(outputs) == 1
            and isinstance(args[0] if args else None, Tensor)
            and args[0] is dependent[0]
            and outputs[0].shape == dependent[0].shape
        ):
            root = self._selection_root(dependent[0])
            if root.numel() <= DERIVED_ELEMENTWISE_MAX_ENTRIES:
                node = NodeCall(name, self.where(), func, args, kwargs, list(dependent), outputs[0])
                sources = tuple(sorted(self._sources(dependent[0])))
                made = self.module_outputs.get(id(root))
                producer = made[1] if made is not None and made[0] is root else None
                self.derived_elementwise.append(DerivedElementwiseCall(node, sources, root, producer))
                return
        entry = f"{name!r} in {self.where()} (a nonlinear function of the weights alone)"
        if entry not in self.uncovered:
            self.uncovered.append(entry)

    def module_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        """A module returned ``output``: kept (:attr:`module_outputs`) where it is a function of the weights
        alone computed from constant positional arguments (a position-bias MLP on its grid)."""
        if (
            self.nodes is not None
            and isinstance(output, Tensor)
            and id(output) in self.derived
            and args
            and all(isinstance(a, Tensor) and not a.requires_grad for a in args)
        ):
            tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
            self.module_outputs[id(output)] = (output, (module, args, tensors))

    def _selection_root(self, t: Tensor) -> Tensor:
        """The tensor that ``t`` selects from by :data:`SELECTION_OPS` (``t`` itself if none)."""
        entry = self._selected_from.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else t

    def _leaf_of_view(self, t: Tensor) -> Optional[str]:
        """The selected weight whose entries ``t`` holds one for one, in memory order (the weight itself,
        or a contiguous reshape of it), or None."""
        base = t if t._base is None else t._base
        name = self.names_by_id.get(id(base))
        if name is None or t.numel() != base.numel() or not (t.is_contiguous() and base.is_contiguous()):
            return None
        return name if t.data_ptr() == base.data_ptr() else None

    def _sources(self, t: Tensor) -> frozenset[str]:
        """The selected weights that ``t`` (a weight or a function of weights) depends on."""
        return frozenset({self.names_by_id[id(t)]}) if id(t) in self.names_by_id else self.derived[id(t)][1]

    def _linear_in_the_weights(self, name: str, args: tuple, kwargs: dict, dependent: list[Tensor]) -> bool:
        """Whether an op on weights alone keeps the result linear in each individual weight: a linear op
        (:data:`PIECEWISE_LINEAR_OPS`, zeroing), a division by a constant, or a product whose factors
        depend on disjoint sets of weights (``B @ A`` of a low-rank update; not ``W @ W.T``)."""
        if name in PIECEWISE_LINEAR_OPS or name == "zero":
            return True
        if name in _DIVISIONS:
            denominator = _argument(args, kwargs, _DIVISIONS[name], ("other",))
            return not (isinstance(denominator, Tensor) and denominator.requires_grad)
        if name in MULTILINEAR_OPS:
            additive = _ADDITIVE_ARGUMENT.get(name)
            skip = _argument(args, kwargs, additive[0], (additive[1],)) if additive else None
            seen: set[str] = set()
            for t in dependent:
                if t is not skip:
                    sources = self._sources(t)
                    if seen & sources:
                        return False
                    seen |= sources
            return True
        return False

    def _weight_name(self, t: Any) -> Optional[str]:
        """The name of a layer call's weight or bias argument ``t``: a selected weight's, the name given to a
        function of the selected weights (registered in :attr:`derived_weights`), or None."""
        if not isinstance(t, Tensor):
            return None
        name = self.names_by_id.get(id(t))
        if name is not None or id(t) not in self.derived:
            return name
        name = self._derived_names.get(id(t))
        if name is None:
            tensor, sources = self.derived[id(t)]
            name = f"{'+'.join(sorted(sources))} (a function of it, #{len(self.derived_weights)})"
            self._derived_names[id(t)] = name
            self.derived_weights[name] = (tensor, tuple(sorted(sources)))
        return name

    @staticmethod
    def _draws_random_numbers(name: str, args: tuple, kwargs: dict) -> bool:
        if name in _MODE_DEPENDENT_OPS and name != "batch_norm":
            position, keys = _MODE_DEPENDENT_OPS[name]
            return bool(_argument(args, kwargs, position, keys, True))
        if name == "rrelu":  # random slopes in training mode only
            return bool(_argument(args, kwargs, 3, ("training",), False))
        return name in _RANDOM_FUNCTIONS

    def _leaf(self, name: Optional[str]) -> Optional[Tensor]:
        return self.leaves.get(name) if name is not None else None

    def _record_layer_call(self, name, args, kwargs, out) -> Optional[LayerCall]:
        rule = LAYER_RULES[name]
        weight = _argument(args, kwargs, *rule.weight_argument)
        bias = _argument(args, kwargs, *rule.bias_argument) if rule.bias_argument else None
        inputs = _argument(args, kwargs, *rule.input_argument)
        if not isinstance(inputs, Tensor):
            return None
        weight_name, bias_name = self._weight_name(weight), self._weight_name(bias)
        if weight_name is None and bias_name is None:
            return None
        detached = inputs.detach() if inputs.requires_grad else inputs
        call = LayerCall(name, self.where(), detached, out, weight_name, bias_name)
        rule.record(call, args, kwargs, weight)
        if self.nodes is not None and name == "linear" and weight_name is not None and inputs.requires_grad:
            product = NodeCall("linear", self.where(), F.linear, args, kwargs, [inputs, weight], out)
            self.weight_products.append(product)
        for param in (weight_name, bias_name):
            if param in self.derived_weights:
                for leaf in self.derived_weights[param][1]:
                    self.uses[leaf].append(f"{name!r} (through a function of the weight) in {self.where()}")
            elif param is not None:
                self.uses[param].append(f"{name!r} in {self.where()}")
        self.calls.append(call)
        return call

    def _record_node(
        self, name: str, func: Any, args: tuple, kwargs: dict, dependent: list[Tensor], out: Any
    ) -> Optional[NodeCall]:
        """Record a flagged operation for its node rule (:mod:`.node_rules`), or note it as uncovered;
        the recorded call, or None."""
        rule = NODE_RULES.get(name)
        # the selected weights are not the node's inputs, nor a normalization's affine weight or bias computed
        # from them alone (``weight + 1``: Nemotron's layer norm), in which the op is linear
        affine = {id(a) for a in _normalization_affine(name, args, kwargs)}
        inputs = [
            t
            for t in dependent
            if id(t) not in self.names_by_id and not (id(t) in self.derived and id(t) in affine)
        ]
        if not inputs and affine:  # a normalization of data: linear in its affine weights, no curvature
            return None
        call = None
        in_place = any(t is out for t in inputs)  # its input is gone: the curvature cannot be evaluated
        if rule is not None and isinstance(out, Tensor) and inputs and not in_place:
            call = NodeCall(name, self.where(), func, args, kwargs, inputs, out)
        if rule is None or call is None or not rule.accepts(call):
            entry = f"{name!r} in {self.where()}" + (" (in place)" if in_place else "")
            if entry not in self.uncovered:
                self.uncovered.append(entry)
            return None
        cast(list, self.nodes).append(call)
        return call

    def _check_exactness(self, name: str, args: tuple, kwargs: dict, dependent: list[Tensor]) -> bool:
        """Flag ``name`` when it makes the network nonlinear in a weight; whether it did."""
        if name in PIECEWISE_LINEAR_OPS:
            return False
        if name in _MODE_DEPENDENT_OPS:
            position, keys = _MODE_DEPENDENT_OPS[name]
            training = _argument(args, kwargs, position, keys, _MODE_DEFAULT.get(name, True))
            if training:
                what = (
                    "batch_norm with batch statistics (BatchNorm in training mode or without running "
                    "stats: a nonlinear function of the weights that couples the samples)"
                    if name == "batch_norm"
                    else f"{name} in training mode (a random mask)"
                )
                self.flag(f"{what}; call model.eval() first")
            # the affine weight and bias may be selected leaves themselves (each enters linearly, once:
            # y = weight * normalized(input) + bias with running statistics); anything else that depends
            # on the weights (statistics, or affine parameters computed from weights) is not exact
            extra = [
                t
                for t in dependent
                if t is not _argument(args, kwargs, 0, ("input",)) and id(t) not in self.names_by_id
            ]
            if extra:
                self.flag(f"{name!r} with weight-dependent affine parameters or statistics")
            return bool(training or extra)
        if name in _DIVISIONS:
            denominator = _argument(args, kwargs, _DIVISIONS[name], ("other",))
            if isinstance(denominator, Tensor) and denominator.requires_grad:
                self.flag(f"division by a weight-dependent tensor ({name!r})")
                return True
            return False
        if name in MULTILINEAR_OPS:
            additive = _ADDITIVE_ARGUMENT.get(name)
            skip = _argument(args, kwargs, additive[0], (additive[1],)) if additive else None
            factors = [t for t in dependent if t is not skip and not self._is_weight(t)]
            if len(factors) > 1:
                self.flag(
                    f"{name!r} multiplies {len(factors)} weight-dependent tensors (not linear in each weight)"
                )
            return len(factors) > 1
        self.flag(
            f"{name!r} is not piecewise linear (not on the allowlist PIECEWISE_LINEAR_OPS / MULTILINEAR_OPS)"
        )
        return True


#: the normalizations whose output is linear in their affine weight and bias (their layer rules say where
#: those arguments are: :mod:`.layer_rules.normalization`)
NORMALIZATIONS = ("layer_norm", "group_norm", "rms_norm")


def _normalization_affine(name: str, args: tuple, kwargs: dict) -> list[Tensor]:
    """The affine weight and bias passed to the normalization op ``name`` (:data:`NORMALIZATIONS`)."""
    if name not in NORMALIZATIONS:
        return []
    rule = LAYER_RULES[name]
    places = [rule.weight_argument] + ([rule.bias_argument] if rule.bias_argument else [])
    return [t for t in (_argument(args, kwargs, *place) for place in places) if isinstance(t, Tensor)]


def _holds_any(args: tuple, kwargs: dict, ids: set[int]) -> bool:
    """Whether a tensor in ``args`` or ``kwargs`` (nested in tuples, lists, dicts) has its id in ``ids``."""
    for group in (args, kwargs.values()):
        for item in group:
            if isinstance(item, Tensor):
                if id(item) in ids:
                    return True
            elif isinstance(item, (tuple, list, dict)) and any(id(t) in ids for t in _tensors(item)):
                return True
    return False


def _fast_path_blockers(recorder: _ForwardRecorder, leaves: dict[str, Tensor], n: int) -> list[str]:
    """Reasons the per-layer contractions do not apply: they need every use of a selected weight to be a
    call of a layer rule's op (a weight used by several such calls is contracted from their summed
    per-sample gradients: :mod:`.layer_rules.shared`), with the samples along dim 0."""
    reasons = []
    if recorder.output_is_weight_function:
        reasons.append("the model's output was computed from the selected weights without its inputs")
    for name in leaves:
        if recorder.other_uses[name]:
            reasons.append(f"{name!r} is used by {recorder.other_uses[name][0]}")
    for call in recorder.calls:
        if not LAYER_RULES[call.op].is_batched(call, n):
            reasons.append(
                f"{call.op} in {call.module} does not have the batch (size {n}) along dim 0 "
                f"(input shape {tuple(call.inputs.shape)})"
            )
    return reasons


def rows_of_other_samples(t: Tensor, n: int) -> Tensor:
    """The entries of ``t`` that belong to samples ``1..n-1``, which a probe on sample 0's logits must not
    reach: ``t[1:]`` when dim 0 is the batch; with ``n k`` rows along dim 0 (``k`` per sample, sample-
    major, as windowed attention lays them out), the rows from ``k`` on. Rows in any other order put
    some of sample 0's rows there too, so the probe flags them, as it must (the per-layer contractions
    read the rows sample-major: :meth:`~.layer_rules.base.LayerRule.regroup`)."""
    return t.reshape(n, -1)[1:]


def _interaction_probe(logits: Tensor) -> Tensor:
    """A random output gradient on sample 0 only (zero elsewhere), for the batch-independence check."""
    probe = torch.zeros_like(logits)
    probe[0] = _probe_values(tuple(logits.shape[1:]), logits.dtype, logits.device)
    return probe


@functools.lru_cache(maxsize=32)
def _probe_values(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The batch-independence probe's output gradient on sample 0 (zero on the others): fixed
    standard-normal values (seed 0), drawn once per shape (read-only)."""
    generator = torch.Generator(device=device).manual_seed(0)
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)


class _ModuleNames:
    """Keeps the path of the module being run (for messages), with two global forward hooks
    (``register_module_forward_pre_hook`` / ``register_module_forward_hook``) that look each module up
    in a table of ``model``'s modules: two registrations per forward instead of two per module.
    Modules outside ``model`` are ignored. ``on_output(module, args, output)`` sees every output of them."""

    def __init__(
        self,
        model: nn.Module,
        stack: list[str],
        on_output: Optional[Callable[[nn.Module, tuple, Any], None]] = None,
    ):
        labels = {}
        for path, module in model.named_modules():
            kind = type(module).__name__
            labels[id(module)] = f"module {path!r} ({kind})" if path else f"{kind}.forward"

        def enter(module: nn.Module, *_: Any) -> None:
            label = labels.get(id(module))
            if label is not None:
                stack.append(label)

        def leave(module: nn.Module, args: tuple, output: Any) -> None:  # None: the output is left as it is
            label = labels.get(id(module))
            if label is not None and stack and stack[-1] == label:
                stack.pop()
            if label is not None and on_output is not None:
                on_output(module, args, output)

        self.handles = [
            torch.nn.modules.module.register_module_forward_pre_hook(enter),
            torch.nn.modules.module.register_module_forward_hook(leave, always_call=True),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class _RecordedForward:
    """One forward pass under :class:`_ForwardRecorder` and what it found."""

    recorder: _ForwardRecorder
    logits: Tensor  # in the graph of `leaves`
    leaves: dict[str, Tensor]
    issues: list[str]  # reasons the model is not piecewise linear in each selected weight


def _autograd_inputs(inputs: ModelInputs, target: Tensor) -> tuple[ModelInputs, Tensor]:
    """Inputs (a tensor, tuple or dict of them) and targets usable under autograd (inference tensors
    are cloned, the rest detached)."""
    x = map_inputs(inputs, lambda t: t.clone() if t.is_inference() else t.detach())
    y = target.clone() if target.is_inference() else target
    return x, y


@contextlib.contextmanager
def _module_tensors_swapped(
    model: nn.Module, leaves: Mapping[str, Tensor], params: Mapping[str, Tensor]
) -> Iterator[set[int]]:
    """For the block, every parameter slot of ``model``'s modules holds the leaf of its selected
    parameter (``leaves[name]`` for ``params[name]``) or a detached alias, and every buffer slot a
    clone (train-mode BatchNorm updates the clone). Slots are matched by tensor identity, so tied
    weights and submodules registered under two paths get the same replacement, and the original
    objects are put back afterwards: what ``torch.func.functional_call`` does, without its per-name
    lookups (and without pytorch/pytorch#164759, see
    :func:`~._functional_model.restore_module_tensors`). Yields the ids of the tensors in the slots.

    Raises:
        ValueError: a tensor of ``params`` is not a parameter of ``model``.
    """
    replacement = {id(params[name]): leaf for name, leaf in leaves.items()}
    slots: list[tuple[dict[str, Any], str, Tensor, bool]] = []  # (store, name, original, is buffer)
    for module in modules_of(model):
        for store, is_buffer in ((module._parameters, False), (module._buffers, True)):
            for name, tensor in store.items():
                if tensor is not None:
                    slots.append((cast(dict[str, Any], store), name, tensor, is_buffer))
    swapped: dict[int, Tensor] = {}
    for slot, name, tensor, is_buffer in slots:
        new = swapped.get(id(tensor))
        if new is None:
            new = replacement.get(id(tensor))
            if new is None:
                new = tensor.clone() if is_buffer else tensor.detach()
            swapped[id(tensor)] = new
        slot[name] = new
    try:
        missing = [name for name in leaves if id(params[name]) not in swapped]
        if missing:
            raise ValueError(
                f"{missing} are not parameters of the model; select them from model.named_parameters()."
            )
        yield {id(t) for t in swapped.values()}
    finally:
        for slot, name, tensor, _ in slots:
            slot[name] = tensor


#: models seen changing a recorded layer output in place (Conv -> BatchNorm -> ReLU(inplace=True)):
#: their next forwards copy the outputs at once instead of running twice. Only a hint: without it
#: the version check still catches the change.
_IN_PLACE_MODELS: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _changes_outputs_in_place(model: nn.Module) -> bool:
    try:
        return _IN_PLACE_MODELS.get(model, False)
    except TypeError:  # not weak-referenceable
        return False


def _remember_in_place_changes(model: nn.Module) -> None:
    try:
        _IN_PLACE_MODELS[model] = True
    except TypeError:
        pass


def _call(model: nn.Module, x: ModelInputs) -> Any:
    """``model`` called on ``x`` as :func:`call_model` would call it (raw output)."""
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def _record_forward(
    model: nn.Module, x: ModelInputs, params: dict[str, nn.Parameter], caller: str, record_nodes: bool = False
) -> _RecordedForward:
    """Run ``model(x)`` with fresh leaves for ``params`` (everything else detached, buffers cloned),
    recording the selected layers' calls and every operation on weight-dependent tensors (with
    ``record_nodes``, also the nonlinear ones as :class:`~.node_rules.NodeCall` s, in
    ``recorder.nodes``, and those no node rule covers in ``recorder.uncovered``).

    The recorded layer outputs (and recorded ops' outputs) are passed on to the model as they are (no
    copy); when the model changes one in place (``nn.ReLU(inplace=True)`` right after a Linear layer,
    ``result += input`` after an activation), the forward is run again with copies, so that the
    recorded output stays the layer's (the op's). ``nn.MultiheadAttention``
    modules run their forward in explicit operations
    (:func:`~lightning_flatness.functional.composite_attention.explicit_multi_head_attention`; a model's own
    call of ``F.multi_head_attention_forward`` too:
    :class:`~lightning_flatness.functional.composite_attention.ExplicitAttentionCalls`), so that
    their projections are recorded as Linear layers instead of one opaque call, and PyTorch's
    sequence-first transformer modules run batch-first between transposes
    (:func:`~lightning_flatness.functional.batch_first_transformers.batch_first_transformers`), so that
    their layers see the samples along dim 0; ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` run in explicit
    operations (:func:`~lightning_flatness.functional.composite_recurrent.explicit_recurrent_layers`),
    activation modules that hide a standard activation in a custom autograd Function run as that
    activation (:func:`~lightning_flatness.functional.explicit_activations.explicit_activations`), and
    mixture-of-experts modules run densely, as two Linear layers over every expert
    (:func:`~lightning_flatness.functional.dense_experts.dense_experts`). With
    ``record_nodes``, ``F.scaled_dot_product_attention`` called in the model's code runs in explicit
    operations (:class:`~lightning_flatness.functional.explicit_sdpa.ExplicitAttention`), so that the
    node rules see its products and softmax, ``F.glu`` runs as a product with a sigmoid
    (:class:`~lightning_flatness.functional.explicit_glu.ExplicitGlu`), and an in-place division by a
    weight-dependent tensor runs out of place and is written back
    (:class:`~lightning_flatness.functional.out_of_place_division.OutOfPlaceDivision`), so that the
    division's node rule sees its numerator, and RMS norms written out in elementary operations run as one
    ``F.rms_norm`` (:func:`~lightning_flatness.functional.rms_norm_modules.rms_norms_as_one_op`), so that
    the sketch samples the norm's curvature as a whole.
    """
    leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
    n = inputs_batch_size(x)
    copied = _changes_outputs_in_place(model)
    for clone_outputs in (True,) if copied else (False, True):  # copies if a layer output changes in place
        recorder = _ForwardRecorder(leaves, clone_outputs, n, data=_tensors(x))
        if record_nodes:
            recorder.nodes = []
        module_names = _ModuleNames(model, recorder.module_stack, recorder.module_output)
        try:
            with (
                _module_tensors_swapped(model, leaves, params) as module_tensors,
                explicit_multi_head_attention(model),
                batch_first_transformers(model),
                explicit_recurrent_layers(model),
                explicit_activations(model),
                dense_experts(model),
                rms_norms_as_one_op(model) if record_nodes else contextlib.nullcontext(),
                recorder,
                ExplicitAttentionCalls(),  # inside: seen by the recorder
                ExplicitAttention() if record_nodes else contextlib.nullcontext(),  # likewise
                ExplicitGlu() if record_nodes else contextlib.nullcontext(),  # likewise
                OutOfPlaceDivision() if record_nodes else contextlib.nullcontext(),  # likewise
                WeightStackProducts(recorder._is_weight, recorder.is_data, n),  # likewise
            ):
                recorder.module_tensor_ids = module_tensors
                output = _call(model, x)
                try:  # inside: what assembles the logits (a span model's stack) is recorded too
                    logits = extract_logits(output)
                except TypeError as err:
                    raise ValueError(f"{caller}: {err}") from None
        finally:
            module_names.remove()
        if clone_outputs or not recorder.outputs_changed_in_place():
            break
    if clone_outputs and not copied:
        _remember_in_place_changes(model)
    recorder.output_is_weight_function = any(id(t) in recorder.derived for t in (logits, logits._base))
    if logits.ndim == 0 or logits.shape[0] != n:
        raise ValueError(
            f"the model output has shape {tuple(logits.shape)} for {n} samples; "
            f"{caller} needs the samples along dim 0."
        )
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("the model output contains NaN or inf; the Hessian diagonal is undefined there.")
    issues = list(recorder.issues)
    if logits.requires_grad and not recorder.produced_by_seen_op(logits):
        issues.append(
            f"the model output comes from an operation invisible to torch function modes "
            f"({type(logits.grad_fn).__name__})"
        )
    for name in leaves:
        uses = recorder.uses[name] + recorder.other_uses[name]
        if len(uses) > 1:
            issues.append(
                f"weight {name!r} is used {len(uses)} times in one forward "
                f"({'; '.join(uses[:3])}): the output is not linear in each of its entries"
            )
    return _RecordedForward(recorder, logits, leaves, issues)
