"""FSDP2 on every visible GPU (NCCL): ``lightning_flatness.sharded`` on raw ``fully_shard`` modules, and
``SharpnessMonitor`` under Lightning's ``ModelParallelStrategy`` (FSDP2), each against one process.

Usage::

    python benchmarks/gpu/fsdp2_sharded.py --out benchmarks/results/gpu/fsdp2

Part 1 spawns one process per GPU running ``tests/sharded_worker.py`` (float64 and float32) and
checks the values against the unsharded exact method on the CPU (the checks of
``tests/test_sharded.py``). Part 2 fits the test MLP with ``ModelParallelStrategy`` and
``SharpnessMonitor`` (its ``configure_model`` applies ``fully_shard``) and compares the logged value,
identical on all ranks, with a brute-force float64 Hessian of the gathered weights. Writes
``fsdp2.json`` (per part: ``ok`` and the details, or the error and its traceback). Exit status 0
when both parts pass.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def raw_fully_shard(out: Path) -> dict:
    """Part 1: the sharded measurement of raw fully_shard modules, one process per GPU."""
    import torch
    import torch.multiprocessing as mp
    from test_sharded import check

    world = torch.cuda.device_count()
    results: dict = {"ok": True, "world_size": world}
    for dtype, rel in (("float64", 1e-9), ("float32", 5e-6)):
        with tempfile.TemporaryDirectory() as tmp:
            files = [str(Path(tmp) / f"rank{r}.pt") for r in range(world)]
            mp.spawn(_worker, args=(world, str(Path(tmp) / "store"), files, dtype), nprocs=world, join=True)
            records = [torch.load(f, weights_only=False, map_location="cpu") for f in files]
        check(records, world, dtype, rel)  # raises AssertionError on any mismatch
        results[dtype] = {
            "values": records[0]["values"],
            "state_bytes_per_rank": [r["state_bytes"] for r in records],
        }
    return results


def _worker(rank: int, world: int, init_file: str, files: list, dtype: str) -> None:
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import sharded_worker as worker

    worker.main(rank, world, init_file, files[rank], dtype, False, "cuda")


def lightning_model_parallel(out: Path) -> dict:
    """Part 2: SharpnessMonitor under ModelParallelStrategy (FSDP2) on every GPU."""
    import pytorch_lightning as pl
    import torch
    from callback_models import MLP, DataModule, brute_force_measures
    from pytorch_lightning.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard

    from lightning_flatness.callback import SharpnessMonitor

    class ShardedMLP(MLP):
        def configure_model(self):
            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    class Record(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            monitor = next(cb for cb in trainer.callbacks if isinstance(cb, SharpnessMonitor))
            full = {
                k: v.full_tensor().cpu() if hasattr(v, "full_tensor") else v.cpu()
                for k, v in pl_module.state_dict().items()
            }
            record = {
                "logged": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("sharp")},
                "indices": monitor.state_dict()["indices"].tolist(),
            }
            (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
            if trainer.global_rank == 0:
                torch.save(full, out / "weights.pt")

    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    pl.seed_everything(0, verbose=False)
    world = torch.cuda.device_count()
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=world,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        strategy=ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[SharpnessMonitor(num_samples=128, batch_size=16), Record()],
    )
    trainer.fit(ShardedMLP(), DataModule())
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return {}
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    model = MLP()
    model.load_state_dict(torch.load(out / "weights.pt", weights_only=True))
    data = DataModule()
    data.setup("fit")
    idx = torch.tensor(records[0]["indices"])
    reference = brute_force_measures(model, data.train_set.tensors[0][idx], data.train_set.tensors[1][idx])
    errors = {
        k: abs(records[0]["logged"][f"sharpness/{k}"] - reference[k]) / abs(reference[k])
        for k in ("normalized", "matrix_normalized", "hessian_trace")
    }
    identical = all(r["logged"] == records[0]["logged"] for r in records)
    return {
        "ok": identical and max(errors.values()) < 1e-5,
        "world_size": world,
        "identical_on_all_ranks": identical,
        "relative_error_vs_float64_brute_force": errors,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {}
    parts = [("raw_fully_shard", raw_fully_shard), ("lightning_model_parallel", lightning_model_parallel)]
    if os.environ.get("LOCAL_RANK", "0") != "0":  # a rank that Lightning launched by re-running this script
        parts = parts[1:]
    for name, part in parts:
        try:
            summary[name] = part(args.out / name)
        except Exception as err:  # record the failure, run the other part
            summary[name] = {
                "ok": False,
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc().splitlines()[-25:],
            }
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    (args.out / "fsdp2.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps(summary, indent=1, default=str))
    return 0 if all(part["ok"] for part in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
