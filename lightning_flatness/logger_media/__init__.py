"""Per-layer table and bar chart of ``SharpnessMonitor``, sent through each logger's own API.

Scalars go through ``pl_module.log`` (every logger, ``EarlyStopping`` and ``ModelCheckpoint`` see
them); this package adds what a scalar cannot carry: the per-layer values as a table and the
per-layer bar chart as an image. One small module per logger kind, one registry
(:data:`WRITERS`), one loop (:func:`log_per_layer_media`), as in Lightning's ``LearningRateMonitor``.

=====================  ==================================================  ===============================
logger                 table                                               bar chart
=====================  ==================================================  ===============================
``TensorBoardLogger``  ``add_text`` (markdown) + custom-scalars layout     ``add_image``
``WandbLogger``        ``log_table``                                       ``log_image``
``MLFlowLogger``       ``MlflowClient.log_text`` (a CSV artifact)          ``MlflowClient.log_figure``
``CSVLogger``          ``<prefix>_per_layer.csv`` beside ``metrics.csv``   PNG files beside ``metrics.csv``
=====================  ==================================================  ===============================
"""

from __future__ import annotations

from lightning_flatness.logger_media.dispatch import WRITERS, MediaContext, log_per_layer_media, logger_kind
from lightning_flatness.logger_media.table import PerLayerTable, per_layer_table

__all__ = [
    "WRITERS",
    "MediaContext",
    "PerLayerTable",
    "log_per_layer_media",
    "logger_kind",
    "per_layer_table",
]
