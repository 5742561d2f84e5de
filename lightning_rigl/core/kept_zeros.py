"""KeptZeros: a run's inactive weights and their gradients held at exactly 0, whatever the user's code does."""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping

import torch

from lightning_rigl.core.kernels.layer_kernels import LayerKernels
from lightning_rigl.core.topology.masks import LayerMasks
from lightning_rigl.core.topology.zero_guard import ZeroGuard
from lightning_rigl.core.user_hooks import UserCodeHooks


class KeptZeros:
    """Zeroes a run's gradients before the optimizer step and its weights after it, where nothing else did.

    A gradient is multiplied by its mask unless the sparse kernels wrote it masked or the run's hooks
    masked it as it accumulated; a weight after the step unless the
    :class:`~lightning_rigl.core.topology.zero_guard.ZeroGuard` knows the optimizer left it at 0.

    Args:
        masks: The run's masks, with the weights they mask.
        hooks: The run's hooks on the user's code.
        kernels: The run's sparse kernels.
        verify_every: Optimizer steps between checks that the weights left to the optimizer stayed at 0.

    Example:
        >>> from torch import nn
        >>> from lightning_rigl.core import SparseTraining
        >>> layer = nn.Linear(4, 2)
        >>> run = SparseTraining({"weight": layer.weight}, {"weight": 0.5})  # owns a KeptZeros: run.zeros
        >>> layer.weight.grad = torch.ones(2, 4)  # written by hand: no hook masked it
        >>> run.zeros.mask_gradients(["weight"])
        >>> torch.equal(layer.weight.grad, run.layer_masks.local["weight"])
        True
        >>> run.close()

    """

    def __init__(self, masks: LayerMasks, hooks: UserCodeHooks, kernels: LayerKernels, verify_every: int) -> None:
        self.masks, self.hooks, self.kernels = masks, hooks, kernels
        self.guard = ZeroGuard(masks, verify_every)

    def mask_gradients(self, names: list[str], already_masked: Container[str] = ()) -> None:
        """Zero the gradients of ``names`` at inactive positions, before the optimizer step (after they are read)."""
        params = self.masks.params
        written = self.kernels.already_masked(names)  # by the sparse kernels: 0 where inactive
        skip = set(already_masked) | set(written)
        unmasked = [n for n in names if n not in skip and not self.hooks.vouched(n, params[n].grad)]
        self.masks.zero_inactive(unmasked, gradients=True)
        self.hooks.masked(names)
        self.kernels.offer_gradients(written)  # their next backward writes into them
        self.guard.gradients_masked(names)

    def mask_weights(
        self,
        names: list[str],
        names_by_optimizer: Mapping[torch.optim.Optimizer, tuple[str, ...]],
        update: Callable[[], list[str]],
    ) -> list[str]:
        """After the optimizer stepped ``names``: ``update()`` the topology, then zero the weights that may have moved.

        Returns:
            What ``update`` returned: the names of the layers it updated.
        """
        left_at_zero = self.guard.weights_left_at_zero(names, names_by_optimizer)
        updated = update()
        self.guard.restart_state_once(names_by_optimizer)
        self.masks.zero_inactive([name for name in names if name not in left_at_zero])
        self.hooks.weights_masked(names)
        return updated

    @torch.no_grad()
    def zero_weights(self, names: Iterable[str]) -> None:
        """Zero the inactive weights of ``names``."""
        self.masks.zero_inactive(names)

    def masks_replaced(self) -> None:
        """Forget what the old masks made true: zero the weights they made inactive, restart the optimizer check."""
        self.guard.masks_replaced()  # optimizer state may be nonzero where the new masks are inactive
        self.hooks.masks_changed()
        self.zero_weights(self.masks.params)
        self.hooks.weights_masked(self.masks.params)
