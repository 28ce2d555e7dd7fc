"""``conv1d`` / ``conv2d`` / ``conv3d`` with any stride, padding (``"same"``, ``"valid"``, ints),
dilation and groups: im2col of the input, so that the per-sample gradient of column ``k`` is
``sum_p g_kp a_p^T`` over the output positions ``p``, per group.

Layers with few input channels per group (the first convolution of a network: 1 to 3 channels) get
their per-sample gradients from one grouped convolution backward instead
(:func:`grouped_squared_gradients`): the batched matrix products of im2col are a poor fit there
(per sample a ``(K O) x P`` by ``P x I`` product with ``I = C k`` tiny).

Kernel taps that read only padding at every output position (a padded 3x3 convolution on a 1x1
map: 8 of 9 taps) have zero per-sample gradients; they are left out of the contraction
(:func:`cropped_squared_gradients`: 1/9 of the cost on the last stage of a CIFAR ResNet-18)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_flatness.functional.estimators.layer_rules.base import (
    LAYER_RULES,
    LayerCall,
    LayerRule,
    argument,
    register_layer_rule,
)
from lightning_flatness.functional.estimators.layer_rules.contraction import factor_contraction

__all__ = [
    "GROUPED_CHUNK_ELEMENTS",
    "GROUPED_MAX_CHANNELS",
    "UNFOLD_KERNEL_MAX_POSITIONS",
    "ConvRule",
    "conv_padding",
    "cropped_squared_gradient_block",
    "cropped_squared_gradients",
    "grouped_squared_gradients",
    "live_taps",
    "record_geometry",
    "unfold",
    "use_grouped_convolution",
]

#: input channels per group up to which :func:`grouped_squared_gradients` is used (float32 on CPU;
#: see :func:`use_grouped_convolution`)
GROUPED_MAX_CHANNELS = 3
#: bound on per-sample-gradient elements one grouped convolution backward produces
GROUPED_CHUNK_ELEMENTS = 2**20
#: output positions up to which 2-D im2col uses the library's kernel (``F.unfold``; see :func:`unfold`)
UNFOLD_KERNEL_MAX_POSITIONS = 16


def _expand(value: Any, nd: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * nd
    value = tuple(int(v) for v in value)
    return value * nd if len(value) == 1 else value


def conv_padding(
    padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]
) -> tuple[tuple[int, int], ...]:
    """(left, right) zero padding per spatial dim; ``"same"`` puts the odd element on the right."""
    if isinstance(padding, str):
        if padding == "valid":
            return tuple((0, 0) for _ in kernel)
        if padding == "same":
            total = [d * (k - 1) for k, d in zip(kernel, dilation)]
            return tuple((t // 2, t - t // 2) for t in total)
        raise ValueError(f"unknown conv padding {padding!r}; expected an int, a tuple, 'same' or 'valid'.")
    return tuple((p, p) for p in _expand(padding, len(kernel)))


def record_geometry(
    call: LayerCall, args: tuple, kwargs: dict, weight: Optional[Tensor], nd: int, dilation_position: int
) -> None:
    """Stride, padding, dilation and groups of a (transposed) convolution call into ``call``: stride,
    padding and groups at positions 3, 4 and 6 of both ``convNd`` and ``conv_transposeNd``, dilation at
    ``dilation_position`` (5 and 7: the transposed one has ``output_padding`` at 5)."""
    assert weight is not None  # (transposed) convolutions always have a weight
    kernel = tuple(weight.shape[2:])
    call.stride = _expand(argument(args, kwargs, 3, ("stride",), 1), nd)
    call.dilation = _expand(argument(args, kwargs, dilation_position, ("dilation",), 1), nd)
    call.padding = conv_padding(argument(args, kwargs, 4, ("padding",), 0), kernel, call.dilation)
    call.groups = int(argument(args, kwargs, 6, ("groups",), 1))


def unfold(x: Tensor, call: LayerCall, kernel: tuple[int, ...]) -> Tensor:
    """im2col for 1, 2 or 3 spatial dims: ``(N, C, *S) -> (N, groups, C/groups * prod(k), L)``, rows in
    ``(channel, *tap)`` order, columns in output-position order.

    A strided view of the (padded) input copied into that layout (no copy at all for an unpadded
    ``1 x 1`` kernel), except for 2-D kernels of several taps onto 2 to
    :data:`UNFOLD_KERNEL_MAX_POSITIONS` output positions, where the library's im2col kernel
    (``F.unfold``, same layout and values) is faster: the view's copy runs inner loops of one output
    row (2 entries on a 2x2 map). ``F.unfold`` was measured faster on small maps and slower on large
    ones (the figures: ``benchmarks/results/bench_sketch_copies.md``)."""
    nd = len(kernel)
    if (
        nd == 2
        and math.prod(kernel) > 1
        and 1 < _output_positions(x, call, kernel) <= UNFOLD_KERNEL_MAX_POSITIONS
    ):
        (top, bottom), (left, right) = call.padding
        if top == bottom and left == right:
            cols = F.unfold(x, kernel, call.dilation, (top, left), call.stride)
        else:  # asymmetric padding (a cropped kernel, "same" with an even kernel): pad first
            cols = F.unfold(F.pad(x, (left, right, top, bottom)), kernel, call.dilation, 0, call.stride)
        return cols.reshape(x.shape[0], call.groups, -1, cols.shape[-1])
    pads = [p for pair in reversed(call.padding) for p in pair]
    if any(pads):
        x = F.pad(x, pads)
    for d in range(nd):
        span = call.dilation[d] * (kernel[d] - 1) + 1
        x = x.unfold(2 + d, span, call.stride[d])
        if call.dilation[d] > 1:
            x = x[..., :: call.dilation[d]]
    n, c = x.shape[:2]
    positions = math.prod(x.shape[2 : 2 + nd])
    x = x.permute(0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))
    return x.reshape(n, call.groups, (c // call.groups) * math.prod(kernel), positions)


def _output_positions(x: Tensor, call: LayerCall, kernel: tuple[int, ...]) -> int:
    """The number of output positions of the convolution ``call`` with ``kernel`` on the input ``x``."""
    sizes = [
        (size + left + right - call.dilation[d] * (kernel[d] - 1) - 1) // call.stride[d] + 1
        for d, (size, (left, right)) in enumerate(zip(x.shape[2:], call.padding))
    ]
    return math.prod(sizes)


def use_grouped_convolution(channels_per_group: int, grad: Tensor) -> bool:
    """Whether :func:`grouped_squared_gradients` replaces im2col for a layer with ``channels_per_group``
    input channels per group: few channels (at most :data:`GROUPED_MAX_CHANNELS`), float32 on CPU.

    Faster than im2col with 1-3 input channels (the first convolutions of the 1-D LeNet and ResNet:
    3-5 inputs per output, where a matrix product per sample is a poor fit), slower from 4 channels
    on; measured per layer on one CPU thread (``benchmarks/results/bench_backpack_exact_speed.md``).
    Other dtypes and devices keep im2col (not measured).
    """
    return (
        channels_per_group <= GROUPED_MAX_CHANNELS
        and grad.dtype == torch.float32
        and grad.device.type == "cpu"
    )


def grouped_squared_gradients(
    call: LayerCall, grad: Tensor, signs: Tensor, kernel: tuple[int, ...]
) -> Tensor:
    r"""``sum_{n,k} sign_nk (dW_nk)^2`` as ``(G, O / G, C / G * prod(kernel))`` from one grouped
    convolution backward per chunk of samples.

    The per-sample weight gradient of column ``k``, ``dW_nk = sum_p g_nkp a_np^T``, is the weight
    gradient of a convolution whose groups are the ``(sample, group)`` pairs: input ``(1, N C, *S)``,
    output gradient ``(1, N G K O/G, *P)`` (the ``K`` columns of a sample are extra output channels of
    its groups), weight ``(N G K O/G, C/G, *kernel)``. One call of the library's weight-gradient kernel
    (``aten.convolution_backward``) gives every ``dW_nk``; no im2col copy of the input. Same stride and
    dilation; the padding (possibly asymmetric) is applied to the input beforehand.

    Cost: ``O(N K O C/G prod(kernel) P)`` flops, samples in chunks of about
    :data:`GROUPED_CHUNK_ELEMENTS` per-sample-gradient entries (plus the output gradient's
    ``(sample, group, column)``-major copy).
    """
    k, n = grad.shape[:2]
    nd = len(kernel)
    pads = [p for pair in reversed(call.padding) for p in pair]
    x = F.pad(call.inputs, pads) if any(pads) else call.inputs
    channels, groups = x.shape[1], call.groups
    per_group_in, per_group_out = channels // groups, grad.shape[2] // groups
    spatial = grad.shape[3:]
    entries = per_group_in * math.prod(kernel)
    chunk = max(1, GROUPED_CHUNK_ELEMENTS // (k * grad.shape[2] * entries))
    acc = grad.new_zeros(groups, per_group_out, entries)
    for start in range(0, n, chunk):
        xs = x[start : start + chunk]
        m = xs.shape[0]
        gs = grad[:, start : start + chunk].reshape(k, m, groups, per_group_out, *spatial)
        gs = gs.permute(1, 2, 0, *range(3, 4 + nd)).reshape(1, m * groups * k * per_group_out, *spatial)
        shape = (m * groups * k * per_group_out, per_group_in, *kernel)  # only the weight's shape is read
        _, dw, _ = torch.ops.aten.convolution_backward(
            gs,
            xs.reshape(1, m * channels, *xs.shape[2:]),
            grad.new_empty(()).expand(shape),
            None,
            list(call.stride),
            [0] * nd,
            list(call.dilation),
            False,
            [0] * nd,
            m * groups,
            [False, True, False],
        )
        sq = dw.reshape(m, groups, k, per_group_out, entries).square_()
        sl = signs[start : start + chunk]
        if groups == 1:  # (n, k) adjacent: the signed sum is one matrix-vector product
            acc += (sl.reshape(1, m * k) @ sq.reshape(m * k, -1)).reshape(acc.shape)
        else:
            acc += sq.mul_(sl.reshape(m, 1, k, 1, 1)).sum(dim=(0, 2))
    return acc


def live_taps(
    call: LayerCall, kernel: tuple[int, ...], spatial: tuple[int, ...], outputs: tuple[int, ...]
) -> tuple[tuple[int, int], ...]:
    """Per spatial dim, the range ``[start, stop)`` of kernel taps that can read an input entry
    (not only padding) at some output position, for an input of size ``spatial`` and output of size
    ``outputs``.

    Tap ``j`` of a dim reads input indices ``o * stride - left + j * dilation`` for the outputs
    ``o``; a tap whose whole range lies in the padding has a per-sample weight gradient of exactly
    zero (e.g. 8 of the 9 taps of a padded 3x3 convolution on a 1x1 map: the last stage of a
    CIFAR-size ResNet-18). The range test is conservative (a tap kept may still read padding only
    when the stride skips the input), so the kept taps are always a contiguous superset of the live
    ones."""
    ranges = []
    for d, size in enumerate(spatial):
        left = call.padding[d][0]
        span = (outputs[d] - 1) * call.stride[d]
        live = [
            j
            for j in range(kernel[d])
            if span - left + j * call.dilation[d] >= 0 and -left + j * call.dilation[d] < size
        ]
        ranges.append((live[0], live[-1] + 1) if live else (0, 0))
    return tuple(ranges)


def cropped_squared_gradient_block(
    call: LayerCall, grad: Tensor, signs: Tensor, kernel: tuple[int, ...]
) -> Optional[tuple[Tensor, tuple[Any, ...]]]:
    r"""``sum_{n,k} sign_nk (dW_nk)^2`` at the live taps (:func:`live_taps`) only, as
    ``(block, index)``: ``block`` ``(G, O / G, C / G, *(stop - start))`` holds the taps ``index`` of the
    ``(G, O / G, C / G, *kernel)`` layout, every other tap is zero. ``None`` when every tap is live (or
    a crop would need negative padding).

    The live taps ``[start, stop)`` form a convolution of kernel ``stop - start`` whose left padding is
    ``left - start * dilation`` (the same output positions read the same inputs); its contraction
    (:func:`~.contraction.factor_contraction`) gives those taps; the others read only padding, so
    their per-sample gradients are exactly zero, as the full contraction would give them. Cost: that
    of the cropped kernel, ``prod(stop - start) / prod(kernel)`` of the full one (1/9 for a padded
    3x3 convolution on a 1x1 map); :func:`~.contraction.accumulate_layer` adds the block into the
    diagonal in place (no zero tensor of the full kernel, no pass over its dead taps)."""
    spatial = tuple(call.inputs.shape[2:])
    outputs = tuple(grad.shape[3:])
    taps = live_taps(call, kernel, spatial, outputs)
    if all(stop - start == size for (start, stop), size in zip(taps, kernel)):
        return None
    padding = []
    for d, (start, stop) in enumerate(taps):
        left = call.padding[d][0] - start * call.dilation[d]
        # the right padding that gives the same number of outputs with the cropped kernel
        right = (
            (outputs[d] - 1) * call.stride[d] + call.dilation[d] * (stop - start - 1) + 1 - spatial[d] - left
        )
        if left < 0 or right < 0 or stop == start:
            return None  # a crop would need negative padding: keep the full kernel
        padding.append((left, right))
    small = tuple(stop - start for start, stop in taps)
    cropped = dataclasses.replace(call, padding=tuple(padding))
    part = factor_contraction(LAYER_RULES[call.op], cropped, grad, signs, small)  # (G, O / G, C / G * small)
    index: tuple[Any, ...] = (Ellipsis,) + tuple(slice(start, stop) for start, stop in taps)
    return part.reshape(*part.shape[:2], call.inputs.shape[1] // call.groups, *small), index


def cropped_squared_gradients(
    call: LayerCall, grad: Tensor, signs: Tensor, kernel: tuple[int, ...]
) -> Optional[Tensor]:
    r"""``sum_{n,k} sign_nk (dW_nk)^2`` as ``(G, O / G, C / G * prod(kernel))`` with the taps that read
    only padding left out of the work (:func:`cropped_squared_gradient_block`, placed into zeros), or
    ``None`` when every tap is live."""
    block = cropped_squared_gradient_block(call, grad, signs, kernel)
    if block is None:
        return None
    part, index = block
    full = part.new_zeros(*part.shape[:3], *kernel)
    full[index] = part
    return full.reshape(part.shape[0], part.shape[1], -1)


class ConvRule(LayerRule):
    """``convNd(input (N, C, *S), weight (O, C/groups, *kernel), bias, stride, padding, dilation,
    groups)``, or ``(N k, C, *S)`` with ``k`` rows per sample (:meth:`regroup`)."""

    sliceable = True

    def __init__(self, spatial_dims: int) -> None:
        self.spatial_dims = spatial_dims
        self.op = f"conv{spatial_dims}d"

    def record(self, call: LayerCall, args: tuple, kwargs: dict, weight: Optional[Tensor]) -> None:
        record_geometry(call, args, kwargs, weight, self.spatial_dims, dilation_position=5)

    def is_batched(self, call: LayerCall, n: int) -> bool:
        rows = call.inputs.shape[0] if call.inputs.ndim == self.spatial_dims + 2 else -1
        return rows > 0 and rows % n == 0 and call.output.shape[0] == rows

    def regroup(self, call: LayerCall, grad: Tensor, n: int) -> tuple[LayerCall, Tensor]:
        """``(n k, C, *S)`` rows, ``k`` per sample in sample-major order (TNT's inner patches,
        ``(N * patches, C, h, w)``), as ``n`` samples whose ``k`` rows are more output positions of one
        per-sample gradient: the output gradients ``(K, n k, O, *S')`` as ``(K, n, O, k * prod(S'))``, and
        :meth:`factors` lays each sample's im2col columns side by side in the same order."""
        k = call.inputs.shape[0] // n
        g = grad.reshape(grad.shape[0], n, k, grad.shape[2], -1).transpose(2, 3)
        regrouped = dataclasses.replace(call, options={**call.options, "rows_per_sample": k})
        return regrouped, g.reshape(grad.shape[0], n, grad.shape[2], -1)

    def bias_position_dims(self, grad: Tensor) -> tuple[int, ...]:
        return tuple(range(3, grad.ndim))

    def factors(self, call: LayerCall, grad: Tensor, kernel: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        k, n = grad.shape[:2]
        a = unfold(call.inputs, call, kernel)
        rows = call.options.get("rows_per_sample", 1)
        if rows > 1:  # (n rows, G, I, L) -> (n, G, I, rows * L): a sample's rows side by side (regroup)
            a = a.reshape(n, rows, *a.shape[1:]).permute(0, 2, 3, 1, 4).reshape(n, a.shape[1], a.shape[2], -1)
        g = grad.reshape(k, n, call.groups, grad.shape[2] // call.groups, -1).permute(1, 2, 0, 3, 4)
        return a, g.reshape(n, g.shape[1], -1, g.shape[-1])

    def squared_gradients(
        self, call: LayerCall, grad: Tensor, signs: Tensor, kernel: tuple[int, ...]
    ) -> Optional[Tensor]:
        if "rows_per_sample" in call.options:  # (regrouped rows: the generic contraction of factors)
            return None
        if use_grouped_convolution(call.inputs.shape[1] // call.groups, grad):
            return grouped_squared_gradients(call, grad, signs, kernel)
        return None  # the crop of dead taps is squared_gradient_block's (tried next)

    def squared_gradient_block(
        self, call: LayerCall, grad: Tensor, signs: Tensor, kernel: tuple[int, ...]
    ) -> Optional[tuple[Tensor, tuple[Any, ...]]]:
        if "rows_per_sample" in call.options:
            return None
        return cropped_squared_gradient_block(call, grad, signs, kernel)


for _nd in (1, 2, 3):
    register_layer_rule(ConvRule(_nd))
