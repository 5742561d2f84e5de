"""When topology updates happen and how large they are."""

from __future__ import annotations

import math
from dataclasses import dataclass

DECAYS = ("cosine", "linear", "constant")


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
    decay: str = "cosine"

    def __post_init__(self) -> None:
        if isinstance(self.delta_t, bool) or not isinstance(self.delta_t, int) or self.delta_t < 1:
            raise ValueError(f"`delta_t` must be an int >= 1, got {self.delta_t!r}.")
        if isinstance(self.t_end, bool) or not isinstance(self.t_end, int) or self.t_end < 0:
            raise ValueError(f"`t_end` must be an int >= 0 (in optimizer steps), got {self.t_end!r}.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"`alpha` must be a float in [0, 1], got {self.alpha!r}.")
        if self.decay not in DECAYS:
            raise ValueError(f"`decay` must be one of {DECAYS}, got {self.decay!r}.")

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
