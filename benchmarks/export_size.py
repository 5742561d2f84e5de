"""File size of `save_sparse` against `torch.save(state_dict)`, at 80, 90 and 95 % ERK sparsity.

python benchmarks/export_size.py
"""

import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from lightning_rigl import SparseTraining, save_sparse


def model() -> nn.Module:
    """A small CNN + MLP (4.9 M parameters), weights in fp32."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 128, 3), nn.BatchNorm2d(128), nn.ReLU(),
        nn.Conv2d(128, 256, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(4096, 1024), nn.ReLU(), nn.Linear(1024, 10),
    )  # fmt: skip


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sparsity in (0.8, 0.9, 0.95):
            torch.manual_seed(0)
            net = model()
            sparse = SparseTraining.from_model(net, sparsity, "erk")
            dense_path, sparse_path = Path(tmp, "dense.pt"), Path(tmp, "sparse.pt")
            torch.save(net.state_dict(), dense_path)
            save_sparse(net, sparse_path, masks=sparse.masks)
            masked = sum(p.numel() for p in sparse.params.values())
            total = sum(t.numel() for t in net.state_dict().values())
            dense, compact = dense_path.stat().st_size, sparse_path.stat().st_size
            rows.append(
                {
                    "sparsity": sparsity,
                    "dense_bytes": dense,
                    "sparse_bytes": compact,
                    "ratio": compact / dense,
                    "expected_masked_part": (1 - sparsity) + 1 / 32,
                    "masked_share_of_tensors": masked / total,
                }
            )
    print(f"{'sparsity':>8} {'dense MB':>9} {'sparse MB':>10} {'ratio':>7} {'(1-s)+1/32':>11}")
    for r in rows:
        print(
            f"{r['sparsity']:>8.2f} {r['dense_bytes'] / 1e6:>9.2f} {r['sparse_bytes'] / 1e6:>10.2f} "
            f"{r['ratio']:>7.3f} {r['expected_masked_part']:>11.3f}"
        )
    Path("export_size.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
