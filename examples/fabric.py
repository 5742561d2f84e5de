"""RigL in a Lightning Fabric loop: the core's run object, three calls a step, sparse kernels included.

python examples/fabric.py                  # a 90 %-sparse MLP on scikit-learn's digits, CPU
python examples/fabric.py --kernels sparse # every masked Linear on sparse kernels

The run (`SparseTraining`) does in this loop exactly what RigLCallback does in a Trainer: masks, the dense
gradient at RigL's update steps, drop and grow, the kernel choice after the first step.
"""

from __future__ import annotations

import argparse

import torch
from lightning.fabric import Fabric
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_rigl.core import SparseTraining, UpdateSchedule


def digits_loaders(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, TensorDataset]:
    """Shuffled training batches of 1500 digits, and the remaining ones as a test set."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = order[:1500], order[1500:]
    loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True)
    return loader, TensorDataset(x[test], y[test])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--kernels", choices=["auto", "sparse", "dense"], default="auto")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    fabric = Fabric(accelerator="cpu", devices=1)
    fabric.seed_everything(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model, optimizer = fabric.setup(model, optimizer)
    loader, test = digits_loaders()
    loader = fabric.setup_dataloaders(loader)

    steps = args.epochs * len(loader)
    schedule = UpdateSchedule(delta_t=25, t_end=int(0.75 * steps))
    # The run masks the Parameters of the unwrapped module (Fabric's wrapper shares them).
    sparse = SparseTraining.from_model(model.module, args.sparsity, schedule=schedule, kernels=args.kernels, seed=1)
    step = 0
    for _ in range(args.epochs):
        for x, y in loader:
            sparse.start_step(step)
            fabric.backward(nn.functional.cross_entropy(model(x), y))
            sparse.before_step(step, optimizer)
            optimizer.step()
            sparse.after_step([optimizer], optimizer)
            optimizer.zero_grad()
            step += 1
    sparse.close()

    with torch.no_grad():
        accuracy = (model(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean().item()
    sparsity = {name: round(1 - mask.float().mean().item(), 4) for name, mask in sparse.masks.items()}
    print(f"test accuracy {accuracy:.3f}, {sparse.updates} updates, kernels {sparse.kernel_choices}")
    print(f"sparsity per layer {sparsity}")


if __name__ == "__main__":
    main()
