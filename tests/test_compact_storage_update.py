"""Compact layers' RigL updates: the dense path's masks and weights in float64, ties included, with any optimizer."""

import copy
import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_rigl.core.storage import (
    Capture,
    ChunkedMask,
    compact_drop_and_grow,
    compact_grow_candidates,
    make_compact,
)
from lightning_rigl.core.topology.candidates import grow_candidates
from lightning_rigl.core.topology.initial_masks import num_active, random_mask
from lightning_rigl.core.topology.layer_update import read_grow_scores, update_layer
from lightning_rigl.core.topology.masks import LayerMasks
from lightning_rigl.core.topology.methods import get_method

F64 = dict(rtol=1e-10, atol=1e-12)
DROP = 0.3


class Net(nn.Module):
    def __init__(self, conv1d=False):
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = Conv1D(16, 24) if conv1d else nn.Linear(24, 16)  # Conv1D(nf=out, nx=in)
        self.fc3 = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


NAMES = ["fc1.weight", "fc2.weight", "fc3.weight"]


def build(conv1d, density=0.35, seed=0):
    torch.manual_seed(seed)
    dense = Net(conv1d).double()
    gen = torch.Generator().manual_seed(seed)
    params = dict(dense.named_parameters())
    masks = {
        name: random_mask(params[name].shape, num_active(params[name].numel(), 1 - density), gen) for name in NAMES
    }
    with torch.no_grad():
        for name in NAMES:
            params[name].mul_(masks[name])
    compact = copy.deepcopy(dense)
    for name in NAMES:
        make_compact(compact.get_submodule(name.rsplit(".", 1)[0]), masks[name])
    layer_masks = LayerMasks({name: params[name] for name in NAMES})
    layer_masks.replace(masks)
    return dense, compact, layer_masks


def optimizer(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(params, lr=0.05)
    return torch.optim.Adagrad(params, lr=0.1, initial_accumulator_value=0.3)


def batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(32, 12, generator=gen, dtype=torch.float64)
    x[:, :3] = 0  # inputs that are always 0: whole columns of exactly 0 gradient, ties to the lower index
    return x, torch.randn(32, 5, generator=gen, dtype=torch.float64)


def compact_mask(layer):
    flat = torch.zeros(math.prod(layer.stored_shape), dtype=torch.bool)
    flat[layer.compact_structure.stored_index(layer.weight_in_out)] = True
    return flat.view(layer.stored_shape)


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("kind", ["sgd", "adam", "adagrad"])
def test_compact_and_dense_runs_make_the_same_updates_and_weights_in_float64(kind, conv1d):
    dense, compact, masks = build(conv1d)
    dense_opt, compact_opt = optimizer(kind, dense.parameters()), optimizer(kind, compact.parameters())
    values = [p for name, p in compact.named_parameters() if name.endswith("weight_values")]
    layers = {name: compact.get_submodule(name.rsplit(".", 1)[0]) for name in NAMES}
    method, gen = get_method("rigl"), torch.Generator()
    for step in range(10):
        update = step % 3 == 2
        x, y = batch(step)
        for layer in layers.values():
            layer.capture = Capture() if update else None
        nn.functional.mse_loss(dense(x), y).backward()
        nn.functional.mse_loss(compact(x), y).backward()
        if update:
            params = dict(dense.named_parameters())
            found = {name: read_grow_scores(method, masks, name, params[name].grad, DROP, gen) for name in NAMES}
            compact_found = {
                name: compact_grow_candidates(layer, int(layer.nnz * DROP), chunk_size=40)
                for name, layer in layers.items()
            }
        masks.zero_inactive(NAMES, gradients=True)
        dense_opt.step()
        compact_opt.step()
        if update:
            for name, layer in layers.items():
                update_layer(masks, name, found[name], [dense_opt])
                compact_drop_and_grow(layer, compact_found[name], [compact_opt])
        dense_opt.zero_grad()
        compact_opt.zero_grad()
        for name, layer in layers.items():
            assert torch.equal(compact_mask(layer), masks.local[name].bool()), (step, name)
            torch.testing.assert_close(layer.weight, dense.get_parameter(name), **F64)
    in_optimizer = [p for group in compact_opt.param_groups for p in group["params"]]
    for value, layer in zip(values, layers.values(), strict=True):  # the same Parameter objects, still optimized
        assert layer.weight_values is value and any(value is p for p in in_optimizer)
    assert int(masks.ever_active["fc1.weight"].sum()) > masks.counts["fc1.weight"]  # connections moved


def test_grow_candidates_equal_the_dense_paths_and_each_block_goes_through_the_hook():
    dense, compact, masks = build(conv1d=True)
    layer = compact.fc2
    layer.capture = Capture()
    for step in (0, 1):  # two micro-batches: their gradients add up
        x, y = batch(step)
        nn.functional.mse_loss(dense(x), y).backward()
        nn.functional.mse_loss(compact(x), y).backward()
    blocks = []

    def hook(block):
        blocks.append(tuple(block.shape))
        return block * 2  # what an all-reduce mean of two ranks with this block would give, doubled

    k = int(layer.nnz * DROP)
    found = compact_grow_candidates(layer, k, chunk_hook=hook, chunk_size=48)
    doubled = 2 * dense.fc2.weight.grad
    expected = grow_candidates(masks.local["fc2.weight"], k, lambda a, b: doubled.reshape(-1)[a:b].abs())
    assert blocks and all(shape[1] == 16 for shape in blocks)  # whole stored rows: (in, out) for Conv1D
    assert sum(shape[0] for shape in blocks) >= 24
    for field in ("values", "index", "active_values", "active_index"):
        torch.testing.assert_close(getattr(found, field), getattr(expected, field), **F64)


def test_the_chunked_mask_reads_like_the_dense_mask():
    _, compact, masks = build(conv1d=True)
    chunked, mask = ChunkedMask.of(compact.fc2), masks.local["fc2.weight"].reshape(-1).bool()
    assert chunked.numel() == mask.numel()
    for start, stop in ((0, 16), (5, 77), (100, 384)):
        assert torch.equal(chunked[start:stop], mask[start:stop])
    positions = torch.tensor([0, 3, 17, 200, 383])
    assert torch.equal(chunked.index_select(0, positions), mask.index_select(0, positions))


def test_an_update_without_a_captured_backward_raises():
    _, compact, _ = build(conv1d=False)
    with pytest.raises(ValueError, match="kept no backward pass"):
        compact_grow_candidates(compact.fc1, 3)


def test_no_step_of_training_or_of_an_update_allocates_a_tensor_of_the_layers_size():
    torch.manual_seed(0)
    n_out, n_in = 256, 4096  # 2**20 weights, 5 % active: a bool mask alone would take 1 MB
    layer = make_compact(nn.Linear(n_in, n_out), torch.rand(n_out, n_in) < 0.05)
    opt = torch.optim.Adam(layer.parameters(), lr=0.01)
    x = torch.randn(8, n_in)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        for update in (False, True):
            layer.capture = Capture() if update else None
            layer(x).square().sum().backward()
            found = compact_grow_candidates(layer, int(layer.nnz * DROP), chunk_size=2**14) if update else None
            opt.step()
            if update:
                compact_drop_and_grow(layer, found, [opt])
            opt.zero_grad()
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert 0 < largest < n_out * n_in  # less than one byte a weight, in any one allocation


def test_a_score_that_reads_the_weight_gets_the_dense_weight_block_by_block():
    dense, compact, masks = build(conv1d=True)
    layer = compact.fc2
    layer.capture = Capture()
    x, y = batch(0)
    nn.functional.mse_loss(dense(x), y).backward()
    nn.functional.mse_loss(compact(x), y).backward()

    def score(weight, grad, generator):
        return grad.abs() + 0.5 * weight.abs()

    k = int(layer.nnz * DROP)
    found = compact_grow_candidates(layer, k, score=score, chunk_size=48)
    weight, grad = dense.fc2.weight.detach().reshape(-1), dense.fc2.weight.grad.reshape(-1)
    expected = grow_candidates(masks.local["fc2.weight"], k, lambda a, b: score(weight[a:b], grad[a:b], None))
    for field in ("values", "index", "active_values", "active_index"):
        torch.testing.assert_close(getattr(found, field), getattr(expected, field), **F64)
