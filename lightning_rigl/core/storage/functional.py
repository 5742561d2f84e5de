"""A compact layer's product and its autograd: the gradient of the active values only, never a dense one.

The products are the project's sparse operators (:mod:`~lightning_rigl.core.kernels.sparse_ops`), fed the
values directly: no gather from a dense weight and no scatter into one. At the steps whose grow scores
a topology update reads, the backward keeps the layer's input and output gradient (see
:class:`Capture`), from which the dense gradient is computed later, block by block.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_rigl.core.kernels import sparse_ops  # noqa: F401  (defines the operators)
from lightning_rigl.core.storage.structure import CompactStructure


class Capture:
    """The (input, output gradient) pairs of a layer's backward passes since :meth:`clear`, 2-D and detached.

    One pair per backward (per micro-batch under gradient accumulation): the dense weight gradient of
    the step is the sum of ``grad_out^T x`` over them, which :func:`~lightning_rigl.core.storage.update.
    compact_grow_candidates` computes block by block.

    Example:
        >>> capture = Capture()
        >>> capture.add(torch.ones(2, 3), torch.ones(2, 4))
        >>> len(capture.pairs), capture.nbytes
        (1, 56)
    """

    def __init__(self) -> None:
        self.pairs: list[tuple[Tensor, Tensor]] = []

    def add(self, x: Tensor, grad_out: Tensor) -> None:
        """Keep one backward's input and output gradient (as (batch, features) matrices)."""
        self.pairs.append((x.detach().reshape(-1, x.shape[-1]), grad_out.detach().reshape(-1, grad_out.shape[-1])))

    def clear(self) -> None:
        """Forget the pairs kept so far."""
        self.pairs.clear()

    @property
    def nbytes(self) -> int:
        """Bytes the kept pairs hold."""
        return sum(t.numel() * t.element_size() for pair in self.pairs for t in pair)


def compact_linear(
    x: Tensor,
    values: Tensor,
    bias: Tensor | None,
    structure: CompactStructure,
    capture: Capture | None = None,
) -> Tensor:
    """``x W^T + b`` for the sparse ``W`` of ``structure`` whose active entries are ``values`` (CSR order).

    Differentiable once in ``x``, ``values`` and ``bias``; the gradient of ``values`` is ``grad_out^T x``
    at the active positions only. A ``capture`` keeps the backward's input and output gradient. A
    second derivative (``create_graph=True``) raises.

    Example:
        >>> s, _ = CompactStructure.from_coordinates(torch.tensor([0, 1]), torch.tensor([0, 1]), (2, 2))
        >>> compact_linear(torch.tensor([[3.0, 4.0]]), torch.tensor([1.0, 2.0]), None, s).tolist()
        [[3.0, 8.0]]
    """
    if capture is not None and torch.compiler.is_compiling():
        raise RuntimeError(
            "A compact layer cannot keep its input and output gradient for a topology update inside compiled "
            "code: run the update steps eagerly."
        )
    s = structure
    return _CompactLinear.apply(x, values, bias, s.crow, s.col, s.crow_t, s.col_t, s.perm_t, capture)


def _shape_only(values: Tensor, out_features: int, in_features: int) -> Tensor:
    """A tensor of the dense weight's shape that holds one element: what the operators read the shape from."""
    return values.new_zeros(()).expand(out_features, in_features)


class _CompactLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, bias, crow, col, crow_t, col_t, perm_t, capture):
        ctx.save_for_backward(x, values, crow, col, crow_t, col_t, perm_t)
        ctx.has_bias, ctx.capture = bias is not None, capture
        weight = _shape_only(values, crow.numel() - 1, crow_t.numel() - 1)
        return torch.ops.lightning_rigl.sparse_linear(x, weight, values, bias, crow, col, crow_t)

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "A compact layer has no second derivative: a backward with `create_graph=True` (a gradient "
                "penalty, say) needs dense storage for the layers it differentiates through."
            )
        x, values, crow, col, crow_t, col_t, perm_t = ctx.saved_tensors
        needs_x, needs_values, needs_bias = ctx.needs_input_grad[:3]
        if ctx.capture is not None:
            ctx.capture.add(x, grad_out)
        grad_x = grad_values = grad_bias = None
        if needs_x or needs_values:
            weight = _shape_only(values, crow.numel() - 1, crow_t.numel() - 1)
            grad_x, grad_values = torch.ops.lightning_rigl.sparse_linear_backward(
                grad_out, x, weight, values, crow, col, crow_t, col_t, perm_t, False, False, needs_x, needs_values
            )
        if needs_bias and ctx.has_bias:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return (
            grad_x if needs_x else None,
            grad_values if needs_values else None,
            grad_bias,
            *(None,) * 6,
        )
