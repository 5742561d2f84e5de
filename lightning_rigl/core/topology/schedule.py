"""When topology updates happen and how large they are."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from lightning_rigl.core.validation import check_choice, check_int, check_number

Decay = Literal["cosine", "linear", "constant"]
DECAYS: tuple[str, ...] = get_args(Decay)


def check_schedule(delta_t: int, alpha: float, decay: str) -> None:
    """Raise naming the argument unless ``delta_t`` is an int >= 1, ``alpha`` in [0, 1] and ``decay`` known.

    Example:
        >>> check_schedule(100, 0.3, "cosine")
    """
    check_int("delta_t", delta_t, 1)
    check_number("alpha", alpha, 0.0, 1.0)
    check_choice("decay", decay, DECAYS)


def resolve_t_end(t_end: int | float, total_steps: float, *, batch_steps: int = 1) -> int:
    """``t_end`` as an optimizer step: an int is one already, a float in (0, 1] is a fraction of the run.

    Args:
        t_end: An optimizer step, or a fraction of ``total_steps``.
        total_steps: The run's optimizer steps as the trainer estimates them (``inf`` or ``0`` if unknown).
        batch_steps: Optimizer steps one batch makes, as far as known before the run: the number of
            optimizers under manual optimization (whose runs the trainer counts in batches), else 1.

    Raises:
        ValueError: A fraction that cannot be resolved: an unknown run length, or batches that make
            several optimizer steps (updates would stop early).

    Example:
        >>> resolve_t_end(0.75, 1000), resolve_t_end(600, float("inf"))
        (750, 600)
    """
    if isinstance(t_end, int):
        return t_end
    check_steps_per_batch(t_end, batch_steps, f"with manual optimization and {batch_steps} optimizers")
    if not math.isfinite(total_steps) or total_steps <= 0:
        raise ValueError(
            f"`t_end={t_end}` is a fraction of the run, but the run's number of optimizer steps is unknown "
            f"(trainer.estimated_stepping_batches = {total_steps}). Pass `t_end` as an int (an optimizer step), "
            "or set `max_steps` or `max_epochs` with a sized dataloader."
        )
    return int(t_end * total_steps)


def check_steps_per_batch(t_end: int | float, batch_steps: int, cause: str = "") -> None:
    """Raise if a fractional ``t_end``, resolved against batches, meets batches of several optimizer steps.

    Example:
        >>> check_steps_per_batch(0.75, 1), check_steps_per_batch(600, 3)
        (None, None)
    """
    if isinstance(t_end, float) and batch_steps > 1:
        raise ValueError(
            f"`t_end={t_end}` is a fraction of the run, resolved against its batches, but "
            f"{cause or f'a batch made {batch_steps} optimizer steps (manual optimization)'}: Lightning counts "
            "such a run in batches, not optimizer steps, so updates would stop early. Pass `t_end` as an int "
            "(an optimizer step)."
        )


@dataclass(frozen=True)
class UpdateSchedule:
    """Every ``delta_t`` optimizer steps until ``t_end``, drop a decaying fraction of active weights.

    Steps are counted as completed optimizer steps (Lightning's ``trainer.global_step`` after the
    step), so gradient accumulation changes nothing. An update runs right after step ``t`` when
    ``t % delta_t == 0`` and ``0 < t < t_end``; a run of ``T`` steps therefore makes
    ``min(T, t_end - 1) // delta_t`` updates.

    Args:
        delta_t: Optimizer steps between updates, >= 1.
        t_end: First step at which no update runs any more, >= 0.
        alpha: Drop fraction at step 0, in [0, 1].
        decay: ``"cosine"`` (``alpha / 2 * (1 + cos(pi * t / t_end))``, the paper's),
            ``"linear"`` (``alpha * (1 - t / t_end)``) or ``"constant"`` (``alpha``).

    Example:
        >>> schedule = UpdateSchedule(delta_t=100, t_end=25000, alpha=0.3)
        >>> schedule.is_update_step(100), schedule.is_update_step(150), schedule.drop_fraction(12500)
        (True, False, 0.15)
        >>> schedule.num_updates(30000)
        249

    """

    delta_t: int = 100
    t_end: int = 0
    alpha: float = 0.3
    decay: Decay = "cosine"

    def __post_init__(self) -> None:
        check_schedule(self.delta_t, self.alpha, self.decay)
        check_int("t_end", self.t_end, 0)

    def drop_fraction(self, step: int) -> float:
        """Fraction of each layer's active weights to drop at ``step``; 0 from ``t_end`` on."""
        if step >= self.t_end:
            return 0.0
        if self.decay == "cosine":
            return self.alpha / 2 * (1 + math.cos(math.pi * step / self.t_end))
        if self.decay == "linear":
            return self.alpha * (1 - step / self.t_end)
        return float(self.alpha)

    def is_update_step(self, step: int) -> bool:
        """Whether a topology update follows the optimizer step that brings the count to ``step``."""
        return 0 < step < self.t_end and step % self.delta_t == 0

    def num_updates(self, total_steps: int) -> int:
        """How many updates a run of ``total_steps`` optimizer steps makes."""
        return max(0, min(total_steps, self.t_end - 1)) // self.delta_t
