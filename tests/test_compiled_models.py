"""Models compiled with ``torch.compile``: a measurement runs their original code eagerly, so it neither
compiles anything nor touches the training run's compile cache, and measures what the eager model does.

``backend="eager"`` keeps the tests fast: the tracing, guards and cache being tested are Dynamo's, the
same for every backend."""

from __future__ import annotations

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from callback_models import MLP, DataModule, quiet_trainer
from torch import nn
from torch._dynamo.utils import counters

from lightning_flatness import SharpnessMonitor
from lightning_flatness.functional import hessian_diagonal
from lightning_flatness.measure import measure_sharpness

pytestmark = pytest.mark.skipif(
    not hasattr(torch.compiler, "set_stance"), reason="torch.compiler.set_stance needs torch >= 2.6"
)


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _net_and_data():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    data = [(torch.randn(8, 6), torch.randint(0, 4, (8,))) for _ in range(4)]
    return net, data


@pytest.mark.parametrize("method", ["auto", "gauss_newton", "hessian_sketch", "hutchinson"])
def test_a_compiled_model_is_measured_eagerly_without_compiling(method):
    net, data = _net_and_data()
    compiled = torch.compile(net, backend="eager")
    compiled(data[0][0])  # the training run's compilation
    graphs = _graphs()
    assert graphs >= 1

    def measured(model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = torch.Generator().manual_seed(1)
            return measure_sharpness(model, data, method=method, num_replicates=4, generator=g)

    eager, on_compiled = measured(net), measured(compiled)
    assert _graphs() == graphs  # nothing traced or compiled by the measurement
    assert on_compiled.choice == eager.choice
    for key in ("normalized", "matrix_normalized", "hessian_trace", "normalized_stderr"):
        assert float(eager[key]) != 0 and math.isclose(
            float(on_compiled[key]), float(eager[key]), rel_tol=1e-12
        )
    est = hessian_diagonal(compiled, F.cross_entropy, *data[0], method="gauss_newton")
    ref = hessian_diagonal(net, F.cross_entropy, *data[0], method="gauss_newton")
    # the compiled wrapper names its parameters "_orig_mod.<name>", as its own named_parameters() does
    assert est.keys() == {f"_orig_mod.{n}" for n in ref}
    assert _graphs() == graphs and all(torch.equal(est[f"_orig_mod.{n}"], ref[n]) for n in ref)
    compiled(data[1][0])  # training goes on with its compiled code: no recompilation
    assert _graphs() == graphs


class _TracedMLP(MLP):
    """The MLP with steps that Dynamo traces in one graph each (no Python counter, no logging), so that
    every compiled graph of a fit comes from its training and validation."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


def test_monitor_on_a_compiled_lightning_module_leaves_its_compilation_alone():
    def fit(compile_model: bool, monitor: bool):
        torch._dynamo.reset()
        graphs = _graphs()  # the counters are cumulative over the process
        pl.seed_everything(0, verbose=False)
        model = _TracedMLP()
        callbacks = [SharpnessMonitor(num_samples=32)] if monitor else []
        run = torch.compile(model, backend="eager") if compile_model else model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quiet_trainer(callbacks, max_epochs=2).fit(run, DataModule())
        return model, callbacks, _graphs() - graphs

    _, _, graphs_alone = fit(True, monitor=False)
    model, (monitor,), graphs_monitored = fit(True, monitor=True)
    _, (eager_monitor,), _ = fit(False, monitor=True)
    assert graphs_alone >= 1 and graphs_monitored == graphs_alone  # the measurements compiled nothing
    assert len(monitor.history) == len(eager_monitor.history) == 2
    for compiled_row, eager_row in zip(monitor.history, eager_monitor.history):
        assert math.isclose(compiled_row["normalized"], eager_row["normalized"], rel_tol=1e-5)
