"""Weight gradients known to be 0 at every inactive position: records that spare a step two passes over them.

Both are kept per sparse structure (by its ``index`` tensor, weakly: a rebuilt structure starts with none).

- **Written masked.** The sparse kernels write a weight gradient at the active positions only. Recorded
  as a :class:`GradientStamp`, it lets the optimizer step skip multiplying it by the mask
  (:func:`gradient_is_masked`). A stamp vouches for that one tensor's memory, unchanged: another tensor,
  even one allocated where a freed gradient was, with the same version, never matches.
- **Free for reuse.** Such a gradient, once its step is done, is still exactly 0 at every inactive
  position when the next backward needs a new one; the next backward writes its active values into it
  instead of zero-filling a new tensor (:func:`offer_gradient`, :func:`take_gradient`). By induction
  its inactive entries stay the exact zeros of the first fill. This is what
  ``zero_grad(set_to_none=False)`` does for every parameter, done only where it is safe: the tensor is
  unchanged since it was offered (its version), no longer the weight's ``.grad``, and referenced by no
  one else, so no tensor a user holds ever changes under them.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

import torch
from torch import Tensor

_STORAGE_USERS = getattr(torch._C, "_storage_Use_Count", None)  # absent: never reuse (a view could exist)


class _ByTensor:
    """A table keyed by a tensor's identity, whose entry goes when that tensor is freed.

    ``torch.utils.weak.WeakTensorKeyDictionary`` does the same, but builds a weak reference for every
    lookup: about 10 us a call inside a training step, several calls a layer and step.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, Any]] = {}

    def __setitem__(self, key: Tensor, value: Any) -> None:
        address, entries = id(key), self._entries
        # The callback runs when the key is freed, before its id can be given to another object.
        self._entries[address] = (weakref.ref(key, lambda _: entries.pop(address, None)), value)

    def get(self, key: Tensor, default: Any = None) -> Any:
        entry = self._entries.get(id(key))
        return default if entry is None or entry[0]() is not key else entry[1]

    def pop(self, key: Tensor, default: Any = None) -> Any:
        entry = self._entries.pop(id(key), None)
        return default if entry is None or entry[0]() is not key else entry[1]


# Recorded in eager autograd only: a compiled backward records nothing.
_WRITTEN = _ByTensor()  # index -> GradientStamp of the gradient written at active positions
_FREE = _ByTensor()  # index -> (gradient, version when offered)


def record_written(grad: Tensor, index: Tensor) -> None:
    """Note that ``grad`` was just written at the active positions of the structure with ``index`` only."""
    _WRITTEN[index] = GradientStamp(grad)


def gradient_is_masked(grad: Tensor | None, index: Tensor) -> bool:
    """Whether ``grad`` is the weight gradient last written for the structure with ``index``, unchanged since.

    Such a gradient is exactly 0 at every inactive position. Any other contribution (a second use of
    the weight, accumulation over micro-batches, DDP's copy of the all-reduced gradient, a hook that
    changed it in place) gives another tensor or a new version, and the answer is False. Writes that
    bypass the version counter (``.grad.data``, a raw in-place ``torch.distributed`` collective) are
    not seen. The record is used up by the call.

    Example:
        >>> index, grad = torch.tensor([0, 3]), torch.tensor([1.0, 0.0, 0.0, 2.0])
        >>> record_written(grad, index)
        >>> gradient_is_masked(grad, index), gradient_is_masked(grad, index)
        (True, False)
    """
    stamp = _WRITTEN.pop(index, None)
    return stamp is not None and stamp.matches(grad)


def wrote_masked(grad: Tensor | None, index: Tensor) -> bool:
    """:func:`gradient_is_masked` without using the record up (gradient hooks ask it during the backward)."""
    stamp = _WRITTEN.get(index)
    return stamp is not None and stamp.matches(grad)


class GradientStamp:
    """Vouches that a gradient is the very tensor memory seen when it was made, unchanged since.

    A Python tensor object is no identity (a gradient's wrapper dies in the backward and ``.grad`` makes a
    new one), nor is an address (a freed gradient's memory goes to the next tensor allocated). The stamp
    holds the gradient's storage, so its memory cannot be freed and given to another tensor while the
    stamp lives: a tensor at that address with that version is the stamped one, unchanged (any in-place
    write through it or a view bumps the version; writes through ``.data`` do not, and are not seen).

    Example:
        >>> grad = torch.zeros(3)
        >>> stamp = GradientStamp(grad)
        >>> stamp.matches(grad), stamp.matches(grad.clone())
        (True, False)
        >>> _ = grad.add_(1.0)
        >>> stamp.matches(grad)
        False
    """

    __slots__ = ("_storage", "_address", "_version")

    def __init__(self, grad: Tensor) -> None:
        self._storage, self._address, self._version = grad.untyped_storage(), grad.data_ptr(), grad._version

    def matches(self, grad: Tensor | None) -> bool:
        """Whether ``grad`` is the stamped tensor's memory, unchanged since the stamp."""
        return self.same_memory(grad) and grad._version == self._version  # type: ignore[union-attr]

    def same_memory(self, grad: Tensor | None) -> bool:
        """Whether ``grad`` is the stamped tensor's memory, changed or not (accumulated into, say)."""
        return grad is not None and grad.data_ptr() == self._address


def forget_written(index: Tensor) -> None:
    """Drop the record of the gradient last written for the structure with ``index`` (a new step begins)."""
    _WRITTEN.pop(index, None)


def offer_gradient(grad: Tensor | None, index: Tensor) -> None:
    """Offer ``grad``, exactly 0 at every inactive position of the structure with ``index``, to its next backward.

    The caller vouches for the zeros: :func:`gradient_is_masked` just said so. (Not a gradient multiplied
    by its mask: NaN * 0 is NaN.) Views (a gradient that lives in another buffer) and non-contiguous
    gradients are not kept.
    """
    if grad is None or grad._base is not None or not grad.is_contiguous():
        _FREE.pop(index, None)
        return
    _FREE[index] = (grad, grad._version)


def take_gradient(index: Tensor, weight: Tensor) -> Tensor | None:
    """The offered gradient of the structure with ``index``, if it can be written over safely; else None.

    It can where it is unchanged since it was offered (its version), is no longer ``weight.grad``
    (``zero_grad`` set that to None, so nothing accumulates into it), and nothing else references it:
    no other Python name and no view of its storage. The offer is used up.

    Example:
        >>> weight, index = torch.zeros(2, 2, requires_grad=True), torch.tensor([0])
        >>> offer_gradient(torch.zeros(2, 2), index)
        >>> take_gradient(index, weight).shape, take_gradient(index, weight)
        (torch.Size([2, 2]), None)
    """
    grad, version, references = _pop_offer(index)
    if grad is None or weight.grad is not None:
        return None
    # No other reference to the tensor (its count as for a tensor held by the offer alone), and none to
    # its storage but the tensor's and the storage object asked (a view would hold one more).
    unshared = references == _ALONE and _STORAGE_USERS is not None
    unshared = unshared and _STORAGE_USERS(grad.untyped_storage()._cdata) == 2
    fits = grad.shape == weight.shape and grad.dtype == weight.dtype and grad.device == weight.device
    return grad if unshared and fits and grad._version == version else None


def _pop_offer(index: Tensor) -> tuple[Tensor | None, int, int]:
    """The offered gradient of ``index``, its version when offered, and its reference count here."""
    entry = _FREE.pop(index, None)
    if entry is None:
        return None, 0, 0
    grad, version = entry
    del entry
    return grad, version, sys.getrefcount(grad)


def _references_of_an_offer_alone() -> int:
    # Measured, not assumed: what getrefcount reports differs between Python versions.
    index = torch.empty(0)
    _FREE[index] = (torch.empty(0), 0)
    return _pop_offer(index)[2]


_ALONE = _references_of_an_offer_alone()


def forget_structures(indices: list[Tensor]) -> None:
    """Forget both records of these structures (their layers stop computing sparse)."""
    for index in indices:
        _FREE.pop(index, None)
        _WRITTEN.pop(index, None)
