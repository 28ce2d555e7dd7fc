"""Function-preserving rescalings of ReLU networks: the attacks that sharpness must survive.

Two families, both exact for positively homogeneous activations (ReLU, LeakyReLU) and per-channel
positively homogeneous operations (max/average pooling, flattening):

- **Layer scaling** (Dinh et al., 2017): ``W_l <- a_l W_l`` with ``prod_l a_l = 1``; the bias of
  layer ``l`` is multiplied by ``a_1 ... a_l`` (the scale of its layer's output). It changes the
  Hessian trace (eq. 5) at will but leaves matrix-normalized (eq. 13) and normalized (eq. 17)
  sharpness unchanged.
- **Row/column scaling** (Tsuzuku et al. 2020, Sec. 5.1, eq. 15-16): for hidden unit (or channel)
  ``i`` of layer ``l``, ``W_l[i, :] <- W_l[i, :] / alpha_i``, ``b_l[i] <- b_l[i] / alpha_i`` and
  ``W_{l+1}[:, i] <- alpha_i W_{l+1}[:, i]`` (for a convolution, input channel ``i``; for a Linear
  layer after ``Flatten`` of a ``C``-channel map, the block of columns that came from channel ``i``).
  It also changes matrix norms and matrix-normalized sharpness (Appendix A); normalized sharpness
  is invariant to it.

Every function returns a rescaled **deep copy** and never modifies its argument, so the original
and the rescaled network can be compared side by side. Supported networks are ``nn.Sequential``
chains (nested ``nn.Sequential`` is flattened) of ``Linear`` / ``Conv1d`` / ``Conv2d`` / ``Conv3d``
layers (``groups=1``, with or without bias) separated by ReLU, LeakyReLU, (adaptive) max / average
pooling, ``Flatten``, ``Identity`` and ``Dropout``; anything may precede the first layer or follow
the last (those are never rescaled). Anything else between two layers (BatchNorm, Tanh, ...) would
change the function and raises ``ValueError``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = [
    "AppendixAExample",
    "appendix_a_example",
    "hidden_sizes",
    "random_function_preserving_rescaling",
    "random_rescale_layers",
    "random_rescale_rows_columns",
    "rescale_layers",
    "rescale_rows_columns",
]

Scale = Union[float, Sequence[float], Tensor]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Per-channel positively homogeneous: g(a * x) = a * g(x) for a per-channel a > 0.
_HOMOGENEOUS = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)


@dataclass
class _Layer:
    module: nn.Module
    units: int  # output units / channels
    column_repeat: int = 1  # columns per unit of the previous layer (> 1 after Flatten of a feature map)


def _leaves(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _leaves(child)]
    return [module]


def _layers(model: nn.Module) -> list[_Layer]:
    """The chain's weight layers, each with how the previous layer's units map onto its columns."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            f"function-preserving rescaling needs an nn.Sequential chain, got {type(model).__name__}; "
            f"rescale its Sequential sub-networks, or rewrite the forward pass as an nn.Sequential."
        )
    layers: list[_Layer] = []
    between: list[nn.Module] = []
    for leaf in _leaves(model):
        if not isinstance(leaf, _LAYERS):
            between.append(leaf)
            continue
        if isinstance(leaf, nn.Linear):
            units, fan_in = leaf.out_features, leaf.in_features
        else:
            if leaf.groups != 1:
                raise ValueError(
                    f"{leaf} has groups={leaf.groups}; only groups=1 convolutions can be rescaled "
                    f"(grouped and depthwise convolutions are not supported)."
                )
            units, fan_in = leaf.out_channels, leaf.in_channels
        repeat = 1
        if layers:
            _check_between(layers[-1].module, leaf, between)
            prev_units = layers[-1].units
            flattened = any(isinstance(m, nn.Flatten) for m in between)
            if isinstance(leaf, nn.Linear) and not isinstance(layers[-1].module, nn.Linear) and not flattened:
                raise ValueError(
                    f"{leaf} follows the convolution {layers[-1].module} without a Flatten; a Linear "
                    f"layer on a feature map mixes positions, not channels, and cannot be rescaled."
                )
            if flattened and not isinstance(layers[-1].module, nn.Linear):
                if not isinstance(leaf, nn.Linear) or fan_in % prev_units:
                    raise ValueError(
                        f"{leaf} after Flatten of {prev_units} channels: expected a Linear layer "
                        f"whose in_features is a multiple of {prev_units}."
                    )
                repeat = fan_in // prev_units
            elif fan_in != prev_units:
                raise ValueError(
                    f"{leaf} takes {fan_in} inputs but the previous layer has {prev_units} "
                    f"units; the chain must feed each layer straight into the next."
                )
        layers.append(_Layer(leaf, units, repeat))
        between = []
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no Linear or Conv layer to rescale.")
    return layers


def _check_between(prev: nn.Module, nxt: nn.Module, between: list[nn.Module]) -> None:
    for m in between:
        if isinstance(m, _HOMOGENEOUS):
            continue
        if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            if isinstance(nxt, nn.Linear):
                continue
        raise ValueError(
            f"{m} sits between {prev} and {nxt}; rescaling a layer's outputs through it would change the "
            f"function. Only ReLU, LeakyReLU, pooling, Dropout, Identity and Flatten(1, -1) before a Linear "
            f"layer may separate two rescaled layers (BatchNorm, Tanh, ... may not)."
        )


def hidden_sizes(model: nn.Module) -> list[int]:
    """Units (Linear) or channels (Conv) of each hidden layer: every weight layer but the last.

    Args:
        model: an ``nn.Sequential`` chain as described in the module docstring.

    Returns:
        One int per hidden layer, in order; the lengths the ``alphas`` of
        :func:`rescale_rows_columns` must have.

    Example:
        >>> hidden_sizes(
        ...     nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 2))
        ... )
        [8, 5]
    """
    return [layer.units for layer in _layers(model)[:-1]]


def _as_scale(value: Scale, units: int, index: int) -> Tensor:
    scale = torch.as_tensor(value, dtype=torch.float64)
    if scale.ndim == 0:
        scale = scale.expand(units)
    if scale.shape != (units,):
        raise ValueError(
            f"alphas[{index}] has shape {tuple(scale.shape)}, but hidden layer {index} has "
            f"{units} units; pass a scalar or a tensor of shape ({units},)."
        )
    if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError(f"alphas[{index}] must be finite and > 0 (ReLU is only positively homogeneous).")
    return scale


def _multiply(tensor: Tensor, factor: Tensor, dim: int) -> None:
    shape = [1] * tensor.ndim
    shape[dim] = -1
    tensor.mul_(factor.to(device=tensor.device, dtype=tensor.dtype).reshape(shape))


def rescale_rows_columns(model: nn.Module, alphas: Sequence[Scale]) -> nn.Module:
    """Row/column scaling of Sec. 5.1 (eq. 15-16) for every hidden layer; returns a rescaled copy.

    For hidden layer ``l`` (every weight layer but the last) and its unit / output channel ``i``:
    row ``i`` of ``W_l`` and ``b_l[i]`` are divided by ``alphas[l][i]``, and the column(s) of ``W_{l+1}``
    fed by that unit are multiplied by it. Since ``ReLU(x / a) = ReLU(x) / a`` for ``a > 0`` (and max /
    average pooling act per channel), the network computes the same function; the Hessian diagonal
    of row ``i`` scales by ``alphas[l][i] ** 2`` and that of the columns by ``alphas[l][i] ** -2``.

    Cost: one pass over the parameters. The factors are cast to each parameter's dtype, so outputs
    agree to that dtype's precision.

    Args:
        model: an ``nn.Sequential`` chain (see the module docstring); not modified.
        alphas: one entry per hidden layer (see :func:`hidden_sizes`): a positive scalar (the same for
            every unit, which is layer scaling) or ``units`` positive factors (tensor or sequence;
            converted to float64 before being cast to each parameter's dtype).

    Returns:
        The rescaled deep copy.

    Example:
        >>> net = nn.Sequential(nn.Conv1d(1, 3, 2), nn.ReLU(), nn.MaxPool1d(2), nn.Flatten(), nn.Linear(6, 2))
        >>> x = torch.randn(4, 1, 5)
        >>> new = rescale_rows_columns(net, [torch.tensor([10.0, 0.1, 2.0])])
        >>> torch.allclose(new(x), net(x), atol=1e-5), torch.allclose(new[0].weight[0], net[0].weight[0] / 10)
        (True, True)
        >>> torch.allclose(new[4].weight[:, :2], 10 * net[4].weight[:, :2])  # the 2 columns of channel 0
        True
    """
    layers = _layers(model)
    hidden = layers[:-1]
    if len(alphas) != len(hidden):
        raise ValueError(
            f"expected {len(hidden)} alphas (one per hidden layer, sizes {[h.units for h in hidden]}), "
            f"got {len(alphas)}."
        )
    scales = [_as_scale(a, layer.units, i) for i, (a, layer) in enumerate(zip(alphas, hidden))]
    rescaled = copy.deepcopy(model)
    new_layers = _layers(rescaled)
    with torch.no_grad():
        for i, scale in enumerate(scales):
            layer, nxt = new_layers[i].module, new_layers[i + 1]
            _multiply(layer.weight, 1.0 / scale, dim=0)
            if layer.bias is not None:
                _multiply(layer.bias, 1.0 / scale, dim=0)
            _multiply(nxt.module.weight, scale.repeat_interleave(nxt.column_repeat), dim=1)
    return rescaled


def rescale_layers(model: nn.Module, factors: Sequence[float]) -> nn.Module:
    """Layer scaling of Dinh et al. (2017): ``W_l <- factors[l] * W_l``; returns a rescaled copy.

    The factors must be positive with product 1 (relative tolerance ``1e-9``). The bias of layer
    ``l`` is multiplied by ``c_l = factors[0] * ... * factors[l]``, the scale of that layer's output,
    so the function is unchanged. Implemented as :func:`rescale_rows_columns` with the same factor
    ``1 / c_l`` for every unit of hidden layer ``l`` (the last layer then gets ``1 / c_{L-1}``,
    which equals ``factors[-1]`` up to rounding).

    Args:
        model: an ``nn.Sequential`` chain (see the module docstring); not modified.
        factors: one positive float per weight layer (hidden layers and the output layer).

    Returns:
        The rescaled deep copy.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> new = rescale_layers(net, [10.0, 0.1])
        >>> (
        ...     torch.allclose(new[0].weight, 10 * net[0].weight),
        ...     torch.allclose(new[2].weight, net[2].weight / 10),
        ... )
        (True, True)
    """
    layers = _layers(model)
    factors = [float(f) for f in factors]
    if len(factors) != len(layers):
        raise ValueError(f"expected {len(layers)} factors (one per weight layer), got {len(factors)}.")
    if not all(f > 0 and torch.isfinite(torch.tensor(f)) for f in factors):
        raise ValueError(f"layer scaling factors must be finite and > 0, got {factors}.")
    log_cumulative = torch.tensor(factors, dtype=torch.float64).log().cumsum(0)
    if abs(float(log_cumulative[-1])) > 1e-9:
        raise ValueError(
            f"the product of the layer scaling factors is {float(log_cumulative[-1].exp())}, not 1, so "
            f"the network's output would be scaled; divide the factors by their geometric mean."
        )
    return rescale_rows_columns(model, list((-log_cumulative[:-1]).exp()))


def _log_uniform(n: int, log10_range: tuple[float, float], generator: Optional[torch.Generator]) -> Tensor:
    low, high = (float(v) for v in log10_range)
    if not low <= high:
        raise ValueError(f"`log10_range` must be (low, high) with low <= high, got {log10_range!r}.")
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return low + (high - low) * u


def random_rescale_layers(
    model: nn.Module,
    *,
    generator: Optional[torch.Generator] = None,
    log10_range: tuple[float, float] = (-1.0, 1.0),
) -> nn.Module:
    """Random Dinh et al. layer scaling: :func:`rescale_layers` with log-uniform factors of product 1.

    Draws ``u_l ~ Uniform(log10_range)`` for each weight layer and uses ``10 ** (u_l - mean(u))``.

    Args:
        model: an ``nn.Sequential`` chain; not modified.
        generator: a CPU ``torch.Generator`` (``None``: the global RNG).
        log10_range: range of the base-10 logarithm of the factors before centring.

    Returns:
        The rescaled deep copy.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> x = torch.randn(5, 3)
        >>> new = random_rescale_layers(net, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(new(x), net(x), atol=1e-5)
        True
    """
    u = _log_uniform(len(_layers(model)), log10_range, generator)
    return rescale_layers(model, (10.0 ** (u - u.mean())).tolist())


def random_rescale_rows_columns(
    model: nn.Module,
    *,
    generator: Optional[torch.Generator] = None,
    log10_range: tuple[float, float] = (-1.0, 1.0),
) -> nn.Module:
    """Random Sec. 5.1 row/column scaling: an independent log-uniform factor for every hidden unit/channel.

    Args:
        model: an ``nn.Sequential`` chain; not modified.
        generator: a CPU ``torch.Generator`` (``None``: the global RNG).
        log10_range: range of ``log10(alpha)`` for each unit.

    Returns:
        The rescaled deep copy.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> x = torch.randn(5, 3)
        >>> new = random_rescale_rows_columns(net, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(new(x), net(x), atol=1e-5)
        True
    """
    alphas = [10.0 ** _log_uniform(n, log10_range, generator) for n in hidden_sizes(model)]
    return rescale_rows_columns(model, alphas)


def random_function_preserving_rescaling(
    model: nn.Module,
    *,
    generator: Optional[torch.Generator] = None,
    log10_range: tuple[float, float] = (-1.0, 1.0),
) -> nn.Module:
    """The rescaling attack: random layer scaling, then random row/column scaling of every hidden unit.

    Together they move every weight tensor's norm and every row's and column's Hessian diagonal,
    while the network computes the same function. Hessian-trace sharpness (eq. 5) changes;
    normalized sharpness (eq. 17) does not.

    Args:
        model: an ``nn.Sequential`` chain; not modified.
        generator: a CPU ``torch.Generator`` (``None``: the global RNG).
        log10_range: range of the base-10 logarithm of each factor (both steps).

    Returns:
        The rescaled deep copy.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> new = random_function_preserving_rescaling(net, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(new(x), net(x), rtol=1e-12, atol=0), torch.allclose(new[0].weight, net[0].weight)
        (True, False)
    """
    layered = random_rescale_layers(model, generator=generator, log10_range=log10_range)
    return random_rescale_rows_columns(layered, generator=generator, log10_range=log10_range)


class AppendixAExample(NamedTuple):
    """The three networks of Appendix A.1 (eq. 31-41): initial, after the first and the second step."""

    initial: nn.Sequential
    first_step: nn.Sequential
    second_step: nn.Sequential


def appendix_a_example(dtype: torch.dtype = torch.float64) -> AppendixAExample:
    """Reproduce the running example of Appendix A.1: row/column scaling blows up the matrix norms.

    ``f(X) = W2 ReLU(W1 X)`` with ``W1 = [[1, 2], [3, 4]]``, ``W2 = [[5, 6], [7, 8]]`` (eq. 31-33, no
    biases). First step: unit 1 with ``alpha = 10`` (eq. 38-39); second step: unit 2 with
    ``alpha = 0.1`` (eq. 40-41), giving exactly the paper's ``W1 = [[0.1, 0.2], [30, 40]]`` and
    ``W2 = [[50, 0.6], [70, 0.8]]``. The norms go from ``||W1||_2 ~ 5.46``, ``||W2||_2 ~ 13.19``,
    ``||W1||_F^2 = 30``, ``||W2||_F^2 = 174`` to ``||W1||_2 ~ 50.00``, ``||W1||_F^2 = 2500.05`` (eq.
    42-43) and ``||W2||_2 ~ 86.03``, ``||W2||_F^2 = 7401.00``, while the function stays the same.

    Errata: eq. 35 prints ``||W1||_2 ~ 5.48``, which is ``||W1||_F = sqrt(30)``; the spectral norm is
    5.46. Eq. 44-45 print ``||W2||_F^2 = 6101.13`` and ``||W2||_2 ~ 78.11``; those are the norms of
    ``[[50, 60], [0.7, 0.8]]``, i.e. ``W2`` with its *rows* scaled by 10 and 0.1, which does not
    preserve the function. The norms of the paper's own eq. 41 are the ones above; the conclusion
    (both norms grow without bound) is unaffected.

    Args:
        dtype: dtype of the weights.

    Returns:
        :class:`AppendixAExample` of three ``nn.Sequential(Linear(2, 2), ReLU(), Linear(2, 2))``.

    Example:
        >>> ex = appendix_a_example()
        >>> torch.allclose(
        ...     ex.second_step[2].weight, torch.tensor([[50.0, 0.6], [70.0, 0.8]], dtype=torch.float64)
        ... )
        True
        >>> [round(float(torch.linalg.matrix_norm(m.weight.detach(), ord=2)), 2) for m in ex.second_step[::2]]
        [50.0, 86.03]
        >>> [round(float(m.weight.detach().pow(2).sum()), 2) for m in ex.second_step[::2]]
        [2500.05, 7401.0]
    """
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False)).to(dtype)
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        net[2].weight.copy_(torch.tensor([[5.0, 6.0], [7.0, 8.0]]))
    first = rescale_rows_columns(net, [[10.0, 1.0]])
    second = rescale_rows_columns(first, [[1.0, 0.1]])
    return AppendixAExample(net, first, second)
