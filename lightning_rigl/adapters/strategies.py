"""Which Lightning strategies RigLCallback supports (those where its masks stay exact), and its checks across ranks."""

from __future__ import annotations

from typing import Any

from lightning_rigl.adapters.compat import MisconfigurationException, lightning_classes
from lightning_rigl.core.sparse_training import SparseTraining

SUPPORTED_STRATEGIES = (
    "single device ('auto' on one device)",
    "DDP ('ddp', 'ddp_spawn', 'ddp_fork', 'ddp_notebook', multi-node)",
    "FSDP2 (ModelParallelStrategy with tensor_parallel_size=1 and fully_shard in configure_model)",
)
SUPPORTED_CLASSES = ("SingleDeviceStrategy", "DDPStrategy", "ModelParallelStrategy")
REFUSED_SUBCLASSES = ("DeepSpeedStrategy", "XLAStrategy", "SingleDeviceXLAStrategy")


def check_strategy(strategy: Any) -> None:
    """Refuse the strategies where RigL's masks could not be kept exact (see docs/multi-device.md).

    Strategies of ``lightning.pytorch`` and of ``pytorch_lightning`` alike.

    Example:
        >>> from lightning.pytorch.strategies import DDPStrategy
        >>> check_strategy(DDPStrategy())  # supported: no error
    """
    tensor_parallel = getattr(strategy, "_tensor_parallel_size", 1)
    if isinstance(strategy, lightning_classes("strategies", "ModelParallelStrategy")) and tensor_parallel != 1:
        raise MisconfigurationException(
            f"RigLCallback does not support tensor parallelism (ModelParallelStrategy with tensor_parallel_size="
            f"{tensor_parallel}). Supported: {'; '.join(SUPPORTED_STRATEGIES)}."
        )
    # DeepSpeed and XLA derive from DDPStrategy / SingleDeviceStrategy: refused by name before the check below.
    refused = isinstance(strategy, lightning_classes("strategies", *REFUSED_SUBCLASSES))
    if refused or not isinstance(strategy, lightning_classes("strategies", *SUPPORTED_CLASSES)):
        raise MisconfigurationException(
            f"RigLCallback does not support the strategy {type(strategy).__name__}: its masks could not be kept "
            "exact there (FSDP1 flattens parameters; DeepSpeed hides gradients; XLA is untested). "
            f"Supported: {'; '.join(SUPPORTED_STRATEGIES)}."
        )


class MaskAgreement:
    """When RigLCallback compares the masks across ranks: at fit start, then after the first ``checks`` updates.

    ``checks=-1`` compares after every update, ``0`` never. Each comparison is a collective that raises a
    RuntimeError naming the layers whose masks differ between ranks.
    """

    def __init__(self, checks: int = 0) -> None:
        self.left = checks

    def at_fit_start(self, run: SparseTraining) -> None:
        """Compare the masks the fit starts from."""
        if self.left:
            run.check_masks_agree_across_ranks()

    def after_update(self, run: SparseTraining) -> None:
        """Compare the masks after a topology update, while checks are left."""
        if self.left:
            self.left -= self.left > 0
            run.check_masks_agree_across_ranks()
