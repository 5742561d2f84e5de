"""Compact layers: the masked dense layer's numbers from the active values alone; their state, copies, construction."""

import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_rigl.core.storage import (
    Capture,
    compact_state_dict,
    dense_state_dict,
    densify,
    draw_positions,
    is_compact,
    make_compact,
)
from lightning_rigl.core.topology.initial_masks import random_mask

F64 = dict(rtol=1e-10, atol=1e-12)


def dense_layer(kind="linear", n_in=9, n_out=6, dtype=torch.float64, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=bias, dtype=dtype) if kind == "linear" else Conv1D(n_out, n_in).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen, dtype=dtype))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen, dtype=dtype))
    mask = torch.rand(layer.weight.shape, generator=gen) < 0.4
    with torch.no_grad():
        layer.weight.mul_(mask)  # the masked dense layer: zero where inactive
    return layer, mask


def signed_input(*shape, dtype=torch.float64, seed=1):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 3).requires_grad_()


def outputs_and_grads(layer, x, params, seed=2):
    y = layer(x)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    return (y, *torch.autograd.grad(y, [x, *params], upstream))


def active_mask(layer):
    """The compact layer's mask, built densely here to compare with the dense layer's (a test only)."""
    flat = torch.zeros(math.prod(layer.stored_shape), dtype=torch.bool)
    flat[layer.compact_structure.stored_index(layer.weight_in_out)] = True
    return flat.view(layer.stored_shape)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("shape", [(5, 9), (2, 3, 9)])
def test_outputs_and_gradients_equal_the_masked_dense_layer_in_float64(kind, shape):
    dense, mask = dense_layer(kind)
    compact = make_compact(copy.deepcopy(dense), mask)
    x = signed_input(*shape)
    y, grad_x, grad_w, grad_b = outputs_and_grads(dense, x, [dense.weight, dense.bias])
    cy, cgrad_x, grad_values, cgrad_b = outputs_and_grads(compact, x, [compact.weight_values, compact.bias])
    torch.testing.assert_close(cy, y, **F64)
    torch.testing.assert_close(cgrad_x, grad_x, **F64)
    torch.testing.assert_close(cgrad_b, grad_b, **F64)
    # The values' gradient is the dense gradient at the active positions, in CSR order.
    index = compact.compact_structure.stored_index(compact.weight_in_out)
    torch.testing.assert_close(grad_values, grad_w.reshape(-1)[index], **F64)
    assert grad_values.shape == (int(mask.sum()),)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_the_layer_keeps_its_class_and_holds_no_dense_tensor(kind):
    dense, mask = dense_layer(kind)
    expected, base = dense.weight.detach().clone(), type(dense)
    layer = make_compact(dense, mask)
    assert layer is dense and isinstance(layer, base) and type(layer) is not base and is_compact(layer)
    assert [name for name, _ in layer.named_parameters()] == ["weight_values", "bias"]
    assert all(t.numel() < mask.numel() for t in layer.state_dict().values() if isinstance(t, torch.Tensor))
    assert not list(layer.buffers())
    # Index tensors: 12 bytes an active weight, plus the row pointers.
    assert layer.compact_structure.nbytes <= 12 * layer.nnz + 4 * (sum(mask.shape) + 2)
    torch.testing.assert_close(layer.weight, expected, rtol=0, atol=0)
    assert torch.equal(active_mask(layer), mask)


def test_reading_weight_is_differentiable_and_writing_it_raises():
    layer = make_compact(*dense_layer())
    layer.weight.pow(2).sum().backward()  # a regularizer on the dense weight reaches the values
    torch.testing.assert_close(layer.weight_values.grad, 2 * layer.weight_values.detach())
    for value in (nn.Parameter(torch.zeros(6, 9)), torch.zeros(6, 9)):
        with pytest.raises(AttributeError, match="stores only its active weights"):
            layer.weight = value


def test_a_second_derivative_raises_a_clear_error():
    layer = make_compact(*dense_layer())
    x = signed_input(4, 9)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(layer(x).sum(), x, create_graph=True)


def test_bf16_autocast_computes_in_the_layers_float32():
    layer = make_compact(*dense_layer(dtype=torch.float32))
    x = torch.randn(4, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, layer(x))
    with pytest.raises(RuntimeError, match="dtype"):
        layer(x.double())


def test_capture_keeps_each_backwards_input_and_output_gradient():
    layer = make_compact(*dense_layer())
    layer.capture = Capture()
    for seed in (1, 2):
        x = signed_input(2, 3, 9, seed=seed)
        layer(x).sum().backward()
    assert [tuple(x.shape) for x, _ in layer.capture.pairs] == [(6, 9), (6, 9)]
    assert [tuple(g.shape) for _, g in layer.capture.pairs] == [(6, 6), (6, 6)]


def test_state_dict_round_trips_bit_exactly_into_a_fresh_layer_of_another_density(tmp_path):
    layer = make_compact(*dense_layer(kind="conv1d"))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = make_compact(Conv1D(6, 9).double(), torch.ones(9, 6, dtype=torch.bool))
    values = fresh.weight_values
    fresh.load_state_dict(saved)
    assert fresh.weight_values is values  # the same Parameter, resized: an optimizer built later sees it
    again = fresh.state_dict()
    assert list(again) == list(layer.state_dict())
    assert torch.equal(again["weight_values"], layer.weight_values.detach())
    for key in ("crow", "col"):
        assert torch.equal(again["_extra_state"][key], layer.state_dict()["_extra_state"][key])
    x = signed_input(3, 9)
    assert torch.equal(fresh(x), layer(x))


def test_a_compact_state_dict_converts_to_the_plain_models_and_back():
    dense, mask = dense_layer()
    plain = copy.deepcopy(dense)
    layer = make_compact(dense, mask)
    converted = dense_state_dict({f"fc.{k}": v for k, v in layer.state_dict().items()})
    assert list(converted) == ["fc.weight", "fc.bias"]
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(9, 6, dtype=torch.float64))
    model.load_state_dict(converted)
    assert torch.equal(model.fc.weight, plain.weight)
    back = compact_state_dict(model.state_dict(), {"fc.weight": mask})
    assert torch.equal(back["fc.weight_values"], layer.weight_values.detach())
    fresh = nn.Sequential()
    fresh.add_module("fc", make_compact(nn.Linear(9, 6, dtype=torch.float64), mask))
    fresh.load_state_dict(back)
    assert torch.equal(fresh.fc.weight, plain.weight)


def test_copies_and_pickles_are_independent_compact_layers():
    layer = make_compact(*dense_layer(kind="conv1d"))
    x = signed_input(3, 9)
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert type(copied) is type(layer) and torch.equal(copied(x), layer(x))
        with torch.no_grad():
            copied.weight_values.add_(1)
        assert not torch.equal(copied(x), layer(x))


def test_densify_gives_the_plain_layer_back():
    dense, mask = dense_layer(kind="conv1d")
    expected = dense.weight.detach().clone()
    layer = densify(make_compact(dense, mask))
    assert type(layer) is Conv1D and isinstance(layer.weight, nn.Parameter)
    assert torch.equal(layer.weight, expected) and list(dict(layer.named_parameters())) == ["weight", "bias"]


def test_moving_the_layer_moves_its_structure():
    layer = make_compact(*dense_layer(dtype=torch.float32)).double()
    assert layer.weight_values.dtype == torch.float64
    assert layer(signed_input(2, 9)).dtype == torch.float64


def test_a_layer_built_on_meta_draws_nn_linears_initialisation_for_its_active_values_only():
    with torch.device("meta"):
        layer = nn.Linear(400, 300)
    positions = draw_positions(400 * 300, 6000, torch.Generator().manual_seed(0))
    make_compact(layer, positions=positions, generator=torch.Generator().manual_seed(1))
    values, bound = layer.weight_values.detach(), 1 / math.sqrt(400)
    assert values.device.type == "cpu" and values.shape == (6000,) and layer.bias.device.type == "cpu"
    assert values.abs().max() <= bound and layer.bias.abs().max() <= bound
    assert abs(values.std().item() - bound / math.sqrt(3)) < 0.05 * bound  # uniform in [-bound, bound]
    assert torch.equal(layer.compact_structure.stored_index(False), positions)


def test_meta_conv1d_draws_its_normal_init_and_a_user_init_function_replaces_it():
    with torch.device("meta"):
        conv, linear = Conv1D(300, 400), nn.Linear(40, 30)
    make_compact(conv, positions=draw_positions(400 * 300, 6000, torch.Generator().manual_seed(0)))
    assert abs(conv.weight_values.std().item() - 0.02) < 0.002 and not conv.bias.any()
    seen = []

    def init(values, shape):
        seen.append(shape)
        values.fill_(0.5)

    make_compact(linear, positions=torch.tensor([3, 7, 100]), init=init)
    assert seen == [(30, 40)] and linear.weight_values.tolist() == [0.5] * 3


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((nn.Conv1d(2, 3, 1), torch.ones(3, 2, 1, dtype=torch.bool)), {}, "Linear-type"),
        ((nn.Linear(2, 3),), {}, "exactly one of"),
        ((nn.Linear(2, 3), torch.ones(2, 3, dtype=torch.bool)), {}, r"shape \(3, 2\)"),
        ((nn.Linear(2, 3),), {"positions": torch.tensor([6])}, r"\[0, 6\)"),
        ((nn.Linear(2, 3),), {"positions": torch.tensor([1, 1])}, "distinct"),
        ((nn.Linear(2, 3),), {"positions": torch.tensor([1]), "init": print}, "meta device"),
    ],
)
def test_bad_construction_arguments_raise_naming_them(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_compact(*args, **kwargs)


def test_draw_positions_equals_random_mask_below_the_limit_and_draws_distinct_positions_above():
    for shape, n in (((7, 11), 20), ((64, 64), 300)):
        expected = random_mask(shape, n, torch.Generator().manual_seed(3)).reshape(-1).nonzero().flatten()
        assert torch.equal(draw_positions(math.prod(shape), n, torch.Generator().manual_seed(3)), expected)
    drawn = draw_positions(10_000, 9_000, torch.Generator().manual_seed(3), permutation_limit=100)
    assert drawn.numel() == 9_000 and bool((drawn.diff() > 0).all()) and 0 <= drawn[0] and drawn[-1] < 10_000
    again = draw_positions(10_000, 9_000, torch.Generator().manual_seed(3), permutation_limit=100)
    assert torch.equal(drawn, again)
    # Uniform: each tenth of the layer holds about a tenth of the draws of a sparse draw.
    sparse = draw_positions(10**7, 20_000, torch.Generator().manual_seed(4), permutation_limit=100)
    counts = torch.bincount(sparse // 10**6, minlength=10)
    assert int(counts.min()) > 1_700 and int(counts.max()) < 2_300
    with pytest.raises(ValueError, match="n_active"):
        draw_positions(10, 11, torch.Generator())


def test_random_mask_positions_give_the_same_layer_as_the_mask():
    mask = random_mask((6, 9), 20, torch.Generator().manual_seed(0))
    dense, _ = dense_layer()
    from_mask = make_compact(copy.deepcopy(dense), mask)
    from_positions = make_compact(dense, positions=draw_positions(54, 20, torch.Generator().manual_seed(0)))
    assert torch.equal(from_mask.weight, from_positions.weight)


def test_torch_compile_aot_eager_fullgraph_gives_the_eager_outputs_and_gradients():
    layer = make_compact(*dense_layer(dtype=torch.float32))
    model = nn.Sequential(layer, nn.ReLU())
    x = signed_input(2, 3, 9, dtype=torch.float32)
    eager_y = model(x)
    eager_y.sum().backward()
    eager_grad = layer.weight_values.grad.clone()
    layer.weight_values.grad = None
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, eager_y)
    torch.testing.assert_close(layer.weight_values.grad, eager_grad)


def test_the_ever_active_record_is_a_list_until_bits_are_smaller_and_keeps_every_position():
    from lightning_rigl.core.state.packing import pack_bits
    from lightning_rigl.core.storage.ever_active import EverActive

    generator = torch.Generator().manual_seed(5)
    numel = 4096  # bits: 512 bytes, the size of 128 int32 positions
    record, seen = EverActive(numel, torch.tensor([4095, 0, 17])), {0, 17, 4095}
    while not record.is_bits:
        assert record.positions().numel() * 4 <= numel // 8
        new = torch.randint(0, numel, (40,), generator=generator)
        record.add(new)
        seen |= set(new.tolist())
        assert record.positions().tolist() == sorted(seen) and record.count == len(seen)
    for _ in range(3):  # as bits: the same positions, counted as they are set
        new = torch.randint(0, numel, (300,), generator=generator)
        record.add(new)
        seen |= set(new.tolist())
        assert record.positions().tolist() == sorted(seen) and record.count == len(seen)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[sorted(seen)] = True
    assert torch.equal(record.packed(), pack_bits(mask))
    assert record.state().dtype == torch.uint8 and record.state().numel() == numel // 8
    restored = EverActive.from_state(numel, record.state())
    assert restored.count == len(seen) and restored.positions().tolist() == sorted(seen)
