"""lightning-rigl: sparse training from scratch with RigL as a PyTorch Lightning callback."""

from lightning_rigl.callback import RigLCallback
from lightning_rigl.core import SparseTraining, UpdateSchedule, layer_sparsities

__all__ = ["RigLCallback", "SparseTraining", "UpdateSchedule", "layer_sparsities"]
__version__ = "0.1.0"
