import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_rigl import RigLCallback, UpdateSchedule
from tests.helpers import MLP, make_loader, make_trainer


@pytest.mark.parametrize(
    ("step", "expected"),
    [(100, 0.2999881566), (6250, 0.2560660172), (12500, 0.15), (18750, 0.0439339828), (25000, 0.0), (30000, 0.0)],
)
def test_cosine_drop_fraction_reference_values(step, expected):
    assert UpdateSchedule(100, 25000, 0.3, "cosine").drop_fraction(step) == pytest.approx(expected, abs=1e-10)


def test_linear_and_constant_decay():
    assert UpdateSchedule(10, 100, 0.4, "linear").drop_fraction(25) == pytest.approx(0.3)
    assert UpdateSchedule(10, 100, 0.4, "constant").drop_fraction(99) == 0.4
    assert UpdateSchedule(10, 100, 0.4, "constant").drop_fraction(100) == 0.0


@pytest.mark.parametrize(("delta_t", "t_end", "total"), [(10, 100, 95), (10, 100, 200), (10, 101, 200), (7, 50, 49)])
def test_update_steps_and_count(delta_t, t_end, total):
    schedule = UpdateSchedule(delta_t, t_end)
    steps = [t for t in range(1, total + 1) if schedule.is_update_step(t)]
    assert steps == [t for t in range(delta_t, total + 1, delta_t) if t < t_end]
    assert schedule.num_updates(total) == len(steps)


def test_updates_are_counted_in_optimizer_steps_not_batches():
    rigl = RigLCallback(0.8, delta_t=3, t_end=100)
    make_trainer([rigl], max_steps=10, accumulate_grad_batches=2).fit(MLP(), make_loader())
    assert [record.step for record in rigl.sparse.history] == [3, 6, 9]


def test_fractional_t_end_is_a_share_of_estimated_stepping_batches():
    rigl = RigLCallback(0.8, delta_t=2, t_end=0.5)
    make_trainer([rigl], max_steps=20).fit(MLP(), make_loader())
    assert rigl.sparse.schedule.t_end == 10
    assert [record.step for record in rigl.sparse.history] == [2, 4, 6, 8]


def test_fractional_t_end_needs_a_known_length():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield torch.randn(16), torch.tensor(0)

    trainer = make_trainer([RigLCallback(0.8, t_end=0.5)], max_steps=-1, max_epochs=-1)
    with pytest.raises(MisconfigurationException, match="t_end=0.5.*as an int"):
        trainer.fit(MLP(), torch.utils.data.DataLoader(Stream(), batch_size=4))


class TwoStepsPerBatch(MLP):
    def __init__(self, optimizers=1):
        super().__init__()
        self.automatic_optimization = False
        self.n_optimizers = optimizers

    def configure_optimizers(self):
        if self.n_optimizers == 1:
            return torch.optim.SGD(self.parameters(), lr=0.05)
        first = list(self.net[0].parameters())
        rest = [p for p in self.parameters() if all(p is not q for q in first)]
        return torch.optim.SGD(first, lr=0.05), torch.optim.SGD(rest, lr=0.05)

    def training_step(self, batch, batch_idx):
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers, optimizers]
        for optimizer in optimizers:
            loss = super().training_step(batch, batch_idx)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()


@pytest.mark.parametrize("optimizers", [1, 2])
def test_a_fractional_t_end_with_several_manual_steps_a_batch_is_refused(optimizers):
    rigl = RigLCallback(0.8, delta_t=50, t_end=0.75)
    model = TwoStepsPerBatch(optimizers)
    with pytest.raises(
        MisconfigurationException, match=r"`t_end=0.75` is a fraction of the run.*Pass `t_end` as an int"
    ):
        make_trainer([rigl], max_steps=-1, max_epochs=2).fit(model, make_loader())
    assert model.trainer.global_step <= 2  # refused before any update, at fit start or after the first batch


def test_an_int_t_end_with_several_manual_steps_a_batch_counts_optimizer_steps():
    rigl = RigLCallback(0.8, delta_t=4, t_end=24)
    make_trainer([rigl], max_steps=-1, max_epochs=2).fit(TwoStepsPerBatch(), make_loader())
    assert [record.step for record in rigl.sparse.history] == [4, 8, 12, 16, 20]
