"""Train a 90 %-sparse MLP with RigL on scikit-learn's digits (ships with scikit-learn, no download).

python examples/digits.py                      # RigL, 90 % ERK sparsity
python examples/digits.py --method static      # the same sparsity with a fixed random mask
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torchmetrics
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_rigl import RigLCallback


class DigitsMLP(pl.LightningModule):
    """A 64-hidden-hidden-10 MLP for 8x8 digits, SGD with Nesterov momentum and a cosine learning rate.

    Args:
        hidden: Width of the two hidden layers.
        lr: Peak learning rate.
        weight_decay: SGD weight decay.
    """

    def __init__(self, hidden: int = 256, lr: float = 0.1, weight_decay: float = 5e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.example_input_array = torch.zeros(1, 64)  # for SparsityMonitor's FLOPs count
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )
        self.test_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_accuracy(self(x), y)
        self.log("test_accuracy", self.test_accuracy)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=0.9, nesterov=True, weight_decay=self.hparams.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def digits_loaders(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Digits scaled to [0, 1], a fixed 80/20 split."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    train, test = order[:split], order[split:]
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True),
        DataLoader(TensorDataset(x[test], y[test]), batch_size=512),
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--distribution", default="erk", choices=["erk", "er", "uniform"])
    parser.add_argument("--method", default="rigl", choices=["rigl", "set", "snfs", "static"])
    parser.add_argument("--delta-t", type=int, default=25)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    train, test = digits_loaders(seed=args.seed)
    rigl = RigLCallback(
        sparsity=args.sparsity, distribution=args.distribution, method=args.method, delta_t=args.delta_t
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[rigl],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = DigitsMLP()
    trainer.fit(model, train)
    accuracy = trainer.test(model, test, verbose=False)[0]["test_accuracy"]

    print(f"\n{args.method} at {args.sparsity:.0%} {args.distribution} sparsity: test accuracy {accuracy:.4f}")
    print(f"{'layer':<14}{'shape':<14}{'active':>8}{'sparsity':>10}")
    total = active = 0
    for name, param in model.named_parameters():
        if name in rigl.masks:
            nonzero = int(param.count_nonzero())
            total, active = total + param.numel(), active + nonzero
            print(f"{name:<14}{str(tuple(param.shape)):<14}{nonzero:>8}{1 - nonzero / param.numel():>10.4f}")
    print(f"{'masked total':<28}{active:>8}{1 - active / total:>10.4f}")
    print(f"topology updates: {rigl.sparse.updates}")
    return {"accuracy": accuracy, "sparsity": 1 - active / total}


if __name__ == "__main__":
    main()
