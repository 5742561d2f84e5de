"""A sampled bound on a layer's ``k``-th best score, and the one pass that keeps what reaches it.

A topology update selects ``k`` of a layer's entries. A few spread windows of the layer, read first,
give a value that about ``1.5 k`` entries reach (:func:`sampled_hint`); one pass then keeps exactly
those (:func:`one_pass`), and a single selection among them follows. The caller checks that at least
``k`` candidates got through, and streams an exact selection where they did not.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_rigl.core.topology.top_k import index_dtype, reaches, where_true

#: ``scores(start, stop)``: the grow scores of flat positions ``start`` to ``stop - 1`` of a layer. One may
#: also have an ``at(index)`` attribute giving the scores at any flat positions: a sample is then one gather.
ChunkScores = Callable[[int, int], Tensor]


#: The one-pass selection keeps at most this fraction (1 / it) of a layer's entries (see :func:`one_pass`).
ONE_PASS_SHARE = 8
#: A hint is read from ``SAMPLE_WINDOWS`` runs of ``SAMPLE_WIDTH`` entries, with ``HINT_MARGIN`` sampled entries
#: to spare (see :func:`sampled_hint`).
SAMPLE_WINDOWS, SAMPLE_WIDTH, HINT_MARGIN = 64, 512, 16
#: One pass lists what reaches a hint with :func:`where_true` where at most 1 / it of the entries are expected to.
WORDS_SHARE = 128


def one_pass(
    flat_mask: Tensor,
    read: ChunkScores,
    k: int,
    hint: Tensor,
    *,
    largest: bool,
    chunk_size: int,
    only_active: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """Every entry that reaches a sampled ``hint``, in one pass: values and flat indices, inactive then active.

    With ``only_active``, ``read`` must score every inactive entry so that it never reaches a hint (NaN, or
    an infinity on the far side: ``|w| / mask`` for the drop); the inactive pair is then empty and the mask
    is not read. One comparison and one listing a chunk, and no running selection: the hint is meant to let
    about ``1.5 k`` entries through, and the caller checks that at least ``k`` candidates did. None, for the
    streaming pass instead, where more than ``4 k`` entries (plus twice what the hint's margin lets through),
    or an eighth of the layer, would be kept (8 bytes an entry).

    Example:
        >>> mask, scores = (torch.arange(64) % 3 == 0).float(), torch.arange(64.0) % 10
        >>> inactive, at, active, active_at = one_pass(
        ...     mask, lambda a, b: scores[a:b], 1, torch.tensor(9.0), largest=True, chunk_size=16
        ... )
        >>> inactive.tolist(), at.tolist(), active.tolist(), active_at.tolist()
        ([9.0, 9.0, 9.0, 9.0], [19, 29, 49, 59], [9.0, 9.0], [9, 39])
    """
    numel, dtype = flat_mask.numel(), index_dtype(flat_mask.numel())
    # The hint's margin alone lets about HINT_MARGIN / sample of the layer through, whatever k: room for
    # twice that, or every small update (the late ones of a decaying schedule) would stream instead.
    margin = 2 * HINT_MARGIN * numel // (SAMPLE_WINDOWS * SAMPLE_WIDTH)
    kept, limit = 0, min(4 * k + 64 + margin, numel // ONE_PASS_SHARE)
    if 2 * k > limit:
        return None  # about 1.5 k entries would reach the hint: more than may be kept
    # Where few entries reach the hint (late, small updates), listing them by words of bools is faster.
    few = (1.5 * k + margin) * WORDS_SHARE < numel
    values: list[Tensor] = []
    index: list[Tensor] = []
    flags: list[Tensor] = []  # which of them are active
    for start in range(0, numel, chunk_size):
        stop = min(start + chunk_size, numel)
        chunk = read(start, stop).reshape(-1)
        reached = reaches(chunk, hint, largest)
        at = where_true(reached) if few else reached.nonzero().flatten()
        del reached
        kept += at.numel()
        if kept > limit:
            return None
        # index_select, not indexing: several times faster on CPU for the same gather.
        values.append(chunk.index_select(0, at))
        index.append(flat_index(at, start, dtype))
        if not only_active:
            flags.append(active_flags(flat_mask[start:stop].index_select(0, at)))
        del chunk, at
    kept_values, kept_index, active = torch.cat(values), torch.cat(index), torch.cat(flags) if flags else None
    del values, index, flags  # the parts, before the split allocates
    if active is None:
        return kept_values[:0], kept_index[:0], kept_values, kept_index
    # Split once, by the mask, after the pass: per chunk it would cost twice the small calls.
    inactive_at, active_at = (~active).nonzero().flatten(), active.nonzero().flatten()
    return (
        kept_values.index_select(0, inactive_at),
        kept_index.index_select(0, inactive_at),
        kept_values.index_select(0, active_at),
        kept_index.index_select(0, active_at),
    )


def sampled_hint(flat_mask: Tensor, read: ChunkScores, k: int, *, largest: bool, active: bool) -> Tensor | None:
    """A value that about ``1.5 k`` of the layer's active (or inactive) entries reach, read from a sample.

    The sample is ``SAMPLE_WINDOWS`` runs of ``SAMPLE_WIDTH`` positions spread over the layer, so it sees
    every part of it; :func:`one_pass` sizes its limit by the same sample. None where sampling does not pay
    (small layers, ``k`` near the number of entries).
    """
    numel, windows, width = flat_mask.numel(), SAMPLE_WINDOWS, SAMPLE_WIDTH
    if k <= 0 or numel < 4 * windows * width or 8 * k > numel:
        return None
    # One gather of the mask's windows and one selection: per-window indexing costs 64 small calls.
    positions = _sample_positions(numel, flat_mask.device)
    kind = active_flags(flat_mask.index_select(0, positions))
    at = getattr(read, "at", None)  # one gather where the scores can be read at any positions
    if at is not None:
        sample = at(positions)
    else:
        sample = torch.cat([read(i, i + width).reshape(-1) for i in positions[::width].tolist()])
    sample = sample.masked_select(kind if active else ~kind)
    # Entries of the sample beyond the hint stand for about 1.5 k of the layer's, plus a margin of a few.
    rank = math.ceil(1.5 * k * windows * width / numel) + HINT_MARGIN
    if rank > sample.numel():
        return None
    best = torch.topk(sample, rank, largest=largest, sorted=False).values
    return best.min() if largest else best.max()


@functools.lru_cache(maxsize=8)
def _sample_positions(numel: int, device: torch.device) -> Tensor:
    """The flat positions of the sampled windows of a layer of ``numel`` entries (read-only: shared)."""
    starts = torch.linspace(0, numel - SAMPLE_WIDTH, SAMPLE_WINDOWS, device=device).long()
    return (starts[:, None] + torch.arange(SAMPLE_WIDTH, device=device)).reshape(-1)


def active_flags(mask_chunk: Tensor) -> Tensor:
    """A bool tensor: where the mask (bool, or 0/1 of any dtype) is active."""
    # `nonzero` of a bool chunk is several times faster than of a float one; converting a 0/1 mask to
    # bool gives what `!= 0` does, 5x faster here.
    return mask_chunk if mask_chunk.dtype == torch.bool else mask_chunk.bool()


def flat_index(at: Tensor, start: int, dtype: torch.dtype) -> Tensor:
    """Positions ``at`` in a chunk that begins at ``start``, as flat indices of ``dtype``."""
    # Converted first: no second int64 buffer for the offset positions.
    return at.to(dtype).add_(start)
