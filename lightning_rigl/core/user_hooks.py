"""The hooks that make user code see the same tensors on sparse and dense kernels.

One rule: between a backward pass and the optimizer step, user code sees each masked weight's gradient
masked (0 at inactive positions), except for the steps whose dense gradient the method reads (RigL's update
steps, every step for SNFS), where it sees the dense gradient. Dense kernels follow it by masking each
gradient as it is accumulated (a post-accumulate-grad hook runs before ``on_after_backward``, manual
clipping and DDP's reducer); sparse kernels by writing it at active positions only. And the weights stay
masked however they are written: after ``load_state_dict`` of a module holding one (a rollback to a
snapshot), after in-place writes the version counter sees, and an optimizer's loaded state is restarted
at inactive positions.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lightning_rigl.core.kernels.masked_gradients import GradientStamp
from lightning_rigl.core.topology.masks import LayerMasks
from lightning_rigl.core.topology.optim_state import reset_optimizer_state


class GradientSource(Protocol):
    """What sparse kernels know of the gradients they wrote (see ``SparseKernels``)."""

    def wrote_masked(self, name: str, grad: Tensor | None) -> bool:
        """Whether ``grad`` is the very tensor the kernel wrote at active positions, unchanged since."""

    def holds_sampled(self, name: str) -> bool:
        """Whether the gradient holds a contribution written at active positions only."""

    def steps_taken(self, names: Iterable[str]) -> None:
        """The optimizer stepped ``names``."""

    def forget_written(self) -> None:
        """Records of gradients written before now vouch for nothing (the masks changed)."""


class UserCodeHooks:
    """Keeps the gradients user code sees, and the weights it writes, masked: see the module docstring.

    Args:
        masks: The run's masks, with the weights they mask.
        reading: Whether the coming optimizer step reads the dense weight gradient (asked at each backward).

    Example:
        >>> layer = nn.Linear(3, 2, bias=False)
        >>> masks = LayerMasks({"weight": layer.weight})
        >>> masks.replace({"weight": torch.tensor([[True, False, True], [False, True, False]])})
        >>> hooks = UserCodeHooks(masks, reading=lambda: False)
        >>> hooks.install()
        >>> layer(torch.randn(4, 3)).sum().backward()
        >>> bool(layer.weight.grad[0, 1] == 0), bool(layer.weight.grad[1, 0] == 0)  # masked as accumulated
        (True, True)
        >>> hooks.remove()

    """

    def __init__(self, masks: LayerMasks, reading: Callable[[], bool]) -> None:
        self.masks, self.reading = masks, reading
        self.kernels: GradientSource | None = None  # set while sparse kernels serve layers of the run
        self._name_of = {id(p): name for name, p in masks.params.items()}
        self._handles: list[Any] = []
        self._hooked: set[str] = set()  # the weights whose gradients are hooked
        self._installed = False
        # Per layer, the gradient masked here as it accumulated, until its step: it needs no second pass, and
        # holds masked contributions (for a step that did not read it): no dense gradient to grow from.
        self._masked: dict[str, GradientStamp] = {}
        self._versions: dict[str, int] = {}  # each weight's version when last known masked

    def install(self, modules: Iterable[nn.Module] = (), optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        """Hook every masked weight's gradient; re-mask after ``load_state_dict`` of ``modules`` and ``optimizers``.

        Replaces hooks installed before.
        """
        self.remove()
        self._installed = True
        self._hook_gradients()
        held = set(self._name_of)
        for module in modules:
            for owner in module.modules():
                if any(id(p) in held for p in owner.parameters(recurse=False)):
                    self._handles.append(owner.register_load_state_dict_post_hook(_WeakHook(self, "module_loaded")))
        for optimizer in optimizers:
            self._handles.append(optimizer.register_load_state_dict_post_hook(_WeakHook(self, "optimizer_loaded")))

    def remove(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._hooked = set()
        self._installed = False

    def _hook_gradients(self) -> None:
        """Hook the gradient of every masked weight that needs one and has none (a frozen one unfrozen since)."""
        for name, param in self.masks.params.items():
            if name in self._hooked or not param.requires_grad:  # a frozen weight has no gradient to mask
                continue
            # One run masks a weight's gradient at a time: the latest to install (an earlier run on the same
            # model, say one built to validate a checkpoint, would mask with its own masks).
            for hook in list((getattr(param, "_post_accumulate_grad_hooks", None) or {}).values()):
                earlier = hook.owner() if isinstance(hook, _WeakHook) else None
                if earlier is not None and earlier is not self:
                    earlier.remove()
            self._handles.append(param.register_post_accumulate_grad_hook(_WeakHook(self, "accumulated")))
            self._hooked.add(name)

    def vouched(self, name: str, grad: Tensor | None) -> bool:
        """Whether ``grad`` is known to be 0 at every inactive position of ``name`` (masked here or by a kernel)."""
        if grad is None:
            return False
        stamp = self._masked.get(name)
        if stamp is not None and stamp.matches(grad):
            return True
        return self.kernels is not None and self.kernels.wrote_masked(name, grad)

    def holds_partial(self, name: str) -> bool:
        """Whether the gradient of ``name`` holds a masked contribution: a topology update must not grow from it."""
        stamp, grad = self._masked.get(name), self.masks.params[name].grad
        # The tensor masked as it accumulated, accumulated into since or not.
        if stamp is not None and stamp.same_memory(grad):
            return True
        return self.kernels is not None and self.kernels.holds_sampled(name)

    def masked(self, names: Iterable[str]) -> None:
        """The gradients of ``names`` were just masked for their optimizer step, which comes now: forget them."""
        names = list(names)  # read twice
        for name in names:
            self._masked.pop(name, None)  # and the stamp lets the gradient's memory go
        if self.kernels is not None:
            self.kernels.steps_taken(names)

    def masks_changed(self, names: Iterable[str] | None = None) -> None:
        """The masks of ``names`` (None: all) changed: gradients masked before are not masked for the new ones."""
        for name in list(self.masks.params) if names is None else names:
            self._masked.pop(name, None)
        if self.kernels is not None:
            self.kernels.forget_written()

    def weights_masked(self, names: Iterable[str]) -> None:
        """The weights of ``names`` are masked now: a later in-place write shows as a new version."""
        for name in names:
            self._versions[name] = self.masks.params[name]._version

    def remask_written_weights(self) -> list[str]:
        """Zero the inactive weights written in place since they were last masked; their names."""
        if self._installed and len(self._hooked) < len(self.masks.params):
            self._hook_gradients()  # BackboneFinetuning and the like unfreeze layers mid-fit
        written = [name for name, p in self.masks.params.items() if self._versions.get(name) != p._version]
        if written:
            with torch.no_grad():
                self.masks.zero_inactive(written)
            self.weights_masked(written)
        return written

    def accumulated(self, param: Tensor) -> None:
        """A gradient was accumulated into ``param.grad``: mask it unless the coming step reads it dense."""
        name = self._name_of.get(id(param))
        grad = param.grad
        if name is None or grad is None or self.reading() or self.vouched(name, grad):
            return
        self.masks.zero_inactive([name], gradients=True)
        self._masked[name] = GradientStamp(grad)

    def module_loaded(self, module: nn.Module, incompatible_keys: Any) -> None:
        """``load_state_dict`` wrote ``module``'s own parameters: mask the masked ones again."""
        names = [self._name_of[id(p)] for p in module.parameters(recurse=False) if id(p) in self._name_of]
        with torch.no_grad():
            self.masks.zero_inactive(names)
        self.weights_masked(names)

    def optimizer_loaded(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.load_state_dict`` ran: restart its state at inactive positions."""
        # A loaded state (a rollback's snapshot) may hold history where the current masks are inactive.
        for group in optimizer.param_groups:
            for param in group["params"]:
                name = self._name_of.get(id(param))
                if name is not None:
                    reset_optimizer_state([optimizer], param, self.masks.local[name] == 0)


class _WeakHook:
    """A hook that calls a method of its :class:`UserCodeHooks` through a weak reference.

    Torch keeps hooks on the weights, modules and optimizers: weakly tied, they do not keep a run alive.
    A pickled copy of a module (``torch.save`` of a whole model) carries an inert one: the copy is no
    longer trained by this run.
    """

    def __init__(self, owner: UserCodeHooks | None, method: str = "") -> None:
        self.owner = weakref.ref(owner) if owner is not None else _nobody
        self.method = method

    def __call__(self, *args: Any) -> None:
        owner = self.owner()
        if owner is not None:
            getattr(owner, self.method)(*args)

    def __reduce__(self) -> tuple:
        return _WeakHook, (None,)


def _nobody() -> None:
    return None
