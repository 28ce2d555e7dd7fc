"""DDP with NCCL on every visible GPU: ``SharpnessMonitor`` gives identical values on all ranks, equal
to the value of one process over the same samples.

Usage (Lightning launches the other ranks by re-running this script)::

    python benchmarks/gpu/ddp_nccl.py --out benchmarks/results/gpu/ddp

Writes ``rank<r>.json`` per rank and, on rank 0, ``ddp.json`` with ``ok``, the world size, the
per-rank values and the single-process float64 value (``measure_sharpness`` on one GPU over the
subset's samples). Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KEYS = ("normalized", "matrix_normalized", "hessian_trace")
REL_TOL = 1e-9


def single_process_values(weights_file: Path, indices: list[int]) -> dict[str, float]:
    """Every measure of the trained weights on one GPU in float64 over the samples ``indices``."""
    import torch
    from callback_models import MLP, DataModule

    from lightning_flatness.measure import measure_sharpness

    model = MLP()
    model.load_state_dict({k: v.cpu() for k, v in torch.load(weights_file, weights_only=True).items()})
    net = model.net.to("cuda", torch.float64).eval()
    data = DataModule()
    data.setup("fit")
    idx = torch.tensor(indices)
    x, y = data.train_set.tensors[0][idx].cuda().double(), data.train_set.tensors[1][idx].cuda()
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, len(idx), 16)]
    result = measure_sharpness(net, batches, method="exact", num_replicates=4)
    return {k: float(v) for k, v in result.values.items() if k in KEYS}


def compare(records: list[dict], reference: dict[str, float]) -> dict:
    """``ok`` when every rank logged the same values and they equal ``reference`` to ``REL_TOL``."""
    logged = [{k: r["logged"][f"sharpness/{k}"] for k in KEYS} for r in records]
    identical = all(entry == logged[0] for entry in logged)
    errors = {k: abs(logged[0][k] - reference[k]) / max(abs(reference[k]), 1e-300) for k in KEYS}
    return {
        "ok": identical and max(errors.values()) <= REL_TOL,
        "identical_on_all_ranks": identical,
        "relative_error_vs_one_process": errors,
        "per_rank": logged,
        "one_process": reference,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    import pytorch_lightning as pl
    import torch
    from callback_models import MLP, DataModule, RecordPerRank

    from lightning_flatness.callback import SharpnessMonitor

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    args.out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0, verbose=False)
    devices = torch.cuda.device_count()
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=devices,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[
            SharpnessMonitor(num_samples=128, batch_size=16, dtype="float64"),
            RecordPerRank(str(args.out)),
        ],
    )
    trainer.fit(MLP(), DataModule())
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return 0
    records = [json.loads((args.out / f"rank{r}.json").read_text()) for r in range(trainer.world_size)]
    reference = single_process_values(args.out / "weights.pt", records[0]["indices"])
    summary = {
        "world_size": trainer.world_size,
        "backend": str(torch.distributed.get_backend()),
        **compare(records, reference),
    }
    (args.out / "ddp.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
