"""Which masked weights stay at 0 by themselves after an optimizer step, and the checks that keep that true.

A weight at 0 whose gradient is masked and whose optimizer state at inactive positions is what a fresh
parameter starts with (0 for momentum and Adam's moments, ``lr`` for Rprop's step size) stays exactly 0
there under the element-wise torch optimizers, so it needs no re-zeroing pass after the step.
:class:`ZeroGuard` tracks when that holds, restarts optimizer state once where it may hold history, and
checks now and then that nothing else wrote to inactive weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from weakref import WeakKeyDictionary

import torch

from lightning_rigl.core.parallel.sharding import local_shard
from lightning_rigl.core.topology.masking import nonzero_where_inactive
from lightning_rigl.core.topology.masks import LayerMasks
from lightning_rigl.core.topology.optim_state import reset_optimizer_state
from lightning_rigl.core.validation import check_int

Optimizer = torch.optim.Optimizer

# torch.optim optimizers whose update of a weight reads only that weight, its gradient and its own
# per-element state, and is exactly 0 when the weight and gradient are 0 and the state is a fresh
# parameter's (momentum, Adam moments, Adagrad sums, Rprop step sizes, weight decay of either kind,
# Nesterov, AMSGrad, maximize, foreach and fused kernels alike; a test checks each).
# Exact types only: a subclass may change `step`. Optimizers that mix positions (LBFGS, or a
# third-party one with layer-wise norms or preconditioners) are not listed.
ZERO_PRESERVING_OPTIMIZERS: tuple[type[Optimizer], ...] = (
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


def keeps_zeros(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step()`` leaves a weight at exactly 0 when its gradient is 0 and its state fresh.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> keeps_zeros(torch.optim.AdamW([w])), keeps_zeros(torch.optim.LBFGS([w]))
        (True, False)

    """
    return type(optimizer) in ZERO_PRESERVING_OPTIMIZERS


class ZeroGuard:
    """Decides after each optimizer step which masked weights need a re-zeroing pass.

    A layer needs none when this step masked its gradient and every optimizer that holds it keeps
    zeros (:func:`keeps_zeros`) and has had its state restarted at the layer's inactive positions. Every
    ``verify_every`` steps the guard checks those layers; if one is nonzero where inactive, it warns
    once and from then on every layer is re-zeroed after every step.

    Args:
        masks: The masks of the run, with the weights they mask.
        verify_every: Optimizer steps between checks, >= 1.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> masks = LayerMasks({"w": w})
        >>> masks.replace({"w": torch.tensor([True, False])})
        >>> guard, opt = ZeroGuard(masks, verify_every=100), torch.optim.SGD([w], lr=0.1)
        >>> guard.gradients_masked(["w"])
        >>> guard.weights_left_at_zero(["w"], {opt: ("w",)})  # state not restarted yet
        set()
        >>> guard.restart_state_once({opt: ("w",)})
        >>> guard.gradients_masked(["w"])
        >>> guard.weights_left_at_zero(["w"], {opt: ("w",)})
        {'w'}
    """

    def __init__(self, masks: LayerMasks, verify_every: int = 100) -> None:
        self.masks = masks
        self.verify_every = check_int("verify_every", verify_every, 1)
        self.optimizers_keep_zeros = True  # False once a nonzero turned up where a layer was trusted
        self._steps_to_verify = verify_every
        self._gradients_masked: set[str] = set()
        # Per optimizer, the masked names it held when its state was last restarted at inactive positions.
        self._state_restarted_for: WeakKeyDictionary[Optimizer, tuple[str, ...]] = WeakKeyDictionary()

    def gradients_masked(self, names: Iterable[str]) -> None:
        """Record that the gradients of ``names`` were multiplied by their masks for the coming step."""
        self._gradients_masked.update(names)

    def masks_replaced(self) -> None:
        """Forget the restarted state: new masks may be inactive where the state holds history."""
        self._state_restarted_for.clear()

    def weights_left_at_zero(
        self, names: list[str], names_by_optimizer: Mapping[Optimizer, tuple[str, ...]]
    ) -> set[str]:
        """Names among ``names`` (the layers this step updated) that need no re-zeroing pass.

        Args:
            names: The masked layers the optimizer step just updated.
            names_by_optimizer: Every optimizer of the run, to the masked names it holds.

        """
        trusted = self._trusted_layers(names_by_optimizer) if self.optimizers_keep_zeros else set()
        left = {name for name in names if name in self._gradients_masked and name in trusted}
        self._gradients_masked.difference_update(names)
        self._steps_to_verify -= 1
        if self._steps_to_verify <= 0 and left:
            self._steps_to_verify = self.verify_every
            leaked = [name for name in sorted(left) if self._nonzero_where_inactive(name)]
            if leaked:
                self._distrust(leaked, names_by_optimizer)
                return set()
        return left

    def restart_state_once(self, names_by_optimizer: Mapping[Optimizer, tuple[str, ...]]) -> None:
        """Restart each zero-keeping optimizer's state at inactive positions, once per set of layers it holds.

        State from before the masks (a dense checkpoint) would move inactive weights; after this,
        dropping a connection restarts its state, which keeps it fresh.
        """
        for optimizer, held in names_by_optimizer.items():
            if keeps_zeros(optimizer) and self._state_restarted_for.get(optimizer) != held:
                for name in held:
                    reset_optimizer_state([optimizer], self.masks.params[name], self.masks.local[name] == 0)
                self._state_restarted_for[optimizer] = held

    def _nonzero_where_inactive(self, name: str) -> bool:
        return nonzero_where_inactive(local_shard(self.masks.params[name]), self.masks.local[name])

    def _trusted_layers(self, names_by_optimizer: Mapping[Optimizer, tuple[str, ...]]) -> set[str]:
        # A layer is trusted only if every optimizer that holds it is.
        verdict: dict[str, bool] = {}
        for optimizer, held in names_by_optimizer.items():
            ok = keeps_zeros(optimizer) and self._state_restarted_for.get(optimizer) == held
            for name in held:
                verdict[name] = verdict.get(name, True) and ok
        return {name for name, ok in verdict.items() if ok}

    def _distrust(self, leaked: list[str], names_by_optimizer: Mapping[Optimizer, tuple[str, ...]]) -> None:
        self.optimizers_keep_zeros = False
        kinds = sorted({type(optimizer).__name__ for optimizer in names_by_optimizer})
        warnings.warn(
            f"Inactive weights of {leaked} were nonzero after an optimizer step, although their gradients were "
            f"masked and their optimizer ({', '.join(kinds)}) keeps zeros at 0: something else writes to them or "
            "to their gradients after masking. Inactive weights are re-zeroed after every step from now on.",
            stacklevel=4,
        )
