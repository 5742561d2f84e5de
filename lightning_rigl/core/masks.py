"""LayerMasks: the masks of a run, one per masked weight, with their active counts and ever-active record."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from lightning_rigl.core.packing import pack_bits, unpack_bits
from lightning_rigl.core.sharding import distribute_like_param, full_like_param, gather_full, is_sharded, local_shard
from lightning_rigl.core.topology import drop_and_grow, drop_grow_indices


class LayerMasks:
    """One mask per weight, stored like the weight: its dtype, its device, this rank's shard under FSDP2.

    Masks are kept in the weight's dtype because multiplying by a float mask is several times faster
    on CPU than by a bool one, and that multiply runs on every step. Each layer's active count is fixed
    by :meth:`replace` and kept by every update. ``ever_active`` records each position that was ever
    active (1 byte a weight), for the in-time over-parameterization rate.

    Args:
        params: Layer name to the weight it masks.

    Example:
        >>> import torch
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

    def drop_and_grow(self, name: str, scores: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
        """One topology update of layer ``name`` (see :func:`~lightning_rigl.core.topology.drop_grow_indices`).

        ``scores`` are the caller's to overwrite. A sharded layer is gathered, decided on every rank
        alike, and this rank keeps its shard.

        Returns:
            The flat indices (within this rank's shard) of the new connections and of those dropped for good.
        """
        param = self.params[name]
        if is_sharded(param):
            return self._drop_and_grow_sharded(name, scores, fraction)
        mask = self.local[name].view(-1)
        dropped, grown = drop_grow_indices(mask, param, scores, fraction, overwrite_scores=True)
        new = grown[mask[grown] == 0]
        mask[dropped] = 0
        mask[grown] = 1
        self.ever_active[name].view(-1)[grown] = True
        return new, dropped[mask[dropped] == 0]

    def _drop_and_grow_sharded(self, name: str, scores: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
        param = self.params[name]
        old = full_like_param(self.local[name], param).bool()
        new, grown = drop_and_grow(old, gather_full(param), gather_full(scores), fraction, overwrite_scores=True)
        new, grown = local_shard(distribute_like_param(new, param)), local_shard(distribute_like_param(grown, param))
        gone = self.local[name].bool() & ~new
        self.local[name] = new.to(param.dtype).contiguous()
        self.ever_active[name] |= new
        return grown.reshape(-1).nonzero().flatten(), gone.reshape(-1).nonzero().flatten()

    def _whole(self, name: str, masks: Mapping[str, Tensor]) -> Tensor:
        return full_like_param(masks[name], self.params[name]).bool()
