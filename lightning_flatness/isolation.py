"""Keep a measurement invisible to training: random-number streams, grad mode, a private model copy.

``SharpnessMonitor`` runs in the middle of a training run. Everything it does goes through this
module so that, afterwards, training continues bit for bit as if it had not run:

- :func:`preserved_rng_states` restores every global random stream (torch CPU, CUDA, MPS, NumPy,
  Python's ``random``);
- :func:`gradient_enabled` turns gradients on inside ``no_grad`` / ``inference_mode`` (validation)
  and autocast off (mixed precision);
- :func:`float_copy` gives a detached float32/float64 copy of the network, in eval mode, so that
  the live model's weights, buffers, ``.grad``, train/eval modes and autograd hooks (DDP's) are
  never touched, and curvature is computed in full precision when training runs in 16 bits;
- :func:`autograd_tensor` moves a data tensor to the copy's device and dtype as a normal
  (non-inference) tensor.
"""

from __future__ import annotations

import copy
import random
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["preserved_rng_states", "gradient_enabled", "float_copy", "autograd_tensor", "resolve_dtype"]

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


def float_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A deep copy of ``module`` with floating parameters and buffers cast to ``dtype``, in eval mode.

    Datasets, data loaders and datamodules held as attributes of (sub)modules are shared with the
    original rather than copied (``forward`` does not use them, and copying them could cost more
    than the network); everything else, plain tensor attributes included, is copied.

    Eval mode makes the network a deterministic function of its weights (dropout off; BatchNorm
    uses its running statistics, an affine map, so the network stays linear in each weight). The
    copy shares nothing with ``module``: its parameters have no ``.grad`` and none of the
    original's autograd hooks. Must be called inside :func:`gradient_enabled` when the caller may
    be in inference mode (so the copied tensors are normal tensors).

    Cost: memory of one copy of the weights and buffers in ``dtype``.

    Raises:
        TypeError: the module cannot be deep-copied (e.g. it holds an open file or a lock as an
            attribute).
    """
    memo = _shared_data_memo(module)
    try:
        with torch.no_grad():
            clone = copy.deepcopy(module, memo)
    except Exception as err:  # deepcopy raises whatever the offending attribute raises
        raise TypeError(
            f"SharpnessMonitor could not copy {type(module).__name__} to measure its curvature "
            f"on a private copy ({type(err).__name__}: {err}); move non-copyable attributes "
            "(open files, locks, generators) out of the module, or override "
            f"`SharpnessMonitor.copy_network(self, pl_module, dtype)`."
        ) from err
    clone.to(dtype)
    clone.eval()
    for p in clone.parameters():
        p.grad = None
    return clone


def _shared_data_memo(module: nn.Module) -> dict[int, Any]:
    """A ``deepcopy`` memo mapping data-holding attributes to themselves, so that they are shared."""
    from torch.utils.data import DataLoader, Dataset

    memo: dict[int, Any] = {}
    for sub in module.modules():
        for value in vars(sub).values():
            is_datamodule = (
                not isinstance(value, nn.Module)
                and callable(getattr(value, "train_dataloader", None))
                and callable(getattr(value, "prepare_data", None))
            )
            if isinstance(value, (Dataset, DataLoader)) or is_datamodule:
                memo[id(value)] = value
    return memo


def autograd_tensor(tensor: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``tensor`` on ``device`` (floating point cast to ``dtype``), never an inference tensor."""
    out = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    return out.clone() if out.is_inference() else out
