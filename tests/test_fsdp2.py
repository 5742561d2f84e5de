"""FSDP2 (ModelParallelStrategy + fully_shard) on CPU with 2 processes: sharded masks, exact updates."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_rigl.core import num_active
from tests.helpers import distributed_rigl, fit_plain_sgd


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_fsdp2_masks_equal_single_device_and_are_stored_sharded(tmp_path, method):
    script = Path(__file__).parent / "fsdp2_run.py"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), method], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

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
