r"""Cost of one sharpness measurement on a GPU, in units of one training step, float32 vs float64.

Models (random weights, no download): a CIFAR-size torchvision ResNet-18 (``num_classes=10``,
inputs ``(128, 3, 32, 32)``) and a small timm ViT (patch 4 on 32x32 images, width 192, depth 6,
3 heads). One training step: forward, cross-entropy, backward and an SGD update of the float32
model at batch 128 (TF32 off). One measurement: what ``SharpnessMonitor`` does with its defaults,
``measure_sharpness`` with ``method="auto"`` on 512 samples in 8 batches of 64 (one replicate
group each), on a copy of the model in eval mode in the measured dtype, with the math attention
kernel (the fused ones have no double backward). Times are medians over
``--repeats`` runs after one warm-up, with ``torch.cuda.synchronize``.

Usage::

    python benchmarks/gpu/bench_cost.py --json benchmarks/results/gpu/cost.json \
        > benchmarks/results/gpu/cost.md

``--device cpu --quick`` runs a tiny version on the CPU (used by the tests to check the code path).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from lightning_flatness.measure import measure_sharpness  # noqa: E402


def resnet18(quick: bool) -> nn.Module:
    import torchvision

    if quick:  # one basic block per stage instead of two: same layer kinds, CPU-sized
        from torchvision.models.resnet import BasicBlock, ResNet

        return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    return torchvision.models.resnet18(num_classes=10)


def vit_small(quick: bool) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    width, depth = (48, 1) if quick else (192, 6)
    return VisionTransformer(
        img_size=32, patch_size=4, num_classes=10, embed_dim=width, depth=depth, num_heads=3, mlp_ratio=4.0
    )


MODELS: dict[str, Callable[[bool], nn.Module]] = {"resnet18": resnet18, "vit_small": vit_small}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    fn()  # warm-up (cuDNN autotuning, allocator)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_step_seconds(model: nn.Module, batch: int, device: torch.device, repeats: int) -> float:
    """Median seconds of one float32 SGD step (forward, cross-entropy, backward, update) at ``batch``."""
    model = copy.deepcopy(model).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return _median_seconds(step, repeats, device)


def measurement(
    model: nn.Module,
    dtype: torch.dtype,
    device: torch.device,
    num_samples: int,
    num_batches: int,
    repeats: int,
    num_probes: int = 64,
) -> dict[str, Any]:
    """Median seconds of one default measurement, the method chosen and the values."""
    net = copy.deepcopy(model).to(device, dtype).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(num_samples, 3, 32, 32, generator=g).to(device, dtype)
    y = torch.randint(0, 10, (num_samples,), generator=g).to(device)
    batches = list(zip(x.chunk(num_batches), y.chunk(num_batches)))
    out: dict[str, Any] = {}

    def run() -> None:
        generator = torch.Generator(device=device).manual_seed(0)
        # the fused attention kernels (flash, memory-efficient) have no double backward / forward AD;
        # the math kernel is plain differentiable torch
        with sdpa_kernel(SDPBackend.MATH):
            result = measure_sharpness(
                net, batches, num_replicates=num_batches, generator=generator, num_probes=num_probes
            )
        out["method"] = result.choice.method
        out["normalized"] = float(result["normalized"])
        out["normalized_stderr"] = float(result["normalized_stderr"])

    out["seconds"] = _median_seconds(run, repeats, device)
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "models": {},
    }
    samples, batches, probes = (8, 2, 8) if args.quick else (512, 8, 64)
    for name in args.models:
        torch.manual_seed(0)
        model = MODELS[name](args.quick)
        entry: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters())}
        entry["train_step_seconds"] = training_step_seconds(
            model, 16 if args.quick else 128, device, args.repeats
        )
        for dtype in (torch.float32, torch.float64):
            label = str(dtype).removeprefix("torch.")
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                m = measurement(model, dtype, device, samples, batches, args.repeats, probes)
                m["train_steps"] = m["seconds"] / entry["train_step_seconds"]
            except Exception as err:  # e.g. out of memory: record it, carry on with the next one
                m = {"error": f"{type(err).__name__}: {err}"}
            entry[label] = m
        f32, f64 = entry["float32"], entry["float64"]
        if "normalized" in f32 and "normalized" in f64:
            entry["float32_relative_difference"] = abs(f32["normalized"] - f64["normalized"]) / abs(
                f64["normalized"]
            )
        results["models"][name] = entry
        print(f"{name}: {json.dumps(entry)}", file=sys.stderr, flush=True)
    return results


def table(results: dict[str, Any]) -> str:
    lines = [
        f"# Cost of one measurement on {results['device']} "
        f"(torch {results['torch']}, CUDA {results['cuda']})",
        "",
        "| model | params | train step (s) | dtype | method | measurement (s) | in train steps | "
        "normalized | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in results["models"].items():
        for dtype in ("float32", "float64"):
            m = e[dtype]
            if "error" in m:
                lines.append(
                    f"| {name} | {e['parameters']} | {e['train_step_seconds']:.4f} | {dtype} | "
                    f"failed: {m['error'][:80]} | | | | |"
                )
                continue
            lines.append(
                f"| {name} | {e['parameters']} | {e['train_step_seconds']:.4f} | {dtype} | {m['method']} | "
                f"{m['seconds']:.3f} | {m['train_steps']:.1f} | {m['normalized']:.6g} "
                f"+- {m['normalized_stderr']:.2g} | {m.get('peak_memory_gib', float('nan')):.2f} |"
            )
        if "float32_relative_difference" in e:
            lines.append(
                f"| {name} | | | | float32 vs float64 | | | relative difference "
                f"{e['float32_relative_difference']:.2e} | |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="CPU-sized models and data (a code-path check)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results = run(args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    print(table(results))
    return results


if __name__ == "__main__":
    main()
