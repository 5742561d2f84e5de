"""Which parameters get a mask."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from fnmatch import fnmatchcase

from torch import nn
from torch.nn.utils import parametrize

from lightning_rigl.core.sparsity.computed_weights import refuse_computed_weights
from lightning_rigl.core.sparsity.linear_types import linear_kind

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
_Predicate = Callable[[nn.Parameter], bool]


def is_masked_module(module: nn.Module) -> bool:
    """Whether the default selection masks ``module.weight``.

    Example:
        >>> is_masked_module(nn.Linear(2, 3)), is_masked_module(nn.Embedding(4, 2))
        (True, False)

    """
    return isinstance(module, MASKED_MODULES) or linear_kind(module) is not None


def _default_slots(model: nn.Module, remove_duplicate: bool = True) -> list[tuple[str, nn.Module, str]]:
    """(parameter name, module, attribute) of every weight the default selection masks.

    With ``remove_duplicate=False``, a module reachable by several paths (registered twice, kept in a
    list twice, held bare and inside a wrapper) gives its weight under each path.
    """
    slots = []
    for prefix, module in model.named_modules(remove_duplicate=remove_duplicate):
        prefix = f"{prefix}." if prefix else ""
        if is_masked_module(module):
            slots.append((f"{prefix}weight", module, "weight"))
        elif isinstance(module, nn.MultiheadAttention):
            slots += [(f"{prefix}{attr}", module, attr) for attr in _ATTENTION_WEIGHTS if _has_weight(module, attr)]
    return slots


def _has_weight(module: nn.Module, attr: str) -> bool:
    # Not getattr: it would run a parametrization (spectral_norm's power iteration updates its buffers).
    return module._parameters.get(attr) is not None or parametrize.is_parametrized(module, attr)


def default_parameter_names(model: nn.Module) -> list[str]:
    """Names of the weights masked by default.

    The ``weight`` of every Linear, Conv and ConvTranspose module (and of the Linear classes of other
    libraries, such as Hugging Face's ``Conv1D``: see
    :func:`~lightning_rigl.core.sparsity.linear_types.register_linear`), and the input projections of
    ``nn.MultiheadAttention`` (its ``out_proj`` is a Linear). Never biases, norms or embeddings. A
    module reachable by several paths is listed under its first.

    Example:
        >>> default_parameter_names(nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3), nn.Linear(3, 1)))
        ['0.weight', '2.weight']

    """
    return [name for name, _, _ in _default_slots(model)]


def parameter_aliases(model: nn.Module, names: Iterable[str]) -> dict[str, list[str]]:
    """Every name under which each named Parameter is reachable in ``model``, in ``named_parameters`` order.

    A tied weight (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) is one Parameter with
    several names; report a mask of it under all of them.

    Raises:
        ValueError: A name that is no parameter of ``model``.

    Example:
        >>> model = nn.ModuleDict({"emb": nn.Embedding(5, 2), "head": nn.Linear(2, 5, bias=False)})
        >>> model["head"].weight = model["emb"].weight
        >>> parameter_aliases(model, ["head.weight"])
        {'head.weight': ['emb.weight', 'head.weight']}

    """
    aliases = list(model.named_parameters(remove_duplicate=False))
    by_name = dict(aliases)
    names_of: dict[int, list[str]] = {}
    for name, param in aliases:
        names_of.setdefault(id(param), []).append(name)
    result = {}
    for name in names:
        if name not in by_name:
            raise ValueError(f"{name!r} is no parameter of {type(model).__name__}.")
        result[name] = names_of[id(by_name[name])]
    return result


def select_parameters(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    *,
    warn_ties: bool = True,
) -> dict[str, nn.Parameter]:
    """The parameters to mask, by name, in ``model.named_parameters()`` order.

    ``include`` (fnmatch patterns on parameter names) replaces the default selection; ``exclude``
    removes from it. A weight shared by several modules, or held by one module reachable by several
    paths, is one entry, under its first name. Zero-size parameters (nothing to mask) are skipped.

    The default selection skips weights with ``requires_grad=False`` (see
    :func:`frozen_default_weights`); ``include`` masks frozen weights it names: they are zeroed at
    inactive positions and stay so, and train under their mask once they are unfrozen. The default
    selection leaves dense, with a warning naming the tie (unless ``warn_ties=False``: a second reader
    of a selection already made), a weight shared with a module it would not mask (a token embedding
    tied to an output layer): masking it would zero that module's weights too. It refuses weights it
    cannot mask correctly by itself: those computed from other tensors (``weight_norm``,
    ``spectral_norm``, any parametrization or pruning hook). An explicit ``include`` masks what it names.

    Raises:
        ValueError: A pattern that matches no parameter, nothing left to mask, a computed weight in
            the default selection, or a selected parameter that is not materialized yet (lazy modules).

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
        >>> list(select_parameters(model, exclude=["1.*"]))
        ['0.weight']

    """
    aliases = list(model.named_parameters(remove_duplicate=False))
    params = dict(model.named_parameters())
    for argument, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns or ():
            if not any(fnmatchcase(name, pattern) for name, _ in aliases):
                raise ValueError(
                    f"`{argument}` pattern {pattern!r} matches no parameter of {type(model).__name__}. "
                    f"Parameter names are: {[name for name, _ in aliases]}"
                )

    def wanted(param: nn.Parameter) -> bool:
        return not _empty(param) and not _matches(aliases, exclude, param)

    def trainable(param: nn.Parameter) -> bool:
        return param.requires_grad and wanted(param)

    if include:
        keep: _Predicate = wanted
        chosen = {id(param) for param in params.values() if _matches(aliases, include, param)}
    else:
        keep = trainable
        refuse_computed_weights(_default_slots(model), aliases, keep)
        chosen, tied = _default_choice(model, aliases)
        if warn_ties:
            _warn_ties([names for names, param in tied if keep(param)])
    selected = {name: param for name, param in params.items() if id(param) in chosen and keep(param)}
    if not selected:
        raise ValueError(
            f"{type(model).__name__} has nothing to mask (include={include}, exclude={exclude}). By default RigL "
            "masks the weights of Linear, Conv, ConvTranspose and MultiheadAttention layers (and of the classes "
            "given to `register_linear`) that require grad; name others, frozen ones too, with `include`."
        )
    lazy = [name for name, param in selected.items() if isinstance(param, nn.parameter.UninitializedParameter)]
    if lazy:
        raise ValueError(
            f"Cannot mask {lazy}: not materialized yet (a lazy module such as nn.LazyLinear gets its shape at its "
            "first forward pass), and RigL needs each weight's shape to spread the sparsity. Run one forward "
            "pass before fit (for example in your LightningModule's `setup`), use a layer with fixed sizes, "
            f"or leave them dense with `exclude={lazy}`."
        )
    return selected


def frozen_default_weights(model: nn.Module, exclude: Sequence[str] | None = None) -> list[str]:
    """The weights the default selection skips because they do not require grad, by first name.

    A frozen backbone (Lightning's ``BackboneFinetuning`` freezes it before fit starts) or the base
    weights under LoRA adapters: they stay dense, and one unfrozen later trains dense. Name them in
    ``include`` to mask them. Weights matched by ``exclude`` and tied ones (see
    :func:`select_parameters`) are not listed.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
        >>> model[0].requires_grad_(False)
        Linear(in_features=2, out_features=3, bias=True)
        >>> frozen_default_weights(model)
        ['0.weight']

    """
    aliases = list(model.named_parameters(remove_duplicate=False))
    chosen, _ = _default_choice(model, aliases)
    return [
        name
        for name, param in model.named_parameters()
        if id(param) in chosen
        and not param.requires_grad
        and not _empty(param)
        and not _matches(aliases, exclude, param)
    ]


def _empty(param: nn.Parameter) -> bool:
    # A zero-size weight (a layer with 0 inputs or outputs) holds nothing to mask or to count.
    return not isinstance(param, nn.parameter.UninitializedParameter) and param.numel() == 0


def _matches(aliases: list[tuple[str, nn.Parameter]], patterns: Sequence[str] | None, param: nn.Parameter) -> bool:
    """Whether any name of ``param`` matches any of ``patterns``."""
    return any(fnmatchcase(name, pattern) for name, p in aliases if p is param for pattern in patterns or ())


def _default_choice(
    model: nn.Module, aliases: list[tuple[str, nn.Parameter]]
) -> tuple[set[int], list[tuple[tuple[str, ...], nn.Parameter]]]:
    """Ids of the Parameters the default selection masks, and (every name, Parameter) of those it leaves for a tie.

    A Parameter is masked when each of its names is the weight of a module the default masks. One module
    reachable by several paths gives every path such a name; a weight shared with an embedding does not.
    """
    default_names = {name for name, _, _ in _default_slots(model, remove_duplicate=False)}
    names_of: dict[int, list[str]] = {}
    for name, param in aliases:
        names_of.setdefault(id(param), []).append(name)
    chosen: set[int] = set()
    tied: dict[int, tuple[tuple[str, ...], nn.Parameter]] = {}
    for name, param in aliases:
        if name not in default_names or id(param) in chosen:
            continue
        if all(alias in default_names for alias in names_of[id(param)]):
            chosen.add(id(param))
        else:
            tied[id(param)] = (tuple(names_of[id(param)]), param)
    return chosen, list(tied.values())


def _warn_ties(ties: list[tuple[str, ...]]) -> None:
    new = list(dict.fromkeys(ties))
    if not new:
        return
    described = "; ".join(" = ".join(tie) for tie in new)
    warnings.warn(
        f"RigL leaves dense the weights shared with a module it does not mask by default (an embedding, "
        f"say): {described}. Masking them would zero that module's weights too. Name one in `include` "
        "to mask it anyway.",
        stacklevel=3,  # the caller of select_parameters
    )
