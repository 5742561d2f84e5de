"""The module paths of release 0.1.0 that moved, served for one more release with a DeprecationWarning.

:func:`register` puts each old path in ``sys.modules`` as a module whose attributes are looked up, when
first read, in the modules that hold them now; ``lightning_rigl`` calls it at import. Three old modules
became packages of the same name (``core.flops``, ``core.kernels``, ``core.topology``): each of those
serves the old names through :func:`old_names` as its module ``__getattr__``. The core's table is
:data:`~lightning_rigl.core._moved.table.MOVED`; the root modules that moved have theirs in
``lightning_rigl._moved``. The package's own code never reads an old path; this folder goes with them.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from lightning_rigl.core._moved.table import _CORE, MOVED

#: Old paths that are packages now (the core itself: its deprecated `drop_and_grow`); they serve the old names
#: themselves, with :func:`old_names` as their module `__getattr__`.
SAME_PATH = (_CORE, f"{_CORE}.flops", f"{_CORE}.kernels", f"{_CORE}.topology")

#: How to replace the functions kept in `dense_scores`, for the warning.
_INSTEAD = {
    f"{_CORE}._moved.dense_scores.drop_and_grow": f"{_CORE}.topology.candidates.grow_candidates, then "
    f"{_CORE}.topology.drop_grow.select_drop_grow",
    f"{_CORE}._moved.dense_scores.drop_grow_indices": f"{_CORE}.topology.candidates.grow_candidates, then "
    f"{_CORE}.topology.drop_grow.select_drop_grow",
    f"{_CORE}._moved.dense_scores.active_in_mask": "int(mask.count_nonzero())",
}


def old_names(old: str, moved: Mapping[str, Mapping[str, str]] = MOVED) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving the names module ``old`` had (in ``moved``), from where they live now.

    Example:
        >>> import pytest
        >>> serve = old_names("lightning_rigl.core.masks")
        >>> with pytest.warns(DeprecationWarning, match="lightning_rigl.core.topology.masks.LayerMasks"):
        ...     serve("LayerMasks").__name__
        'LayerMasks'
    """

    def __getattr__(name: str) -> Any:
        new = moved.get(old, {}).get(name)
        if new is None:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        where, _, new_name = new.rpartition(".")
        value = getattr(importlib.import_module(where), new_name)
        instead = _INSTEAD.get(new)
        warnings.warn(
            f"`{old}.{name}` moved: use `{new}`. The old path works in this release only."
            if instead is None
            else f"`{old}.{name}` is deprecated and goes in the next release: use {instead}.",
            DeprecationWarning,
            stacklevel=2,
        )
        return value

    return __getattr__


def register(moved: Mapping[str, Mapping[str, str]] = MOVED) -> None:
    """Serve each old module path of ``moved`` that is no package now from ``sys.modules``."""
    for old in moved:
        if old in SAME_PATH or old in sys.modules:
            continue
        module = types.ModuleType(
            old, "Moved after lightning-rigl 0.1.0: see the MOVED tables of lightning_rigl._moved and core._moved."
        )
        module.__getattr__ = old_names(old, moved)  # type: ignore[method-assign]
        sys.modules[old] = module
        parent_name, _, child = old.rpartition(".")
        if parent_name in sys.modules:
            setattr(sys.modules[parent_name], child, module)
