"""Keep a measurement invisible to training: random-number streams, grad mode, the network's modes and dtype.

``SharpnessMonitor`` runs in the middle of a training run. Everything it does goes through this
module so that, afterwards, training continues bit for bit as if it had not run:

- :func:`preserved_rng_states` restores every global random stream (torch CPU, CUDA, MPS, NumPy,
  Python's ``random``); inside it, :func:`seed_global_streams` seeds the ones a dataset's augmentations
  draw from, so that the measured samples get the same draws at every measurement;
- :func:`gradient_enabled` turns gradients on inside ``no_grad`` / ``inference_mode`` (validation)
  and autocast off (mixed precision);
- :func:`measurement_view` puts the live network in eval mode and, only where the dtype must
  change (16-bit training), swaps cast copies of its tensors in, restoring both on exit: no deep
  copy; the live weights, buffers, ``.grad``, train/eval modes and autograd hooks (DDP's) are
  never changed, and curvature is computed in full precision when training runs in 16 bits;
- :func:`autograd_tensor` moves a data tensor to the network's device and dtype as a normal
  (non-inference) tensor.
"""

from __future__ import annotations

import random
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from lightning_flatness.functional.measurement_context import measurement_context

__all__ = [
    "preserved_rng_states",
    "seed_global_streams",
    "gradient_enabled",
    "measurement_view",
    "floating_point_in",
    "autograd_tensor",
    "resolve_dtype",
]

_DTYPES = {
    "float32": torch.float32,
    "32": torch.float32,
    "float64": torch.float64,
    "64": torch.float64,
    "double": torch.float64,
    "float": torch.float32,
}


def resolve_dtype(dtype: Any) -> torch.dtype:
    """``"float32"`` / ``"float64"`` (or ``torch.float32`` / ``torch.float64``) as a ``torch.dtype``.

    Raises:
        ValueError: any other dtype (16-bit curvature is not supported: it loses the small
            Hessian entries the measures depend on).
    """
    if isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.float64):
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(
        f"`dtype` must be 'float32' or 'float64' (the precision of the curvature computation, "
        f"independent of the training precision), got {dtype!r}."
    )


@contextmanager
def preserved_rng_states() -> Iterator[None]:
    """Save every global random stream on entry and restore it on exit (also on error).

    Covers torch's CPU generator, every initialised CUDA device's generator, the MPS generator when
    MPS is available, NumPy's legacy global ``RandomState`` and Python's ``random``. Private
    ``torch.Generator`` objects are not global state and are left alone.

    Example:
        >>> import random
        >>> import torch
        >>> before = torch.get_rng_state()
        >>> with preserved_rng_states():
        ...     _ = torch.rand(3), random.random()
        >>> torch.equal(torch.get_rng_state(), before)
        True
    """
    cpu = torch.get_rng_state()
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    mps = None
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        mps = torch.mps.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        if mps is not None:
            torch.mps.set_rng_state(mps)
        np.random.set_state(np_state)
        random.setstate(py_state)


def seed_global_streams(seed: int) -> None:
    """Seed torch's CPU generator, NumPy's legacy global ``RandomState`` and Python's ``random`` with ``seed``
    (reduced to 32 bits, NumPy's range): the streams a dataset's ``__getitem__`` augmentations draw from
    (torchvision's and timm's transforms: torch; albumentations: NumPy and ``random``). Call it only inside
    :func:`preserved_rng_states`, which puts the training run's streams back. About 10 us."""
    seed = int(seed) % 2**32
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@contextmanager
def gradient_enabled(device: torch.device) -> Iterator[None]:
    """Gradients on, inference mode off, autocast off, for the duration of the block.

    Validation runs under ``torch.no_grad()`` (``trainer.fit``) or ``torch.inference_mode()``
    (``trainer.validate``), and mixed precision wraps steps in ``torch.autocast``; curvature needs
    autograd in full precision. Tensors created under inference mode stay inference tensors: pass
    data through :func:`autograd_tensor`.
    """
    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if device.type == "cuda":
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield


@contextmanager
def measurement_view(module: nn.Module, dtype: torch.dtype) -> Iterator[nn.Module]:
    """``module`` itself, set up for a measurement for the duration of the block, then restored exactly.

    No copy of the network is made. Inside the block:

    - every submodule's ``training`` flag is ``False`` (eval mode: dropout off, BatchNorm with its
      running statistics, an affine map, so the network is a deterministic function of its weights
      and stays linear in each weight). The flags are set directly, without calling ``train()``
      overrides, and each is put back as it was (a module the user left in train mode stays so);
    - what holds whenever a measurement runs the model
      (:func:`~lightning_flatness.functional.measurement_context.measurement_context`): compiled code runs
      eagerly (no recompilation, the training run's compile cache untouched), the model's own
      ``torch.autocast`` contexts run disabled (full precision, as below), eval-mode caches derived from the
      parameters miss, and module backward hooks are suspended;
    - floating parameters and buffers whose dtype is not ``dtype`` (16-bit training) are replaced by
      cast copies (:func:`floating_point_in`); tensors already in ``dtype`` are the live ones. The
      original objects go back into their slots on exit, also on error.

    The estimators never modify the tensors they are given (they differentiate detached leaves
    through :func:`torch.func.functional_call` and clone the buffers; ``docs/design.md``), so the
    live weights, buffers, ``.grad`` and the parameters' autograd hooks (DDP's) are untouched. The
    module's own forward hooks do run. Must be entered inside :func:`gradient_enabled` when the caller
    may be in inference mode (so the cast copies are normal tensors).

    Cost: no memory when the network is already in ``dtype`` (float32 training measured in float32,
    mixed precision included); otherwise one ``dtype`` copy of the tensors that change dtype.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
        >>> weight = net[0].weight
        >>> with measurement_view(net, torch.float64) as view:
        ...     view is net, view.training, view[0].weight.dtype, view[0].weight is weight
        (True, False, torch.float64, False)
        >>> net.training, net[0].weight is weight, weight.dtype
        (True, True, torch.float32)
    """
    modes = [(m, m.training) for m in module.modules()]
    try:
        for m, _ in modes:
            m.training = False
        with floating_point_in(module, dtype), measurement_context(module):
            yield module
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def floating_point_in(module: nn.Module, dtype: torch.dtype) -> Iterator[nn.Module]:
    """``module`` with its floating parameters and buffers in ``dtype`` for the duration of the block,
    then exactly as before: those of another dtype are replaced by cast copies (new ``nn.Parameter``
    objects with the same ``requires_grad``; a tensor registered under several names gets one copy),
    those already in ``dtype`` are the live ones, and the original objects go back into their slots on
    exit, also on error. Cost: one ``dtype`` copy of the tensors that change dtype.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> with floating_point_in(net, torch.float64) as view:
        ...     view.weight.dtype
        torch.float64
        >>> net.weight.dtype
        torch.float32
    """
    slots: list[tuple[dict[str, Any], str, Tensor]] = []
    casts: dict[int, Tensor] = {}
    try:
        for m in module.modules():
            for kind in ("_parameters", "_buffers"):
                entries = getattr(m, kind)
                for name, tensor in list(entries.items()):
                    if tensor is None or not tensor.is_floating_point() or tensor.dtype == dtype:
                        continue
                    if id(tensor) not in casts:
                        with torch.no_grad():
                            cast = tensor.detach().to(dtype)
                        if isinstance(tensor, nn.Parameter):
                            cast = nn.Parameter(cast, requires_grad=tensor.requires_grad)
                        casts[id(tensor)] = cast
                    slots.append((entries, name, tensor))
                    entries[name] = casts[id(tensor)]
        yield module
    finally:
        for entries, name, tensor in slots:
            entries[name] = tensor


def autograd_tensor(tensor: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``tensor`` on ``device`` (floating point cast to ``dtype``), never an inference tensor."""
    out = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    return out.clone() if out.is_inference() else out
