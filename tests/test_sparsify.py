"""sparsify: outputs follow the weights however they are written; a deployed model's masks stay fixed."""

import copy
import pickle

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_rigl import RigLCallback, sparsify
from tests.conftest import MLP, make_loader, make_trainer

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
