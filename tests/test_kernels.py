"""Sparse kernels: the same numbers as the masked dense path, stored state untouched, compile, FLOPs, inference."""

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers.pytorch_utils import Conv1D

from lightning_rigl import SparseTraining, UpdateSchedule, count_flops, load_sparse, save_sparse
from lightning_rigl.core.kernels.choice import TokenProbe, choose_kernel, choose_kernels
from lightning_rigl.core.kernels.served_layers import linear_layers
from lightning_rigl.core.kernels.sparse_kernels import SparseKernels
from lightning_rigl.core.kernels.sparse_linear import SparseStructure, sparse_linear
from lightning_rigl.core.kernels.sparsify import sparsify
from tests.helpers import F64, big_sparse_mlp


def masked_layer(out_features=6, in_features=9, density=0.4, bias=True, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=gen, dtype=dtype))
        if bias:
            layer.bias.copy_(torch.randn(out_features, generator=gen, dtype=dtype))
    mask = torch.rand(out_features, in_features, generator=gen) < density
    return layer, mask


def signed_input(*shape, dtype=torch.float64, seed=1):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 3).requires_grad_()


def grads(layer, x, seed=2):
    y = layer(x)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
    return (y, *torch.autograd.grad(y, [x, *params], upstream))


def reference(layer, mask, x):
    """The masked dense path: the weight zeroed where inactive, dense autograd."""
    with torch.no_grad():
        layer.weight.mul_(mask)
    return grads(layer, x)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 9), (2, 3, 9)])
def test_forward_and_input_gradient_equal_masked_dense_in_float64(bias, shape):
    layer, mask = masked_layer(bias=bias)
    x = signed_input(*shape)
    expected = reference(layer, mask, x)
    kernels = SparseKernels(linear_layers(nn.Sequential(layer)), {"0.weight": mask})
    y, grad_x, *_ = grads(layer, x)
    torch.testing.assert_close(y, expected[0], **F64)
    torch.testing.assert_close(grad_x, expected[1], **F64)
    kernels.detach()


@pytest.mark.parametrize("bias", [True, False])
def test_weight_gradient_is_the_masked_dense_gradient(bias):
    layer, mask = masked_layer(bias=bias)
    x = signed_input(2, 3, 9)
    _, _, grad_w, *grad_b = reference(layer, mask, x)
    SparseKernels(linear_layers(nn.Sequential(layer)), {"0.weight": mask})
    _, _, sparse_grad_w, *sparse_grad_b = grads(layer, x)
    torch.testing.assert_close(sparse_grad_w, grad_w * mask, **F64)
    assert not sparse_grad_w[~mask].any()
    for got, want in zip(sparse_grad_b, grad_b, strict=True):
        torch.testing.assert_close(got, want, **F64)


def test_dense_gradient_mode_gives_the_unmasked_dense_gradient():
    layer, mask = masked_layer()
    x = signed_input(5, 9)
    _, _, grad_w, _ = reference(layer, mask, x)
    kernels = SparseKernels(linear_layers(nn.Sequential(layer)), {"0.weight": mask})
    kernels.set_dense_gradient(True)
    _, _, dense_mode_grad_w, _ = grads(layer, x)
    torch.testing.assert_close(dense_mode_grad_w, grad_w, **F64)
    assert dense_mode_grad_w[~mask].abs().min() > 0  # inactive positions carry the grow signal


@pytest.mark.parametrize("dense_gradient", [False, True])
def test_an_input_without_gradient_gets_the_weight_gradient_and_no_input_product(dense_gradient):
    layer, mask = masked_layer()
    x = signed_input(5, 9).detach()  # a first layer: the data needs no gradient
    upstream = torch.randn(5, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        layer.weight.mul_(mask)
    (want,) = torch.autograd.grad(layer(x), [layer.weight], upstream)
    kernels = SparseKernels(linear_layers(nn.Sequential(layer)), {"0.weight": mask})
    kernels.set_dense_gradient(dense_gradient)
    (got,) = torch.autograd.grad(layer(x), [layer.weight], upstream)
    torch.testing.assert_close(got, want if dense_gradient else want * mask, **F64)
    with FlopCounterMode(display=False) as counter:  # no input-gradient product counted: none was computed
        layer(x).backward(upstream)
    assert counter.get_total_flops() == 2 * 2 * 5 * 6 * 9


def test_float32_matches_masked_dense_to_1e_5():
    layer, mask = masked_layer(64, 128, dtype=torch.float32)
    x = signed_input(4, 16, 128, dtype=torch.float32)
    expected = reference(layer, mask, x)
    SparseKernels(linear_layers(nn.Sequential(layer)), {"0.weight": mask})
    got = grads(layer, x)
    for value, want in zip(got, expected, strict=True):
        torch.testing.assert_close(value, want * mask if value.shape == mask.shape else want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dense_gradient", [False, True])
def test_hugging_face_conv1d_matches_masked_dense(dense_gradient):
    layer = Conv1D(6, 9).double()  # nf=6 outputs, nx=9 inputs, weight stored (9, 6)
    with torch.no_grad():
        layer.weight.normal_(generator=torch.Generator().manual_seed(0))
        layer.bias.normal_(generator=torch.Generator().manual_seed(1))
    mask = torch.rand(9, 6, generator=torch.Generator().manual_seed(2)) < 0.4
    x = signed_input(2, 3, 9)
    y, grad_x, grad_w, grad_b = reference(layer, mask, x)
    kernels = SparseKernels({"weight": (layer, layer.weight)}, {"weight": mask})
    kernels.set_dense_gradient(dense_gradient)
    got = grads(layer, x)
    for value, want in zip(got, (y, grad_x, grad_w if dense_gradient else grad_w * mask, grad_b), strict=True):
        torch.testing.assert_close(value, want, **F64)


def test_update_structure_makes_the_layer_compute_with_the_new_mask():
    layer, mask = masked_layer()
    kernels = SparseKernels(linear_layers(nn.Sequential(layer)), {"0.weight": mask})
    new_mask = ~mask
    kernels.update_structure("0.weight", new_mask)
    x = signed_input(5, 9)
    dense = x @ (layer.weight * new_mask).T + layer.bias
    torch.testing.assert_close(layer(x), dense, **F64)


def test_state_dict_and_parameters_are_unchanged_and_detach_restores_the_forward():
    model = nn.Sequential(nn.Linear(9, 6), nn.ReLU(), nn.Linear(6, 3))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    params = list(model.parameters())
    masks = {name: torch.ones_like(weight, dtype=torch.bool) for name, (_, weight) in linear_layers(model).items()}
    kernels = SparseKernels(linear_layers(model), masks)
    assert list(model.state_dict()) == list(before) and list(model.parameters()) == params
    kernels.detach()
    assert "forward" not in vars(model[0]) and "forward" not in vars(model[2])
    x = torch.randn(4, 9)
    assert torch.equal(model(x), nn.functional.linear(torch.relu(model[0](x)), model[2].weight, model[2].bias))
    assert all(torch.equal(model.state_dict()[name], value) for name, value in before.items())


def test_torch_compile_aot_eager_fullgraph_gives_the_same_outputs_and_gradients():
    layer, mask = masked_layer(dtype=torch.float32)
    model = nn.Sequential(layer, nn.ReLU())
    SparseKernels(linear_layers(model), {"0.weight": mask})
    x = signed_input(2, 3, 9, dtype=torch.float32)
    eager = grads(model[0], x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, torch.relu(eager[0]), rtol=1e-6, atol=1e-6)
    y[..., 0].sum().backward()
    assert layer.weight.grad is not None and not layer.weight.grad[~mask].any()


def test_bf16_autocast_runs_on_the_layers_dense_forward():
    layer, mask = masked_layer(dtype=torch.float32)
    SparseKernels(linear_layers(nn.Sequential(layer)), {"0.weight": mask})
    x = signed_input(5, 9, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and layer.weight.grad is not None


def test_bf16_weights_and_snfs_and_cuda_choose_dense():
    big = dict(out_features=4096, in_features=4096, density=0.05, tokens=256)
    assert choose_kernel(**big) == "sparse"
    assert choose_kernel(**big, dtype=torch.bfloat16) == "dense"
    assert choose_kernel(**big, dtype=torch.float16) == "dense"
    assert choose_kernel(**big, device_type="cuda") == "dense"
    assert choose_kernel(**big, dense_gradient_every_step=True) == "dense"


def test_auto_is_dense_for_a_single_token_and_for_half_dense_layers():
    assert choose_kernel(4096, 4096, 0.02, tokens=1) == "dense"
    assert choose_kernel(4096, 4096, 0.5, tokens=1024) == "dense"


def test_auto_serves_layers_of_1024x1024_weights_at_density_0_1_from_32_rows_on():
    # Measured with the gradient-masking pass the sparse path skips charged to dense (cold caches).
    assert choose_kernel(1024, 1024, 0.1, tokens=32) == "sparse"
    assert choose_kernel(1024, 1024, 0.1, tokens=32, input_gradient=False) == "sparse"
    assert choose_kernel(1024, 1024, 0.1, tokens=16) == "dense"  # 0.84 and 1.07 in two runs: not served
    assert choose_kernel(1024, 1024, 0.05, tokens=16) == "sparse"
    assert choose_kernel(1024, 1024, 0.12, tokens=256) == "dense"
    assert choose_kernel(2048, 1024, 0.1, tokens=16) == "sparse"  # from 2^21 weights, 16 rows do
    assert choose_kernel(512, 512, 0.05, tokens=1024) == "dense"  # under 2^19 weights: never
    # Hidden layers of 1024x784 weights from 64 rows; a first layer of that size only from 256 rows
    # (at 32 rows it measured 0.9-1.1x of dense at densities 0.10-0.13).
    assert choose_kernel(1024, 784, 0.1, tokens=64) == "sparse"
    assert choose_kernel(1024, 783, 0.1, tokens=64) == "dense"
    assert choose_kernel(1024, 784, 0.1, tokens=32) == "dense"
    assert choose_kernel(1024, 784, 0.1, tokens=64, input_gradient=False) == "dense"
    assert choose_kernel(1024, 784, 0.1, tokens=256, input_gradient=False) == "sparse"


def test_auto_allows_denser_first_layers_whose_input_needs_no_gradient():
    layers = linear_layers(nn.Sequential(nn.Linear(784, 4096), nn.ReLU(), nn.Linear(4096, 784)))
    masks = {name: torch.rand_like(w) < 0.12 for name, (_, w) in layers.items()}
    probe = TokenProbe(layers)
    layers["0.weight"][0](torch.randn(256, 784))  # as in training: the data needs no gradient, the hidden does
    layers["2.weight"][0](torch.randn(256, 4096, requires_grad=True))
    probe.remove()
    assert probe.input_gradient == {"2.weight"}
    choices = choose_kernels(layers, masks, probe.tokens, input_gradient=probe.input_gradient)
    assert choices == {"0.weight": "sparse", "2.weight": "dense"}
    assert set(choose_kernels(layers, masks, probe.tokens).values()) == {"dense"}  # default: all need one


def test_convolutions_are_not_served():
    model = nn.Sequential(nn.Conv1d(3, 3, 1), nn.Linear(3, 3))
    assert list(linear_layers(model)) == ["1.weight"]
    with pytest.raises(ValueError, match="nn.Linear or a Hugging Face Conv1D"):
        SparseKernels({"0.weight": (model[0], model[0].weight)}, {"0.weight": torch.ones(3, 3, 1)})


def test_choose_kernels_forced_sparse_keeps_bf16_layers_dense():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).bfloat16())
    masks = {name: torch.ones_like(w, dtype=torch.bool) for name, (_, w) in linear_layers(model).items()}
    assert choose_kernels(linear_layers(model), masks, 64, "sparse") == {"0.weight": "sparse", "1.weight": "dense"}


def test_count_flops_counts_the_sparse_op_like_the_dense_matmul():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    masks = {name: torch.rand_like(w) < 0.5 for name, (_, w) in linear_layers(model).items()}
    dense = count_flops(model, torch.randn(3, 8), sparsity={"0.weight": 0.5})
    kernels = SparseKernels(linear_layers(model), masks)
    sparse = count_flops(model, torch.randn(3, 8), sparsity={"0.weight": 0.5})
    kernels.detach()
    assert sparse.per_layer == dense.per_layer and sparse.other == dense.other == 0


def test_sparse_linear_gathers_values_from_the_current_weight():
    weight = torch.zeros(2, 2, dtype=torch.float64)
    structure = SparseStructure.from_mask(torch.tensor([[True, False], [False, True]]))
    weight[0, 0], weight[1, 1], weight[0, 1] = 2.0, 3.0, 100.0  # [0, 1] is inactive: ignored
    x = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    assert sparse_linear(x, weight, None, structure).tolist() == [[2.0, 3.0]]


def test_sparsify_round_trip_through_save_and_load_gives_the_masked_outputs(tmp_path):
    model, masks = big_sparse_mlp()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in masks:
                param.mul_(masks[name])
    save_sparse(model, tmp_path / "model.pt", masks=masks)
    loaded = load_sparse(tmp_path / "model.pt", nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).double())
    fast = sparsify(loaded, kernels="sparse")
    assert fast.sparse_kernels.names == ["0.weight", "2.weight"]
    x = torch.randn(16, 32, dtype=torch.float64)
    torch.testing.assert_close(fast(x), model(x), **F64)


def test_sparsify_with_masks_ignores_weights_outside_them_and_leaves_the_model_alone():
    model, masks = big_sparse_mlp()
    original = {name: value.clone() for name, value in model.state_dict().items()}
    fast = sparsify(model, masks, kernels="sparse")
    x = torch.randn(16, 32, dtype=torch.float64)
    hidden = torch.relu(x @ (model[0].weight * masks["0.weight"]).T + model[0].bias)
    torch.testing.assert_close(fast(x), hidden @ (model[2].weight * masks["2.weight"]).T + model[2].bias, **F64)
    assert all(torch.equal(model.state_dict()[name], value) for name, value in original.items())
    assert "forward" not in vars(model[0])


@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad])
def test_sparsify_runs_without_autograd(context):
    model, masks = big_sparse_mlp()
    fast = sparsify(model, masks, kernels="sparse")
    x = torch.randn(4, 32, dtype=torch.float64)
    expected = fast(x).detach()
    with context():
        torch.testing.assert_close(fast(x), expected, **F64)


def test_sparsify_recomputes_after_the_weights_change_in_place_or_are_loaded():
    model, masks = big_sparse_mlp()
    fast = sparsify(model, masks, kernels="sparse")
    x = torch.randn(4, 32, dtype=torch.float64)

    def masked_dense():
        hidden = torch.relu(x @ (fast[0].weight * masks["0.weight"]).T + fast[0].bias)
        return hidden @ (fast[2].weight * masks["2.weight"]).T + fast[2].bias

    with torch.inference_mode():
        first = fast(x)
        torch.testing.assert_close(fast(x), first, **F64)  # the cached active values
    with torch.no_grad():
        fast[0].weight.mul_(-2.0)  # in place: the cached values are stale now
        torch.testing.assert_close(fast(x), masked_dense(), **F64)
        fast.load_state_dict({name: value * 0.5 for name, value in fast.state_dict().items()})
        torch.testing.assert_close(fast(x), masked_dense(), **F64)
    assert not torch.allclose(fast(x), first)


def test_copies_of_a_sparsified_model_compute_sparse_with_their_own_weights():
    model, masks = big_sparse_mlp()
    fast = sparsify(model, masks, kernels="sparse")
    x = torch.randn(4, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = fast(x)
    for copied in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert copied.sparse_kernels.names == ["0.weight", "2.weight"]
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            torch.testing.assert_close(copied(x), expected, **F64)
        assert counter.get_flop_counts()["Global"].get(torch.ops.lightning_rigl.sparse_linear, 0) > 0
        with torch.no_grad():
            copied[2].weight.mul_(-3.0)  # the copy's own weights, not the original's
            hidden = torch.relu(x @ (fast[0].weight * masks["0.weight"]).T + fast[0].bias)
            scaled = hidden @ (-3 * fast[2].weight * masks["2.weight"]).T + fast[2].bias
            torch.testing.assert_close(copied(x), scaled, **F64)


def test_sparsify_auto_keeps_small_layers_dense():
    model, masks = big_sparse_mlp()
    assert sparsify(model, masks).sparse_kernels.names == []


def train(use_kernels, steps=7, delta_t=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparse = SparseTraining.from_model(model, 0.7, schedule=UpdateSchedule(delta_t=delta_t, t_end=steps))
    kernels = SparseKernels(linear_layers(model), sparse.masks) if use_kernels else None
    data = torch.randn(steps, 8, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for step in range(steps):
        if kernels:
            kernels.set_dense_gradient(sparse.schedule.is_update_step(step + 1))
        model(data[step]).square().mean().backward()
        sparse.before_step(step)
        opt.step()
        updates = sparse.updates
        sparse.after_step([opt])
        if kernels and sparse.updates != updates:
            for name, mask in sparse.masks.items():
                kernels.update_structure(name, mask)
        opt.zero_grad()
    return model.state_dict(), sparse.masks, sparse.updates


def test_rigl_training_with_sparse_kernels_has_the_same_masks_and_weights_in_float64():
    dense_state, dense_masks, updates = train(use_kernels=False)
    sparse_state, sparse_masks, sparse_updates = train(use_kernels=True)
    assert updates == sparse_updates == 2
    for name, mask in dense_masks.items():
        assert torch.equal(sparse_masks[name], mask), name
    for name, value in dense_state.items():
        torch.testing.assert_close(sparse_state[name], value, rtol=1e-10, atol=1e-12)


def test_sparsify_serves_a_model_whose_head_is_tied_to_its_embedding():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.hidden = nn.Linear(16, 16)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.embed.weight  # "head.weight" is not in named_parameters()

        def forward(self, ids):
            return self.head(torch.tanh(self.hidden(self.embed(ids))))

    torch.manual_seed(0)
    model = TiedLM()
    with torch.no_grad():
        model.hidden.weight[torch.rand(16, 16) < 0.9] = 0
    fast = sparsify(model)  # default masks: the nonzero pattern of every Linear, the tied head included
    ids = torch.randint(0, 50, (4, 8))
    with torch.inference_mode():
        assert torch.allclose(fast(ids), model(ids), atol=1e-6)
    assert fast.head.weight is fast.embed.weight


def test_already_masked_names_a_layer_only_while_its_gradient_is_the_sparse_ops_own():
    layer, mask = masked_layer(density=0.3)
    kernels = SparseKernels(linear_layers(nn.Sequential(layer)), {"0.weight": mask})
    names = ["0.weight"]

    def backward(extra=None):
        kernels.set_dense_gradient(False)  # a new step
        y = layer(signed_input(4, 9)).sum()
        (y if extra is None else y + extra()).backward()

    backward()
    assert kernels.already_masked(names) == names
    assert layer.weight.grad[~mask].eq(0).all() and layer.weight.grad[mask].ne(0).any()
    assert kernels.already_masked(names) == []  # used up: one optimizer step, one answer

    layer.weight.grad = None
    backward(lambda: layer.weight.sum())  # a second use of the weight: nonzero at inactive positions
    assert layer.weight.grad[~mask].ne(0).all()
    assert kernels.already_masked(names) == []

    layer.weight.grad = None
    backward()
    layer.weight.grad.add_(0.5)  # changed after the op wrote it (a hook, gradient noise)
    assert kernels.already_masked(names) == []

    layer.weight.grad = None
    backward()
    layer(signed_input(4, 9)).sum().backward()  # a second micro-batch accumulated into it
    assert kernels.already_masked(names) == []

    layer.weight.grad = None
    backward()
    kernels.update_structure("0.weight", mask.clone())  # a rebuilt structure: the gradient was the old one's
    assert kernels.already_masked(names) == []

    layer.weight.grad = None
    backward()
    kernels.set_dense_gradient(True)  # the next step began: the record of this one does not carry over
    assert kernels.already_masked(names) == []
    layer.weight.grad = None
    layer(signed_input(4, 9)).sum().backward()  # the dense gradient (an update step) is not masked
    assert kernels.already_masked(names) == [] and layer.weight.grad[~mask].ne(0).any()
    kernels.detach()


def test_before_step_leaves_gradients_named_already_masked_to_the_caller():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    sparse = SparseTraining.from_model(model, 0.5, "uniform", dense_first_layer=False, method="static")
    for p in model.parameters():
        p.grad = torch.full_like(p, -2.0)
    sparse.before_step(0, already_masked=["1.weight"])
    assert model[0].weight.grad[~sparse.masks["0.weight"]].eq(0).all()
    assert model[1].weight.grad.eq(-2.0).all()  # the caller vouched for it: not multiplied
