"""Overhead of ``SharpnessMonitor`` at its defaults on Lightning training runs.

Two settings, each timed with and without the callback (same seeds, interleaved repeats, medians):

1. *Quickstart*: the paper's MLP on MNIST-1D (4000 training samples, batch 128, Adam 1e-3, 32 steps
   per epoch), ``--quickstart-epochs`` epochs (default 20, as ``examples/quickstart.py``), validation
   on the 1000 test samples every epoch; the monitor (defaults: ``method="auto"`` -> exact, 512
   samples, batches of 128, 8 replicate groups, every epoch, TensorBoard scalars and bar-chart
   images) measures after every validation.
2. *CIFAR-sized epoch*: one epoch of 390 steps of batch 128 (the MNIST-1D training set repeated to
   49,920 samples, as many steps as CIFAR-10 at batch 128) for the MLP, the LeNet-style CNN and the
   small ResNet of ``common.py``; one validation and one evaluation of the monitor at its end.
   This is *measured*; what is *extrapolated* is the transfer to CIFAR-10 models, through the cost
   of one evaluation in training-step equivalents (see RESULTS.md).

Reported: wall time with/without, overhead in %, the seconds of one evaluation (``history``) and
that in training steps (training time without the callback / steps), and the reported standard
error of the total (``normalized_stderr / normalized``) against the 5% target.

    python -m benchmarks.bench_callback --json benchmarks/results_callback.json
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F

from benchmarks.common import (
    MODELS,
    base_parser,
    build_model,
    markdown_table,
    mnist1d,
    model_inputs,
    run_timed,
    setup,
)

CIFAR_STEPS = 390
BATCH = 128


def _lightning():
    import pytorch_lightning as pl

    for name in list(logging.root.manager.loggerDict):  # keep the tables readable
        if name.startswith(("pytorch_lightning", "lightning")):
            logging.getLogger(name).setLevel(logging.ERROR)
    return pl


def make_module(name: str, seed: int):
    pl = _lightning()

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            self.net = build_model(name)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    return Classifier()


def loaders(name: str, steps: Optional[int], seed: int):
    """Training loader (``steps`` batches of 128 by repeating the training set; None: the set as is)
    and validation loader (the 1000 test samples, one batch)."""
    from torch.utils.data import DataLoader, TensorDataset

    data = mnist1d()
    x, y = model_inputs(name, data.x_train), data.y_train
    if steps is not None:
        reps = -(-steps * BATCH // len(x))
        x = x.repeat(reps, *([1] * (x.ndim - 1)))[: steps * BATCH]
        y = y.repeat(reps)[: steps * BATCH]
    gen = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True, generator=gen)
    val = DataLoader(TensorDataset(model_inputs(name, data.x_test), data.y_test), batch_size=1000)
    return train, val


def fit(
    name: str, epochs: int, steps: Optional[int], monitor: Optional[dict[str, Any]], seed: int, logdir: str
) -> dict[str, Any]:
    """One ``trainer.fit`` from a fresh model; returns its wall time and the monitor's history."""
    pl = _lightning()
    from pytorch_lightning.loggers import TensorBoardLogger

    from lightning_flatness import SharpnessMonitor

    module = make_module(name, seed)
    train, val = loaders(name, steps, seed)
    callbacks = [SharpnessMonitor(**monitor)] if monitor is not None else []
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=TensorBoardLogger(logdir, name=f"{name}_{monitor is not None}"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(module, train, val)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    history = callbacks[0].history if monitor is not None else []
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "steps": trainer.global_step, "history": history}


def compare(
    name: str,
    epochs: int,
    steps: Optional[int],
    repeats: int,
    seed: int,
    logdir: str,
    monitor: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Interleaved with/without runs; medians, overhead, cost of one evaluation. ``monitor``: the
    callback's arguments (default: none, i.e. its defaults)."""
    monitor = dict(monitor or {})
    fit(name, 1, 4, monitor, seed, logdir)  # warm-up: imports, first-call costs of both code paths
    without, with_, histories = [], [], []
    cpu_without, cpu_with = [], []
    for _ in range(repeats):
        base = fit(name, epochs, steps, None, seed, logdir)
        without.append(base["seconds"])
        cpu_without.append(base["cpu_seconds"])
        run = fit(name, epochs, steps, monitor, seed, logdir)
        with_.append(run["seconds"])
        cpu_with.append(run["cpu_seconds"])
        histories.append(run["history"])
        total_steps = run["steps"]
    t0, t1 = statistics.median(without), statistics.median(with_)
    evals = [h["seconds"] for hist in histories for h in hist]
    last = histories[-1][-1]
    step_seconds = t0 / total_steps  # training step incl. Lightning's and the validation's share
    eval_seconds = statistics.median(evals)
    # everything the callback adds (setup, dry run, subset loading, logging, images), per evaluation
    per_eval = (t1 - t0) / len(histories[-1])
    rel_stderr = [h["normalized_stderr"] / h["normalized"] for h in histories[-1]]
    return {
        "model": name,
        "monitor": ", ".join(f"{k}={v!r}" for k, v in monitor.items()) or "defaults",
        "epochs": epochs,
        "steps": total_steps,
        "evaluations": len(histories[-1]),
        "seconds_without": t0,
        "seconds_with": t1,
        "overhead": t1 / t0 - 1,
        # process CPU time (one process, one intra-op thread, no loader workers): less exposed to the
        # other jobs of a shared machine than wall time
        "cpu_seconds_without": statistics.median(cpu_without),
        "cpu_seconds_with": statistics.median(cpu_with),
        "overhead_cpu": statistics.median(cpu_with) / statistics.median(cpu_without) - 1,
        "eval_seconds": eval_seconds,
        "eval_in_steps": eval_seconds / step_seconds,
        "added_seconds_per_eval": per_eval,
        "added_in_steps": per_eval / step_seconds,
        "step_ms": 1e3 * step_seconds,
        "method": last.get("method"),
        "normalized": last["normalized"],
        "rel_stderr_last": rel_stderr[-1],
        "rel_stderr_max": max(rel_stderr),
        "all_without": without,
        "all_with": with_,
        "all_cpu_without": cpu_without,
        "all_cpu_with": cpu_with,
    }


def breakdown(name: str, repeats: int) -> dict[str, Any]:
    """Time of the pieces of one default evaluation outside Lightning: the exact Hessian diagonals of
    512 samples in 8 groups (``estimate``), the metric's update + compute (eq. 17 solved on the pooled
    and 8 leave-one-out diagonals: ``compute``), the float32 deep copy of the network (``copy``), and
    one plain training step (forward, backward, Adam) on a batch of 128 for scale."""
    import copy

    from benchmarks.common import time_call, weight_parameters
    from lightning_flatness.functional import hessian_diagonal_groups, normalized_softmax_cross_entropy
    from lightning_flatness.metric import NormalizedSharpness

    torch.manual_seed(0)
    model = build_model(name).eval()
    data = mnist1d()
    x, y = model_inputs(name, data.x_train[:512]), data.y_train[:512]
    weights = {n: p.detach() for n, p in weight_parameters(model).items()}

    def estimate():
        return hessian_diagonal_groups(
            model, normalized_softmax_cross_entropy, x, y, method="exact", num_groups=8
        )

    est = estimate()

    def compute():
        metric = NormalizedSharpness(weights, num_replicates=8)
        metric.update_from_estimate(est, weights)
        return metric.compute()

    train_model = build_model(name)
    optimizer = torch.optim.Adam(train_model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad()
        F.cross_entropy(train_model(x[:BATCH]), y[:BATCH]).backward()
        optimizer.step()

    reps = max(3, repeats)
    return {
        "model": name,
        "estimate_ms": 1e3 * time_call(estimate, repeats=reps)["median"],
        "compute_ms": 1e3 * time_call(compute, repeats=reps)["median"],
        "copy_ms": 1e3 * time_call(lambda: copy.deepcopy(model).float(), repeats=reps)["median"],
        "train_step_ms": 1e3 * time_call(step, repeats=10 * reps)["median"],
    }


def run(args) -> dict[str, Any]:
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*number of training batches.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    quick = args.quick
    repeats = 1 if quick else args.repeats
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as logdir:
        qs_epochs = 2 if quick else args.quickstart_epochs
        quickstart = compare("mlp", qs_epochs, None, repeats, args.seed, logdir)
        results["quickstart"] = quickstart
        models = args.models or (["mlp"] if quick else list(MODELS))
        steps = 40 if quick else CIFAR_STEPS
        results["cifar_epoch"] = [compare(m, 1, steps, repeats, args.seed, logdir) for m in models]
        knobs = [
            ("mlp", {"log_images": False}),
            ("mlp", {"num_samples": 1024}),
            ("mlp", {"method": "hutchinson"}),
            ("mlp", {"num_samples": 256}),
            ("resnet", {"num_samples": 256}),
            ("resnet", {"log_images": False}),
        ]
        if quick:
            knobs = []
        results["knobs"] = [
            compare(m, 1, steps, repeats, args.seed, logdir, k) for m, k in knobs if m in models
        ]
        results["breakdown"] = [breakdown(m, repeats) for m in models]
    cols = [
        "model",
        "monitor",
        "epochs",
        "steps",
        "evaluations",
        "method",
        "seconds_without",
        "seconds_with",
        "overhead",
        "step_ms",
        "eval_seconds",
        "eval_in_steps",
        "added_seconds_per_eval",
        "added_in_steps",
        "rel_stderr_last",
        "rel_stderr_max",
    ]
    fmt = {
        "added_seconds_per_eval": ".3g",
        "added_in_steps": ".3g",
        "seconds_without": ".3g",
        "seconds_with": ".3g",
        "overhead": ".1%",
        "eval_seconds": ".3g",
        "step_ms": ".3g",
        "eval_in_steps": ".3g",
        "rel_stderr_last": ".2%",
        "rel_stderr_max": ".2%",
    }
    print(
        f"\n### quickstart: MLP on MNIST-1D, {qs_epochs} epochs of 32 steps, monitor every epoch "
        f"(medians of {repeats} interleaved repeats)\n"
    )
    print(markdown_table([quickstart], cols, fmt))
    print(f"\n### one epoch of {steps} steps of batch {BATCH}, one evaluation at its end\n")
    print(markdown_table(results["cifar_epoch"], cols, fmt))
    for row in results["cifar_epoch"]:
        # the cost of one evaluation does not depend on the epoch's length: it is a fraction
        # eval_in_steps / steps of an epoch of `steps` steps
        row["fraction_of_390_step_epoch"] = row["added_in_steps"] / CIFAR_STEPS
        row["target_10pct_met"] = row["fraction_of_390_step_epoch"] <= 0.10
        row["stderr_5pct_met"] = row["rel_stderr_last"] <= 0.05
        row["num_samples_for_5pct"] = int(512 * max(1.0, (row["rel_stderr_last"] / 0.05) ** 2))
    print(f"\n### knobs: one epoch of {steps} steps\n")
    print(markdown_table(results["knobs"], cols, fmt))
    print(
        "\n### where one evaluation's time goes (outside Lightning; random-init model, 512 samples, "
        "8 groups)\n"
    )
    print(
        markdown_table(
            results["breakdown"],
            ["model", "estimate_ms", "compute_ms", "copy_ms", "train_step_ms"],
            {"estimate_ms": ".3g", "compute_ms": ".3g", "copy_ms": ".3g", "train_step_ms": ".3g"},
        )
    )
    print(
        f"\n### targets: one evaluation <= 10% of a {CIFAR_STEPS}-step epoch; standard error of the "
        f"total <= 5%\n"
    )
    print(
        markdown_table(
            results["cifar_epoch"],
            [
                "model",
                "added_in_steps",
                "fraction_of_390_step_epoch",
                "target_10pct_met",
                "rel_stderr_last",
                "stderr_5pct_met",
                "num_samples_for_5pct",
            ],
            {"added_in_steps": ".3g", "fraction_of_390_step_epoch": ".1%", "rel_stderr_last": ".2%"},
        )
    )
    return results


def main(argv=None) -> dict[str, Any]:
    parser = base_parser(__doc__)
    parser.add_argument("--models", nargs="*", choices=MODELS, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quickstart-epochs", type=int, default=20)
    args = parser.parse_args(argv)
    setup(args)
    return run_timed(run, args)


if __name__ == "__main__":
    main()
