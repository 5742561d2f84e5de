"""LayerMasks: the masks of a run, one per masked weight, with their active counts and ever-active record."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from lightning_rigl.core.parallel.sharding import (
    distribute_like_param,
    full_like_param,
    gather_full,
    is_sharded,
    local_shard,
)
from lightning_rigl.core.state.packing import pack_bits, unpack_bits
from lightning_rigl.core.topology.candidates import GrowCandidates
from lightning_rigl.core.topology.drop_grow import select_drop_grow
from lightning_rigl.core.topology.masking import multiply_by_masks


class LayerMasks:
    """One mask per weight, stored like the weight: its dtype, its device, this rank's shard under FSDP2.

    Masks are kept in the weight's dtype because multiplying by a float mask is several times faster
    on CPU than by a bool one, and that multiply runs on every step. Each layer's active count is fixed
    by :meth:`replace` and kept by every update. ``ever_active`` records each position that was ever
    active (1 byte a weight), for the in-time over-parameterization rate.

    Args:
        params: Layer name to the weight it masks.

    Example:
        >>> masks = LayerMasks({"w": nn.Parameter(torch.ones(2, 2))})
        >>> masks.replace({"w": torch.tensor([[True, False], [False, False]])})
        >>> masks.local["w"].tolist(), masks.counts, masks.itop_rate
        ([[1.0, 0.0], [0.0, 0.0]], {'w': 1}, 0.25)
    """

    def __init__(self, params: Mapping[str, nn.Parameter]) -> None:
        self.params = params
        self.local: dict[str, Tensor] = {}  # this rank's part of each mask, in the weight's dtype
        self.counts: dict[str, int] = {}
        self.ever_active: dict[str, Tensor] = {}  # this rank's part, bool

    def replace(self, masks: Mapping[str, Tensor]) -> None:
        """Take new masks (bool or 0/1 tensors of each weight's full shape); the weights are not touched.

        Raises:
            ValueError: A mask missing or of another shape than its weight.
        """
        for name, p in self.params.items():
            if name not in masks or tuple(masks[name].shape) != tuple(p.shape):
                got = tuple(masks[name].shape) if name in masks else "no mask"
                raise ValueError(f"`masks[{name!r}]` must have the weight's shape {tuple(p.shape)}, got {got}.")
        self.counts = {name: int(masks[name].count_nonzero()) for name in self.params}
        self.local = {
            name: local_shard(distribute_like_param(masks[name].to(local_shard(p).device, p.dtype), p)).contiguous()
            for name, p in self.params.items()
        }
        for name, mask in self.local.items():
            ever = self.ever_active.get(name)
            self.ever_active[name] = mask.bool() if ever is None else ever | mask.bool()

    @property
    def itop_rate(self) -> float:
        """Fraction of the masked weights that have ever been active (over this rank's shards)."""
        total = sum(mask.numel() for mask in self.ever_active.values())
        return sum(int(mask.count_nonzero()) for mask in self.ever_active.values()) / max(total, 1)

    def packed(self) -> dict[str, dict[str, Tensor]]:
        """The masks and the ever-active record at 1 bit a weight, whole (gathered from every rank)."""
        return {
            "masks": {name: pack_bits(self._whole(name, self.local)) for name in self.params},
            "ever_active": {name: pack_bits(self._whole(name, self.ever_active)) for name in self.params},
        }

    def load_packed(self, masks: Mapping[str, Tensor], ever_active: Mapping[str, Tensor]) -> None:
        """Restore :meth:`packed`'s output (the shapes are the weights')."""
        shapes = {name: tuple(p.shape) for name, p in self.params.items()}
        self.replace({name: unpack_bits(masks[name], shapes[name]) for name in self.params})
        self.ever_active = {
            name: local_shard(distribute_like_param(unpack_bits(ever_active[name], shapes[name]), p))
            for name, p in self.params.items()
        }

    def update(self, name: str, candidates: GrowCandidates) -> tuple[Tensor, Tensor]:
        """One topology update of layer ``name`` from its grow candidates, read from this very mask.

        A sharded layer's mask and weight are gathered (one layer at a time), every rank decides alike
        on the whole layer, and each keeps its shard.

        Returns:
            The flat indices (within this rank's shard) of the new connections and of those dropped for good.
        """
        param = self.params[name]
        if is_sharded(param):
            return self._update_sharded(name, candidates)
        mask = self.local[name].view(-1)
        dropped, grown = select_drop_grow(mask, param, candidates)
        # index_select and index_fill_, not indexing: several times faster on CPU.
        new = grown.masked_select(mask.index_select(0, grown) == 0)
        mask.index_fill_(0, dropped, 0)
        mask.index_fill_(0, grown, 1)
        self.ever_active[name].view(-1).index_fill_(0, grown, True)
        return new, dropped.masked_select(mask.index_select(0, dropped) == 0)

    def whole(self, name: str) -> Tensor:
        """Layer ``name``'s mask of the weight's full shape (gathered from every rank when sharded), bool."""
        return self._whole(name, self.local)

    def _update_sharded(self, name: str, candidates: GrowCandidates) -> tuple[Tensor, Tensor]:
        param = self.params[name]
        old = self.whole(name).reshape(-1)
        dropped, grown_at = select_drop_grow(old, gather_full(param), candidates)
        new = old.clone()
        new[dropped] = False
        new[grown_at] = True
        grown = torch.zeros_like(old)
        grown[grown_at[~old[grown_at]]] = True  # regrown positions were active before: not new
        new, grown = new.view(param.shape), grown.view(param.shape)
        new, grown = local_shard(distribute_like_param(new, param)), local_shard(distribute_like_param(grown, param))
        gone = self.local[name].bool() & ~new
        self.local[name] = new.to(param.dtype).contiguous()
        self.ever_active[name] |= new
        return grown.reshape(-1).nonzero().flatten(), gone.reshape(-1).nonzero().flatten()

    def zero_inactive(self, names: Iterable[str], gradients: bool = False) -> None:
        """Multiply the weights of ``names`` (or their gradients) by their masks, this rank's shards, in one call."""
        names = list(names)
        if not names:
            return  # the usual case after a step: nothing to re-zero, and no autograd mode to switch
        tensors = [self.params[name].grad if gradients else self.params[name] for name in names]
        multiply_by_masks([local_shard(tensor) for tensor in tensors], [self.local[name] for name in names])

    @torch.no_grad()
    def apply_to_copy(self, model: nn.Module) -> list[str]:
        """Zero the inactive weights in a copy of the masked model, such as an averaged one (EMA, SWA).

        Parameters are matched by name and shape; an ``AveragedModel``'s ``module.`` prefix is allowed.

        Returns:
            The masked names found in ``model``.

        Example:
            >>> layer = nn.Linear(4, 4)
            >>> masks = LayerMasks({"weight": layer.weight})
            >>> masks.replace({"weight": torch.arange(16).reshape(4, 4) % 2 == 0})
            >>> average = torch.optim.swa_utils.AveragedModel(nn.Linear(4, 4))
            >>> masks.apply_to_copy(average), int(average.module.weight.count_nonzero())
            (['weight'], 8)
        """
        copies = dict(model.named_parameters())
        found = []
        for name, param in self.params.items():
            copy = copies.get(name, copies.get(f"module.{name}"))
            if copy is None or copy.shape != param.shape or copy is param:
                continue
            local_shard(copy).mul_(self.local[name].to(local_shard(copy).device, copy.dtype))
            found.append(name)
        return found

    def _whole(self, name: str, masks: Mapping[str, Tensor]) -> Tensor:
        return full_like_param(masks[name], self.params[name]).bool()
