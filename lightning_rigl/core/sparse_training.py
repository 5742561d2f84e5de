"""The state of a sparse training run: masks, the schedule, and the update loop shared by all methods."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from lightning_rigl.core.distribution import layer_sparsities
from lightning_rigl.core.grow import GROW_CRITERIA, METHODS
from lightning_rigl.core.optim_state import fill_positions, keeps_zeros, reset_optimizer_state
from lightning_rigl.core.packing import pack_bits, unpack_bits
from lightning_rigl.core.schedule import UpdateSchedule
from lightning_rigl.core.selection import resolve_custom_sparsity, select_parameters
from lightning_rigl.core.sharding import (
    all_ranks_sum,
    all_ranks_true,
    distribute_like_param,
    full,
    full_like_param,
    is_sharded,
    local,
    wrap_like_param,
)
from lightning_rigl.core.topology import drop_and_grow, drop_grow_indices, num_active, random_mask

ParamsLike = torch.optim.Optimizer | Iterable[Tensor] | None


def nonzero_where_inactive(weight: Tensor, mask: Tensor, chunk: int = 1 << 20) -> bool:
    """Whether ``weight`` holds a nonzero where ``mask`` is 0, with buffers of at most ``chunk`` entries.

    NaN does not count: a step on non-finite gradients leaves NaN at inactive positions anyway.

    Example:
        >>> nonzero_where_inactive(torch.tensor([0.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 0.0]), chunk=2)
        True
    """
    weight, mask = weight.detach().reshape(-1), mask.reshape(-1)
    return any(
        bool(weight[start : start + chunk].masked_select(mask[start : start + chunk] == 0).nan_to_num(0.0).any())
        for start in range(0, weight.numel(), chunk)
    )


class SparseTraining:
    """Masks a set of parameters and runs RigL, SET or SNFS topology updates; knows no training loop.

    Drive it from any loop: call :meth:`before_step` once the gradients of a step are final (after
    accumulation, all-reduce and unscaling) and :meth:`after_step` right after ``optimizer.step()``.
    ``before_step`` reads the dense gradient it needs for growth and then zeroes the gradient at
    inactive positions; ``after_step`` drops and grows at update steps and keeps inactive weights at 0.

    Inactive weights stay at 0 by themselves when the optimizer is one of
    :data:`~lightning_rigl.core.optim_state.ZERO_PRESERVING_OPTIMIZERS`: their gradient is masked
    and their optimizer state is 0 (zeroed when a connection is dropped, and once at an optimizer's
    first step). Then ``after_step`` skips the pass over the weights, and every
    ``verify_every`` steps it checks that they are still 0; if something else wrote to them, it
    warns and re-zeroes them after every step from then on. Other optimizers get that pass always.

    Args:
        params: Parameter name to parameter, the weights to mask (one entry per Parameter object).
        sparsities: Parameter name to fraction of zeros in [0, 1).
        method: ``"rigl"``, ``"set"``, ``"snfs"`` or ``"static"`` (no updates).
        schedule: When and how much to update; ``None`` for no updates.
        seed: Seed of the generator behind the initial masks and SET's random growth.
        ema_decay: SNFS's moving-average factor for dense gradients.
        state: A :meth:`state_dict` to resume from instead of drawing fresh masks.
        verify_every: Optimizer steps between checks that the inactive weights left to the optimizer
            are still exactly 0.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> sparse = SparseTraining.from_model(model, 0.5, schedule=UpdateSchedule(delta_t=2, t_end=10))
        >>> for step in range(4):
        ...     model(torch.randn(4, 8)).sum().backward()
        ...     sparse.before_step(step)
        ...     opt.step()
        ...     sparse.after_step([opt])
        ...     opt.zero_grad()
        >>> sparse.updates, int(sparse.masks["0.weight"].sum())
        (2, 48)

    """

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        sparsities: Mapping[str, float],
        *,
        method: str = "rigl",
        schedule: UpdateSchedule | None = None,
        seed: int = 0,
        ema_decay: float = 0.9,
        state: Mapping[str, Any] | None = None,
        verify_every: int = 100,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
        if isinstance(verify_every, bool) or not isinstance(verify_every, int) or verify_every < 1:
            raise ValueError(f"`verify_every` must be an int >= 1, got {verify_every!r}.")
        if set(sparsities) != set(params):
            raise ValueError(f"`sparsities` must name exactly the parameters {list(params)}, got {list(sparsities)}.")
        self.params = dict(params)
        self.sparsities = {name: float(sparsities[name]) for name in self.params}
        self.method = method
        self.criterion = GROW_CRITERIA.get(method)
        self.schedule = schedule
        self.ema_decay = ema_decay
        self.generator = torch.Generator().manual_seed(seed)
        self._name_of = {id(p): name for name, p in self.params.items()}
        self._pending: dict[str, tuple[int, float]] = {}  # layer -> (update step, drop fraction)
        self._scores: dict[str, Tensor] = {}
        self._ema: dict[str, Tensor] = {}
        self.history: list[dict[str, float]] = []
        self.nonfinite_steps = 0
        self._ever_active: dict[str, Tensor] = {}
        # Which weights need no re-zeroing pass: gradients masked since the last step, and for each
        # optimizer that keeps zeros, the names it held when its state was last zeroed at inactive positions.
        self._masked_grads: set[str] = set()
        self._clean: WeakKeyDictionary[torch.optim.Optimizer, tuple[str, ...]] = WeakKeyDictionary()
        self._trust_optimizers = True
        self.verify_every = verify_every
        self._steps_to_verify = verify_every
        if state is not None:
            self.load_state_dict(state)  # no fresh draw: it would zero weights the saved masks keep
        else:
            masks = {
                name: random_mask(p.shape, num_active(p.numel(), self.sparsities[name]), self.generator)
                for name, p in self.params.items()
            }
            self.set_masks(masks)

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
    ) -> SparseTraining:
        """Select a model's weights, distribute ``sparsity`` over them and mask them.

        ``dense_first_layer=None`` keeps the first masked weight dense for ``"uniform"`` only, as the
        paper does. Other keyword arguments go to the constructor.
        """
        params = select_parameters(model, include, exclude)
        if dense_first_layer is None:
            dense_first_layer = distribution == "uniform"
        custom = resolve_custom_sparsity(custom_sparsity, list(params))
        first = next(iter(params))
        dense = [first] if dense_first_layer and first not in custom else []
        shapes = {name: tuple(p.shape) for name, p in params.items()}
        sparsities = layer_sparsities(
            shapes, sparsity, distribution, dense=dense, custom=custom, erk_power_scale=erk_power_scale
        )
        return cls(params, sparsities, **kwargs)

    @property
    def masks(self) -> dict[str, Tensor]:
        """Parameter name to bool mask of the weight's shape (True = active); a fresh copy.

        For a weight sharded by FSDP2 the mask is a DTensor like the weight (``.full_tensor()``
        gathers it); no communication happens here.
        """
        return {name: wrap_like_param(mask.bool(), self.params[name]) for name, mask in self._masks.items()}

    @property
    def itop_rate(self) -> float:
        """In-time over-parameterization: the fraction of masked weights that have ever been active.

        For sharded weights, over this rank's shards.
        """
        total = sum(mask.numel() for mask in self._ever_active.values())
        return sum(int(mask.count_nonzero()) for mask in self._ever_active.values()) / max(total, 1)

    @property
    def updates(self) -> int:
        """Number of topology updates made so far."""
        return len(self.history)

    def names(self, params: ParamsLike = None) -> list[str]:
        """Masked parameter names among ``params`` (an optimizer, some tensors, or None for all)."""
        if params is None:
            return list(self.params)
        if isinstance(params, torch.optim.Optimizer):
            params = (p for group in params.param_groups for p in group["params"])
        return [self._name_of[id(p)] for p in params if id(p) in self._name_of]

    @torch.no_grad()
    def apply_masks(self, params: ParamsLike = None) -> None:
        """Zero the inactive weights."""
        names = self.names(params)
        self._multiply_by_masks([local(self.params[name]) for name in names], names)

    @torch.no_grad()
    def before_step(self, step: int, params: ParamsLike = None) -> None:
        """Read the dense gradients this step needs, then zero gradients at inactive positions.

        Args:
            step: 0-based index of the optimizer step about to run (``trainer.global_step``).
            params: The parameters this optimizer step updates (an optimizer); None for all.

        """
        names = [name for name in self.names(params) if self.params[name].grad is not None]
        if self.criterion is not None and self.schedule is not None and self.schedule.is_update_step(step + 1):
            fraction = self.schedule.drop_fraction(step + 1)
            self._pending.update(dict.fromkeys(self.params, (step + 1, fraction)))
        due = [name for name in names if name in self._pending]
        needs_ema = self.criterion is not None and self.criterion.signal == "gradient_ema"
        if due or (needs_ema and names):
            finite = self._all_finite(names if needs_ema else due)
            if needs_ema and finite:
                for name in names:
                    self._update_ema(name)
            for name in due:
                self._scores.pop(name, None)
                if finite:
                    self._scores[name] = self._grow_scores(name)
            if due and not finite:
                # No update from this step; the layers stay due and retry at their next finite step.
                self.nonfinite_steps += 1
        self._multiply_by_masks([local(self.params[name].grad) for name in names], names)
        self._masked_grads.update(names)

    @torch.no_grad()
    def after_step(self, optimizers: Iterable[torch.optim.Optimizer], params: ParamsLike = None) -> None:
        """Make any topology update that is due after ``optimizer.step()``, and keep inactive weights at 0.

        Args:
            optimizers: Every optimizer of the run; state of changed connections is reset in all of them.
            params: The parameters the step updated (an optimizer); None for all.

        """
        optimizers = list(optimizers)
        names = self.names(params)
        holdings = {optimizer: tuple(self.names(optimizer)) for optimizer in optimizers}
        settled = self._settled(holdings, names)
        self._masked_grads.difference_update(names)
        self._steps_to_verify -= 1
        if self._steps_to_verify <= 0 and settled:
            self._steps_to_verify = self.verify_every
            settled = self._verify_zeros(settled, optimizers)
        for name in names:
            param, scores = self.params[name], self._scores.pop(name, None)
            if scores is not None:
                step, fraction = self._pending.pop(name)
                if is_sharded(param):
                    grown, gone = self._update_sharded(name, scores, fraction)
                else:
                    grown, gone = self._update(name, scores, fraction)
                # The paper's grow init: new connections start at 0 with fresh optimizer state; a weight
                # dropped and regrown in this update keeps its value and state. A dropped weight is
                # zeroed with its state, which nothing reads again: regrowing it resets it anyway.
                changed = torch.cat([grown, gone])
                fill_positions(local(param), changed, 0.0)
                reset_optimizer_state(optimizers, param, changed)
                self._record(step, fraction, all_ranks_sum(grown.numel(), [param]), self._counts[name])
        self._zero_state_once(holdings)
        unsettled = [name for name in names if name not in settled]
        self._multiply_by_masks([local(self.params[name]) for name in unsettled], unsettled)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: tensors and Python primitives only, masks at 1 bit a weight."""
        return {
            "version": 1,
            "method": self.method,
            "shapes": {name: list(p.shape) for name, p in self.params.items()},
            "sparsities": dict(self.sparsities),
            "masks": {name: pack_bits(self._full_mask(name, self._masks)) for name in self.params},
            "ever_active": {name: pack_bits(self._full_mask(name, self._ever_active)) for name in self.params},
            "generator": self.generator.get_state(),
            "pending": {name: [step, fraction] for name, (step, fraction) in self._pending.items()},
            "ema": {name: full(ema).detach().cpu() for name, ema in self._ema.items()},
            "history": [dict(record) for record in self.history],
            "nonfinite_steps": self.nonfinite_steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the masked parameters' names and shapes must match.

        Raises:
            ValueError: Names or shapes that differ from this run's masked parameters.

        """
        saved = {name: tuple(shape) for name, shape in state["shapes"].items()}
        current = {name: tuple(p.shape) for name, p in self.params.items()}
        if saved != current:
            missing, extra = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
            reshaped = sorted(
                f"{n}: saved {saved[n]} vs model {current[n]}"
                for n in set(saved) & set(current)
                if saved[n] != current[n]
            )
            raise ValueError(
                "The saved RigL state does not match the masked parameters: "
                f"not in the checkpoint {missing}, not in the model {extra}, different shapes {reshaped}."
            )
        self.set_masks({name: unpack_bits(state["masks"][name], current[name]) for name in self.params})
        self._ever_active = {
            name: local(distribute_like_param(unpack_bits(state["ever_active"][name], current[name]), p))
            for name, p in self.params.items()
        }
        self.sparsities = {name: float(state["sparsities"][name]) for name in self.params}
        self.generator.set_state(state["generator"])
        self._pending = {name: (int(step), float(fraction)) for name, (step, fraction) in state["pending"].items()}
        self._scores = {}
        self._ema = {name: distribute_like_param(ema, self.params[name]) for name, ema in state["ema"].items()}
        self.history = [dict(record) for record in state["history"]]
        self.nonfinite_steps = int(state["nonfinite_steps"])

    def set_masks(self, masks: Mapping[str, Tensor]) -> None:
        """Replace the masks (bool or 0/1 tensors by name) and zero the weights they make inactive.

        The active counts become those of the given masks and are kept from then on. Masks have the
        weight's full shape, also for sharded weights (each rank keeps its shard).
        """
        for name, p in self.params.items():
            if name not in masks or tuple(masks[name].shape) != tuple(p.shape):
                got = tuple(masks[name].shape) if name in masks else "no mask"
                raise ValueError(f"`masks[{name!r}]` must have the weight's shape {tuple(p.shape)}, got {got}.")
        # Updates keep each layer's active count: count once here, not after every update.
        self._counts = {name: int(masks[name].count_nonzero()) for name in self.params}
        # Masks are kept in the weight's dtype: multiplying by a float mask is several times faster on
        # CPU than by a bool one, and it is the operation run on every step.
        self._masks = {
            name: local(distribute_like_param(masks[name].to(local(p).device, p.dtype), p)).contiguous()
            for name, p in self.params.items()
        }
        for name, mask in self._masks.items():
            ever = self._ever_active.get(name)
            self._ever_active[name] = mask.bool() if ever is None else ever | mask.bool()
        self._clean.clear()  # optimizer state may be nonzero where the new masks are inactive
        self.apply_masks()

    def check_masks_agree_across_ranks(self) -> None:
        """Compare a fingerprint of every replicated mask across data-parallel ranks (one all-reduce).

        A no-op outside ``torch.distributed``. Sharded (FSDP2) masks are skipped: ranks hold different
        shards by design. Every rank must call it (it is a collective).

        Raises:
            RuntimeError: Naming the layers whose masks differ between ranks.
        """
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return
        names = [name for name, p in self.params.items() if not is_sharded(p)]
        if not names or torch.distributed.get_world_size() == 1:
            return
        prints = []
        for name in names:
            # Two sums over the active positions: equal masks give equal sums; a moved connection
            # changes at least one of them unless a swap is tuned to cancel both.
            index = self._masks[name].reshape(-1).nonzero().flatten()
            prints += [index.sum(), (index * 2654435761 % 4294967291).sum()]
        local_prints = torch.stack(prints)
        extremes = torch.cat([local_prints, -local_prints])
        torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX)
        differs = (extremes[: len(prints)] != -extremes[len(prints) :]).view(-1, 2).any(dim=1)
        if differs.any():
            bad = [name for name, flag in zip(names, differs.tolist(), strict=True) if flag]
            raise RuntimeError(
                f"RigL masks differ across ranks for {bad} (rank {torch.distributed.get_rank()}). Every rank must "
                "start from the same seed and see the same (all-reduced) gradients at update steps."
            )

    def _update(self, name: str, scores: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
        """Drop and grow in place with flat indices (no pass over the layer).

        Returns:
            The flat indices of the new connections, and those of the connections dropped for good.
        """
        mask = self._masks[name].view(-1)
        # The scores are ours (a fresh |grad|, |EMA| or random draw): overwrite them in place.
        dropped, grown = drop_grow_indices(mask, self.params[name], scores, fraction, overwrite_scores=True)
        new = grown[mask[grown] == 0]
        mask[dropped] = 0
        mask[grown] = 1
        self._ever_active[name].view(-1)[grown] = True
        return new, dropped[mask[dropped] == 0]

    def _update_sharded(self, name: str, scores: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
        """Gather one layer, decide on every rank alike, keep this rank's shard.

        Returns:
            The flat indices, within this rank's shard, of the new connections and of those dropped for good.
        """
        param = self.params[name]
        old = full_like_param(self._masks[name], param).bool()
        new, grown = drop_and_grow(old, full(param), full(scores), fraction, overwrite_scores=True)
        new, grown = local(distribute_like_param(new, param)), local(distribute_like_param(grown, param))
        gone = self._masks[name].bool() & ~new
        self._masks[name] = new.to(param.dtype).contiguous()
        self._ever_active[name] |= new
        return grown.reshape(-1).nonzero().flatten(), gone.reshape(-1).nonzero().flatten()

    def _settled(self, holdings: Mapping[torch.optim.Optimizer, tuple[str, ...]], names: list[str]) -> set[str]:
        """Names among ``names`` whose weights this step left at 0 by itself: no re-zeroing needed.

        ``holdings`` maps every optimizer of the run to the masked names it holds.
        """
        if not self._trust_optimizers:
            return set()
        trusted: dict[str, bool] = {}
        for optimizer, held in holdings.items():
            ok = keeps_zeros(optimizer) and self._clean.get(optimizer) == held
            for name in held:
                trusted[name] = trusted.get(name, True) and ok
        return {name for name in names if name in self._masked_grads and trusted.get(name, False)}

    def _zero_state_once(self, holdings: Mapping[torch.optim.Optimizer, tuple[str, ...]]) -> None:
        # State from before the masks (a dense checkpoint, Adagrad's initial sums) would move inactive
        # weights; zero it there once per optimizer and set of weights, after which drops keep it 0.
        for optimizer, held in holdings.items():
            if keeps_zeros(optimizer) and self._clean.get(optimizer) != held:
                for name in held:
                    reset_optimizer_state([optimizer], self.params[name], self._masks[name] == 0)
                self._clean[optimizer] = held

    def _verify_zeros(self, settled: set[str], optimizers: list[torch.optim.Optimizer]) -> set[str]:
        """Check that the weights left to the optimizer are 0 where inactive; stop trusting it if not."""
        leaked = [
            name for name in sorted(settled) if nonzero_where_inactive(local(self.params[name]), self._masks[name])
        ]
        if not leaked:
            return settled
        self._trust_optimizers = False
        kinds = sorted({type(optimizer).__name__ for optimizer in optimizers})
        warnings.warn(
            f"Inactive weights of {leaked} were nonzero after an optimizer step, although their gradients were "
            f"masked and their optimizer ({', '.join(kinds)}) keeps zeros at 0: something else writes to them or "
            "to their gradients after masking. Inactive weights are re-zeroed after every step from now on.",
            stacklevel=2,
        )
        return set()

    def _multiply_by_masks(self, tensors: list[Tensor], names: list[str]) -> None:
        # One fused call for all layers.
        if tensors:
            torch._foreach_mul_(tensors, [self._masks[name] for name in names])

    def _full_mask(self, name: str, masks: Mapping[str, Tensor]) -> Tensor:
        return full_like_param(masks[name], self.params[name]).bool()

    def _all_finite(self, names: Sequence[str]) -> bool:
        grads = [self.params[name].grad for name in names]
        # A NaN makes both extremes NaN, an inf one of them: one read of the gradient, where
        # isfinite().all() writes and reads a bool copy (20x slower here).
        extremes = [value for grad in grads if local(grad).numel() for value in torch.aminmax(local(grad))]
        return all_ranks_true(bool(torch.stack(extremes).isfinite().all()) if extremes else True, grads)

    def _update_ema(self, name: str) -> None:
        grad = self.params[name].grad
        ema = self._ema.setdefault(name, torch.zeros_like(grad))
        ema.mul_(self.ema_decay).add_(grad, alpha=1 - self.ema_decay)

    def _grow_scores(self, name: str) -> Tensor:
        signal = {"gradient": self.params[name].grad, "gradient_ema": self._ema.get(name), None: None}
        return self.criterion.score(self.params[name], signal[self.criterion.signal], self.generator)

    def _record(self, step: int, fraction: float, changed: int, active: int) -> None:
        if not self.history or self.history[-1]["step"] != step:
            self.history.append({"step": step, "drop_fraction": fraction, "changed": 0, "active": 0})
        self.history[-1]["changed"] += changed
        self.history[-1]["active"] += active
