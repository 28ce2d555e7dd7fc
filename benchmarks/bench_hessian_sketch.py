"""The sketched Hessian diagonal (``method="hessian_sketch"``) against brute force on the model zoo, at
a fixed sample set: how much bias its probe noise leaves in normalized sharpness, against the
Gauss-Newton sketch that ``auto`` uses on these models (issue 8: "within a few percent of an exact
reference", on the Hessian).

For each tiny zoo model (``tests/zoo_models.py``), untrained and trained (``--steps`` full-batch Adam
steps, as ``bench_zoo_residual.py``), in float64, on a fixed set of ``--samples`` samples (per model:
``--convnext-samples`` for ConvNeXt, whose brute force is the dearest):

1. Reference: the brute-force Hessian diagonal and the exact Gauss-Newton diagonal of the mean eq. 20
   loss over the set (``tests/zoo_oracle.py``), and their normalized sharpness (eq. 17) on the default
   selection.
2. Each estimator run ``--repeats`` times with independent generators, fed the set in batches of
   ``--batch-size`` (what the callback does: the diagonal of each batch, averaged with batch sizes as
   weights), then eq. 17 on the average. Sampling noise is absent (the set is the population); what
   is left is each estimator's own noise and the bias it causes through eq. 17's clipping and square
   roots, plus, for the Gauss-Newton sketch, the residual it leaves out.

Reported: bias and RMS of eq. 17 relative to the Hessian value, the relative L2 error of the diagonal,
and seconds per estimate (median). GPT-2 ties its LM head to the token embedding (a weight used twice):
``hessian_sketch`` measures it on per-sample backward passes (``auto`` does not choose it there); an
estimator that refuses a model is reported as refused.

Run: ``python -m benchmarks.bench_hessian_sketch --json benchmarks/results/bench_hessian_sketch.json``
(writes ``bench_hessian_sketch.md`` beside the JSON).
"""

from __future__ import annotations

import copy
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks.bench_zoo_residual import _to64, train
from benchmarks.common import base_parser, environment, run_timed, setup
from lightning_flatness.functional.estimators.exact import ExactMethodNotApplicable
from lightning_flatness.functional.estimators.gauss_newton_sketch import gauss_newton_sketch_diagonal
from lightning_flatness.functional.estimators.hessian_sketch import hessian_sketch_diagonal
from lightning_flatness.functional.losses import normalized_softmax_cross_entropy
from lightning_flatness.functional.measures import sharpness_measures
from lightning_flatness.functional.model_io import inputs_batch_size, select_samples
from lightning_flatness.functional.parameters import select_parameters
from lightning_flatness.metric import NormalizedSharpness
from tests.zoo_models import TINY, zoo_loss
from tests.zoo_oracle import brute_force_ggn_diagonal, brute_force_hessian_diagonal


def _normalized(weights: dict, diag: dict) -> float:
    sub = {n: w for n, w in weights.items() if w.ndim >= 2}
    return float(sharpness_measures(sub, {n: diag[n] for n in sub})["normalized"])


def _estimate(fn, model, loss_fn, x, y, params, batch_size, **options) -> tuple[dict, list[dict], list[int]]:
    """The batch-size-weighted mean of ``fn``'s diagonal over the set, batch by batch; and each batch's
    diagonal with its size (the groups the callback's metric would get)."""
    n = inputs_batch_size(x)
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    parts, sizes = [], []
    for start in range(0, n, batch_size):
        idx = slice(start, min(n, start + batch_size))
        part = fn(model, loss_fn, select_samples(x, idx, n), y[idx], params, **options)
        parts.append({name: part[name].detach() for name in total})
        sizes.append(idx.stop - idx.start)
        for name in total:
            total[name] += part[name] * (idx.stop - idx.start) / n
    return total, parts, sizes


def _metric_summary(weights: dict, parts: list[dict], sizes: list[int]) -> dict[str, float]:
    """What the callback's metric reports on these groups (one slot each, round-robin over its default 8):
    the relative standard error and half shift of normalized sharpness (eq. 17)."""
    sub = {n: w for n, w in weights.items() if w.ndim >= 2}
    metric = NormalizedSharpness({n: w.shape for n, w in sub.items()}, num_replicates=min(8, len(parts)))
    metric.update({n: torch.stack([p[n] for p in parts]) for n in sub}, sub, sizes)
    out = metric.compute()
    value = float(out["normalized"])
    return {
        "stderr": float(out["normalized_stderr"]) / value,
        "half_shift": float(out["normalized_half_shift"]) / value,
    }


def _noise_at_clipped_entries(weights: dict, estimate: dict, reference: dict) -> float:
    """Eq. 17 of the reference diagonal with the estimate's values at the entries the reference clips
    (``<= 0``) and the reference's elsewhere, relative to the reference's eq. 17, minus 1: the part of the
    estimate's bias that its noise causes where the true curvature is clipped."""
    mixed = {
        n: torch.where(reference[n] > 0, reference[n], estimate[n]) for n in weights if weights[n].ndim >= 2
    }
    return _normalized(weights, mixed) / _normalized(weights, reference) - 1


def _reference(fn, net, loss_fn, x, y, names, args, chunked: bool) -> dict:
    """``fn``'s diagonal of the mean loss over the set, from sub-batches of ``--reference-batch`` samples
    (the mean loss is the sample-weighted mean of the sub-batches' mean losses for the classifiers; for
    the token loss the weights are the sub-batches' token counts), which bounds the brute force's memory."""
    parts, weights = _reference_parts(fn, net, loss_fn, x, y, names, args, chunked)
    return _weighted_mean(parts, weights, names)


def _weighted_mean(parts: list[dict], weights: list[float], names: list[str]) -> dict:
    total = sum(weights)
    return {k: sum(w / total * p[k] for w, p in zip(weights, parts)) for k in names}


def _batch_groups(parts: list[dict], weights: list[float], names: list[str], args) -> Optional[tuple]:
    """The reference's sub-batches pooled into the estimators' batches of ``--batch-size`` samples (None
    unless it is a multiple of ``--reference-batch``): per batch its exact diagonal, and its sample count."""
    if args.batch_size % args.reference_batch:
        return None
    per = args.batch_size // args.reference_batch
    groups = [
        (_weighted_mean(parts[i : i + per], weights[i : i + per], names), sum(weights[i : i + per]))
        for i in range(0, len(parts), per)
    ]
    return [g for g, _ in groups], [max(1, round(w)) for _, w in groups]


def _reference_parts(fn, net, loss_fn, x, y, names, args, chunked: bool) -> tuple[list[dict], list[float]]:
    """``fn``'s diagonal of each sub-batch of ``--reference-batch`` samples, and its weight (sample or
    token count)."""
    n = inputs_batch_size(x)
    step = args.reference_batch
    parts, weights = [], []
    for start in range(0, n, step):
        idx = slice(start, min(n, start + step))
        xb, yb = select_samples(x, idx, n), y[idx]
        kw = {"chunk": max(1, args.hvp_budget // (idx.stop - idx.start))} if chunked else {}
        parts.append(
            {k: v.detach() for k, v in fn(net, loss_fn, xb, yb, names, **kw).items()}
        )  # frees the graph
        weights.append(float((yb[:, 1:] != -100).sum()) if yb.ndim > 1 else float(idx.stop - idx.start))
    return parts, weights


def study(name: str, model, x, y, args) -> dict[str, Any]:
    loss_fn = zoo_loss(name, normalized_softmax_cross_entropy)
    net = copy.deepcopy(model).double().eval()
    x = _to64(x)
    params = select_parameters(net)
    names = list(params)
    weights = {n: p.detach() for n, p in params.items()}
    n = inputs_batch_size(x)
    t0 = time.perf_counter()
    parts, part_weights = _reference_parts(
        brute_force_hessian_diagonal, net, loss_fn, x, y, names, args, True
    )
    h = _weighted_mean(parts, part_weights, names)
    brute = time.perf_counter() - t0
    exact_groups = _batch_groups(parts, part_weights, names, args)
    del parts
    g = _reference(brute_force_ggn_diagonal, net, loss_fn, x, y, names, args, chunked=False)
    ns_h, ns_g = _normalized(weights, h), _normalized(weights, g)
    h_norm = math.sqrt(sum(float(h[k].pow(2).sum()) for k in names))
    out: dict[str, Any] = {
        "samples": n,
        "brute_force_seconds": brute,
        "normalized_H": ns_h,
        "normalized_GGN": ns_g,
        "ggn_share": ns_g / ns_h - 1,
        # entries of the selected matrices whose Hessian diagonal is <= 0 (eq. 17 clips them to 0)
        "clipped_share": sum(int((h[k] <= 0).sum()) for k in weights if weights[k].ndim >= 2)
        / sum(h[k].numel() for k in weights if weights[k].ndim >= 2),
        # the metric on the exact diagonals of the estimators' batches: the standard error and half shift
        # that the samples alone cause (no estimator noise)
        "exact": _metric_summary(weights, *exact_groups) if exact_groups is not None else None,
        "estimators": {},
    }
    options = [("gauss_newton_sketch", gauss_newton_sketch_diagonal, 1, {})] + [
        (f"hessian_sketch:{s}", hessian_sketch_diagonal, s, {}) for s in args.sketches
    ]
    if args.sketched_loss:
        options.append(
            ("hessian_sketch:1 sketched loss", hessian_sketch_diagonal, 1, {"exact_loss_factors": False})
        )
    for label, fn, sketches, extra in options:
        values, errors, seconds, summaries, clipped = [], [], [], [], []
        try:
            for r in range(args.repeats):
                gen = torch.Generator().manual_seed(1000 * r + sketches)
                t0 = time.perf_counter()
                est, batches, sizes = _estimate(
                    fn,
                    net,
                    loss_fn,
                    x,
                    y,
                    params,
                    args.batch_size,
                    generator=gen,
                    num_sketches=sketches,
                    **extra,
                )
                seconds.append(time.perf_counter() - t0)
                values.append(_normalized(weights, est))
                errors.append(math.sqrt(sum(float((est[k] - h[k]).pow(2).sum()) for k in names)) / h_norm)
                summaries.append(_metric_summary(weights, batches, sizes))
                clipped.append(_noise_at_clipped_entries(weights, est, h))
        except ExactMethodNotApplicable as err:
            out["estimators"][label] = {"refused": str(err)}
            print(f"  {label}: refused ({str(err)[:120]})", flush=True)
            continue
        mean = statistics.fmean(values)
        out["estimators"][label] = {
            "bias": mean / ns_h - 1,
            "rmse": math.sqrt(statistics.fmean([(v - ns_h) ** 2 for v in values])) / ns_h,
            "sd": (statistics.stdev(values) / ns_h) if len(values) > 1 else float("nan"),
            "diag_rel_l2": statistics.fmean(errors),
            "seconds": statistics.median(seconds),
            "stderr": statistics.fmean(m["stderr"] for m in summaries),
            "half_shift": statistics.fmean(m["half_shift"] for m in summaries),
            "bias_from_clipped_entries": statistics.fmean(clipped),
        }
    return out


def run(args) -> dict[str, Any]:
    out: dict[str, Any] = {
        "command": args.command,
        "samples": args.samples,
        "convnext_samples": args.convnext_samples,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "sketches": args.sketches,
        "steps": args.steps,
        "models": {},
    }
    for name in args.models:
        n = args.convnext_samples if name == "convnext" else args.samples
        model, (x, y) = TINY[name](n=n, seed=args.seed)
        out["models"][name] = {}
        for state in args.states:
            m = train(model, x, y, name, args.steps, args.lr)[0].eval() if state == "trained" else model
            res = study(name, m, x, y, args)
            out["models"][name][state] = res
            line = (
                f"{name:13s} {state:9s} n={res['samples']} NS(H)={res['normalized_H']:.4g} "
                f"GGN {res['ggn_share']:+.1%} brute {res['brute_force_seconds']:.0f}s"
            )
            for label, e in res["estimators"].items():
                if "refused" not in e:
                    line += (
                        f" | {label} {e['bias']:+.1%} rms {e['rmse']:.1%} L2 {e['diag_rel_l2']:.2f}"
                        f" {e['seconds']:.2f}s"
                    )
            print(line, flush=True)
    return out


def markdown(results: dict[str, Any]) -> str:
    env = results.get("environment", environment())
    lines = [
        "# The sketched Hessian diagonal against brute force on the model zoo (issue 8)",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {env.get('cpu', '?')}, nproc {env.get('nproc', '?')}, "
        f"{env.get('threads', '?')} thread(s), "
        f"torch {env.get('torch', '?')}; total {results.get('seconds', 0):.0f} s.  ",
        f"Setting: tiny zoo models in float64, a fixed set of {results['samples']} samples "
        f"({results['convnext_samples']} for ConvNeXt) = the population (no sampling noise), "
        "fed in batches of "
        f"{results['batch_size']}; {results['repeats']} independent estimates per estimator; eq. 20 loss; "
        f"'trained' = {results['steps']} full-batch Adam steps. Reference: the brute-force Hessian "
        "diagonal of the mean loss over the set. bias / RMS: of the total normalized sharpness (eq. 17) "
        "relative to the Hessian value; L2: relative L2 error of the diagonal; s: median seconds of one "
        "estimate over the set. 'GGN alone' is the exact Gauss-Newton diagonal's eq. 17 error (what the "
        "Gauss-Newton estimators converge to). 'clipped': the share of the reference's entries <= 0. "
        "The metric's columns are what `NormalizedSharpness` reports with each batch as a group (mean "
        "over the estimates, relative to the value): s.e. and half shift; on the row 'exact groups' the "
        "reference's own diagonals of the same batches (the samples' part alone). 'from clipped': the "
        "bias left when the estimate replaces the reference only at the entries the reference clips.",
        "",
        "| model | state | samples | NS (Hessian) | GGN alone | clipped | estimator | bias | RMS | diag L2 "
        "| s.e. | half shift | from clipped | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, states in results["models"].items():
        for state, r in states.items():
            head = (
                f"| {name} | {state} | {r['samples']} | {r['normalized_H']:.4g} | {r['ggn_share']:+.1%} "
                f"| {r['clipped_share']:.0%} "
            )
            if r.get("exact") is not None:
                exact = r["exact"]
                lines.append(
                    head + f"| exact groups | | | | {exact['stderr']:.1%} | {exact['half_shift']:+.1%} | | |"
                )
            for label, e in r["estimators"].items():
                if "refused" in e:
                    lines.append(head + f"| `{label}` | refused | | | | | | |")
                    continue
                lines.append(
                    head + f"| `{label}` | {e['bias']:+.1%} | {e['rmse']:.1%} | {e['diag_rel_l2']:.3f} "
                    f"| {e['stderr']:.1%} | {e['half_shift']:+.1%} | {e['bias_from_clipped_entries']:+.1%} "
                    f"| {e['seconds']:.2f} |"
                )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict[str, Any]:
    parser = base_parser(__doc__)
    parser.add_argument("--models", nargs="*", default=["vit", "bert", "mobilenet_v3", "convnext", "gpt2"])
    parser.add_argument(
        "--states", nargs="*", default=["untrained", "trained"], choices=["untrained", "trained"]
    )
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--convnext-samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sketches", type=int, nargs="*", default=[1, 4])
    parser.add_argument(
        "--sketched-loss", action="store_true", help="also hessian_sketch:1 with the loss's factors sketched"
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument(
        "--hvp-budget", type=int, default=128, help="sample-HVPs per vmapped brute-force call"
    )
    parser.add_argument("--reference-batch", type=int, default=16, help="samples per brute-force sub-batch")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.samples, args.convnext_samples, args.repeats, args.states = (
            ["vit"],
            8,
            4,
            2,
            ["untrained"],
        )
        args.batch_size = args.reference_batch = 4
    args.command = "python -m benchmarks.bench_hessian_sketch " + " ".join(
        sys.argv[1:] if argv is None else list(argv)
    )
    setup(args)
    results = run_timed(run, args)
    if args.json:
        Path(args.json).with_suffix(".md").write_text(markdown(results))
    return results


if __name__ == "__main__":
    main()
