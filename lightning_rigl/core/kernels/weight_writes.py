"""Seeing every write to a Parameter, those through ``.data`` included, so a cache of its values is never stale.

An in-place write bumps a tensor's version counter and a new tensor has another address, but
``p.data`` is a new tensor with a counter of its own: ``p.data.mul_(2)`` or ``p.data.copy_(src)``
(what weight-averaging code does) changes ``p`` with ``p._version`` unchanged. :func:`watch_writes`
makes a Parameter count its ``.data`` reads and sets and follow the counters of the aliases it hands
out while they live, so ``(p.data_ptr(), p._version, writes.stamp())`` changes whenever ``p``'s values may
have. Writes that bypass torch (through ``.numpy()``, DLPack, or ``.data`` of another tensor sharing
its memory) stay unseen.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

_TENSOR_DATA = torch._C.TensorBase.__dict__["data"]  # the getter and setter every Tensor uses
_RECORD = "_lightning_rigl_writes"  # the attribute of a watched Parameter that holds its _Writes


class _Writes:
    """The ``.data`` traffic of one Parameter: a count of reads and sets, and the aliases still alive."""

    def __init__(self) -> None:
        self.count = 0
        self.aliases: dict[int, weakref.ref] = {}

    def saw(self, alias: Tensor) -> None:
        self.count += 1
        ref = weakref.ref(alias, self._died)
        self.aliases[id(ref)] = ref

    def _died(self, ref: weakref.ref) -> None:
        self.count += 1  # it may have been written after the last stamp
        self.aliases.pop(id(ref), None)

    def stamp(self) -> tuple:
        """Changes whenever a write through ``.data`` may have happened since the last stamp."""
        return self.count, tuple(alias._version for ref in self.aliases.values() if (alias := ref()) is not None)

    def __reduce__(self) -> tuple:
        # A pickled Parameter carries its attributes: its copy starts a record of its own (aliases die here).
        return _Writes, ()


class _WatchedParameter(nn.Parameter):
    """An ``nn.Parameter`` whose ``.data`` is the usual alias, noted in its :class:`_Writes`."""

    @property
    def data(self) -> Tensor:
        alias = _TENSOR_DATA.__get__(self)
        _record(self).saw(alias)
        return alias

    @data.setter
    def data(self, value: Tensor) -> None:
        _TENSOR_DATA.__set__(self, value)
        _record(self).count += 1


def _record(weight: Tensor) -> _Writes:
    # The Parameter holds its own record. A deep copy of a watched Parameter has its class but no record yet.
    writes = weight.__dict__.get(_RECORD)
    if writes is None:
        writes = _Writes()
        setattr(weight, _RECORD, writes)
    return writes


def watch_writes(weight: Tensor) -> _Writes | None:
    """The record of ``weight``'s writes through ``.data``; ``None`` if they cannot be watched.

    Only a plain ``nn.Parameter`` is watched: its class becomes a subclass whose ``.data`` behaves as
    before (the same alias, with its own version counter) and is noted. A copy (``copy.deepcopy``)
    keeps that class; an unpickled one is a plain Parameter again, watched at its next call.

    Example:
        >>> weight = nn.Parameter(torch.ones(2))
        >>> writes = watch_writes(weight)
        >>> before = (weight._version, writes.stamp())
        >>> weight.data.mul_(2.0)  # the version counter does not see this
        tensor([2., 2.])
        >>> weight._version == before[0], writes.stamp() == before[1]
        (True, False)

    """
    if type(weight) is nn.Parameter:
        weight.__class__ = _WatchedParameter
    return _record(weight) if type(weight) is _WatchedParameter else None
