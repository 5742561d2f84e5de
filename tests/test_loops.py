"""The core drives every loop: a plain PyTorch loop, a Lightning Fabric loop and RigLCallback train alike.

The run object (`SparseTraining`) does everything per step, sparse kernels included, in three calls; the
callback only translates Lightning's hooks into them. The three loops give bit-identical masks and weights.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric import Fabric
from torch import nn

from lightning_rigl import RigLCallback
from lightning_rigl.core import SparseTraining, UpdateSchedule
from lightning_rigl.core.storage import is_compact
from tests.helpers import MLP, F64Net, compact_rigl, f64_loader, make_loader, make_trainer

STEPS, DELTA_T, T_END = 13, 3, 100


def schedule() -> UpdateSchedule:
    return UpdateSchedule(delta_t=DELTA_T, t_end=T_END, alpha=0.5, decay="cosine")


def with_callback(model: MLP, kernels: str):
    rigl = RigLCallback(0.8, delta_t=DELTA_T, t_end=T_END, alpha=0.5, seed=1, kernels=kernels)
    make_trainer([rigl], max_steps=STEPS).fit(model, make_loader(seed=3))
    return rigl.masks, rigl.kernel_choices, rigl.sparse.updates


def with_plain_loop(model: MLP, kernels: str):
    optimizer = model.configure_optimizers()  # the same optimizer the Trainer builds
    sparse = SparseTraining.from_model(model, 0.8, schedule=schedule(), seed=1, kernels=kernels)
    for step, (x, y) in enumerate(make_loader(seed=3)):
        if step == STEPS:
            break
        sparse.start_step(step)
        nn.functional.cross_entropy(model(x), y).backward()
        sparse.before_step(step, optimizer)
        optimizer.step()
        sparse.after_step([optimizer], optimizer)
        optimizer.zero_grad()
    sparse.close()
    return sparse.masks, sparse.kernel_choices, sparse.updates


def with_fabric(model: MLP, kernels: str):
    fabric = Fabric(accelerator="cpu", devices=1)
    module, optimizer = fabric.setup(model, model.configure_optimizers())
    sparse = SparseTraining.from_model(module.module, 0.8, schedule=schedule(), seed=1, kernels=kernels)
    for step, (x, y) in enumerate(fabric.setup_dataloaders(make_loader(seed=3))):
        if step == STEPS:
            break
        sparse.start_step(step)
        fabric.backward(nn.functional.cross_entropy(module(x), y))
        sparse.before_step(step, optimizer)
        optimizer.step()
        sparse.after_step([optimizer], optimizer)
        optimizer.zero_grad()
    sparse.close()
    return sparse.masks, sparse.kernel_choices, sparse.updates


@pytest.mark.parametrize("kernels", ["sparse", "auto"])
def test_a_plain_loop_a_fabric_loop_and_the_callback_train_bit_identically(kernels):
    pl.seed_everything(0, verbose=False)
    initial = MLP(hidden=64)
    results = {}
    for name, loop in (("callback", with_callback), ("plain", with_plain_loop), ("fabric", with_fabric)):
        model = copy.deepcopy(initial)
        masks, choices, updates = loop(model, kernels)
        results[name] = (masks, choices, updates, {k: v.detach().clone() for k, v in model.state_dict().items()})
    masks, choices, updates, weights = results["callback"]
    assert updates == 4 and (kernels != "sparse" or set(choices.values()) == {"sparse"})
    for name, (other_masks, other_choices, other_updates, other_weights) in results.items():
        assert (other_choices, other_updates) == (choices, updates), name
        assert all(torch.equal(other_masks[n], m) for n, m in masks.items()), name
        assert all(torch.equal(other_weights[n], w) for n, w in weights.items()), name


def test_readme_plain_loop_runs_and_puts_the_large_layer_on_sparse_kernels():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = readme.split("<!-- plain-loop -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(code, "README.md (plain loop)", "exec"), scope)
    sparse = scope["sparse"]
    assert sparse.updates == 7
    assert sparse.kernel_choices["2.weight"] == "sparse"  # 1024 x 1024 at 95 %, 32 rows: faster sparse
    assert all(scope["model"].get_parameter(n)[~m].eq(0).all() for n, m in sparse.masks.items())


# Compact storage from a plain loop: SparseTraining.from_model(..., storage="compact").

F64 = dict(rtol=1e-10, atol=1e-12)
LINEARS = ("net.0", "net.2", "net.4")


def compact_plain_loop(storage: str, optimizer: str, steps: int = 10):
    torch.manual_seed(0)
    model = F64Net(optimizer)
    sparse = SparseTraining.from_model(model, 0.8, schedule=UpdateSchedule(2, 9), seed=3, storage=storage)
    opt = model.configure_optimizers()  # after from_model: over the compact layers' active values
    sparse.check_optimizers([opt])
    batches = [batch for _ in range(2) for batch in f64_loader()][:steps]
    for step, batch in enumerate(batches):
        sparse.start_step(step)
        model.training_step(batch, step).backward()
        sparse.before_step(step, opt)
        opt.step()
        sparse.after_step([opt], opt)
        opt.zero_grad()
    sparse.close()
    return model, sparse, opt


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_plain_loop_with_compact_storage_trains_as_the_callback_and_as_dense_storage(optimizer):
    compact, sparse, opt = compact_plain_loop("compact", optimizer)
    dense, dense_sparse, _ = compact_plain_loop("dense", optimizer)
    torch.manual_seed(0)
    callback_model, rigl = F64Net(optimizer), compact_rigl("compact")
    make_trainer([rigl], max_steps=10).fit(callback_model, f64_loader())
    assert sparse.updates == 4 and sum(record.changed for record in sparse.history) > 0
    assert sparse.history == rigl.sparse.history == dense_sparse.history
    stepped = {id(p) for group in opt.param_groups for p in group["params"]}
    for name in LINEARS:
        layer = compact.get_submodule(name)
        assert is_compact(layer) and id(layer.weight_values) in stepped
        mask = sparse.masks[f"{name}.weight"]
        assert torch.equal(mask, rigl.masks[f"{name}.weight"]) and torch.equal(
            mask, dense_sparse.masks[f"{name}.weight"]
        )
        for other in (callback_model, dense):
            torch.testing.assert_close(layer.weight, other.get_submodule(name).weight.detach(), **F64)
            torch.testing.assert_close(layer.bias, other.get_submodule(name).bias, **F64)


def test_compact_storage_from_a_plain_loop_lists_the_layers_it_keeps_dense():
    model = nn.Sequential(nn.Linear(6, 8), nn.Conv1d(8, 8, 1))
    with pytest.warns(
        UserWarning, match=r"storage='compact'\) keeps these masked layers stored densely: 1.weight: not"
    ):
        sparse = SparseTraining.from_model(model, 0.5, storage="compact")
    assert is_compact(model[0]) and not is_compact(model[1])
    assert list(sparse.params) == ["1.weight"] and list(sparse.masks) == ["0.weight", "1.weight"]


@pytest.mark.parametrize(
    ("model", "kwargs", "match"),
    [
        (MLP, {"storage": "sparse"}, r"`storage` must be one of \('dense', 'compact'\), got 'sparse'"),
        (MLP, {"storage": "compact", "method": "snfs"}, "cannot serve method='snfs'"),
        (MLP, {"storage": "compact", "kernels": "dense"}, "kernels='dense' needs dense weights"),
        (lambda: nn.Conv1d(2, 2, 1), {"storage": "compact"}, "can serve none of the masked layers: 'weight'"),
    ],
)
def test_bad_storage_for_a_plain_loop_is_refused_naming_it(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseTraining.from_model(model(), 0.5, **kwargs)


def test_a_plain_loop_that_is_not_elementwise_is_refused_by_check_optimizers():
    model = F64Net()
    sparse = SparseTraining.from_model(model, 0.5, storage="compact")
    with pytest.raises(ValueError, match=r"elementwise optimizers only .*got \['LBFGS'\]"):
        sparse.check_optimizers([torch.optim.LBFGS(model.parameters())])
