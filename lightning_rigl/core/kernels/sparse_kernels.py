"""Making Linear-type layers compute with sparse kernels without changing what they store.

A layer served here keeps its Parameters, ``state_dict`` keys, optimizer and mask; only its forward
changes, to :func:`~lightning_rigl.core.kernels.sparse_linear.sparse_linear` at the mask's structure, and
:meth:`SparseKernels.detach` restores the class's own forward. Which layers to serve is decided in
:mod:`~lightning_rigl.core.kernels.choice`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_rigl.core.kernels.masked_gradients import GradientRecords
from lightning_rigl.core.kernels.served_layers import ServedForward, can_serve, weight_in_out
from lightning_rigl.core.kernels.sparse_linear import SPARSE_DTYPES, SparseStructure, active_values, sparse_linear
from lightning_rigl.core.kernels.weight_writes import watch_writes


class SparseKernels:
    """Makes Linear-type layers compute with their active weights only, storing nothing new in them.

    Each layer's ``forward`` becomes :func:`~lightning_rigl.core.kernels.sparse_linear.sparse_linear` at
    the structure of its mask. Parameters, ``state_dict`` keys, the optimizer and the masks stay as
    they are; :meth:`detach` restores the class's forward. Inputs the kernels cannot take (bf16/fp16,
    or any autocast region) run the layer's own dense forward for that call.

    Drive it from the training loop: :meth:`set_dense_gradient` before the forward pass of every
    step (every micro-batch of it) whose dense weight gradient is read (RigL's update steps),
    :meth:`already_masked` and :meth:`offer_gradients` before the optimizer step, and
    :meth:`update_structure` after each topology update.

    Args:
        layers: Name to (module, its ``weight``), e.g. from
            :func:`~lightning_rigl.core.kernels.served_layers.linear_layers`; ``nn.Linear`` or Hugging Face ``Conv1D``.
        masks: Name to bool mask of the weight's stored shape (True = active).
        fixed_masks: The masks never change (a deployed model, see ``sparsify``): a copy of a served
            layer (``copy.deepcopy``, pickle) computes sparse too, with its copy of the structure. By
            default (training) a copy computes with its class's forward: the run's updates move the
            structure, and a copy, no longer driven by them, would keep an old one.

    Example:
        >>> from lightning_rigl.core.kernels.served_layers import linear_layers
        >>> model = nn.Sequential(nn.Linear(4, 3))
        >>> mask = torch.rand(3, 4) < 0.5
        >>> kernels = SparseKernels(linear_layers(model), {"0.weight": mask})
        >>> x = torch.randn(2, 4)
        >>> torch.allclose(model(x), x @ (model[0].weight * mask).T + model[0].bias)
        True
        >>> kernels.detach()

    """

    def __init__(
        self, layers: Mapping[str, tuple[nn.Module, Tensor]], masks: Mapping[str, Tensor], *, fixed_masks: bool = False
    ) -> None:
        self.dense_gradient, self.fixed_masks = False, fixed_masks
        self._modules: dict[str, nn.Module] = {}
        self._weights: dict[str, Tensor] = {}  # read every step: a module's __getattr__ costs ~10 us there
        self._structures: dict[str, SparseStructure] = {}
        self.records = GradientRecords()  # the gradients the sparse ops wrote at active positions only
        # Layers whose current gradient holds a contribution written at active positions only.
        self._sampled: dict[str, bool] = {}
        for name, (module, weight) in layers.items():
            if isinstance(vars(module).get("forward"), _SparseForward):
                raise ValueError(f"The module of {name!r} is served already (attached twice?).")
            if not can_serve(module) or module.weight is not weight:
                raise ValueError(
                    f"{name!r} must be the `weight` of an nn.Linear or a Hugging Face Conv1D that runs its "
                    f"class's own forward (see `can_serve`); got a {type(module).__name__}."
                )
            self._modules[name], self._weights[name] = module, weight
            self.update_structure(name, masks[name])
        for name, module in self._modules.items():
            module.forward = _SparseForward(self, name, module)

    @property
    def names(self) -> list[str]:
        """The names of the layers computing with sparse kernels."""
        return list(self._modules)

    def set_dense_gradient(self, needed: bool) -> None:
        """Whether the next backward passes write the dense weight gradient (else the active positions only).

        Set it before the forward pass: the forward records it for its backward.
        """
        self.dense_gradient = bool(needed)
        self.forget_written()  # a record from an earlier step must not vouch for this one's

    def forget_written(self) -> None:
        """Forget which gradients the sparse ops wrote at active positions (the masks changed, or a step began)."""
        self.records.forget_written()

    def already_masked(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` whose weight gradient is the one their sparse op wrote, at active positions only.

        Such a gradient is already 0 at every inactive position (see
        :meth:`~lightning_rigl.core.kernels.masked_gradients.GradientRecords.is_masked`): multiplying it by
        the mask again changes nothing. Call it once per optimizer step, for the layers it updates, before
        they are masked.
        """
        return [
            name
            for name in names
            if name in self._weights
            and self.records.is_masked(name, self._weights[name].grad, self._structures[name].index)
        ]

    def wrote_masked(self, name: str, grad: Tensor | None) -> bool:
        """Whether ``grad`` is the very tensor the sparse op of ``name`` wrote at active positions, unchanged since.

        Like :meth:`already_masked` for one layer, without using the record up: a gradient hook may ask.
        """
        structure = self._structures.get(name)
        return structure is not None and self.records.wrote_masked(name, grad, structure.index)

    def holds_sampled(self, name: str) -> bool:
        """Whether the gradient of ``name`` holds a contribution written at active positions only.

        Such a gradient is no dense gradient: a topology update must not grow from it.
        """
        return self._sampled.get(name, False)

    def steps_taken(self, names: Iterable[str]) -> None:
        """The optimizer stepped ``names``: what their gradients held is forgotten."""
        for name in names:
            self._sampled.pop(name, None)

    def wrote_gradient(self, name: str, weight: Tensor, sampled: bool) -> None:
        """Hear that the sparse op of ``name`` wrote a weight gradient, ``sampled`` at active positions only."""
        # Called before the gradient is accumulated: with no .grad yet, this contribution starts it.
        self._sampled[name] = sampled or (weight.grad is not None and self._sampled.get(name, False))

    def offer_gradients(self, names: Iterable[str]) -> None:
        """Offer the weight gradients of ``names`` to their layers' next backward, which writes into them.

        Only gradients :meth:`already_masked` just named: written by the sparse op at the active positions
        into a tensor that is exactly 0 everywhere else, and unchanged since. A gradient that was
        multiplied by its mask may hold NaN where inactive (NaN * 0), and must not be carried into the
        next step. See :meth:`~lightning_rigl.core.kernels.masked_gradients.GradientRecords.offer`.
        """
        for name in names:
            if name in self._weights:
                self.records.offer(name, self._weights[name].grad, self._structures[name].index)

    def update_structure(self, name: str, mask: Tensor) -> None:
        """Rebuild a layer's structure from its new mask (after a topology update)."""
        module = self._modules[name]
        if tuple(mask.shape) != tuple(module.weight.shape):
            raise ValueError(f"The mask of {name!r} must have the weight's shape {tuple(module.weight.shape)}.")
        structure = SparseStructure.from_mask(mask.to(module.weight.device), bool(weight_in_out(module)))
        self._structures[name] = structure
        self.records.forget(name)  # records of the old structure vouch for nothing now: let its indices go

    def detach(self) -> None:
        """Give every layer its class's forward back; the layers compute densely again."""
        self.records.forget()
        for module in self._modules.values():
            if isinstance(vars(module).get("forward"), _SparseForward):
                del module.forward
        self._modules.clear()
        self._weights.clear()
        self._structures.clear()
        self._sampled.clear()

    def _structure(self, name: str, device: torch.device) -> SparseStructure:
        structure = self._structures[name]
        if structure.crow.device != device:  # the model moved since the structure was built
            structure = self._structures[name] = structure.to(device)
        return structure


class _ClassForward(ServedForward):
    """The forward of a copy of a training layer: its class's own (a later fit may serve it again)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.module).forward(self.module, *args, **kwargs)


class _SparseForward(ServedForward):
    """A served layer's forward: the sparse op, or the class's own forward for inputs it cannot take."""

    def __init__(self, kernels: SparseKernels, name: str, module: nn.Module) -> None:
        self.kernels, self.name, self.module = kernels, name, module
        self.in_out = bool(weight_in_out(module))
        # Deployed inference only: ((address, version, .data writes), the structure, the active values).
        self._cached: tuple[tuple, SparseStructure, Tensor] | None = None

    def __reduce_ex__(self, protocol: int) -> str | tuple:
        if self.kernels.fixed_masks:
            return super().__reduce_ex__(protocol)
        # A copy of a training layer (copy.deepcopy, pickle: a best-model snapshot, weight averaging)
        # would keep this structure while its own weights move on or are loaded anew, and drop whatever
        # lies outside it. It computes with its class's forward instead: the same outputs at the masks' zeros.
        return _ClassForward, (self.module,)

    def __call__(self, x: Tensor) -> Tensor:
        module, weight = self.module, self.module.weight
        structure = self.kernels._structure(self.name, weight.device)
        if x.dtype != weight.dtype or weight.dtype not in SPARSE_DTYPES or torch.is_autocast_enabled(x.device.type):
            self.kernels.records.forget_written(self.name)  # this call's gradient is dense: no record vouches
            return type(module).forward(module, x)
        values = self._inference_values(weight, structure)
        # Eager autograd asks this object again at the backward: the step a gradient is for is known then.
        gate = None if torch.compiler.is_compiling() else self
        return sparse_linear(x, weight, module.bias, structure, self.kernels.dense_gradient, self.in_out, values, gate)

    @property
    def dense_gradient(self) -> bool:
        """Whether the weight gradient written now is dense (the coming step reads it)."""
        return self.kernels.dense_gradient

    def wrote_gradient(self, weight: Tensor, sampled: bool) -> None:
        """Hear what the sparse op wrote for this layer (see :meth:`SparseKernels.wrote_gradient`)."""
        self.kernels.wrote_gradient(self.name, weight, sampled)

    def reusable_gradient(self, weight: Tensor, index: Tensor) -> Tensor | None:
        """The gradient offered to this layer's backward at structure ``index``, if it may be written into."""
        return self.kernels.records.take(self.name, weight, index)

    def wrote_masked_gradient(self, grad: Tensor, index: Tensor) -> None:
        """Record ``grad``, written by the sparse op at the active positions of structure ``index`` only."""
        self.kernels.records.record_written(self.name, grad, index)

    def _inference_values(self, weight: Tensor, structure: SparseStructure) -> Tensor | None:
        """On a deployed layer without autograd, the active values gathered again only when the weight was written.

        The gather reads most cache lines of the weight: at batch 64 it costs about as much as the
        sparse product. A write is seen by the weight's version (in-place), its address (a new tensor)
        and :func:`~lightning_rigl.core.kernels.weight_writes.watch_writes` (through ``.data``, which the version
        misses), so the cached values are never stale. ``None`` (gather per call) while training or
        compiling, for an inference tensor (no version counter), a weight whose ``.data`` cannot be
        watched, and a training layer's no-grad calls (validation): its weights are not watched.
        """
        writes = None
        if self.kernels.fixed_masks and not (torch.is_grad_enabled() or torch.compiler.is_compiling()):
            writes = None if weight.is_inference() else watch_writes(weight)
        if writes is None:
            self._cached = None
            return None
        key = (weight.data_ptr(), weight._version, writes.stamp())
        if self._cached is None or self._cached[0] != key or self._cached[1] is not structure:
            self._cached = (key, structure, active_values(weight, structure))
        return self._cached[2]
