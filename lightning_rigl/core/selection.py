"""Which parameters get a mask."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn

#: Modules whose ``weight`` is masked by default.
MASKED_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def default_parameter_names(model: nn.Module) -> list[str]:
    """Names of the weights masked by default.

    The ``weight`` of every Linear, Conv and ConvTranspose module, and the input projections of
    ``nn.MultiheadAttention`` (its ``out_proj`` is a Linear). Never biases, norms or embeddings.

    Example:
        >>> default_parameter_names(nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3), nn.Linear(3, 1)))
        ['0.weight', '2.weight']

    """
    names = []
    for prefix, module in model.named_modules():
        prefix = f"{prefix}." if prefix else ""
        if isinstance(module, MASKED_MODULES):
            names.append(f"{prefix}weight")
        elif isinstance(module, nn.MultiheadAttention):
            names += [f"{prefix}{attr}" for attr in _ATTENTION_WEIGHTS if getattr(module, attr) is not None]
    return names


def select_parameters(
    model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> dict[str, nn.Parameter]:
    """The parameters to mask, by name, in ``model.named_parameters()`` order.

    ``include`` (fnmatch patterns on parameter names) replaces the default selection; ``exclude``
    removes from it. A weight shared by several modules is one entry, under its first name.
    Parameters with ``requires_grad=False`` are skipped.

    Raises:
        ValueError: A pattern that matches no parameter, or nothing left to mask.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
        >>> list(select_parameters(model, exclude=["1.*"]))
        ['0.weight']

    """
    aliases = list(model.named_parameters(remove_duplicate=False))
    canonical = {id(param): name for name, param in reversed(aliases)}  # first name wins
    params = dict(model.named_parameters())
    for argument, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns or ():
            if not any(fnmatchcase(name, pattern) for name, _ in aliases):
                raise ValueError(
                    f"`{argument}` pattern {pattern!r} matches no parameter of {type(model).__name__}. "
                    f"Parameter names are: {[name for name, _ in aliases]}"
                )

    def matches(patterns: Sequence[str] | None, param: nn.Parameter) -> bool:
        return any(fnmatchcase(name, pat) for name, p in aliases if p is param for pat in patterns or ())

    if include:
        chosen = {name for name, param in params.items() if matches(include, param)}
    else:
        module_params = dict(aliases)
        chosen = {
            canonical[id(module_params[name])] for name in default_parameter_names(model) if name in module_params
        }
    chosen = {name for name in chosen if not matches(exclude, params[name]) and params[name].requires_grad}
    selected = {name: param for name, param in params.items() if name in chosen}
    if not selected:
        raise ValueError(
            f"{type(model).__name__} has nothing to mask (include={include}, exclude={exclude}). RigL masks the "
            "weights of Linear, Conv, ConvTranspose and MultiheadAttention layers that require grad; name "
            "others with `include`."
        )
    return selected


def resolve_custom_sparsity(custom: dict[str, float] | None, names: Sequence[str]) -> dict[str, float]:
    """Expand ``custom_sparsity`` keys (parameter names or fnmatch patterns) to masked parameter names.

    Raises:
        ValueError: A key that matches no masked parameter, or a parameter matched by two keys.

    Example:
        >>> resolve_custom_sparsity({"0.*": 0.5}, ["0.weight", "1.weight"])
        {'0.weight': 0.5}

    """
    resolved: dict[str, float] = {}
    source: dict[str, str] = {}
    for key, value in (custom or {}).items():
        matched = [name for name in names if name == key or fnmatchcase(name, key)]
        if not matched:
            raise ValueError(
                f"`custom_sparsity` key {key!r} matches no masked parameter. Masked parameters: {list(names)}"
            )
        for name in matched:
            if name in resolved:
                raise ValueError(f"`custom_sparsity` keys {source[name]!r} and {key!r} both match {name!r}.")
            resolved[name], source[name] = value, key
    return resolved
