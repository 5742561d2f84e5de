"""A Linear layer's three matmuls with the active weights only: its structure and its autograd function.

The dense weight stays the Parameter: each call gathers its active values at a fixed CSR structure
(O(active) work), computes the output and the input gradient from them, and writes the weight gradient
at the active positions only (SDDMM), into a gradient that is 0 everywhere else, or, at the steps where
RigL reads it, everywhere (the dense ``grad_out^T x``, exactly what dense autograd gives). The products
are the operators of :mod:`~lightning_rigl.core.kernels.sparse_ops`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from lightning_rigl.core.kernels import sparse_ops  # noqa: F401  (defines the operators)

#: Dtypes the CPU sparse kernels (``torch.sparse.mm`` on CSR, ``sampled_addmm``) support.
SPARSE_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class SparseStructure:
    """Where a weight's active connections are, as CSR indices of ``W`` (out, in) and of ``W^T``.

    Built from a mask at topology updates only; every step then gathers values at ``index``.

    Attributes:
        crow: CSR row pointers of ``W`` (out + 1); int32 below 2**31 weights, as all index tensors but the flat ones.
        col: CSR column indices of ``W`` (active).
        index: Flat position in the stored weight of each CSR value of ``W``.
        crow_t: CSR row pointers of ``W^T`` (in + 1).
        col_t: CSR column indices of ``W^T`` (active).
        perm_t: For each CSR value of ``W^T``, its place among the CSR values of ``W`` (``W^T``'s values
            are ``values[perm_t]``: gathered from the compact values, not from the weight again).

    Example:
        >>> s = SparseStructure.from_mask(torch.tensor([[True, False, True], [False, True, False]]))
        >>> s.crow.tolist(), s.col.tolist(), s.index.tolist(), s.perm_t.tolist()
        ([0, 2, 3], [0, 2, 1], [0, 2, 4], [0, 2, 1])

    """

    crow: Tensor
    col: Tensor
    index: Tensor
    crow_t: Tensor
    col_t: Tensor
    perm_t: Tensor

    @classmethod
    def from_mask(cls, mask: Tensor, weight_in_out: bool = False) -> SparseStructure:
        """The structure of the active positions of ``mask``.

        Args:
            mask: Bool (or 0/1) mask of the stored weight: (out, in), or (in, out) with ``weight_in_out``.
            weight_in_out: The weight is stored as (in, out), as Hugging Face ``Conv1D`` does.

        """
        mask = mask.detach().bool()
        logical = mask.t() if weight_in_out else mask
        out_features, in_features = logical.shape
        rows, cols = logical.nonzero().unbind(1)  # row-major: W's CSR order
        stored = rows * in_features + cols if not weight_in_out else cols * out_features + rows
        # MKL's sparse products take 32-bit indices: int64 ones are converted on every call (~30 % slower).
        index_dtype = torch.int32 if mask.numel() < 2**31 else torch.int64
        # W^T's CSR order: by column, and by row within one (a stable sort keeps the row order); on
        # 32-bit keys twice as fast as an argsort of the flat transposed index.
        order_t = torch.sort(cols.to(index_dtype), stable=True).indices

        def compact(indices: Tensor) -> Tensor:
            return indices.to(index_dtype).contiguous()

        return cls(
            crow=compact(row_pointers(rows, out_features)),
            col=compact(cols),
            index=stored.contiguous(),
            crow_t=compact(row_pointers(cols, in_features)),
            col_t=compact(rows.index_select(0, order_t)),  # index_select: twice as fast as indexing
            perm_t=compact(order_t),
        )

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the logical weight ``W``."""
        return self.crow.numel() - 1, self.crow_t.numel() - 1

    def to(self, device: torch.device | str) -> SparseStructure:
        """The same structure on ``device``."""
        return SparseStructure(*(getattr(self, name).to(device) for name in self.__dataclass_fields__))


def row_pointers(rows: Tensor, num_rows: int) -> Tensor:
    """CSR row pointers (int64, ``num_rows + 1``) of entries in rows ``rows``, listed in row order.

    Example:
        >>> row_pointers(torch.tensor([0, 0, 2]), 3).tolist()
        [0, 2, 2, 3]
    """
    counts = torch.bincount(rows.long(), minlength=num_rows)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def sparse_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    structure: SparseStructure,
    dense_gradient: bool = False,
    weight_in_out: bool = False,
    values: Tensor | None = None,
    gate: GradientGate | None = None,
) -> Tensor:
    """``x W^T + b`` with the active weights of ``structure`` only (``x W + b`` for an (in, out) weight).

    Differentiable in ``x``, ``weight`` and ``bias``, twice too (a gradient penalty's ``create_graph=True``
    takes the dense formulas, equal to dense kernels'). The weight gradient is dense ``grad_out^T x``
    when ``dense_gradient`` (what RigL's grow score reads), else nonzero at the active positions only;
    with a ``gate`` (eager autograd), the gate's ``dense_gradient`` at the time of the backward decides
    instead, and the gate hears what was written. The active values are gathered once per call (or given
    as ``values``, the weight's entries at ``structure.index``) and serve the forward and the input gradient.

    Example:
        >>> weight = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
        >>> structure = SparseStructure.from_mask(weight != 0)
        >>> sparse_linear(torch.tensor([[3.0, 4.0]]), weight, None, structure).tolist()
        [[3.0, 8.0]]

    """
    s = structure
    if values is None:
        values = active_values(weight, structure)
    return _SparseLinear.apply(
        x,
        weight,
        values,
        bias,
        s.crow,
        s.col,
        s.index,
        s.crow_t,
        s.col_t,
        s.perm_t,
        dense_gradient,
        weight_in_out,
        gate,
    )


class GradientGate(Protocol):
    """Decides, when a backward runs, whether a layer's weight gradient is dense, and hears what was written."""

    @property
    def dense_gradient(self) -> bool:
        """Whether the optimizer step this gradient is for reads the dense weight gradient."""

    def wrote_gradient(self, weight: Tensor, sampled: bool) -> None:
        """Called before the weight gradient is accumulated: ``sampled`` if written at active positions only."""

    def reusable_gradient(self, weight: Tensor, index: Tensor) -> Tensor | None:
        """A tensor exactly 0 outside structure ``index`` that the weight gradient may be written into, or None."""

    def wrote_masked_gradient(self, grad: Tensor, index: Tensor) -> None:
        """``grad``, the weight gradient just written, is exactly 0 outside structure ``index``."""


def active_values(weight: Tensor, structure: SparseStructure) -> Tensor:
    """The weight's entries at the structure's active positions, in ``W``'s CSR order: O(active) work.

    Example:
        >>> weight = torch.tensor([[1.0, 5.0], [3.0, 2.0]])
        >>> active_values(weight, SparseStructure.from_mask(torch.eye(2, dtype=torch.bool))).tolist()
        [1.0, 2.0]
    """
    return weight.detach().reshape(-1).index_select(0, structure.index)


class _SparseLinear(torch.autograd.Function):
    """The autograd of the operators; a plain (old-style) Function, the cheapest to call from Python."""

    @staticmethod
    def forward(
        ctx, x, weight, values, bias, crow, col, index, crow_t, col_t, perm_t, dense_gradient, weight_in_out, gate
    ):
        # As dense autograd does, keep the weight for the backward only where the input gradient needs it:
        # an in-place write to it before the backward (an optimizer step between two backward passes of one
        # graph) then raises where, and only where, it raises on dense kernels. Traced code keeps it always.
        keep = x.requires_grad or gate is None
        ctx.save_for_backward(x, weight if keep else None, values, crow, col, crow_t, col_t, perm_t, index)
        ctx.flags = (dense_gradient, weight_in_out)
        ctx.has_bias = bias is not None
        ctx.gate, ctx.weight = (gate, weight) if gate is not None else (None, None)
        return torch.ops.lightning_rigl.sparse_linear(x, weight, values, bias, crow, col, crow_t)

    @staticmethod
    def backward(ctx, grad_out):
        x, saved_weight, values, *structure, index = ctx.saved_tensors
        weight = saved_weight if saved_weight is not None else ctx.weight
        dense_gradient, weight_in_out = ctx.flags
        gate = ctx.gate
        if gate is not None:  # the step the gradient is for is known now, not at the forward
            dense_gradient = gate.dense_gradient
        needs_x, needs_w, _, needs_b = ctx.needs_input_grad[:4]
        grad_x = grad_w = grad_b = None
        if torch.is_grad_enabled():
            # create_graph=True (a gradient penalty): the dense formulas, differentiable, as dense kernels run them.
            grad_x, grad_w = _dense_backward(grad_out, x, saved_weight, weight_in_out, needs_x, needs_w)
            dense_gradient = True
        elif needs_x or needs_w:
            grad_x, grad_w = torch.ops.lightning_rigl.sparse_linear_backward(
                grad_out, x, weight, values, *structure, dense_gradient, weight_in_out, needs_x, needs_w
            )
            if needs_w and not dense_gradient:
                grad_w = _scatter_active(grad_w, weight, index, gate)
        if needs_w and gate is not None:
            gate.wrote_gradient(weight, sampled=not dense_gradient)
        if needs_b and ctx.has_bias:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return (grad_x if needs_x else None, grad_w if needs_w else None, None, grad_b) + (None,) * 9


def _dense_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor | None, weight_in_out: bool, needs_x: bool, needs_w: bool
) -> tuple[Tensor | None, Tensor | None]:
    """The input and weight gradients by dense, differentiable products (the weight is 0 where inactive)."""
    g2d, x2d = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
    grad_x = grad_w = None
    if needs_x:
        assert weight is not None  # kept by the forward whenever the input needs a gradient
        grad_x = (grad_out @ (weight.t() if weight_in_out else weight)).view_as(x)
    if needs_w:
        grad_w = x2d.t() @ g2d if weight_in_out else g2d.t() @ x2d
    return grad_x, grad_w


def _scatter_active(active: Tensor, weight: Tensor, index: Tensor, gate: GradientGate | None) -> Tensor:
    """The dense weight gradient with ``active`` at ``index`` and 0 elsewhere.

    In eager autograd it is written into the last step's gradient where the ``gate`` offers one (see
    :meth:`~lightning_rigl.core.kernels.masked_gradients.GradientRecords.take`): O(active) work instead of
    zero-filling a tensor the size of the weight. Traced (compiled) code always builds a new one.
    """
    # Neither traced by dynamo nor by AOTAutograd (its fake and functional tensors are subclasses).
    eager = gate is not None and not torch.compiler.is_compiling() and type(active) is Tensor
    grad = gate.reusable_gradient(weight, index) if eager else None  # type: ignore[union-attr]
    if grad is None:
        grad = torch.zeros_like(weight)
    grad.view(-1).index_copy_(0, index, active)
    if eager:
        gate.wrote_masked_gradient(grad, index)  # type: ignore[union-attr]
    return grad
