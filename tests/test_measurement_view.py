"""``measurement_view``: the live network in eval mode, cast only where the dtype must change, restored
exactly; and measurements through it equal measurements on the deep copy it replaced."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_flatness.functional import hessian_diagonal, normalized_softmax_cross_entropy
from lightning_flatness.isolation import measurement_view


def _network(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(6, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Dropout(0.4),
        nn.Linear(8, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )
    with torch.no_grad():  # non-trivial running statistics, so eval mode is visible in the output
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    return net


def _slots(net: nn.Module) -> list[tuple[str, int]]:
    return [(n, id(t)) for n, t in [*net.named_parameters(), *net.named_buffers()]]


def test_same_dtype_is_the_live_network_in_eval_mode_with_no_copy_and_modes_restored():
    net = _network().train()
    net[3].eval()  # a mixed mode the user chose, to be restored as it was
    modes = [m.training for m in net.modules()]
    slots, pointers = _slots(net), [p.data_ptr() for p in net.parameters()]
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.5)
    with measurement_view(net, torch.float32) as view:
        assert view is net
        assert not any(m.training for m in net.modules())
        assert _slots(net) == slots  # the live tensors, no copy
        assert [p.data_ptr() for p in net.parameters()] == pointers
    assert [m.training for m in net.modules()] == modes and _slots(net) == slots
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in net.parameters())


def test_other_dtype_swaps_cast_copies_of_floating_tensors_only_and_restores_them_even_on_error():
    net = _network().to(torch.bfloat16).train()
    net[0].weight.requires_grad_(False)  # frozen stays frozen
    net[6] = net[4] = nn.Linear(8, 8).to(torch.bfloat16)  # one module under two names
    slots = _slots(net)
    before = {n: t.clone() for n, t in [*net.named_parameters(), *net.named_buffers()]}
    with pytest.raises(RuntimeError, match="inside"):
        with measurement_view(net, torch.float64):
            params = dict(net.named_parameters(remove_duplicate=False))
            assert all(p.dtype == torch.float64 and isinstance(p, nn.Parameter) for p in params.values())
            assert params["4.weight"] is params["6.weight"]  # shared: one copy
            assert not params["0.weight"].requires_grad and params["1.weight"].requires_grad
            assert net[1].running_mean.dtype == torch.float64
            assert net[1].num_batches_tracked.dtype == torch.int64  # not floating: untouched
            for name, value in before.items():  # exact casts of the live values
                live = dict([*net.named_parameters(), *net.named_buffers()])[name]
                assert torch.equal(live, value.to(live.dtype))
            assert not net.training
            raise RuntimeError("an error inside the block")
    assert _slots(net) == slots and net.training and net[0].weight.dtype == torch.bfloat16
    for name, value in [*net.named_parameters(), *net.named_buffers()]:
        assert torch.equal(value, before[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hessian_diagonal_through_the_view_equals_the_deep_copy_in_eval_mode_bit_for_bit(dtype):
    net = _network().train()  # dropout and batch statistics would change the value in train mode
    x, y = torch.randn(32, 6, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 3
    reference_net = copy.deepcopy(net).to(dtype).eval()
    reference = hessian_diagonal(reference_net, normalized_softmax_cross_entropy, x.to(dtype), y)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    with measurement_view(net, dtype) as view:
        got = hessian_diagonal(view, normalized_softmax_cross_entropy, x.to(dtype), y)
    weights = {"0.weight", "4.weight", "6.weight"}
    assert got.keys() == reference.keys() == weights | {"0.bias", "1.weight", "1.bias", "4.bias", "6.bias"}
    for name in got:
        assert got[name].dtype == dtype and torch.equal(got[name], reference[name]), name
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())  # running stats untouched
    assert torch.equal(torch.get_rng_state(), rng)
    # negative control: the running statistics matter (eval mode uses them), so a copy without them differs
    plain = copy.deepcopy(reference_net)
    plain[1].reset_running_stats()
    other = hessian_diagonal(plain, normalized_softmax_cross_entropy, x.to(dtype), y)
    assert not torch.equal(other["0.weight"], reference["0.weight"])
