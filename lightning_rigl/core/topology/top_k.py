"""Exact top-k under one tie rule: among exactly equal values the lower flat index is selected first.

``torch.topk`` breaks ties in no promised order; topology updates need one rule, the same on every
rank and device, for the drop and the grow alike. Values must be finite.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Entries from which a selection goes through a band of values (:func:`_banded_top_k_mask`), and its sample.
_BAND_MIN = 3 * 2**13  # below it, torch.topk is about as fast (measured 16 K to 93 K entries)
_BAND_SAMPLE = 4096
#: Entries from which :func:`where_true` reads words of bools first (below, one ``nonzero`` is as fast).
_WORDS_MIN = 2**14


def index_dtype(numel: int) -> torch.dtype:
    """The dtype of flat indices into a layer of ``numel`` weights: int32 where they fit.

    Example:
        >>> index_dtype(10**9), index_dtype(2**31)
        (torch.int32, torch.int64)

    """
    return torch.int32 if numel <= 2**31 - 1 else torch.int64


def top_k_indices(values: Tensor, k: int, *, largest: bool = True, index: Tensor | None = None) -> Tensor:
    """Positions of the ``k`` largest (or smallest) entries of a flat tensor; ties go to the lower index.

    Exact and deterministic, unlike ``torch.topk`` at ties: the ``k``-th best value is the threshold,
    every entry strictly better is taken, then the tied entries of lowest index fill up to ``k``.
    When ``k`` is small against the tensor, a strided sample first bounds the threshold, so only
    about ``1.5 k`` entries go through ``torch.topk``.

    Args:
        values: A flat tensor of finite values.
        k: How many to select; all of them if ``k >= values.numel()``.
        largest: Select the largest values (else the smallest).
        index: The flat index of each entry, for the tie rule (any order, distinct); None when the
            position is the index.

    Returns:
        int64 positions into ``values``, ascending.

    Example:
        >>> top_k_indices(torch.tensor([2.0, 5.0, 2.0, -7.0, 2.0]), 3).tolist()
        [0, 1, 2]
        >>> top_k_indices(torch.tensor([2.0, 5.0, 2.0]), 2, index=torch.tensor([9, 4, 1])).tolist()
        [1, 2]

    """
    numel = values.numel()
    if k >= numel:
        return torch.arange(numel, device=values.device)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=values.device)
    if numel >= 2**16 and k * 8 <= numel:
        bound = sample_bound(values[::128], k, numel, largest, slack=1.5)
        within = reaches(values, bound, largest).nonzero().flatten()
        # Every entry outside is worse than the bound, which at least k entries match or beat.
        if k <= within.numel() < numel:
            within_index = None if index is None else index.index_select(0, within)
            chosen = top_k_mask(values.index_select(0, within), k, largest, within_index)
            return within.index_select(0, chosen.nonzero().flatten())
    return top_k_mask(values, k, largest, index).nonzero().flatten()


def where_true(flags: Tensor) -> Tensor:
    """The positions of a flat bool tensor's True entries, as ``flags.nonzero().flatten()``; fast where few are.

    On CPU, ``nonzero`` reads about 1 ns an entry here, however few are True. Read as 8-byte words,
    the bools list first the words that hold any True (an eighth of the entries), then the entries of
    those words only: 1.5-4x faster at 0.1 % True, slower from a few %. Where more than an eighth of
    the words hold one, the plain ``nonzero`` follows (the first listing wasted).

    Example:
        >>> flags = torch.zeros(40_000, dtype=torch.bool)
        >>> flags[[3, 17, 39_999]] = True
        >>> where_true(flags).tolist()
        [3, 17, 39999]
    """
    numel = flags.numel()
    if numel < _WORDS_MIN or flags.device.type != "cpu" or not flags.is_contiguous() or flags.data_ptr() % 8:
        return flags.nonzero().flatten()
    whole = numel - numel % 8
    words = flags[:whole].view(torch.int64)
    hit = words.nonzero().flatten()
    if 8 * hit.numel() > words.numel():
        return flags.nonzero().flatten()
    within = words.index_select(0, hit).view(torch.bool).nonzero().flatten()  # word i's bools: 8 i to 8 i + 7
    found = hit.index_select(0, within >> 3).mul_(8).add_(within & 7)
    if whole < numel:
        found = torch.cat([found, flags[whole:].nonzero().flatten().add_(whole)])
    return found


def reaches(values: Tensor, bound: Tensor, largest: bool) -> Tensor:
    """Which ``values`` match or beat ``bound``: are at least it (``largest``) or at most it.

    Example:
        >>> reaches(torch.tensor([1.0, 2.0, 3.0]), torch.tensor(2.0), largest=True).tolist()
        [False, True, True]
    """
    return values >= bound if largest else values <= bound


def sample_bound(sample: Tensor, k: int, numel: int, largest: bool, *, slack: float) -> Tensor:
    """A value that about ``slack * k`` of ``numel`` entries match or beat, read from a sample of them."""
    # About k * sample / numel sampled entries lie beyond the true k-th value: times the slack, plus a few.
    rank = min(sample.numel(), math.ceil(slack * k * sample.numel() / numel) + 16)
    best = torch.topk(sample, rank, largest=largest, sorted=False).values
    return best.min() if largest else best.max()


def top_k_mask(values: Tensor, k: int, largest: bool, index: Tensor | None = None) -> Tensor:
    """A bool mask of the ``k`` best entries (``0 < k < values.numel()``), ties to the lower index."""
    if values.numel() >= _BAND_MIN:
        chosen = _banded_top_k_mask(values, k, largest, index)
        if chosen is not None:
            return chosen
    return _exact_top_k_mask(values, k, largest, index)


def _banded_top_k_mask(values: Tensor, k: int, largest: bool, index: Tensor | None) -> Tensor | None:
    """:func:`top_k_mask` through a narrow band of values around the ``k``-th best; None where a sample misleads.

    Two values read from a sample bracket the ``k``-th best: every entry beyond the outer one is selected,
    and the rest are picked from the few between the two. Counted, so exact. It spares ``torch.topk`` over
    the whole tensor, which on CPU is slow for a large ``k``: 1.5-3x slower at 93 K entries here.
    """
    numel = values.numel()
    sample = values[:: max(numel // _BAND_SAMPLE, 1)]
    expected = k * sample.numel() / numel  # where the k-th best falls in the sample's ranking
    margin = 4 * math.sqrt(expected * (1 - k / numel)) + 8
    first, last = max(math.floor(expected - margin), 1), min(math.ceil(expected + margin), sample.numel())
    ranked = torch.topk(sample, last, largest=largest, sorted=True).values
    outer, inner = ranked[first - 1], ranked[last - 1]
    beyond = values > outer if largest else values < outer  # all selected if they are at most k
    band = reaches(values, inner, largest).logical_xor_(beyond)  # between the two values, both included
    band_at = band.nonzero().flatten()
    del band
    n_beyond = int(beyond.count_nonzero())
    need = k - n_beyond
    if need < 0 or need > band_at.numel() or band_at.numel() > numel // 2:
        return None  # the k-th best is not in the band (or ties crowd it): the exact way
    if need == band_at.numel():
        return beyond.index_fill_(0, band_at, True)
    if need > 0:
        band_index = band_at if index is None else index.index_select(0, band_at)
        picked = _exact_top_k_mask(values.index_select(0, band_at), need, largest, band_index)
        beyond.index_fill_(0, band_at.masked_select(picked), True)
    return beyond


def _exact_top_k_mask(values: Tensor, k: int, largest: bool, index: Tensor | None = None) -> Tensor:
    """:func:`top_k_mask` by ``torch.topk`` on every entry."""
    numel = values.numel()
    if 2 * k <= numel:
        best = torch.topk(values, k, largest=largest, sorted=False).values
        threshold = best.min() if largest else best.max()
    else:  # the k-th best is the (numel - k + 1)-th worst: a smaller top-k, and smaller buffers
        worst = torch.topk(values, numel - k + 1, largest=not largest, sorted=False).values
        threshold = worst.max() if largest else worst.min()
    chosen = values > threshold if largest else values < threshold
    ties = (values == threshold).nonzero().flatten()
    need = k - int(chosen.sum())
    if ties.numel() > need:
        # `nonzero` lists ties by position: by index too when there is no separate index.
        if index is None:
            ties = ties[:need]
        else:
            ties = ties.index_select(0, torch.topk(index.index_select(0, ties), need, largest=False).indices)
    chosen.index_fill_(0, ties, True)
    return chosen
