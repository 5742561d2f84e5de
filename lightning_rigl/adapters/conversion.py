"""An ordinary checkpoint from a compact run's: dense weights the plain model loads, and a dense run's RigL state."""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from lightning_rigl.core.state.packing import pack_bits
from lightning_rigl.core.storage.state import dense_state_dict, is_compact_entry

_EXTRA = "_extra_state"


def to_dense_checkpoint(path_in: str | os.PathLike, path_out: str | os.PathLike) -> None:
    """Write an ordinary Lightning checkpoint from one of a ``RigLCallback(storage="compact")`` run.

    Each compact layer's active values and indices become its dense ``weight`` (zero where inactive), so
    the plain model loads it: ``YourModule.load_from_checkpoint(path_out)``, or
    ``model.load_state_dict(torch.load(path_out)["state_dict"])``, without this package. RigLCallback's state
    becomes a ``storage="dense"`` run's (masks at 1 bit a weight): ``trainer.test(ckpt_path=path_out)`` and
    ``callback.masks`` see the same masks. The optimizer state is left out (its compact layers' entries
    are in the compact order): to go on training, resume from the compact checkpoint itself.

    Args:
        path_in: A checkpoint a compact run saved (``ModelCheckpoint``, ``trainer.save_checkpoint``).
        path_out: Where to write the ordinary one (may be ``path_in``).

    Example:
        >>> to_dense_checkpoint("compact.ckpt", "dense.ckpt")  # doctest: +SKIP
        >>> model = MyModule.load_from_checkpoint("dense.ckpt")  # doctest: +SKIP
    """
    checkpoint: dict[str, Any] = torch.load(path_in, map_location="cpu", weights_only=True)
    compact = checkpoint["state_dict"]
    structures = {
        key[: -len(_EXTRA)] + "weight": value
        for key, value in compact.items()
        if key.endswith(_EXTRA) and is_compact_entry(value)
    }
    checkpoint["state_dict"] = dense_state_dict(compact)
    for state in checkpoint.get("callbacks", {}).values():
        if isinstance(state, dict) and isinstance(state.get("compact"), dict) and "masks" in state:
            for name, saved in state.pop("compact").items():
                state["masks"][name] = pack_bits(_mask(structures[name], None))
                ever = saved["ever_active"]  # positions, or bits already in pack_bits' layout
                bits = ever if ever.dtype == torch.uint8 else pack_bits(_mask(structures[name], ever))
                state["ever_active"][name] = bits
    checkpoint.pop("optimizer_states", None)
    torch.save(checkpoint, path_out)


def _mask(structure: dict[str, Any], positions: torch.Tensor | None) -> torch.Tensor:
    """A bool mask of a compact layer's stored shape, True at ``positions`` (by default its active ones)."""
    dense = dense_state_dict({"weight_values": torch.ones(structure["col"].numel()), _EXTRA: structure})["weight"]
    if positions is None:
        return dense.bool()
    flat = torch.zeros(math.prod(dense.shape), dtype=torch.bool)
    return flat.index_fill_(0, positions.long(), True).view(dense.shape)
