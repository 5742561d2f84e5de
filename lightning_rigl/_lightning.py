"""What the Lightning adapters share: the core's ValueErrors re-raised as Lightning's MisconfigurationException."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from lightning.pytorch.utilities.exceptions import MisconfigurationException


@contextmanager
def misconfiguration() -> Iterator[None]:
    """Re-raise the core's ValueErrors as Lightning's MisconfigurationException (not a ValueError in 2.6)."""
    try:
        yield
    except MisconfigurationException:
        raise
    except ValueError as error:
        raise MisconfigurationException(str(error)) from error
