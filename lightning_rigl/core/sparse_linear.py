"""A Linear layer's three matmuls with the active weights only, as ``torch.library`` custom ops.

The dense weight stays the Parameter: each call gathers its active values at a fixed CSR structure
(O(active) work), runs ``torch.sparse.mm`` for the output and the input gradient, and writes the
weight gradient into a zero dense gradient, at the active positions only (SDDMM) or, at the steps
where RigL reads it, everywhere (the dense ``grad_out^T x``, exactly what dense autograd gives).
The ops take plain index and value tensors, so ``torch.compile`` treats them as opaque calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula
from torch.utils.weak import WeakTensorKeyDictionary

#: Dtypes the CPU sparse kernels (``torch.sparse.mm`` on CSR, ``sampled_addmm``) support.
SPARSE_DTYPES = (torch.float32, torch.float64)
_MKL = torch.backends.mkl.is_available()


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
        order_t = torch.argsort(cols * out_features + rows)  # W^T's CSR order
        # MKL's sparse products take 32-bit indices: int64 ones are converted on every call (~30 % slower).
        index_dtype = torch.int32 if mask.numel() < 2**31 else torch.int64

        def compact(indices: Tensor) -> Tensor:
            return indices.to(index_dtype).contiguous()

        return cls(
            crow=compact(_row_pointers(rows, out_features)),
            col=compact(cols),
            index=stored.contiguous(),
            crow_t=compact(_row_pointers(cols, in_features)),
            col_t=compact(rows[order_t]),
            perm_t=compact(order_t),
        )

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the logical weight ``W``."""
        return self.crow.numel() - 1, self.crow_t.numel() - 1

    def to(self, device: torch.device | str) -> SparseStructure:
        """The same structure on ``device``."""
        return SparseStructure(*(getattr(self, name).to(device) for name in self.__dataclass_fields__))


def _row_pointers(rows: Tensor, num_rows: int) -> Tensor:
    counts = torch.bincount(rows, minlength=num_rows)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def sparse_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    structure: SparseStructure,
    dense_gradient: bool = False,
    weight_in_out: bool = False,
    values: Tensor | None = None,
) -> Tensor:
    """``x W^T + b`` with the active weights of ``structure`` only (``x W + b`` for an (in, out) weight).

    Differentiable in ``x``, ``weight`` and ``bias``. The weight gradient is dense ``grad_out^T x``
    when ``dense_gradient`` (what RigL's grow score reads), else nonzero at the active positions only.
    The active values are gathered once per call (or given as ``values``, the weight's entries at
    ``structure.index``) and serve the forward and both backward products.

    Example:
        >>> weight = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
        >>> structure = SparseStructure.from_mask(weight != 0)
        >>> sparse_linear(torch.tensor([[3.0, 4.0]]), weight, None, structure).tolist()
        [[3.0, 8.0]]

    """
    s = structure
    if values is None:
        values = active_values(weight, structure)
    return torch.ops.lightning_rigl.sparse_linear(
        x, weight, values, bias, s.crow, s.col, s.index, s.crow_t, s.col_t, s.perm_t, dense_gradient, weight_in_out
    )


def active_values(weight: Tensor, structure: SparseStructure) -> Tensor:
    """The weight's entries at the structure's active positions, in ``W``'s CSR order: O(active) work.

    Example:
        >>> weight = torch.tensor([[1.0, 5.0], [3.0, 2.0]])
        >>> active_values(weight, SparseStructure.from_mask(torch.eye(2, dtype=torch.bool))).tolist()
        [1.0, 2.0]
    """
    return weight.detach().reshape(-1).index_select(0, structure.index)


# Weight gradients the op wrote at active positions only (zero elsewhere), by their structure's `index`:
# (address, version) when written, so that an optimizer step can skip masking them again if nothing else
# added to them or changed them since. Recorded in eager autograd only: a compiled backward records nothing.
_MASKED_GRADIENTS = WeakTensorKeyDictionary()


def gradient_is_masked(grad: Tensor | None, structure: SparseStructure) -> bool:
    """Whether ``grad`` is the weight gradient this op last wrote for ``structure``, unchanged since.

    Such a gradient is exactly 0 at every inactive position. Any other contribution (a second use of
    the weight, accumulation over micro-batches, DDP's copy of the all-reduced gradient, a hook that
    changed it in place) gives another tensor or a new version, and the answer is False. Writes that
    bypass the version counter (``.grad.data``, a raw in-place ``torch.distributed`` collective) are
    not seen. The record is used up by the call.

    Example:
        >>> weight = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
        >>> structure = SparseStructure.from_mask(weight != 0)
        >>> sparse_linear(torch.ones(1, 2), weight, None, structure).sum().backward()
        >>> gradient_is_masked(weight.grad, structure), weight.grad.tolist()
        (True, [[1.0, 0.0], [0.0, 1.0]])
        >>> weight.grad.add_(1.0) is not None, gradient_is_masked(weight.grad, structure)
        (True, False)
    """
    written = _MASKED_GRADIENTS.pop(structure.index, None)
    return grad is not None and written == (grad.data_ptr(), grad._version)


def forget_masked_gradient(structure: SparseStructure) -> None:
    """Drop the record of the gradient last written for ``structure`` (a new step begins)."""
    _MASKED_GRADIENTS.pop(structure.index, None)


def _csr(crow: Tensor, col: Tensor, values: Tensor, rows: int, cols: int) -> Tensor:
    return torch.sparse_csr_tensor(crow, col, values, (rows, cols), check_invariants=False)


def _csr_times(crow: Tensor, col: Tensor, values: Tensor, cols: int, dense: Tensor) -> Tensor:
    """``A @ dense`` for the CSR matrix ``A`` (rows x cols): one product, (rows x n) and row-major.

    ``dense`` should be row-major (MKL takes it so; another layout is copied first).
    """
    rows = crow.numel() - 1
    # With MKL, addmm with beta=0 never reads the result, so it can start empty: torch.sparse.mm would
    # zero-fill one and copy it once more, about 10 % of the product's time. torch's fallback without
    # MKL scales the result by beta instead (NaN * 0 is NaN): a zero-filled one there.
    make = dense.new_empty if _MKL else dense.new_zeros
    result = make(rows, dense.shape[1])
    return torch.addmm(result, _csr(crow, col, values, rows, cols), dense, beta=0.0, out=result)


@torch.library.custom_op("lightning_rigl::sparse_linear", mutates_args=())
def _sparse_linear_op(
    x: Tensor,
    weight: Tensor,
    values: Tensor,
    bias: Tensor | None,
    crow: Tensor,
    col: Tensor,
    index: Tensor,
    crow_t: Tensor,
    col_t: Tensor,
    perm_t: Tensor,
    dense_gradient: bool,
    weight_in_out: bool,
) -> Tensor:
    in_features = crow_t.numel() - 1
    y = _csr_times(crow, col, values, in_features, x.reshape(-1, in_features).t()).t().contiguous()
    if bias is not None:
        y.add_(bias)
    return y.view(*x.shape[:-1], crow.numel() - 1)


@_sparse_linear_op.register_fake
def _(x, weight, values, bias, crow, col, index, crow_t, col_t, perm_t, dense_gradient, weight_in_out):
    return x.new_empty(*x.shape[:-1], crow.shape[0] - 1)


@torch.library.custom_op("lightning_rigl::sparse_linear_backward", mutates_args=())
def _sparse_linear_backward_op(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    values: Tensor,
    crow: Tensor,
    col: Tensor,
    index: Tensor,
    crow_t: Tensor,
    col_t: Tensor,
    perm_t: Tensor,
    dense_gradient: bool,
    weight_in_out: bool,
    needs_input_grad: bool,
    needs_weight_grad: bool,
) -> tuple[Tensor, Tensor]:
    """The input gradient and the weight gradient; an empty tensor for the one not needed."""
    out_features, in_features = crow.numel() - 1, crow_t.numel() - 1
    g2d, x2d = grad_out.reshape(-1, out_features), x.reshape(-1, in_features)
    grad_x = grad_w = x.new_empty(0)
    sampled = needs_weight_grad and not dense_gradient
    # grad_out^T made row-major once, for both sparse products (each would copy it).
    g_t = g2d.t().contiguous() if needs_input_grad or sampled else g2d
    if needs_input_grad:  # the first layer's input needs none: dense autograd skips it too
        values_t = values.index_select(0, perm_t)  # W^T's order, from the compact values
        grad_x = _csr_times(crow_t, col_t, values_t, out_features, g_t).t().contiguous().view_as(x)
    if needs_weight_grad and dense_gradient:
        grad_w = x2d.t() @ g2d if weight_in_out else g2d.t() @ x2d  # unmasked, as dense autograd gives it
    elif sampled:
        pattern = _csr(crow, col, values, out_features, in_features)  # values ignored (beta=0): the pattern
        active = torch.sparse.sampled_addmm(pattern, g_t, x2d, beta=0.0).values()
        grad_w = torch.zeros_like(weight).view(-1).index_copy_(0, index, active).view_as(weight)
    return grad_x, grad_w


@_sparse_linear_backward_op.register_fake
def _(grad_out, x, weight, values, crow, col, index, crow_t, col_t, perm_t, dense_gradient, weight_in_out, nx, nw):
    return (torch.empty_like(x) if nx else x.new_empty(0)), (torch.empty_like(weight) if nw else x.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, values, bias, *structure, dense_gradient, weight_in_out = inputs
    ctx.save_for_backward(x, weight, values, *structure)
    ctx.flags = (dense_gradient, weight_in_out)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    x, weight, values, *structure = ctx.saved_tensors
    needs_x, needs_w, _, needs_b = ctx.needs_input_grad[:4]
    grad_x = grad_w = grad_b = None
    if needs_x or needs_w:
        grad_x, grad_w = _sparse_linear_backward_op(
            grad_out, x, weight, values, *structure, *ctx.flags, needs_x, needs_w
        )
        if needs_w and not ctx.flags[0] and type(grad_w) is Tensor:  # not while tracing (fake tensors)
            _MASKED_GRADIENTS[structure[2]] = (grad_w.data_ptr(), grad_w._version)
    if needs_b and ctx.has_bias:
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return (grad_x if needs_x else None, grad_w if needs_w else None, None, grad_b) + (None,) * 8


_sparse_linear_op.register_autograd(_backward, setup_context=_setup_context)


# FlopCounterMode cannot see inside a custom op: count each like the dense matmuls it replaces.
@register_flop_formula(torch.ops.lightning_rigl.sparse_linear)
def _sparse_linear_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _prod(x_shape) * weight_shape[0] * weight_shape[1] // x_shape[-1]


@register_flop_formula(torch.ops.lightning_rigl.sparse_linear_backward)
def _sparse_linear_backward_flops(grad_out_shape, x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    needs_input_grad, needs_weight_grad = args[-2:]
    return (int(needs_input_grad) + int(needs_weight_grad)) * _sparse_linear_flops(x_shape, weight_shape)


def _prod(shape) -> int:
    result = 1
    for size in shape:
        result *= size
    return result
