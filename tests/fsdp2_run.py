"""Run by tests/test_fsdp2.py in a subprocess: ModelParallelStrategy re-launches its script per rank."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent.parent))

from tests.helpers import PlainSGD, distributed_rigl  # noqa: E402


class ShardedSGD(PlainSGD):
    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


class SaveGathered(Callback):
    def __init__(self, rigl, directory):
        self.rigl, self.directory = rigl, directory

    def on_train_end(self, trainer, pl_module):
        masks = self.rigl.masks
        local_numel = sum(m.to_local().numel() for m in masks.values())
        persistent = sum(m.numel() for m in self.rigl.sparse.layer_masks.local.values())
        gathered = {name: mask.full_tensor() for name, mask in masks.items()}
        weights = {name: p.full_tensor() for name, p in pl_module.named_parameters()}
        torch.save(
            {
                "masks": gathered,
                "weights": weights,
                "updates": self.rigl.sparse.updates,
                "local_numel": local_numel,
                "persistent_numel": persistent,
                "total_numel": sum(m.numel() for m in gathered.values()),
            },
            Path(self.directory) / f"rank{trainer.global_rank}.pt",
        )


if __name__ == "__main__":
    directory, method = sys.argv[1], sys.argv[2]
    pl.seed_everything(0, verbose=False)
    rigl = distributed_rigl(method)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=8,
        use_distributed_sampler=False,
        callbacks=[rigl, SaveGathered(rigl, directory)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(ShardedSGD())
