"""Interleaved before/after timing of one default measurement's estimator on a CIFAR ResNet-18
(``benchmarks/results/bench_sketch_copies.md``).

Each repeat starts one fresh process per tree (``--trees``, alternating), which imports
``lightning_flatness`` from that tree, builds ``torchvision.models.resnet18(num_classes=10)`` (random
weights, seed 0, eval mode, float32), times ``SharpnessMeasurement(model).estimate`` (``method="auto"``,
the eq. 20 loss: ``gauss_newton_sketch``) on 8 batches of 64 random ``3x32x32`` inputs (the
callback's 512 samples) after one warm-up batch, and a training step (forward, cross-entropy,
backward, SGD momentum 0.9, batch 128, train mode) five times; one thread. Per tree: medians over the
repeats of the estimator seconds per measurement and of the step, and their ratio in training steps.
The estimates of the trees are compared (max relative difference of every tensor's sum).

Run: ``python -W ignore -m benchmarks.bench_sketch_copies --trees /tmp/old . --repeats 5``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, os, statistics, sys, time, torch, torchvision
torch.set_num_threads(1)
sys.path.insert(0, os.getcwd())
import lightning_flatness
from lightning_flatness.measure import SharpnessMeasurement
torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=10).eval()
g = torch.Generator().manual_seed(1)
xs = torch.randn(9 * 64, 3, 32, 32, generator=g); ys = torch.randint(0, 10, (9 * 64,), generator=g)
m = SharpnessMeasurement(model, generator=torch.Generator().manual_seed(0))
m.estimate(xs[:64], ys[:64])
estimator = 0.0; sums = {}
for b in range(1, 9):
    t = time.perf_counter()
    est = m.estimate(xs[64 * b : 64 * b + 64], ys[64 * b : 64 * b + 64])
    estimator += time.perf_counter() - t
    for k, v in est.groups.items():
        sums[k] = sums.get(k, 0.0) + float(v.double().sum())
train = torchvision.models.resnet18(num_classes=10).train()
opt = torch.optim.SGD(train.parameters(), lr=0.01, momentum=0.9)
xt, yt = torch.randn(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g)
steps = []
for _ in range(6):
    t = time.perf_counter()
    opt.zero_grad(); torch.nn.functional.cross_entropy(train(xt), yt).backward(); opt.step()
    steps.append(time.perf_counter() - t)
print(json.dumps({"file": lightning_flatness.__file__, "estimator_s": estimator,
                  "step_s": statistics.median(steps[1:]), "load": os.getloadavg()[0], "sums": sums}))
"""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", nargs="+", required=True, help="source trees, run alternately")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    runs: dict[str, list[dict]] = {tree: [] for tree in args.trees}
    for r in range(args.repeats):
        order = args.trees if r % 2 == 0 else list(reversed(args.trees))
        for tree in order:
            out = subprocess.run(
                [sys.executable, "-W", "ignore", "-c", CHILD],
                cwd=os.path.abspath(tree),
                capture_output=True,
                text=True,
                check=False,
                env={**os.environ, "PYTHONPATH": os.path.abspath(tree)},
            )
            if out.returncode:
                raise RuntimeError(f"{tree}: the timing process failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            runs[tree].append(res)
            print(
                f"repeat {r} {tree}: estimator {res['estimator_s']:.3f} s, step {res['step_s']:.3f} s, "
                f"load {res['load']:.2f}",
                flush=True,
            )
    summary = {}
    first = runs[args.trees[0]][0]["sums"]
    for tree, rs in runs.items():
        est = statistics.median(r["estimator_s"] for r in rs)
        step = statistics.median(r["step_s"] for r in rs)
        diff = max(abs(rs[0]["sums"][k] - first[k]) / max(abs(first[k]), 1e-30) for k in first)
        summary[tree] = {
            "estimator_s": est,
            "step_s": step,
            "steps": est / step,
            "epoch_percent": 100 * est / step / 390,
            "max_rel_diff_sums": diff,
            "loads": [r["load"] for r in rs],
            "runs": rs,
        }
        print(
            f"{tree}: estimator {est:.3f} s, step {step:.4f} s = {est / step:.2f} training steps "
            f"({100 * est / step / 390:.2f}% of a 390-step epoch); sums vs first tree: {diff:.2e}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
