"""Argument checks: each raises an error that names the argument, the value and what is allowed.

Shared by the core (which raises ``ValueError`` / ``TypeError``) and the Lightning adapters (which
re-raise ``ValueError`` as Lightning's ``MisconfigurationException``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def check_type(argument: str, value: Any, types: tuple[type, ...], allowed: str) -> None:
    """Raise a TypeError naming ``argument`` unless ``value`` is one of ``types`` (a bool is no int).

    Example:
        >>> check_type("seed", True, (int,), "an int")
        Traceback (most recent call last):
        ...
        TypeError: `seed` must be an int, got True of type bool.
    """
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise TypeError(f"`{argument}` must be {allowed}, got {value!r} of type {type(value).__name__}.")


def check_fraction(argument: str, value: Any) -> float:
    """Return ``value`` as a float if it is a number in [0, 1); raise naming ``argument`` otherwise.

    Example:
        >>> check_fraction("sparsity", 0.9)
        0.9
    """
    check_type(argument, value, (int, float), "a float in [0, 1)")
    if math.isnan(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{argument}` must be in [0, 1), got {value!r}.")
    return float(value)


def check_choice(argument: str, value: Any, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``; raise a ValueError naming ``argument`` otherwise.

    Example:
        >>> check_choice("decay", "cosine", ("cosine", "linear"))
        'cosine'
    """
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{argument}` must be one of {choices}, got {value!r}.")
    return value


def check_int(argument: str, value: Any, minimum: int) -> int:
    """Return ``value`` if it is an int (not a bool) >= ``minimum``; raise naming ``argument`` otherwise.

    Example:
        >>> check_int("delta_t", 100, 1)
        100
    """
    check_type(argument, value, (int,), f"an int >= {minimum}")
    if value < minimum:
        raise ValueError(f"`{argument}` must be an int >= {minimum}, got {value!r}.")
    return value


def check_number(argument: str, value: Any, low: float, high: float = math.inf) -> float:
    """Return ``value`` as a float if it is a number in [``low``, ``high``]; raise naming ``argument`` otherwise.

    Example:
        >>> check_number("alpha", 0.3, 0.0, 1.0)
        0.3
    """
    allowed = f"a number in [{low:g}, {high:g}]" if high != math.inf else f"a number >= {low:g}"
    check_type(argument, value, (int, float), allowed)
    if not low <= value <= high:  # also refuses NaN
        raise ValueError(f"`{argument}` must be {allowed}, got {value!r}.")
    return float(value)


def check_patterns(argument: str, value: Any) -> None:
    """Raise a TypeError naming ``argument`` unless ``value`` is None or a list of str patterns.

    Example:
        >>> check_patterns("exclude", ["*.bias"])
    """
    if value is not None and (not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value)):
        raise TypeError(f"`{argument}` must be None or a list of fnmatch patterns (str), got {value!r}.")
