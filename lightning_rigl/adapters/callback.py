"""RigLCallback: the Lightning adapter that drives :class:`~lightning_rigl.core.SparseTraining`."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_rigl.adapters.averaging import mask_averaged_copies
from lightning_rigl.adapters.checkpoints import CheckpointState, evaluation_run
from lightning_rigl.adapters.compact_setup import CompactStorage, aliased
from lightning_rigl.adapters.compat import misconfiguration
from lightning_rigl.adapters.fit_settings import run_for_fit, shared_seed
from lightning_rigl.adapters.fit_start_warnings import warn_at_fit_start
from lightning_rigl.adapters.spawn import MaskHandoff
from lightning_rigl.adapters.strategies import MaskAgreement, check_strategy
from lightning_rigl.core.config import RUN_ARGUMENTS, RunConfig, Storage
from lightning_rigl.core.kernels.choice import Kernels
from lightning_rigl.core.sparse_training import SparseTraining
from lightning_rigl.core.sparsity.distributions import Distribution
from lightning_rigl.core.sparsity.selection import parameter_aliases
from lightning_rigl.core.topology.methods import MethodName
from lightning_rigl.core.topology.schedule import Decay, check_steps_per_batch


class RigLCallback(Callback):
    """Train a sparse network from scratch with RigL (Evci et al., 2020) or SET, SNFS or a static mask.

    At fit start the callback picks the weights to mask, spreads ``sparsity`` over them with
    ``distribution`` and draws a random mask with an exact number of active weights per layer. In
    ``on_before_optimizer_step`` it reads the dense gradient the method needs and zeroes the gradients
    of inactive weights; in ``on_train_batch_end``, for each optimizer step of the batch (right after
    each step in manual optimization), every ``delta_t`` steps until ``t_end``, it drops the smallest
    active weights and grows as many new ones, and it keeps inactive weights at exactly 0 (see docs/how-rigl-works.md).

    Args:
        sparsity: Fraction of zeros over all masked weights, in [0, 1).
        distribution: Per-layer sparsity: ``"erk"``, ``"er"`` or ``"uniform"``.
        method: Grow criterion: ``"rigl"`` (|dense gradient|), ``"set"`` (random), ``"snfs"``
            (|moving average of dense gradients|) or ``"static"`` (no topology updates).
        delta_t: Optimizer steps between topology updates, >= 1.
        t_end: Last step (exclusive) with updates: an int counts optimizer steps, a float in (0, 1] is
            a fraction of ``trainer.estimated_stepping_batches``.
        alpha: Initial drop fraction, in [0, 1].
        decay: How the drop fraction decays to ``t_end``: ``"cosine"``, ``"linear"`` or ``"constant"``.
        include: fnmatch patterns of parameter names (``pl_module.named_parameters()``) to mask,
            replacing the default selection (weights of Linear, Conv, ConvTranspose, attention).
        exclude: fnmatch patterns of parameter names to leave dense.
        dense_first_layer: Keep the first masked weight dense; None means True for ``"uniform"`` and
            False for ``"er"``/``"erk"``, as in the paper.
        custom_sparsity: Parameter name (or pattern) to sparsity, outside the distribution's budget.
        erk_power_scale: Exponent on ERK's raw densities (0 = uniform, 1 = ERK).
        seed: Seed of the masks and of SET's random growth; None derives it from torch's seed (so
            ``seed_everything`` fixes it) and shares rank 0's with every rank.
        consistency_checks: Under data parallelism, compare a fingerprint of every mask across ranks
            at fit start and after this many first updates (-1: after every update, 0: never); a
            difference raises an error naming the layers.
        kernels: How masked ``nn.Linear`` / Hugging Face ``Conv1D`` layers compute: ``"sparse"`` with
            their active weights only (forward, input gradient, and the weight gradient at active
            positions, dense only at the steps whose dense gradient the method reads), ``"dense"``
            with the masked dense weight, ``"auto"`` sparse where a fixed rule calibrated on this
            CPU says it is faster for the layer's shape, density and tokens per batch. Chosen once,
            after the first optimizer step (which runs dense and measures the tokens), the same on
            every rank and kept in checkpoints. Convolutions, attention's ``in_proj_weight``,
            FSDP2-sharded and bf16/fp16 weights, and layers under autocast always stay dense; so do
            every layer under ``"auto"`` on CUDA and with ``"snfs"``. Weights, ``state_dict``,
            optimizer and masks are the same either way.
        storage: ``"dense"``: masked weights are dense Parameters with zeros. ``"compact"``: masked Linear-type
            layers keep only their active values (``layer.weight_values``, a Parameter the optimizer trains) and
            their indices, made in ``setup``; ``layer.weight`` is computed on read. See docs/compact-storage.md.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[RigLCallback(sparsity=0.9, delta_t=100)])  # doctest: +SKIP

    """

    def __init__(
        self,
        sparsity: float = 0.9,
        distribution: Distribution = "erk",
        method: MethodName = "rigl",
        delta_t: int = 100,
        t_end: int | float = 0.75,
        alpha: float = 0.3,
        decay: Decay = "cosine",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        dense_first_layer: bool | None = None,
        custom_sparsity: dict[str, float] | None = None,
        erk_power_scale: float = 1.0,
        seed: int | None = None,
        consistency_checks: int = 3,
        kernels: Kernels = "auto",
        storage: Storage = "dense",
    ) -> None:
        arguments = dict(locals())  # exactly the arguments: nothing else is defined yet
        with misconfiguration():  # every argument checked here, once
            self.config = RunConfig(**{name: arguments[name] for name in RUN_ARGUMENTS})
        self.sparse: SparseTraining | None = None
        self._trainer: pl.Trainer | None = None
        self._manual_step_hooks: list[Any] = []
        self._stepped: list[torch.optim.Optimizer] = []  # optimizers stepped since the last update pass
        self._optimizers_checked = False
        self._seen_updates = 0
        self._agreement = MaskAgreement()  # masks compared across ranks
        self._checkpoint = CheckpointState()  # what a checkpoint handed this callback, until on_fit_start
        self._aliases: dict[str, list[str]] = {}  # masked name -> every name of that Parameter
        self._fit_start_step = 0
        self._handoff = MaskHandoff()  # ddp_spawn / ddp_fork: rank 0's masks back to the main process
        self._compact = CompactStorage()  # storage="compact": the layers made compact in setup

    def __getattr__(self, name: str) -> Any:
        # The arguments read as attributes (`callback.sparsity`), from the one configuration.
        config = self.__dict__.get("config")
        if config is not None and name in RUN_ARGUMENTS:
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in RUN_ARGUMENTS:
            raise AttributeError(f"`{name}` is fixed when RigLCallback is built: make a new RigLCallback({name}=...).")
        super().__setattr__(name, value)

    def __getstate__(self) -> dict[str, Any]:
        # A copy (the one each process of `ddp_spawn` gets) starts without this process's run: its model's
        # Parameters are other objects, so its fit builds its own. Choices and checkpoint state travel.
        state = dict(self.__dict__)
        state.update(sparse=None, _trainer=None, _manual_step_hooks=[], _stepped=[])
        return state

    @property
    def masks(self) -> dict[str, Tensor]:
        """Parameter name to bool mask of the weight's shape (True = active); empty before fit.

        A tied weight is listed under each of its names. After a ``ddp_spawn`` or ``ddp_fork`` fit they
        are rank 0's masks, handed back to the main process.
        """
        masks = self._handoff.receive()  # reading twice gives the same masks, and changes nothing
        if masks is None:
            masks = self.sparse.masks if self.sparse is not None else {}
        return aliased(masks, self._aliases)  # with compact layers, each mask is made when it is read

    @property
    def kernel_choices(self) -> dict[str, str]:
        """Masked parameter name to ``"sparse"`` or ``"dense"``: how it computes; empty until chosen.

        Chosen after the first optimizer step of a fit (or restored from the checkpoint of a run with
        the same ``kernels`` setting).
        """
        return self.sparse.kernel_choices if self.sparse is not None else {}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_strategy(trainer.strategy)
            if self.config.storage == "compact":  # before configure_optimizers and DDP: the optimizer gets the values
                with misconfiguration():
                    self._compact.setup(trainer, pl_module, self.config, shared_seed(trainer, self.config.seed))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_fit_start is the first hook where layers from configure_model exist, DDP has synced the
        # weights and the optimizers are built; no optimizer step has run yet.
        if self._handoff.receive() is not None:
            self.sparse = None  # a spawned fit trained since: this process's run is not the latest
        self._handoff.reset()
        with misconfiguration():
            # A checkpoint's state, else this run again for the same model (go on from its masks), else fresh masks.
            compact = self._compact.run_kwargs(pl_module) if self.config.storage == "compact" else None
            self.sparse = run_for_fit(trainer, pl_module, self.config, self.sparse, self._checkpoint.take(), compact)
            self._compact.at_fit_start(self.sparse, trainer, self)
            self.sparse.check_optimizers(trainer.optimizers)
            self._aliases = parameter_aliases(pl_module, self.sparse.params)
        # Gradients masked as they accumulate; weights and optimizer state masked again after a load mid-run.
        self.sparse.install_hooks([pl_module], trainer.optimizers)
        warn_at_fit_start(pl_module, self.sparse, self.config)  # frozen layers left dense, a sparsity off target
        self._trainer = trainer
        self._optimizers_checked = False
        self._stepped = []
        self._seen_updates = self.sparse.updates
        self._agreement = MaskAgreement(self.consistency_checks)  # counted per fit, so a resumed run checks too
        self._agreement.at_fit_start(self.sparse)
        mask_averaged_copies(trainer, self.sparse.layer_masks, self)
        if not pl_module.automatic_optimization:
            # Manual optimization may step several times in one batch, with forward passes in between:
            # each step's update and re-zeroing must come right after it, not at the batch end. The
            # post-hook fires once after every step that really ran (not after one an AMP scaler skipped).
            self._manual_step_hooks = [
                optimizer.register_step_post_hook(lambda *_: self.apply_updates()) for optimizer in trainer.optimizers
            ]

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._checkpoint.warn_unless_restored(trainer.ckpt_path)  # every strategy has restored its checkpoint by now
        self._fit_start_step = trainer.global_step  # restored by now
        if self.sparse is not None:
            # A checkpoint saved between a step and its update (by a callback listed before this one) holds
            # its grow scores: update now, optimizer state restored. Known kernel choices (resumed, a second
            # fit) are attached at the first batch start, with structures built from the masks after this update.
            self.sparse.update_topology(trainer.optimizers)
            mask_averaged_copies(trainer, self.sparse.layer_masks, self)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.sparse is not None:
            # Before the forward pass: the step its backward is for decides whether it writes dense gradients; in
            # manual optimization each later step of the batch begins after the one before (apply_updates).
            self.sparse.start_step(trainer.global_step)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Gradients here are accumulated, all-reduced and unscaled, and not clipped yet: read the dense
        # gradient the method needs, then mask it, so clipping and the optimizer see inactive ones at 0.
        if self.sparse is not None:
            self.sparse.before_step(trainer.global_step, optimizer)
            self._stepped.append(optimizer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.apply_updates()
        if self._fit_start_step >= 0 and not pl_module.automatic_optimization:
            with misconfiguration():  # checked once, after the first batch
                check_steps_per_batch(self.t_end, trainer.global_step - self._fit_start_step)
        self._fit_start_step = -1

    def apply_updates(self) -> None:
        """Drop and grow for the optimizer steps that ran since the last call, and keep inactive weights at 0.

        RigLCallback calls it in ``on_train_batch_end`` (and right after each step in manual
        optimization). Until then, callbacks see the masks before this step's update; one listed
        before RigLCallback that needs the masks after it (as :class:`~lightning_rigl.SparsityMonitor`
        does) calls it first. A second call for the same steps does nothing.
        """
        if self.sparse is None or self._trainer is None:
            return
        updated = []
        while self._stepped:
            updated += self.sparse.after_step(self._trainer.optimizers, self._stepped.pop(0))
            if not self._optimizers_checked:
                self._optimizers_checked = True
                with misconfiguration():  # the state exists now: each per-element key needs a fresh value
                    self.sparse.check_optimizers(self._trainer.optimizers)
        if self.sparse.updates > self._seen_updates:
            self._seen_updates = self.sparse.updates
            mask_averaged_copies(self._trainer, self.sparse.layer_masks, self)
            self._agreement.after_update(self.sparse)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sparse is not None:
            self._handoff.send(self.sparse, trainer.is_global_zero)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {} if self.sparse is None else self.sparse.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # FSDP2 and ModelParallel restore callback state after on_fit_start built the run: into it.
        self._checkpoint.receive(state_dict, self.sparse if self._trainer is not None else None)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        self._compact.hold(checkpoint, trainer.state.fn == "fit")  # compact storage: see its at_fit_start
        if trainer.state.fn != "fit" and state:  # a fit restores through load_state_dict
            # validate / test / predict: that checkpoint's masks (exported after `trainer.test(ckpt_path=...)`).
            self.sparse, self._aliases = evaluation_run(pl_module, self.config, state)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()
        self._compact.teardown(pl_module, self.sparse)  # a spawned process: dense weights back to the main one

    def _detach(self) -> None:
        if self.sparse is not None:
            self.sparse.close()
        for handle in self._manual_step_hooks:
            handle.remove()
        self._manual_step_hooks, self._stepped, self._trainer = [], [], None
