"""How the masked Linear-type layers of a run compute, from the choice of kernels to the attached ones.

The run (:class:`~lightning_rigl.core.SparseTraining`) owns one :class:`LayerKernels` and drives it from its
own step calls, so any loop gets what RigLCallback gets. The first step of a run computes on dense kernels
while a :class:`~lightning_rigl.core.kernels.choice.TokenProbe` records each layer's rows; after it every
layer gets ``"sparse"`` or ``"dense"`` (:func:`~lightning_rigl.core.kernels.choice.choose_kernels`), the same
on every rank. From the next forward on, the chosen layers compute with
:class:`~lightning_rigl.core.kernels.sparse_kernels.SparseKernels`, with the dense weight gradient for the
steps that read it.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from torch import Tensor, nn

from lightning_rigl.core.kernels.choice import TokenProbe, can_compute_sparse, check_kernels, choose_kernels
from lightning_rigl.core.kernels.served_layers import linear_layers
from lightning_rigl.core.kernels.sparse_kernels import SparseKernels
from lightning_rigl.core.topology.masks import LayerMasks
from lightning_rigl.core.user_hooks import UserCodeHooks


class LayerKernels:
    """The kernel choice of a run (``"auto"``, ``"sparse"`` or ``"dense"``) and the kernels it attached.

    Args:
        setting: ``kernels`` as the user gave it.
        masks: The run's masks.
        hooks: The run's gradient hooks, told which kernels write gradients masked.
        dense_gradient_every_step: The method reads the dense gradient at every step (SNFS).

    Example:
        >>> layer = nn.Linear(4, 4)
        >>> masks = LayerMasks({"weight": layer.weight})
        >>> kernels = LayerKernels("auto", masks, UserCodeHooks(masks, lambda: False))
        >>> kernels.choices is None  # chosen after the first step
        True
    """

    def __init__(
        self, setting: str, masks: LayerMasks, hooks: UserCodeHooks, dense_gradient_every_step: bool = False
    ) -> None:
        self.setting = check_kernels(setting)
        self.masks, self.hooks = masks, hooks
        self.every_step = dense_gradient_every_step
        self.choices: dict[str, str] | None = None
        self._probe: TokenProbe | None = None
        self._kernels: SparseKernels | None = None
        # Per served layer, the mask its structure was built from: (the run's mask tensor, its version).
        self._built_from: dict[str, _MaskKey] = {}

    def begin(self, model: nn.Module, dense_gradient: bool) -> None:
        """Before a forward pass: record its rows (first step), or compute with the choices.

        Args:
            model: The model whose masked layers compute.
            dense_gradient: Whether the optimizer step this forward feeds reads the dense weight gradient.
        """
        if self.choices is None:
            if self._probe is None and self.setting != "dense":
                # The first step runs dense and records each layer's rows: the choice depends on them.
                self._probe = TokenProbe(linear_layers(model, list(self.masks.params)))
            return
        if self._kernels is None:
            self.attach(model)
        assert self._kernels is not None
        # Masks replaced outside an update (SparseTraining.set_masks, load_state_dict) get new structures.
        self.masks_changed([name for name in self._kernels.names if not self._in_sync(name)])
        self._kernels.set_dense_gradient(dense_gradient)  # recorded by the forward for the backward

    def choose(self, model: nn.Module, broadcast: Callable[[dict], dict]) -> None:
        """After the first step: choose each layer's kernels; ``broadcast`` makes rank 0's choice every rank's."""
        if self.choices is not None:
            return
        choices = dict.fromkeys(self.masks.params, "dense")
        if self._probe is not None:
            self._probe.remove()
            layers = linear_layers(model, list(self.masks.params))
            # Layers seen under autocast get bf16/fp16 inputs, which the CPU sparse kernels do not take.
            served = {name: layer for name, layer in layers.items() if name not in self._probe.autocast}
            masks = {name: self.masks.whole(name) for name in served}
            choices.update(
                choose_kernels(
                    served,
                    masks,
                    self._probe.tokens,
                    self.setting,
                    dense_gradient_every_step=self.every_step,
                    input_gradient=self._probe.input_gradient,
                )
            )
            self._probe = None
        self.choices = dict(broadcast(choices))  # even if the ranks' first batches differed in length

    def attach(self, model: nn.Module) -> None:
        """Make the layers chosen ``"sparse"`` compute with their active weights (structures from the masks).

        Choices restored from a checkpoint pass the checks fresh ones pass: a layer the sparse kernels cannot
        serve in this run (sharded by FSDP2 now, another dtype, no longer a served layer type) computes dense,
        with one warning naming it.
        """
        assert self.choices is not None
        layers = linear_layers(model, list(self.masks.params))
        wanted = [name for name, choice in self.choices.items() if choice == "sparse"]
        chosen = {name: layers[name] for name in wanted if name in layers and can_compute_sparse(layers[name][1])}
        refused = [name for name in wanted if name not in chosen]
        if refused:
            warnings.warn(
                f"The sparse kernels cannot serve {refused} in this run (sharded by FSDP2, not float32/float64, or "
                "not an nn.Linear-type layer running its own forward): they compute on dense kernels.",
                stacklevel=2,
            )
            self.choices.update(dict.fromkeys(refused, "dense"))
        self._kernels = SparseKernels(chosen, {name: self.masks.whole(name) for name in chosen})
        self._built_from = {name: self._mask_key(name) for name in chosen}
        self.hooks.kernels = self._kernels  # the gradients they write masked need no second pass

    def state(self) -> dict[str, Any] | None:
        """The setting and the choices, for a checkpoint; None until chosen."""
        return None if self.choices is None else {"setting": self.setting, "choices": dict(self.choices)}

    def load_state(self, saved: Mapping[str, Any] | None) -> None:
        """Take the choices of a saved :meth:`state` if it was made under this setting (else choose anew).

        A checkpoint moved from ``"sparse"`` to ``"dense"`` must not keep computing sparse.
        """
        if saved is not None and saved["setting"] == self.setting:
            self.detach()
            self.choices = dict(saved["choices"])

    def already_masked(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` whose gradient the sparse kernels wrote as 0 at the run's inactive positions.

        See :meth:`SparseKernels.already_masked`; a layer whose mask changed since its structure was
        built is not among them.
        """
        if not self.serving:
            return []
        assert self._kernels is not None
        return self._kernels.already_masked([name for name in names if self._in_sync(name)])

    def offer_gradients(self, names: Iterable[str]) -> None:
        """Offer the gradients of ``names``, as :meth:`already_masked` just named them, to their next backward.

        See :meth:`SparseKernels.offer_gradients`.
        """
        if self._kernels is not None:
            self._kernels.offer_gradients(names)

    @property
    def serving(self) -> bool:
        """Whether any layer computes with sparse kernels now."""
        return self._kernels is not None and bool(self._kernels.names)

    def masks_changed(self, names: Iterable[str]) -> None:
        """Rebuild the sparse structure of the layers among ``names``, whose masks just changed."""
        if self._kernels is None:
            return
        for name in [name for name in names if name in self._kernels.names]:
            self._kernels.update_structure(name, self.masks.whole(name))
            self._built_from[name] = self._mask_key(name)

    def detach(self) -> None:
        """Give every layer its own forward back and stop recording; the choices stay."""
        if self._probe is not None:
            self._probe.remove()
            self._probe = None
        if self._kernels is not None:
            self._kernels.detach()
            self._kernels = None
            self.hooks.kernels = None
        self._built_from = {}

    def _in_sync(self, name: str) -> bool:
        built = self._built_from.get(name)
        mask = self.masks.local[name]
        return built is not None and built.tensor() is mask and built.version == mask._version

    def _mask_key(self, name: str) -> _MaskKey:
        # Masks change in place at updates (a new version) or are replaced by new tensors (another object;
        # a weak reference, as a freed mask's id may come back).
        mask = self.masks.local[name]
        return _MaskKey(weakref.ref(mask), mask._version)


class _MaskKey(NamedTuple):
    tensor: weakref.ref[Tensor]
    version: int
