"""RigLCallback's checkpoints: the state a checkpoint hands it, held until its run is built, and evaluation runs.

Single-device and DDP strategies restore callback state before ``on_fit_start``, which then builds the
run from it; FSDP2 and ModelParallel restore it after, into the run itself.
``trainer.validate/test/predict(ckpt_path=...)`` make the masks that checkpoint's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_rigl.adapters.compat import misconfiguration
from lightning_rigl.core.config import RunConfig
from lightning_rigl.core.sparse_training import SparseTraining
from lightning_rigl.core.sparsity.selection import parameter_aliases, select_parameters


class CheckpointState:
    """What checkpoints handed one RigLCallback: the saved run state it holds until ``on_fit_start``.

    Example:
        >>> held = CheckpointState()
        >>> held.receive({}, run=None)  # a checkpoint without RigLCallback state: nothing restored
        >>> held.restored, held.take()
        (False, None)
    """

    def __init__(self) -> None:
        self._state: dict[str, Any] | None = None
        #: A checkpoint handed its state in the current fit.
        self.restored = False

    def receive(self, state: Mapping[str, Any], run: SparseTraining | None) -> None:
        """Take RigLCallback's ``load_state_dict`` argument: into ``run`` when it is built (FSDP2), else held."""
        if not state:
            return
        self.restored = True
        if run is not None:
            with misconfiguration():
                run.load_state_dict(dict(state))
        else:
            self._state = dict(state)

    def take(self) -> dict[str, Any] | None:
        """The held state, given once (the run built from it owns it then); None if none is held."""
        state, self._state = self._state, None
        return state

    @property
    def holds(self) -> bool:
        """Whether a state waits for the next fit's run."""
        return self._state is not None

    def warn_unless_restored(self, ckpt_path: str | None) -> None:
        """Warn when a fit resumed from a checkpoint that held no RigLCallback state; a new fit then begins."""
        if ckpt_path is not None and not self.restored:
            rank_zero_warn(
                f"Resumed from {ckpt_path}, which holds no RigLCallback state (a dense or weights-only "
                "checkpoint?): training goes on with fresh random masks, which zeroed part of the loaded weights."
            )
        self.restored = False


def evaluation_run(
    model: nn.Module, config: RunConfig, state: Mapping[str, Any]
) -> tuple[SparseTraining, dict[str, list[str]]]:
    """The run a checkpoint's state describes, for ``validate`` / ``test`` / ``predict``: no hooks, nothing trains.

    Returns:
        The run, and every name of each masked Parameter (see ``parameter_aliases``).
    """
    with misconfiguration():
        params = select_parameters(model, config.include, config.exclude, warn_ties=False)
        run = SparseTraining.from_state(params, state)
        run.remove_hooks()  # no training here: nothing to mask as it accumulates
        return run, parameter_aliases(model, run.params)
