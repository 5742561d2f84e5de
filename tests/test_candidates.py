"""The chunked top-k reduction and the update from candidates: exact against a full sort, ties to the lower index."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_rigl import SparseTraining, UpdateSchedule
from lightning_rigl.core.topology.candidates import grow_candidates, score_chunks
from lightning_rigl.core.topology.drop_grow import select_drop_grow, smallest_active
from lightning_rigl.core.topology.initial_masks import num_active, random_mask
from lightning_rigl.core.topology.methods import gradient_magnitude, uniform_random
from lightning_rigl.core.topology.sampling import SAMPLE_WIDTH, SAMPLE_WINDOWS
from lightning_rigl.core.topology.top_k import _BAND_SAMPLE, _banded_top_k_mask, index_dtype, top_k_indices, where_true

MASK = torch.tensor([0, 1, 0, 1, 0, 1, 1, 0])
WEIGHT = torch.tensor([-9.0, 1, 4, -1, 5, 8, -2, 3])
GRAD = torch.tensor([0.1, 5, 0.3, 0.2, 0.9, 0.05, 0.4, 0.6])


def reference(mask, weight, scores, k):
    """Brute force: full stable sorts by (|w| ascending, index) to drop and by (score descending, index) to grow."""
    flat_mask, magnitude, scores = mask.reshape(-1).bool(), weight.reshape(-1).abs(), scores.reshape(-1)
    active = flat_mask.nonzero().flatten()
    dropped = active[torch.sort(magnitude[active], stable=True).indices[:k]]
    kept = flat_mask.clone()
    kept[dropped] = False
    open_ = (~kept).nonzero().flatten()
    grown = open_[torch.sort(scores[open_], descending=True, stable=True).indices[:k]]
    return sorted(dropped.tolist()), sorted(grown.tolist())


def rigl_update(mask, weight, grad, k, chunk_size):
    """The candidate path as SparseTraining runs it: |grad| reduced from the signed gradient, then the update."""
    scores = score_chunks(gradient_magnitude, weight, grad, torch.Generator())
    candidates = grow_candidates(mask, k, scores, chunk_size=chunk_size)
    dropped, grown = select_drop_grow(mask, weight, candidates, chunk_size=chunk_size)
    return sorted(dropped.tolist()), sorted(grown.tolist())


def test_worked_example_of_the_reference_from_candidates():
    assert rigl_update(MASK, WEIGHT, GRAD, 2, chunk_size=3) == ([1, 3], [1, 4])


def test_worked_example_with_a_bool_mask_of_another_shape():
    assert rigl_update(MASK.bool().view(2, 4), WEIGHT.view(2, 4), GRAD.view(2, 4), 2, chunk_size=5) == ([1, 3], [1, 4])


def test_drop_ties_between_signed_equal_magnitudes_go_to_the_lower_index():
    mask = torch.tensor([1, 1, 1, 1, 0, 0])
    weight = torch.tensor([3.0, 2.0, -2.0, 2.0, 0.0, 0.0])
    for chunk_size in (1, 2, 6):
        assert smallest_active(mask, weight, 2, chunk_size=chunk_size).tolist() == [1, 2]
        assert smallest_active(mask, -weight, 1, chunk_size=chunk_size).tolist() == [1]


def test_grow_ties_go_to_the_lower_index_among_inactive_and_dropped():
    mask = torch.tensor([0, 1, 0, 1, 0, 0])
    weight = torch.tensor([0.0, 1.0, 0.0, 5.0, 0.0, 0.0])
    grad = torch.tensor([-2.0, 2.0, 1.0, 9.0, 2.0, -2.0])  # |grad| 2 at 0, 1 (dropped), 4, 5
    for chunk_size in (1, 4, 6):
        assert rigl_update(mask, weight, grad, 1, chunk_size) == ([1], [0])
    mask = torch.tensor([1, 1, 0, 1, 0, 0])
    weight = torch.tensor([1.0, 7.0, 0.0, 5.0, 0.0, 0.0])  # index 0 is dropped, then regrown: lowest tie
    assert rigl_update(mask, weight, grad, 1, 2) == ([0], [0])


def test_a_dropped_weight_with_the_best_score_is_regrown():
    mask = torch.tensor([1, 1, 0, 0])
    assert rigl_update(mask, torch.tensor([1.0, 2.0, 0.0, 0.0]), torch.tensor([-5.0, 5.0, 1.0, 2.0]), 1, 1) == (
        [0],
        [0],
    )


def test_grow_reads_magnitudes_of_signed_gradients():
    mask = torch.tensor([1, 0, 0, 0])
    assert rigl_update(mask, torch.tensor([1.0, 0, 0, 0]), torch.tensor([0.0, -3.0, 2.0, -1.0]), 1, 2) == ([0], [1])


def test_zero_gradients_grow_the_lowest_open_indices():
    mask = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    weight = torch.tensor([0.0, 4.0, 1.0, 0.0, 2.0, 0.0, 0.0, 3.0])
    assert rigl_update(mask, weight, torch.zeros(8), 2, 3) == ([2, 4], [0, 2])


def test_candidates_hold_k_inactive_entries_with_int32_indices():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(10_000, generator=g) < 0.1
    grad = torch.randn(10_000, generator=g)
    k = int(int(mask.sum()) * 0.3)
    found = grow_candidates(mask, k, score_chunks(gradient_magnitude, grad, grad, g), chunk_size=999)
    assert found.values.numel() == found.index.numel() == k
    assert found.index.dtype == found.active_index.dtype == torch.int32
    assert not mask[found.index.long()].any() and mask[found.active_index.long()].all()
    # Only active positions above the k-th best inactive score are saved: a few percent of them.
    assert found.active_index.numel() < int(mask.sum()) // 4
    assert found.nbytes == 8 * (k + found.active_index.numel())


def test_index_dtype_is_int64_only_past_int32():
    assert index_dtype(2**31 - 1) == torch.int32 and index_dtype(2**31) == torch.int64


def test_scores_are_read_once_chunk_by_chunk_in_order():
    calls = []

    def scores(start, stop):
        calls.append((start, stop))
        return torch.ones(stop - start)

    grow_candidates(torch.ones(10), 3, scores, chunk_size=4)
    assert calls == [(0, 4), (4, 8), (8, 10)]


def test_without_sampling_large_layers_are_read_once_in_order_too():
    calls = []

    def scores(start, stop):
        calls.append((start, stop))
        return torch.ones(stop - start)

    grow_candidates(torch.zeros(2**18), 100, scores, chunk_size=2**16, sample=False)
    assert calls == [(start, start + 2**16) for start in range(0, 2**18, 2**16)]


def sampled_windows(numel, windows=SAMPLE_WINDOWS, width=SAMPLE_WIDTH):
    starts = torch.linspace(0, numel - width, windows).long()
    return (starts.unsqueeze(1) + torch.arange(width)).flatten()


@pytest.mark.parametrize("chunk_size", [2**14 + 3, 2**18])
def test_a_sample_that_misleads_falls_back_to_the_exact_pass(chunk_size):
    # The sampled windows hold the best scores and the largest weights, the rest ties at one value: the
    # sampled bounds let fewer than k entries through, and the result must still be the full sort's.
    numel = 2**18
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(numel, generator=g) < 0.5
    grad = torch.full((numel,), 0.5)
    grad[sampled_windows(numel)] = -torch.rand(64 * 512, generator=g) - 1.0  # signed: |grad| is the score
    weight = torch.full((numel,), 100.0)
    weight[sampled_windows(numel)] = torch.rand(64 * 512, generator=g)
    weight = (weight * torch.where(torch.rand(numel, generator=g) < 0.5, -1.0, 1.0)) * mask
    # 30000: more than the sampled windows' inactive (about 16 k) or active entries (the streaming pass
    # misses); 12000: fewer, but the hints, read among the windows, let fewer than k through (the one pass misses).
    for k in (30000, 12000):
        assert rigl_update(mask, weight, grad, k, chunk_size) == reference(mask, weight, grad.abs(), k)
        calls = []

        def scores(a, b, calls=calls):
            calls.append((a, b))
            return grad[a:b].abs()

        found = grow_candidates(mask, k, scores, chunk_size=chunk_size)
        chunks = -(-numel // chunk_size)
        assert found.values.numel() == k and len(calls) == 64 + 2 * chunks  # sampled, ran, then ran again


@pytest.mark.parametrize("k", [3000, 40, 1])
def test_a_well_sampled_layer_is_read_once_after_its_sample(k):
    # The sampled hint lets about 1.5 k entries through, plus its margin: one pass over the chunks, no
    # second one, also for the small k of a schedule's late updates.
    numel, chunk_size = 2**18, 2**16
    g = torch.Generator().manual_seed(11)
    mask = (torch.rand(numel, generator=g) < 0.1).float()
    grad = torch.randn(numel, generator=g)
    weight = torch.randn(numel, generator=g) * mask
    calls = []
    found = grow_candidates(mask, k, lambda a, b: calls.append((a, b)) or grad[a:b].abs(), chunk_size=chunk_size)
    assert calls[64:] == [(start, start + chunk_size) for start in range(0, numel, chunk_size)]
    dropped, grown = select_drop_grow(mask, weight, found, chunk_size=chunk_size)
    assert (sorted(dropped.tolist()), sorted(grown.tolist())) == reference(mask, weight, grad.abs(), k)


@pytest.mark.parametrize("k", [1, 40, 900])
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bool, torch.int64])
@pytest.mark.parametrize("density", [0.1, 0.999])
def test_small_drops_never_take_inactive_weights_that_are_smaller(k, mask_dtype, density):
    # Inactive weights not re-zeroed yet (an optimizer that does not keep zeros) and far smaller than
    # every active one, active weights at exactly 0 among them: the drop takes the k smallest active ones
    # only. Small k on a large layer: one pass that lists what reaches its hint by words of bools (at
    # density 0.999 the inactive weights are few enough for the one pass to keep them all if it let them in).
    numel, chunk_size = 2**18, 2**16
    g = torch.Generator().manual_seed(21)
    active = torch.rand(numel, generator=g) < density
    weight = torch.where(active, torch.randn(numel, generator=g), 1e-9 * torch.randn(numel, generator=g))
    weight[active.nonzero().flatten()[::997]] = 0.0
    grad = torch.randn(numel, generator=g)
    mask = active.to(mask_dtype)
    expected = reference(active, weight, grad.abs(), k)
    assert rigl_update(mask, weight, grad, k, chunk_size) == expected
    assert sorted(smallest_active(mask, weight, k, chunk_size=chunk_size).tolist()) == expected[0]


@pytest.mark.parametrize("numel", [2**14, 2**14 + 5, 2**18 + 3])
@pytest.mark.parametrize("density", [0.0, 1e-4, 2e-3, 0.05, 0.6, 1.0])
@pytest.mark.parametrize("offset", [0, 3])
def test_where_true_lists_what_nonzero_lists(numel, density, offset):
    # Sparse, dense (the plain path after the words), a tail past the last whole word, and a view that
    # starts off an 8-byte boundary.
    g = torch.Generator().manual_seed(numel + offset)
    flags = (torch.rand(numel + offset, generator=g) < density)[offset:]
    flags[-1] = density > 0  # in the tail past the last whole word, where there is one
    assert torch.equal(where_true(flags), flags.nonzero().flatten())
    assert where_true(flags).dtype == torch.int64


@pytest.mark.parametrize("chunk_size", [2**14 + 3, 2**18])
def test_a_sample_that_lets_too_many_through_still_gives_the_full_sorts_selection(chunk_size):
    # The sampled windows hold the worst scores and the smallest active weights' opposite: their hints let
    # nearly every entry through, and the pass hands over to the streaming selection, which must be exact.
    numel = 2**18
    g = torch.Generator().manual_seed(12)
    mask = (torch.rand(numel, generator=g) < 0.5).float()
    grad = torch.randn(numel, generator=g).sign() * (torch.rand(numel, generator=g) + 1.0)
    grad[sampled_windows(numel)] = 1e-3 * torch.rand(64 * 512, generator=g)
    weight = torch.randn(numel, generator=g) * 0.1
    weight[sampled_windows(numel)] = 100.0 + torch.rand(64 * 512, generator=g)
    weight = weight * mask
    for k in (2000, 20000):
        assert rigl_update(mask, weight, grad, k, chunk_size) == reference(mask, weight, grad.abs(), k)


def test_no_scores_are_read_when_nothing_is_replaced():
    found = grow_candidates(torch.ones(10), 0, lambda start, stop: pytest.fail("read"), chunk_size=4)
    assert found.values.numel() == found.active_values.numel() == 0
    dropped, grown = select_drop_grow(torch.ones(10), torch.ones(10), found)
    assert dropped.numel() == grown.numel() == 0


def test_set_scores_do_not_depend_on_the_chunk_size():
    mask = torch.rand(5000, generator=torch.Generator().manual_seed(1)) < 0.2
    weight = torch.randn(5000, generator=torch.Generator().manual_seed(2)) * mask
    results = []
    for chunk_size in (256, 1000, 5000):
        scores = score_chunks(uniform_random, weight, None, torch.Generator().manual_seed(3))
        found = grow_candidates(mask, 300, scores, chunk_size=chunk_size)
        results.append([t.tolist() for t in select_drop_grow(mask, weight, found)])
    whole = torch.rand(5000, generator=torch.Generator().manual_seed(3))
    assert results[0] == results[1] == results[2]
    assert (sorted(results[0][0]), sorted(results[0][1])) == reference(mask, weight, whole, 300)


def test_top_k_indices_breaks_ties_by_the_given_index():
    values = torch.tensor([1.0, 3.0, 1.0, 1.0])
    assert top_k_indices(values, 2, index=torch.tensor([7, 0, 5, 6])).tolist() == [1, 2]
    assert top_k_indices(values, 2, largest=False, index=torch.tensor([7, 0, 5, 6])).tolist() == [2, 3]


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


ties = st.sampled_from(["continuous", "integers", "zeros", "few"])


def draw(kind, shape, g):
    shape = (shape,) if isinstance(shape, int) else shape
    values = torch.randn(shape, generator=g)
    if kind == "integers":
        values = (values * 3).round()
    elif kind == "zeros":
        values = values * (torch.rand(shape, generator=g) < 0.2)
    elif kind == "few":
        values = torch.randint(-1, 2, shape, generator=g).float()
    return values


@settings(max_examples=300, deadline=None)
@given(
    shape=st.one_of(st.tuples(st.integers(1, 300)), st.tuples(st.integers(1, 40), st.integers(1, 40))),
    density=st.floats(0.0, 1.0),
    drop_fraction=st.floats(0.0, 1.0),
    chunk_size=st.integers(1, 400),
    weight_ties=ties,
    grad_ties=ties,
    seed=st.integers(0, 2**16),
)
def test_candidate_path_selects_exactly_what_a_full_sort_selects(
    shape, density, drop_fraction, chunk_size, weight_ties, grad_ties, seed
):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) < density
    weight = draw(weight_ties, shape, g) * mask
    grad = draw(grad_ties, shape, g)
    k = int(int(mask.sum()) * drop_fraction)
    assert rigl_update(mask.float(), weight, grad, k, chunk_size) == reference(mask, weight, grad.abs(), k)


@settings(max_examples=15, deadline=None)
@given(
    numel=st.integers(2**16, 2**18),
    density=st.sampled_from([0.02, 0.1, 0.5, 0.9]),
    drop_fraction=st.floats(0.01, 0.5),
    chunk_size=st.sampled_from([2**12 + 1, 2**15 - 3, 2**17, 2**20]),
    grad_ties=ties,
    float_mask=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_candidate_path_is_exact_on_large_layers(
    numel, density, drop_fraction, chunk_size, grad_ties, float_mask, seed
):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(numel, generator=g) < density
    weight = draw("integers", numel, g) * mask
    grad = draw(grad_ties, numel, g)
    k = int(int(mask.sum()) * drop_fraction)
    stored = mask.float() if float_mask else mask  # as the run stores it (the weight's dtype), or bool
    assert rigl_update(stored, weight, grad, k, chunk_size) == reference(mask, weight, grad.abs(), k)


def test_set_on_a_large_layer_grows_where_the_whole_layers_draw_says():
    # SET's scores are a random stream: they must be read once, in order, also where sampling would pay.
    weight = torch.nn.Parameter(torch.randn(400, 400, generator=torch.Generator().manual_seed(6)))
    schedule = UpdateSchedule(delta_t=1, t_end=10, alpha=0.3)
    sparse = SparseTraining({"w": weight}, {"w": 0.9}, method="set", schedule=schedule, seed=7)
    stream = torch.Generator().manual_seed(7)
    mask = random_mask(weight.shape, num_active(weight.numel(), 0.9), stream)  # the same draw as the run's
    assert torch.equal(sparse.masks["w"], mask)
    weight.grad = torch.zeros_like(weight)
    sparse.before_step(0)
    sparse.after_step([])
    k = int(int(mask.sum()) * schedule.drop_fraction(1))
    dropped, grown = reference(mask, weight.detach() * mask, torch.rand(weight.numel(), generator=stream), k)
    expected = mask.clone().view(-1)
    expected[dropped], expected[grown] = False, True
    assert torch.equal(sparse.masks["w"].view(-1), expected)


@pytest.mark.parametrize("numel", [3 * 2**13, 31_000, 93_437])
@pytest.mark.parametrize("fraction", [0.02, 0.13, 0.3, 0.5, 0.77, 0.99])
@pytest.mark.parametrize("kind", ["continuous", "integers", "zeros", "few"])
def test_large_selections_through_a_band_equal_a_stable_sort(numel, fraction, kind):
    g = torch.Generator().manual_seed(numel + int(fraction * 100))
    values, k = draw(kind, numel, g), max(int(numel * fraction), 1)
    index = torch.randperm(numel, generator=g)  # the tie rule by a given index, not by position
    for largest in (True, False):
        order = torch.sort(values, descending=largest, stable=True).indices
        assert top_k_indices(values, k, largest=largest).tolist() == sorted(order[:k].tolist())
        # With an index, ties go to the lower index: sort by index first, then stably by value.
        by_index = torch.sort(index).indices
        expected = by_index[torch.sort(values[by_index], descending=largest, stable=True).indices[:k]]
        assert top_k_indices(values, k, largest=largest, index=index).tolist() == sorted(expected.tolist())


def test_a_band_read_from_a_misleading_sample_gives_way_to_the_exact_selection():
    numel, k = 40_000, 15_000
    values = torch.rand(numel, generator=torch.Generator().manual_seed(3))
    values[:: numel // _BAND_SAMPLE] += 10.0  # the sampled entries are all far beyond the others
    assert _banded_top_k_mask(values, k, True, None) is None
    expected = torch.sort(values, descending=True, stable=True).indices[:k]
    assert top_k_indices(values, k).tolist() == sorted(expected.tolist())
