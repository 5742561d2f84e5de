"""Which masked Linear-type layers compute with sparse kernels: a fixed rule, and the probe that feeds it.

The rule (:func:`choose_kernel`) is calibrated by ``benchmarks/sparse_kernels.py``; it depends on the
layer's shape and density, the rows of its input, whether that input needs a gradient, the device and
the dtype, never on a timing taken during the run, so every rank and every resumed run chooses alike.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from lightning_rigl.core.kernels.served_layers import logical_shape
from lightning_rigl.core.kernels.sparse_linear import SPARSE_DTYPES
from lightning_rigl.core.parallel.sharding import is_sharded
from lightning_rigl.core.validation import check_choice

Kernels = Literal["auto", "sparse", "dense"]
KERNELS: tuple[str, ...] = get_args(Kernels)


def check_kernels(kernels: object) -> str:
    """``kernels`` if it is one of :data:`KERNELS`; else the one error every entry point gives.

    Example:
        >>> check_kernels("auto")
        'auto'
    """
    return check_choice("kernels", kernels, KERNELS)


# Calibration of the "auto" rule: `benchmarks/sparse_kernels.py` (fp32, cold caches, the dense side charged with
# the gradient-masking pass the sparse path skips; BENCHMARKS.md, "Sparse kernels"). Each row (min tokens, min
# weights, max density) holds where every measured cell of that size and those tokens was at most about 0.9x of
# dense; the rule takes the most permissive row a layer meets. "train": forward, input gradient and weight
# gradient; "train_no_input_grad": a first layer, whose input needs no gradient (dense autograd skips that
# product too); "inference": the forward alone. Layers under 2^19 weights lost at nearly every batch size.
_LIMITS: dict[str, tuple[tuple[int, int, float], ...]] = {
    "train": (
        (256, 1 << 19, 0.05),
        (16, 1 << 20, 0.05),
        (32, 1 << 20, 0.10),
        (64, 1024 * 784, 0.10),
        (16, 1 << 21, 0.10),
    ),
    "train_no_input_grad": (
        (256, 1 << 19, 0.10),
        (32, 1 << 20, 0.10),
        (16, 1 << 21, 0.10),
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
        >>> from lightning_rigl.core.kernels.served_layers import linear_layers
        >>> layers = linear_layers(nn.Sequential(nn.Linear(1024, 1024)))
        >>> choose_kernels(layers, {"0.weight": torch.rand(1024, 1024) < 0.03}, tokens=256)
        {'0.weight': 'sparse'}

    """
    choices = {}
    for name, (module, weight) in layers.items():
        rows = tokens.get(name) if isinstance(tokens, Mapping) else tokens
        if kernels == "dense" or rows is None or not can_compute_sparse(weight):
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


def can_compute_sparse(weight: Tensor) -> bool:
    """Whether the sparse kernels can take ``weight``: float32/float64 and not sharded by FSDP2.

    Example:
        >>> can_compute_sparse(torch.zeros(2, 2)), can_compute_sparse(torch.zeros(2, 2, dtype=torch.bfloat16))
        (True, False)
    """
    return weight.dtype in SPARSE_DTYPES and not is_sharded(weight)


class TokenProbe:
    """Records the rows of each layer's flattened input (batch x sequence) while attached.

    A forward pre-hook per layer keeps the smallest row count it saw, and notes the layers called
    under autocast (the CPU sparse kernels have no bf16/fp16: those layers should stay dense) and
    those whose input needed a gradient (a first layer's does not, which makes its backward cheaper).
    Layers never called while attached are absent from :attr:`tokens`.

    Args:
        layers: Name to (module, weight), e.g. from :func:`linear_layers`.

    Example:
        >>> from lightning_rigl.core.kernels.served_layers import linear_layers
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
