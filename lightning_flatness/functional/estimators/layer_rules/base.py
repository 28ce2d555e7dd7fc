"""What a layer rule is: one recorded call of a weight-carrying op and how to contract it.

The exact and Gauss-Newton estimators (:mod:`..exact`) record every call of a registered op whose
weight or bias is a selected parameter (:class:`LayerCall`), then contract the output gradients of
``K`` backward columns with the recorded input into ``sum_{n,k} sign_nk (per-sample gradient)^2``
(:mod:`.contraction`). A rule says, for one op, how to read its arguments and how to lay its
input and output gradient out as ``(N, G, I, P)`` and ``(N, G, K * O, P)`` (samples, groups,
inputs/outputs per group, positions), so that the per-sample weight gradient of column ``k`` is
``sum_p g_p a_p^T`` (a rule for which that is ``g[k, n]^T a[n]``, Linear, may also give its factors as they
lie: :meth:`LayerRule.positionwise_factors`, :func:`samplewise_gradients`). Adding a layer kind is one
module with one :class:`LayerRule` and one
:func:`register_layer_rule` call (BackPACK's module-extension dicts are the model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

__all__ = [
    "LAYER_RULES",
    "SAMPLEWISE_MIN_ENTRIES",
    "LayerCall",
    "LayerRule",
    "SampleGradients",
    "argument",
    "register_layer_rule",
    "samplewise_gradients",
    "sum_trailing_dims",
    "uses_samplewise_gradients",
]


def argument(args: tuple, kwargs: dict, position: int, names: tuple[str, ...], default: Any = None) -> Any:
    """The argument at ``position`` of a torch function call, or under one of ``names``, or ``default``."""
    if len(args) > position:
        return args[position]
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return default


def sum_trailing_dims(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``t.sum(dim=dims)`` for ``dims`` the trailing dims of ``t`` (a per-sample bias gradient: the
    positions of ``(K, N, O, *P)``), as one matrix-vector product with a vector of ones where the
    trailing dims are contiguous and the leading ones merge into one row index in memory order
    (column-major ``(K, N)`` or sample-major ``(N, K)``); else ``t.sum(dim=dims)``.

    Same values up to the order of the float additions. On the CPU the reduction kernel is slow on rows
    of few positions and was never faster in the shapes measured (``benchmarks/RESULTS.md``, round 24)."""
    lead = t.ndim - len(dims)
    if (
        lead < 1
        or sorted(d % t.ndim for d in dims) != list(range(lead, t.ndim))
        or not t.is_floating_point()
        or t.numel() == 0
    ):
        return t.sum(dim=dims)
    strides = t.stride()
    order = sorted(range(lead), key=lambda d: -strides[d])  # the leading dims in memory order
    rows = t.permute(*order, *range(lead, t.ndim))
    if not rows.is_contiguous():
        return t.sum(dim=dims)
    size = math.prod(t.shape[lead:])
    sums = torch.mv(rows.reshape(-1, size), t.new_ones(size)).reshape(rows.shape[:lead])
    return sums.permute(*sorted(range(lead), key=order.__getitem__))


@dataclass
class LayerCall:
    """One call of a registered op whose weight or bias is a selected parameter."""

    op: str
    module: str
    inputs: Tensor  # detached layer input a
    output: Tensor  # layer output z, in the graph (unchanged by the model: see exact._record_forward)
    weight: Optional[str]
    bias: Optional[str]
    stride: tuple[int, ...] = ()
    padding: tuple[tuple[int, int], ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    samples_interact: bool = False  # set by a rule whose op couples the samples (batch statistics)
    options: dict[str, Any] = field(default_factory=dict)  # rule-specific settings read at record time
    version: int = 0  # the output's version counter when recorded (in-place changes move it)


@dataclass
class SampleGradients:
    """Per-sample gradients of one recorded call, on demand for a slice of the samples (for a weight used by
    several calls, :mod:`.shared`): ``weight(samples)`` ``(m, K, *weight.shape)`` and ``bias(samples)``
    ``(m, K, O)`` for the ``m`` samples of ``samples`` and the ``K`` backward columns. ``weight`` returns a
    new tensor each time (the caller may add into it in place); a sparse rule gives ``add_weight``
    instead."""

    weight: Optional[Callable[[slice], Tensor]]
    bias: Callable[[slice], Tensor]
    #: ``add_weight(samples, total)``: add the weight gradients into ``total`` ``(m, K, *weight.shape)`` in
    #: place, in place of ``weight``, for a rule whose per-sample gradients are sparse (an embedding table)
    add_weight: Optional[Callable[[slice, Tensor], None]] = None


class LayerRule:
    """How one op's calls are recorded and contracted. Subclasses implement the three methods."""

    #: the torch function's name, as the recorder sees it (e.g. ``"linear"``, ``"conv2d"``)
    op: str = ""
    #: where the call passes the layer's input: ``(position, keyword names)``
    input_argument: tuple[int, tuple[str, ...]] = (0, ("input",))
    #: where the call passes the weight and the bias: ``(position, keyword names)``; ``None``: no bias
    weight_argument: tuple[int, tuple[str, ...]] = (1, ("weight",))
    bias_argument: Optional[tuple[int, tuple[str, ...]]] = (2, ("bias",))
    #: whether the contraction of a call reads nothing per sample but its ``inputs`` and the output
    #: gradients, so that a slice of a batch's samples (a call recorded with one row per sample) is contracted
    #: from slices of both: several sample groups from one pass (:mod:`..exact_groups`). Off by default (a
    #: rule with per-sample tensors in ``options`` or a contraction of its own: embeddings, offsets).
    sliceable: bool = False

    def record(self, call: LayerCall, args: tuple, kwargs: dict, weight: Optional[Tensor]) -> None:
        """Read the op's geometry (stride, padding, ...) from its arguments into ``call``."""

    def is_batched(self, call: LayerCall, n: int) -> bool:
        """Whether dim 0 of the call's input and output is the batch of ``n`` samples (or, for a rule
        with :meth:`regroup`, ``n`` groups of rows, one group per sample)."""
        raise NotImplementedError

    def regroup(self, call: LayerCall, grad: Tensor, n: int) -> Optional[tuple[LayerCall, Tensor]]:
        """A call whose dim 0 holds ``n k`` rows, ``k`` per sample in sample-major order (windowed
        attention's ``(N * windows, tokens, C)``), and its output gradients ``(K, n k, *out)``, as a call
        with the ``n`` samples along dim 0 and the ``k`` rows among each sample's positions; ``None``
        (the default): the rule has no such view. Which rows belong to which sample is checked by the
        estimators' batch-independence probe (:func:`~lightning_flatness.functional.estimators.exact.
        rows_of_other_samples`), not here."""
        return None

    def bias_position_dims(self, grad: Tensor) -> tuple[int, ...]:
        """The dims of ``grad`` ``(K, N, *out)`` to sum for the per-sample bias gradient ``(K, N, O)``."""
        raise NotImplementedError

    def bias_gradients(self, grad: Tensor) -> Tensor:
        """The per-sample bias gradients ``(K, N, O)`` of output gradients ``grad`` ``(K, N, *out)``: summed
        over :meth:`bias_position_dims` (none for one position per sample: ``sum(dim=())`` would sum all)."""
        dims = self.bias_position_dims(grad)
        return sum_trailing_dims(grad, dims) if dims else grad

    def factors(self, call: LayerCall, grad: Tensor, kernel: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """Input as ``(N, G, I, P)`` and output gradients of ``K`` columns as ``(N, G, K * O, P)``."""
        raise NotImplementedError

    def positionwise_factors(self, call: LayerCall, grad: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """For a rule whose per-sample gradient of column ``k`` is ``g[k, n]^T a[n]`` (one group, no
        kernel: Linear), the input ``a`` ``(N, P, I)`` and the output gradients ``g`` ``(K, N, P, O)`` as
        they lie (:func:`samplewise_gradients` reads them without the copy into :meth:`factors`' layout);
        ``None`` (the default): only :meth:`factors`."""
        return None

    def accumulate(
        self, call: LayerCall, grad: Tensor, signs: Tensor, diag: dict[str, Tensor], leaves: dict[str, Tensor]
    ) -> bool:
        """A rule's own contraction (e.g. a sparse one), adding to ``diag`` as
        :func:`~.contraction.accumulate_layer` does; ``False`` (the default): use the shared one."""
        return False

    def as_weight(self, value: Tensor, shape: tuple[int, ...]) -> Tensor:
        """``value`` ``(..., G, O / G, I)`` in the rule's layout as ``(..., *shape)``, the weight's own
        layout (a plain reshape unless the op stores the weight transposed: :mod:`.addmm`)."""
        return value.reshape(*value.shape[:-3], *shape)

    def sample_gradients(self, call: LayerCall, grad: Tensor, shape: tuple[int, ...]) -> SampleGradients:
        """The per-sample weight and bias gradients of output gradients ``grad`` ``(K, N, *out)``, for a
        weight of ``shape``: from :meth:`factors` (``g a^T`` per sample, ``O(K P O I)`` flops and ``K O I``
        entries per sample), or sample by sample from :meth:`positionwise_factors` where
        :func:`uses_samplewise_gradients` says so; and :meth:`bias_gradients`. A rule with its own
        contraction (:meth:`accumulate`) overrides it."""
        k = grad.shape[0]

        def bias(samples: slice) -> Tensor:
            return self.bias_gradients(grad[:, samples]).transpose(0, 1)

        direct = self.positionwise_factors(call, grad) if call.weight is not None else None
        if direct is not None and uses_samplewise_gradients(direct[1]):
            a, g = direct

            def samplewise(samples: slice) -> Tensor:
                return self.as_weight(samplewise_gradients(a, g, samples).unsqueeze(2), shape)

            return SampleGradients(samplewise, bias)
        factors = self.factors(call, grad, tuple(shape[2:])) if call.weight is not None else None

        def weight(samples: slice) -> Tensor:
            assert factors is not None, "the call has no selected weight"
            a, g = factors[0][samples], factors[1][samples]
            gw = torch.matmul(g, a.transpose(-1, -2))  # (m, G, K * O, I)
            m, groups = gw.shape[:2]
            return self.as_weight(gw.reshape(m, groups, k, -1, gw.shape[-1]).transpose(1, 2), shape)

        return SampleGradients(weight, bias)

    def single_position(self, call: LayerCall) -> bool:
        """Whether each sample has one position (then ``(g a^T)^2 = g^2 (a^2)^T``: the fast path)."""
        return False

    def squared_gradients(
        self, call: LayerCall, grad: Tensor, signs: Tensor, kernel: tuple[int, ...]
    ) -> Optional[Tensor]:
        """``sum_{n,k} sign_nk (per-sample weight gradient)^2`` as ``(G, O / G, I)`` by a rule-specific
        kernel, or ``None`` to use the generic contractions of :mod:`.contraction` (the default)."""
        return None

    def squared_gradient_block(
        self, call: LayerCall, grad: Tensor, signs: Tensor, kernel: tuple[int, ...]
    ) -> Optional[tuple[Tensor, tuple[Any, ...]]]:
        """The same sum when it is zero outside a block: ``(block, index)`` with ``block`` the entries
        ``index`` of the weight laid out as ``(G, O / G, I / prod(kernel), *kernel)``, added in place
        (e.g. the taps of a convolution that read more than padding), or ``None`` (the default)."""
        return None


#: From this many output-gradient entries per sample (``K x P x O``) on, a rule with
#: :meth:`LayerRule.positionwise_factors` forms per-sample gradients one sample at a time from the output
#: gradients as they lie (:func:`samplewise_gradients`); below, the copy into :meth:`LayerRule.factors`'
#: layout is small and one batched product over the samples costs less than a call per sample.
SAMPLEWISE_MIN_ENTRIES = 2**16


def uses_samplewise_gradients(g: Tensor) -> bool:
    """Whether output gradients ``g`` ``(K, N, P, O)`` (:meth:`LayerRule.positionwise_factors`) are taken
    sample by sample: several positions (one needs no transposing copy) and at least
    :data:`SAMPLEWISE_MIN_ENTRIES` entries per sample."""
    return g.shape[2] > 1 and g.shape[0] * g.shape[2] * g.shape[3] >= SAMPLEWISE_MIN_ENTRIES


def samplewise_gradients(a: Tensor, g: Tensor, samples: slice) -> Tensor:
    """Per-sample weight gradients ``(m, K, O, I)`` of the ``samples`` from ``a`` ``(N, P, I)`` and ``g``
    ``(K, N, P, O)``: for each sample one batched product over the ``K`` columns, ``g[:, n]^T a[n]``, which
    reads each column's ``(P, O)`` block as it lies (a transposed operand for BLAS) and writes straight into
    the result. The transposing copy of ``g`` into ``(N, K * O, P)`` that a single product over all samples
    needs costs more than the products on a language-model head (``O`` a vocabulary; measured in
    ``benchmarks/RESULTS.md``, round 14). ``O(K P O I)`` flops per sample."""
    k, _, p, o = g.shape
    rows = range(a.shape[0])[samples]
    out = g.new_empty(len(rows), k, o, a.shape[2])
    for j, n in enumerate(rows):
        torch.bmm(g[:, n].transpose(1, 2), a[n].expand(k, p, a.shape[2]), out=out[j])
    return out


#: ``{op name: rule}``: the ops whose weights the per-layer contractions handle.
LAYER_RULES: dict[str, LayerRule] = {}


def register_layer_rule(rule: LayerRule) -> LayerRule:
    """Add ``rule`` to :data:`LAYER_RULES` under ``rule.op``."""
    if not rule.op:
        raise ValueError(f"{type(rule).__name__} has no `op` name.")
    LAYER_RULES[rule.op] = rule
    return rule
