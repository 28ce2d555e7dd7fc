"""Pictures of ``SharpnessMonitor``: the TensorBoard custom-scalars layout and the per-layer bar chart.

Scalars go through ``pl_module.log`` (every logger gets them). The chart is drawn here once per
measurement and sent to every logger by :mod:`lightning_flatness.logger_media`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

__all__ = [
    "tensorboard_writers",
    "custom_scalars_layout",
    "bar_chart_figure",
    "bar_chart_image",
    "figure_to_image",
]


def tensorboard_writers(trainer: Any) -> list[Any]:
    """The TensorBoard writers of ``trainer``'s loggers (empty except on global rank 0).

    Any logger whose ``experiment`` has ``add_custom_scalars`` and ``add_image``
    (``torch.utils.tensorboard.SummaryWriter``, ``tensorboardX.SummaryWriter``) qualifies.
    """
    if not trainer.is_global_zero:
        return []
    writers = []
    for logger in trainer.loggers:
        if type(logger).__name__ == "DummyLogger":  # fast_dev_run: its experiment accepts any call
            continue
        experiment = getattr(logger, "experiment", None)
        if all(callable(getattr(experiment, name, None)) for name in ("add_custom_scalars", "add_image")):
            writers.append(experiment)
    return writers


def custom_scalars_layout(
    prefix: str, measures: Sequence[str], totals: Sequence[str]
) -> dict[str, dict[str, list]]:
    """A TensorBoard custom-scalars layout: per measure, one chart with a curve per layer.

    Args:
        prefix: the logged keys' prefix (``"sharpness"``).
        measures: measures logged per layer, as ``"<prefix>/<measure>/<layer>"``.
        totals: total measures to draw together on one chart, as ``"<prefix>/<measure>"``.

    Returns:
        ``{category: {chart title: ["Multiline", [tag regex, ...]]}}`` as
        ``SummaryWriter.add_custom_scalars`` expects.

    Example:
        >>> layout = custom_scalars_layout("sharpness", ["normalized"], ["normalized"])
        >>> layout["sharpness"]["normalized per layer"]
        ['Multiline', ['^sharpness/normalized/.+']]
    """
    p = re.escape(prefix)
    charts = {f"{m} per layer": ["Multiline", [rf"^{p}/{re.escape(m)}/.+"]] for m in measures}
    charts["totals"] = ["Multiline", [rf"^{p}/{re.escape(m)}$" for m in totals]]
    return {prefix: charts}


def bar_chart_figure(
    values: Mapping[str, float], title: str, ylabel: str, errors: Optional[Mapping[str, float]] = None
) -> Optional[Any]:
    """A bar chart of ``values`` (one bar per layer, with ``errors`` as error bars when given and
    finite) as a matplotlib ``Figure`` on an Agg canvas.

    Uses matplotlib's object-oriented API (no pyplot, no global figure state), so it is safe in
    any thread and leaves no figure open.

    Returns:
        The figure, or ``None`` when matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    names = list(values)
    fig = Figure(figsize=(max(4.0, 0.5 * len(names) + 2.0), 3.5), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    yerr = None
    if errors is not None and all(math.isfinite(float(errors.get(n, math.nan))) for n in names):
        yerr = [float(errors[n]) for n in names]
    ax.bar(range(len(names)), [float(values[n]) for n in names], yerr=yerr, capsize=3, color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    longest = max((len(n) for n in names), default=1)
    fig.subplots_adjust(left=0.15, right=0.97, top=0.9, bottom=min(0.6, 0.12 + 0.018 * longest))
    return fig


def figure_to_image(fig: Any) -> np.ndarray:
    """Render a figure of :func:`bar_chart_figure` to an ``(H, W, 3)`` uint8 array."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def bar_chart_image(
    values: Mapping[str, float], title: str, ylabel: str, errors: Optional[Mapping[str, float]] = None
) -> Optional[np.ndarray]:
    """:func:`bar_chart_figure` rendered to an ``(H, W, 3)`` uint8 array (``None`` without matplotlib)."""
    fig = bar_chart_figure(values, title, ylabel, errors)
    return None if fig is None else figure_to_image(fig)
