"""Bad input: every argument is checked in __init__, every model-dependent one at fit start."""

import inspect

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_rigl import RigLCallback, SparsityMonitor
from tests.helpers import MLP, make_loader, make_trainer


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"sparsity": 1.0}, ["sparsity", "1.0", "[0, 1)"]),
        ({"sparsity": -0.5}, ["sparsity", "-0.5", "[0, 1)"]),
        ({"sparsity": float("nan")}, ["sparsity", "nan"]),
        ({"delta_t": 0}, ["delta_t", "0", ">= 1"]),
        ({"t_end": 1.5}, ["t_end", "1.5", "(0, 1]"]),
        ({"t_end": 0.0}, ["t_end", "0.0", "(0, 1]"]),
        ({"t_end": -3}, ["t_end", "-3", ">= 0"]),
        ({"alpha": 1.2}, ["alpha", "1.2", "[0, 1]"]),
        ({"alpha": -0.1}, ["alpha", "-0.1", "[0, 1]"]),
        ({"distribution": "gauss"}, ["distribution", "gauss", "erk"]),
        ({"method": "prune"}, ["method", "prune", "rigl"]),
        ({"decay": "step"}, ["decay", "step", "cosine"]),
        ({"custom_sparsity": {"net.0.weight": 1.0}}, ["custom_sparsity", "net.0.weight", "1.0", "[0, 1)"]),
        ({"erk_power_scale": -1.0}, ["erk_power_scale", "-1.0", ">= 0"]),
    ],
)
def test_bad_values_raise_misconfiguration_naming_argument_value_and_allowed(kwargs, words):
    with pytest.raises(MisconfigurationException) as error:
        RigLCallback(**kwargs)
    for word in words:
        assert word in str(error.value), (word, str(error.value))


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"sparsity": "0.9"}, "sparsity"),
        ({"delta_t": 10.0}, "delta_t"),
        ({"t_end": True}, "t_end"),
        ({"t_end": "0.5"}, "t_end"),
        ({"include": "net.*"}, "include"),
        ({"exclude": [1]}, "exclude"),
        ({"dense_first_layer": "yes"}, "dense_first_layer"),
        ({"custom_sparsity": [("a", 0.5)]}, "custom_sparsity"),
        ({"seed": 1.5}, "seed"),
        ({"erk_power_scale": "1"}, "erk_power_scale"),
    ],
)
def test_wrong_types_raise_naming_the_argument(kwargs, argument):
    with pytest.raises((TypeError, MisconfigurationException), match=argument):
        RigLCallback(**kwargs)


class Embedder(MLP):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))

    def training_step(self, batch, batch_idx):
        return self.net(batch[1]).sum()


@pytest.mark.parametrize(
    ("callback", "module", "words"),
    [
        (RigLCallback(custom_sparsity={"net.9.weight": 0.5}), MLP, ["custom_sparsity", "net.9.weight"]),
        (RigLCallback(include=["encoder.*"]), MLP, ["include", "encoder.*", "net.0.weight"]),
        (RigLCallback(exclude=["decoder.*"]), MLP, ["exclude", "decoder.*"]),
        (RigLCallback(), Embedder, ["nothing to mask"]),
        (RigLCallback(distribution="uniform", include=["net.0.weight"]), MLP, ["cannot be reached"]),
    ],
)
def test_setup_errors_name_the_culprit(callback, module, words):
    with pytest.raises(MisconfigurationException) as error:
        make_trainer([callback], max_steps=1).fit(module(), make_loader())
    for word in words:
        assert word in str(error.value), (word, str(error.value))


ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.one_of(st.text(max_size=4), st.integers(), st.floats()), max_size=3),
    st.dictionaries(st.one_of(st.text(max_size=4), st.integers()), st.one_of(st.floats(), st.text(max_size=3))),
)
CALLBACK_ARGUMENTS = [
    (cls, argument) for cls in (RigLCallback, SparsityMonitor) for argument in list(inspect.signature(cls).parameters)
]


@settings(max_examples=100, deadline=None)
@given(case=st.sampled_from(CALLBACK_ARGUMENTS), value=ANY_VALUE)
def test_fuzzed_arguments_are_accepted_as_given_or_refused_naming_the_argument(case, value):
    cls, argument = case
    try:
        callback = cls(**{argument: value})
    except (MisconfigurationException, TypeError) as error:
        assert f"`{argument}" in str(error), str(error)
    else:
        assert getattr(callback, argument) is value  # stored as given, never replaced by a default
