"""Data-parallel RigL on CPU with 2 processes (gloo): the masks one device would give."""

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

from lightning_rigl._strategies import check_strategy
from lightning_rigl.core import num_active
from tests.helpers import distributed_rigl, fit_plain_sgd


class SaveMasks(Callback):
    """Checks exact counts on every rank after each batch, then saves the rank's masks."""

    def __init__(self, rigl, directory):
        self.rigl, self.directory = rigl, directory

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name, mask in self.rigl.masks.items():
            assert int(mask.sum()) == num_active(mask.numel(), self.rigl.sparse.sparsities[name])

    def on_train_end(self, trainer, pl_module):
        masks = self.rigl.masks
        torch.save(
            {"masks": masks, "updates": self.rigl.sparse.updates}, self.directory / f"rank{trainer.global_rank}.pt"
        )


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


@pytest.mark.parametrize("method", ["rigl", "set", "snfs"])
def test_ddp_masks_agree_across_ranks_and_with_one_process_on_the_whole_batch(tmp_path, method):
    rigl = distributed_rigl(method)
    fit_plain_sgd([rigl, SaveMasks(rigl, tmp_path)], strategy="ddp_spawn", devices=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["updates"] == ranks[1]["updates"] == 4
    for name in ranks[0]["masks"]:
        assert torch.equal(ranks[0]["masks"][name], ranks[1]["masks"][name]), name

    single = distributed_rigl(method)
    fit_plain_sgd([single])
    for name, mask in single.masks.items():
        assert torch.equal(mask, ranks[0]["masks"][name]), name


def test_planted_divergence_raises_naming_the_layer(tmp_path):
    rigl = distributed_rigl("rigl")
    with pytest.raises(Exception, match=r"masks differ across ranks for \['net.2.weight'\]"):
        fit_plain_sgd([rigl, PlantDivergence(rigl)], strategy="ddp_spawn", devices=2)


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
