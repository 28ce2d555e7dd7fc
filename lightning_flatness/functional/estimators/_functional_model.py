"""The training loss as a pure function of the selected weights, and the probe plumbing shared by
the stochastic estimators (:mod:`.hutchinson`, :mod:`.finite_difference`).

Nothing here changes the model: the loss is evaluated with :func:`torch.func.functional_call` on
detached copies of the parameters and on *clones* of the buffers, so train-mode BatchNorm updates
the clones' running statistics, never the model's.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_flatness.functional.backward_hooks import TensorHooksLeftOut
from lightning_flatness.functional.model_io import ModelInputs, call_model, map_inputs

__all__ = [
    "functional_loss",
    "detached_inputs",
    "probe_chunks",
    "default_chunk_size",
    "draw_probes",
    "accumulation_dtype",
    "first_line",
    "rms",
]

LossFn = Callable[[Tensor, Tensor], Tensor]

# Default bound on ``chunk_size * (number of selected weights)``: the probes of one chunk and their
# Hessian-vector products are a few tensors of this many entries (plus the activations' tangents).
_CHUNK_ELEMENTS = 1 << 22
_MAX_CHUNK = 16  # the fastest chunk per probe on the benchmark models (benchmarks/RESULTS.md, after item 5)


def detached_inputs(inputs: ModelInputs) -> ModelInputs:
    """``inputs`` (tensor, tuple/list or dict) with every tensor detached; inference tensors are cloned
    (autograd cannot record operations on them)."""
    return map_inputs(inputs, lambda t: t.clone() if t.is_inference() else t.detach())


def functional_loss(
    model: nn.Module, loss_fn: LossFn, inputs: ModelInputs, target: Tensor, params: Mapping[str, Tensor]
) -> tuple[Callable[[dict[str, Tensor]], Tensor], dict[str, Tensor]]:
    """``theta -> loss_fn(logits, target)`` as a function of the selected weights only, with the
    logits from :func:`call_model` (``model(x)``, ``model(*x)`` or ``model(**x)``; tensor, tuple, dict
    or ``ModelOutput`` outputs). Logits may be ``(N, K)`` or ``(N, T, V)`` (with e.g. a
    :class:`TokenLoss`): anything ``loss_fn`` reduces to a scalar.

    Non-selected parameters enter as detached constants; buffers are cloned at every call, so
    train-mode BatchNorm keeps using batch statistics but its running statistics (in the clones)
    are thrown away. The returned function is pure enough for :mod:`torch.func` transforms, except
    that train-mode BatchNorm's in-place update of the clones cannot be batched by ``vmap``
    (callers fall back to a loop).

    Args:
        model: the network, in whatever train/eval mode the caller left it.
        loss_fn: ``(logits, target) -> scalar`` mean loss.
        inputs: a ``(N, ...)`` tensor, a tuple of positional or a dict of keyword arguments; every
            tensor is detached here.
        target: ``(N, ...)``; detached here.
        params: ``{name: parameter}`` as returned by ``select_parameters`` (names from
            ``model.named_parameters()``).

    Returns:
        ``(loss_of, primals)``: ``loss_of(theta)`` with ``theta`` a dict with ``params``' keys, and
        ``primals`` the detached current values of the selected parameters.

    Raises:
        ValueError: a key of ``params`` is not a parameter of ``model`` or names another tensor.
    """
    named = dict(model.named_parameters())
    for name, p in params.items():
        if named.get(name) is not p:
            raise ValueError(
                f"`params` key {name!r} is not the parameter of that name in "
                f"{type(model).__name__}; build `params` with select_parameters(model)."
            )
    fixed = {n: p.detach() for n, p in named.items() if n not in params}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    x = detached_inputs(inputs)
    y = target.clone() if target.is_inference() else target.detach()

    def loss_of(theta: dict[str, Tensor]) -> Tensor:
        state = {**fixed, **theta, **{n: b.clone() for n, b in buffers.items()}}
        with restore_module_tensors(model), TensorHooksLeftOut():  # a forward's tensor hooks: not ours
            logits = call_model(lambda *args, **kwargs: functional_call(model, state, args, kwargs), x)
            loss = loss_fn(logits, y)
        if loss.ndim != 0:
            raise ValueError(
                f"`loss_fn` must return the mean loss over the batch (a scalar), got shape "
                f"{tuple(loss.shape)}; use reduction='mean'."
            )
        return loss

    primals = {n: p.detach() for n, p in params.items()}
    return loss_of, primals


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 for summing probe estimates (half-precision sums lose the small terms)."""
    return torch.promote_types(dtype, torch.float32)


def default_chunk_size(params: dict[str, Tensor], num_probes: int) -> int:
    """Probes per ``vmap`` call: ``chunk * numel`` stays below ``2**22`` entries, at most 16."""
    numel = max(1, sum(p.numel() for p in params.values()))
    return max(1, min(num_probes, _MAX_CHUNK, _CHUNK_ELEMENTS // numel))


def probe_chunks(num_probes: int, chunk_size: Optional[int], params: dict[str, Tensor]) -> Iterator[int]:
    """Sizes of consecutive chunks that add up to ``num_probes``."""
    if not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"`num_probes` must be a positive int, got {num_probes!r}.")
    if chunk_size is None:
        chunk_size = default_chunk_size(params, num_probes)
    elif not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int or None, got {chunk_size!r}.")
    for start in range(0, num_probes, chunk_size):
        yield min(chunk_size, num_probes - start)


def draw_probes(
    primals: dict[str, Tensor], count: int, distribution: str, generator: Optional[torch.Generator]
) -> dict[str, Tensor]:
    """``count`` random probe vectors over the selected weights, ``{name: (count, *shape)}``.

    Drawn tensor by tensor in ``primals``' order, so a given ``generator`` state and chunking
    always give the same probes. The numbers come from ``generator`` (on its own device, then
    moved to the weights' device) or, when it is None, from the global RNG of the weights' device.

    Args:
        primals: the selected weights (for shapes, dtypes and device).
        count: number of probes.
        distribution: ``"rademacher"`` (entries +-1) or ``"gaussian"`` (standard normal).
        generator: the random source, or None.
    """
    probes = {}
    for name, p in primals.items():
        shape = (count, *p.shape)
        device = generator.device if generator is not None else p.device
        if distribution == "rademacher":
            v = torch.randint(0, 2, shape, generator=generator, device=device, dtype=p.dtype).mul_(2).sub_(1)
        elif distribution == "gaussian":
            v = torch.randn(shape, generator=generator, device=device, dtype=p.dtype)
        else:  # pragma: no cover - internal misuse
            raise ValueError(f"unknown probe distribution {distribution!r}.")
        probes[name] = v.to(p.device)
    return probes


def first_line(err: BaseException) -> str:
    """``"Type: first line of the message"``, for warnings that quote an exception."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def rms(t: Tensor) -> float:
    """Root-mean-square entry ``||t||_F / sqrt(numel)`` as a Python float."""
    return float(t.detach().double().norm()) / math.sqrt(max(1, t.numel()))


@contextlib.contextmanager
def restore_module_tensors(model: nn.Module) -> Iterator[None]:
    """Put every module's parameter and buffer objects back in place when the block ends.

    Works around pytorch/pytorch#164759: ``torch.func.functional_call`` on a model in which one
    submodule is registered under two paths (``nn.Sequential(a, relu, a)``) leaves the values it was
    given in that submodule's slots instead of the original parameters.
    """
    slots = [
        (module, kind, name, tensor)
        for module in model.modules()
        for kind in ("_parameters", "_buffers")
        for name, tensor in getattr(module, kind).items()
    ]
    try:
        yield
    finally:
        for module, kind, name, tensor in slots:
            entries = getattr(module, kind)
            if entries.get(name) is not tensor:
                entries[name] = tensor


ChunkFn = Callable[[dict[str, Tensor]], dict[str, Tensor]]


def mean_over_probes(
    primals: dict[str, Tensor],
    num_probes: int,
    chunk_size: Optional[int],
    distribution: str,
    generator: Optional[torch.Generator],
    vectorized_chunk: Optional[ChunkFn],
    looped_chunk: Callable[[], ChunkFn],
    caller: str,
    model: nn.Module,
    loop_description: str = "a loop over the probes",
) -> dict[str, Tensor]:
    """Mean over ``num_probes`` probes of a per-probe estimate, chunk by chunk.

    ``vectorized_chunk(probes)`` (``None`` to skip it) and ``looped_chunk()(probes)`` map a chunk of
    probes ``{name: (C, *shape)}`` to the *sum* of their estimates. When ``vmap`` cannot batch the
    model (``RuntimeError`` / ``NotImplementedError``), the rest of the run uses the loop, with a
    warning; an error of the loop itself propagates. Sums accumulate in at least float32.
    """
    sums = {n: torch.zeros_like(p, dtype=accumulation_dtype(p.dtype)) for n, p in primals.items()}
    chunk_fn = vectorized_chunk if vectorized_chunk is not None else looped_chunk()
    vectorised = vectorized_chunk is not None
    for count in probe_chunks(num_probes, chunk_size, primals):
        probes = draw_probes(primals, count, distribution, generator)
        try:
            estimates = chunk_fn(probes)
        except (RuntimeError, NotImplementedError) as err:
            if not vectorised:  # the loop itself failed: a genuine error, not a vmap limitation
                raise
            warnings.warn(
                f"{caller}: torch.func.vmap could not batch the probes through {type(model).__name__} "
                f"({first_line(err)}); falling back to {loop_description} (same estimate, slower; pass "
                f"vectorize=False to skip the attempt).",
                UserWarning,
                stacklevel=3,
            )
            chunk_fn, vectorised = looped_chunk(), False
            estimates = chunk_fn(probes)
        for n in sums:
            sums[n] += estimates[n]
    return {n: (s / num_probes).to(primals[n].dtype) for n, s in sums.items()}
