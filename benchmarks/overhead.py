"""Per-step cost of RigLCallback against dense training and Lightning's ModelPruning.

    python benchmarks/overhead.py            # both models, prints a table, writes overhead.json

Compared runs, same model, data and optimizer (SGD with momentum and weight decay):
  (a) dense: no callback
  (b) rigl: RigLCallback, 90 % ERK, delta_t=100 (update steps included: amortized)
  (c) pruning: Lightning's ModelPruning holding 90 % static (l1, per layer), pruned before step 1
  (d) rigl+monitor: (b) plus SparsityMonitor (FLOPs counted, logging every 50 steps, no table or image)
The runs alternate inside one process, round after round, so that a noisy machine slows all alike.
Each step is timed (batch start to next batch start). The figure of a run is its amortized median:
the median time of ordinary steps, plus the extra time of the scheduled steps (every 50th: RigL
updates at multiples of 100, the monitor logs at multiples of 50) spread over all steps. The median
resists the machine's bursts of noise, and the scheduled work is counted in full. Every run gets
the same treatment. The table gives the median over rounds of that figure, and the median over
rounds of its ratio to (a) in the same round (pairing cancels the machine's slow drifts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_rigl
from lightning_rigl import RigLCallback


class StepTimer(Callback):
    """Wall time of every training step after the warm-up ones, keyed by the step count it ended at."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.last, self.times = warmup, None, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._lap(trainer.global_step)

    def on_train_end(self, trainer, pl_module):
        self._lap(trainer.global_step)

    def _lap(self, step: int) -> None:
        now = time.perf_counter()
        if self.last is not None and step > self.warmup:
            self.times[step] = now - self.last
        self.last = now


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


def callbacks_for(run: str, example_input: torch.Tensor) -> list[Callback]:
    if run == "dense":
        return []
    if run == "pruning":
        return [PruneAtStart("l1_unstructured", amount=0.9, apply_pruning=False, verbose=0)]
    callbacks: list[Callback] = [RigLCallback(0.9, "erk", "rigl", delta_t=100, t_end=1.0, seed=0)]
    if run == "rigl+monitor":
        callbacks.append(lightning_rigl.SparsityMonitor(example_input=example_input, table=False, plot=False))
    return callbacks


def time_run(model_name: str, run: str, steps: int, warmup: int) -> float:
    build, make_x, batch = MODELS[model_name]
    torch.manual_seed(0)
    x = make_x(batch * (steps + warmup))  # one epoch: no epoch-end work inside the timed steps
    y = torch.randint(0, 10, (len(x),))
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)
    timer = StepTimer(warmup)
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
    return amortized_median(timer.times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", default="overhead.json")
    args = parser.parse_args()
    runs = ["dense", "rigl", "pruning", "rigl+monitor"]

    results = {}
    for model_name in args.models:
        times: dict[str, list[float]] = {run: [] for run in runs}
        for _ in range(args.rounds):
            for run in runs:
                times[run].append(time_run(model_name, run, args.steps, args.warmup))
        # Ratios are paired within a round (same minute of machine noise), then the median is taken.
        results[model_name] = {
            run: {
                "median_ms": statistics.median(values) * 1e3,
                "ratio": statistics.median(t / d for t, d in zip(values, times["dense"], strict=True)),
                "all_ms": [t * 1e3 for t in values],
            }
            for run, values in times.items()
        }
    print(f"\n{'model':<6}{'run':<14}{'amortized ms/step':>19}{'ratio vs dense (paired median)':>32}")
    for model_name, rows in results.items():
        for run, row in rows.items():
            print(f"{model_name:<6}{run:<14}{row['median_ms']:>19.2f}{row['ratio']:>32.3f}")
    meta = {"torch": torch.__version__, "lightning": pl.__version__, "threads": torch.get_num_threads(), **vars(args)}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
