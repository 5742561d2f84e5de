"""MaskedWeights: the weights a run masks, their per-layer sparsities and their masks, as a run's base."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import Self

from lightning_rigl.core.config import check_storage
from lightning_rigl.core.parallel.collectives import check_masks_agree_across_ranks
from lightning_rigl.core.parallel.sharding import wrap_like_param
from lightning_rigl.core.sparsity.distributions import resolve_sparsities
from lightning_rigl.core.sparsity.selection import select_parameters
from lightning_rigl.core.storage.compaction import make_layers_compact
from lightning_rigl.core.storage.layer import CompactLayer
from lightning_rigl.core.storage.run_layers import CompactLayers
from lightning_rigl.core.topology.masks import LayerMasks

ParamsLike = torch.optim.Optimizer | Iterable[Tensor] | None


class MaskedWeights:
    """Which weights are masked, how sparse each is, and their masks: what every run is made of.

    :class:`~lightning_rigl.core.SparseTraining` is one, with the steps that update the masks; this
    base owns everything it sets and reads no attribute of a subclass.

    Args:
        params: Parameter name to parameter, the weights to mask (one entry per Parameter object).
        sparsities: Parameter name to fraction of zeros in [0, 1), for ``params`` and ``compact``.
        compact: Weight name (``"fc.weight"``) to compact layer: layers that store only their active weights,
            their masks drawn already (see :func:`~lightning_rigl.core.storage.make_compact`).

    Example:
        >>> w = nn.Parameter(torch.ones(2, 2))
        >>> weights = MaskedWeights({"w": w}, {"w": 0.5})
        >>> weights.set_masks({"w": torch.tensor([[True, False], [False, True]])})
        >>> weights.masks["w"].tolist(), w.tolist()
        ([[True, False], [False, True]], [[1.0, 0.0], [0.0, 1.0]])

    """

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        sparsities: Mapping[str, float],
        compact: Mapping[str, CompactLayer] | None = None,
    ) -> None:
        names = [*params, *(compact or {})]
        if set(sparsities) != set(names):
            raise ValueError(f"`sparsities` must name exactly the parameters {names}, got {list(sparsities)}.")
        self.params = dict(params)
        self.compact = CompactLayers(compact or {})
        order = sparsities if compact else params  # with compact layers, the selection's order is the sparsities'
        self.sparsities = {name: float(sparsities[name]) for name in order}
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
        storage: str = "dense",
        **kwargs: Any,
    ) -> Self:
        """Select a model's weights, distribute ``sparsity`` over them and mask them.

        ``dense_first_layer=None`` keeps the first masked weight dense for ``"uniform"`` only, as the
        paper does. ``params`` (name to Parameter) skips the selection: the caller selected them already.
        Other keyword arguments go to the constructor.

        ``storage="compact"`` (a :class:`~lightning_rigl.core.SparseTraining`'s) draws the masks and makes
        the masked Linear-type layers compact in place, as ``RigLCallback(storage="compact")`` does in
        ``setup``: each then holds only its active values (``weight_values``). Build the optimizer after
        this call, from ``model.parameters()``. Layers it cannot serve stay dense, listed in one warning.

        Raises:
            ValueError: ``storage`` not ``"dense"`` or ``"compact"``; with ``"compact"``: SNFS, ``kernels="dense"``,
                no layer it can serve, or one named in ``include`` that it cannot serve.
        """
        defaults = {name: p.default for name, p in inspect.signature(cls).parameters.items()}
        check_storage(storage, *(kwargs.get(name, defaults.get(name)) for name in ("method", "kernels")))
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
        if storage == "compact":
            owner = f"{cls.__name__}.from_model(storage='compact')"
            seed = kwargs.get("seed", defaults.get("seed"))
            kwargs["drawn"], dense = make_layers_compact(
                model, params, sparsities, include, seed, lambda message: warnings.warn(message, stacklevel=4), owner
            )
            params = {name: params[name] for name in dense}
        return cls(params, sparsities, **kwargs)

    @property
    def masks(self) -> Mapping[str, Tensor]:
        """Parameter name to bool mask of the weight's shape (True = active); a fresh copy.

        For a weight sharded by FSDP2 the mask is a DTensor like the weight (``.full_tensor()``
        gathers it); no communication happens here. With compact layers, a mapping that makes each
        mask when it is read (a compact layer keeps none).
        """
        if self.compact:
            return LazyMasks(list(self.sparsities), self.mask)
        return {name: self.mask(name) for name in self.params}

    def mask(self, name: str) -> Tensor:
        """The bool mask of one masked weight (True = active), made now for a compact layer."""
        if name in self.compact.layers:
            return self.compact.mask(name)
        return wrap_like_param(self.layer_masks.local[name].bool(), self.params[name])

    @property
    def counts(self) -> dict[str, int]:
        """Active weights per masked weight, fixed for the run."""
        return {**self.layer_masks.counts, **self.compact.counts}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every masked weight's shape (a compact layer's stored dense shape)."""
        compact = {name: tuple(self.compact.shape(name)) for name in self.compact}
        return {**{name: tuple(p.shape) for name, p in self.params.items()}, **compact}

    @property
    def itop_rate(self) -> float:
        """In-time over-parameterization: the fraction of masked weights that have ever been active.

        For sharded weights, over this rank's shards.
        """
        if not self.compact:
            return self.layer_masks.itop_rate
        ever, total = self.compact.itop_counts()
        for mask in self.layer_masks.ever_active.values():
            ever, total = ever + int(mask.count_nonzero()), total + mask.numel()
        return ever / max(total, 1)

    def masked_names(self, params: ParamsLike = None) -> list[str]:
        """Masked parameter names among ``params`` (an optimizer, some tensors, or None for all)."""
        if params is None:
            return list(self.params)
        if isinstance(params, torch.optim.Optimizer):
            params = (p for group in params.param_groups for p in group["params"])
        return [self._name_of[id(p)] for p in params if id(p) in self._name_of]

    def check_masks_agree_across_ranks(self) -> None:
        """Raise a RuntimeError naming the layers whose replicated masks differ between ranks; a collective."""
        positions = {name: self.compact.positions(name) for name in self.compact}
        check_masks_agree_across_ranks(self.layer_masks.local, self.params, positions)

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


class LazyMasks(Mapping[str, Tensor]):
    """A read-only mapping of masked weight names to masks, each made when it is read (never all at once).

    Example:
        >>> masks = LazyMasks(["a"], lambda name: torch.ones(2, dtype=torch.bool))
        >>> list(masks), masks["a"].tolist()
        (['a'], [True, True])
    """

    def __init__(self, names: Sequence[str], make: Any) -> None:
        self._names, self._make = list(names), make

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._make(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
