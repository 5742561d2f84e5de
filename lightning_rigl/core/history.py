"""The record of a run's topology updates."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class UpdateRecord:
    """One topology update, summed over the layers it changed.

    Attributes:
        step: The optimizer step after which it was scheduled (``trainer.global_step`` after that step).
        drop_fraction: The schedule's drop fraction at ``step``.
        changed: Connections grown that were inactive before (as many were dropped for good).
        active: Active connections of the updated layers.

    """

    step: int
    drop_fraction: float
    changed: int = 0
    active: int = 0


def record_update(history: list[UpdateRecord], step: int, fraction: float, changed: int, active: int) -> None:
    """Add one layer's update to ``history``: to the last record if it is of the same step, else to a new one.

    Example:
        >>> history = []
        >>> record_update(history, 100, 0.3, 5, 50); record_update(history, 100, 0.3, 2, 20)
        >>> history
        [UpdateRecord(step=100, drop_fraction=0.3, changed=7, active=70)]
    """
    if not history or history[-1].step != step:
        history.append(UpdateRecord(step, fraction))
    history[-1].changed += changed
    history[-1].active += active
