"""Weight-averaging callbacks' model copies, kept at the masks' zeros."""

from __future__ import annotations

from typing import Any

import torch

from lightning_rigl.core.topology.masks import LayerMasks


def mask_averaged_copies(trainer: Any, layer_masks: LayerMasks, owner: object) -> None:
    """Apply the masks to every model copy another callback of ``trainer`` holds.

    Averaging callbacks (``WeightAveraging`` / EMA, ``StochasticWeightAveraging``) keep a copy of the
    model that they swap in for validation, save in checkpoints and copy back at the end. Averages keep
    a 0 where the weights stay 0, so masking the copy whenever the masks change is enough.
    """
    for callback in trainer.callbacks:
        if callback is not owner:
            for value in vars(callback).values():
                if isinstance(value, torch.nn.Module) and value is not trainer.lightning_module:
                    layer_masks.apply_to_copy(value)
