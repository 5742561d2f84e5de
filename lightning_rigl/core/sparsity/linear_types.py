"""Which module classes are Linear layers: ``nn.Linear`` and the classes registered here, with their weight layout.

Classes of other libraries are known by their qualified name (``cls.__module__ + "." + cls.__qualname__``),
so nothing here imports those libraries. A registered class is masked by the default selection and, where
it runs its own forward, computes with sparse kernels and is served by ``sparsify``.
"""

from __future__ import annotations

import re
from typing import TypeVar

from torch import nn

from lightning_rigl.core.validation import check_type

_ClassOrName = TypeVar("_ClassOrName", type, str)

#: Qualified class name to weight layout: ``True`` for a weight stored (in, out), ``False`` for (out, in).
_LINEAR_CLASSES: dict[str, bool] = {
    # Hugging Face's Conv1D (GPT-2 and its family): a Linear with its weight stored as (in, out).
    "transformers.pytorch_utils.Conv1D": True,
    # torch-geometric's Linear (GCN, GraphSAGE, GAT's projections): F.linear(x, weight, bias), weight (out, in).
    "torch_geometric.nn.dense.linear.Linear": False,
}
_QUALIFIED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def qualified_name(cls: type) -> str:
    """``module.qualname`` of a class, the key of the registry.

    Example:
        >>> qualified_name(nn.Linear)
        'torch.nn.modules.linear.Linear'

    """
    return f"{cls.__module__}.{cls.__qualname__}"


def register_linear(cls_or_name: _ClassOrName, *, weight_in_out: bool = False) -> _ClassOrName:
    """Declare a module class to be a Linear layer: RigL masks its ``weight`` and may serve it with sparse kernels.

    Use it for a Linear layer that is not an ``nn.Linear`` subclass. The class's ``weight`` must be a
    2-D Parameter and its ``forward(x)`` must compute ``x @ W^T + b`` with ``W`` its weight read as
    (out, in) and ``b`` its ``bias`` (a Parameter or None). Its subclasses count too; a subclass with a
    forward of its own is masked but keeps its dense forward. Built in: Hugging Face's
    ``transformers.pytorch_utils.Conv1D`` (weight (in, out)) and torch-geometric's
    ``torch_geometric.nn.dense.linear.Linear``. Registering again with the same layout does nothing.

    Args:
        cls_or_name: The class, or its qualified name ``"package.module.Class"`` as
            ``cls.__module__ + "." + cls.__qualname__`` gives it (the module that defines the class,
            not one that re-exports it), to register a class without importing its library.
        weight_in_out: The weight is stored (in, out), as Hugging Face's ``Conv1D`` does; ``False``
            (the default) for (out, in), as ``nn.Linear``.

    Returns:
        ``cls_or_name``, so that ``@register_linear`` can decorate a class.

    Raises:
        TypeError: ``cls_or_name`` that is neither an ``nn.Module`` subclass nor a str, or a
            ``weight_in_out`` that is not a bool.
        ValueError: A malformed name, or a class registered already with the other layout.

    Example:
        >>> import torch
        >>> @register_linear
        ... class MyLinear(nn.Module):
        ...     def __init__(self, n_in, n_out):
        ...         super().__init__()
        ...         self.weight = nn.Parameter(torch.randn(n_out, n_in))
        ...         self.bias = nn.Parameter(torch.zeros(n_out))
        ...     def forward(self, x):
        ...         return nn.functional.linear(x, self.weight, self.bias)
        >>> linear_kind(MyLinear(4, 2)) == (MyLinear, False)
        True

    """
    check_type("weight_in_out", weight_in_out, (bool,), "a bool (True: weight stored (in, out))")
    if isinstance(cls_or_name, str):
        if not _QUALIFIED_NAME.fullmatch(cls_or_name):
            raise ValueError(
                f"`cls_or_name` must be a qualified class name such as 'torch_geometric.nn.dense.linear.Linear' "
                f"(dotted identifiers, module then class), got {cls_or_name!r}."
            )
        name = cls_or_name
    elif isinstance(cls_or_name, type) and issubclass(cls_or_name, nn.Module):
        name = qualified_name(cls_or_name)
    else:
        raise TypeError(
            "`cls_or_name` must be an nn.Module subclass or its qualified name as a str, "
            f"got {cls_or_name!r} of type {type(cls_or_name).__name__}."
        )
    known = False if name == qualified_name(nn.Linear) else _LINEAR_CLASSES.get(name)
    if known is not None and known != weight_in_out:
        raise ValueError(
            f"{name} is registered already with weight_in_out={known}: a class has one weight layout, "
            f"got weight_in_out={weight_in_out}."
        )
    _LINEAR_CLASSES[name] = weight_in_out
    return cls_or_name


def linear_kind(module: nn.Module) -> tuple[type[nn.Module], bool] | None:
    """The Linear class ``module`` is (``nn.Linear`` or a registered one) and its weight layout; None for others.

    The class is the nearest one in ``module``'s class hierarchy: a served module must run its forward.

    Example:
        >>> linear_kind(nn.Linear(2, 3)), linear_kind(nn.Conv1d(2, 3, 1))
        ((<class 'torch.nn.modules.linear.Linear'>, False), None)

    """
    for cls in type(module).__mro__:
        if cls is nn.Linear:
            return cls, False
        in_out = _LINEAR_CLASSES.get(qualified_name(cls))
        if in_out is not None:
            return cls, in_out
    return None
