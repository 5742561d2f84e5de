"""How the masked Linear-type layers of a run compute, from the choice of kernels to the attached ones.

The first batch of a fit runs on dense kernels while a :class:`~lightning_rigl.core.kernel_choice.TokenProbe`
records each layer's rows; then every layer gets ``"sparse"`` or ``"dense"``
(:func:`~lightning_rigl.core.kernel_choice.choose_kernels`), the same on every rank. From the next batch on the
chosen layers compute with :class:`~lightning_rigl.core.kernels.SparseKernels`, with the dense weight
gradient switched on for the steps that read it.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from torch import Tensor, nn

from lightning_rigl.core.kernel_choice import TokenProbe, can_compute_sparse, choose_kernels
from lightning_rigl.core.kernels import SparseKernels, linear_layers
from lightning_rigl.core.sparse_training import SparseTraining


class LayerKernels:
    """The kernel choice of a run (``"auto"``, ``"sparse"`` or ``"dense"``) and the kernels it attached.

    Args:
        setting: ``kernels`` as the user gave it.
        choices: Layer name to ``"sparse"`` or ``"dense"`` if already known (a resumed run).

    Example:
        >>> kernels = LayerKernels("auto")
        >>> kernels.choices is None  # chosen after the first batch
        True
    """

    def __init__(self, setting: str, choices: dict[str, str] | None = None) -> None:
        self.setting = setting
        self.choices = choices
        self._probe: TokenProbe | None = None
        self._kernels: SparseKernels | None = None
        self._run: SparseTraining | None = None  # the run whose layers the kernels serve
        # Per served layer, the mask its structure was built from: (the run's mask tensor, its version).
        self._built_from: dict[str, _MaskKey] = {}

    def begin_batch(self, model: nn.Module, sparse: SparseTraining, dense_gradient: bool) -> None:
        """Before a (micro-)batch's forward pass: record its rows (first batch), or compute with the choices.

        Args:
            model: The model whose masked layers compute.
            sparse: The run.
            dense_gradient: Whether this batch's optimizer step reads the dense weight gradient.
        """
        if self.choices is None:
            if self._probe is None:
                # The first batch runs dense and records each layer's tokens: the choice depends on them.
                self._probe = TokenProbe(linear_layers(model, list(sparse.params)))
            return
        if self._kernels is None:
            self.attach(model, sparse)
        assert self._kernels is not None
        # Masks replaced outside an update (SparseTraining.set_masks, load_state_dict) get new structures.
        self.masks_changed(sparse, [name for name in self._kernels.names if not self._in_sync(sparse, name)])
        self._kernels.set_dense_gradient(dense_gradient)  # recorded by the forward for the backward

    def end_batch(self, model: nn.Module, sparse: SparseTraining, broadcast: Callable[[dict], dict]) -> None:
        """After the first batch: choose each layer's kernels; ``broadcast`` makes rank 0's choice every rank's."""
        if self._probe is None:
            return
        self._probe.remove()
        layers = linear_layers(model, list(sparse.params))
        # Layers seen under autocast get bf16/fp16 inputs, which the CPU sparse kernels do not take.
        served = {name: layer for name, layer in layers.items() if name not in self._probe.autocast}
        every_step = sparse.method.dense_gradient == "every_step"
        choices = dict.fromkeys(sparse.params, "dense")
        choices.update(
            choose_kernels(
                served,
                sparse.masks,
                self._probe.tokens,
                self.setting,
                dense_gradient_every_step=every_step,
                input_gradient=self._probe.input_gradient,
            )
        )
        self._probe = None
        self.choices = dict(broadcast(choices))  # even if the ranks' first batches differed in length

    def attach(self, model: nn.Module, sparse: SparseTraining) -> None:
        """Make the layers chosen ``"sparse"`` compute with their active weights (structures from the masks).

        Choices restored from a checkpoint pass the checks fresh ones pass: a layer the sparse kernels cannot
        serve in this run (sharded by FSDP2 now, another dtype, no longer a served layer type) computes dense,
        with one warning naming it.
        """
        assert self.choices is not None
        layers = linear_layers(model, list(sparse.params))
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
        self._kernels = SparseKernels(chosen, sparse.masks)
        self._built_from = {name: _mask_key(sparse, name) for name in chosen}
        self._run = sparse
        sparse.kernels = self._kernels  # the gradients they write masked need no second pass

    def step_begun(self, sparse: SparseTraining) -> None:
        """A new optimizer step began within a batch (manual optimization): its backward writes what it reads."""
        if self._kernels is not None:
            self._kernels.set_dense_gradient(sparse.reading)

    def state(self) -> dict[str, Any] | None:
        """The setting and the choices, for a checkpoint; None until chosen."""
        return None if self.choices is None else {"setting": self.setting, "choices": dict(self.choices)}

    def saved_choices(self, saved: Mapping[str, Any] | None) -> dict[str, str] | None:
        """The choices of a saved :meth:`state` if it was made under this setting (else None: choose anew).

        A checkpoint moved from ``"sparse"`` to ``"dense"`` must not keep computing sparse.
        """
        return dict(saved["choices"]) if saved is not None and saved["setting"] == self.setting else None

    def already_masked(self, sparse: SparseTraining, names: Iterable[str]) -> list[str]:
        """Those of ``names`` whose gradient the sparse kernels wrote as 0 at the run's inactive positions.

        See :meth:`SparseKernels.already_masked`; a layer whose mask changed since its structure was
        built is not among them.
        """
        if not self.serving:
            return []
        assert self._kernels is not None
        return self._kernels.already_masked([name for name in names if self._in_sync(sparse, name)])

    def offer_gradients(self, names: Iterable[str]) -> None:
        """Offer the gradients of ``names``, as :meth:`already_masked` just named them, to their next backward.

        See :meth:`SparseKernels.offer_gradients`.
        """
        if self._kernels is not None:
            self._kernels.offer_gradients(names)

    @property
    def attached(self) -> bool:
        """Whether the chosen kernels are in place."""
        return self._kernels is not None

    @property
    def serving(self) -> bool:
        """Whether any layer computes with sparse kernels now."""
        return self._kernels is not None and bool(self._kernels.names)

    def masks_changed(self, sparse: SparseTraining, names: list[str]) -> None:
        """Rebuild the sparse structure of the layers among ``names``, whose masks just changed."""
        names = [name for name in names if self._kernels is not None and name in self._kernels.names]
        if names:
            assert self._kernels is not None
            for name in names:  # the changed layers' masks only: `sparse.masks` copies every layer's
                self._kernels.update_structure(name, sparse.layer_masks.whole(name))
                self._built_from[name] = _mask_key(sparse, name)

    def detach(self) -> None:
        """Give every layer its own forward back and stop recording."""
        if self._probe is not None:
            self._probe.remove()
            self._probe = None
        if self._kernels is not None:
            self._kernels.detach()
            self._kernels = None
        if self._run is not None and self._run.kernels is not None:
            self._run.kernels = None
        self._run = None
        self._built_from = {}

    def _in_sync(self, sparse: SparseTraining, name: str) -> bool:
        built = self._built_from.get(name)
        mask = sparse.layer_masks.local[name]
        return built is not None and built.tensor() is mask and built.version == mask._version


class _MaskKey(NamedTuple):
    tensor: weakref.ref[Tensor]
    version: int


def _mask_key(sparse: SparseTraining, name: str) -> _MaskKey:
    # Masks change in place at updates (a new version) or are replaced by new tensors (another object;
    # a weak reference, as a freed mask's id may come back).
    mask = sparse.layer_masks.local[name]
    return _MaskKey(weakref.ref(mask), mask._version)
