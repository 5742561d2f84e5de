"""ScheduledUpdates: a run's topology updates, from the step they are due to the drop and grow after it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from typing import Any

import torch

from lightning_rigl.core.history import UpdateRecord, record_update
from lightning_rigl.core.parallel.collectives import all_finite
from lightning_rigl.core.parallel.sharding import distribute_like_param, gather_full, local_shard
from lightning_rigl.core.storage.run_layers import CompactLayers
from lightning_rigl.core.topology.candidates import GrowCandidates
from lightning_rigl.core.topology.layer_update import read_grow_scores, update_layer
from lightning_rigl.core.topology.masks import LayerMasks
from lightning_rigl.core.topology.methods import Method
from lightning_rigl.core.topology.schedule import UpdateSchedule


class ScheduledUpdates:
    """Which layers are due for an update, their grow scores read before the step, and the updates made.

    :class:`~lightning_rigl.core.SparseTraining` owns one and drives it: :meth:`read` once the step's
    gradients are final, :meth:`make` after ``optimizer.step()``.

    Args:
        method: The run's method (what it reads, whether it updates at all).
        schedule: When and how much to update; ``None`` for no updates.
        masks: The run's masks; ``masks.params`` are the masked weights.
        generator: The run's generator (SET's random scores).
        compact: The run's compact layers, updated alike (their dense gradients read block by block).

    Example:
        >>> from torch import nn
        >>> from lightning_rigl.core.topology.methods import get_method
        >>> masks = LayerMasks({"w": nn.Parameter(torch.randn(4, 4))})
        >>> masks.replace({"w": torch.arange(16).reshape(4, 4) % 2 == 0})
        >>> schedule = UpdateSchedule(delta_t=2, t_end=10)
        >>> updates = ScheduledUpdates(get_method("rigl"), schedule, masks, torch.Generator())
        >>> updates.reads_dense_gradient(0), updates.reads_dense_gradient(1)  # RigL reads before step 2's update
        (False, True)

    """

    def __init__(
        self,
        method: Method,
        schedule: UpdateSchedule | None,
        masks: LayerMasks,
        generator: torch.Generator,
        compact: CompactLayers | None = None,
    ) -> None:
        self.method, self.schedule, self.masks, self.generator = method, schedule, masks, generator
        self.compact = compact if compact is not None else CompactLayers({})
        self.signal = method.signal()
        #: Layers whose update is scheduled and not made yet: name -> (scheduled step, drop fraction).
        self.due: dict[str, tuple[int, float]] = {}
        #: Due layers whose grow scores were read (before the step), reduced to what growth needs, until
        #: their update (after it): no buffer the size of the layer is held in between.
        self.candidates: dict[str, GrowCandidates] = {}
        self.history: list[UpdateRecord] = []
        self.nonfinite_steps = 0
        #: Updates that waited a step because a gradient held masked contributions (no dense gradient to grow from).
        self.deferred_steps = 0

    def reads_dense_gradient(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) reads the dense weight gradients (see ``SparseTraining``)."""
        reads = self.method.dense_gradient
        if reads != "update_steps":
            return reads == "every_step"
        return bool(self.due) or (self.schedule is not None and self.schedule.is_update_step(step + 1))

    def read(self, step: int, names: list[str], holds_partial: Callable[[str], bool]) -> None:
        """Before optimizer step ``step``: mark the layers due, and read the grow scores of those due among ``names``.

        Args:
            step: 0-based index of the optimizer step about to run.
            names: The masked layers this step updates that have a gradient (final, not masked yet), compact
                ones included.
            holds_partial: Whether a layer's gradient holds masked contributions: its update waits a step.

        """
        params, compact = self.masks.params, self.compact
        if self.method.updates and self.schedule is not None and self.schedule.is_update_step(step + 1):
            # A frozen layer has no gradient to grow from: no update waits on it, nor a dense gradient for it.
            trainable = [name for name, p in params.items() if p.requires_grad]
            trainable += [name for name in compact if compact.values(name).requires_grad]
            self.due.update(dict.fromkeys(trainable, (step + 1, self.schedule.drop_fraction(step + 1))))
        due = [name for name in names if name in self.due]
        reads = self.method.dense_gradient != "never"
        # A compact layer's dense gradient is read from the backward passes it kept: none kept is as partial.
        partial = [
            name
            for name in due
            if reads and (not compact.kept_backward(name) if name in compact.layers else holds_partial(name))
        ]
        if partial:
            # A gradient with masked contributions (accumulated for an earlier step that did not read it) is no
            # dense gradient: these layers stay due and read the next step's, which is dense throughout.
            due = [name for name in due if name not in partial]
            self.deferred_steps += 1
        observed = names if self.method.dense_gradient == "every_step" else due
        if not observed:
            return  # an ordinary step spares the grad mode switch (about 10 us)
        with torch.no_grad():
            finite = all_finite([self._grad(name) for name in observed])
            if finite and self.method.dense_gradient == "every_step":
                for name in names:
                    self.signal.observe(name, params[name].grad)
            for name in due:
                self.candidates.pop(name, None)
                if finite and name in compact.layers:
                    self.candidates[name] = compact.grow_candidates(
                        name, self.method, self.due[name][1], self.generator
                    )
                elif finite:
                    signal, fraction = self.signal.read(name, params[name].grad), self.due[name][1]
                    self.candidates[name] = read_grow_scores(
                        self.method, self.masks, name, signal, fraction, self.generator
                    )
            if due and not finite:
                # No update from this step; the layers stay due and retry at their next finite step.
                self.nonfinite_steps += 1

    def make(
        self,
        optimizers: Iterable[torch.optim.Optimizer],
        names: Iterable[str] | None,
        masks_changed: Callable[[list[str]], None],
    ) -> list[str]:
        """Drop and grow every layer among ``names`` (default: all) whose grow scores were read; returns their names.

        ``masks_changed`` hears each layer's change before the next is made.
        """
        if not self.candidates:
            return []  # an ordinary step: no update, and no autograd mode to switch
        optimizers = list(optimizers)
        updated = []
        with torch.no_grad():
            for name in [*self.masks.params, *self.compact] if names is None else names:
                candidates = self.candidates.pop(name, None)
                if candidates is None:
                    continue
                step, fraction = self.due.pop(name)
                if name in self.compact.layers:
                    changed, count = self.compact.update(name, candidates, optimizers), self.compact.counts[name]
                else:
                    changed, count = update_layer(self.masks, name, candidates, optimizers), self.masks.counts[name]
                    masks_changed([name])
                record_update(self.history, step, fraction, changed, count)
                updated.append(name)
        return updated

    def state_dict(self) -> dict[str, Any]:
        """The due updates, their grow candidates, the method's signal and the record: tensors and primitives."""
        return {
            "due_updates": {name: [step, fraction] for name, (step, fraction) in self.due.items()},
            "grow_candidates": {name: found.to("cpu").as_dict() for name, found in self.candidates.items()},
            "signal": {name: gather_full(tensor).detach().cpu() for name, tensor in self.signal.tensors.items()},
            "history": [asdict(record) for record in self.history],
            "nonfinite_steps": self.nonfinite_steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s entries of a saved state (of the current version)."""
        params = self.masks.params
        self.due = {name: (int(step), float(fraction)) for name, (step, fraction) in state["due_updates"].items()}
        self.candidates = {
            name: GrowCandidates.from_dict(saved).to(local_shard(self._weight(name)).device)
            for name, saved in state["grow_candidates"].items()
        }
        self.signal.tensors = {
            name: distribute_like_param(tensor.to(local_shard(params[name]).device), params[name])
            for name, tensor in state["signal"].items()
        }
        self.history = [UpdateRecord(**record) for record in state["history"]]
        self.nonfinite_steps = int(state["nonfinite_steps"])

    def _weight(self, name: str) -> torch.Tensor:
        return self.compact.values(name) if name in self.compact.layers else self.masks.params[name]

    def _grad(self, name: str) -> torch.Tensor | None:
        return self._weight(name).grad
