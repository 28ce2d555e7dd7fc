"""One process of the FSDP2 (``fully_shard``) sharded-measurement check, run by ``tests/test_sharded.py``.

Usage: ``python tests/sharded_worker.py RANK WORLD_SIZE INIT_FILE OUT_FILE DTYPE [UNEVEN]``. Plain
``torch.distributed`` (gloo) with a file store. Every rank builds the same model and data; rank
``r`` measures samples ``r::P`` in 4 batches through :mod:`lightning_flatness.sharded` and saves
its values (with ``UNEVEN``, the last rank keeps only 2 of its samples, so its last two batches are
empty: the ranks must still agree on the collectives), the byte counts, the gathered replicate sums
and whether the model was left unchanged.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

NUM_SAMPLES, NUM_BATCHES, NUM_REPLICATES = 48, 4, 4


def build_model(dtype: torch.dtype, pruned: bool = False) -> nn.Module:
    """A ReLU network with a Linear applied per position (inputs ``(N, 2, 3)``) and row counts 8, 7, 3
    that do not divide evenly over 2 or 4 ranks (with 4, one rank holds no row of the last layer).

    ``pruned``: unit 0 of the first layer has zero weights and a negative bias (dead: its row of the
    curvature and of the weight is 0, and so are the second layer's curvature columns 0 and 8), and
    one weight of the second layer is 0, so that neither eq. 17 coefficient matrix of the first two
    layers is positive everywhere (the sharded solve gathers them)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 8), nn.ReLU(), nn.Flatten(), nn.Linear(16, 7), nn.ReLU(), nn.Linear(7, 3)
    )
    if pruned:
        with torch.no_grad():
            model[0].weight[0] = 0.0
            model[0].bias[0] = -1.0
            model[3].weight[2, 5] = 0.0
    return model.to(dtype).eval()


def data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(NUM_SAMPLES, 2, 3, generator=g).to(dtype), torch.randint(
        0, 3, (NUM_SAMPLES,), generator=g
    )


def own_samples(rank: int, world_size: int, uneven: bool = False) -> torch.Tensor:
    """Rank ``rank``'s samples: ``r::P``, or only 2 of them on the last rank when ``uneven``."""
    own = torch.arange(rank, NUM_SAMPLES, world_size)
    return own[:2] if uneven and rank == world_size - 1 else own


def main(
    rank: int,
    world_size: int,
    init_file: str,
    out_file: str,
    dtype_name: str,
    uneven: bool = False,
    device: str = "cpu",
    pruned: bool = False,
    hooked: bool = False,
) -> None:
    """Shard, measure, save (``device="cuda"``: NCCL, one GPU per rank, as
    ``benchmarks/gpu/fsdp2_sharded.py``). ``hooked``: a module backward hook on the middle layer that
    halves its input gradient and counts its calls (a measurement must neither call it nor feel it)."""
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_flatness.sharded import ShardedSharpnessMeasurement, is_sharded

    dtype = getattr(torch, dtype_name)
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    mesh = init_device_mesh(device, (world_size,))
    model = build_model(dtype, pruned).to(device)
    hook_calls = []
    if hooked:
        model[3].register_full_backward_hook(
            lambda module, grad_in, grad_out: hook_calls.append(1) or tuple(0.5 * g for g in grad_in)
        )
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    before = {n: p.to_local().clone() for n, p in model.named_parameters()}
    x, y = (t.to(device) for t in data(dtype))
    own = own_samples(rank, world_size, uneven)
    measurement = ShardedSharpnessMeasurement(model, num_replicates=NUM_REPLICATES)
    for chunk in own.tensor_split(NUM_BATCHES):
        measurement.add(x[chunk], y[chunk])
    values = measurement.compute()
    out = {
        "sharded": is_sharded(model),
        "values": {k: float(v) for k, v in values.items()},
        "state_bytes": measurement.state_bytes(),
        "largest_whole_tensor": measurement.largest_whole_tensor,
        "gathered_solves": measurement.gathered_solves,
        "first_order_replicates": measurement.first_order_replicates,
        "local_numel": {n: p.to_local().numel() for n, p in measurement.params.items()},
        "sums": {
            n: torch.stack([measurement._whole(n, slot) for slot in s]).flatten(1).cpu()
            for n, s in measurement.sums.items()
        },
        "count": measurement.count.cpu(),
        "hook_calls": len(hook_calls),
        "unchanged": all(
            torch.equal(before[n], p.to_local()) and p.grad is None for n, p in model.named_parameters()
        ),
    }
    torch.save(out, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], len(sys.argv) > 6)
