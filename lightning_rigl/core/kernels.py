"""Which masked layers compute with sparse kernels, and making them do so without changing what they store.

A layer served here keeps its Parameters, ``state_dict`` keys, optimizer and mask; only its forward
changes, to :func:`~lightning_rigl.core.sparse_linear.sparse_linear` at the mask's structure, and
:meth:`SparseKernels.detach` restores the class's own forward.
"""

from __future__ import annotations

from collections.abc import Container, Mapping

import torch
from torch import Tensor, nn

from lightning_rigl.core.sharding import is_sharded
from lightning_rigl.core.sparse_linear import SPARSE_DTYPES, SparseStructure, active_values, sparse_linear

KERNELS = ("auto", "sparse", "dense")

# Calibration of the "auto" rule: `benchmarks/sparse_kernels.py` on a quiet 2-core CPU, fp32, 2026-11-25
# (BENCHMARKS.md, "Sparse kernels"). Each row (min tokens, min weights, max density) holds where every measured
# cell of that size and those tokens was at most about 0.9x of dense, most of them 0.5-0.85x; the rule takes the
# most permissive row a layer meets. Layers under 2^19 weights (256x256) and fewer than 32 rows never won.
# "train": forward, input gradient and weight gradient; "train_no_input_grad": a first layer, whose input
# needs no gradient (dense autograd skips that product too); "inference": the forward alone.
_LIMITS: dict[str, tuple[tuple[int, int, float], ...]] = {
    "train": ((256, 1 << 19, 0.05), (32, 1 << 20, 0.05), (256, 1 << 20, 0.10), (32, 1 << 21, 0.10)),
    "train_no_input_grad": (
        (256, 1 << 19, 0.10),
        (32, 1 << 20, 0.05),
        (256, 1 << 20, 0.10),
        (32, 1 << 21, 0.10),
        (256, 1 << 21, 0.13),
    ),
    "inference": ((64, 1 << 19, 0.05), (32, 1 << 20, 0.05), (32, 1 << 21, 0.10), (64, 1 << 21, 0.12)),
}


def choose_kernel(
    out_features: int,
    in_features: int,
    density: float,
    tokens: int,
    *,
    device_type: str = "cpu",
    dtype: torch.dtype = torch.float32,
    dense_gradient_every_step: bool = False,
    backward: bool = True,
    input_gradient: bool = True,
) -> str:
    """``"sparse"`` or ``"dense"``: the kernels a Linear layer should compute with, by a fixed rule.

    The rule is a deterministic function of its arguments (no timing), so every rank and every
    resumed run chooses alike. Sparse only on CPU (CUDA is not measured), in float32/float64 (the CPU
    sparse kernels have no bf16/fp16), when the dense weight gradient is not needed at every step
    (SNFS), and at densities where ``benchmarks/sparse_kernels.py`` measured sparse faster on the
    layer's size and tokens (rows of the flattened input).

    Args:
        out_features: Rows of the logical weight ``W`` (y = x W^T).
        in_features: Columns of ``W``.
        density: Fraction of active weights.
        tokens: Rows of the flattened input per call (batch x sequence).
        device_type: ``"cpu"``, ``"cuda"``, ...
        dtype: The weight's dtype.
        dense_gradient_every_step: The method reads the dense weight gradient at every step.
        backward: Training (forward and backward products); ``False`` for inference.
        input_gradient: The layer's input needs a gradient (``False`` for a first layer: no such product).

    Example:
        >>> choose_kernel(4096, 4096, 0.05, 256), choose_kernel(4096, 4096, 0.05, 256, dtype=torch.bfloat16)
        ('sparse', 'dense')
        >>> choose_kernel(256, 256, 0.05, 256), choose_kernel(4096, 4096, 0.05, 1)
        ('dense', 'dense')
        >>> choose_kernel(4096, 784, 0.12, 256), choose_kernel(4096, 784, 0.12, 256, input_gradient=False)
        ('dense', 'sparse')

    """
    if device_type != "cpu" or dtype not in SPARSE_DTYPES or dense_gradient_every_step:
        return "dense"
    limits = _LIMITS["train" if input_gradient else "train_no_input_grad"] if backward else _LIMITS["inference"]
    size = out_features * in_features
    best = max(
        (limit for min_tokens, min_size, limit in limits if tokens >= min_tokens and size >= min_size), default=0
    )
    return "sparse" if density <= best else "dense"


def weight_in_out(module: nn.Module) -> bool | None:
    """How a served module stores its weight; ``None`` for a module the sparse kernels do not serve.

    ``False``: as (out, in), like ``nn.Linear``. ``True``: as (in, out), like Hugging Face ``Conv1D``.

    Example:
        >>> weight_in_out(nn.Linear(2, 3)), weight_in_out(nn.Conv1d(2, 3, 1))
        (False, None)

    """
    if isinstance(module, nn.Linear):
        return False
    # Matched by name: the core does not import transformers.
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return True
    return None


def linear_layers(model: nn.Module, names: list[str] | None = None) -> dict[str, tuple[nn.Module, nn.Parameter]]:
    """Parameter name to (module, weight) for each ``weight`` of a served module, among ``names`` (all if None).

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.Conv1d(3, 3, 1), nn.Linear(3, 1))
        >>> list(linear_layers(model))
        ['0.weight', '2.weight']

    """
    layers = {}
    for prefix, module in model.named_modules():
        name = f"{prefix}.weight" if prefix else "weight"
        if weight_in_out(module) is not None and (names is None or name in names):
            layers[name] = (module, module.weight)
    return layers


def logical_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a served module's weight as a Linear sees it."""
    rows, cols = module.weight.shape
    return (cols, rows) if weight_in_out(module) else (rows, cols)


def choose_kernels(
    layers: Mapping[str, tuple[nn.Module, Tensor]],
    masks: Mapping[str, Tensor],
    tokens: int | Mapping[str, int],
    kernels: str = "auto",
    *,
    dense_gradient_every_step: bool = False,
    backward: bool = True,
    input_gradient: Container[str] | None = None,
) -> dict[str, str]:
    """Layer name to ``"sparse"`` or ``"dense"``: :func:`choose_kernel` per layer for ``"auto"``.

    ``"sparse"`` forces sparse wherever the kernels can run (float32/float64 weights, not sharded by
    FSDP2); ``"dense"`` is dense. ``tokens`` is one count for every layer, or a count per layer name
    (as :class:`TokenProbe` records them): a layer without a count stays dense. ``input_gradient``
    names the layers whose input needs a gradient (None: every layer's does).

    Example:
        >>> layers = linear_layers(nn.Sequential(nn.Linear(1024, 1024)))
        >>> choose_kernels(layers, {"0.weight": torch.rand(1024, 1024) < 0.03}, tokens=256)
        {'0.weight': 'sparse'}

    """
    if kernels not in KERNELS:
        raise ValueError(f"`kernels` must be one of {KERNELS}, got {kernels!r}.")
    choices = {}
    for name, (module, weight) in layers.items():
        rows = tokens.get(name) if isinstance(tokens, Mapping) else tokens
        if kernels == "dense" or rows is None or weight.dtype not in SPARSE_DTYPES or is_sharded(weight):
            choices[name] = "dense"
        elif kernels == "sparse":
            choices[name] = "sparse"
        else:
            density = float(masks[name].count_nonzero()) / max(masks[name].numel(), 1)
            choices[name] = choose_kernel(
                *logical_shape(module),
                density,
                rows,
                device_type=weight.device.type,
                dtype=weight.dtype,
                dense_gradient_every_step=dense_gradient_every_step,
                backward=backward,
                input_gradient=input_gradient is None or name in input_gradient,
            )
    return choices


class TokenProbe:
    """Records the rows of each layer's flattened input (batch x sequence) while attached.

    A forward pre-hook per layer keeps the smallest row count it saw, and notes the layers called
    under autocast (the CPU sparse kernels have no bf16/fp16: those layers should stay dense) and
    those whose input needed a gradient (a first layer's does not, which makes its backward cheaper).
    Layers never called while attached are absent from :attr:`tokens`.

    Args:
        layers: Name to (module, weight), e.g. from :func:`linear_layers`.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
        >>> probe = TokenProbe(linear_layers(model))
        >>> _ = model(torch.randn(5, 7, 4))
        >>> probe.remove()
        >>> probe.tokens, probe.autocast, probe.input_gradient
        ({'0.weight': 35, '1.weight': 35}, set(), {'1.weight'})

    """

    def __init__(self, layers: Mapping[str, tuple[nn.Module, Tensor]]) -> None:
        self.tokens: dict[str, int] = {}
        self.autocast: set[str] = set()
        self.input_gradient: set[str] = set()
        self._handles = [module.register_forward_pre_hook(self._hook(name)) for name, (module, _) in layers.items()]

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], Tensor) or args[0].dim() == 0:
                return
            x = args[0]
            rows = x.numel() // max(x.shape[-1], 1)
            self.tokens[name] = min(rows, self.tokens.get(name, rows))
            if torch.is_autocast_enabled(x.device.type):
                self.autocast.add(name)
            if torch.is_grad_enabled() and x.requires_grad:
                self.input_gradient.add(name)

        return record

    def remove(self) -> None:
        """Remove the hooks; what was recorded stays."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class SparseKernels:
    """Makes Linear-type layers compute with their active weights only, storing nothing new in them.

    Each layer's ``forward`` becomes :func:`~lightning_rigl.core.sparse_linear.sparse_linear` at
    the structure of its mask. Parameters, ``state_dict`` keys, the optimizer and the masks stay as
    they are; :meth:`detach` restores the class's forward. Inputs the kernels cannot take (bf16/fp16,
    or any autocast region) run the layer's own dense forward for that call.

    Drive it from the training loop: :meth:`set_dense_gradient` before the forward pass of every
    step (every micro-batch of it) whose dense weight gradient is read (RigL's update steps), and
    :meth:`update_structure` after each topology update.

    Args:
        layers: Name to (module, its ``weight``), e.g. from :func:`linear_layers`; ``nn.Linear`` or
            Hugging Face ``Conv1D``.
        masks: Name to bool mask of the weight's stored shape (True = active).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3))
        >>> mask = torch.rand(3, 4) < 0.5
        >>> kernels = SparseKernels(linear_layers(model), {"0.weight": mask})
        >>> x = torch.randn(2, 4)
        >>> torch.allclose(model(x), x @ (model[0].weight * mask).T + model[0].bias)
        True
        >>> kernels.detach()

    """

    def __init__(self, layers: Mapping[str, tuple[nn.Module, Tensor]], masks: Mapping[str, Tensor]) -> None:
        self.dense_gradient = False
        self._modules: dict[str, nn.Module] = {}
        self._structures: dict[str, SparseStructure] = {}
        for name, (module, weight) in layers.items():
            if weight_in_out(module) is None or module.weight is not weight:
                raise ValueError(f"{name!r} must be the `weight` of an nn.Linear or a Hugging Face Conv1D.")
            if "forward" in vars(module):
                raise ValueError(f"The module of {name!r} already has its own forward (attached twice?).")
            self._modules[name] = module
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

    def update_structure(self, name: str, mask: Tensor) -> None:
        """Rebuild a layer's structure from its new mask (after a topology update)."""
        module = self._modules[name]
        if tuple(mask.shape) != tuple(module.weight.shape):
            raise ValueError(f"The mask of {name!r} must have the weight's shape {tuple(module.weight.shape)}.")
        structure = SparseStructure.from_mask(mask.to(module.weight.device), bool(weight_in_out(module)))
        self._structures[name] = structure

    def detach(self) -> None:
        """Give every layer its class's forward back; the layers compute densely again."""
        for module in self._modules.values():
            if isinstance(vars(module).get("forward"), _SparseForward):
                del module.forward
        self._modules.clear()
        self._structures.clear()

    def _structure(self, name: str, device: torch.device) -> SparseStructure:
        structure = self._structures[name]
        if structure.crow.device != device:  # the model moved since the structure was built
            structure = self._structures[name] = structure.to(device)
        return structure


class _SparseForward:
    """A served layer's forward: the sparse op, or the class's own forward for inputs it cannot take."""

    def __init__(self, kernels: SparseKernels, name: str, module: nn.Module) -> None:
        self.kernels, self.name, self.module = kernels, name, module
        self.in_out = bool(weight_in_out(module))
        # Inference only: ((the weight's address, its version), the structure, the active values).
        self._cached: tuple[tuple[int, int], SparseStructure, Tensor] | None = None

    def __call__(self, x: Tensor) -> Tensor:
        module, weight = self.module, self.module.weight
        if x.dtype != weight.dtype or weight.dtype not in SPARSE_DTYPES or torch.is_autocast_enabled(x.device.type):
            return type(module).forward(module, x)
        structure = self.kernels._structure(self.name, weight.device)
        values = self._inference_values(weight, structure)
        return sparse_linear(x, weight, module.bias, structure, self.kernels.dense_gradient, self.in_out, values)

    def _inference_values(self, weight: Tensor, structure: SparseStructure) -> Tensor | None:
        """Without autograd, the active values gathered once and again only when the weight changes.

        Any in-place write bumps the weight's version and a new tensor has another address, so a
        cached gather is never stale. ``None`` (gather per call) while training, compiling, or for an
        inference tensor (no version counter).
        """
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or weight.is_inference():
            self._cached = None
            return None
        key = (weight.data_ptr(), weight._version)
        if self._cached is None or self._cached[0] != key or self._cached[1] is not structure:
            self._cached = (key, structure, active_values(weight, structure))
        return self._cached[2]
