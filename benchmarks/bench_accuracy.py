"""Accuracy of normalized sharpness (eq. 17) per unit of compute: exact vs Hutchinson vs the paper's
finite differences (Algorithm 1 / eq. 61, step r = relative_step * ||W||_F / sqrt(numel(W))).

For each model (MLP, LeNet-style CNN, small ResNet in eval mode; briefly trained on MNIST-1D) and
the normalized-softmax-cross-entropy (eq. 20) of the *training set*:

1. Reference: ``method="exact"`` over all N training samples (4000), computed as N/32 groups of 32
   randomly ordered samples, so the exact diagonal of any random subset of k*32 samples is the mean
   of k groups (no recomputation).
2. Data part of the error: exact on random subsets of n samples vs the reference (many seeds).
3. Probe part of the error: Hutchinson and finite differences with P probes on a random subset of
   n0 samples vs exact on the same subset; P doubles with nested probes (the estimate at 2P reuses
   the first P probes), cost = cumulative wall time, also expressed in gradient evaluations of the
   mean loss over the n0 samples (measured in the same run).
4. Error bars: the library's defaults (``SharpnessMonitor``: 512 samples, 8 groups, 64 probes) over
   many seeds; the reported jackknife standard error vs the actual error against the full-set
   reference (coverage of +-1 and +-1.96 standard errors).

Errors are relative, ``|S_hat - S_ref| / S_ref``, summarised by their root-mean-square over seeds.

    python -m benchmarks.bench_accuracy --json benchmarks/results_accuracy.json --plot benchmarks/accuracy.png
    python -m benchmarks.bench_accuracy --quick
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import torch
from torch import Tensor

from benchmarks.common import (
    MODELS,
    base_parser,
    gradient_fn,
    largest_layer,
    markdown_table,
    run_timed,
    setup,
    time_call,
    trained_model,
    weight_parameters,
)

GROUP = 32  # samples per reference group
TARGET = 0.05
EPOCHS = {"mlp": 20, "lenet": 10, "resnet": 5}


def _measures(weights: dict[str, Tensor], diag: dict[str, Tensor], lam: float) -> dict[str, float]:
    from lightning_flatness.functional import sharpness_measures

    out = sharpness_measures(weights, diag, lam)
    return {k: float(v) for k, v in out.items() if k == "normalized" or k.startswith("normalized/")}


def _rms(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values)) if values else float("nan")


def _errors(values: dict[str, float], ref: dict[str, float], layer: str) -> dict[str, float]:
    """Relative errors of the total, of ``layer`` and of every layer (``"layer/<name>"``)."""
    out = {
        "total": abs(values["normalized"] - ref["normalized"]) / ref["normalized"],
        "largest": abs(values[f"normalized/{layer}"] - ref[f"normalized/{layer}"])
        / ref[f"normalized/{layer}"],
    }
    for key in ref:
        if key.startswith("normalized/") and ref[key] > 0:
            out["layer/" + key.split("/", 1)[1]] = abs(values[key] - ref[key]) / ref[key]
    return out


class Reference:
    """The exact diagonal of ``N // GROUP`` random groups of the training set, and the full-set measures."""

    def __init__(self, model, x: Tensor, y: Tensor, lam: float, seed: int, num_samples: Optional[int] = None):
        from lightning_flatness.functional import hessian_diagonal_groups, normalized_softmax_cross_entropy

        gen = torch.Generator().manual_seed(seed)
        n = (num_samples or len(x)) // GROUP * GROUP
        self.order = torch.randperm(len(x), generator=gen)[:n]
        self.x, self.y = x[self.order], y[self.order]
        start = time.perf_counter()
        est = hessian_diagonal_groups(
            model, normalized_softmax_cross_entropy, self.x, self.y, method="exact", num_groups=n // GROUP
        )
        self.seconds = time.perf_counter() - start
        self.groups = est.groups  # {name: (G, *shape)}
        self.num_groups = n // GROUP
        self.weights = {k: p.detach() for k, p in weight_parameters(model).items()}
        self.lam = lam
        self.measures = _measures(self.weights, est.mean(), lam)

    def subset(self, k: int, gen: torch.Generator) -> Tensor:
        """Indices of ``k`` random groups."""
        return torch.randperm(self.num_groups, generator=gen)[:k]

    def samples(self, groups: Tensor) -> tuple[Tensor, Tensor]:
        idx = torch.cat([torch.arange(g * GROUP, (g + 1) * GROUP) for g in groups.tolist()])
        return self.x[idx], self.y[idx]

    def exact_measures(self, groups: Tensor) -> dict[str, float]:
        diag = {n: g[groups].mean(0) for n, g in self.groups.items()}
        return _measures(self.weights, diag, self.lam)


def data_part(ref: Reference, sizes: list[int], seeds: int, layer: str, seed: int) -> list[dict[str, Any]]:
    rows = []
    gen = torch.Generator().manual_seed(seed + 1)
    for n in sizes:
        errs = [
            _errors(ref.exact_measures(ref.subset(n // GROUP, gen)), ref.measures, layer)
            for _ in range(seeds)
        ]
        rows.append(
            {
                "samples": n,
                "rms_total": _rms([e["total"] for e in errs]),
                "rms_largest": _rms([e["largest"] for e in errs]),
                "rms_worst_layer": max(_rms([e[k] for e in errs]) for k in errs[0] if k.startswith("layer/")),
            }
        )
    return rows


def probe_part(
    model, ref: Reference, method: str, n0: int, probes: list[int], seeds: int, layer: str, seed: int
) -> list[dict[str, Any]]:
    """Nested-probe sweep: rows per P with RMS relative errors and cumulative cost (median over seeds)."""
    from lightning_flatness.functional import hessian_diagonal_groups, normalized_softmax_cross_entropy

    gen_subset = torch.Generator().manual_seed(seed + 2)
    wx, wy = ref.samples(torch.arange(n0 // GROUP))  # warm-up (vmap tracing, allocator) outside the timings
    hessian_diagonal_groups(model, normalized_softmax_cross_entropy, wx, wy, method=method, num_probes=4)
    per_p: dict[int, dict[str, list[float]]] = {
        p: {"probe_total": [], "probe_largest": [], "total": [], "largest": [], "seconds": [], "worst": []}
        for p in probes
    }
    for s in range(seeds):
        groups = ref.subset(n0 // GROUP, gen_subset)
        x, y = ref.samples(groups)
        exact_sub = ref.exact_measures(groups)
        gen = torch.Generator().manual_seed(1000 * seed + s)
        sums: Optional[dict[str, Tensor]] = None
        done, seconds = 0, 0.0
        for p in probes:
            count = p - done
            start = time.perf_counter()
            est = hessian_diagonal_groups(
                model, normalized_softmax_cross_entropy, x, y, method=method, num_probes=count, generator=gen
            ).mean()
            seconds += time.perf_counter() - start
            est = {k: v.double() * count for k, v in est.items()}
            sums = est if sums is None else {k: sums[k] + est[k] for k in sums}
            done = p
            values = _measures(ref.weights, {k: (v / p).float() for k, v in sums.items()}, ref.lam)
            probe_err = _errors(values, exact_sub, layer)
            total_err = _errors(values, ref.measures, layer)
            rec = per_p[p]
            rec["probe_total"].append(probe_err["total"])
            rec["probe_largest"].append(probe_err["largest"])
            rec["total"].append(total_err["total"])
            rec["largest"].append(total_err["largest"])
            rec["worst"].append(max(v for k, v in probe_err.items() if k.startswith("layer/")))
            rec["seconds"].append(seconds)
    rows = []
    for p in probes:
        rec = per_p[p]
        rows.append(
            {
                "method": method,
                "probes": p,
                "seconds": sorted(rec["seconds"])[len(rec["seconds"]) // 2],
                "rms_probe_total": _rms(rec["probe_total"]),
                "rms_probe_largest": _rms(rec["probe_largest"]),
                "rms_probe_worst_layer": _rms(rec["worst"]),
                "rms_total_vs_full": _rms(rec["total"]),
                "rms_largest_vs_full": _rms(rec["largest"]),
            }
        )
    return rows


def coverage(
    model,
    ref: Reference,
    method: str,
    n: int,
    groups: int,
    probes: int,
    seeds: int,
    layer: str,
    lam: float,
    seed: int,
) -> dict[str, Any]:
    """The library's error bar (metric jackknife over ``groups`` slots) against the actual error."""
    from lightning_flatness.functional import hessian_diagonal_groups, normalized_softmax_cross_entropy
    from lightning_flatness.metric import NormalizedSharpness

    gen_subset = torch.Generator().manual_seed(seed + 3)
    gen = torch.Generator().manual_seed(seed + 4)
    z_total, z_largest, err_total, se_total, rel_se = [], [], [], [], []
    seconds = []
    for _ in range(seeds):
        chosen = ref.subset(n // GROUP, gen_subset)
        metric = NormalizedSharpness(ref.weights, lam=lam, num_replicates=groups)
        start = time.perf_counter()
        if method == "exact":  # identical to running the exact method on these samples in `groups` groups
            diag = {k: g[chosen] for k, g in ref.groups.items()}
            metric.update(diag, ref.weights, [GROUP] * len(chosen))
        else:
            x, y = ref.samples(chosen)
            est = hessian_diagonal_groups(
                model,
                normalized_softmax_cross_entropy,
                x,
                y,
                method=method,
                num_probes=probes,
                num_groups=groups,
                generator=gen,
            )
            metric.update_from_estimate(est, ref.weights)
        out = metric.compute()
        seconds.append(time.perf_counter() - start)
        value, se = float(out["normalized"]), float(out["normalized_stderr"])
        lv, lse = float(out[f"normalized/{layer}"]), float(out[f"normalized_stderr/{layer}"])
        z_total.append((value - ref.measures["normalized"]) / se)
        z_largest.append((lv - ref.measures[f"normalized/{layer}"]) / lse)
        err_total.append((value - ref.measures["normalized"]) / ref.measures["normalized"])
        se_total.append(se / ref.measures["normalized"])
        rel_se.append(se / value)

    def cover(z: list[float], k: float) -> float:
        return sum(abs(v) <= k for v in z) / len(z)

    return {
        "method": method,
        "samples": n,
        "groups": groups,
        "probes": probes if method != "exact" else 0,
        "seeds": seeds,
        "rms_error": _rms(err_total),
        "rms_stderr": _rms(se_total),
        "median_rel_stderr": sorted(rel_se)[len(rel_se) // 2],
        "max_rel_stderr": max(rel_se),
        "cover_1se_total": cover(z_total, 1.0),
        "cover_2se_total": cover(z_total, 1.96),
        "cover_1se_largest": cover(z_largest, 1.0),
        "cover_2se_largest": cover(z_largest, 1.96),
        "mean_z_total": sum(z_total) / len(z_total),
        "seconds": sorted(seconds)[len(seconds) // 2],
    }


def needed(rows: list[dict[str, Any]], x_key: str, err_key: str) -> tuple[Optional[int], str]:
    """Smallest ``x`` on the grid with error <= 5%. Otherwise, when the error still falls at least as
    ``x^-0.4`` between the last two grid points, the extrapolation ``x_last * (err_last / 5%)^(1/a)``
    with that log-log slope ``a`` (capped at 1); when it falls more slowly (a bias floor or heavy
    tails), no extrapolation."""
    for row in rows:
        if row[err_key] <= TARGET:
            return row[x_key], str(row[x_key])
    last = rows[-1]
    if not math.isfinite(last[err_key]) or last[err_key] <= 0:
        return None, "-"
    slope = 0.0
    if len(rows) >= 2 and rows[-2][err_key] > last[err_key] > 0:
        slope = math.log(rows[-2][err_key] / last[err_key]) / math.log(last[x_key] / rows[-2][x_key])
    if slope < 0.4:
        return (
            None,
            f"> {last[x_key]} (error {last[err_key]:.0%} falls only as x^-{max(slope, 0):.2f}: "
            f"not extrapolated)",
        )
    guess = last[x_key] * (last[err_key] / TARGET) ** (1 / min(1.0, slope))
    return None, f"> {last[x_key]} (~{guess:.2g} extrapolated, error ~ x^-{min(1.0, slope):.2f})"


def run(args) -> dict[str, Any]:
    from lightning_flatness.functional import normalized_softmax_cross_entropy

    quick = args.quick
    models = args.models or (["mlp"] if quick else list(MODELS))
    results: dict[str, Any] = {"config": {}, "models": {}}
    n0 = 64 if quick else args.probe_samples
    probe_max = (
        {"mlp": 4096, "lenet": 2048, "resnet": 128}
        if args.probe_max is None
        else {m: args.probe_max for m in MODELS}
    )
    sizes = [64, 128] if quick else [64, 128, 256, 512, 1024, 2048]
    data_seeds = 3 if quick else 50
    probe_seeds = (
        {"mlp": 3, "lenet": 3, "resnet": 2}
        if args.probe_seeds is None
        else {m: args.probe_seeds for m in MODELS}
    )
    cov_seeds = (
        {m: 2 for m in MODELS}
        if quick
        else (
            {"mlp": 20, "lenet": 20, "resnet": 10}
            if args.coverage_seeds is None
            else {m: args.coverage_seeds for m in MODELS}
        )
    )
    cov_samples = 128 if quick else 512
    cov_probes = 8 if quick else 64
    results["config"] = {
        "probe_samples": n0,
        "probe_max": probe_max,
        "data_sizes": sizes,
        "data_seeds": data_seeds,
        "probe_seeds": probe_seeds,
        "coverage_seeds": cov_seeds,
        "coverage_samples": cov_samples,
        "coverage_groups": 8,
        "coverage_probes": cov_probes,
        "lam": args.lam,
        "epochs": EPOCHS,
        "reference_samples": 256 if quick else None,
    }
    for name in models:
        epochs = 1 if quick else EPOCHS[name]
        probe_grid = [4, 8] if quick else [4 * 2**i for i in range(20) if 4 * 2**i <= probe_max[name]]
        seeds_p = 2 if quick else probe_seeds[name]
        model, x, y, acc = trained_model(name, epochs, args.seed)
        layer = largest_layer(model)
        ref = Reference(model, x, y, args.lam, args.seed, num_samples=256 if quick else None)
        params = weight_parameters(model)
        print(
            f"\n## {name}: {sum(p.numel() for p in params.values())} weights in {len(params)} tensors, "
            f"{epochs} epochs, train acc {acc:.3f}; reference: exact over {len(ref.x)} samples in "
            f"{ref.seconds:.2f} s; normalized sharpness {ref.measures['normalized']:.4g} "
            f"(largest layer {layer}: {ref.measures['normalized/' + layer]:.4g})"
        )
        model_res: dict[str, Any] = {
            "epochs": epochs,
            "train_accuracy": acc,
            "largest_layer": layer,
            "num_weights": sum(p.numel() for p in params.values()),
            "reference": ref.measures,
            "reference_seconds": ref.seconds,
            "reference_samples": len(ref.x),
        }
        # cost unit: one gradient of the mean loss over the n0 probe samples
        gx, gy = ref.samples(torch.arange(n0 // GROUP))
        t_grad = time_call(gradient_fn(model, normalized_softmax_cross_entropy, gx, gy), repeats=7)["median"]
        from lightning_flatness.functional import hessian_diagonal_groups

        t_exact = time_call(
            lambda model=model, gx=gx, gy=gy: hessian_diagonal_groups(
                model, normalized_softmax_cross_entropy, gx, gy, method="exact"
            ),
            repeats=3,
        )["median"]
        model_res["gradient_seconds"] = t_grad
        model_res["exact_seconds"] = t_exact
        model_res["exact_gradient_equivalents"] = t_exact / t_grad

        drows = data_part(ref, [s for s in sizes if s < len(ref.x)], data_seeds, layer, args.seed)
        model_res["data_part"] = drows
        print(
            f"\n### {name}: data part (exact on n random training samples vs exact on all {len(ref.x)}; "
            f"RMS over {data_seeds} seeds)\n"
        )
        print(
            markdown_table(
                drows,
                ["samples", "rms_total", "rms_largest", "rms_worst_layer"],
                {"rms_total": ".2%", "rms_largest": ".2%", "rms_worst_layer": ".2%"},
            )
        )

        prows: list[dict[str, Any]] = []
        for method in ("hutchinson", "finite_difference"):
            rows = probe_part(model, ref, method, n0, probe_grid, seeds_p, layer, args.seed)
            for r in rows:
                r["gradient_equivalents"] = r["seconds"] / t_grad
                r["nominal_gradients"] = 2 * r["probes"]  # FD: 2 gradients; Hutchinson: 1 HVP ~ 2 gradients
            prows += rows
        model_res["probe_part"] = prows
        print(
            f"\n### {name}: probe part (P probes on {n0} samples vs exact on the same samples; RMS over "
            f"{seeds_p} seeds); exact on these samples: {t_exact:.3g} s = {t_exact / t_grad:.1f} gradients "
            f"(one gradient: {t_grad * 1e3:.3g} ms)\n"
        )
        print(
            markdown_table(
                prows,
                [
                    "method",
                    "probes",
                    "seconds",
                    "gradient_equivalents",
                    "rms_probe_total",
                    "rms_probe_largest",
                    "rms_probe_worst_layer",
                    "rms_total_vs_full",
                ],
                {
                    "rms_probe_total": ".2%",
                    "rms_probe_largest": ".2%",
                    "rms_probe_worst_layer": ".2%",
                    "rms_total_vs_full": ".2%",
                    "seconds": ".3g",
                    "gradient_equivalents": ".3g",
                },
            )
        )

        summary = []
        n_total, s_total = needed(drows, "samples", "rms_total")
        n_large, s_large = needed(drows, "samples", "rms_largest")
        summary.append({"what": "samples (exact, data part)", "total": s_total, "largest layer": s_large})
        for method in ("hutchinson", "finite_difference"):
            rows = [r for r in prows if r["method"] == method]
            _, p_total = needed(rows, "probes", "rms_probe_total")
            _, p_large = needed(rows, "probes", "rms_probe_largest")
            summary.append(
                {
                    "what": f"probes on {n0} samples ({method}, probe part)",
                    "total": p_total,
                    "largest layer": p_large,
                }
            )
        model_res["needed_for_5pct"] = summary
        print(f"\n### {name}: needed for 5% RMS relative error\n")
        print(markdown_table(summary, ["what", "total", "largest layer"]))

        crows = [
            coverage(model, ref, m, cov_samples, 8, cov_probes, cov_seeds[name], layer, args.lam, args.seed)
            for m in ("exact", "hutchinson", "finite_difference")
        ]
        model_res["coverage"] = crows
        print(
            f"\n### {name}: error bars at the callback defaults ({cov_samples} samples, 8 groups, "
            f"{cov_probes} probes) over {cov_seeds[name]} seeds, against exact over all "
            f"{len(ref.x)} samples\n"
        )
        print(
            markdown_table(
                crows,
                [
                    "method",
                    "rms_error",
                    "rms_stderr",
                    "median_rel_stderr",
                    "cover_1se_total",
                    "cover_2se_total",
                    "cover_1se_largest",
                    "cover_2se_largest",
                    "seconds",
                ],
                {
                    "rms_error": ".2%",
                    "rms_stderr": ".2%",
                    "median_rel_stderr": ".2%",
                    "cover_1se_total": ".0%",
                    "cover_2se_total": ".0%",
                    "cover_1se_largest": ".0%",
                    "cover_2se_largest": ".0%",
                    "seconds": ".3g",
                },
            )
        )
        results["models"][name] = model_res
    return results


def fd_study(args) -> dict[str, Any]:
    """Why the finite-difference error stops falling: its error at ``--fd-probes`` probes against the
    step ``r`` (relative to each tensor's RMS entry) in float32 and float64, next to Hutchinson's
    with as many probes, on the probe-part subset of the first model."""
    import copy

    from lightning_flatness.functional import hessian_diagonal_groups, normalized_softmax_cross_entropy

    name = (args.models or ["mlp"])[0]
    epochs = 1 if args.quick else EPOCHS[name]
    probes = 16 if args.quick else args.fd_probes
    steps = [1e-2, 1e-3] if args.quick else [1e-1, 1e-2, 1e-3, 1e-4]
    n0 = 64 if args.quick else args.probe_samples
    model, x, y, _ = trained_model(name, epochs, args.seed)
    ref = Reference(model, x, y, args.lam, args.seed, num_samples=256 if args.quick else None)
    groups = torch.arange(n0 // GROUP)
    rows = []
    for dtype in (torch.float32, torch.float64):
        m = copy.deepcopy(model).to(dtype)
        xs, ys = ref.samples(groups)
        xs = xs.to(dtype)
        weights = {k: p.detach() for k, p in weight_parameters(m).items()}
        exact = _measures(
            weights,
            hessian_diagonal_groups(m, normalized_softmax_cross_entropy, xs, ys, method="exact").mean(),
            args.lam,
        )
        runs = [("hutchinson", None)] + [("finite_difference", r) for r in steps]
        for method, r in runs:
            est = hessian_diagonal_groups(
                m,
                normalized_softmax_cross_entropy,
                xs,
                ys,
                method=method,
                num_probes=probes,
                generator=torch.Generator().manual_seed(args.seed),
                relative_step=r or 1e-3,
            ).mean()
            err = _errors(_measures(weights, est, args.lam), exact, largest_layer(m))
            trace_err = abs(sum(float(v.sum()) for v in est.values()) - exact_trace(m, xs, ys)) / abs(
                exact_trace(m, xs, ys)
            )
            rows.append(
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "method": method,
                    "relative_step": r,
                    "probes": probes,
                    "error_total": err["total"],
                    "error_largest": err["largest"],
                    "error_trace": trace_err,
                }
            )
    print(
        f"\n### {name}: finite-difference step and precision ({probes} probes on {n0} samples, one seed; "
        f"errors vs exact on the same samples in the same precision)\n"
    )
    print(
        markdown_table(
            rows,
            ["dtype", "method", "relative_step", "probes", "error_total", "error_largest", "error_trace"],
            {"error_total": ".2%", "error_largest": ".2%", "error_trace": ".2%", "relative_step": "g"},
        )
    )
    return {"model": name, "rows": rows}


def exact_trace(model, x: Tensor, y: Tensor) -> float:
    """Trace of the Hessian diagonal over the selected weights (eq. 5), exact."""
    from lightning_flatness.functional import hessian_diagonal, normalized_softmax_cross_entropy

    return sum(
        float(v.sum()) for v in hessian_diagonal(model, normalized_softmax_cross_entropy, x, y).values()
    )


def plot(results: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = list(results["models"])
    fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 7), squeeze=False)
    n0 = results["config"]["probe_samples"]
    for j, name in enumerate(models):
        res = results["models"][name]
        ax = axes[0][j]
        for method, colour in (("hutchinson", "C0"), ("finite_difference", "C1")):
            rows = [r for r in res["probe_part"] if r["method"] == method]
            xs = [r["gradient_equivalents"] for r in rows]
            ax.loglog(xs, [r["rms_probe_total"] for r in rows], "o-", color=colour, label=f"{method} total")
            ax.loglog(
                xs,
                [r["rms_probe_largest"] for r in rows],
                "s--",
                color=colour,
                alpha=0.6,
                label=f"{method} largest layer",
            )
        ax.axvline(res["exact_gradient_equivalents"], color="k", ls=":", label="exact (zero error)")
        ax.axhline(TARGET, color="grey", lw=0.8)
        ax.set_title(f"{name}: probe part, {n0} samples", fontsize=9)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("cost (gradient evaluations, measured)")
        ax.set_ylabel("RMS relative error")
        if j == 0:
            ax.legend(fontsize=7)
        ax = axes[1][j]
        rows = res["data_part"]
        ax.loglog(
            [r["samples"] for r in rows], [r["rms_total"] for r in rows], "o-", color="k", label="total"
        )
        ax.loglog(
            [r["samples"] for r in rows],
            [r["rms_largest"] for r in rows],
            "s--",
            color="k",
            alpha=0.6,
            label="largest layer",
        )
        ax.axhline(TARGET, color="grey", lw=0.8)
        ax.set_title(f"{name}: data part (exact method)", fontsize=9)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("training samples")
        ax.set_ylabel("RMS relative error vs all samples")
        if j == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None) -> dict[str, Any]:
    parser = base_parser(__doc__)
    parser.add_argument("--models", nargs="*", choices=MODELS, default=None)
    parser.add_argument("--lam", type=float, default=0.5)
    parser.add_argument("--probe-samples", type=int, default=512, help="n0 of the probe sweep")
    parser.add_argument("--probe-seeds", type=int, default=None, help="default: 3 (mlp, lenet), 2 (resnet)")
    parser.add_argument(
        "--probe-max", type=int, default=None, help="default: 4096 (mlp), 2048 (lenet), 128 (resnet)"
    )
    parser.add_argument(
        "--coverage-seeds", type=int, default=None, help="default: 20 (mlp, lenet), 10 (resnet)"
    )
    parser.add_argument("--plot", default=None, help="write the error-vs-compute figure (PNG) here")
    parser.add_argument(
        "--fd-study",
        action="store_true",
        help="only run the finite-difference step/precision study (on the first of --models)",
    )
    parser.add_argument("--fd-probes", type=int, default=2048)
    args = parser.parse_args(argv)
    setup(args)
    if args.fd_study:
        return run_timed(fd_study, args)
    return run_timed(run, args, plot)


if __name__ == "__main__":
    main()
