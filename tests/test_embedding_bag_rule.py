"""The ``embedding_bag`` layer rule (``nn.EmbeddingBag`` on bags of equal length, one per sample) against the
brute-force Hessian: sum, mean, per-sample weights, padding; the exact method, without per-sample passes."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from oracles import brute_force_hessian_diagonal
from torch import nn

from lightning_flatness.functional import hessian_diagonal
from lightning_flatness.functional.estimators.method_choice import choose_method

CASES = {
    "mean": dict(mode="mean"),
    "sum": dict(mode="sum"),
    "mean with padding": dict(mode="mean", padding_idx=0),
    "sum with per-sample weights": dict(mode="sum", weighted=True),
}


class BagClassifier(nn.Module):
    """The text classifier of PyTorch's tutorial on equal-length bags: ``EmbeddingBag`` -> ReLU MLP."""

    def __init__(self, mode: str, padding_idx: int | None = None, weighted: bool = False) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(12, 4, mode=mode, padding_idx=padding_idx)
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.weighted = weighted

    def forward(self, ids):
        weights = (1.0 + ids.to(self.fc1.weight.dtype)) / 12.0 if self.weighted else None
        return self.fc2(torch.relu(self.fc1(self.bag(ids, per_sample_weights=weights))))


class LookupTwin(nn.Module):
    """The same network with the bag written as ``nn.Embedding`` and an explicit weighted sum (autograd's
    double backward has no ``embedding_bag``): padding entries weigh 0, a mean divides by the bag's other
    entries. Checked against the bag's own forward before it serves as the reference."""

    def __init__(self, bagged: BagClassifier) -> None:
        super().__init__()
        self.bag = nn.Embedding(12, 4)
        self.fc1, self.fc2 = bagged.fc1, bagged.fc2
        self.bag.weight = bagged.bag.weight
        self.mode, self.padding, self.weighted = bagged.bag.mode, bagged.bag.padding_idx, bagged.weighted

    def forward(self, ids):
        c = torch.ones(ids.shape, dtype=self.fc1.weight.dtype)
        if self.weighted:
            c = (1.0 + ids.to(c.dtype)) / 12.0
        if self.padding is not None:
            c = c * (ids != self.padding)
        if self.mode == "mean":
            c = c / c.sum(dim=1, keepdim=True)
        pooled = (self.bag(ids) * c.unsqueeze(-1)).sum(dim=1)
        return self.fc2(torch.relu(self.fc1(pooled)))


@pytest.mark.parametrize("case", list(CASES))
def test_the_exact_diagonal_of_a_bag_equals_the_brute_force_hessian(case):
    torch.manual_seed(0)
    net = BagClassifier(**CASES[case]).double()
    g = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, 12, (10, 5), generator=g), torch.randint(0, 3, (10,), generator=g)
    ids[0, :2] = 0  # padding entries where padding_idx=0
    names = ["bag.weight", "fc1.weight"]
    assert choose_method(net, F.cross_entropy, ids, y, parameters=names).method == "exact"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the per-layer path
        ours = hessian_diagonal(net, F.cross_entropy, ids, y, method="exact", parameters=names)
    twin = LookupTwin(net)
    torch.testing.assert_close(twin(ids), net(ids), rtol=1e-12, atol=1e-14)
    truth = brute_force_hessian_diagonal(twin, F.cross_entropy, ids, y, names)
    for name in names:
        torch.testing.assert_close(ours[name], truth[name], rtol=1e-10, atol=1e-15)
    assert float(truth["bag.weight"].abs().sum()) > 0


def test_a_max_bag_takes_the_per_sample_path_and_equals_the_brute_force_hessian():
    """``mode="max"`` (each output entry from one bag entry) is not the rule's layout: per-sample passes,
    still equal to the brute-force Hessian of the twin written with ``amax`` over the looked-up rows."""
    torch.manual_seed(0)
    net = BagClassifier(mode="max").double()
    g = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, 12, (6, 5), generator=g), torch.randint(0, 3, (6,), generator=g)

    class MaxTwin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bag, self.fc1, self.fc2 = nn.Embedding(12, 4), net.fc1, net.fc2
            self.bag.weight = net.bag.weight

        def forward(self, ids):
            return self.fc2(torch.relu(self.fc1(self.bag(ids).amax(dim=1))))

    twin = MaxTwin()
    torch.testing.assert_close(twin(ids), net(ids), rtol=1e-12, atol=1e-14)
    with pytest.warns(UserWarning, match="per-layer contractions do not apply"):
        ours = hessian_diagonal(net, F.cross_entropy, ids, y, method="exact", parameters=["bag.weight"])
    truth = brute_force_hessian_diagonal(twin, F.cross_entropy, ids, y, ["bag.weight"])
    torch.testing.assert_close(ours["bag.weight"], truth["bag.weight"], rtol=1e-10, atol=1e-15)


class _TutorialTextClassifier(nn.Module):
    """PyTorch's text-classification tutorial model: bags of token ids given as one 1-D list and offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding, self.fc = nn.EmbeddingBag(50, 8), nn.Linear(8, 4)

    def forward(self, text, offsets):
        return self.fc(self.embedding(text, offsets))


def test_the_monitor_names_the_fix_for_bags_given_as_a_token_list_with_offsets():
    """The tutorial's collate function concatenates each batch's token ids into one 1-D tensor beside the
    bags' offsets: not the samples along dim 0, which the measurement cuts batches by. The fit stops at its
    start, before any training step, with an error naming the layout and the ``(N, L)`` ids that work (it
    used to say only that the inputs and the target differ in length, and to override ``split_batch``)."""
    from callback_models import Wrapped, quiet_trainer
    from torch.utils.data import DataLoader

    from lightning_flatness import SharpnessMonitor

    g = torch.Generator().manual_seed(0)
    samples = [
        (int(torch.randint(0, 4, (), generator=g)), torch.randint(0, 50, (3 + i % 4,), generator=g))
        for i in range(32)
    ]

    def collate(batch):
        labels = torch.tensor([label for label, _ in batch])
        offsets = torch.tensor([0] + [len(t) for _, t in batch[:-1]]).cumsum(0)
        return (torch.cat([t for _, t in batch]), offsets), labels

    class Lit(Wrapped):
        def forward(self, inputs):
            return self.net(*inputs)

        def training_step(self, batch, batch_idx):
            inputs, y = batch
            return F.cross_entropy(self(inputs), y)

        def validation_step(self, batch, batch_idx):
            pass

    module = Lit(_TutorialTextClassifier())
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    loader = DataLoader(samples, batch_size=8, collate_fn=collate)
    with pytest.raises(ValueError, match=r"do not all hold the batch's 4 samples along dim 0 .*padding_idx"):
        quiet_trainer([SharpnessMonitor(num_samples=16)], max_epochs=1).fit(module, loader, loader)
    assert all(torch.equal(before[n], p) for n, p in module.named_parameters())
