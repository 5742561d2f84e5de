"""One topology update, on one layer's masks and on SparseTraining: the worked example and its corner cases."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_rigl import SparseTraining, UpdateSchedule
from lightning_rigl.core import reset_optimizer_state
from tests.helpers import update_layer_masks

MASK = torch.tensor([0, 1, 0, 1, 0, 1, 1, 0], dtype=torch.bool)
WEIGHT = torch.tensor([-9.0, 1, 4, -1, 5, 8, -2, 3])
GRAD = torch.tensor([0.1, 5, 0.3, 0.2, 0.9, 0.05, 0.4, 0.6])
NEW_MASK = [0, 1, 0, 0, 1, 1, 1, 0]


def test_worked_example_of_the_reference():
    new_mask, grown = update_layer_masks(MASK, WEIGHT, GRAD.abs(), 0.5)
    assert new_mask.int().tolist() == NEW_MASK
    assert grown.nonzero().flatten().tolist() == [4]  # index 1 was dropped and regrown: not new


def test_active_weight_at_zero_is_dropped_before_any_inactive_position():
    mask = torch.tensor([True, True, False, False])
    new_mask, _ = update_layer_masks(mask, torch.tensor([0.0, 3.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 0.0]), 0.5)
    assert new_mask.tolist() == [False, True, True, False]


def test_grow_never_picks_a_kept_position_even_with_negative_scores():
    mask = torch.tensor([True, True, False, False])
    scores = torch.tensor([5.0, 5.0, -1.0, -2.0])  # a "multiply by 0" exclusion would regrow index 0 or 1
    new_mask, grown = update_layer_masks(mask, torch.tensor([1.0, 2.0, 0.0, 0.0]), scores, 0.5)
    assert new_mask.tolist() == [True, True, False, False]  # index 0 dropped, then regrown: best score
    scores = torch.tensor([-5.0, 5.0, -1.0, -2.0])
    new_mask, grown = update_layer_masks(mask, torch.tensor([1.0, 2.0, 0.0, 0.0]), scores, 0.5)
    assert new_mask.tolist() == [False, True, True, False] and grown.tolist() == [False, False, True, False]


def test_drop_fraction_zero_changes_nothing():
    new_mask, grown = update_layer_masks(MASK, WEIGHT, GRAD, 0.0)
    assert torch.equal(new_mask, MASK) and not grown.any()


def _layer(values, mask):
    """A one-layer SparseTraining on a Parameter holding `values` under `mask`, updating at step 1."""
    layer = nn.Linear(8, 1, bias=False)
    sparse = SparseTraining(
        {"weight": layer.weight},
        {"weight": 0.5},
        schedule=UpdateSchedule(delta_t=1, t_end=10, alpha=0.5, decay="constant"),
    )
    sparse.set_masks({"weight": mask.view(1, 8)})
    with torch.no_grad():
        layer.weight.copy_(values.view(1, 8))
    return layer.weight, sparse


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_update_resets_state_of_new_connections_and_zeroes_it_where_inactive(optimizer):
    weight, sparse = _layer(WEIGHT, MASK)
    if optimizer == "sgd":
        opt = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.Adam([weight], lr=0.1)
    weight.grad = torch.ones_like(weight)
    opt.step()  # creates the state
    with torch.no_grad():
        weight.copy_(WEIGHT.view(1, 8))
    state_values = {k: v for k, v in opt.state[weight].items() if v.shape == weight.shape}
    for i, value in enumerate(state_values.values()):
        value.copy_(torch.arange(8.0).view(1, 8) + 10 * (i + 1))
    before = {k: v.clone() for k, v in state_values.items()}
    kept_weights = weight.detach().clone()

    weight.grad = GRAD.view(1, 8).clone()
    sparse.before_step(0, opt)
    sparse.after_step([opt], opt)  # the optimizer step itself is left out so that values are known

    assert sparse.masks["weight"].int().flatten().tolist() == NEW_MASK
    assert weight[0, 4] == 0  # new: grow init 0
    assert weight[0, 1] == kept_weights[0, 1] == 1  # dropped and regrown: keeps its value
    assert weight[0, 3] == 0  # dropped
    for key, value in opt.state[weight].items():
        if key in before:
            # Kept connections (1 was dropped and regrown) keep their state; the new one (4) starts
            # at 0; inactive positions, 3 dropped for good among them, hold 0, which nothing reads.
            expected = before[key] * torch.tensor(NEW_MASK).view(1, 8)
            expected[0, 4] = 0
            assert torch.equal(value, expected), key


def test_state_reset_with_several_param_groups_and_optimizers():
    a, b, c = (nn.Parameter(torch.zeros(4)) for _ in range(3))
    first = torch.optim.Adam([{"params": [a]}, {"params": [b], "lr": 0.01}])
    second = torch.optim.SGD([c], lr=0.1, momentum=0.9)
    for p in (a, b, c):
        p.grad = torch.ones(4)
    first.step()
    second.step()
    positions = torch.tensor([False, True, False, True])
    for p in (a, b, c):
        assert reset_optimizer_state([first, second], p, positions) == (2 if p is not c else 1)
    for opt, p in ((first, a), (first, b), (second, c)):
        for key, value in opt.state[p].items():
            if value.shape == p.shape:
                assert value[positions].eq(0).all() and value[~positions].ne(0).all(), key
    assert first.state[a]["step"] == 1  # scalars are left alone


def test_growth_reads_the_magnitude_of_the_dense_gradient_before_masking():
    weight, sparse = _layer(WEIGHT, MASK)
    signed = GRAD * torch.tensor([1, -1, 1, -1, -1, 1, -1, 1])  # index 4's -0.9 beats index 7's 0.6 by magnitude
    weight.grad = signed.view(1, 8).clone()
    sparse.before_step(0)
    assert torch.equal(weight.grad, (signed * MASK).view(1, 8))  # the optimizer sees the masked gradient
    sparse.after_step([])
    assert sparse.masks["weight"].int().flatten().tolist() == NEW_MASK  # grown where |dense gradient| is largest


def test_non_finite_gradients_defer_the_update_to_the_next_finite_step():
    weight, sparse = _layer(WEIGHT, MASK)
    sparse.schedule = UpdateSchedule(delta_t=2, t_end=10, alpha=0.5, decay="constant")
    weight.grad = torch.full((1, 8), float("nan"))
    sparse.before_step(1)  # step 2 is an update step
    sparse.after_step([])
    assert sparse.updates == 0 and sparse.nonfinite_steps == 1
    weight.grad = GRAD.view(1, 8).clone()
    sparse.before_step(2)
    sparse.after_step([])
    assert sparse.updates == 1 and sparse.history[0].step == 2
    assert sparse.masks["weight"].int().flatten().tolist() == NEW_MASK


def test_a_layer_with_every_position_active_is_left_as_it_is_by_an_update(monkeypatch):
    import lightning_rigl.core.topology.layer_update as layer_update

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))  # ERK-style: a dense small head
    sparse = SparseTraining(
        {"0.weight": model[0].weight, "2.weight": model[2].weight},
        {"0.weight": 0.75, "2.weight": 0.0},
        schedule=UpdateSchedule(delta_t=1, t_end=10, alpha=0.5, decay="constant"),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    selected = []
    real = layer_update.grow_candidates

    def spy(mask, *args, **kwargs):
        selected.append(mask)
        return real(mask, *args, **kwargs)

    monkeypatch.setattr(layer_update, "grow_candidates", spy)
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    for step in range(3):
        nn.functional.mse_loss(model(x), y).backward()
        sparse.before_step(step, optimizer)
        head_before = model[2].weight.detach().clone()
        optimizer.step()
        stepped = model[2].weight.detach().clone()
        momentum = optimizer.state[model[2].weight]["momentum_buffer"].clone()
        assert sparse.after_step([optimizer], optimizer) == ["0.weight", "2.weight"]
        optimizer.zero_grad()
        # The dense head: no weight zeroed, none restarted, its momentum untouched, and no selection run for it.
        assert torch.equal(model[2].weight, stepped) and not torch.equal(stepped, head_before)
        assert torch.equal(optimizer.state[model[2].weight]["momentum_buffer"], momentum)
        assert bool(sparse.masks["2.weight"].all())
    assert [mask.numel() for mask in selected] == [96] * 3  # the sparse layer's only
    assert all(0 < record.changed <= 12 for record in sparse.history)  # k = 12 of the sparse layer's 24
    assert all(record.active == 24 + 48 for record in sparse.history)  # both layers' active connections


@settings(max_examples=200, deadline=None)
@given(
    numel=st.integers(1, 300),
    density=st.floats(0.01, 1.0),
    drop_fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    zeros_in_weights=st.booleans(),
)
def test_one_update_keeps_counts_values_and_state(numel, density, drop_fraction, seed, zeros_in_weights):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(numel, generator=g) < density
    weight = torch.randn(numel, generator=g) * mask
    if zeros_in_weights:
        weight[torch.rand(numel, generator=g) < 0.3] = 0.0  # active weights at exactly 0 exist
    scores = torch.randn(numel, generator=g)
    momentum = torch.randn(numel, generator=g)

    new_mask, grown = update_layer_masks(mask, weight, scores.abs(), drop_fraction)
    assert int(new_mask.sum()) == int(mask.sum())  # counts are kept
    assert torch.equal(grown, new_mask & ~mask)  # only new positions are "grown"
    k = int(int(mask.sum()) * drop_fraction)
    assert int(grown.sum()) <= k

    # The same update made by the core, with RigL's |gradient| as the grow score.
    param = torch.nn.Parameter(weight.clone())
    schedule = UpdateSchedule(delta_t=1, t_end=2, alpha=drop_fraction, decay="constant")
    sparse = SparseTraining({"w": param}, {"w": 0.0}, schedule=schedule)
    sparse.set_masks({"w": mask})
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    sparse.after_step([optimizer], optimizer)  # an optimizer's first step zeroes its state where inactive
    optimizer.state[param] = {"momentum_buffer": momentum * mask}
    param.grad = scores.clone()
    sparse.before_step(0, optimizer)
    sparse.after_step([optimizer], optimizer)

    assert torch.equal(sparse.masks["w"], new_mask)
    kept = new_mask & mask
    assert torch.equal(param[kept], weight[kept])  # kept weights keep their values
    assert param[~new_mask].eq(0).all() and param[grown].eq(0).all()  # inactive and new weights are 0
    after = optimizer.state[param]["momentum_buffer"]
    assert torch.equal(after[kept], momentum[kept])  # state of kept connections is untouched
    assert after[~kept].eq(0).all()  # new connections start from 0; inactive ones hold 0
