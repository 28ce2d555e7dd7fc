"""Weights & Biases: ``WandbLogger.log_table`` and ``WandbLogger.log_image`` at the trainer's step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_flatness.logger_media.dispatch import MediaContext

__all__ = ["log_media"]


def log_media(logger: Any, context: MediaContext) -> None:
    """Log the table as ``"<prefix>/per_layer"`` and the chart as ``"<prefix>/normalized_per_layer"``."""
    if context.table.rows:
        logger.log_table(
            key=f"{context.prefix}/per_layer",
            columns=context.table.columns,
            data=context.table.rows,
            step=context.step,
        )
    if context.image is not None:
        logger.log_image(
            key=f"{context.prefix}/normalized_per_layer",
            images=[context.image],
            step=context.step,
            caption=[f"epoch {context.epoch}"],
        )
