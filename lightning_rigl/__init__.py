"""lightning-rigl: sparse training from scratch with RigL as a PyTorch Lightning callback.

The public face is here. ``adapters`` holds the Lightning callbacks; ``core`` is torch-only and drives
any training loop (see ``lightning_rigl.core``).
"""

from lightning_rigl._moved import MOVED
from lightning_rigl.adapters.callback import RigLCallback
from lightning_rigl.adapters.compat import refuse_cli_values_in_one_line
from lightning_rigl.adapters.conversion import to_dense_checkpoint
from lightning_rigl.adapters.monitor import SparsityMonitor
from lightning_rigl.core import SparseTraining, UpdateSchedule, layer_sparsities
from lightning_rigl.core._moved import register
from lightning_rigl.core.flops.count import count_flops
from lightning_rigl.core.kernels.sparsify import sparsify
from lightning_rigl.core.sparsity.linear_types import register_linear
from lightning_rigl.core.state.export import load_sparse, save_sparse

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
    "to_dense_checkpoint",
]
__version__ = "0.1.0"

refuse_cli_values_in_one_line(RigLCallback, SparsityMonitor)  # LightningCLI: a refused value in one line
# The module paths of 0.1.0 that moved still import, with a DeprecationWarning, for one release.
register()
register(MOVED)
