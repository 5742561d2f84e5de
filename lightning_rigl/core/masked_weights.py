"""MaskedWeights: the weights a run masks, their per-layer sparsities and their masks, as a run's base."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import Self

from lightning_rigl.core.parallel.collectives import check_masks_agree_across_ranks
from lightning_rigl.core.parallel.sharding import wrap_like_param
from lightning_rigl.core.sparsity.distributions import resolve_sparsities
from lightning_rigl.core.sparsity.selection import select_parameters
from lightning_rigl.core.topology.masks import LayerMasks

ParamsLike = torch.optim.Optimizer | Iterable[Tensor] | None


class MaskedWeights:
    """Which weights are masked, how sparse each is, and their masks: what every run is made of.

    :class:`~lightning_rigl.core.SparseTraining` is one, with the steps that update the masks; this
    base owns everything it sets and reads no attribute of a subclass.

    Args:
        params: Parameter name to parameter, the weights to mask (one entry per Parameter object).
        sparsities: Parameter name to fraction of zeros in [0, 1).

    Example:
        >>> w = nn.Parameter(torch.ones(2, 2))
        >>> weights = MaskedWeights({"w": w}, {"w": 0.5})
        >>> weights.set_masks({"w": torch.tensor([[True, False], [False, True]])})
        >>> weights.masks["w"].tolist(), w.tolist()
        ([[True, False], [False, True]], [[1.0, 0.0], [0.0, 1.0]])

    """

    def __init__(self, params: Mapping[str, nn.Parameter], sparsities: Mapping[str, float]) -> None:
        if set(sparsities) != set(params):
            raise ValueError(f"`sparsities` must name exactly the parameters {list(params)}, got {list(sparsities)}.")
        self.params = dict(params)
        self.sparsities = {name: float(sparsities[name]) for name in self.params}
        self._name_of = {id(p): name for name, p in self.params.items()}
        self.layer_masks = LayerMasks(self.params)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        sparsity: float = 0.9,
        distribution: str = "erk",
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        dense_first_layer: bool | None = None,
        custom_sparsity: dict[str, float] | None = None,
        erk_power_scale: float = 1.0,
        **kwargs: Any,
    ) -> Self:
        """Select a model's weights, distribute ``sparsity`` over them and mask them.

        ``dense_first_layer=None`` keeps the first masked weight dense for ``"uniform"`` only, as the
        paper does. ``params`` (name to Parameter) skips the selection: the caller selected them already.
        Other keyword arguments go to the constructor.
        """
        params = kwargs.pop("params", None) or select_parameters(model, include, exclude)
        kwargs.setdefault("model", model)
        shapes = {name: tuple(p.shape) for name, p in params.items()}
        sparsities = resolve_sparsities(
            shapes,
            sparsity,
            distribution,
            dense_first_layer=dense_first_layer,
            custom_sparsity=custom_sparsity,
            erk_power_scale=erk_power_scale,
        )
        return cls(params, sparsities, **kwargs)

    @property
    def masks(self) -> dict[str, Tensor]:
        """Parameter name to bool mask of the weight's shape (True = active); a fresh copy.

        For a weight sharded by FSDP2 the mask is a DTensor like the weight (``.full_tensor()``
        gathers it); no communication happens here.
        """
        return {name: wrap_like_param(mask.bool(), self.params[name]) for name, mask in self.layer_masks.local.items()}

    @property
    def itop_rate(self) -> float:
        """In-time over-parameterization: the fraction of masked weights that have ever been active.

        For sharded weights, over this rank's shards.
        """
        return self.layer_masks.itop_rate

    def masked_names(self, params: ParamsLike = None) -> list[str]:
        """Masked parameter names among ``params`` (an optimizer, some tensors, or None for all)."""
        if params is None:
            return list(self.params)
        if isinstance(params, torch.optim.Optimizer):
            params = (p for group in params.param_groups for p in group["params"])
        return [self._name_of[id(p)] for p in params if id(p) in self._name_of]

    def check_masks_agree_across_ranks(self) -> None:
        """Raise a RuntimeError naming the layers whose replicated masks differ between ranks; a collective."""
        check_masks_agree_across_ranks(self.layer_masks.local, self.params)

    def stepped_names(
        self, optimizers: Iterable[torch.optim.Optimizer], params: ParamsLike
    ) -> tuple[list[str], dict[torch.optim.Optimizer, tuple[str, ...]]]:
        """The masked names among ``params`` (an optimizer step's), and those each of ``optimizers`` holds."""
        names_by_optimizer = {optimizer: tuple(self.masked_names(optimizer)) for optimizer in optimizers}
        stepped = names_by_optimizer.get(params) if isinstance(params, torch.optim.Optimizer) else None
        return (list(stepped) if stepped is not None else self.masked_names(params)), names_by_optimizer

    @torch.no_grad()
    def apply_masks(self, params: ParamsLike = None) -> None:
        """Zero the inactive weights."""
        self.layer_masks.zero_inactive(self.masked_names(params))

    def set_masks(self, masks: Mapping[str, Tensor]) -> None:
        """Replace the masks (bool or 0/1 tensors by name) and zero the weights they make inactive.

        The active counts become those of the given masks and are kept from then on. Masks have the
        weight's full shape, also for sharded weights (each rank keeps its shard).
        """
        self.layer_masks.replace(masks)
        self.masks_replaced()

    def masks_replaced(self) -> None:
        """Forget what the old masks made true: zero the weights they made inactive."""
        self.apply_masks()
