"""What the sparse kernels print: nothing of torch's that a user cannot act on."""

import sys
from pathlib import Path

import pytest

from tests.helpers import run_at_once

ROOT = Path(__file__).parent.parent

# torch warns "Sparse CSR tensor support is in beta state" once per process, at the first CSR tensor made,
# so each case runs in a fresh interpreter that records every warning from the start.
TRAIN = """
from lightning_rigl import RigLCallback
from tests.helpers import MLP, make_loader, make_trainer

rigl = RigLCallback(sparsity=0.9, delta_t=2, t_end=10, kernels="sparse")
make_trainer([rigl], max_steps=4).fit(MLP(), make_loader())
used = sorted(name for name, kernel in rigl.kernel_choices.items() if kernel == "sparse")
"""
SPARSIFY = """
import torch
from torch import nn
from lightning_rigl import sparsify

model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
with torch.no_grad():
    model[0].weight[:, ::2] = 0
fast = sparsify(model, kernels="sparse")
fast(torch.randn(8, 16))
used = fast.sparse_kernels.names
"""
RECORD = """
import warnings

warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
{case}
print("sparse kernels:", used)
print("warnings:", [str(w.message) for w in caught])
"""


CASES = {"fit": TRAIN, "sparsify": SPARSIFY}


@pytest.fixture(scope="module")
def runs():
    """Each case's output, run in a fresh interpreter (the cases side by side)."""
    commands = {}
    for name, case in CASES.items():
        body = "\n".join(f"    {line}" if line else "" for line in case.strip().splitlines())
        commands[name] = ([sys.executable, "-c", RECORD.format(case=body)], ROOT)
    return run_at_once(commands, timeout=120)


@pytest.mark.parametrize("case", list(CASES))
def test_the_first_sparse_kernel_call_does_not_print_torchs_beta_warning(runs, case):
    done = runs[case]
    assert done.returncode == 0, done.stderr
    assert "sparse kernels: []" not in done.stdout  # the sparse path ran
    assert "warnings:" in done.stdout
    assert "Sparse CSR tensor support is in beta state" not in done.stdout + done.stderr
