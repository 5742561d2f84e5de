"""The drop and the grow of one layer's topology update, from its grow candidates: which positions change.

After the optimizer step the ``k`` active weights of smallest magnitude are dropped, then the ``k``
best of the grow candidates (read before the step, see :mod:`~lightning_rigl.core.topology.candidates`)
and the dropped positions are grown. Both selections read the layer chunk by chunk, under the tie rule
of :mod:`~lightning_rigl.core.topology.top_k`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_rigl.core.topology.candidates import DEFAULT_CHUNK, GrowCandidates
from lightning_rigl.core.topology.running_top_k import RunningTopK
from lightning_rigl.core.topology.sampling import active_flags, flat_index, one_pass, sampled_hint
from lightning_rigl.core.topology.top_k import index_dtype, top_k_indices


def smallest_active(mask: Tensor, weight: Tensor, k: int, *, chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """Flat indices (ascending) of the ``k`` active weights of smallest magnitude; ties to the lower index.

    An active weight at exactly 0 is a candidate like any other; an inactive position never is.

    Example:
        >>> mask = torch.tensor([0, 1, 0, 1, 0, 1, 1, 0])
        >>> smallest_active(mask, torch.tensor([-9.0, 1, 4, -1, 5, 8, -2, 3]), 2).tolist()
        [1, 3]

    """
    flat_mask, flat_weight = mask.reshape(-1), weight.detach().reshape(-1)
    numel, dtype = flat_mask.numel(), index_dtype(flat_mask.numel())

    def magnitudes(start: int, stop: int) -> Tensor:
        return flat_weight[start:stop].abs()

    magnitudes.at = lambda index: flat_weight.index_select(0, index).abs()  # type: ignore[attr-defined]

    def active_magnitudes(start: int, stop: int) -> Tensor:
        # |w| / mask: |w| where active, inf or NaN where inactive, which no hint reaches. One division
        # instead of a bool mask and its `and`, which take 2-3x as long on CPU.
        return flat_weight[start:stop].abs().div_(flat_mask[start:stop])

    hint = sampled_hint(flat_mask, magnitudes, k, largest=False, active=True)
    if hint is not None:
        found = one_pass(flat_mask, active_magnitudes, k, hint, largest=False, chunk_size=chunk_size, only_active=True)
        if found is not None and found[2].numel() >= k:  # kept in index order: ties go to the lower
            return found[3].index_select(0, top_k_indices(found[2], k, largest=False))
        if found is not None:  # fewer than k active entries reached the hint: the exact pass, without it
            hint = found = None
    for bound in (hint, None):  # without a hint the first pass cannot miss
        stream = RunningTopK(k, largest=False, hint=bound)
        for start in range(0, numel if k > 0 else 0, chunk_size):
            stop = min(start + chunk_size, numel)
            magnitude, active = magnitudes(start, stop), active_flags(flat_mask[start:stop])
            better = stream.beats_bound(magnitude)
            # Once a bound (or a hint) is set, few active weights of a chunk beat it: list only those.
            at = (active if better is None else better.logical_and_(active)).nonzero().flatten()
            stream.push(magnitude[at], flat_index(at, start, dtype))
        if not stream.missed_hint():
            break
    return stream.result()[1] if k > 0 else torch.empty(0, dtype=dtype, device=mask.device)


def select_drop_grow(
    mask: Tensor, weight: Tensor, candidates: GrowCandidates, *, chunk_size: int = DEFAULT_CHUNK
) -> tuple[Tensor, Tensor]:
    """Which positions one RigL update of one layer drops and grows: ``(dropped, grown)`` flat indices.

    Drops the ``candidates.k`` active weights of smallest ``|weight|``, then grows the ``k`` positions
    of largest score among the inactive candidates and the dropped positions (a dropped weight may be
    regrown at once: its index is then in both). Same selection as on the dense scores.

    Args:
        mask: The layer's mask, unchanged since the candidates were reduced.
        weight: The layer's weights now (after the optimizer step).
        candidates: From :func:`~lightning_rigl.core.topology.candidates.grow_candidates` on this mask.
        chunk_size: Flat positions a chunk, for the drop.

    Returns:
        Two int64 tensors of ``k`` flat indices each: dropped (ascending), grown (deterministic order).

    Example:
        >>> from lightning_rigl.core.topology.candidates import grow_candidates
        >>> mask = torch.tensor([0, 1, 0, 1, 0, 1, 1, 0])
        >>> grad = torch.tensor([0.1, 5, 0.3, 0.2, 0.9, 0.05, 0.4, 0.6])
        >>> found = grow_candidates(mask, 2, lambda start, stop: grad[start:stop].abs())
        >>> dropped, grown = select_drop_grow(mask, torch.tensor([-9.0, 1, 4, -1, 5, 8, -2, 3]), found)
        >>> dropped.tolist(), sorted(grown.tolist())
        ([1, 3], [1, 4])

    """
    dropped = smallest_active(mask, weight, candidates.k, chunk_size=chunk_size)
    return dropped.long(), grow_from_candidates(candidates, dropped).long()


def grow_from_candidates(candidates: GrowCandidates, dropped: Tensor) -> Tensor:
    """The ``k`` grown flat positions, among the inactive candidates and the ``dropped`` ones with a saved score.

    Every storage grows through this one selection, so they grow alike. A dropped position whose score was
    not saved loses to the ``k`` inactive candidates.

    Args:
        candidates: The layer's grow candidates, read before its drop.
        dropped: The flat positions just dropped.

    Returns:
        ``candidates.k`` flat positions, in a deterministic order (ties to the lower index).

    Example:
        >>> from lightning_rigl.core.topology.candidates import grow_candidates
        >>> found = grow_candidates(torch.tensor([0, 1, 0, 1]), 1, lambda a, b: torch.tensor([1.0, 9, 2, 0])[a:b])
        >>> grow_from_candidates(found, torch.tensor([1])).tolist()  # the dropped one had the best score
        [1]
    """
    saved = candidates.active_index
    if saved.numel():
        at = torch.searchsorted(saved, dropped.to(saved.dtype)).clamp_(max=saved.numel() - 1)
        found = saved.index_select(0, at) == dropped
    else:  # no active position kept a score: none of the dropped is found (`at`, unread, sized alike)
        at, found = torch.zeros_like(dropped, dtype=torch.long), torch.zeros_like(dropped, dtype=torch.bool)
    values = torch.cat([candidates.values, candidates.active_values.index_select(0, at.masked_select(found))])
    index = torch.cat([candidates.index, dropped.masked_select(found)])
    return index.index_select(0, top_k_indices(values, candidates.k, index=index))
