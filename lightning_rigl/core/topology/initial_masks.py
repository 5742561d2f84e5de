"""The initial masks of a run: exact active counts per layer, and uniformly random masks of that count."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_rigl.core.topology.top_k import index_dtype


def num_active(numel: int, sparsity: float) -> int:
    """Active weights of a layer of ``numel`` weights at ``sparsity``: ``numel - floor(sparsity * numel)``.

    Example:
        >>> num_active(1000, 0.9)
        100

    """
    return numel - math.floor(sparsity * numel)


def random_mask(shape: torch.Size | tuple[int, ...], n_active: int, generator: torch.Generator) -> Tensor:
    """A bool mask of ``shape`` with exactly ``n_active`` True entries drawn uniformly (on the CPU).

    Example:
        >>> int(random_mask((4, 5), 7, torch.Generator().manual_seed(0)).sum())
        7

    """
    numel = math.prod(shape)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[permutation(numel, generator)[:n_active].long()] = True
    return mask.view(shape)


def permutation(numel: int, generator: torch.Generator) -> Tensor:
    """``torch.randperm(numel)`` from ``generator``, in int32 where it fits: the same permutation, half the bytes.

    Example:
        >>> reference = torch.randperm(9, generator=torch.Generator().manual_seed(1))
        >>> torch.equal(permutation(9, torch.Generator().manual_seed(1)).long(), reference)
        True
    """
    # The same draws and the same values whatever the dtype (the generator ends in the same state).
    return torch.randperm(numel, generator=generator, dtype=index_dtype(numel))


def random_masks(
    shapes: Mapping[str, Sequence[int]], sparsities: Mapping[str, float], generator: torch.Generator
) -> dict[str, Tensor]:
    """One :func:`random_mask` per layer, in order, each with :func:`num_active` active entries of its sparsity.

    Example:
        >>> masks = random_masks({"a": (2, 5), "b": (4,)}, {"a": 0.7, "b": 0.5}, torch.Generator().manual_seed(0))
        >>> {name: int(mask.sum()) for name, mask in masks.items()}
        {'a': 3, 'b': 2}

    """
    counts = {name: num_active(math.prod(shape), sparsities[name]) for name, shape in shapes.items()}
    return {name: random_mask(shapes[name], k, generator) for name, k in counts.items()}
