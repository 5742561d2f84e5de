"""One Linear layer, sparse kernels against dense: the grid that calibrates ``kernels="auto"``.

    python benchmarks/sparse_kernels.py                   # the full grid, prints a table, writes sparse_kernels.json
    python benchmarks/sparse_kernels.py --shapes 1024x1024 --densities 0.1 --tokens 64   # one cell

Modes, each timed against its dense counterpart (the weight holds zeros at inactive positions):
  fwd:        the forward pass under no_grad (inference; dense is ``F.linear``)
  train:      forward + input gradient + weight gradient at the active positions (an ordinary RigL step)
  train_dg:   the same with the dense weight gradient (an update step: RigL reads the full gradient)
  train_nx:   forward + weight gradient at the active positions, no input gradient (a first layer,
              whose input needs none: dense autograd skips that product too)
Each training step is followed by what RigLCallback does with the weight gradient: a dense-kernel layer's
is multiplied by the mask (``gradient *= mask``); a sparse-kernel layer's was written at active positions
only, so it is not, and it is offered to the next backward, which writes into it instead of zero-filling
a new one. With the dense weight gradient (``train_dg``) both pay the multiply.
With ``--cache cold`` (the default) every timed call starts with caches filled by other data, as in a
training step, where the other layers and the optimizer's passes over all weights run in between;
``--cache warm`` times back-to-back calls on data left in cache.
Sparse and dense alternate within one process (dense, sparse, dense, sparse, ...), so bursts of noise
from other jobs on the machine hit both; a cell reports both medians and the median of the paired
ratios sparse / dense (below 1: sparse is faster).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lightning_rigl.core.kernels.masked_gradients import GradientRecords
from lightning_rigl.core.kernels.sparse_linear import SparseStructure, sparse_linear

MODES = ("fwd", "train", "train_dg", "train_nx")


class _Gate:
    """What SparseKernels gives the sparse op of one layer: the dense-gradient flag and its gradient records."""

    def __init__(self, dense_gradient: bool) -> None:
        self.dense_gradient, self.records = dense_gradient, GradientRecords()

    def wrote_gradient(self, weight: torch.Tensor, sampled: bool) -> None:
        pass

    def reusable_gradient(self, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
        return self.records.take("w", weight, index)

    def wrote_masked_gradient(self, grad: torch.Tensor, index: torch.Tensor) -> None:
        self.records.record_written("w", grad, index)


def _step(mode: str, sparse: bool, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> Callable[[], None]:
    structure = SparseStructure.from_mask(mask) if sparse else None
    masked_by_callback = mode == "train_dg" or not sparse
    float_mask = mask.to(weight.dtype)
    gate = _Gate(dense_gradient=mode == "train_dg")

    def run() -> None:
        if mode == "fwd":
            with torch.no_grad():
                if structure is None:
                    F.linear(x, weight)
                else:
                    sparse_linear(x, weight, None, structure)
            return
        if structure is None:
            y = F.linear(x, weight)
        else:
            y = sparse_linear(x, weight, None, structure, dense_gradient=mode == "train_dg", gate=gate)
        torch.autograd.backward(y, torch.ones_like(y), inputs=[x, weight] if x.requires_grad else [weight])
        if masked_by_callback:
            torch._foreach_mul_([weight.grad], [float_mask])  # as SparseTraining.before_step does
        else:
            gate.records.offer("w", weight.grad, structure.index)  # as SparseKernels does with the sparse op's own
        x.grad = weight.grad = None

    return run


def _time(fn: Callable[[], None], evict: torch.Tensor | None) -> float:
    if evict is not None:
        evict.add_(1.0)  # larger than the caches: whatever the last call left there is gone
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(
    out_features: int,
    in_features: int,
    density: float,
    tokens: int,
    mode: str,
    budget: float,
    min_reps: int,
    cache: str = "cold",
) -> dict[str, float]:
    """Median times (ms) and the median paired ratio of one cell."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(out_features, in_features, generator=gen) < density
    weight = (torch.randn(out_features, in_features, generator=gen) * mask).requires_grad_()
    x = torch.randn(tokens, in_features, generator=gen, requires_grad=mode in ("train", "train_dg"))
    dense, sparse = _step(mode, False, x, weight, mask), _step(mode, True, x, weight, mask)
    evict = torch.zeros(1 << 24) if cache == "cold" else None  # 64 MB
    for fn in (dense, sparse, dense, sparse):  # warm-up
        fn()
    pairs = []
    start = time.perf_counter()
    while len(pairs) < min_reps or (time.perf_counter() - start < budget and len(pairs) < 200):
        pairs.append((_time(dense, evict), _time(sparse, evict)))
    return {
        "dense_ms": 1e3 * statistics.median(d for d, _ in pairs),
        "sparse_ms": 1e3 * statistics.median(s for _, s in pairs),
        "ratio": statistics.median(s / d for d, s in pairs),
        "reps": len(pairs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["256x256", "1024x1024", "4096x1024", "1024x4096", "4096x4096"])
    parser.add_argument("--densities", nargs="+", type=float, default=[0.02, 0.05, 0.1, 0.2, 0.5])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 64, 256, 1024])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--budget", type=float, default=0.6, help="seconds of timing per cell (at least --reps)")
    parser.add_argument("--reps", type=int, default=7, help="minimum number of sparse/dense pairs per cell")
    parser.add_argument("--cache", choices=("cold", "warm"), default="cold", help="caches before each timed call")
    parser.add_argument("--json", default="sparse_kernels.json")
    args = parser.parse_args()

    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, {args.cache} caches")
    print("| out x in | tokens | density | mode | dense ms | sparse ms | sparse/dense (median of pairs) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for shape in args.shapes:
        out_features, in_features = (int(v) for v in shape.split("x"))
        for tokens in args.tokens:
            for density in args.densities:
                for mode in args.modes:
                    cell = measure(out_features, in_features, density, tokens, mode, args.budget, args.reps, args.cache)
                    row = {"out": out_features, "in": in_features, "tokens": tokens, "density": density, "mode": mode}
                    rows.append({**row, **cell})
                    print(
                        f"| {shape} | {tokens} | {density} | {mode} | {cell['dense_ms']:.3f} | "
                        f"{cell['sparse_ms']:.3f} | {cell['ratio']:.2f} |",
                        flush=True,
                    )
    with open(args.json, "w") as f:
        json.dump(
            {"torch": torch.__version__, "threads": torch.get_num_threads(), "cache": args.cache, "rows": rows},
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
