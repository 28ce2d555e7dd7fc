"""The exact method against BackPACK's ``DiagGGNExact`` in the steady state: calls back to back.

``bench_backpack`` times every method once per round, round-robin with the others (Hutchinson's 64
probes, BackPACK, finite differences), so each call of a 2-ms estimate starts with caches the other
methods have filled: a cold call. Inside a measurement the exact method runs batch after batch, so this
script times the other regime: per round, ``--calls`` consecutive calls of ``ours_exact``
(``hessian_diagonal(..., method="exact")``) and as many of ``backpack_diag_ggn_exact``, the two
alternating which goes first; reported: the median over rounds of the time per call, and BackPACK's over
ours. Same models, batch of 128 MNIST-1D samples and the same two candidates as ``bench_backpack``
(:func:`benchmarks.bench_backpack.candidate`), and their values' relative difference (float32).

Run: ``python -m benchmarks.bench_backpack_warm --json benchmarks/results/bench_backpack_warm.json``
(BackPACK from the ``baselines`` extra; without it the script times ours alone and says so).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.bench_backpack import backpack_available, batch, candidate, relative_difference
from benchmarks.common import MODELS, base_parser, markdown_table, run_timed, setup

#: consecutive calls per round and model, chosen so that a round of each candidate takes 0.1-1 s
CALLS = {"mlp": 40, "lenet": 20, "resnet": 4}
CANDIDATES = ("ours_exact", "backpack_diag_ggn_exact")


def run(args) -> dict[str, Any]:
    skip = backpack_available()
    if skip:
        print(f"BackPACK is not importable ({skip}); timing ours alone.")
    names = [m for m in CANDIDATES if not (skip and m.startswith("backpack"))]
    models = args.models or (["mlp"] if args.quick else list(MODELS))
    rounds = 1 if args.quick else args.rounds
    results: dict[str, Any] = {"backpack_skipped": skip, "rounds": rounds, "models": {}}
    for name in models:
        model, x, y = batch(name, args.seed)
        fns = {m: candidate(model, x, y, m, 1) for m in names}
        calls = 2 if args.quick else (args.calls or CALLS.get(name, 10))
        for fn in fns.values():  # warm-up: lazy initialisation, hooks
            for _ in range(3):
                fn()
        per_call: dict[str, list[float]] = {m: [] for m in names}
        for r in range(rounds):
            for m in names if r % 2 else list(reversed(names)):
                start = time.perf_counter()
                for _ in range(calls):
                    fns[m]()
                per_call[m].append((time.perf_counter() - start) / calls)
        ms = {m: 1e3 * statistics.median(v) for m, v in per_call.items()}
        res: dict[str, Any] = {"calls_per_round": calls, "ms": ms}
        if "backpack_diag_ggn_exact" in fns:
            res["backpack_over_ours"] = ms["backpack_diag_ggn_exact"] / ms["ours_exact"]
            res["relative_difference"] = relative_difference(
                fns["ours_exact"](), fns["backpack_diag_ggn_exact"]()
            )
        results["models"][name] = res
        print(name, {k: round(v, 3) for k, v in ms.items()}, flush=True)
    results["markdown"] = markdown(results)
    print(results["markdown"])
    return results


def markdown(results: dict[str, Any]) -> str:
    rows = [
        {
            "model": name,
            "calls per round": res["calls_per_round"],
            "ours_exact ms": res["ms"]["ours_exact"],
            "DiagGGNExact ms": res["ms"].get("backpack_diag_ggn_exact"),
            "DiagGGNExact / ours": res.get("backpack_over_ours"),
            "values, relative difference": res.get("relative_difference"),
        }
        for name, res in results["models"].items()
    ]
    head = (
        f"### one exact Hessian diagonal per batch of 128, calls back to back (medians over "
        f"{results['rounds']} rounds)\n\n"
    )
    return head + markdown_table(rows, list(rows[0]) if rows else [])


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = base_parser(__doc__)
    parser.add_argument("--models", nargs="*", choices=MODELS, default=None)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--calls", type=int, default=None, help="calls per round (default: CALLS per model)")
    args = parser.parse_args(argv)
    args.command = "python -m benchmarks.bench_backpack_warm " + " ".join(
        sys.argv[1:] if argv is None else list(argv)
    )
    setup(args)
    results = run_timed(run, args)
    if args.json:
        Path(args.json).with_suffix(".md").write_text(
            f"```\ncommand: {args.command}\n```\n\n" + results["markdown"] + "\n"
        )
    return results


if __name__ == "__main__":
    main()
