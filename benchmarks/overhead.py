"""Per-step cost of RigLCallback against dense training and Lightning's ModelPruning.

    python benchmarks/overhead.py            # both models, prints a table, writes overhead.json

Compared runs, same model, data and optimizer (SGD with momentum and weight decay):
  (a) dense: no callback
  (b) rigl: RigLCallback, 90 % ERK, delta_t=100 (update steps included: amortized)
  (b0) static: RigLCallback(method="static"), the same masks never updated: what masking alone costs
  (c) pruning: Lightning's ModelPruning holding 90 % static (l1, per layer), pruned before step 1
  (d) rigl+monitor: (b) plus SparsityMonitor (FLOPs counted, logging every 50 steps, no table or image)
  (e) rigl-dense, rigl-sparse: (b) with kernels="dense" / "sparse" (every masked Linear on dense / sparse
      kernels), not run by default
  (f) rigl-compact: (b) with storage="compact" (masked Linear layers hold only their active weights; the
      CNN's convolutions stay dense), not run by default
Each fit runs in its own process, as a user's fit does, and the fits take turns: one runs `--block`
steps while the others wait, then the next one does. The machine's noise comes in bursts of a few
seconds, so every run meets the same noise; timing them one after the other does not manage that.
(In threads of one process, `--in-threads`, the fits share one OpenMP runtime with more threads than
cores, whose workers then likely sleep between parallel regions: every MLP step measured about twice
as long as in a lone fit, and a topology update, many small operations, even more.)
Each step is timed (batch start to next batch start). The figure of a run is its amortized median:
the median time of ordinary steps, plus the extra time of the scheduled steps (every 50th: RigL
updates at multiples of 100, the monitor logs at multiples of 50) spread over all steps. The median
resists the bursts; the scheduled work is counted in full. The table gives, over rounds (each round
is five fresh fits), the median of that figure and the median of its ratio to (a) in the same round.
Each fit runs in a worker process, and a worker fits another run each round (worker i fits run i + r
in round r, modulo the runs), so what makes one process or one place in the turns slower lands on
every run alike. The first rounds are fitted and not counted (`--warmup-rounds`, by default one a
run: every worker then has fitted every run once): a process's first fit runs slower, a dense one by
1.3-1.5x here, which would hand every run a ratio below 1 in that round.

    python benchmarks/overhead.py --models mlp --runs dense dense   # A/A check: the method's own noise

torch's CPU allocator hands every freed tensor back to glibc, which returns large blocks to the kernel;
the next step then faults the pages in again. On this machine a lone dense CNN fit took 9,400-12,600
page faults and 26-30 ms of kernel CPU time a step (getrusage, both threads), and what they cost
drifts: that made the CNN's rounds noisy. ``--keep-freed-memory`` starts each fit's process with glibc
keeping freed blocks of up to 32 MiB (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``): the same
fits with 200-600 page faults a step, faster, and quieter (BENCHMARKS.md). Every run gets the same
setting, so the ratios stay comparable; a faster dense step makes RigL's fixed costs a larger share.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import statistics
import threading
import time
from multiprocessing.context import BaseContext

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_rigl
from lightning_rigl import RigLCallback


class Turns:
    """Lets fits (processes or threads) run in turn, round robin, one at a time; one that is done leaves the rotation.

    Its state lives in shared memory, so it works across processes (made with the spawn context) and
    threads alike. After every fit of a round has ended, :meth:`end_fit` puts them all back in the rotation.
    """

    def __init__(self, parties: int, context: BaseContext, timeout: float = 600.0) -> None:
        self.start = context.Barrier(parties, timeout=timeout)  # every fit set up before the first step
        self.end = context.Barrier(parties, timeout=timeout)  # no teardown while another fit still steps
        self.cond = context.Condition()
        # The rotation: order[:size] are the fits still stepping, order[current] the one whose turn it is.
        self.parties, self.timeout = parties, timeout
        self.order = context.Array("i", range(parties), lock=False)
        self.size = context.Value("i", parties, lock=False)
        self.current = context.Value("i", 0, lock=False)

    def wait(self, who: int) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.order[self.current.value] == who, self.timeout):
                raise TimeoutError(f"run {who} never got its turn")

    def done(self, who: int, leave: bool = False) -> None:
        with self.cond:
            order = list(self.order[: self.size.value])
            if who not in order:
                return
            index = order.index(who)
            if leave:
                order.pop(index)
                self.order[: len(order)] = order
                self.size.value = len(order)
                self.current.value = index % len(order) if order else 0
            else:
                self.current.value = (index + 1) % len(order)
            self.cond.notify_all()

    def abort(self) -> None:
        """A fit failed: every fit waiting at a barrier for it raises instead of waiting out the timeout."""
        self.start.abort()
        self.end.abort()

    def end_fit(self) -> None:
        """Wait for every fit of the round to end; then the rotation is full again for the next round."""
        if self.end.wait() == 0:  # one party resets; nobody passes the next start barrier before it
            with self.cond:
                self.order[:] = list(range(self.parties))
                self.size.value, self.current.value = self.parties, 0


class StepTimer(Callback):
    """Times every step after the warm-up ones, keyed by the step count it ended at; runs in turns."""

    def __init__(self, warmup: int, turns: Turns, who: int, block: int) -> None:
        self.warmup, self.turns, self.who, self.block = warmup, turns, who, block
        self.last, self.in_turn, self.times = None, 0, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.last is None:
            self.turns.start.wait()
            self.turns.wait(self.who)
        else:
            self._lap(trainer.global_step)
        if self.in_turn == self.block:
            self.turns.done(self.who)
            self.turns.wait(self.who)
            self.in_turn = 0
        self.in_turn += 1
        self.last = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self._lap(trainer.global_step)
        self.turns.done(self.who, leave=True)
        self.turns.end_fit()

    def on_exception(self, trainer, pl_module, exception):
        self.turns.abort()
        self.turns.done(self.who, leave=True)

    def _lap(self, step: int) -> None:
        if step > self.warmup:
            self.times[step] = time.perf_counter() - self.last


SCHEDULED_EVERY = 50  # RigL's delta_t (100) and the monitor's logging interval (50) divide into it


def amortized_median(times: dict[int, float]) -> float:
    """Median of ordinary steps, plus the scheduled steps' excess over it spread over all steps."""
    ordinary = statistics.median(t for step, t in times.items() if step % SCHEDULED_EVERY)
    excess = sum(t - ordinary for step, t in times.items() if step % SCHEDULED_EVERY == 0)
    return ordinary + excess / len(times)


class PruneAtStart(ModelPruning):
    """ModelPruning applied once before the first step and held (its forward pre-hooks stay)."""

    def on_train_start(self, trainer, pl_module):
        self.apply_pruning(self.amount)


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


def mlp() -> nn.Module:
    # 2.9 M weights, batch 32: the optimizer step is a large share of each step.
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def cnn() -> nn.Module:
    # A small CIFAR-shaped CNN: convolutions dominate.
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128 * 8 * 8, 256), nn.ReLU(), nn.Linear(256, 10),
    )  # fmt: skip


def tiny() -> nn.Module:
    # Not a benchmark: the tests run the harness's every code path on it, without the big layers' cost.
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


MODELS = {
    "mlp": (mlp, lambda n: torch.randn(n, 784), 32),
    "cnn": (cnn, lambda n: torch.randn(n, 3, 32, 32), 32),
    "tiny": (tiny, lambda n: torch.randn(n, 32), 32),
}


#: glibc's settings under --keep-freed-memory, read when each fit's process starts: freed blocks of up to
#: 32 MiB (glibc's largest mmap threshold) stay in the process instead of going back to the kernel.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30)}

RUNS = ("dense", "static", "rigl", "pruning", "rigl+monitor", "rigl-dense", "rigl-sparse", "rigl-compact")


def callbacks_for(run: str, example_input: torch.Tensor) -> list[Callback]:
    run = run.split("#")[0]
    if run == "dense":
        return []
    if run == "pruning":
        return [PruneAtStart("l1_unstructured", amount=0.9, apply_pruning=False, verbose=0)]
    method = "static" if run == "static" else "rigl"
    kernels = run.removeprefix("rigl-") if run in ("rigl-dense", "rigl-sparse") else "auto"
    storage = "compact" if run == "rigl-compact" else "dense"
    rigl = RigLCallback(0.9, "erk", method, delta_t=100, t_end=1.0, seed=0, kernels=kernels, storage=storage)
    callbacks: list[Callback] = [rigl]
    if run == "rigl+monitor":
        callbacks.append(lightning_rigl.SparsityMonitor(example_input=example_input, table=False, plot=False))
    return callbacks


def fit(model_name: str, run: str, steps: int, warmup: int, timer: StepTimer) -> None:
    build, make_x, batch = MODELS[model_name]
    torch.manual_seed(0)
    x = make_x(batch * (steps + warmup))  # one epoch: no epoch-end work inside the timed steps
    y = torch.randint(0, 10, (len(x),))
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps + warmup,
        max_epochs=None,
        callbacks=[*callbacks_for(run, x[:1]), timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,
    )
    trainer.fit(Classifier(build()), loader)


def run_of(who: int, round_index: int, runs: list[str]) -> str:
    """The run that worker ``who`` fits in a round: each round shifts them by one (see :func:`time_rounds`)."""
    return runs[(who + round_index) % len(runs)]


def fit_rounds(
    model_name: str, runs: list[str], who: int, settings: tuple[int, int, int, int], turns: Turns, results
) -> None:
    """A worker's fits, one a round, in turns with the other workers'; puts (who, run, round, figure) in ``results``."""
    steps, warmup, block, rounds = settings
    for round_index in range(rounds):
        run = run_of(who, round_index, runs)
        timer = StepTimer(warmup, turns, who, block)
        fit(model_name, run, steps, warmup, timer)
        results.put((who, run, round_index, amortized_median(timer.times)))


def time_rounds(
    model_name: str, runs: list[str], args: argparse.Namespace
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Fit every run once a round, in turns, each in a worker process (or thread).

    Returns, per run and counted round, its figure and the worker that fitted it.

    A worker fits a different run each round (worker ``i`` fits run ``i + r`` in round ``r``, modulo the
    runs), and so takes a different place in the turns: whatever makes one process slower than another
    (an A/A check once measured one of four dense workers 2 % slower than the first, in 8 of 9 rounds)
    then lands on every run alike instead of on one of them in every round.
    """
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no OpenMP state from this one
    turns, results = Turns(len(runs), context), context.Queue()
    warmup_rounds = len(runs) if args.warmup_rounds is None else args.warmup_rounds
    rounds = warmup_rounds + args.rounds
    settings = (args.steps, args.warmup, args.block, rounds)
    start = threading.Thread if args.in_threads else context.Process
    workers = [
        start(target=fit_rounds, args=(model_name, runs, who, settings, turns, results), daemon=True)
        for who in range(len(runs))
    ]
    for worker in workers:
        worker.start()
    figures: dict[str, list[float]] = {run: [0.0] * rounds for run in runs}
    fitted_by: dict[str, list[int]] = {run: [-1] * rounds for run in runs}
    done = [0] * len(workers)  # rounds each worker has reported
    for _ in range(len(runs) * rounds):
        while True:
            try:
                who, run, round_index, figure = results.get(timeout=1.0)
                break
            except queue.Empty:  # nothing pending: a worker that is gone before its last round failed
                gone = [i for i, worker in enumerate(workers) if not worker.is_alive() and done[i] < rounds]
                failed = [run_of(i, done[i], runs) for i in gone]
                if failed:
                    turns.abort()  # the others stop waiting for it
                    raise RuntimeError(f"The {model_name} fit of {failed} failed (its traceback is above).") from None
        figures[run][round_index], fitted_by[run][round_index] = figure, who
        done[who] += 1
    for worker in workers:
        worker.join()
    counted = slice(warmup_rounds, None)
    return {run: values[counted] for run, values in figures.items()}, {run: w[counted] for run, w in fitted_by.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], help="mlp, cnn; tiny: for tests only")
    parser.add_argument("--rounds", type=int, default=7, help="rounds counted (targets: medians over 7 or more)")
    # A process's first fit runs slower, for a dense one by 1.3-1.5x here: that round is not counted.
    parser.add_argument(
        "--warmup-rounds",
        type=int,
        default=None,
        help="rounds fitted first and not counted (default: one a run, so every worker has fitted every run once)",
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--block", type=int, default=10, help="steps a run makes in one turn")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS[:-3]))
    parser.add_argument("--in-threads", action="store_true", help="every fit in a thread of this process instead")
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="each fit's process keeps freed blocks of up to 32 MiB (glibc's malloc settings): fewer page faults",
    )
    parser.add_argument("--out", default="overhead.json")
    args = parser.parse_args()
    if args.keep_freed_memory:
        if args.in_threads:  # glibc reads them once, when a process starts: this one has started
            parser.error("--keep-freed-memory sets each fit's own process: it cannot be used with --in-threads")
        os.environ.update(KEEP_FREED_MEMORY)  # inherited by the spawned fits
    # A run named twice is timed twice ("dense dense" is an A/A check of the method's noise).
    runs = [
        run if args.runs[:i].count(run) == 0 else f"{run}#{args.runs[:i].count(run) + 1}"
        for i, run in enumerate(args.runs)
    ]

    results = {}
    for model_name in args.models:
        times, fitted_by = time_rounds(model_name, runs, args)
        # Ratios are paired within a round (the same seconds of machine noise), then the median is taken.
        results[model_name] = {
            run: {
                "median_ms": statistics.median(values) * 1e3,
                "ratio": statistics.median(t / d for t, d in zip(values, times[runs[0]], strict=True)),
                "all_ms": [t * 1e3 for t in values],
                "workers": fitted_by[run],  # which worker process fitted it, a round
            }
            for run, values in times.items()
        }
    print(f"\n{'model':<6}{'run':<14}{'amortized ms/step':>19}{f'ratio vs {runs[0]} (paired median)':>32}")
    for model_name, rows in results.items():
        for run, row in rows.items():
            print(f"{model_name:<6}{run:<14}{row['median_ms']:>19.2f}{row['ratio']:>32.3f}")
    meta = {
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "threads": torch.get_num_threads(),
        "malloc": {name: os.environ.get(name) for name in KEEP_FREED_MEMORY},  # as the fits' processes got them
        **vars(args),
    }
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
