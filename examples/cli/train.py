"""LightningCLI for NIPQ: the demo's CNN and data, with both callbacks set from YAML or flags.

    # 1. float training (writes checkpoints/digits-float.ckpt)
    python examples/cli/train.py fit --config examples/cli/float_digits.yaml
    # 2. NIPQ fine-tuning from it, integer conversion, and the integer artifact
    python examples/cli/train.py fit --config examples/cli/nipq_digits.yaml \
        --float_checkpoint checkpoints/digits-float.ckpt --artifact digits-3bit.safetensors
    # 3. the integer model on the test split
    python examples/cli/train.py test --config examples/cli/nipq_digits.yaml --artifact digits-3bit.safetensors

    # or the callbacks from the command line alone
    python examples/cli/train.py fit --trainer.max_epochs=15 \
        --trainer.callbacks+=lightning_nipq.NIPQCallback --trainer.callbacks.target_bits=3 \
        --trainer.callbacks+=lightning_nipq.HardQuantize --trainer.callbacks.bn_batches=20

See docs/cli.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# Importing the package also makes both callbacks known subclasses of Callback, so the
# command line accepts their short names too: --trainer.callbacks+=NIPQCallback.
from lightning_nipq import load_quantized, save_quantized
from lightning_nipq.demo.data import ImageDataModule
from lightning_nipq.demo.models import SmallCNN


def schedule_epochs(max_epochs: Optional[int]) -> int:
    """SmallCNN's cosine schedule length for ``trainer.max_epochs`` (Lightning runs 1000 when unset)."""
    return max_epochs if max_epochs is not None and max_epochs > 0 else 1000


def load_float_weights(model: LightningModule, path: Union[str, Path]) -> None:
    """Load the weights of a float run (a Lightning checkpoint or a bare state dict) into ``model``.

    ``fit --ckpt_path`` would also restore the float run's optimizer, epoch counter and
    callbacks, which is resuming, not fine-tuning; NIPQ wants only the weights.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint.get("state_dict", checkpoint))


class NIPQCLI(LightningCLI):
    """LightningCLI with two extra options: float weights to start from, and the integer model's file."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--float_checkpoint",
            type=Optional[str],
            default=None,
            help="checkpoint of a float run whose weights the model starts from (weights only)",
        )
        parser.add_argument(
            "--artifact",
            type=Optional[str],
            default=None,
            help="the integer model's safetensors file: fit saves it there (needs HardQuantize); "
            "validate and test load it and run the integer model",
        )
        # The cosine schedule spans the run: one number to change, not two to keep equal.
        parser.link_arguments("trainer.max_epochs", "model.epochs", compute_fn=schedule_epochs)

    def _subcommand_config(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def after_instantiate_classes(self) -> None:
        # Before any subcommand runs, so `validate --float_checkpoint ...` evaluates the float model.
        config = self._subcommand_config()
        if config.get("float_checkpoint") is not None:
            load_float_weights(self.model, config.float_checkpoint)
        # A checkpoint written during fit holds the fake-quantized model from before
        # HardQuantize re-estimated BatchNorm; the artifact is the integer model itself.
        if self.subcommand in ("validate", "test") and config.get("artifact") is not None:
            load_quantized(config.artifact, self.model)

    def after_fit(self) -> None:
        path = self._subcommand_config().get("artifact")
        if path is not None and self.trainer.is_global_zero:
            save_quantized(self.model, path)
            print(f"integer model saved to {path}")


def cli_main(args: Optional[list[str]] = None, **kwargs: Any) -> NIPQCLI:
    """Run the CLI on ``args`` (default: ``sys.argv[1:]``); keyword arguments go to LightningCLI."""
    return NIPQCLI(SmallCNN, ImageDataModule, args=args, **kwargs)


if __name__ == "__main__":
    cli_main()
