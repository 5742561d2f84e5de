"""Compact layers: a Linear-type module that stores only its active weights, and stays the user's module.

:func:`make_compact` turns an ``nn.Linear`` (or a Hugging Face ``Conv1D``, or a class given to
:func:`~lightning_rigl.core.sparsity.linear_types.register_linear`) into a compact layer in place: its class
becomes a subclass of its own (cached, one per class), so ``isinstance`` checks and its other
attributes stay. Its dense ``weight`` Parameter is replaced by ``weight_values``, a Parameter of the
``nnz`` active values in ``W``'s CSR order (row-major over the logical (out, in) weight, whatever
the stored layout), and its structure travels with the module's own state (``get_extra_state``),
not as buffers.

Reading ``layer.weight`` gives the dense weight, computed on access (differentiable in the values); a
write to ``layer.weight`` raises. Per-element optimizer state follows the values: in CSR order too, and
re-sorted with them at every topology update (see :mod:`~lightning_rigl.core.storage.update`).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_rigl.core.storage.functional import Capture, compact_linear
from lightning_rigl.core.storage.init import default_init
from lightning_rigl.core.storage.structure import CompactStructure

#: Marks a compact layer's extra state in a ``state_dict`` (see :func:`~lightning_rigl.core.storage.dense_state_dict`).
FORMAT = "lightning_rigl.compact/1"
VALUES = "weight_values"


class CompactLayer(nn.Module):
    """The methods every compact layer class adds to its Linear class (see :func:`make_compact`).

    Attributes:
        weight_values: The active values, in ``W``'s CSR order.
        compact_structure: Where they are (:class:`~lightning_rigl.core.storage.structure.CompactStructure`).
        stored_shape: The shape the dense weight is stored in: (out, in), or (in, out) for ``Conv1D``.
        weight_in_out: Whether the dense weight is stored (in, out).
        capture: While not None, each backward keeps its input and output gradient there.
    """

    weight_values: nn.Parameter
    compact_structure: CompactStructure
    stored_shape: tuple[int, int]
    weight_in_out: bool
    capture: Capture | None

    def forward(self, x: Tensor) -> Tensor:
        """``x W^T + b`` on the sparse kernels; in the values' dtype (float32 for a float32 layer under autocast)."""
        values = self.weight_values
        if torch.is_autocast_enabled(x.device.type):
            # The sparse kernels take float32 and float64 only: the layer computes in its own dtype.
            with torch.autocast(x.device.type, enabled=False):
                return compact_linear(x.to(values.dtype), values, self.bias, self._structure_on(values), self.capture)
        if x.dtype != values.dtype:
            raise RuntimeError(
                f"A compact {type(self).__name__} of dtype {values.dtype} got an input of dtype {x.dtype}: "
                "convert one of them."
            )
        return compact_linear(x, values, self.bias, self._structure_on(values), self.capture)

    def _structure_on(self, values: Tensor) -> CompactStructure:
        structure = self.compact_structure
        if structure.col.device != values.device:
            structure = self.compact_structure = structure.to(values.device)
        return structure

    @property
    def weight(self) -> Tensor:
        """The dense weight in its stored shape, computed from the values (a new tensor at every read)."""
        values = self.weight_values
        index = self._structure_on(values).stored_index(self.weight_in_out)
        dense = values.new_zeros(self.stored_shape[0] * self.stored_shape[1])
        return dense.index_copy(0, index, values).view(self.stored_shape)

    @weight.setter
    def weight(self, value: Any) -> None:
        raise AttributeError(_WRITE_REFUSED.format(cls=type(self).__name__))

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight":
            raise AttributeError(_WRITE_REFUSED.format(cls=type(self).__name__))
        super().__setattr__(name, value)

    @property
    def nnz(self) -> int:
        """The number of active weights."""
        return self.compact_structure.nnz

    def get_extra_state(self) -> dict[str, Any]:
        """The structure, as ``state_dict`` saves it: the CSR indices of ``W`` and the stored layout."""
        s = self.compact_structure
        return {
            "format": FORMAT,
            "stored_shape": tuple(self.stored_shape),
            "weight_in_out": self.weight_in_out,
            "crow": s.crow.clone(),
            "col": s.col.clone(),
        }

    def set_extra_state(self, state: Any) -> None:
        """Take the structure :meth:`get_extra_state` saved (the values come as ``weight_values``)."""
        self.compact_structure = structure_from_state(state, self.stored_shape, self.weight_in_out)
        self._structure_on(self.weight_values)

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        dense = state_dict.get(prefix + "weight")
        if isinstance(dense, Tensor) and prefix + VALUES not in state_dict:
            # An ordinary (dense) state_dict: the values at this layer's active positions. A weak reference to the
            # dense weight (alive while its checkpoint is) serves a run that resumes the dense run's masks.
            assert isinstance(state_dict, dict)
            state_dict[prefix + VALUES] = self._structure_on(self.weight_values).gather(dense, self.weight_in_out)
            state_dict[f"{prefix}_extra_state"] = self.get_extra_state()
            del state_dict[prefix + "weight"]
            self.__dict__["loaded_dense"] = weakref.ref(dense)
        # The saved structure may hold another number of values than this layer (another density): the
        # values Parameter is resized first, the same object, before the load copies into it.
        state = state_dict.get(f"{prefix}_extra_state")
        saved = state_dict.get(prefix + VALUES)
        if isinstance(state, Mapping) and isinstance(saved, Tensor) and saved.shape != self.weight_values.shape:
            with torch.no_grad():
                self.weight_values.data = self.weight_values.new_empty(saved.shape)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        result = super()._apply(fn, recurse)
        self._structure_on(self.weight_values)  # .to(device) moves Parameters and buffers only
        return result

    def reset_parameters(self) -> None:
        """Draw the active values (and the bias) anew, as the Linear class's own initialisation draws its weights."""
        default_init(self, self.weight_values, self.bias, fan_in=self.compact_structure.shape[1])

    def extra_repr(self) -> str:
        """The Linear class's description, with the active count and density."""
        out_features, in_features = self.compact_structure.shape
        density = self.nnz / max(out_features * in_features, 1)
        return f"{super().extra_repr()}, compact: {self.nnz} active ({density:.2%})"

    def __reduce_ex__(self, protocol: Any) -> Any:
        # The compact class is made at run time and cannot be found by name: a pickle names its base.
        rebuild, args, *rest = super().__reduce_ex__(protocol)
        return (_new_compact, (_base_class(type(self)),), *rest)


_WRITE_REFUSED = (
    "A compact {cls} stores only its active weights (`weight_values`): its `weight` is computed on every read, "
    "so a write to it would be lost. Build the layer anew with `make_compact(layer, mask)` from a dense one, or "
    "write `weight_values` (the active values, in CSR order)."
)


@functools.cache
def compact_class(base: type[nn.Module]) -> type[nn.Module]:
    """The compact subclass of a Linear class (one per class, cached): ``isinstance`` still holds.

    Example:
        >>> cls = compact_class(nn.Linear)
        >>> issubclass(cls, nn.Linear), issubclass(cls, CompactLayer), cls.__name__
        (True, True, 'CompactLinear')
    """
    # nn.Linear's own forward comes after CompactLayer's in the MRO; its `weight` annotation is harmless.
    return type(f"Compact{base.__name__}", (CompactLayer, base), {"__module__": base.__module__, "_compact_base": base})


def _base_class(cls: type) -> type[nn.Module]:
    return cls._compact_base  # type: ignore[attr-defined]


def _new_compact(base: type[nn.Module]) -> nn.Module:
    """An empty compact layer of ``base``'s compact class, for pickle to fill with its saved state."""
    cls = compact_class(base)
    return cls.__new__(cls)


def is_compact(module: nn.Module) -> bool:
    """Whether ``module`` is a compact layer.

    Example:
        >>> is_compact(nn.Linear(2, 2))
        False
    """
    return isinstance(module, CompactLayer)


def structure_from_state(state: Any, stored_shape: tuple[int, int], in_out: bool) -> CompactStructure:
    """The structure a compact layer's saved extra state holds, checked against the layer's shape and layout.

    Raises:
        ValueError: State that is not a compact layer's, or one of another shape or layout.
    """
    if not isinstance(state, Mapping) or state.get("format") != FORMAT:
        raise ValueError(
            f"Expected a compact layer's saved structure (a dict with format {FORMAT!r}), got {type(state).__name__}."
        )
    if tuple(state["stored_shape"]) != tuple(stored_shape) or bool(state["weight_in_out"]) != in_out:
        raise ValueError(
            f"The saved structure is of a weight stored {tuple(state['stored_shape'])} "
            f"(weight_in_out={state['weight_in_out']}); this layer's is {tuple(stored_shape)} (weight_in_out={in_out})."
        )
    in_features = stored_shape[0] if in_out else stored_shape[1]
    return CompactStructure.from_csr(state["crow"], state["col"], in_features)
