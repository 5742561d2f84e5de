"""One layer's topology update: its grow scores read before the optimizer step, its drop and grow after it."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from lightning_rigl.core.candidates import GrowCandidates, grow_candidates, score_chunks
from lightning_rigl.core.distributed import all_ranks_sum
from lightning_rigl.core.masking import fill_positions
from lightning_rigl.core.masks import LayerMasks
from lightning_rigl.core.methods import Method
from lightning_rigl.core.optim_state import reset_optimizer_state
from lightning_rigl.core.sharding import gather_full, is_sharded, local_shard


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
        >>> from lightning_rigl.core.methods import get_method
        >>> w = nn.Parameter(torch.tensor([1.0, 0.0, -3.0, 0.0]))
        >>> masks = LayerMasks({"w": w})
        >>> masks.replace({"w": w != 0})
        >>> grad = torch.tensor([0.5, -2.0, 0.1, 0.3])
        >>> read_grow_scores(get_method("rigl"), masks, "w", grad, 0.5, torch.Generator()).index.tolist()
        [1]
    """
    # One layer at a time: a sharded layer's weight, signal and mask are gathered here and freed after.
    param = masks.params[name]
    weight, signal = gather_full(param), None if signal is None else gather_full(signal)
    scores = score_chunks(method.score, weight, signal, generator)
    mask = masks.whole(name) if is_sharded(param) else masks.local[name]
    return grow_candidates(mask, int(masks.counts[name] * fraction), scores, sample=not method.random_score)


def drop_and_grow_layer(
    masks: LayerMasks, name: str, candidates: GrowCandidates, optimizers: Iterable[torch.optim.Optimizer]
) -> int:
    """Drop and grow one layer from its grow candidates; returns the connections replaced, over all ranks.

    The paper's grow init: new connections start at 0 with fresh optimizer state; a weight dropped and
    regrown in the same update keeps its value and state. A dropped weight is zeroed and its state
    restarted, which nothing reads again: regrowing it restarts it anyway.
    """
    param: nn.Parameter = masks.params[name]
    grown, gone = masks.drop_and_grow(name, candidates)
    changed = torch.cat([grown, gone])
    fill_positions(local_shard(param), changed, 0.0)
    reset_optimizer_state(optimizers, param, changed)
    return all_ranks_sum(grown.numel(), [param])
