"""The torch-only core: nothing here imports Lightning, so a plain PyTorch loop can drive it."""

from lightning_rigl.core.distribution import DISTRIBUTIONS, Distribution, layer_sparsities, resolve_sparsities
from lightning_rigl.core.flops import FlopsCount, LayerFlops, count_active, count_flops, training_flops_per_sample
from lightning_rigl.core.history import UpdateRecord
from lightning_rigl.core.methods import METHODS, METHODS_BY_NAME, GrowSignal, Method, MethodName, get_method
from lightning_rigl.core.optim_state import reset_optimizer_state
from lightning_rigl.core.schedule import DECAYS, Decay, UpdateSchedule
from lightning_rigl.core.selection import default_parameter_names, select_parameters
from lightning_rigl.core.sparse_training import SparseTraining
from lightning_rigl.core.topology import drop_and_grow, num_active, random_mask

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
    "drop_and_grow",
    "get_method",
    "layer_sparsities",
    "num_active",
    "random_mask",
    "reset_optimizer_state",
    "resolve_sparsities",
    "select_parameters",
    "training_flops_per_sample",
]
