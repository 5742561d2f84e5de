"""sparsify: outputs follow the weights however they are written; a deployed model's masks stay fixed."""

import copy
import pickle
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_rigl import RigLCallback, sparsify
from tests.helpers import MLP, make_loader, make_trainer

F64 = dict(rtol=1e-10, atol=1e-12)


class ConvNet(nn.Module):
    """A convolution (always on dense kernels) in front of two Linear layers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3)
        self.fc1 = nn.Linear(8 * 14, 48)
        self.fc2 = nn.Linear(48, 5)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(torch.tanh(self.conv(x)).flatten(1))))


def random_masks(model, names, density=0.3):
    params = dict(model.named_parameters())
    return {name: torch.rand_like(params[name]) < density for name in names}


def deployed(kernels="sparse", dtype=torch.float64):
    model = ConvNet().to(dtype)
    masks = random_masks(model, ["conv.weight", "fc1.weight", "fc2.weight"])
    return sparsify(model, masks, kernels=kernels), masks


def masked_dense(model, masks, x):
    """The outputs of ``model``'s current weights times ``masks``, on dense kernels."""
    dense = ConvNet().to(x.dtype)
    state = {k: v * masks[k] if k in masks else v for k, v in model.state_dict().items()}
    dense.load_state_dict(state)
    return dense(x)


def write_in_place(weight, how):
    src = torch.randn_like(weight)
    if how == "data.mul_":
        weight.data.mul_(-2.0)
    elif how == "data.copy_":
        weight.data.copy_(src)
    elif how == "kept alias":  # an alias taken before the last call, written after it
        return weight.data
    elif how == "data =":
        weight.data = src
    elif how == "no_grad copy_":
        with torch.no_grad():
            weight.copy_(src)
    return None


@pytest.mark.parametrize("how", ["data.mul_", "data.copy_", "kept alias", "data =", "no_grad copy_"])
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("copied", ["itself", "deepcopy", "pickle"])
def test_sparsify_outputs_follow_the_weights_however_they_are_written(how, context, copied):
    fast, masks = deployed()
    fast = {"itself": fast, "deepcopy": copy.deepcopy(fast), "pickle": pickle.loads(pickle.dumps(fast))}[copied]
    x = torch.randn(6, 3, 16, dtype=torch.float64)
    for name in ("fc1", "fc2"):
        with context():
            fast(x)  # the active values are cached now
        alias = write_in_place(getattr(fast, name).weight, how)
        if alias is not None:
            with context():
                fast(x)
            alias.mul_(-3.0)
        with context():
            out = fast(x)
        torch.testing.assert_close(out, masked_dense(fast, masks, x).detach(), **F64)


class ValidateAgainstDense(MLP):
    """Validation checks the sparse-kernel outputs against a dense-kernel copy of the current weights."""

    def __init__(self):
        super().__init__()
        self.errors = []

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        expected = copy.deepcopy(self.net)(x)  # a copy of a training layer computes on dense kernels
        self.errors.append((self(x) - expected).abs().max().item())


class FlipWeightsThroughData(Callback):
    """Writes every weight through ``.data`` before each validation batch, as weight-averaging swaps do."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        for param in pl_module.parameters():
            param.data.mul_(-1.0)


def test_validation_inside_fit_on_sparse_kernels_follows_weights_written_through_data():
    model = ValidateAgainstDense()
    rigl = RigLCallback(0.8, delta_t=3, t_end=100, seed=1, kernels="sparse")
    trainer = make_trainer([rigl, FlipWeightsThroughData()], max_steps=16, num_sanity_val_steps=0, limit_val_batches=4)
    trainer.fit(model, make_loader(), make_loader(n=64, seed=1))
    assert rigl.kernel_choices and set(rigl.kernel_choices.values()) == {"sparse"}
    assert len(model.errors) == 4
    assert max(model.errors) < 1e-5


def zero_patterns(model, names):
    params = dict(model.named_parameters())
    return {name: params[name].detach() == 0 for name in names}


def fine_tune(model, optimizer, steps=6, autocast=False):
    gen = torch.Generator().manual_seed(3)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x, y = torch.randn(8, 3, 16, generator=gen, dtype=dtype), torch.randn(8, 5, generator=gen, dtype=dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = (model(x).float() - y.float()).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.05, weight_decay=0.1),
}


def assert_masks_kept(model, masks, before):
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.equal(params[name].detach() == 0, before[name]), name
        assert torch.count_nonzero(params[name].detach()[~mask]) == 0, name
        assert torch.count_nonzero(params[name].detach()[mask]) == torch.count_nonzero(mask), name


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("kernels", ["sparse", "dense"])
@pytest.mark.parametrize("copied", ["itself", "deepcopy", "pickle"])
def test_fine_tuning_a_sparsified_model_keeps_every_mask_fixed(optimizer, kernels, copied):
    fast, masks = deployed(kernels)
    fast = {"itself": fast, "deepcopy": copy.deepcopy(fast), "pickle": pickle.loads(pickle.dumps(fast))}[copied]
    assert fast.sparse_kernels.names == (["fc1.weight", "fc2.weight"] if kernels == "sparse" else [])
    before = zero_patterns(fast, masks)
    start = {name: param.detach().clone() for name, param in fast.named_parameters()}
    fine_tune(fast, OPTIMIZERS[optimizer](fast.parameters()))
    assert_masks_kept(fast, masks, before)
    for name, param in fast.named_parameters():
        assert not torch.equal(param.detach(), start[name]), f"{name} did not train"


def test_fine_tuning_under_autocast_keeps_the_masks_of_sparse_kernel_layers():
    fast, masks = deployed("sparse", torch.float32)  # bf16 autocast: the layers run their dense forward
    before = zero_patterns(fast, masks)
    fine_tune(fast, OPTIMIZERS["sgd"](fast.parameters()), autocast=True)
    assert_masks_kept(fast, masks, before)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("kernels", ["sparse", "dense"])
def test_fine_tuning_a_sparsified_lightning_module_with_the_trainer_keeps_its_masks(optimizer, kernels):
    model = MLP(optimizer=optimizer)
    names = ["net.0.weight", "net.2.weight", "net.5.weight"]
    masks = random_masks(model, names, density=0.4)
    fast = sparsify(model, masks, kernels=kernels)
    before = zero_patterns(fast, masks)
    make_trainer([], max_steps=12).fit(fast, make_loader())
    assert_masks_kept(fast, masks, before)
    assert not torch.equal(fast.net[2].weight, model.net[2].weight * masks["net.2.weight"])  # it trained


@pytest.mark.parametrize("assign", [False, True])
def test_load_state_dict_into_a_sparsified_model_keeps_its_masks_and_warns_of_dropped_values(assign):
    fast, masks = deployed()
    before = zero_patterns(fast, masks)
    state = {name: torch.randn_like(value) for name, value in fast.state_dict().items()}  # dense everywhere
    with pytest.warns(UserWarning, match=r"nonzero values where the fixed masks .* inactive") as warned:
        fast.load_state_dict(state, assign=assign)
    assert {str(w.message).split("(")[1].split(")")[0] for w in warned} == set(masks)  # one for each, named
    assert_masks_kept(fast, masks, before)
    x = torch.randn(4, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), masked_dense(fast, masks, x), **F64)
    fine_tune(fast, OPTIMIZERS["sgd"](fast.parameters()))  # the loaded (assigned) Parameters are hooked too
    assert_masks_kept(fast, masks, before)


def test_load_state_dict_of_a_sparse_state_keeps_quiet():
    fast, masks = deployed()
    state = {name: value * -0.5 for name, value in fast.state_dict().items()}  # zero where inactive
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast.load_state_dict(state)


def test_an_optimizer_that_fills_inactive_weights_is_caught_at_the_next_backward():
    fast, masks = deployed()
    before = zero_patterns(fast, masks)
    x = torch.randn(4, 3, 16, dtype=torch.float64)
    fast(x).square().sum().backward()
    with torch.no_grad():
        fast.fc2.weight.add_(0.01)  # what a step that mixes positions (or adds noise) does
    with pytest.raises(RuntimeError, match=r"'fc2.weight' of this sparsify'd model holds \d+ nonzero values"):
        fast(x).square().sum().backward()
    fast.sparse_masks.apply()
    assert_masks_kept(fast, masks, before)
    fast.zero_grad()
    fast(x).square().sum().backward()  # the remedy the message names works


def test_sparsify_refuses_a_mask_of_another_shape():
    model = ConvNet()
    with pytest.raises(
        ValueError, match=r"`masks\['fc2.weight'\]` has shape \(1, 48\); it must have the parameter's, \(5, 48\)"
    ):
        sparsify(model, {"fc2.weight": torch.ones(1, 48, dtype=torch.bool)})
