"""A run's saved state: what :class:`~lightning_rigl.core.SparseTraining` writes, and how it restores it.

Weights stored densely save their masks at 1 bit a weight; compact layers save no mask (their structure
travels with the model's ``state_dict``), only their ever-active positions under ``"compact"``. A dense
run's state (masks for every layer) restores into a run with compact layers: they take its masks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_rigl.core.state.packing import unpack_bits
from lightning_rigl.core.state.saved_state import STATE_VERSION, check_same_run, check_saved_shapes, migrate_state
from lightning_rigl.core.storage.construct import restructure


def run_state_dict(run: Any) -> dict[str, Any]:
    """A :class:`~lightning_rigl.core.SparseTraining`'s state: tensors and Python primitives only."""
    state = {
        "version": STATE_VERSION,
        "method": run.method.name,
        "shapes": {name: list(shape) for name, shape in run.shapes().items()},
        "sparsities": dict(run.sparsities),
        **run.layer_masks.packed(),
        "generator": run.generator.get_state(),
        **run.scheduled.state_dict(),
    }
    if run.compact:
        state["compact"] = run.compact.state_dict()
    if run.layer_kernels.state() is not None:
        state["kernels"] = run.layer_kernels.state()
    return state


def load_run_state(run: Any, state: Mapping[str, Any]) -> None:
    """Restore :func:`run_state_dict`'s output, of any saved version (migrated first), into ``run``.

    Raises:
        ValueError: Names or shapes that differ from the run's masked weights, another method or other
            per-layer sparsities, a state version this release cannot read, or a compact layer's state for a
            weight this run stores densely.
    """
    state = migrate_state(state)
    check_saved_shapes(state["shapes"], run.shapes())
    check_same_run(state, run.method.name, run.sparsities)
    saved_compact = state.get("compact", {})
    stored_dense = [name for name in run.params if name in saved_compact]
    if stored_dense:
        raise ValueError(
            f"The checkpoint stores {stored_dense} compact (RigLCallback(storage='compact')) and this run densely: "
            "resume with storage='compact', or convert the checkpoint with `lightning_rigl.to_dense_checkpoint`."
        )
    run.layer_masks.load_packed(state["masks"], state["ever_active"])
    for name in run.compact:
        layer = run.compact.layers[name]
        loaded = layer.__dict__.pop("loaded_dense", None)  # a weak reference to the dense weight loaded, if any
        loaded_dense = loaded() if loaded is not None else None
        if name in saved_compact:  # the structure came back with the model's weights
            run.compact.load_layer(name, saved_compact[name])
            continue
        # A dense run's state: its mask becomes the layer's structure, its values the loaded dense weight's.
        shape = run.compact.shape(name)
        restructure(layer, unpack_bits(state["masks"][name], shape), loaded_dense)
        run.compact.ever_active_from_mask(name, unpack_bits(state["ever_active"][name], shape))
    run.masks_replaced()
    run.sparsities = {name: float(state["sparsities"][name]) for name in run.sparsities}
    run.generator.set_state(state["generator"])
    run.scheduled.load_state_dict(state)
    # Absent from checkpoints of earlier releases; under another setting, chosen anew after the first step.
    run.layer_kernels.load_state(state.get("kernels"))
