"""Helpers on the standalone `pytorch_lightning` package, apart from tests/helpers.py so that importing those
never imports `pytorch_lightning` (a test checks that a Lightning fit does not)."""

import pytest
import torch
from torch import nn

from tests.helpers import make_loader

pl = pytest.importorskip("pytorch_lightning")


class MLP(pl.LightningModule):
    """tests.helpers.MLP, as a pytorch_lightning module."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        self.example_input_array = torch.randn(3, 16)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self):
        return make_loader(128, 16)
