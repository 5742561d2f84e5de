"""lightning-rigl: sparse training from scratch with RigL as a PyTorch Lightning callback."""

from lightning_rigl._lightning import refuse_cli_values_in_one_line
from lightning_rigl.callback import RigLCallback
from lightning_rigl.core import SparseTraining, UpdateSchedule, layer_sparsities
from lightning_rigl.core.export import load_sparse, save_sparse
from lightning_rigl.core.flops import count_flops
from lightning_rigl.core.linear_types import register_linear
from lightning_rigl.inference import sparsify
from lightning_rigl.monitor import SparsityMonitor

__all__ = [
    "RigLCallback",
    "SparseTraining",
    "SparsityMonitor",
    "UpdateSchedule",
    "count_flops",
    "layer_sparsities",
    "load_sparse",
    "register_linear",
    "save_sparse",
    "sparsify",
]
__version__ = "0.1.0"

refuse_cli_values_in_one_line(RigLCallback, SparsityMonitor)  # LightningCLI: a refused value in one line
