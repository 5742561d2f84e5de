"""One layer's topology update: its grow scores read before the optimizer step, its drop and grow after it."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from lightning_rigl.core.parallel.collectives import all_ranks_sum
from lightning_rigl.core.parallel.sharding import gather_full, is_sharded, local_shard
from lightning_rigl.core.topology.candidates import GrowCandidates, grow_candidates, score_chunks
from lightning_rigl.core.topology.masking import fill_positions
from lightning_rigl.core.topology.masks import LayerMasks
from lightning_rigl.core.topology.methods import Method
from lightning_rigl.core.topology.optim_state import reset_optimizer_state


def read_grow_scores(
    method: Method,
    masks: LayerMasks,
    name: str,
    signal: Tensor | None,
    fraction: float,
    generator: torch.Generator,
) -> GrowCandidates:
    """Reduce a layer's grow scores to what its update needs, before the optimizer step (see ``grow_candidates``).

    Args:
        method: The run's method: its score and whether the scores are random draws (never sampled).
        masks: The run's masks; ``masks.params[name]`` is the layer's weight.
        name: The layer.
        signal: What the method's score reads besides the weight (the dense gradient), or None.
        fraction: The drop fraction of this update: ``int(active * fraction)`` connections are replaced.
        generator: The run's generator (SET's random scores).

    Example:
        >>> from lightning_rigl.core.topology.methods import get_method
        >>> w = nn.Parameter(torch.tensor([1.0, 0.0, -3.0, 0.0]))
        >>> masks = LayerMasks({"w": w})
        >>> masks.replace({"w": w != 0})
        >>> grad = torch.tensor([0.5, -2.0, 0.1, 0.3])
        >>> read_grow_scores(get_method("rigl"), masks, "w", grad, 0.5, torch.Generator()).index.tolist()
        [1]
    """
    param, k = masks.params[name], int(masks.counts[name] * fraction)
    if is_full(masks, name) and not method.random_score:
        # Nothing inactive to grow: the update is a no-op (see update_layer). Random scores are
        # drawn all the same, so that the generator's stream, and the later layers' draws, stay as they were.
        empty = torch.empty(0, device=local_shard(param).device)
        return GrowCandidates(k, empty, empty.int(), empty, empty.int())
    # One layer at a time: a sharded layer's weight, signal and mask are gathered here and freed after.
    weight, signal = gather_full(param), None if signal is None else gather_full(signal)
    scores = score_chunks(method.score, weight, signal, generator)
    mask = masks.whole(name) if is_sharded(param) else masks.local[name]
    return grow_candidates(mask, k, scores, sample=not method.random_score)


def update_layer(
    masks: LayerMasks, name: str, candidates: GrowCandidates, optimizers: Iterable[torch.optim.Optimizer]
) -> int:
    """Drop and grow one layer from its grow candidates; returns the connections replaced, over all ranks.

    The paper's grow init: new connections start at 0 with fresh optimizer state; a weight dropped and
    regrown in the same update keeps its value and state. A dropped weight is zeroed and its state
    restarted, which nothing reads again: regrowing it restarts it anyway.

    A layer with every position active (ERK often leaves small layers dense) is left as it is: its
    ``k`` dropped weights would be the ``k`` regrown, with their values and state.
    """
    if is_full(masks, name):
        return 0  # the same on every rank: the counts are the whole layer's
    param: nn.Parameter = masks.params[name]
    grown, gone = masks.update(name, candidates)
    changed = torch.cat([grown, gone])
    fill_positions(local_shard(param), changed, 0.0)
    reset_optimizer_state(optimizers, param, changed)
    return all_ranks_sum(grown.numel(), [param])


def is_full(masks: LayerMasks, name: str) -> bool:
    """Whether every position of layer ``name`` is active (its sparsity is 0): no update can change it."""
    return masks.counts[name] == masks.params[name].numel()
