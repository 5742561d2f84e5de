"""Helpers the tests share: small models and data, Trainers, recording callbacks and loggers, checks.

Test files import what they need from here (``from tests.helpers import MLP, make_loader``), never from one
another; ``conftest.py`` holds only fixtures.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import queue
import socket
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_rigl import RigLCallback
from lightning_rigl.core import num_active
from lightning_rigl.core.kernels.served_layers import linear_layers
from lightning_rigl.core.topology.candidates import grow_candidates
from lightning_rigl.core.topology.masks import LayerMasks

# Data and models.


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


def example_mlp(example=True, **kwargs):
    """An MLP whose `example_input_array` lets SparsityMonitor count FLOPs (none with `example=False`)."""
    model = MLP(**kwargs)
    if example:
        model.example_input_array = torch.randn(3, 16)
    return model


class InfAt(MLP):
    """Its loss is inf at optimizer step `bad_step` (0-based): every gradient of that step is non-finite."""

    bad_step = 3

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.trainer.global_step == self.bad_step else loss


class RpropMLP(MLP):
    def configure_optimizers(self):
        return torch.optim.Rprop(self.parameters(), lr=0.0625)


class Wide(MLP):
    """Layers of 64x1024, 1024x1024 and 1024x4 weights: at ERK 95 %, densities 0.27, 0.03 and 1."""

    def __init__(self):
        super().__init__(in_features=64, hidden=1024)


class PlainSGD(MLP):
    """SGD without momentum in float64: the DDP-averaged gradient equals the full-batch one.

    Rank r of W gets samples r, r + W, ... in order, 8 a batch, so that the W batches of one step
    together are the 8 * W consecutive samples a single process takes as one batch.
    """

    def __init__(self):
        super().__init__()
        self.double()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return super().training_step((x.double(), y), batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        dataset = make_loader(256).dataset
        world = self.trainer.world_size
        sampler = DistributedSampler(dataset, world, self.trainer.global_rank, shuffle=False)
        return DataLoader(dataset, batch_size=16 // world, sampler=sampler)


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


class Attention(nn.Module):
    """One projection, then attention through F.scaled_dot_product_attention and through nn.MultiheadAttention."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True, bias=False)

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.mha(y, y, y, need_weights=False)[0]


class WithValidation(MLP):
    """Logs a score that is best at the first epoch; checks at every validation batch that the weights in
    use (swapped in by an averaging callback, if any) are 0 where the masks say."""

    rigl: RigLCallback
    validated = 0

    def validation_step(self, batch, batch_idx):
        params = dict(self.named_parameters())
        for name, mask in self.rigl.masks.items():
            assert params[name][~mask].eq(0).all(), name
        self.validated += 1
        self.log("score", -float(self.current_epoch))
        return super().training_step(batch, batch_idx)


def big_sparse_mlp(density=0.2):
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).double()
    masks = {name: torch.rand_like(w) < density for name, (_, w) in linear_layers(model).items()}
    return model, masks


# Trainers and fits.


#: The arguments of a quiet CPU Trainer (either Lightning package's).
QUIET_TRAINER = dict(
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)


def make_trainer(callbacks, **kwargs) -> pl.Trainer:
    """A quiet CPU Trainer; one with several devices also destroys its process group at teardown."""
    if kwargs.get("devices", 1) != 1:
        callbacks = [*callbacks, DestroyProcessGroup()]
    return pl.Trainer(callbacks=callbacks, **{**QUIET_TRAINER, "max_steps": 20, **kwargs})


class DestroyProcessGroup(Callback):
    """Destroys the process group in teardown (or after an exception), before a spawned rank exits.

    A ddp_spawn rank on CPU (gloo) that exits with its process group alive sometimes aborts at
    interpreter exit ("terminate called without an active exception", SIGABRT), about 1 fit in 9 on
    a busy 2-core machine: the test then fails although the fit succeeded. Every multi-process
    Trainer of the suite gets this callback (``make_trainer`` adds it; add it to others by hand).
    In a TwoRanks process it leaves the group alone: that group lives as long as the process.
    """

    keep_group = False  # True in TwoRanks' processes

    def teardown(self, trainer, pl_module, stage):
        if not self.keep_group:
            _destroy_process_group()

    def on_exception(self, trainer, pl_module, exception):
        if not self.keep_group:
            _destroy_process_group()


def _destroy_process_group():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def fit_with_kernels(
    kernels, module=MLP, loader=None, steps=40, callbacks=(), method="rigl", sparsity=0.8, **trainer_kwargs
):
    """A seeded fit of `module` with RigL on `kernels`; returns the callback and the model."""
    pl.seed_everything(0, verbose=False)
    rigl = RigLCallback(sparsity, method=method, delta_t=4, t_end=100, alpha=0.5, seed=1, kernels=kernels)
    model = module()
    trainer_kwargs.setdefault("max_steps", steps)
    make_trainer([rigl, *callbacks], **trainer_kwargs).fit(model, loader or make_loader())
    return rigl, model


def distributed_rigl(method):
    """The RigLCallback of the multi-process tests (DDP, FSDP2), compared with one process's."""
    return RigLCallback(0.8, method=method, delta_t=2, t_end=100, alpha=0.5, seed=5)


def fit_plain_sgd(callbacks, **kwargs):
    """Fits PlainSGD for 8 steps, seeded; each rank samples its share itself (no distributed sampler)."""
    pl.seed_everything(0, verbose=False)
    model = PlainSGD()
    make_trainer(callbacks, max_steps=8, use_distributed_sampler=False, **kwargs).fit(model)


class TwoRanks:
    """Two processes, started once and kept, as torchrun starts ranks 0 and 1 of one machine: they run jobs.

    Each process gets ``LOCAL_RANK``, ``NODE_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, so a Trainer a job
    builds with ``strategy="ddp"`` (or FSDP2's ModelParallelStrategy) and ``devices=2`` joins the other rank
    instead of starting processes of its own. Starting a process and importing Lightning takes far longer
    than a small fit: the suite's two-process fits share one start (the ``two_ranks`` fixture). Tests of
    what ``ddp_spawn`` itself does, such as handing results back to the main process, still use it.

    The processes make their (gloo) process group when they start and keep it: every Trainer finds it
    made. (A group destroyed and made again on the same port lets the rank that comes back first read
    the other's old address from the old store: "Connection refused", now and then.)
    """

    def __init__(self) -> None:
        self._workers: list[tuple[Any, Any]] | None = None
        self._done: Any = None

    def __call__(self, job: Callable[..., Any], *args: Any, timeout: float = 300.0) -> list[Any]:
        """Runs ``job(*args)`` on both ranks; returns what it returned on rank 0 and on rank 1.

        ``job`` and ``args`` must pickle (a module-level function); the results go through ``torch.save``.
        A rank that raises fails the call with its traceback, and so does a call past ``timeout`` seconds (a
        hung collective); either way both processes are stopped, and the next call starts two fresh ones.
        """
        if self._workers is None:
            self._start()
        with tempfile.TemporaryDirectory() as directory:
            paths = [Path(directory) / f"rank{rank}.pt" for rank in range(2)]
            for (_, jobs), path in zip(self._workers, paths, strict=True):
                jobs.put((job, args, path))
            pending, deadline = {0, 1}, time.monotonic() + timeout
            while pending:
                try:
                    rank, error = self._done.get(timeout=1.0)
                except queue.Empty:
                    gone = [rank for rank in pending if not self._workers[rank][0].is_alive()]
                    if gone or time.monotonic() > deadline:
                        self.close(kill=True)
                        why = f"rank {gone[0]} died" if gone else f"it ran past {timeout} s"
                        raise RuntimeError(f"{job.__name__} did not finish on both ranks: {why}") from None
                    continue
                if error is not None:  # the other rank may wait for this one in a collective: stop both
                    self.close(kill=True)
                    raise RuntimeError(f"{job.__name__} failed on rank {rank}:\n{error}")
                pending.discard(rank)
            return [torch.load(path, weights_only=False) for path in paths]

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        with socket.socket() as s:  # a free port for the ranks' rendezvous, kept for every job
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._done, self._workers = context.Queue(), []
        for rank in range(2):
            jobs = context.Queue()
            process = context.Process(target=_rank_worker, args=(rank, port, jobs, self._done), daemon=True)
            process.start()
            self._workers.append((process, jobs))

    def close(self, kill: bool = False) -> None:
        """Stops both processes: after their current job, or at once with ``kill``."""
        if not kill:
            for _, jobs in self._workers or []:
                jobs.put(None)
        for process, _ in self._workers or []:
            if not kill:
                process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
        self._workers = None


def _rank_worker(rank: int, port: int, jobs: Any, done: Any) -> None:
    """A TwoRanks process: runs each job it is given, saves the result, reports its traceback or None."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", LOCAL_RANK=str(rank))
    # A collective that hangs raises after 2 minutes, with its traceback.
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(minutes=2))
    DestroyProcessGroup.keep_group = True
    while (item := jobs.get()) is not None:
        job, args, path = item
        error = None
        try:
            torch.save(job(*args), path)
        except BaseException:
            error = traceback.format_exc()
        done.put((rank, error))
    _destroy_process_group()  # before exiting: see DestroyProcessGroup


def run_at_once(
    commands: Mapping[str, tuple[list[str], Path | None]], timeout: float = 240.0
) -> dict[str, subprocess.CompletedProcess]:
    """Runs every command (name -> argv and working folder) in a fresh process, as many at a time as there are cores.

    A fresh interpreter spends seconds importing torch and Lightning on one core while the test waits: the
    cases that each need one (what a process prints, what it imports) run side by side instead.
    Returns each command's result, text output captured, by name.
    """

    def run(command: tuple[list[str], Path | None]) -> subprocess.CompletedProcess:
        argv, cwd = command
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)

    with ThreadPoolExecutor(max_workers=min(len(commands), os.cpu_count() or 2)) as pool:
        return dict(zip(commands, pool.map(run, commands.values()), strict=True))


# Checks, recording callbacks and loggers.


F64 = dict(rtol=1e-12, atol=1e-12)


def digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """A short hash of the names and exact bytes of some tensors."""
    sha = hashlib.sha256()
    for name in sorted(tensors):
        sha.update(name.encode())
        sha.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()[:16]


class InvariantChecker(Callback):
    """After every batch: exact active counts, inactive weights exactly 0. Counts the checks."""

    def __init__(self, rigl: RigLCallback):
        self.rigl, self.checks = rigl, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        assert_invariants(self.rigl, pl_module)
        self.checks += 1


def assert_invariants(rigl, module):
    params = dict(module.named_parameters())
    assert rigl.masks, "no masks"
    for name, mask in rigl.masks.items():
        expected = num_active(mask.numel(), rigl.sparse.sparsities[name])
        assert int(mask.sum()) == expected, name
        assert params[name][~mask].eq(0).all(), f"{name} has non-zero inactive weights"


def assert_trained_alike(sparse, dense, rtol):
    """Two `fit_with_kernels` results, on sparse and on dense kernels: the same masks, weights within `rtol`."""
    (rigl_s, model_s), (rigl_d, model_d) = sparse, dense
    assert rigl_s.kernel_choices == dict.fromkeys(rigl_s.masks, "sparse")
    assert rigl_d.kernel_choices == dict.fromkeys(rigl_d.masks, "dense")
    assert rigl_s.sparse.updates == rigl_d.sparse.updates > 0
    for name, mask in rigl_d.masks.items():
        assert torch.equal(rigl_s.masks[name], mask), name
    for name, value in model_d.state_dict().items():
        torch.testing.assert_close(model_s.state_dict()[name], value, rtol=rtol, atol=rtol * value.abs().max())


class SaveFinal(Callback):
    """Saves every rank's masks, weights and update count at the end (DDP returns only rank 0's model)."""

    def __init__(self, rigl, directory):
        self.rigl, self.directory = rigl, directory

    def on_train_end(self, trainer, pl_module):
        state = {"masks": self.rigl.masks, "updates": self.rigl.sparse.updates, "weights": pl_module.state_dict()}
        torch.save(state, self.directory / f"final-rank{trainer.global_rank}.pt")


def assert_same_run(straight_dir, resumed_dir, ranks=1):
    for rank in range(ranks):
        straight = torch.load(straight_dir / f"final-rank{rank}.pt")
        resumed = torch.load(resumed_dir / f"final-rank{rank}.pt")
        assert straight["updates"] == resumed["updates"] > 0
        for name, mask in straight["masks"].items():
            assert torch.equal(resumed["masks"][name], mask), name
        for name, value in straight["weights"].items():
            assert torch.equal(resumed["weights"][name], value), name


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


class RecordGrowth(Callback):
    """Placed after RigLCallback: Rprop's step sizes at connections new in an update, right after it."""

    def __init__(self, rigl):
        self.rigl, self.step_sizes = rigl, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = self.rigl.masks

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        state = trainer.optimizers[0].state
        for name, mask in self.rigl.masks.items():
            new = mask & ~self.before[name]
            if new.any():
                self.step_sizes.append(state[self.rigl.sparse.params[name]]["step_size"][new])


class RecordingLogger(Logger):
    """Keeps every `log_metrics` call: step -> metrics (merged when a step is logged twice)."""

    def __init__(self):
        super().__init__()
        self.steps = {}

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.steps.setdefault(step, {}).update(metrics)

    def monitored(self):
        """Steps at which the monitor logged, with its values only."""
        return {step: ours for step, metrics in self.steps.items() if (ours := _monitor_keys(metrics))}


def _monitor_keys(metrics):
    return {k: v for k, v in metrics.items() if k.startswith(("sparsity/", "flops/", "rigl/"))}


# LightningCLI arguments.


CLI_TRAINER_ARGS = {
    "accelerator": "cpu",
    "max_steps": 6,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def command_line(args: dict, prefix: str = "trainer.callbacks") -> list[str]:
    """``--prefix.key=value`` for each item; JSON for anything but a string (lists, dicts, true, null)."""
    return [f"--{prefix}.{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in args.items()]


def update_layer_masks(mask, weight, grow_scores, drop_fraction):
    """One topology update of one layer through its LayerMasks, from dense grow scores.

    Returns ``(new_mask, grown)``: the new bool mask, and the bool positions active now that were not before.
    """
    masks = LayerMasks({"w": nn.Parameter(weight.detach().clone())})
    masks.replace({"w": mask})
    flat_scores = grow_scores.reshape(-1)
    candidates = grow_candidates(
        masks.local["w"], int(masks.counts["w"] * drop_fraction), lambda start, stop: flat_scores[start:stop]
    )
    new, _ = masks.update("w", candidates)
    grown = torch.zeros(mask.numel(), dtype=torch.bool)
    grown[new] = True
    return masks.local["w"].bool(), grown.view(mask.shape)


# Compact storage.


class F64Net(pl.LightningModule):
    """Three Linear layers in float64 on a regression of signed data; SGD with momentum, Adam or another optimizer."""

    def __init__(self, optimizer: str = "sgd"):
        super().__init__()
        self.optimizer = optimizer
        self.net = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 3))
        self.double()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    test_step = training_step

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=0.01)
        if self.optimizer == "lbfgs":
            return torch.optim.LBFGS(self.parameters(), lr=0.1)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def f64_loader(n: int = 128, batch_size: int = 16, shuffle: bool = False):
    """Signed float64 regression data for F64Net (12 inputs, 3 outputs)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 12, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def compact_rigl(storage: str, **kwargs) -> RigLCallback:
    """A RigLCallback with updates after steps 2, 4, 6 and 8 and no checks across ranks."""
    args = dict(sparsity=0.8, delta_t=2, t_end=9, seed=3, consistency_checks=0, storage=storage)
    return RigLCallback(**{**args, **kwargs})
