"""Plain tensors and FSDP2's sharded DTensors behind one small interface.

Masks of sharded weights are stored as each rank's local shard only. At an update the core gathers
one layer at a time (weight, grow score and mask), runs the same drop-and-grow on every rank, and
keeps its own shard of the result. For plain tensors every function here is the identity.
"""

from __future__ import annotations

from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch built without distributed support
    DTensor = None  # type: ignore[assignment,misc]


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2 / ``fully_shard``)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local_shard(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (this rank's part), else the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def gather_full(tensor: Tensor) -> Tensor:
    """The whole tensor: gathered from every rank for a DTensor (a collective), else itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def full_like_param(shard: Tensor, param: Tensor) -> Tensor:
    """Gather a local ``shard`` laid out like the sharded ``param`` into the whole tensor."""
    return gather_full(wrap_like_param(shard, param))


def distribute_like_param(whole: Tensor, param: Tensor) -> Tensor:
    """``whole`` (held identically on every rank) laid out like ``param``: a DTensor if it is one."""
    if not is_sharded(param):
        return whole
    # src_data_rank=None: every rank already holds `whole`, so slicing needs no communication.
    return distribute_tensor(
        whole.to(local_shard(param).device), param.device_mesh, param.placements, src_data_rank=None
    )


def wrap_like_param(shard: Tensor, param: Tensor) -> Tensor:
    """A local ``shard`` viewed as a tensor of ``param``'s full shape (a DTensor if it is one), no copy."""
    if not is_sharded(param):
        return shard
    return DTensor.from_local(shard, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())
