"""RigL on CIFAR-10 with a Wide-ResNet-22-2: the paper's recipe, for a GPU and the dataset on disk.

The recipe (Evci et al. 2020, CIFAR-10 WRN-22-2; rigl-reference.md section 7) is in
examples/configs/cifar10_wrn22_2_rigl.yaml: batch 128, 97,656 optimizer steps (250 epochs), SGD
with Nesterov momentum 0.9, learning rate 0.1 divided by 5 at steps 30k, 60k and 90k, weight decay
5e-4; RigL with ERK, delta_t 100, alpha 0.3 with cosine decay, t_end 75k. The paper reports 94.1 %
test accuracy dense and, with RigL, 93.6 / 92.9 / 91.8 % at sparsity 0.8 / 0.9 / 0.95 (static
masks: 92.9 / 91.5 / 89.0 %).

This script never downloads. It reads the python version of CIFAR-10 (the folder
``cifar-10-batches-py`` from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, which is also
what ``torchvision.datasets.CIFAR10(root, download=True)`` leaves in ``root``) under ``--data.data_dir``,
keeps it in memory as uint8 and augments on the device (random crop with 4 pixels of zero padding,
horizontal flip), so torchvision is not needed.

    python examples/cifar10_wrn.py fit --config examples/configs/cifar10_wrn22_2_rigl.yaml --data.data_dir=/data
    python examples/cifar10_wrn.py fit --config examples/configs/cifar10_wrn22_2_rigl.yaml \
        --data.data_dir=/data --trainer.callbacks.sparsity=0.95 --trainer.callbacks.method=static
    # a smoke run on random tensors of CIFAR shape (no data needed, CPU is fine):
    python examples/cifar10_wrn.py fit --config examples/configs/cifar10_wrn22_2_rigl.yaml \
        --data.fake=true --data.batch_size=8 --trainer.max_steps=4 --trainer.accelerator=cpu
"""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import lightning_rigl  # noqa: F401  (lets the command line name RigLCallback without its module)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class WideBlock(nn.Module):
    """Pre-activation residual block: BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus a 1x1 conv shortcut on a shape change."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        changes_shape = stride != 1 or in_planes != planes
        self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False) if changes_shape else None

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class WideResNet(nn.Module):
    """Wide-ResNet-``depth``-``width`` for 32x32 images (Zagoruyko & Komodakis, 2016), without dropout.

    Args:
        depth: Number of layers, ``6 n + 4`` (22: three blocks per group).
        width: Widening factor of the three groups (16, 32, 64 channels times ``width``).
        num_classes: Number of outputs.

    Example:
        >>> sum(p.numel() for p in WideResNet(22, 2).parameters())
        1079642

    """

    def __init__(self, depth: int = 22, width: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"`depth` must be 6 n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}.")
        blocks_per_group = (depth - 4) // 6
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        blocks, in_planes = [], 16
        for group, planes in enumerate((16 * width, 32 * width, 64 * width)):
            for block in range(blocks_per_group):
                stride = 2 if group > 0 and block == 0 else 1
                blocks.append(WideBlock(in_planes, planes, stride))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class WideResNetClassifier(pl.LightningModule):
    """A Wide-ResNet trained with SGD + Nesterov and a step-wise learning-rate schedule.

    Args:
        depth: Wide-ResNet depth.
        width: Wide-ResNet widening factor.
        lr: Initial learning rate.
        momentum: Nesterov momentum.
        weight_decay: L2 weight decay on every parameter.
        milestones: Optimizer steps at which the learning rate is multiplied by ``gamma``.
        gamma: Learning-rate factor at each milestone.

    """

    def __init__(
        self,
        depth: int = 22,
        width: int = 2,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        milestones: tuple[int, ...] = (30_000, 60_000, 90_000),
        gamma: float = 0.2,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = WideResNet(depth, width)
        self.example_input_array = torch.zeros(1, 3, 32, 32)  # for SparsityMonitor's FLOPs and the summary
        self.val_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=10)
        self.test_accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_accuracy(self(x), y)
        self.log("val_accuracy", self.val_accuracy, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_accuracy(self(x), y)
        self.log("test_accuracy", self.test_accuracy)

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, nesterov=True, weight_decay=hp.weight_decay
        )
        # Milestones count optimizer steps, as in the paper: the scheduler steps every batch.
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(hp.milestones), gamma=hp.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def load_cifar10(data_dir: str | Path, train: bool) -> tuple[Tensor, Tensor]:
    """CIFAR-10's train (50,000) or test (10,000) images as uint8 ``(N, 3, 32, 32)`` and int64 labels.

    Raises:
        FileNotFoundError: ``data_dir/cifar-10-batches-py`` is missing a batch file (nothing is downloaded).

    """
    folder = Path(data_dir) / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 not found: {folder} lacks {missing}. This example never downloads: extract "
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into --data.data_dir (or run "
            "torchvision.datasets.CIFAR10(data_dir, download=True) once), or pass --data.fake=true for a "
            "smoke run on random tensors."
        )
    images, labels = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")  # the official format; only load files you trust
        images.append(torch.as_tensor(batch[b"data"], dtype=torch.uint8).view(-1, 3, 32, 32))
        labels.append(torch.as_tensor(batch[b"labels"], dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


def random_crop_flip(images: Tensor, padding: int = 4) -> Tensor:
    """Pad ``(N, C, H, W)`` images with ``padding`` zeros, crop each back at a random offset, flip half of them.

    Example:
        >>> random_crop_flip(torch.ones(2, 3, 32, 32)).shape
        torch.Size([2, 3, 32, 32])

    """
    n, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4).flatten(2)  # (N, C, (H + 2p) * (W + 2p))
    dy, dx = (torch.randint(0, 2 * padding + 1, (n, 1, 1), device=images.device) for _ in range(2))
    rows = dy + torch.arange(h, device=images.device).view(1, h, 1)
    cols = torch.arange(w, device=images.device).view(1, 1, w)
    flip = torch.rand(n, 1, 1, device=images.device) < 0.5
    cols = dx + torch.where(flip, w - 1 - cols, cols)
    index = (rows * (w + 2 * padding) + cols).flatten(1)  # (N, H * W) into the padded plane
    return padded.gather(2, index.unsqueeze(1).expand(n, c, h * w)).view(n, c, h, w)


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10 from disk (never downloaded), or random tensors of its shape for a smoke run.

    Batches stay uint8 on the host; on the device they are augmented (training only) and normalized.

    Args:
        data_dir: Folder holding ``cifar-10-batches-py``.
        batch_size: Training batch size (the paper: 128).
        num_workers: DataLoader workers.
        fake: Use ``fake_size`` random images and labels instead of CIFAR-10 (for tests and smoke runs).
        fake_size: Number of random images in each split when ``fake`` is set.

    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 2,
        fake: bool = False,
        fake_size: int = 256,
    ) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.fake = fake
        self.fake_size = fake_size
        self.mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)

    def setup(self, stage: str) -> None:
        if self.fake:
            g = torch.Generator().manual_seed(0)
            fake = torch.randint(0, 256, (self.fake_size, 3, 32, 32), dtype=torch.uint8, generator=g)
            self.train_set = self.test_set = TensorDataset(fake, torch.randint(0, 10, (self.fake_size,), generator=g))
        else:
            self.train_set = TensorDataset(*load_cifar10(self.data_dir, train=True))
            self.test_set = TensorDataset(*load_cifar10(self.data_dir, train=False))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def _loader(self, dataset: TensorDataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def on_after_batch_transfer(self, batch: list[Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        images, labels = batch
        images = images.float() / 255
        if self.trainer is not None and self.trainer.training:
            images = random_crop_flip(images)
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        return (images - mean) / std, labels


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Run the CLI on ``args`` (the command line when None) and return it, trainer and model inside.

    With ``run=False`` it only builds the trainer, model and data from ``args`` (no subcommand).
    """
    return LightningCLI(WideResNetClassifier, CIFAR10DataModule, args=args, run=run)


if __name__ == "__main__":
    main()
