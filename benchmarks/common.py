"""Shared pieces of the benchmarks: command line, models, data, training, timing, memory, tables.

Every benchmark script is run from the repository root as ``python -m benchmarks.<name>`` (or
``python benchmarks/<name>.py``) and accepts ``--quick`` (a CI-sized smoke run), ``--threads``
(``torch.set_num_threads``, default 1), ``--seed`` and ``--json PATH`` (raw results).

Models (all take MNIST-1D signals, 40 samples long, 10 classes; they are linear in each weight, so
the library's ``"exact"`` method applies and the GGN diagonal equals the Hessian diagonal):

- ``"mlp"``: the paper's MLP, 40-100-100-100-10 (:func:`lightning_flatness.reference_models.mlp`).
- ``"lenet"``: LeNet-5-style CNN with 1-D convolutions
  (:func:`lightning_flatness.reference_models.lenet1d` without its ``Unflatten``: it takes inputs
  of shape ``(N, 1, 40)``, so that BackPACK, which has no ``Unflatten`` rule, can run on it).
- ``"resnet"``: :class:`ResNet1d`, a small ResNet (three basic blocks, 16-32-64 channels) with
  BatchNorm, measured in eval mode; inputs ``(N, 1, 40)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/x.py` as well as `python -m benchmarks.x`
    sys.path.insert(0, str(REPO_ROOT))

MODELS = ("mlp", "lenet", "resnet")


# ------------------------------------------------------------------------------------------------
# command line and output
# ------------------------------------------------------------------------------------------------


def base_parser(description: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the options every benchmark has."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (a few seconds)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the raw results to this JSON file")
    return parser


def setup(args: argparse.Namespace) -> None:
    """Apply ``--threads`` and ``--seed``."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


def environment() -> dict[str, Any]:
    """Machine and library versions, for the results files."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "nproc": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                info["ram_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    for name in ("torchmetrics", "pytorch_lightning", "backpack"):
        try:
            from importlib.metadata import version

            info[name] = version({"backpack": "backpack-for-pytorch"}.get(name, name))
        except Exception:  # noqa: BLE001 - optional packages
            info[name] = None
    return info


def run_timed(
    run: Callable[[argparse.Namespace], dict[str, Any]],
    args: argparse.Namespace,
    plot: Optional[Callable[[dict[str, Any], str], None]] = None,
) -> dict[str, Any]:
    """``run(args)``, its wall time as ``results["seconds"]``, then the JSON (``--json``) and the plot
    (``--plot``, when the script has one): the common tail of every benchmark's ``main``."""
    start = time.perf_counter()
    results = run(args)
    results["seconds"] = time.perf_counter() - start
    print(f"\ntotal time {results['seconds']:.1f} s")
    write_json(args.json, results)
    if plot is not None and getattr(args, "plot", None):
        plot(results, args.plot)
    return results


def write_json(path: Optional[Path], payload: dict[str, Any]) -> None:
    """Write ``payload`` (plus :func:`environment`) as JSON when ``path`` is given."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": environment(), **payload}, f, indent=1, default=_json_default)
    print(f"\nwrote {path}")


def command_line(module: str, argv: Optional[list[str]]) -> str:
    """The command that ran ``module`` with ``argv`` (``sys.argv[1:]`` when None), for the results."""
    return " ".join([f"python -m {module}", *(argv if argv is not None else sys.argv[1:])])


def write_json_and_markdown(
    path: Optional[Path], payload: dict[str, Any], markdown: Callable[[dict], str]
) -> None:
    """:func:`write_json`, and ``markdown(payload)`` beside it (same name, ``.md``), when ``path`` is
    given."""
    if path is None:
        return
    write_json(path, payload)
    Path(path).with_suffix(".md").write_text(markdown(payload))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], formats: Optional[dict[str, str]] = None
) -> str:
    """A GitHub markdown table of ``rows`` (dicts) with the given ``columns``.

    ``formats`` maps a column to a format spec (e.g. ``".3g"``); floats default to ``.4g``, None
    prints as ``-``.
    """
    formats = formats or {}

    def cell(col: str, value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            if math.isnan(value):
                return "nan"
            return format(value, formats.get(col, ".4g"))
        if isinstance(value, int) and col in formats:
            return format(value, formats[col])
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(c, row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# models and data
# ------------------------------------------------------------------------------------------------


class BasicBlock1d(nn.Module):
    """ResNet basic block with 1-D convolutions: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``.

    Every ReLU is its own module (used once) so BackPACK's module hooks see each of them.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv1d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv1d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(out_channels)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv1d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm1d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet1d(nn.Module):
    """A small ResNet for ``(N, 1, length)`` signals: stem, three basic blocks, global average pool.

    ``Conv1d(1, c0, 3) -> BN -> ReLU -> Block(c0, c0) -> Block(c0, c1, /2) -> Block(c1, c2, /2) ->
    AdaptiveAvgPool1d(1) -> Flatten -> Linear(c2, num_classes)``; 28 k weights for the default
    widths (16, 32, 64). Linear in each individual weight in eval mode (BatchNorm with running
    statistics is affine), so diag GGN = diag Hessian.
    """

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), num_classes: int = 10):
        super().__init__()
        c0, c1, c2 = widths
        self.stem = nn.Sequential(nn.Conv1d(1, c0, 3, padding=1, bias=False), nn.BatchNorm1d(c0), nn.ReLU())
        self.layer1 = BasicBlock1d(c0, c0)
        self.layer2 = BasicBlock1d(c0, c1, stride=2)
        self.layer3 = BasicBlock1d(c1, c2, stride=2)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))


def build_model(name: str, width: Optional[int] = None) -> nn.Module:
    """A fresh (randomly initialised) benchmark model; ``width`` sets the MLP's hidden units."""
    from lightning_flatness.reference_models import lenet1d, mlp

    if name == "mlp":
        return mlp(hidden=width or 100)
    if name == "lenet":
        return lenet1d()[1:]  # without Unflatten: inputs (N, 1, 40)
    if name == "resnet":
        return ResNet1d()
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}.")


def model_inputs(name: str, x: Tensor) -> Tensor:
    """MNIST-1D signals ``(N, 40)`` shaped for the model: ``(N, 1, 40)`` for the CNNs."""
    return x if name == "mlp" else x.unsqueeze(1)


_DATA_CACHE: dict[int, Any] = {}


def mnist1d(num_samples: int = 5000):
    """MNIST-1D (the ``mnist1d`` package's defaults: 4000 train / 1000 test), cached per process and
    in a file in the temporary directory (generation takes seconds; the data are deterministic)."""
    import tempfile

    from lightning_flatness.datasets import ClassificationData, make_mnist1d

    if num_samples not in _DATA_CACHE:
        path = Path(tempfile.gettempdir()) / f"lightning_flatness_bench_mnist1d_{num_samples}.pt"
        data = None
        if path.exists():
            try:
                data = ClassificationData(**torch.load(path))
            except Exception:  # noqa: BLE001 - a stale or partial file: regenerate
                data = None
        if data is None:
            data = make_mnist1d(num_samples)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save(data._asdict(), tmp)
            os.replace(tmp, path)
        _DATA_CACHE[num_samples] = data
    return _DATA_CACHE[num_samples]


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    epochs: int,
    seed: int = 0,
    lr: float = 1e-3,
    batch_size: int = 128,
) -> float:
    """Adam, cross-entropy, mini-batches of ``batch_size`` (the paper's Appendix E.1 setup).

    Leaves the model in eval mode; returns the final training accuracy.
    """
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def trained_model(
    name: str, epochs: int, seed: int = 0, width: Optional[int] = None
) -> tuple[nn.Module, Tensor, Tensor, float]:
    """``(model in eval mode, x_train, y_train, train accuracy)`` after ``epochs`` of training on MNIST-1D."""
    data = mnist1d()
    torch.manual_seed(seed)
    model = build_model(name, width)
    x = model_inputs(name, data.x_train)
    acc = train(model, x, data.y_train, epochs, seed)
    return model, x, data.y_train, acc


def weight_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The tensors the library measures by default: every weight with ``ndim >= 2``."""
    from lightning_flatness.functional import select_parameters

    return select_parameters(model)


def largest_layer(model: nn.Module) -> str:
    """Name of the weight tensor with the most entries."""
    params = weight_parameters(model)
    return max(params, key=lambda n: params[n].numel())


# ------------------------------------------------------------------------------------------------
# timing and memory
# ------------------------------------------------------------------------------------------------


def time_call(
    fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, min_seconds: float = 0.0
) -> dict[str, float]:
    """Median (and min, max) wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls.

    When ``min_seconds`` is positive, keeps repeating until that much time has been spent (for
    sub-millisecond calls).
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats or spent < min_seconds:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        spent += elapsed
        if len(times) >= 1000:
            break
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}


def interleaved_times(
    fns: dict[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1
) -> dict[str, dict[str, float]]:
    """Median wall time of each of ``fns``, timed round-robin (so slow drifts of a shared machine
    hit every candidate alike); each round runs every function once."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {
        k: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
        for k, v in times.items()
    }


#: What every per-layer estimator warns when it falls back to per-sample backward passes.
PER_SAMPLE_FALLBACK = "per-layer contractions do not apply"


def estimator_path(caught: Iterable[Any]) -> dict[str, str]:
    """Which path an estimate took, from the warnings recorded around it
    (``warnings.catch_warnings(record=True)``): ``{"path": "per-layer" or "per-sample", "fallback": the
    fallback warning's first 300 characters, or ""}``."""
    fallback = [str(w.message) for w in caught if PER_SAMPLE_FALLBACK in str(w.message)]
    if not fallback:
        return {"path": "per-layer", "fallback": ""}
    return {"path": "per-sample", "fallback": fallback[0][:300]}


def timed_estimate(
    model: nn.Module, loss_fn: Callable[..., Tensor], inputs: Any, target: Tensor, method: str, seed: int = 1
) -> tuple[dict[str, Tensor], float, dict[str, str]]:
    """One ``hessian_diagonal`` estimate: the diagonal, its wall time and :func:`estimator_path`."""
    import warnings

    from lightning_flatness.functional import hessian_diagonal

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        diag = hessian_diagonal(
            model, loss_fn, inputs, target, method=method, generator=torch.Generator().manual_seed(seed)
        )
        seconds = time.perf_counter() - start
    return diag, seconds, estimator_path(caught)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's resident set (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_delta_mib(fn: Callable[[], Any]) -> float:
    """Peak resident memory of ``fn()`` above the resident memory before it, in MiB.

    Meant for a fresh subprocess started by :func:`run_memory_worker`, where glibc returns every
    large buffer to the kernel at once (``MALLOC_MMAP_THRESHOLD_``), so the resident set follows the
    live tensors. The kernel's high-water mark (``VmHWM``) is reset just before the call; where that
    is not allowed, ``ru_maxrss`` of the whole process is used (an upper bound).
    """
    import resource

    gc_collect()
    before = _status_kib("VmRSS")
    if reset_peak_rss():
        fn()
        peak = _status_kib("VmHWM")
    else:  # pragma: no cover - kernels without clear_refs
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(0.0, (peak - before) / 1024)


def gc_collect() -> None:
    import gc

    gc.collect()


def run_memory_worker(
    module: str, worker_args: Sequence[str], python: Optional[str] = None, timeout: float = 600
) -> dict[str, Any]:
    """Run ``python -m <module> --worker <worker_args>`` in a fresh process and parse its last stdout
    line as JSON.

    The environment sets ``MALLOC_MMAP_THRESHOLD_=65536`` (allocations of 64 KiB and more are
    mapped and unmapped one by one, so freed tensors leave the resident set at once) and one
    thread, so the peak resident set measures the computation, not the allocator's caches.
    """
    env = dict(os.environ)
    env.update(
        {
            "MALLOC_MMAP_THRESHOLD_": "65536",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        }
    )
    cmd = [python or sys.executable, "-m", module, "--worker", *worker_args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode:d}"])[-1]}
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if not lines:
        return {"error": "worker printed no JSON"}
    return json.loads(lines[-1])


def gradient_fn(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    params: Optional[dict[str, Tensor]] = None,
) -> Callable[[], Any]:
    """``() -> grads``: one forward and backward pass of the mean loss (the unit of cost)."""
    params = params if params is not None else weight_parameters(model)
    tensors = list(params.values())

    def fn():
        with torch.enable_grad():
            return torch.autograd.grad(loss_fn(model(x), y), tensors)

    return fn


def relative_error(estimate: float, reference: float) -> float:
    return abs(estimate - reference) / abs(reference)


def finite(values: Iterable[float]) -> bool:
    return all(math.isfinite(float(v)) for v in values)
