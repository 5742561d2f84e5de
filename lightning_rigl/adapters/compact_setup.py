"""RigLCallback's compact storage: layers made compact in ``setup``, checked at fit start, made dense for ``ddp_spawn``.

Only a callback's ``setup`` runs before ``configure_optimizers`` and DDP wrapping: the masks are drawn and
the layers made compact there, so the user's optimizer is built over their values. The run that
``on_fit_start`` builds takes them as they are (loaded from a checkpoint since, perhaps).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_rigl.adapters.compat import lightning_classes
from lightning_rigl.core.config import RunConfig
from lightning_rigl.core.masked_weights import LazyMasks
from lightning_rigl.core.sparse_training import SparseTraining
from lightning_rigl.core.sparsity.distributions import resolve_sparsities
from lightning_rigl.core.sparsity.selection import is_masked_module, select_parameters
from lightning_rigl.core.storage.compaction import (
    DrawnMasks,
    make_layers_compact,
)
from lightning_rigl.core.storage.construct import densify
from lightning_rigl.core.storage.layer import is_compact
from lightning_rigl.core.storage.state import compact_optimizer_state
from lightning_rigl.core.topology.optim_state import unwrap_optimizer


class CompactStorage:
    """What one RigLCallback made compact in ``setup``, until ``on_fit_start`` builds the run from it.

    Example:
        >>> storage = CompactStorage()
        >>> storage.drawn is None, storage.dense_names
        (True, [])
    """

    def __init__(self) -> None:
        self.drawn: DrawnMasks | None = None
        self.dense_names: list[str] = []
        self.sparsities: dict[str, float] = {}
        self._known: set[str] = set()  # the model's parameter names at setup
        self._checkpoint: dict[str, Any] | None = None  # the checkpoint a fit resumes from, until fit start
        self.main_pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        # A spawned process makes its own model's layers compact.
        return {**self.__dict__, "drawn": None, "_known": set(), "_checkpoint": None}

    def hold(self, checkpoint: dict[str, Any], fitting: bool) -> None:
        """Keep the checkpoint a fit resumes from: a dense run's optimizer state is made compact at fit start."""
        self._checkpoint = checkpoint if fitting and self.drawn is not None else None

    def setup(self, trainer: pl.Trainer, model: pl.LightningModule, config: RunConfig, seed: int) -> None:
        """Draw the masks and make the layers compact (a second fit of the same model keeps them).

        Raises:
            ValueError: A strategy that shards weights, no layer compact storage can serve, or one named in
                ``include`` that it cannot serve.
        """
        self._known = {name for name, _ in model.named_parameters(remove_duplicate=False)}  # tied ones too
        if self.drawn is not None and all(is_compact(layer) for layer in self.drawn.compact.values()):
            if all(any(layer is m for m in model.modules()) for layer in self.drawn.compact.values()):
                return
        if isinstance(trainer.strategy, lightning_classes("strategies", "ModelParallelStrategy")):
            raise ValueError(
                "`storage='compact'` cannot serve layers that FSDP2 shards (ModelParallelStrategy): use "
                "storage='dense'."
            )
        params = select_parameters(model, config.include, config.exclude)
        masking = {key: value for key, value in config.masking().items() if key not in ("include", "exclude")}
        self.sparsities = resolve_sparsities({name: tuple(p.shape) for name, p in params.items()}, **masking)
        self.drawn, self.dense_names = make_layers_compact(
            model, params, self.sparsities, config.include, seed, rank_zero_warn, "RigLCallback(storage='compact')"
        )

    def run_kwargs(self, model: nn.Module) -> dict[str, Any]:
        """``SparseTraining``'s arguments for the layers drawn in ``setup``: the weights kept dense, the draw.

        Raises:
            ValueError: Masked layers created since ``setup`` (in ``configure_model``), named.
        """
        assert self.drawn is not None
        created = [
            name
            for prefix, module in model.named_modules()
            for name in [f"{prefix}.weight" if prefix else "weight"]
            if name not in self._known
            and isinstance(module._parameters.get("weight"), nn.Parameter)
            and is_masked_module(module)
        ]
        if created:
            raise ValueError(
                f"`storage='compact'` makes layers compact in RigLCallback's `setup`, before `configure_model`; these "
                f"were created in `configure_model`: {created}. Create them in `__init__` (or `setup`), or use "
                "storage='dense'."
            )
        current = dict(model.named_parameters())
        return {
            "params": {name: current[name] for name in self.dense_names},
            "sparsities": self.sparsities,
            "drawn": self.drawn,
        }

    def at_fit_start(self, run: SparseTraining, trainer: pl.Trainer, owner: object) -> None:
        """Refuse what compact layers cannot train with; make a dense checkpoint's optimizer state compact.

        Refused: optimizers that are not elementwise, a dtype the sparse kernels do not take, model copies of
        weight-averaging callbacks (EMA, SWA: their copies would not follow the updates). The optimizer state of
        the checkpoint the fit resumes from is loaded after ``on_fit_start``: made compact here.
        """
        if not run.compact:
            return
        optimizers = trainer.optimizers
        copies = [
            type(callback).__name__
            for callback in trainer.callbacks
            if callback is not owner
            and any(_model_copy(value, trainer.lightning_module) for value in vars(callback).values())
        ]
        if copies:
            raise ValueError(
                f"`storage='compact'` does not yet keep the model copies of {copies} (weight averaging: EMA, SWA) "
                "in step with its layers' updates. Use storage='dense' with them."
            )
        checkpoint, self._checkpoint = self._checkpoint, None
        layers = {id(run.compact.values(name)): layer for name, layer in run.compact.layers.items()}
        for saved, optimizer in zip((checkpoint or {}).get("optimizer_states", []), optimizers, strict=False):
            compact_optimizer_state(saved, unwrap_optimizer(optimizer), layers)
        wrong = {name: str(run.compact.values(name).dtype) for name in run.compact}
        wrong = {name: dtype for name, dtype in wrong.items() if dtype not in ("torch.float32", "torch.float64")}
        if wrong:
            raise ValueError(
                f"`storage='compact'` computes in float32 or float64; these compact layers hold {wrong} (a "
                "'bf16-true' or '16-true' precision?). Use a mixed precision ('bf16-mixed': compact layers compute "
                "in float32) or storage='dense'."
            )

    def teardown(self, model: nn.Module, run: SparseTraining | None) -> None:
        """In a process that ``ddp_spawn`` started, give the layers their dense weights back.

        Rank 0's weights go back to the main process, whose model is not compact, by
        ``load_state_dict(strict=False)``: a compact state would be ignored there, silently.
        """
        if os.getpid() == self.main_pid or run is None:
            return
        for layer in run.compact.layers.values():
            if is_compact(layer):
                densify(layer)


def aliased(masks: Mapping[str, Tensor], aliases: Mapping[str, list[str]]) -> Mapping[str, Tensor]:
    """The masks under every name of their weight; made as they are read if ``masks`` is lazy.

    Example:
        >>> aliased({"a": torch.ones(1)}, {"a": ["a", "b"]})
        {'a': tensor([1.]), 'b': tensor([1.])}
    """
    if isinstance(masks, dict):
        return {alias: mask for name, mask in masks.items() for alias in aliases.get(name, [name])}
    original = {alias: name for name in masks for alias in aliases.get(name, [name])}
    return LazyMasks(list(original), lambda alias: masks[original[alias]])


def _model_copy(value: Any, model: nn.Module) -> bool:
    """Whether a callback's attribute is a copy of the model (an averaged one, say)."""
    if not isinstance(value, nn.Module) or value is model:
        return False
    averaged = isinstance(value, (torch.optim.swa_utils.AveragedModel, pl.LightningModule))
    return averaged or any(is_compact(module) for module in value.modules())
