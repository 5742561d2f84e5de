"""Optimizer state at changed connections, for any torch optimizer, and which optimizers keep zeros at zero."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from lightning_rigl.core.sharding import local


@torch.no_grad()
def fill_positions(tensor: Tensor, positions: Tensor, value: float) -> None:
    """Set ``tensor`` to ``value`` at ``positions``: a bool tensor of its shape, or flat indices.

    Example:
        >>> t = torch.ones(2, 3)
        >>> fill_positions(t, torch.tensor([0, 4]), 0.0)
        >>> t.tolist()
        [[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]
    """
    positions = positions.to(tensor.device)
    if positions.dtype == torch.bool:
        tensor.masked_fill_(positions, value)
    elif tensor.is_contiguous():
        tensor.view(-1).index_fill_(0, positions, value)  # k indices: no pass over the tensor
    else:
        flags = torch.zeros(tensor.numel(), dtype=torch.bool, device=tensor.device)
        flags[positions] = True
        tensor.masked_fill_(flags.view(tensor.shape), value)


@torch.no_grad()
def reset_optimizer_state(optimizers: Iterable[torch.optim.Optimizer], param: Tensor, positions: Tensor) -> int:
    """Zero, at ``positions``, every state tensor of ``param``'s shape in every optimizer that holds it.

    This covers SGD's ``momentum_buffer``, Adam's ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``,
    RMSprop's ``square_avg``, Adagrad's ``sum`` and any other per-element state, whatever the param
    group. Scalars (such as Adam's ``step``) and factored states of another shape are left alone.

    Args:
        optimizers: Optimizers to search.
        param: The parameter whose state to reset.
        positions: Bool tensor of ``param``'s shape, True where to reset (for a sharded ``param``,
            this rank's shard of it), or a 1-D tensor of flat indices into ``param``.

    Returns:
        The number of state tensors touched.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
        >>> w.grad = torch.ones(3); opt.step()
        >>> reset_optimizer_state([opt], w, torch.tensor([True, False, False]))
        1
        >>> opt.state[w]["momentum_buffer"].tolist()
        [0.0, 1.0, 1.0]

    """
    touched = 0
    for optimizer in optimizers:
        for value in optimizer.state.get(param, {}).values():
            if isinstance(value, Tensor) and value.shape == param.shape:
                fill_positions(local(value), positions, 0.0)
                touched += 1
    return touched


# torch.optim optimizers whose update of a weight reads only that weight, its gradient and its own
# per-element state, and is exactly 0 when all three are 0 (momentum, Adam moments, Adagrad sums,
# weight decay of either kind, Nesterov, AMSGrad, maximize, foreach and fused kernels alike).
# Exact types only: a subclass may change `step`. Optimizers that mix positions (LBFGS, or a
# third-party one with layer-wise norms or preconditioners) are not listed.
ZERO_PRESERVING_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.RMSprop,
    torch.optim.Rprop,
    torch.optim.ASGD,
)


def keeps_zeros(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` leaves a weight at exactly 0 when its gradient and state are 0 there.

    For such optimizers masked weights need no re-zeroing after each step, once their gradient is
    masked and their state is 0 at inactive positions.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> keeps_zeros(torch.optim.AdamW([w])), keeps_zeros(torch.optim.LBFGS([w]))
        (True, False)

    """
    return type(optimizer) in ZERO_PRESERVING_OPTIMIZERS
