"""One process of the 2-process gloo check of ``NormalizedSharpness`` (run by ``tests/test_metric.py``).

Usage: ``python tests/ddp_metric_worker.py RANK WORLD_SIZE INIT_FILE OUT_FILE``. No Lightning: plain
``torch.distributed`` with a file store. The all-gather collectives are replaced by functions that
raise, and ``all_reduce`` is wrapped to record every call and its bytes, so the check proves that
one sync is exactly one ``all_reduce`` of the ``(R, F + 1)`` float64 state, whatever torchmetrics'
``Metric.sync`` does around it (a torchmetrics release that changed the sync fails here).
"""

from __future__ import annotations

import sys

import torch

SHAPES = {"0.weight": (5, 3), "2.weight": (2, 5)}
NUM_REPLICATES = 4
LAM = 0.5
# per rank: the group sizes of each update (ranks see different data and different group counts)
UPDATE_SIZES = {0: [[7], [3, 5]], 1: [[4, 4, 9]]}


def weights() -> dict[str, torch.Tensor]:
    """The weights, identical on every rank (as DDP keeps them)."""
    gen = torch.Generator().manual_seed(1234)
    return {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in SHAPES.items()}


def rank_updates(rank: int) -> list[tuple[dict[str, torch.Tensor], list[int]]]:
    """``[(diagonals {name: (G, *shape)}, group sizes)]`` seen by ``rank``; different on every rank."""
    gen = torch.Generator().manual_seed(100 + rank)
    updates = []
    for sizes in UPDATE_SIZES[rank]:
        diagonals = {
            n: torch.rand((len(sizes), *s), generator=gen, dtype=torch.float64) - 0.1
            for n, s in SHAPES.items()
        }
        updates.append((diagonals, sizes))
    return updates


def _forbid(name: str):
    def raise_(*args, **kwargs):
        raise AssertionError(f"NormalizedSharpness must not call torch.distributed.{name}")

    return raise_


def main(rank: int, world_size: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    from lightning_flatness.metric import NormalizedSharpness

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    for name in ("all_gather", "all_gather_into_tensor", "all_gather_object", "gather", "gather_object"):
        setattr(dist, name, _forbid(name))
    calls: list[tuple[str, int, str]] = []  # (dtype, bytes, op) of every all_reduce
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        op = kwargs.get("op", args[0] if args else dist.ReduceOp.SUM)
        calls.append((str(tensor.dtype), tensor.numel() * tensor.element_size(), str(op)))
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce

    out: dict = {}
    metric = NormalizedSharpness(SHAPES, lam=LAM, num_replicates=NUM_REPLICATES)
    for diagonals, sizes in rank_updates(rank):
        metric.update(diagonals, weights(), sizes)
    local_count = metric.count.clone()
    out["result"] = metric.compute()
    out["count_after_compute"] = metric.count.clone()
    out["local_count"] = local_count
    out["sync_calls"] = list(calls)
    calls.clear()
    metric.sync()  # a direct sync (public API) uses the same single all_reduce
    metric.unsync()
    out["direct_sync_calls"] = list(calls)

    # a process that never updates (compact default state) joins the same single all_reduce;
    # rank 0 gets the value of its own data, rank 1 has no weights to evaluate
    calls.clear()
    fixed = NormalizedSharpness(SHAPES, lam=LAM, num_replicates=NUM_REPLICATES)
    if rank == 0:
        diagonals, sizes = rank_updates(0)[0]
        fixed.update(diagonals, weights(), sizes)
    try:
        out["fixed_result"] = fixed.compute()
    except RuntimeError as err:
        out["fixed_result"] = str(err)
    out["fixed_sync_calls"] = list(calls)

    torch.save(out, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
