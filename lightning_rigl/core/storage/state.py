"""Converting between a compact model's ``state_dict`` and an ordinary dense one.

A compact layer ``fc`` saves ``fc.weight_values`` (its active values, CSR order) and ``fc._extra_state``
(its structure); the plain model saves ``fc.weight``. :func:`dense_state_dict` gives what the plain
model (``load_state_dict``, Lightning's ``load_from_checkpoint``) loads; :func:`compact_state_dict`
the other way, from dense weights and their masks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lightning_rigl.core.storage.layer import FORMAT, VALUES, structure_from_state
from lightning_rigl.core.storage.structure import CompactStructure

_EXTRA = "_extra_state"


def is_compact_entry(value: Any) -> bool:
    """Whether a ``state_dict`` value is a compact layer's saved structure.

    Example:
        >>> is_compact_entry({"format": FORMAT}), is_compact_entry([FORMAT])
        (True, False)
    """
    return isinstance(value, Mapping) and value.get("format") == FORMAT


def dense_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """An ordinary ``state_dict``: each compact layer's values and structure become its dense ``weight``.

    Every other entry is kept, in order; a layer's ``weight`` takes the place of its ``weight_values``.

    Raises:
        ValueError: A compact structure whose values are missing or of another size.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_rigl.core.storage import make_compact
        >>> layer = make_compact(nn.Linear(3, 2), torch.tensor([[True, False, True], [False, True, False]]))
        >>> dense = dense_state_dict(layer.state_dict())
        >>> list(dense), torch.equal(dense["weight"], layer.weight.detach())
        (['weight', 'bias'], True)
    """
    structures = {key[: -len(_EXTRA)]: value for key, value in state_dict.items() if key.endswith(_EXTRA)}
    structures = {prefix: value for prefix, value in structures.items() if is_compact_entry(value)}
    result: dict[str, Any] = {}
    for key, value in state_dict.items():
        prefix = key[: -len(VALUES)] if key.endswith(VALUES) else None
        if prefix is not None and prefix in structures:
            result[f"{prefix}weight"] = _dense_weight(value, structures[prefix], key)
        elif not (key.endswith(_EXTRA) and key[: -len(_EXTRA)] in structures):
            result[key] = value
    missing = [prefix for prefix in structures if prefix + VALUES not in state_dict]
    if missing:
        raise ValueError(f"Compact structures without their values: {[prefix + VALUES for prefix in missing]}.")
    return result


def _dense_weight(values: Tensor, state: Mapping[str, Any], key: str) -> Tensor:
    stored_shape, in_out = tuple(state["stored_shape"]), bool(state["weight_in_out"])
    structure = structure_from_state(state, stored_shape, in_out)
    if values.shape != (structure.nnz,):
        raise ValueError(f"{key!r} holds {tuple(values.shape)} values; its structure has {structure.nnz} active.")
    dense = values.new_zeros(stored_shape[0] * stored_shape[1])
    index = structure.to(values.device).stored_index(in_out)
    return dense.index_copy_(0, index, values.detach()).view(stored_shape)


def compact_state_dict(
    state_dict: Mapping[str, Any], masks: Mapping[str, Tensor], weight_in_out: Mapping[str, bool] | None = None
) -> dict[str, Any]:
    """A compact model's ``state_dict`` from a dense one and the masks of its compact layers' weights.

    Args:
        state_dict: An ordinary ``state_dict``.
        masks: Weight name (``"fc.weight"``) to its bool mask, of the stored weight's shape.
        weight_in_out: Weight name to whether it is stored (in, out) (Hugging Face ``Conv1D``); (out, in)
            where not given.

    Raises:
        ValueError: A mask whose weight is missing or of another shape.

    Example:
        >>> import torch
        >>> sd = {"weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "bias": torch.zeros(2)}
        >>> compact = compact_state_dict(sd, {"weight": torch.eye(2, dtype=torch.bool)})
        >>> list(compact), compact["weight_values"].tolist()
        (['weight_values', 'bias', '_extra_state'], [1.0, 4.0])
    """
    layouts = dict(weight_in_out or {})
    result: dict[str, Any] = {}
    extras: dict[str, dict[str, Any]] = {}
    for name, mask in masks.items():
        weight = state_dict.get(name)
        if (
            not isinstance(weight, Tensor)
            or weight.shape != mask.shape
            or weight.dim() != 2
            or not name.endswith("weight")
        ):
            got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            raise ValueError(f"`masks[{name!r}]` of shape {tuple(mask.shape)} needs a 2-D weight {name!r}, got {got}.")
    for key, value in state_dict.items():
        if key not in masks:
            result[key] = value
            continue
        prefix, mask, in_out = key[: -len("weight")], masks[key].bool(), layouts.get(key, False)
        logical = mask.t() if in_out else mask
        rows, cols = logical.nonzero().unbind(1)
        structure, _ = CompactStructure.from_coordinates(rows, cols, tuple(logical.shape))
        result[prefix + VALUES] = structure.gather(value, in_out)
        extras[prefix + _EXTRA] = {
            "format": FORMAT,
            "stored_shape": tuple(value.shape),
            "weight_in_out": in_out,
            "crow": structure.crow,
            "col": structure.col,
        }
    return {**result, **extras}


def compact_optimizer_state(saved: Mapping[str, Any], optimizer: Any, layers: Mapping[int, Any]) -> None:
    """Make a dense run's saved optimizer state fit an optimizer of compact layers, in place.

    Each per-element state tensor of the dense weight that a compact layer's values now take the place of
    (the same place in the optimizer's parameter list) becomes its entries at the layer's active
    positions, in CSR order. Other entries are left alone.

    Args:
        saved: ``optimizer.state_dict()`` of the dense run.
        optimizer: The optimizer that will load it.
        layers: ``id(layer.weight_values)`` to its compact layer.
    """
    current = [p for group in optimizer.param_groups for p in group["params"]]
    saved_ids = [index for group in saved["param_groups"] for index in group["params"]]
    for index, param in zip(saved_ids, current, strict=False):
        layer, state = layers.get(id(param)), saved["state"].get(index)
        if layer is None or state is None:
            continue
        for key, value in state.items():
            if isinstance(value, Tensor) and tuple(value.shape) == tuple(layer.stored_shape):
                state[key] = layer.compact_structure.gather(value, layer.weight_in_out)
