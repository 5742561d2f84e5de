"""Turning a Linear-type layer into a compact one (from a dense weight and a mask, or from positions) and back."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_rigl.core.kernels.served_layers import can_serve, weight_in_out
from lightning_rigl.core.storage.init import ValueInit, default_init
from lightning_rigl.core.storage.layer import VALUES, CompactLayer, compact_class, is_compact
from lightning_rigl.core.storage.structure import CompactStructure


def make_compact(
    module: nn.Module,
    mask: Tensor | None = None,
    *,
    positions: Tensor | None = None,
    init: ValueInit | None = None,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> CompactLayer:
    """Make ``module`` a compact layer in place, active where ``mask`` is (or at ``positions``); returns it.

    A materialized weight gives the active values (the dense Parameter then goes). A weight on the meta
    device has none: the values (and a meta bias) are drawn on ``device`` by ``init``, or as the Linear
    class initialises its weights (see :func:`~lightning_rigl.core.storage.init.default_init`), and
    nothing of the layer's dense size is ever allocated when ``positions`` are given.

    Args:
        module: An ``nn.Linear``, a Hugging Face ``Conv1D`` or a registered Linear class running its own
            forward (see :func:`~lightning_rigl.core.kernels.can_serve`).
        mask: Bool (or 0/1) mask of the stored weight's shape, True where active.
        positions: Instead of ``mask``: the flat positions of the active weights in the stored weight
            (any order, distinct), as :func:`~lightning_rigl.core.storage.draw.draw_positions` gives them.
        init: ``init(values, (out, in))`` fills the active values in place (a weight on the meta device only).
        device: Where the values of a meta weight are made; the CPU by default.
        generator: For the default initialisation of a meta weight.

    Raises:
        ValueError: A module that cannot be compact, both or neither of ``mask`` and ``positions``, a
            mask of another shape, positions out of range, or ``init`` given for a materialized weight.

    Example:
        >>> layer = nn.Linear(3, 2)
        >>> mask = torch.tensor([[True, False, True], [False, True, False]])
        >>> dense = layer.weight.detach() * mask
        >>> compact = make_compact(layer, mask)
        >>> compact is layer, isinstance(layer, nn.Linear), layer.weight_values.shape, torch.equal(layer.weight, dense)
        (True, True, torch.Size([3]), True)
    """
    if is_compact(module):
        raise ValueError(f"The {type(module).__name__} is compact already.")
    if not can_serve(module):
        raise ValueError(
            f"Only a Linear-type layer running its class's own forward can be compact (nn.Linear, Hugging Face "
            f"Conv1D, a class given to `register_linear`), with a 2-D weight; got a {type(module).__name__}."
        )
    if (mask is None) == (positions is None):
        raise ValueError("Give exactly one of `mask` and `positions`.")
    weight: Tensor = module.weight
    stored_shape = (int(weight.shape[0]), int(weight.shape[1]))
    in_out = bool(weight_in_out(module))
    logical = (stored_shape[1], stored_shape[0]) if in_out else stored_shape
    if mask is not None:
        if tuple(mask.shape) != stored_shape:
            raise ValueError(f"`mask` must have the weight's shape {stored_shape}, got {tuple(mask.shape)}.")
        positions = mask.detach().reshape(-1).nonzero().flatten()
    assert positions is not None
    rows, cols = logical_coordinates(positions, stored_shape, in_out)
    if not in_out and positions.numel() > 1 and bool((positions.diff() > 0).all()):
        structure = CompactStructure.from_sorted(rows, cols, logical)  # ascending (out, in) positions: CSR order
    else:
        structure, _ = CompactStructure.from_coordinates(rows, cols, logical)
    del rows, cols
    on_meta = weight.device.type == "meta"
    if not on_meta and init is not None:
        raise ValueError("`init` is for a weight on the meta device; this one holds values already.")
    if on_meta:
        target = torch.device(device) if device is not None else torch.device("cpu")
        structure = structure.to(target)
        values = torch.empty(structure.nnz, dtype=weight.dtype, device=target)
        bias, made_bias = module.bias, None
        if isinstance(bias, Tensor) and bias.device.type == "meta":
            made_bias = nn.Parameter(torch.empty_like(bias, device=target), requires_grad=bias.requires_grad)
            module.bias = made_bias
        if init is not None:
            with torch.no_grad():
                init(values, logical)
        default_init(module, None if init is not None else values, made_bias, fan_in=logical[1], generator=generator)
    else:
        structure = structure.to(weight.device)
        values = structure.gather(weight, in_out)
    _swap_in(module, nn.Parameter(values, requires_grad=weight.requires_grad), structure, stored_shape, in_out)
    return module  # type: ignore[return-value]


def logical_coordinates(positions: Tensor, stored_shape: tuple[int, int], in_out: bool) -> tuple[Tensor, Tensor]:
    """Logical (row, column) of flat positions in a weight stored ``stored_shape``, (in, out) if ``in_out``.

    Raises:
        ValueError: A position outside the weight.

    Example:
        >>> rows, cols = logical_coordinates(torch.tensor([1, 4]), (2, 3), in_out=True)
        >>> rows.tolist(), cols.tolist()
        ([1, 1], [0, 1])
    """
    numel = stored_shape[0] * stored_shape[1]
    positions = positions.long()
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= numel):
        raise ValueError(f"`positions` must lie in [0, {numel}), the stored weight's flat positions.")
    stored_row = torch.div(positions, stored_shape[1], rounding_mode="floor")
    stored_col = positions - stored_row * stored_shape[1]
    return (stored_col, stored_row) if in_out else (stored_row, stored_col)


def _swap_in(
    module: nn.Module, values: nn.Parameter, structure: CompactStructure, stored_shape: tuple[int, int], in_out: bool
) -> None:
    """Give ``module`` its compact class, with ``weight_values`` where ``weight`` was among its Parameters."""
    params = module._parameters
    module.__dict__["_parameters"] = {
        (VALUES if name == "weight" else name): (values if name == "weight" else param)
        for name, param in params.items()
    }
    module.__class__ = compact_class(type(module))
    module.compact_structure = structure
    module.stored_shape = stored_shape
    module.weight_in_out = in_out
    module.capture = None


def densify(module: CompactLayer) -> nn.Module:
    """Give a compact layer back its class and a dense ``weight`` Parameter (zero where inactive); returns it.

    Example:
        >>> layer = make_compact(nn.Linear(2, 2), torch.eye(2, dtype=torch.bool))
        >>> type(densify(layer)) is nn.Linear, int(layer.weight.count_nonzero())
        (True, 2)
    """
    if not is_compact(module):
        raise ValueError(f"Expected a compact layer, got a {type(module).__name__}.")
    values = module.weight_values
    weight = nn.Parameter(module.weight.detach(), requires_grad=values.requires_grad)
    params = module._parameters
    base = type(module)._compact_base  # type: ignore[attr-defined]
    for name in ("compact_structure", "stored_shape", "weight_in_out", "capture"):
        module.__dict__.pop(name, None)
    module.__class__ = base
    module.__dict__["_parameters"] = {
        ("weight" if name == VALUES else name): (weight if name == VALUES else param) for name, param in params.items()
    }
    return module


@torch.no_grad()
def restructure(module: CompactLayer, mask: Tensor, dense: Tensor | None = None) -> None:
    """Move a compact layer's active weights to ``mask`` (as many as it has), their values read from ``dense``.

    For a run that resumes a dense run's masks: ``dense`` is the dense weight loaded (by default the
    layer's own ``weight``). The values Parameter stays the same object, with its optimizer.

    Raises:
        ValueError: A mask of another shape or another active count.

    Example:
        >>> layer = make_compact(nn.Linear(2, 2), torch.eye(2, dtype=torch.bool))
        >>> restructure(layer, torch.tensor([[False, True], [True, False]]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        >>> layer.weight.tolist()
        [[0.0, 2.0], [3.0, 0.0]]
    """
    if tuple(mask.shape) != tuple(module.stored_shape) or int(mask.count_nonzero()) != module.nnz:
        raise ValueError(
            f"The mask must have the layer's stored shape {tuple(module.stored_shape)} and its {module.nnz} active "
            f"weights, got shape {tuple(mask.shape)} with {int(mask.count_nonzero())}."
        )
    dense = module.weight if dense is None else dense
    in_out, logical = module.weight_in_out, module.compact_structure.shape
    rows, cols = logical_coordinates(mask.reshape(-1).nonzero().flatten().cpu(), module.stored_shape, in_out)
    structure, _ = CompactStructure.from_coordinates(rows, cols, logical)
    values = structure.gather(dense, in_out)
    module.compact_structure = structure.to(module.weight_values.device)
    module.weight_values.copy_(values)
