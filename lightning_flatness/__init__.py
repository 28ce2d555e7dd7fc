"""lightning_flatness: rescaling-invariant flatness of neural networks.

Normalized sharpness (Tsuzuku, Sato, Sugiyama, ICML 2020, eq. 17) as a torchmetrics metric
(:class:`NormalizedSharpness`), a PyTorch Lightning callback (:class:`SharpnessMonitor`) and a
functional core (:mod:`lightning_flatness.functional`) usable from any training loop.
"""

from __future__ import annotations

from typing import Any

from lightning_flatness import functional

__version__ = "0.1.0"

__all__ = ["NormalizedSharpness", "SharpnessMonitor", "functional", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the functional core must not pay for importing Lightning.
    if name == "NormalizedSharpness":
        from lightning_flatness.metric import NormalizedSharpness

        return NormalizedSharpness
    if name == "SharpnessMonitor":
        from lightning_flatness.callback import SharpnessMonitor

        return SharpnessMonitor
    raise AttributeError(f"module 'lightning_flatness' has no attribute {name!r}")
