"""FSDP2 (ModelParallelStrategy + fully_shard) on CPU with 2 processes: sharded masks, exact updates."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

from lightning_rigl.core import num_active
from tests.helpers import QUIET_TRAINER, PlainSGD, distributed_rigl, fit_plain_sgd

METHODS = ["rigl", "set"]


class ShardedSGD(PlainSGD):
    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


class SaveGathered(Callback):
    """Keeps the rank's gathered masks and weights, its update count and how many mask elements it holds."""

    def __init__(self, rigl):
        self.rigl, self.saved = rigl, None

    def on_train_end(self, trainer, pl_module):
        masks = self.rigl.masks
        local_numel = sum(m.to_local().numel() for m in masks.values())
        persistent = sum(m.numel() for m in self.rigl.sparse.layer_masks.local.values())
        gathered = {name: mask.full_tensor() for name, mask in masks.items()}
        self.saved = {
            "masks": gathered,
            "weights": {name: p.full_tensor() for name, p in pl_module.named_parameters()},
            "updates": self.rigl.sparse.updates,
            "local_numel": local_numel,
            "persistent_numel": persistent,
            "total_numel": sum(m.numel() for m in gathered.values()),
        }


def fsdp2_fits() -> dict:
    """Run on each of 2 ranks: an FSDP2 fit of every method; returns what SaveGathered kept, by method."""
    results = {}
    for method in METHODS:
        pl.seed_everything(0, verbose=False)
        rigl = distributed_rigl(method)
        saver = SaveGathered(rigl)
        trainer = pl.Trainer(
            **{**QUIET_TRAINER, "devices": 2},
            strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
            max_steps=8,
            use_distributed_sampler=False,
            callbacks=[rigl, saver],
        )
        trainer.fit(ShardedSGD())
        results[method] = saver.saved
    return results


@pytest.fixture(scope="module")
def fsdp2_ranks(two_ranks):
    """Each rank's results of ``fsdp2_fits``, run once for the module's tests."""
    return two_ranks(fsdp2_fits)


@pytest.mark.parametrize("method", METHODS)
def test_fsdp2_masks_equal_single_device_and_are_stored_sharded(fsdp2_ranks, method):
    ranks = [rank[method] for rank in fsdp2_ranks]

    for rank in ranks:
        assert rank["updates"] == 4
        # Each rank keeps only its shard of every mask: half of the single-device mask memory.
        assert rank["persistent_numel"] == rank["local_numel"] == rank["total_numel"] // 2

    single = distributed_rigl(method)
    fit_plain_sgd([single])
    for name, mask in single.masks.items():
        assert torch.equal(ranks[0]["masks"][name], mask), name
        assert torch.equal(ranks[1]["masks"][name], mask), name
        assert int(mask.sum()) == num_active(mask.numel(), single.sparse.sparsities[name])
        assert ranks[0]["weights"][name][~mask].eq(0).all()
