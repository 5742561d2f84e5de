"""A run's compact layers, by their weight's name: their masks on demand, their captures, reads and updates.

:class:`~lightning_rigl.core.SparseTraining` keeps the weights it stores densely in its ``LayerMasks`` and
its compact layers here. A compact layer's structure is its mask: nothing of the layer's dense size is
kept for it, its ever-active record is a list of positions or bits (whichever is smaller), and its saved
state holds no mask (the structure travels with the model's own ``state_dict``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_rigl.core.storage.ever_active import EverActive
from lightning_rigl.core.storage.functional import Capture
from lightning_rigl.core.storage.layer import CompactLayer
from lightning_rigl.core.storage.update import ChunkedMask, compact_drop_and_grow, compact_grow_candidates
from lightning_rigl.core.topology.candidates import GrowCandidates, grow_candidates
from lightning_rigl.core.topology.methods import Method


class CompactLayers:
    """The compact layers of a run, each under its weight's name (``"fc.weight"``).

    Args:
        layers: Weight name to compact layer (see :func:`~lightning_rigl.core.storage.make_compact`).

    Example:
        >>> from lightning_rigl.core.storage import make_compact
        >>> layer = make_compact(nn.Linear(3, 2), torch.tensor([[True, False, True], [False, True, False]]))
        >>> compact = CompactLayers({"fc.weight": layer})
        >>> compact.counts, compact.mask("fc.weight").tolist(), compact.itop_counts()
        ({'fc.weight': 3}, [[True, False, True], [False, True, False]], (3, 6))
    """

    def __init__(self, layers: Mapping[str, CompactLayer]) -> None:
        self.layers = dict(layers)
        self.ever_active = {name: EverActive(self._numel(name), self.positions(name)) for name in self.layers}

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    @property
    def counts(self) -> dict[str, int]:
        """Active weights per layer, fixed for the run."""
        return {name: layer.nnz for name, layer in self.layers.items()}

    def shape(self, name: str) -> torch.Size:
        """The shape layer ``name``'s dense weight is stored in (what a dense mask of it would have)."""
        return torch.Size(self.layers[name].stored_shape)

    def values(self, name: str) -> nn.Parameter:
        """Layer ``name``'s active values (the Parameter an optimizer holds)."""
        return self.layers[name].weight_values

    def names(self, params: Any = None) -> list[str]:
        """The layers whose values are among ``params`` (an optimizer, some tensors, or None for all)."""
        if not self.layers:
            return []  # a run without compact layers: every step, nothing to list
        if params is None:
            return list(self.layers)
        if isinstance(params, torch.optim.Optimizer):
            params = [p for group in params.param_groups for p in group["params"]]
        ids = {id(p) for p in params}
        return [name for name, layer in self.layers.items() if id(layer.weight_values) in ids]

    def positions(self, name: str) -> Tensor:
        """The flat positions of layer ``name``'s active weights in its stored weight, ascending (int64)."""
        layer = self.layers[name]
        return torch.sort(layer.compact_structure.stored_index(layer.weight_in_out)).values

    def mask(self, name: str) -> Tensor:
        """Layer ``name``'s bool mask of its stored shape, made now (it is nowhere kept)."""
        shape = self.shape(name)
        flat = torch.zeros(math.prod(shape), dtype=torch.bool, device=self.values(name).device)
        return flat.index_fill_(0, self.positions(name), True).view(shape)

    def itop_counts(self) -> tuple[int, int]:
        """(positions ever active, weights) over every compact layer."""
        ever = sum(record.count for record in self.ever_active.values())
        return ever, sum(self._numel(name) for name in self.layers)

    def begin(self, reading: bool) -> None:
        """Before a forward pass: whether the layers keep their backward passes from now on.

        If the coming step reads dense gradients, each backward's input and output gradient is kept (every
        micro-batch) until :meth:`release`: once the layer's step read them, or its optimizer stepped, as a
        gradient accumulates until then. A layer due whose backward was not kept waits for its next step (in
        manual optimization, a later optimizer's step after a backward made before a step that did not read).
        """
        for layer in self.layers.values():
            if not reading:
                layer.capture = None
            elif layer.capture is None:
                layer.capture = Capture()

    def release(self, names: Iterable[str]) -> None:
        """Forget what the backward passes of layers ``names`` kept (read, or their optimizer stepped).

        Another optimizer's layers keep theirs until its own step.
        """
        for name in names:
            self.layers[name].capture = None

    def kept_backward(self, name: str) -> bool:
        """Whether layer ``name`` kept a backward pass to read its dense gradient from."""
        capture = self.layers[name].capture
        return capture is not None and bool(capture.pairs)

    def has_gradient(self, name: str) -> bool:
        """Whether layer ``name``'s values have a gradient this step."""
        return self.values(name).grad is not None

    def grow_candidates(self, name: str, method: Method, fraction: float, generator: torch.Generator) -> GrowCandidates:
        """Layer ``name``'s grow candidates for an update of drop fraction ``fraction``.

        RigL's dense gradient is read block by block from the kept backward passes, each block averaged over
        the data-parallel ranks; SET's random scores are drawn block by block, in order, as the dense path draws.
        """
        layer, score = self.layers[name], method.score
        k = int(layer.nnz * fraction)
        if method.dense_gradient != "never":
            return compact_grow_candidates(
                layer, k, score=score, chunk_hook=mean_over_ranks, generator=generator, sample=not method.random_score
            )
        values = layer.weight_values.detach()

        def scores(start: int, stop: int) -> Tensor:  # a score that reads neither weight nor gradient (SET's)
            return score(values.new_empty(stop - start), None, generator)

        return grow_candidates(ChunkedMask.of(layer), k, scores, sample=False)

    def update(self, name: str, candidates: GrowCandidates, optimizers: Iterable[torch.optim.Optimizer]) -> int:
        """Drop and grow layer ``name`` (grown connections at 0, fresh optimizer state); returns the new connections."""
        new, _ = compact_drop_and_grow(self.layers[name], candidates, list(optimizers))
        self.ever_active[name].add(new)
        return int(new.numel())

    def state_dict(self) -> dict[str, Any]:
        """Each layer's ever-active record (positions, or bits as uint8); the structures travel with the model's."""
        return {name: {"ever_active": record.state()} for name, record in self.ever_active.items()}

    def load_layer(self, name: str, saved: Mapping[str, Any]) -> None:
        """Restore layer ``name``'s entry of :meth:`state_dict` (its structure came back with the model's weights)."""
        record = EverActive.from_state(self._numel(name), saved["ever_active"].to(self.values(name).device))
        record.add(self.positions(name))
        self.ever_active[name] = record

    def ever_active_from_mask(self, name: str, ever: Tensor) -> None:
        """Take a dense run's ever-active record (a bool tensor of the stored shape) for layer ``name``."""
        positions = ever.reshape(-1).nonzero().flatten().to(self.values(name).device)
        self.ever_active[name] = EverActive(self._numel(name), torch.cat([positions, self.positions(name)]))

    def _numel(self, name: str) -> int:
        return math.prod(self.shape(name))


def mean_over_ranks(block: Tensor) -> Tensor:
    """A block of a dense gradient averaged over the data-parallel ranks, as DDP averages gradients (a collective).

    Example:
        >>> mean_over_ranks(torch.ones(2)).tolist()  # one process: the block itself
        [1.0, 1.0]
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return block
    world = torch.distributed.get_world_size()
    if world > 1:
        torch.distributed.all_reduce(block)
        block.div_(world)
    return block
