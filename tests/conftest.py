"""Fixtures for every test. The helpers the tests share (models, data, Trainers, checks) are in tests/helpers.py."""

import lightning.pytorch as pl
import pytest
import torch

from tests.helpers import TwoRanks


@pytest.fixture(autouse=True)
def _seed():
    pl.seed_everything(0, verbose=False)


@pytest.fixture
def two_threads():
    """CPU matmuls split their sums by thread: runs compared with recorded digests use 2 threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def two_ranks():
    """Two processes kept for the session, ranks 0 and 1 of a DDP or FSDP2 run: ``two_ranks(job, *args)`` runs
    a job on both and returns each rank's result (tests.helpers.TwoRanks)."""
    ranks = TwoRanks()
    yield ranks
    ranks.close()
