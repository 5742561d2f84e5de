"""Argument checks shared by the Lightning adapters (RigLCallback, SparsityMonitor)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException


@contextmanager
def misconfiguration() -> Iterator[None]:
    """Re-raise the core's ValueErrors as Lightning's MisconfigurationException."""
    try:
        yield
    except MisconfigurationException:
        raise
    except ValueError as error:
        raise MisconfigurationException(str(error)) from error


def check_type(argument: str, value: Any, types: tuple[type, ...], allowed: str) -> None:
    """Raise a TypeError naming ``argument`` unless ``value`` is one of ``types`` (a bool is no int)."""
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise TypeError(f"`{argument}` must be {allowed}, got {value!r} of type {type(value).__name__}.")


def check_patterns(argument: str, value: Any) -> None:
    """Raise a TypeError naming ``argument`` unless ``value`` is None or a list of str patterns."""
    if value is not None and (not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value)):
        raise TypeError(f"`{argument}` must be None or a list of fnmatch patterns (str), got {value!r}.")
