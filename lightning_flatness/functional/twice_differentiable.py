r"""Run a model so that it can be differentiated twice, during a measurement only.

Hessian-vector products (:mod:`.estimators.hutchinson`, the residual of
:mod:`.estimators.ggn_hutchinson`) differentiate the loss twice: by double backward, or forward-over-
reverse under :mod:`torch.func`. Several kernels that models use by default have a first derivative
only:

- fused scaled-dot-product attention (``F.scaled_dot_product_attention`` picks flash / memory-
  efficient kernels: ``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is
  not implemented``), used by timm's ``Attention`` (``fused_attn = True``) and by Hugging Face models
  (``attn_implementation="sdpa"``);
- ``hardswish`` and ``hardsigmoid`` (torchvision MobileNetV3): ``derivative for
  aten::hardsigmoid_backward is not implemented``.

:func:`twice_differentiable` switches all of them to mathematically identical, composite
executions for the duration of a ``with`` block and restores the model exactly afterwards (also when
the block raises):

- ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``: SDPA as ``softmax(q k^T / sqrt(d) + mask) v``
  in plain differentiable ops;
- every module with a boolean ``fused_attn`` attribute (timm ``Attention``, ``AttentionPool``...):
  ``fused_attn = False``, timm's explicit ``q @ k.transpose * scale``, softmax, ``@ v`` path;
- every Hugging Face ``PretrainedConfig`` reachable as a module's ``.config``:
  ``_attn_implementation = "eager"`` (restored to its previous value);
- every ``nn.MultiheadAttention`` (torchvision's ``VisionTransformer``, ``nn.TransformerEncoderLayer``):
  its forward in explicit operations (:mod:`.composite_attention`), so that the recorder of the
  estimators sees the projections, the softmax and the products instead of one fused call;
- activation modules that compute a standard activation in a custom autograd Function with a
  first-order backward (Hugging Face's ``BloomGelu``): that activation's PyTorch op
  (:mod:`.explicit_activations`);
- every module with a boolean ``inplace`` attribute (``nn.ReLU``, ``nn.SiLU``, ``nn.Hardswish``, timm's
  activation layers): ``inplace = False``, so that an activation does not overwrite the output of the
  operation before it (torchvision's and timm's EfficientNets use ``SiLU(inplace=True)`` after every
  BatchNorm; the Hessian sketch needs that output, and double backward may too);
- a :class:`torch.overrides.TorchFunctionMode` that evaluates ``F.hardsigmoid(x) =
  clamp(x / 6 + 1/2, 0, 1)`` and ``F.hardswish(x) = x * clamp(x / 6 + 1/2, 0, 1)`` (the definitions in
  the PyTorch documentation, same formula as the kernels; in-place variants are evaluated out of
  place and their result returned, as ``nn.Hardswish`` uses it). ``clamp`` has derivatives of every
  order (0 beyond the first);
- the same mode evaluates ``torch._weight_norm`` (``torch.nn.utils.parametrizations.weight_norm``) as ``v (g
  / ||v||)`` in plain ops: in PyTorch 2.14 its kernel has no forward-mode derivative, and its double backward
  disagrees with finite differences of its own gradient, where the written-out formula agrees
  (``tests/test_twice_differentiable.py``).

Values equal those of the fused, in-place execution to float rounding (tested on every zoo model); derivatives
agree wherever the functions are differentiable (at ``x = +-3`` the composite picks a one-sided
derivative, a null set). Cost: the math SDPA path materialises the ``(B, H, T, T)`` attention
matrix, like eager attention, which is what double differentiation stores anyway.

Other ops in the zoo models (GELU, SiLU, tanh, LayerNorm, BatchNorm, softmax, convolutions,
embedding lookups) have double-backward formulas in PyTorch already.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_flatness.functional.composite_attention import explicit_multi_head_attention
from lightning_flatness.functional.explicit_activations import explicit_activations

__all__ = [
    "twice_differentiable",
    "CompositeActivations",
    "composite_hardsigmoid",
    "composite_hardswish",
    "composite_weight_norm",
]


def composite_hardsigmoid(x: torch.Tensor) -> torch.Tensor:
    """``clamp(x / 6 + 1/2, 0, 1)``: ``hardsigmoid`` in ops with derivatives of every order."""
    return torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)


def composite_hardswish(x: torch.Tensor) -> torch.Tensor:
    """``x * clamp(x / 6 + 1/2, 0, 1)``: ``hardswish`` in ops with derivatives of every order."""
    return x * composite_hardsigmoid(x)


def composite_weight_norm(v: torch.Tensor, g: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``g v / ||v||`` with the norm over every dim but ``dim`` (over all of ``v`` for ``dim=-1``):
    ``torch._weight_norm`` (``torch.nn.utils.parametrizations.weight_norm``) in plain ops, which have a
    correct second derivative and a forward-mode one."""
    dims = tuple(range(v.dim())) if dim == -1 else tuple(d for d in range(v.dim()) if d != dim % v.dim())
    return v * (g / v.square().sum(dim=dims, keepdim=True).sqrt())


_COMPOSITES = {F.hardsigmoid: composite_hardsigmoid, F.hardswish: composite_hardswish}
#: ops replaced by a composite that takes all of their arguments
_COMPOSITE_CALLS = {torch._weight_norm: composite_weight_norm}
for _name, _fn in (("hardsigmoid", composite_hardsigmoid), ("hardswish", composite_hardswish)):
    for _variant in (_name, _name + "_"):  # the kernels behind F.* and nn.*(inplace=True)
        if hasattr(torch._C._nn, _variant):
            _COMPOSITES[getattr(torch._C._nn, _variant)] = _fn


class CompositeActivations(TorchFunctionMode):
    """A torch-function mode that evaluates ``hardsigmoid``/``hardswish`` (functional, ``nn`` module or
    ``torch._C._nn`` call, in-place or not) and ``torch._weight_norm`` by their composite,
    twice-differentiable definitions."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        whole = _COMPOSITE_CALLS.get(func)
        if whole is not None:
            return whole(*args, **(kwargs or {}))
        composite = _COMPOSITES.get(func)
        if composite is not None:
            x = args[0] if args else kwargs["input"]
            return composite(x)
        return func(*args, **(kwargs or {}))


def _hf_configs(model: nn.Module) -> list[Any]:
    """Distinct Hugging Face configs (objects with ``_attn_implementation``) held by the modules."""
    found: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(config, "_attn_implementation") and not isinstance(config, nn.Module):
            found.setdefault(id(config), config)
            for key in getattr(config, "sub_configs", {}) or {}:
                sub = getattr(config, key, None)
                if sub is not None and hasattr(sub, "_attn_implementation"):
                    found.setdefault(id(sub), sub)
    return list(found.values())


@contextlib.contextmanager
def twice_differentiable(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` (and any code run there) can be differentiated twice; the model
    is restored exactly on exit, also on exceptions (module docstring: what is switched and why).

    Args:
        model: the network. Its ``fused_attn`` and ``inplace`` flags, Hugging Face
            ``_attn_implementation`` and ``nn.MultiheadAttention`` forwards are changed for the block
            only; parameters and buffers are never touched.

    Yields:
        ``model`` itself.

    Example:
        >>> import torch
        >>> act = torch.nn.Hardswish()
        >>> x = torch.tensor([0.5], requires_grad=True)
        >>> with twice_differentiable(act):
        ...     (g,) = torch.autograd.grad(act(x).sum(), x, create_graph=True)
        ...     (h,) = torch.autograd.grad(g.sum(), x)
        >>> round(float(h), 6)  # d2/dx2 of x (x/6 + 1/2) = 1/3
        0.333333
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # modules with a boolean `fused_attn` switch (timm attention); nn.Module does not declare it
    switchable: list[Any] = [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    fused = [(m, m.fused_attn) for m in switchable]
    inplace: list[Any] = [m for m in model.modules() if getattr(m, "inplace", None) is True]
    configs = [(c, c._attn_implementation) for c in _hf_configs(model)]
    try:
        for m, _ in fused:
            m.fused_attn = False
        for m in inplace:
            m.inplace = False
        for c, _ in configs:
            c._attn_implementation = "eager"
        with (
            sdpa_kernel([SDPBackend.MATH]),
            CompositeActivations(),
            explicit_multi_head_attention(model),
            explicit_activations(model),
        ):
            yield model
    finally:
        for m, value in fused:
            m.fused_attn = value
        for m in inplace:
            m.inplace = True
        for c, value in configs:
            c._attn_implementation = value
