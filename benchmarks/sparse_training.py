"""A whole RigL training step with sparse kernels against dense training, and sparsify inference.

    python benchmarks/sparse_training.py                 # MLP 784-4096-4096-10, 90 % and 95 % ERK
    python benchmarks/sparse_training.py --kernels sparse --sparsities 0.95 --rounds 3
    python benchmarks/sparse_training.py --model transformer --sparsities 0.9 --skip-inference

Models: "mlp" (784-4096-4096-10, batch 256 rows, SGD with momentum 0.9) and "transformer"
(``lightning.pytorch.demos.Transformer``: width 512, 8 heads, feed-forward 2048, 2 encoder and 2
decoder layers, vocabulary 1000, 16 sequences of 32 tokens = 512 rows, Adam; the vocabulary head left
dense, as examples/transformer.py does; attention's own projections stay on dense kernels).

Training runs, same model, data and optimizer, driven by a plain loop:
  dense:        no masks, dense kernels
  rigl-dense:   SparseTraining (RigL, ERK, delta_t=100), dense kernels (the masked dense path)
  rigl-<kernels>: the same with SparseKernels on the layers ``choose_kernels`` picks; the step before
                an update computes the dense weight gradient (``set_dense_gradient``)
Each round gives every run a block of ``--block`` steps in turn (interleaved: the machine's noise hits all
runs alike) whose step indices include one RigL update step (delta_t = 100). A run's figure per round is
its amortized step time: the median of its ordinary steps plus the extra time of the update step spread
over delta_t steps. The table gives, over rounds, the median figure and the median of paired ratios
to dense.

Inference: the 95 % RigL model (its masks), batch 64, ``sparsify(model, masks)`` against the masked
dense model, alternating calls under ``torch.inference_mode``; median times and of paired ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from lightning.pytorch.demos import Transformer
from torch import nn

from lightning_rigl import SparseTraining, UpdateSchedule
from lightning_rigl.core.kernels.sparsify import sparsify

DELTA_T = 100


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10))


VOCAB, SEQ = 1000, 32


def transformer() -> nn.Module:
    return Transformer(VOCAB, ninp=512, nhead=8, nhid=2048, nlayers=2, dropout=0.0)


def make_batch(model_name: str, batch: int, gen: torch.Generator) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The model's inputs and the targets; ``batch`` is rows for the MLP, sequences for the Transformer."""
    if model_name == "mlp":
        return (torch.randn(batch, 784, generator=gen),), torch.randint(0, 10, (batch,), generator=gen)
    tokens = torch.randint(0, VOCAB, (batch, SEQ), generator=gen)
    return (tokens, tokens), tokens.reshape(-1)


def loss_of(model_name: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if model_name == "mlp":
        return nn.functional.cross_entropy(output, target)
    return nn.functional.nll_loss(output, target)  # the demo Transformer returns log-probabilities


class Run:
    """One training run: a model, its optimizer, and optionally RigL and sparse kernels."""

    def __init__(self, sparsity: float | None, kernels: str, batch: int, model_name: str = "mlp") -> None:
        torch.manual_seed(0)
        self.model_name = model_name
        self.model = mlp() if model_name == "mlp" else transformer()
        if model_name == "mlp":
            self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        else:
            self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.sparse: SparseTraining | None = None
        gen = torch.Generator().manual_seed(1)
        self.inputs, self.target = make_batch(model_name, batch, gen)
        if sparsity is not None:
            schedule = UpdateSchedule(delta_t=DELTA_T, t_end=10**9)
            exclude = None if model_name == "mlp" else ["decoder.weight"]
            self.sparse = SparseTraining.from_model(
                self.model, sparsity, "erk", exclude=exclude, schedule=schedule, kernels=kernels
            )
            self.step(0)  # the run's first step records each layer's rows; the kernels are chosen after it

    @property
    def choices(self) -> dict[str, str]:
        return self.sparse.kernel_choices if self.sparse is not None else {}

    def step(self, step: int) -> float:
        start = time.perf_counter()
        if self.sparse is not None:  # the three calls RigLCallback makes from its hooks
            self.sparse.start_step(step)
        loss_of(self.model_name, self.model(*self.inputs), self.target).backward()
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


def training(sparsity: float, kernels: str, batch: int, rounds: int, block: int, model_name: str) -> None:
    runs = {"dense": Run(None, kernels, batch, model_name), "rigl-dense": Run(sparsity, "dense", batch, model_name)}
    runs[f"rigl-{kernels}"] = Run(sparsity, kernels, batch, model_name)
    choices = runs[f"rigl-{kernels}"].choices
    densities = {name: float(mask.float().mean()) for name, mask in runs["rigl-dense"].sparse.masks.items()}
    print(f"\n## {model_name}, sparsity {sparsity}: layer density -> {kernels} choice")
    for name, choice in choices.items():
        print(f"  {name}: {densities[name]:.3f} -> {choice}")
    figures: dict[str, list[float]] = {name: [] for name in runs}
    first = DELTA_T - block // 2  # the block's steps straddle the update after step DELTA_T - 1
    for round_ in range(rounds + 1):  # round 0 warms up
        offset = round_ * DELTA_T
        for name, run in runs.items():
            times = [run.step(offset + first + i) for i in range(block)]
            if round_:
                figures[name].append(amortized(times, DELTA_T - 1 - first))
    print("| run | amortized step ms (median) | ratio to dense (median of paired) |")
    print("|---|---|---|")
    for name, values in figures.items():
        ratio = statistics.median(v / d for v, d in zip(values, figures["dense"], strict=True))
        print(f"| {name} | {1e3 * statistics.median(values):.1f} | {ratio:.3f} |", flush=True)


def inference(sparsity: float, kernels: str, batch: int, reps: int) -> None:
    run = Run(sparsity, "dense", batch, "mlp")
    masked, masks = run.model.eval(), run.sparse.masks
    fast = sparsify(masked, masks, kernels=kernels, tokens=batch)
    x = torch.randn(batch, 784, generator=torch.Generator().manual_seed(2))
    pairs = []
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), masked(x), rtol=1e-4, atol=1e-4)
        for _ in range(reps):
            start = time.perf_counter()
            masked(x)
            middle = time.perf_counter()
            fast(x)
            pairs.append((middle - start, time.perf_counter() - middle))
    sparse_layers = fast.sparse_kernels.names
    print(f"\n## inference, sparsity {sparsity}, batch {batch}, sparsify(kernels={kernels!r}): sparse {sparse_layers}")
    print("| masked dense ms | sparsify ms | speed-up (median of paired dense/sparse) |")
    print("|---|---|---|")
    dense_ms, sparse_ms = (1e3 * statistics.median(p[i] for p in pairs) for i in (0, 1))
    print(f"| {dense_ms:.2f} | {sparse_ms:.2f} | {statistics.median(d / s for d, s in pairs):.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "transformer"], default="mlp")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95])
    parser.add_argument("--kernels", choices=["auto", "sparse"], default="auto")
    parser.add_argument("--batch", type=int, help="rows (MLP, default 256) or sequences (Transformer, default 16)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--block", type=int, default=6, help="steps per run and round, one of them an update step")
    parser.add_argument("--inference-sparsity", type=float, default=0.95)
    parser.add_argument("--inference-batch", type=int, default=64)
    parser.add_argument("--inference-reps", type=int, default=60)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-inference", action="store_true", help="inference is measured on the MLP only")
    args = parser.parse_args()
    batch = args.batch or (256 if args.model == "mlp" else 16)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_training:
        for sparsity in args.sparsities:
            training(sparsity, args.kernels, batch, args.rounds, args.block, args.model)
    if not args.skip_inference:
        inference(args.inference_sparsity, args.kernels, args.inference_batch, args.inference_reps)


if __name__ == "__main__":
    main()
