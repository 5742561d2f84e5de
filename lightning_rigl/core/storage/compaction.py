"""A run's initial masks drawn with its selected layers made compact: which layers can be, and the draw.

The draw is the dense run's: one generator, the layers in order, each its exact active count, the same
positions as :func:`~lightning_rigl.core.topology.random_masks` for every layer (compact or not), so a
run with compact layers starts from the masks a dense run of the same seed starts from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_rigl.core.kernels.served_layers import can_serve
from lightning_rigl.core.parallel.sharding import is_sharded
from lightning_rigl.core.storage.construct import make_compact
from lightning_rigl.core.storage.draw import draw_positions
from lightning_rigl.core.storage.layer import CompactLayer, is_compact
from lightning_rigl.core.topology.initial_masks import num_active, random_mask

#: Optimizers whose update of each value reads that value's gradient and state only: they train the active
#: values of a compact layer as they would train the masked dense weight.
ELEMENTWISE_OPTIMIZERS = tuple(
    getattr(torch.optim, name)
    for name in ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "ASGD", "Rprop")
    if hasattr(torch.optim, name)
)


@dataclass
class DrawnMasks:
    """The initial masks of a run whose ``compact`` layers were made compact at the draw.

    Attributes:
        compact: Weight name to compact layer.
        dense: Weight name to the bool mask of each selected weight kept dense.
        generator_state: The run's generator after the draw (SET's draws go on from it).
    """

    compact: dict[str, CompactLayer]
    dense: dict[str, Tensor]
    generator_state: Tensor


def why_not_compact(model: nn.Module, name: str, param: nn.Parameter) -> str | None:
    """Why the masked weight ``name`` of ``model`` cannot be stored compact, or None if it can.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.Conv1d(3, 3, 1))
        >>> why_not_compact(model, "0.weight", model[0].weight), why_not_compact(model, "1.weight", model[1].weight)
        (None, 'not a Linear-type layer (Conv1d)')
    """
    prefix, _, attr = name.rpartition(".")
    module = model.get_submodule(prefix) if prefix else model
    if is_compact(module):
        return None
    if attr != "weight" or not can_serve(module):
        return f"not a Linear-type layer ({type(module).__name__})"
    if is_sharded(param):
        return "sharded (FSDP2)"
    if param.device.type != "meta" and param.dtype not in (torch.float32, torch.float64):
        return f"of dtype {param.dtype} (the sparse kernels take float32 and float64)"
    # One module under several names is one layer (made compact once); a weight tied to another module is not.
    shared = [
        other
        for other, p in model.named_parameters(remove_duplicate=False)
        if p is param and model.get_submodule(other.rpartition(".")[0]) is not module
    ]
    if shared:
        return f"shared with {shared}"
    return None


def draw_compact(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    sparsities: Mapping[str, float],
    compact: list[str],
    seed: int,
) -> DrawnMasks:
    """Draw the initial masks of ``params`` in order, and make the layers of the weights ``compact`` compact.

    Args:
        model: The module holding ``params``.
        params: The masked weights, by name, in the run's order.
        sparsities: Name to sparsity.
        compact: The names whose layers become compact (see :func:`why_not_compact`).
        seed: The run's seed.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> params = dict(model.named_parameters())
        >>> drawn = draw_compact(model, {"0.weight": params["0.weight"], "1.weight": params["1.weight"]},
        ...                      {"0.weight": 0.5, "1.weight": 0.5}, ["0.weight"], seed=0)
        >>> model[0].nnz, int(drawn.dense["1.weight"].sum())
        (8, 4)
    """
    generator = torch.Generator().manual_seed(seed)
    layers: dict[str, CompactLayer] = {}
    dense: dict[str, Tensor] = {}
    for name, param in params.items():
        shape = tuple(param.shape)
        n_active = num_active(math.prod(shape), sparsities[name])
        if name not in compact:
            dense[name] = random_mask(shape, n_active, generator)
            continue
        prefix = name.rpartition(".")[0]
        module = model.get_submodule(prefix) if prefix else model
        positions = draw_positions(math.prod(shape), n_active, generator)
        layers[name] = make_compact(module, positions=positions)
    return DrawnMasks(layers, dense, generator.get_state())


def make_layers_compact(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    sparsities: Mapping[str, float],
    include: Iterable[str] | None,
    seed: int,
    warn: Callable[[str], object],
    owner: str,
) -> tuple[DrawnMasks, list[str]]:
    """Draw the masks of ``params``, make every layer compact storage can serve compact, initialise meta modules.

    What RigLCallback's ``setup`` and ``SparseTraining.from_model(..., storage="compact")`` do alike, before
    the optimizer is built. The layers it cannot serve stay dense, listed in one call of ``warn``.

    Args:
        model: The module holding ``params``.
        params: The selected weights, by name, in the run's order.
        sparsities: Name to sparsity, for every one of ``params``.
        include: The user's ``include`` patterns: a layer named there that cannot be served is an error.
        seed: The run's seed.
        warn: Called with the message listing the layers kept dense, if any.
        owner: Who asked, as the messages name it (``"RigLCallback(storage='compact')"``).

    Returns:
        The draw, and the names of the weights kept dense (in ``params``' order).

    Raises:
        ValueError: No layer it can serve, or one named in ``include`` that it cannot serve.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 1))
        >>> params = {name: p for name, p in model.named_parameters() if name.endswith("weight")}
        >>> drawn, dense = make_layers_compact(model, params, dict.fromkeys(params, 0.5), None, 0, print, "me")
        me keeps these masked layers stored densely: 1.weight: not a Linear-type layer (Conv1d).
        >>> list(drawn.compact), dense
        (['0.weight'], ['1.weight'])
    """
    refused = {name: why for name, p in params.items() if (why := why_not_compact(model, name, p)) is not None}
    named = [name for name in refused if name in (include or [])]
    if named:
        raise ValueError(
            f"{owner} cannot serve the layers named in `include`: "
            f"{', '.join(f'{name} ({refused[name]})' for name in named)}. Leave them out of `include`, or use "
            "storage='dense'."
        )
    if len(refused) == len(params):
        reasons = "; ".join(f"{name!r} ({why})" for name, why in refused.items())
        raise ValueError(
            f"{owner} can serve none of the masked layers: {reasons}. It serves nn.Linear, Hugging Face Conv1D and "
            "classes given to `register_linear`, in float32 or float64, not shared, not sharded. Use storage='dense'."
        )
    if refused:
        warn(f"{owner} keeps these masked layers stored densely: {'; '.join(f'{n}: {w}' for n, w in refused.items())}.")
    drawn = draw_compact(model, params, sparsities, [name for name in params if name not in refused], seed)
    materialize_meta(model)  # a model built on the meta device: the rest of it, initialised
    return drawn, [name for name in params if name in refused]


def check_elementwise_optimizers(optimizers: Iterable[torch.optim.Optimizer], values: Iterable[Tensor]) -> None:
    """Raise a ValueError naming each optimizer of compact layers' ``values`` that is not elementwise.

    An optimizer that reads a weight as a matrix (LBFGS's line search, Adafactor's factored moments, Muon's
    orthogonalization) would train a compact layer's list of values differently from the masked dense weight.

    Example:
        >>> w = nn.Parameter(torch.ones(3))
        >>> check_elementwise_optimizers([torch.optim.Adam([w])], [w])  # elementwise: no error
    """
    ids = {id(value) for value in values}
    refused = sorted(
        {
            type(optimizer).__name__
            for optimizer in optimizers
            if not isinstance(optimizer, ELEMENTWISE_OPTIMIZERS)
            and any(id(p) in ids for group in optimizer.param_groups for p in group["params"])
        }
    )
    if refused:
        allowed = ", ".join(cls.__name__ for cls in ELEMENTWISE_OPTIMIZERS)
        raise ValueError(
            f"`storage='compact'` trains compact layers with elementwise optimizers only ({allowed}); got {refused}. "
            "Use one of those, or storage='dense'."
        )


def materialize_meta(model: nn.Module, device: torch.device | str = "cpu") -> list[str]:
    """Initialise every module still holding a tensor on the meta device (``to_empty``, ``reset_parameters``).

    Returns their names. For a model built on the meta device whose compact layers drew their active values
    already: nothing of their dense size is made here.

    Raises:
        ValueError: A module on the meta device without ``reset_parameters``, named: its initialisation is unknown.

    Example:
        >>> with torch.device("meta"):
        ...     model = nn.Sequential(nn.LayerNorm(3))
        >>> materialize_meta(model), model[0].weight.device.type
        (['0'], 'cpu')
    """
    done, unknown = [], []
    for name, module in model.named_modules():
        own = [*module._parameters.values(), *module._buffers.values()]
        if not any(t is not None and t.device.type == "meta" for t in own):
            continue
        if not callable(getattr(module, "reset_parameters", None)):
            unknown.append(name)
            continue
        module.to_empty(device=device, recurse=False)
        module.reset_parameters()
        done.append(name)
    if unknown:
        raise ValueError(
            f"These modules are on the meta device and have no `reset_parameters` to initialise them: {unknown}. "
            "Build them on a real device, or initialise them (to_empty and your init) before fit."
        )
    return done
