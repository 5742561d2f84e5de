"""The saved RigL state: its versions, the migrations that bring an older one up to date, and its checks.

Functions of dicts only: :meth:`~lightning_rigl.core.SparseTraining.state_dict` writes the state and
:meth:`~lightning_rigl.core.SparseTraining.load_state_dict` (the one way to restore) migrates and checks it
here. Every checkpoint a release wrote must still resume: a change to what ``state_dict`` saves raises
:data:`STATE_VERSION` and adds a step to :func:`migrate_state`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The version :meth:`~lightning_rigl.core.SparseTraining.state_dict` writes.
STATE_VERSION = 2


def migrate_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """Bring a saved state of any known version to :data:`STATE_VERSION`.

    Version 1 (release 0.1.0) kept SNFS's moving average under ``"ema"``, pending updates under
    ``"pending"`` and no grow candidates (it could not be saved between a step and its update).

    Raises:
        ValueError: A state without a version, or of a version newer than this release reads.

    Example:
        >>> state = migrate_state({"version": 1, "ema": {}, "pending": {}})
        >>> state["version"], sorted(state)
        (2, ['due_updates', 'grow_candidates', 'signal', 'version'])
    """
    version = state.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"The saved RigL state has no valid version (got {version!r}): it was not written by RigL.")
    if version > STATE_VERSION:
        raise ValueError(
            f"The saved RigL state has version {version}, written by a newer lightning-rigl; this release reads "
            f"versions 1 to {STATE_VERSION}. Upgrade lightning-rigl to resume from it."
        )
    state = dict(state)
    if version == 1:
        state["signal"] = state.pop("ema")
        state["due_updates"] = state.pop("pending")
        state["grow_candidates"] = {}
        state["version"] = 2
    return state


def check_saved_shapes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raise a ValueError naming every masked parameter that is missing, extra or reshaped in a saved state.

    Args:
        saved: Parameter name to shape, as the checkpoint holds them.
        current: Parameter name to shape, as this run masks them.

    Example:
        >>> check_saved_shapes({"fc.weight": [4, 2]}, {"fc.weight": (4, 2)})  # they match: no error
    """
    saved = {name: tuple(shape) for name, shape in saved.items()}
    current = {name: tuple(shape) for name, shape in current.items()}
    if saved == current:
        return
    missing, extra = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    reshaped = sorted(
        f"{name}: saved {saved[name]} vs model {current[name]}"
        for name in set(saved) & set(current)
        if saved[name] != current[name]
    )
    hint = ""
    if missing or extra:
        # A release that selects other weights by default masks other names: naming the saved ones restores them.
        include = "[" + ", ".join(repr(_literal_pattern(name)) for name in saved) + "]"
        hint = (
            " If the model is the same and the default selection changed (a newer lightning-rigl), resume with "
            f"the weights the checkpoint masks: RigLCallback(include={include}, ...)."
        )
    raise ValueError(
        "The saved RigL state does not match the masked parameters: "
        f"not in the checkpoint {missing}, not in the model {extra}, different shapes {reshaped}.{hint}"
    )


def _literal_pattern(name: str) -> str:
    """An fnmatch pattern that matches ``name`` only: its wildcard characters bracketed.

    Example:
        >>> _literal_pattern("heads[0]?.weight")
        'heads[[]0][?].weight'
    """
    return "".join(f"[{char}]" if char in "*?[" else char for char in name)


def check_same_run(state: Mapping[str, Any], method: str, sparsities: Mapping[str, float]) -> None:
    """Raise a ValueError naming each difference between a saved run and the one the arguments resolve to.

    What a run trains is its method and its per-layer sparsities (``sparsity``, ``distribution``,
    ``custom_sparsity``, ``dense_first_layer`` and ``erk_power_scale`` all resolve to them): a resumed run
    must train the same, or it would silently go on at the saved values.

    Example:
        >>> check_same_run({"method": "rigl", "sparsities": {"w": 0.9}}, "rigl", {"w": 0.9})  # the same: no error
    """
    differences = []
    if state["method"] != method:
        differences.append(f"method: saved {state['method']!r}, given {method!r}")
    saved = state["sparsities"]
    for name, given in sparsities.items():
        if name in saved and abs(float(saved[name]) - float(given)) > 1e-12:
            differences.append(f"sparsity of {name}: saved {float(saved[name]):.6g}, given {float(given):.6g}")
    if differences:
        raise ValueError(
            "The checkpoint's RigL run differs from the one RigLCallback's arguments describe: "
            + "; ".join(differences)
            + ". Resume with the arguments the checkpoint was trained with (sparsity, distribution, method, "
            "custom_sparsity, dense_first_layer, erk_power_scale), or start a new run without `ckpt_path`."
        )
