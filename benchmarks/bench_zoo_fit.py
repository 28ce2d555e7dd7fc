"""Does ``SharpnessMonitor()`` at its defaults run through a Lightning fit of every tiny zoo model, with
no user code beyond a plain LightningModule? (issue 8, target 1)

For each model of ``tests/zoo_models.py``: a LightningModule whose ``training_step`` calls the model
on the batch as a user would (``forward(x)`` calls ``model(x)`` for images; ``forward(**batch)`` calls
``model(**batch)`` for Hugging Face dicts, whose ``labels`` make the model return its own loss), a
DataLoader of ``--samples`` synthetic samples (dict batches with
``input_ids``/``attention_mask``/(``token_type_ids``)/``labels`` for BERT and GPT-2), AdamW,
``--epochs`` epochs, and ``SharpnessMonitor()`` with no argument. Reported: whether the fit finished,
the method auto chose, the seconds of the last measurement and its values.

Run: ``python -m benchmarks.bench_zoo_fit --json benchmarks/results/bench_zoo_fit.json``
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import base_parser, run_timed, setup
from tests.zoo_models import TINY


def _rows(x: Any, y: torch.Tensor) -> list[Any]:
    if isinstance(x, torch.Tensor):
        return [(x[i], y[i]) for i in range(len(y))]
    return [{**{k: v[i] for k, v in x.items()}, "labels": y[i]} for i in range(len(y))]


def fit_one(name: str, args) -> dict[str, Any]:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from lightning_flatness import SharpnessMonitor

    model, (x, y) = TINY[name](n=args.samples, seed=args.seed)
    model.train()

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x=None, **kwargs):  # images: self(x); Hugging Face: self(**batch)
            return self.model(**kwargs) if x is None else self.model(x)

        def training_step(self, batch, _):
            if isinstance(batch, dict):
                return self(**batch).loss
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, _):
            pass

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    loader = DataLoader(_rows(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(_rows(x, y)[:16], batch_size=16)
    monitor = SharpnessMonitor()
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    t0 = time.perf_counter()
    try:
        trainer.fit(Lit(), loader, val)
        error = None
    except Exception as err:  # noqa: BLE001 - the question is whether anything stops the run
        error = f"{type(err).__name__}: {err}"
    out = {
        "model": name,
        "finished": error is None,
        "error": error,
        "seconds": time.perf_counter() - t0,
        "steps": trainer.global_step,
        "measurements": len(monitor.history),
    }
    if monitor.history:
        h = monitor.history[-1]
        out.update(
            {
                "method": h.get("method"),
                "measurement_seconds": h.get("seconds"),
                "normalized": h.get("normalized"),
                "normalized_stderr": h.get("normalized_stderr"),
                "num_samples": h.get("num_samples"),
            }
        )
    print(out, flush=True)
    return out


def run(args) -> dict[str, Any]:
    for logger in ("pytorch_lightning", "lightning.pytorch", "lightning_flatness"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    return {
        "command": args.command,
        "samples": args.samples,
        "epochs": args.epochs,
        "models": [fit_one(n, args) for n in (args.models or list(TINY))],
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# SharpnessMonitor() at its defaults in a Lightning fit of each tiny zoo model",
        "",
        f"Command: `{results['command']}`; {results['samples']} samples, batch 16, "
        f"{results['epochs']} epochs, "
        f"1 thread; total {results.get('seconds', 0):.0f} s.",
        "",
        "| model | fit finished | measurements | method (last) | s / measurement | normalized "
        "| s.e. / value |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        rel = (r["normalized_stderr"] / r["normalized"]) if r.get("normalized") else float("nan")
        lines.append(
            f"| {r['model']} | {'yes' if r['finished'] else 'NO: ' + str(r['error'])[:200]} | "
            f"{r['measurements']} | {r.get('method')} | {r.get('measurement_seconds', float('nan')):.2f} | "
            f"{r.get('normalized', float('nan')):.4g} | {rel:.1%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict[str, Any]:
    parser = base_parser(__doc__)
    parser.add_argument("--models", nargs="*", default=None, choices=list(TINY))
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.samples, args.epochs = args.models or ["resnet"], 32, 1
    args.command = "python -m benchmarks.bench_zoo_fit " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    setup(args)
    results = run_timed(run, args)
    if args.json:
        Path(args.json).with_suffix(".md").write_text(markdown(results))
    return results


if __name__ == "__main__":
    main()
