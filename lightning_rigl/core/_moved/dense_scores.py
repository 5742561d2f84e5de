"""The dense-score drop and grow of release 0.1.0, kept for one release: nothing in the package uses them."""

from __future__ import annotations

import torch
from torch import Tensor


def active_in_mask(mask: Tensor, *, chunk_size: int = 2**18) -> int:
    """Deprecated: active entries of a mask (float or bool), counted chunk by chunk."""
    flat = mask.reshape(-1)
    return sum(int(flat[start : start + chunk_size].count_nonzero()) for start in range(0, flat.numel(), chunk_size))


def drop_grow_indices(
    mask: Tensor, weight: Tensor, grow_scores: Tensor, drop_fraction: float, *, chunk_size: int = 2**18
) -> tuple[Tensor, Tensor]:
    """Deprecated: one layer's ``(dropped, grown)`` flat indices from dense grow scores.

    Use :func:`~lightning_rigl.core.topology.candidates.grow_candidates` on the scores, then
    :func:`~lightning_rigl.core.topology.drop_grow.select_drop_grow`, as this does.
    """
    # Imported here: the topology package imports `_moved` (for its old names) when it loads.
    from lightning_rigl.core.topology.candidates import grow_candidates
    from lightning_rigl.core.topology.drop_grow import select_drop_grow

    k = int(active_in_mask(mask, chunk_size=chunk_size) * drop_fraction)
    flat_scores = grow_scores.detach().reshape(-1)
    candidates = grow_candidates(mask, k, lambda start, stop: flat_scores[start:stop], chunk_size=chunk_size)
    return select_drop_grow(mask, weight, candidates, chunk_size=chunk_size)


def drop_and_grow(mask: Tensor, weight: Tensor, grow_scores: Tensor, drop_fraction: float) -> tuple[Tensor, Tensor]:
    """Deprecated: one layer's ``(new_mask, grown)`` bool masks from dense grow scores (see ``drop_grow_indices``)."""
    dropped, grown_at = drop_grow_indices(mask, weight, grow_scores, drop_fraction)
    old = mask.reshape(-1).bool()
    new_mask = old.clone()
    new_mask[dropped] = False
    new_mask[grown_at] = True
    grown = torch.zeros_like(old)
    grown[grown_at[~old[grown_at]]] = True  # regrown positions were active before: not new
    return new_mask.view(mask.shape), grown.view(mask.shape)
