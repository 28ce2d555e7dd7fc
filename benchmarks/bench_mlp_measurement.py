"""One default measurement of the paper's MLP outside Lightning, split into estimator and ``compute()``.

The MLP of ``common.py`` (40-100-100-100-10, random weights, seed 0; ``--model lenet``: the 1-D LeNet, on
``(N, 1, 40)``), float32 in eval mode, on the first
512 MNIST-1D training samples in the callback's 8 replicate groups of 64: :class:`SharpnessMeasurement` at
its defaults (``method="auto"`` -> exact, eq. 20 loss, 8 replicate slots), fed as the callback feeds it
since round 29, all 8 groups in one batch of 512 (``add_groups``: the exact method takes them in one
pass), with ``--samples-per-batch 128`` as in round 28 (4 batches of 2 groups), or with
``--one-group-per-batch`` as before round 28, 8 batches of 64 (``add``); then ``compute()``.
Medians over ``--repeats`` after 3 warm-up measurements, one thread. Meant for before/after pairs: run it
on two trees back to back (``PYTHONPATH=<tree>``) and compare.

    python -m benchmarks.bench_mlp_measurement --repeats 15 --json out.json
    python -m benchmarks.bench_mlp_measurement --repeats 15 --samples-per-batch 128   # round 28's batches
    python -m benchmarks.bench_mlp_measurement --repeats 15 --model lenet
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import torch

from benchmarks.common import base_parser, build_model, mnist1d, model_inputs, setup, write_json

SAMPLES, BATCH = 512, 64


def measure_once(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, grouped: bool = True, per_batch: int = SAMPLES
) -> tuple[float, float, float]:
    """(estimator seconds, compute() seconds, normalized sharpness) of one measurement."""
    from lightning_flatness.measure import SharpnessMeasurement

    m = SharpnessMeasurement(model, generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    if grouped:
        for lo in range(0, SAMPLES, per_batch):
            m.add_groups(x[lo : lo + per_batch], y[lo : lo + per_batch], per_batch // BATCH)
    else:
        for lo in range(0, SAMPLES, BATCH):
            m.add(x[lo : lo + BATCH], y[lo : lo + BATCH])
    estimate = time.perf_counter() - t
    t = time.perf_counter()
    values = m.compute()
    return estimate, time.perf_counter() - t, float(values["normalized"])


def run(repeats: int, grouped: bool = True, per_batch: int = SAMPLES, name: str = "mlp") -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(name).float().eval()
    data = mnist1d()
    x, y = model_inputs(name, data.x_train[:SAMPLES].float()), data.y_train[:SAMPLES]
    for _ in range(3):
        measure_once(model, x, y, grouped, per_batch)
    runs = [measure_once(model, x, y, grouped, per_batch) for _ in range(repeats)]
    return {
        "model": name,
        "grouped": grouped,
        "samples_per_batch": per_batch if grouped else BATCH,
        "estimate_ms": 1000 * statistics.median(r[0] for r in runs),
        "compute_ms": 1000 * statistics.median(r[1] for r in runs),
        "normalized": runs[0][2],
        "repeats": repeats,
    }


def main(argv: Any = None) -> dict[str, Any]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--one-group-per-batch", action="store_true", help="8 batches of 64 (add), as before round 28"
    )
    parser.add_argument(
        "--samples-per-batch",
        type=int,
        default=SAMPLES,
        choices=[128, 256, SAMPLES],
        help="samples (groups of 64) per add_groups batch: 512 as the callback's since round 29",
    )
    parser.add_argument("--model", default="mlp", choices=["mlp", "lenet"])
    args = parser.parse_args(argv)
    setup(args)
    out = run(
        1 if args.quick else args.repeats,
        grouped=not args.one_group_per_batch,
        per_batch=args.samples_per_batch,
        name=args.model,
    )
    print(
        f"estimator {out['estimate_ms']:.1f} ms, compute() {out['compute_ms']:.1f} ms, "
        f"normalized {out['normalized']:.10g}",
        flush=True,
    )
    write_json(args.json, {"command": " ".join(sys.argv), **out})
    return out


if __name__ == "__main__":
    main()
