"""One ``measure_sharpness`` at ``method="auto"`` with the training loss passed as users pass it
(``nn.CrossEntropyLoss()``, with label smoothing, ``nn.NLLLoss()``, ``F.nll_loss`` on a model that ends in
``log_softmax``, as PyTorch's MNIST and word-language-model examples do; mixup targets; regression and
multi-label losses), and on a ``torch.compile``'d model: the method ``auto`` picks, the time, the values,
and how many graphs Dynamo compiled for the measurement.

Models (random weights, no downloads): the paper's MLP (40-100-100-100) with 10 and 1,000 classes, with
logits or with ``log_softmax`` outputs; an LSTM language model as PyTorch's word-language-model example
writes it (sequence-first ``(T, B)`` tokens, ``log_softmax`` over a 1,000-token vocabulary, ``(T, B)``
targets); the 1,000-class MLP on mixup targets (class probabilities); the same MLP as a 1,000-output
regressor (``F.mse_loss``) and multi-label classifier (``nn.BCEWithLogitsLoss()``); a convolutional
denoiser with ``(N, 3, 16, 16)`` outputs (``nn.MSELoss()``); the 10-class MLP compiled with the default
(inductor) backend (``--compile-backend``). A row that a version of the library cannot measure records
the error.

Run: ``python -W ignore -m benchmarks.bench_loss_forms --json benchmarks/results/bench_loss_forms.json``.
To compare with another checkout, run the same script with ``PYTHONPATH`` pointing there.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import lightning_flatness
from benchmarks.common import (
    base_parser,
    command_line,
    environment,
    setup,
    time_call,
    write_json_and_markdown,
)
from lightning_flatness.measure import measure_sharpness


class PaperMLP(nn.Module):
    """40-100-100-100-``classes`` ReLU MLP, returning logits or log-probabilities."""

    def __init__(self, classes: int, log_probabilities: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU()
        )
        self.head = nn.Linear(100, classes)
        self.log_probabilities = log_probabilities

    def forward(self, x):
        z = self.head(self.net(x))
        return F.log_softmax(z, dim=1) if self.log_probabilities else z


class WordLSTM(nn.Module):
    """PyTorch's word-language-model ``RNNModel`` (LSTM): ``(T, B)`` tokens to ``(T, B, V)`` log-probs."""

    def __init__(self, vocab: int = 1000, width: int = 64) -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab, width)
        self.rnn = nn.LSTM(width, width, 2)
        self.decoder = nn.Linear(width, vocab)

    def forward(self, tokens):
        output, _ = self.rnn(self.encoder(tokens))
        return F.log_softmax(self.decoder(output), dim=-1)


def _mlp_batches(classes: int, quick: bool) -> list:
    g = torch.Generator().manual_seed(1)
    size = 8 if quick else 64
    return [
        (torch.randn(size, 40, generator=g), torch.randint(0, classes, (size,), generator=g))
        for _ in range(8)
    ]


def _dense_net() -> nn.Module:
    """A convolutional denoiser: ``(N, 3, 16, 16)`` images to ``(N, 3, 16, 16)`` outputs (768 per sample)."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 3, 3, padding=1))


def _float_batches(inputs: tuple[int, ...], outputs: tuple[int, ...], quick: bool, multilabel: bool) -> list:
    """Regression targets (standard normal), or multi-label targets (each label on with probability 0.1)."""
    g = torch.Generator().manual_seed(1)
    size = 8 if quick else 64
    batches = []
    for _ in range(8):
        x = torch.randn(size, *inputs, generator=g)
        y = torch.rand(size, *outputs, generator=g)
        batches.append((x, (y < 0.1).float() if multilabel else torch.randn(size, *outputs, generator=g)))
    return batches


def _mixup_batches(classes: int, quick: bool) -> list:
    """Inputs and mixup targets ``0.7 e_a + 0.3 e_b`` (class probabilities), as a mixup collate yields."""
    g = torch.Generator().manual_seed(1)
    size = 8 if quick else 64
    batches = []
    for _ in range(8):
        a = torch.randint(0, classes, (size,), generator=g)
        b = torch.randint(0, classes, (size,), generator=g)
        q = 0.7 * F.one_hot(a, classes).float() + 0.3 * F.one_hot(b, classes).float()
        batches.append((torch.randn(size, 40, generator=g), q))
    return batches


def _lm_batches(quick: bool) -> list:
    g = torch.Generator().manual_seed(1)
    steps, width = (6, 2) if quick else (16, 8)
    batches = []
    for _ in range(8):
        data = torch.randint(0, 1000, (steps + 1, width), generator=g)
        batches.append((data[:-1], data[1:]))  # (T, B) inputs and targets, sequence-first
    return batches


def _cases(quick: bool) -> list[tuple[str, str, Callable[[], nn.Module], Any, list]]:
    mlp10, mlp1000 = _mlp_batches(10, quick), _mlp_batches(1000, quick)
    return [
        ("MLP, 10 classes", "F.cross_entropy", lambda: PaperMLP(10, False), F.cross_entropy, mlp10),
        (
            "MLP, 10 classes",
            "nn.CrossEntropyLoss()",
            lambda: PaperMLP(10, False),
            nn.CrossEntropyLoss(),
            mlp10,
        ),
        ("MLP, 10 classes, log_softmax", "F.nll_loss", lambda: PaperMLP(10, True), F.nll_loss, mlp10),
        ("MLP, 1000 classes", "F.cross_entropy", lambda: PaperMLP(1000, False), F.cross_entropy, mlp1000),
        (
            "MLP, 1000 classes",
            "nn.CrossEntropyLoss()",
            lambda: PaperMLP(1000, False),
            nn.CrossEntropyLoss(),
            mlp1000,
        ),
        (
            "MLP, 1000 classes, log_softmax",
            "nn.NLLLoss()",
            lambda: PaperMLP(1000, True),
            nn.NLLLoss(),
            mlp1000,
        ),
        (
            "MLP, 1000 classes",
            "nn.CrossEntropyLoss(label_smoothing=0.1)",
            lambda: PaperMLP(1000, False),
            nn.CrossEntropyLoss(label_smoothing=0.1),
            mlp1000,
        ),
        ("word-LM LSTM, (T, B), log_softmax", "F.nll_loss", WordLSTM, F.nll_loss, _lm_batches(quick)),
        (
            "MLP, 1000 classes, mixup targets",
            "default (eq. 20)",
            lambda: PaperMLP(1000, False),
            None,
            _mixup_batches(1000, quick),
        ),
        (
            "MLP, 1000 classes, mixup targets",
            "nn.CrossEntropyLoss()",
            lambda: PaperMLP(1000, False),
            nn.CrossEntropyLoss(),
            _mixup_batches(1000, quick),
        ),
        (
            "MLP regression, 1000 outputs",
            "F.mse_loss",
            lambda: PaperMLP(1000, False),
            F.mse_loss,
            _float_batches((40,), (1000,), quick, multilabel=False),
        ),
        (
            "MLP multi-label, 1000 labels",
            "nn.BCEWithLogitsLoss()",
            lambda: PaperMLP(1000, False),
            nn.BCEWithLogitsLoss(),
            _float_batches((40,), (1000,), quick, multilabel=True),
        ),
        (
            "conv denoiser, (N, 3, 16, 16) outputs",
            "nn.MSELoss()",
            _dense_net,
            nn.MSELoss(),
            _float_batches((3, 16, 16), (3, 16, 16), quick, multilabel=False),
        ),
    ]


def _measure(model: nn.Module, loss_fn: Any, batches: list, method: str = "auto") -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return measure_sharpness(
            model, batches, loss_fn=loss_fn, method=method, generator=torch.Generator().manual_seed(2)
        )


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _compiled_case(quick: bool, repeats: int, backend: str) -> dict[str, Any]:
    """The 10-class MLP compiled (``backend``), called once as training would; then measured."""
    torch.manual_seed(0)
    model = PaperMLP(10, False)
    batches = _mlp_batches(10, quick)
    compiled = torch.compile(model, backend=backend)
    start = time.perf_counter()
    compiled(batches[0][0])
    compile_seconds = time.perf_counter() - start
    before = _graphs()
    start = time.perf_counter()
    first = _measure(compiled, F.cross_entropy, batches)
    first_seconds = time.perf_counter() - start
    steady = time_call(lambda: _measure(compiled, F.cross_entropy, batches), repeats=repeats, warmup=0)
    eager = _measure(model, F.cross_entropy, batches)
    return {
        "compile_seconds": compile_seconds,
        "first_measurement_seconds": first_seconds,
        "steady_measurement_seconds": steady["median"],
        "graphs_compiled_by_measurements": _graphs() - before,
        "normalized": float(first["normalized"]),
        "normalized_eager_model": float(eager["normalized"]),
        "method": first.choice.method,
        "backend": backend,
    }


def run(args) -> dict[str, Any]:
    rows = []
    for model_name, loss_name, build, loss_fn, batches in _cases(args.quick):
        if args.only and not any(text in f"{model_name} {loss_name}" for text in args.only):
            continue
        torch.manual_seed(args.seed)  # the same weights for every loss form of a model
        model = build().eval()
        try:
            result = _measure(model, loss_fn, batches)
        except (ValueError, RuntimeError) as err:  # a version of the library that cannot measure it
            rows.append(
                {"model": model_name, "loss_fn": loss_name, "error": f"{type(err).__name__}: {err}"[:300]}
            )
            print(rows[-1])
            continue
        timing = time_call(
            lambda m=model, f=loss_fn, b=batches: _measure(m, f, b), repeats=args.repeats, warmup=0
        )
        rows.append(
            {
                "model": model_name,
                "loss_fn": loss_name,
                "method": result.choice.method,
                "quantity": result.choice.quantity,
                "seconds": timing["median"],
                "normalized": float(result["normalized"]),
                "normalized_stderr": float(result["normalized_stderr"]),
                "hessian_trace": float(result["hessian_trace"]),
            }
        )
        if any(text in loss_name for text in args.exact_reference):  # the exact method, once
            start = time.perf_counter()
            exact = _measure(model, loss_fn, batches, method="exact")
            rows[-1].update(
                exact_seconds=time.perf_counter() - start,
                exact_normalized=float(exact["normalized"]),
                exact_normalized_stderr=float(exact["normalized_stderr"]),
                exact_hessian_trace=float(exact["hessian_trace"]),
            )
        print(rows[-1])
    compiled = _compiled_case(args.quick, args.repeats, args.compile_backend)
    print(compiled)
    return {"rows": rows, "compiled": compiled}


def _markdown(payload: dict[str, Any]) -> str:
    lines = [
        f"# Losses as users pass them, and compiled models ({payload['command']})",
        "",
        f"library: {payload['library']}; {payload['environment'].get('cpu')}, "
        f"{payload['environment']['threads']} thread(s), torch {payload['environment']['torch']}",
        "",
        "| model | loss_fn | auto picks | seconds | normalized | s.e. | Hessian trace |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | `{r['loss_fn']}` | fails: {r['error'][:120]} | | | | |")
            continue
        lines.append(
            f"| {r['model']} | `{r['loss_fn']}` | {r['method']} ({r['quantity']}) | {r['seconds']:.3f} | "
            f"{r['normalized']:.4g} | {r['normalized_stderr']:.2g} | {r['hessian_trace']:.4g} |"
        )
    for r in payload["rows"]:
        if "exact_normalized" in r:
            lines.append(
                f"\n{r['model']}, `{r['loss_fn']}`, with `method='exact'`: {r['exact_seconds']:.1f} s, "
                f"normalized {r['exact_normalized']:.5g} +- {r['exact_normalized_stderr']:.2g}, "
                f"Hessian trace {r['exact_hessian_trace']:.5g}"
            )
    c = payload["compiled"]
    lines += [
        "",
        f"Compiled 10-class MLP (`torch.compile`, backend {c['backend']}): compile "
        f"{c['compile_seconds']:.1f} s; first measurement {c['first_measurement_seconds']:.3f} s, then "
        f"{c['steady_measurement_seconds']:.3f} s; graphs compiled by the measurements: "
        f"{c['graphs_compiled_by_measurements']}; normalized {c['normalized']:.6g} "
        f"(eager model: {c['normalized_eager_model']:.6g}).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict[str, Any]:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--only",
        nargs="*",
        default=[],
        help="run only the rows whose model or loss_fn contains one of these texts",
    )
    parser.add_argument(
        "--exact-reference",
        nargs="*",
        default=[],
        help="also measure with method='exact' the rows whose loss_fn contains one of these texts",
    )
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend ('eager' needs no C++ compiler)"
    )
    args = parser.parse_args(argv)
    setup(args)
    start = time.perf_counter()
    payload = run(args)
    payload.update(
        command=command_line("benchmarks.bench_loss_forms", argv),
        library=str(Path(lightning_flatness.__file__).resolve().parent.parent),
        seconds=time.perf_counter() - start,
        environment=environment(),
    )
    write_json_and_markdown(args.json, payload, _markdown)
    return payload


if __name__ == "__main__":
    main()
