"""Cost of one Hessian diagonal per batch of 128: ours vs BackPACK and a PyHessian-style probe.

Per model (MLP, LeNet-style CNN, small ResNet with BatchNorm in eval mode; see ``common.py``) and a
batch of 128 MNIST-1D training samples, with the mean cross-entropy (``nn.CrossEntropyLoss``, the
loss BackPACK's second-order extensions know):

- ``ours exact``: ``hessian_diagonal(..., method="exact")`` (GGN identity, exact for these nets);
  also with the normalized-softmax-cross-entropy of eq. 20 (``ours exact, eq. 20``; BackPACK has no
  rule for that loss).
- ``BackPACK DiagGGNExact`` and ``DiagHessian`` (``backpack-for-pytorch``, optional; ``extend(...,
  use_converter=True)`` for the ResNet's residual sums). Only the weights (``ndim >= 2``) require
  grad on BackPACK's copy, as on ours, so both compute the same tensors.
- Hutchinson, per probe: ours (``method="hutchinson"``: ``torch.func`` forward-over-reverse HVPs,
  vmapped over 64 probes) vs a PyHessian-style probe: the gradient graph built once with
  ``create_graph=True``, then one double-backward ``torch.autograd.grad(grads, params,
  grad_outputs=v, retain_graph=True)`` per Rademacher probe ``v`` (``pyhessian/hessian.py``,
  ``hessian.trace`` with ``utils.hessian_vector_product``; reproduced here, PyHessian is not
  installed). Also the paper's finite differences per probe.

Time: medians of interleaved repeats in one process. Peak memory: a fresh subprocess per
(model, method), peak resident set above the resident set before the call (``common.py``).
Values: ``max over tensors of ||ours - BackPACK||_F / ||BackPACK||_F`` in float32.

BackPACK pulls torchvision (only for its examples) and a CUDA torch, so it is *not* a dependency of
the project: run this script from a separate environment (see RESULTS.md), e.g.

    /tmp/venv-backpack/bin/python -m benchmarks.bench_backpack --json benchmarks/results_backpack.json

Without BackPACK it still times ours and the PyHessian-style probe and says BackPACK was skipped.
"""

from __future__ import annotations

import copy
import json
import sys
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import (
    MODELS,
    base_parser,
    build_model,
    gradient_fn,
    interleaved_times,
    markdown_table,
    mnist1d,
    model_inputs,
    peak_rss_delta_mib,
    run_memory_worker,
    setup,
    weight_parameters,
    write_json,
)

BATCH = 128
METHODS = (
    "gradient",
    "ours_exact",
    "ours_exact_eq20",
    "backpack_diag_ggn_exact",
    "backpack_diag_hessian",
    "ours_hutchinson",
    "ours_hutchinson_loop",
    "pyhessian_probe",
    "ours_finite_difference",
)


def backpack_available() -> Optional[str]:
    """None when BackPACK imports, else the reason."""
    try:
        import backpack  # noqa: F401
        from backpack.extensions import DiagGGNExact, DiagHessian  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means "skip"
        return f"{type(err).__name__}: {err}"
    return None


def batch(name: str, seed: int) -> tuple[nn.Module, Tensor, Tensor]:
    """A randomly initialised model in eval mode and a batch of 128 training samples."""
    torch.manual_seed(seed)
    model = build_model(name).eval()
    data = mnist1d()
    idx = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))[:BATCH]
    return model, model_inputs(name, data.x_train[idx]), data.y_train[idx]


# ------------------------------------------------------------------------------------------------
# the candidates: each returns a zero-argument callable that computes {name: diagonal}
# ------------------------------------------------------------------------------------------------


def ours(
    model: nn.Module, x: Tensor, y: Tensor, method: str, probes: int, loss_fn=F.cross_entropy
) -> Callable[[], dict[str, Tensor]]:
    from lightning_flatness.functional import hessian_diagonal

    def fn():
        return hessian_diagonal(
            model, loss_fn, x, y, method=method, num_probes=probes, generator=torch.Generator().manual_seed(0)
        )

    return fn


def backpack_fn(model: nn.Module, x: Tensor, y: Tensor, extension: str) -> Callable[[], dict[str, Tensor]]:
    """BackPACK's ``DiagGGNExact`` / ``DiagHessian`` on an extended deep copy of ``model``."""
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact, DiagHessian

    weights = set(weight_parameters(model))
    bp_model = copy.deepcopy(model)
    for name, p in bp_model.named_parameters():
        p.requires_grad_(name in weights)
    converter = any(isinstance(m, nn.BatchNorm1d) for m in model.modules())  # the ResNet: residual sums
    bp_model = extend(bp_model, use_converter=converter)
    loss_module = extend(nn.CrossEntropyLoss())
    ext, attr = (
        (DiagGGNExact(), "diag_ggn_exact") if extension == "diag_ggn_exact" else (DiagHessian(), "diag_h")
    )
    named = [(n, p) for n, p in bp_model.named_parameters() if p.requires_grad]

    def fn():
        loss = loss_module(bp_model(x), y)
        with backpack(ext):
            loss.backward()
        out = {}
        for n, p in named:
            out[n.replace("_original_module.", "")] = getattr(p, attr).detach().clone()
            delattr(p, attr)
            p.grad = None
        return out

    return fn


def pyhessian_probe(model: nn.Module, x: Tensor, y: Tensor, probes: int) -> Callable[[], dict[str, Tensor]]:
    """Hutchinson diagonal PyHessian's way: one ``create_graph`` gradient, then a double-backward
    Hessian-vector product per Rademacher probe (``pyhessian/utils.py: hessian_vector_product``)."""
    params = weight_parameters(model)
    names, tensors = list(params), list(params.values())

    def fn():
        gen = torch.Generator().manual_seed(0)
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), tensors, create_graph=True)
        diag = [torch.zeros_like(p) for p in tensors]
        for _ in range(probes):
            v = [torch.randint(0, 2, p.shape, generator=gen, dtype=p.dtype).mul_(2).sub_(1) for p in tensors]
            hv = torch.autograd.grad(grads, tensors, grad_outputs=v, retain_graph=True)
            for d, vi, hvi in zip(diag, v, hv):
                d.add_(vi * hvi)
        return {n: d / probes for n, d in zip(names, diag)}

    return fn


def candidate(model: nn.Module, x: Tensor, y: Tensor, method: str, probes: int) -> Callable[[], Any]:
    from lightning_flatness.functional import normalized_softmax_cross_entropy

    if method == "gradient":  # the unit of cost: one forward + backward pass of the mean loss
        return gradient_fn(model, F.cross_entropy, x, y)
    if method == "ours_exact":
        return ours(model, x, y, "exact", probes)
    if method == "ours_exact_eq20":
        return ours(model, x, y, "exact", probes, loss_fn=normalized_softmax_cross_entropy)
    if method == "ours_hutchinson":
        return ours(model, x, y, "hutchinson", probes)
    if method == "ours_hutchinson_loop":  # the library's double-backward path (vectorize=False)
        from lightning_flatness.functional.estimators.hutchinson import hutchinson_hessian_diagonal

        params = weight_parameters(model)
        return lambda: hutchinson_hessian_diagonal(
            model,
            F.cross_entropy,
            x,
            y,
            params,
            num_probes=probes,
            generator=torch.Generator().manual_seed(0),
            vectorize=False,
        )
    if method == "ours_finite_difference":
        return ours(model, x, y, "finite_difference", probes)
    if method == "pyhessian_probe":
        return pyhessian_probe(model, x, y, probes)
    if method == "backpack_diag_ggn_exact":
        return backpack_fn(model, x, y, "diag_ggn_exact")
    if method == "backpack_diag_hessian":
        return backpack_fn(model, x, y, "diag_hessian")
    raise ValueError(method)


def worker(argv: list[str]) -> None:
    """``--worker MODEL METHOD SEED THREADS PROBES``: print ``{"peak_mib": ...}`` (or ``{"error": ...}``)."""
    name, method, seed, threads, probes = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    torch.set_num_threads(threads)
    model, x, y = batch(name, seed)
    try:
        fn = candidate(model, x, y, method, probes)
        fn()  # warm-up: lazy initialisation, hooks, vmap tracing
        peak = peak_rss_delta_mib(fn)
        print(json.dumps({"peak_mib": peak}))
    except Exception as err:  # noqa: BLE001 - reported as a result
        print(json.dumps({"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}))


def relative_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max(float((a[n] - b[n]).norm() / b[n].norm()) for n in b)


def run(args) -> dict[str, Any]:
    skip = backpack_available()
    if skip:
        print(
            f"BackPACK is not importable ({skip}); skipping its columns. Install it in a separate "
            f"environment (benchmarks/RESULTS.md) to compare."
        )
    models = args.models or (["mlp"] if args.quick else list(MODELS))
    repeats = 1 if args.quick else args.repeats
    probes = 8 if args.quick else args.probes
    methods = [m for m in METHODS if not (skip and m.startswith("backpack"))]
    memory_methods = ["ours_exact"] if args.quick else methods
    results: dict[str, Any] = {
        "backpack_skipped": skip,
        "batch": BATCH,
        "probes": probes,
        "repeats": repeats,
        "models": {},
    }
    rows, value_rows = [], []
    for name in models:
        model, x, y = batch(name, args.seed)
        fns, errors = {}, {}
        for method in methods:
            try:
                fn = candidate(model, x, y, method, probes)
                fn()
                fns[method] = fn
            except Exception as err:  # noqa: BLE001 - BackPACK's DiagHessian on the ResNet, for one
                errors[method] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        times = interleaved_times(fns, repeats=repeats, warmup=0)
        memory = {}
        if not args.no_memory:
            for method in memory_methods:
                if method in fns:
                    memory[method] = run_memory_worker(
                        "benchmarks.bench_backpack",
                        [name, method, str(args.seed), str(args.threads), str(probes)],
                    )
        values = {}
        reference = fns.get("backpack_diag_ggn_exact")
        if reference is not None:
            ref = reference()
            for method in ("ours_exact", "backpack_diag_hessian"):
                if method in fns:
                    values[method] = relative_difference(fns[method](), ref)
        if "backpack_diag_hessian" in fns and "ours_exact" in fns:
            values["ours_exact_vs_diag_hessian"] = relative_difference(
                fns["ours_exact"](), fns["backpack_diag_hessian"]()
            )
        # float64 cross-check of ours against itself, for scale
        exact = fns["ours_exact"]()
        model64 = copy.deepcopy(model).double()
        exact64 = ours(model64, x.double(), y, "exact", probes)()
        values["ours_exact_float32_vs_float64"] = relative_difference(
            exact, {k: v.float() for k, v in exact64.items()}
        )
        value_rows.append({"model": name, **{k: v for k, v in values.items()}})

        per_probe = {
            m: times[m]["median"] / probes
            for m in ("ours_hutchinson", "ours_hutchinson_loop", "pyhessian_probe", "ours_finite_difference")
            if m in times
        }
        res = {
            "times": times,
            "errors": errors,
            "memory": memory,
            "values": values,
            "per_probe_seconds": per_probe,
            "num_weights": sum(p.numel() for p in weight_parameters(model).values()),
        }
        results["models"][name] = res
        for method in methods:
            t = times.get(method, {}).get("median")
            mem = memory.get(method, {})
            rows.append(
                {
                    "model": name,
                    "method": method,
                    "ms": None if t is None else 1e3 * t,
                    "gradients": None if t is None else t / times["gradient"]["median"],
                    "ms_per_probe": None if method not in per_probe else 1e3 * per_probe[method],
                    "vs_ggn_exact": (
                        t / times["backpack_diag_ggn_exact"]["median"]
                        if t is not None and "backpack_diag_ggn_exact" in times
                        else None
                    ),
                    "peak_mib": mem.get("peak_mib"),
                    "note": errors.get(method) or mem.get("error") or "",
                }
            )
    print(
        f"\n### time and peak memory per batch of {BATCH} (medians of {repeats} interleaved repeats; "
        f"stochastic methods: {probes} probes; vs_ggn_exact = time / BackPACK DiagGGNExact's)\n"
    )
    print(
        markdown_table(
            rows,
            ["model", "method", "ms", "gradients", "ms_per_probe", "vs_ggn_exact", "peak_mib", "note"],
            {
                "ms": ".3g",
                "gradients": ".3g",
                "ms_per_probe": ".3g",
                "vs_ggn_exact": ".2f",
                "peak_mib": ".3g",
            },
        )
    )
    print("\n### values: max over weight tensors of ||a - b||_F / ||b||_F (float32)\n")
    cols = ["model"] + sorted({k for r in value_rows for k in r if k != "model"})
    print(markdown_table(value_rows, cols, {c: ".2e" for c in cols}))
    summary = []
    for name, res in results["models"].items():
        t = {k: v["median"] for k, v in res["times"].items()}
        summary.append(
            {
                "model": name,
                "ggn_exact / ours_exact": (
                    t["backpack_diag_ggn_exact"] / t["ours_exact"] if "backpack_diag_ggn_exact" in t else None
                ),
                "diag_hessian / ours_exact": (
                    t["backpack_diag_hessian"] / t["ours_exact"] if "backpack_diag_hessian" in t else None
                ),
                "pyhessian probe / ours probe": t["pyhessian_probe"] / t["ours_hutchinson"],
                "pyhessian probe / ours loop probe": t["pyhessian_probe"] / t["ours_hutchinson_loop"],
            }
        )
    results["summary"] = summary
    print("\n### speed-ups (ratios > 1: ours faster)\n")
    cols = [
        "model",
        "ggn_exact / ours_exact",
        "diag_hessian / ours_exact",
        "pyhessian probe / ours probe",
        "pyhessian probe / ours loop probe",
    ]
    print(markdown_table(summary, cols, {c: ".2f" for c in cols[1:]}))
    return results


def main(argv=None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker(argv[1:])
        return {}
    parser = base_parser(__doc__)
    parser.add_argument("--models", nargs="*", choices=MODELS, default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--probes", type=int, default=64, help="probes of the stochastic methods")
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess memory measurements")
    args = parser.parse_args(argv)
    setup(args)
    results = run(args)
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
