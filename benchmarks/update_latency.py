"""Latency and peak memory of one RigL topology update: single large layers, and ResNet-50's weights.

    python benchmarks/update_latency.py                                  # every case below
    python benchmarks/update_latency.py --sizes 1e7 1e8 --sparsities 0.9 --paths candidates wired

One update of a set of layers, at drop fraction 0.3, from SGD-with-momentum state, three ways:

- ``candidates``: the core functions SparseTraining runs, called directly. Before the step, each
  layer's signed gradient is reduced chunk by chunk to its grow candidates (``grow_candidates``
  with RigL's |gradient| score), then the gradient is masked; at the update each layer drops and
  grows from its candidates (``select_drop_grow``) and the changes are applied.
- ``wired``: ``SparseTraining.before_step`` and ``after_step`` themselves (the same reduction, plus the
  bookkeeping: finiteness check, masks, optimizer state).
- ``sort``: the naive port: layer-sized scores, and a full (stable) sort of the layer for the drop and
  one for the grow. Left out above 3e7 weights (minutes, and the point is made).
- ``race``: ``candidates`` and ``sort`` on the same layers in turns, ``--repeats`` times each, in one
  process: the speed-up, by the minimum and by the median (a shared machine's noise hits both alike).

``candidates`` and ``sort`` share the gradient masking and the application of the changes (mask, weights,
momentum at new and dropped connections), so their times differ by the selection only.

Peak extra memory is measured, two ways, each in a fresh subprocess per case:

- ``rss``: the kernel's high-water mark of resident memory (VmHWM, reset through /proc/self/clear_refs
  right before the update) minus the resident size just before it. glibc's mmap threshold is fixed at
  128 KiB, so a freed tensor goes back to the kernel at once and cannot hide a later one.
- ``alloc``: the peak of the running total of every torch CPU allocation and free during the update, as
  torch.profiler's memory events record them (each event carries its size; nothing is estimated).
  It sees torch tensors only, not the Python objects around them.

Both are against the gradient's size (float32: 4 bytes a weight); the targets are at most 0.5x at 90 % sparsity.
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
DROP_FRACTION = 0.3


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _peak_rss(update) -> int:
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident size
    update()
    return _status_bytes("VmHWM") - before


def _peak_alloc(update) -> int | None:
    from torch._C import _profiler
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        update()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if isinstance(node.extra_fields, _profiler._ExtraFields_Allocation):
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    total = peak = 0
    for _, size in sorted(events):
        total += size
        peak = max(peak, total)
    return peak


class _Layer:
    def __init__(self, shape: tuple[int, ...], sparsity: float, generator: torch.Generator) -> None:
        from lightning_rigl.core.topology.initial_masks import num_active, random_mask

        numel = math.prod(shape)
        self.mask = random_mask(shape, num_active(numel, sparsity), generator).float()
        self.weight = nn.Parameter(torch.randn(shape, generator=generator) * self.mask)
        self.weight.grad = torch.randn(shape, generator=generator)
        self.momentum = torch.randn(shape, generator=generator) * self.mask
        self.k = int(num_active(numel, sparsity) * DROP_FRACTION)


def _apply(layer: _Layer, dropped: torch.Tensor, grown: torch.Tensor) -> None:
    """The changes, as SparseTraining makes them: mask, weights and momentum at new and dropped connections."""
    mask = layer.mask.view(-1)
    new = grown[mask[grown] == 0]
    mask[dropped] = 0
    mask[grown] = 1
    changed = torch.cat([new, dropped[mask[dropped] == 0]])
    with torch.no_grad():
        layer.weight.view(-1)[changed] = 0
    layer.momentum.view(-1)[changed] = 0


def _candidates_update(layers: list[_Layer]) -> None:
    from lightning_rigl.core.topology.candidates import grow_candidates, score_chunks
    from lightning_rigl.core.topology.drop_grow import select_drop_grow
    from lightning_rigl.core.topology.methods import gradient_magnitude

    generator = torch.Generator()
    held = []
    for layer in layers:
        scores = score_chunks(gradient_magnitude, layer.weight, layer.weight.grad, generator)
        held.append(grow_candidates(layer.mask, layer.k, scores))
    torch._foreach_mul_([layer.weight.grad for layer in layers], [layer.mask for layer in layers])
    for i, layer in enumerate(layers):
        candidates, held[i] = held[i], None  # freed once its layer is updated
        _apply(layer, *select_drop_grow(layer.mask, layer.weight, candidates))
        del candidates


def _sort_update(layers: list[_Layer]) -> None:
    scores = [layer.weight.grad.abs() for layer in layers]
    torch._foreach_mul_([layer.weight.grad for layer in layers], [layer.mask for layer in layers])
    for i, layer in enumerate(layers):
        active = layer.mask.view(-1) != 0
        magnitude = layer.weight.detach().view(-1).abs().masked_fill_(~active, math.inf)
        dropped = torch.sort(magnitude, stable=True).indices[: layer.k]
        del magnitude
        score, scores[i] = scores[i].view(-1), None
        active[dropped] = False
        score.masked_fill_(active, -math.inf)  # kept positions cannot be grown
        grown = torch.sort(score, descending=True, stable=True).indices[: layer.k]
        del score, active
        _apply(layer, dropped, grown)


def _wired_setup(layers: list[_Layer], sparsity: float):
    from lightning_rigl.core import SparseTraining, UpdateSchedule

    params = {f"w{i}": layer.weight for i, layer in enumerate(layers)}
    sparse = SparseTraining(
        params, dict.fromkeys(params, sparsity), schedule=UpdateSchedule(1, 10**9, DROP_FRACTION, "constant")
    )
    sparse.set_masks({name: layer.mask for name, layer in zip(params, layers, strict=True)})
    for layer in layers:  # SparseTraining holds its own masks: drop ours
        layer.mask = None
    optimizer = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9)
    optimizer.step()  # creates the momentum buffers
    for layer in layers:
        layer.momentum = None

    def update() -> None:
        sparse.before_step(0)
        sparse.after_step([optimizer])

    return update


def _refresh(layers: list[_Layer], generator: torch.Generator) -> None:
    for layer in layers:
        layer.weight.grad.normal_(generator=generator)


def run_case(shapes: list[tuple[int, ...]], sparsity: float, path: str, repeats: int) -> dict[str, float]:
    """In this process: time `repeats` updates, then measure the peak extra memory of two more."""
    generator = torch.Generator().manual_seed(0)
    layers = [_Layer(shape, sparsity, generator) for shape in shapes]
    if path == "wired":
        update = _wired_setup(layers, sparsity)
    else:
        chosen = {"candidates": _candidates_update, "sort": _sort_update}[path]

        def update() -> None:
            chosen(layers)

    times = []
    for _ in range(repeats):
        _refresh(layers, generator)
        start = time.perf_counter()
        update()
        times.append(time.perf_counter() - start)
    _refresh(layers, generator)
    rss = _peak_rss(update)
    _refresh(layers, generator)
    alloc = _peak_alloc(update)
    numel = sum(math.prod(s) for s in shapes)
    return {
        "weights": numel,
        "sparsity": sparsity,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_rss_bytes": rss,
        "peak_alloc_bytes": alloc,
        "gradient_bytes": numel * 4,
    }


def race(shapes: list[tuple[int, ...]], sparsity: float, repeats: int) -> dict[str, float]:
    """Candidates against full sorts on the same layers, in turns (a shared machine's noise hits both alike)."""
    generator = torch.Generator().manual_seed(0)
    layers = [_Layer(shape, sparsity, generator) for shape in shapes]
    times: dict[str, list[float]] = {"candidates": [], "sort": []}
    for _ in range(repeats):
        for path, update in (("candidates", _candidates_update), ("sort", _sort_update)):
            _refresh(layers, generator)
            start = time.perf_counter()
            update(layers)
            times[path].append(time.perf_counter() - start)
    return {f"{path}_{stat.__name__}_s": stat(t) for path, t in times.items() for stat in (min, statistics.median)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e5, 1e6, 1e7, 1e8])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.8, 0.9])
    parser.add_argument("--paths", nargs="+", default=["candidates", "wired", "sort", "race"])
    parser.add_argument("--no-resnet", action="store_true", help="leave out the ResNet-50 case")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="update_latency.json")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        torch.set_num_threads(args.threads)
        shapes, sparsity, path = json.loads(args.case)
        shapes = [tuple(s) for s in shapes]
        result = (
            race(shapes, sparsity, args.repeats) if path == "race" else run_case(shapes, sparsity, path, args.repeats)
        )
        print(json.dumps(result))
        return

    cases = [(f"1 layer, {int(n):.0e}", [(int(n) // 1000, 1000)], s) for n in args.sizes for s in args.sparsities]
    if not args.no_resnet:
        cases.append(("ResNet-50, 54 layers", RESNET50, 0.9))
    rows = []
    for name, shapes, sparsity in cases:
        for path in args.paths:
            if path in ("sort", "race") and sum(math.prod(s) for s in shapes) > 3e7:
                continue
            out = subprocess.run(
                [sys.executable, __file__, "--case", json.dumps([shapes, sparsity, path])]
                + ["--repeats", str(args.repeats), "--threads", str(args.threads)],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
            )
            row = {"case": name, "path": path, **json.loads(out.stdout.strip().splitlines()[-1])}
            rows.append(row)
            if path == "race":
                print(
                    f"{name:<22}{sparsity:>5.2f} race       candidates {row['candidates_min_s']:.4f} s"
                    f" (median {row['candidates_median_s']:.4f}), sort {row['sort_min_s']:.4f} s"
                    f" (median {row['sort_median_s']:.4f}): {row['sort_min_s'] / row['candidates_min_s']:.1f}x"
                    f" by min, {row['sort_median_s'] / row['candidates_median_s']:.1f}x by median",
                    flush=True,
                )
                continue
            grad = row["gradient_bytes"]
            print(
                f"{name:<22}{sparsity:>5.2f} {path:<11}{row['median_s']:>9.4f} s (min {row['min_s']:.4f})"
                f"{row['peak_rss_bytes'] / 1e6:>9.1f} MB ({row['peak_rss_bytes'] / grad:.2f}x)"
                f"{row['peak_alloc_bytes'] / 1e6:>9.1f} MB ({row['peak_alloc_bytes'] / grad:.2f}x)"
                f"  gradient {grad / 1e6:.1f} MB",
                flush=True,
            )
    meta = {"torch": torch.__version__, "threads": args.threads, "repeats": args.repeats}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
