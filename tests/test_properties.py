"""Property-based tests of the core (hypothesis)."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_rigl import SparseTraining, UpdateSchedule, layer_sparsities
from lightning_rigl.core import drop_and_grow, num_active
from lightning_rigl.core.top_k import top_k_indices

shape = st.one_of(
    st.tuples(st.integers(1, 64), st.integers(1, 64)),
    st.tuples(st.integers(1, 16), st.integers(1, 16), st.integers(1, 3), st.integers(1, 3)),
)


@settings(max_examples=200, deadline=None)
@given(
    shapes=st.lists(shape, min_size=1, max_size=6),
    sparsity=st.floats(0.0, 0.99),
    distribution=st.sampled_from(["erk", "er", "uniform"]),
    custom_value=st.floats(0.0, 0.99),
    use_custom=st.booleans(),
)
def test_layer_sparsities_fit_the_budget(shapes, sparsity, distribution, custom_value, use_custom):
    named = {f"l{i}": s for i, s in enumerate(shapes)}
    custom = {"l0": custom_value} if use_custom and len(named) > 1 else {}
    result = layer_sparsities(named, sparsity, distribution, custom=custom)
    assert list(result) == list(named)
    assert all(0.0 <= s < 1.0 for s in result.values())
    if custom:
        assert result["l0"] == custom_value
    budget = {n: s for n, s in named.items() if n not in custom}
    target = sum(math.prod(s) - math.floor(sparsity * math.prod(s)) for s in budget.values())
    active = sum(num_active(math.prod(s), result[n]) for n, s in budget.items())
    # Equal up to the floors: at most one weight a layer, both ways.
    assert abs(active - target) <= len(budget) + 1


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

    new_mask, grown = drop_and_grow(mask, weight, scores.abs(), drop_fraction)
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


@settings(max_examples=60, deadline=None)
@given(
    numel=st.integers(1, 2**18),
    fraction=st.floats(0.0, 1.0),
    largest=st.booleans(),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_top_k_indices_selects_the_stable_sort_prefix(numel, fraction, largest, ties, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(numel, generator=g)
    if ties:
        values = values.round(decimals=1)  # many equal values, also at the boundary
        values[torch.rand(numel, generator=g) < 0.8] = math.inf if not largest else -math.inf
    k = math.floor(numel * fraction**3)  # small k against numel too: the sampled bound's path
    got = top_k_indices(values, k, largest=largest)
    # The tie rule: among equal values the lower index first, as a stable sort orders them.
    expected = torch.sort(values, descending=largest, stable=True).indices[:k]
    assert got.tolist() == sorted(expected.tolist())
