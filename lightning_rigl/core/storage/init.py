"""The initial active values of a compact layer built without a dense weight (on the meta device)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_rigl.core.sparsity.linear_types import linear_kind, qualified_name

#: ``init(values, shape)``: fill a compact layer's active values in place; ``shape`` is the logical (out, in).
ValueInit = Callable[[Tensor, tuple[int, int]], None]

_CONV1D = "transformers.pytorch_utils.Conv1D"


@torch.no_grad()
def default_init(
    module: nn.Module,
    values: Tensor | None,
    bias: Tensor | None,
    *,
    fan_in: int,
    generator: torch.Generator | None = None,
) -> None:
    """Draw a compact layer's active values and its bias (each if not None) as its Linear class initialises them.

    ``nn.Linear`` (and its subclasses): both uniform in ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``, the bound of
    its ``kaiming_uniform_(a=sqrt(5))``; Hugging Face ``Conv1D``: values normal with std 0.02, bias 0. Each
    active value is drawn from the distribution each dense weight is drawn from.

    Raises:
        ValueError: Values of another Linear class, whose initialisation is unknown here: give an ``init``
            function. Its bias is set to 0.

    Example:
        >>> values = torch.empty(1000)
        >>> default_init(nn.Linear(4, 2), values, None, fan_in=4, generator=torch.Generator().manual_seed(0))
        >>> bool(values.abs().max() <= 0.5)
        True
    """
    kind = linear_kind(module)
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    if kind is not None and issubclass(kind[0], nn.Linear):
        for tensor in (values, bias):
            if tensor is not None:
                tensor.uniform_(-bound, bound, generator=generator)
        return
    if bias is not None:
        bias.zero_()
    if values is None:
        return
    if kind is not None and qualified_name(kind[0]) == _CONV1D:
        values.normal_(0.0, 0.02, generator=generator)
    else:
        raise ValueError(
            f"The default initialisation of a {type(module).__name__} is unknown here: pass `init`, a function "
            "that fills the active values in place, given them and the (out, in) shape."
        )
