r"""RMS norms written out in elementary operations, run as one ``F.rms_norm`` for the Hessian sketch only.

Model libraries write the RMS norm out: Hugging Face's Llama, Qwen, Mistral, Gemma, T5, Llama 4 (and its L2
norm of queries and keys) compute ``x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)``, then scale it by
``weight`` (or ``1 + weight``). The Hessian sketch then samples the curvature of each piece on its own (the
square, the reciprocal square root, the product of ``x`` with its own normalizer), with independent random
signs. On an untrained network those pieces are large (an embedding of scale 0.02 normalized: curvature like
``1 / scale^2``) and cancel only in their sum, so the sketch's noise buried the curvature of untrained
language models (measured: ``benchmarks/RESULTS.md``, round 17).

:func:`rms_norms_as_one_op` runs each such module as ``F.rms_norm`` (whose node rule,
:mod:`~lightning_flatness.functional.estimators.node_rules.rms_norm`, samples the norm's curvature as a whole:
a multiple of the identity and two exact columns), followed by the module's own scale:

.. math:: y = w \circ \frac{x}{\sqrt{\mathrm{mean}(x^2) + \epsilon}}, \quad
          \text{or } (1 + w) \circ \ldots, \quad \text{or no scale},

which form the module computes being read from its output on the actual input, computed without gradients (a
form is used only where it reproduces that output to the rounding of the module's dtype; else the module keeps
its own forward). Candidates: leaf modules outside ``torch.nn`` with a float ``eps`` (or ``variance_epsilon``,
``epsilon``) and no parameter but a 1-D ``weight``, called on one floating tensor with the normalized entries
last. The norm is computed in the input's precision (at least float32) where that reproduces the module's
output to its rounding, else in float32 (Hugging Face's norms round a float64 input to float32): the same
function, up to the rounding of the precision the module computes in. Cost: one more forward of each such
module, without gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_flatness.functional.instance_forwards import instance_forwards
from lightning_flatness.functional.module_walk import modules_of

__all__ = ["EPS_ATTRIBUTES", "is_rms_norm_candidate", "rms_norm_forward", "rms_norms_as_one_op"]

#: Attribute names under which modules keep the epsilon of their norm.
EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon")
_SCALES = ("weight", "one_plus_weight")


def _eps(module: nn.Module) -> Optional[float]:
    for name in EPS_ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, (float, int)) and not isinstance(value, bool):
            return float(value)
    return None


def is_rms_norm_candidate(module: nn.Module) -> bool:
    """Whether ``module`` may be an RMS norm written out (module docstring): a leaf module outside
    ``torch.nn`` (whose own norms call one op already) with a float epsilon attribute and no parameter but a
    1-D ``weight``."""
    if type(module).__module__.startswith("torch.") or next(module.children(), None) is not None:
        return False
    params = dict(module.named_parameters(recurse=False))
    if params and (set(params) != {"weight"} or params["weight"].ndim != 1):
        return False
    return _eps(module) is not None


def _scaled(normalized: Tensor, weight: Optional[Tensor], scale: str) -> Tensor:
    if scale == "none":
        return normalized
    assert weight is not None
    w = weight.to(normalized.dtype)
    return normalized * w if scale == "weight" else normalized * (1.0 + w)


def _reproduces(candidate: Tensor, reference: Tensor) -> bool:
    """Equal to the rounding of the candidate's dtype, or of ``reference``'s where that is coarser."""
    tol = max(64 * torch.finfo(candidate.dtype).eps, 4 * torch.finfo(reference.dtype).eps)
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    return bool(torch.allclose(candidate.to(reference.dtype), reference, rtol=tol, atol=tol * scale))


def rms_norm_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The module as ``F.rms_norm`` and its scale where that reproduces its output (module docstring); its
    class's own forward otherwise."""
    original = type(self).forward
    x = args[0] if len(args) == 1 and not kwargs else None
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2 or x.shape[-1] < 2:
        return original(self, *args, **kwargs)
    with torch.no_grad():
        reference = original(self, x)
    if not isinstance(reference, Tensor) or reference.shape != x.shape or not reference.is_floating_point():
        return original(self, x)
    eps = _eps(self)
    weight = self._parameters.get("weight")
    # the input's precision (at least float32), else float32 where the model's code rounds to it
    computes = dict.fromkeys([torch.promote_types(x.dtype, torch.float32), torch.float32])
    scales = _SCALES if weight is not None else ("none",)
    for compute in computes:
        with torch.no_grad():  # the check: no op of it is recorded (its outputs do not require grad)
            normalized = F.rms_norm(x.to(compute), (x.shape[-1],), eps=eps)
            form = next((s for s in scales if _reproduces(_scaled(normalized, weight, s), reference)), None)
        if form is not None:
            normalized = F.rms_norm(x.to(compute), (x.shape[-1],), eps=eps)  # the op the sketch samples
            return _scaled(normalized, weight, form).to(reference.dtype)
    return original(self, x)


@contextlib.contextmanager
def rms_norms_as_one_op(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every module of ``model`` that :func:`is_rms_norm_candidate` runs
    :func:`rms_norm_forward`; restored exactly on exit (:mod:`.instance_forwards`).

    Example:
        >>> import torch
        >>> class WrittenOut(torch.nn.Module):  # as Hugging Face's Llama writes its RMS norm
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.weight, self.variance_epsilon = torch.nn.Parameter(torch.rand(4)), 1e-6
        ...     def forward(self, x):
        ...         return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        >>> norm, x = WrittenOut(), torch.randn(3, 4)
        >>> with rms_norms_as_one_op(norm):
        ...     y = norm(x)
        >>> torch.allclose(y, norm(x), atol=1e-6), "forward" in norm.__dict__
        (True, False)
    """
    with instance_forwards((m, rms_norm_forward) for m in modules_of(model) if is_rms_norm_candidate(m)):
        yield model
