"""Linear layers that are not nn.Linear subclasses: torch-geometric's Linear, and classes given to register_linear."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_rigl import RigLCallback, register_linear, sparsify
from lightning_rigl.core import num_active
from lightning_rigl.core.kernels.served_layers import can_serve, linear_layers, weight_in_out
from lightning_rigl.core.sparsity import linear_types
from tests.helpers import make_loader, make_trainer


class Linear(nn.Module):
    """Stands in for torch_geometric.nn.dense.linear.Linear: F.linear(x, W, b), W (out, in); lazy if in_channels=-1."""

    def __init__(self, in_channels, out_channels, bias=True):
        super().__init__()
        if in_channels > 0:
            self.weight = nn.Parameter(torch.randn(out_channels, in_channels) / in_channels**0.5)
        else:
            self.weight = nn.parameter.UninitializedParameter()
        self.bias = nn.Parameter(torch.randn(out_channels) * 0.1) if bias else None

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


Linear.__module__ = "torch_geometric.nn.dense.linear"  # the name the default selection knows, not imported


@pytest.fixture(autouse=True)
def _registry(monkeypatch):
    """Each test registers into its own copy of the registry."""
    monkeypatch.setattr(linear_types, "_LINEAR_CLASSES", dict(linear_types._LINEAR_CLASSES))


class GCNLike(pl.LightningModule):
    """A GCN-style network whose projections are torch-geometric Linear layers."""

    def __init__(self, layer=Linear, hidden=64):
        super().__init__()
        self.lin1, self.lin2, self.lin3 = layer(16, hidden), layer(hidden, hidden, bias=False), layer(hidden, 4)

    def forward(self, x):
        return self.lin3(torch.relu(self.lin2(torch.relu(self.lin1(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x.to(self.lin1.weight.dtype)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


NAMES = ["lin1.weight", "lin2.weight", "lin3.weight"]


def fit(model, kernels, steps=6):
    rigl = RigLCallback(0.8, delta_t=2, t_end=100, kernels=kernels, seed=1)
    make_trainer([rigl], max_steps=steps).fit(model, make_loader())
    return rigl


@pytest.mark.parametrize("kernels", ["dense", "sparse"])
def test_torch_geometric_linear_is_masked_by_default_and_served_by_sparse_kernels(kernels):
    model = GCNLike()
    rigl = fit(model, kernels)
    assert list(rigl.masks) == NAMES and rigl.sparse.updates == 3
    assert rigl.kernel_choices == dict.fromkeys(NAMES, kernels)
    for name, param in model.named_parameters():
        if name in NAMES:
            mask = rigl.masks[name]
            assert int(mask.sum()) == num_active(mask.numel(), rigl.sparse.sparsities[name])
            assert param[~mask].eq(0).all()


def test_torch_geometric_linear_trains_alike_on_sparse_and_dense_kernels():
    runs = {}
    for kernels in ("dense", "sparse"):
        torch.manual_seed(0)
        model = GCNLike().double()
        runs[kernels] = (model, fit(model, kernels))
    (dense_model, dense), (sparse_model, sparse) = runs["dense"], runs["sparse"]
    assert all(torch.equal(dense.masks[name], sparse.masks[name]) for name in NAMES)
    for (name, a), (_, b) in zip(dense_model.named_parameters(), sparse_model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_sparsify_serves_torch_geometric_linear_with_the_masked_dense_outputs():
    model = GCNLike()
    with torch.no_grad():
        for layer in (model.lin1, model.lin2, model.lin3):
            layer.weight.mul_(torch.rand_like(layer.weight) < 0.2)
    fast = sparsify(model, kernels="sparse")
    assert fast.sparse_kernels.names == NAMES
    x = torch.randn(8, 16)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x))


def test_a_lazy_torch_geometric_linear_is_refused_as_not_materialized():
    model = GCNLike()
    model.lin1 = Linear(-1, 64)
    with pytest.raises(MisconfigurationException, match=r"Cannot mask \['lin1\.weight'\]: not materialized"):
        make_trainer([RigLCallback(0.8)], max_steps=1).fit(model, make_loader())


class InOut(nn.Module):
    """A Linear of another library, not registered by default: weight stored (in, out), as Conv1D does."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features) / in_features**0.5)
        self.bias = nn.Parameter(torch.randn(out_features) * 0.1) if bias else None

    def forward(self, x):
        out = x @ self.weight
        return out if self.bias is None else out + self.bias


class Scaled(InOut):
    """A subclass with a forward of its own: masked, but it keeps its dense forward."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_an_unregistered_linear_type_has_nothing_to_mask():
    with pytest.raises(MisconfigurationException, match="nothing to mask.*register_linear"):
        make_trainer([RigLCallback(0.8)], max_steps=1).fit(GCNLike(InOut), make_loader())


@pytest.mark.parametrize("by_name", [False, True])
def test_a_registered_class_is_masked_and_computes_with_sparse_kernels(by_name):
    register_linear(linear_types.qualified_name(InOut) if by_name else InOut, weight_in_out=True)
    model = GCNLike(InOut)
    assert model.lin1.weight.shape == (16, 64)  # stored (in, out)
    rigl = fit(model, "sparse")
    assert list(rigl.masks) == NAMES and rigl.kernel_choices == dict.fromkeys(NAMES, "sparse")
    for name in NAMES:
        assert model.get_parameter(name)[~rigl.masks[name]].eq(0).all()


def test_a_registered_in_out_class_trains_alike_on_sparse_and_dense_kernels():
    register_linear(InOut, weight_in_out=True)
    runs = {}
    for kernels in ("dense", "sparse"):
        torch.manual_seed(0)
        model = GCNLike(InOut).double()
        runs[kernels] = (model, fit(model, kernels))
    (dense_model, dense), (sparse_model, sparse) = runs["dense"], runs["sparse"]
    assert all(torch.equal(dense.masks[name], sparse.masks[name]) for name in NAMES)
    for (name, a), (_, b) in zip(dense_model.named_parameters(), sparse_model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_a_subclass_with_its_own_forward_is_masked_but_stays_dense():
    register_linear(InOut, weight_in_out=True)
    layer = Scaled(4, 3)
    assert weight_in_out(layer) is True and not can_serve(layer) and can_serve(InOut(4, 3))
    rigl = fit(GCNLike(Scaled), "sparse")
    assert list(rigl.masks) == NAMES and rigl.kernel_choices == dict.fromkeys(NAMES, "dense")


def test_register_linear_is_a_class_decorator_and_idempotent():
    assert register_linear(InOut, weight_in_out=True) is InOut
    register_linear(InOut, weight_in_out=True)  # again, same layout: nothing changes
    assert list(linear_layers(GCNLike(InOut))) == NAMES


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((nn.Linear,), {"weight_in_out": 1}, TypeError, r"`weight_in_out` must be a bool .*got 1 of type int"),
        ((int,), {}, TypeError, r"`cls_or_name` must be an nn.Module subclass .*got <class 'int'>"),
        ((nn.Linear(2, 2),), {}, TypeError, r"`cls_or_name` .*of type Linear"),
        (("Linear",), {}, ValueError, r"`cls_or_name` must be a qualified class name .*got 'Linear'"),
        (("torch_geometric.nn.Lin ear",), {}, ValueError, r"qualified class name"),
        ((nn.Linear,), {"weight_in_out": True}, ValueError, r"registered already with weight_in_out=False"),
        (("transformers.pytorch_utils.Conv1D",), {}, ValueError, r"registered already with weight_in_out=True"),
    ],
)
def test_register_linear_refuses_bad_arguments_naming_them(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        register_linear(*args, **kwargs)
