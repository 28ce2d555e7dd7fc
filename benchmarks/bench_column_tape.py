"""The estimator of one default measurement of a CIFAR-size ResNet-18 with the column tape and without.

torchvision ``resnet18(num_classes=K)`` (random weights, seed 0, eval mode, float32), the callback's 512
random ``(3, 32, 32)`` samples in 8 batches of 64, ``SharpnessMeasurement`` at its defaults
(``method="auto"``: ``gauss_newton_sketch``, 1 sketch at 10 classes, 4 at 1,000), ``estimate`` per
batch. Two arms, interleaved round by round within one process: the folded-batch backward of
:class:`~lightning_flatness.functional.estimators.layer_rules.column_backward.ColumnTape` (the default),
and autograd's batched backward (``ColumnTape.backward`` switched off). Medians of ``--repeats`` rounds,
one thread; the sum of the last batch's estimate is printed per arm (the two must agree).

    python -m benchmarks.bench_column_tape --json benchmarks/results/bench_column_tape.json
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import torch

from benchmarks.bench_callback_resnet18 import data, resnet18
from benchmarks.common import base_parser, environment, setup, write_json

SAMPLES, BATCH = 512, 64


def run(classes: list[int], repeats: int, samples: int) -> dict[str, Any]:
    from lightning_flatness.functional.estimators.layer_rules.column_backward import ColumnTape
    from lightning_flatness.measure import SharpnessMeasurement

    taped = ColumnTape.backward

    def declined(self, *args: Any, **kwargs: Any) -> None:
        return None

    out: dict[str, Any] = {}
    try:
        for k in classes:
            torch.manual_seed(0)
            net = resnet18(k).eval()
            x, y = data(samples, k, 1)
            times: dict[str, list[float]] = {"tape": [], "autograd": []}
            sums: dict[str, float] = {}
            for _ in range(repeats):
                for arm in times:
                    ColumnTape.backward = taped if arm == "tape" else declined  # type: ignore[method-assign]
                    m = SharpnessMeasurement(net, generator=torch.Generator().manual_seed(0))
                    start = time.perf_counter()
                    for lo in range(0, samples, BATCH):
                        est = m.estimate(x[lo : lo + BATCH], y[lo : lo + BATCH])
                    times[arm].append(time.perf_counter() - start)
                    sums[arm] = float(sum(v.double().sum() for v in est.groups.values()))
            out[str(k)] = {
                "method": m.choice.method,
                "tape_seconds": statistics.median(times["tape"]),
                "autograd_seconds": statistics.median(times["autograd"]),
                "speedup": statistics.median(times["autograd"]) / statistics.median(times["tape"]),
                "sums": sums,
                "all_seconds": times,
            }
            print(
                f"K={k} ({m.choice.method}): tape {out[str(k)]['tape_seconds']:.3f} s, autograd "
                f"{out[str(k)]['autograd_seconds']:.3f} s ({out[str(k)]['speedup']:.2f}x); sums {sums}",
                flush=True,
            )
    finally:
        ColumnTape.backward = taped  # type: ignore[method-assign]
    return out


def main(argv: Any = None) -> dict[str, Any]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--classes", nargs="*", type=int, default=[10, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    setup(args)
    samples = BATCH if args.quick else SAMPLES
    results = run([10] if args.quick else args.classes, 1 if args.quick else args.repeats, samples)
    write_json(args.json, {"command": " ".join(sys.argv), "environment": environment(), "results": results})
    return results


if __name__ == "__main__":
    main()
