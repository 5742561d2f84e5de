"""Weights computed from other tensors (``weight_norm``, ``spectral_norm``, pruning hooks): never masked by default."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.nn.utils import parametrize

#: (parameter name, module, attribute) of a weight the default selection would mask.
Slot = tuple[str, nn.Module, str]


def refuse_computed_weights(
    slots: list[Slot], aliases: list[tuple[str, nn.Parameter]], wanted: Callable[[nn.Parameter], bool]
) -> None:
    """Raise naming every weight among ``slots`` (the default selection's) that is computed from others we want."""
    by_name = dict(aliases)
    computed = []
    for name, module, attr in slots:
        sources = _weight_sources(name, module, attr, by_name)
        if any(wanted(by_name[source]) for source in sources):
            computed.append((name, module, attr, sources))
    if not computed:
        return
    layers = "; ".join(
        f"{name} = {_kind(module, attr)}({', '.join(sources)})" for name, module, attr, sources in computed
    )
    every_source = [source for *_, sources in computed for source in sources]
    weight_shaped = [source for *_, sources in computed for source in _largest(sources, by_name)]
    raise ValueError(
        f"RigL's default selection cannot mask weights computed from other tensors: {layers}. Left alone they "
        "would stay dense while the whole sparsity budget fell on the other layers. To keep them dense "
        f"knowingly, pass `exclude={every_source}`. To mask one, mask the tensor it is computed from: name it "
        f"in `include` (for example {weight_shaped}), which replaces the default selection, so name there the "
        "other weights to mask too. That is correct "
        "only where a zero in that tensor gives a zero in the weight at the same position: spectral_norm's "
        "`original` (weight = original / sigma) and weight_norm's direction `original1` (weight = g * v / ||v|| "
        "per output unit: a unit left with no active weight divides 0 by 0), "
        "not weight_norm's magnitude `original0`."
    )


def _weight_sources(name: str, module: nn.Module, attr: str, by_name: dict[str, nn.Parameter]) -> list[str]:
    """Names of the Parameters a module's weight is computed from; [] for a weight that is a Parameter."""
    prefix = name[: len(name) - len(attr)]
    if parametrize.is_parametrized(module, attr):
        inner = f"{prefix}parametrizations.{attr}."
        return [n for n in by_name if n.startswith(inner)]
    if module._parameters.get(attr) is None and isinstance(getattr(module, attr, None), Tensor):
        # Set by a forward pre-hook from its own Parameters: old-style weight_norm (weight_g, weight_v),
        # torch.nn.utils.prune (weight_orig).
        return [f"{prefix}{n}" for n, _ in module.named_parameters(recurse=False) if n.startswith(attr)]
    return []


def _kind(module: nn.Module, attr: str) -> str:
    if parametrize.is_parametrized(module, attr):
        return " o ".join(type(p).__name__ for p in module.parametrizations[attr])
    return "hook"


def _largest(sources: list[str], by_name: dict[str, nn.Parameter]) -> list[str]:
    """The sources with the most elements: those of the weight's shape (weight_norm's v, not g)."""
    most = max(by_name[source].numel() for source in sources)
    return [source for source in sources if by_name[source].numel() == most]
