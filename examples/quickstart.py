"""Quickstart: train the paper's MLP on MNIST-1D, then measure its normalized sharpness.

Plain PyTorch, no Lightning: the functional core and the metric work from any training loop.

    python examples/quickstart.py            # about 10-20 s on one CPU core
    python examples/quickstart.py --method hutchinson --num-probes 256

Prints the normalized sharpness (eq. 17, with the normalized-softmax-cross-entropy of eq. 20),
its jackknife standard error, the matrix-normalized sharpness (eq. 13) and the Hessian trace
(eq. 5, of the same loss), in total and per weight tensor, with the method and the time taken.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lightning_flatness.datasets import make_mnist1d
from lightning_flatness.measure import measure_sharpness
from lightning_flatness.reference_models import mlp


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument(
        "--method",
        default="auto",
        help="'auto' (chosen per model), or a registered estimator such as 'exact', "
        "'ggn_hutchinson', 'hutchinson', 'finite_difference'",
    )
    parser.add_argument("--num-probes", type=int, default=256, help="stochastic methods only")
    parser.add_argument(
        "--num-samples", type=int, default=1024, help="training samples the Hessian is taken over"
    )
    parser.add_argument("--num-groups", type=int, default=8, help="independent batches for the error bar")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> None:
    """Adam (lr 1e-3), batch 128, cross-entropy: Appendix E.1's setup."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(128):
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(argv=None) -> dict[str, torch.Tensor]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = make_mnist1d()
    model = mlp()

    start = time.perf_counter()
    train(model, data.x_train, data.y_train, args.epochs, args.seed)
    train_time = time.perf_counter() - start
    model.eval()
    print(
        f"trained the paper's MLP for {args.epochs} epochs in {train_time:.1f} s: "
        f"train acc {accuracy(model, data.x_train, data.y_train):.3f}, "
        f"test acc {accuracy(model, data.x_test, data.y_test):.3f}"
    )

    # Hessian of the *training* loss (the paper's L_S) on a fixed subset of the training set.
    subset = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(args.seed))[
        : args.num_samples
    ]
    # measure_sharpness takes any iterable of (inputs, target) batches; each batch is one replicate group.
    batches = list(
        zip(
            data.x_train[subset].tensor_split(args.num_groups),
            data.y_train[subset].tensor_split(args.num_groups),
        )
    )
    measured = measure_sharpness(
        model,
        batches,
        method=args.method,
        num_probes=args.num_probes,
        num_replicates=args.num_groups,
        generator=torch.Generator().manual_seed(args.seed),
    )
    result = measured.values

    print(
        f"\nsharpness over {int(result['num_samples'])} training samples with {measured.choice.label} "
        f"({measured.choice.reason}), {measured.seconds:.2f} s (error bars: jackknife over {args.num_groups} "
        "groups of samples)"
    )
    print(f"{'':24s}{'normalized (17)':>22s}{'matrix-norm. (13)':>20s}{'Hessian trace (5)':>20s}")
    names = [k.split("/", 1)[1] for k in result if k.startswith("hessian_trace/")]
    for name in names:  # biases have the trace alone (footnote 5)
        normalized, matrix = (
            (
                f"{result['normalized/' + name].item():22.4f}",
                f"{result['matrix_normalized/' + name].item():20.4f}",
            )
            if "normalized/" + name in result
            else (f"{'-':>22s}", f"{'-':>20s}")
        )
        print(f"{name:24s}{normalized}{matrix}{result['hessian_trace/' + name].item():20.4f}")
    print(
        f"{'total':24s}{result['normalized'].item():14.4f} ± {result['normalized_stderr'].item():<6.4f}"
        f"{result['matrix_normalized'].item():20.4f}{result['hessian_trace'].item():20.4f}"
    )
    print(f"{'weights only':24s}{'':42s}{result['hessian_trace_weights'].item():20.4f}")
    return result


if __name__ == "__main__":
    main()
