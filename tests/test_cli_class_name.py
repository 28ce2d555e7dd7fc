"""LightningCLI finds SharpnessMonitor by its class name once the class is imported, and installing the
package adds no callback to anyone's Trainer (no ``callbacks_factory`` entry point).

Lightning calls every factory registered under the ``lightning.pytorch.callbacks_factory`` entry
point in *every* ``Trainer.__init__`` (``_load_external_callbacks``) and appends what it returns, so
registering SharpnessMonitor there would measure sharpness in every training run on the machine.
jsonargparse resolves a bare class name among the imported subclasses of the expected type instead.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import pytorch_lightning as pl
from callback_models import MLP, DataModule
from test_callback_namespaces import Data, LitMLP

from lightning_flatness.callback import SharpnessMonitor
from lightning_flatness.lightning_namespace import SharpnessMonitor as LightningSharpnessMonitor


def test_package_registers_no_callback_factory_so_trainers_stay_untouched():
    for group in ("lightning.pytorch.callbacks_factory", "pytorch_lightning.callbacks_factory"):
        assert not [ep for ep in entry_points(group=group) if ep.value.startswith("lightning_flatness")]
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert not [cb for cb in trainer.callbacks if isinstance(cb, SharpnessMonitor)]


def test_pytorch_lightning_cli_resolves_the_bare_class_name_on_the_command_line(tmp_path):
    from pytorch_lightning.cli import LightningCLI

    cli = LightningCLI(
        MLP,
        DataModule,
        run=False,
        args=[
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=SharpnessMonitor",
            "--trainer.callbacks.num_samples=40",
            "--trainer.callbacks.method=hutchinson",
        ],
    )
    (monitor,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, SharpnessMonitor)]
    assert type(monitor) is SharpnessMonitor and monitor.num_samples == 40 and monitor.method == "hutchinson"


def test_lightning_pytorch_cli_resolves_the_bare_class_name_in_a_config_to_its_namespace_class(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = {
        "trainer": {
            "logger": False,
            "enable_checkpointing": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [{"class_path": "SharpnessMonitor", "init_args": {"num_samples": 24}}],
        }
    }
    cli = LightningCLI(LitMLP, Data, run=False, args=config)
    (monitor,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, LightningSharpnessMonitor)]
    assert type(monitor) is LightningSharpnessMonitor and monitor.num_samples == 24
