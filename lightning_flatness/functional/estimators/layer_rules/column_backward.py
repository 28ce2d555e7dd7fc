r"""The ``K`` backward columns of the exact method as one backward pass over the folded batch.

The per-layer contractions of :mod:`..exact` need, for every recorded layer output ``z``, the
gradients ``g_k = J_z^T v_k`` of ``K`` output columns ``v_k`` (``(K, N, D)``). Autograd's
``is_grads_batched`` vmaps the backward over ``k``; backward formulas without a batching rule
(convolution and max-pooling backward) then run as a Python loop over the ``K`` columns, and the
wrapper adds a fixed cost per call. For the operations whose input gradient is linear in the output
gradient and does not mix samples, the ``K`` columns can instead be folded into the batch dimension
(``(K N, ...)``) and sent through one hand-written backward formula per operation:

- ``linear``: ``g W`` (one matrix product for all columns);
- ``conv{1,2,3}d``: the input gradient of the convolution (``aten.convolution_backward`` with only
  the input gradient requested; stride, symmetric padding, dilation, groups) on ``(K N, O, *P)``;
- ``relu``: ``g * (out > 0)`` (``threshold_backward``, the output broadcast over ``k``); likewise
  ``leaky_relu`` (non-negative slope), ``hardtanh`` and ``relu6``, from their outputs;
- ``max_pool{1,2,3}d``: a scatter-add of ``g`` to the argmax of each window (indices recomputed
  from the recorded input, the same ones autograd uses);
- ``adaptive_avg_pool{1,2,3}d`` to one position, eval-mode ``batch_norm`` and ``dropout``,
  residual ``add`` of equal shapes, and the reshapes (``flatten``, ``view``, ``reshape``, ...).

:class:`ColumnTape` records these operations during the recorded forward (the exactness recorder
sees every operation on weight-dependent tensors), including in-place activations
(``nn.ReLU(inplace=True)``, ``nn.ReLU6(inplace=True)``, ...), ``out += identity`` of torchvision-style
blocks and the recorder's copies of layer outputs; any other operation, another in-place one, or an
argument of an unexpected kind makes the tape unusable and the caller falls back to autograd, so the
result never depends on this module's coverage. Tensors the backward reads are checked for in-place
changes (version counters) before it runs, and every taped tensor for changes the tape did not record.

Cost: the operations' input-gradient kernels once on ``K`` times the batch, with no per-column
loop and no autograd bookkeeping; the same flops as autograd's batched backward.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_flatness.functional.estimators.layer_rules.base import argument

__all__ = ["ColumnTape"]

# backward of one entry: (the output gradient (K, *out.shape), whether the rule may overwrite it) ->
# [(input tensor, its gradient, whether that gradient is a tensor no one else holds)]
_Backward = Callable[[Tensor, bool], list[tuple[Tensor, Tensor, bool]]]


def _no_input_gradient(g: Tensor, owned: bool) -> list[tuple[Tensor, Tensor, bool]]:
    return []


_NO_INPUT_GRADIENT: _Backward = _no_input_gradient
_RESHAPES = frozenset(
    {"flatten", "view", "reshape", "unflatten", "squeeze", "unsqueeze", "contiguous", "clone"}
)
_MAX_POOLS = {f"max_pool{d}d": d for d in (1, 2, 3)}
_ADAPTIVE_AVG_POOLS = {f"adaptive_avg_pool{d}d": d for d in (1, 2, 3)}
_CONVS = {f"conv{d}d": d for d in (1, 2, 3)}
_DROPOUTS = frozenset({"dropout", "dropout1d", "dropout2d", "dropout3d"})
_MASKED = frozenset({"relu", "leaky_relu", "hardtanh", "relu6"})  # piecewise-linear activations


def _holds_tensor(value: Any) -> bool:
    """Whether ``value`` is a container (tuple, list, dict) with a tensor inside."""
    if isinstance(value, dict):
        value = tuple(value.values())
    if isinstance(value, (tuple, list)):
        return any(isinstance(v, Tensor) or _holds_tensor(v) for v in value)
    return False


def _saved_pool_indices(out: Tensor) -> Optional[Tensor]:
    """The argmax indices autograd saved for the max pooling that produced ``out`` (its
    ``MaxPool{2,3}DWithIndicesBackward0`` node, behind the ``squeeze`` of a 1-d pooling), shaped like
    ``out``; ``None`` when they cannot be read (then the caller recomputes them)."""
    node: Any = out.grad_fn
    try:
        if type(node).__name__ == "SqueezeBackward1":  # max_pool1d: 2-d pooling of the unsqueezed input
            node = node.next_functions[0][0]
        if "PoolWithIndicesBackward" not in type(node).__name__.replace("2D", "").replace("3D", ""):
            return None
        index = node._saved_result1
    except (AttributeError, IndexError, RuntimeError, TypeError):  # no node, or its graph was freed
        return None
    if not isinstance(index, Tensor) or index.numel() != out.numel():
        return None
    return index.reshape(out.shape)


def _sample_major(g: Tensor) -> bool:
    """Whether ``g`` ``(K, N, ...)`` is laid out sample-major (its ``(N, K, ...)`` transpose is contiguous
    and it is not): then the rules fold the columns as ``(N K, ...)``, which keeps that order."""
    return g.shape[0] > 1 and not g.is_contiguous() and g.transpose(0, 1).is_contiguous()


def _linear_backward(x: Tensor, weight: Tensor, g: Tensor, owned: bool) -> list[tuple[Tensor, Tensor, bool]]:
    """``g W`` in ``g``'s memory order (column-major or sample-major)."""
    if _sample_major(g):
        return [(x, torch.matmul(g.transpose(0, 1), weight).transpose(0, 1), True)]
    return [(x, torch.matmul(g, weight), True)]


def _relu_backward(x: Tensor, out: Tensor, g: Tensor, owned: bool) -> list[tuple[Tensor, Tensor, bool]]:
    """``g * (out > 0)``, written into ``g`` when no one else holds it."""
    if owned:
        return [(x, torch.ops.aten.threshold_backward.grad_input(g, out, 0, grad_input=g), True)]
    return [(x, torch.ops.aten.threshold_backward(g, out, 0), True)]


def _masked_backward(
    x: Tensor, out: Tensor, kind: str, bounds: tuple[float, float], g: Tensor, owned: bool
) -> list[tuple[Tensor, Tensor, bool]]:
    """LeakyReLU (``kind="leaky_relu"``, ``bounds[0]`` the slope, at least 0) or hardtanh / ReLU6
    (``bounds`` the clamp): ``g`` times the derivative, read from the output (equal to the input's
    where it matters: same sign for a non-negative slope; inside the clamp the values are unchanged)."""
    if kind == "leaky_relu":
        return [(x, torch.ops.aten.leaky_relu_backward(g, out, bounds[0], True), True)]
    return [(x, torch.ops.aten.hardtanh_backward(g, out, bounds[0], bounds[1]), True)]


def _tuple(value: Any, nd: int) -> Optional[tuple[int, ...]]:
    if isinstance(value, int):
        return (value,) * nd
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        value = tuple(value)
        return value * nd if len(value) == 1 else (value if len(value) == nd else None)
    return None


class ColumnTape:
    """The recorded forward's operations on weight-dependent tensors, with their backward formulas
    for output gradients of ``K`` columns (see the module docstring).

    ``leaves``: ``{id: tensor}`` of the selected weights (their gradients are never needed; they
    may appear as the weight or bias of a layer). ``ok`` turns False for good at the first
    operation without a rule here.
    """

    def __init__(self, leaf_ids: set[int]):
        self.leaf_ids = leaf_ids
        self.ok = True
        # (output, its backward, whether the operation changed its input in place)
        self.entries: list[tuple[Tensor, _Backward, bool]] = []
        self.produced: set[int] = set()
        self.versions: list[tuple[Tensor, int]] = []  # tensors read by the backward, with their version
        # each taped tensor with its version after the last taped operation that wrote it
        self.output_versions: dict[int, tuple[Tensor, int]] = {}

    def reject(self) -> None:
        self.ok = False
        self.entries = []
        self.versions = []
        self.output_versions = {}

    def _add_entry(self, out: Tensor, backward: _Backward, in_place: bool) -> None:
        self.entries.append((out, backward, in_place))
        self.produced.add(id(out))
        self.output_versions[id(out)] = (out, out._version)

    def _constant(self, t: Any) -> bool:
        """``t`` is not a weight-dependent tensor other than a selected leaf (no gradient needed)."""
        return not isinstance(t, Tensor) or not t.requires_grad or id(t) in self.leaf_ids

    def record(self, name: str, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """Add one operation whose output requires grad (or reject the tape)."""
        if not self.ok:
            return
        if (
            args
            and args[0] is out
            and (name == "contiguous" or name in _DROPOUTS and self._eval_dropout(args, kwargs))
        ):
            return  # the input itself (already contiguous, eval-mode dropout): nothing to record
        in_place = bool(args) and args[0] is out and isinstance(out, Tensor)  # on its first argument
        if in_place:
            backward = self._in_place_rule(name, args, kwargs, out)
        else:
            backward = self._rule(name, func, args, kwargs, out)
        if backward is None:
            self.reject()
            return
        self._add_entry(out, backward, in_place)

    def record_copy(self, source: Tensor, copy: Tensor) -> None:
        """``copy`` is a copy of the taped ``source`` made outside the torch function mode (the
        recorder's copies of layer outputs, which the model may then change in place): the identity."""
        if not self.ok:
            return
        if id(source) not in self.produced:
            self.reject()
            return
        self._add_entry(copy, lambda g, owned: [(source, g, owned)], in_place=False)

    def _read(self, t: Tensor) -> None:
        self.versions.append((t, t._version))

    def _in_place_rule(self, name: str, args: tuple, kwargs: dict, out: Tensor) -> Optional[_Backward]:
        """In-place operations of torchvision-style blocks on a taped tensor ``out``, by the same rules as
        out of place: the piecewise-linear activations (``nn.ReLU(inplace=True)``, ``relu_``,
        ``nn.ReLU6(inplace=True)``, ...), whose derivative is read from the result anyway, and
        ``out += other`` (:meth:`_add`). The gradient stays under ``out`` (the tensor before the change
        has the same identity), so the entry that produced ``out`` receives the gradient of the value
        before the change."""
        if id(out) not in self.produced:
            return None
        if name in _MASKED:
            return self._masked(name, out, args, kwargs, out)
        if name == "add":
            return self._add(args, kwargs, out)
        return None

    def _rule(self, name: str, func: Any, args: tuple, kwargs: dict, out: Any) -> Optional[_Backward]:
        raw = getattr(func, "__name__", "")
        if not isinstance(out, Tensor) or "out" in kwargs or (raw[-1:] == "_" and raw[-2:] != "__"):
            return None
        # the weight-dependent tensors other than the selected weights: the ones that need a gradient
        dependent = []
        for v in (*args, *kwargs.values()):
            if isinstance(v, Tensor):
                if v is out:
                    return None  # in place
                if v.requires_grad and id(v) not in self.leaf_ids:
                    dependent.append(v)
            elif isinstance(v, (tuple, list, dict)) and _holds_tensor(v):
                return None  # tensors nested in containers (cat, stack, ...)
        if not dependent:
            return _NO_INPUT_GRADIENT  # only selected weights enter: nothing flows further back
        if name == "add":
            return self._add(args, kwargs, out)
        x = args[0] if args else kwargs.get("input")
        if len(dependent) > 1 or dependent[0] is not x:
            return None  # the one input that carries the gradient must be the first
        if name == "linear":
            weight = argument(args, kwargs, 1, ("weight",))
            if not isinstance(weight, Tensor) or weight.ndim != 2:
                return None
            return functools.partial(_linear_backward, x, weight)
        if name in _CONVS:
            return self._conv(_CONVS[name], x, args, kwargs, out)
        if name in _MASKED:
            return self._masked(name, x, args, kwargs, out)
        if name in _MAX_POOLS:
            return self._max_pool(_MAX_POOLS[name], func, x, args, kwargs, out)
        if name in _ADAPTIVE_AVG_POOLS:
            nd = _ADAPTIVE_AVG_POOLS[name]
            if x.ndim != nd + 2 or tuple(out.shape[2:]) != (1,) * nd:
                return None
            scale = 1.0 / math.prod(x.shape[2:])
            return lambda g, owned: [(x, (g * scale).expand(g.shape[0], *x.shape).contiguous(), True)]
        if name == "batch_norm":
            return self._batch_norm(x, args, kwargs, out)
        if name in _DROPOUTS:
            return (lambda g, owned: [(x, g, owned)]) if self._eval_dropout(args, kwargs) else None
        if name in _RESHAPES:
            if out.numel() != x.numel() or out.dtype != x.dtype:
                return None
            return lambda g, owned: [(x, g.reshape(g.shape[0], *x.shape), owned)]
        return None

    def _masked(self, name: str, x: Tensor, args: tuple, kwargs: dict, out: Tensor) -> Optional[_Backward]:
        """ReLU, LeakyReLU with a non-negative slope, hardtanh and ReLU6, in place or not (their
        derivative read from ``out``, whose later changes the version check catches)."""
        if name == "relu":
            self._read(out)
            return functools.partial(_relu_backward, x, out)
        if name == "leaky_relu":
            slope = argument(args, kwargs, 1, ("negative_slope",), 0.01)
            bounds: tuple[Any, Any] = (slope, 0.0)
        elif name == "relu6":
            bounds = (0.0, 6.0)
        else:
            bounds = (
                argument(args, kwargs, 1, ("min_val",), -1.0),
                argument(args, kwargs, 2, ("max_val",), 1.0),
            )
        if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds):
            return None
        lo, hi = float(bounds[0]), float(bounds[1])
        if (name == "leaky_relu" and lo < 0) or (name != "leaky_relu" and not lo < hi):
            return None
        self._read(out)
        kind = "leaky_relu" if name == "leaky_relu" else "hardtanh"
        return functools.partial(_masked_backward, x, out, kind, (lo, hi))

    @staticmethod
    def _eval_dropout(args: tuple, kwargs: dict) -> bool:
        """A dropout call in evaluation mode, not in place: the identity."""
        training = argument(args, kwargs, 2, ("training", "train"), True)
        return not training and not argument(args, kwargs, 3, ("inplace",), False)

    def _add(self, args: tuple, kwargs: dict, out: Tensor) -> Optional[_Backward]:
        if len(args) > 2 or set(kwargs) - {"other"} or len(args) + len(kwargs) != 2:
            return None  # alpha, out, ...: not the plain sum
        terms = [args[0], args[1] if len(args) > 1 else kwargs["other"]]
        dependent = [t for t in terms if not self._constant(t)]
        if any(t.shape != out.shape or t.dtype != out.dtype for t in dependent):
            return None  # a broadcast or a type promotion
        if len(dependent) == 1:
            return lambda g, owned: [(dependent[0], g, owned)]
        return lambda g, owned: [(t, g, False) for t in dependent]  # one gradient, several holders

    def _conv(self, nd: int, x: Tensor, args: tuple, kwargs: dict, out: Tensor) -> Optional[_Backward]:
        weight = argument(args, kwargs, 1, ("weight",))
        if not isinstance(weight, Tensor) or weight.ndim != nd + 2 or x.ndim != nd + 2:
            return None
        stride = _tuple(argument(args, kwargs, 3, ("stride",), 1), nd)
        dilation = _tuple(argument(args, kwargs, 5, ("dilation",), 1), nd)
        padding = argument(args, kwargs, 4, ("padding",), 0)
        groups = argument(args, kwargs, 6, ("groups",), 1)
        if stride is None or dilation is None or not isinstance(groups, int):
            return None
        if padding == "valid":
            pad: Optional[tuple[int, ...]] = (0,) * nd
        elif padding == "same":
            totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
            pad = tuple(t // 2 for t in totals) if all(t % 2 == 0 for t in totals) else None
        else:
            pad = _tuple(padding, nd)
        if pad is None:
            return None
        shape = tuple(x.shape)

        def backward(g: Tensor, owned: bool) -> list[tuple[Tensor, Tensor, bool]]:
            k = g.shape[0]
            sample_major = _sample_major(g)  # fold (N, K) when that is the memory order: no copy
            folded = (g.transpose(0, 1) if sample_major else g).reshape(k * shape[0], *g.shape[2:])
            grad_input = torch.ops.aten.convolution_backward(
                folded,
                folded.new_empty(1).expand(k * shape[0], *shape[1:]),  # only its shape is read
                weight,
                None,
                list(stride),
                list(pad),
                list(dilation),
                False,
                [0] * nd,
                groups,
                [True, False, False],
            )[0]
            if sample_major:
                return [(x, grad_input.reshape(shape[0], k, *shape[1:]).transpose(0, 1), True)]
            return [(x, grad_input.reshape(k, *shape), True)]

        return backward

    def _max_pool(
        self, nd: int, func: Any, x: Tensor, args: tuple, kwargs: dict, out: Tensor
    ) -> Optional[_Backward]:
        if x.ndim != nd + 2 or argument(args, kwargs, 6, ("return_indices",), False):
            return None
        options = {
            "kernel_size": argument(args, kwargs, 1, ("kernel_size",)),
            "stride": argument(args, kwargs, 2, ("stride",)),
            "padding": argument(args, kwargs, 3, ("padding",), 0),
            "dilation": argument(args, kwargs, 4, ("dilation",), 1),
            "ceil_mode": argument(args, kwargs, 5, ("ceil_mode",), False),
        }
        pool = getattr(F, f"max_pool{nd}d")
        self._read(x)

        def backward(g: Tensor, owned: bool) -> list[tuple[Tensor, Tensor, bool]]:
            index = _saved_pool_indices(out)
            if index is None:
                _, index = pool(x.detach(), return_indices=True, **options)  # the argmax autograd uses
            k, n, c = g.shape[0], x.shape[0], x.shape[1]
            # sample-major memory ((N, K) order) for the contractions downstream: their per-sample
            # layout is then a view (see _sample_major)
            grad = g.new_zeros(n, k, c, math.prod(x.shape[2:])).transpose(0, 1)
            index = index.reshape(1, n, c, -1).expand(k, n, c, -1)
            grad.scatter_add_(3, index, g.reshape(k, n, c, -1))
            return [(x, grad.reshape(k, *x.shape), True)]

        return backward

    def _batch_norm(self, x: Tensor, args: tuple, kwargs: dict, out: Tensor) -> Optional[_Backward]:
        mean = argument(args, kwargs, 1, ("running_mean",))
        var = argument(args, kwargs, 2, ("running_var",))
        weight = argument(args, kwargs, 3, ("weight",))
        training = argument(args, kwargs, 5, ("training",), False)
        eps = argument(args, kwargs, 7, ("eps",), 1e-5)
        if training or not isinstance(mean, Tensor) or not isinstance(var, Tensor) or x.ndim < 2:
            return None
        if not isinstance(eps, (int, float)):
            return None
        self._read(var)
        if isinstance(weight, Tensor):
            self._read(weight)

        def backward(g: Tensor, owned: bool) -> list[tuple[Tensor, Tensor, bool]]:
            scale = torch.rsqrt(var.detach() + eps)
            if isinstance(weight, Tensor):
                scale = scale * weight.detach()
            scale = scale.reshape(-1, *([1] * (x.ndim - 2)))
            return [(x, g.mul_(scale) if owned else g * scale, True)]

        return backward

    def backward(
        self,
        logits: Tensor,
        columns: Tensor,
        wanted: list[Tensor],
        consume: Optional[Callable[[int, Tensor], None]] = None,
    ) -> Optional[list[Optional[Tensor]]]:
        """Gradients ``(K, *z.shape)`` of the columns ``(K, *logits.shape)`` at each tensor of ``wanted``
        (``None`` where it does not reach the logits), or ``None`` when the tape cannot be used
        (an operation without a rule, the logits not produced on the tape, or a tensor the backward
        reads changed in place since the forward).

        ``consume(i, g)``: called with the gradient of ``wanted[i]`` as soon as it is complete (the
        last layer first) instead of returning it (its entry is then ``None``), so that each layer
        is contracted while its gradient is fresh in cache and no more than about two layers'
        gradients are alive at once."""
        if not self.ok or id(logits) not in self.produced:
            return None
        if any(t._version != v for t, v in self.versions) or any(
            t._version != v for t, v in self.output_versions.values()
        ):
            return None
        with torch.no_grad():
            return self._backward(logits, columns, wanted, consume)

    def _backward(
        self,
        logits: Tensor,
        columns: Tensor,
        wanted: list[Tensor],
        consume: Optional[Callable[[int, Tensor], None]],
    ) -> list[Optional[Tensor]]:
        index = {id(t): i for i, t in enumerate(wanted)}
        found: dict[int, Tensor] = {}
        # id -> (gradient so far, whether no one else holds it: then a rule may overwrite it)
        grads: dict[int, tuple[Tensor, bool]] = {id(logits): (columns, False)}
        for out, rule, in_place in reversed(self.entries):
            item = grads.pop(id(out), None)
            if item is None:
                continue
            g, owned = item
            i = None if in_place else index.get(id(out))  # delivered by the entry that produced it
            if i is not None:
                if consume is None:
                    found[i] = g
                    owned = False  # returned to the caller
                else:
                    consume(i, g)  # done with it before the rule runs
            for t, gt, fresh in rule(g, owned):
                key = id(t)
                if key in self.leaf_ids:
                    continue
                previous = grads.get(key)
                grads[key] = (gt, fresh) if previous is None else (previous[0] + gt, True)
        return [found.get(i) for i in range(len(wanted))]
