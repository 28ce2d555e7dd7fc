"""MLflow: artifacts of the logger's run through its ``MlflowClient`` (``log_text``, ``log_figure``).

``MlflowClient.log_table`` would need pandas, which ``mlflow-skinny`` does not install; the table is
logged as a CSV text artifact instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_flatness.logger_media.dispatch import MediaContext

__all__ = ["log_media", "artifact_paths"]


def artifact_paths(context: MediaContext) -> tuple[str, str]:
    """``(table, chart)`` artifact paths: ``<prefix>/per_layer/step=000120.csv`` and ``...png``."""
    tag = f"step={context.step:06d}"
    return f"{context.prefix}/per_layer/{tag}.csv", f"{context.prefix}/normalized_per_layer/{tag}.png"


def log_media(logger: Any, context: MediaContext) -> None:
    """Log the table (CSV with epoch and step columns) and the chart (PNG) as artifacts of the run."""
    client, run_id = logger.experiment, logger.run_id
    table_path, chart_path = artifact_paths(context)
    if context.table.rows:
        client.log_text(
            run_id, context.table.to_csv({"epoch": context.epoch, "step": context.step}), table_path
        )
    if context.figure is not None:
        client.log_figure(run_id, context.figure, chart_path)
