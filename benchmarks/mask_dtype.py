"""What the mask's dtype costs: time of the per-step masking pass, and memory, per mask dtype.

    python benchmarks/mask_dtype.py          # prints a table, writes mask_dtype.json

The pass RigL runs on every step is ``gradient *= mask`` over every masked weight. Timed here on
one 4096 x 4096 float32 tensor (16.8 M weights; larger than the caches, as a real model's
gradients are) for each way of storing the mask, alternating the variants round after round in
one process, and reported as the median over rounds and the paired median ratio to a float32 mask.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def variants(shape: tuple[int, ...]) -> dict[str, tuple[torch.Tensor, object]]:
    """Name -> (mask, in-place masking of a float32 tensor by it)."""
    active = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.1
    return {
        "float32 mask, mul_": (active.float(), lambda t, m: t.mul_(m)),
        "bfloat16 mask, mul_": (active.bfloat16(), lambda t, m: t.mul_(m)),
        "bool mask, mul_": (active, lambda t, m: t.mul_(m)),
        "uint8 mask, mul_": (active.to(torch.uint8), lambda t, m: t.mul_(m)),
        "bool inverse, masked_fill_": (~active, lambda t, m: t.masked_fill_(m, 0.0)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default="mask_dtype.json")
    args = parser.parse_args()
    shape = (args.rows, args.cols)
    cases = variants(shape)
    target = torch.randn(shape)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, (mask, apply) in cases.items():
            apply(target, mask)  # warm-up: the first touch of a fresh mask pays page faults
            start = time.perf_counter()
            apply(target, mask)
            times[name].append(time.perf_counter() - start)
    baseline = times["float32 mask, mul_"]
    results = {
        name: {
            "median_ms": statistics.median(values) * 1e3,
            "ratio": statistics.median(t / b for t, b in zip(values, baseline, strict=True)),
            "bytes_per_weight": cases[name][0].element_size(),
        }
        for name, values in times.items()
    }
    print(f"\n{'variant':<28}{'median ms':>11}{'ratio to float32':>18}{'mask bytes/weight':>19}")
    for name, row in results.items():
        print(f"{name:<28}{row['median_ms']:>11.2f}{row['ratio']:>18.2f}{row['bytes_per_weight']:>19}")
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), **vars(args)}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
