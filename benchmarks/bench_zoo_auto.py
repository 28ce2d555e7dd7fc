"""Is ``measure_sharpness(model, batches)`` at its defaults right on the model zoo? (issue 8, target 2)

For each tiny zoo model (``tests/zoo_models.py``: torchvision ResNet / MobileNetV3, timm ViT /
ConvNeXt, Hugging Face BERT classifier / GPT-2 LM; by name, the task heads of ``TASK_HEADS``: BERT for
extractive question answering, multiple choice, regression and multi-label classification, the last two
with their own loss; and the mixture-of-experts LMs of ``MIXTURE_OF_EXPERTS_MODELS``, Qwen2-MoE, Llama 4 and
Mixtral, each expert measured as its own weight matrix), a fixed **pool** of ``--pool`` samples is the
population. Reference values are computed once on the pool, in float64, by brute force
(``tests/zoo_oracle.py``, independent of the estimators): the measures (``sharpness_measures``: eq. 17
normalized sharpness, eq. 13, eq. 5) of the Hessian diagonal (one HVP per weight) and of the exact
Gauss-Newton diagonal ``diag(J^T Lambda J)``, both of the mean loss over the whole pool (eq. 20-22
normalized softmax cross-entropy; token-level with ``shift=True`` for GPT-2, a mean over the pool's
non-padding tokens).

Then, for each of ``--seeds`` seeds, ``measure_sharpness(model, batches)`` with **every default**
(``method="auto"``, eq. 20 loss resolved by ``resolve_loss``, 8 replicate slots, lam = 0.5) on
``--batches`` batches of ``--batch-size`` samples drawn **with replacement** from the pool by a
generator seeded with the seed (so the pool's empirical distribution is exactly the population the
reference describes); the same seed seeds the Monte-Carlo generator. Batches are what a DataLoader
yields: ``(x, y)`` tuples for images, dicts with ``input_ids``/``attention_mask``/(``token_type_ids``)/
``labels`` for BERT and GPT-2 (split by the default ``split_batch``).

Reported per model (and per state: untrained; ``trained`` = ``--steps`` full-batch Adam steps, lr
``--lr``, cross-entropy, on the pool, as ``bench_zoo_residual.py`` does): the method and quantity auto
chose; for the total normalized sharpness, relative bias (mean over seeds) against the quantity the
choice claims and against the Hessian, RMS relative error, mean relative standard error (s.e. /
reference), and the coverage of ``value +- 1.96 s.e.`` (fraction of seeds whose interval contains the
reference); the median seconds of one measurement.

Run: ``python -m benchmarks.bench_zoo_auto --json benchmarks/results/bench_zoo_auto.json``
(writes ``bench_zoo_auto.md`` beside the JSON).
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_zoo_residual import train
from benchmarks.common import base_parser, environment, run_timed, setup, write_json
from lightning_flatness.batch_split import split_batch
from lightning_flatness.functional.losses import normalized_softmax_cross_entropy
from lightning_flatness.functional.measures import sharpness_measures
from lightning_flatness.functional.parameters import matrix_stacks, select_parameters, split_matrix_stacks
from lightning_flatness.functional.replicate_measures import (
    POOLED_RTOL,
    REPLICATE_RTOL,
    jackknife_standard_error,
    replicate_curvature,
    replicate_weights,
)
from lightning_flatness.functional.solvers.normalized import solve_normalized_sharpness_coefficients
from lightning_flatness.measure import SharpnessMeasurement, not_converged_message
from tests.zoo_models import (
    MIXTURE_OF_EXPERTS_MODELS,
    QUESTION_ANSWERING,
    TASK_HEADS,
    TINY,
    span_batch,
    zoo_loss,
)
from tests.zoo_oracle import brute_force_ggn_diagonal, brute_force_hessian_diagonal

MODELS = {**TINY, **TASK_HEADS, **MIXTURE_OF_EXPERTS_MODELS}

KEYS = ("normalized", "matrix_normalized", "hessian_trace")


def _take(x: Any, idx: torch.Tensor) -> Any:
    if isinstance(x, torch.Tensor):
        return x[idx]
    return {k: v[idx] for k, v in x.items()}


def make_batch(x: Any, y: torch.Tensor, idx: torch.Tensor, span: bool = False) -> Any:
    """One batch as a DataLoader would yield it: ``(x, y)``, or a Hugging Face dict with ``labels`` (with
    ``start_positions`` and ``end_positions`` for a question-answering model, ``span``)."""
    if isinstance(x, torch.Tensor):
        return (x[idx], y[idx])
    if span:
        return span_batch(_take(x, idx), y[idx])
    return {**_take(x, idx), "labels": y[idx]}


def reference(name: str, model, x, y, hvp_budget: int = 256) -> dict[str, dict[str, float]]:
    """Brute-force float64 measures on the whole pool, from diag(H) and from diag(GGN)."""
    loss_fn = zoo_loss(name, normalized_softmax_cross_entropy)
    net = copy.deepcopy(model).double().eval()
    names = list(select_parameters(net))
    stacks = matrix_stacks(net, names)  # experts measured one by one, as the measurement does
    weights = split_matrix_stacks({n: p.detach() for n, p in net.named_parameters() if n in names}, stacks)
    n_pool = y.shape[0]
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    # chunk of unit vectors per vmapped HVP call: about hvp_budget sample-HVPs at once (ConvNeXt: 256 of
    # them on a pool of 8 peak at 6 GB; a pool of 32 ran out of 23 GB)
    h = brute_force_hessian_diagonal(net, loss_fn, x, y, names, chunk=max(1, hvp_budget // n_pool))
    out["hessian_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    g = brute_force_ggn_diagonal(net, loss_fn, x, y, names)
    out["gauss_newton_seconds"] = time.perf_counter() - t0
    for label, diag in (("hessian", h), ("gauss_newton", g)):
        m = sharpness_measures(weights, split_matrix_stacks(diag, stacks))
        out[label] = {k: float(m[k]) for k in KEYS}
    return out


def clamped_normalized(m) -> tuple[float, float]:
    """Total normalized sharpness and its jackknife s.e. re-solved from the measurement's slot sums exactly
    as ``replicate_sharpness_measures`` does, except that eq. 17's coefficient ``A`` is clamped at 0.
    ``replicate_curvature`` returns entries of about -1e-17 where a clipped mean is 0 (rounding of
    ``x + max(-x, 0)``), and the batched solver then returns NaN or a large negative value for that
    replicate (see RESULTS.md); this column shows what the measurement gives without that defect."""
    sums, counts = m.metric.hessian_sums(), m.metric.count.to(torch.float64)
    used = [int(r) for r in torch.nonzero(counts > 0).flatten().tolist()]
    mix = replicate_weights(counts, used)
    total = 0.0
    for name, s in sums.items():
        w = m.weights[name].to(torch.float64)
        if w.ndim < 2:  # biases and normalisation scales enter eq. 5 only (footnote 5)
            continue
        a, _ = replicate_curvature(s.to(torch.float64), mix, w.shape)
        b = w.square().reshape(a.shape[1], a.shape[2], -1).sum(dim=2) / (2.0 * 0.5)
        sols = solve_normalized_sharpness_coefficients(
            a.clamp_min(0), b, shape=tuple(w.shape), rtol=POOLED_RTOL, replicate_rtol=REPLICATE_RTOL
        )
        total = total + torch.stack([x.value for x in sols])
    return float(total[0]), float(jackknife_standard_error(total[1 : 1 + len(used)]))


def one_run(model, x, y, seed: int, args, span: bool = False) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(10_000 + seed)
    n_pool = y.shape[0]
    batches = [
        make_batch(x, y, torch.randint(0, n_pool, (args.batch_size,), generator=gen), span)
        for _ in range(args.batches)
    ]
    mc = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        # measure_sharpness's own loop, kept open so that the pooled sums can be re-solved below
        m = SharpnessMeasurement(model, generator=mc, method=args.method)
        for batch in batches:
            m.add(*split_batch(batch))
        values = m.compute()
        seconds = time.perf_counter() - t0
        clamped, clamped_se = clamped_normalized(m)
    solver_warnings = [str(w.message) for w in caught if "normalized_sharpness stopped" in str(w.message)]
    return {
        "seed": seed,
        "seconds": seconds,
        "method": m.choice.method,
        "quantity": m.choice.quantity,
        "reason": m.choice.reason,
        "normalized_clamped": clamped,
        "normalized_clamped_stderr": clamped_se,
        "solver_warnings": len(solver_warnings),
        "solver_warning_example": solver_warnings[0] if solver_warnings else None,
        **{k: float(values[k]) for k in KEYS},
        **{f"{k}_stderr": float(values[f"{k}_stderr"]) for k in KEYS},
        **{f"{k}_half_shift": float(values[f"{k}_half_shift"]) for k in KEYS},
    }


def with_extrapolated(runs: list[dict[str, Any]], key: str = "normalized") -> list[dict[str, Any]]:
    """Each run with ``"<key>_extrapolated"`` = value - half shift (Richardson's extrapolation for a bias
    falling like ``1 / n``) and, as its standard error, the value's own."""
    return [
        {
            **r,
            f"{key}_extrapolated": r[key] - r[f"{key}_half_shift"],
            f"{key}_extrapolated_stderr": r[f"{key}_stderr"],
        }
        for r in runs
    ]


def summarize(runs: list[dict[str, Any]], ref: float, key: str = "normalized") -> dict[str, float]:
    v = [r[key] for r in runs]
    s = [r[f"{key}_stderr"] for r in runs]
    return {
        "bias": statistics.fmean(v) / ref - 1,
        "rmse": math.sqrt(statistics.fmean([(a - ref) ** 2 for a in v])) / abs(ref),
        "sd": statistics.stdev(v) / abs(ref) if len(v) > 1 else float("nan"),
        "mean_rel_se": statistics.fmean(s) / abs(ref),
        "coverage": statistics.fmean([float(abs(a - ref) <= 1.96 * b) for a, b in zip(v, s)]),
        "reference": ref,
    }


def run(args) -> dict[str, Any]:
    names = args.models or list(TINY)  # and, by name, TASK_HEADS
    out: dict[str, Any] = {
        "command": args.command,
        "pool": args.pool,
        "batches": args.batches,
        "batch_size": args.batch_size,
        "seeds": args.seeds,
        "steps": args.steps,
        "lr": args.lr,
        "models": {},
    }
    for name in names:
        model, (x, y) = MODELS[name](n=args.pool, seed=args.seed)
        out["models"][name] = {}
        for state in args.states:
            if state == "trained":
                m, final_loss = train(model, x, y, name, args.steps, args.lr)
                m.eval()
            else:
                m, final_loss = model, None
            load0 = os.getloadavg()[0]
            ref = reference(name, m, x, y, args.hvp_budget)
            runs = [one_run(m, x, y, s, args, name in QUESTION_ANSWERING) for s in range(args.seeds)]
            choice = {(r["method"], r["quantity"]) for r in runs}
            assert len(choice) == 1, choice
            method, quantity = choice.pop()
            entry = {
                "method": method,
                "quantity": quantity,
                "reason": runs[0]["reason"],
                "train_loss_ce": final_loss,
                "reference": ref,
                "runs": runs,
                "seconds_median": statistics.median(r["seconds"] for r in runs),
                "loadavg_1min": [load0, os.getloadavg()[0]],
                "seeds_with_solver_warnings": sum(r["solver_warnings"] > 0 for r in runs),
                "vs_claimed": {k: summarize(runs, ref[quantity][k], k) for k in KEYS},
                "vs_hessian": {k: summarize(runs, ref["hessian"][k], k) for k in KEYS},
                "clamped_vs_claimed": summarize(runs, ref[quantity]["normalized"], "normalized_clamped"),
                "extrapolated_vs_claimed": summarize(
                    with_extrapolated(runs), ref[quantity]["normalized"], "normalized_extrapolated"
                ),
                "extrapolated_vs_hessian": summarize(
                    with_extrapolated(runs), ref["hessian"]["normalized"], "normalized_extrapolated"
                ),
            }
            out["models"][name][state] = entry
            c, h = entry["vs_claimed"]["normalized"], entry["vs_hessian"]["normalized"]
            print(
                f"{name:13s} {state:9s} {method}/{quantity}: NS ref {c['reference']:.4g} "
                f"(H {h['reference']:.4g}) "
                f"bias {c['bias']:+.2%} (vs H {h['bias']:+.2%}) rms {c['rmse']:.2%} "
                f"se {c['mean_rel_se']:.2%} "
                f"cov {c['coverage']:.0%} (vs H {h['coverage']:.0%}) {entry['seconds_median']:.2f}s/meas "
                f"| A clamped: bias {entry['clamped_vs_claimed']['bias']:+.2%} se "
                f"{entry['clamped_vs_claimed']['mean_rel_se']:.2%} "
                f"cov {entry['clamped_vs_claimed']['coverage']:.0%} "
                f"brute {ref['hessian_seconds']:.0f}s load {load0:.2f} solver-warned seeds "
                f"{entry['seeds_with_solver_warnings']} | extrapolated: bias "
                f"{entry['extrapolated_vs_claimed']['bias']:+.2%} "
                f"rms {entry['extrapolated_vs_claimed']['rmse']:.2%} "
                f"cov {entry['extrapolated_vs_claimed']['coverage']:.0%} "
                f"(vs H {entry['extrapolated_vs_hessian']['bias']:+.2%}, "
                f"{entry['extrapolated_vs_hessian']['coverage']:.0%})",
                flush=True,
            )
            if args.json:  # partial results survive a crash
                write_json(Path(args.json).with_suffix(".partial.json"), out)
    return out


def _flagged(entry: dict[str, Any]) -> str:
    """Seeds whose measurement the convergence check flags (``not_converged_message``: half shift above two
    standard errors or 5% of the value; never for a deterministic method), of all seeds."""
    runs = entry["runs"]
    return f"{sum(not_converged_message(r, entry['method']) is not None for r in runs)}/{len(runs)}"


def markdown(results: dict[str, Any]) -> str:
    env = results.get("environment", environment())
    lines = [
        "# `measure_sharpness` at its defaults on the model zoo, against brute force (issue 8)",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {env.get('cpu', '?')}, nproc {env.get('nproc', '?')}, "
        f"{env.get('threads', '?')} thread(s), "
        f"torch {env.get('torch', '?')}; total {results.get('seconds', 0):.0f} s.  ",
        "Setting: tiny zoo models (tests/zoo_models.py), "
        f"pool of {results['pool']} samples = the population; "
        f"per seed, {results['batches']} batches of {results['batch_size']} "
        "drawn with replacement from the pool; "
        f"{results['seeds']} seeds; "
        "`measure_sharpness(model, batches, generator=torch.Generator().manual_seed(seed))`"
        " with every other argument at its default. Reference: float64 brute force over the whole pool. "
        f"'trained' = {results['steps']} full-batch Adam steps (lr {results['lr']}, cross-entropy) "
        "on the pool.",
        "",
        "Total normalized sharpness (eq. 17). bias = mean over seeds / reference - 1; "
        "RMS = RMS relative error; "
        "s.e. = mean reported standard error / reference; "
        "coverage = fraction of seeds with |value - reference| "
        "<= 1.96 s.e. 'claimed' is the quantity auto says it measures (Hessian or Gauss-Newton); "
        "'H' is the "
        "brute-force Hessian. 'A clamped': the same measurements re-solved from their pooled sums "
        "with eq. 17's "
        "coefficient A clamped at 0 "
        "(works around the replicate_curvature defect described in RESULTS.md). 'flagged': seeds whose "
        "measurement the convergence check flags (`not_converged_message`, as `measure_sharpness` warns).",
        "",
        "| model | state | auto chose | ref (claimed) | ref (H) | bias vs claimed | bias vs H "
        "| RMS vs claimed "
        "| s.e. | coverage vs claimed | coverage vs H | s / measurement | load "
        "| seeds with solver cap warning "
        "| A clamped: bias / s.e. / coverage vs claimed | flagged as not converged |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, states in results["models"].items():
        for state, e in states.items():
            c, h = e["vs_claimed"]["normalized"], e["vs_hessian"]["normalized"]
            cc = e["clamped_vs_claimed"]
            lines.append(
                f"| {name} | {state} | {e['method']} ({e['quantity'].replace('_', '-')}) | "
                f"{c['reference']:.4g} | "
                f"{h['reference']:.4g} | {c['bias']:+.1%} | {h['bias']:+.1%} | {c['rmse']:.1%} | "
                f"{c['mean_rel_se']:.1%} | {c['coverage']:.0%} | {h['coverage']:.0%} | "
                f"{e['seconds_median']:.2f} | "
                f"{e['loadavg_1min'][0]:.1f}-{e['loadavg_1min'][1]:.1f} | "
                f"{e['seeds_with_solver_warnings']} | "
                f"{cc['bias']:+.1%} / {cc['mean_rel_se']:.1%} / {cc['coverage']:.0%} | "
                f"{_flagged(e)} |"
            )
    lines += [
        "",
        "Matrix-normalized sharpness (eq. 13) and Hessian trace (eq. 5), against the claimed quantity:",
        "",
        "| model | state | eq. 13 bias | eq. 13 coverage | trace bias | trace coverage |",
        "|---|---|---|---|---|---|",
    ]
    for name, states in results["models"].items():
        for state, e in states.items():
            mn, tr = e["vs_claimed"]["matrix_normalized"], e["vs_claimed"]["hessian_trace"]
            lines.append(
                f"| {name} | {state} | {mn['bias']:+.1%} | {mn['coverage']:.0%} | {tr['bias']:+.1%} | "
                f"{tr['coverage']:.0%} |"
            )
    lines += [
        "",
        "Extrapolated to infinite samples (value minus its half shift: removes a bias falling like 1/n, "
        "41% of one falling like 1/sqrt(n)), against the claimed quantity, with the value's standard "
        "error:",
        "",
        "| model | state | bias | extrapolated bias | RMS | extrapolated RMS | coverage "
        "| extrapolated coverage |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, states in results["models"].items():
        for state, e in states.items():
            c, x = e["vs_claimed"]["normalized"], e.get("extrapolated_vs_claimed")
            if x is not None:
                lines.append(
                    f"| {name} | {state} | {c['bias']:+.1%} | {x['bias']:+.1%} | {c['rmse']:.1%} | "
                    f"{x['rmse']:.1%} | {c['coverage']:.0%} | {x['coverage']:.0%} |"
                )
    lines += ["", "Reasons auto gave:", ""]
    for name, states in results["models"].items():
        e = next(iter(states.values()))
        lines.append(f"- {name}: `{e['method']}`: {e['reason']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict[str, Any]:
    parser = base_parser(__doc__)
    parser.add_argument("--models", nargs="*", default=None, choices=list(MODELS))
    parser.add_argument("--states", nargs="*", default=["untrained"], choices=["untrained", "trained"])
    parser.add_argument("--pool", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--hvp-budget", type=int, default=256, help="sample-HVPs per vmapped brute-force call"
    )
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument(
        "--method",
        default="auto",
        help="estimator (default auto: what a user gets); e.g. gauss_newton_sketch",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.pool, args.seeds, args.batches, args.batch_size = (
            args.models or ["resnet"],
            8,
            3,
            8,
            2,
        )
    args.command = "python -m benchmarks.bench_zoo_auto " + " ".join(
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
