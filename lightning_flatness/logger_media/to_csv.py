"""CSVLogger: ``<prefix>_per_layer.csv`` (one row per layer and measurement) and one PNG per measurement
in ``<prefix>_per_layer/``, both beside ``metrics.csv`` in ``logger.log_dir``."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_flatness.logger_media.dispatch import MediaContext

__all__ = ["log_media", "output_paths"]


def output_paths(log_dir: str, context: MediaContext) -> tuple[str, str]:
    """``(table, chart)`` paths under ``log_dir``."""
    return (
        os.path.join(log_dir, f"{context.file_stem}_per_layer.csv"),
        os.path.join(log_dir, f"{context.file_stem}_per_layer", f"normalized_step={context.step:06d}.png"),
    )


def log_media(logger: Any, context: MediaContext) -> None:
    """Append the table's rows (with ``epoch`` and ``step`` columns) and save the chart."""
    logger.experiment  # noqa: B018 - creates logger.log_dir, as metrics.csv's writer does
    table_path, chart_path = output_paths(logger.log_dir, context)
    if context.table.rows:
        os.makedirs(os.path.dirname(table_path), exist_ok=True)
        new = not os.path.exists(table_path)
        with open(table_path, "a", encoding="utf-8", newline="") as f:
            f.write(context.table.to_csv({"epoch": context.epoch, "step": context.step}, header=new))
    if context.figure is not None:
        os.makedirs(os.path.dirname(chart_path), exist_ok=True)
        context.figure.savefig(chart_path)
