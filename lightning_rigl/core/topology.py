"""Pure mask arithmetic: exact active counts, random initial masks, one drop-and-grow step."""

from __future__ import annotations

import math

import torch
from torch import Tensor


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


def drop_and_grow(
    mask: Tensor, weight: Tensor, grow_scores: Tensor, drop_fraction: float, *, overwrite_scores: bool = False
) -> tuple[Tensor, Tensor]:
    """One RigL topology update of one layer.

    Drops the ``k = int(n_active * drop_fraction)`` active weights of smallest magnitude, then grows
    the ``k`` positions of largest ``grow_scores`` among all positions not kept (so a weight dropped
    now may be regrown at once). The active count is unchanged. Uses two top-k of size ``k``, no sort.

    Args:
        mask: Bool mask, True where active.
        weight: The layer's weights (same shape).
        grow_scores: Score of each position for growth (same shape, finite).
        drop_fraction: Fraction of active weights to replace, in [0, 1].
        overwrite_scores: Let the function write into ``grow_scores`` (a float32 tensor the caller
            owns) instead of allocating a copy: one layer-sized buffer less at an update.

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
    flat_mask = mask.reshape(-1)
    n_active = int(flat_mask.count_nonzero())
    k = int(n_active * drop_fraction)
    if k == 0:
        return mask.clone(), torch.zeros_like(mask)
    # Inactive positions get +inf so that they never win against an active weight, even one at 0.
    magnitude = weight.detach().reshape(-1).abs().masked_fill_(~flat_mask, math.inf)
    kept = flat_mask.clone()
    kept[torch.topk(magnitude, k, largest=False, sorted=False).indices] = False
    del magnitude  # freed before the grow buffer is needed
    # Kept positions get -inf (not 0): a score of 0 could still beat a negative or zero score.
    candidates = grow_scores.detach().reshape(-1)
    if overwrite_scores and candidates.dtype == torch.float32:
        candidates = candidates.masked_fill_(kept, -math.inf)
    else:
        candidates = candidates.to(torch.float32).masked_fill(kept, -math.inf)
    new_mask = kept
    new_mask[torch.topk(candidates, k, sorted=False).indices] = True
    grown = new_mask & ~flat_mask
    return new_mask.view_as(mask), grown.view_as(mask)
