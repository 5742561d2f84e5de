"""What RigLCallback reads off the Trainer at fit start: the update horizon in optimizer steps, the shared seed."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch

from lightning_rigl.core.schedule import resolve_t_end


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
