"""FLOPs of a sparse network, counted the way the RigL paper counts them.

Forward FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (its per-operation formulas,
a multiply-add counting 2), attributed to the weight each counted operation multiplies by (itself,
a view of it, or a copy autocast cast it to) and scaled by that weight's density. Operations that
multiply no weight (attention scores, also CPU's fused ``scaled_dot_product_attention``) stay dense;
element-wise work (activations, norms, biases, pooling) is not counted by ``FlopCounterMode``.
Recurrent layers run on their plain kernels for the pass, whose matmuls it counts; an operation on a
weight that it has no formula for counts 0, with a warning naming the module.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from lightning_rigl.core.flops.per_weight import count_by_weight
from lightning_rigl.core.parallel.sharding import gather_full
from lightning_rigl.core.topology.methods import METHODS, get_method
from lightning_rigl.core.validation import check_int


@dataclass(frozen=True)
class LayerFlops:
    """Forward FLOPs per sample of the operations that multiply by one weight.

    Attributes:
        dense: FLOPs with every connection present.
        density: Fraction of the weight's connections that are active.

    """

    dense: float
    density: float

    @property
    def sparse(self) -> float:
        """FLOPs with only the active connections: ``dense * density``."""
        return self.dense * self.density


@dataclass(frozen=True)
class FlopsCount:
    """Forward FLOPs per sample of a model, dense and sparse (the paper's f_D and f_S).

    Attributes:
        per_layer: Parameter name to its :class:`LayerFlops`, for every weight a counted operation
            multiplies by (masked or not).
        other: FLOPs of counted operations that multiply no weight (attention scores); always dense.
        uncounted: ``"<operator> in `<module>` (<class>)"`` for each operation that takes a module's weight
            but has no FLOP formula: its FLOPs are missing from ``dense`` and ``sparse``.

    Example:
        >>> count = FlopsCount({"fc.weight": LayerFlops(dense=100.0, density=0.25)}, other=20.0)
        >>> count.dense, count.sparse, count.ratio
        (120.0, 45.0, 0.375)

    """

    per_layer: dict[str, LayerFlops]
    other: float = 0.0
    uncounted: tuple[str, ...] = ()

    @property
    def dense(self) -> float:
        """f_D: forward FLOPs per sample with every weight dense."""
        return self.other + sum(layer.dense for layer in self.per_layer.values())

    @property
    def sparse(self) -> float:
        """f_S: forward FLOPs per sample with each weight's FLOPs scaled by its density."""
        return self.other + sum(layer.sparse for layer in self.per_layer.values())

    @property
    def ratio(self) -> float:
        """f_S / f_D (1.0 for a model without counted FLOPs)."""
        return self.sparse / self.dense if self.dense else 1.0

    def with_sparsity(self, sparsity: Mapping[str, float]) -> FlopsCount:
        """The same count with the named layers at new sparsities (fractions of zeros); no forward pass.

        Names without FLOPs (an embedding, a weight outside every counted operation) are ignored.
        """
        for name, value in sparsity.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"`sparsity[{name!r}]` must be a fraction of zeros in [0, 1], got {value!r}.")
        per_layer = {
            name: replace(layer, density=1.0 - float(sparsity[name])) if name in sparsity else layer
            for name, layer in self.per_layer.items()
        }
        return replace(self, per_layer=per_layer)


def count_flops(
    model: nn.Module,
    example_input: Any,
    sparsity: Mapping[str, float] | None = None,
    *,
    batch_size: int | None = None,
    warn: bool = True,
) -> FlopsCount:
    """Forward FLOPs per sample of ``model`` on ``example_input``, dense and with its zeros.

    Runs one forward pass under ``FlopCounterMode`` (in eval mode and without gradients, so no
    running statistics change; attention's fused fast path is turned off for the pass because
    ``FlopCounterMode`` cannot see inside it) and attributes each counted operation to the weight it
    multiplies by, also through a copy autocast made (``bf16-mixed``). That weight's FLOPs are then
    scaled by its density. CPU's fused ``scaled_dot_product_attention`` counts as CUDA's does: its
    two matmuls. Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) run on their plain kernels for the
    pass (oneDNN and cuDNN fuse them into kernels ``FlopCounterMode`` cannot see into), so their input
    and hidden weights are counted apart.

    Args:
        model: Any module.
        example_input: A tensor (``model(x)``), a tuple or list (``model(*x)``) or a dict (``model(**x)``),
            as Lightning's ``example_input_array``.
        sparsity: Parameter name to fraction of zeros, overriding what is in the weights; weights it
            does not name count the zeros they actually hold (all of them when ``None``).
        batch_size: Samples in ``example_input``; ``None`` reads dim 0 of its first tensor.
        warn: Warn (once per call) when an operation that takes a weight has no FLOP formula and so
            counts 0, naming its module and the operation. ``False`` leaves that to the caller
            (``.uncounted`` lists them; SparsityMonitor warns on rank 0 only).

    Returns:
        Forward FLOPs per sample: ``.dense`` (f_D), ``.sparse`` (f_S), ``.per_layer`` and ``.uncounted``.

    Raises:
        ValueError: A ``sparsity`` name that is no parameter of ``model``, a value outside [0, 1], a
            ``batch_size`` < 1, or an ``example_input`` the model's forward fails on (naming it and
            the error).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> count = count_flops(model, torch.randn(16, 4), sparsity={"0.weight": 0.75})
        >>> count.dense, count.sparse, count.per_layer["2.weight"]
        (96.0, 48.0, LayerFlops(dense=32.0, density=1.0))

    """
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for name in sparsity or {}:
        if name not in names:
            raise ValueError(f"`sparsity` names {name!r}, which is no parameter of {type(model).__name__}.")
    if batch_size is None:
        batch_size = _samples_in(example_input)
    elif isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be None or an int >= 1, got {batch_size!r}.")

    by_weight = count_by_weight(model, example_input)
    per_layer = {
        name: LayerFlops(flops / batch_size, by_weight.density[name]) for name, flops in by_weight.flops.items()
    }
    other = by_weight.counter.get_total_flops() - sum(by_weight.flops.values())
    uncounted = tuple(by_weight.uncounted)
    if warn and uncounted:
        warnings.warn(uncounted_warning(uncounted), stacklevel=2)
    return FlopsCount(per_layer, other / batch_size, uncounted).with_sparsity(sparsity or {})


def uncounted_warning(uncounted: Sequence[str]) -> str:
    """The warning for operations on weights that count 0 FLOPs for want of a formula.

    Example:
        >>> uncounted_warning(["mylib.fused_linear in `block` (Fused)"]).split(": ")[0]
        'No FLOP formula for mylib.fused_linear in `block` (Fused)'

    """
    return (
        f"No FLOP formula for {'; '.join(uncounted)}: it counts as 0, so the dense and sparse FLOPs leave out "
        "work done with a weight. Register a formula with `torch.utils.flop_counter.register_flop_formula` "
        "to count it."
    )


def training_flops_per_sample(
    sparse_forward: float,
    dense_forward: float,
    method: str | None = None,
    delta_t: int = 100,
    updating: bool = True,
) -> float:
    """Training FLOPs per sample and optimizer step, by the paper's accounting (backward = 2 x forward).

    What a method costs follows from when it reads the dense weight gradient
    (:attr:`~lightning_rigl.core.topology.methods.Method.dense_gradient`): never (``"static"``, ``"set"``, and no
    RigL at all: ``None``): ``3 f_S``; at every step (``"snfs"``): ``2 f_S + f_D``; at update steps
    (``"rigl"``): ``(3 f_S delta_t + 2 f_S + f_D) / (delta_t + 1)`` while updates run, ``3 f_S`` once
    they stopped (``updating=False``, from ``t_end`` on). Dense training is ``3 f_D``: pass ``f_D`` twice.

    Raises:
        ValueError: An unknown ``method`` or a ``delta_t`` < 1.

    Example:
        >>> training_flops_per_sample(10.0, 100.0, "rigl", delta_t=4)
        48.0
        >>> training_flops_per_sample(10.0, 100.0, "rigl", delta_t=4, updating=False)
        30.0

    """
    if method is not None and method not in METHODS:
        raise ValueError(f"`method` must be None or one of {METHODS}, got {method!r}.")
    reads = get_method(method).dense_gradient if method is not None else "never"
    check_int("delta_t", delta_t, 1)
    if reads == "every_step":
        return 2 * sparse_forward + dense_forward
    if reads == "update_steps" and updating:
        return (3 * sparse_forward * delta_t + 2 * sparse_forward + dense_forward) / (delta_t + 1)
    return 3 * sparse_forward


@torch.no_grad()
def count_active(params: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> dict[str, int]:
    """Number of active weights per parameter: non-zero, or True in ``masks`` where one is given.

    A connection RigL has just grown is active at the value 0; the mask keeps it counted. Sharded
    (FSDP2) weights are counted over all shards: one all-reduce per layer, so call it on every rank.

    Example:
        >>> weight = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
        >>> count_active({"w": weight}), count_active({"w": weight}, {"w": torch.tensor([[True, False]] * 2)})
        ({'w': 1}, {'w': 3})

    """
    counts = {}
    for name, param in params.items():
        active = param != 0
        if masks is not None and name in masks:
            active = active | masks[name].bool()
        counts[name] = int(gather_full(active.sum()))
    return counts


def _samples_in(example_input: Any) -> int:
    tensors = [t for t in tree_flatten(example_input)[0] if isinstance(t, Tensor)]
    if not tensors:
        raise ValueError(f"`example_input` holds no tensor: got {type(example_input).__name__}.")
    return int(tensors[0].shape[0]) if tensors[0].dim() else 1
