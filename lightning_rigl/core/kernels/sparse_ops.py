"""The products of a Linear layer with its active weights only, as ``torch.library`` operators.

Two operators over plain index and value tensors (CSR indices of ``W`` and of ``W^T``):

- ``lightning_rigl::sparse_linear``: the output ``x W^T + b`` from the active values;
- ``lightning_rigl::sparse_linear_backward``: the input gradient from the active values, and the
  weight gradient: the active positions' values only (SDDMM), or the dense ``grad_out^T x`` at the
  steps where RigL reads it.

They are defined with the low-level ``torch.library.Library`` API and have no autograd of their own:
:func:`~lightning_rigl.core.kernels.sparse_linear.sparse_linear` differentiates them. A ``custom_op`` with its
autograd formula costs about 0.1 ms more per layer and step, as much as a small layer's products. As
operators, ``torch.compile`` treats them as opaque calls (with their fake implementations) and
``FlopCounterMode`` counts them with the formulas below.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

_MKL = torch.backends.mkl.is_available()

_LIBRARY = torch.library.Library("lightning_rigl", "FRAGMENT")
_LIBRARY.define(
    "sparse_linear(Tensor x, Tensor weight, Tensor values, Tensor? bias, Tensor crow, Tensor col, "
    "Tensor crow_t) -> Tensor"
)
_LIBRARY.define(
    "sparse_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor values, Tensor crow, Tensor col, "
    "Tensor crow_t, Tensor col_t, Tensor perm_t, bool dense_gradient, bool weight_in_out, "
    "bool needs_input_grad, bool needs_weight_grad) -> (Tensor, Tensor)"
)


def _csr(crow: Tensor, col: Tensor, values: Tensor, rows: int, cols: int) -> Tensor:
    """A CSR tensor over given indices, unchecked (the structures are built valid)."""
    if not _beta_warning_consumed:
        return _first_csr(crow, col, values, rows, cols)
    return torch.sparse_csr_tensor(crow, col, values, (rows, cols), check_invariants=False)


_beta_warning_consumed = False
_BETA_WARNING = "Sparse CSR tensor support is in beta state"


def _first_csr(crow: Tensor, col: Tensor, values: Tensor, rows: int, cols: int) -> Tensor:
    """The process's first CSR tensor of ours, without torch's "Sparse CSR tensor support is in beta state".

    torch warns once per process (``TORCH_WARN_ONCE``) when the first CSR tensor is made; it tells the user
    nothing they can act on, so it is filtered here, where it fires, not by a filter installed at import.
    """
    global _beta_warning_consumed
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_BETA_WARNING, category=UserWarning)
        csr = torch.sparse_csr_tensor(crow, col, values, (rows, cols), check_invariants=False)
    _beta_warning_consumed = True
    return csr


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


def _forward(x, weight, values, bias, crow, col, crow_t):
    # `weight` only gives the FLOP formula the weight's shape; the product reads the active values.
    in_features = crow_t.numel() - 1
    y = _csr_times(crow, col, values, in_features, x.reshape(-1, in_features).t()).t().contiguous()
    if bias is not None:
        y.add_(bias)
    return y.view(*x.shape[:-1], crow.numel() - 1)


def _backward(
    grad_out,
    x,
    weight,
    values,
    crow,
    col,
    crow_t,
    col_t,
    perm_t,
    dense_gradient,
    weight_in_out,
    needs_input_grad,
    needs_weight_grad,
):
    """The input gradient and the weight gradient (dense, or the active values); an empty tensor if not needed."""
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
        # The SDDMM writes into its own pattern: zero values (beta=0 still multiplies them, NaN would stay).
        pattern = _csr(crow, col, x.new_zeros(col.numel()), out_features, in_features)
        grad_w = torch.sparse.sampled_addmm(pattern, g_t, x2d, beta=0.0, out=pattern).values()
    return grad_x, grad_w


def _forward_fake(x, weight, values, bias, crow, col, crow_t):
    return x.new_empty(*x.shape[:-1], crow.shape[0] - 1)


def _backward_fake(grad_out, x, weight, values, crow, col, crow_t, col_t, perm_t, dense_gradient, *flags):
    _, needs_input_grad, needs_weight_grad = flags
    grad_x = torch.empty_like(x) if needs_input_grad else x.new_empty(0)
    if not needs_weight_grad:
        return grad_x, x.new_empty(0)
    return grad_x, torch.empty_like(weight) if dense_gradient else x.new_empty(col.shape[0])


# CompositeExplicitAutograd: one kernel for every device, and no autograd here (sparse_linear has it).
_LIBRARY.impl("sparse_linear", _forward, "CompositeExplicitAutograd")
_LIBRARY.impl("sparse_linear_backward", _backward, "CompositeExplicitAutograd")
torch.library.register_fake("lightning_rigl::sparse_linear", _forward_fake, lib=_LIBRARY)
torch.library.register_fake("lightning_rigl::sparse_linear_backward", _backward_fake, lib=_LIBRARY)


# FlopCounterMode cannot see inside an operator: count each like the dense matmuls it replaces.
@register_flop_formula(torch.ops.lightning_rigl.sparse_linear)
def _sparse_linear_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape) * weight_shape[0] * weight_shape[1] // x_shape[-1]


@register_flop_formula(torch.ops.lightning_rigl.sparse_linear_backward)
def _sparse_linear_backward_flops(grad_out_shape, x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    needs_input_grad, needs_weight_grad = args[-2:]
    return (int(needs_input_grad) + int(needs_weight_grad)) * _sparse_linear_flops(x_shape, weight_shape)
