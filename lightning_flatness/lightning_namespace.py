"""``SharpnessMonitor`` for the unified ``lightning`` package (``lightning.pytorch.Trainer``).

``lightning.pytorch`` and ``pytorch_lightning`` define separate ``Callback`` base classes, and the
Trainer and ``LightningCLI`` of each namespace accept only their own. Use this class with
``lightning.pytorch`` (e.g. ``class_path: lightning_flatness.lightning_namespace.SharpnessMonitor``
in a LightningCLI config) and :class:`lightning_flatness.SharpnessMonitor` with
``pytorch_lightning``. Both share all logic (:class:`~lightning_flatness.callback.SharpnessMonitorBase`).
"""

from __future__ import annotations

try:
    from lightning.pytorch import Callback
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "lightning_flatness.lightning_namespace needs the unified `lightning` package "
        "(`pip install lightning`); with `pytorch_lightning` use "
        "lightning_flatness.SharpnessMonitor."
    ) from err

from lightning_flatness.callback import SharpnessMonitor as _PytorchLightningSharpnessMonitor
from lightning_flatness.callback import SharpnessMonitorBase

__all__ = ["SharpnessMonitor"]


class SharpnessMonitor(SharpnessMonitorBase, Callback):
    __doc__ = _PytorchLightningSharpnessMonitor.__doc__.replace(
        "import torch, pytorch_lightning as pl", "import torch, lightning.pytorch as pl"
    )
    _logger_name = "lightning.pytorch.callbacks.sharpness_monitor"
