"""Deployment: a copy of a trained sparse model whose masked Linear layers run on their active weights only."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_rigl.core.kernel_choice import choose_kernels
from lightning_rigl.core.kernels import SparseKernels, linear_layers


def sparsify(
    model: nn.Module, masks: Mapping[str, Tensor] | None = None, *, kernels: str = "auto", tokens: int = 64
) -> nn.Module:
    """A deep copy of ``model`` whose masked ``nn.Linear``/``Conv1D`` layers compute with active weights only.

    The copy's weights are zeroed where the masks are inactive, so its outputs are those of the
    masked dense model (within floating-point rounding), whichever kernels each layer gets. Its
    parameters and ``state_dict`` keys are the original's (``save_sparse`` works on it), and it runs
    under ``torch.no_grad()`` and ``torch.inference_mode()``. ``model`` itself is left unchanged.

    Args:
        model: A trained model.
        masks: Parameter name to bool mask; default: the nonzero pattern of every Linear-type weight
            (``nn.Linear``, ``Conv1D``, torch-geometric ``Linear``, a class given to ``register_linear``).
            Names of other layers (convolutions) are zeroed but keep dense kernels.
        kernels: ``"auto"`` (sparse where :func:`~lightning_rigl.core.kernel_choice.choose_kernel` finds it
            faster for inference at ``tokens``), ``"sparse"`` (every float32/float64 layer), ``"dense"``.
        tokens: Rows of the flattened input per call the copy will see (batch x sequence); used by ``"auto"``.

    Returns:
        The copy, with ``sparse_kernels`` (a :class:`~lightning_rigl.core.kernels.SparseKernels`,
        ``.names`` lists the sparse layers) set on it. Its masks are fixed: a copy of it
        (``copy.deepcopy``, pickle) computes sparse too.

    Example:
        >>> from lightning_rigl import load_sparse, save_sparse
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> with torch.no_grad():
        ...     model[0].weight[:, ::2] = 0
        >>> fast = sparsify(model, kernels="sparse")
        >>> fast.sparse_kernels.names
        ['0.weight', '2.weight']
        >>> x = torch.randn(4, 8)
        >>> with torch.inference_mode():
        ...     torch.allclose(fast(x), model(x), atol=1e-6)
        True

    """
    sparse_model = copy.deepcopy(model)
    params = dict(sparse_model.named_parameters(remove_duplicate=False))  # a tied weight under each name
    if masks is None:
        masks = {name: weight.detach() != 0 for name, (_, weight) in linear_layers(sparse_model).items()}
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"`masks` names {name!r}, which is no parameter of {type(model).__name__}.")
        with torch.no_grad():
            params[name].mul_(mask.to(params[name].device, torch.bool))
    layers = linear_layers(sparse_model, list(masks))
    choices = choose_kernels(layers, masks, tokens, kernels, backward=False)
    chosen = {name: layer for name, layer in layers.items() if choices[name] == "sparse"}
    sparse_model.sparse_kernels = SparseKernels(chosen, masks, fixed_masks=True)  # copies of it stay sparse
    return sparse_model
