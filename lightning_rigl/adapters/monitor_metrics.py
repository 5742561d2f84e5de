"""What SparsityMonitor measures: the model's FLOPs, batch sizes, per-layer sparsities and the metrics it logs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException as LightningMisconfiguration
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_rigl.adapters.compat import MisconfigurationException
from lightning_rigl.core.flops.count import FlopsCount, count_flops, training_flops_per_sample, uncounted_warning
from lightning_rigl.core.flops.report import density
from lightning_rigl.core.sparse_training import SparseTraining


def count_module_flops(
    trainer: pl.Trainer, pl_module: pl.LightningModule, example: Any, batch_size: int | None
) -> FlopsCount | None:
    """Forward FLOPs per sample of ``pl_module`` on ``example``, moved and converted as the Trainer's inputs are.

    Call it on every rank: under FSDP2 the forward gathers weights, a collective.

    Args:
        trainer: The Trainer, whose precision plugin converts the input and wraps the forward pass.
        pl_module: The LightningModule to count.
        example: Input for one forward pass (see :func:`~lightning_rigl.core.flops.count.count_flops`); ``None``
            warns that FLOPs are skipped.
        batch_size: Samples in ``example``; ``None`` reads dim 0 of its first tensor.

    Returns:
        The count, or ``None`` without an example input. Operations on weights without a FLOP formula are
        named in one warning, on rank 0.

    Raises:
        MisconfigurationException: The model's forward fails on ``example``.

    """
    if example is None:
        rank_zero_warn(
            "SparsityMonitor has no example input, so it cannot count FLOPs: pass `example_input=` or set "
            "`example_input_array` on your LightningModule. Sparsity and topology are still logged."
        )
        return None
    example = trainer.precision_plugin.convert_input(move_data_to_device(example, pl_module.device))
    # At training's precision (autocast's low-precision copies of a weight still count as that weight).
    with trainer.precision_plugin.forward_context():
        try:
            flops = count_flops(pl_module, example, batch_size=batch_size, warn=False)
        except ValueError as error:
            raise MisconfigurationException(
                f"SparsityMonitor could not count FLOPs: {str(error).rstrip('.')}. Pass an `example_input` "
                "(or set `example_input_array`) that the model's forward takes."
            ) from error
    if flops.uncounted:
        rank_zero_warn(f"SparsityMonitor: {uncounted_warning(flops.uncounted)}")
    return flops


def batch_size_or_none(batch: Any) -> int | None:
    """Samples in a batch as Lightning reads them, or ``None`` when it holds no tensor (FLOPs per batch unknown).

    Example:
        >>> import torch
        >>> batch_size_or_none((torch.zeros(8, 3), torch.zeros(8))), batch_size_or_none("no tensor")
        (8, None)
    """
    try:
        return extract_batch_size(batch)
    except LightningMisconfiguration:
        return None


def sparsities(params: Mapping[str, Tensor], active: Mapping[str, int]) -> dict[str, float]:
    """Fraction of zeros of each parameter that ``active`` counts, from its number of active weights.

    Example:
        >>> import torch
        >>> sparsities({"w": torch.zeros(2, 2)}, {"w": 1})
        {'w': 0.75}
    """
    return {name: 1.0 - density(n, params[name].numel()) for name, n in active.items()}


def train_flops_per_sample(flops: FlopsCount, sparse: SparseTraining | None, step: int) -> float:
    """Training FLOPs per sample of optimizer step ``step``, by the method and schedule of ``sparse``.

    Without a :class:`~lightning_rigl.core.SparseTraining` (no RigLCallback) the weights are trained as they
    are, without updates: ``3 f_S``.

    Example:
        >>> from lightning_rigl.core import LayerFlops
        >>> train_flops_per_sample(FlopsCount({"w": LayerFlops(dense=100.0, density=0.1)}), None, step=0)
        30.0
    """
    if sparse is None:
        return training_flops_per_sample(flops.sparse, flops.dense)
    schedule = sparse.schedule
    return training_flops_per_sample(
        flops.sparse,
        flops.dense,
        sparse.method.name,
        schedule.delta_t if schedule is not None else 1,
        updating=schedule is not None and step < schedule.t_end,
    )


def step_metrics(
    params: Mapping[str, Tensor],
    active: Mapping[str, int],
    flops: FlopsCount | None,
    train_flops: float,
    dense_train_flops: float,
    sparse: SparseTraining | None,
    step: int,
) -> dict[str, float]:
    """The ``sparsity/*``, ``flops/*`` and ``rigl/*`` values SparsityMonitor logs at optimizer step ``step``.

    Args:
        params: The watched parameters by name.
        active: Active weights per parameter (:func:`~lightning_rigl.core.count_active`).
        flops: Forward FLOPs per sample at the current sparsities; ``None`` leaves out ``flops/*``.
        train_flops: Training FLOPs of the run so far, all ranks.
        dense_train_flops: Training FLOPs of the same samples trained dense.
        sparse: RigLCallback's sparse training; ``None`` leaves out ``rigl/*``.
        step: The optimizer step (``trainer.global_step``), for the drop fraction.

    Example:
        >>> import torch
        >>> step_metrics({"w": torch.zeros(2, 2)}, {"w": 1}, None, 0.0, 0.0, None, step=0)
        {'sparsity/global': 0.75, 'sparsity/w': 0.75}
    """
    numel = sum(p.numel() for p in params.values())
    metrics = {"sparsity/global": 1.0 - density(sum(active.values()), numel)}
    metrics.update({f"sparsity/{name}": s for name, s in sparsities(params, active).items()})
    if flops is not None:
        metrics["flops/dense_forward"] = flops.dense
        metrics["flops/sparse_forward"] = flops.sparse
        metrics["flops/sparse_ratio"] = flops.ratio
        metrics["flops/train_total"] = train_flops
        metrics["flops/train_ratio"] = train_flops / dense_train_flops if dense_train_flops else 0.0
    if sparse is not None:
        last = sparse.history[-1] if sparse.history else None
        updating = sparse.method.updates and sparse.schedule is not None
        metrics["rigl/drop_fraction"] = sparse.schedule.drop_fraction(step) if updating else 0.0
        metrics["rigl/changed"] = last.changed / last.active if last and last.active else 0.0
        metrics["rigl/itop"] = sparse.itop_rate
        metrics["rigl/updates"] = float(sparse.updates)
    return metrics


def shape_stand_ins(compact: Any) -> dict[str, Tensor]:
    """For each compact layer, a zero tensor of its dense weight's shape that holds one element.

    What the monitor reads of a masked weight is its shape and its nonzeros (counted with the mask): a
    compact layer has no dense weight to show it.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_rigl.core.storage import make_compact
        >>> from lightning_rigl.core.storage.run_layers import CompactLayers
        >>> layer = make_compact(nn.Linear(3, 2), torch.ones(2, 3, dtype=torch.bool))
        >>> {name: tuple(t.shape) for name, t in shape_stand_ins(CompactLayers({"fc.weight": layer})).items()}
        {'fc.weight': (2, 3)}
    """
    return {name: compact.values(name).new_zeros(()).expand(compact.shape(name)) for name in compact}
