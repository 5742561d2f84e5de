"""Which weights get a mask: the default, include, exclude and custom sparsities; odd, foreign and zero-size
layers, tied and shared weights, parametrized and lazy weights, layers built in configure_model, frozen weights."""

import ast
import re
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

from lightning_rigl import RigLCallback, SparseTraining, SparsityMonitor, count_flops
from lightning_rigl.core import num_active
from lightning_rigl.core.sparsity import selection
from lightning_rigl.core.sparsity.selection import is_masked_module, parameter_aliases, select_parameters
from tests.helpers import MLP, InvariantChecker, RecordingLogger, make_loader, make_trainer


def test_include_exclude_and_custom_sparsity_select_and_override():
    rigl = RigLCallback(
        0.5,
        include=["net.*.weight"],
        exclude=["net.3.*"],  # the LayerNorm weight matched by include
        custom_sparsity={"net.5.*": 0.25},
    )
    model = MLP()
    make_trainer([rigl], max_steps=1).fit(model, make_loader())
    assert list(rigl.masks) == ["net.0.weight", "net.2.weight", "net.5.weight"]
    assert rigl.sparse.sparsities["net.5.weight"] == 0.25


def test_default_selection_covers_conv_transpose_and_attention():
    from lightning_rigl.core import default_parameter_names

    model = nn.ModuleDict(
        {
            "conv": nn.Conv2d(3, 4, 3),
            "deconv": nn.ConvTranspose1d(4, 2, 3),
            "attn": nn.MultiheadAttention(8, 2),
            "emb": nn.Embedding(5, 8),
            "bn": nn.BatchNorm2d(4),
        }
    )
    assert default_parameter_names(model) == [
        "conv.weight",
        "deconv.weight",
        "attn.in_proj_weight",
        "attn.out_proj.weight",
    ]


class Conv1D(nn.Module):
    """Stands in for transformers.pytorch_utils.Conv1D: a Linear whose weight is stored (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], self.nf)


Conv1D.__module__ = "transformers.pytorch_utils"  # what the default selection looks for, by name


class GPT2Like(Conv1D):
    """A subclass of the Hugging Face layer is masked too."""


def test_a_class_named_transformers_conv1d_is_masked_without_importing_transformers():
    assert is_masked_module(Conv1D(4, 3)) and is_masked_module(GPT2Like(4, 3))
    # Lightning's own imports (torchmetrics) load transformers when it is installed: load the core modules
    # without the package's __init__ (which imports Lightning), with any import of transformers made to fail.
    package = Path(selection.__file__).parents[2]
    code = f"""
import sys, types
import torch
sys.modules["transformers"] = None
for name, path in (("lightning_rigl", {str(package)!r}), ("lightning_rigl.core", {str(package / "core")!r})):
    sys.modules[name] = types.ModuleType(name)
    sys.modules[name].__path__ = [path]
from lightning_rigl.core.kernels import served_layers
from lightning_rigl.core.sparsity import selection
class Conv1D(selection.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight, self.bias = selection.nn.Parameter(torch.ones(3, 2)), None
Conv1D.__module__ = "transformers.pytorch_utils"
assert selection.is_masked_module(Conv1D()) and served_layers.weight_in_out(Conv1D()) is True
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("distribution", ["erk", "er", "uniform"])
def test_conv1d_gets_the_sparsity_of_a_linear_of_the_transposed_shape(distribution):
    def build(layer):
        return nn.Sequential(nn.Linear(16, 10), nn.ReLU(), layer, nn.ReLU(), nn.Linear(24, 3))

    with_conv1d = SparseTraining.from_model(build(Conv1D(nf=24, nx=10)), 0.8, distribution)
    with_linear = SparseTraining.from_model(build(nn.Linear(10, 24)), 0.8, distribution)
    assert with_conv1d.params["2.weight"].shape == (10, 24)
    assert with_conv1d.sparsities == with_linear.sparsities
    assert {n: int(m.sum()) for n, m in with_conv1d.masks.items()} == {
        n: int(m.sum()) for n, m in with_linear.masks.items()
    }


def test_conv1d_flops_are_two_per_weight_and_token_scaled_by_density():
    layer = Conv1D(nf=24, nx=10)
    tokens = torch.randn(3, 5, 10)  # 3 samples of 5 tokens
    dense = count_flops(layer, tokens)
    assert dense.per_layer["weight"].dense == 2 * 10 * 24 * 5
    with torch.no_grad():
        layer.weight.view(-1)[::4] = 0.0  # 60 of 240 weights
    sparse = count_flops(layer, tokens)
    assert sparse.per_layer["weight"].density == 0.75
    assert sparse.sparse == pytest.approx(0.75 * 2 * 10 * 24 * 5)


class Odd(pl.LightningModule):
    """Tiny, grouped, depthwise, transposed, attention and recurrent layers in one model."""

    def __init__(self):
        super().__init__()
        self.tiny = nn.Linear(3, 2)  # 6 weights
        self.grouped = nn.Conv1d(4, 8, 3, groups=2, padding=1)
        self.depthwise = nn.Conv1d(8, 8, 3, groups=8, padding=1)
        self.up = nn.ConvTranspose1d(8, 4, 3, padding=1)
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.rnn = nn.GRU(4, 4, batch_first=True)
        self.head = nn.Linear(4 * 16 + 2, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch  # x: (B, 16) -> a sequence of 4 channels, 16 long
        seq = x.view(-1, 1, 16).repeat(1, 4, 1)
        h = self.up(self.depthwise(self.grouped(seq))).transpose(1, 2)  # (B, 16, 4)
        h, _ = self.attention(h, h, h)
        h, _ = self.rnn(h)
        features = torch.cat([h.flatten(1), self.tiny(x[:, :3])], dim=1)
        return nn.functional.cross_entropy(self.head(features), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def test_odd_layers_train_with_exact_counts():
    rigl = RigLCallback(0.8, delta_t=2, t_end=100, include=["*weight*"], exclude=["*bias*"])
    checker = InvariantChecker(rigl)
    make_trainer([rigl, checker], max_steps=8).fit(Odd(), make_loader())
    assert {"tiny.weight", "grouped.weight", "depthwise.weight", "up.weight"} <= set(rigl.masks)
    assert {"attention.in_proj_weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0"} <= set(rigl.masks)
    assert checker.checks == 8 and rigl.sparse.updates == 4


def test_default_selection_of_the_odd_model_leaves_rnn_dense():
    rigl = RigLCallback(0.8, delta_t=2, t_end=100)
    make_trainer([rigl], max_steps=2).fit(Odd(), make_loader())
    assert "rnn.weight_ih_l0" not in rigl.masks and "attention.in_proj_weight" in rigl.masks


def test_rigl_trains_next_to_a_zero_size_linear_leaving_it_out_of_the_masks():
    class WithEmpty(MLP):
        def __init__(self):
            super().__init__()
            self.empty = nn.Linear(32, 0)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return super().training_step(batch, batch_idx) + self.empty(self.net[0](x)).sum()

    rigl = RigLCallback(0.8, delta_t=2, t_end=6)
    logger = RecordingLogger()
    make_trainer([rigl, SparsityMonitor(plot=False)], max_steps=6, log_every_n_steps=2, logger=logger).fit(
        WithEmpty(), make_loader()
    )
    assert "empty.weight" not in rigl.masks and rigl.sparse.updates == 2
    masked = sum(mask.numel() for mask in rigl.masks.values())
    assert sum(int(mask.sum()) for mask in rigl.masks.values()) == pytest.approx(0.2 * masked, rel=0.02)
    with pytest.raises(MisconfigurationException, match=r"nothing to mask \(include=\['empty.weight'\]"):
        make_trainer([RigLCallback(0.8, include=["empty.weight"])], max_steps=1).fit(WithEmpty(), make_loader())


def test_shared_weights_get_one_mask_reported_under_every_name():
    class Tied(MLP):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(32, 32)
            self.net[2].weight = self.head.weight

    rigl = RigLCallback(0.5)
    model = Tied()
    make_trainer([rigl], max_steps=2).fit(model, make_loader())
    assert list(rigl.sparse.masks) == ["net.0.weight", "net.2.weight", "net.5.weight"]  # "head.weight" is the same
    assert list(rigl.masks) == ["net.0.weight", "net.2.weight", "head.weight", "net.5.weight"]
    assert torch.equal(rigl.masks["head.weight"], rigl.masks["net.2.weight"])
    assert rigl.sparse.params["net.2.weight"] is model.head.weight
    assert model.head.weight[~rigl.masks["net.2.weight"]].eq(0).all()


class TiedLM(pl.LightningModule):
    """Token embedding tied to the output layer, as GPT-2's lm_head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.hidden = nn.Linear(16, 16)
        self.head = nn.Linear(16, 20, bias=False)
        self.head.weight = self.embed.weight

    def training_step(self, batch, batch_idx):
        x, _ = batch
        tokens = (x.abs() * 7).long().clamp(max=19)  # (B, 16) token ids
        logits = self.head(torch.tanh(self.hidden(self.embed(tokens))))
        return nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def test_weight_tied_to_an_embedding_stays_dense_with_one_warning_naming_the_tie():
    model = TiedLM()
    rigl = RigLCallback(0.8, delta_t=2, t_end=100)
    with pytest.warns(UserWarning, match=r"embed\.weight = head\.weight") as record:
        make_trainer([rigl], max_steps=6).fit(model, make_loader())
    assert len([w for w in record if "RigL leaves dense" in str(w.message)]) == 1
    assert list(rigl.masks) == ["hidden.weight"]
    assert int(model.embed.weight.count_nonzero()) == model.embed.weight.numel()


def test_include_naming_a_tied_weight_masks_it_without_warning():
    model = TiedLM()
    rigl = RigLCallback(0.8, include=["head.weight", "hidden.weight"], delta_t=2, t_end=100)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="RigL leaves dense")
        make_trainer([rigl], max_steps=6).fit(model, make_loader())
    assert list(rigl.sparse.masks) == ["embed.weight", "hidden.weight"]  # one Parameter, under its first name
    assert list(rigl.masks) == ["embed.weight", "head.weight", "hidden.weight"]  # reported under each name
    mask = rigl.masks["embed.weight"]
    assert torch.equal(rigl.masks["head.weight"], mask)
    assert int(mask.sum()) == num_active(mask.numel(), rigl.sparse.sparsities["embed.weight"])
    assert model.head.weight[~mask].eq(0).all()


def test_excluded_tied_weight_gives_no_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="RigL leaves dense")
        assert list(select_parameters(TiedLM(), exclude=["head.weight"])) == ["hidden.weight"]


def test_parameter_aliases_lists_every_name_of_a_tied_weight():
    model = TiedLM()
    assert parameter_aliases(model, ["embed.weight", "hidden.weight"]) == {
        "embed.weight": ["embed.weight", "head.weight"],
        "hidden.weight": ["hidden.weight"],
    }
    assert parameter_aliases(model, ["head.weight"])["head.weight"] == ["embed.weight", "head.weight"]
    with pytest.raises(ValueError, match=r"'tail.weight' is no parameter of TiedLM"):
        parameter_aliases(model, ["tail.weight"])


class Scale(nn.Module):
    """A custom parametrization: any parametrize user."""

    def forward(self, weight):
        return 2.0 * weight


class Normalized(pl.LightningModule):
    """An MLP whose three layers are under weight_norm, spectral_norm and a custom parametrization."""

    def __init__(self):
        super().__init__()
        self.first = parametrizations.weight_norm(nn.Linear(16, 32))
        self.second = parametrizations.spectral_norm(nn.Linear(32, 32))
        self.third = nn.Linear(32, 32)
        parametrize.register_parametrization(self.third, "weight", Scale())
        self.head = nn.Linear(32, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.relu(self.third(torch.relu(self.second(torch.relu(self.first(x))))))
        return nn.functional.cross_entropy(self.head(h), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


ORIGINALS = [
    "first.parametrizations.weight.original0",
    "first.parametrizations.weight.original1",
    "second.parametrizations.weight.original",
    "third.parametrizations.weight.original",
]


def test_default_selection_refuses_parametrized_weights_naming_each_and_the_ways_out():
    with pytest.raises(MisconfigurationException) as error:
        make_trainer([RigLCallback(0.8)], max_steps=1).fit(Normalized(), make_loader())
    message = str(error.value)
    for words in ["first.weight = _WeightNorm(", "second.weight = _SpectralNorm(", "third.weight = Scale("]:
        assert words in message, words
    assert f"exclude={ORIGINALS}" in message
    assert "include" in message and "original1" in message and "original0" in message


def test_excluding_the_parametrized_tensors_keeps_them_dense_knowingly():
    model = Normalized()
    rigl = RigLCallback(0.8, exclude=["*.parametrizations.*"], delta_t=2, t_end=100)
    make_trainer([rigl], max_steps=4).fit(model, make_loader())
    assert list(rigl.masks) == ["head.weight"]
    for layer in (model.first, model.second, model.third):
        assert int(layer.weight.count_nonzero()) == layer.weight.numel()


def test_excluding_only_some_parametrized_tensors_still_refuses_the_others():
    with pytest.raises(ValueError, match=r"third\.weight = Scale") as error:
        select_parameters(Normalized(), exclude=ORIGINALS[:3])
    assert "first.weight" not in str(error.value)


@pytest.mark.parametrize(
    ("layer", "original"),
    [("first", "parametrizations.weight.original1"), ("second", "parametrizations.weight.original")],
)
def test_included_original_masks_the_computed_weight(layer, original):
    model = Normalized()
    name = f"{layer}.{original}"
    # At 50 % no row of weight_norm's v loses every weight (||v|| = 0 would make the weight NaN).
    rigl = RigLCallback(0.8, include=[name, "head.weight"], custom_sparsity={name: 0.5}, delta_t=2, t_end=100)
    make_trainer([rigl], max_steps=6).fit(model, make_loader())
    assert list(rigl.masks) == [name, "head.weight"] and rigl.sparse.updates == 3
    mask = rigl.masks[name]
    assert int(mask.sum()) == num_active(mask.numel(), rigl.sparse.sparsities[name])
    weight = getattr(model, layer).weight  # computed from the masked original
    assert weight[~mask].eq(0).all()
    grown_at_the_last_step = rigl.sparse.history[-1].changed  # still at their grow init, 0
    assert int(weight[mask].ne(0).sum()) >= int(mask.sum()) - grown_at_the_last_step


def test_a_pruning_hook_weight_is_refused_naming_its_source():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"0\.weight = hook\(0\.weight_orig\).*exclude=\['0\.weight_orig'\]"):
        select_parameters(model)


class Lazy(pl.LightningModule):
    def __init__(self, materialize):
        super().__init__()
        self.materialize = materialize
        self.body = nn.LazyLinear(32)
        self.head = nn.Linear(32, 4)

    def setup(self, stage):
        if self.materialize:
            self.body(torch.zeros(1, 16))  # one forward pass gives the lazy layer its shape

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.head(torch.relu(self.body(x))), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_lazy_layer_not_materialized_is_refused_naming_it():
    with pytest.raises(MisconfigurationException, match=r"Cannot mask \['body\.weight'\]: not materialized") as error:
        make_trainer([RigLCallback(0.8)], max_steps=1).fit(Lazy(materialize=False), make_loader())
    assert "forward pass" in str(error.value)


def test_a_materialized_lazy_layer_is_masked():
    model = Lazy(materialize=True)
    rigl = RigLCallback(0.8, delta_t=2, t_end=100)
    make_trainer([rigl], max_steps=4).fit(model, make_loader())
    assert list(rigl.masks) == ["body.weight", "head.weight"]
    mask = rigl.masks["body.weight"]
    assert mask.shape == (32, 16) and model.body.weight[~mask].eq(0).all()


class Configured(MLP):
    def __init__(self):
        pl.LightningModule.__init__(self)
        self.save_hyperparameters({"optimizer": "sgd", "lr": 0.05})
        self.net = None

    def configure_model(self):
        if self.net is None:
            self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def test_layers_built_in_configure_model_are_masked():
    rigl = RigLCallback(0.8, delta_t=2, t_end=100)
    checker = InvariantChecker(rigl)
    make_trainer([rigl, checker], max_steps=4).fit(Configured(), make_loader())
    assert list(rigl.masks) == ["net.0.weight", "net.2.weight"]


class NBeatsBlock(pl.LightningModule):
    """One Linear registered under two names, as N-BEATS does (``self.theta_b = self.theta_f = ...``)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(16, 32)
        self.theta_b = self.theta_f = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.relu(self.body(x))
        h = torch.relu(self.theta_f(h)) + torch.tanh(self.theta_b(h))
        return nn.functional.cross_entropy(self.head(h), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class RepeatedBlock(NBeatsBlock):
    """Every masked layer shared: ``nn.ModuleList([block] * n)`` and nothing else."""

    def __init__(self):
        super().__init__()
        del self.body, self.theta_b, self.theta_f, self.head
        self.blocks = nn.ModuleList([nn.Linear(16, 16)] * 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        for block in self.blocks:
            x = torch.tanh(block(x))
        return nn.functional.cross_entropy(x[:, :4], y)


class Wrapper(nn.Module):
    """Holds a model and calls it, as ``AutoregressiveWrapper(net)`` does."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


class BareAndWrapped(NBeatsBlock):
    """A network kept both bare and inside a wrapper."""

    def __init__(self):
        super().__init__()
        del self.body, self.theta_b, self.theta_f, self.head
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        self.wrapper = Wrapper(self.net)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.wrapper(x), y)


SHARED = [
    (NBeatsBlock, {"body.weight": ["body.weight"], "theta_b.weight": ["theta_b.weight", "theta_f.weight"]}),
    (RepeatedBlock, {"blocks.0.weight": ["blocks.0.weight", "blocks.1.weight", "blocks.2.weight"]}),
    (BareAndWrapped, {"net.0.weight": ["net.0.weight", "wrapper.net.0.weight"]}),
]


@pytest.mark.parametrize("kernels", ["dense", "sparse"])
@pytest.mark.parametrize(("model_class", "aliases"), SHARED, ids=lambda value: getattr(value, "__name__", ""))
def test_a_module_reachable_by_several_names_is_masked_once_under_its_first_name(model_class, aliases, kernels):
    model = model_class()
    rigl = RigLCallback(0.8, delta_t=2, t_end=100, kernels=kernels)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="RigL leaves dense")  # no tie to blame
        make_trainer([rigl], max_steps=6).fit(model, make_loader())
    params = dict(model.named_parameters(remove_duplicate=False))
    for first, names in aliases.items():
        assert first in rigl.sparse.params  # one mask per Parameter, under its first name
        mask = rigl.masks[first]
        assert all(torch.equal(rigl.masks[name], mask) for name in names)  # reported under each name
        assert int(mask.sum()) == num_active(mask.numel(), rigl.sparse.sparsities[first])
        assert params[first][~mask].eq(0).all()
    assert rigl.sparse.updates == 3


def test_a_weight_tied_to_an_embedding_inside_a_repeated_module_still_stays_dense():
    # The one tie that stays dense by default: the Parameter is also an embedding table.
    model = TiedLM()
    model.again = model.head  # the head reachable by a second path changes nothing
    with pytest.warns(UserWarning, match=r"embed\.weight = head\.weight = again\.weight"):
        assert list(select_parameters(model)) == ["hidden.weight"]


def test_frozen_parameters_are_skipped():
    model = MLP()
    model.net[0].weight.requires_grad_(False)
    rigl = RigLCallback(0.5)
    make_trainer([rigl], max_steps=1).fit(model, make_loader())
    assert "net.0.weight" not in rigl.masks


class Backbone(pl.LightningModule):
    """A backbone and a head, with an optimizer over the trainable parameters (what BackboneFinetuning asks)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.backbone(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=0.05, momentum=0.9)


BACKBONE_WEIGHTS = ["backbone.0.weight", "backbone.2.weight"]


def test_frozen_layers_the_default_would_mask_are_named_in_one_warning_at_fit_start():
    model = Backbone()
    model.backbone.requires_grad_(False)
    rigl = RigLCallback(0.8, delta_t=2, t_end=100)
    with pytest.warns(UserWarning, match=r"RigL skips 2 frozen weights") as record:
        make_trainer([rigl], max_steps=4).fit(model, make_loader())
    [message] = [str(w.message) for w in record if "frozen weights" in str(w.message)]
    assert all(name in message for name in BACKBONE_WEIGHTS) and "include" in message
    assert list(rigl.masks) == ["head.weight"]


def test_excluded_frozen_layers_give_no_warning():
    model = Backbone()
    model.backbone.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="RigL skips")
        make_trainer([RigLCallback(0.8, exclude=["backbone.*"])], max_steps=2).fit(model, make_loader())


def test_include_masks_frozen_weights_which_stay_fixed_while_frozen():
    model = Backbone()
    model.backbone.requires_grad_(False)
    rigl = RigLCallback(0.8, include=["backbone.*.weight"], delta_t=2, t_end=100)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if name in BACKBONE_WEIGHTS}
    make_trainer([rigl], max_steps=6).fit(model, make_loader())
    assert list(rigl.masks) == BACKBONE_WEIGHTS
    params = dict(model.named_parameters())
    for name in BACKBONE_WEIGHTS:
        mask = rigl.masks[name]
        assert int(mask.sum()) == num_active(mask.numel(), rigl.sparse.sparsities[name])
        assert params[name][~mask].eq(0).all() and torch.equal(params[name][mask], before[name][mask])
    assert rigl.sparse.updates == 0 and not rigl.sparse.scheduled.due  # no gradient to grow from, none waited for


@pytest.mark.parametrize("kernels", ["dense", "sparse"])
def test_a_masked_frozen_backbone_unfrozen_by_backbone_finetuning_trains_sparse(kernels):
    from lightning.pytorch.callbacks import BackboneFinetuning

    model = Backbone()
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=1.0)
    rigl = RigLCallback(0.8, include=["backbone.*.weight", "head.weight"], delta_t=3, t_end=1.0, kernels=kernels)
    seen = {}

    class Watch(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["start"] = rigl.masks

        def on_train_epoch_end(self, trainer, pl_module):
            weights = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
            seen[trainer.current_epoch] = (weights, rigl.masks, len(rigl.sparse.history))

    make_trainer([finetuning, rigl, Watch()], max_epochs=2, max_steps=-1).fit(model, make_loader(n=128))
    assert list(rigl.masks) == [*BACKBONE_WEIGHTS, "head.weight"]
    (frozen, frozen_masks, updates_while_frozen), _ = seen[0], seen[1]
    params = dict(model.named_parameters())
    for name in BACKBONE_WEIGHTS:
        mask = rigl.masks[name]
        assert torch.equal(frozen_masks[name], seen["start"][name])  # no update while frozen
        assert not torch.equal(mask, frozen_masks[name])  # updates once unfrozen
        assert int(mask.sum()) == num_active(mask.numel(), rigl.sparse.sparsities[name])  # its sparsity kept
        assert params[name][~mask].eq(0).all()
        assert not torch.equal(params[name], frozen[name])  # it trained
    head_active = int(rigl.masks["head.weight"].sum())
    assert updates_while_frozen == 2 and all(r.active == head_active for r in rigl.sparse.history[:2])
    assert rigl.sparse.updates == 5
    assert rigl.kernel_choices == dict.fromkeys(rigl.masks, kernels)


class FreezeFirstLayer(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            pl_module.net[0].weight.requires_grad_(False)


def test_parameter_frozen_mid_training_keeps_its_mask():
    rigl = RigLCallback(0.8, delta_t=2, t_end=100)
    model = MLP()
    frozen_mask = {}

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4:
                frozen_mask["before"] = rigl.masks["net.0.weight"]

    checker = InvariantChecker(rigl)
    make_trainer([rigl, FreezeFirstLayer(), Record(), checker], max_steps=10).fit(model, make_loader())
    assert torch.equal(rigl.masks["net.0.weight"], frozen_mask["before"])
    assert rigl.sparse.updates == 5 and checker.checks == 10


def test_resuming_a_checkpoint_of_another_selection_gives_the_include_that_restores_it(tmp_path):
    # A checkpoint that masks fewer weights than today's default selection (as one of a release that
    # left shared modules or frozen weights dense does): the error gives the include=[...] to resume it.
    old = RigLCallback(0.8, exclude=["theta_b.weight"], delta_t=2, t_end=100)
    trainer = make_trainer([old], max_steps=4)
    trainer.fit(NBeatsBlock(), make_loader())
    trainer.save_checkpoint(tmp_path / "old.ckpt")

    with pytest.raises(MisconfigurationException, match=r"not in the checkpoint \['theta_b.weight'\]") as error:
        make_trainer([RigLCallback(0.8, delta_t=2, t_end=100)], max_steps=6).fit(
            NBeatsBlock(), make_loader(), ckpt_path=tmp_path / "old.ckpt"
        )
    include = ast.literal_eval(re.search(r"include=(\[.*?\])", str(error.value)).group(1))
    assert include == ["body.weight", "head.weight"]

    resumed = RigLCallback(0.8, include=include, delta_t=2, t_end=100)
    make_trainer([resumed], max_steps=6).fit(NBeatsBlock(), make_loader(), ckpt_path=tmp_path / "old.ckpt")
    assert list(resumed.masks) == include and resumed.sparse.updates == 3
