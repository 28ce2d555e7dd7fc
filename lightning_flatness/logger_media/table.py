"""The per-layer values of one measurement as a table (one row per weight tensor)."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

__all__ = ["PerLayerTable", "per_layer_table"]


@dataclass(frozen=True)
class PerLayerTable:
    """Rows ``[layer, <measure>, <measure>_stderr, ...]``, one per weight tensor, in measurement order."""

    columns: list[str]
    rows: list[list]

    def to_csv(self, extra: Mapping[str, object] | None = None, header: bool = True) -> str:
        """The table as CSV text; ``extra`` (e.g. ``{"epoch": 3, "step": 120}``) is prepended to every row."""
        extra = dict(extra or {})
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        if header:
            writer.writerow([*extra, *self.columns])
        for row in self.rows:
            writer.writerow([*extra.values(), *(repr(v) if isinstance(v, float) else v for v in row)])
        return out.getvalue()

    def to_markdown(self) -> str:
        """The table in markdown (values to 6 significant digits), as TensorBoard's TEXT tab renders it."""
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        for row in self.rows:
            lines.append(
                "| " + " | ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row) + " |"
            )
        return "\n".join(lines)


def per_layer_table(values: Mapping[str, float], measures: Sequence[str]) -> PerLayerTable:
    """Collect ``values["<measure>/<layer>"]`` and ``values["<measure>_stderr/<layer>"]`` into a table.

    Args:
        values: the flat dict of :meth:`NormalizedSharpness.compute` (as floats).
        measures: the measures to tabulate, e.g. ``("normalized", "matrix_normalized", "hessian_trace")``.

    Returns:
        A :class:`PerLayerTable` with one row per tensor that has any of the measures (in the order of
        the measure with the most tensors: parameter order) and a column per measure (and
        ``<measure>_stderr``) that some tensor has; a tensor without a measure (a bias has the trace
        alone, footnote 5) gets NaN there.

    Example:
        >>> values = {"normalized/a.weight": 2.0, "normalized_stderr/a.weight": 0.5,
        ...           "hessian_trace/a.weight": 4.0, "hessian_trace/a.bias": 1.0}
        >>> t = per_layer_table(values, ["normalized", "hessian_trace"])
        >>> t.columns
        ['layer', 'normalized', 'normalized_stderr', 'hessian_trace']
        >>> t.rows
        [['a.weight', 2.0, 0.5, 4.0], ['a.bias', nan, nan, 1.0]]
    """
    per_measure = [[k.split("/", 1)[1] for k in values if k.startswith(f"{m}/")] for m in measures]
    layers: list[str] = max(per_measure, key=len, default=[])  # the fullest measure's order (the trace's)
    layers = layers + [layer for found in per_measure for layer in found if layer not in layers]
    columns = ["layer"]
    getters = []
    for m in measures:
        for name in (m, f"{m}_stderr"):
            if any(f"{name}/{layer}" in values for layer in layers):
                columns.append(name)
                getters.append(name)
    rows = [[layer, *(float(values.get(f"{g}/{layer}", math.nan)) for g in getters)] for layer in layers]
    return PerLayerTable(columns, rows)
