"""Monte-Carlo Gauss-Newton diagonal (``gauss_newton_mc_diagonal``): cost against the number of
classes on a CIFAR-size ResNet-18, and error at equal cost beside BackPACK's ``DiagGGNMC``.

Part 1, cost (torchvision ResNet-18, 3x32x32 inputs, a batch of 128 random samples, eval mode,
every weight with ``ndim >= 2``): wall time of one estimate (``num_mc_samples=1``) at 10 and 1,000
classes, for ``F.cross_entropy`` (1 plain draw, and the default: 1 draw + 2 exact classes) and
eq. 20, in units of one training step of the same batch (train-mode forward, backward, Adam step),
all timed in one interleaved loop (medians and fastest runs). The exact GGN diagonal (``"exact"``,
K backward columns) is timed at 10 classes for reference.

Part 2, error at equal cost (the MNIST-1D MLP and LeNet-style CNN of ``common.py``, trained a few
epochs, a batch of 128 training samples, mean cross-entropy): reference = the exact GGN diagonal
(``gauss_newton_diagonal``; equal to the Hessian diagonal for these ReLU nets). Candidates: ours with
1, 2, 4, 8 draws per sample, ours with the 1 or 2 most probable classes exact (``exact_classes``), and
BackPACK ``DiagGGNMC`` with 1 and 4 draws (the same estimator for cross-entropy: ``y ~ p``). Over
``--seeds`` independent draws: RMS and mean relative error of the total trace (eq. 5) and of the
normalized sharpness (eq. 17, ``sharpness_measures``); ``rms_at_bp_time`` rescales the RMS error to
BackPACK's 1-draw wall time (Monte-Carlo error falls as ``1/sqrt(cost)``: ``rms * sqrt(t / t_bp)``).

Run from the repository root (one thread):

    python -m benchmarks.bench_gauss_newton_mc --repeats 9 \\
        --json benchmarks/results/bench_gauss_newton_mc.json \\
        --markdown benchmarks/results/bench_gauss_newton_mc.md
"""

from __future__ import annotations

import copy
import math
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import (
    base_parser,
    environment,
    interleaved_times,
    markdown_table,
    mnist1d,
    run_timed,
    setup,
    trained_model,
    weight_parameters,
)
from lightning_flatness.functional import (
    normalized_softmax_cross_entropy,
    sharpness_measures,
)
from lightning_flatness.functional.estimators.exact import gauss_newton_diagonal
from lightning_flatness.functional.estimators.gauss_newton_mc import (
    gauss_newton_mc_diagonal,
)

BATCH = 128


# ------------------------------------------------------------------------------------------------
# part 1: cost against the number of classes
# ------------------------------------------------------------------------------------------------


def _training_step(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], None]:
    net = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()

    return step


def _estimate(model, loss_fn, x, y, params, **kwargs) -> Callable[[], Any]:
    def fn():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return gauss_newton_mc_diagonal(
                model, loss_fn, x, y, params, generator=torch.Generator().manual_seed(0), **kwargs
            )

    return fn


def resnet_cost(args) -> list[dict[str, Any]]:
    """Both class counts timed in one interleaved loop (a shared machine's drifts hit all alike)."""
    import torchvision

    batch = 16 if args.quick else BATCH
    fns: dict[tuple[int, str], Callable[[], Any]] = {}
    for classes in (10, 1000):
        torch.manual_seed(args.seed)
        model = torchvision.models.resnet18(num_classes=classes).eval()
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, classes, (batch,))
        params = weight_parameters(model)
        fns[(classes, "training_step")] = _training_step(model, x, y)
        fns[(classes, "mc_cross_entropy")] = _estimate(model, F.cross_entropy, x, y, params, exact_classes=0)
        fns[(classes, "mc_eq20")] = _estimate(model, normalized_softmax_cross_entropy, x, y, params)
        fns[(classes, "mc_cross_entropy_2_exact_classes")] = _estimate(model, F.cross_entropy, x, y, params)
        if classes == 10:
            fns[(classes, "exact_cross_entropy")] = lambda m=model, x=x, y=y, p=params: gauss_newton_diagonal(
                m, F.cross_entropy, x, y, p
            )
    times = interleaved_times(fns, repeats=args.repeats, warmup=1)
    rows = []
    for (classes, name), t in times.items():
        step = times[(classes, "training_step")]["median"]
        rows.append(
            {
                "classes": classes,
                "what": name,
                "seconds": t["median"],
                "training_steps": t["median"] / step,
                "min_seconds": t["min"],
                "max_seconds": t["max"],
            }
        )
    print(markdown_table(rows, ["classes", "what", "seconds", "training_steps", "min_seconds"]), flush=True)
    return rows


# ------------------------------------------------------------------------------------------------
# part 2: error at equal cost beside BackPACK DiagGGNMC
# ------------------------------------------------------------------------------------------------


def _backpack_mc(
    model: nn.Module, x: Tensor, y: Tensor, mc_samples: int
) -> Callable[[int], dict[str, Tensor]]:
    """BackPACK ``DiagGGNMC(mc_samples)`` on an extended deep copy; ``fn(seed)`` seeds the global RNG."""
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNMC

    weights = set(weight_parameters(model))
    bp_model = copy.deepcopy(model)
    for name, p in bp_model.named_parameters():
        p.requires_grad_(name in weights)
    bp_model = extend(bp_model)
    loss_module = extend(nn.CrossEntropyLoss())
    named = [(n, p) for n, p in bp_model.named_parameters() if p.requires_grad]

    def fn(seed: int) -> dict[str, Tensor]:
        torch.manual_seed(1_000_003 + seed)  # draws independent of ours (same seed: the same classes)
        loss = loss_module(bp_model(x), y)
        with warnings.catch_warnings(), backpack(DiagGGNMC(mc_samples=mc_samples)):
            warnings.simplefilter("ignore")  # "Full backward hook is firing ..." (inputs need no grad)
            loss.backward()
        out = {}
        for n, p in named:
            out[n] = p.diag_ggn_mc.detach().clone()
            del p.diag_ggn_mc
            p.grad = None
        return out

    return fn


def _ours_mc(model, x, y, params, draws: int, exact_classes: int = 0) -> Callable[[int], dict[str, Tensor]]:
    def fn(seed: int) -> dict[str, Tensor]:
        return gauss_newton_mc_diagonal(
            model,
            F.cross_entropy,
            x,
            y,
            params,
            num_mc_samples=draws,
            generator=torch.Generator().manual_seed(seed),
            exact_classes=exact_classes,
        )

    return fn


def _measures(weights: dict[str, Tensor], diag: dict[str, Tensor]) -> tuple[float, float]:
    out = sharpness_measures(weights, {n: d.to(torch.float64) for n, d in diag.items()})
    return float(out["hessian_trace"]), float(out["normalized"])


def backpack_error(args) -> list[dict[str, Any]]:
    try:
        import backpack  # noqa: F401

        have_backpack = True
    except Exception:  # noqa: BLE001 - optional
        have_backpack = False
    rows = []
    for name in ("mlp", "lenet"):
        model, x_all, y_all, acc = trained_model(
            name, epochs=1 if args.quick else args.epochs, seed=args.seed
        )
        idx = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(args.seed))[:BATCH]
        x, y = x_all[idx], y_all[idx]
        params = weight_parameters(model)
        weights = {n: p.detach().to(torch.float64) for n, p in params.items()}
        reference = gauss_newton_diagonal(model, F.cross_entropy, x, y, params).diagonal
        ref_trace, ref_normalized = _measures(weights, reference)
        candidates: dict[str, Callable[[int], dict[str, Tensor]]] = {
            f"ours, {d} draw{'s' if d > 1 else ''}": _ours_mc(model, x, y, params, d) for d in (1, 2, 4, 8)
        }
        for m in (1, 2):
            candidates[f"ours, 1 draw + {m} exact class{'es' if m > 1 else ''}"] = _ours_mc(
                model, x, y, params, 1, exact_classes=m
            )
        if have_backpack:
            for d in (1, 4):
                candidates[f"BackPACK DiagGGNMC, {d} draw{'s' if d > 1 else ''}"] = _backpack_mc(
                    model, x, y, d
                )
        times = interleaved_times(
            {k: (lambda f=f: f(0)) for k, f in candidates.items()}, repeats=3 * args.repeats
        )
        bp_time = times.get("BackPACK DiagGGNMC, 1 draw", times["ours, 1 draw"])["median"]
        for key, fn in candidates.items():
            trace_err, norm_err = [], []
            for seed in range(1, args.seeds + 1):
                trace, normalized = _measures(weights, fn(seed))
                trace_err.append(trace / ref_trace - 1)
                norm_err.append(normalized / ref_normalized - 1)
            t = times[key]["median"]
            rms_t = math.sqrt(statistics.fmean(e * e for e in trace_err))
            rms_n = math.sqrt(statistics.fmean(e * e for e in norm_err))
            rows.append(
                {
                    "model": name,
                    "train_acc": acc,
                    "method": key,
                    "ms": 1e3 * t,
                    "trace_rms": rms_t,
                    "trace_bias": statistics.fmean(trace_err),
                    "normalized_rms": rms_n,
                    "normalized_bias": statistics.fmean(norm_err),
                    "trace_rms_at_bp_time": rms_t * math.sqrt(t / bp_time),
                    "normalized_rms_at_bp_time": rms_n * math.sqrt(t / bp_time),
                }
            )
        print(
            markdown_table([r for r in rows if r["model"] == name], ERROR_COLUMNS, {"ms": ".3g"}), flush=True
        )
    return rows


ERROR_COLUMNS = [
    "model",
    "method",
    "ms",
    "trace_rms",
    "trace_bias",
    "normalized_rms",
    "normalized_bias",
    "trace_rms_at_bp_time",
    "normalized_rms_at_bp_time",
]


def run(args) -> dict[str, Any]:
    import os

    results = {
        "command": " ".join(["python -m benchmarks.bench_gauss_newton_mc", *sys.argv[1:]]),
        "resnet18_cost": resnet_cost(args),
    }
    results["load_average_after_part_1"] = os.getloadavg()[0]
    results["error_vs_backpack"] = backpack_error(args)
    return results


def write_markdown(path: Path, results: dict[str, Any]) -> None:
    cost = results["resnet18_cost"]
    by = {(r["classes"], r["what"]): r for r in cost}

    def ratio_of(what: str, key: str) -> float:
        return by[(1000, what)][key] / by[(10, what)][key]

    ratios = ", ".join(
        f"{w} {ratio_of(w, 'seconds'):.2f} (fastest runs: {ratio_of(w, 'min_seconds'):.2f})"
        for w in ("mc_cross_entropy", "mc_eq20", "mc_cross_entropy_2_exact_classes")
    )
    env = environment()
    text = [
        "# Monte-Carlo Gauss-Newton diagonal: cost vs classes, error vs BackPACK DiagGGNMC",
        "",
        f"Command: `{results['command']}`",
        "",
        (
            f"Machine: {env.get('cpu')}, {env.get('threads')} thread, torch {env.get('torch')}, "
            f"BackPACK {env.get('backpack')}, {env.get('nproc')} cores; "
            f"total {results.get('seconds', float('nan')):.0f} s. 1-minute load average after part 1: "
            f"{results.get('load_average_after_part_1', float('nan')):.1f} "
            "(other processes share the cores: medians and fastest runs are both given)."
        ),
        "",
        (
            "## ResNet-18 (torchvision, 3x32x32, batch 128, eval mode, 1 draw): seconds and training steps "
            "(forward + backward + Adam, batch 128)"
        ),
        "",
        markdown_table(
            cost,
            ["classes", "what", "seconds", "training_steps", "min_seconds", "max_seconds"],
            {"seconds": ".3g", "training_steps": ".3g", "min_seconds": ".3g", "max_seconds": ".3g"},
        ),
        "",
        f"Ratio 1,000 / 10 classes of one estimate (median seconds): {ratios} (target <= 1.5).",
        "",
        "## Error at equal cost beside BackPACK DiagGGNMC (batch 128, reference: exact GGN diagonal)",
        "",
        (
            "Relative errors of the total trace (eq. 5) and normalized sharpness (eq. 17) over "
            f"{results.get('seeds')} seeds; `*_at_bp_time` = RMS error rescaled to the wall time of BackPACK "
            "with 1 draw (`rms * sqrt(ms / ms_bp)`)."
        ),
        "",
        markdown_table(
            results["error_vs_backpack"],
            ERROR_COLUMNS,
            {
                "ms": ".3g",
                "trace_rms": ".3f",
                "trace_bias": "+.3f",
                "normalized_rms": ".3f",
                "normalized_bias": "+.3f",
                "trace_rms_at_bp_time": ".3f",
                "normalized_rms_at_bp_time": ".3f",
            },
        ),
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))
    print(f"wrote {path}")


def main(argv=None) -> dict[str, Any]:
    parser = base_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=32, help="independent draws for the error statistics")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs of the MNIST-1D models")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.seeds = 1, 3
    setup(args)
    mnist1d()  # generate (or load) the data before any timing
    results = run_timed(lambda a: {**run(a), "seeds": a.seeds}, args)
    if args.markdown is not None:
        write_markdown(args.markdown, results)
    return results


if __name__ == "__main__":
    main()
