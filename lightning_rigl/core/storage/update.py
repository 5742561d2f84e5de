"""A compact layer's RigL update: grow scores reduced block by block, then the indices rewritten in place.

The dense weight gradient ``grad_out^T x`` is never stored whole: it is computed a block of stored rows
at a time from the input and output gradient the layer kept (:class:`~lightning_rigl.core.storage.
functional.Capture`), and reduced online by the project's own exact selection
(:func:`~lightning_rigl.core.topology.candidates.grow_candidates`, its tie rule and its sampled bound) to the
layer's :class:`~lightning_rigl.core.topology.candidates.GrowCandidates`. The mask it reads is built a block at a
time from the structure (:class:`ChunkedMask`). The drop and grow then select as the dense path does,
ties to the lower flat index of the stored weight, so both storages make the same updates.

Values stay in CSR order: an update merges the grown entries into place, and every per-element tensor
of the values Parameter (its gradient, each per-element optimizer state) is re-sorted the same way, in
place. Grown entries start at 0 with the optimizer's fresh state; regrown ones keep value and state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from lightning_rigl.core.storage.construct import logical_coordinates
from lightning_rigl.core.storage.layer import CompactLayer
from lightning_rigl.core.storage.structure import CompactStructure, csr_rows
from lightning_rigl.core.topology.candidates import DEFAULT_CHUNK, GrowCandidates, grow_candidates
from lightning_rigl.core.topology.drop_grow import grow_from_candidates
from lightning_rigl.core.topology.methods import ScoreFn, gradient_magnitude
from lightning_rigl.core.topology.optim_state import reset_optimizer_state
from lightning_rigl.core.topology.top_k import top_k_indices

#: Applied to each block of the dense gradient before it is scored: under DDP, the mean over ranks.
ChunkHook = Callable[[Tensor], Tensor]


class _StoredView:
    """A compact layer's structure seen row by row of the stored weight (``W^T``'s for an (in, out) one)."""

    def __init__(self, layer: CompactLayer) -> None:
        s, self.in_out = layer._structure_on(layer.weight_values), layer.weight_in_out
        self.structure = s
        self.crow, self.col = (s.crow_t, s.col_t) if self.in_out else (s.crow, s.col)
        self.rows, self.cols = layer.stored_shape
        self.device = s.col.device

    def slots(self, at: Tensor) -> Tensor:
        """The values' places of stored-order entries ``at``."""
        return self.structure.perm_t.index_select(0, at).long() if self.in_out else at

    def flat(self, at: Tensor) -> Tensor:
        """The flat stored positions of stored-order entries ``at`` (int64)."""
        rows = torch.searchsorted(self.crow, at.to(self.crow.dtype), right=True).long() - 1
        return rows * self.cols + self.col.index_select(0, at).long()

    def keys(self, first_row: int, last_row: int) -> Tensor:
        """Flat stored positions of the active entries of stored rows ``first_row`` to ``last_row - 1``, ascending."""
        pointers = self.crow[first_row : last_row + 1]
        rows = csr_rows(pointers).add_(first_row)
        return rows.mul_(self.cols).add_(self.col[int(pointers[0]) : int(pointers[-1])])

    def keys_of(self, rows: Tensor) -> Tensor:
        """Flat stored positions of the active entries of the stored ``rows`` (ascending), ascending."""
        starts = self.crow.index_select(0, rows).long()
        counts = self.crow.index_select(0, rows + 1).long() - starts
        # Entry j of row i is at starts[i] + j: each row's run of positions in `col`, one gather for all.
        before = torch.cumsum(counts, 0) - counts
        at = torch.repeat_interleave(starts - before, counts) + torch.arange(int(counts.sum()), device=self.device)
        return torch.repeat_interleave(rows, counts) * self.cols + self.col.index_select(0, at).long()


class ChunkedMask:
    """The bool mask of a compact layer's stored weight, made a block at a time from its structure.

    What :func:`~lightning_rigl.core.topology.candidates.grow_candidates` reads of a mask: ``numel()``, flat slices
    and ``index_select`` of flat positions; nothing of the layer's size is ever made.
    """

    dtype = torch.bool

    def __init__(self, view: _StoredView) -> None:
        self.view, self.device = view, view.device

    @classmethod
    def of(cls, layer: CompactLayer) -> ChunkedMask:
        """The mask of a compact layer's stored weight."""
        return cls(_StoredView(layer))

    def reshape(self, *shape: int) -> ChunkedMask:
        """The mask seen flat (the only view asked for)."""
        return self

    def numel(self) -> int:
        """The stored weight's number of entries."""
        return self.view.rows * self.view.cols

    def __getitem__(self, part: slice) -> Tensor:
        start, stop, _ = part.indices(self.numel())
        cols = self.view.cols
        keys = self.view.keys(start // cols, -(-stop // cols)) - start
        keys = keys[(keys >= 0) & (keys < stop - start)]
        return torch.zeros(stop - start, dtype=torch.bool, device=self.device).index_fill_(0, keys, True)

    def index_select(self, dim: int, positions: Tensor) -> Tensor:
        """Whether each of the flat ``positions`` is active."""
        rows = torch.sort(torch.div(positions, self.view.cols, rounding_mode="floor")).values
        keys = self.view.keys_of(torch.unique_consecutive(rows))  # torch.unique: 100x slower here
        at = torch.searchsorted(keys, positions.long()).clamp_(max=max(keys.numel() - 1, 0))
        return keys.index_select(0, at) == positions if keys.numel() else torch.zeros_like(positions, dtype=torch.bool)


def compact_grow_candidates(
    layer: CompactLayer,
    k: int,
    *,
    score: ScoreFn = gradient_magnitude,
    chunk_hook: ChunkHook | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    sample: bool = True,
) -> GrowCandidates:
    """Reduce a compact layer's grow scores to what an update replacing ``k`` connections needs.

    The dense gradient is the sum of ``grad_out^T x`` over the pairs ``layer.capture`` kept (one per
    micro-batch), in their order, as autograd accumulates it; it is computed a block of rows at a time.

    Args:
        layer: A compact layer whose ``capture`` kept this step's backward passes.
        k: Connections to replace: ``int(layer.nnz * drop_fraction)``.
        score: The method's grow score (``Method.score``); RigL's gradient magnitude by default.
        chunk_hook: Applied to each block of the gradient before it is scored; under DDP, an all-reduce
            mean (as DDP averages gradients), so every rank selects alike. Called the same number of times
            on every rank for the same inputs.
        generator: For the score (SET's draws).
        chunk_size: About how many positions a block holds (whole rows).
        sample: Let ``grow_candidates`` read a sample of blocks first (not for random scores, whose
            draws must come in order: ``not method.random_score``).

    Raises:
        ValueError: A layer that kept no backward pass.
    """
    capture = layer.capture
    if capture is None or not capture.pairs:
        raise ValueError(
            "The compact layer kept no backward pass to read its dense gradient from: set `layer.capture = "
            "Capture()` before the forward pass of the update step."
        )
    view = _StoredView(layer)
    pairs = [(x, g) if layer.weight_in_out else (g, x) for x, g in capture.pairs]
    values, cols = layer.weight_values.detach(), view.cols

    def scores(start: int, stop: int) -> Tensor:
        first, last = start // cols, -(-stop // cols)
        grad = None
        for left, right in pairs:
            part = left[:, first:last].t() @ right
            grad = part if grad is None else grad.add_(part)
        assert grad is not None
        if chunk_hook is not None:
            grad = chunk_hook(grad)
        offset = first * cols
        if score is gradient_magnitude:  # RigL's score reads the gradient only, and this block is ours
            return grad.abs_().reshape(-1)[start - offset : stop - offset]
        weight = _dense_rows(view, values, first, last)
        return score(weight, grad, generator).reshape(-1)[start - offset : stop - offset]

    rows_per_chunk = max(chunk_size // max(cols, 1), 1)
    return grow_candidates(ChunkedMask(view), k, scores, chunk_size=rows_per_chunk * cols, sample=sample)


def _dense_rows(view: _StoredView, values: Tensor, first: int, last: int) -> Tensor:
    """Stored rows ``first`` to ``last - 1`` of the dense weight (a block, for a score that reads the weight)."""
    begin, end = int(view.crow[first]), int(view.crow[last])
    at = torch.arange(begin, end, device=view.device)
    block = values.new_zeros((last - first) * view.cols)
    block.index_copy_(0, view.keys(first, last) - first * view.cols, values.index_select(0, view.slots(at)))
    return block.view(last - first, view.cols)


@torch.no_grad()
def compact_drop_and_grow(
    layer: CompactLayer, candidates: GrowCandidates, optimizers: Iterable[torch.optim.Optimizer]
) -> tuple[Tensor, Tensor]:
    """One RigL update of a compact layer: drop the ``k`` smallest ``|values|``, grow from the candidates.

    The same selection as :func:`~lightning_rigl.core.topology.drop_grow.select_drop_grow` on the dense
    weight, ties to the lower flat index of the stored weight. The values Parameter stays the same object
    and keeps ``nnz``; the grown entries start at 0 with ``optimizers``' fresh state.

    Returns:
        The flat stored positions of the new connections and of those dropped for good (int64).
    """
    view, values = _StoredView(layer), layer.weight_values
    k, nnz = candidates.k, layer.nnz
    empty = torch.empty(0, dtype=torch.long, device=view.device)
    if nnz == view.rows * view.cols or k <= 0:
        return empty, empty  # nothing inactive: the k dropped would be the k regrown
    magnitude = values.detach().abs()
    if view.in_out:
        magnitude = magnitude.index_select(0, view.structure.perm_t.long())
    dropped_at = top_k_indices(magnitude, k, largest=False)  # stored order: ties to the lower flat index
    del magnitude
    dropped = view.flat(dropped_at).to(candidates.index.dtype)
    grown = grow_from_candidates(candidates, dropped)
    new = grown.masked_select(~_members(grown, dropped)).long()
    gone_at = dropped_at.masked_select(~_members(dropped, torch.sort(grown).values))
    gone, gone_slots = view.flat(gone_at), view.slots(gone_at)
    del view, dropped_at, gone_at  # the old structure goes with the layer's last reference to it
    _rewrite(layer, gone_slots, new, optimizers)
    return torch.sort(new).values, gone


def _members(values: Tensor, ascending: Tensor) -> Tensor:
    """Which of ``values`` are in the ascending ``ascending`` (``torch.isin`` is many times slower on CPU)."""
    if not ascending.numel():
        return torch.zeros_like(values, dtype=torch.bool)
    at = torch.searchsorted(ascending, values).clamp_(max=ascending.numel() - 1)
    return ascending.index_select(0, at) == values


def _rewrite(layer: CompactLayer, gone: Tensor, new: Tensor, optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """Replace the entries at slots ``gone`` by new ones at flat ``new``; re-sort every per-element tensor alike."""
    values, structure = layer.weight_values, layer.compact_structure
    out_features, in_features = structure.shape
    device, small = values.device, out_features * in_features < 2**31
    # Logical flat keys (row * in + col), ascending in CSR order; 4 bytes an entry where they fit.
    key_dtype = torch.int32 if small else torch.int64
    keep = torch.ones(values.numel(), dtype=torch.bool, device=device)
    keep[gone] = False
    kept_key = csr_rows(structure.crow).mul_(in_features).add_(structure.col).to(key_dtype).masked_select(keep)
    kept = keep.nonzero().flatten().to(structure.col.dtype)
    del keep
    # The old indices are read no more: freed before the new ones are built (12 bytes an entry).
    layer.compact_structure = _RETIRED
    del structure
    new_rows, new_cols = logical_coordinates(new, layer.stored_shape, layer.weight_in_out)
    new_key = torch.sort(new_rows * in_features + new_cols).values.to(key_dtype)
    del new_rows, new_cols
    # Both key lists ascend: a merge by counting places every entry, no sort of all of them.
    kept_place = _places(new_key, kept_key, small)
    new_place = _places(kept_key, new_key, small).long()
    merged_key = torch.empty(values.numel(), dtype=key_dtype, device=device)
    merged_key[kept_place], merged_key[new_place] = kept_key, new_key
    del kept_key, new_key
    source = torch.zeros(values.numel(), dtype=kept.dtype, device=device)
    source[kept_place] = kept
    del kept, kept_place
    for tensor in _per_element(values, optimizers):
        tensor.copy_(tensor.index_select(0, source))
        tensor.index_fill_(0, new_place, 0)
    del source
    reset_optimizer_state(optimizers, values, new_place)  # fresh state where it is not 0 (Adagrad, Rprop)
    rows = torch.div(merged_key, in_features, rounding_mode="floor")
    cols = merged_key.sub_(rows * in_features)
    layer.compact_structure = CompactStructure.from_sorted(rows, cols, (out_features, in_features))


#: A compact layer's structure while an update builds its new one (never seen outside ``_rewrite``).
_RETIRED = CompactStructure(*(torch.empty(0, dtype=torch.int32),) * 5)


def _places(others: Tensor, keys: Tensor, small: bool) -> Tensor:
    """Where each of the ascending ``keys`` lands when merged with the ascending ``others`` (distinct from them)."""
    place = torch.searchsorted(others, keys, out_int32=small)
    return place.add_(torch.arange(keys.numel(), dtype=place.dtype, device=keys.device))


def _per_element(values: Tensor, optimizers: Iterable[torch.optim.Optimizer]) -> list[Tensor]:
    """The values, their gradient and each optimizer state tensor of their shape: what follows their order."""
    tensors = [values.data] + ([values.grad] if values.grad is not None else [])
    for optimizer in optimizers:
        for value in optimizer.state.get(values, {}).values():
            if isinstance(value, Tensor) and value.shape == values.shape:
                tensors.append(value)
    return tensors
