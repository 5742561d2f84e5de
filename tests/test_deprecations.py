"""Every name of a module path that moved after 0.1.0 still imports there for one release, with a warning."""

import importlib
import re
import subprocess
import sys

import pytest
import torch

from lightning_rigl._moved import MOVED as ROOT_MOVED
from lightning_rigl.core._moved import MOVED
from lightning_rigl.core.topology.candidates import grow_candidates
from lightning_rigl.core.topology.drop_grow import select_drop_grow

OLD_NAMES = [
    (old, name, new) for table in (ROOT_MOVED, MOVED) for old, names in table.items() for name, new in names.items()
]


def resolve(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize(("old", "name", "new"), OLD_NAMES, ids=[f"{old}.{name}" for old, name, _ in OLD_NAMES])
def test_an_old_path_imports_the_same_object_with_a_warning_naming_the_new_one(old, name, new):
    module = importlib.import_module(old)
    told = "is deprecated" if ".dense_scores." in new else f"moved: use `{new}`"
    with pytest.warns(DeprecationWarning, match=re.escape(f"`{old}.{name}` {told}")):
        value = getattr(module, name)
    assert value is resolve(new)


def test_the_old_paths_are_the_public_modules_of_0_1_0():
    # The root modules that moved, and every module of the core's flat folder that is no longer there.
    roots = {"lightning_rigl.callback", "lightning_rigl.monitor", "lightning_rigl.inference", "lightning_rigl.report"}
    assert set(ROOT_MOVED) == roots
    assert len([old for old in MOVED if old.startswith("lightning_rigl.core.")]) == 28
    assert ROOT_MOVED["lightning_rigl.callback"]["RigLCallback"] == "lightning_rigl.adapters.callback.RigLCallback"


def test_from_import_of_an_old_module_warns_in_a_fresh_interpreter():
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "try:\n"
        "    from lightning_rigl.core.masks import LayerMasks\n"
        "except DeprecationWarning as warning:\n"
        "    print(warning)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "`lightning_rigl.core.masks.LayerMasks` moved: use `lightning_rigl.core.topology.masks.LayerMasks`" in (
        result.stdout
    )


def test_an_unknown_name_of_an_old_path_is_an_attribute_error():
    module = importlib.import_module("lightning_rigl.core.masks")
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        module.nothing_here  # noqa: B018


def test_the_deprecated_dense_score_update_is_the_candidate_path():
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(3000, generator=g) < 0.3
    weight, grad = torch.randn(3000, generator=g).round() * mask, torch.randn(3000, generator=g).round()
    with pytest.warns(DeprecationWarning):
        from lightning_rigl.core import drop_and_grow
    with pytest.warns(DeprecationWarning):
        from lightning_rigl.core.topology import drop_grow_indices
    k = int(int(mask.sum()) * 0.4)
    dropped, grown = drop_grow_indices(mask, weight, grad.abs(), 0.4, chunk_size=500)
    expected = select_drop_grow(mask, weight, grow_candidates(mask, k, lambda start, stop: grad[start:stop].abs()))
    assert (sorted(dropped.tolist()), sorted(grown.tolist())) == tuple(sorted(t.tolist()) for t in expected)
    new_mask, new = drop_and_grow(mask, weight, grad.abs(), 0.4)
    assert int(new_mask.sum()) == int(mask.sum()) and not (new & mask).any()
