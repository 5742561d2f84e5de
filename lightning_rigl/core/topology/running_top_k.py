"""A running exact top-k over a stream of chunks, under the tie rule of :mod:`~lightning_rigl.core.topology.top_k`.

Topology updates select over a layer chunk by chunk (:mod:`~lightning_rigl.core.topology.candidates`):
the stream keeps about ``1.5 k`` entries at most, and a bound read from them rejects most of each next chunk.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_rigl.core.topology.top_k import reaches, sample_bound, top_k_mask

#: Kept entries sampled for the bound of a cut.
_CUT_SAMPLE = 4096


def worst_kept(values: Tensor, index: Tensor, largest: bool) -> tuple[Tensor, Tensor]:
    """The worst of ``k`` selected entries (kept in index order): its value, and the highest index holding it.

    Example:
        >>> bound, last = worst_kept(torch.tensor([5.0, 2.0, 2.0]), torch.tensor([1, 4, 7]), largest=True)
        >>> float(bound), int(last)
        (2.0, 7)
    """
    bound = values.min() if largest else values.max()
    return bound, index[(values == bound).nonzero()[-1, 0]]


def could_enter(values: Tensor, index: Tensor, bound: Tensor, last: Tensor, largest: bool) -> Tensor:
    """Which entries would enter a selection whose worst entry is ``bound`` at index ``last``.

    Strictly better values do, and equal ones at a lower index (the tie rule).

    Example:
        >>> values, index = torch.tensor([3.0, 2.0, 2.0]), torch.tensor([0, 5, 9])
        >>> could_enter(values, index, torch.tensor(2.0), torch.tensor(7), largest=True).tolist()
        [True, True, False]
    """
    better = values > bound if largest else values < bound
    return better | ((values == bound) & (index < last))


class RunningTopK:
    """The ``k`` best (value, flat index) entries of a stream whose indices come in ascending order.

    Entries are kept in index order, in parts, so position order is index order and the tie rule needs
    no index comparison. At ``1.5 k`` entries the parts are cut back, one at a time, to the entries that
    match or beat a bound read from a sample (about ``1.1 k``, checked by a count; else exactly ``k``):
    no top-k over the buffer and no copy of it, and a bound that rejects most of each next chunk.
    :meth:`result` makes the one exact selection.
    """

    def __init__(self, k: int, largest: bool, hint: Tensor | None = None) -> None:
        self.k, self.largest = k, largest
        #: Entries worse than the hint are never kept, until a bound is set; a hint is a guess (from a
        #: sample), so the caller checks that at least k entries reached it (:meth:`missed_hint`).
        self.hint = hint
        self.pushed = 0
        self.values: list[Tensor] = []
        self.index: list[Tensor] = []
        self.size = 0
        self.bound: Tensor | None = None  # at least k kept entries match or beat it
        self.last: Tensor | None = None  # after result(): the flat index of the k-th best entry

    def beats_bound(self, values: Tensor) -> Tensor | None:
        """Which entries, with indices above all pushed so far, can still be among the best; None: all."""
        if self.bound is None:
            return None if self.hint is None else reaches(values, self.hint, self.largest)
        # Equal to the bound is not enough: k kept entries match or beat it, with lower indices.
        return values > self.bound if self.largest else values < self.bound

    def reaches_bound(self, values: Tensor) -> Tensor | None:
        """Which entries match or beat the bound (any index: the ties are settled later); None: all."""
        return None if self.bound is None else reaches(values, self.bound, self.largest)

    def push(self, values: Tensor, index: Tensor) -> None:
        """Add entries whose indices are above all pushed so far."""
        if values.numel() > self.k:
            keep = top_k_mask(values, self.k, self.largest)
            values, index = values.masked_select(keep), index.masked_select(keep)
        self.values.append(values)
        self.index.append(index)
        self.size += values.numel()
        self.pushed += values.numel()
        # The first cut as soon as k entries are in: from then on a bound rejects most of each chunk.
        if self.size >= self.k + max(self.k // 2, 1) or (self.bound is None and self.size >= self.k):
            self._cut()

    def missed_hint(self) -> bool:
        """Whether a hint rejected entries that may belong to the ``k`` best: fewer than ``k`` reached it."""
        return self.hint is not None and self.pushed < self.k

    def result(self) -> tuple[Tensor, Tensor]:
        """The ``k`` best (fewer if fewer were pushed): values and flat indices, in index order."""
        if self.size > self.k:
            self._cut()
        values, index = self._joined()
        if values.numel() > self.k:
            keep = top_k_mask(values, self.k, self.largest)
            values, index = values.masked_select(keep), index.masked_select(keep)
        self.values, self.index, self.size = [values], [index], values.numel()
        if self.size == self.k:
            self.bound, self.last = worst_kept(values, index, self.largest)
        return values, index

    def could_win(self, values: Tensor, index: Tensor) -> Tensor | None:
        """After :meth:`result`: which entries (any index) would enter the ``k`` best; None: all."""
        if self.last is None:
            return None
        assert self.bound is not None
        return could_enter(values, index, self.bound, self.last, self.largest)

    def _cut(self) -> None:
        if self.size >= 4 * _CUT_SAMPLE:
            stride = self.size // _CUT_SAMPLE
            sample = torch.cat([part[::stride] for part in self.values])
            bound = sample_bound(sample, self.k, self.size, self.largest, slack=1.1)
            count = sum(int(reaches(part, bound, self.largest).sum()) for part in self.values)
            # A sample can miss (too few pass) or ties can crowd in (too many): then the exact cut.
            if self.k <= count <= self.k + self.k // 4:
                for i, part in enumerate(self.values):
                    # One `nonzero` for both tensors (a bool index would run one for each), part by part.
                    at = reaches(part, bound, self.largest).nonzero().flatten()
                    self.values[i], self.index[i] = part.index_select(0, at), self.index[i].index_select(0, at)
                    del part, at
                self.size, self.bound = count, bound
                return
        values, index = self._joined()
        if values.numel() > self.k:
            keep = top_k_mask(values, self.k, self.largest)
            values, index = values.masked_select(keep), index.masked_select(keep)
        self.values, self.index, self.size = [values], [index], values.numel()
        self.bound = values.min() if self.largest else values.max()

    def _joined(self) -> tuple[Tensor, Tensor]:
        values, index = torch.cat(self.values), torch.cat(self.index)
        self.values, self.index = [], []  # the parts are freed before the selection allocates
        return values, index
