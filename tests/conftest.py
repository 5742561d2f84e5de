"""Small Lightning models and data for the tests."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_loader(n: int = 256, batch_size: int = 16, in_features: int = 16, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    y = x[:, :classes].argmax(dim=1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class MLP(pl.LightningModule):
    """A 3-layer MLP on a learnable toy task, with a configurable optimizer."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.05, in_features: int = 16, hidden: int = 32):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.LayerNorm(hidden),
            nn.ReLU(),
            nn.Linear(hidden, 4),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        if self.hparams.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.1)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=1e-4)


class DestroyProcessGroup(Callback):
    """Destroys the process group in teardown (or after an exception), before a spawned rank exits.

    A ddp_spawn rank on CPU (gloo) that exits with its process group alive sometimes aborts at
    interpreter exit ("terminate called without an active exception", SIGABRT), about 1 fit in 9 on
    a busy 2-core machine: the test then fails although the fit succeeded. Every multi-process
    Trainer of the suite gets this callback (``make_trainer`` adds it; add it to others by hand).
    """

    def teardown(self, trainer, pl_module, stage):
        _destroy_process_group()

    def on_exception(self, trainer, pl_module, exception):
        _destroy_process_group()


def _destroy_process_group():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def make_trainer(callbacks, **kwargs) -> pl.Trainer:
    """A quiet CPU Trainer; one with several devices also destroys its process group at teardown."""
    if kwargs.get("devices", 1) != 1:
        callbacks = [*callbacks, DestroyProcessGroup()]
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=20,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


@pytest.fixture(autouse=True)
def _seed():
    pl.seed_everything(0, verbose=False)


@pytest.fixture
def two_threads():
    """CPU matmuls split their sums by thread: runs compared with recorded digests use 2 threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """A short hash of the names and exact bytes of some tensors."""
    sha = hashlib.sha256()
    for name in sorted(tensors):
        sha.update(name.encode())
        sha.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()[:16]


class InfAt(MLP):
    """Its loss is inf at optimizer step `bad_step` (0-based): every gradient of that step is non-finite."""

    bad_step = 3

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.trainer.global_step == self.bad_step else loss


class StepWatch(Callback):
    """Counts the optimizer steps that really ran; keeps masks and a weight around each step."""

    def __init__(self, rigl):
        self.rigl, self.ran, self.around = rigl, 0, {}

    def on_train_start(self, trainer, pl_module):
        trainer.optimizers[0].register_step_post_hook(lambda *args: setattr(self, "ran", self.ran + 1))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = (self.rigl.masks, pl_module.net[0].weight.detach().clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1  # the step that just ran (or was skipped)
        self.around[step] = (self._before, (self.rigl.masks, pl_module.net[0].weight.detach().clone()))


@torch.library.custom_op("rigl_tests::unformulated_matmul", mutates_args=())
def unformulated_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T`` as an operator torch's FLOP counter has no formula for (a user's fused kernel, say)."""
    return x @ weight.t()


@unformulated_matmul.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _unformulated_matmul_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    return grad @ weight, grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])


unformulated_matmul.register_autograd(
    _unformulated_matmul_backward, setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs)
)


class FusedLinear(nn.Module):
    """A bias-free Linear computed by ``unformulated_matmul``: its FLOPs count as 0, with a warning."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)

    def forward(self, x):
        return unformulated_matmul(x, self.weight)
