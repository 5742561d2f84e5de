"""Latency and peak memory of one RigL topology update, against layer size and for ResNet-50's weights.

    python benchmarks/update_latency.py             # prints a table, writes update_latency.json

One update = `before_step` at an update step (score = |dense gradient|, gradient masked) plus
`after_step` (drop by magnitude, grow by score, state reset) on SGD-with-momentum state, at 90 %
sparsity and drop fraction 0.3. The baseline "sort" replaces each top-k with a full sort of the
layer, as naive ports do (1e8 is left out for it). Each case runs in a fresh subprocess; its peak memory is the kernel's
high-water mark (VmHWM, reset through /proc/self/clear_refs right before the update) minus the
resident memory just before it, so it is measured, not estimated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

# ResNet-50: 54 masked weights (53 convolutions and the classifier), 25.5 M weights in all.
RESNET50 = (
    [(64, 3, 7, 7)]
    + [(64, 64, 1, 1), (64, 64, 3, 3), (256, 64, 1, 1), (256, 64, 1, 1)]
    + [(64, 256, 1, 1), (64, 64, 3, 3), (256, 64, 1, 1)] * 2
    + [(128, 256, 1, 1), (128, 128, 3, 3), (512, 128, 1, 1), (512, 256, 1, 1)]
    + [(128, 512, 1, 1), (128, 128, 3, 3), (512, 128, 1, 1)] * 3
    + [(256, 512, 1, 1), (256, 256, 3, 3), (1024, 256, 1, 1), (1024, 512, 1, 1)]
    + [(256, 1024, 1, 1), (256, 256, 3, 3), (1024, 256, 1, 1)] * 5
    + [(512, 1024, 1, 1), (512, 512, 3, 3), (2048, 512, 1, 1), (2048, 1024, 1, 1)]
    + [(512, 2048, 1, 1), (512, 512, 3, 3), (2048, 512, 1, 1)] * 2
    + [(1000, 2048)]
)


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _sorting_top_k(values, k, largest=True):
    return torch.sort(values, descending=largest).indices[:k]


def run_case(shapes: list[tuple[int, ...]], path: str, repeats: int) -> dict[str, float]:
    """In this process: time `repeats` updates, then measure the peak memory of one more."""
    from lightning_rigl.core import SparseTraining, UpdateSchedule, topology

    if path == "sort":
        topology.top_k_indices = _sorting_top_k  # the baseline: full sorts
    torch.manual_seed(0)
    params = {f"w{i}": nn.Parameter(torch.randn(shape)) for i, shape in enumerate(shapes)}
    sparse = SparseTraining(params, dict.fromkeys(params, 0.9), schedule=UpdateSchedule(1, 10**9, 0.3, "constant"))
    optimizer = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9)
    for p in params.values():
        p.grad = torch.randn_like(p)
    optimizer.step()  # creates the momentum buffers

    def one_update() -> float:
        for p in params.values():
            p.grad.normal_()
        start = time.perf_counter()
        sparse.before_step(0)
        sparse.after_step([optimizer])
        return time.perf_counter() - start

    times = [one_update() for _ in range(repeats)]
    for p in params.values():
        p.grad.normal_()
    before = _rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark
    sparse.before_step(0)
    sparse.after_step([optimizer])
    peak = _rss_bytes("VmHWM")
    numel = sum(math.prod(s) for s in shapes)
    return {
        "weights": numel,
        "median_s": statistics.median(times),
        "peak_extra_bytes": peak - before,
        "gradient_bytes": numel * 4,
        "largest_layer_bytes": max(math.prod(s) for s in shapes) * 4,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e4, 1e5, 1e6, 1e7, 1e8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="update_latency.json")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        shapes, path = json.loads(args.case)
        print(json.dumps(run_case([tuple(s) for s in shapes], path, args.repeats)))
        return

    cases = [(f"1 layer, {int(n):.0e}", [(int(n) // 1000, 1000)] if n >= 1000 else [(int(n), 1)]) for n in args.sizes]
    cases.append(("ResNet-50, 54 layers", RESNET50))
    rows = []
    for name, shapes in cases:
        for path in ("topk", "sort"):
            if path == "sort" and sum(math.prod(s) for s in shapes) > 3e7:
                continue  # the full sort of 1e8 weights is left out: minutes, and the point is made
            out = subprocess.run(
                [sys.executable, __file__, "--case", json.dumps([shapes, path]), "--repeats", str(args.repeats)],
                capture_output=True,
                text=True,
                check=True,
                # A fixed mmap threshold: glibc then returns every freed tensor to the kernel at
                # once, so the resident size before the update holds no freed buffers.
                env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
            )
            rows.append({"case": name, "path": path, **json.loads(out.stdout.strip().splitlines()[-1])})
    print(f"{'case':<22}{'path':<6}{'weights':>12}{'median s':>10}{'peak extra MB':>15}{'gradient MB':>13}")
    for r in rows:
        print(
            f"{r['case']:<22}{r['path']:<6}{r['weights']:>12.3g}{r['median_s']:>10.4f}"
            f"{r['peak_extra_bytes'] / 1e6:>15.1f}{r['gradient_bytes'] / 1e6:>13.1f}"
        )
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
