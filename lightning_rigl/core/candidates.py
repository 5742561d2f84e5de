"""Exact top-k under one tie rule, and the chunked reductions that keep a topology update small.

RigL grows the ``k`` positions of largest score among those not kept by the drop. What is kept depends
on the weights after the optimizer step, the scores are read before it; but the top ``k`` of
(inactive ∪ dropped) lies in top-k(inactive) ∪ dropped. So the dense scores reduce, chunk by chunk, to
:class:`GrowCandidates`: the ``k`` best inactive positions, and the scores at the active positions that
could still win if dropped. The update (:func:`drop_grow_from_candidates`) then reads the weights chunk
by chunk too. No step allocates a buffer the size of the layer, of any dtype.

The tie rule, everywhere: among exactly equal values the lower flat index is selected first (dropped
first, grown first). It is deterministic and the same on every rank and device. Values must be finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_rigl.core.grow import ScoreFn

#: Flat positions a chunk: its temporaries (a bool, an index and a value buffer) stay near 3 MB.
DEFAULT_CHUNK = 2**18

#: ``scores(start, stop)``: the grow scores of flat positions ``start`` to ``stop - 1`` of a layer.
ChunkScores = Callable[[int, int], Tensor]

_CUT_SAMPLE = 4096


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
        bound = _sample_bound(values[::128], k, numel, largest, slack=1.5)
        within = _reaches(values, bound, largest).nonzero().flatten()
        # Every entry outside is worse than the bound, which at least k entries match or beat.
        if k <= within.numel() < numel:
            return within[
                _top_k_mask(values[within], k, largest, None if index is None else index[within]).nonzero()[:, 0]
            ]
    return _top_k_mask(values, k, largest, index).nonzero().flatten()


def _reaches(values: Tensor, bound: Tensor, largest: bool) -> Tensor:
    return values >= bound if largest else values <= bound


def _sample_bound(sample: Tensor, k: int, numel: int, largest: bool, *, slack: float) -> Tensor:
    """A value that about ``slack * k`` of ``numel`` entries match or beat, read from a sample of them."""
    # About k * sample / numel sampled entries lie beyond the true k-th value: times the slack, plus a few.
    rank = min(sample.numel(), math.ceil(slack * k * sample.numel() / numel) + 16)
    best = torch.topk(sample, rank, largest=largest, sorted=False).values
    return best.min() if largest else best.max()


def _top_k_mask(values: Tensor, k: int, largest: bool, index: Tensor | None = None) -> Tensor:
    """A bool mask of the ``k`` best entries (``0 < k < values.numel()``), ties to the lower index."""
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
        ties = ties[:need] if index is None else ties[torch.topk(index[ties], need, largest=False).indices]
    chosen[ties] = True
    return chosen


class _RunningTopK:
    """The ``k`` best (value, flat index) entries of a stream whose indices come in ascending order.

    Entries are kept in index order, in parts, so position order is index order and the tie rule needs
    no index comparison. At ``1.5 k`` entries the parts are cut back, one at a time, to the entries that
    match or beat a bound read from a sample (about ``1.1 k``, checked by a count; else exactly ``k``):
    no top-k over the buffer and no copy of it, and a bound that rejects most of each next chunk.
    :meth:`result` makes the one exact selection.
    """

    def __init__(self, k: int, largest: bool) -> None:
        self.k, self.largest = k, largest
        self.values: list[Tensor] = []
        self.index: list[Tensor] = []
        self.size = 0
        self.bound: Tensor | None = None  # at least k kept entries match or beat it
        self.last: Tensor | None = None  # after result(): the flat index of the k-th best entry

    def beats_bound(self, values: Tensor) -> Tensor | None:
        """Which entries, with indices above all pushed so far, can still be among the best; None: all."""
        if self.bound is None:
            return None
        # Equal to the bound is not enough: k kept entries match or beat it, with lower indices.
        return values > self.bound if self.largest else values < self.bound

    def reaches_bound(self, values: Tensor) -> Tensor | None:
        """Which entries match or beat the bound (any index: the ties are settled later); None: all."""
        return None if self.bound is None else _reaches(values, self.bound, self.largest)

    def push(self, values: Tensor, index: Tensor) -> None:
        if values.numel() > self.k:
            keep = _top_k_mask(values, self.k, self.largest)
            values, index = values[keep], index[keep]
        self.values.append(values)
        self.index.append(index)
        self.size += values.numel()
        # The first cut as soon as k entries are in: from then on a bound rejects most of each chunk.
        if self.size >= self.k + max(self.k // 2, 1) or (self.bound is None and self.size >= self.k):
            self._cut()

    def result(self) -> tuple[Tensor, Tensor]:
        """The ``k`` best (fewer if fewer were pushed): values and flat indices, in index order."""
        if self.size > self.k:
            self._cut()
        values, index = self._joined()
        if values.numel() > self.k:
            keep = _top_k_mask(values, self.k, self.largest)
            values, index = values[keep], index[keep]
        self.values, self.index, self.size = [values], [index], values.numel()
        if self.size == self.k:
            self.bound = values.min() if self.largest else values.max()
            self.last = index[(values == self.bound).nonzero()[-1, 0]]
        return values, index

    def could_win(self, values: Tensor, index: Tensor) -> Tensor | None:
        """After :meth:`result`: which entries (any index) would enter the ``k`` best; None: all."""
        if self.last is None:
            return None
        better = values > self.bound if self.largest else values < self.bound
        return better | ((values == self.bound) & (index < self.last))

    def _cut(self) -> None:
        if self.size >= 4 * _CUT_SAMPLE:
            stride = self.size // _CUT_SAMPLE
            sample = torch.cat([part[::stride] for part in self.values])
            bound = _sample_bound(sample, self.k, self.size, self.largest, slack=1.1)
            count = sum(int(_reaches(part, bound, self.largest).sum()) for part in self.values)
            # A sample can miss (too few pass) or ties can crowd in (too many): then the exact cut.
            if self.k <= count <= self.k + self.k // 4:
                for i, part in enumerate(self.values):
                    keep = _reaches(part, bound, self.largest)
                    self.values[i], self.index[i] = part[keep], self.index[i][keep]
                    del part, keep
                self.size, self.bound = count, bound
                return
        values, index = self._joined()
        if values.numel() > self.k:
            keep = _top_k_mask(values, self.k, self.largest)
            values, index = values[keep], index[keep]
        self.values, self.index, self.size = [values], [index], values.numel()
        self.bound = values.min() if self.largest else values.max()

    def _joined(self) -> tuple[Tensor, Tensor]:
        values, index = torch.cat(self.values), torch.cat(self.index)
        self.values, self.index = [], []  # the parts are freed before the selection allocates
        return values, index


@dataclass(frozen=True)
class GrowCandidates:
    """What growth needs from a layer's dense scores, reduced (see :func:`grow_candidates`).

    Attributes:
        k: The number of connections the update replaces.
        values: Scores of the ``k`` best inactive positions (all inactive ones if fewer).
        index: Their flat indices, ascending (int32 where the layer fits).
        active_values: Scores at the active positions that would win against the inactive candidates
            if dropped; the others cannot be grown.
        active_index: Their flat indices, ascending.

    """

    k: int
    values: Tensor
    index: Tensor
    active_values: Tensor
    active_index: Tensor

    @property
    def nbytes(self) -> int:
        """Bytes held until the update."""
        tensors = (self.values, self.index, self.active_values, self.active_index)
        return sum(t.numel() * t.element_size() for t in tensors)


def score_chunks(score: ScoreFn, weight: Tensor, signal: Tensor | None, generator: torch.Generator) -> ChunkScores:
    """A grow criterion's score function (``grow.GROW_CRITERIA``) applied to one flat chunk at a time.

    Elementwise criteria give the same scores as on the whole layer; SET's CPU generator yields the same
    stream in chunks as at once. ``weight`` and ``signal`` should be contiguous (else the flat view is
    a copy).

    Example:
        >>> from lightning_rigl.core.grow import gradient_magnitude
        >>> scores = score_chunks(gradient_magnitude, torch.zeros(2, 2), torch.tensor([[1.0, -3], [2, -4]]), None)
        >>> scores(1, 3).tolist()
        [3.0, 2.0]

    """
    flat_weight = weight.detach().reshape(-1)
    flat_signal = None if signal is None else signal.detach().reshape(-1)

    def chunk(start: int, stop: int) -> Tensor:
        part = None if flat_signal is None else flat_signal[start:stop]
        return score(flat_weight[start:stop], part, generator)

    return chunk


def grow_candidates(mask: Tensor, k: int, scores: ChunkScores, *, chunk_size: int = DEFAULT_CHUNK) -> GrowCandidates:
    """Reduce a layer's grow scores, chunk by chunk, to what an update that replaces ``k`` needs.

    Call it where the dense gradient (or the score signal) is read, before the optimizer step and
    before the gradient is masked; hold the result until :func:`drop_grow_from_candidates`.

    Args:
        mask: The layer's mask (any shape, float or bool, non-zero where active); the stored mask itself.
        k: Connections to replace: ``int(n_active * drop_fraction)``.
        scores: The grow scores of a range of flat positions (see :func:`score_chunks`); called once per
            chunk, in order.
        chunk_size: Flat positions a chunk.

    Returns:
        The candidates; their size is about ``k`` plus the active positions scoring above the ``k``-th
        best inactive one, never the layer's.

    Example:
        >>> mask = torch.tensor([0, 1, 0, 1, 0, 1, 1, 0])
        >>> grad = torch.tensor([0.1, 5, 0.3, 0.2, 0.9, 0.05, 0.4, 0.6])
        >>> found = grow_candidates(mask, 2, lambda start, stop: grad[start:stop].abs(), chunk_size=3)
        >>> found.index.tolist(), found.active_index.tolist()
        ([4, 7], [1])

    """
    flat_mask = mask.reshape(-1)
    numel, dtype = flat_mask.numel(), index_dtype(flat_mask.numel())
    inactive = _RunningTopK(k, largest=True)
    active_values: list[Tensor] = []
    active_index: list[Tensor] = []
    for start in range(0, numel if k > 0 else 0, chunk_size):
        stop = min(start + chunk_size, numel)
        chunk, mask_chunk = scores(start, stop).reshape(-1), flat_mask[start:stop]
        # Once k inactive positions were seen, only scores beyond their k-th best can matter, for an
        # inactive position and for an active one alike: few of a chunk, split by the mask after.
        better = inactive.beats_bound(chunk)
        if better is None:
            active = _is_active(mask_chunk)
            n_open = active.numel() - int(active.sum())
            if n_open <= k:
                at = (~active).nonzero().flatten()
            else:  # this chunk's k best inactive ones, with no index buffer of all of them
                at = top_k_indices(chunk.masked_fill(active, -math.inf), k)
            inactive.push(chunk[at], _flat_index(at, start, dtype))  # may set the bound
            reaches = inactive.reaches_bound(chunk)  # ties with this chunk's inactive ones: settled at the end
            active_at = (active if reaches is None else active & reaches).nonzero().flatten()
        else:
            at = better.nonzero().flatten()
            is_active = mask_chunk[at] != 0
            inactive.push(chunk[at[~is_active]], _flat_index(at[~is_active], start, dtype))
            active_at = at[is_active]
        active_values.append(chunk[active_at])
        active_index.append(_flat_index(active_at, start, dtype))
    if k > 0:
        values, index = inactive.result()
    else:
        values, index = torch.empty(0, device=mask.device), torch.empty(0, dtype=dtype, device=mask.device)
    for i, (part, part_index) in enumerate(zip(active_values, active_index, strict=True)):
        win = inactive.could_win(part, part_index)  # part by part: no copy of all saved scores at once
        if win is not None:
            active_values[i], active_index[i] = part[win], part_index[win]
        del part, part_index, win
    a_values = torch.cat(active_values) if active_values else values[:0]
    a_index = torch.cat(active_index) if active_index else index[:0]
    return GrowCandidates(k, values, index, a_values, a_index)


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
    stream = _RunningTopK(k, largest=False)
    for start in range(0, numel if k > 0 else 0, chunk_size):
        stop = min(start + chunk_size, numel)
        at = _is_active(flat_mask[start:stop]).nonzero().flatten()
        magnitude = flat_weight[start:stop][at].abs()
        better = stream.beats_bound(magnitude)
        if better is not None:
            at, magnitude = at[better], magnitude[better]
        stream.push(magnitude, _flat_index(at, start, dtype))
    return stream.result()[1] if k > 0 else torch.empty(0, dtype=dtype, device=mask.device)


def drop_grow_from_candidates(
    mask: Tensor, weight: Tensor, candidates: GrowCandidates, *, chunk_size: int = DEFAULT_CHUNK
) -> tuple[Tensor, Tensor]:
    """One RigL update of one layer from its reduced grow scores: ``(dropped, grown)`` flat indices.

    Drops the ``candidates.k`` active weights of smallest ``|weight|``, then grows the ``k`` positions
    of largest score among the inactive candidates and the dropped positions (a dropped weight may be
    regrown at once: its index is then in both). Same selection as on the dense scores.

    Args:
        mask: The layer's mask, unchanged since the candidates were reduced.
        weight: The layer's weights now (after the optimizer step).
        candidates: From :func:`grow_candidates` on this mask.
        chunk_size: Flat positions a chunk, for the drop.

    Returns:
        Two int64 tensors of ``k`` flat indices each: dropped (ascending), grown (deterministic order).

    Example:
        >>> mask = torch.tensor([0, 1, 0, 1, 0, 1, 1, 0])
        >>> grad = torch.tensor([0.1, 5, 0.3, 0.2, 0.9, 0.05, 0.4, 0.6])
        >>> found = grow_candidates(mask, 2, lambda start, stop: grad[start:stop].abs())
        >>> dropped, grown = drop_grow_from_candidates(mask, torch.tensor([-9.0, 1, 4, -1, 5, 8, -2, 3]), found)
        >>> dropped.tolist(), sorted(grown.tolist())
        ([1, 3], [1, 4])

    """
    k = candidates.k
    dropped = smallest_active(mask, weight, k, chunk_size=chunk_size)
    # The scores of the dropped positions where saved; an unsaved one loses to k inactive candidates.
    saved = candidates.active_index
    at = torch.searchsorted(saved, dropped.to(saved.dtype), out_int32=True).clamp_(max=max(saved.numel() - 1, 0))
    found = (saved[at] == dropped) if saved.numel() else torch.zeros_like(dropped, dtype=torch.bool)
    values = torch.cat([candidates.values, candidates.active_values[at[found]]])
    index = torch.cat([candidates.index, dropped[found]])
    grown = index[top_k_indices(values, k, index=index)]
    return dropped.long(), grown.long()


def _is_active(mask_chunk: Tensor) -> Tensor:
    # `nonzero` of a bool chunk is several times faster than of a float one.
    return mask_chunk if mask_chunk.dtype == torch.bool else mask_chunk != 0


def _flat_index(at: Tensor, start: int, dtype: torch.dtype) -> Tensor:
    # Converted first: no second int64 buffer for the offset positions.
    return at.to(dtype).add_(start)
