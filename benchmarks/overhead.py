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
The five fits run in one process, each in its own thread, taking turns: one fit runs `--block`
steps while the others wait, then the next one does. The machine's noise comes in bursts of a few
seconds, so every run meets the same noise; timing them one after the other does not manage that.
Each step is timed (batch start to next batch start). The figure of a run is its amortized median:
the median time of ordinary steps, plus the extra time of the scheduled steps (every 50th: RigL
updates at multiples of 100, the monitor logs at multiples of 50) spread over all steps. The median
resists the bursts; the scheduled work is counted in full. The table gives, over rounds (each round
is five fresh fits), the median of that figure and the median of its ratio to (a) in the same round.

    python benchmarks/overhead.py --models mlp --runs dense dense   # A/A check: the method's own noise
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_rigl
from lightning_rigl import RigLCallback


class Turns:
    """Lets threads run in turn, round robin, one at a time; a thread that is done leaves the rotation."""

    def __init__(self, parties: int, timeout: float = 600.0) -> None:
        self.start = threading.Barrier(parties, timeout=timeout)  # every fit set up before the first step
        self.end = threading.Barrier(parties, timeout=timeout)  # no teardown while another fit still steps
        self.order, self.current, self.timeout = list(range(parties)), 0, timeout
        self.cond = threading.Condition()

    def wait(self, who: int) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.order[self.current] == who, self.timeout):
                raise TimeoutError(f"run {who} never got its turn")

    def done(self, who: int, leave: bool = False) -> None:
        with self.cond:
            if who not in self.order:
                return
            index = self.order.index(who)
            if leave:
                self.order.pop(index)
                self.current = index % len(self.order) if self.order else 0
            else:
                self.current = (index + 1) % len(self.order)
            self.cond.notify_all()


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
        self.turns.end.wait()

    def on_exception(self, trainer, pl_module, exception):
        self.turns.start.abort()
        self.turns.end.abort()
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


MODELS = {
    "mlp": (mlp, lambda n: torch.randn(n, 784), 32),
    "cnn": (cnn, lambda n: torch.randn(n, 3, 32, 32), 32),
}


RUNS = ("dense", "static", "rigl", "pruning", "rigl+monitor", "rigl-dense", "rigl-sparse")


def callbacks_for(run: str, example_input: torch.Tensor) -> list[Callback]:
    run = run.split("#")[0]
    if run == "dense":
        return []
    if run == "pruning":
        return [PruneAtStart("l1_unstructured", amount=0.9, apply_pruning=False, verbose=0)]
    method = "static" if run == "static" else "rigl"
    kernels = run.removeprefix("rigl-") if run.startswith("rigl-") else "auto"
    callbacks: list[Callback] = [RigLCallback(0.9, "erk", method, delta_t=100, t_end=1.0, seed=0, kernels=kernels)]
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


def time_round(model_name: str, runs: list[str], steps: int, warmup: int, block: int) -> dict[str, float]:
    """Fit every run once, in turns; return each run's amortized median step time."""
    turns = Turns(len(runs))
    timers = [StepTimer(warmup, turns, who, block) for who in range(len(runs))]
    threads = [
        threading.Thread(target=fit, args=(model_name, run, steps, warmup, timer))
        for run, timer in zip(runs, timers, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {run: amortized_median(timer.times) for run, timer in zip(runs, timers, strict=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--block", type=int, default=10, help="steps a run makes in one turn")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS[:-2]))
    parser.add_argument("--out", default="overhead.json")
    args = parser.parse_args()
    # A run named twice is timed twice ("dense dense" is an A/A check of the method's noise).
    runs = [
        run if args.runs[:i].count(run) == 0 else f"{run}#{args.runs[:i].count(run) + 1}"
        for i, run in enumerate(args.runs)
    ]

    results = {}
    for model_name in args.models:
        times: dict[str, list[float]] = {run: [] for run in runs}
        for _ in range(args.rounds):
            for run, value in time_round(model_name, runs, args.steps, args.warmup, args.block).items():
                times[run].append(value)
        # Ratios are paired within a round (the same seconds of machine noise), then the median is taken.
        results[model_name] = {
            run: {
                "median_ms": statistics.median(values) * 1e3,
                "ratio": statistics.median(t / d for t, d in zip(values, times[runs[0]], strict=True)),
                "all_ms": [t * 1e3 for t in values],
            }
            for run, values in times.items()
        }
    print(f"\n{'model':<6}{'run':<14}{'amortized ms/step':>19}{f'ratio vs {runs[0]} (paired median)':>32}")
    for model_name, rows in results.items():
        for run, row in rows.items():
            print(f"{model_name:<6}{run:<14}{row['median_ms']:>19.2f}{row['ratio']:>32.3f}")
    meta = {"torch": torch.__version__, "lightning": pl.__version__, "threads": torch.get_num_threads(), **vars(args)}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
