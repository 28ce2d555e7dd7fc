"""Our K-independent Gauss-Newton estimators beside BackPACK's ``DiagGGNMC``: error against cost.

Issue 8's target: "beside BackPACK ``DiagGGNMC`` on the models it supports: equal or lower error at
equal cost". Per model (the paper's MLP and 1-D LeNet, the small 1-D ResNet of ``common.py`` with
BatchNorm in eval mode, through BackPACK's converter), at random and briefly trained weights, on a
fixed pool of MNIST-1D training samples cut into batches, with the mean cross-entropy (the loss
``DiagGGNMC`` supports):

- **Reference**: the exact Gauss-Newton diagonal of each batch (our ``exact``, itself tested against
  brute force), averaged over the batches; cross-checked against BackPACK ``DiagGGNExact``.
- **Candidates**: BackPACK ``DiagGGNMC(mc_samples=m)``; ours ``gauss_newton_mc`` (``num_mc_samples``
  draws ``y ~ p``, ``exact_classes`` most probable classes exact; ``D1 m0`` is BackPACK's estimator)
  and ``gauss_newton_sketch`` (``num_sketches`` random-sign mixtures of the exact factors, one backward
  column each); ours ``exact`` as the zero-error point.
- **Error**, over ``--seeds`` seeds of the draws (model and data fixed): the relative L2 error of the
  pooled diagonal (every selected tensor, weights and biases, concatenated), and the bias and RMS of
  the normalized sharpness (eq. 17, ``sharpness_measures(...)["normalized"]``) and of the trace (eq. 5)
  relative to the exact-GGN values.
- **Cost**: wall time per batch, one thread, medians of interleaved repeats (every candidate once per
  round).
- **Equal cost**: BackPACK's error interpolated (log-log, between its ``mc_samples`` points) at each
  of our candidates' time.

Eq. 20 (:func:`normalized_softmax_cross_entropy`): BackPACK cannot compute its Gauss-Newton diagonal.
Its second-order extensions need the loss to be one of its loss modules (``CrossEntropyLoss``,
``MSELoss``, ``BCEWithLogitsLoss``), and a normalization put in front of ``CrossEntropyLoss`` as a
network module is (a) not a module BackPACK has an extension for and (b) even with one, its own
curvature ``M = sum_i r_i nabla^2 u_i`` would be dropped (the GGN would be taken in the normalized
logits, not in the raw logits of eq. 20). The script checks (a) and records BackPACK's message.

    python -W ignore -m benchmarks.bench_diagggnmc --json benchmarks/results/bench_diagggnmc.json
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import (
    base_parser,
    build_model,
    environment,
    markdown_table,
    mnist1d,
    model_inputs,
    train,
    weight_parameters,
    write_json,
)

Diag = dict[str, Tensor]
BP_MC = (1, 2, 4, 8, 16, 32)
OURS_MC = ((1, 0), (2, 0), (4, 0), (1, 2), (2, 2), (4, 2), (8, 2))  # (draws, exact classes); (1, 2) default
OURS_SKETCH = (1, 2, 4)  # num_sketches; 1 is the default


def load_average() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


def model_and_pool(
    name: str, state: str, pool: int, seed: int, epochs: int, classes: int = 10
) -> tuple[nn.Module, Tensor, Tensor]:
    """A model in eval mode (random, or ``epochs`` of Adam on MNIST-1D) and ``pool`` training samples."""
    from lightning_flatness.reference_models import lenet1d, mlp

    data = mnist1d()
    torch.manual_seed(seed)
    if classes == 10:
        model = build_model(name)
    elif name == "mlp":
        model = mlp(num_classes=classes)
    elif name == "lenet":
        model = lenet1d(num_classes=classes)[1:]
    else:
        raise ValueError(f"--classes {classes} is for the MLP and LeNet; the ResNet has 10 classes.")
    x_all = model_inputs(name, data.x_train)
    if state == "trained":
        train(model, x_all, data.y_train, epochs, seed)
    model.eval()
    idx = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed + 1))[:pool]
    return model, x_all[idx], data.y_train[idx]


class BackpackCandidate:
    """BackPACK ``DiagGGNMC(mc_samples)`` / ``DiagGGNExact`` on an extended deep copy of ``model``."""

    def __init__(self, model: nn.Module, selected: set[str], mc_samples: Optional[int]):
        from backpack import extend
        from backpack.extensions import DiagGGNExact, DiagGGNMC

        self.model = copy.deepcopy(model)
        for name, p in self.model.named_parameters():
            p.requires_grad_(name in selected)
        converter = any(isinstance(m, nn.BatchNorm1d) for m in model.modules())  # residual sums
        self.model = extend(self.model, use_converter=converter)
        self.loss = extend(nn.CrossEntropyLoss())
        self.ext = DiagGGNExact() if mc_samples is None else DiagGGNMC(mc_samples=mc_samples)
        self.attr = "diag_ggn_exact" if mc_samples is None else "diag_ggn_mc"
        self.named = [
            (n.replace("_original_module.", ""), p)
            for n, p in self.model.named_parameters()
            if p.requires_grad
        ]

    def __call__(self, x: Tensor, y: Tensor, generator: Optional[torch.Generator]) -> Diag:
        from backpack import backpack

        loss = self.loss(self.model(x), y)
        with backpack(self.ext):
            loss.backward()
        out = {}
        for n, p in self.named:
            out[n] = getattr(p, self.attr).detach().clone()
            delattr(p, self.attr)
            p.grad = None
        return out


def ours(
    model: nn.Module, params: dict[str, nn.Parameter], method: str, **options: Any
) -> Callable[..., Diag]:
    from lightning_flatness.functional.estimators.exact import exact_hessian_diagonal
    from lightning_flatness.functional.estimators.gauss_newton_mc import gauss_newton_mc_diagonal
    from lightning_flatness.functional.estimators.gauss_newton_sketch import gauss_newton_sketch_diagonal

    def fn(x: Tensor, y: Tensor, generator: Optional[torch.Generator]) -> Diag:
        if method == "exact":
            return exact_hessian_diagonal(model, F.cross_entropy, x, y, params)
        if method == "mc":
            return gauss_newton_mc_diagonal(
                model, F.cross_entropy, x, y, params, generator=generator, **options
            )
        return gauss_newton_sketch_diagonal(
            model, F.cross_entropy, x, y, params, generator=generator, **options
        )

    return fn


def candidates(
    model: nn.Module, params: dict[str, nn.Parameter], classes: int
) -> dict[str, Callable[..., Diag]]:
    out: dict[str, Callable[..., Diag]] = {"ours exact": ours(model, params, "exact")}
    if classes <= 100:  # K backward columns each: the cross-check is kept to few classes
        out["BackPACK DiagGGNExact"] = BackpackCandidate(model, set(params), None)
    for m in BP_MC:
        out[f"BackPACK MC {m}"] = BackpackCandidate(model, set(params), m)
    for draws, exact in OURS_MC:
        out[f"ours mc D{draws} m{exact}"] = ours(
            model, params, "mc", num_mc_samples=draws, exact_classes=exact
        )
    for s in OURS_SKETCH:
        out[f"ours sketch S{s}"] = ours(model, params, "sketch", num_sketches=s)
    return out


def pooled(fn: Callable[..., Diag], batches: list[tuple[Tensor, Tensor]], seed: int) -> Diag:
    """Mean of the per-batch diagonals (equal batch sizes: the pool's mean-loss diagonal)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # BackPACK draws from the global RNG
    total: Optional[Diag] = None
    for x, y in batches:
        d = fn(x, y, gen)
        total = d if total is None else {k: total[k] + d[k] for k in total}
    assert total is not None
    return {k: v / len(batches) for k, v in total.items()}


def flat(d: Diag, names: list[str]) -> Tensor:
    return torch.cat([d[n].double().flatten() for n in names])


def measures(weights: dict[str, Tensor], d: Diag) -> tuple[float, float]:
    from lightning_flatness.functional.measures import sharpness_measures

    out = sharpness_measures(weights, {k: d[k].to(weights[k].dtype) for k in weights})
    return float(out["normalized"]), float(out["hessian_trace"])


def time_per_batch(
    fns: dict[str, Callable[..., Diag]], batches: list[tuple[Tensor, Tensor]], repeats: int
) -> dict[str, float]:
    """Median seconds per batch; each round runs every candidate once on the next batch."""
    gen = torch.Generator().manual_seed(12345)
    for fn in fns.values():  # warm-up
        fn(*batches[0], gen)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        x, y = batches[r % len(batches)]
        for key, fn in fns.items():
            start = time.perf_counter()
            fn(x, y, gen)
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def backpack_at_cost(points: list[tuple[float, float, int]], t: float) -> tuple[float, int, str]:
    """BackPACK's lowest error among its ``(time, error, mc_samples)`` points that cost at most ``t``;
    when even ``mc_samples=1`` costs more than ``t``, that point (BackPACK cannot be cheaper), flagged."""
    within = [p for p in points if p[0] <= t]
    if within:
        best = min(within, key=lambda p: p[1])
        return best[1], best[2], ""
    cheapest = min(points)
    return cheapest[1], cheapest[2], f"BackPACK's cheapest costs {cheapest[0] / t:.2f}x ours"


def equal_cost_backpack(diag_points, ns_points, seconds: float) -> dict[str, Any]:
    """BackPACK's error at our cost ``seconds`` (:func:`backpack_at_cost`): for the diagonal and eq. 17."""
    bp_diag, bp_m, note = backpack_at_cost(diag_points, seconds)
    bp_ns, bp_m_ns, _ = backpack_at_cost(ns_points, seconds)
    return {
        "bp_diag_at_cost": bp_diag,
        "bp_mc_diag": bp_m,
        "bp_ns_rms_at_cost": bp_ns,
        "bp_mc_ns": bp_m_ns,
        "note": note,
    }


def eq20_with_backpack() -> str:
    """Whether BackPACK's DiagGGNMC runs when eq. 20's normalization is a module in front of
    ``CrossEntropyLoss`` (the only way to express eq. 20 to BackPACK)."""
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNMC

    class Normalize(nn.Module):
        def forward(self, z: Tensor) -> Tensor:
            from lightning_flatness.functional.losses import normalize_logits

            return normalize_logits(z)

    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 5), Normalize()))
    loss = extend(nn.CrossEntropyLoss())(model(torch.randn(8, 4)), torch.randint(0, 5, (8,)))
    try:
        with backpack(DiagGGNMC(mc_samples=1)):
            loss.backward()
    except Exception as err:  # noqa: BLE001 - recorded, not raised
        return f"{type(err).__name__}: {str(err)[:200]}"
    got = [hasattr(p, "diag_ggn_mc") for p in model.parameters()]
    return (
        f"no error; diag_ggn_mc set on {sum(got)}/{len(got)} parameters "
        "(the GGN in the normalized logits, without M)"
    )


def run(args) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"environment": environment(), "args": vars(args) | {"json": str(args.json)}}
    results["eq20_backpack"] = eq20_with_backpack()
    print("eq. 20 through BackPACK DiagGGNMC:", results["eq20_backpack"], flush=True)
    rows = []
    for name in args.models:
        for state in args.states:
            model, x, y = model_and_pool(name, state, args.pool, args.seed, args.epochs, args.classes)
            params = weight_parameters(model)
            names = list(params)
            weights = {n: p.detach() for n, p in params.items()}
            batches = list(zip(x.split(args.batch), y.split(args.batch)))
            fns = candidates(model, params, args.classes)
            load0 = load_average()
            ref = pooled(fns["ours exact"], batches, 0)
            ref_flat = flat(ref, names)
            cross = float("nan")
            if "BackPACK DiagGGNExact" in fns:
                bp_exact = pooled(fns["BackPACK DiagGGNExact"], batches, 0)
                cross = float((flat(bp_exact, names) - ref_flat).norm() / ref_flat.norm())
            ref_ns, ref_tr = measures(weights, ref)
            with torch.no_grad():
                acc = float((model(x).argmax(1) == y).float().mean())
            print(
                f"\n{name} {state}: pool {args.pool} in batches of {args.batch}, accuracy {acc:.2f}, "
                f"exact GGN: eq. 17 {ref_ns:.4g}, trace {ref_tr:.4g}; BackPACK DiagGGNExact vs ours "
                f"{cross:.2e} (relative L2), load {load0}",
                flush=True,
            )
            stats: dict[str, dict[str, list[float]]] = {}
            for key, fn in fns.items():
                if key in ("ours exact", "BackPACK DiagGGNExact"):
                    continue
                rec: dict[str, list[float]] = {"diag": [], "ns": [], "tr": []}
                for seed in range(args.seeds):
                    est = pooled(fn, batches, 1000 + seed)
                    rec["diag"].append(float((flat(est, names) - ref_flat).norm() / ref_flat.norm()))
                    ns, tr = measures(weights, est)
                    rec["ns"].append(ns / ref_ns - 1)
                    rec["tr"].append(tr / ref_tr - 1)
                stats[key] = rec
            times = time_per_batch(fns, batches, args.repeats)
            load1 = load_average()
            bp_ns_pts = [(times[f"BackPACK MC {m}"], rms(stats[f"BackPACK MC {m}"]["ns"]), m) for m in BP_MC]
            bp_diag_pts = [
                (times[f"BackPACK MC {m}"], statistics.mean(stats[f"BackPACK MC {m}"]["diag"]), m)
                for m in BP_MC
            ]
            for key in fns:
                row: dict[str, Any] = {
                    "model": name,
                    "classes": args.classes,
                    "state": state,
                    "estimator": key,
                    "ms": 1e3 * times[key],
                    "vs_mc1": times[key] / times["BackPACK MC 1"],
                }
                if key in stats:
                    rec = stats[key]
                    row.update(
                        diag_rel_l2=statistics.mean(rec["diag"]),
                        ns_bias=statistics.mean(rec["ns"]),
                        ns_rms=rms(rec["ns"]),
                        trace_bias=statistics.mean(rec["tr"]),
                        trace_rms=rms(rec["tr"]),
                        ns_values=rec["ns"],
                        diag_values=rec["diag"],
                    )
                    if not key.startswith("BackPACK"):
                        row.update(equal_cost_backpack(bp_diag_pts, bp_ns_pts, times[key]))
                elif key.startswith("ours exact"):
                    row.update(diag_rel_l2=0.0, ns_bias=0.0, ns_rms=0.0)
                    row.update(equal_cost_backpack(bp_diag_pts, bp_ns_pts, times[key]))
                else:
                    row.update(
                        diag_rel_l2=cross if key.startswith("BackPACK") else 0.0, ns_bias=0.0, ns_rms=0.0
                    )
                row.update(ref_ns=ref_ns, ref_trace=ref_tr, accuracy=acc, load=f"{load0}-{load1}")
                rows.append(row)
            print_table([r for r in rows if r["model"] == name and r["state"] == state])
    results["rows"] = rows
    return results


def rms(values: list[float]) -> float:
    return math.sqrt(statistics.mean(v * v for v in values))


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = [
        "estimator",
        "ms",
        "vs_mc1",
        "diag_rel_l2",
        "ns_bias",
        "ns_rms",
        "trace_bias",
        "trace_rms",
        "bp_diag_at_cost",
        "bp_mc_diag",
        "bp_ns_rms_at_cost",
        "bp_mc_ns",
        "note",
    ]
    print(markdown_table(rows, cols), flush=True)


def summarize(rows: list[dict[str, Any]]) -> str:
    """The comparison at equal cost, per model and state, from the rows of a run: for each of our
    estimators, BackPACK's lowest error among its ``mc_samples`` settings that cost no more (or its
    cheapest, flagged, when none does)."""
    out = []
    cases = dict.fromkeys((r["model"], r.get("classes", 10), r["state"]) for r in rows)
    for model, classes, state in cases:
        case = [r for r in rows if (r["model"], r.get("classes", 10), r["state"]) == (model, classes, state)]
        bp = [r for r in case if r["estimator"].startswith("BackPACK MC")]
        diag_pts = [(r["ms"], r["diag_rel_l2"], int(r["estimator"].split()[-1])) for r in bp]
        ns_pts = [(r["ms"], r["ns_rms"], int(r["estimator"].split()[-1])) for r in bp]
        table = []
        for r in case:
            if r["estimator"].startswith("BackPACK"):
                continue
            bd, md, note = backpack_at_cost(diag_pts, r["ms"])
            bn, mn, _ = backpack_at_cost(ns_pts, r["ms"])
            table.append(
                {
                    "estimator": r["estimator"],
                    "ms": r["ms"],
                    "vs_mc1": r["vs_mc1"],
                    "diag_rel_l2": r["diag_rel_l2"],
                    "BackPACK diag (mc)": f"{bd:.3g} ({md})",
                    "eq17_rms": r["ns_rms"],
                    "BackPACK eq17 rms (mc)": f"{bn:.3g} ({mn})",
                    "ours lower": "both"
                    if r["diag_rel_l2"] <= bd and r["ns_rms"] <= bn
                    else "diag"
                    if r["diag_rel_l2"] <= bd
                    else "eq17"
                    if r["ns_rms"] <= bn
                    else "no",
                    "note": note,
                }
            )
        out.append(f"\n#### {model}, {classes} classes, {state}\n")
        out.append(markdown_table(table, list(table[0])))
    return "\n".join(out)


def main(argv=None) -> dict[str, Any]:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "lenet", "resnet"])
    parser.add_argument("--states", nargs="+", default=["untrained", "trained"])
    parser.add_argument("--classes", type=int, default=10, help="outputs of the MLP / LeNet (the ResNet: 10)")
    parser.add_argument("--pool", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--epochs", type=int, default=5, help="Adam epochs for --states trained")
    parser.add_argument("--summarize", type=Path, default=None, help="print the equal-cost tables of a JSON")
    args = parser.parse_args(argv)
    if args.summarize is not None:
        print(summarize(json.loads(args.summarize.read_text())["rows"]))
        return {}
    if args.quick:
        args.models, args.states, args.pool, args.seeds, args.repeats = ["mlp"], ["untrained"], 128, 2, 2
    start = time.perf_counter()
    results = run(args)
    results["seconds"] = time.perf_counter() - start
    print(summarize(results["rows"]))
    write_json(args.json, results)
    print(f"\n{results['seconds']:.0f} s", flush=True)
    return results


if __name__ == "__main__":
    main()
