"""Optimizer state at changed connections, for any torch optimizer."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from lightning_rigl.core.parallel.sharding import local_shard
from lightning_rigl.core.topology.masking import fill_positions


@torch.no_grad()
def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside a wrapper that forwards to it (Lightning Fabric's), else ``optimizer`` itself.

    A wrapper's class is not the torch class whose state RigL knows how to restart.

    Example:
        >>> sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> unwrap_optimizer(sgd) is sgd
        True
    """
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer else optimizer


def reset_optimizer_state(optimizers: Iterable[torch.optim.Optimizer], param: Tensor, positions: Tensor) -> int:
    """Restart, at ``positions``, every state tensor of ``param``'s shape at the value a fresh parameter gets.

    The fresh value is the one the optimizer's own lazy initialisation gives a new parameter in the
    same param group (see :func:`fresh_state`): 0 for SGD's ``momentum_buffer`` and Adam's
    ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``, ``lr`` for Rprop's ``step_size``,
    ``initial_accumulator_value`` for Adagrad's ``sum``. Scalars (such as Adam's ``step``) and
    factored states of another shape are left alone.

    Args:
        optimizers: Optimizers to search.
        param: The parameter whose state to reset.
        positions: Bool tensor of ``param``'s shape, True where to reset (for a sharded ``param``,
            this rank's shard of it), or a 1-D tensor of flat indices into ``param``.

    Returns:
        The number of state tensors touched.

    Raises:
        ValueError: An optimizer whose fresh state for one of ``param``'s state tensors cannot be
            known (named with the state key).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = torch.optim.Rprop([w], lr=0.25, etas=(0.5, 2.0))
        >>> w.grad = torch.ones(3); opt.step(); opt.step()  # the same sign twice: step sizes double
        >>> reset_optimizer_state([opt], w, torch.tensor([True, False, False]))
        2
        >>> opt.state[w]["step_size"].tolist(), opt.state[w]["prev"].tolist()
        ([0.25, 0.5, 0.5], [0.0, 1.0, 1.0])

    """
    touched = 0
    for optimizer in optimizers:
        for value, fresh in _restart_values(optimizer, param):
            fill_positions(local_shard(value), positions, fresh)
            touched += 1
    return touched


def check_restartable(optimizers: Iterable[torch.optim.Optimizer], params: Iterable[Tensor]) -> None:
    """Raise unless every optimizer holding one of ``params`` can restart their state for a regrown connection.

    Run it before training (it probes each optimizer type once) and again after the first optimizer
    step (per-element state exists then, and each of its keys must have a known fresh value).

    Raises:
        ValueError: Naming the optimizer type (and the state key) whose fresh state cannot be known.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> check_restartable([torch.optim.Adam([w])], [w])
    """
    params = list(params)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for param in group["params"]:
                if any(param is p for p in params):
                    fresh_state(optimizer, param)
                    list(_restart_values(optimizer, param))


def _restart_values(optimizer: torch.optim.Optimizer, param: Tensor) -> Iterator[tuple[Tensor, float]]:
    """Each per-element state tensor of ``param`` with the value a fresh parameter starts it at."""
    per_element = {
        key: value
        for key, value in optimizer.state.get(param, {}).items()
        if isinstance(value, Tensor) and value.shape == param.shape
    }
    if not per_element:
        return
    fresh = fresh_state(optimizer, param)
    for key, value in per_element.items():
        if key not in fresh:
            raise ValueError(
                f"Cannot restart {type(optimizer).__name__}'s state {key!r} for a regrown connection: a fresh "
                f"parameter gets no per-element {key!r} from its first step (it has {sorted(fresh)}), so its "
                "starting value is unknown. Use a torch.optim optimizer, or one that creates its per-element "
                "state in `optimizer.state[param]` at the first step."
            )
        yield value, fresh[key]


def fresh_state(optimizer: torch.optim.Optimizer, param: Tensor) -> dict[str, float]:
    """Per-element state key to the value ``optimizer`` gives a fresh parameter like ``param``.

    A one-element probe parameter at 0 (as a grown connection) of ``param``'s dtype and device goes
    into a new optimizer of the same type, with the hyperparameters of ``param``'s param group and
    the optimizer's ``defaults``, and takes one step with a zero gradient. The value first stored
    under each state key during that step is the lazy initialisation, before any update changes it
    (Adamax's ``exp_inf`` becomes ``eps`` after its first update, from 0). Results are cached per
    optimizer type, hyperparameters, dtype and device.

    Raises:
        ValueError: ``param`` is in none of the optimizer's param groups, or no probe of the
            optimizer's type can be built and stepped that way.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2, 2))
        >>> fresh_state(torch.optim.Adagrad([w], initial_accumulator_value=0.5), w)
        {'sum': 0.5}
        >>> fresh_state(torch.optim.Adam([w], amsgrad=True), w)
        {'exp_avg': 0.0, 'exp_avg_sq': 0.0, 'max_exp_avg_sq': 0.0}

    """
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
    if group is None:
        raise ValueError(
            f"The parameter of shape {tuple(param.shape)} is in no param group of its {type(optimizer).__name__}."
        )
    hyper = {key: value for key, value in group.items() if key != "params"}
    like = local_shard(param)
    try:
        cache_key = (type(optimizer), _frozen(hyper), _frozen(optimizer.defaults), like.dtype, like.device)
        cached = _FRESH_STATE.get(cache_key)
    except TypeError:  # an unhashable hyperparameter: no caching
        return _probe_fresh_state(optimizer, hyper, like)
    if cached is None:
        if len(_FRESH_STATE) >= _FRESH_STATE_SIZE:
            _FRESH_STATE.clear()  # a learning-rate schedule makes a new key at every update
        cached = _FRESH_STATE[cache_key] = _probe_fresh_state(optimizer, hyper, like)
    return dict(cached)


_FRESH_STATE: dict[Hashable, dict[str, float]] = {}
_FRESH_STATE_SIZE = 256


class _FirstValues(dict):
    """An optimizer's per-parameter state dict that also keeps a copy of the first value stored under each key."""

    def __init__(self) -> None:
        super().__init__()
        self.first: dict[str, Any] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self.first:
            # Copied now: the optimizer updates its state tensors in place after initialising them.
            self.first[key] = value.clone() if isinstance(value, Tensor) else value
        super().__setitem__(key, value)


def _probe_fresh_state(optimizer: torch.optim.Optimizer, hyper: dict[str, Any], like: Tensor) -> dict[str, float]:
    kind = type(optimizer).__name__
    probe = torch.nn.Parameter(torch.zeros(1, dtype=like.dtype, device=like.device))
    try:
        # The group's hyperparameters travel in the group itself: constructor keywords may be named
        # differently from `defaults` (AdamW's `defaults` hold `decoupled_weight_decay`, no argument of it).
        clone = type(optimizer)([{**hyper, "params": [probe]}])
    except Exception as error:
        raise ValueError(
            f"Cannot know the state {kind} gives a fresh parameter, needed to restart regrown connections: "
            f"`{kind}([param_group])` fails for a probe parameter ({type(error).__name__}: {error})."
        ) from error
    # Some state is initialised from `defaults` rather than the group (Adagrad's initial_accumulator_value);
    # state made eagerly in __init__ is dropped so that the step's lazy initialisation is what is seen.
    clone.defaults = dict(optimizer.defaults)
    clone.state = defaultdict(_FirstValues)
    probe.grad = torch.zeros_like(probe)
    try:
        clone.step()
    except Exception as error:
        raise ValueError(
            f"Cannot know the state {kind} gives a fresh parameter, needed to restart regrown connections: "
            f"a step on a probe parameter fails ({type(error).__name__}: {error})."
        ) from error
    first = getattr(clone.state.get(probe), "first", {})
    return {
        key: value.item() for key, value in first.items() if isinstance(value, Tensor) and value.shape == probe.shape
    }


def _frozen(value: Any) -> Hashable:
    """A hashable stand-in for a hyperparameter value (tensors by dtype, device and values)."""
    if isinstance(value, Tensor):
        return ("tensor", value.dtype, value.device, tuple(value.detach().reshape(-1).tolist()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((key, _frozen(item)) for key, item in value.items()))
    return value
