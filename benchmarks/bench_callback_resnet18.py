"""Cost of one ``SharpnessMonitor`` measurement at its defaults on a CIFAR-size ResNet-18, and the
callback's overhead on the paper's MLP (issue 8 target 3, issue 9 target 3).

1. **ResNet-18** (``torchvision.models.resnet18(num_classes=K)``, K = 10 and 1,000, random weights,
   inputs ``(128, 3, 32, 32)`` of random data, one thread). Timed round-robin, medians over
   ``--repeats``:
   - *one training step*: forward, cross-entropy, backward and an SGD (momentum 0.9) step of the
     train-mode float32 model at batch 128;
   - *one measurement* as the callback does it: an eval-mode float32 copy of the network
     (``copy.deepcopy(model).float().eval()``), then :class:`SharpnessMeasurement` with every default
     (``method="auto"``, eq. 20 loss, 8 replicate slots) fed the callback's batches:
     ``chunk_sizes(512, 128, 8)`` = 8 batches of 64 for the default 512 samples, then ``compute()``;
     peak resident memory sampled by :class:`PeakMemory` (what the callback logs as
     ``peak_memory_mb``). With ``--batches B`` below 8 only B of the 8 batches are estimated and the
     estimator time is scaled by 8 / B (a sum of independent per-batch costs on equal batches);
     ``compute()`` still solves 8 filled replicate slots (the other slots recycle the measured
     estimates), so its cost is of the right size but its standard error is not reported.
   Reported: method auto chose, seconds, the same in training steps and as a % of a 390-step epoch,
   the ratio 1000/10, and (all 8 batches only) ``normalized_stderr / normalized``.
2. **Confirmation inside Lightning**: one ``trainer.fit`` of ResNet-18 (K = 10) with
   ``SharpnessMonitor()`` at its defaults (``num_samples=512``), ``--fit-steps`` training steps of
   batch 128 on random data, one validation batch; ``history`` gives the measurement's seconds and
   ``peak_memory_mb``.
3. **The paper's MLP on MNIST-1D** (``benchmarks.bench_callback.compare``): 3 epochs of 390 steps
   of batch 128 (Adam), with and without ``SharpnessMonitor()`` at its defaults (TensorBoard logger,
   images on), interleaved, medians over ``--mlp-repeats``.

Run: ``python -m benchmarks.bench_callback_resnet18 --json benchmarks/results/bench_callback_resnet18.json``
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import base_parser, environment, run_timed, setup

EPOCH_STEPS = 390
BATCH = 128


def resnet18(num_classes: int):
    import torchvision

    return torchvision.models.resnet18(num_classes=num_classes)


def data(n: int, num_classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def measurement(model, x, y, sizes, measured_batches, state_buffer=None):
    """What the callback does per measurement: float32 eval copy, one SharpnessMeasurement, the batches
    (``sizes``), ``compute()``. With ``measured_batches < len(sizes)`` only the first batches are
    estimated, and the remaining replicate slots are filled with those estimates again (a proxy that
    gives ``compute()`` eight slots of realistic curvature to solve; its standard error is then not
    meaningful and is not reported). ``state_buffer``: the previous measurement's metric state, reused
    as the callback does from its second measurement on (None: a fresh one); the result's
    ``"state_buffer"`` is this measurement's, for the next."""
    from lightning_flatness.measure import SharpnessMeasurement
    from lightning_flatness.memory import PeakMemory

    t0 = time.perf_counter()
    with PeakMemory(torch.device("cpu")) as peak:
        net = copy.deepcopy(model).float().eval()
        m = SharpnessMeasurement(net, generator=torch.Generator().manual_seed(0))
        m.metric.reuse_state(state_buffer)
        t_setup = time.perf_counter() - t0
        start, estimates = 0, []
        t_est = time.perf_counter()
        for s in sizes[:measured_batches]:
            est = m.estimate(x[start : start + s], y[start : start + s])
            m.metric.update(est, m.weights)
            estimates.append(est)
            start += s
        t_est = time.perf_counter() - t_est
        for i in range(measured_batches, len(sizes)):
            m.metric.update(estimates[i % measured_batches], m.weights)
        t_cmp = time.perf_counter()
        values = m.compute()
        t_cmp = time.perf_counter() - t_cmp
    seconds = time.perf_counter() - t0
    full = measured_batches >= len(sizes)
    return {
        "state_buffer": m.metric.release_state(),
        "reused_state": state_buffer is not None,
        "seconds": seconds,
        "setup_seconds": t_setup,
        "estimate_seconds": t_est,
        "compute_seconds": t_cmp,
        "method": m.choice.method,
        "quantity": m.choice.quantity,
        "normalized": float(values["normalized"]),
        "normalized_stderr": float(values["normalized_stderr"]) if full else float("nan"),
        "peak_memory_mb": peak.rss_mb,
    }


def resnet_cost(args) -> dict[str, Any]:
    from lightning_flatness.training_subset import chunk_sizes

    sizes = chunk_sizes(512, BATCH, 8)  # the callback's batches at its defaults: 8 x 64
    models, steps, opts = {}, {}, {}
    for k in args.classes:
        torch.manual_seed(args.seed)
        models[k] = resnet18(k)
        xb, yb = data(BATCH, k, args.seed)
        train_model = copy.deepcopy(models[k]).train()
        opts[k] = torch.optim.SGD(train_model.parameters(), lr=0.01, momentum=0.9)

        def step(train_model=train_model, opt=opts[k], xb=xb, yb=yb):
            opt.zero_grad()
            F.cross_entropy(train_model(xb), yb).backward()
            opt.step()

        steps[k] = step
    xs = {k: data(512, k, args.seed + 1) for k in args.classes}
    for k in args.classes:  # warm-up
        steps[k]()
    step_times = {k: [] for k in args.classes}
    meas = {k: [] for k in args.classes}
    loads = []
    buffers: dict[int, Any] = {k: None for k in args.classes}
    if not args.fresh_state:  # steady state, as from the callback's second measurement on: a warm-up
        for k in args.classes:  # measurement per K leaves the state buffer that the timed ones reuse
            buffers[k] = measurement(models[k], *xs[k], sizes, 1)["state_buffer"]
    for r in range(args.repeats):
        for k in args.classes:
            loads.append(os.getloadavg()[0])
            for _ in range(args.step_repeats):
                t0 = time.perf_counter()
                steps[k]()
                step_times[k].append(time.perf_counter() - t0)
            res = measurement(models[k], *xs[k], sizes, args.batches, buffers[k])
            buffers[k] = None if args.fresh_state else res.pop("state_buffer")
            res.pop("state_buffer", None)
            meas[k].append(res)
            print(
                f"repeat {r} K={k}: step {statistics.median(step_times[k][-args.step_repeats :]):.3f}s "
                f"measurement {res['seconds']:.1f}s ({res['method']}, "
                f"estimate {res['estimate_seconds']:.1f}s, "
                f"compute {res['compute_seconds']:.2f}s) NS {res['normalized']:.4g} "
                f"+- {res['normalized_stderr']:.3g} "
                f"peak {res['peak_memory_mb']:.0f} MB load {loads[-1]:.2f}",
                flush=True,
            )
    out: dict[str, Any] = {
        "batches_measured": args.batches,
        "batch_sizes": sizes,
        "state": "fresh" if args.fresh_state else "reused",
        "per_classes": {},
    }
    scale = len(sizes) / args.batches
    for k in args.classes:
        step = statistics.median(step_times[k])
        est = statistics.median(r["estimate_seconds"] for r in meas[k])
        cmp_ = statistics.median(r["compute_seconds"] for r in meas[k])
        setup_ = statistics.median(r["setup_seconds"] for r in meas[k])
        at512 = setup_ + scale * est + cmp_  # the estimator is a sum of independent per-batch costs
        out["per_classes"][k] = {
            "method": meas[k][0]["method"],
            "quantity": meas[k][0]["quantity"],
            "step_seconds": step,
            "setup_seconds": setup_,
            "estimate_seconds_measured": est,
            "estimate_seconds_at_512": scale * est,
            "compute_seconds": cmp_,
            "measurement_seconds_at_512": at512,
            "steps_per_measurement_at_512": at512 / step,
            "epoch_percent_at_512": 100 * at512 / (EPOCH_STEPS * step),
            "rel_stderr": statistics.median(r["normalized_stderr"] / r["normalized"] for r in meas[k]),
            "peak_memory_mb": max(r["peak_memory_mb"] for r in meas[k]),
            "runs": meas[k],
            "all_step_seconds": step_times[k],
        }
    if len(args.classes) == 2:
        a, b = sorted(args.classes)
        out["ratio_seconds"] = (
            out["per_classes"][b]["measurement_seconds_at_512"]
            / out["per_classes"][a]["measurement_seconds_at_512"]
        )
        out["ratio_steps"] = (
            out["per_classes"][b]["steps_per_measurement_at_512"]
            / out["per_classes"][a]["steps_per_measurement_at_512"]
        )
    out["loadavg_1min"] = loads
    return out


def lightning_fit(args) -> dict[str, Any]:
    """One fit of ResNet-18 (K=10) with SharpnessMonitor() at its defaults, ``--fit-steps`` steps."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_flatness import SharpnessMonitor

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(args.seed)
            self.net = resnet18(10)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            return F.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, _):
            self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    x, y = data(max(512, args.fit_steps * BATCH), 10, args.seed + 2)
    train = DataLoader(
        TensorDataset(x, y), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    val = DataLoader(TensorDataset(x[:BATCH], y[:BATCH]), batch_size=BATCH)
    monitor = SharpnessMonitor()
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=args.fit_steps,
        accelerator="cpu",
        devices=1,
        callbacks=[monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    trainer.fit(Lit(), train, val)
    seconds = time.perf_counter() - t0
    h = monitor.history[-1]
    out = {
        "fit_seconds": seconds,
        "steps": trainer.global_step,
        "method": h.get("method"),
        "measurement_seconds": h["seconds"],
        "peak_memory_mb": h.get("peak_memory_mb"),
        "normalized": h["normalized"],
        "rel_stderr": h["normalized_stderr"] / h["normalized"],
        "num_samples": h.get("num_samples"),
        "loadavg_1min": load,
    }
    print(f"Lightning fit: {out}", flush=True)
    return out


def mlp_overhead(args) -> dict[str, Any]:
    from benchmarks.bench_callback import compare

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as logdir:
        res = compare("mlp", 3, EPOCH_STEPS, args.mlp_repeats, args.seed, logdir)
    res["loadavg_1min"] = [load, os.getloadavg()[0]]
    print(
        f"MLP 3x390 steps: without {res['seconds_without']:.2f}s with {res['seconds_with']:.2f}s overhead "
        f"{res['overhead']:.1%} (process CPU time: {res['overhead_cpu']:.1%}) rel s.e. "
        f"{res['rel_stderr_last']:.2%}",
        flush=True,
    )
    return res


def run(args) -> dict[str, Any]:
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*number of training batches.*")
    out: dict[str, Any] = {"command": args.command, "threads": args.threads}
    if "resnet" in args.parts:
        out["resnet18"] = resnet_cost(args)
    if "fit" in args.parts:
        out["lightning_fit"] = lightning_fit(args)
    if "mlp" in args.parts:
        out["mlp"] = mlp_overhead(args)
    return out


def markdown(results: dict[str, Any]) -> str:
    env = results.get("environment", environment())
    lines = [
        "# One SharpnessMonitor measurement at its defaults: CIFAR-size ResNet-18 and the paper's MLP",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {env.get('cpu', '?')}, nproc {env.get('nproc', '?')}, {results['threads']} thread(s), "
        f"torch {env.get('torch', '?')}; total {results.get('seconds', 0):.0f} s.",
        "",
    ]
    r = results.get("resnet18")
    if r:
        lines += [
            f"## ResNet-18, 3x32x32, batch 128 (the callback's batches {r['batch_sizes']}; "
            f"{r['batches_measured']} of them estimated, time scaled linearly to all of them; "
            "compute() on 8 slots, the unmeasured ones recycled from the measured batches)",
            "",
            "Metric state: "
            + (
                "freshly allocated for every measurement (`--fresh-state`, the callback's first measurement)."
                if r.get("state") == "fresh"
                else "the previous measurement's buffer reused, as the callback does from its second "
                "measurement on (one untimed warm-up measurement per class count)."
            ),
            "",
            "1-minute load averages during the run: "
            f"{min(r['loadavg_1min']):.2f}-{max(r['loadavg_1min']):.2f}.",
            "",
            "| classes | auto chose | training step (s) | measurement (s, at 512) | of which estimator "
            "| of which "
            "compute() | in steps | % of 390-step epoch | s.e. / value | peak RSS of the process (MB) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for k, e in r["per_classes"].items():
            lines.append(
                f"| {k} | {e['method']} ({e['quantity']}) | {e['step_seconds']:.3f} | "
                f"{e['measurement_seconds_at_512']:.1f} | {e['estimate_seconds_at_512']:.1f} | "
                f"{e['compute_seconds']:.2f} | {e['steps_per_measurement_at_512']:.1f} | "
                f"{e['epoch_percent_at_512']:.1f}% | {e['rel_stderr']:.1%} | {e['peak_memory_mb']:.0f} |"
            )
        lines += [
            "",
            "Peak RSS is the process's whole resident set (sampled by PeakMemory, as the callback logs "
            "it), which includes both models and keeps growing over repeats as the allocator keeps freed "
            "memory; run with MALLOC_MMAP_THRESHOLD_=65536 for a figure that follows the live tensors.",
        ]
        if "ratio_seconds" in r:
            lines += [
                "",
                f"Ratio 1000 / 10 classes: {r['ratio_seconds']:.2f}x in seconds, "
                f"{r['ratio_steps']:.2f}x in training steps of each model.",
            ]
    f = results.get("lightning_fit")
    if f:
        lines += [
            "",
            "## Inside Lightning (ResNet-18, 10 classes, SharpnessMonitor() defaults)",
            "",
            f"{f['steps']} training steps + one measurement: fit {f['fit_seconds']:.1f} s; the measurement "
            f"({f['method']}, {f['num_samples']:.0f} samples) {f['measurement_seconds']:.1f} s, peak memory "
            f"{f['peak_memory_mb']:.0f} MB, s.e./value {f['rel_stderr']:.1%} (load {f['loadavg_1min']:.2f}).",
        ]
    m = results.get("mlp")
    if m:
        lines += [
            "",
            "## Paper's MLP on MNIST-1D, 3 epochs of 390 steps of batch 128, interleaved",
            "",
            f"without {m['seconds_without']:.2f} s, with SharpnessMonitor() {m['seconds_with']:.2f} s "
            f"(medians of {len(m['all_with'])}): overhead **{m['overhead']:.1%}** (in process CPU time "
            f"{m['overhead_cpu']:.1%}); one measurement "
            f"{m['eval_seconds']:.3f} s = {m['eval_in_steps']:.1f} steps; method {m['method']}; s.e./value "
            f"{m['rel_stderr_last']:.1%} (last), {m['rel_stderr_max']:.1%} (max); loads "
            f"{m['loadavg_1min'][0]:.2f}-{m['loadavg_1min'][1]:.2f}.",
            "",
            f"All without: {[round(v, 2) for v in m['all_without']]}; all with: "
            f"{[round(v, 2) for v in m['all_with']]}.",
        ]
    return "\n".join(lines) + "\n"


def rewrite_markdown(json_path: str) -> None:
    """Regenerate the markdown beside a results JSON (after changing :func:`markdown`)."""
    import json

    results = json.loads(Path(json_path).read_text())
    Path(json_path).with_suffix(".md").write_text(markdown(results))


def main(argv=None) -> dict[str, Any]:
    parser = base_parser(__doc__)
    parser.add_argument(
        "--parts", nargs="*", default=["resnet", "fit", "mlp"], choices=["resnet", "fit", "mlp"]
    )
    parser.add_argument("--classes", nargs="*", type=int, default=[10, 1000])
    parser.add_argument("--batches", type=int, default=8, help="how many of the 8 batches of 64 to estimate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--fresh-state",
        action="store_true",
        help="give every measurement a freshly allocated metric state (the callback's first measurement; "
        "default: the steady state, reusing the previous measurement's buffer as the callback does)",
    )
    parser.add_argument("--step-repeats", type=int, default=3)
    parser.add_argument("--fit-steps", type=int, default=4)
    parser.add_argument("--mlp-repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.repeats, args.step_repeats, args.fit_steps, args.mlp_repeats = 1, 1, 1, 1, 1
        args.parts, args.classes = ["resnet"], [10]  # the fit measures the default 512 samples: not quick
    args.command = "python -m benchmarks.bench_callback_resnet18 " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    setup(args)
    results = run_timed(run, args)
    if args.json:
        results["environment"] = environment()
        Path(args.json).with_name(Path(args.json).stem + ".md").write_text(markdown(results))
    return results


if __name__ == "__main__":
    main()
