"""Pure mask arithmetic: exact active counts, random initial masks, one drop-and-grow step.

The selections themselves (top-k under the tie rule, chunk by chunk) live in :mod:`lightning_rigl.core.candidates`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_rigl.core.candidates import DEFAULT_CHUNK, drop_grow_from_candidates, grow_candidates


def num_active(numel: int, sparsity: float) -> int:
    """Active weights of a layer of ``numel`` weights at ``sparsity``: ``numel - floor(sparsity * numel)``.

    Example:
        >>> num_active(1000, 0.9)
        100

    """
    return numel - math.floor(sparsity * numel)


def random_mask(shape: torch.Size | tuple[int, ...], n_active: int, generator: torch.Generator) -> Tensor:
    """A bool mask of ``shape`` with exactly ``n_active`` True entries drawn uniformly (on the CPU).

    Example:
        >>> int(random_mask((4, 5), 7, torch.Generator().manual_seed(0)).sum())
        7

    """
    numel = math.prod(shape)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=generator)[:n_active]] = True
    return mask.view(shape)


def active_in_mask(mask: Tensor, *, chunk_size: int = DEFAULT_CHUNK) -> int:
    """Active entries of a mask (float or bool), counted chunk by chunk: no layer-sized bool copy.

    Example:
        >>> active_in_mask(torch.tensor([0.0, 1, 1, 0, 1]), chunk_size=2)
        3

    """
    flat = mask.reshape(-1)
    return sum(int(flat[start : start + chunk_size].count_nonzero()) for start in range(0, flat.numel(), chunk_size))


def drop_grow_indices(
    mask: Tensor,
    weight: Tensor,
    grow_scores: Tensor,
    drop_fraction: float,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor]:
    """One RigL topology update of one layer from dense scores, as flat indices: ``(dropped, grown)``.

    Drops the ``k = int(n_active * drop_fraction)`` active weights of smallest magnitude, then grows
    the ``k`` positions of largest ``grow_scores`` among all positions not kept (so a weight dropped
    now may be regrown at once: its index is then in both). Among equal magnitudes or scores the lower
    flat index goes first. The active count is unchanged. The scores are reduced chunk by chunk to
    :class:`~lightning_rigl.core.candidates.GrowCandidates`, the same path as an update whose scores
    were never held whole; no temporary the size of the layer.

    Args:
        mask: The layer's mask, non-zero (or True) where active.
        weight: The layer's weights (same shape).
        grow_scores: Score of each position for growth (same shape, finite).
        drop_fraction: Fraction of active weights to replace, in [0, 1].
        chunk_size: Flat positions a chunk.

    Returns:
        Two int64 tensors of ``k`` flat indices each: the positions dropped and the positions grown.

    Example:
        >>> mask = torch.tensor([0, 1, 0, 1, 0, 1, 1, 0])
        >>> weight = torch.tensor([-9.0, 1, 4, -1, 5, 8, -2, 3])
        >>> grad = torch.tensor([0.1, 5, 0.3, 0.2, 0.9, 0.05, 0.4, 0.6])
        >>> dropped, grown = drop_grow_indices(mask, weight, grad.abs(), 0.5)
        >>> sorted(dropped.tolist()), sorted(grown.tolist())
        ([1, 3], [1, 4])

    """
    k = int(active_in_mask(mask, chunk_size=chunk_size) * drop_fraction)
    flat_scores = grow_scores.detach().reshape(-1)
    candidates = grow_candidates(mask, k, lambda start, stop: flat_scores[start:stop], chunk_size=chunk_size)
    return drop_grow_from_candidates(mask, weight, candidates, chunk_size=chunk_size)


def drop_and_grow(mask: Tensor, weight: Tensor, grow_scores: Tensor, drop_fraction: float) -> tuple[Tensor, Tensor]:
    """One RigL topology update of one layer, as masks (see :func:`drop_grow_indices`).

    Returns:
        ``(new_mask, grown)``: the new bool mask, and the bool positions that are active now and were
        not before (they get the grow init and fresh optimizer state).

    Example:
        >>> mask = torch.tensor([0, 1, 0, 1, 0, 1, 1, 0], dtype=torch.bool)
        >>> weight = torch.tensor([-9.0, 1, 4, -1, 5, 8, -2, 3])
        >>> grad = torch.tensor([0.1, 5, 0.3, 0.2, 0.9, 0.05, 0.4, 0.6])
        >>> new_mask, grown = drop_and_grow(mask, weight, grad.abs(), 0.5)
        >>> new_mask.int().tolist(), grown.nonzero().flatten().tolist()
        ([0, 1, 0, 0, 1, 1, 1, 0], [4])

    """
    dropped, grown_at = drop_grow_indices(mask, weight, grow_scores, drop_fraction)
    old = mask.reshape(-1).bool()
    new_mask = old.clone()
    new_mask[dropped] = False
    new_mask[grown_at] = True
    grown = torch.zeros_like(old)
    grown[grown_at[~old[grown_at]]] = True  # regrown positions were active before: not new
    return new_mask.view(mask.shape), grown.view(mask.shape)
