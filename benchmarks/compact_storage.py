"""Compact storage (only the active weights stored) against dense training: step time and peak memory.

    python benchmarks/compact_storage.py                         # 90 % and 95 %, ERK, SGD+momentum and Adam
    python benchmarks/compact_storage.py --sparsities 0.95 --optimizers adam --distribution uniform
    python benchmarks/compact_storage.py --skip-memory --rounds 5

Model: MLP 784-4096-4096-10, batch 256, cross-entropy on fixed random data, driven by a plain loop
with the torch-only core (no Lightning). RigL: drop fraction 0.3, one update every ``DELTA_T`` steps.

Step time, in one process, runs interleaved round by round (the machine's noise hits all alike):
  dense:     no masks, dense kernels
  rigl-auto: SparseTraining.from_model (masked dense storage) with kernels="auto"
  compact:   SparseTraining.from_model(..., storage="compact", kernels="auto") on the MLP built on the
             meta device: what a user of compact storage runs (the layers made compact by the run, the
             optimizer built after it, updates made by ``before_step`` / ``after_step``)
A run's figure per round is its amortized step: the median of its ordinary steps plus the update step's
extra time spread over ``DELTA_T`` steps. The table gives the median figure and the median of paired ratios.

Peak memory, each run in a fresh process: resident memory (VmHWM) at the end of a few steps that include
an update step, minus the resident memory just before the model is built (the masks' draw included).
The thread pool and the sparse products' library start before that baseline (once a process, whatever
the model), and glibc's mmap threshold is fixed at 128 KiB (a freed tensor goes back to the kernel at
once). Below ``PERMUTATION_LIMIT`` weights the draw takes the dense run's ``torch.randperm`` of each layer
(in int32: the 16.7 M-weight layer's holds 67 MB for a moment); ``--permutation-limit 0`` measures the
draw without it, as both storages draw above the limit (other masks than the dense run's then).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from lightning_rigl import SparseTraining, UpdateSchedule
from lightning_rigl.core.storage import compaction, draw_positions, is_compact, make_compact

DELTA_T, DROP, BATCH = 100, 0.3, 256


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(784, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10))


def make_optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9)
    return torch.optim.Adam(params, lr=1e-4)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 784, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen)


def limit_permutations(limit: int | None) -> None:
    """Let the compact draw take a permutation up to ``limit`` weights only (None: the library's limit)."""
    if limit is not None:
        compaction.draw_positions = functools.partial(draw_positions, permutation_limit=limit)


class Run:
    def __init__(self, kind: str, sparsity: float, distribution: str, optimizer: str) -> None:
        torch.manual_seed(0)
        self.kind, self.sparse = kind, None
        if kind == "compact":
            with torch.device("meta"):  # its dense weights never exist
                self.model = mlp()
        else:
            self.model = mlp()
        if kind != "dense":
            schedule = UpdateSchedule(delta_t=DELTA_T, t_end=10**9, alpha=DROP, decay="constant")
            storage = "compact" if kind == "compact" else "dense"
            self.sparse = SparseTraining.from_model(
                self.model, sparsity, distribution, schedule=schedule, kernels="auto", storage=storage
            )
        self.opt = make_optimizer(optimizer, self.model.parameters())  # after from_model: compact values
        self.layers = [module for module in self.model if is_compact(module)]
        self.x, self.y = data()
        if self.sparse is not None:
            self.step(0)  # the kernels are chosen after the first step

    def step(self, step: int) -> float:
        start = time.perf_counter()
        if self.sparse is not None:
            self.sparse.start_step(step)
        nn.functional.cross_entropy(self.model(self.x), self.y).backward()
        if self.sparse is not None:
            self.sparse.before_step(step, self.opt)
        self.opt.step()
        if self.sparse is not None:
            self.sparse.after_step([self.opt], self.opt)
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def amortized(times: list[float], update_index: int) -> float:
    ordinary = statistics.median(t for i, t in enumerate(times) if i != update_index)
    return ordinary + (times[update_index] - ordinary) / DELTA_T


def timing(sparsity: float, distribution: str, optimizer: str, rounds: int, block: int) -> None:
    runs = {kind: Run(kind, sparsity, distribution, optimizer) for kind in ("dense", "rigl-auto", "compact")}
    figures: dict[str, list[float]] = {name: [] for name in runs}
    first = DELTA_T - block // 2
    for round_ in range(rounds + 1):  # round 0 warms up
        for name, run in runs.items():
            times = [run.step(round_ * DELTA_T + first + i) for i in range(block)]
            if round_:
                figures[name].append(amortized(times, DELTA_T - 1 - first))
    print(f"\n## step time: sparsity {sparsity} {distribution}, {optimizer}")
    print("| run | amortized step ms (median) | ratio to dense (median of paired) |")
    print("|---|---|---|")
    for name, values in figures.items():
        ratio = statistics.median(v / d for v, d in zip(values, figures["dense"], strict=True))
        print(f"| {name} | {1e3 * statistics.median(values):.1f} | {ratio:.3f} |", flush=True)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_run(kind: str, sparsity: float, distribution: str, optimizer: str, steps: int) -> dict:
    """One run's resident high-water mark above the resident memory just before its model is built."""
    x, y = data()
    torch.mm(torch.randn(64, 64), torch.randn(64, 64))  # the thread pool starts before the baseline
    # So do the sparse products' library code and buffers (once a process, whatever the model's size).
    warm = make_compact(nn.Linear(64, 64), torch.rand(64, 64) < 0.1)
    warm(torch.randn(8, 64)).sum().backward()
    del warm
    before = _status_kb("VmRSS")
    run = Run(kind, sparsity, distribution, optimizer)
    run.x, run.y = x, y
    for step in range(DELTA_T - steps // 2, DELTA_T - steps // 2 + steps):  # an update step among them
        run.step(step)
    nnz = sum(layer.nnz for layer in run.layers)
    index_bytes = sum(layer.compact_structure.nbytes for layer in run.layers)
    result = {"peak_mb": (_status_kb("VmHWM") - before) / 1024, "nnz": nnz, "index_bytes": index_bytes}
    return {**result, "updates": run.sparse.updates if run.sparse is not None else 0}


def memory(sparsity: float, distribution: str, optimizer: str, limit: int | None, steps: int) -> None:
    results = {}
    for kind in ("dense", "compact"):
        command = [sys.executable, __file__, "--memory-run", kind, "--sparsities", str(sparsity)]
        command += ["--distribution", distribution, "--optimizers", optimizer]
        command += ["--memory-steps", str(steps), "--threads", str(torch.get_num_threads())]
        command += [] if limit is None else ["--permutation-limit", str(limit)]
        # glibc's mmap threshold fixed, as in update_latency.py: a freed tensor goes back to the kernel at once,
        # so the resident high-water mark follows what is allocated, not what the allocator kept.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
        results[kind] = json.loads(output.strip().splitlines()[-1])
    compact = results["compact"]
    per_active = compact["index_bytes"] / max(compact["nnz"], 1)
    assert results["compact"]["updates"] == 1, "the measured steps must include one update step"
    drawn = "the library's draw" if limit is None else f"permutation limit {limit}"
    title = f"sparsity {sparsity} {distribution}, {optimizer}, {drawn}"
    print(f"\n## peak resident memory above the pre-build baseline: {title}")
    print("| run | peak MB | ratio to dense | index bytes per active weight |")
    print("|---|---|---|---|")
    print(f"| dense | {results['dense']['peak_mb']:.1f} | 1.000 | - |")
    ratio = compact["peak_mb"] / results["dense"]["peak_mb"]
    print(f"| compact | {compact['peak_mb']:.1f} | {ratio:.3f} | {per_active:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95])
    parser.add_argument("--distribution", choices=["erk", "uniform"], default="erk")
    parser.add_argument("--optimizers", nargs="+", choices=["sgd", "adam"], default=["sgd", "adam"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--block", type=int, default=5, help="steps per run and round, one of them an update step")
    parser.add_argument("--permutation-limit", type=int, help="see draw_positions (default: the library's)")
    parser.add_argument("--memory-steps", type=int, default=4)
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--memory-run", choices=["dense", "compact"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    limit_permutations(args.permutation_limit)
    if args.memory_run:
        result = memory_run(
            args.memory_run, args.sparsities[0], args.distribution, args.optimizers[0], args.memory_steps
        )
        print(json.dumps(result))
        return
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")
    for sparsity in args.sparsities:
        for optimizer in args.optimizers:
            if not args.skip_timing:
                timing(sparsity, args.distribution, optimizer, args.rounds, args.block)
            if not args.skip_memory:
                memory(sparsity, args.distribution, optimizer, args.permutation_limit, args.memory_steps)


if __name__ == "__main__":
    main()
