"""The arguments of a sparse training run: one frozen configuration, checked once before anything trains."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from lightning_rigl.core.kernels.choice import check_kernels
from lightning_rigl.core.sparsity.distributions import DISTRIBUTIONS
from lightning_rigl.core.topology.methods import get_method
from lightning_rigl.core.topology.schedule import check_schedule
from lightning_rigl.core.validation import (
    check_choice,
    check_fraction,
    check_int,
    check_number,
    check_patterns,
    check_type,
)

#: How masked Linear-type layers store their weights: whole and dense, or only the active ones (compact).
Storage = Literal["dense", "compact"]
STORAGES = ("dense", "compact")


def check_run_arguments(
    *,
    sparsity: Any,
    distribution: Any,
    method: Any,
    delta_t: Any,
    t_end: Any,
    alpha: Any,
    decay: Any,
    include: Any,
    exclude: Any,
    dense_first_layer: Any,
    custom_sparsity: Any,
    erk_power_scale: Any,
    seed: Any,
    consistency_checks: Any,
    kernels: Any,
    storage: Any = "dense",
) -> None:
    """Raise a ValueError or TypeError naming the first argument of RigLCallback's that is refused.

    Example:
        >>> check_run_arguments(
        ...     sparsity=0.9, distribution="erk", method="rigl", delta_t=100, t_end=0.75, alpha=0.3, decay="cosine",
        ...     include=None, exclude=None, dense_first_layer=None, custom_sparsity=None, erk_power_scale=1.0,
        ...     seed=None, consistency_checks=3, kernels="auto",
        ... )
    """
    check_fraction("sparsity", sparsity)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    get_method(method)
    check_type("t_end", t_end, (int, float), "an int >= 0 (optimizer steps) or a float in (0, 1]")
    if isinstance(t_end, float) and not 0.0 < t_end <= 1.0:
        raise ValueError(
            f"`t_end` as a float is a fraction of the run and must be in (0, 1], got {t_end!r}; "
            "pass an int for an absolute optimizer step."
        )
    if isinstance(t_end, int):
        check_int("t_end", t_end, 0)
    check_schedule(delta_t, alpha, decay)
    check_patterns("include", include)
    check_patterns("exclude", exclude)
    if dense_first_layer is not None:
        check_type("dense_first_layer", dense_first_layer, (bool,), "None or a bool")
    if custom_sparsity is not None:
        check_type("custom_sparsity", custom_sparsity, (dict,), "None or a dict of name to sparsity")
        for name, value in custom_sparsity.items():
            check_type("custom_sparsity", name, (str,), "keyed by parameter names (str)")
            check_fraction(f"custom_sparsity[{name!r}]", value)
    check_number("erk_power_scale", erk_power_scale, 0.0)
    if seed is not None:
        check_type("seed", seed, (int,), "None or an int")
    check_int("consistency_checks", consistency_checks, -1)
    check_kernels(kernels)
    check_storage(storage, method, kernels)


def check_storage(storage: Any, method: Any, kernels: Any) -> None:
    """Raise a ValueError naming ``storage`` unless it is one of :data:`STORAGES` and fits ``method`` and ``kernels``.

    Example:
        >>> check_storage("compact", "rigl", "auto")  # allowed: no error
    """
    check_choice("storage", storage, STORAGES)
    if storage != "compact":
        return
    if method == "snfs":
        raise ValueError(
            "`storage='compact'` cannot serve method='snfs': SNFS keeps a dense moving average of every gradient. "
            "Use storage='dense' with SNFS, or method='rigl', 'set' or 'static' with compact storage."
        )
    if kernels == "dense":
        raise ValueError(
            "`storage='compact'` computes on the sparse kernels: kernels='dense' needs dense weights. Use "
            "kernels='auto' or 'sparse' with compact storage (they choose for the layers stored densely), "
            "or storage='dense'."
        )


@dataclass(frozen=True)
class RunConfig:
    """The arguments of a sparse training run, each checked once, here: RigLCallback builds one from its own.

    The fields are RigLCallback's arguments (see its docstring). Building one raises a ValueError or TypeError
    naming the first refused argument, its value and what is allowed.

    Example:
        >>> config = RunConfig(sparsity=0.95, delta_t=50)
        >>> config.sparsity, config.masking()["distribution"]
        (0.95, 'erk')
        >>> RunConfig(sparsity=1.5)
        Traceback (most recent call last):
        ...
        ValueError: `sparsity` must be in [0, 1), got 1.5.
    """

    sparsity: float = 0.9
    distribution: str = "erk"
    method: str = "rigl"
    delta_t: int = 100
    t_end: int | float = 0.75
    alpha: float = 0.3
    decay: str = "cosine"
    include: list[str] | None = None
    exclude: list[str] | None = None
    dense_first_layer: bool | None = None
    custom_sparsity: dict[str, float] | None = None
    erk_power_scale: float = 1.0
    seed: int | None = None
    consistency_checks: int = 3
    kernels: str = "auto"
    storage: str = "dense"

    def __post_init__(self) -> None:
        check_run_arguments(**{field.name: getattr(self, field.name) for field in fields(self)})

    def masking(self) -> dict[str, Any]:
        """The arguments that choose the masked weights and their sparsities (``SparseTraining.from_model``'s)."""
        names = ("sparsity", "distribution", "include", "exclude", "dense_first_layer", "custom_sparsity")
        return {name: getattr(self, name) for name in (*names, "erk_power_scale")}


#: RigLCallback's arguments, the fields of :class:`RunConfig`.
RUN_ARGUMENTS: tuple[str, ...] = tuple(field.name for field in fields(RunConfig))
