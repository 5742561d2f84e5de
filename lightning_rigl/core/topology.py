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


def top_k_indices(values: Tensor, k: int, *, largest: bool = True) -> Tensor:
    """Indices of the ``k`` largest (or smallest) entries of a flat tensor, in no particular order.

    The same selection as ``torch.topk(values, k, largest=largest).indices`` (up to the order of tied
    values at the boundary), but faster on large tensors with a small ``k``: a strided sample gives
    a threshold that at least ``k`` entries pass, and only those go through ``torch.topk``. If the
    threshold admits fewer than ``k`` entries, it falls back to a plain ``torch.topk``. Deterministic.

    Example:
        >>> sorted(top_k_indices(torch.tensor([0.5, 3.0, -1.0, 2.0]), 2).tolist())
        [1, 3]
    """
    numel = values.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=values.device)
    stride = 128
    if numel < 2**16 or k * 8 > numel:
        return torch.topk(values, k, largest=largest, sorted=False).indices
    sample = values[::stride]
    # About k / stride sampled entries lie beyond the true k-th value; keep 1.5 times that plus
    # slack, so that the threshold rarely admits fewer than k (then the plain top-k runs).
    margin = min(sample.numel(), 3 * (k // stride) // 2 + 32)
    bound = torch.topk(sample, margin, largest=largest, sorted=False).values
    passing = (values >= bound.min()) if largest else (values <= bound.max())
    candidates = passing.nonzero().flatten()
    if candidates.numel() < k:
        return torch.topk(values, k, largest=largest, sorted=False).indices
    return candidates[torch.topk(values[candidates], k, largest=largest, sorted=False).indices]


def drop_grow_indices(
    mask: Tensor, weight: Tensor, grow_scores: Tensor, drop_fraction: float, *, overwrite_scores: bool = False
) -> tuple[Tensor, Tensor]:
    """One RigL topology update of one layer, as flat indices: ``(dropped, grown)``.

    Drops the ``k = int(n_active * drop_fraction)`` active weights of smallest magnitude, then grows
    the ``k`` positions of largest ``grow_scores`` among all positions not kept (so a weight dropped
    now may be regrown at once: its index is then in both). The active count is unchanged. Two
    top-k selections, no sort; the caller applies the ``2 k`` indices without a pass over the layer.

    Args:
        mask: The layer's mask, non-zero (or True) where active.
        weight: The layer's weights (same shape).
        grow_scores: Score of each position for growth (same shape, finite).
        drop_fraction: Fraction of active weights to replace, in [0, 1].
        overwrite_scores: Let the function write into ``grow_scores`` (a float32 tensor the caller
            owns) instead of allocating a copy: one layer-sized buffer less at an update.

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
    flat_mask = mask.reshape(-1)
    active_at = (flat_mask if flat_mask.dtype == torch.bool else flat_mask != 0).nonzero().flatten()
    k = int(active_at.numel() * drop_fraction)
    if k == 0:
        empty = torch.empty(0, dtype=torch.long, device=mask.device)
        return empty, empty
    # Drop among the active weights only (an active weight at exactly 0 goes first): a buffer and a
    # top-k of n_active entries, not of the whole layer.
    order = top_k_indices(weight.detach().reshape(-1)[active_at].abs(), k, largest=False)
    dropped = active_at[order]
    kept = torch.ones(active_at.numel(), dtype=torch.bool, device=mask.device)
    kept[order] = False
    kept_at = active_at[kept]
    del active_at, kept  # freed before the grow step
    # Kept positions get -inf (not 0): a score of 0 could still beat a negative or zero score. Filled
    # by index: n_active - k positions, no pass over the layer.
    candidates = grow_scores.detach().reshape(-1)
    if not (overwrite_scores and candidates.dtype == torch.float32):
        candidates = candidates.to(torch.float32, copy=True)
    candidates.index_fill_(0, kept_at, -math.inf)
    return dropped, top_k_indices(candidates, k)


def drop_and_grow(
    mask: Tensor, weight: Tensor, grow_scores: Tensor, drop_fraction: float, *, overwrite_scores: bool = False
) -> tuple[Tensor, Tensor]:
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
    dropped, grown_at = drop_grow_indices(mask, weight, grow_scores, drop_fraction, overwrite_scores=overwrite_scores)
    old = mask.reshape(-1).bool()
    new_mask = old.clone()
    new_mask[dropped] = False
    new_mask[grown_at] = True
    grown = torch.zeros_like(old)
    grown[grown_at[~old[grown_at]]] = True  # regrown positions were active before: not new
    return new_mask.view(mask.shape), grown.view(mask.shape)
