"""SparsityMonitor: the Lightning callback that shows sparsity, FLOPs and topology changes."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_rigl.adapters.callback import RigLCallback
from lightning_rigl.adapters.compat import MisconfigurationException, lightning_classes, misconfiguration
from lightning_rigl.adapters.monitor_metrics import (
    batch_size_or_none,
    count_module_flops,
    shape_stand_ins,
    sparsities,
    step_metrics,
    train_flops_per_sample,
)
from lightning_rigl.core.flops.count import FlopsCount, count_active
from lightning_rigl.core.flops.report import draw_figure, optional_import, print_table, summary, table_rows
from lightning_rigl.core.sparse_training import SparseTraining
from lightning_rigl.core.sparsity.selection import select_parameters
from lightning_rigl.core.validation import check_patterns, check_type


class SparsityMonitor(Callback):
    """Log the sparsity, the FLOPs and the topology changes of a sparse network to the Trainer's loggers.

    Every ``trainer.log_every_n_steps`` optimizer steps and right after each RigL topology update it
    logs, through ``pl_module.log`` (and straight to the loggers after an update that falls between
    two logging steps):

    - ``sparsity/global`` and ``sparsity/<parameter name>``: fractions of zeros, read from the
      weights (a connection grown at 0 by RigL counts as active, its mask says so);
    - ``flops/dense_forward`` and ``flops/sparse_forward`` (f_D and f_S, forward FLOPs per sample
      from :func:`~lightning_rigl.core.flops.count.count_flops`), ``flops/sparse_ratio`` (f_S / f_D),
      ``flops/train_total`` (training FLOPs of the run so far on all ranks, by the paper's accounting:
      :func:`~lightning_rigl.core.flops.count.training_flops_per_sample`) and ``flops/train_ratio``
      (against dense training of the same samples);
    - with a :class:`~lightning_rigl.RigLCallback`: ``rigl/drop_fraction`` (the schedule's, at this
      step), ``rigl/changed`` (fraction of active connections the last update changed),
      ``rigl/itop`` (fraction of maskable weights ever active) and ``rigl/updates``.

    It sets ``pl_module.flops_per_batch`` (training FLOPs of this device's batch; forward FLOPs during
    validation) for Lightning's ``ThroughputMonitor``. At fit start and end it prints a per-layer table
    (with rich when installed; once RigLCallback has chosen each layer's kernels, after the first
    training batch, a ``kernels`` column says ``sparse`` or ``dense``), and at fit end it draws the
    per-layer densities and the drop fraction and ITOP curves: to TensorBoard when a
    ``TensorBoardLogger`` is active, else as a PNG in the log directory (needs matplotlib:
    ``pip install lightning-rigl[plot]``).

    Without a RigLCallback it monitors the zeros of any model (a pruned one, a loaded sparse
    checkpoint). The weights it watches are RigLCallback's, else those ``include`` / ``exclude``
    select (default: the weights RigLCallback would mask).

    Args:
        example_input: Input for one forward pass that counts FLOPs: a tensor, a tuple of positional
            arguments or a dict of keyword arguments. ``None`` uses ``pl_module.example_input_array``;
            with neither, FLOPs are skipped with one warning.
        example_batch_size: Samples in ``example_input``; ``None`` reads dim 0 of its first tensor.
        include: fnmatch patterns of parameter names to watch, replacing the default selection.
        exclude: fnmatch patterns of parameter names not to watch.
        table: Print the per-layer table at fit start and end.
        plot: Draw the densities and the update curves at fit end.

    Raises:
        TypeError: An argument of the wrong type.
        MisconfigurationException: ``example_batch_size`` < 1; at train start, an ``include`` or
            ``exclude`` pattern that matches no parameter.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning.pytorch.callbacks import ThroughputMonitor
        >>> from lightning_rigl import RigLCallback
        >>> callbacks = [RigLCallback(sparsity=0.9), SparsityMonitor(), ThroughputMonitor(lambda batch: len(batch[0]))]
        >>> trainer = Trainer(callbacks=callbacks, log_every_n_steps=50)  # doctest: +SKIP

    """

    def __init__(
        self,
        example_input: Any = None,
        example_batch_size: int | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        table: bool = True,
        plot: bool = True,
    ) -> None:
        if example_input is not None:
            check_type("example_input", example_input, (Tensor, tuple, list, dict), "None, a tensor, a tuple or a dict")
        if example_batch_size is not None:
            check_type("example_batch_size", example_batch_size, (int,), "None or an int >= 1")
            if example_batch_size < 1:
                raise MisconfigurationException(
                    f"`example_batch_size` must be None (dim 0 of the example input) or an int >= 1, "
                    f"got {example_batch_size!r}."
                )
        check_patterns("include", include)
        check_patterns("exclude", exclude)
        check_type("table", table, (bool,), "a bool")
        check_type("plot", plot, (bool,), "a bool")
        self.example_input = example_input
        self.example_batch_size = example_batch_size
        self.include = include
        self.exclude = exclude
        self.table = table
        self.plot = plot
        self.flops: FlopsCount | None = None
        self.train_flops = 0.0  # training FLOPs so far, all ranks
        self.dense_train_flops = 0.0  # the same samples trained dense
        self.itop_curve: list[tuple[int, float]] = []  # (step, ITOP rate) at fit start and after each update
        self._rigl: RigLCallback | None = None
        self._params: dict[str, nn.Parameter] = {}
        self._batch_size: int | None = None
        self._step = 0
        self._seen_updates = 0
        self._warned_plot = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Before any checkpoint is restored: a resumed run's totals come back through load_state_dict.
        self.train_flops = self.dense_train_flops = 0.0
        self.itop_curve = []
        if self.plot and not self._warned_plot and optional_import("matplotlib") is None:
            self._warned_plot = True
            rank_zero_warn(
                "SparsityMonitor(plot=True) needs matplotlib to draw densities and update curves: "
                "`pip install lightning-rigl[plot]`. No image will be made."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here every callback's on_fit_start has run (RigLCallback built its masks) and every strategy
        # has restored its checkpoint.
        self._rigl = next((cb for cb in trainer.callbacks if isinstance(cb, RigLCallback)), None)
        with misconfiguration():
            if self.include or self.exclude or self._sparse is None:
                self._params = select_parameters(pl_module, self.include, self.exclude, warn_ties=False)
            else:
                self._params = {**self._rigl.sparse.params, **shape_stand_ins(self._rigl.sparse.compact)}
        example = self.example_input if self.example_input is not None else pl_module.example_input_array
        self.flops = count_module_flops(trainer, pl_module, example, self.example_batch_size)
        self._step = trainer.global_step
        self._seen_updates = self._updates()
        if self._sparse is not None:
            self._record_itop(trainer.global_step)
        self._report(trainer, "fit start", plot=False)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_size = batch_size_or_none(batch)
        if self.flops is not None and self._batch_size is not None:
            pl_module.flops_per_batch = (
                train_flops_per_sample(self.flops, self._sparse, trainer.global_step) * self._batch_size
            )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.flops is not None and self._batch_size is not None:
            samples = self._batch_size * trainer.world_size  # as ThroughputMonitor: equal batches on every rank
            self.train_flops += train_flops_per_sample(self.flops, self._sparse, self._step) * samples
            self.dense_train_flops += 3 * self.flops.dense * samples
        if trainer.global_step == self._step:
            return  # an accumulation micro-batch: no optimizer step yet
        self._step = trainer.global_step
        if self._rigl is not None:
            self._rigl.apply_updates()  # this step's update, also when RigLCallback is listed after this one
        updated = self._updates() > self._seen_updates
        if updated:
            self._seen_updates = self._updates()
            self._record_itop(trainer.global_step)
        # Lightning's own ThroughputMonitor reads the logger connector's decision the same way.
        log_step = trainer._logger_connector.should_update_logs
        if not (log_step or updated):
            return
        active, _ = self._read_sparsities()
        metrics = step_metrics(
            self._params, active, self.flops, self.train_flops, self.dense_train_flops, self._sparse, self._step
        )
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        if not log_step:
            # Lightning only hands logged values to the loggers on logging steps: this update's now.
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.fit_loop.epoch_loop._batches_that_stepped)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        batch_size = batch_size_or_none(batch)
        if self.flops is not None and batch_size is not None:
            pl_module.flops_per_batch = self.flops.sparse * batch_size

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, "fit end", plot=self.plot)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "train_flops": self.train_flops,
            "dense_train_flops": self.dense_train_flops,
            "itop_curve": [list(point) for point in self.itop_curve],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_flops = float(state_dict["train_flops"])
        self.dense_train_flops = float(state_dict["dense_train_flops"])
        self.itop_curve = [(int(step), float(itop)) for step, itop in state_dict["itop_curve"]]

    def _record_itop(self, step: int) -> None:
        if not self.itop_curve or self.itop_curve[-1][0] != step:  # a resumed run starts where it was saved
            self.itop_curve.append((step, self._rigl.sparse.itop_rate))

    @property
    def _sparse(self) -> SparseTraining | None:
        # None without a RigLCallback, or before its on_fit_start.
        return self._rigl.sparse if self._rigl is not None else None

    def _updates(self) -> int:
        return self._sparse.updates if self._sparse is not None else 0

    def _read_sparsities(self) -> tuple[dict[str, int], dict[str, float]]:
        """Active weights and sparsity of each layer, the FLOPs count brought to them; a collective under FSDP2."""
        # RigL's masks keep connections grown at 0 counted as active.
        active = count_active(self._params, self._rigl.masks if self._rigl is not None else None)
        layer_sparsities = sparsities(self._params, active)
        if self.flops is not None:
            self.flops = self.flops.with_sparsity(layer_sparsities)  # the zeros may move without RigL (pruning)
        return active, layer_sparsities

    def _report(self, trainer: pl.Trainer, when: str, plot: bool) -> None:
        """Print the table and draw the figure on rank 0; what needs every rank is read on every rank."""
        active, layer_sparsities = self._read_sparsities()
        log_dir = trainer.log_dir if plot else None  # a broadcast
        if not trainer.is_global_zero:
            return
        if self.table:
            print_table(
                table_rows(self._params, active, self.flops, self._rigl.kernel_choices if self._rigl else {}),
                summary(when, self.flops, self.train_flops, self.dense_train_flops),
            )
        if plot and optional_import("matplotlib") is not None:
            history = self._sparse.history if self._sparse is not None else []
            densities = {name: 1 - sparsity for name, sparsity in layer_sparsities.items()}
            numel = {name: p.numel() for name, p in self._params.items()}
            figure = draw_figure(densities, numel, history, self.itop_curve)
            tensorboard = lightning_classes("loggers", "TensorBoardLogger")  # either package's
            tensorboards = [logger for logger in trainer.loggers if isinstance(logger, tensorboard)]
            for logger in tensorboards:
                logger.experiment.add_figure("sparsity_monitor", figure, global_step=trainer.global_step)
            if not tensorboards:
                directory = log_dir or trainer.default_root_dir  # a custom logger may have no directory
                os.makedirs(directory, exist_ok=True)
                figure.savefig(os.path.join(directory, f"sparsity_step{trainer.global_step}.png"))
