"""The forward pass under FlopCounterMode that charges each counted operation's FLOPs to its weight."""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from lightning_rigl.core.storage.layer import is_compact


def count_by_weight(model: nn.Module, example_input: Any) -> FlopsByWeight:
    """One forward pass under ``FlopCounterMode``, its FLOPs charged to the weights.

    The pass runs in eval mode, without gradients, with attention's fused fast path off and with recurrent
    layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) on their plain kernels, oneDNN and cuDNN off while they run:
    ``FlopCounterMode`` cannot see inside the fused kernels. The modules' training flags and these settings
    are restored afterwards. Operations that take a weight but have no FLOP formula are listed in
    ``.uncounted``.

    Args:
        model: Any module.
        example_input: A tensor (``model(x)``), a tuple or list (``model(*x)``) or a dict (``model(**x)``).

    Returns:
        The mode after the pass: ``.counter`` (the total), ``.flops`` and ``.density`` per weight name.

    Raises:
        ValueError: The model's forward fails on ``example_input`` (naming its shapes and the error).

    Example:
        >>> by_weight = count_by_weight(nn.Linear(4, 8), torch.randn(16, 4))
        >>> by_weight.flops, by_weight.density, by_weight.counter.get_total_flops()
        ({'weight': 1024}, {'weight': 1.0}, 1024)

    """
    modes = {module: module.training for module in model.modules()}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        model.eval()
        torch.backends.mha.set_fastpath_enabled(False)
        counter = FlopCounterMode(display=False, custom_mapping=_MISSING_FORMULAS)
        with torch.no_grad(), _plain_recurrent_kernels(model), counter, FlopsByWeight(counter, model) as by_weight:
            try:
                if isinstance(example_input, (tuple, list)):
                    model(*example_input)
                elif isinstance(example_input, dict):
                    model(**example_input)
                else:
                    model(example_input)
            except (RuntimeError, TypeError, ValueError, IndexError) as error:
                raise ValueError(
                    f"`example_input` ({_describe(example_input)}) does not fit the forward of "
                    f"{type(model).__name__}: {error}"
                ) from error
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for module, training in modes.items():
            module.train(training)
    return by_weight


class FlopsByWeight(TorchDispatchMode):
    """Sits above ``FlopCounterMode`` and charges the FLOPs it counts for each op to the op's weight.

    Attributes:
        counter: The ``FlopCounterMode`` below, whose total includes ops that multiply no weight.
        model: The module whose parameters are the weights.
        flops: Parameter name to the FLOPs of the ops that multiply by it.
        density: Parameter name to its fraction of non-zero values, read at its first counted op.
        uncounted: ``"<operator> in `<module>` (<class>)"`` for each operation that takes a module's weight
            (>= 2 dims) but has no FLOP formula, so that ``FlopCounterMode`` counts it as 0; in first-seen order.

    """

    def __init__(self, counter: FlopCounterMode, model: nn.Module) -> None:
        super().__init__()
        self.counter = counter
        self.model = model
        self.flops: dict[str, int] = {}  # parameter name -> FLOPs of the ops that multiply by it
        self.density: dict[str, float] = {}
        # id of a cast copy of a weight (autocast's) -> (a weak reference to the copy, the weight's name and
        # the weight): a freed copy's id may be reused, the reference tells.
        self.casts: dict[int, tuple[weakref.ref, str, nn.Parameter]] = {}
        self.uncounted: list[str] = []
        # The compact layers (RigLCallback(storage="compact")) whose forward runs: (weight name, density). Their
        # product multiplies by a sparse tensor made from their active values, no Parameter of the model.
        self._compact: list[tuple[str, float]] = []
        self._hooks: list[Any] = []

    def __enter__(self) -> FlopsByWeight:
        for prefix, module in self.model.named_modules():
            if is_compact(module):
                entry = (f"{prefix}.weight" if prefix else "weight", module.nnz / math.prod(module.stored_shape))
                self._hooks.append(module.register_forward_pre_hook(lambda *_, e=entry: self._compact.append(e)))
                self._hooks.append(module.register_forward_hook(self._compact_done))
        return super().__enter__()

    def _compact_done(self, *_: Any) -> None:
        self._compact.pop()  # returns None: a forward hook's return value would replace the output

    def __exit__(self, *exc: Any) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        before = self.counter.get_total_flops()
        out = func(*args, **(kwargs or {}))
        counted = self.counter.get_total_flops() - before
        if func is torch.ops.aten._to_copy.default and isinstance(out, Tensor):
            # Autocast hands matmuls a copy of the weight in the lower precision: remember whose copy it is.
            weight = self._weight_operand(args[:1], {})
            if weight is not None:
                self.casts[id(out)] = (weakref.ref(out), *weight)
        if counted:
            weight = self._weight_operand(args, kwargs)
            if weight is None and self._compact:  # a compact layer's product: charged to its weight's name
                name, density = self._compact[-1]
                self.flops[name] = self.flops.get(name, 0) + counted
                self.density.setdefault(name, density)
            elif weight is not None:
                name, param = weight
                self.flops[name] = self.flops.get(name, 0) + counted
                if name not in self.density:
                    # Read now: FLOPs of an FSDP2 weight are counted while it is gathered; it is freed after.
                    self.density[name] = _density(param)
        elif func.overloadpacket not in self.counter.flop_registry and _may_multiply_add(func):
            # Checked last: looking up the weight costs more than the tags, and most ops are views or element-wise.
            weight = self._weight_operand(args, kwargs)
            if weight is not None:
                entry = f"{func.overloadpacket} in {self._module_of(weight[0])}"
                if entry not in self.uncounted:
                    self.uncounted.append(entry)
        return out

    def _module_of(self, param_name: str) -> str:
        """The module that holds a parameter, by name and class, for a warning."""
        path = param_name.rpartition(".")[0]
        cls = type(self.model.get_submodule(path)).__name__
        return f"`{path}` ({cls})" if path else f"the model ({cls})"

    def _weight_operand(self, args: Any, kwargs: Any) -> tuple[str, nn.Parameter] | None:
        # Looked up per counted op: FSDP2 swaps in unsharded Parameters for the forward pass only.
        # A weight arrives as itself or as a view of it (a transpose, a q/k/v slice): match the base.
        # Biases (1-d) are operands of addmm and convolution too; the weight is the >= 2-d one.
        params = {id(param): (name, param) for name, param in self.model.named_parameters()}
        for tensor in tree_flatten((args, kwargs))[0]:
            if isinstance(tensor, Tensor) and tensor.dim() >= 2:
                base = tensor._base if tensor._base is not None else tensor
                if id(base) in params:
                    return params[id(base)]
                cast = self.casts.get(id(base))
                if cast is not None and cast[0]() is base:
                    return cast[1], cast[2]
        return None


@contextmanager
def _plain_recurrent_kernels(model: nn.Module) -> Iterator[None]:
    """Run the model's recurrent layers with oneDNN and cuDNN off, so that their matmuls are seen.

    On CPU an ``nn.LSTM`` runs one oneDNN kernel (``aten.mkldnn_rnn_layer``), on CUDA every recurrent layer
    one cuDNN kernel (``aten._cudnn_rnn``); ``FlopCounterMode`` has no formula for either. Their plain kernels
    compute the same products as ``mm`` / ``addmm`` per weight, which it counts and which are charged to
    ``weight_ih`` and ``weight_hh`` apart. Only these layers: cuDNN off would slow every convolution.
    """
    saved = (torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled)

    def plain(module: nn.Module, args: Any) -> None:
        torch.backends.mkldnn.enabled = torch.backends.cudnn.enabled = False

    def restore(*_: Any) -> None:
        torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled = saved

    handles = []
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            handles += [module.register_forward_pre_hook(plain), module.register_forward_hook(restore)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        restore()  # also after a forward that raised inside a recurrent layer


def _may_multiply_add(func: Any) -> bool:
    """Whether an operator without a FLOP formula may multiply by a weight it takes (so 0 FLOPs may be wrong).

    Views, element-wise ops and reductions never do (by their tags), nor copies, lookups and normalisations.
    """
    if func.is_view or any(tag in _NO_MULTIPLY_ADD_TAGS for tag in func.tags):
        return False
    return func.overloadpacket not in _NO_MULTIPLY_ADD


def _density(param: Tensor) -> float:
    if param.is_meta or not param.numel():
        return 1.0  # no values to read
    return float(torch.count_nonzero(param)) / param.numel()


def _cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    # CPU's fused attention kernel has no formula in FlopCounterMode (it would count 0): count its
    # two matmuls, Q K^T and A V, as the formula of CUDA's kernels does.
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _mv_flops(matrix_shape: Any, vector_shape: Any, *args: Any, **kwargs: Any) -> int:
    # A matrix-vector product (a Linear on an unbatched input): one multiply-add per matrix entry.
    return 2 * matrix_shape[0] * matrix_shape[1]


def _addmv_flops(self_shape: Any, matrix_shape: Any, vector_shape: Any, *args: Any, **kwargs: Any) -> int:
    return _mv_flops(matrix_shape, vector_shape)


_MISSING_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten.mv: _mv_flops,
    torch.ops.aten.addmv: _addmv_flops,
}

_NO_MULTIPLY_ADD_TAGS = (torch.Tag.pointwise, torch.Tag.reduction, torch.Tag.inplace_view)
_aten = torch.ops.aten
# Operators that take a weight without multiplying by it (no formula needed): copies and casts, lookups,
# normalisations (element-wise, as FlopCounterMode counts them) and writes into the weight.
_NO_MULTIPLY_ADD = frozenset(
    {
        _aten._to_copy,
        _aten._unsafe_view,
        _aten.cat,
        _aten.stack,
        _aten.constant_pad_nd,
        _aten.repeat,
        _aten.flip,
        _aten.roll,
        _aten.tril,
        _aten.triu,
        _aten.unsafe_split,
        _aten.unsafe_split_with_sizes,
        _aten.embedding,
        _aten._embedding_bag,
        _aten._embedding_bag_forward_only,
        _aten.index,
        _aten.index_select,
        _aten.gather,
        _aten.native_layer_norm,
        _aten.native_group_norm,
        _aten.native_batch_norm,
        _aten._native_batch_norm_legit,
        _aten._native_batch_norm_legit_no_training,
        _aten._fused_rms_norm,
        _aten._weight_norm_interface,
        _aten.copy_,
        _aten.fill_,
        _aten.zero_,
        _aten.index_put_,
        _aten.masked_scatter_,
        _aten.set_,
    }
)


def _describe(example_input: Any) -> str:
    """Shapes of the tensors in an example input, for an error message."""
    shapes = [tuple(t.shape) for t in tree_flatten(example_input)[0] if isinstance(t, Tensor)]
    kind = type(example_input).__name__
    return f"a {kind} of shape {shapes[0]}" if isinstance(example_input, Tensor) else f"a {kind} of shapes {shapes}"
