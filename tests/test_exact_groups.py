"""Several replicate groups of one batch in one pass of the exact method (``exact_groups``): each group's
diagonal equals the exact method on that group alone and the brute-force Hessian of its mean loss (float64);
where the one pass does not apply (a token loss, an embedding table, a shared weight, a network that is not
piecewise linear) the groups go one by one with the same values; ``SharpnessMeasurement.add_groups`` pools
them into the slots separate batches would take, and the callback fetches merged batches."""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from callback_models import MLP, DataModule, quiet_trainer
from oracles import brute_force_hessian_diagonal
from torch import nn

from lightning_flatness import SharpnessMonitor
from lightning_flatness.functional import normalized_softmax_cross_entropy, select_parameters
from lightning_flatness.functional.estimators.api import hessian_diagonal_groups
from lightning_flatness.functional.estimators.exact_groups import exact_hessian_diagonal_groups
from lightning_flatness.functional.model_io import TokenLoss, group_bounds
from lightning_flatness.measure import SharpnessMeasurement
from lightning_flatness.training_subset import merged_chunks


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 4))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.ConvTranspose2d(4, 3, 2, stride=2),
        nn.ReLU(),
        nn.Conv2d(3, 2, 3),
        nn.Flatten(),
        nn.Linear(2 * 6 * 6, 4),
    )


def _conv1d() -> nn.Module:
    return nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.AvgPool1d(2), nn.Flatten(), nn.Linear(3 * 3, 4))


GROUPABLE = {"mlp": (_mlp, (6,)), "cnn": (_cnn, (3, 8, 8)), "conv1d": (_conv1d, (2, 8))}


def _data(shape: tuple, n: int = 13, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(
        0, classes, (n,), generator=g
    )


@pytest.mark.parametrize("loss_fn", [normalized_softmax_cross_entropy, F.cross_entropy], ids=["eq20", "ce"])
@pytest.mark.parametrize("name", list(GROUPABLE))
def test_each_group_of_one_pass_is_the_brute_force_hessian_of_its_own_mean_loss(name, loss_fn):
    build, shape = GROUPABLE[name]
    torch.manual_seed(0)
    net = build().double().eval()
    x, y = _data(shape)
    params = select_parameters(net)
    passed = exact_hessian_diagonal_groups(net, loss_fn, x, y, dict(params), 3)
    assert passed is not None and set(passed.groups) == set(params)
    groups = passed.groups
    # the pass's bound: 2^22 entries of a sample's columns (one per logit) at the outputs of the layers with
    # weights, and of those layers' inputs
    outputs, inputs = [], []

    def count(_m, args, out):
        outputs.append(out[0].numel())
        inputs.append(args[0][0].numel())

    hooks = [
        m.register_forward_hook(count)
        for m in net.modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d))
    ]
    net(x)
    for h in hooks:
        h.remove()
    assert passed.max_samples == 2**22 // (sum(outputs) * 4 + sum(inputs))
    for g, (lo, hi) in enumerate(group_bounds(13, 3)):  # 5, 4, 4 samples
        brute = brute_force_hessian_diagonal(net, loss_fn, x[lo:hi], y[lo:hi], list(params))
        for n in params:
            scale = brute[n].abs().max()
            assert float((groups[n][g] - brute[n]).abs().max()) <= 1e-12 * float(scale), (n, g)
    estimate = hessian_diagonal_groups(net, loss_fn, x, y, method="exact", num_groups=3)
    assert estimate.one_pass and estimate.group_sizes.tolist() == [5, 4, 4]
    assert estimate.one_pass_samples == passed.max_samples
    apart = hessian_diagonal_groups(net, loss_fn, x, y, method="exact", num_groups=3, one_pass=False)
    assert not apart.one_pass
    for n in params:
        torch.testing.assert_close(estimate.groups[n], apart.groups[n], rtol=1e-12, atol=1e-14)


class _Transposed(nn.Module):
    """A layer that takes a function of its weight (its transpose, as a tied decoder does): contracted through
    the function by the shared-weight path."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 8) / 3)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(F.linear(x, self.w.t())))


class _Embedded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table, self.head = nn.Embedding(20, 5), nn.Linear(5, 4)

    def forward(self, ids):
        return self.head(torch.relu(self.table(ids).mean(dim=1)))


def _not_groupable():
    g = torch.Generator().manual_seed(1)
    x, y = _data((6,))
    ids = torch.randint(0, 20, (13, 3), generator=g)
    return {
        "a function of a weight": (_Transposed(), x, y, F.cross_entropy),
        "embedding table": (_Embedded(), ids, y, F.cross_entropy),
        "tanh (not piecewise linear)": (
            nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)),
            x,
            y,
            None,
        ),
        "token loss": (
            nn.Sequential(nn.Linear(6, 4 * 3), nn.Unflatten(1, (3, 4))),
            x,
            torch.randint(0, 4, (13, 3), generator=g),
            TokenLoss(F.cross_entropy),
        ),
    }


@pytest.mark.parametrize("case", list(_not_groupable()))
def test_where_one_pass_does_not_apply_the_groups_go_one_by_one_with_the_same_values(case):
    torch.manual_seed(0)
    net, x, y, loss_fn = _not_groupable()[case]
    net = net.double().eval()
    params = dict(select_parameters(net))
    if loss_fn is None:  # the exact method refuses the tanh network, group by group as on the whole batch
        assert exact_hessian_diagonal_groups(net, F.cross_entropy, x, y, params, 3) is None
        with pytest.raises(ValueError, match="not the Gauss-Newton"):
            hessian_diagonal_groups(net, F.cross_entropy, x, y, method="exact", num_groups=3)
        return
    assert exact_hessian_diagonal_groups(net, loss_fn, x, y, params, 3) is None
    estimate = hessian_diagonal_groups(net, loss_fn, x, y, method="exact", num_groups=3)
    assert not estimate.one_pass
    for g, (lo, hi) in enumerate(group_bounds(13, 3)):
        alone = hessian_diagonal_groups(net, loss_fn, x[lo:hi], y[lo:hi], method="exact")
        for n in params:
            torch.testing.assert_close(estimate.groups[n][g], alone.groups[n][0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("build", [_mlp, _Embedded], ids=["one pass", "group by group"])
def test_add_groups_pools_each_group_into_the_slot_a_batch_of_its_own_takes(build):
    torch.manual_seed(0)
    net = build().double().eval()
    x, y = _data((6,), n=32)
    if build is _Embedded:
        x = torch.randint(0, 20, (32, 3), generator=torch.Generator().manual_seed(2))
    grouped, apart = SharpnessMeasurement(net), SharpnessMeasurement(net)
    for lo in range(0, 32, 16):
        assert grouped.add_groups(x[lo : lo + 16], y[lo : lo + 16], 4)
    for lo in range(0, 32, 4):
        assert apart.add(x[lo : lo + 4], y[lo : lo + 4])
    assert grouped.one_pass_groups is (build is _mlp) and grouped.num_batches == apart.num_batches == 8
    ours, theirs = grouped.compute(), apart.compute()
    for key in ("normalized", "normalized_stderr", "hessian_trace", "matrix_normalized_stderr"):
        assert float(ours[key]) == pytest.approx(float(theirs[key]), rel=1e-10), key


def test_merged_chunks_keep_the_groups_that_tensor_split_cuts():
    for n in range(1, 40):  # group_bounds is torch.tensor_split's cut
        for g in range(1, min(n, 9) + 1):
            assert [hi - lo for lo, hi in group_bounds(n, g)] == [
                len(p) for p in torch.arange(n).tensor_split(g)
            ]
    for sizes, batch in [
        ([64] * 8, 128),
        ([13] * 5 + [12] * 3, 40),
        ([7] * 8, 7),
        ([63] * 4 + [62] * 4, 128),
    ]:
        counts = merged_chunks(sizes, batch)
        assert sum(counts) == len(sizes)
        start = 0
        for c in counts:
            part = sizes[start : start + c]
            assert sum(part) <= batch or c == 1
            assert [hi - lo for lo, hi in group_bounds(sum(part), c)] == part
            start += c


def _fit_counting_groups(monitor: SharpnessMonitor, max_epochs: int, make: Any = None) -> list[int]:
    """Fit with ``monitor`` (``make()``: the module and data, built after seeding; default the test MLP and
    its data); the groups of every ``add_groups`` call (a batch for one pass)."""
    seen: list[int] = []
    original = SharpnessMeasurement.add_groups

    def counting(self, inputs, target, num_groups):
        seen.append(num_groups)
        return original(self, inputs, target, num_groups)

    SharpnessMeasurement.add_groups = counting
    try:
        pl.seed_everything(0, verbose=False)
        quiet_trainer([monitor], max_epochs=max_epochs).fit(*(make() if make else (MLP(), DataModule())))
    finally:
        SharpnessMeasurement.add_groups = original
    return seen


def test_the_monitor_fetches_merged_batches_and_logs_what_one_group_per_batch_gives():
    """512 samples would go in 8 batches of 64; with ``batch_size=32`` here 64 samples are 8 groups of 8 in
    2 batches of 4 groups (one pass each); ``batch_size=8`` keeps one group per batch. Same values."""
    histories, passes = [], []
    for batch_size in (32, 8):
        monitor = SharpnessMonitor(num_samples=64, batch_size=batch_size, dtype="float64")
        passes.append(_fit_counting_groups(monitor, max_epochs=1))
        histories.append(monitor.history[-1])
    assert passes == [[2, 4, 4], [2]]  # (2: the dry run's samples in two groups, :meth:`_learn_one_pass`)
    for key in ("normalized", "normalized_stderr", "hessian_trace", "normalized/net.0.weight"):
        assert histories[0][key] == pytest.approx(histories[1][key], rel=1e-10), key


def test_with_the_default_batch_size_every_measurement_fetches_as_many_groups_as_one_pass_takes():
    """Training batches of 8, 64 samples: replicate groups of 8 as large as a training batch, so no
    measurement would merge two groups. The dry run finds, on its samples in two groups, that one pass of
    this MLP takes far more samples (its own bound), so every measurement fetches all 8 groups in one batch.
    The values equal those of one group per batch (``batch_size=8``) at every measurement."""
    histories, passes = [], []
    for batch_size in (None, 8):
        monitor = SharpnessMonitor(num_samples=64, batch_size=batch_size, dtype="float64")
        passes.append(_fit_counting_groups(monitor, 2, lambda: (MLP(), DataModule(batch_size=8))))
        histories.append(monitor.history)
        if batch_size is None:
            # the MLP's layer outputs a sample, a column for each of its 3 classes, and its layer inputs
            assert monitor._one_pass_samples == 2**22 // ((16 + 16 + 3) * 3 + 10 + 16 + 16)
    assert passes == [[2, 8, 8], [2]]
    assert len(histories[0]) == len(histories[1]) == 2
    for ours, theirs in zip(*histories):
        for key in ("normalized", "normalized_stderr", "hessian_trace", "normalized/net.0.weight"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-10), key


def test_once_a_model_has_no_one_pass_the_monitor_fetches_one_group_per_batch(monkeypatch):
    """An embedding network (its rule is not sliceable): the dry run finds that it has no one pass, so every
    measurement fetches one group per batch (no forward wasted on trying). Where a measurement is the first
    to find out (the dry run's check skipped here), its merged batches go group by group, and the next
    measurements fetch one group per batch again."""
    from callback_models import Wrapped
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 20, (128, 3), generator=g), torch.randint(0, 4, (128,), generator=g)
    for check_at_dry_run in (True, False):
        if not check_at_dry_run:
            monkeypatch.setattr(SharpnessMonitor, "_learn_one_pass", lambda *args: None)
        monitor = SharpnessMonitor(num_samples=64, batch_size=32)
        per_fit = _fit_counting_groups(
            monitor,
            2,
            lambda: (
                Wrapped(_Embedded()),
                DataLoader(TensorDataset(ids, labels), batch_size=32, shuffle=True),
                DataLoader(TensorDataset(ids, labels)),
            ),
        )
        assert [h["method"] for h in monitor.history] == ["exact", "exact"]
        # the dry run's two groups; else the first measurement's two batches, the second's 8 through add
        assert per_fit == ([2] if check_at_dry_run else [4, 4])
        assert monitor._one_pass_groups is False


def test_a_pass_beyond_the_column_budget_goes_group_by_group(monkeypatch):
    """Above ``ONE_PASS_COLUMN_ELEMENTS`` entries of backward columns the groups go one by one (the larger
    pass runs slower there); the estimate is the same, from the same call."""
    import lightning_flatness.functional.estimators.exact_groups as exact_groups

    torch.manual_seed(0)
    net = _mlp().double().eval()
    x, y = _data((6,))
    within = hessian_diagonal_groups(net, F.cross_entropy, x, y, method="exact", num_groups=3)
    columns = 3 * 13 * (10 + 10 + 4)  # K = 3 columns (4 classes), 13 samples, the three layers' outputs
    monkeypatch.setattr(exact_groups, "ONE_PASS_COLUMN_ELEMENTS", columns - 1)
    beyond = hessian_diagonal_groups(net, F.cross_entropy, x, y, method="exact", num_groups=3)
    monkeypatch.setattr(exact_groups, "ONE_PASS_COLUMN_ELEMENTS", columns)
    at = hessian_diagonal_groups(net, F.cross_entropy, x, y, method="exact", num_groups=3)
    assert within.one_pass and at.one_pass and not beyond.one_pass
    for n in within.groups:
        torch.testing.assert_close(beyond.groups[n], within.groups[n], rtol=1e-12, atol=1e-14)


def test_add_groups_refuses_inputs_that_do_not_hold_the_samples_along_dim_0():
    """``nn.EmbeddingBag``'s 1-D token list beside its offsets cannot be cut into groups of samples: cutting
    it by rows would give the groups other tokens (or all the rest of them) without an error. Refused with
    the fix; the monitor's dry run sees the same layout and keeps one group per batch."""

    class Bags(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bag, self.head = nn.EmbeddingBag(20, 5), nn.Linear(5, 4)

        def forward(self, text, offsets):
            return self.head(torch.relu(self.bag(text, offsets)))

    g = torch.Generator().manual_seed(0)
    text, offsets = torch.randint(0, 20, (24,), generator=g), torch.tensor([0, 4, 9, 13, 17, 20])
    measurement = SharpnessMeasurement(Bags().double())
    with pytest.raises(ValueError, match=r"do not all hold the 6 samples .* to add\(\)"):
        measurement.add_groups((text, offsets), torch.randint(0, 4, (6,), generator=g), 2)
    assert measurement.num_batches == 0
