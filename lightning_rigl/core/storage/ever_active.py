"""EverActive: the positions of a compact layer that were ever active, as a list or as bits, whichever is smaller.

A compact layer keeps nothing of its dense size while few positions were ever active: a sorted list of
them (4 bytes each where the layer's flat index fits in 32 bits). Once the list would outgrow one bit a
weight, the record becomes a bit set (1 bit a weight, the layout of
:func:`~lightning_rigl.core.state.packing.pack_bits`), written position by position: no bool tensor of the
layer's size is ever made.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_rigl.core.state.packing import BIT_VALUES
from lightning_rigl.core.topology.top_k import index_dtype

#: Bytes of bits read at a time to count them: bounds the counting's temporaries.
_COUNT_CHUNK = 2**20
_POPCOUNT = torch.tensor([bin(byte).count("1") for byte in range(256)], dtype=torch.int32)


class EverActive:
    """The positions ever active in a layer of ``numel`` weights, starting with ``positions``.

    Example:
        >>> record = EverActive(100, torch.tensor([3, 7]))
        >>> record.add(torch.tensor([7, 50])); record.count, record.positions().tolist(), record.is_bits
        (3, [3, 7, 50], False)
        >>> record = EverActive(16, torch.tensor([0, 9]))  # 2 positions (8 bytes) outgrow 16 bits (2 bytes)
        >>> record.is_bits, record.packed().tolist(), record.count
        (True, [1, 2], 2)
    """

    def __init__(self, numel: int, positions: Tensor) -> None:
        self.numel = numel
        self._dtype = index_dtype(numel)
        self._list: Tensor | None = torch.unique(positions.reshape(-1)).to(self._dtype)
        self._bits: Tensor | None = None
        self.count = int(self._list.numel())
        self._to_bits_if_smaller()

    @classmethod
    def from_packed(cls, numel: int, packed: Tensor) -> EverActive:
        """A record from bits in :func:`~lightning_rigl.core.state.packing.pack_bits`'s layout."""
        if packed.dtype != torch.uint8 or packed.numel() != -(-numel // 8):
            raise ValueError(f"An ever-active record of {numel} weights needs {-(-numel // 8)} uint8 bytes.")
        record = cls(numel, packed.new_empty(0, dtype=torch.long))
        record._list, record._bits = None, packed.reshape(-1).clone()
        record.count = _count_bits(record._bits)
        return record

    @property
    def is_bits(self) -> bool:
        """Whether the record is held as bits (else as a list of positions)."""
        return self._bits is not None

    def add(self, positions: Tensor) -> None:
        """Record ``positions`` (flat, any integer dtype) as ever active."""
        positions = positions.reshape(-1)
        if self._bits is not None:
            self.count += _set_bits(self._bits, torch.unique(positions.long()))
            return
        assert self._list is not None
        self._list = torch.unique(torch.cat([self._list, positions.to(self._list.device, self._dtype)]))
        self.count = int(self._list.numel())
        self._to_bits_if_smaller()

    def positions(self) -> Tensor:
        """The positions, ascending (int64); made from the bits chunk by chunk if held as bits."""
        if self._list is not None:
            return self._list.long()
        assert self._bits is not None
        found = []
        for start in range(0, self._bits.numel(), _COUNT_CHUNK):
            part = self._bits[start : start + _COUNT_CHUNK]
            at = part.nonzero().flatten()  # the bytes with any bit set, then their bits
            bits = part.index_select(0, at).reshape(-1, 1).bitwise_and(BIT_VALUES.to(part.device)).ne(0)
            found.append(((at + start) * 8).reshape(-1, 1).add(torch.arange(8, device=part.device))[bits])
        return torch.cat(found) if found else torch.empty(0, dtype=torch.long)

    def packed(self) -> Tensor:
        """The record as bits (:func:`~lightning_rigl.core.state.packing.pack_bits`'s layout, on the CPU)."""
        if self._bits is not None:
            return self._bits.cpu()
        bits = torch.zeros(-(-self.numel // 8), dtype=torch.uint8)
        _set_bits(bits, self.positions().cpu())
        return bits

    def state(self) -> Tensor:
        """What a checkpoint keeps: the smaller of the list (int positions) and the bits (uint8)."""
        return self._bits.cpu() if self._bits is not None else self.positions().cpu()

    @classmethod
    def from_state(cls, numel: int, saved: Tensor) -> EverActive:
        """A record from :meth:`state`'s output (positions, or bits as uint8)."""
        return cls.from_packed(numel, saved) if saved.dtype == torch.uint8 else cls(numel, saved)

    def _to_bits_if_smaller(self) -> None:
        assert self._list is not None
        if self._list.numel() * self._list.element_size() > -(-self.numel // 8):
            bits = torch.zeros(-(-self.numel // 8), dtype=torch.uint8, device=self._list.device)
            _set_bits(bits, self._list.long())
            self._bits, self._list = bits, None


def _set_bits(bits: Tensor, positions: Tensor) -> int:
    """Set the bits at ``positions`` (distinct, int64); returns how many were not set before."""
    byte, bit = positions.div(8, rounding_mode="floor"), BIT_VALUES.to(bits.device).index_select(0, positions % 8)
    unset = bits.index_select(0, byte).bitwise_and(bit).eq(0)
    byte, bit = byte.masked_select(unset), bit.masked_select(unset)
    # Distinct positions not yet set: adding each bit's value to its byte sets it, as an OR would.
    bits.index_put_((byte,), bit, accumulate=True)
    return int(byte.numel())


def _count_bits(bits: Tensor) -> int:
    table = _POPCOUNT.to(bits.device)
    return sum(
        int(table.index_select(0, bits[start : start + _COUNT_CHUNK].long()).sum())
        for start in range(0, bits.numel(), _COUNT_CHUNK)
    )
