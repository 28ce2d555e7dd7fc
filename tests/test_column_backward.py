"""The folded-batch backward of the K columns of the exact and sketched methods
(layer_rules.column_backward) gives what autograd gives: per operation kind (torchvision's in-place
ReLU and residual sum included), the gradients at every recorded layer output equal autograd's
``is_grads_batched`` gradients, and the diagonal equals the float64 brute-force Hessian diagonal. An
operation without a rule, an in-place operation without one or a tensor changed after the forward
sends the computation back to autograd, with the same result."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracles import assert_relative_close
from oracles import brute_force_hessian_diagonal as brute_hessian_diagonal
from torch import nn

import lightning_flatness.functional.estimators.exact as exact_module
from lightning_flatness.functional.estimators.layer_rules.column_backward import ColumnTape
from lightning_flatness.functional.estimators.recorder import _record_forward
from lightning_flatness.functional.losses import normalized_softmax_cross_entropy
from lightning_flatness.functional.parameters import select_parameters

torch.set_num_threads(1)


class _Residual(nn.Module):
    """conv -> eval BatchNorm -> ReLU -> conv, plus the block input (a residual sum), then global
    average pooling, flatten and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.conv = nn.Conv2d(3, 3, 3, padding="same", bias=False)
        self.norm = nn.BatchNorm2d(3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        h = self.stem(x)
        out = self.conv(torch.relu(self.norm(h))) + h
        return self.head(self.pool(out).flatten(1))


class _Reshapes(nn.Module):
    """view, unsqueeze / squeeze and eval-mode dropout between the layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        h = F.relu(self.a(x.view(x.shape[0], -1))).unsqueeze(1)
        return self.b(self.drop(h).squeeze(1).contiguous())


def _models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return {
        "mlp": (
            nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 4)),
            torch.randn(6, 5, generator=g),
        ),
        # stride, padding, dilation, groups; overlapping padded max pooling with ceil_mode
        "conv1d": (
            nn.Sequential(
                nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2),
                nn.ReLU(),
                nn.MaxPool1d(3, stride=2, padding=1, ceil_mode=True),
                nn.Conv1d(4, 4, 2, groups=2),
                nn.ReLU(),
                nn.Flatten(),
                nn.LazyLinear(4),
            ),
            torch.randn(6, 2, 13, generator=g),
        ),
        "conv2d": (
            nn.Sequential(
                nn.Conv2d(1, 3, 3, padding="same"),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(3, 2, (2, 3), stride=(1, 2)),
                nn.Flatten(),
                nn.LazyLinear(4),
            ),
            torch.randn(6, 1, 6, 7, generator=g),
        ),
        "residual": (_Residual(), torch.randn(6, 2, 5, 5, generator=g)),
        "reshapes": (_Reshapes(), torch.randn(6, 2, 3, generator=g)),
    }


def _prepared(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model, x = _models()[name]
    model(x)  # materialise lazy layers
    model = model.double().eval()
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    y = torch.randint(
        0, 4 if name != "reshapes" else 3, (x.shape[0],), generator=torch.Generator().manual_seed(1)
    )
    return model, x.double(), y


def _spy(monkeypatch) -> list[bool]:
    """Records whether each backward of the per-layer path went through the tape."""
    used: list[bool] = []
    backward = ColumnTape.backward

    def spying(self, logits, columns, wanted, consume=None):
        result = backward(self, logits, columns, wanted, consume)
        used.append(result is not None)
        return result

    monkeypatch.setattr(ColumnTape, "backward", spying)
    return used


@pytest.mark.parametrize("name", ["mlp", "conv1d", "conv2d", "residual", "reshapes"])
def test_tape_gradients_equal_autograd_batched_gradients(name):
    """At every recorded layer output, the folded-batch backward of 5 random columns equals autograd's
    vmapped backward (float64, 1e-12 relative)."""
    model, x, _ = _prepared(name)
    forward = _assert_tape_equals_autograd(model, x, num_columns=5, seed=2)
    assert len(forward.recorder.calls) > 0


def _assert_tape_equals_autograd(model: nn.Module, x: torch.Tensor, num_columns: int, seed: int):
    """Record ``model`` on ``x``; the tape's gradients of ``num_columns`` random columns at every recorded
    layer output must equal autograd's vmapped ones (float64, 1e-12 relative). Returns the recording."""
    with torch.enable_grad():
        forward = _record_forward(model, x, select_parameters(model), "test")
        outputs = [call.output for call in forward.recorder.calls]
        columns = torch.randn(
            num_columns,
            *forward.logits.shape,
            dtype=torch.float64,
            generator=torch.Generator().manual_seed(seed),
        )
        ours = forward.recorder.tape.backward(forward.logits, columns, outputs)
        reference = torch.autograd.grad(
            forward.logits, outputs, columns, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    assert ours is not None, "the tape should cover this model"
    assert len(ours) == len(reference) == len(forward.recorder.calls)
    for a, b in zip(ours, reference):
        assert (a is None) == (b is None)
        if b is not None:
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))
    return forward


@pytest.mark.parametrize("name", ["mlp", "conv1d", "conv2d", "residual", "reshapes"])
def test_exact_diagonal_through_the_tape_equals_brute_force(name, monkeypatch):
    """The whole method (per-layer contractions fed by the tape) against the float64 Hessian diagonal."""
    used = _spy(monkeypatch)
    model, x, y = _prepared(name)
    params = select_parameters(model)
    diag = exact_module.exact_hessian_diagonal(model, F.cross_entropy, x, y, params)
    assert used == [True]
    ref = brute_hessian_diagonal(model, F.cross_entropy, x, y, list(params))
    assert_relative_close(diag, ref, 1e-9)


class _AbsNet(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.inplace = inplace

    def forward(self, x):
        h = self.a(x)
        h = h.abs_() if self.inplace else torch.abs(h)
        return self.b(h)


@pytest.mark.parametrize("inplace", [True, False], ids=["abs_inplace", "abs"])
def test_operations_without_a_rule_fall_back_to_autograd(inplace, monkeypatch):
    """``abs`` (piecewise linear, so exact applies, but no rule on the tape), in place on a recorded output
    (the forward then copies the outputs) or not, leaves the tape unused; the diagonal is still the
    brute-force one."""
    used = _spy(monkeypatch)
    torch.manual_seed(0)
    model = _AbsNet(inplace).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    params = select_parameters(model)
    diag = exact_module.exact_hessian_diagonal(model, F.cross_entropy, x, y, params)
    assert used and not any(used)
    assert_relative_close(diag, brute_hessian_diagonal(model, F.cross_entropy, x, y, list(params)), 1e-9)


class _TorchvisionBlocks(nn.Module):
    """torchvision's ResNet pattern: a stem conv -> BatchNorm -> ReLU(inplace=True) -> max pooling, then
    basic blocks ``out = relu_(bn1(conv1(x))); out = bn2(conv2(out)); out += identity; relu_(out)`` (one
    with a strided 1x1 downsampling of the identity), global pooling and a linear head."""

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x):
            identity = x
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            if self.downsample is not None:
                identity = self.downsample(x)
            out += identity
            return self.relu(out)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self.Block(3, 3, 1)
        self.layer2 = self.Block(3, 4, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _torchvision_style() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = _TorchvisionBlocks().double().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5, generator=g)
                module.running_var.uniform_(0.5, 2.0, generator=g)
                module.weight.uniform_(0.5, 1.5, generator=g)
                module.bias.uniform_(-0.5, 0.5, generator=g)
    x = torch.randn(6, 2, 7, 7, dtype=torch.float64, generator=g)
    return model, x, torch.randint(0, 5, (6,), generator=g)


def test_torchvision_style_in_place_blocks_go_through_the_tape_and_equal_brute_force(monkeypatch):
    """In-place ReLU on BatchNorm outputs and ``out += identity`` followed by an in-place ReLU (the
    forward copies the recorded outputs, and the tape takes the copies as identities): the tape is used,
    its gradients at every recorded output equal autograd's, and the exact diagonal is the float64
    brute-force one."""
    model, x, y = _torchvision_style()
    params = select_parameters(model)
    forward = _assert_tape_equals_autograd(model, x, num_columns=4, seed=4)
    assert forward.recorder.clone_outputs  # the model changes recorded outputs in place
    used = _spy(monkeypatch)
    diag = exact_module.exact_hessian_diagonal(model, normalized_softmax_cross_entropy, x, y, params)
    assert used == [True]
    ref = brute_hessian_diagonal(model, normalized_softmax_cross_entropy, x, y, list(params))
    assert_relative_close(diag, ref, 1e-9)


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_the_sketch_goes_through_the_tape_with_the_values_of_autograd(chunk_size, monkeypatch):
    """gauss_newton_sketch on the torchvision-style blocks: the tape carries its columns (each layer
    contracted as the pass reaches it) and gives the values of autograd's batched backward for the
    same random signs."""
    from lightning_flatness.functional.estimators.gauss_newton_sketch import gauss_newton_sketch_diagonal

    model, x, y = _torchvision_style()
    params = select_parameters(model)

    def run() -> dict[str, torch.Tensor]:
        return gauss_newton_sketch_diagonal(
            model,
            normalized_softmax_cross_entropy,
            x,
            y,
            params,
            generator=torch.Generator().manual_seed(5),
            chunk_size=chunk_size,
        )

    used = _spy(monkeypatch)
    taped = run()
    assert used == [True]
    monkeypatch.setattr(ColumnTape, "backward", lambda self, *args, **kwargs: None)
    reference = run()
    for name in params:
        torch.testing.assert_close(taped[name], reference[name], rtol=1e-12, atol=1e-14)


def test_in_place_relu_after_an_earlier_use_routes_both_gradients():
    """``h`` feeds a linear layer *before* an in-place ReLU changes it and another one after: the
    first use's gradient reaches ``h`` unmasked, the second's through the mask (against autograd)."""
    torch.manual_seed(0)
    a, b, c = (nn.Linear(4, 4).double() for _ in range(3))
    weights = [p.detach().requires_grad_(True) for layer in (a, b, c) for p in (layer.weight, layer.bias)]
    tape = ColumnTape({id(w) for w in weights})
    x = torch.randn(5, 4, dtype=torch.float64)
    h = F.linear(x, weights[0], weights[1])
    tape.record("linear", F.linear, (x, weights[0], weights[1]), {}, h)
    early = F.linear(h, weights[2], weights[3])
    tape.record("linear", F.linear, (h, weights[2], weights[3]), {}, early)
    reference_h = h.clone()  # autograd needs the value before the in-place change
    out = F.relu(h, inplace=True)
    assert out is h
    tape.record("relu", F.relu, (h,), {"inplace": True}, out)
    late = F.linear(out, weights[4], weights[5])
    tape.record("linear", F.linear, (out, weights[4], weights[5]), {}, late)
    total = early + late
    tape.record("add", torch.add, (early, late), {}, total)
    columns = torch.randn(3, 5, 4, dtype=torch.float64)
    delivered: list[tuple[int, torch.Tensor]] = []
    tape.backward(total, columns, [h], lambda i, g: delivered.append((i, g.clone())))
    # at h: the gradient of the value before the change, delivered once (by the operation that made h)
    assert [i for i, _ in delivered] == [0]
    ours = delivered[0][1]
    # autograd on an out-of-place copy of the same computation
    h2 = F.linear(x, weights[0], weights[1])
    total2 = F.linear(h2, weights[2], weights[3]) + F.linear(F.relu(h2), weights[4], weights[5])
    (expected,) = torch.autograd.grad(total2, h2, columns, is_grads_batched=True)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-14)
    assert torch.equal(reference_h.clamp_min(0), h)


def test_an_in_place_sum_of_a_tensor_with_itself_doubles_its_gradient():
    """``h += h`` (the residual rule, in place, with both terms the same tensor): the gradient at ``h``
    before the change is twice the one after it, as autograd gives on an out-of-place copy."""
    torch.manual_seed(0)
    a, b = nn.Linear(3, 4).double(), nn.Linear(4, 2).double()
    weights = [p.detach().requires_grad_(True) for layer in (a, b) for p in (layer.weight, layer.bias)]
    tape = ColumnTape({id(w) for w in weights})
    x = torch.randn(5, 3, dtype=torch.float64)
    h = F.linear(x, weights[0], weights[1])
    tape.record("linear", F.linear, (x, weights[0], weights[1]), {}, h)
    tape.record("add", torch.Tensor.add_, (h, h), {}, h.add_(h))
    out = F.linear(h, weights[2], weights[3])
    tape.record("linear", F.linear, (h, weights[2], weights[3]), {}, out)
    columns = torch.randn(3, 5, 2, dtype=torch.float64)
    (ours,) = tape.backward(out, columns, [h])
    h2 = F.linear(x, weights[0], weights[1])
    (expected,) = torch.autograd.grad(
        F.linear(h2 + h2, weights[2], weights[3]), h2, columns, is_grads_batched=True
    )
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-14)


def test_in_place_operations_without_a_rule_or_untaped_changes_disable_the_tape():
    """An in-place multiply has no rule (the tape is rejected); an in-place change of a taped tensor
    that the tape did not record (under no_grad, after the forward) makes it decline at backward."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 4).double()
    weight, bias = (p.detach().requires_grad_(True) for p in (layer.weight, layer.bias))
    x = torch.randn(5, 3, dtype=torch.float64)
    tape = ColumnTape({id(weight), id(bias)})
    h = F.linear(x, weight, bias)
    tape.record("linear", F.linear, (x, weight, bias), {}, h)
    tape.record("mul", torch.Tensor.mul_, (h, 2.0), {}, h.mul_(2.0))
    assert not tape.ok
    tape = ColumnTape({id(weight), id(bias)})
    h = F.linear(x, weight, bias)
    tape.record("linear", F.linear, (x, weight, bias), {}, h)
    out = h + 1.0
    tape.record("add", torch.add, (h, 1.0), {}, out)
    tape.record("add", torch.Tensor.add_, (out, h), {}, out.add_(h))  # out += h: taped
    assert tape.ok and tape.backward(out, torch.ones(1, 5, 4, dtype=torch.float64), [h]) is not None
    with torch.no_grad():
        out.mul_(1.0)  # not taped
    assert tape.backward(out, torch.ones(1, 5, 4, dtype=torch.float64), [h]) is None


class _Activations(nn.Module):
    """LeakyReLU, ReLU6 and hardtanh between linear layers, in place on the layer outputs or not."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.acts = nn.ModuleList(
            [
                nn.LeakyReLU(0.2, inplace=inplace),
                nn.ReLU6(inplace=inplace),
                nn.Hardtanh(-0.3, 0.4, inplace=inplace),
            ]
        )

    def forward(self, x):
        h = self.acts[0](self.a(x))
        h = self.acts[1](self.b(h))
        h = self.acts[2](self.c(h))
        return self.d(h)


@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "in_place"])
def test_leaky_relu_relu6_and_hardtanh_go_through_the_tape(inplace, monkeypatch):
    """The piecewise-linear activations besides ReLU, in place or not: the tape's gradients equal
    autograd's and the exact diagonal equals the float64 brute force (some inputs of ReLU6 beyond 6 and
    some inside, checked)."""
    torch.manual_seed(0)
    model = _Activations(inplace).double().eval()
    x = 2 * torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    with torch.no_grad():
        model.b.weight.mul_(8.0)  # so that some entries pass ReLU6's 6
        pre = model.b(model.acts[0](model.a(x)).clone())
        assert bool((pre > 6).any()) and bool(((pre > 0) & (pre < 6)).any())
    _assert_tape_equals_autograd(model, x, num_columns=3, seed=6)
    used = _spy(monkeypatch)
    params = select_parameters(model)
    diag = exact_module.exact_hessian_diagonal(model, F.cross_entropy, x, y, params)
    assert used == [True]
    assert_relative_close(diag, brute_hessian_diagonal(model, F.cross_entropy, x, y, list(params)), 1e-9)


def _recorded(model: nn.Module):
    """The recorded forward of ``model`` on 6 samples of 4 features, its layer outputs and two columns of
    ones (call under ``torch.enable_grad()``)."""
    x = torch.randn(6, 4, dtype=torch.float64)
    forward = _record_forward(model, x, select_parameters(model), "test")
    outputs = [call.output for call in forward.recorder.calls]
    return forward, outputs, torch.ones(2, *forward.logits.shape, dtype=torch.float64)


def test_a_tensor_changed_after_the_forward_disables_the_tape():
    """The ReLU backward reads the ReLU output; changed in place after the forward (its version
    counter moved), the tape declines and the caller uses autograd."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    with torch.enable_grad():
        forward, outputs, columns = _recorded(model)
        assert forward.recorder.tape.backward(forward.logits, columns, outputs) is not None
        relu_output = forward.recorder.tape.entries[1][0]
        with torch.no_grad():
            relu_output.mul_(1.0)  # same values, new version
        assert forward.recorder.tape.backward(forward.logits, columns, outputs) is None


def test_broadcast_sums_and_concatenations_are_not_taped():
    """A broadcast sum of weight-dependent tensors, ``add`` with ``alpha`` and ``torch.cat`` of
    weight-dependent tensors have no rule here: the tape is rejected (the caller uses autograd)."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 4).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    weight, bias = (p.detach().requires_grad_(True) for p in (layer.weight, layer.bias))
    for what in ("broadcast", "alpha", "cat"):
        tape = ColumnTape({id(weight), id(bias)})
        h = F.linear(x, weight, bias)
        tape.record("linear", F.linear, (x, weight, bias), {}, h)
        assert tape.ok
        if what == "broadcast":
            row = h[:1] * 1.0
            tape.record("add", torch.add, (h, row), {}, h + row)
        elif what == "alpha":
            tape.record("add", torch.add, (h, h), {"alpha": 2.0}, torch.add(h, h, alpha=2.0))
        else:
            tape.record("cat", torch.cat, ([h, h], 1), {}, torch.cat([h, h], 1))
        assert not tape.ok, what
        assert tape.backward(h, torch.ones(1, 5, 4, dtype=torch.float64), [h]) is None


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_max_pool_backward_reads_the_indices_autograd_saved(nd):
    """The max-pool rule takes the argmax autograd saved in the forward's graph (no second pooling);
    they equal a fresh ``return_indices=True`` pooling, ties included (ReLU zeros), and an output
    not produced by max pooling gives ``None`` (the rule then recomputes them)."""
    from lightning_flatness.functional.estimators.layer_rules.column_backward import _saved_pool_indices

    pool = getattr(F, f"max_pool{nd}d")
    x = torch.relu(torch.randn(3, 2, *([7] * nd), generator=torch.Generator().manual_seed(nd)))
    x.requires_grad_(True)
    options = {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True}
    out = pool(x, **options)
    _, reference = pool(x.detach(), return_indices=True, **options)
    saved = _saved_pool_indices(out)
    assert saved is not None and torch.equal(saved, reference)
    assert _saved_pool_indices(out * 2.0) is None
    assert _saved_pool_indices(out.detach()) is None


class _Doubling(torch.autograd.Function):
    """``2 x`` as a custom autograd function: invisible to torch function modes."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def test_a_gradient_path_through_an_invisible_operation_rejects_the_tape():
    """A custom ``autograd.Function`` between two layers is not on the tape, so a folded backward would
    stop at its output and give the first layer no gradient; the tape is rejected instead (autograd
    follows the path), and autograd's gradient at the first layer is not zero."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 5).double(), nn.Linear(5, 3).double()
    model = nn.Sequential(a, nn.ReLU(), nn.Identity(), b).double()
    model[2].forward = lambda h: _Doubling.apply(h)  # type: ignore[method-assign]
    with torch.enable_grad():
        forward, outputs, columns = _recorded(model)
        assert not forward.recorder.tape.ok
        assert forward.recorder.tape.backward(forward.logits, columns, outputs) is None
        reference = torch.autograd.grad(
            forward.logits, outputs, columns, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    assert reference[0] is not None and float(reference[0].abs().sum()) > 0
