"""The torch-only core: nothing here imports Lightning, so a plain PyTorch loop can drive it.

:class:`SparseTraining` is the run; the folders below hold what it is made of, by concern:
``sparsity`` (which weights, how sparse), ``topology`` (masks and their drop/grow updates),
``kernels`` (sparse kernels and their choice), ``state`` (saved state, export), ``flops`` (FLOP
counts and the monitor's report) and ``parallel`` (collectives, FSDP2 shards).
"""

from lightning_rigl.core._moved import old_names
from lightning_rigl.core.flops.count import FlopsCount, LayerFlops, count_active, count_flops, training_flops_per_sample
from lightning_rigl.core.history import UpdateRecord
from lightning_rigl.core.sparse_training import SparseTraining
from lightning_rigl.core.sparsity.distributions import DISTRIBUTIONS, Distribution, layer_sparsities, resolve_sparsities
from lightning_rigl.core.sparsity.selection import default_parameter_names, select_parameters
from lightning_rigl.core.topology.initial_masks import num_active, random_mask
from lightning_rigl.core.topology.methods import METHODS, METHODS_BY_NAME, GrowSignal, Method, MethodName, get_method
from lightning_rigl.core.topology.optim_state import reset_optimizer_state
from lightning_rigl.core.topology.schedule import DECAYS, Decay, UpdateSchedule

__all__ = [
    "DECAYS",
    "DISTRIBUTIONS",
    "METHODS",
    "METHODS_BY_NAME",
    "Decay",
    "Distribution",
    "FlopsCount",
    "GrowSignal",
    "LayerFlops",
    "Method",
    "MethodName",
    "SparseTraining",
    "UpdateRecord",
    "UpdateSchedule",
    "count_active",
    "count_flops",
    "default_parameter_names",
    "get_method",
    "layer_sparsities",
    "num_active",
    "random_mask",
    "reset_optimizer_state",
    "resolve_sparsities",
    "select_parameters",
    "training_flops_per_sample",
]

__getattr__ = old_names(__name__)  # `drop_and_grow`, deprecated
