r"""Affine parameters of normalization layers: ``batch_norm`` (eval mode), ``layer_norm``,
``group_norm`` and ``rms_norm``.

Each computes ``y = weight * xhat + bias`` with ``xhat`` the normalized input and one ``weight`` and
``bias`` entry per channel ``c``. The output is linear in both, so the per-sample gradient of
column ``k`` is ``sum_p g_kcp xhat_cp`` for the weight and ``sum_p g_kcp`` for the bias, the sum
running over the positions ``p`` that share channel ``c`` (spatial positions, tokens). In the
layout of :mod:`~lightning_flatness.functional.estimators.layer_rules.base` that is a contraction with
one group per channel, one input and one output
per group (``(N, C, 1, P)`` and ``(N, C, K, P)``): a depthwise ``1 x 1`` convolution whose input is
``xhat``. The rule records ``xhat`` (recomputed from the call's arguments, detached) in place of
the raw input, so the Gauss-Newton diagonal of these 1-D parameters costs a few elementwise passes
over one layer's activations, like the bias of a convolution, and keeps the per-layer fast path
of :mod:`..exact` (otherwise a parameter used outside a registered op sends the whole model to the
per-sample path, ``N K`` backward passes).

Whether ``diag(GGN)`` is the Hessian diagonal is the exactness recorder's business: eval-mode
``batch_norm`` is on its allowlist (the affine parameters enter linearly, once); ``layer_norm``,
``group_norm`` and ``rms_norm`` of a weight-dependent input are not (the normalization is a
nonlinear function of the earlier weights).

Channels-last layers (``layer_norm``, ``rms_norm``) also take ``(N k, *positions, C)`` rows, and
``batch_norm`` ``(N k, C)`` rows, ``k`` per sample in sample-major order, read per sample as Linear's
grouped rows are.

Not covered (``is_batched`` is false, so the per-sample path runs, still exact for the GGN):
``batch_norm`` with batch statistics (training mode, or no running statistics: the samples
interact) and ``layer_norm`` / ``rms_norm`` over more than one trailing dimension.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from lightning_flatness.functional.estimators.layer_rules.base import (
    LayerCall,
    LayerRule,
    argument,
    register_layer_rule,
)

__all__ = ["BatchNormRule", "GroupNormRule", "LayerNormRule", "RMSNormRule"]


class _ChannelAffineRule(LayerRule):
    """Shared layout: one group per channel, input ``xhat`` ``(N, C, 1, P)``, gradients ``(N, C, K, P)``.

    ``channel_last``: channels are the last dim (``layer_norm``, ``rms_norm``: ``(N, *positions, C)``)
    rather than dim 1 (``batch_norm``, ``group_norm``: ``(N, C, *spatial)``).
    """

    sliceable = True

    channel_last = False

    def is_batched(self, call: LayerCall, n: int) -> bool:
        rows = call.inputs.shape[0] if call.inputs.ndim >= 2 else -1
        if not self.channel_last and call.inputs.ndim > 2:
            rows = rows if rows == n else -1
        return not call.samples_interact and rows > 0 and rows % n == 0 and call.output.shape[0] == rows

    def regroup(self, call: LayerCall, grad: Tensor, n: int) -> Optional[tuple[LayerCall, Tensor]]:
        """``(n k, *positions, C)`` rows with the channels last (OPT's feed-forward block flattens its
        tokens to ``(N T, C)``; LeViT's ``BatchNorm1d`` sees ``(N T, C)``) as ``k * positions`` positions of
        each of the ``n`` samples, like :meth:`~.linear.LinearRule.regroup`."""
        c = call.inputs.shape[-1]
        inputs = call.inputs.reshape(n, -1, c)
        grad = grad.reshape(grad.shape[0], n, -1, c)
        if not self.channel_last:  # a 2-D (rows, C) batch_norm input: channels to dim 1
            if call.inputs.ndim != 2:
                return None
            inputs, grad = inputs.transpose(1, 2), grad.transpose(2, 3)
        return dataclasses.replace(call, inputs=inputs), grad

    def bias_position_dims(self, grad: Tensor) -> tuple[int, ...]:  # grad (K, N, *out)
        return tuple(range(2, grad.ndim - 1)) if self.channel_last else tuple(range(3, grad.ndim))

    def factors(self, call: LayerCall, grad: Tensor, kernel: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        k, n = grad.shape[:2]
        xhat = call.inputs
        if self.channel_last:
            c = xhat.shape[-1]
            a = xhat.reshape(n, -1, c).permute(0, 2, 1).unsqueeze(2)  # (N, C, 1, P)
            g = grad.reshape(k, n, -1, c).permute(1, 3, 0, 2)  # (N, C, K, P)
        else:
            c = xhat.shape[1]
            a = xhat.reshape(n, c, 1, -1)
            g = grad.reshape(k, n, c, -1).permute(1, 2, 0, 3)
        return a, g


def _trailing_normalized(normalized_shape: object) -> bool:
    """Whether a ``layer_norm`` / ``rms_norm`` normalizes over the last dim only (one affine entry per
    channel), the layout this module handles."""
    return len(_as_tuple(normalized_shape)) == 1


def _as_tuple(shape: object) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)  # type: ignore[attr-defined]


class BatchNormRule(_ChannelAffineRule):
    """``batch_norm(input (N, C, *S), running_mean, running_var, weight, bias, training, momentum,
    eps)``: ``xhat = (x - running_mean) / sqrt(running_var + eps)`` in eval mode."""

    op = "batch_norm"
    weight_argument = (3, ("weight",))
    bias_argument = (4, ("bias",))

    def record(self, call: LayerCall, args: tuple, kwargs: dict, weight: Optional[Tensor]) -> None:
        mean = argument(args, kwargs, 1, ("running_mean",))
        var = argument(args, kwargs, 2, ("running_var",))
        training = bool(argument(args, kwargs, 5, ("training",), False))
        eps = float(argument(args, kwargs, 7, ("eps",), 1e-5))
        if training or mean is None or var is None:
            call.samples_interact = True  # batch statistics: the per-sample path handles it
            return
        shape = (1, -1) + (1,) * (call.inputs.ndim - 2)
        x = call.inputs
        call.inputs = (x - mean.detach().reshape(shape)) * torch.rsqrt(var.detach().reshape(shape) + eps)


class GroupNormRule(_ChannelAffineRule):
    """``group_norm(input (N, C, *S), num_groups, weight, bias, eps)``: ``xhat`` normalized per sample
    and group of channels (the samples do not interact)."""

    op = "group_norm"
    weight_argument = (2, ("weight",))
    bias_argument = (3, ("bias",))

    def record(self, call: LayerCall, args: tuple, kwargs: dict, weight: Optional[Tensor]) -> None:
        groups = int(argument(args, kwargs, 1, ("num_groups",)))
        eps = float(argument(args, kwargs, 4, ("eps",), 1e-5))
        x = call.inputs
        call.inputs = torch.nn.functional.group_norm(x, groups, eps=eps)


class LayerNormRule(_ChannelAffineRule):
    """``layer_norm(input (N, *positions, C), normalized_shape=(C,), weight, bias, eps)``."""

    op = "layer_norm"
    channel_last = True
    weight_argument = (2, ("weight",))
    bias_argument = (3, ("bias",))

    def record(self, call: LayerCall, args: tuple, kwargs: dict, weight: Optional[Tensor]) -> None:
        shape = argument(args, kwargs, 1, ("normalized_shape",))
        if not _trailing_normalized(shape):
            call.samples_interact = True  # not this layout: the per-sample path handles it
            return
        eps = float(argument(args, kwargs, 4, ("eps",), 1e-5))
        call.inputs = torch.nn.functional.layer_norm(call.inputs, _as_tuple(shape), eps=eps)


class RMSNormRule(_ChannelAffineRule):
    """``rms_norm(input (N, *positions, C), normalized_shape=(C,), weight, eps)``: no bias."""

    op = "rms_norm"
    channel_last = True
    weight_argument = (2, ("weight",))
    bias_argument = None  # rms_norm has no bias

    def record(self, call: LayerCall, args: tuple, kwargs: dict, weight: Optional[Tensor]) -> None:
        shape = argument(args, kwargs, 1, ("normalized_shape",))
        if not _trailing_normalized(shape):
            call.samples_interact = True
            return
        eps = argument(args, kwargs, 3, ("eps",), None)
        call.inputs = torch.nn.functional.rms_norm(call.inputs, _as_tuple(shape), eps=eps)


for _rule in (BatchNormRule(), GroupNormRule(), LayerNormRule(), RMSNormRule()):
    register_layer_rule(_rule)
