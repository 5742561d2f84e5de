"""Which layers the sparse kernels can serve: Linear-type layers that run their kind's own forward.

A layer served by :class:`~lightning_rigl.core.kernels.sparse_kernels.SparseKernels` gets a forward of
the :class:`ServedForward` kind on the instance; that still counts as the class's own forward here.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_rigl.core.sparsity.linear_types import linear_kind


class ServedForward:
    """Base of the forwards the sparse kernels set on a layer they serve (:func:`can_serve` still takes it)."""


def weight_in_out(module: nn.Module) -> bool | None:
    """How a served module stores its weight; ``None`` for a module the sparse kernels do not serve.

    ``False``: as (out, in), like ``nn.Linear``. ``True``: as (in, out), like Hugging Face ``Conv1D``.
    Linear classes other than ``nn.Linear`` are matched by name (see
    :func:`~lightning_rigl.core.sparsity.linear_types.register_linear`): the core imports no other library.

    Example:
        >>> weight_in_out(nn.Linear(2, 3)), weight_in_out(nn.Conv1d(2, 3, 1))
        (False, None)

    """
    kind = linear_kind(module)
    if kind is None or not isinstance(getattr(module, "weight", None), Tensor):
        return None
    return kind[1]


def can_serve(module: nn.Module) -> bool:
    """Whether sparse kernels can compute ``module``'s forward: a Linear-type layer with its kind's own forward.

    That is an ``nn.Linear``, a Hugging Face ``Conv1D`` or a class given to
    :func:`~lightning_rigl.core.sparsity.linear_types.register_linear` that runs that class's forward, with a
    materialized 2-D weight and a bias that is a 1-D tensor or None. A subclass with a forward of its
    own may compute more than ``x W^T + b`` (a scale, an adapter), and a forward set on the instance
    (another library's wrapper) does something around it: a sparse product would skip both, so such
    layers keep their dense forward.

    Example:
        >>> class Scaled(nn.Linear):
        ...     def forward(self, x):
        ...         return 2 * super().forward(x)
        >>> can_serve(nn.Linear(2, 3)), can_serve(Scaled(2, 3)), can_serve(nn.Conv1d(2, 3, 1))
        (True, False, False)

    """
    kind = linear_kind(module)
    if kind is None or not _linear_parameters(module):
        return False
    own = vars(module).get("forward")
    if own is not None and not isinstance(own, ServedForward):
        return False
    # The class whose forward runs must be the kind's: nn.Linear, or the registered class linear_kind matched.
    return next(cls for cls in type(module).__mro__ if "forward" in vars(cls)) is kind[0]


def _linear_parameters(module: nn.Module) -> bool:
    """A materialized 2-D ``weight`` and a ``bias`` of one dimension or None: what the sparse op takes."""
    if isinstance(getattr(type(module), "weight", None), property):
        # A weight computed at each read (a compact layer's) is no stored weight; reading it would build it whole.
        return False
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not isinstance(weight, Tensor) or isinstance(weight, nn.parameter.UninitializedParameter):
        return False
    return weight.dim() == 2 and (bias is None or isinstance(bias, Tensor) and bias.dim() == 1)


def linear_layers(model: nn.Module, names: list[str] | None = None) -> dict[str, tuple[nn.Module, nn.Parameter]]:
    """Parameter name to (module, weight) for each ``weight`` of a module :func:`can_serve` takes, among ``names``.

    All of them if ``names`` is None.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.Conv1d(3, 3, 1), nn.Linear(3, 1))
        >>> list(linear_layers(model))
        ['0.weight', '2.weight']

    """
    layers = {}
    for prefix, module in model.named_modules():
        name = f"{prefix}.weight" if prefix else "weight"
        if can_serve(module) and (names is None or name in names):
            layers[name] = (module, module.weight)
    return layers


def logical_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a served module's weight as a Linear sees it."""
    rows, cols = module.weight.shape
    return (cols, rows) if weight_in_out(module) else (rows, cols)
