"""Compact storage: masked Linear-type layers that hold only their active weights, and their RigL updates.

A compact layer (:func:`make_compact`) keeps one Parameter of its ``nnz`` active values, in ``W``'s CSR
order, and CSR index tensors; no dense weight, gradient or optimizer state exists for it. Its forward
and backward run on the sparse kernels, its dense gradient is read block by block at update steps
(:func:`compact_grow_candidates`), and an update rewrites its indices in place
(:func:`compact_drop_and_grow`), re-sorting the values and their per-element optimizer state.
"""

from lightning_rigl.core.storage.construct import densify, logical_coordinates, make_compact, restructure
from lightning_rigl.core.storage.draw import PERMUTATION_LIMIT, draw_positions
from lightning_rigl.core.storage.functional import Capture, compact_linear
from lightning_rigl.core.storage.init import ValueInit, default_init
from lightning_rigl.core.storage.layer import CompactLayer, compact_class, is_compact
from lightning_rigl.core.storage.state import compact_state_dict, dense_state_dict
from lightning_rigl.core.storage.structure import CompactStructure
from lightning_rigl.core.storage.update import ChunkedMask, ChunkHook, compact_drop_and_grow, compact_grow_candidates

__all__ = [
    "PERMUTATION_LIMIT",
    "Capture",
    "ChunkHook",
    "ChunkedMask",
    "CompactLayer",
    "CompactStructure",
    "ValueInit",
    "compact_class",
    "compact_drop_and_grow",
    "compact_grow_candidates",
    "compact_linear",
    "compact_state_dict",
    "default_init",
    "dense_state_dict",
    "densify",
    "draw_positions",
    "is_compact",
    "logical_coordinates",
    "make_compact",
    "restructure",
]
