"""What RigLCallback tells the user at fit start about its selection: frozen layers left dense."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_rigl.core.selection import frozen_default_weights

if TYPE_CHECKING:
    from lightning_rigl.callback import RigLCallback

_LISTED = 10  # names a warning lists before it counts the rest


def warn_at_fit_start(model: nn.Module, callback: RigLCallback) -> None:
    """Warn about frozen layers the default selection skipped.

    Args:
        model: The LightningModule.
        callback: The RigLCallback, with its run (``callback.sparse``) built.

    """
    if callback.sparse is None:
        return
    if not callback.include:
        frozen = frozen_default_weights(model, callback.exclude)
        if frozen:
            rank_zero_warn(
                f"RigL skips {len(frozen)} frozen weights (requires_grad=False) of layers it masks by default, "
                f"and leaves them dense: {_listed(frozen)}. The sparsity RigL reports counts only the weights it "
                "masks, and a layer unfrozen later (BackboneFinetuning) trains dense. To mask them, name them with "
                "the other weights in `include` (a frozen weight is zeroed where inactive, and trains under its "
                "mask once unfrozen); to keep them dense and silence this, name them in `exclude`."
            )


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown if len(names) <= _LISTED else f"{shown} and {len(names) - _LISTED} more"
