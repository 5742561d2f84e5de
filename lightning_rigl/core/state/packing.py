"""Bit-packing of bool masks: 1 bit per weight in checkpoints."""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: The value of each bit of a packed byte, bit 0 first (little-endian bit order).
BIT_VALUES = 2 ** torch.arange(8, dtype=torch.uint8)


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a bool tensor into a flat uint8 tensor, 8 entries a byte (little-endian bit order).

    Example:
        >>> pack_bits(torch.tensor([True, False, True, True])).tolist()
        [13]

    """
    flat = mask.detach().reshape(-1).to("cpu", torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8))
    return (flat.view(-1, 8) * BIT_VALUES).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_bits`: a bool tensor of ``shape`` on the CPU.

    Example:
        >>> unpack_bits(torch.tensor([13], dtype=torch.uint8), (2, 2)).tolist()
        [[True, False], [True, True]]

    """
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != -(-numel // 8):
        raise ValueError(
            f"A packed mask of shape {tuple(shape)} needs {-(-numel // 8)} uint8 bytes, got {packed.numel()}."
        )
    bits = packed.reshape(-1, 1).bitwise_and(BIT_VALUES).ne(0)
    return bits.reshape(-1)[:numel].reshape(shape)
