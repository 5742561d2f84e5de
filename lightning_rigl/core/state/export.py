"""Compact files for trained sparse models: active values plus a 1-bit mask or COO indices."""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Mapping
from typing import Any, overload

import torch
from torch import Tensor, nn

from lightning_rigl.core.state.packing import pack_bits, unpack_bits
from lightning_rigl.core.storage.state import dense_state_dict

FORMAT = "lightning-rigl-sparse"


def _encode(tensor: Tensor, mask: Tensor | None) -> dict[str, Any]:
    tensor = tensor.detach().cpu()
    if not tensor.is_floating_point() or tensor.dim() == 0:
        return {"encoding": "dense", "values": tensor.clone()}
    mask = (tensor != 0) if mask is None else mask.detach().cpu().bool()
    numel, nnz, size = tensor.numel(), int(mask.count_nonzero()), tensor.element_size()
    index_dtype = torch.int32 if numel < 2**31 else torch.int64
    costs = {
        "dense": numel * size,
        "bitmask": nnz * size + math.ceil(numel / 8),
        "coo": nnz * (size + torch.empty((), dtype=index_dtype).element_size()),
    }
    encoding = min(costs, key=costs.__getitem__)
    if encoding == "dense":
        return {"encoding": "dense", "values": tensor.clone()}
    entry = {"encoding": encoding, "shape": list(tensor.shape), "values": tensor[mask]}
    if encoding == "bitmask":
        entry["mask"] = pack_bits(mask)
    else:
        entry["indices"] = mask.reshape(-1).nonzero().flatten().to(index_dtype)
    return entry


def _decode(entry: Mapping[str, Any]) -> Tensor:
    values = entry["values"]
    if entry["encoding"] == "dense":
        return values
    shape = tuple(entry["shape"])
    out = torch.zeros(math.prod(shape), dtype=values.dtype)
    if entry["encoding"] == "bitmask":
        out[unpack_bits(entry["mask"], shape).reshape(-1)] = values
    else:
        out[entry["indices"].long()] = values
    return out.view(shape)


def save_sparse(
    model: nn.Module | Mapping[str, Tensor], path: str | os.PathLike, masks: Mapping[str, Tensor] | None = None
) -> None:
    """Save a model's ``state_dict`` with its zeros left out.

    Every floating tensor is stored in whichever of three encodings is smallest: dense, the non-zero
    values plus a 1-bit mask, or the values plus int32 COO indices. Other tensors (buffers, integer
    tensors) are stored as they are. The file loads with ``torch.load(weights_only=True)``.

    Args:
        model: A module (its ``state_dict()`` is saved) or a state dict of plain tensors. Compact layers
            (``RigLCallback(storage="compact")``) are saved as their dense weights would be: the file loads
            into the plain model.
        path: Where to write.
        masks: Optional name to bool mask (``RigLCallback.masks``): store exactly these positions, so
            an active weight that happens to be 0 stays in the mask. Default: the non-zeros.

    Raises:
        ValueError: A mask whose shape is not its tensor's, naming the tensor and both shapes.

    Example:
        >>> layer = nn.Linear(100, 100)
        >>> with torch.no_grad():
        ...     layer.weight[:, 10:] = 0
        >>> import tempfile; path = tempfile.mkdtemp() + "/model.pt"
        >>> save_sparse(layer, path)
        >>> torch.equal(load_sparse(path)["weight"], layer.weight)
        True
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    state = dense_state_dict(state)  # compact layers (values and indices) as their dense weights: one format
    masks = masks or {}
    for name, mask in masks.items():
        if name in state and tuple(mask.shape) != tuple(state[name].shape):
            raise ValueError(
                f"`masks[{name!r}]` has shape {tuple(mask.shape)}, but the tensor {name!r} has shape "
                f"{tuple(state[name].shape)}: a mask must have its tensor's shape (pass `RigLCallback.masks` "
                "of this model)."
            )
    tensors = {name: _encode(tensor, masks.get(name)) for name, tensor in state.items()}
    torch.save({"format": FORMAT, "version": 1, "tensors": tensors}, path)


@overload
def load_sparse(path: str | os.PathLike, model: None = None, map_location: Any = "cpu") -> dict[str, Tensor]: ...
@overload
def load_sparse(path: str | os.PathLike, model: nn.Module, map_location: Any = "cpu") -> nn.Module: ...
def load_sparse(
    path: str | os.PathLike, model: nn.Module | None = None, map_location: Any = "cpu"
) -> dict[str, Tensor] | nn.Module:
    """Load a file written by :func:`save_sparse`.

    Args:
        path: The file.
        model: If given, the dense tensors are loaded into it (``strict=True``) and it is returned.
        map_location: Passed to ``torch.load``.

    Returns:
        The dense ``state_dict``, or ``model`` with it loaded.

    Raises:
        ValueError: If the file was not written by :func:`save_sparse`, or cannot be read (corrupt or
            truncated), naming the file.
    """
    try:
        saved = torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise  # about the path, not the bytes: they name the file already
    except (RuntimeError, EOFError, OSError, IndexError, pickle.UnpicklingError) as error:  # torch.load's, by damage
        raise ValueError(
            f"{os.fspath(path)!r} cannot be read as a {FORMAT} file (corrupt or truncated?): {error}"
        ) from error
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a {FORMAT} file (written by lightning_rigl.save_sparse).")
    state = {name: _decode(entry) for name, entry in saved["tensors"].items()}
    if model is None:
        return state
    model.load_state_dict(state)
    return model
