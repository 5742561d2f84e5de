"""Layer sparsities (ERK, ER, uniform): against a reference loop, within the budget, custom and dense layers."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_rigl import RigLCallback, layer_sparsities
from lightning_rigl.core.topology.initial_masks import num_active
from tests.helpers import MLP, make_loader, make_trainer

SHAPES = {
    "conv1": (16, 3, 3, 3),
    "conv2": (32, 16, 3, 3),
    "fc1": (256, 512),
    "fc2": (10, 256),
}


def total_active(shapes, sparsities):
    return sum(num_active(math.prod(s), sparsities[n]) for n, s in shapes.items())


def reference_erk(shapes, sparsity, power=1.0):
    """The ERK solver loop (densify the layers whose density would exceed 1, re-solve), written out independently."""
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: (sum(s) / math.prod(s)) ** power for n, s in shapes.items()}
    dense = set()
    while True:
        budget = divisor = 0
        for n in shapes:
            zeros = math.floor(sparsity * numel[n])
            if n in dense:
                budget -= zeros
            else:
                budget += numel[n] - zeros
                divisor += raw[n] * numel[n]
        eps = budget / divisor
        top = max(raw[n] for n in shapes if n not in dense)
        if top * eps > 1:
            dense |= {n for n in shapes if raw[n] == top}
            continue
        return {n: 0.0 if n in dense else 1 - eps * raw[n] for n in shapes}


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95, 0.99])
def test_erk_matches_reference_loop_and_budget(sparsity):
    got = layer_sparsities(SHAPES, sparsity, "erk")
    assert got == pytest.approx(reference_erk(SHAPES, sparsity), abs=1e-12)
    uniform_budget = sum(math.prod(s) - math.floor(sparsity * math.prod(s)) for s in SHAPES.values())
    assert abs(total_active(SHAPES, got) - uniform_budget) <= len(SHAPES)
    assert all(0.0 <= s < 1.0 for s in got.values())


def test_erk_makes_small_layers_dense_and_resolves():
    got = layer_sparsities({"fc1": (300, 784), "fc2": (10, 300)}, 0.9, "erk")
    # By hand: fc2's density 310/3000 * 23820/1394 > 1, so it is dense and fc1 absorbs its 2700 zeros.
    assert got["fc2"] == 0.0
    assert got["fc1"] == pytest.approx(1 - (23520 - 2700) / 235200)


def test_erk_small_layers_denser_big_layers_sparser():
    got = layer_sparsities(SHAPES, 0.9, "erk")
    assert got["conv1"] < 0.9 < got["fc1"]


def test_er_reads_out_and_in_from_dims_0_and_1():
    shapes = {"conv": (64, 8, 3, 3), "fc": (64, 64)}
    got = layer_sparsities(shapes, 0.8, "er")
    # ER ignores the kernel: raw(conv) = (64 + 8) / (64 * 8); reading the last two dims would give 6 / 9.
    ratio = (1 - got["conv"]) / (1 - got["fc"])
    assert ratio == pytest.approx(((64 + 8) / (64 * 8)) / ((64 + 64) / (64 * 64)))


def test_erk_power_scale_zero_is_uniform():
    got = layer_sparsities(SHAPES, 0.9, "erk", erk_power_scale=0.0)
    assert got == pytest.approx(dict.fromkeys(SHAPES, 0.9), abs=1e-4)  # equal up to the floors


def test_uniform_with_dense_layer_gives_others_exactly_the_target():
    got = layer_sparsities(SHAPES, 0.9, "uniform", dense=["conv1"])
    assert got == {"conv1": 0.0, "conv2": 0.9, "fc1": 0.9, "fc2": 0.9}


def test_custom_sparsity_is_kept_and_left_out_of_the_budget():
    got = layer_sparsities(SHAPES, 0.9, "erk", custom={"fc1": 0.5})
    assert got["fc1"] == 0.5
    rest = {n: s for n, s in SHAPES.items() if n != "fc1"}
    assert {n: got[n] for n in rest} == pytest.approx(reference_erk(rest, 0.9))


def test_zero_sparsity_is_dense():
    assert layer_sparsities(SHAPES, 0.0, "erk") == dict.fromkeys(SHAPES, 0.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(sparsity=1.0), "sparsity"),
        (dict(sparsity=-0.1), "sparsity"),
        (dict(sparsity=0.9, distribution="gaussian"), "distribution"),
        (dict(sparsity=0.9, custom={"fc1": 1.0}), "custom"),
        (dict(sparsity=0.9, custom={"nope": 0.5}), "nope"),
        (dict(sparsity=0.9, erk_power_scale=-1), "erk_power_scale"),
        (dict(sparsity=0.9, distribution="uniform", dense=list(SHAPES)), "cannot be reached"),
    ],
)
def test_bad_input_raises_naming_it(kwargs, match):
    with pytest.raises(ValueError, match=match):
        layer_sparsities(SHAPES, **kwargs)


def test_er_rejects_one_dimensional_weights():
    with pytest.raises(ValueError, match="at least 2 dims"):
        layer_sparsities({"v": (10,), "fc": (10, 10)}, 0.5, "er")


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


def test_layers_that_erk_makes_dense_stay_dense_through_updates():
    rigl = RigLCallback(0.98, delta_t=2, t_end=100)
    model = MLP(hidden=1024)
    make_trainer([rigl], max_steps=8).fit(model, make_loader())
    dense = [name for name, s in rigl.sparse.sparsities.items() if s == 0.0]
    assert dense == ["net.5.weight"]  # the 1024 -> 4 head at 98 %
    for name in dense:
        assert rigl.masks[name].all()
