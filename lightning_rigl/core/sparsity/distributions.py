"""Per-layer sparsity distributions: uniform, Erdős-Rényi (ER) and Erdős-Rényi-Kernel (ERK)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Literal, get_args

from lightning_rigl.core.topology.initial_masks import num_active
from lightning_rigl.core.validation import check_choice, check_fraction, check_number

Distribution = Literal["erk", "er", "uniform"]
DISTRIBUTIONS: tuple[str, ...] = get_args(Distribution)


def raw_density(shape: Sequence[int], distribution: str, erk_power_scale: float = 1.0) -> float:
    """The unnormalised density of a layer under ER or ERK; the solver scales it by one epsilon.

    ER reads ``(n_out, n_in)`` from dims 0 and 1 of a PyTorch weight ``(out, in, *kernel)``; ERK uses
    every dimension, so the kernel size counts.

    Example:
        >>> raw_density((10, 20), "er")
        0.15

    """
    if distribution == "er":
        if len(shape) < 2:
            raise ValueError(f"ER needs a weight with at least 2 dims (out, in), got shape {tuple(shape)}.")
        n_out, n_in = shape[0], shape[1]
        return (n_out + n_in) / (n_out * n_in)
    return (sum(shape) / math.prod(shape)) ** erk_power_scale


def layer_sparsities(
    shapes: Mapping[str, Sequence[int]],
    sparsity: float,
    distribution: str = "erk",
    *,
    dense: Iterable[str] = (),
    custom: Mapping[str, float] | None = None,
    erk_power_scale: float = 1.0,
) -> dict[str, float]:
    """Distribute a global sparsity over layers, as in the RigL paper.

    Layers named in ``custom`` get their own sparsity and layers in ``dense`` get 0; both are left out
    of the budget, so ``sparsity`` is the fraction of zeros over the remaining layers (up to the
    floors of ``floor(s_l * N_l)``). For ER and ERK, layers whose density would exceed 1 are made dense
    and the others re-solved, until every density fits.

    Args:
        shapes: Parameter name to weight shape, PyTorch layout ``(out, in, *kernel)``.
        sparsity: Target fraction of zeros over the layers in the budget, in [0, 1).
        distribution: ``"erk"``, ``"er"`` or ``"uniform"``.
        dense: Names to keep fully dense (outside the budget).
        custom: Name to sparsity in [0, 1), outside the budget.
        erk_power_scale: Exponent on ERK's raw density (0 gives uniform, 1 gives ERK).

    Returns:
        Parameter name to fraction of zeros, in the order of ``shapes``.

    Raises:
        ValueError: On an unknown distribution or name, a value out of range, or a target the
            distribution cannot reach.

    Example:
        >>> shapes = {"conv": (16, 3, 3, 3), "fc1": (300, 784), "fc2": (10, 300)}
        >>> {name: round(s, 3) for name, s in layer_sparsities(shapes, 0.9).items()}
        {'conv': 0.0, 'fc1': 0.913, 'fc2': 0.0}
        >>> layer_sparsities(shapes, 0.9, "uniform", dense=["conv"])
        {'conv': 0.0, 'fc1': 0.9, 'fc2': 0.9}

    """
    sparsity = check_fraction("sparsity", sparsity)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    check_number("erk_power_scale", erk_power_scale, 0.0)
    shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
    for name, shape in shapes.items():
        if not shape or min(shape) < 1:
            raise ValueError(f"Layer {name!r} has shape {shape}: every dimension must be >= 1.")
    fixed = {name: check_fraction(f"custom[{name!r}]", value) for name, value in (custom or {}).items()}
    for name in dense:
        if name in fixed and fixed[name] != 0.0:
            raise ValueError(f"Layer {name!r} is both in `dense` and in `custom` with sparsity {fixed[name]}.")
        fixed[name] = 0.0
    unknown = sorted(set(fixed) - set(shapes))
    if unknown:
        raise ValueError(f"Names {unknown} are not among the layers {list(shapes)}.")

    budget_layers = [name for name in shapes if name not in fixed]
    if sparsity > 0.0 and not budget_layers:
        raise ValueError(
            f"Sparsity {sparsity} cannot be reached: every layer ({list(shapes)}) is dense or has a custom "
            "sparsity, so none is left to carry the budget."
        )
    if distribution == "uniform" or sparsity == 0.0 or not budget_layers:
        solved = {name: sparsity for name in budget_layers}
    else:
        solved = _solve_scaled({name: shapes[name] for name in budget_layers}, sparsity, distribution, erk_power_scale)
    return {name: fixed[name] if name in fixed else solved[name] for name in shapes}


def _solve_scaled(
    shapes: Mapping[str, tuple[int, ...]], sparsity: float, distribution: str, erk_power_scale: float
) -> dict[str, float]:
    """ER/ERK: find epsilon so that density_l = epsilon * raw_l meets the budget, densifying as needed."""
    raw = {name: raw_density(shape, distribution, erk_power_scale) for name, shape in shapes.items()}
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    dense: set[str] = set()
    while True:
        budget, divisor = 0.0, 0.0
        for name in shapes:
            zeros = math.floor(sparsity * numel[name])
            if name in dense:
                budget -= zeros  # a dense layer's zeros must be absorbed by the others
            else:
                budget += numel[name] - zeros
                divisor += raw[name] * numel[name]
        if divisor == 0.0 and budget == 0.0:
            return dict.fromkeys(shapes, 0.0)  # the floors leave no zero to place: all dense is exact
        if divisor == 0.0 or budget <= 0.0:
            raise ValueError(
                f"The {distribution!r} distribution cannot reach sparsity {sparsity}: every layer would have to "
                "be dense. Lower `sparsity`, use 'uniform', or mask more layers."
            )
        epsilon = budget / divisor
        max_raw = max(raw[name] for name in shapes if name not in dense)
        if max_raw * epsilon > 1.0 + 1e-12:  # a density of 1 up to rounding is not "too dense"
            dense.update(name for name in shapes if name not in dense and raw[name] == max_raw)
            continue
        break
    return {name: 0.0 if name in dense else max(0.0, 1.0 - epsilon * raw[name]) for name in shapes}


def resolve_sparsities(
    shapes: Mapping[str, Sequence[int]],
    sparsity: float,
    distribution: str = "erk",
    *,
    dense_first_layer: bool | None = None,
    custom_sparsity: Mapping[str, float] | None = None,
    erk_power_scale: float = 1.0,
) -> dict[str, float]:
    """The per-layer sparsities RigLCallback's arguments resolve to, for layers of ``shapes`` in model order.

    ``custom_sparsity`` keys may be fnmatch patterns; ``dense_first_layer=None`` keeps the first layer
    dense for ``"uniform"`` only, as the paper does. See :func:`layer_sparsities` for the rest.

    Example:
        >>> resolve_sparsities({"a": (4, 4), "b": (8, 4)}, 0.5, "uniform")
        {'a': 0.0, 'b': 0.5}
    """
    names = list(shapes)
    custom = resolve_custom_sparsity(dict(custom_sparsity) if custom_sparsity else None, names)
    budget = budget_layers(names, distribution, dense_first_layer=dense_first_layer, custom_sparsity=custom_sparsity)
    dense = [name for name in names if name not in budget and name not in custom]
    return layer_sparsities(shapes, sparsity, distribution, dense=dense, custom=custom, erk_power_scale=erk_power_scale)


def budget_layers(
    names: Sequence[str],
    distribution: str = "erk",
    *,
    dense_first_layer: bool | None = None,
    custom_sparsity: Mapping[str, float] | None = None,
) -> list[str]:
    """The layers that carry ``sparsity``: all but those in ``custom_sparsity`` and a dense first layer.

    Example:
        >>> budget_layers(["a", "b", "c"], "uniform", custom_sparsity={"c": 0.5})
        ['b']
    """
    names = list(names)
    if dense_first_layer is None:
        dense_first_layer = distribution == "uniform"
    custom = resolve_custom_sparsity(dict(custom_sparsity) if custom_sparsity else None, names)
    dense = names[0] if names and dense_first_layer and names[0] not in custom else None
    return [name for name in names if name not in custom and name != dense]


def achieved_sparsity(shapes: Mapping[str, Sequence[int]], sparsities: Mapping[str, float]) -> float:
    """The fraction of zeros over the layers of ``shapes`` once each holds its exact active count.

    A layer of ``N`` weights at sparsity ``s`` keeps ``N - floor(s * N)`` active weights
    (:func:`~lightning_rigl.core.topology.initial_masks.num_active`): rounded up to a whole weight, so the overall
    figure lands at or just below the target. Over ``L`` layers of ``N`` weights in all it is below
    the target by at most ``L / N`` for ``"uniform"`` and ``2 L / N`` for ``"er"``/``"erk"``, whose
    budget is itself counted in such rounded layers (see docs/how-rigl-works.md, "Per-layer sparsity").

    Example:
        >>> achieved_sparsity({"a": (2, 2), "b": (4, 4)}, {"a": 0.9, "b": 0.9})  # 1 + 2 of 20 weights active
        0.85
    """
    total = sum(math.prod(shape) for shape in shapes.values())
    if total == 0:
        return 0.0
    active = sum(num_active(math.prod(shape), sparsities[name]) for name, shape in shapes.items())
    return 1.0 - active / total


def resolve_custom_sparsity(custom: dict[str, float] | None, names: Sequence[str]) -> dict[str, float]:
    """Expand ``custom_sparsity`` keys (parameter names or fnmatch patterns) to masked parameter names.

    Raises:
        ValueError: A key that matches no masked parameter, or a parameter matched by two keys.

    Example:
        >>> resolve_custom_sparsity({"0.*": 0.5}, ["0.weight", "1.weight"])
        {'0.weight': 0.5}

    """
    resolved: dict[str, float] = {}
    source: dict[str, str] = {}
    for key, value in (custom or {}).items():
        matched = [name for name in names if name == key or fnmatchcase(name, key)]
        if not matched:
            raise ValueError(
                f"`custom_sparsity` key {key!r} matches no masked parameter. Masked parameters: {list(names)}"
            )
        for name in matched:
            if name in resolved:
                raise ValueError(f"`custom_sparsity` keys {source[name]!r} and {key!r} both match {name!r}.")
            resolved[name], source[name] = value, key
    return resolved
