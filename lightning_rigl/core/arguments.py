"""The arguments of a sparse training run, checked before anything trains."""

from __future__ import annotations

import inspect
from typing import Any

from lightning_rigl.core.distribution import DISTRIBUTIONS
from lightning_rigl.core.kernel_choice import KERNELS
from lightning_rigl.core.methods import get_method
from lightning_rigl.core.schedule import check_schedule
from lightning_rigl.core.validation import (
    check_choice,
    check_fraction,
    check_int,
    check_number,
    check_patterns,
    check_type,
)


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
    check_choice("kernels", kernels, KERNELS)


#: The keyword arguments of a run, as RigLCallback takes them.
RUN_ARGUMENTS: tuple[str, ...] = tuple(inspect.signature(check_run_arguments).parameters)
#: Those that choose the masked weights and their sparsities (``SparseTraining.from_model``'s).
MASKING_ARGUMENTS = (
    "sparsity",
    "distribution",
    "include",
    "exclude",
    "dense_first_layer",
    "custom_sparsity",
    "erk_power_scale",
)
