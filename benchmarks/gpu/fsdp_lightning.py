"""Lightning's ``FSDPStrategy`` with ``SharpnessMonitor`` on every visible GPU.

Usage (Lightning launches the other ranks by re-running this script)::

    python benchmarks/gpu/fsdp_lightning.py --out benchmarks/results/gpu/fsdp

Records on rank 0, in ``fsdp.json``, whether the fit with the callback ran and, if it did, the
comparison with one process (as ``ddp_nccl.py``); if it failed, the exception and the last lines
of its traceback, so that the failure is on record. Exit status 0 when the values match, 1
otherwise (the shell script records the status and carries on).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from ddp_nccl import compare, single_process_values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    import pytorch_lightning as pl
    import torch
    from callback_models import MLP, DataModule, RecordPerRank
    from pytorch_lightning.strategies import FSDPStrategy

    from lightning_flatness.callback import SharpnessMonitor

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    args.out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=torch.cuda.device_count(),
        strategy=FSDPStrategy(),
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
    try:
        trainer.fit(MLP(), DataModule())
    except Exception as err:  # the point of this stage is to record whether and how it fails
        summary = {
            "ok": False,
            "stage": "fit",
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc().splitlines()[-25:],
        }
        if trainer.is_global_zero:
            (args.out / "fsdp.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary, indent=1))
        return 1
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return 0
    records = [json.loads((args.out / f"rank{r}.json").read_text()) for r in range(trainer.world_size)]
    try:
        reference = single_process_values(args.out / "weights.pt", records[0]["indices"])
        summary = {"world_size": trainer.world_size, **compare(records, reference)}
    except Exception as err:
        summary = {
            "ok": False,
            "stage": "compare",
            "error": f"{type(err).__name__}: {err}",
            "records": records,
        }
    (args.out / "fsdp.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
