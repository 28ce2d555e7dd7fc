"""TensorBoard: a custom-scalars layout (per-layer curves on one chart), the table as markdown text
(TEXT tab) and the bar chart (IMAGES tab)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_flatness.callback_logging import custom_scalars_layout

if TYPE_CHECKING:
    from lightning_flatness.logger_media.dispatch import MediaContext

__all__ = ["log_media"]


def log_media(logger: Any, context: MediaContext) -> None:
    """Write to ``logger.experiment`` (a ``SummaryWriter``): layout once, then text and image at ``step``."""
    writer = logger.experiment
    if id(writer) not in context.layouts_written:
        writer.add_custom_scalars(custom_scalars_layout(context.prefix, context.measures, context.measures))
        context.layouts_written.add(id(writer))
    if context.table.rows:
        writer.add_text(f"{context.prefix}/per_layer", context.table.to_markdown(), global_step=context.step)
    if context.image is not None:
        writer.add_image(
            f"{context.prefix}/normalized_per_layer",
            context.image,
            global_step=context.step,
            dataformats="HWC",
        )
