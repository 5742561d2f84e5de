"""Weight gradients known to be 0 at every inactive position: records that spare a step two passes over them.

A :class:`GradientRecords` keeps them per layer, owned by the layers' kernels (``SparseKernels``), each
for one structure (its ``index`` tensor, by identity): a gradient written at an old structure's active
positions (a graph from before a topology update) vouches for nothing under the new one.

- **Written masked.** The sparse kernels write a weight gradient at the active positions only. Recorded
  as a :class:`GradientStamp`, it lets the optimizer step skip multiplying it by the mask
  (:meth:`GradientRecords.is_masked`). A stamp vouches for that one tensor's memory, unchanged: another
  tensor, even one allocated where a freed gradient was, with the same version, never matches.
- **Free for reuse.** Such a gradient, once its step is done, is still exactly 0 at every inactive
  position when the next backward needs a new one; the next backward writes its active values into it
  instead of zero-filling a new tensor (:meth:`GradientRecords.offer`, :meth:`GradientRecords.take`). By
  induction its inactive entries stay the exact zeros of the first fill. This is what
  ``zero_grad(set_to_none=False)`` does for every parameter, done only where it is safe: the tensor is
  unchanged since it was offered (its version), no longer the weight's ``.grad``, and referenced by no
  one else, so no tensor a user holds ever changes under them.

Recorded in eager autograd only: a compiled backward records nothing.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

_STORAGE_USERS = getattr(torch._C, "_storage_Use_Count", None)  # absent: never reuse (a view could exist)


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


class GradientRecords:
    """Per layer name, the gradient its sparse op last wrote and the one offered to its next backward.

    Example:
        >>> records = GradientRecords()
        >>> index, grad = torch.tensor([0, 3]), torch.tensor([1.0, 0.0, 0.0, 2.0])
        >>> records.record_written("fc", grad, index)
        >>> records.wrote_masked("fc", grad, index), records.wrote_masked("fc", grad, torch.tensor([0, 3]))
        (True, False)
        >>> records.is_masked("fc", grad, index), records.is_masked("fc", grad, index)
        (True, False)
        >>> records.offer("fc", torch.zeros(2, 2), index)
        >>> weight = torch.zeros(2, 2, requires_grad=True)
        >>> records.take("fc", weight, index).shape, records.take("fc", weight, index)
        (torch.Size([2, 2]), None)
    """

    def __init__(self) -> None:
        self._written: dict[str, tuple[GradientStamp, Tensor]] = {}  # the stamp and the structure's index
        self._free: dict[str, tuple[Tensor, int, Tensor]] = {}  # the gradient, its version, the structure's index

    def record_written(self, name: str, grad: Tensor, index: Tensor) -> None:
        """Note that ``grad`` was just written at the active positions (``index``) of layer ``name`` only."""
        self._written[name] = (GradientStamp(grad), index)

    def is_masked(self, name: str, grad: Tensor | None, index: Tensor) -> bool:
        """Whether ``grad`` is the gradient last written for ``name`` at ``index``, unchanged; uses the record up.

        Such a gradient is exactly 0 at every inactive position. Any other contribution (a second use of
        the weight, accumulation over micro-batches, DDP's copy of the all-reduced gradient, a hook that
        changed it in place) gives another tensor or a new version, and the answer is False. Writes that
        bypass the version counter (``.grad.data``, a raw in-place ``torch.distributed`` collective) are
        not seen.
        """
        record = self._written.pop(name, None)
        return record is not None and record[1] is index and record[0].matches(grad)

    def wrote_masked(self, name: str, grad: Tensor | None, index: Tensor) -> bool:
        """:meth:`is_masked` without using the record up (gradient hooks ask it during the backward)."""
        record = self._written.get(name)
        return record is not None and record[1] is index and record[0].matches(grad)

    def forget_written(self, name: str | None = None) -> None:
        """Drop the record of the gradient last written for ``name`` (None: every layer's), e.g. a new step begins."""
        if name is None:
            self._written.clear()
        else:
            self._written.pop(name, None)

    def offer(self, name: str, grad: Tensor | None, index: Tensor) -> None:
        """Offer ``grad``, exactly 0 at every inactive position of structure ``index``, to ``name``'s next backward.

        The caller vouches for the zeros: :meth:`is_masked` just said so. (Not a gradient multiplied
        by its mask: NaN * 0 is NaN.) Views (a gradient that lives in another buffer) and non-contiguous
        gradients are not kept.
        """
        if grad is None or grad._base is not None or not grad.is_contiguous():
            self._free.pop(name, None)
            return
        self._free[name] = (grad, grad._version, index)

    def take(self, name: str, weight: Tensor, index: Tensor) -> Tensor | None:
        """The gradient offered for ``name``, if it can be written over safely; else None. The offer is used up.

        It can where it was offered for the same structure (``index``), is unchanged since (its version),
        is no longer ``weight.grad``
        (``zero_grad`` set that to None, so nothing accumulates into it), and nothing else references it:
        no other Python name and no view of its storage.
        """
        grad, version, references = self._pop_offer(name, index)
        if grad is None or weight.grad is not None:
            return None
        # No other reference to the tensor (its count as for a tensor held by the offer alone), and none to
        # its storage but the tensor's and the storage object asked (a view would hold one more).
        unshared = references == _ALONE and _STORAGE_USERS is not None
        unshared = unshared and _STORAGE_USERS(grad.untyped_storage()._cdata) == 2
        fits = grad.shape == weight.shape and grad.dtype == weight.dtype and grad.device == weight.device
        return grad if unshared and fits and grad._version == version else None

    def forget(self, name: str | None = None) -> None:
        """Forget both records of ``name`` (None: every layer's): a rebuilt structure, or no sparse kernels."""
        for records in (self._free, self._written):
            if name is None:
                records.clear()
            else:
                records.pop(name, None)

    def _pop_offer(self, name: str, index: Tensor | None) -> tuple[Tensor | None, int, int]:
        """The gradient offered for ``name`` at ``index``, its version when offered, and its reference count here."""
        entry = self._free.pop(name, None)
        if entry is None or entry[2] is not index:
            return None, 0, 0
        grad, version, _ = entry
        del entry
        return grad, version, sys.getrefcount(grad)


def _references_of_an_offer_alone() -> int:
    # Measured, not assumed: what getrefcount reports differs between Python versions.
    records = GradientRecords()
    index = torch.empty(0)
    records._free[""] = (torch.empty(0), 0, index)
    return records._pop_offer("", index)[2]


_ALONE = _references_of_an_offer_alone()
