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
from tests.helpers import MLP, make_loader, make_trainer

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
