"""Benchmark: eq. 17's clipped kernel sums of the ``P = R + 3`` means, from the metric's slot sums (issue 9).

``NormalizedSharpness.compute()`` forms, per weight tensor, ``A_p = sum_k max(mean_p, 0)`` of the pooled
mean, the ``R = 8`` leave-one-out means and the two halves
(:func:`lightning_flatness.functional.replicate_curvature.replicate_curvature`). Where a chunk's slot sums
are all ``>= 0`` (Gauss-Newton estimates of a convex loss: cross-entropy, squared error) nothing is
clipped and each slot is summed over the kernel first; otherwise every mean is clipped entry by entry.
This script times ``replicate_curvature`` over the 21 weight tensors of torchvision's ResNet-18 shapes
(11.2 M weights) on synthetic slot sums, non-negative (log-normal) and signed (the same with 30% of the
entries negated), with the kernel-first path allowed and forced off (``_non_negative`` patched to
``False``: the clipping path for every chunk), interleaved in one process, medians.

Run ``python -m benchmarks.bench_replicate_curvature`` from the repository root; ``--quick`` is a smoke
test; ``--json PATH`` writes the raw results (and a ``.md`` table beside them).
"""

from __future__ import annotations

import torch

from benchmarks.common import (
    base_parser,
    command_line,
    environment,
    interleaved_times,
    setup,
    write_json_and_markdown,
)
from lightning_flatness.functional import replicate_curvature as curvature_module
from lightning_flatness.functional.replicate_measures import replicate_weights

F64 = torch.float64
NUM_REPLICATES = 8

#: torchvision ``resnet18(num_classes=10)``: the shapes of its 21 weight tensors with ``ndim >= 2``
RESNET18_SHAPES = (
    [(64, 3, 7, 7)]
    + [(64, 64, 3, 3)] * 4
    + [(128, 64, 3, 3), (128, 128, 3, 3), (128, 64, 1, 1), (128, 128, 3, 3), (128, 128, 3, 3)]
    + [(256, 128, 3, 3), (256, 256, 3, 3), (256, 128, 1, 1), (256, 256, 3, 3), (256, 256, 3, 3)]
    + [(512, 256, 3, 3), (512, 512, 3, 3), (512, 256, 1, 1), (512, 512, 3, 3), (512, 512, 3, 3)]
    + [(10, 512)]
)


def slot_sums(shapes, signed: bool, seed: int) -> list[tuple[tuple, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        numel = torch.Size(shape).numel()
        s = torch.exp(2.0 * torch.randn(NUM_REPLICATES, numel, generator=g, dtype=F64))
        if signed:
            s[torch.rand(NUM_REPLICATES, numel, generator=g) < 0.3] *= -1.0
        out.append((shape, s))
    return out


def run(args) -> dict:
    shapes = RESNET18_SHAPES[:3] if args.quick else RESNET18_SHAPES
    mix = replicate_weights(torch.full((NUM_REPLICATES,), 64.0, dtype=F64), list(range(NUM_REPLICATES)))
    original = curvature_module._non_negative
    rows = []
    for signed in (False, True):
        cases = slot_sums(shapes, signed, args.seed)

        def formed(kernel_first: bool, cases=cases) -> list[torch.Tensor]:
            curvature_module._non_negative = original if kernel_first else (lambda s: False)
            try:
                return [curvature_module.replicate_curvature(s, mix, shape)[0] for shape, s in cases]
            finally:
                curvature_module._non_negative = original

        same = all(torch.allclose(a, b, rtol=1e-12, atol=0) for a, b in zip(formed(True), formed(False)))
        times = interleaved_times(
            {"kernel_first": lambda: formed(True), "clipping": lambda: formed(False)}, repeats=args.repeats
        )
        row = {
            "slot_sums": "signed (30% negative)" if signed else "non-negative",
            "tensors": len(shapes),
            "weights": sum(torch.Size(s).numel() for s in shapes),
            "allowed_ms": times["kernel_first"]["median"] * 1e3,
            "clipping_forced_ms": times["clipping"]["median"] * 1e3,
            "same_values": same,
        }
        row["speedup"] = row["clipping_forced_ms"] / row["allowed_ms"]
        rows.append(row)
        print(
            f"{row['slot_sums']}: allowed {row['allowed_ms']:.1f} ms, clipping path forced "
            f"{row['clipping_forced_ms']:.1f} ms ({row['speedup']:.2f}x), same values {same}",
            flush=True,
        )
    return {"command": args.command, "repeats": args.repeats, "rows": rows}


def markdown(results: dict) -> str:
    env = results.get("environment") or environment()
    lines = [
        "## `replicate_curvature` on ResNet-18's weight shapes: kernel sums first where nothing is clipped",
        "",
        f"Command: `{results['command']}`; medians of {results['repeats']} interleaved repeats, "
        "one thread.  ",
        f"Machine: {env.get('cpu', '?')} ({env.get('nproc', '?')} cores), torch {env.get('torch', '?')}.",
        "",
        "| slot sums | tensors | weights | kernel-first path allowed | clipping path forced | ratio "
        "| same values |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['slot_sums']} | {r['tensors']} | {r['weights']:,} | {r['allowed_ms']:.1f} ms | "
            f"{r['clipping_forced_ms']:.1f} ms | {r['speedup']:.2f}x | {r['same_values']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = base_parser(__doc__)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    setup(args)
    if args.quick:
        args.repeats = 1
    args.command = command_line("benchmarks.bench_replicate_curvature", argv)
    results = run(args)
    write_json_and_markdown(args.json, results, markdown)
    return results


if __name__ == "__main__":
    main()
