"""Where a compact layer's active weights are: CSR indices of ``W`` and of ``W^T``, and nothing of the layer's size.

A compact layer keeps its ``nnz`` active values in ``W``'s CSR order (row-major over the logical
(out, in) weight). Its index tensors are ``col``, ``col_t`` and ``perm_t`` (``nnz`` entries each) and the
two row-pointer tensors (``out + 1`` and ``in + 1`` entries): 12 bytes an active weight in int32, which
holds every index below 2**31 active weights and 2**31 rows or columns. No flat position into the
dense weight is kept: the values are the weights themselves, not a gather from a dense tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_rigl.core.kernels.sparse_linear import row_pointers


def structure_dtype(nnz: int, shape: tuple[int, int]) -> torch.dtype:
    """The index dtype of a structure: int32 where every pointer and index fits, else int64.

    Example:
        >>> structure_dtype(10**6, (4096, 4096)), structure_dtype(2**31, (2**16, 2**16))
        (torch.int32, torch.int64)
    """
    return torch.int32 if max(nnz, *shape) < 2**31 else torch.int64


@dataclass(frozen=True)
class CompactStructure:
    """The CSR structure of a compact layer's logical weight ``W`` (out, in) and of ``W^T``.

    Attributes:
        crow: Row pointers of ``W`` (out + 1).
        col: Column of each active value, in ``W``'s CSR order (nnz).
        crow_t: Row pointers of ``W^T`` (in + 1).
        col_t: Row of ``W`` of each entry in ``W^T``'s CSR order (nnz).
        perm_t: For each entry in ``W^T``'s CSR order, its place among the values (nnz).

    Example:
        >>> s = CompactStructure.from_coordinates(torch.tensor([1, 0, 0]), torch.tensor([1, 2, 0]), (2, 3))[0]
        >>> s.crow.tolist(), s.col.tolist(), s.col_t.tolist(), s.perm_t.tolist()
        ([0, 2, 3], [0, 2, 1], [0, 1, 0], [0, 2, 1])

    """

    crow: Tensor
    col: Tensor
    crow_t: Tensor
    col_t: Tensor
    perm_t: Tensor

    @classmethod
    def from_csr(cls, crow: Tensor, col: Tensor, in_features: int) -> CompactStructure:
        """The structure of ``W``'s CSR indices; ``W^T``'s are derived.

        Args:
            crow: Row pointers (out + 1), rising from 0 to ``col.numel()``.
            col: Column indices (nnz), rising strictly within each row.
            in_features: Columns of ``W``.

        Raises:
            ValueError: Pointers or columns that are not a valid CSR structure of ``in_features`` columns.
        """
        if crow.dim() != 1 or col.dim() != 1 or crow.numel() < 1:
            raise ValueError(f"`crow` and `col` must be 1-D, got shapes {tuple(crow.shape)} and {tuple(col.shape)}.")
        if int(crow[0]) != 0 or int(crow[-1]) != col.numel() or bool((crow.diff() < 0).any()):
            raise ValueError(f"`crow` must rise from 0 to the number of columns given ({col.numel()}).")
        if col.numel() and (int(col.min()) < 0 or int(col.max()) >= in_features):
            raise ValueError(
                f"`col` must hold columns in [0, {in_features}), got {int(col.min())} to {int(col.max())}."
            )
        raise_on_unsorted(crow, col)
        return cls._build(crow, col, csr_rows(crow), in_features)

    @classmethod
    def from_coordinates(cls, rows: Tensor, cols: Tensor, shape: tuple[int, int]) -> tuple[CompactStructure, Tensor]:
        """The structure of active entries at logical (``rows``, ``cols``), in any order, and the order taken.

        Returns:
            ``(structure, order)``: the entry ``order[i]`` of the input is the ``i``-th value in CSR order.

        Raises:
            ValueError: Coordinates outside ``shape`` or listed twice.
        """
        out_features, in_features = shape
        if rows.numel() != cols.numel():
            raise ValueError(f"`rows` and `cols` must have as many entries, got {rows.numel()} and {cols.numel()}.")
        if rows.numel() and (
            int(rows.min()) < 0
            or int(rows.max()) >= out_features
            or int(cols.min()) < 0
            or int(cols.max()) >= in_features
        ):
            raise ValueError(f"Coordinates must lie within the weight's (out, in) shape {shape}.")
        key, order = torch.sort(rows.long() * in_features + cols.long())
        if key.numel() > 1 and bool((key.diff() == 0).any()):
            raise ValueError("Coordinates must be distinct: an active weight is listed twice.")
        sorted_rows = torch.div(key, in_features, rounding_mode="floor")
        col = key.sub_(sorted_rows * in_features)
        crow = row_pointers(sorted_rows, out_features)
        return cls._build(crow, col, sorted_rows, in_features), order

    @classmethod
    def from_sorted(cls, rows: Tensor, cols: Tensor, shape: tuple[int, int]) -> CompactStructure:
        """The structure of distinct logical (``rows``, ``cols``) already in CSR order (row-major), unchecked."""
        return cls._build(row_pointers(rows, shape[0]), cols, rows, shape[1])

    @classmethod
    def _build(cls, crow: Tensor, col: Tensor, rows: Tensor, in_features: int) -> CompactStructure:
        dtype = structure_dtype(col.numel(), (crow.numel() - 1, in_features))
        col = col.to(dtype).contiguous()
        # W^T's order: by column, then by row (a stable sort of the columns keeps the row order).
        order_t = torch.sort(col, stable=True).indices
        col_sorted = col.index_select(0, order_t)
        return cls(
            crow=crow.to(dtype).contiguous(),
            col=col,
            crow_t=row_pointers(col_sorted, in_features).to(dtype).contiguous(),
            col_t=rows.index_select(0, order_t).to(dtype).contiguous(),
            perm_t=order_t.to(dtype).contiguous(),
        )

    @property
    def nnz(self) -> int:
        """The number of active weights."""
        return self.col.numel()

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the logical weight ``W``."""
        return self.crow.numel() - 1, self.crow_t.numel() - 1

    @property
    def nbytes(self) -> int:
        """Bytes held by the index tensors."""
        return sum(t.numel() * t.element_size() for t in (self.crow, self.col, self.crow_t, self.col_t, self.perm_t))

    def to(self, device: torch.device | str) -> CompactStructure:
        """The same structure on ``device``."""
        return CompactStructure(*(getattr(self, name).to(device) for name in self.__dataclass_fields__))

    def rows(self) -> Tensor:
        """The logical row of each value (int64, nnz): a temporary, not kept."""
        return csr_rows(self.crow)

    def stored_index(self, weight_in_out: bool) -> Tensor:
        """The flat position of each value in the stored dense weight (int64, nnz): a temporary, not kept."""
        out_features, in_features = self.shape
        rows, cols = self.rows(), self.col.long()
        return cols * out_features + rows if weight_in_out else rows * in_features + cols

    def gather(self, dense: Tensor, weight_in_out: bool) -> Tensor:
        """The entries of ``dense`` (the stored weight's shape, or one like it) at the active positions, in CSR order.

        Example:
            >>> s = CompactStructure.from_sorted(torch.tensor([0, 1]), torch.tensor([1, 0]), (2, 2))
            >>> s.gather(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), weight_in_out=False).tolist()
            [2.0, 3.0]
        """
        return dense.detach().reshape(-1).index_select(0, self.stored_index(weight_in_out).to(dense.device))


def csr_rows(crow: Tensor) -> Tensor:
    """The row of each CSR entry (int64) from the row pointers (``crow[0]`` need not be 0: a slice of rows).

    Example:
        >>> csr_rows(torch.tensor([0, 2, 2, 3])).tolist(), csr_rows(torch.tensor([5, 6, 8])).tolist()
        ([0, 0, 2], [0, 1, 1])
    """
    begin, nnz = int(crow[0]), int(crow[-1]) - int(crow[0])
    # A 1 where each row starts (several where rows are empty), summed up: many times faster on CPU
    # than repeat_interleave.
    starts = crow[1:-1].long() - begin
    marks = torch.zeros(nnz + 1, dtype=torch.long, device=crow.device)
    marks.index_add_(0, starts, torch.ones_like(starts))
    return marks[:nnz].cumsum_(0)


def raise_on_unsorted(crow: Tensor, col: Tensor) -> None:
    """Raise unless ``col`` rises strictly within each row of the CSR structure ``(crow, col)``."""
    if col.numel() < 2:
        return
    rising = col.diff() > 0
    # Where a row ends, the next column may be smaller: those steps do not count.
    row_starts = crow[1:-1].long()
    boundary = row_starts[(row_starts > 0) & (row_starts < col.numel())] - 1
    rising[boundary] = True
    if not bool(rising.all()):
        raise ValueError("`col` must rise strictly within each row (CSR order, no repeated column).")
