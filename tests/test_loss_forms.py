"""The standard losses in the forms users pass them: ``nn.CrossEntropyLoss()``, ``nn.NLLLoss()`` and
``F.nll_loss`` on log-probabilities (PyTorch's MNIST and word-language-model examples), against
brute-force float64 Hessians and Gauss-Newton matrices."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from callback_models import MLP, DataModule, quiet_trainer
from oracles import (
    assert_relative_close,
    brute_force_ggn_diagonal,
    brute_force_hessian_diagonal,
    brute_force_measures,
)
from torch import nn

from lightning_flatness import SharpnessMonitor
from lightning_flatness.functional import hessian_diagonal
from lightning_flatness.functional.estimators.exact import gauss_newton_diagonal
from lightning_flatness.functional.estimators.method_choice import choose_method
from lightning_flatness.functional.loss_forms import (
    LabelSmoothedCrossEntropy,
    hessian_twin,
    loss_for_outputs,
    needs_outputs,
    single_output_bce_with_logits_loss,
    standard_loss,
)
from lightning_flatness.functional.model_io import TokenLoss
from lightning_flatness.measure import measure_sharpness


def _smoothed(z, y):
    return F.cross_entropy(z, y, label_smoothing=0.1)


class LogSoftmaxNet(nn.Module):
    """A ReLU MLP whose forward ends in ``log_softmax`` (as PyTorch's MNIST example), or returns the
    logits."""

    def __init__(self, classes: int = 5, log_probabilities: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, classes))
        self.log_probabilities = log_probabilities

    def forward(self, x):
        z = self.body(x)
        return F.log_softmax(z, dim=1) if self.log_probabilities else z


def _data(n=12, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def test_module_forms_at_default_options_are_their_functional_forms():
    assert standard_loss(nn.CrossEntropyLoss()) is F.cross_entropy
    assert standard_loss(nn.NLLLoss()) is F.nll_loss
    assert standard_loss(nn.MSELoss()) is F.mse_loss
    assert standard_loss(nn.BCEWithLogitsLoss()) is F.binary_cross_entropy_with_logits
    token = standard_loss(TokenLoss(nn.CrossEntropyLoss(), shift=True, ignore_index=-7))
    assert isinstance(token, TokenLoss) and token.base is F.cross_entropy
    assert token.shift and token.ignore_index == -7
    for kept in (
        nn.CrossEntropyLoss(weight=torch.ones(5)),
        nn.CrossEntropyLoss(ignore_index=0),
        nn.NLLLoss(reduction="sum"),
        nn.MSELoss(reduction="sum"),
        nn.BCEWithLogitsLoss(pos_weight=torch.ones(5)),
        nn.L1Loss(),
        F.mse_loss,
    ):
        assert standard_loss(kept) is kept  # other options: the module itself (autograd fallback)

    class Custom(nn.CrossEntropyLoss):  # a subclass may change forward: never replaced
        pass

    custom = Custom()
    assert standard_loss(custom) is custom
    assert needs_outputs(nn.NLLLoss()) and needs_outputs(TokenLoss(F.nll_loss))
    assert not needs_outputs(nn.CrossEntropyLoss()) and not needs_outputs(lambda o, t: F.nll_loss(o, t))


def test_nll_on_log_probabilities_is_cross_entropy_and_on_anything_else_an_error():
    x, y = _data()
    net = LogSoftmaxNet().double()
    out = net(x)
    assert loss_for_outputs(F.nll_loss, out) is F.cross_entropy
    assert loss_for_outputs(nn.NLLLoss(), out) is F.cross_entropy
    assert torch.allclose(F.cross_entropy(out, y), F.nll_loss(out, y), rtol=1e-14, atol=0)
    # (N, T, V) log-probabilities of a token loss: classes along the last dim
    seq = torch.log_softmax(torch.randn(2, 3, 4, dtype=torch.float64), dim=-1)
    token = loss_for_outputs(TokenLoss(F.nll_loss, shift=True), seq)
    assert isinstance(token, TokenLoss) and token.base is F.cross_entropy and token.shift
    with pytest.raises(ValueError, match="not log-probabilities along dim 1.*log_softmax"):
        loss_for_outputs(F.nll_loss, net.body(x))  # raw logits
    with pytest.raises(ValueError, match="not log-probabilities along dim -1"):
        loss_for_outputs(TokenLoss(nn.NLLLoss()), torch.randn(2, 3, 4))
    assert loss_for_outputs(F.mse_loss, out) is F.mse_loss


@pytest.mark.parametrize("loss_fn", [F.nll_loss, nn.NLLLoss()], ids=["F.nll_loss", "nn.NLLLoss"])
def test_gauss_newton_of_nll_on_log_probabilities_is_the_cross_entropy_one_at_the_logits(loss_fn):
    """Before: ``Lambda = 0`` in the log-probabilities, every Gauss-Newton estimate 0. Now: the brute-force
    ``J_z^T (diag p - p p^T) J_z`` at the logits ``z``, which on this ReLU net is also the brute-force
    Hessian diagonal of the nll loss."""
    x, y = _data()
    net = LogSoftmaxNet().double()
    names = [n for n, p in net.named_parameters() if p.ndim >= 2]
    logits_net = copy.deepcopy(net)
    logits_net.log_probabilities = False
    ggn_at_logits = brute_force_ggn_diagonal(logits_net, F.cross_entropy, x, y, names)
    hessian = brute_force_hessian_diagonal(net, F.nll_loss, x, y, names)
    assert_relative_close(hessian, ggn_at_logits, tol=1e-12)
    est = hessian_diagonal(net, loss_fn, x, y, method="gauss_newton", parameters=names)
    assert_relative_close(est, ggn_at_logits, tol=1e-12)
    # the sketch mixes the same loss Hessian's structure with random signs: unbiased, so many sketches
    # come close (one sketch is within about 60% per tensor here)
    g = torch.Generator().manual_seed(0)
    est = hessian_diagonal(
        net, loss_fn, x, y, method="gauss_newton_sketch", parameters=names, num_sketches=400, generator=g
    )
    for n in names:
        err = float((est[n] - ggn_at_logits[n]).norm() / ggn_at_logits[n].norm())
        assert err < 0.1, (n, err)


def test_a_loss_linear_in_the_outputs_warns_that_its_gauss_newton_matrix_is_zero():
    x, y = _data()
    net = LogSoftmaxNet().double()

    def wrapped_nll(out, target):  # an opaque wrapper: not recognised
        return F.nll_loss(out.reshape(-1, out.shape[-1]), target.reshape(-1))

    with pytest.warns(UserWarning, match="zero curvature in the model's outputs"):
        est = hessian_diagonal(net, wrapped_nll, x, y, method="gauss_newton")
    assert all(not e.any() for e in est.values())


def test_cross_entropy_module_takes_the_closed_form_path_at_many_classes():
    """``nn.CrossEntropyLoss()`` took the autograd fallback (an O(K^3) eigendecomposition per sample) and
    ``auto`` chose Monte-Carlo columns; now both are those of ``F.cross_entropy``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 300))
    x, y = torch.randn(8, 6), torch.randint(0, 300, (8,))
    module_choice = choose_method(net, nn.CrossEntropyLoss(), x, y)
    assert module_choice == choose_method(net, F.cross_entropy, x, y)
    assert module_choice.method == "gauss_newton_sketch"
    a = hessian_diagonal(net, nn.CrossEntropyLoss(), x, y, method="gauss_newton")
    b = hessian_diagonal(net, F.cross_entropy, x, y, method="gauss_newton")
    for n in a:
        assert torch.equal(a[n], b[n])


def test_measure_sharpness_with_nll_equals_cross_entropy_on_the_logits_model():
    x, y = _data(n=32)
    net = LogSoftmaxNet().double()
    logits_net = copy.deepcopy(net)
    logits_net.log_probabilities = False
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    nll = measure_sharpness(net, batches, loss_fn=nn.NLLLoss(), method="gauss_newton", num_replicates=4)
    ce = measure_sharpness(
        logits_net, batches, loss_fn=F.cross_entropy, method="gauss_newton", num_replicates=4
    )
    for key in ("normalized", "matrix_normalized", "hessian_trace", "normalized_stderr"):
        assert float(ce[key]) > 0
        # the standard error is a spread of values each certified to 1e-11 relative: rounding of the two
        # curvatures (log_softmax's shift) moved it by 4e-10 of itself with 2 intra-op threads
        assert math.isclose(float(nll[key]), float(ce[key]), rel_tol=1e-8 if "stderr" in key else 1e-10), key
    with pytest.raises(ValueError, match="not log-probabilities"):
        measure_sharpness(logits_net, batches, loss_fn=F.nll_loss, num_replicates=4)


def test_monitor_with_nll_on_logits_fails_at_fit_start_and_on_log_probabilities_measures():
    model = MLP()  # returns logits
    with pytest.raises(RuntimeError, match=r"dry run .*not log-probabilities.*log_softmax"):
        quiet_trainer([SharpnessMonitor(num_samples=32, loss_fn=F.nll_loss)], max_epochs=1).fit(
            model, DataModule()
        )
    assert model.training_steps == 0

    class LogProbabilityMLP(MLP):
        def forward(self, x):
            return F.log_softmax(super().forward(x), dim=1)

    torch.manual_seed(0)
    monitor = SharpnessMonitor(num_samples=32, loss_fn=nn.NLLLoss())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer([monitor], max_epochs=1).fit(LogProbabilityMLP(), DataModule())
    assert monitor.history and monitor.history[-1]["normalized"] > 0


def test_label_smoothing_is_one_form_whose_logit_hessian_is_the_cross_entropy_one():
    smoothed = standard_loss(nn.CrossEntropyLoss(label_smoothing=0.1))
    assert smoothed == LabelSmoothedCrossEntropy(0.1) and hessian_twin(smoothed) is F.cross_entropy
    token = standard_loss(TokenLoss(nn.CrossEntropyLoss(label_smoothing=0.1)))
    assert isinstance(token, TokenLoss) and token.base == LabelSmoothedCrossEntropy(0.1)
    timm_loss = pytest.importorskip("timm.loss").LabelSmoothingCrossEntropy(smoothing=0.1)
    assert standard_loss(timm_loss) == LabelSmoothedCrossEntropy(0.1)
    z, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 5, (6,))
    assert torch.allclose(smoothed(z, y), timm_loss(z, y), rtol=1e-14, atol=0)
    soft = pytest.importorskip("timm.loss").SoftTargetCrossEntropy()
    assert needs_outputs(soft) and loss_for_outputs(soft, z) is F.cross_entropy
    assert loss_for_outputs(soft, torch.randn(2, 3, 5)) is soft  # timm's last dim is not dim 1 there
    q = torch.softmax(torch.randn(6, 5, dtype=torch.float64), dim=1)
    assert torch.allclose(soft(z, q), F.cross_entropy(z, q), rtol=1e-14, atol=0)
    assert torch.equal(smoothed(z, y), nn.CrossEntropyLoss(label_smoothing=0.1)(z, y))
    with pytest.raises(ValueError, match=r"label smoothing must lie in \[0, 1\]"):
        LabelSmoothedCrossEntropy(1.5)


def test_label_smoothing_against_brute_force_hessian_gauss_newton_and_gradient():
    """The closed-form factors with smoothing: the Gauss-Newton diagonal (tanh net) and, on a ReLU net, the
    exact Hessian diagonal equal brute-force float64 ones of ``F.cross_entropy(label_smoothing=0.1)``; the
    logit gradient is ``(p - q) / N``; the Hessian sketch (which adds the tanh net's residual with that
    gradient) is unbiased for the brute-force Hessian."""
    x, y = _data()
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)
    torch.manual_seed(0)
    tanh_net = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5)).double()
    names = ["0.weight", "2.weight"]
    params = {n: p for n, p in tanh_net.named_parameters() if n in names}
    ggn = gauss_newton_diagonal(tanh_net, loss, x, y, params)
    assert_relative_close(ggn.diagonal, brute_force_ggn_diagonal(tanh_net, _smoothed, x, y, names), tol=1e-12)
    logits = tanh_net(x).detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(_smoothed(logits, y), logits)
    assert torch.allclose(ggn.logits_grad, expected, rtol=1e-12, atol=1e-15)
    hessian = brute_force_hessian_diagonal(tanh_net, _smoothed, x, y, names)
    g = torch.Generator().manual_seed(0)
    sketch = hessian_diagonal(
        tanh_net, loss, x, y, method="hessian_sketch", parameters=names, num_sketches=400, generator=g
    )
    for n in names:
        assert float((sketch[n] - hessian[n]).norm() / hessian[n].norm()) < 0.1, n
    relu_net = LogSoftmaxNet(log_probabilities=False).double()
    relu_names = [n for n, p in relu_net.named_parameters() if p.ndim >= 2]
    exact = hessian_diagonal(relu_net, loss, x, y, method="exact", parameters=relu_names)
    assert_relative_close(
        exact, brute_force_hessian_diagonal(relu_net, _smoothed, x, y, relu_names), tol=1e-12
    )


def test_label_smoothing_at_many_classes_takes_the_structured_sketch():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 300))
    x, y = torch.randn(8, 6), torch.randint(0, 300, (8,))
    choice = choose_method(net, nn.CrossEntropyLoss(label_smoothing=0.1), x, y)
    assert choice.method == "gauss_newton_sketch"  # was the Monte-Carlo path with autograd columns


class _PerPositionReLU(nn.Module):
    """Sequence outputs ``(N, T=5, V=4)`` from ``(N, T, 3)`` inputs: a ReLU network applied per position."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _first_label_loss(logits, target):
    """A loss over whole sequences with targets of another length than the outputs (as CTC's transcripts
    are): the cross-entropy of the position-averaged logits against each sequence's first label."""
    return F.cross_entropy(logits.mean(dim=1), target[:, 0])


def test_a_loss_over_whole_sequences_with_targets_of_another_length_is_used_as_given():
    """``(N, T, V)`` outputs with ``(N, L)`` targets, ``L != T``, and a loss of the user's own: it is not read
    per position (a TokenLoss would pair positions with labels), so the measurement is that loss's exact
    Hessian; the default loss, which would be read per position, is an error naming the fix."""
    torch.manual_seed(0)
    net = _PerPositionReLU().double()
    x = torch.randn(8, 5, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (8, 2))
    batches = [(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)]
    result = measure_sharpness(net, batches, loss_fn=_first_label_loss, method="exact", num_replicates=4)
    names = [n for n, p in net.named_parameters()]
    diag = brute_force_hessian_diagonal(net, _first_label_loss, x, y, names)
    total = sum(float(d.sum()) for d in diag.values())
    assert float(result["hessian_trace"]) == pytest.approx(total, rel=1e-10)
    with pytest.raises(ValueError, match=r"5 positions of logits but 2 of targets.*\(CTC"):
        measure_sharpness(net, batches)


class SoftmaxNet(LogSoftmaxNet):
    """The same MLP ending in ``softmax``: it returns probabilities."""

    def forward(self, x):
        return torch.softmax(self.body(x), dim=1)


def test_probability_outputs_are_refused_by_the_softmax_losses_and_the_named_fix_measures_the_logits():
    x, y = _data()
    torch.manual_seed(0)
    net = SoftmaxNet().double().eval()
    for loss_fn in (None, F.cross_entropy):
        with pytest.raises(ValueError, match=r"outputs \(2, 5\) are probabilities.*p\.log\(\)"):
            measure_sharpness(net, [(x, y)], loss_fn=loss_fn, num_replicates=1)
    # the fix the message names is eq. 20 of the logits: the same function of the weights, the same Hessian
    from lightning_flatness.functional.losses import normalized_softmax_cross_entropy as eq20

    def on_log(p, t):
        return eq20(p.log(), t)

    logits_net = LogSoftmaxNet(log_probabilities=False).double().eval()
    logits_net.load_state_dict(net.state_dict())  # the same weights, returning the logits
    names = ["body.0.weight", "body.2.weight"]
    ours = brute_force_hessian_diagonal(net, on_log, x, y, names)
    theirs = brute_force_hessian_diagonal(logits_net, eq20, x, y, names)
    assert_relative_close(ours, theirs, 1e-10)
    out = measure_sharpness(net, [(x[:6], y[:6]), (x[6:], y[6:])], loss_fn=on_log, num_replicates=2)
    assert math.isfinite(float(out["normalized"])) and float(out["normalized"]) > 0


def test_a_one_logit_binary_classifier_with_squeezed_targets_has_its_loss_and_the_errors_name_it():
    """``(N, 1)`` logits trained with ``F.binary_cross_entropy_with_logits(logits.squeeze(-1), y)``: the
    default loss and the plain BCE on ``(N,)`` targets are refused, each error naming
    ``single_output_bce_with_logits_loss`` (the MSE's names ``single_output_mse_loss``); that loss measures
    the brute-force Hessian of the squeezed training loss, as the plain BCE does on targets of the logits'
    shape."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    y = (x[:, 0] > 0).double()
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 16, 4)]
    with pytest.raises(ValueError, match=r"one output per sample .*single_output_bce_with_logits_loss"):
        measure_sharpness(net, batches)
    for loss, named in [
        (F.binary_cross_entropy_with_logits, "single_output_bce_with_logits_loss"),
        (nn.BCEWithLogitsLoss(), "single_output_bce_with_logits_loss"),
        (F.mse_loss, "single_output_mse_loss"),
    ]:
        with pytest.raises(ValueError, match=rf"targets of another shape are broadcast .*{named}"):
            measure_sharpness(net, batches, loss_fn=loss)
    squeezed = measure_sharpness(net, batches, loss_fn=single_output_bce_with_logits_loss)
    assert squeezed.choice.method == "exact"
    as_logits = measure_sharpness(
        net, [(a, b[:, None]) for a, b in batches], loss_fn=F.binary_cross_entropy_with_logits
    )
    reference = brute_force_measures(
        net, x, y, loss_fn=lambda z, t: F.binary_cross_entropy_with_logits(z.squeeze(-1), t)
    )
    for key in ("normalized", "hessian_trace", "normalized/0.weight"):
        assert float(squeezed.values[key]) == pytest.approx(reference[key], rel=1e-10), key
        assert float(as_logits.values[key]) == pytest.approx(reference[key], rel=1e-10), key
