"""lightning-rigl: sparse training from scratch with RigL as a PyTorch Lightning callback."""

from lightning_rigl.callback import RigLCallback
from lightning_rigl.core import SparseTraining, UpdateSchedule, layer_sparsities
from lightning_rigl.core.export import load_sparse, save_sparse

__all__ = ["RigLCallback", "SparseTraining", "UpdateSchedule", "layer_sparsities", "load_sparse", "save_sparse"]
__version__ = "0.1.0"
