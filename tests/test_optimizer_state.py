"""A regrown connection's optimizer state restarts at the value the optimizer gives a fresh parameter."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_rigl import RigLCallback
from lightning_rigl.core.topology.optim_state import fresh_state, reset_optimizer_state
from lightning_rigl.core.topology.zero_guard import ZERO_PRESERVING_OPTIMIZERS
from tests.helpers import MLP, RecordGrowth, RpropMLP, make_loader, make_trainer

optim = torch.optim
# name -> (optimizer factory, per-element state a fresh parameter starts with: the spec, by hand).
FRESH = {
    "sgd-momentum": (lambda p: optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2), {"momentum_buffer": 0.0}),
    "sgd-nesterov-maximize": (
        lambda p: optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, maximize=True),
        {"momentum_buffer": 0.0},
    ),
    "adam-amsgrad": (
        lambda p: optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=1e-2),
        {"exp_avg": 0.0, "exp_avg_sq": 0.0, "max_exp_avg_sq": 0.0},
    ),
    "adamw": (lambda p: optim.AdamW(p, lr=1e-2, weight_decay=0.1), {"exp_avg": 0.0, "exp_avg_sq": 0.0}),
    "adamw-fused": (lambda p: optim.AdamW(p, lr=1e-2, fused=True), {"exp_avg": 0.0, "exp_avg_sq": 0.0}),
    "adagrad": (
        lambda p: optim.Adagrad(p, lr=0.1, lr_decay=1e-3, weight_decay=1e-2, initial_accumulator_value=0.3),
        {"sum": 0.3},
    ),
    "rprop": (lambda p: optim.Rprop(p, lr=0.0625), {"prev": 0.0, "step_size": 0.0625}),
    "rmsprop-centered": (
        lambda p: optim.RMSprop(p, lr=1e-2, momentum=0.9, centered=True, weight_decay=1e-2),
        {"square_avg": 0.0, "momentum_buffer": 0.0, "grad_avg": 0.0},
    ),
    "adadelta": (lambda p: optim.Adadelta(p, lr=1.0, weight_decay=1e-2), {"square_avg": 0.0, "acc_delta": 0.0}),
    "nadam": (
        lambda p: optim.NAdam(p, lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True),
        {"exp_avg": 0.0, "exp_avg_sq": 0.0},
    ),
    "radam": (lambda p: optim.RAdam(p, lr=1e-2, weight_decay=1e-2), {"exp_avg": 0.0, "exp_avg_sq": 0.0}),
    "adamax": (lambda p: optim.Adamax(p, lr=1e-2, weight_decay=1e-2), {"exp_avg": 0.0, "exp_inf": 0.0}),
    "asgd": (lambda p: optim.ASGD(p, lr=1e-2, weight_decay=1e-2, t0=2), {"ax": 0.0}),
}


def _signed(seed, shape=(4, 6)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.linspace(0.5, 2.0, shape[-1])


def _trained(make_optimizer, steps=4):
    """A (4, 6) weight and its optimizer after `steps` steps of signed gradients: state differs from fresh."""
    weight = nn.Parameter(_signed(0))
    optimizer = make_optimizer([weight])
    for step in range(steps):
        weight.grad = _signed(step + 1)
        optimizer.step()
    return weight, optimizer


def _per_element(optimizer, param):
    return {k: v for k, v in optimizer.state[param].items() if isinstance(v, torch.Tensor) and v.shape == param.shape}


def test_every_zero_preserving_optimizer_is_tested():
    assert {type(make([nn.Parameter(torch.zeros(1))])) for make, _ in FRESH.values()} == set(ZERO_PRESERVING_OPTIMIZERS)


@pytest.mark.parametrize("name", list(FRESH))
def test_reset_restarts_state_at_the_value_a_fresh_parameter_gets(name):
    make, fresh = FRESH[name]
    weight, optimizer = _trained(make)
    before = {k: v.clone() for k, v in _per_element(optimizer, weight).items()}
    assert set(before) == set(fresh)  # the table names every per-element state
    positions = torch.zeros(4, 6, dtype=torch.bool)
    positions[0, 1] = positions[2, 5] = positions[3, 0] = True
    assert reset_optimizer_state([optimizer], weight, positions) == len(fresh)
    for key, value in _per_element(optimizer, weight).items():
        expected = torch.full_like(value, fresh[key])  # the spec's value, in the state's dtype
        assert torch.equal(value[positions], expected[positions]), key
        assert torch.equal(value[~positions], before[key][~positions]), key


def test_flat_indices_and_bool_masks_reset_the_same_positions():
    by_index, opt_index = _trained(FRESH["adagrad"][0])
    by_mask, opt_mask = _trained(FRESH["adagrad"][0])
    positions = torch.tensor([1, 7, 23])
    reset_optimizer_state([opt_index], by_index, positions)
    flags = torch.zeros(24, dtype=torch.bool)
    flags[positions] = True
    reset_optimizer_state([opt_mask], by_mask, flags.view(4, 6))
    assert torch.equal(opt_index.state[by_index]["sum"], opt_mask.state[by_mask]["sum"])
    assert opt_index.state[by_index]["sum"].view(-1)[positions].eq(0.3).all()


def test_scalar_state_is_left_alone():
    weight, optimizer = _trained(FRESH["adam-amsgrad"][0], steps=3)
    reset_optimizer_state([optimizer], weight, torch.tensor([0, 5]))
    assert optimizer.state[weight]["step"] == 3


def test_a_regrown_rprop_connection_starts_at_lr_and_moves_at_the_next_step():
    weight, optimizer = _trained(FRESH["rprop"][0], steps=6)
    new = torch.tensor([2, 9, 17])
    with torch.no_grad():
        weight.view(-1)[new] = 0.0  # the grow init
    reset_optimizer_state([optimizer], weight, new)
    weight.grad = _signed(10)
    optimizer.step()
    # No previous gradient sign at a fresh connection: it steps by exactly lr against its gradient.
    moved = weight.detach().view(-1)[new]
    assert torch.equal(moved, -0.0625 * weight.grad.view(-1)[new].sign())


def test_fresh_state_follows_the_param_group_and_a_changed_learning_rate():
    a, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2, 2))
    optimizer = optim.Rprop([{"params": [a]}, {"params": [b], "lr": 0.25}], lr=0.5)
    assert fresh_state(optimizer, a)["step_size"] == 0.5
    assert fresh_state(optimizer, b)["step_size"] == 0.25
    optimizer.param_groups[1]["lr"] = 0.125  # as a learning-rate scheduler does
    assert fresh_state(optimizer, b)["step_size"] == 0.125


def test_fresh_state_follows_the_weight_dtype():
    weight = nn.Parameter(torch.ones(2, 2, dtype=torch.bfloat16))
    optimizer = optim.Rprop([weight], lr=0.1)
    assert fresh_state(optimizer, weight)["step_size"] == torch.tensor(0.1, dtype=torch.bfloat16).item()


class WholeDictState(optim.Optimizer):
    """Keeps a per-element trace, but assigns its state dict whole: the first value per key is never seen."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p not in self.state:
                    self.state[p] = {"trace": torch.ones_like(p)}
                trace = self.state[p]["trace"]
                trace.mul_(0.5).add_(p.grad)
                p.add_(trace, alpha=-group["lr"])


class NeedsArguments(optim.SGD):
    """A constructor with a required argument that is not a hyperparameter."""

    def __init__(self, params, schedule_name, lr=0.1):
        super().__init__(params, lr=lr, momentum=0.9)
        self.schedule_name = schedule_name


def test_an_optimizer_whose_fresh_state_is_unknown_is_refused_naming_type_and_key():
    weight, optimizer = _trained(WholeDictState, steps=2)
    with pytest.raises(ValueError, match=r"Cannot restart WholeDictState's state 'trace'"):
        reset_optimizer_state([optimizer], weight, torch.tensor([0]))


def test_an_optimizer_that_cannot_be_probed_is_refused_naming_it():
    weight, optimizer = _trained(lambda p: NeedsArguments(p, "cosine"), steps=2)
    with pytest.raises(ValueError, match=r"Cannot know the state NeedsArguments gives a fresh parameter"):
        reset_optimizer_state([optimizer], weight, torch.tensor([0]))


@pytest.mark.parametrize("name", list(FRESH))
def test_fresh_state_at_inactive_positions_keeps_zero_weights_at_zero(name):
    """ZERO_PRESERVING_OPTIMIZERS's claim, with the state a reset now leaves at inactive positions."""
    make, _ = FRESH[name]
    weight, optimizer = _trained(make)  # dense training: state everywhere
    inactive = _signed(99) > 0.3
    with torch.no_grad():
        weight[inactive] = 0.0
    reset_optimizer_state([optimizer], weight, inactive)
    for step in range(6):
        weight.grad = _signed(step + 20).masked_fill(inactive, 0.0)
        optimizer.step()
        assert weight[inactive].eq(0).all(), step
        assert weight[~inactive].ne(0).all(), step  # the active weights do train


def test_connections_grown_in_a_real_run_restart_rprop_at_lr():
    rigl = RigLCallback(0.8, delta_t=3, t_end=100)
    recorder = RecordGrowth(rigl)
    make_trainer([rigl, recorder], max_steps=9).fit(RpropMLP(), make_loader())
    assert rigl.sparse.updates == 3 and len(recorder.step_sizes) >= 3
    for step_size in recorder.step_sizes:
        assert step_size.eq(0.0625).all()


class CustomStateMLP(MLP):
    def __init__(self, make_optimizer):
        super().__init__()
        self.make_optimizer = make_optimizer

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


class StepCounter(Callback):
    def __init__(self):
        self.steps = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps += 1


@pytest.mark.parametrize(
    ("make_optimizer", "steps_before_refusal", "match"),
    [
        (lambda p: NeedsArguments(p, "cosine"), 0, "Cannot know the state NeedsArguments gives a fresh parameter"),
        (WholeDictState, 1, "Cannot restart WholeDictState's state 'trace'"),
    ],
    ids=["unprobeable", "unknown-key"],
)
def test_an_optimizer_rigl_cannot_restart_is_refused_before_any_update(make_optimizer, steps_before_refusal, match):
    rigl, counter = RigLCallback(0.8, delta_t=4), StepCounter()
    with pytest.raises(MisconfigurationException, match=match):
        make_trainer([counter, rigl], max_steps=8).fit(CustomStateMLP(make_optimizer), make_loader())
    assert counter.steps == steps_before_refusal and rigl.sparse.updates == 0
