"""FSDP2 (``fully_shard``) models measured shard by shard (:mod:`lightning_flatness.sharded`), with 2
and 4 gloo processes (forked: about a second each) on the CPU: the values equal the unsharded model's
(exact method, one process, same samples), the jackknife equals the metric's on the gathered sums,
every rank holds ``1/P`` of the sums and at most one whole tensor at a time, eq. 17 is solved on the
ranks' rows (tall weights) or exchanged column blocks (wide ones) without gathering, except for
pruned layers, and the model is left unchanged."""

from __future__ import annotations

import math
import multiprocessing
import sys
from pathlib import Path

import pytest
import torch

from lightning_flatness.functional.measures import MEASURES
from lightning_flatness.measure import measure_sharpness
from lightning_flatness.metric import NormalizedSharpness
from lightning_flatness.sharded import ShardedSharpnessMeasurement

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import sharded_worker as worker  # noqa: E402
from forked_ranks import fork_ranks  # noqa: E402

sys.path.pop(0)


def run_workers(
    tmp_path: Path,
    world_size: int,
    dtype: str,
    uneven: bool = False,
    pruned: bool = False,
    hooked: bool = False,
) -> list[dict]:
    """Fork ``world_size`` sharded workers and collect their records."""
    args = (dtype, uneven, "cpu", pruned, hooked)
    return fork_ranks(tmp_path, world_size, worker.main, args, "sharded worker")


def check(
    records: list[dict], world_size: int, dtype: str, rel: float, uneven: bool = False, pruned: bool = False
) -> None:
    torch.set_num_threads(1)
    dt = getattr(torch, dtype)
    model = worker.build_model(dt, pruned)
    x, y = worker.data(dt)
    # the unsharded reference: the library's exact method on one process, over the same samples
    measured = torch.cat([worker.own_samples(r, world_size, uneven) for r in range(world_size)])
    x, y = x[measured], y[measured]
    reference = measure_sharpness(
        model, [(x[i::4], y[i::4]) for i in range(4)], method="exact", num_replicates=4
    ).values
    assert all(r["sharded"] and r["unchanged"] for r in records)
    assert all(r["hook_calls"] == 0 for r in records)  # a backward hook is not the measurement's
    # eq. 17 solved without gathering: the tall (8, 3) weight on each rank's rows, the wide (7, 16) and
    # (3, 7) ones on exchanged column blocks (with 4 ranks one holds no row of the (3, 7) weight); the
    # pruned layers gathered (their components need the transitive closure)
    gathered = {"0.weight", "3.weight"} if pruned else set()
    assert all(r["gathered_solves"] == gathered for r in records)
    first = records[0]["values"]
    assert all(r["values"] == first for r in records)  # bit-identical on every rank
    keys = [k for k in reference if k.split("/")[0] in MEASURES]
    assert len(keys) == 3 + 3 * 3 + 3  # totals, 3 measures of 3 weights, the trace of 3 biases (eq. 5)
    errors = {key: abs(first[key] - float(reference[key])) / abs(float(reference[key])) for key in keys}
    for measure in MEASURES:
        print(
            f"{measure}: largest relative difference from the unsharded {dtype} values",
            max((e, k) for k, e in errors.items() if k.split("/")[0] == measure),
        )
    for key in keys:
        assert errors[key] <= rel, (key, errors[key])
    assert first["num_samples"] == len(measured)
    # the decomposed jackknife and half-shift equal the metric's on the gathered sums
    weights = {n: p.detach().double() for n, p in model.named_parameters()}  # the default: biases too
    count = records[0]["count"]  # (R,) samples per replicate slot; sums: {name: (R, numel)} sample-weighted
    metric = NormalizedSharpness(weights, lam=0.5, num_replicates=len(count))
    means = {
        n: (s / count.unsqueeze(1).to(s.dtype)).reshape(len(count), *weights[n].shape)
        for n, s in records[0]["sums"].items()
    }
    metric.update(means, weights, count)  # group g -> slot g: the same per-slot sums
    expected = metric.compute()
    assert set(expected) == set(first)
    for key, value in expected.items():
        # both sides solve eq. 17 to a certified 1e-9 relative gap (the metric's replicates), so standard
        # errors and half shifts (differences of such values) are exact to about 1e-9 of the value itself
        scale = abs(first[key.replace("_stderr", "").replace("_half_shift", "")])
        # first-order leave-one-out values move with the pooled minimiser (split solve here, batched
        # there) by (A_r - A_0) times its error, which the value's certificate bounds by its square root
        rel = 1e-6 if key.startswith("normalized_stderr") else 1e-8
        assert first[key] == pytest.approx(float(value), rel=rel, abs=rel * scale), key
    # memory: each rank holds its rows of the R float64 sums (1/P of the unsharded metric's state, up to
    # the uneven split of rows) and never more than one whole tensor of the largest weight's size
    unsharded = sum(w.numel() for w in weights.values()) * worker.NUM_REPLICATES * 8
    for r in records:
        local = sum(r["local_numel"].values()) * worker.NUM_REPLICATES * 8 + worker.NUM_REPLICATES * 8
        assert r["state_bytes"] == local
        assert r["state_bytes"] <= 1.5 * unsharded / world_size + worker.NUM_REPLICATES * 8
        assert r["largest_whole_tensor"] == max(w.numel() for w in weights.values())
    assert sum(sum(r["local_numel"].values()) for r in records) == sum(w.numel() for w in weights.values())


# float32: the traces of the last layer cancel (entries of both signs), which turns the 1e-7 rounding of
# float32 forward/backward passes into 1.5e-6 relative on `hessian_trace/5.weight`; the normalized values
# agree to 4e-8 (printed by the test)
@pytest.mark.parametrize("dtype, rel", [("float64", 1e-9), ("float32", 5e-6)])
def test_two_process_fully_shard_measurement_equals_the_unsharded_model(tmp_path, dtype, rel):
    check(run_workers(tmp_path, 2, dtype), 2, dtype, rel)


@pytest.mark.parametrize("dtype, rel", [("float64", 1e-9), ("float32", 5e-6)])
def test_four_process_fully_shard_measurement_equals_the_unsharded_model(tmp_path, dtype, rel):
    check(run_workers(tmp_path, 4, dtype), 4, dtype, rel)


def test_pruned_layers_are_gathered_for_eq17_and_still_equal_the_unsharded_model(tmp_path):
    check(run_workers(tmp_path, 4, "float64", pruned=True), 4, "float64", 1e-9, pruned=True)


def test_a_module_backward_hook_is_suspended_and_the_values_are_the_unhooked_models(tmp_path):
    check(run_workers(tmp_path, 2, "float64", hooked=True), 2, "float64", 1e-9)


def test_ranks_with_fewer_samples_and_empty_batches_still_agree_on_the_collectives(tmp_path):
    check(run_workers(tmp_path, 2, "float64", uneven=True), 2, "float64", 1e-9, uneven=True)


@pytest.mark.parametrize("world_size, pruned", [(2, False), (4, True)])
def test_first_order_replicates_split_and_gathered_equal_the_metric(
    tmp_path, monkeypatch, world_size, pruned
):
    """The first-order leave-one-out values, as split sums over the ranks and on gathered (pruned) tensors,
    against the unsharded metric's. The tests' few samples give spreads far above the 10% rule, so both
    tensor-level checks are off here, on both sides (the ranks are forked from this process)."""
    from lightning_flatness.functional import replicate_measures

    monkeypatch.setattr(replicate_measures, "LINEARIZATION_TOLERANCE", math.inf)
    monkeypatch.setattr(replicate_measures, "LINEARIZATION_MAX_RELATIVE_SPREAD", math.inf)
    records = run_workers(tmp_path, world_size, "float64", pruned=pruned)
    check(records, world_size, "float64", 1e-9, pruned=pruned)
    counts = records[0]["first_order_replicates"]
    assert set(counts) == {"0.weight", "3.weight", "5.weight"} and all(
        r["first_order_replicates"] == counts for r in records
    )
    # every tensor has first-order replicates (the others: a unit that comes alive, solved on both sides)
    assert all(c >= 1 for c in counts.values()), counts


def test_without_a_process_group_it_says_to_initialise_one():
    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedSharpnessMeasurement(torch.nn.Linear(3, 2))


def _refusals(init_file: str, out_file: str) -> None:
    """One gloo rank: what the sharded measurement refuses, with the messages."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    messages = {}
    conv = fully_shard(
        torch.nn.Sequential(torch.nn.Conv1d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(3, 2)), mesh=mesh
    )
    plain = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    fully_shard(plain[2], mesh=mesh)  # the first layer stays a plain tensor
    twice = torch.nn.Linear(3, 3)
    shared = fully_shard(torch.nn.Sequential(twice, twice), mesh=mesh)
    for name, model, call in [
        ("conv", conv, None),
        ("plain", plain, None),
        ("twice", shared, (torch.randn(4, 3), torch.randint(0, 3, (4,)))),
    ]:
        try:
            measurement = ShardedSharpnessMeasurement(model)
            if call is not None:
                measurement.add(*call)
            messages[name] = None
        except ValueError as err:
            messages[name] = str(err)
    torch.save(messages, out_file)
    dist.destroy_process_group()


def test_refuses_convolutions_unsharded_weights_and_weights_used_twice_naming_them(tmp_path):
    process = multiprocessing.get_context("fork").Process(
        target=_refusals, args=(str(tmp_path / "store"), str(tmp_path / "out.pt"))
    )
    process.start()
    process.join(timeout=60)
    assert process.exitcode == 0
    messages = torch.load(tmp_path / "out.pt")
    assert "0.weight belongs to a Conv1d" in messages["conv"] and "nn.Linear" in messages["conv"]
    assert "0.weight is not sharded" in messages["plain"] and "fully_shard" in messages["plain"]
    assert "ran twice" in messages["twice"]


def _callback_rank(rank: int, world_size: int, init_file: str, out_file: str, child: bool = False) -> None:
    """One gloo rank: ``SharpnessMonitor`` measuring a LightningModule whose network is ``fully_shard``-ed,
    driven by a stand-in trainer (Lightning's FSDP strategies refuse a CPU accelerator); ``child``: a monitor
    whose ``measured_network`` is the module's ``net``."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from callback_models import MLP, make_dataset
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader

    from lightning_flatness.callback import SharpnessMonitor
    from lightning_flatness.training_subset import TrainingSubset, choose_indices

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    mesh = init_device_mesh("cpu", (world_size,))

    def sharded_mlp():
        torch.manual_seed(0)
        module = MLP(hidden=9).train()
        for layer in module.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(module.net, mesh=mesh)
        return module

    module, untouched = sharded_mlp(), sharded_mlp()
    dataset = make_dataset(64)

    class ChildMonitor(SharpnessMonitor):
        def measured_network(self, pl_module):
            return pl_module.net

    monitor = (ChildMonitor if child else SharpnessMonitor)(
        num_samples=30, batch_size=4, num_replicates=4, seed=5, log_images=False
    )
    monitor._subset = TrainingSubset(DataLoader(dataset, batch_size=8))
    monitor._indices = choose_indices(len(dataset), 30, seed=5)
    trainer = SimpleNamespace(
        global_rank=rank, world_size=world_size, fast_dev_run=False, is_global_zero=rank == 0
    )
    from lightning_flatness import sharded

    sharded.prepare_in_callback(monitor, trainer, module)
    values, _ = monitor._measure(trainer, module)
    assert values.pop("peak_memory_mb") > 0  # this process's own peak: the one value that differs per rank
    # training goes on as if nothing had happened: the same gradients as a model that was never measured
    x, y = dataset.tensors[0][rank::world_size][:8], dataset.tensors[1][rank::world_size][:8]
    for net in (module, untouched):
        torch.nn.functional.cross_entropy(net(x), y).backward()
    same_gradients = all(
        torch.equal(a.grad.to_local(), b.grad.to_local())
        for a, b in zip(module.parameters(), untouched.parameters())
    )
    torch.save(
        {
            "values": values,
            "training": module.training,
            "same_gradients": same_gradients,
            "indices": monitor._indices,
            "method": monitor._resolved_method,
        },
        out_file,
    )
    dist.destroy_process_group()


def _callback_records(tmp_path, world_size: int, child: bool = False) -> list[dict]:
    """The records of :func:`_callback_rank` on ``world_size`` forked gloo ranks (each rank exits 0)."""
    context = multiprocessing.get_context("fork")
    procs = [
        context.Process(
            target=_callback_rank,
            args=(r, world_size, str(tmp_path / "store"), str(tmp_path / f"{r}.pt"), child),
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * world_size
    return [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(world_size)]


def test_a_sharded_measurement_measures_the_monitors_measured_network(tmp_path):
    records = _callback_records(tmp_path, 2, child=True)
    values = records[0]["values"]
    # names relative to the measured network (module.net), not to the LightningModule
    assert "normalized/2.weight" in values and not any(k.startswith("normalized/net.") for k in values)
    from callback_models import MLP, make_dataset
    from oracles import brute_force_measures

    torch.manual_seed(0)
    model = MLP(hidden=9)
    dataset = make_dataset(64)
    idx = records[0]["indices"]
    reference = brute_force_measures(model, dataset.tensors[0][idx], dataset.tensors[1][idx])
    assert values["normalized"] == pytest.approx(reference["normalized"], rel=1e-5)
    assert values["normalized/2.weight"] == pytest.approx(reference["normalized/net.2.weight"], rel=1e-5)


def test_sharpness_monitor_routes_a_fully_shard_module_to_the_sharded_measurement(tmp_path):
    from callback_models import MLP, make_dataset
    from oracles import brute_force_measures

    records = _callback_records(tmp_path, 4)
    assert all(r["values"] == records[0]["values"] for r in records)
    assert all(r["training"] for r in records)  # train mode restored after the eval-mode measurement
    assert all(r["same_gradients"] for r in records)
    assert records[0]["method"] == "exact"
    torch.manual_seed(0)
    model = MLP(hidden=9)
    dataset = make_dataset(64)
    idx = records[0]["indices"]  # 30 samples over 4 ranks: shares of 8, 8, 7 and 7, in 4 batches each
    reference = brute_force_measures(model, dataset.tensors[0][idx], dataset.tensors[1][idx])
    for key in ("normalized", "matrix_normalized", "hessian_trace", "normalized/net.2.weight"):
        assert records[0]["values"][key] == pytest.approx(reference[key], rel=1e-5), key
    assert records[0]["values"]["num_samples"] == 30
