r"""Weights used by several recorded calls: a tied language-model head (an ``embedding`` lookup and a
``linear`` call of one table: GPT-2, OPT, tied Llama), layers shared across depth (ALBERT); and layers
whose weight is a function of the selected weights.

The per-sample gradient of such a weight is the sum of its calls' per-sample gradients,
:math:`G_{nk} = \sum_c G^{(c)}_{nk}`, and the Gauss-Newton diagonal squares the sum,

.. math:: D = \sum_{n,k} s_{nk} \Big(\sum_c G^{(c)}_{nk}\Big)^2 ,

which the per-call contractions of :mod:`.contraction` (a sum of squares) do not give: the cross terms
:math:`2 G^{(c)}_{nk} G^{(c')}_{nk}` are missing. Here the calls' per-sample gradients
(:meth:`~.base.LayerRule.sample_gradients`) are summed, squared and weighted, in chunks of samples of
about :data:`~.contraction.CHUNK_ELEMENTS` entries (at least one sample's ``K`` columns).

**Functions of the weights.** A call whose weight or bias ``V = phi(W)`` is computed from selected
weights alone (``W.T``, a cloned bias with entries zeroed, ``W0 + B A``, weight standardization or
normalization: :data:`Derived`, as the recorder names them) contributes ``J_phi^T G^{(c)}_{nk}`` to the
per-sample gradients of the weights ``phi`` reads: one batched vector-Jacobian product of ``phi`` per chunk
of samples and columns (autograd through ``phi``'s own small graph), before the sum and the square. Such a
call is contracted here even when it is the weight's only use.

With ``chunk_size = B > 1`` (:func:`~..gauss_newton_sketch.gauss_newton_sketch_diagonal`'s sign-mixed
chunks) the gradient of each chunk of ``B`` samples is squared instead. Columns injected at the weight
itself (the sketched Hessian's columns of a tied weight's products, ``(K, N, *shape)``,
:mod:`..node_rules.tied_linear`) are one more term of the sum.

**Cost.** Per sample and column, one per-sample gradient per call: ``O(P O I)`` flops for a Linear call
with ``P`` positions (what an untied LM head's contraction costs already), ``O(P C)`` for an embedding
lookup (added in place into the others' sum; a ``V C`` zero fill only for a table with no dense call),
and ``O(V C)`` for the square; memory one chunk of per-sample gradients. The calls of a group wait for
each other, so their output gradients are held until the backward pass reaches the last one (for a tied
LM head: the logits' gradient until the embedding).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from lightning_flatness.functional.estimators.layer_rules.base import LAYER_RULES, LayerCall
from lightning_flatness.functional.estimators.layer_rules.contraction import (
    CHUNK_ELEMENTS,
    _add,
    per_sample_call,
)

__all__ = ["Derived", "SharedCalls", "accumulate_shared", "shared_call_groups"]

#: Functions of the selected weights that layer calls take as their weight or bias (``W.T``, a cloned bias,
#: a standardized or normalized weight): ``{name: (tensor, names of the weights it is computed from)}``,
#: as the exactness recorder names them.
Derived = dict[str, tuple[Tensor, tuple[str, ...]]]


def shared_call_groups(calls: Sequence[LayerCall], derived: Optional[Derived] = None) -> list[list[int]]:
    """The indices of ``calls`` that share a selected parameter (weight or bias) with another call, or take
    a function of the selected weights (a name in ``derived``), in groups linked by shared parameters
    (transitively: a function of a weight links to the weight), each in call order."""
    parent = list(range(len(calls)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    derived = derived or {}
    first: dict[str, int] = {}
    shared: set[int] = set()
    for i, call in enumerate(calls):
        for param in (call.weight, call.bias):
            if param is None:
                continue
            if param in derived:
                shared.add(i)
            for name in derived[param][1] if param in derived else (param,):
                if name in first:
                    parent[root(i)] = root(first[name])
                    shared.update((i, first[name]))
                else:
                    first[name] = i
    groups: dict[int, list[int]] = {}
    for i in sorted(shared):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


class SharedCalls:
    """Routes the output gradients of recorded calls as a backward pass delivers them (``self(i, g)``):
    a call that shares no parameter goes to ``contract_one(i, g)`` at once; the calls of a group
    (:func:`shared_call_groups`) are held and go to ``contract_group(calls, grads)`` together when the last
    one arrives, or at :meth:`finish` (calls that the logits do not reach deliver nothing)."""

    def __init__(
        self,
        calls: Sequence[LayerCall],
        contract_one: Callable[[int, Tensor], None],
        contract_group: Callable[[list[LayerCall], list[Tensor]], None],
        derived: Optional[Derived] = None,
    ):
        self.calls = calls
        self.contract_one = contract_one
        self.contract_group = contract_group
        self.groups = shared_call_groups(calls, derived)
        self.group_of = {i: j for j, group in enumerate(self.groups) for i in group}
        self.pending: dict[int, dict[int, Tensor]] = {}

    def __call__(self, i: int, g: Tensor) -> None:
        j = self.group_of.get(i)
        if j is None:
            self.contract_one(i, g)
            return
        held = self.pending.setdefault(j, {})
        held[i] = g
        if len(held) == len(self.groups[j]):
            self._flush(j)

    def finish(self) -> None:
        """Contract the groups some of whose calls received no gradient."""
        for j in list(self.pending):
            self._flush(j)

    def _flush(self, j: int) -> None:
        held = self.pending.pop(j)
        order = sorted(held)
        self.contract_group([self.calls[i] for i in order], [held[i] for i in order])


def accumulate_shared(
    calls: Sequence[LayerCall],
    grads: Sequence[Tensor],
    signs: Tensor,
    diag: dict[str, Tensor],
    leaves: dict[str, Tensor],
    n: int,
    chunk_size: int = 1,
    leaf_columns: Optional[dict[str, Tensor]] = None,
    derived: Optional[Derived] = None,
) -> None:
    """Add ``sum_{n,k} sign_nk (sum over calls of the per-sample gradient)^2`` to ``diag`` for every
    selected parameter of a group of calls (module docstring).

    Args:
        calls, grads: the group's calls and their output gradients ``(K, N or N k, *out)``.
        signs: ``(N, K)`` per sample (``chunk_size == 1``), or ``(K,)`` shared by all samples.
        diag, leaves: as for :func:`~.contraction.accumulate_layer`.
        n: the number of samples.
        chunk_size: samples per squared chunk gradient.
        leaf_columns: ``{name: (K, N, *shape)}`` per-sample columns at a weight itself, added to its
            per-sample gradients.
        derived: the functions of the weights that calls take as their weight or bias (:data:`Derived`):
            their per-sample gradients are pulled back to the weights they are computed from (one batched
            vector-Jacobian product of the function per chunk of samples and columns).
    """
    derived = derived or {}
    k = grads[0].shape[0]
    # per parameter: its dense sources (samples -> (m, K, ...)) and its sparse ones (added in place)
    parts: dict[str, list[Callable[[slice], Tensor]]] = {}
    sparse: dict[str, list[Callable[[slice, Tensor], None]]] = {}
    for call, grad in zip(calls, grads):
        call, grad = per_sample_call(call, grad, n)
        shape = _shape(call.weight, leaves, derived) if call.weight is not None else ()
        sample = LAYER_RULES[call.op].sample_gradients(call, grad, shape)
        if call.weight is not None and sample.add_weight is not None:
            sparse.setdefault(call.weight, []).append(sample.add_weight)
            parts.setdefault(call.weight, [])
        elif call.weight is not None:
            assert sample.weight is not None  # a dense rule
            parts.setdefault(call.weight, []).append(sample.weight)
        if call.bias is not None:
            parts.setdefault(call.bias, []).append(sample.bias)
    for name, column in (leaf_columns or {}).items():
        if name in parts or any(name in derived[p][1] for p in parts if p in derived):
            parts.setdefault(name, [])
            sparse.setdefault(name, []).append(_add_columns(column))
    targets = sorted({s for p in parts for s in (derived[p][1] if p in derived else (p,))})
    largest = max(math.prod(_shape(p, leaves, derived)) for p in [*parts, *targets])
    step = max(1, CHUNK_ELEMENTS // (k * largest) // chunk_size) * chunk_size
    acc: dict[str, Tensor] = {}
    for start in range(0, n, step):
        samples = slice(start, min(n, start + step))
        m = samples.stop - start
        totals: dict[str, Tensor] = {}
        for name, sources in parts.items():
            shape = (m, k, *_shape(name, leaves, derived))
            total = _summed(sources, sparse.get(name, []), samples, shape, grads[0])
            pulled = _pull_back(derived[name], leaves, total) if name in derived else {name: total}
            for target, value in pulled.items():
                totals[target] = totals[target] + value if target in totals else value
        for name, total in totals.items():
            if chunk_size == 1:
                term = torch.einsum("mk,mkx->x", signs[samples].to(total.dtype), total.square())
            else:
                pad = -m % chunk_size
                if pad:
                    total = torch.cat([total, total.new_zeros(pad, *total.shape[1:])])
                total = total.reshape(-1, chunk_size, *total.shape[1:]).sum(dim=1)
                term = torch.einsum("k,bkx->x", signs.to(total.dtype), total.square())
            acc[name] = acc[name].add_(term) if name in acc else term
    for name, value in acc.items():
        _add(diag, name, value.reshape(leaves[name].shape))


def _summed(
    dense: list[Callable[[slice], Tensor]],
    added: list[Callable[[slice, Tensor], None]],
    samples: slice,
    shape: tuple[int, ...],
    like: Tensor,
) -> Tensor:
    """``(m, K, numel)``: the dense sources' per-sample gradients summed (each a new tensor, so the sum may
    start from the first one), then the ``added`` ones added in place (from zeros when nothing is dense)."""
    total = dense[0](samples).reshape(shape) if dense else like.new_zeros(shape)
    for source in dense[1:]:
        total = total + source(samples).reshape(shape)
    if added:
        total = total.contiguous()
        for add in added:
            add(samples, total)
    return total.reshape(shape[0], shape[1], -1)


def _shape(name: str, leaves: dict[str, Tensor], derived: Derived) -> tuple[int, ...]:
    return tuple(derived[name][0].shape if name in derived else leaves[name].shape)


def _pull_back(
    function: tuple[Tensor, tuple[str, ...]], leaves: dict[str, Tensor], total: Tensor
) -> dict[str, Tensor]:
    """Per-sample gradients ``(m, K, numel)`` of a function of the weights, as per-sample gradients of the
    weights it is computed from: ``{name: (m, K, numel)}``, one vector-Jacobian product per row, batched
    (a loop where the function's backward has no batching rule)."""
    tensor, names = function
    m, k = total.shape[:2]
    vectors = total.reshape(m * k, *tensor.shape)
    inputs = [leaves[name] for name in names]
    grads: Sequence[Optional[Tensor]]
    try:
        grads = torch.autograd.grad(
            tensor, inputs, vectors, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    except (RuntimeError, NotImplementedError):
        rows = [torch.autograd.grad(tensor, inputs, v, retain_graph=True, allow_unused=True) for v in vectors]
        grads = [
            None if rows[0][j] is None else torch.stack([row[j] for row in rows]) for j in range(len(inputs))
        ]
    return {
        name: (g if g is not None else total.new_zeros(m * k, *leaves[name].shape)).reshape(m, k, -1)
        for name, g in zip(names, grads)
    }


def _add_columns(columns: Tensor) -> Callable[[slice, Tensor], None]:
    """``(K, N, *shape)`` columns at a weight, added to per-sample gradients ``(m, K, *shape)`` in place."""

    def add(samples: slice, total: Tensor) -> None:
        total += columns[:, samples].transpose(0, 1).reshape(total.shape)

    return add
