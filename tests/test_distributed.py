"""Data-parallel RigL on CPU with 2 processes (gloo): the masks one device would give, and held by the main
process after a ddp_spawn fit."""

import re

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_rigl import RigLCallback
from lightning_rigl.adapters.strategies import check_strategy
from lightning_rigl.core import num_active
from tests.helpers import MLP, distributed_rigl, fit_plain_sgd, make_loader, make_trainer

METHODS = ["rigl", "set", "snfs"]


class SaveMasks(Callback):
    """Checks exact counts on every rank after each batch, then keeps the rank's masks and update count."""

    def __init__(self, rigl):
        self.rigl, self.saved = rigl, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name, mask in self.rigl.masks.items():
            assert int(mask.sum()) == num_active(mask.numel(), self.rigl.sparse.sparsities[name])

    def on_train_end(self, trainer, pl_module):
        self.saved = {"masks": self.rigl.masks, "updates": self.rigl.sparse.updates}


class PlantDivergence(Callback):
    """Swaps one active and one inactive position of a mask on rank 1 only, before the 2nd update."""

    def __init__(self, rigl):
        self.rigl = rigl

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == 3:
            masks = self.rigl.masks
            mask = masks["net.2.weight"].view(-1)
            on, off = mask.nonzero()[0], (~mask).nonzero()[0]
            mask[on], mask[off] = False, True
            self.rigl.sparse.set_masks(masks)


def ddp_fits() -> dict:
    """Run on each of 2 ranks: a DDP fit of every method, then one with a divergence planted on rank 1.

    Returns the rank's masks and update count for each method, and the error the planted fit raised.
    """
    results = {}
    for method in METHODS:
        rigl = distributed_rigl(method)
        saver = SaveMasks(rigl)
        fit_plain_sgd([rigl, saver], strategy="ddp", devices=2)
        results[method] = saver.saved
    rigl = distributed_rigl("rigl")
    results["divergence"] = None
    try:
        fit_plain_sgd([rigl, PlantDivergence(rigl)], strategy="ddp", devices=2)
    except Exception as error:  # the test reads what was raised
        results["divergence"] = f"{type(error).__name__}: {error}"
    return results


@pytest.fixture(scope="module")
def ddp_ranks(two_ranks):
    """Each rank's results of ``ddp_fits``, run once for the module's tests."""
    return two_ranks(ddp_fits)


@pytest.mark.parametrize("method", METHODS)
def test_ddp_masks_agree_across_ranks_and_with_one_process_on_the_whole_batch(ddp_ranks, method):
    ranks = [rank[method] for rank in ddp_ranks]
    assert ranks[0]["updates"] == ranks[1]["updates"] == 4
    for name in ranks[0]["masks"]:
        assert torch.equal(ranks[0]["masks"][name], ranks[1]["masks"][name]), name

    single = distributed_rigl(method)
    fit_plain_sgd([single])
    assert list(single.masks) == list(ranks[0]["masks"])
    for name, mask in single.masks.items():
        assert torch.equal(mask, ranks[0]["masks"][name]), name


def test_planted_divergence_raises_naming_the_layer(ddp_ranks):
    for rank in ddp_ranks:  # the check is collective: every rank raises
        assert rank["divergence"] is not None, "the planted divergence went unnoticed"
        assert re.search(r"masks differ across ranks for \['net.2.weight'\]", rank["divergence"]), rank["divergence"]


class SaveRankZeroMasks(Callback):
    def __init__(self, rigl, path):
        self.rigl, self.path = rigl, path

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            torch.save(self.rigl.masks, self.path)


def test_after_a_ddp_spawn_fit_the_main_process_holds_the_trained_masks(tmp_path):
    rigl = RigLCallback(0.8, delta_t=3, t_end=100, alpha=0.5)
    model = MLP()
    make_trainer([rigl], max_steps=2).fit(MLP(), make_loader())  # a local fit first: a run in this process
    local = rigl.sparse
    make_trainer(
        [rigl, SaveRankZeroMasks(rigl, tmp_path / "rank0.pt")], max_steps=6, strategy="ddp_spawn", devices=2
    ).fit(model, make_loader())
    trained = torch.load(tmp_path / "rank0.pt")
    assert list(rigl.masks) == list(trained)
    for _ in range(2):  # reading the masks twice gives the same masks, and drops nothing
        for name, mask in trained.items():
            assert torch.equal(rigl.masks[name], mask), name
        assert rigl.sparse is local
    # The last step was an update: connections grown at 0 are in the masks, not in the nonzero pattern.
    params = dict(model.named_parameters())
    assert any(not torch.equal(mask, params[name] != 0) for name, mask in rigl.masks.items())
    assert all(params[name][~mask].eq(0).all() for name, mask in rigl.masks.items())


@pytest.mark.parametrize(
    ("strategy", "words"),
    [
        (FSDPStrategy(), ["FSDPStrategy", "Supported", "DDP", "FSDP2"]),
        # A DDPStrategy subclass; DeepSpeed is not installed: an instance without __init__ suffices here.
        (DeepSpeedStrategy.__new__(DeepSpeedStrategy), ["DeepSpeedStrategy", "DeepSpeed hides gradients"]),
        (ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2), ["tensor_parallel_size=2", "Supported"]),
    ],
)
def test_unsupported_strategies_are_refused_naming_them(strategy, words):
    with pytest.raises(MisconfigurationException) as error:
        check_strategy(strategy)
    for word in words:
        assert word in str(error.value)


def test_supported_strategies_pass():
    check_strategy(SingleDeviceStrategy("cpu"))
    check_strategy(DDPStrategy())
    check_strategy(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
