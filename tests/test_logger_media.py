"""Every logger gets the scalars, the per-layer table and the per-layer bar chart, read back from disk.

One Trainer logs to TensorBoard, CSVLogger, W&B (offline mode) and MLflow (a local SQLite store and
artifact directory) at once; each backend's files are then parsed with that backend's own reader
(TensorBoard's EventAccumulator, csv, the W&B ``.wandb`` record log, MlflowClient). The per-layer
values are compared with the monitor's history and with brute-force float64 Hessian measures.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import struct

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from callback_models import MLP, DataModule
from oracles import brute_force_measures

from lightning_flatness.callback import SharpnessMonitor
from lightning_flatness.functional import select_parameters
from lightning_flatness.logger_media import logger_kind, per_layer_table

MEASURES = ("normalized", "matrix_normalized", "hessian_trace")
COLUMNS = [
    "layer",
    "normalized",
    "normalized_stderr",
    "matrix_normalized",
    "matrix_normalized_stderr",
    "hessian_trace",
    "hessian_trace_stderr",
]


def _png(data: bytes | str) -> np.ndarray:
    from matplotlib.image import imread

    image = imread(io.BytesIO(data) if isinstance(data, bytes) else data, format="png")
    return np.round(np.asarray(image)[..., :3] * 255).astype(np.uint8)


def _nan_as_text(rows: list) -> list:
    """Rows with NaN cells replaced by ``"nan"``, so that lists compare equal cell by cell (NaN != NaN)."""
    return [[("nan" if isinstance(v, float) and math.isnan(v) else v) for v in row] for row in rows]


def _expected_rows(entry: dict, layers: list[str]) -> list[list]:
    """A bias has the trace alone (footnote 5): NaN in the other columns."""
    return [[layer, *(entry.get(f"{c}/{layer}", math.nan) for c in COLUMNS[1:])] for layer in layers]


def _wandb_history(path: str) -> list[dict]:
    """History records of a ``.wandb`` file (LevelDB log format: 7-byte file header, 32 KiB blocks of
    records with a 7-byte header ``crc32, length, type``; type 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, pending, history = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                entry: dict = {}
                for item in record.history.item:
                    keys = [item.key] if item.key else list(item.nested_key)
                    target = entry
                    for k in keys[:-1]:
                        target = target.setdefault(k, {})
                    target[keys[-1]] = json.loads(item.value_json)
                history.append(entry)
    return history


@pytest.mark.slow
def test_tensorboard_csv_wandb_and_mlflow_each_get_scalars_per_layer_table_and_bar_chart(
    tmp_path, monkeypatch
):
    import wandb
    from mlflow.tracking import MlflowClient
    from pytorch_lightning.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name, sub in (
        ("WANDB_DIR", ""),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_DATA_DIR", "data"),
    ):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # no network: nothing leaves the machine
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    loggers = [
        TensorBoardLogger(tmp_path, name="tb"),
        CSVLogger(tmp_path, name="csv"),
        WandbLogger(save_dir=str(tmp_path), project="flatness", offline=True),
        MLFlowLogger(
            experiment_name="flatness",
            tracking_uri=tracking_uri,
            artifact_location=str(tmp_path / "mlartifacts"),
        ),
    ]
    assert [logger_kind(lg) for lg in loggers] == [
        "TensorBoardLogger",
        "CSVLogger",
        "WandbLogger",
        "MLFlowLogger",
    ]
    monitor = SharpnessMonitor(num_samples=48, dtype="float64", batch_size=24, images_every_n_evaluations=1)
    pl.seed_everything(0, verbose=False)
    model, dm = MLP(), DataModule()
    trainer = pl.Trainer(
        max_epochs=2,
        logger=loggers,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, dm)
    wandb.finish()

    history = monitor.history
    assert len(history) == 2
    layers = list(select_parameters(model))
    expected = [_expected_rows(h, layers) for h in history]
    idx = monitor.state_dict()["indices"]
    reference = brute_force_measures(model, dm.train_set.tensors[0][idx], dm.train_set.tensors[1][idx])
    assert any(layer.endswith(".bias") for layer in layers)  # the default selection's trace-only tensors
    for layer, row in zip(layers, expected[-1]):  # the final model was the one measured last
        if layer.endswith(".weight"):
            assert row[1] == pytest.approx(reference[f"normalized/{layer}"], rel=1e-9)
        else:
            assert math.isnan(row[1]) and f"normalized/{layer}" not in reference
        assert row[5] == pytest.approx(reference[f"hessian_trace/{layer}"], rel=1e-9)
    totals = [h["normalized"] for h in history]
    images = {}

    # --- TensorBoard: scalars, the table as markdown text, the chart as an image
    events = EventAccumulator(loggers[0].log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("sharpness/normalized")] == pytest.approx(totals, rel=1e-6)
    assert len(events.Scalars(f"sharpness/normalized/{layers[0]}")) == 2
    texts = events.Tensors("sharpness/per_layer/text_summary")
    assert len(texts) == 2
    for text, rows in zip(texts, expected):
        lines = text.tensor_proto.string_val[0].decode().splitlines()
        assert lines[0] == "| " + " | ".join(COLUMNS) + " |"
        parsed = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
        assert [p[0] for p in parsed] == layers
        assert [[float(v) for v in p[1:]] for p in parsed] == [
            pytest.approx(r[1:], rel=1e-5, nan_ok=True) for r in rows
        ]
    tb_images = events.Images("sharpness/normalized_per_layer")
    assert len(tb_images) == 2
    images["tensorboard"] = _png(tb_images[-1].encoded_image_string)

    # --- CSVLogger: scalars in metrics.csv, the table and the charts beside it
    log_dir = loggers[1].log_dir
    with open(os.path.join(log_dir, "metrics.csv")) as f:
        metric_rows = [r for r in csv.DictReader(f) if r.get("sharpness/normalized")]
    assert [float(r["sharpness/normalized"]) for r in metric_rows] == pytest.approx(totals, rel=1e-6)
    with open(os.path.join(log_dir, "sharpness_per_layer.csv")) as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["epoch", "step", *COLUMNS]
    assert [int(r["epoch"]) for r in table] == [0] * len(layers) + [1] * len(layers)
    for r, row in zip(table, [row for rows in expected for row in rows]):
        assert _nan_as_text([[r["layer"], *(float(r[c]) for c in COLUMNS[1:])]]) == _nan_as_text(
            [row]
        )  # exact
    charts = sorted(glob.glob(os.path.join(log_dir, "sharpness_per_layer", "normalized_step=*.png")))
    assert len(charts) == 2
    images["csv"] = _png(charts[-1])

    # --- W&B offline: scalars, the table and the image in the run's history and files
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    files_dir = os.path.join(os.path.dirname(run_file), "files")
    wandb_history = _wandb_history(run_file)
    assert [h["sharpness/normalized"] for h in wandb_history if "sharpness/normalized" in h] == totals
    tables = [h["sharpness/per_layer"] for h in wandb_history if "sharpness/per_layer" in h]
    assert len(tables) == 2
    for entry, rows in zip(tables, expected):
        assert entry["_type"] == "table-file"
        with open(os.path.join(files_dir, entry["path"])) as f:
            content = json.load(f)
        assert content["columns"] == COLUMNS and _nan_as_text(content["data"]) == _nan_as_text(rows)
    wandb_images = [
        h["sharpness/normalized_per_layer"] for h in wandb_history if "sharpness/normalized_per_layer" in h
    ]
    assert len(wandb_images) == 2
    images["wandb"] = _png(os.path.join(files_dir, wandb_images[-1]["filenames"][0]))

    # --- MLflow: scalars in the tracking store, table and chart as run artifacts
    client = MlflowClient(tracking_uri=tracking_uri)
    run_id = loggers[3].run_id
    metric = sorted(client.get_metric_history(run_id, "sharpness/normalized"), key=lambda m: m.step)
    assert [m.value for m in metric] == pytest.approx(totals, rel=1e-12)
    assert len(client.get_metric_history(run_id, f"sharpness/normalized/{layers[0]}")) == 2
    tables = sorted(a.path for a in client.list_artifacts(run_id, "sharpness/per_layer"))
    assert len(tables) == 2
    with open(client.download_artifacts(run_id, tables[-1], str(tmp_path / "download"))) as f:
        table = list(csv.DictReader(f))
    got = [[r["layer"], *(float(r[c]) for c in COLUMNS[1:])] for r in table]
    assert _nan_as_text(got) == _nan_as_text(expected[-1])
    charts = sorted(a.path for a in client.list_artifacts(run_id, "sharpness/normalized_per_layer"))
    assert len(charts) == 2
    images["mlflow"] = _png(client.download_artifacts(run_id, charts[-1], str(tmp_path / "download")))

    # --- the same chart everywhere: the pixels of the last epoch's bar chart agree across backends
    reference_image = images["tensorboard"]
    assert reference_image.shape[0] > 100 and reference_image.shape[1] > 100 and reference_image.std() > 10
    for backend, image in images.items():
        assert image.shape == reference_image.shape, backend
        assert np.abs(image.astype(int) - reference_image.astype(int)).mean() < 1.0, backend


def test_per_layer_table_columns_rows_and_csv_round_trip():
    values = {
        "normalized": 5.0,
        "normalized/a.weight": 2.0,
        "normalized/b.weight": 3.0,
        "normalized_stderr/a.weight": 0.1,
        "normalized_stderr/b.weight": 1 / 3,
        "hessian_trace/a.weight": -1e-300,
        "hessian_trace/b.weight": 7.0,
    }
    table = per_layer_table(values, MEASURES)
    assert table.columns == ["layer", "normalized", "normalized_stderr", "hessian_trace"]
    assert table.rows == [["a.weight", 2.0, 0.1, -1e-300], ["b.weight", 3.0, 1 / 3, 7.0]]
    rows = list(csv.reader(io.StringIO(table.to_csv({"epoch": 4}))))
    assert rows[0] == ["epoch", *table.columns]
    assert [[r[1], *map(float, r[2:])] for r in rows[1:]] == table.rows
    assert table.to_markdown().splitlines()[2] == "| a.weight | 2 | 0.1 | -1e-300 |"
    assert per_layer_table({"normalized": 1.0}, MEASURES).rows == []


def test_logger_kind_serves_both_lightning_namespaces_and_subclasses_and_skips_unknown_loggers(tmp_path):
    import lightning.pytorch.loggers as ll
    import pytorch_lightning.loggers as pll

    class MyCSV(pll.CSVLogger):
        pass

    assert logger_kind(ll.CSVLogger(tmp_path)) == "CSVLogger"
    assert logger_kind(ll.TensorBoardLogger(tmp_path)) == "TensorBoardLogger"
    assert logger_kind(MyCSV(tmp_path)) == "CSVLogger"
    assert logger_kind(torch.nn.Module()) is None
