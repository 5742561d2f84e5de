"""The digits example as a LightningCLI script: each run is a YAML file, RigL is a callbacks block.

scikit-learn's digits ship with scikit-learn (no download). In the configs, SparsityMonitor logs the
sparsity and FLOPs and prints a per-layer table at the start and end of ``fit``; after ``fit`` the
script tests the model on the held-out 20 %. Ready configs, in examples/configs/:

    python examples/digits_cli.py fit --config examples/configs/digits_dense.yaml
    python examples/digits_cli.py fit --config examples/configs/digits_static.yaml
    python examples/digits_cli.py fit --config examples/configs/digits_set.yaml
    python examples/digits_cli.py fit --config examples/configs/digits_rigl_erk.yaml
    python examples/digits_cli.py fit --config examples/configs/digits_rigl_uniform.yaml

Change any value from the command line (a ``--trainer.callbacks.X`` goes to the last callback of
the list, which is RigLCallback in these configs), or add RigL to a dense run:

    python examples/digits_cli.py fit --config examples/configs/digits_rigl_erk.yaml --trainer.callbacks.sparsity=0.95
    python examples/digits_cli.py fit --trainer.max_epochs=40 \
        --trainer.callbacks+=lightning_rigl.RigLCallback --trainer.callbacks.sparsity=0.95
    python examples/digits_cli.py fit --config examples/configs/digits_rigl_erk.yaml --print_config
"""

from __future__ import annotations

import lightning.pytorch as pl
from digits import DigitsMLP, digits_loaders  # examples/digits.py, next to this file
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

from lightning_rigl import RigLCallback


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's digits (1,797 8x8 images) scaled to [0, 1], split 80/20 into train and test.

    Args:
        batch_size: Training batch size.
        split_seed: Seed of the train/test split (not of training).

    """

    def __init__(self, batch_size: int = 64, split_seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.split_seed = split_seed

    def setup(self, stage: str) -> None:
        self.train_loader, self.test_loader = digits_loaders(self.batch_size, self.split_seed)

    def train_dataloader(self) -> DataLoader:
        return self.train_loader

    def test_dataloader(self) -> DataLoader:
        return self.test_loader


class DigitsCLI(LightningCLI):
    """LightningCLI that tests the model after ``fit``."""

    def after_fit(self) -> None:
        accuracy = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)[0]["test_accuracy"]
        rigl = next((cb for cb in self.trainer.callbacks if isinstance(cb, RigLCallback)), None)
        run = "dense" if rigl is None else f"{rigl.method} at {rigl.sparsity:.0%} {rigl.distribution} sparsity"
        print(f"\n{run}: test accuracy {accuracy:.4f}")


def main(args: list[str] | None = None) -> DigitsCLI:
    """Run the CLI on ``args`` (the command line when None) and return it, trainer and model inside."""
    return DigitsCLI(DigitsMLP, DigitsDataModule, args=args)


if __name__ == "__main__":
    main()
