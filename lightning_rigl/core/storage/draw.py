"""Drawing a layer's initial active positions as positions: no mask, and above a size, no layer-sized permutation.

:func:`~lightning_rigl.core.topology.random_mask` draws a mask from ``torch.randperm`` of the whole
layer (8 bytes a weight, for a moment). Up to :data:`PERMUTATION_LIMIT` weights :func:`draw_positions`
takes the same permutation, so both storages draw the same masks (and the recorded digests of runs
stay). Above it, it draws distinct positions by rejection, in memory of the active count: the
procedure that both storages are meant to share there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_rigl.core.topology.initial_masks import permutation

#: Weights up to which positions come from ``torch.randperm``, as :func:`~lightning_rigl.core.topology.random_mask`.
PERMUTATION_LIMIT = 2**27
#: Draws at a time above it: their temporaries (about 40 bytes a draw) stay near 10 MB.
_BATCH = 2**18


def draw_positions(
    numel: int, n_active: int, generator: torch.Generator, *, permutation_limit: int = PERMUTATION_LIMIT
) -> Tensor:
    """``n_active`` distinct flat positions of ``numel``, uniformly drawn (on the CPU), ascending, int64.

    Up to ``permutation_limit`` weights, the positions of ``random_mask(shape, n_active, generator)``
    exactly (the same draws from ``generator``). Above, the first ``n_active`` distinct values of a stream
    of uniform draws (a uniform subset): memory in proportion to ``n_active``, never to ``numel``.

    Args:
        numel: The layer's number of weights.
        n_active: How many to draw, in [0, numel].
        generator: The run's CPU generator.
        permutation_limit: The largest ``numel`` drawn by a permutation (see :data:`PERMUTATION_LIMIT`).

    Raises:
        ValueError: ``n_active`` outside [0, numel].

    Example:
        >>> from lightning_rigl.core.topology.initial_masks import random_mask
        >>> drawn = draw_positions(20, 7, torch.Generator().manual_seed(0))
        >>> mask = random_mask((4, 5), 7, torch.Generator().manual_seed(0))
        >>> torch.equal(drawn, mask.reshape(-1).nonzero().flatten())
        True
    """
    if not 0 <= n_active <= numel:
        raise ValueError(f"`n_active` must be in [0, numel={numel}], got {n_active}.")
    if numel <= permutation_limit:
        return torch.sort(permutation(numel, generator)[:n_active]).values.long()
    return _distinct_draws(numel, n_active, generator)


def _distinct_draws(numel: int, n_active: int, generator: torch.Generator) -> Tensor:
    """The first ``n_active`` distinct values of i.i.d. uniform draws in [0, numel), ascending."""
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < n_active:
        need = n_active - chosen.numel()
        # Repeats are rare while the chosen set is a small share of the layer: a few extra draws cover them.
        share = chosen.numel() / numel
        batch = min(int(need / max(1.0 - share, 1e-3) * 1.05) + 64, _BATCH)
        draws = torch.randint(numel, (batch,), generator=generator)
        fresh = torch.sort(_first_new(draws, chosen)[:need]).values
        del draws
        chosen = _merge(chosen, fresh)
    return chosen


def _merge(ascending: Tensor, other: Tensor) -> Tensor:
    """Two ascending tensors of distinct values merged into one, ascending: no sort of the whole."""
    place = torch.searchsorted(ascending, other).add_(torch.arange(other.numel()))
    merged = torch.empty(ascending.numel() + other.numel(), dtype=ascending.dtype)
    taken = torch.zeros(merged.numel(), dtype=torch.bool)
    taken[place] = True
    merged[place] = other
    merged[~taken] = ascending
    return merged


def _first_new(draws: Tensor, chosen: Tensor) -> Tensor:
    """The values of ``draws`` not in ``chosen`` (sorted), each once, in the order of their first draw."""
    unique, inverse = torch.unique(draws, sorted=True, return_inverse=True)
    first = torch.full((unique.numel(),), draws.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(draws.numel()), reduce="amin")
    if chosen.numel():
        at = torch.searchsorted(chosen, unique).clamp_(max=chosen.numel() - 1)
        new = chosen.index_select(0, at) != unique
        unique, first = unique[new], first[new]
    return unique.index_select(0, torch.argsort(first))
