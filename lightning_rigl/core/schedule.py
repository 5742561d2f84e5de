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
