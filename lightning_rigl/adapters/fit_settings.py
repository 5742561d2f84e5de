"""What RigLCallback reads off the Trainer at fit start: the update horizon, the shared seed, the run to train."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_rigl.core.config import RunConfig
from lightning_rigl.core.sparse_training import SparseTraining
from lightning_rigl.core.sparsity.selection import select_parameters
from lightning_rigl.core.topology.schedule import UpdateSchedule, resolve_t_end


def t_end_steps(trainer: pl.Trainer, t_end: int | float) -> int:
    """``t_end`` in optimizer steps: a float is a fraction of ``trainer.estimated_stepping_batches``.

    In manual optimization a batch may step each optimizer once, so the count is per batch step.
    """
    manual = not trainer.lightning_module.automatic_optimization
    steps = len(trainer.optimizers) if manual else 1
    total = trainer.estimated_stepping_batches if isinstance(t_end, float) else math.inf
    return resolve_t_end(t_end, total, batch_steps=steps)


def shared_seed(trainer: pl.Trainer, seed: int | None) -> int:
    """``seed`` if given, else one derived from torch's seed (so ``seed_everything`` fixes it), rank 0's on every rank.

    The derived seed is offset from torch's so the mask draws are not the weight-init draws.
    """
    if seed is not None:
        return seed
    derived = (torch.initial_seed() + 0x5EED) % 2**63
    return int(trainer.strategy.broadcast(derived, src=0))


def run_for_fit(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    config: RunConfig,
    current: SparseTraining | None,
    saved: Mapping[str, Any] | None,
    compact: Mapping[str, Any] | None = None,
) -> SparseTraining:
    """The run a fit trains: the one a checkpoint's ``saved`` state describes, else ``current`` again, else a new one.

    A new fit of the same model (the same Parameters) goes on from the current run's masks, under this
    fit's schedule; another model gets fresh masks. ``compact``: the run's arguments for the layers made
    compact in ``setup`` (see ``CompactStorage.run_kwargs``).
    """
    schedule = UpdateSchedule(config.delta_t, t_end_steps(trainer, config.t_end), config.alpha, config.decay)
    params = select_parameters(model, config.include, config.exclude) if compact is None else compact["params"]
    same_compact = compact is None or (current is not None and current.compact.layers == compact["drawn"].compact)
    if saved is None and current is not None and _same_parameters(current.params, params) and same_compact:
        current.schedule = schedule
        return current
    if compact is not None:
        return SparseTraining(
            **compact,
            method=config.method,
            schedule=schedule,
            seed=shared_seed(trainer, config.seed),
            state=saved,
            model=model,
            kernels=config.kernels,
        )
    return SparseTraining.from_model(
        model,
        **config.masking(),
        params=params,
        method=config.method,
        schedule=schedule,
        seed=shared_seed(trainer, config.seed),
        state=saved,
        kernels=config.kernels,
    )


def _same_parameters(current: Mapping[str, nn.Parameter], params: Mapping[str, nn.Parameter]) -> bool:
    return list(current) == list(params) and all(current[name] is params[name] for name in params)
