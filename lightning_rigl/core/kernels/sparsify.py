"""Deployment: a copy of a trained sparse model whose masked Linear layers run on their active weights only."""

from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_rigl.core.kernels.choice import check_kernels, choose_kernels
from lightning_rigl.core.kernels.served_layers import linear_layers
from lightning_rigl.core.kernels.sparse_kernels import SparseKernels


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
        kernels: ``"auto"`` (sparse where :func:`~lightning_rigl.core.kernels.choice.choose_kernel` finds it
            faster for inference at ``tokens``), ``"sparse"`` (every float32/float64 layer), ``"dense"``.
        tokens: Rows of the flattened input per call the copy will see (batch x sequence); used by ``"auto"``.

    Returns:
        The copy, with ``sparse_kernels`` (a :class:`~lightning_rigl.core.kernels.sparse_kernels.SparseKernels`,
        ``.names`` lists the sparse layers) and ``sparse_masks`` (its :class:`FixedMasks`) set on it.
        Its masks are fixed: fine-tuning and ``load_state_dict`` keep every masked weight at 0 where
        inactive, whichever kernels its layer has, and a copy of it (``copy.deepcopy``, pickle)
        computes sparse and keeps its masks too.

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
    check_kernels(kernels)  # before the copy: a bad argument costs nothing
    sparse_model = copy.deepcopy(model)
    params = dict(sparse_model.named_parameters(remove_duplicate=False))  # a tied weight under each name
    if masks is None:
        masks = {name: weight.detach() != 0 for name, (_, weight) in linear_layers(sparse_model).items()}
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"`masks` names {name!r}, which is no parameter of {type(model).__name__}.")
        if tuple(mask.shape) != tuple(params[name].shape):
            raise ValueError(
                f"`masks[{name!r}]` has shape {tuple(mask.shape)}; it must have the parameter's, "
                f"{tuple(params[name].shape)}."
            )
        with torch.no_grad():
            params[name].mul_(mask.to(params[name].device, torch.bool))
    layers = linear_layers(sparse_model, list(masks))
    choices = choose_kernels(layers, masks, tokens, kernels, backward=False)
    chosen = {name: layer for name, layer in layers.items() if choices[name] == "sparse"}
    sparse_model.sparse_kernels = SparseKernels(chosen, masks, fixed_masks=True)  # copies of it stay sparse
    sparse_model.sparse_masks = FixedMasks(sparse_model, masks)
    return sparse_model


class FixedMasks:
    """Keeps the masked weights of a ``sparsify``'d model at 0 where inactive, while it is trained or loaded.

    Each masked weight gets a post-accumulate-grad hook that zeroes its gradient at inactive positions
    (layers on dense kernels would fill in otherwise, and so would sparse-kernel layers on the inputs
    they hand to their dense forward: autocast, bf16). An optimizer that leaves a weight with zero
    gradient and zero state at 0 then keeps the masks: SGD (momentum, weight decay), Adam, AdamW,
    RMSprop, Adagrad. Each masked weight's next backward checks that it still holds 0 wherever
    inactive, and raises if not (an optimizer that mixes positions, noise added to gradients after
    backward, a write of your own): call :meth:`apply` after such steps. ``load_state_dict`` into
    the model keeps the masks: loaded values at inactive positions are set to 0, with a warning.
    Copies of the model (``copy.deepcopy``, pickle) keep all of this.

    Args:
        model: The ``sparsify``'d model (its masked weights are already 0 where inactive).
        masks: Parameter name to bool mask of its shape (True = active).

    Example:
        >>> model = sparsify(nn.Sequential(nn.Linear(4, 4)), {"0.weight": torch.eye(4, dtype=torch.bool)})
        >>> opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
        >>> model(torch.randn(8, 4)).square().sum().backward()
        >>> opt.step()
        >>> torch.count_nonzero(model[0].weight).item()  # the diagonal only
        4
        >>> model.sparse_masks.names
        ['0.weight']

    """

    def __init__(self, model: nn.Module, masks: Mapping[str, Tensor]) -> None:
        params = dict(model.named_parameters(remove_duplicate=False))
        self._owners: dict[str, tuple[nn.Module, str]] = {}
        self._active: dict[str, Tensor] = {}  # flat positions of the active entries: O(active) memory
        self._params: dict[str, nn.Parameter] = {}  # what the hooks are on; copies keep these, not modules
        for name, mask in masks.items():
            path, _, attr = name.rpartition(".")
            self._owners[name] = (model.get_submodule(path), attr)
            self._params[name] = params[name]
            self._active[name] = mask.to(params[name].device, torch.bool).reshape(-1).nonzero().squeeze(1)
        for module in {id(module): module for module, _ in self._owners.values()}.values():
            module.register_load_state_dict_post_hook(_KeepMasksOnLoad(self))
        self._hooks: dict[int, tuple[weakref.ref, Any]] = {}
        self._attach()

    @property
    def names(self) -> list[str]:
        """The names of the masked parameters (a tied weight under each of its names)."""
        return list(self._active)

    def apply(self) -> None:
        """Set every masked weight to 0 where inactive (after a step of an optimizer that fills them in).

        Example:
            >>> model = sparsify(nn.Sequential(nn.Linear(2, 2)), {"0.weight": torch.eye(2, dtype=torch.bool)})
            >>> with torch.no_grad():
            ...     _ = model[0].weight.fill_(1.0)
            >>> model.sparse_masks.apply()
            >>> model[0].weight.detach().tolist()
            [[1.0, 0.0], [0.0, 1.0]]

        """
        for param, names in self._groups():
            with torch.no_grad():
                param.masked_fill_(self._inactive(names, param), 0)

    def _groups(self) -> list[tuple[nn.Parameter, list[str]]]:
        # A tied weight is one Parameter under several names: one hook, inactive wherever a name's mask is.
        groups: dict[int, tuple[nn.Parameter, list[str]]] = {}
        for name, param in self._params.items():
            groups.setdefault(id(param), (param, []))[1].append(name)
        return list(groups.values())

    def _inactive(self, names: list[str], param: Tensor) -> Tensor:
        active = torch.ones(param.numel(), dtype=torch.bool, device=param.device)
        for name in names:
            only = torch.zeros_like(active).index_fill_(0, self._active[name].to(param.device), True)
            active &= only
        return ~active.view(param.shape)

    def _attach(self) -> None:
        """Hook every masked Parameter that has no hook of ours yet (new ones: a copy, a load with ``assign``)."""
        current = {}
        for param, names in self._groups():
            hooked = self._hooks.get(id(param))
            if hooked is None or hooked[0]() is not param:
                handle = param.register_post_accumulate_grad_hook(_ZeroInactiveGradient(self, names))
                hooked = (weakref.ref(param), handle)
            current[id(param)] = hooked
        for key, (_, handle) in self._hooks.items():
            if key not in current:  # a Parameter the model no longer holds
                handle.remove()
        self._hooks = current

    def _after_load(self, module: nn.Module) -> None:
        for name, (owner, attr) in self._owners.items():
            if owner is module:
                self._params[name] = getattr(module, attr)  # a new Parameter with `assign=True`
        for param, names in self._groups():
            if not any(self._owners[name][0] is module for name in names):
                continue
            inactive = self._inactive(names, param)
            with torch.no_grad():
                dropped = int(torch.count_nonzero(param.detach().masked_select(inactive)))
                param.masked_fill_(inactive, 0)
            if dropped:
                warnings.warn(
                    f"load_state_dict wrote {dropped} nonzero values where the fixed masks of this sparsify'd "
                    f"model are inactive ({', '.join(names)}); they were set to 0. To deploy other masks, "
                    f"sparsify the model they come from.",
                    stacklevel=2,
                )
        self._attach()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_hooks"] = {}  # tensor hooks are not copied with their tensors: made again on the copies
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._attach()  # the copied Parameters are complete here; the owner modules may not be yet


class _ZeroInactiveGradient:
    """A masked weight's post-accumulate-grad hook: checks its inactive entries are 0, zeroes its gradient's."""

    def __init__(self, masks: FixedMasks, names: list[str]) -> None:
        self.masks, self.names = masks, names
        self._inactive: Tensor | None = None  # built at the first backward: inference never needs it

    def __call__(self, param: Tensor) -> None:
        if self._inactive is None or self._inactive.device != param.device:
            self._inactive = self.masks._inactive(self.names, param)
        inactive = self._inactive
        filled = int(torch.count_nonzero(param.detach().ne(0).logical_and_(inactive)))
        if filled:
            raise RuntimeError(
                f"{' / '.join(repr(name) for name in self.names)} of this sparsify'd model holds {filled} nonzero "
                f"values where its fixed mask is inactive: something wrote them since its last backward (an "
                f"optimizer that does not leave a weight with zero gradient and state at 0, noise added to "
                f"gradients after backward, a write of your own). Call `model.sparse_masks.apply()` after such a "
                f"step, or fine-tune the model you sparsified (sparsify leaves it unchanged) to train densely."
            )
        grad = param.grad
        if grad.is_sparse:  # nn.Embedding(sparse=True): the product stays sparse
            param.grad = grad * ~inactive
        else:
            grad.masked_fill_(inactive, 0)


class _KeepMasksOnLoad:
    """A load_state_dict post-hook of each module holding a masked weight (picklable, unlike a closure)."""

    def __init__(self, masks: FixedMasks) -> None:
        self.masks = masks

    def __call__(self, module: nn.Module, incompatible_keys: Any) -> None:
        self.masks._after_load(module)
