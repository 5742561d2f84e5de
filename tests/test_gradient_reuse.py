"""Sparse-kernel layers write each step's weight gradient into the last one, where no one else can see it."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_rigl import RigLCallback
from lightning_rigl.core.kernels.masked_gradients import GradientRecords
from lightning_rigl.core.kernels.served_layers import linear_layers
from lightning_rigl.core.kernels.sparse_kernels import SparseKernels
from tests.helpers import MLP, make_loader, make_trainer

NAMES = ["0.weight"]


@pytest.fixture
def reused(monkeypatch):
    """The address of every gradient a backward wrote into the last one (None where it made a new one)."""
    taken: list[int | None] = []
    take = GradientRecords.take

    def spy(self, name, weight, index):
        grad = take(self, name, weight, index)
        taken.append(None if grad is None else grad.data_ptr())
        return grad

    monkeypatch.setattr(GradientRecords, "take", spy)
    return taken


def sparse_layer(seed=0):
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(9, 6, dtype=torch.float64)
    mask = torch.rand(6, 9, generator=gen) < 0.4
    with torch.no_grad():
        layer.weight.copy_(torch.randn(6, 9, generator=gen, dtype=torch.float64) * mask)
    return layer, mask, SparseKernels(linear_layers(nn.Sequential(layer)), {"0.weight": mask})


def backward(layer, kernels, seed):
    """One step's forward and backward on signed inputs; returns the masked dense gradient it should give."""
    gen = torch.Generator().manual_seed(seed)
    x, upstream = torch.randn(5, 9, generator=gen, dtype=torch.float64) * 3, torch.randn(5, 6, generator=gen)
    kernels.set_dense_gradient(False)
    layer(x).backward(upstream.double())
    return upstream.double().t() @ x * (layer.weight != 0)


def offered(layer, kernels):
    """Mask the gradient's step as RigLCallback does (it is already 0 where inactive), then zero_grad(set_to_none)."""
    kernels.offer_gradients(NAMES)
    address = layer.weight.grad.data_ptr()
    layer.weight.grad = None
    return address


def test_the_next_backward_writes_into_the_offered_gradient_with_the_new_values(reused):
    layer, mask, kernels = sparse_layer()
    backward(layer, kernels, seed=1)
    last = offered(layer, kernels)
    want = backward(layer, kernels, seed=2)
    assert reused == [None, last] and layer.weight.grad.data_ptr() == last  # the same tensor, written over
    torch.testing.assert_close(layer.weight.grad, want, rtol=1e-12, atol=1e-12)
    assert layer.weight.grad[~mask].eq(0).all() and layer.weight.grad[mask].ne(0).all()
    kernels.detach()


def test_a_gradient_that_someone_still_holds_or_views_is_never_written_over(reused):
    layer, _, kernels = sparse_layer()
    for keep in (lambda g: g, lambda g: g.view(-1)):
        backward(layer, kernels, seed=1)
        held = keep(layer.weight.grad)
        before = held.clone()
        offered(layer, kernels)
        want = backward(layer, kernels, seed=2)
        assert torch.equal(held, before) and reused[-1] is None
        torch.testing.assert_close(layer.weight.grad, want, rtol=1e-12, atol=1e-12)
        del held
        layer.weight.grad = None
    kernels.detach()


def test_a_gradient_changed_after_it_was_offered_is_not_reused(reused):
    layer, _, kernels = sparse_layer()
    backward(layer, kernels, seed=1)
    kernels.offer_gradients(NAMES)
    layer.weight.grad.mul_(0.5)  # gradient clipping, after the masking: a new version
    layer.weight.grad = None
    want = backward(layer, kernels, seed=2)
    assert reused == [None, None]
    torch.testing.assert_close(layer.weight.grad, want, rtol=1e-12, atol=1e-12)
    kernels.detach()


def test_a_live_gradient_kept_by_zero_grad_without_set_to_none_accumulates_as_usual(reused):
    layer, _, kernels = sparse_layer()
    backward(layer, kernels, seed=1)
    kernels.offer_gradients(NAMES)
    layer.weight.grad.zero_()  # optimizer.zero_grad(set_to_none=False)
    want = backward(layer, kernels, seed=2)
    assert reused == [None, None]
    torch.testing.assert_close(layer.weight.grad, want, rtol=1e-12, atol=1e-12)  # not doubled into itself
    kernels.detach()


def test_a_rebuilt_structure_does_not_reuse_the_old_structures_gradient(reused):
    layer, mask, kernels = sparse_layer()
    backward(layer, kernels, seed=1)
    offered(layer, kernels)
    new_mask = ~mask
    with torch.no_grad():
        layer.weight.copy_(torch.randn(6, 9, dtype=torch.float64) * new_mask)
    kernels.update_structure("0.weight", new_mask)  # positions active before are inactive now
    want = backward(layer, kernels, seed=2)
    assert reused == [None, None]
    torch.testing.assert_close(layer.weight.grad, want, rtol=1e-12, atol=1e-12)
    assert layer.weight.grad[mask].eq(0).all()
    kernels.detach()


def test_a_gradient_written_at_the_old_structure_is_not_vouched_for_under_the_new_one():
    # A graph built before a topology update and backpropagated after it writes at the old active positions.
    layer, mask, kernels = sparse_layer()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    kernels.set_dense_gradient(False)
    out = layer(x)
    kernels.update_structure("0.weight", ~mask)
    out.backward(torch.randn(5, 6, generator=gen, dtype=torch.float64))
    assert layer.weight.grad[mask].ne(0).any()  # nonzero where the new mask is inactive
    assert kernels.already_masked(NAMES) == []  # so the step multiplies it by the new mask
    kernels.detach()


def test_two_models_keep_their_own_gradient_records():
    # Layers of the same name in two models: a record of one never vouches for the other's gradient.
    (first, _, first_kernels), (second, _, second_kernels) = sparse_layer(0), sparse_layer(1)
    backward(first, first_kernels, seed=1)
    backward(second, second_kernels, seed=2)
    assert first_kernels.wrote_masked("0.weight", first.weight.grad)
    assert not first_kernels.wrote_masked("0.weight", second.weight.grad)
    assert second_kernels.already_masked(NAMES) == NAMES and first_kernels.already_masked(NAMES) == NAMES
    first_kernels.detach()
    second_kernels.detach()


MASKED = ["net.0.weight", "net.2.weight", "net.5.weight"]


class ReusePerStep(Callback):
    """Per optimizer step: what its backward reused (see ``reused``), and the addresses of its gradients."""

    def __init__(self, reused: list) -> None:
        self.reused, self.seen, self.per_step, self.addresses = reused, 0, {}, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.per_step[trainer.global_step], self.seen = self.reused[self.seen :], len(self.reused)
        self.addresses[trainer.global_step] = [pl_module.get_parameter(name).grad.data_ptr() for name in MASKED]


def test_in_a_fit_ordinary_steps_reuse_the_gradient_and_update_steps_get_a_new_one(reused):
    pl.seed_everything(0, verbose=False)
    rigl = RigLCallback(0.8, delta_t=4, t_end=100, seed=1, kernels="sparse")
    log = ReusePerStep(reused)
    make_trainer([rigl, log], max_steps=10).fit(MLP(), make_loader())
    fresh, dense = [None] * 3, []  # a new tensor per layer; no sparse weight gradient at all
    # Step 0 runs dense (it measures the tokens), steps 3 and 7 compute RigL's dense gradient, and the step
    # after each has new structures; every other step writes into the last step's tensors (the backward
    # reaches the layers from the last to the first).
    last = {step: log.addresses[step - 1][::-1] for step in range(1, 10)}
    expected = [dense, fresh, last[2], dense, fresh, last[5], last[6], dense, fresh, last[9]]
    assert [log.per_step[step] for step in range(10)] == expected


class GradientLog(Callback):
    """After RigLCallback: a copy of each step's gradient of one weight, and with ``hold`` the tensor itself
    (as a user callback that keeps gradients would: a gradient-noise estimate, say)."""

    def __init__(self, name: str, hold: bool = False) -> None:
        self.name, self.hold, self.kept, self.values = name, hold, [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grad = pl_module.get_parameter(self.name).grad
        self.values.append(grad.clone())
        if self.hold:
            self.kept.append(grad)


def test_in_a_fit_a_gradient_the_user_keeps_never_changes_afterwards():
    pl.seed_everything(0, verbose=False)
    rigl = RigLCallback(0.8, delta_t=4, t_end=100, seed=1, kernels="sparse")
    log = GradientLog("net.2.weight", hold=True)
    make_trainer([rigl, log], max_steps=10).fit(MLP(), make_loader())
    assert len({id(grad) for grad in log.kept}) == 10  # every step got its own tensor
    for grad, value in zip(log.kept, log.values, strict=True):
        assert torch.equal(grad, value)


class NanWhereInactive(Callback):
    """Listed before RigLCallback: at one step, writes NaN into an inactive entry of a gradient (NaN * 0 stays NaN)."""

    def __init__(self, rigl: RigLCallback, name: str, at_step: int) -> None:
        self.rigl, self.name, self.at_step = rigl, name, at_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.at_step:
            inactive = (~self.rigl.masks[self.name]).nonzero()[0]
            pl_module.get_parameter(self.name).grad[tuple(inactive)] = float("nan")


def test_in_a_fit_a_gradient_multiplied_by_its_mask_is_not_carried_into_the_next_step(reused):
    pl.seed_everything(0, verbose=False)
    rigl = RigLCallback(0.8, method="static", seed=1, kernels="sparse")
    log = GradientLog("net.2.weight")
    model = MLP()
    make_trainer([NanWhereInactive(rigl, "net.2.weight", at_step=2), rigl, log], max_steps=4).fit(model, make_loader())
    mask = rigl.masks["net.2.weight"]
    assert log.values[2][~mask].isnan().sum() == 1  # masked by multiplication: the NaN stays
    assert log.values[3][~mask].eq(0).all()  # the next step's gradient starts from a new tensor
    # That step's backward reached net.5, net.2 and net.0 in turn: only net.2 got a new tensor.
    assert reused[-3] is not None and reused[-2] is None and reused[-1] is not None
