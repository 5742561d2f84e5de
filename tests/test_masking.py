"""Inactive weights stay exactly 0: kept there by the optimizer itself where it provably does so, by a
pass over the weights after every step otherwise, and a detected leak switches to the pass."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_rigl import SparseTraining, UpdateSchedule
from lightning_rigl.core.topology.masking import nonzero_where_inactive
from lightning_rigl.core.topology.zero_guard import ZERO_PRESERVING_OPTIMIZERS, keeps_zeros

optim = torch.optim
OPTIMIZERS = {
    "sgd": lambda p: optim.SGD(p, lr=0.1),
    "sgd-momentum-decay": lambda p: optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2),
    "sgd-nesterov-maximize-fused": lambda p: optim.SGD(
        p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, maximize=True, fused=True
    ),
    "adam": lambda p: optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    "adam-amsgrad-loop": lambda p: optim.Adam(p, lr=1e-2, amsgrad=True, foreach=False),
    "adamw-fused": lambda p: optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
    "adamax": lambda p: optim.Adamax(p, lr=1e-2, weight_decay=1e-2),
    "nadam": lambda p: optim.NAdam(p, lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True),
    "radam": lambda p: optim.RAdam(p, lr=1e-2, weight_decay=1e-2),
    "adagrad": lambda p: optim.Adagrad(p, lr=0.1, lr_decay=1e-3, weight_decay=1e-2, initial_accumulator_value=0.5),
    "adadelta": lambda p: optim.Adadelta(p, lr=1.0, weight_decay=1e-2),
    "rmsprop-centered": lambda p: optim.RMSprop(p, lr=1e-2, momentum=0.9, centered=True, weight_decay=1e-2),
    "rprop": lambda p: optim.Rprop(p, lr=1e-2),
    "asgd": lambda p: optim.ASGD(p, lr=1e-2, weight_decay=1e-2, t0=5),
}


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 4))


class WeightMultiplies(TorchDispatchMode):
    """Counts in-place multiplications of the given weights by lists of tensors (masks)."""

    def __init__(self, weights):
        super().__init__()
        self.pointers, self.count = {w.data_ptr() for w in weights}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._foreach_mul_.List and any(t.data_ptr() in self.pointers for t in args[0]):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _train(make_optimizer, steps=40, model=None, sparse_kwargs=None, between=None, passes=None):
    """Train with RigL updates every 3 steps; yield after every step. Into ``passes`` go the steps after
    which weights (not gradients) were multiplied by the masks."""
    model = model or _model()
    optimizer = make_optimizer(model.parameters())
    sparse = SparseTraining.from_model(
        model, 0.7, schedule=UpdateSchedule(delta_t=3, t_end=30), **(sparse_kwargs or {})
    )
    passes = [] if passes is None else passes
    data = torch.Generator().manual_seed(1)
    for step in range(steps):
        x, y = torch.randn(16, 12, generator=data), torch.randn(16, 4, generator=data)
        nn.functional.mse_loss(model(x), y).backward()
        sparse.before_step(step, optimizer)
        if between is not None:
            between(model)
        optimizer.step()
        with WeightMultiplies(model.parameters()) as multiplies:
            sparse.after_step([optimizer], optimizer)
        if multiplies.count:
            passes.append(step)
        optimizer.zero_grad()
        yield model, sparse


def _untrusted(make_optimizer):
    """The same optimizer as a subclass: not a listed type, so its weights get the pass every step."""

    def make(params):
        optimizer = make_optimizer(params)
        optimizer.__class__ = type(f"Sub{type(optimizer).__name__}", (type(optimizer),), {})
        return optimizer

    return make


def assert_inactive_zero(model, sparse):
    params = dict(model.named_parameters())
    for name, mask in sparse.masks.items():
        assert params[name][~mask].eq(0).all(), name


def test_every_listed_optimizer_is_tested():
    assert {type(OPTIMIZERS[name]([nn.Parameter(torch.zeros(1))])) for name in OPTIMIZERS} == set(
        ZERO_PRESERVING_OPTIMIZERS
    )


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizers_that_keep_zeros_need_no_weight_pass_and_train_identically(name):
    reference_passes = []
    reference = [
        [p.detach().clone() for p in model.parameters()]
        for model, _ in _train(_untrusted(OPTIMIZERS[name]), passes=reference_passes)
    ]
    assert reference_passes == list(range(40))
    passes = []
    for step, (model, sparse) in enumerate(_train(OPTIMIZERS[name], passes=passes)):
        assert_inactive_zero(model, sparse)
        for got, expected in zip(model.parameters(), reference[step], strict=True):
            assert torch.equal(got, expected), step  # bit-identical to re-zeroing after every step
    assert sparse.updates == 9
    assert passes == [0]  # one pass, at the optimizer's first step, while its state is checked


def test_an_unknown_optimizer_gets_the_weight_pass_every_step():
    class Drifting(torch.optim.SGD):
        """Moves every weight, zero or not, as an optimizer mixing positions might."""

        @torch.no_grad()
        def step(self, closure=None):
            super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(1e-3)

    assert not keeps_zeros(Drifting([nn.Parameter(torch.zeros(1))], lr=0.1))
    passes = []
    for model, sparse in _train(lambda p: Drifting(p, lr=0.1), steps=10, passes=passes):
        assert_inactive_zero(model, sparse)
    assert passes == list(range(10))


def test_state_from_before_the_masks_is_zeroed_at_inactive_positions():
    dense = _model()
    optimizer = torch.optim.SGD(dense.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):  # dense training: momentum everywhere
        dense(torch.randn(8, 12)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    passes = []
    for model, sparse in _train(lambda p: optimizer, steps=20, model=dense, passes=passes):
        assert_inactive_zero(model, sparse)
    assert passes == [0]
    state = optimizer.state
    for name, mask in sparse.masks.items():
        assert state[sparse.params[name]]["momentum_buffer"][~mask].eq(0).all(), name


def test_a_step_without_masked_gradients_gets_the_weight_pass():
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    sparse = SparseTraining.from_model(model, 0.7)
    for _ in range(3):
        model(torch.randn(8, 12)).pow(2).mean().backward()
        sparse.before_step(0, optimizer)
        optimizer.step()
        sparse.after_step([optimizer], optimizer)
    model(torch.randn(8, 12)).pow(2).mean().backward()
    optimizer.step()  # before_step forgotten: the optimizer moves inactive weights
    sparse.after_step([optimizer], optimizer)
    assert_inactive_zero(model, sparse)


def test_a_leak_into_inactive_weights_is_found_and_the_weight_pass_takes_over():
    def add_noise_after_masking(model):
        for p in model.parameters():
            p.grad.add_(torch.randn_like(p))

    passes = []
    steps = _train(
        lambda p: torch.optim.SGD(p, lr=0.1),
        steps=12,
        sparse_kwargs={"verify_every": 5},
        between=add_noise_after_masking,
        passes=passes,
    )
    with pytest.warns(UserWarning, match=r"re-zeroed after every step from now on"):
        for _ in range(5):
            model, sparse = next(steps)
    assert_inactive_zero(model, sparse)
    for model, sparse in steps:
        assert_inactive_zero(model, sparse)
    assert passes == [0, 4, 5, 6, 7, 8, 9, 10, 11]


def test_verify_every_must_be_a_positive_int():
    with pytest.raises(ValueError, match=r"`verify_every` must be an int >= 1, got 0"):
        SparseTraining.from_model(_model(), 0.5, verify_every=0)


def test_the_zero_check_reads_every_chunk_and_ignores_nan():
    mask = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    weight = torch.tensor([5.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0])
    assert not nonzero_where_inactive(weight, mask, chunk=2)
    weight[6] = 1e-30  # in the last, partial chunk
    assert nonzero_where_inactive(weight, mask, chunk=2)
    weight[6] = float("nan")
    assert not nonzero_where_inactive(weight, mask, chunk=2)
    weight[5] = 1e-45  # the smallest float32, next to a NaN in the same chunk: still seen
    assert nonzero_where_inactive(weight, mask, chunk=2)
    weight[5] = 0.0
    weight[0] = float("inf")  # active: any value is allowed there
    assert not nonzero_where_inactive(weight, mask, chunk=2)
    weight[1] = -float("inf")  # a negative nonzero where inactive
    assert nonzero_where_inactive(weight, mask, chunk=2)
    assert nonzero_where_inactive(weight, mask.bool(), chunk=3)
