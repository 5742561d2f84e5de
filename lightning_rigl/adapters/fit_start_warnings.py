"""What RigLCallback tells the user at fit start about its selection: frozen layers left dense, the achieved budget."""

from __future__ import annotations

import math
from collections.abc import Sequence

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_rigl.core.config import RunConfig
from lightning_rigl.core.sparse_training import SparseTraining
from lightning_rigl.core.sparsity.distributions import achieved_sparsity, budget_layers
from lightning_rigl.core.sparsity.selection import frozen_default_weights

#: Overall sparsity further than this from the target is reported.
SPARSITY_TOLERANCE = 1e-3
_LISTED = 10  # names a warning lists before it counts the rest


def warn_at_fit_start(model: nn.Module, run: SparseTraining, config: RunConfig) -> None:
    """Warn about frozen layers the default selection skipped, and an overall sparsity off its target.

    Args:
        model: The LightningModule.
        run: The run RigLCallback built for this fit.
        config: RigLCallback's arguments.

    """
    if not config.include:
        frozen = frozen_default_weights(model, config.exclude)
        if frozen:
            rank_zero_warn(
                f"RigL skips {len(frozen)} frozen weights (requires_grad=False) of layers it masks by default, "
                f"and leaves them dense: {_listed(frozen)}. The sparsity RigL reports counts only the weights it "
                "masks, and a layer unfrozen later (BackboneFinetuning) trains dense. To mask them, name them with "
                "the other weights in `include` (a frozen weight is zeroed where inactive, and trains under its "
                "mask once unfrozen); to keep them dense and silence this, name them in `exclude`."
            )
    _warn_off_target(run, config)


def _warn_off_target(sparse: SparseTraining, config: RunConfig) -> None:
    names = budget_layers(
        list(sparse.sparsities),
        config.distribution,
        dense_first_layer=config.dense_first_layer,
        custom_sparsity=config.custom_sparsity,
    )
    if not names:
        return
    shapes = {name: shape for name, shape in sparse.shapes().items() if name in names}
    achieved = achieved_sparsity(shapes, sparse.sparsities)
    if abs(achieved - config.sparsity) > SPARSITY_TOLERANCE:
        weights = sum(math.prod(shape) for shape in shapes.values())
        rank_zero_warn(
            f"RigL's masks reach an overall sparsity of {achieved:.4f}, not the target {config.sparsity}, over "
            f"the {weights} weights of the {len(names)} layers that carry it: each layer keeps a whole number of "
            "active weights, rounded up, which small layers feel most. The per-layer sparsities are the "
            "reference's; see docs/how-rigl-works.md, 'Per-layer sparsity', for how large the gap can be."
        )


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown if len(names) <= _LISTED else f"{shown} and {len(names) - _LISTED} more"
