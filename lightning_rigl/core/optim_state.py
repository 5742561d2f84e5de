"""Optimizer state at changed connections, for any torch optimizer."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from lightning_rigl.core.masking import fill_positions
from lightning_rigl.core.sharding import local_shard


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
                fill_positions(local_shard(value), positions, 0.0)
                touched += 1
    return touched
