"""What RigLCallback tells the user at fit start about its selection: frozen layers left dense, the achieved budget."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_rigl.core.distribution import achieved_sparsity, budget_layers
from lightning_rigl.core.selection import frozen_default_weights

if TYPE_CHECKING:
    from lightning_rigl.callback import RigLCallback

#: Overall sparsity further than this from the target is reported.
SPARSITY_TOLERANCE = 1e-3
_LISTED = 10  # names a warning lists before it counts the rest


def warn_at_fit_start(model: nn.Module, callback: RigLCallback) -> None:
    """Warn about frozen layers the default selection skipped, and an overall sparsity off its target.

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
    _warn_off_target(callback)


def _warn_off_target(callback: RigLCallback) -> None:
    sparse = callback.sparse
    names = budget_layers(
        list(sparse.params),
        callback.distribution,
        dense_first_layer=callback.dense_first_layer,
        custom_sparsity=callback.custom_sparsity,
    )
    if not names:
        return
    shapes = {name: tuple(sparse.params[name].shape) for name in names}
    achieved = achieved_sparsity(shapes, sparse.sparsities)
    if abs(achieved - callback.sparsity) > SPARSITY_TOLERANCE:
        weights = sum(sparse.params[name].numel() for name in names)
        rank_zero_warn(
            f"RigL's masks reach an overall sparsity of {achieved:.4f}, not the target {callback.sparsity}, over "
            f"the {weights} weights of the {len(names)} layers that carry it: each layer keeps a whole number of "
            "active weights, rounded up, which small layers feel most. The per-layer sparsities are the "
            "reference's; see docs/how-rigl-works.md, 'Per-layer sparsity', for how large the gap can be."
        )


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown if len(names) <= _LISTED else f"{shown} and {len(names) - _LISTED} more"
