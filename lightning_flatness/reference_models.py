"""The paper's networks for Sec. 6.1 (Appendix E.1), sized for MNIST-1D on a CPU.

Both are plain ``nn.Sequential`` chains of Linear / Conv1d layers (with biases), ReLU, MaxPool1d and
Flatten, so they are linear in each individual weight (the ``"exact"`` Hessian-diagonal estimator
applies) and every :mod:`lightning_flatness.rescaling` transformation applies to them. Both take
inputs of shape ``(N, length)`` and return logits ``(N, num_classes)``.
"""

from __future__ import annotations

from torch import nn

__all__ = ["mlp", "lenet1d"]


def mlp(in_features: int = 40, hidden: int = 100, depth: int = 3, num_classes: int = 10) -> nn.Sequential:
    """The multilayer perceptron of Sec. 6.1: ``depth`` hidden layers of ``hidden`` ReLU units.

    The default is the paper's 40 -> 100 -> 100 -> 100 -> 10 (three hidden layers of 100 units), with
    MNIST-1D's 40 inputs in place of MNIST's 784. PyTorch's default initialisation.

    Args:
        in_features: input dimension.
        hidden: units per hidden layer.
        depth: number of hidden layers (``>= 1``).
        num_classes: number of outputs.

    Returns:
        ``nn.Sequential(Linear, ReLU, ..., Linear)``; weights are at indices ``0, 2, ..., 2 * depth``.

    Example:
        >>> import torch
        >>> model = mlp()
        >>> model(torch.zeros(5, 40)).shape, sum(p.numel() for p in model.parameters())
        (torch.Size([5, 10]), 25310)
    """
    if depth < 1:
        raise ValueError(f"`depth` (number of hidden layers) must be >= 1, got {depth!r}.")
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def lenet1d(
    length: int = 40,
    channels: tuple[int, int] = (6, 16),
    hidden: tuple[int, int] = (120, 84),
    kernel_size: int = 5,
    num_classes: int = 10,
) -> nn.Sequential:
    """A LeNet-5-style CNN with 1-D convolutions (LeCun et al. 1998) for signals of ``length`` samples.

    ``Unflatten -> [Conv1d(k) -> ReLU -> MaxPool1d(2)] x 2 -> Flatten -> Linear -> ReLU -> Linear ->
    ReLU -> Linear``, LeNet-5's 6 and 16 channels and 120 and 84 hidden units by default. For
    ``length = 40`` the feature map before ``Flatten`` is ``16 x 7``. The two convolutions exercise the
    per-channel variances of Sec. 5.3 (one row variance per output channel, one column variance per
    input channel, shared over the kernel taps).

    Args:
        length: input length (MNIST-1D: 40); inputs are ``(N, length)`` and get a channel axis inside.
        channels: output channels of the two convolutions.
        hidden: widths of the two hidden fully connected layers.
        kernel_size: convolution kernel size (no padding, stride 1).
        num_classes: number of outputs.

    Returns:
        The ``nn.Sequential`` network.

    Example:
        >>> import torch
        >>> lenet1d()(torch.zeros(5, 40)).shape
        torch.Size([5, 10])
    """
    c1, c2 = channels
    h1, h2 = hidden
    size = ((length - kernel_size + 1) // 2 - kernel_size + 1) // 2
    if size < 1:
        raise ValueError(
            f"inputs of length {length} are too short for two convolutions of size {kernel_size} "
            f"with 2x pooling; use a longer input or a smaller `kernel_size`."
        )
    return nn.Sequential(
        nn.Unflatten(1, (1, length)),
        nn.Conv1d(1, c1, kernel_size),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(c1, c2, kernel_size),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Flatten(),
        nn.Linear(c2 * size, h1),
        nn.ReLU(),
        nn.Linear(h1, h2),
        nn.ReLU(),
        nn.Linear(h2, num_classes),
    )
