"""How far float32 RigL on sparse kernels drifts from the masked dense path: differing grow choices per update.

    python benchmarks/sparse_exactness.py                  # MLP 784-1024-1024-10, ERK 90 %, 5 updates
    python benchmarks/sparse_exactness.py --dtype float64  # the same in float64: no difference expected

Two runs from the same weights, masks, data and optimizer (SGD, momentum 0.9), one with every masked
layer on sparse kernels, one on dense kernels. Sparse and dense products sum in different orders, so
near-ties among grow scores can go either way in float32. After each update the table gives the
connections whose state (active or not) differs between the runs, against the connections that update
grew, and the largest relative weight difference. Differences accumulate: a flipped choice changes the
next steps' gradients.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from lightning_rigl import SparseTraining, UpdateSchedule


class Run:
    def __init__(self, kernels: str, dtype: torch.dtype, sparsity: float, delta_t: int) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(
            nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
        ).to(dtype)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        schedule = UpdateSchedule(delta_t=delta_t, t_end=10**9, alpha=0.3)
        self.sparse = SparseTraining.from_model(self.model, sparsity, "erk", schedule=schedule, seed=1, kernels=kernels)

    def step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        self.sparse.start_step(step)  # the three calls RigLCallback makes from its hooks
        nn.functional.cross_entropy(self.model(x), y).backward()
        self.sparse.before_step(step, self.opt)
        self.opt.step()
        self.sparse.after_step([self.opt], self.opt)
        self.opt.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--delta-t", type=int, default=4)
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    sparse, dense = Run("sparse", dtype, args.sparsity, args.delta_t), Run("dense", dtype, args.sparsity, args.delta_t)
    gen = torch.Generator().manual_seed(2)
    print(f"# {args.dtype}, ERK {args.sparsity}, delta_t {args.delta_t}, batch {args.batch}")
    print("| update | after step | grown (all layers) | connections differing | fraction | max rel. weight diff |")
    print("|---|---|---|---|---|---|")
    for step in range(args.updates * args.delta_t):
        x = torch.randn(args.batch, 784, generator=gen, dtype=dtype)
        y = torch.randint(0, 10, (args.batch,), generator=gen)
        sparse.step(step, x, y)
        dense.step(step, x, y)
        if (step + 1) % args.delta_t:
            continue
        grown = dense.sparse.history[-1].changed
        masks_s, masks_d = sparse.sparse.masks, dense.sparse.masks
        differing = sum(int((masks_s[n] != masks_d[n]).sum()) for n in masks_d) // 2  # one in, one out
        rel = max(
            float((ps - pd).abs().max() / pd.abs().max())
            for ps, pd in zip(sparse.model.parameters(), dense.model.parameters(), strict=True)
        )
        print(f"| {dense.sparse.updates} | {step + 1} | {grown} | {differing} | {differing / grown:.2e} | {rel:.1e} |")


if __name__ == "__main__":
    main()
