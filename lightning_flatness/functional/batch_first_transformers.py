r"""PyTorch's sequence-first transformer modules run batch-first, for a measurement only.

``nn.TransformerEncoderLayer``, ``nn.TransformerDecoderLayer``, ``nn.TransformerEncoder``,
``nn.TransformerDecoder`` and ``nn.Transformer`` take ``(T, B, E)`` inputs by default
(``batch_first=False``). Inside them, the LayerNorms, the feed-forward ``Linear`` layers and their
activations then see rows ordered time-major, with the samples along dim 1. The per-layer contractions
of the exact, Gauss-Newton and Hessian sketches read the samples along dim 0
(:mod:`~lightning_flatness.functional.estimators.layer_rules`), so such a model used to fall back to
per-sample backward passes: ``N`` times the work, and the Gauss-Newton diagonal instead of the
Hessian's (measured: ``benchmarks/results/bench_torch_sequence_models.md``).

:func:`batch_first_transformers` runs each of these modules with ``batch_first=False`` as the same
module with ``batch_first=True`` between two transposes: its sequence inputs (``src``, ``tgt``,
``memory``) are transposed to ``(B, T, E)`` on the way in, its output back to ``(T, B, E)`` on the way
out, and the ``batch_first`` flags that its forward reads (its own and those of its attention modules)
are ``True`` during the call. Every operation inside acts on rows or on one sample's sequence (the
masks are ``(T, S)``, ``(B H, T, S)`` or ``(B, S)`` in either layout), so the values are those of the
original forward to float rounding (tested), and the model's own code around the module is untouched.
Only the exact classes are rewritten (a subclass may have overridden ``forward``), only where the
sequence input is batched (3-D), and only the outermost such module (an encoder's layers run inside
its batch-first call). On exit the modules are restored exactly, also on exceptions.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from torch import Tensor, nn

from lightning_flatness.functional.instance_forwards import instance_forwards, replaceable
from lightning_flatness.functional.module_walk import modules_of

__all__ = ["SEQUENCE_ARGUMENTS", "batch_first_transformers"]

#: ``{module class: its sequence arguments, in positional order}``: what is transposed on the way in.
SEQUENCE_ARGUMENTS: dict[type, tuple[str, ...]] = {
    nn.TransformerEncoderLayer: ("src",),
    nn.TransformerEncoder: ("src",),
    nn.TransformerDecoderLayer: ("tgt", "memory"),
    nn.TransformerDecoder: ("tgt", "memory"),
    nn.Transformer: ("src", "tgt"),
}


def _flags(module: nn.Module) -> list[Any]:
    """The modules whose ``batch_first`` the forward of ``module`` reads: its attention modules, and
    ``module`` itself where it has the flag (``nn.Transformer``)."""
    flagged: list[Any] = [m for m in module.modules() if isinstance(m, nn.MultiheadAttention)]
    return [module, *flagged] if isinstance(getattr(module, "batch_first", None), bool) else flagged


def _sequence_first(module: nn.Module) -> bool:
    flags = _flags(module)
    return bool(flags) and not any(m.batch_first for m in flags)


def _swap(t: Any) -> Any:
    return t.transpose(0, 1) if isinstance(t, Tensor) else t


def _forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The installed forward: the batch-first call between transposes where the inputs are batched."""
    names = SEQUENCE_ARGUMENTS[type(self)]
    args_list = list(args)
    given = [args_list[i] if i < len(args_list) else kwargs.get(name) for i, name in enumerate(names)]
    flags = _flags(self)
    if any(m.batch_first for m in flags) or not all(isinstance(t, Tensor) and t.dim() == 3 for t in given):
        return type(self).forward(self, *args, **kwargs)  # batch-first already, or unbatched inputs
    for i, name in enumerate(names):
        if i < len(args_list):
            args_list[i] = _swap(args_list[i])
        else:
            kwargs[name] = _swap(kwargs[name])
    try:
        for m in flags:
            m.batch_first = True
        out = type(self).forward(self, *args_list, **kwargs)
    finally:
        for m in flags:
            m.batch_first = False
    return _swap(out)


@contextlib.contextmanager
def batch_first_transformers(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the outermost sequence-first PyTorch transformer modules of ``model``
    (:data:`SEQUENCE_ARGUMENTS`) run batch-first between transposes (module docstring); a module whose
    ``forward`` was replaced on the instance already keeps it.

    Example:
        >>> import torch
        >>> layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0).eval()  # (T, B, E)
        >>> x = torch.randn(5, 3, 8)
        >>> with batch_first_transformers(layer):
        ...     out = layer(x)
        >>> out.shape, torch.allclose(out, layer(x), atol=1e-6), layer.self_attn.batch_first
        (torch.Size([5, 3, 8]), True, False)
    """
    modules: list[nn.Module] = []
    inside: set[int] = set()
    for m in modules_of(model):  # parents come before their children
        if id(m) in inside:
            continue
        if type(m) in SEQUENCE_ARGUMENTS and replaceable(m) and _sequence_first(m):
            modules.append(m)
            inside.update(id(c) for c in m.modules())
    with instance_forwards((m, _forward) for m in modules):
        yield model
