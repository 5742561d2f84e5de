"""The sparse training methods, defined once: the update loop, the checks, the FLOPs and the monitor read them.

A method is a grow score (``None`` for a static mask) and the gradient signal that score reads. The
score function takes the layer's weight, the signal (``None`` when the method reads none) and a
``torch.Generator``, and returns a tensor of the weight's shape; larger means "grow first". A new
method is a new entry in :data:`METHODS_BY_NAME`, not a new update loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

import torch
from torch import Tensor

from lightning_rigl.core.validation import check_choice

MethodName = Literal["rigl", "set", "snfs", "static"]
#: When a method reads the dense weight gradient: never, at update steps only, or at every step.
DenseGradient = Literal["never", "update_steps", "every_step"]
ScoreFn = Callable[[Tensor, "Tensor | None", torch.Generator], Tensor]


def gradient_magnitude(weight: Tensor, signal: Tensor | None, generator: torch.Generator) -> Tensor:
    """RigL and SNFS: grow where the (dense, or averaged) gradient is largest in magnitude.

    Example:
        >>> gradient_magnitude(torch.zeros(3), torch.tensor([-2.0, 1.0, 0.5]), torch.Generator()).tolist()
        [2.0, 1.0, 0.5]
    """
    assert signal is not None, "gradient_magnitude needs a gradient signal"
    return signal.abs()


def uniform_random(weight: Tensor, signal: Tensor | None, generator: torch.Generator) -> Tensor:
    """SET: grow at random. Drawn on the CPU generator so that every device and rank agrees.

    Example:
        >>> uniform_random(torch.zeros(2, 3), None, torch.Generator().manual_seed(0)).shape
        torch.Size([2, 3])
    """
    return torch.rand(weight.shape, generator=generator).to(weight.device)


class GrowSignal:
    """What a method's grow score reads from the dense gradients; this base reads nothing.

    ``observe`` sees each masked layer's dense gradient at every optimizer step where
    :attr:`dense_gradient` says the method reads it (finite gradients only); ``read`` gives the
    score its signal at an update. Per-layer tensors a signal keeps between steps live in
    :attr:`tensors`, which a checkpoint saves.
    """

    dense_gradient: ClassVar[DenseGradient] = "never"

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}

    def observe(self, name: str, grad: Tensor) -> None:
        """Take note of the dense gradient of layer ``name`` at this step."""

    def read(self, name: str, grad: Tensor) -> Tensor | None:
        """The signal the grow score of layer ``name`` reads; ``grad`` is this step's dense gradient."""
        return None


class CurrentGradient(GrowSignal):
    """RigL: the dense gradient of the update step itself."""

    dense_gradient: ClassVar[DenseGradient] = "update_steps"

    def read(self, name: str, grad: Tensor) -> Tensor | None:
        """The dense gradient of this step."""
        return grad


class GradientMovingAverage(GrowSignal):
    """SNFS (sparse momentum): an exponential moving average of the dense gradients of every step.

    Args:
        decay: Weight of the previous average, in [0, 1).

    Example:
        >>> average = GradientMovingAverage(decay=0.5)
        >>> average.observe("w", torch.tensor([2.0])); average.observe("w", torch.tensor([4.0]))
        >>> average.read("w", torch.tensor([0.0])).tolist()
        [2.5]
    """

    dense_gradient: ClassVar[DenseGradient] = "every_step"

    def __init__(self, decay: float = 0.9) -> None:
        super().__init__()
        self.decay = decay

    def observe(self, name: str, grad: Tensor) -> None:
        """Fold this step's gradient into the layer's average (which starts at 0)."""
        average = self.tensors.setdefault(name, torch.zeros_like(grad))
        average.mul_(self.decay).add_(grad, alpha=1 - self.decay)

    def read(self, name: str, grad: Tensor) -> Tensor | None:
        """The layer's average of dense gradients."""
        return self.tensors.get(name)


@dataclass(frozen=True)
class Method:
    """A sparse training method: how it scores growth, and what it reads to do so.

    Attributes:
        name: The name users pass as ``method``.
        score: The grow score function; ``None`` for a mask that never changes.
        signal: The :class:`GrowSignal` type the score reads.
        random_score: The score draws from the generator, so its values depend on the order in which
            parts of a layer are scored: read it once, chunk by chunk, in order.

    Example:
        >>> METHODS_BY_NAME["rigl"].dense_gradient, METHODS_BY_NAME["static"].updates
        ('update_steps', False)
    """

    name: str
    score: ScoreFn | None
    signal: type[GrowSignal] = GrowSignal
    random_score: bool = False

    @property
    def updates(self) -> bool:
        """Whether the method changes the topology during training."""
        return self.score is not None

    @property
    def dense_gradient(self) -> DenseGradient:
        """When the method reads the dense weight gradient (what FLOPs accounting and kernels need)."""
        return self.signal.dense_gradient


METHODS_BY_NAME: dict[str, Method] = {
    "rigl": Method("rigl", gradient_magnitude, CurrentGradient),
    "set": Method("set", uniform_random, random_score=True),
    "snfs": Method("snfs", gradient_magnitude, GradientMovingAverage),
    "static": Method("static", None),
}
METHODS: tuple[str, ...] = get_args(MethodName)
assert METHODS == tuple(METHODS_BY_NAME), "MethodName and METHODS_BY_NAME must list the same methods"


def get_method(name: str) -> Method:
    """The method called ``name``; a ValueError naming ``method`` and the known ones otherwise.

    Example:
        >>> get_method("set").score.__name__
        'uniform_random'
    """
    return METHODS_BY_NAME[check_choice("method", name, METHODS)]
