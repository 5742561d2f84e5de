"""What the Lightning adapters share: both Lightning packages' classes, their error type, and one-line CLI errors.

Lightning ships as ``lightning`` (``lightning.pytorch``) and as the standalone ``pytorch_lightning``,
with separate class hierarchies. The adapters accept both without importing ``pytorch_lightning``:
an object of one of its classes can only exist once something else has imported it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException as _LightningMisconfiguration

STANDALONE = "pytorch_lightning"


def _misconfiguration_bases() -> tuple[type[Exception], ...]:
    # pytorch_lightning raises lightning_fabric's class (a separate package installed with it); importing
    # that small module does not import pytorch_lightning.
    if importlib.util.find_spec("lightning_fabric") is None:
        return (_LightningMisconfiguration,)
    from lightning_fabric.utilities.exceptions import MisconfigurationException as standalone

    return (_LightningMisconfiguration, standalone)


class MisconfigurationException(*_misconfiguration_bases()):  # type: ignore[misc]
    """The MisconfigurationException of both Lightning packages: ``except`` with either one catches it.

    Example:
        >>> from lightning.pytorch.utilities.exceptions import MisconfigurationException as Lightning
        >>> isinstance(MisconfigurationException("`sparsity` must be in [0, 1), got 1.5."), Lightning)
        True
    """


@contextmanager
def misconfiguration() -> Iterator[None]:
    """Re-raise the core's ValueErrors as MisconfigurationException (in lightning 2.6 not a ValueError).

    Example:
        >>> with misconfiguration():
        ...     raise ValueError("`delta_t` must be an int >= 1, got -5.")
        Traceback (most recent call last):
        ...
        lightning_rigl.adapters.compat.MisconfigurationException: `delta_t` must be an int >= 1, got -5.
    """
    try:
        yield
    except _LightningMisconfiguration:
        raise
    except ValueError as error:
        raise MisconfigurationException(str(error)) from error


def lightning_classes(module: str, *names: str) -> tuple[type, ...]:
    """The classes ``names`` of ``lightning.pytorch.<module>``, and of ``pytorch_lightning.<module>`` if imported.

    For ``isinstance`` checks on objects a Trainer of either package holds (strategies, loggers).

    Example:
        >>> from lightning.pytorch.strategies import DDPStrategy
        >>> DDPStrategy in lightning_classes("strategies", "DDPStrategy")
        True
    """
    packages = ["lightning.pytorch"] + ([STANDALONE] if sys.modules.get(STANDALONE) is not None else [])
    found = [importlib.import_module(f"{package}.{module}") for package in packages]
    return tuple(getattr(namespace, name) for namespace in found for name in names)


def refuse_cli_values_in_one_line(*classes: type) -> None:
    """Make LightningCLI report a value ``classes`` refuse in ``__init__`` as one line, as it does a wrong type.

    jsonargparse checks types while parsing, but values are only refused when it instantiates the
    callbacks: the error would surface inside a Union of every callback type, as three chained
    tracebacks. This registers a jsonargparse instantiator (for these classes only) that prints
    ``<script>: error: <Class>: <message>`` and exits with status 2, as an argparse error does. A
    no-op without jsonargparse or with a version that has no global instantiators.

    Example:
        >>> refuse_cli_values_in_one_line()  # registers nothing
    """
    if not classes or importlib.util.find_spec("jsonargparse") is None:
        return
    import jsonargparse

    if not hasattr(jsonargparse, "add_instantiator"):
        return
    for cls in classes:
        jsonargparse.add_instantiator(_instantiate_or_exit, cls, subclasses=True)


def _instantiate_or_exit(class_type: type, *args: Any, **kwargs: Any) -> Any:
    try:
        return class_type(*args, **kwargs)
    except (_LightningMisconfiguration, TypeError) as error:
        # Our argument checks name the argument, the value and what is allowed: that line is the report.
        print(f"{os.path.basename(sys.argv[0])}: error: {class_type.__name__}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
