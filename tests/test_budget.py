"""The overall sparsity the masks reach against the target: reported at fit start, within the README's bound."""

import math
import random
import re
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_rigl import RigLCallback
from lightning_rigl.core import resolve_sparsities
from lightning_rigl.core.sparsity.distributions import achieved_sparsity
from tests.helpers import make_loader, make_trainer


class ManySmallLayers(pl.LightningModule):
    """Many tiny layers, as a Temporal Fusion Transformer has (gates and variable selection networks)."""

    def __init__(self, layers=24, width=6):
        super().__init__()
        self.first = nn.Linear(16, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.head = nn.Linear(width, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.tanh(self.first(x))
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
        return nn.functional.cross_entropy(self.head(h), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def overall_sparsity(masks, names):
    return 1 - sum(int(masks[n].sum()) for n in names) / sum(masks[n].numel() for n in names)


def fit_and_record(model, rigl):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer([rigl], max_steps=2).fit(model, make_loader())
    return [str(w.message) for w in record if "overall sparsity" in str(w.message)]


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_an_overall_sparsity_off_the_target_is_reported_once_at_fit_start(distribution):
    rigl = RigLCallback(0.9, distribution, delta_t=100)
    [message] = fit_and_record(ManySmallLayers(), rigl)
    names = list(rigl.masks)[1:] if distribution == "uniform" else list(rigl.masks)  # uniform: first layer dense
    achieved = overall_sparsity(rigl.masks, names)
    assert 0.9 - achieved > 1e-3
    reported = float(re.search(r"overall sparsity of (\d\.\d+)", message).group(1))
    assert reported == pytest.approx(achieved, abs=5e-5) and "target 0.9" in message
    assert f"{len(names)} layers" in message


def test_layers_with_a_custom_sparsity_are_left_out_of_the_reported_figure():
    rigl = RigLCallback(0.9, custom_sparsity={"layers.*": 0.5}, delta_t=100)
    [message] = fit_and_record(ManySmallLayers(layers=3), rigl)
    achieved = overall_sparsity(rigl.masks, ["first.weight", "head.weight"])  # the layers that carry the target
    reported = float(re.search(r"overall sparsity of (\d\.\d+)", message).group(1))
    assert reported == pytest.approx(achieved, abs=5e-5) and "the 2 layers" in message


def test_a_model_of_large_layers_reaches_the_target_without_a_warning():
    model = ManySmallLayers(layers=2, width=256)
    rigl = RigLCallback(0.9, delta_t=100)
    assert fit_and_record(model, rigl) == []
    assert abs(overall_sparsity(rigl.masks, list(rigl.masks)) - 0.9) <= 1e-3


@pytest.mark.parametrize(("distribution", "layers_per_gap"), [("uniform", 1), ("er", 2), ("erk", 2)])
def test_the_overall_sparsity_is_at_most_the_target_and_below_it_by_the_readme_bound(distribution, layers_per_gap):
    # README: below the target by at most L / N for uniform, 2 L / N for ER/ERK (L layers, N weights).
    rng = random.Random(0)
    checked = 0
    for _ in range(400):
        dims = 2 if distribution == "er" else rng.choice([2, 4])
        shapes = {f"l{i}": tuple(rng.randint(1, 30) for _ in range(dims)) for i in range(rng.randint(1, 30))}
        target = rng.choice([0.5, 0.8, 0.9, 0.95, 0.99, round(rng.random() * 0.99, 3)])
        try:
            sparsities = resolve_sparsities(shapes, target, distribution, dense_first_layer=False)
        except ValueError:  # a target the distribution cannot reach on these shapes
            continue
        total = sum(math.prod(shape) for shape in shapes.values())
        gap = target - achieved_sparsity(shapes, sparsities)
        assert -1e-12 <= gap <= layers_per_gap * len(shapes) / total, (shapes, target)
        checked += 1
    assert checked > 300
