"""LightningCLI for the MNIST-1D example, configured by YAML (see ``cli_config.yaml``).

    python examples/cli.py fit --config examples/cli_config.yaml
    python examples/cli.py fit --config examples/cli_config.yaml --trainer.max_epochs 5

Needs ``jsonargparse[signatures]`` (``pip install "jsonargparse[signatures]"``). With the unified
``lightning`` package, import ``LightningCLI`` from ``lightning.pytorch.cli`` and the model and data
classes from ``lightning.pytorch``, and use ``lightning_flatness.lightning_namespace.SharpnessMonitor``
in the config (each namespace's CLI accepts only its own ``Callback`` subclasses).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from pytorch_lightning.cli import LightningCLI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_mnist1d_monitor import LitClassifier, MNIST1DDataModule  # noqa: E402


def main(args: Optional[list[str]] = None) -> LightningCLI:
    """Run the CLI (``args`` as on the command line; ``None`` reads ``sys.argv``)."""
    return LightningCLI(LitClassifier, MNIST1DDataModule, args=args)


if __name__ == "__main__":
    main()
