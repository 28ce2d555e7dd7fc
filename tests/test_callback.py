"""SharpnessMonitor inside real (tiny) Lightning runs: values, logging, early stopping, checkpointing,
invisibility to training, resume, validate/inference mode, half precision and bad inputs.

Reference values are computed independently: the full Hessian of the float64 loss in each weight
tensor by ``torch.func.hessian`` (brute force), its diagonal fed to ``sharpness_measures``.
"""

from __future__ import annotations

import logging
import math
import os
import random

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from callback_models import MLP, DataModule, assert_same_training_state, make_dataset, training_state
from oracles import brute_force_measures
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_flatness.callback import SharpnessMonitor
from lightning_flatness.functional import select_parameters


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only add contention (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trainer(tmp_path=None, **kwargs) -> pl.Trainer:
    defaults = dict(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def _subset(monitor: SharpnessMonitor, dataset: TensorDataset) -> tuple[torch.Tensor, torch.Tensor]:
    idx = monitor.state_dict()["indices"]
    return dataset.tensors[0][idx], dataset.tensors[1][idx]


def _fit(monitor=None, model=None, dm=None, seed=0, **trainer_kwargs):
    pl.seed_everything(seed, verbose=False)
    model = model or MLP()
    dm = dm or DataModule()
    trainer = _trainer(callbacks=[] if monitor is None else [monitor], **trainer_kwargs)
    trainer.fit(model, dm)
    return trainer, model, dm


# ---------------------------------------------------------------------------------------------------
# values and logging
# ---------------------------------------------------------------------------------------------------


def test_logged_values_equal_brute_force_hessian_measures_on_the_fixed_training_subset():
    monitor = SharpnessMonitor(num_samples=96, dtype="float64", batch_size=40)
    trainer, model, dm = _fit(monitor, max_epochs=2)
    assert [h["epoch"] for h in monitor.history] == [0, 1]
    assert monitor.history[-1]["method"] == "exact" and monitor.history[-1]["num_samples"] == 96
    ref = brute_force_measures(model, *_subset(monitor, dm.train_set))
    for key in (
        "normalized",
        "matrix_normalized",
        "hessian_trace",
        "normalized/net.0.weight",
        "normalized/net.4.weight",
    ):
        assert monitor.history[-1][key] == pytest.approx(ref[key], rel=1e-9)
        assert float(trainer.callback_metrics[f"sharpness/{key}"]) == pytest.approx(ref[key], rel=1e-9)
    # the subset is fixed: 96 distinct training indices, kept across epochs
    idx = monitor.state_dict()["indices"]
    assert len(set(idx.tolist())) == 96 and int(idx.max()) < len(dm.train_set)
    assert monitor.history[0]["normalized"] != monitor.history[1]["normalized"]


def test_tensorboard_event_files_hold_sharpness_once_per_epoch_per_layer_curves_layout_and_image(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    monitor = SharpnessMonitor(num_samples=64)
    trainer, model, _ = _fit(monitor, max_epochs=3, logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    values = events.Scalars("sharpness/normalized")
    assert len(values) == 3
    assert [e.value for e in values] == pytest.approx([h["normalized"] for h in monitor.history], rel=1e-6)
    steps = [e.step for e in values]
    assert steps == sorted(set(steps))  # one point per epoch, in order
    selected = select_parameters(model)
    layers = [n for n, p in selected.items() if p.ndim >= 2]
    for name in layers:
        for measure in ("normalized", "matrix_normalized", "hessian_trace"):
            assert len(events.Scalars(f"sharpness/{measure}/{name}")) == 3
    biases = [n for n, p in selected.items() if p.ndim == 1]
    assert biases and all(len(events.Scalars(f"sharpness/hessian_trace/{n}")) == 3 for n in biases)
    assert not any(f"sharpness/normalized/{n}" in scalars for n in biases)  # footnote 5: trace only
    for key in (
        "sharpness/matrix_normalized",
        "sharpness/hessian_trace",
        "sharpness/hessian_trace_weights",
        "sharpness/hessian_trace_weights_stderr",
        "sharpness/normalized_stderr",
        "sharpness/seconds",
    ):
        assert key in scalars
    charts = events.Images("sharpness/normalized_per_layer")  # default: the last measurement, at fit end
    assert [c.step for c in charts] == [monitor.history[-1]["global_step"]]
    from tensorboard.plugins.custom_scalar import layout_pb2

    (config,) = [t for t in events.Tags()["tensors"] if "custom_scalars" in t]
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors(config)[0].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for cat in layout.category for chart in cat.chart}
    assert charts["normalized per layer"] == [r"^sharpness/normalized/.+"]


@pytest.mark.parametrize(
    "every, max_epochs, charted",
    [(None, 4, [3]), (1, 3, [0, 1, 2]), (2, 4, [0, 2, 3]), (3, 4, [0, 3]), (2, 3, [0, 2])],
)
def test_bar_charts_follow_images_every_n_evaluations_and_the_last_one_comes_at_fit_end(
    tmp_path, every, max_epochs, charted
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    csv_logger = CSVLogger(tmp_path, name="csv")
    monitor = SharpnessMonitor(num_samples=32, images_every_n_evaluations=every)
    _fit(monitor, max_epochs=max_epochs, logger=[logger, csv_logger])
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    steps = [h["global_step"] for h in monitor.history]
    assert len(steps) == max_epochs
    charts = events.Images("sharpness/normalized_per_layer")
    assert [c.step for c in charts] == [steps[i] for i in charted]
    assert len(events.Tensors("sharpness/per_layer/text_summary")) == max_epochs  # tables: every time
    pngs = sorted(os.listdir(os.path.join(csv_logger.log_dir, "sharpness_per_layer")))
    assert pngs == [f"normalized_step={steps[i]:06d}.png" for i in charted]
    # the chart drawn at fit end shows the last measurement: the same pixels as when drawn right away
    if every != 1:
        again = TensorBoardLogger(tmp_path, name="again")
        monitor = SharpnessMonitor(num_samples=32, images_every_n_evaluations=1)
        _fit(monitor, max_epochs=max_epochs, logger=again)
        events_again = EventAccumulator(again.log_dir, size_guidance={"images": 0})
        events_again.Reload()
        last = events_again.Images("sharpness/normalized_per_layer")[-1]
        assert (last.step, last.encoded_image_string) == (charts[-1].step, charts[-1].encoded_image_string)


def test_csv_logger_gets_the_scalars(tmp_path):
    import csv

    logger = CSVLogger(tmp_path, name="csv")
    monitor = SharpnessMonitor(num_samples=48)
    _fit(monitor, max_epochs=2, logger=logger)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("sharpness/normalized")]
    assert [float(r["sharpness/normalized"]) for r in rows] == pytest.approx(
        [h["normalized"] for h in monitor.history], rel=1e-6
    )
    assert all(r["sharpness/normalized/net.2.weight"] for r in rows)


def test_without_logger_fills_callback_metrics_and_warns_once():
    monitor = SharpnessMonitor(num_samples=48)
    with pytest.warns(UserWarning, match="has no logger") as record:
        trainer, _, _ = _fit(monitor, max_epochs=2)
    assert sum("has no logger" in str(w.message) for w in record) == 1
    assert float(trainer.callback_metrics["sharpness/normalized"]) == monitor.history[-1]["normalized"]


def test_every_n_epochs_and_fast_dev_run_with_progress_bar(capsys):
    monitor = SharpnessMonitor(num_samples=64, every_n_epochs=2)
    _fit(monitor, max_epochs=4)
    assert [h["epoch"] for h in monitor.history] == [1, 3]
    monitor = SharpnessMonitor(num_samples=200, batch_size=24, every_n_epochs=5)
    _fit(monitor, fast_dev_run=True, enable_progress_bar=True)
    assert len(monitor.history) == 1 and monitor.history[0]["num_samples"] == 24  # one batch


def test_user_dataloader_replaces_the_training_subset():
    data = make_dataset(50, seed=7)
    monitor = SharpnessMonitor(dataloader=DataLoader(data, batch_size=20), dtype="float64")
    _, model, _ = _fit(monitor, max_epochs=1)
    ref = brute_force_measures(model, *data.tensors)
    assert monitor.history[-1]["num_samples"] == 50
    assert monitor.history[-1]["normalized"] == pytest.approx(ref["normalized"], rel=1e-9)


# ---------------------------------------------------------------------------------------------------
# early stopping and checkpointing
# ---------------------------------------------------------------------------------------------------


def test_early_stopping_on_sharpness_stops_the_run_in_the_same_epoch():
    monitor = SharpnessMonitor(num_samples=48)
    stopper = EarlyStopping(monitor="sharpness/normalized", mode="min", stopping_threshold=1e9)
    pl.seed_everything(0, verbose=False)
    model = MLP()
    trainer = _trainer(max_epochs=5, callbacks=[monitor, stopper])
    trainer.fit(model, DataModule())
    assert len(monitor.history) == 1 and trainer.current_epoch == 1  # stopped after epoch 0 of 5
    assert stopper.stopped_epoch == 0
    assert float(trainer.callback_metrics["sharpness/normalized"]) == monitor.history[0]["normalized"] < 1e9


def test_model_checkpoint_saves_the_least_sharp_epoch(tmp_path):
    monitor = SharpnessMonitor(num_samples=48)
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path,
        monitor="sharpness/normalized",
        mode="min",
        save_top_k=1,
        filename="epoch{epoch}",
        auto_insert_metric_name=False,
    )
    pl.seed_everything(0, verbose=False)
    trainer = _trainer(tmp_path, max_epochs=3, callbacks=[monitor, checkpoint], enable_checkpointing=True)
    trainer.fit(MLP(lr=0.3), DataModule())
    values = [h["normalized"] for h in monitor.history]
    best = int(np.argmin(values))
    assert float(checkpoint.best_model_score) == min(values)
    assert checkpoint.best_model_path.endswith(f"epoch{best}.ckpt")


# ---------------------------------------------------------------------------------------------------
# invisible to training
# ---------------------------------------------------------------------------------------------------


class _ConsumeRandomNumbers(Callback):
    """A careless callback: draws from the global RNG at every validation end (negative control)."""

    def on_validation_epoch_end(self, trainer, pl_module):
        torch.rand(1)


def _train_state(trainer: pl.Trainer, model: nn.Module) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for i, opt_state in enumerate(trainer.optimizers[0].state_dict()["state"].values()):
        for k, v in opt_state.items():
            state[f"opt.{i}.{k}"] = torch.as_tensor(v).clone()
    return state


@pytest.mark.parametrize(
    "model_kwargs, trainer_kwargs, data_kwargs",
    [
        (dict(), dict(), dict()),
        (dict(batchnorm=True, dropout=0.3), dict(), dict()),
        (
            dict(dropout=0.2),
            dict(accumulate_grad_batches=2, val_check_interval=3),
            dict(),
        ),  # mid-accumulation
        (
            dict(batchnorm=True, dropout=0.3),
            dict(),
            dict(augment=True),
        ),  # fetching samples draws random numbers
    ],
    ids=["mlp", "batchnorm_dropout", "mid_accumulation", "augmenting_dataset"],
)
def test_training_is_bit_identical_with_and_without_the_monitor(model_kwargs, trainer_kwargs, data_kwargs):
    runs = {}
    for name, callbacks in [("without", []), ("with", [SharpnessMonitor(num_samples=64)])]:
        pl.seed_everything(0, verbose=False)
        model = MLP(**model_kwargs)
        trainer = _trainer(max_epochs=3, callbacks=callbacks, **trainer_kwargs)
        trainer.fit(model, DataModule(**data_kwargs))
        runs[name] = _train_state(trainer, model)
        if callbacks:
            assert len(callbacks[0].history) >= 3
    assert runs["with"].keys() == runs["without"].keys()
    for key in runs["without"]:
        assert torch.equal(runs["with"][key], runs["without"][key]), key
    if model_kwargs.get("dropout") and not trainer_kwargs and not data_kwargs:
        # the comparison is sensitive: one random number drawn per validation changes the dropout masks
        pl.seed_everything(0, verbose=False)
        model = MLP(**model_kwargs)
        trainer = _trainer(max_epochs=3, callbacks=[_ConsumeRandomNumbers()])
        trainer.fit(model, DataModule())
        careless = _train_state(trainer, model)
        assert not all(torch.equal(careless[k], runs["without"][k]) for k in careless)


class _Snapshot(Callback):
    """Records (before) or compares (after) everything the monitor must leave alone."""

    def __init__(self, store: dict, compare: bool) -> None:
        self.store, self.compare = store, compare

    @staticmethod
    def _take(pl_module):
        return {
            "tensors": {k: v.clone() for k, v in pl_module.state_dict(keep_vars=False).items()},
            "grads": {n: None if p.grad is None else p.grad.clone() for n, p in pl_module.named_parameters()},
            "modes": [m.training for m in pl_module.modules()],
            "requires_grad": [p.requires_grad for p in pl_module.parameters()],
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state()[1].copy(),
            "python": random.getstate(),
            "grad_enabled": torch.is_grad_enabled(),
            "inference": torch.is_inference_mode_enabled(),
        }

    def on_validation_epoch_end(self, trainer, pl_module):
        if not self.compare:
            for p in pl_module.parameters():  # non-trivial .grad values to protect
                p.grad = torch.full_like(p, 0.25)
            pl_module.net[0].train()  # an unusual mode to protect
            self.store["before"] = self._take(pl_module)
            return
        before, after = self.store["before"], self._take(pl_module)
        for key in ("tensors", "grads"):
            for name, value in before[key].items():
                assert torch.equal(value, after[key][name]), (key, name)
        assert before["modes"] == after["modes"] and before["requires_grad"] == after["requires_grad"]
        assert torch.equal(before["torch"], after["torch"])
        assert np.array_equal(before["numpy"], after["numpy"])
        assert before["python"] == after["python"]
        assert (before["grad_enabled"], before["inference"]) == (after["grad_enabled"], after["inference"])
        self.store["checked"] = self.store.get("checked", 0) + 1


class _NetOnly(SharpnessMonitor):
    def measured_network(self, pl_module):
        return pl_module.net


@pytest.mark.parametrize("precision, dtype", [("32-true", torch.float32), ("bf16-true", torch.float64)])
def test_the_live_network_is_measured_in_eval_mode_cast_only_when_the_dtype_differs(precision, dtype):
    seen: list[tuple] = []
    recording = [False]

    class Switch(Callback):  # on around the monitor's hook only
        def __init__(self, on: bool) -> None:
            self.on = on

        def on_validation_epoch_end(self, trainer, pl_module):
            recording[0] = self.on

    def record(module, args):  # what the measured network looks like while the monitor measures
        if recording[0]:
            weight = module.weight
            seen.append((module.training, weight.dtype, weight.data_ptr(), weight.requires_grad))

    pl.seed_everything(0, verbose=False)
    model, dm = MLP(batchnorm=True, dropout=0.3), DataModule()
    first = model.net[0]
    first.register_forward_pre_hook(record)
    monitor = _NetOnly(num_samples=64, dtype=dtype)
    callbacks = [Switch(True), monitor, Switch(False)]
    _trainer(max_epochs=2, precision=precision, callbacks=callbacks).fit(model, dm)
    live = first.weight
    assert len(monitor.history) == 2 and seen
    assert {(training, d, grad) for training, d, _, grad in seen} == {(False, dtype, True)}
    same_storage = {ptr == live.data_ptr() for *_, ptr, _ in seen}
    assert same_storage == ({True} if live.dtype == dtype else {False})  # a copy only to change dtype
    assert all(m.training for m in model.modules()) and live.dtype == (
        torch.float32 if precision == "32-true" else torch.bfloat16
    )
    ref = brute_force_measures(model.net, *_subset(monitor, dm.train_set))
    assert monitor.history[-1]["normalized"] == pytest.approx(
        ref["normalized"], rel=1e-9 if dtype == torch.float64 else 1e-4
    )


@pytest.mark.parametrize("method", ["exact", "hutchinson"])
def test_monitor_leaves_weights_buffers_grads_modes_and_rng_streams_untouched(method):
    store: dict = {}
    monitor = SharpnessMonitor(num_samples=64, method=method, num_probes=4)
    callbacks = [_Snapshot(store, compare=False), monitor, _Snapshot(store, compare=True)]
    pl.seed_everything(0, verbose=False)
    trainer = _trainer(max_epochs=1, callbacks=callbacks, inference_mode=True)
    model = MLP(batchnorm=True, dropout=0.1)
    trainer.validate(model, DataModule(augment=True))  # fetching the monitor's samples draws random numbers
    assert store["checked"] == 1 and monitor.history[-1]["method"] == method


# ---------------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_from_mid_training_checkpoint_gives_the_same_values_as_an_uninterrupted_run(tmp_path):
    def run(max_epochs, ckpt_path=None, prefix="sharpness"):
        monitor = SharpnessMonitor(
            num_samples=64, method="hutchinson", num_probes=4, seed=None, prefix=prefix
        )
        checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
        pl.seed_everything(0, verbose=False)
        trainer = _trainer(
            tmp_path, max_epochs=max_epochs, callbacks=[monitor, checkpoint], enable_checkpointing=True
        )
        trainer.fit(MLP(), DataModule(shuffle=False), ckpt_path=ckpt_path)
        return monitor

    full = run(4)
    resumed = run(4, ckpt_path=str(tmp_path / "epoch=1.ckpt"))
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    for before, after in zip(full.history, resumed.history):
        for key in ("normalized", "matrix_normalized", "hessian_trace", "normalized_stderr"):
            assert before[key] == after[key], (before["epoch"], key)
    # negative control: a monitor whose state is not in the checkpoint (other state key) draws other
    # samples and probes, so the same weights give other values
    fresh = run(4, ckpt_path=str(tmp_path / "epoch=1.ckpt"), prefix="other")
    assert [h["epoch"] for h in fresh.history] == [2, 3]
    assert fresh.history[0]["normalized"] != full.history[2]["normalized"]


def test_a_resumed_choice_keeps_what_it_measures():
    """A Gauss-Newton estimator chosen for a piecewise-linear network measures its Hessian: a resumed monitor
    says so too (it used to read the quantity off the method's name, and warned "not of the Hessian");
    a checkpoint without the quantity (earlier versions) lets the dry run choose again."""
    from lightning_flatness.functional.estimators.method_choice import MethodChoice

    monitor = SharpnessMonitor(num_samples=16)
    monitor._seed, monitor._resolved_method = 3, "gauss_newton_sketch"
    monitor._choice = MethodChoice("gauss_newton_sketch", "hessian", "the network is piecewise linear")
    state = monitor.state_dict()
    resumed = SharpnessMonitor(num_samples=16)
    resumed.load_state_dict(state)
    assert resumed._choice is not None and resumed._choice.label == "gauss_newton_sketch (hessian)"
    older = SharpnessMonitor(num_samples=16)
    older.load_state_dict({k: v for k, v in state.items() if k != "quantity"})
    assert older._choice is None and older._resolved_method == "gauss_newton_sketch"


# ---------------------------------------------------------------------------------------------------
# validate, inference mode, precision
# ---------------------------------------------------------------------------------------------------


def test_validate_under_inference_mode_matches_brute_force():
    monitor = SharpnessMonitor(num_samples=80, dtype="float64")
    pl.seed_everything(0, verbose=False)
    model, dm = MLP(batchnorm=True, dropout=0.2), DataModule()
    trainer = _trainer(inference_mode=True, callbacks=[monitor])
    (results,) = trainer.validate(model, dm)
    ref = brute_force_measures(model, *_subset(monitor, dm.train_set))
    assert results["sharpness/normalized"] == pytest.approx(ref["normalized"], rel=1e-9)
    assert results["sharpness/hessian_trace"] == pytest.approx(ref["hessian_trace"], rel=1e-9)


@pytest.mark.parametrize("precision", ["16-true", "bf16-true", "bf16-mixed"])
def test_half_precision_training_is_measured_in_full_precision(precision):
    monitor = SharpnessMonitor(num_samples=64, dtype="float64")
    trainer, model, dm = _fit(monitor, max_epochs=1, precision=precision)
    if precision.endswith("true"):
        assert next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
    ref = brute_force_measures(model, *_subset(monitor, dm.train_set))  # the 16-bit weights, in float64
    assert math.isfinite(monitor.history[-1]["normalized"])
    assert monitor.history[-1]["normalized"] == pytest.approx(ref["normalized"], rel=1e-9)


# ---------------------------------------------------------------------------------------------------
# methods and models
# ---------------------------------------------------------------------------------------------------


class _Tied(MLP):
    """One hidden Linear applied twice (its weight is shared) between input and output layers."""

    def __init__(self) -> None:
        super().__init__(hidden=6)
        hidden = nn.Linear(6, 6)
        self.net = nn.Sequential(
            nn.Linear(10, 6), nn.ReLU(), hidden, nn.ReLU(), hidden, nn.ReLU(), nn.Linear(6, 3)
        )


def test_auto_measures_the_hessian_of_a_tanh_network_with_the_sketched_hessian_diagonal():
    monitor = SharpnessMonitor(num_samples=256, dtype="float64")
    pl.seed_everything(0, verbose=False)
    with pytest.warns(UserWarning, match=r"method='auto'\) measures with hessian_sketch \(hessian\)"):
        _, model, dm = _fit(monitor, model=MLP(hidden=6, activation="tanh"), max_epochs=1)
    last = monitor.history[-1]
    assert last["method"] == "hessian_sketch"
    x, y = _subset(monitor, dm.train_set)
    hessian = brute_force_measures(model, x, y)
    # a wiring check (the estimator's statistics: tests/test_estimator_hessian_sketch.py): on the same
    # samples, the value is the Hessian's up to the sketch's noise
    assert last["normalized"] == pytest.approx(hessian["normalized"], rel=0.1)
    assert last["hessian_trace"] == pytest.approx(hessian["hessian_trace"], rel=0.15)


@pytest.mark.parametrize("model_cls", [_Tied], ids=["tied"])
def test_auto_measures_the_gauss_newton_diagonal_of_non_linear_networks_and_says_so(model_cls):
    monitor = SharpnessMonitor(num_samples=64, dtype="float64")
    pl.seed_everything(0, verbose=False)
    with pytest.warns(
        UserWarning,
        match=r"method='auto'\) measures with gauss_newton \(gauss-newton\).*not of the "
        r"Hessian diagonal",
    ):
        _, model, dm = _fit(monitor, model=model_cls(), max_epochs=1)
    last = monitor.history[-1]
    assert last["method"] == "gauss_newton"
    names = [n for n, p in select_parameters(model).items() if p.ndim >= 2]
    assert sorted(k.split("/", 1)[1] for k in last if k.startswith("normalized/")) == sorted(names)
    if isinstance(model, _Tied):
        assert names == ["net.0.weight", "net.2.weight", "net.6.weight"]  # the shared weight counted once
    x, y = _subset(monitor, dm.train_set)
    ggn = brute_force_measures(model, x, y, curvature="gauss_newton")
    hessian = brute_force_measures(model, x, y)
    for measure in ("normalized", "matrix_normalized", "hessian_trace"):
        assert last[measure] == pytest.approx(ggn[measure], rel=1e-9)
    assert abs(hessian["normalized"] / ggn["normalized"] - 1) > 1e-3  # the two curvatures do differ here


@pytest.mark.parametrize("model_cls", [lambda: MLP(hidden=6, activation="tanh"), _Tied], ids=["tanh", "tied"])
def test_ggn_hutchinson_estimates_the_hessian_with_its_trace_within_error_bars(model_cls):
    monitor = SharpnessMonitor(method="ggn_hutchinson", num_samples=128, num_probes=64, dtype="float64")
    pl.seed_everything(0, verbose=False)  # the model's initialisation too, so the check is deterministic
    _, model, dm = _fit(monitor, model=model_cls(), max_epochs=1)
    last = monitor.history[-1]
    assert last["method"] == "ggn_hutchinson"
    ref = brute_force_measures(model, *_subset(monitor, dm.train_set))
    # the trace is linear in the diagonal, so Hutchinson is unbiased for it: within 4 standard errors
    assert abs(last["hessian_trace"] - ref["hessian_trace"]) < 4 * last["hessian_trace_stderr"]
    assert last["hessian_trace_stderr"] > 0
    # the control variate keeps the bias of the nonlinear measure small (measured: +1.2 +- 0.7 %)
    assert last["normalized"] == pytest.approx(ref["normalized"], rel=0.1)
    assert last["normalized_stderr"] > 0


def test_unconverged_hutchinson_is_flagged_by_the_half_shift_which_the_stderr_misses():
    """Few probes: normalized sharpness is biased upwards by the probe noise. The logged half shift
    shows it and a warning says so; the exact value lies below the estimate by more than 2 stderr."""
    # the weights alone: biases in the same probes add cross terms (measured: +115% instead of +73% here)
    monitor = SharpnessMonitor(
        num_samples=128, method="hutchinson", num_probes=1, dtype="float64", parameters="weights"
    )
    with pytest.warns(UserWarning, match="has not converged"):
        trainer, model, dm = _fit(monitor, max_epochs=1)
    last = monitor.history[-1]
    ref = brute_force_measures(model, *_subset(monitor, dm.train_set))
    assert last["normalized"] - ref["normalized"] > 2 * last["normalized_stderr"]
    assert 0 < last["normalized_half_shift"] <= last["normalized"] - ref["normalized"]
    assert "sharpness/normalized_half_shift" in trainer.callback_metrics


def test_frozen_weights_are_skipped():
    model = MLP()
    model.net[0].weight.requires_grad_(False)
    monitor = SharpnessMonitor(num_samples=64, dtype="float64")
    _, model, dm = _fit(monitor, model=model, max_epochs=1)
    layers = {k.split("/", 1)[1] for k in monitor.history[-1] if k.startswith("normalized/")}
    assert layers == {"net.2.weight", "net.4.weight"}
    ref = brute_force_measures(model, *_subset(monitor, dm.train_set))
    assert monitor.history[-1]["normalized"] == pytest.approx(ref["normalized"], rel=1e-9)


def test_state_key_is_formed_once_and_follows_the_arguments_that_form_it(monkeypatch):
    """Lightning reads ``state_key`` on every hook it dispatches (several per training step): the key is
    formed once, is the one Lightning's ``_generate_state_key`` forms from the identifying arguments, and
    is formed again after one of them is set."""
    monitor = SharpnessMonitor(num_samples=48, seed=3, dtype="float64")
    expected = pl.Callback._generate_state_key(
        monitor,
        prefix="sharpness",
        method="auto",
        num_samples=48,
        num_probes=monitor.num_probes,
        lam=monitor.lam,
        seed=3,
        dtype="float64",
    )
    assert monitor.state_key == expected
    calls = []
    original = pl.Callback._generate_state_key
    monkeypatch.setattr(
        pl.Callback, "_generate_state_key", lambda self, **kw: calls.append(kw) or original(self, **kw)
    )
    for _ in range(3):
        assert monitor.state_key == expected
    assert calls == []
    monitor.num_samples = 64
    assert monitor.state_key == expected.replace("'num_samples': 48", "'num_samples': 64")
    monitor.log_images = False  # not part of the key
    assert monitor.state_key == expected.replace("'num_samples': 48", "'num_samples': 64")
    assert len(calls) == 1


def test_two_monitors_with_different_settings_coexist_and_checkpoint_separately(tmp_path):
    a = SharpnessMonitor(num_samples=48)
    b = SharpnessMonitor(num_samples=32, method="hutchinson", num_probes=8, prefix="sharpness_hutchinson")
    assert a.state_key != b.state_key
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last")
    pl.seed_everything(0, verbose=False)
    trainer = _trainer(tmp_path, max_epochs=1, callbacks=[a, b, checkpoint], enable_checkpointing=True)
    trainer.fit(MLP(), DataModule())
    assert {"sharpness/normalized", "sharpness_hutchinson/normalized"} <= set(trainer.callback_metrics)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]
    assert saved[a.state_key]["history"][0]["method"] == "exact"
    assert saved[b.state_key]["history"][0]["method"] == "hutchinson"
    with pytest.raises(ValueError, match="same prefix"):
        trainer = _trainer(max_epochs=1, callbacks=[SharpnessMonitor(), SharpnessMonitor(num_samples=8)])
        trainer.fit(MLP(), DataModule())


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(method="newton"), ValueError, "choose 'auto'"),
        (dict(num_samples=0), ValueError, "num_samples"),
        (dict(num_samples=True), ValueError, "num_samples"),
        (dict(batch_size=-1), ValueError, "batch_size"),
        (dict(num_probes=0), ValueError, "num_probes"),
        (dict(num_replicates=0), ValueError, "num_replicates"),
        (dict(jackknife="exact"), ValueError, "jackknife"),
        (dict(lam=0.0), ValueError, "lam"),
        (dict(lam=float("nan")), ValueError, "lam"),
        (dict(every_n_epochs=0), ValueError, "every_n_epochs"),
        (dict(images_every_n_evaluations=0), ValueError, "images_every_n_evaluations"),
        (dict(images_every_n_evaluations=1.5), ValueError, "images_every_n_evaluations"),
        (dict(dtype="float16"), ValueError, "float32"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(prefix="sharpness/"), ValueError, "prefix"),
        (dict(prefix=""), ValueError, "prefix"),
        (dict(loss_fn="cross_entropy"), TypeError, "callable"),
        (dict(dataloader=3), TypeError, "iterable"),
        (dict(parameters="net.0.weight"), TypeError, "list of parameter names"),
        (dict(relative_step=0), ValueError, "relative_step"),
    ],
)
def test_invalid_arguments_are_rejected_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        SharpnessMonitor(**kwargs)


def test_jackknife_mode_reaches_the_metric(monkeypatch):
    import lightning_flatness.measure as measure_module

    seen = []
    original = measure_module.NormalizedSharpness

    def recording(*args, **kwargs):
        seen.append(kwargs.get("jackknife"))
        return original(*args, **kwargs)

    monkeypatch.setattr(measure_module, "NormalizedSharpness", recording)
    monitor = SharpnessMonitor(num_samples=32, jackknife="solved")
    _fit(monitor, max_epochs=1)
    assert seen and set(seen) == {"solved"} and len(monitor.history) == 1


def test_the_metric_state_buffer_is_reused_between_measurements_and_freed_after_fit(monkeypatch):
    """On the CPU each measurement after the first writes its metric state into the previous one's buffer
    (no fresh allocation), the values stay those of the brute force, and the buffer is dropped at the end."""
    from lightning_flatness.metric import NormalizedSharpness

    given = []
    original = NormalizedSharpness.reuse_state

    def recording(self, buffer):
        given.append(None if buffer is None else buffer.data_ptr())
        return original(self, buffer)

    monkeypatch.setattr(NormalizedSharpness, "reuse_state", recording)
    monitor = SharpnessMonitor(num_samples=48, dtype="float64", batch_size=16)
    trainer, model, dm = _fit(monitor, max_epochs=3)
    assert len(given) == 3 and given[0] is None and given[1] is not None and given[2] == given[1]
    assert monitor._state_buffer is None  # freed with the run (teardown)
    ref = brute_force_measures(model, *_subset(monitor, dm.train_set))
    assert monitor.history[-1]["normalized"] == pytest.approx(ref["normalized"], rel=1e-9)


@pytest.mark.parametrize(
    "batch_size, one_pass, largest",
    [(None, False, 8), (24, False, 24), (None, True, 96), (24, True, 24)],
    ids=["default", "explicit", "default, one pass", "explicit, one pass"],
)
def test_curvature_batches_hold_no_more_samples_than_a_training_step(
    batch_size, one_pass, largest, monkeypatch
):
    """By default the measured batches are capped at the training DataLoader's batch size (memory: the
    activations of a training step), unless the exact method's one pass, found at the dry run, bounds its
    own memory (``OnePassGroups.max_samples``: far more than 96 samples of this MLP); an explicit
    ``batch_size`` is taken as given. Values unchanged."""
    if not one_pass:
        monkeypatch.setattr(SharpnessMonitor, "_learn_one_pass", lambda *args: None)
    sizes = []
    original = SharpnessMonitor._estimate

    def recording(self, trainer, pl_module, network, inputs, target, *args, **kwargs):
        if not kwargs.get("dry_run", False) and not (args and args[0]):
            sizes.append(target.shape[0])
        return original(self, trainer, pl_module, network, inputs, target, *args, **kwargs)

    monkeypatch.setattr(SharpnessMonitor, "_estimate", recording)
    monitor = SharpnessMonitor(num_samples=96, num_replicates=2, dtype="float64", batch_size=batch_size)
    trainer, model, dm = _fit(monitor, max_epochs=1, dm=DataModule(batch_size=8))
    assert max(sizes) == largest and sum(sizes) == 96
    ref = brute_force_measures(model, *_subset(monitor, dm.train_set))
    assert monitor.history[-1]["normalized"] == pytest.approx(ref["normalized"], rel=1e-9)


def test_model_without_weight_matrices_requiring_grad_fails_at_setup_before_training():
    model = MLP()
    for layer in (model.net[0], model.net[2], model.net[4]):
        layer.weight.requires_grad_(False)  # only the biases train
    with pytest.raises(ValueError, match="SharpnessMonitor cannot measure MLP.*ndim >= 2.*parameters="):
        _fit(SharpnessMonitor(), model=model)
    assert model.training_steps == 0


class _TensorOnlyData(DataModule):
    def train_dataloader(self):
        return DataLoader(self.train_set.tensors[0], batch_size=32)  # batches without targets


class _DictData(DataModule):
    def __init__(self, keys=("x", "y")) -> None:
        super().__init__()
        self.keys = keys

    def train_dataloader(self):
        x, y = self.train_set.tensors
        rows = [{self.keys[0]: a, self.keys[1]: b} for a, b in zip(x, y)]
        return DataLoader(rows, batch_size=32, shuffle=True)


class _DictMLP(MLP):
    def training_step(self, batch, batch_idx):
        batch = tuple(batch.values()) if isinstance(batch, dict) else batch
        return super().training_step(batch, batch_idx)


class _SignalMonitor(SharpnessMonitor):
    def split_batch(self, batch):
        return batch["signal"], batch["cls"]


def test_unsplittable_batches_fail_before_training_naming_the_hook_and_dict_batches_work():
    model = MLP()
    with pytest.raises(TypeError, match="override `SharpnessMonitor.split_batch"):
        _fit(SharpnessMonitor(), model=model, dm=_TensorOnlyData())
    assert model.training_steps == 0
    with pytest.raises(ValueError, match=r"looks for one of \['inputs'"):
        _fit(SharpnessMonitor(), model=_DictMLP(), dm=_DictData(("signal", "cls")))
    monitor = SharpnessMonitor(num_samples=32, dtype="float64")
    _, model, dm = _fit(monitor, model=_DictMLP(), dm=_DictData(("x", "y")), max_epochs=1)
    custom = _SignalMonitor(num_samples=32, dtype="float64")
    _fit(custom, model=_DictMLP(), dm=_DictData(("signal", "cls")), max_epochs=1)
    ref = brute_force_measures(model, *_subset(monitor, dm.train_set))
    assert monitor.history[-1]["normalized"] == pytest.approx(ref["normalized"], rel=1e-9)
    assert custom.history[-1]["num_samples"] == 32


class _PairData(DataModule):
    """``(inputs, target)`` batches whose inputs are a dict (a tokenizer's encoding beside the labels)."""

    def train_dataloader(self):
        x, y = self.train_set.tensors
        return DataLoader([({"features": a}, b) for a, b in zip(x, y)], batch_size=32, shuffle=True)

    def val_dataloader(self):
        x, y = self.val_set.tensors
        return DataLoader([({"features": a}, b) for a, b in zip(x, y)], batch_size=32)


class _WholeDictMLP(MLP):
    """Takes the dict of a batch whole: ``forward(self, inputs)``, ``self(inputs)``."""

    def forward(self, inputs):  # type: ignore[override]
        return self.net(inputs["features"])

    def training_step(self, batch, batch_idx):
        inputs, y = batch
        self.training_steps += 1
        return F.cross_entropy(self(inputs), y)

    def validation_step(self, batch, batch_idx):
        inputs, y = batch
        self.log("val_loss", F.cross_entropy(self(inputs), y))


def test_batches_of_a_dict_and_a_target_are_measured_as_the_forward_takes_the_dict():
    monitor = SharpnessMonitor(num_samples=32, dtype="float64")
    _, model, dm = _fit(monitor, model=_WholeDictMLP(), dm=_PairData(), max_epochs=1)
    assert model.training_steps > 0 and monitor.history[-1]["method"] == "exact"
    ref = brute_force_measures(model.net, *_subset(monitor, dm.train_set))
    assert monitor.history[-1]["normalized"] == pytest.approx(ref["normalized"], rel=1e-9)


@pytest.mark.parametrize("num_samples, dataset", [(32, 256), (16, 48)])
def test_first_measurement_says_how_many_samples_bring_the_error_to_five_percent(
    num_samples, dataset, caplog
):
    """The first measurement's relative standard error and, above 5%, the samples that would bring it there:
    ``n (relative / 0.05)^2`` from the logged values, or that the training set is too small for it."""
    monitor = SharpnessMonitor(num_samples=num_samples, dtype="float64")
    with caplog.at_level(logging.INFO, logger=SharpnessMonitor._logger_name):
        _fit(monitor, dm=DataModule(num_samples=dataset), max_epochs=1)
    first = monitor.history[0]
    relative = first["normalized_stderr"] / first["normalized"]
    assert relative > 0.05  # few samples: the advice is given
    needed = math.ceil(num_samples * (relative / 0.05) ** 2)
    said = [r.getMessage() for r in caplog.records if "relative standard error" in r.getMessage()]
    assert len(said) == 1 and f"{100 * relative:.1f}%" in said[0]
    if dataset == 256:
        assert needed <= dataset and f"about {needed} would bring it to 5%, at about" in said[0]
    else:
        assert needed > dataset
        assert f"5% would take about {needed} samples, more than the {dataset} of the training set" in said[0]


def test_nan_loss_logs_nan_warns_and_training_continues():
    def nan_loss(logits, target):
        return F.cross_entropy(logits, target) * float("nan")

    monitor = SharpnessMonitor(num_samples=32, loss_fn=nan_loss)
    with pytest.warns(UserWarning, match="NaN or infinite"):
        trainer, model, _ = _fit(monitor, max_epochs=2)
    assert trainer.current_epoch == 2 and model.training_steps == 16  # both epochs trained
    assert len(monitor.history) == 2 and all(math.isnan(h["normalized"]) for h in monitor.history)
    assert math.isnan(float(trainer.callback_metrics["sharpness/normalized"]))


def test_curvature_beyond_float32_is_measured_in_float64_with_one_warning():
    """Logits of size ``1e-21`` (the head scaled, frozen by ``lr=0``): eq. 20's curvature of the biases is
    near ``1e42``, beyond float32's range. At the default dtype every batch is estimated again in float64
    (one warning per fit says so), the curve is the one a fit measured in float64 throughout logs, and the
    training run (weights, optimizer state, the global RNG) is the one without the monitor, bit for bit:
    the float64 estimate casts the live network's tensors for its duration only."""

    class TinyHead(MLP):
        def __init__(self) -> None:
            torch.manual_seed(0)
            super().__init__(lr=0.0)
            with torch.no_grad():
                self.net[-1].weight.mul_(1e-21)
                self.net[-1].bias.mul_(1e-21)

    monitor = SharpnessMonitor(num_samples=32)
    with pytest.warns(
        UserWarning, match=r"overflowed torch\.float32.*estimated in float64 instead"
    ) as caught:
        trainer, model, _ = _fit(monitor, model=TinyHead(), max_epochs=2)
        measured = training_state(model, trainer)
    assert sum("overflowed" in str(w.message) for w in caught) == 1
    trainer, model, _ = _fit(None, model=TinyHead(), max_epochs=2)
    assert_same_training_state(measured, training_state(model, trainer))
    wide = SharpnessMonitor(num_samples=32, dtype="float64")
    _fit(wide, model=TinyHead(), max_epochs=2)
    assert len(monitor.history) == len(wide.history) == 2
    for ours, theirs in zip(monitor.history, wide.history):
        assert math.isfinite(ours["normalized"]) and ours["normalized"] > 0
        assert ours["normalized"] == pytest.approx(theirs["normalized"], rel=1e-5)


def test_a_zero_initialised_head_logs_zero_and_warns_once_why():
    class ZeroHead(MLP):
        def __init__(self) -> None:
            super().__init__(lr=0.0)  # the head stays at zero
            nn.init.zeros_(self.net[-1].weight)

    monitor = SharpnessMonitor(num_samples=32)
    with pytest.warns(UserWarning, match="0 in every weight tensor") as caught:
        _fit(monitor, model=ZeroHead(), max_epochs=2)
    assert [h["normalized"] for h in monitor.history] == [0.0, 0.0]
    assert sum("0 in every weight tensor" in str(w.message) for w in caught) == 1  # once per fit


def test_empty_training_set_or_dataloader_fails_at_setup():
    model = MLP()
    with pytest.raises(ValueError, match="empty"):
        _fit(SharpnessMonitor(), model=model, dm=DataModule(num_samples=0, shuffle=False))
    empty = DataLoader(TensorDataset(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(ValueError, match="empty"):
        _fit(SharpnessMonitor(dataloader=empty), model=model)
    assert model.training_steps == 0


def test_validate_without_training_data_asks_for_a_dataloader():
    model = MLP()
    with pytest.raises(ValueError, match="dataloader="):
        _trainer(callbacks=[SharpnessMonitor()]).validate(model, datamodule=_ValOnlyData())


class _ValOnlyData(pl.LightningDataModule):
    def setup(self, stage):
        self.val_set = make_dataset(32, seed=1)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=16)


def test_num_sketches_is_passed_to_the_sketched_estimators(hessian_sketch_calls):
    with pytest.raises(ValueError, match="num_sketches=0"):
        SharpnessMonitor(num_sketches=0)
    assert SharpnessMonitor(num_sketches=2).num_sketches == 2
    monitor = SharpnessMonitor(num_samples=32, num_sketches=3, dtype="float64")
    pl.seed_everything(0, verbose=False)
    _fit(monitor, model=MLP(hidden=6, activation="tanh"), max_epochs=1)
    assert monitor.history[-1]["method"] == "hessian_sketch"
    assert hessian_sketch_calls and set(hessian_sketch_calls) == {3}
