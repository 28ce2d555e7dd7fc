"""How much of the normalized sharpness the residual ``H - GGN`` carries on the zoo models, and
whether an independent Hutchinson probe per *sample* estimates it better than batch-level probes
at equal cost (issue 8, item 2).

For each tiny zoo model (``tests/zoo_models.py``: torchvision ResNet / MobileNetV3, timm ViT /
ConvNeXt, Hugging Face BERT classifier / GPT-2 LM), untrained and after ``--steps`` full-batch Adam
steps (cross-entropy, lr ``--lr``) on its synthetic batch of ``--samples`` samples, in float64:

1. Brute force (``tests/zoo_oracle.py``): ``diag(H)`` of the measurement loss (the library default,
   normalized softmax cross-entropy, eq. 20-22; token-level for GPT-2) by one HVP per weight, and
   the exact ``diag(GGN) = diag(J^T Lambda J)``. Per layer and in total: the Hessian trace (eq. 5)
   and the normalized sharpness (eq. 17, ``sharpness_measures``) on ``diag(H)`` and on
   ``diag(GGN)``; the residual's share is ``1 - value(GGN) / value(H)``. Measured on the
   ``"weights"`` preset (every ndim >= 2 tensor), so the share of the additive offsets (``pos_embed``,
   ``cls_token``, position embeddings), which the default selection leaves out, is reported too.
2. The residual probed at equal cost, ``--replicates`` independent runs each:
   - *batch*: ``diag(GGN) + mean_p v_p * (R v_p)``, ``P`` probes of the batch residual
     ``R = sum_n R_n`` (``R_n`` the Hessian of ``g_n . f_n(w)``, ``g_n = dL/df_n`` fixed): ``P``
     batch HVPs (what ``ggn_hutchinson`` does);
   - *per sample*: ``diag(GGN) + sum_n mean_p v_np * (R_n v_np)``, ``P`` independent probes per
     sample: ``N P`` single-sample HVPs, the flops of ``P`` batch HVPs.
   Only tensors with a nonzero residual diagonal are probed (as ``ggn_hutchinson`` does). Both are
   unbiased for ``diag(H)``; the bias and spread of the normalized sharpness (which is
   nonlinear in the diagonal) are reported relative to its brute-force value.

Run: ``python -m benchmarks.bench_zoo_residual --json benchmarks/results/bench_zoo_residual.json``
(writes ``bench_zoo_residual.md`` beside the JSON).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap

from benchmarks.common import base_parser, run_timed, setup
from lightning_flatness.functional.losses import normalized_softmax_cross_entropy
from lightning_flatness.functional.measures import sharpness_measures
from lightning_flatness.functional.model_io import call_model, inputs_batch_size, select_samples
from lightning_flatness.functional.parameters import is_additive_offset, select_parameters
from lightning_flatness.functional.twice_differentiable import twice_differentiable
from tests.zoo_models import TINY, zoo_loss
from tests.zoo_oracle import brute_force_ggn_diagonal, brute_force_hessian_diagonal


def _to64(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    return {k: _to64(v) for k, v in x.items()}


def train(model, x, y, name, steps, lr):
    """Full-batch Adam on the synthetic batch (cross-entropy; eval mode: BatchNorm statistics fixed)."""
    model = copy.deepcopy(model).float()
    x = {k: v for k, v in x.items()} if isinstance(x, dict) else x.float()
    loss_fn = zoo_loss(name, F.cross_entropy)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(call_model(model, x), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return model, float(loss_fn(call_model(model, x), y))


def residual_probes(model, loss_fn, x, y, names, num_probes, per_sample, generator):
    """One estimate of ``diag(R)``, ``R = H - GGN``: batch-level or per-sample Rademacher probes."""
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    with twice_differentiable(model):
        logits = call_model(model, x).detach().requires_grad_(True)
        (coef,) = torch.autograd.grad(loss_fn(logits, y), logits)  # g = dL/df, fixed

        def phi(theta, inputs, g):
            return (call_model(lambda *a, **k: functional_call(model, theta, a, k), inputs) * g).sum()

        def estimate(inputs, g):
            grad_fn = grad(lambda th: phi(th, inputs, g))
            probes = {
                n: torch.randint(0, 2, (num_probes, *p.shape), generator=generator, dtype=p.dtype)
                .mul_(2)
                .sub_(1)
                for n, p in params.items()
            }
            hv = vmap(lambda v: jvp(grad_fn, (params,), (v,))[1])(probes)
            return {n: (probes[n] * hv[n]).mean(0) for n in params}

        if not per_sample:
            return estimate(x, coef)
        n_samples = inputs_batch_size(x)
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        for i in range(n_samples):
            one = estimate(select_samples(x, slice(i, i + 1), n_samples), coef[i : i + 1])
            for n in total:
                total[n] += one[n]
        return total


def measures(weights, diag, names):
    sub = {n: weights[n] for n in names}
    out = sharpness_measures(sub, {n: diag[n] for n in names})
    return {k: float(v) for k, v in out.items()}


def study(name, model, x, y, args, generator) -> dict[str, Any]:
    loss_fn = zoo_loss(name, normalized_softmax_cross_entropy)
    model = copy.deepcopy(model).double().eval()
    x = _to64(x)
    every = list(select_parameters(model, "weights"))
    default = list(select_parameters(model))
    offsets = [n for n in every if is_additive_offset(model, n)]
    weights = {n: p.detach() for n, p in model.named_parameters() if n in every}
    t0 = time.perf_counter()
    # chunk of unit vectors per vmapped call: bounds memory to about 1024 sample-HVPs at once
    h = brute_force_hessian_diagonal(model, loss_fn, x, y, every, chunk=max(4, 1024 // args.samples))
    t_brute = time.perf_counter() - t0
    g = brute_force_ggn_diagonal(model, loss_fn, x, y, every)
    mh, mg = measures(weights, h, every), measures(weights, g, every)
    md_h, md_g = measures(weights, h, default), measures(weights, g, default)
    layers = {}
    for n in every:
        layers[n] = {
            "trace_H": mh[f"hessian_trace/{n}"],
            "trace_GGN": mg[f"hessian_trace/{n}"],
            "normalized_H": mh[f"normalized/{n}"],
            "normalized_GGN": mg[f"normalized/{n}"],
            "additive_offset": n in offsets,
        }
    result = {
        "brute_force_seconds": t_brute,
        "num_weights": sum(weights[n].numel() for n in every),
        "default": {
            "normalized_H": md_h["normalized"],
            "normalized_GGN": md_g["normalized"],
            "trace_H": md_h["hessian_trace"],
            "trace_GGN": md_g["hessian_trace"],
        },
        "weights_preset": {
            "normalized_H": mh["normalized"],
            "normalized_GGN": mg["normalized"],
            "trace_H": mh["hessian_trace"],
            "trace_GGN": mg["hessian_trace"],
        },
        "offsets_normalized_H": sum(mh[f"normalized/{n}"] for n in offsets),
        "layers": layers,
        "probes": {},
    }
    true_ns = md_h["normalized"]
    # Probe only tensors whose residual diagonal is nonzero, as ggn_hutchinson does (its static analysis
    # finds the tensors downstream of which the network is piecewise linear): R has nonzero off-diagonal
    # blocks even where diag(R) = 0, and probing those would add pure noise.
    probed = [
        n for n in default if float((h[n] - g[n]).abs().max()) > 1e-9 * float(h[n].abs().max() + 1e-300)
    ]
    result["probed"] = probed
    for per_sample in (False, True):
        for p in args.probes:
            values, seconds = [], []
            for _ in range(args.replicates):
                t0 = time.perf_counter()
                r = residual_probes(model, loss_fn, x, y, probed, p, per_sample, generator) if probed else {}
                seconds.append(time.perf_counter() - t0)
                values.append(
                    measures(weights, {n: g[n] + r.get(n, 0.0) for n in default}, default)["normalized"]
                )
            mean, sd = statistics.fmean(values), statistics.stdev(values)
            result["probes"][f"{'per_sample' if per_sample else 'batch'}_P{p}"] = {
                "bias": (mean - true_ns) / true_ns,
                "sd": sd / true_ns,
                "rmse": math.sqrt((mean - true_ns) ** 2 + sd**2) / true_ns,
                "seconds": statistics.median(seconds),
            }
    return result


def run(args) -> dict[str, Any]:
    names = args.models or list(TINY)
    generator = torch.Generator().manual_seed(args.seed)
    out: dict[str, Any] = {
        "command": args.command,
        "samples": args.samples,
        "steps": args.steps,
        "lr": args.lr,
        "replicates": args.replicates,
        "probes": args.probes,
        "models": {},
    }
    for name in names:
        model, (x, y) = TINY[name](n=args.samples, seed=args.seed)
        trained, final_loss = train(model, x, y, name, args.steps, args.lr)
        out["models"][name] = {}
        for state, m in (("untrained", model), ("trained", trained)):
            if state not in args.states:
                continue
            res = study(name, m, x, y, args, generator)
            res["train_loss_ce"] = final_loss if state == "trained" else None
            out["models"][name][state] = res
            d = res["default"]
            print(
                f"{name:13s} {state:9s} NS(H)={d['normalized_H']:.4g} NS(GGN)={d['normalized_GGN']:.4g} "
                f"trH={d['trace_H']:.4g} trGGN={d['trace_GGN']:.4g} brute {res['brute_force_seconds']:.1f}s "
                + " ".join(f"{k}: {v['bias']:+.3f}/{v['sd']:.3f}" for k, v in res["probes"].items()),
                flush=True,
            )
    return out


def _share(h: float, g: float) -> str:
    return f"{1 - g / h:+.1%}" if h else "-"


def markdown(results: dict[str, Any]) -> str:
    env = results.get("environment", {})
    lines = [
        "# Residual H - GGN on the zoo models, and per-sample vs batch residual probes",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {env.get('cpu', '?')}, {env.get('threads', '?')} thread(s), "
        f"torch {env.get('torch', '?')}; "
        f"total {results.get('seconds', 0):.0f} s.  ",
        f"Setting: tiny zoo models (tests/zoo_models.py), float64, {results['samples']} samples, "
        f"measurement loss "
        f"normalized softmax cross-entropy (eq. 20-22; token-level for GPT-2), lam = 0.5; 'trained' = "
        f"{results['steps']} full-batch Adam steps (lr {results['lr']}, cross-entropy) on the same samples.",
        "",
        "## 1. Share of the residual (brute force; default selection)",
        "",
        "share = 1 - value(GGN) / value(H): the part of the normalized sharpness (eq. 17) and of the Hessian "
        "trace (eq. 5) that the Gauss-Newton diagonal alone misses (negative: GGN overstates). 'offsets' = "
        "normalized sharpness of pos_embed/cls_token/position embeddings as a fraction of the default total "
        "(they are left out of the default selection; the 'weights' preset would add them).",
        "",
        "| model | state | NS(H) | NS(GGN) | NS share | trace(H) | trace(GGN) | trace share "
        "| offsets / NS | CE loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, states in results["models"].items():
        for state, r in states.items():
            d = r["default"]
            off = r["offsets_normalized_H"] / d["normalized_H"] if r["offsets_normalized_H"] else 0.0
            loss = f"{r['train_loss_ce']:.3f}" if r["train_loss_ce"] is not None else "-"
            lines.append(
                f"| {name} | {state} | {d['normalized_H']:.4g} | {d['normalized_GGN']:.4g} | "
                f"{_share(d['normalized_H'], d['normalized_GGN'])} | {d['trace_H']:.4g} "
                f"| {d['trace_GGN']:.4g} "
                f"| {_share(d['trace_H'], d['trace_GGN'])} | {off:.1%} | {loss} |"
            )
    lines += [
        "",
        "### Per layer (normalized sharpness, eq. 17)",
        "",
        "| model | state | layer | NS(H) | NS(GGN) | share | trace(H) | trace(GGN) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, states in results["models"].items():
        for state, r in states.items():
            for layer, v in r["layers"].items():
                tag = " (offset)" if v["additive_offset"] else ""
                lines.append(
                    f"| {name} | {state} | {layer}{tag} | {v['normalized_H']:.4g} "
                    f"| {v['normalized_GGN']:.4g} | "
                    f"{_share(v['normalized_H'], v['normalized_GGN'])} | {v['trace_H']:.4g} "
                    f"| {v['trace_GGN']:.4g} |"
                )
    lines += [
        "",
        "## 2. Residual probes at equal cost: batch-level vs per-sample",
        "",
        f"Normalized sharpness (default selection) of diag(GGN) + probed residual; bias and sd over "
        f"{results['replicates']} independent runs, relative to the brute-force value; P probes per batch "
        f"(batch) or per sample (per_sample): equal flops. Seconds: median per run "
        f"(per-sample runs loop over "
        f"samples in Python here, so their wall time is not the flop count).",
        "",
        "| model | state | estimator | bias | sd | rmse | s/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, states in results["models"].items():
        for state, r in states.items():
            for key, v in r["probes"].items():
                lines.append(
                    f"| {name} | {state} | {key} | {v['bias']:+.2%} | {v['sd']:.2%} | {v['rmse']:.2%} | "
                    f"{v['seconds']:.3f} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    import sys

    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", choices=sorted(TINY))
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--replicates", type=int, default=16)
    parser.add_argument("--probes", type=int, nargs="*", default=[4, 16])
    parser.add_argument(
        "--states", nargs="*", default=["untrained", "trained"], choices=["untrained", "trained"]
    )
    args = parser.parse_args()
    if args.quick:
        args.models, args.samples, args.steps, args.replicates, args.probes = ["vit"], 4, 5, 3, [2]
    args.command = "python -m benchmarks.bench_zoo_residual " + " ".join(sys.argv[1:])
    setup(args)
    results = run_timed(run, args)
    if args.json is not None:
        Path(args.json).with_suffix(".md").write_text(markdown({**results, "environment": _env()}))


def _env():
    from benchmarks.common import environment

    return environment()


if __name__ == "__main__":
    main()
