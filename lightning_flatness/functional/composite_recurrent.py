r"""``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` in explicit operations, for a measurement only.

A recurrent module runs its whole forward inside one call of ``torch.lstm`` / ``torch.gru`` /
``torch.rnn_tanh`` / ``torch.rnn_relu``. The estimators' recorder, a
:class:`torch.overrides.TorchFunctionMode`, sees that call as a single operation without a rule, so every
estimator fell back to per-sample backward passes there (``N`` times the work).

:func:`composite_recurrent` computes the same function in the operations of PyTorch's documented
recurrences, per layer and direction:

- the input projection of every time step as **one** ``F.linear(x, W_ih, b_ih)`` on ``(B, T, I)``;
- per time step, the recurrent projection ``F.linear(h, W_hh, b_hh)`` (a weight used ``T`` times, which
  the per-layer contractions sum per sample before squaring:
  :mod:`~lightning_flatness.functional.estimators.layer_rules.shared`), then the gates:

  - LSTM (gates ``i, f, g, o``): ``c' = sigmoid(f) c + sigmoid(i) tanh(g)``, ``h' = sigmoid(o) tanh(c')``;
  - GRU (gates ``r, z, n``): ``r, z = sigmoid(.)``, ``n = tanh(x_n + r (W_hn h + b_hn))``,
    ``h' = n + z (h - n)`` (``= (1 - z) n + z h``);
  - RNN: ``h' = tanh(.)`` or ``relu(.)``;

- the directions of a bidirectional layer concatenated along the features, the layers stacked.

Values equal the original's to float rounding (tested against the modules with 1 and 2 layers, both
directions, ``batch_first`` either way, without biases and with given initial states). Configurations it
does not write out keep the original forward (one opaque operation): ``PackedSequence`` or unbatched
inputs, ``proj_size > 0``, dropout between layers in training mode.

:func:`explicit_recurrent_layers` installs it on every such module of a model for the duration of a
``with`` block and restores the modules exactly afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_flatness.functional.instance_forwards import instance_forwards
from lightning_flatness.functional.module_walk import modules_of

__all__ = ["composite_recurrent", "explicit_recurrent_layers", "writes_out"]


def writes_out(module: nn.RNNBase, input: Any) -> bool:
    """Whether :func:`composite_recurrent` covers this module and input (module docstring)."""
    return (
        isinstance(input, Tensor)
        and input.dim() == 3
        and getattr(module, "proj_size", 0) == 0
        and not (module.training and module.dropout > 0.0 and module.num_layers > 1)
        and module.mode in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
    )


def _step(mode: str, gates_x: Tensor, h: Tensor, c: Optional[Tensor], w_hh: Tensor, b_hh: Optional[Tensor]):
    """One time step of one layer and direction: ``(h', c')`` (``c'`` None except for the LSTM)."""
    gates_h = F.linear(h, w_hh, b_hh)
    if mode == "LSTM":
        i, f, g, o = (gates_x + gates_h).chunk(4, dim=1)
        assert c is not None
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        x_r, x_z, x_n = gates_x.chunk(3, dim=1)
        h_r, h_z, h_n = gates_h.chunk(3, dim=1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return n + z * (h - n), None
    pre = gates_x + gates_h
    return (torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)), None


def composite_recurrent(module: nn.RNNBase, input: Tensor, hx: Any = None) -> tuple[Tensor, Any]:
    """``module(input, hx)`` in explicit operations (module docstring), for a module and input that
    :func:`writes_out` covers: ``(output, h_n)``, or ``(output, (h_n, c_n))`` for an LSTM, in the module's
    layout."""
    mode, hidden = module.mode, module.hidden_size
    directions = 2 if module.bidirectional else 1
    x = input if module.batch_first else input.transpose(0, 1)  # (B, T, I)
    batch, steps = x.shape[0], x.shape[1]
    zeros = x.new_zeros(module.num_layers * directions, batch, hidden)
    if mode == "LSTM":
        h0, c0 = (zeros, zeros) if hx is None else hx
    else:
        h0, c0 = (zeros if hx is None else hx), None
    last_h, last_c = [], []
    layer_input = x
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            w_ih, w_hh = getattr(module, "weight_ih" + suffix), getattr(module, "weight_hh" + suffix)
            b_ih = getattr(module, "bias_ih" + suffix) if module.bias else None
            b_hh = getattr(module, "bias_hh" + suffix) if module.bias else None
            gates_x = F.linear(layer_input, w_ih, b_ih)  # (B, T, G H): every time step at once
            index = layer * directions + direction
            h, c = h0[index], None if c0 is None else c0[index]
            hs: list[Tensor] = []
            for t in reversed(range(steps)) if direction else range(steps):
                h, c = _step(mode, gates_x[:, t], h, c, w_hh, b_hh)
                hs.append(h)
            if direction:
                hs.reverse()
            outputs.append(torch.stack(hs, dim=1))
            last_h.append(h)
            if c is not None:
                last_c.append(c)
        layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=2)  # no dropout: writes_out
    output = layer_input if module.batch_first else layer_input.transpose(0, 1)
    h_n = torch.stack(last_h)
    return (output, (h_n, torch.stack(last_c))) if mode == "LSTM" else (output, h_n)


def _forward(self: nn.RNNBase, input: Any, hx: Any = None) -> Any:
    """The installed forward: the composite where :func:`writes_out` covers the call, else the original."""
    if writes_out(self, input):
        return composite_recurrent(self, input, hx)
    return type(self).forward(self, input, hx)


@contextlib.contextmanager
def explicit_recurrent_layers(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` of ``model`` (the exact classes: a
    subclass may have its own forward) runs :func:`composite_recurrent` where it covers the call; a module
    whose ``forward`` was replaced on the instance already keeps it. On exit the modules are restored
    exactly (the instance ``forward`` attribute removed), also on exceptions.

    Example:
        >>> import torch
        >>> lstm = torch.nn.LSTM(3, 4, batch_first=True)
        >>> x = torch.randn(2, 5, 3)
        >>> with explicit_recurrent_layers(lstm):
        ...     out, (h, c) = lstm(x)
        >>> torch.allclose(out, lstm(x)[0], atol=1e-6), h.shape
        (True, torch.Size([1, 2, 4]))
    """
    with instance_forwards((m, _forward) for m in modules_of(model) if type(m) in (nn.LSTM, nn.GRU, nn.RNN)):
        yield model
