"""SparseTraining: the run. Its masks, its topology updates and the three calls a step that drive them."""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_rigl.core.history import UpdateRecord
from lightning_rigl.core.kept_zeros import KeptZeros
from lightning_rigl.core.kernels.layer_kernels import LayerKernels
from lightning_rigl.core.masked_weights import MaskedWeights, ParamsLike
from lightning_rigl.core.parallel.collectives import broadcast_from_rank_zero
from lightning_rigl.core.run_state import load_run_state, run_state_dict
from lightning_rigl.core.scheduled_updates import ScheduledUpdates
from lightning_rigl.core.storage.compaction import DrawnMasks, check_elementwise_optimizers
from lightning_rigl.core.topology.initial_masks import random_masks
from lightning_rigl.core.topology.methods import Method, get_method
from lightning_rigl.core.topology.optim_state import check_restartable, unwrap_optimizer
from lightning_rigl.core.topology.schedule import UpdateSchedule
from lightning_rigl.core.user_hooks import UserCodeHooks


class SparseTraining(MaskedWeights):
    """Masks a set of parameters and runs RigL, SET or SNFS topology updates; knows no training loop.

    Drive it from any loop, three calls a step: :meth:`start_step` before each forward pass (every
    micro-batch), :meth:`before_step` once the step's gradients are final (after accumulation, all-reduce
    and unscaling), :meth:`after_step` after ``optimizer.step()``. Inactive weights stay at 0 (see
    :class:`~lightning_rigl.core.kept_zeros.KeptZeros`); given the ``model``, its masked Linear-type layers
    compute on the ``kernels`` chosen after the first step, exactly as under RigLCallback.

    Args:
        params: Parameter name to parameter, the weights to mask (one entry per Parameter object).
        sparsities: Parameter name to fraction of zeros in [0, 1).
        method: ``"rigl"``, ``"set"``, ``"snfs"`` or ``"static"`` (no updates); see
            :mod:`~lightning_rigl.core.topology.methods`.
        schedule: When and how much to update; ``None`` for no updates.
        seed: Seed of the generator behind the initial masks and SET's random growth.
        state: A :meth:`state_dict` to resume from instead of drawing fresh masks.
        verify_every: Optimizer steps between checks that the inactive weights left to the optimizer
            are still exactly 0.
        model: The module holding ``params``, whose Linear-type layers may compute on sparse kernels.
        kernels: ``"auto"``, ``"sparse"`` or ``"dense"``, as RigLCallback's ``kernels`` (needs ``model``).
        drawn: The initial masks drawn with some layers made compact (see
            :func:`~lightning_rigl.core.storage.compaction.draw_compact`): their ``sparsities`` are given too.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> sparse = SparseTraining.from_model(model, 0.5, schedule=UpdateSchedule(delta_t=2, t_end=10))
        >>> for step in range(4):
        ...     _ = sparse.start_step(step)  # before the forward pass: whether this step reads dense gradients
        ...     model(torch.randn(4, 8)).sum().backward()
        ...     sparse.before_step(step, opt)
        ...     opt.step()
        ...     _ = sparse.after_step([opt], opt)  # the names of the layers it updated
        ...     opt.zero_grad()
        >>> sparse.updates, int(sparse.masks["0.weight"].sum()), sparse.kernel_choices["0.weight"]
        (2, 48, 'dense')
        >>> sparse.close()  # the model's layers get their own forwards back, the hooks go

    """

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        sparsities: Mapping[str, float],
        *,
        method: str = "rigl",
        schedule: UpdateSchedule | None = None,
        seed: int = 0,
        state: Mapping[str, Any] | None = None,
        verify_every: int = 100,
        model: nn.Module | None = None,
        kernels: str = "auto",
        drawn: DrawnMasks | None = None,
    ) -> None:
        self.method: Method = get_method(method)
        super().__init__(params, sparsities, drawn.compact if drawn is not None else None)
        self.generator = torch.Generator().manual_seed(seed)
        self.scheduled = ScheduledUpdates(self.method, schedule, self.layer_masks, self.generator, self.compact)
        self._next_step = self._last_step = 0  # the coming optimizer step, the last one begun by before_step
        self._reading = False
        self.hooks = UserCodeHooks(self.layer_masks, lambda: self._reading)
        self.model = model
        self.layer_kernels = LayerKernels(
            kernels, self.layer_masks, self.hooks, self.method.dense_gradient == "every_step"
        )
        self.zeros = KeptZeros(self.layer_masks, self.hooks, self.layer_kernels, verify_every)
        if state is not None:
            self.load_state_dict(state)  # no fresh draw: it would zero weights the saved masks keep
        elif drawn is not None:
            self.set_masks(drawn.dense)
            self.generator.set_state(drawn.generator_state)
        else:
            self.set_masks(
                random_masks({name: p.shape for name, p in self.params.items()}, self.sparsities, self.generator)
            )
        self.hooks.install()
        # Step 0 is next; nothing touches the model's forwards before the first start_step (a validation
        # sanity check in between must not feed the kernel probe).
        self._reading = self.dense_gradient_needed(0)

    @classmethod
    def from_state(cls, params: Mapping[str, nn.Parameter], state: Mapping[str, Any], **kwargs: Any) -> SparseTraining:
        """The run a :meth:`state_dict` describes, on ``params``: with the saved method and per-layer sparsities.

        Example:
            >>> layer = nn.Linear(4, 4)
            >>> saved = SparseTraining({"weight": layer.weight}, {"weight": 0.5}, method="set").state_dict()
            >>> SparseTraining.from_state({"weight": layer.weight}, saved).method.name
            'set'
        """
        # Every saved version holds the method and the sparsities under these names; the constructor migrates.
        return cls(params, state["sparsities"], method=state["method"], state=state, **kwargs)

    @property
    def kernel_choices(self) -> dict[str, str]:
        """Masked parameter name to ``"sparse"`` or ``"dense"``: how it computes; empty until chosen (first step)."""
        return dict(self.layer_kernels.choices or {})

    @property
    def updates(self) -> int:
        """Number of topology updates made so far."""
        return len(self.scheduled.history)

    @property
    def history(self) -> list[UpdateRecord]:
        """The topology updates made so far, one record per scheduled step."""
        return self.scheduled.history

    @property
    def schedule(self) -> UpdateSchedule | None:
        """When and how much to update (None: no updates); a new fit of the same model may set another."""
        return self.scheduled.schedule

    @schedule.setter
    def schedule(self, schedule: UpdateSchedule | None) -> None:
        self.scheduled.schedule = schedule

    @property
    def nonfinite_steps(self) -> int:
        """Update steps whose gradients were not finite: no update was made from them (it waited)."""
        return self.scheduled.nonfinite_steps

    @property
    def deferred_steps(self) -> int:
        """Update steps that waited because a gradient held masked contributions (no dense gradient to grow from)."""
        return self.scheduled.deferred_steps

    def dense_gradient_needed(self, step: int) -> bool:
        """Whether the optimizer step of 0-based index ``step`` reads the dense weight gradients.

        Known before the step's forward pass (for every micro-batch of an accumulated step): SNFS reads
        them at every step, RigL at scheduled update steps and while an update waits for finite
        gradients, SET and static masks never.
        """
        return self.scheduled.reads_dense_gradient(step)

    def before_step(self, step: int, params: ParamsLike = None, already_masked: Container[str] = ()) -> None:
        """Read the dense gradients this step needs, then zero gradients at inactive positions.

        Args:
            step: 0-based index of the optimizer step about to run (``trainer.global_step``).
            params: The parameters this optimizer step updates (an optimizer); None for all.
            already_masked: Names whose gradients are known to be 0 at every inactive position already
                (written so by the sparse kernels): not multiplied by their masks again. Gradients masked by
                the run's own hooks, or written masked by its sparse kernels, are known already.

        """
        names = [name for name in self.masked_names(params) if self.params[name].grad is not None]
        compact = [name for name in self.compact.names(params) if self.compact.has_gradient(name)]
        self.scheduled.read(step, names + compact, self.hooks.holds_partial)
        if compact:
            self.compact.release(compact)  # their kept backward passes are read: no dense gradient is kept
        self.zeros.mask_gradients(names, already_masked)
        self._last_step = step

    def after_step(self, optimizers: Iterable[torch.optim.Optimizer], params: ParamsLike = None) -> list[str]:
        """Make any topology update that is due after ``optimizer.step()``, and keep inactive weights at 0.

        Args:
            optimizers: Every optimizer of the run; state of changed connections is reset in all of them.
            params: The parameters the step updated (an optimizer); None for all.

        Returns:
            The names of the layers whose masks this call updated.

        """
        optimizers = [unwrap_optimizer(optimizer) for optimizer in optimizers]
        params = unwrap_optimizer(params) if isinstance(params, torch.optim.Optimizer) else params
        names, names_by_optimizer = self.stepped_names(optimizers, params)
        compact = self.compact.names(params)
        updated = self.zeros.mask_weights(
            names, names_by_optimizer, lambda: self.update_topology(optimizers, names + compact)
        )
        self.compact.release(compact)  # stepped: their gradient is spent, and what their backward passes kept
        if self.model is not None:
            self.layer_kernels.choose(self.model, broadcast_from_rank_zero)  # after the first step: its rows seen
        self.start_step(self._last_step + 1)
        return updated

    def start_step(self, step: int) -> bool:
        """Begin optimizer step ``step`` (0-based): before its forward pass. Returns whether it reads dense gradients.

        Call it before each forward pass (every micro-batch). :meth:`after_step` also begins the next step,
        so a forward between two steps of one batch (manual optimization) is covered without it. Masked
        weights written in place since they were last masked (``load_state_dict``, ``copy_`` under
        ``no_grad``) are masked again here, before any forward sees them.
        """
        self._next_step = step
        self._reading = self.dense_gradient_needed(step)
        self.hooks.remask_written_weights()
        self.compact.begin(self._reading)
        if self.model is not None:
            self.layer_kernels.begin(self.model, self._reading)
        return self._reading

    @property
    def reading(self) -> bool:
        """Whether the coming optimizer step reads the dense weight gradients (so user code sees them unmasked)."""
        return self._reading

    def install_hooks(
        self, modules: Iterable[nn.Module] = (), optimizers: Iterable[torch.optim.Optimizer] = ()
    ) -> None:
        """Install the gradient hooks (done at construction), and re-mask after ``load_state_dict`` of these.

        See :class:`~lightning_rigl.core.user_hooks.UserCodeHooks`.
        """
        self.hooks.install(modules, optimizers)

    def remove_hooks(self) -> None:
        """Remove every hook this run installed (the gradients are then masked at :meth:`before_step` only)."""
        self.hooks.remove()

    def close(self) -> None:
        """Give the model's layers their own forwards back and remove the hooks; the masks and choices stay.

        The next :meth:`start_step` attaches the chosen kernels again (call :meth:`install_hooks` too).
        """
        self.layer_kernels.detach()
        self.hooks.remove()

    def update_topology(
        self, optimizers: Iterable[torch.optim.Optimizer], names: Iterable[str] | None = None
    ) -> list[str]:
        """Drop and grow every layer among ``names`` (default: all) whose grow scores were read.

        :meth:`after_step` calls it; call it alone to finish updates whose scores a checkpoint saved.
        Returns the names of the layers it updated (with several optimizers, a scheduled update may
        reach the layers of each at a different step).
        """
        return self.scheduled.make(optimizers, names, self._masks_changed)

    def _masks_changed(self, names: list[str]) -> None:
        self.hooks.masks_changed(names)
        self.layer_kernels.masks_changed(names)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: tensors and Python primitives only, masks at 1 bit a weight.

        With the kernel choices once made (``"kernels"``): a resumed run computes as before the save. A
        compact layer saves no mask: its structure is in the model's ``state_dict``.
        """
        return run_state_dict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, of any saved version (migrated first), into this run.

        Raises:
            ValueError: Names or shapes that differ from this run's masked parameters, another method or
                other per-layer sparsities, or a state version this release cannot read.
        """
        load_run_state(self, state)

    def check_optimizers(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Raise a ValueError naming any optimizer whose state cannot be restarted for a regrown connection.

        Call it before training and after the first optimizer step (see ``check_restartable``); a static mask
        needs no restarts. Compact layers train with elementwise optimizers only (others are named too).
        """
        optimizers = [unwrap_optimizer(optimizer) for optimizer in optimizers]
        values = [self.compact.values(name) for name in self.compact]
        check_elementwise_optimizers(optimizers, values)
        if self.method.updates:
            check_restartable(optimizers, [*self.params.values(), *values])

    def masks_replaced(self) -> None:
        """Forget what the old masks made true: zero the weights they made inactive, restart the optimizer check."""
        # Not the base's: the optimizer check restarts first, the hooks hear it, the next step's reading is known again.
        self.zeros.masks_replaced()
        self._reading = self.dense_gradient_needed(self._next_step)
