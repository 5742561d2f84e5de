"""Grow criteria: each method is a score function; the update loop is shared.

A score function takes the layer's weight, the method's gradient signal (None when the method needs
none) and a ``torch.Generator``, and returns a tensor of the weight's shape; larger means "grow first".
A new criterion is a new entry in :data:`GROW_CRITERIA`, not a new update loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

ScoreFn = Callable[[Tensor, "Tensor | None", torch.Generator], Tensor]


def gradient_magnitude(weight: Tensor, signal: Tensor | None, generator: torch.Generator) -> Tensor:
    """RigL and SNFS: grow where the (dense, or averaged) gradient is largest in magnitude."""
    assert signal is not None, "gradient_magnitude needs a gradient signal"
    return signal.abs()


def uniform_random(weight: Tensor, signal: Tensor | None, generator: torch.Generator) -> Tensor:
    """SET: grow at random. Drawn on the CPU generator so that every device and rank agrees."""
    return torch.rand(weight.shape, generator=generator).to(weight.device)


@dataclass(frozen=True)
class GrowCriterion:
    """A grow score and the gradient signal it reads.

    Attributes:
        score: The score function.
        signal: ``"gradient"`` (the dense gradient of the update step), ``"gradient_ema"`` (an
            exponential moving average of dense gradients, kept every step) or ``None``.

    """

    score: ScoreFn
    signal: Literal["gradient", "gradient_ema"] | None


GROW_CRITERIA: dict[str, GrowCriterion] = {
    "rigl": GrowCriterion(gradient_magnitude, "gradient"),
    "set": GrowCriterion(uniform_random, None),
    "snfs": GrowCriterion(gradient_magnitude, "gradient_ema"),
}
METHODS = ("rigl", "set", "snfs", "static")
