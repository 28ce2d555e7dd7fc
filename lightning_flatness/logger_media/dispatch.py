"""One loop over ``trainer.loggers``: each logger gets the per-layer table and bar chart its own way."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from lightning_flatness.logger_media import to_csv, to_mlflow, to_tensorboard, to_wandb
from lightning_flatness.logger_media.table import PerLayerTable

__all__ = ["WRITERS", "MediaContext", "log_per_layer_media", "logger_kind"]


@dataclass
class MediaContext:
    """What one measurement sends to the loggers besides scalars.

    Attributes:
        prefix: the logged keys' prefix (``"sharpness"``); names the table, image and files.
        measures: the measures logged per layer (for TensorBoard's custom-scalars layout).
        step: ``trainer.global_step``; epoch: ``trainer.current_epoch``.
        table: the per-layer values (:func:`~lightning_flatness.logger_media.per_layer_table`).
        figure: the per-layer bar chart (a matplotlib ``Figure`` on an Agg canvas), or ``None``.
        image: the same chart as an ``(H, W, 3)`` uint8 array, or ``None``.
        layouts_written: ids of TensorBoard writers that already have the custom-scalars layout
            (owned by the callback, so that the layout is written once per writer and run).
    """

    prefix: str
    measures: tuple[str, ...]
    step: int
    epoch: int
    table: PerLayerTable
    figure: Optional[Any] = None
    image: Optional[np.ndarray] = None
    layouts_written: set[int] = field(default_factory=set)

    @property
    def file_stem(self) -> str:
        """``prefix`` made safe for a file name (``"sharpness/hutch"`` -> ``"sharpness_hutch"``)."""
        return self.prefix.replace("/", "_").replace("\\", "_")


#: Logger kind -> writer. The kind is the name of the logger's class or of one of its bases, so the
#: writers serve ``pytorch_lightning.loggers`` and ``lightning.pytorch.loggers`` (and subclasses) alike.
WRITERS: dict[str, Callable[[Any, MediaContext], None]] = {
    "TensorBoardLogger": to_tensorboard.log_media,
    "WandbLogger": to_wandb.log_media,
    "MLFlowLogger": to_mlflow.log_media,
    "CSVLogger": to_csv.log_media,
}


def logger_kind(logger: Any) -> Optional[str]:
    """The :data:`WRITERS` key serving ``logger``, or ``None`` (e.g. Lightning's ``DummyLogger``).

    A logger of another class whose ``experiment`` has ``add_custom_scalars`` and ``add_image`` (a
    TensorBoard ``SummaryWriter``) counts as ``"TensorBoardLogger"``.
    """
    for cls in type(logger).__mro__:
        if cls.__name__ in WRITERS:
            return cls.__name__
    if type(logger).__name__ == "DummyLogger":  # fast_dev_run: its experiment accepts any call
        return None
    experiment = getattr(logger, "experiment", None)
    if all(callable(getattr(experiment, name, None)) for name in ("add_custom_scalars", "add_image")):
        return "TensorBoardLogger"
    return None


def log_per_layer_media(trainer: Any, context: MediaContext) -> list[str]:
    """Send ``context`` to every logger of ``trainer`` that has a writer; do nothing off global rank 0.

    Returns:
        The kinds served, in logger order (for tests and for a one-time note about unserved loggers).
    """
    if not trainer.is_global_zero:
        return []
    served = []
    for logger in trainer.loggers:
        kind = logger_kind(logger)
        if kind is not None:
            WRITERS[kind](logger, context)
            served.append(kind)
    return served
