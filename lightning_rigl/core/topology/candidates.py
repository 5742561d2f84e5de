"""Grow candidates: a layer's dense grow scores reduced, chunk by chunk, to what its topology update needs.

RigL grows the ``k`` positions of largest score among those not kept by the drop. What is kept depends
on the weights after the optimizer step, the scores are read before it; but the top ``k`` of
(inactive ∪ dropped) lies in top-k(inactive) ∪ dropped. So the dense scores reduce, chunk by chunk, to
:class:`GrowCandidates`: the ``k`` best inactive positions, and the scores at the active positions that
could still win if dropped. The update
(:func:`~lightning_rigl.core.topology.drop_grow.select_drop_grow`) then reads the weights chunk by chunk
too. No step allocates a buffer the size of the layer, of any dtype.

On a large layer, a value read from a sample of it first bounds what can be selected. Where that bound
lets about ``1.5 k`` entries through, one pass keeps them all and a single selection follows; else
(too many would be kept, or fewer than ``k`` got through) a running selection streams over the chunks.

The tie rule, everywhere (:mod:`~lightning_rigl.core.topology.top_k`): among exactly equal values the lower flat
index is selected first (dropped first, grown first). Values must be finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_rigl.core.topology.methods import ScoreFn
from lightning_rigl.core.topology.running_top_k import RunningTopK, could_enter, worst_kept
from lightning_rigl.core.topology.sampling import ChunkScores, active_flags, flat_index, one_pass, sampled_hint
from lightning_rigl.core.topology.top_k import index_dtype, top_k_indices

#: Flat positions a chunk: its temporaries (a bool, an index and a value buffer) stay near 3 MB.
DEFAULT_CHUNK = 2**18


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

    def to(self, device: torch.device | str) -> GrowCandidates:
        """The same candidates on ``device``."""
        return GrowCandidates(self.k, *(t.to(device) for t in self._tensors()))

    def as_dict(self) -> dict[str, Any]:
        """Tensors and an int, as a checkpoint saves them."""
        return {"k": self.k, **dict(zip(_FIELDS, self._tensors(), strict=True))}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> GrowCandidates:
        """The candidates :meth:`as_dict` saved."""
        return cls(int(saved["k"]), *(saved[field] for field in _FIELDS))

    def _tensors(self) -> tuple[Tensor, ...]:
        return (self.values, self.index, self.active_values, self.active_index)

    @property
    def nbytes(self) -> int:
        """Bytes held until the update."""
        tensors = (self.values, self.index, self.active_values, self.active_index)
        return sum(t.numel() * t.element_size() for t in tensors)


_FIELDS = ("values", "index", "active_values", "active_index")


def score_chunks(score: ScoreFn, weight: Tensor, signal: Tensor | None, generator: torch.Generator) -> ChunkScores:
    """A method's grow score function (``Method.score``) applied to one flat chunk at a time.

    Elementwise criteria give the same scores as on the whole layer; SET's CPU generator yields the same
    stream in chunks as at once. ``weight`` and ``signal`` should be contiguous (else the flat view is
    a copy).

    Example:
        >>> from lightning_rigl.core.topology.methods import gradient_magnitude
        >>> scores = score_chunks(gradient_magnitude, torch.zeros(2, 2), torch.tensor([[1.0, -3], [2, -4]]), None)
        >>> scores(1, 3).tolist()
        [3.0, 2.0]

    """
    flat_weight = weight.detach().reshape(-1)
    flat_signal = None if signal is None else signal.detach().reshape(-1)

    def chunk(start: int, stop: int) -> Tensor:
        part = None if flat_signal is None else flat_signal[start:stop]
        return score(flat_weight[start:stop], part, generator)

    def at(index: Tensor) -> Tensor:
        signal_at = None if flat_signal is None else flat_signal.index_select(0, index)
        return score(flat_weight.index_select(0, index), signal_at, generator)

    chunk.at = at  # type: ignore[attr-defined]
    return chunk


def grow_candidates(
    mask: Tensor, k: int, scores: ChunkScores, *, chunk_size: int = DEFAULT_CHUNK, sample: bool = True
) -> GrowCandidates:
    """Reduce a layer's grow scores, chunk by chunk, to what an update that replaces ``k`` needs.

    Call it where the dense gradient (or the score signal) is read, before the optimizer step and
    before the gradient is masked; hold the result until
    :func:`~lightning_rigl.core.topology.drop_grow.select_drop_grow`.

    Args:
        mask: The layer's mask (any shape, float or bool, non-zero where active); the stored mask itself.
        k: Connections to replace: ``int(n_active * drop_fraction)``.
        scores: The grow scores of a range of flat positions (see :func:`score_chunks`); called once per
            chunk, in order (after the sample's windows, if ``sample``).
        chunk_size: Flat positions a chunk.
        sample: ``scores`` may first be read at a few spread windows (scores that do not depend on the
            order of the calls; not SET's random draws): a sampled bound then keeps most of each chunk
            out of the running selection. Exact either way: if the sample misleads, the pass runs again
            without it.

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
    hint = sampled_hint(flat_mask, scores, k, largest=True, active=False) if sample else None
    if hint is not None:
        found = one_pass(flat_mask, scores, k, hint, largest=True, chunk_size=chunk_size)
        if found is not None and found[0].numel() >= k:
            return _grow_from_kept(k, *found)
        if found is not None:  # fewer than k inactive entries reached the hint: the exact pass, without it
            hint = found = None
    inactive = RunningTopK(k, largest=True, hint=hint)
    active_values: list[Tensor] = []
    active_index: list[Tensor] = []
    for start in range(0, numel if k > 0 else 0, chunk_size):
        stop = min(start + chunk_size, numel)
        chunk, mask_chunk = scores(start, stop).reshape(-1), flat_mask[start:stop]
        # Once k inactive positions were seen, only scores beyond their k-th best can matter, for an
        # inactive position and for an active one alike: few of a chunk, split by the mask after.
        better = inactive.beats_bound(chunk)
        if better is None:
            active = active_flags(mask_chunk)
            n_open = active.numel() - int(active.sum())
            if n_open <= k:
                at = (~active).nonzero().flatten()
            else:  # this chunk's k best inactive ones, with no index buffer of all of them
                at = top_k_indices(chunk.masked_fill(active, -math.inf), k)
            inactive.push(chunk[at], flat_index(at, start, dtype))  # may set the bound
            reaches = inactive.reaches_bound(chunk)  # ties with this chunk's inactive ones: settled at the end
            active_at = (active if reaches is None else active & reaches).nonzero().flatten()
        else:
            at = better.nonzero().flatten()
            is_active = active_flags(mask_chunk[at])
            inactive.push(chunk[at[~is_active]], flat_index(at[~is_active], start, dtype))
            active_at = at[is_active]
        active_values.append(chunk[active_at])
        active_index.append(flat_index(active_at, start, dtype))
    if inactive.missed_hint():
        return grow_candidates(mask, k, scores, chunk_size=chunk_size, sample=False)
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


def _grow_from_kept(
    k: int, values: Tensor, index: Tensor, active_values: Tensor, active_index: Tensor
) -> GrowCandidates:
    """The candidates from every entry that reached the hint (all at least as good as the ``k``-th best)."""
    best = top_k_indices(values, k)  # in index order: ties go to the lower index
    values, index = values.index_select(0, best), index.index_select(0, best)
    # An active entry wins if dropped when it beats the k-th best, or ties it at a lower index.
    win = could_enter(active_values, active_index, *worst_kept(values, index, largest=True), largest=True)
    win = win.nonzero().flatten()
    return GrowCandidates(k, values, index, active_values.index_select(0, win), active_index.index_select(0, win))
