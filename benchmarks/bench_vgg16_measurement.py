"""Benchmark: one measurement of torchvision's VGG-16 (134 M parameters; its first classifier layer is a
4096 x 25088 weight) with ``measure_sharpness`` at its defaults, on a machine of 24 GiB: does it fit?

Random weights, 10 classes, 3 x 32 x 32 inputs (the adaptive pooling gives the classifier its
7 x 7 maps), 8 batches of 2 samples (one replicate each: the metric's state does not depend on the
number of samples). Reported: ``auto``'s method, the value and its standard error, wall time and the
process's peak resident memory (``ru_maxrss``). ``--address-space-gib`` caps the process's address
space (``RLIMIT_AS``), so that an allocation beyond it fails with an error, not the machine's
out-of-memory killer. ``--quick``: the same pipeline with a 64-wide classifier (CI smoke test).

Run ``python -m benchmarks.bench_vgg16_measurement`` from the repository root; ``--json PATH`` writes
the result.
"""

from __future__ import annotations

import resource
import time
import traceback

import torch

from benchmarks.common import base_parser, setup, write_json


def main(argv=None) -> dict:
    p = base_parser(__doc__)
    p.add_argument("--address-space-gib", type=float, default=None, help="RLIMIT_AS of this process")
    args = p.parse_args(argv)
    setup(args)
    if args.address_space_gib is not None:
        limit = int(args.address_space_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from torchvision.models import vgg16

    from lightning_flatness.measure import measure_sharpness

    model = vgg16(num_classes=10).eval()
    if args.quick:
        model.classifier = torch.nn.Sequential(
            torch.nn.Linear(512 * 7 * 7, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
        )
    g = torch.Generator().manual_seed(args.seed)
    batches = [
        (torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 10, (2,), generator=g)) for _ in range(8)
    ]
    start = time.time()
    out = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "largest_weight": max(
            (list(p.shape) for p in model.parameters()), key=lambda s: torch.Size(s).numel()
        ),
        "address_space_gib": args.address_space_gib,
        "threads": torch.get_num_threads(),
    }
    try:
        result = measure_sharpness(model, batches)
        out.update(
            method=result.choice.method,
            normalized=float(result.values["normalized"]),
            normalized_stderr=float(result.values["normalized_stderr"]),
            error=None,
        )
    except (RuntimeError, MemoryError) as err:  # an allocation beyond the cap
        out.update(
            error=f"{type(err).__name__}: {str(err).splitlines()[-1]}", where=traceback.format_exc()[-1500:]
        )
    out.update(
        wall_s=time.time() - start,
        peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    )
    print(
        f"VGG-16{' (quick)' if args.quick else ''}: {out['parameters'] / 1e6:.1f} M parameters, "
        + (
            f"{out['method']}, normalized {out['normalized']:.6g} +- {out['normalized_stderr']:.3g}"
            if out["error"] is None
            else f"FAILED: {out['error']}"
        )
        + f", wall {out['wall_s']:.0f} s, peak RSS {out['peak_rss_gib']:.1f} GiB"
    )
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
