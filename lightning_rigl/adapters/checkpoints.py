"""RigLCallback's checkpoint hooks: what it saves, and how a fit, a test or a resumed run restores it."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_rigl._lightning import misconfiguration
from lightning_rigl.core import SparseTraining, select_parameters
from lightning_rigl.core.selection import parameter_aliases


class CheckpointHooks(Callback):
    """The checkpoint half of :class:`~lightning_rigl.RigLCallback`, its base class.

    Single-device and DDP strategies restore callback state before ``on_fit_start``, which then builds
    the run from ``_loaded_state``; FSDP2 and ModelParallel restore it after, into the run itself.
    ``trainer.validate/test/predict(ckpt_path=...)`` make the masks that checkpoint's.
    """

    sparse: SparseTraining | None
    include: list[str] | None
    exclude: list[str] | None
    _trainer: pl.Trainer | None
    _aliases: dict[str, list[str]]
    _loaded_state: dict[str, Any] | None
    _restored: bool  # a checkpoint handed this callback its state in the current fit

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.sparse is None:
            return {}
        return self.sparse.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self._restored = True
        state_dict = dict(state_dict)
        if self.sparse is not None and self._trainer is not None:
            # FSDP / ModelParallel restore callback state after on_fit_start built the masks.
            with misconfiguration():
                self.sparse.load_state_dict(state_dict)
        else:
            # Single device and DDP restore it before on_fit_start, which builds the masks from it.
            self._loaded_state = state_dict

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if trainer.state.fn == "fit" or not state:
            return  # a fit restores through load_state_dict
        # validate / test / predict from a checkpoint: the masks become that checkpoint's, so what is
        # exported after `trainer.test(ckpt_path="best")` is the tested model's.
        with misconfiguration():
            params = select_parameters(pl_module, self.include, self.exclude)
            self.sparse = SparseTraining.from_state(params, state)
            self.sparse.remove_hooks()  # no training here: nothing to mask as it accumulates
            self._aliases = parameter_aliases(pl_module, self.sparse.params)

    def _warn_unless_restored(self, trainer: pl.Trainer) -> None:
        if trainer.ckpt_path is not None and not self._restored:
            rank_zero_warn(
                f"Resumed from {trainer.ckpt_path}, which holds no RigLCallback state (a dense or weights-only "
                "checkpoint?): training goes on with fresh random masks, which zeroed part of the loaded weights."
            )
        self._restored = False
