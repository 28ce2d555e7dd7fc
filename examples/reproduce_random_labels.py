"""Reproduce Sec. 6.1/6.2 of Tsuzuku et al. (2020) on a CPU: sharpness vs generalization gap under random
labels, before and after a function-preserving rescaling attack.

Setup (Appendix E.1, scaled down): the paper's MLP (40 -> 100 -> 100 -> 100 -> 10, ReLU) and a LeNet-style
1-D CNN on MNIST-1D (4000 train / 1000 test), a fraction ``r`` in {0.0, 0.1, ..., 1.0} of the training labels
replaced by uniformly random classes, Adam (lr 1e-3), batch 128, cross-entropy, no regularization or
augmentation, trained until the accuracy on the (noisy) training labels reaches ``--target-acc`` or
``--max-epochs`` pass.

For every trained model, through the library's public API (``hessian_diagonal_groups`` + the
``NormalizedSharpness`` metric, the code path of ``SharpnessMonitor``), in float64 with the exact Hessian
diagonal on a fixed subset of the training set with the labels the model was trained on:

- normalized sharpness (eq. 17) and matrix-normalized sharpness (eq. 13) with the normalized-softmax
  cross-entropy (eq. 20-22),
- the Hessian trace (eq. 5) with cross-entropy (Sec. 6.2),
- the generalization gap: accuracy on the noisy training labels minus test accuracy;

then the same measures after a random function-preserving rescaling (Dinh et al. layer scaling, then
Sec. 5.1 row/column scaling of every hidden unit and channel, log10 factors uniform in
``--log10-range``).

Outputs in ``--out``: ``results.csv`` (one row per model, before/after columns), ``results.md``
(setup, machine, runtime, Pearson/Spearman/Kendall correlations with the gap before and after),
``scatter_before.png`` and ``scatter_after.png`` (measure min-max rescaled to [0, 1] vs gap).

Usage::

    python examples/reproduce_random_labels.py --out docs/reproduction          # full run
    python examples/reproduce_random_labels.py --quick --out /tmp/repro        # seconds, smoke test
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_flatness.datasets import ClassificationData, make_mnist1d, randomize_labels
from lightning_flatness.functional import (
    hessian_diagonal_groups,
    normalized_softmax_cross_entropy,
    select_parameters,
)
from lightning_flatness.metric import NormalizedSharpness
from lightning_flatness.reference_models import lenet1d, mlp
from lightning_flatness.rescaling import random_function_preserving_rescaling

ARCHITECTURES = {"mlp": mlp, "lenet1d": lenet1d}
MEASURES = ("normalized", "matrix_normalized", "hessian_trace")
LABELS = {
    "normalized": "normalized sharpness (eq. 17)",
    "matrix_normalized": "matrix-normalized (eq. 13)",
    "hessian_trace": "Hessian trace, CE (eq. 5)",
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True, help="output directory (created)")
    p.add_argument("--quick", action="store_true", help="smoke test: 3 ratios, 1 seed, 2 epochs, small data")
    p.add_argument("--archs", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    p.add_argument("--ratios", type=float, nargs="+", default=[round(0.1 * i, 1) for i in range(11)])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-epochs", type=int, default=400)
    p.add_argument(
        "--target-acc", type=float, default=0.99, help="stop when accuracy on noisy train labels >= this"
    )
    p.add_argument("--num-samples", type=int, default=5000, help="MNIST-1D size (train + test, 80/20 split)")
    p.add_argument("--measure-samples", type=int, default=2000, help="training samples used for the Hessian")
    p.add_argument(
        "--num-groups", type=int, default=4, help="sample groups for the jackknife standard errors"
    )
    p.add_argument(
        "--log10-range", type=float, nargs=2, default=(-1.0, 1.0), help="range of log10 rescaling factors"
    )
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = p.parse_args(argv)
    if args.quick:
        args.ratios, args.seeds, args.max_epochs = [0.0, 0.5, 1.0], [0], 2
        args.num_samples, args.measure_samples, args.num_groups = 600, 120, 2
    return args


# -- training --------------------------------------------------------------------------------------------


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).to(torch.float64).mean())


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    seed: int,
    max_epochs: int,
    target_acc: float,
    batch_size: int = 128,
    lr: float = 1e-3,
) -> tuple[int, float]:
    """Adam + cross-entropy until the accuracy on ``(x, y)`` reaches ``target_acc``.

    Returns (epochs, accuracy).
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    acc, epoch = accuracy(model, x, y), 0
    model.train()
    while epoch < max_epochs and acc < target_acc:
        for idx in torch.randperm(len(y), generator=order).split(batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        epoch += 1
        acc = accuracy(model, x, y)
    model.eval()
    return epoch, acc


# -- measurement through the public API --------------------------------------------------------------


def measure(model: nn.Module, x: Tensor, y: Tensor, num_groups: int) -> dict[str, float]:
    """Normalized and matrix-normalized sharpness (normalized-softmax CE) and Hessian trace (CE), with
    stderrs."""
    weights = {n: p.detach() for n, p in select_parameters(model).items()}
    out: dict[str, float] = {}
    for loss_fn, keys in (
        (normalized_softmax_cross_entropy, ("normalized", "matrix_normalized")),
        (F.cross_entropy, ("hessian_trace",)),
    ):
        estimate = hessian_diagonal_groups(model, loss_fn, x, y, method="exact", num_groups=num_groups)
        metric = NormalizedSharpness(weights, num_replicates=num_groups)
        metric.update_from_estimate(estimate, weights)
        values = metric.compute()
        for key in keys:
            out[key] = float(values[key])
            out[f"{key}_stderr"] = float(values[f"{key}_stderr"])
    return out


def run_one(arch: str, ratio: float, seed: int, data: ClassificationData, args: argparse.Namespace) -> dict:
    init_seed = 1000 * seed + round(100 * ratio) + 100_000 * list(ARCHITECTURES).index(arch)
    noisy = randomize_labels(data.y_train, ratio, data.num_classes, seed=seed)
    torch.manual_seed(init_seed)
    model = ARCHITECTURES[arch]()
    start = time.perf_counter()
    epochs, train_acc = train(
        model, data.x_train, noisy, seed=init_seed, max_epochs=args.max_epochs, target_acc=args.target_acc
    )
    train_seconds = time.perf_counter() - start
    test_acc = accuracy(model, data.x_test, data.y_test)
    row = {
        "arch": arch,
        "ratio": ratio,
        "seed": seed,
        "epochs": epochs,
        "train_acc_noisy": train_acc,
        "train_acc_clean": accuracy(model, data.x_train, data.y_train),
        "test_acc": test_acc,
        "gap": train_acc - test_acc,
        "reached_target": train_acc >= args.target_acc,
        "train_seconds": round(train_seconds, 2),
    }

    start = time.perf_counter()
    model64 = model.to(torch.float64)
    n = min(args.measure_samples, len(noisy))
    x, y = data.x_train[:n].to(torch.float64), noisy[:n]
    before = measure(model64, x, y, args.num_groups)
    rescaled = random_function_preserving_rescaling(
        model64, generator=torch.Generator().manual_seed(init_seed), log10_range=tuple(args.log10_range)
    )
    with torch.no_grad():
        ref = model64(x)
        row["rescaled_output_rel_change"] = float((rescaled(x) - ref).abs().max() / ref.abs().max())
    after = measure(rescaled, x, y, args.num_groups)
    row["measure_seconds"] = round(time.perf_counter() - start, 2)
    for key, value in before.items():
        row[key] = value
    for key, value in after.items():
        row[f"{key}_rescaled"] = value
    return row


# -- reporting ------------------------------------------------------------------------------------------


def correlations(rows: list[dict], measure_key: str) -> dict[str, float]:
    from scipy import stats

    gap = [r["gap"] for r in rows]
    val = [r[measure_key] for r in rows]
    if len(rows) < 3 or len(set(val)) < 2 or len(set(gap)) < 2:
        return {"pearson": math.nan, "spearman": math.nan, "kendall": math.nan}
    return {
        "pearson": float(stats.pearsonr(val, gap)[0]),
        "spearman": float(stats.spearmanr(val, gap)[0]),
        "kendall": float(stats.kendalltau(val, gap)[0]),
    }


def machine_description(threads: int) -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{model}; nproc = {os.cpu_count()}; torch {torch.__version__} with {threads} thread(s); "
        f"Python {platform.python_version()}; {platform.system()} {platform.release()}"
    )


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def scatter(rows: list[dict], archs: Sequence[str], suffix: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(archs),
        len(MEASURES),
        figsize=(4.2 * len(MEASURES), 3.6 * len(archs)),
        squeeze=False,
        layout="constrained",
    )
    for i, arch in enumerate(archs):
        sub = [r for r in rows if r["arch"] == arch]
        gap = [r["gap"] for r in sub]
        for j, m in enumerate(MEASURES):
            ax = axes[i, j]
            val = [r[m + suffix] for r in sub]
            lo, hi = min(val), max(val)
            scaled = [(v - lo) / (hi - lo) if hi > lo else 0.5 for v in val]
            points = ax.scatter(
                gap, scaled, c=[r["ratio"] for r in sub], cmap="viridis", vmin=0, vmax=1, s=18
            )
            c = correlations(sub, m + suffix)
            ax.set_title(
                f"{arch}: {LABELS[m]}\nPearson {c['pearson']:.2f}, Spearman {c['spearman']:.2f}", fontsize=9
            )
            ax.set_xlabel("gap (train acc - test acc)")
            ax.set_ylabel("min-max scaled measure")
            ax.set_ylim(-0.05, 1.05)
    fig.colorbar(points, ax=axes, label="ratio of random labels", shrink=0.6)
    fig.suptitle(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_markdown(
    rows: list[dict],
    args: argparse.Namespace,
    argv: Sequence[str],
    runtime: float,
    cpu_time: float,
    path: Path,
) -> None:
    archs = [a for a in args.archs if any(r["arch"] == a for r in rows)]
    lines = [
        "# Random-label sweep and rescaling attack (Sec. 6.1/6.2, CPU scale)",
        "",
        "Generated by `examples/reproduce_random_labels.py`.",
        "",
        f"- Command: `{shlex.join(['python', 'examples/reproduce_random_labels.py', *argv])}` (with "
        f"lightning_flatness installed: `pip install -e '.[examples]'`)",
        f"- Machine: {machine_description(args.threads)}",
        f"- Runtime: {runtime:.0f} s ({runtime / 60:.1f} min) wall clock, {cpu_time:.0f} s "
        f"({cpu_time / 60:.1f} min) CPU time of the process (the machine was shared with other jobs)",
        f"- Models: {len(rows)} ({', '.join(archs)}; ratios {args.ratios}; seeds {args.seeds})",
        f"- Data: MNIST-1D, {args.num_samples} samples (80% train); Hessian on the first "
        f"{min(args.measure_samples, int(0.8 * args.num_samples))} training samples with the noisy labels, "
        f"method `exact`, float64, {args.num_groups} groups (jackknife standard errors)",
        f"- Training: Adam lr 1e-3, batch 128, cross-entropy, until accuracy on the noisy training labels "
        f">= {args.target_acc} or {args.max_epochs} epochs",
        f"- Rescaling attack: random layer scaling then row/column scaling of every hidden unit/channel, "
        f"log10 factors uniform in {tuple(args.log10_range)}",
        "",
    ]
    lines += [
        "## Correlation with the generalization gap",
        "",
        "| arch | measure | Pearson | Spearman | Kendall | Pearson (rescaled) | Spearman (rescaled) "
        "| Kendall (rescaled) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arch in archs:
        sub = [r for r in rows if r["arch"] == arch]
        for m in MEASURES:
            b, a = correlations(sub, m), correlations(sub, m + "_rescaled")
            lines.append(
                f"| {arch} | {LABELS[m]} | {b['pearson']:.3f} | {b['spearman']:.3f} | {b['kendall']:.3f} "
                f"| {a['pearson']:.3f} | {a['spearman']:.3f} | {a['kendall']:.3f} |"
            )
    lines += [
        "",
        "## Effect of the rescaling attack",
        "",
        "Relative change |after - before| / before over all models of an architecture (median and max), "
        "and the largest relative change of the network outputs.",
        "",
        "| arch | measure | median rel. change | max rel. change | max output change |",
        "|---|---|---|---|---|",
    ]
    for arch in archs:
        sub = [r for r in rows if r["arch"] == arch]
        out_change = max(r["rescaled_output_rel_change"] for r in sub)
        for m in MEASURES:
            rel = sorted(abs(r[m + "_rescaled"] - r[m]) / abs(r[m]) for r in sub)
            lines.append(
                f"| {arch} | {LABELS[m]} | {rel[len(rel) // 2]:.2e} | {rel[-1]:.2e} | {out_change:.1e} |"
            )
    lines += [
        "",
        "## Training outcome per ratio (mean over seeds)",
        "",
        "| arch | ratio | models | epochs | train acc (noisy labels) | min train acc | test acc | gap "
        "| normalized | matrix-normalized | Hessian trace |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arch in archs:
        for ratio in args.ratios:
            sub = [r for r in rows if r["arch"] == arch and r["ratio"] == ratio]
            if not sub:
                continue
            mean = lambda k, sub=sub: sum(r[k] for r in sub) / len(sub)  # noqa: E731
            lines.append(
                f"| {arch} | {ratio:.1f} | {len(sub)} | {mean('epochs'):.0f} | {mean('train_acc_noisy'):.4f} "
                f"| {min(r['train_acc_noisy'] for r in sub):.4f} | {mean('test_acc'):.4f} "
                f"| {mean('gap'):.4f} "
                f"| {mean('normalized'):.4g} | {mean('matrix_normalized'):.4g} "
                f"| {mean('hessian_trace'):.4g} |"
            )
    lines += [
        "",
        "## Files",
        "",
        "- `results.csv`: one row per model; `<measure>` before and "
        "`<measure>_rescaled` after the attack, each with its `_stderr` (jackknife over sample groups).",
        "- `scatter_before.png`, `scatter_after.png`: measure (min-max scaled per panel) vs gap, "
        "coloured by the ratio of random labels.",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    data = make_mnist1d(args.num_samples)
    rows = []
    for seed in args.seeds:
        for ratio in args.ratios:
            for arch in args.archs:
                row = run_one(arch, ratio, seed, data, args)
                rows.append(row)
                print(
                    f"[{time.perf_counter() - start:6.0f}s] {arch:8s} ratio {ratio:.1f} seed {seed}: "
                    f"{row['epochs']} epochs, train {row['train_acc_noisy']:.3f}, "
                    f"test {row['test_acc']:.3f}, "
                    f"normalized {row['normalized']:.4g} -> {row['normalized_rescaled']:.4g}, "
                    f"trace {row['hessian_trace']:.4g} -> {row['hessian_trace_rescaled']:.4g}",
                    flush=True,
                )
                write_csv(rows, args.out / "results.csv")
    scatter(rows, args.archs, "", "Before rescaling", args.out / "scatter_before.png")
    scatter(
        rows,
        args.archs,
        "_rescaled",
        "After a random function-preserving rescaling",
        args.out / "scatter_after.png",
    )
    runtime, cpu_time = time.perf_counter() - start, time.process_time() - cpu_start
    write_markdown(rows, args, argv, runtime, cpu_time, args.out / "results.md")
    print(f"done in {runtime:.0f} s; results in {args.out}")
    return rows


if __name__ == "__main__":
    main()
