r"""Curvature work per process under DDP with 1, 2 and 4 gloo processes on the CPU (counted, not timed).

Runs the fit of ``tests/test_distributed_semantics.py`` (one epoch of the test MLP, an exact and a
Hutchinson ``SharpnessMonitor`` on the same subset) with ``P`` processes and counts, per rank, the
samples x probes that went through the estimator. Prints a Markdown table (the one in
``docs/distributed.md``) and, with ``--json``, the raw counts.

Usage::

    python benchmarks/bench_distributed.py --num-samples 256 --num-probes 8 \
        --json benchmarks/results/distributed.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--num-probes", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from test_distributed_semantics import run_processes, work_per_rank

    rows = {}
    for p in args.processes:
        with tempfile.TemporaryDirectory() as tmp:
            records = run_processes(Path(tmp), p, args.num_samples, args.num_probes)
        rows[p] = {
            "exact_samples_per_rank": [work_per_rank(r, "exact") for r in records],
            "hutchinson_sample_probes_per_rank": [work_per_rank(r, "hutchinson") for r in records],
            "estimator_calls_per_rank": [len(r["calls"]) // 2 for r in records],
            "identical_on_all_ranks": all(r["logged"] == records[0]["logged"] for r in records),
        }
    lines = [
        f"Command: `python benchmarks/bench_distributed.py --num-samples {args.num_samples} "
        f"--num-probes {args.num_probes}` (gloo, CPU, one thread per process)",
        "",
        "| processes | exact: samples per rank | Hutchinson: samples x probes per rank | batches per rank "
        "| identical on all ranks |",
        "|---|---|---|---|---|",
    ]
    for p, row in rows.items():
        lines.append(
            f"| {p} | {row['exact_samples_per_rank']} | {row['hutchinson_sample_probes_per_rank']} | "
            f"{row['estimator_calls_per_rank']} | {row['identical_on_all_ranks']} |"
        )
    print("\n".join(lines))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
