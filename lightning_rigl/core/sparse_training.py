"""SparseTraining: the masks of a run and the topology update loop that every method shares."""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from lightning_rigl.core.candidates import GrowCandidates
from lightning_rigl.core.distributed import all_finite, broadcast_from_rank_zero, check_masks_agree_across_ranks
from lightning_rigl.core.distribution import resolve_sparsities
from lightning_rigl.core.history import UpdateRecord, record_update
from lightning_rigl.core.layer_kernels import LayerKernels
from lightning_rigl.core.layer_update import drop_and_grow_layer, read_grow_scores
from lightning_rigl.core.masks import LayerMasks
from lightning_rigl.core.methods import Method, get_method
from lightning_rigl.core.optim_state import check_restartable, unwrap_optimizer
from lightning_rigl.core.saved_state import STATE_VERSION, check_same_run, check_saved_shapes, migrate_state
from lightning_rigl.core.schedule import UpdateSchedule
from lightning_rigl.core.selection import select_parameters
from lightning_rigl.core.sharding import distribute_like_param, gather_full, local_shard, wrap_like_param
from lightning_rigl.core.topology import num_active, random_mask
from lightning_rigl.core.user_hooks import UserCodeHooks
from lightning_rigl.core.zero_guard import ZeroGuard

ParamsLike = torch.optim.Optimizer | Iterable[Tensor] | None


class SparseTraining:
    """Masks a set of parameters and runs RigL, SET or SNFS topology updates; knows no training loop.

    Drive it from any loop, three calls a step: :meth:`start_step` before each forward pass (every
    micro-batch), :meth:`before_step` once the step's gradients are final (after accumulation, all-reduce
    and unscaling), :meth:`after_step` after ``optimizer.step()``. Inactive weights stay at 0 (see
    :class:`~lightning_rigl.core.zero_guard.ZeroGuard`); given the ``model``, its masked Linear-type layers
    compute on the ``kernels`` chosen after the first step, exactly as under RigLCallback.

    Args:
        params: Parameter name to parameter, the weights to mask (one entry per Parameter object).
        sparsities: Parameter name to fraction of zeros in [0, 1).
        method: ``"rigl"``, ``"set"``, ``"snfs"`` or ``"static"`` (no updates); see
            :mod:`~lightning_rigl.core.methods`.
        schedule: When and how much to update; ``None`` for no updates.
        seed: Seed of the generator behind the initial masks and SET's random growth.
        state: A :meth:`state_dict` to resume from instead of drawing fresh masks.
        verify_every: Optimizer steps between checks that the inactive weights left to the optimizer
            are still exactly 0.
        model: The module holding ``params``, whose Linear-type layers may compute on sparse kernels.
        kernels: ``"auto"``, ``"sparse"`` or ``"dense"``, as RigLCallback's ``kernels`` (needs ``model``).

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
    ) -> None:
        self.method: Method = get_method(method)
        if set(sparsities) != set(params):
            raise ValueError(f"`sparsities` must name exactly the parameters {list(params)}, got {list(sparsities)}.")
        self.params = dict(params)
        self.sparsities = {name: float(sparsities[name]) for name in self.params}
        self.signal = self.method.signal()
        self.schedule = schedule
        self.generator = torch.Generator().manual_seed(seed)
        self.history: list[UpdateRecord] = []
        self.nonfinite_steps = 0
        self._name_of = {id(p): name for name, p in self.params.items()}
        #: Layers whose update is scheduled and not made yet: name -> (scheduled step, drop fraction).
        self.due_updates: dict[str, tuple[int, float]] = {}
        #: Due layers whose grow scores were read (before the step), reduced to what growth needs, until
        #: their update (after it): no buffer the size of the layer is held in between.
        self.grow_candidates: dict[str, GrowCandidates] = {}
        self.layer_masks = LayerMasks(self.params)
        self.zero_guard = ZeroGuard(self.layer_masks, verify_every)
        #: Updates that waited a step because a gradient held masked contributions (no dense gradient to grow from).
        self.deferred_steps = 0
        self._next_step = self._last_step = 0  # the coming optimizer step, the last one begun by before_step
        self._reading = False
        self.hooks = UserCodeHooks(self.layer_masks, lambda: self._reading)
        self.model = model
        self.layer_kernels = LayerKernels(
            kernels, self.layer_masks, self.hooks, self.method.dense_gradient == "every_step"
        )
        if state is not None:
            self.load_state_dict(state)  # no fresh draw: it would zero weights the saved masks keep
        else:
            counts = {name: num_active(p.numel(), self.sparsities[name]) for name, p in self.params.items()}
            self.set_masks(
                {name: random_mask(self.params[name].shape, k, self.generator) for name, k in counts.items()}
            )
        self.hooks.install()
        # Step 0 is next; nothing touches the model's forwards before the first start_step (a validation
        # sanity check in between must not feed the kernel probe).
        self._reading = self.dense_gradient_needed(0)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        sparsity: float = 0.9,
        distribution: str = "erk",
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        dense_first_layer: bool | None = None,
        custom_sparsity: dict[str, float] | None = None,
        erk_power_scale: float = 1.0,
        **kwargs: Any,
    ) -> SparseTraining:
        """Select a model's weights, distribute ``sparsity`` over them and mask them.

        ``dense_first_layer=None`` keeps the first masked weight dense for ``"uniform"`` only, as the
        paper does. ``params`` (name to Parameter) skips the selection: the caller selected them already.
        Other keyword arguments go to the constructor.
        """
        params = kwargs.pop("params", None) or select_parameters(model, include, exclude)
        kwargs.setdefault("model", model)
        shapes = {name: tuple(p.shape) for name, p in params.items()}
        sparsities = resolve_sparsities(
            shapes,
            sparsity,
            distribution,
            dense_first_layer=dense_first_layer,
            custom_sparsity=custom_sparsity,
            erk_power_scale=erk_power_scale,
        )
        return cls(params, sparsities, **kwargs)

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
    def masks(self) -> dict[str, Tensor]:
        """Parameter name to bool mask of the weight's shape (True = active); a fresh copy.

        For a weight sharded by FSDP2 the mask is a DTensor like the weight (``.full_tensor()``
        gathers it); no communication happens here.
        """
        return {name: wrap_like_param(mask.bool(), self.params[name]) for name, mask in self.layer_masks.local.items()}

    @property
    def itop_rate(self) -> float:
        """In-time over-parameterization: the fraction of masked weights that have ever been active.

        For sharded weights, over this rank's shards.
        """
        return self.layer_masks.itop_rate

    @property
    def updates(self) -> int:
        """Number of topology updates made so far."""
        return len(self.history)

    def masked_names(self, params: ParamsLike = None) -> list[str]:
        """Masked parameter names among ``params`` (an optimizer, some tensors, or None for all)."""
        if params is None:
            return list(self.params)
        if isinstance(params, torch.optim.Optimizer):
            params = (p for group in params.param_groups for p in group["params"])
        return [self._name_of[id(p)] for p in params if id(p) in self._name_of]

    def dense_gradient_needed(self, step: int) -> bool:
        """Whether the optimizer step of 0-based index ``step`` reads the dense weight gradients.

        Known before the step's forward pass (for every micro-batch of an accumulated step): SNFS reads
        them at every step, RigL at scheduled update steps and while an update waits for finite
        gradients, SET and static masks never.
        """
        reads = self.method.dense_gradient
        if reads != "update_steps":
            return reads == "every_step"
        return bool(self.due_updates) or (self.schedule is not None and self.schedule.is_update_step(step + 1))

    @torch.no_grad()
    def apply_masks(self, params: ParamsLike = None) -> None:
        """Zero the inactive weights."""
        self.layer_masks.zero_inactive(self.masked_names(params))

    def before_step(self, step: int, params: ParamsLike = None, already_masked: Container[str] = ()) -> None:
        """Read the dense gradients this step needs, then zero gradients at inactive positions.

        Args:
            step: 0-based index of the optimizer step about to run (``trainer.global_step``).
            params: The parameters this optimizer step updates (an optimizer); None for all.
            already_masked: Names whose gradients are known to be 0 at every inactive position already
                (written so by the sparse kernels): not multiplied by their masks again. Gradients masked by
                the run's own hooks, or written masked by its sparse kernels, are known already.

        A due update whose layer's gradient holds masked contributions (see
        :meth:`~lightning_rigl.core.user_hooks.UserCodeHooks.holds_partial`) waits for the next step.

        """
        names = [name for name in self.masked_names(params) if self.params[name].grad is not None]
        if self.method.updates and self.schedule is not None and self.schedule.is_update_step(step + 1):
            # A frozen layer has no gradient to grow from: no update waits on it, nor a dense gradient for it.
            trainable = [name for name, p in self.params.items() if p.requires_grad]
            self.due_updates.update(dict.fromkeys(trainable, (step + 1, self.schedule.drop_fraction(step + 1))))
        due = [name for name in names if name in self.due_updates]
        reads = self.method.dense_gradient != "never"
        partial = [name for name in due if reads and self.hooks.holds_partial(name)]
        if partial:
            # A gradient with masked contributions (accumulated for an earlier step that did not read it) is no
            # dense gradient: these layers stay due and read the next step's, which is dense throughout.
            due = [name for name in due if name not in partial]
            self.deferred_steps += 1
        observed = names if self.method.dense_gradient == "every_step" else due
        if observed:
            # Only where gradients are read: an ordinary step spares the grad mode switch (about 10 us).
            with torch.no_grad():
                finite = all_finite([self.params[name].grad for name in observed])
                if finite and self.method.dense_gradient == "every_step":
                    for name in names:
                        self.signal.observe(name, self.params[name].grad)
                for name in due:
                    self.grow_candidates.pop(name, None)
                    if finite:
                        signal, fraction = self.signal.read(name, self.params[name].grad), self.due_updates[name][1]
                        self.grow_candidates[name] = read_grow_scores(
                            self.method, self.layer_masks, name, signal, fraction, self.generator
                        )
                if due and not finite:
                    # No update from this step; the layers stay due and retry at their next finite step.
                    self.nonfinite_steps += 1
        written = self.layer_kernels.already_masked(names)  # by the sparse kernels: 0 where inactive
        skip = set(already_masked) | set(written)
        unmasked = [n for n in names if n not in skip and not self.hooks.vouched(n, self.params[n].grad)]
        self.layer_masks.zero_inactive(unmasked, gradients=True)
        self.hooks.masked(names)
        self.layer_kernels.offer_gradients(written)  # their next backward writes into them
        self.zero_guard.gradients_masked(names)
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
        names_by_optimizer = {optimizer: tuple(self.masked_names(optimizer)) for optimizer in optimizers}
        stepped = names_by_optimizer.get(params) if isinstance(params, torch.optim.Optimizer) else None
        names = list(stepped) if stepped is not None else self.masked_names(params)
        left_at_zero = self.zero_guard.weights_left_at_zero(names, names_by_optimizer)
        updated = self.update_topology(optimizers, names)
        self.zero_guard.restart_state_once(names_by_optimizer)
        self.layer_masks.zero_inactive([name for name in names if name not in left_at_zero])
        self.hooks.weights_masked(names)
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
        if not self.grow_candidates:
            return []  # an ordinary step: no update, and no autograd mode to switch
        optimizers = list(optimizers)
        updated = []
        with torch.no_grad():
            for name in self.params if names is None else names:
                candidates = self.grow_candidates.pop(name, None)
                if candidates is None:
                    continue
                step, fraction = self.due_updates.pop(name)
                changed = drop_and_grow_layer(self.layer_masks, name, candidates, optimizers)
                self.hooks.masks_changed([name])
                self.layer_kernels.masks_changed([name])
                record_update(self.history, step, fraction, changed, self.layer_masks.counts[name])
                updated.append(name)
        return updated

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: tensors and Python primitives only, masks at 1 bit a weight.

        With the kernel choices once made (``"kernels"``): a resumed run computes as before the save.
        """
        state = {
            "version": STATE_VERSION,
            "method": self.method.name,
            "shapes": {name: list(p.shape) for name, p in self.params.items()},
            "sparsities": dict(self.sparsities),
            **self.layer_masks.packed(),
            "generator": self.generator.get_state(),
            "due_updates": {name: [step, fraction] for name, (step, fraction) in self.due_updates.items()},
            "grow_candidates": {name: found.to("cpu").as_dict() for name, found in self.grow_candidates.items()},
            "signal": {name: gather_full(tensor).detach().cpu() for name, tensor in self.signal.tensors.items()},
            "history": [asdict(record) for record in self.history],
            "nonfinite_steps": self.nonfinite_steps,
        }
        if self.layer_kernels.state() is not None:
            state["kernels"] = self.layer_kernels.state()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, of any saved version (migrated first), into this run.

        Raises:
            ValueError: Names or shapes that differ from this run's masked parameters, another method or
                other per-layer sparsities, or a state version this release cannot read.
        """
        state = migrate_state(state)
        check_saved_shapes(state["shapes"], {name: p.shape for name, p in self.params.items()})
        check_same_run(state, self.method.name, self.sparsities)
        self.layer_masks.load_packed(state["masks"], state["ever_active"])
        self.masks_replaced()
        self.sparsities = {name: float(state["sparsities"][name]) for name in self.params}
        self.generator.set_state(state["generator"])
        self.due_updates = {
            name: (int(step), float(fraction)) for name, (step, fraction) in state["due_updates"].items()
        }
        self.grow_candidates = {
            name: GrowCandidates.from_dict(saved).to(local_shard(self.params[name]).device)
            for name, saved in state["grow_candidates"].items()
        }
        self.signal.tensors = {
            name: distribute_like_param(tensor.to(local_shard(self.params[name]).device), self.params[name])
            for name, tensor in state["signal"].items()
        }
        self.history = [UpdateRecord(**record) for record in state["history"]]
        self.nonfinite_steps = int(state["nonfinite_steps"])
        # Absent from checkpoints of earlier releases; under another setting, chosen anew after the first step.
        self.layer_kernels.load_state(state.get("kernels"))

    def set_masks(self, masks: Mapping[str, Tensor]) -> None:
        """Replace the masks (bool or 0/1 tensors by name) and zero the weights they make inactive.

        The active counts become those of the given masks and are kept from then on. Masks have the
        weight's full shape, also for sharded weights (each rank keeps its shard).
        """
        self.layer_masks.replace(masks)
        self.masks_replaced()

    def check_optimizers(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Raise a ValueError naming any optimizer whose state cannot be restarted for a regrown connection.

        Call it before training and after the first optimizer step (see ``check_restartable``); a static mask
        needs no restarts.
        """
        if self.method.updates:
            check_restartable([unwrap_optimizer(optimizer) for optimizer in optimizers], self.params.values())

    def check_masks_agree_across_ranks(self) -> None:
        """Raise a RuntimeError naming the layers whose replicated masks differ between ranks; a collective."""
        check_masks_agree_across_ranks(self.layer_masks.local, self.params)

    def masks_replaced(self) -> None:
        """Forget what the old masks made true: zero the weights they made inactive, restart the optimizer check."""
        self.zero_guard.masks_replaced()  # optimizer state may be nonzero where the new masks are inactive
        self.hooks.masks_changed()
        self.apply_masks()
        self.hooks.weights_masked(self.params)
        self._reading = self.dense_gradient_needed(self._next_step)
