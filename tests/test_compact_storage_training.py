"""RigLCallback(storage="compact"): the dense run's masks, updates and weights in float64; what it refuses."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_rigl import RigLCallback, SparsityMonitor
from lightning_rigl.core.storage import is_compact
from tests.helpers import F64Net, RecordingLogger, compact_rigl, f64_loader, make_trainer

F64 = dict(rtol=1e-10, atol=1e-12)
LINEARS = ("net.0", "net.2", "net.4")


def fit(storage, optimizer="sgd", steps=10, model=None, **kwargs):
    torch.manual_seed(0)
    model = model or F64Net(optimizer)
    trainer_kwargs = {key: kwargs.pop(key) for key in ("accumulate_grad_batches",) if key in kwargs}
    rigl = compact_rigl(storage, **kwargs)
    make_trainer([rigl], max_steps=steps, **trainer_kwargs).fit(model, f64_loader())
    return model, rigl


def assert_same_run(dense, dense_rigl, compact, compact_rigl_):
    assert compact_rigl_.sparse.history == dense_rigl.sparse.history
    assert list(compact_rigl_.masks) == list(dense_rigl.masks) == [f"{name}.weight" for name in LINEARS]
    for name, mask in dense_rigl.masks.items():
        assert torch.equal(compact_rigl_.masks[name], mask), name
    for name in LINEARS:
        layer, plain = compact.get_submodule(name), dense.get_submodule(name)
        torch.testing.assert_close(layer.weight, plain.weight.detach(), **F64)
        torch.testing.assert_close(layer.bias, plain.bias, **F64)


@pytest.mark.parametrize(("optimizer", "accumulate"), [("sgd", 1), ("adam", 1), ("sgd", 2)])
def test_compact_and_dense_storage_make_the_same_updates_and_weights_in_float64(optimizer, accumulate):
    dense, dense_rigl = fit("dense", optimizer, accumulate_grad_batches=accumulate)
    compact, rigl = fit("compact", optimizer, accumulate_grad_batches=accumulate)
    assert rigl.sparse.updates == 4 and sum(record.changed for record in rigl.sparse.history) > 0
    assert_same_run(dense, dense_rigl, compact, rigl)
    # Only the active values are Parameters: no dense weight, gradient or optimizer state exists.
    optimizer_params = {id(p) for group in compact.trainer.optimizers[0].param_groups for p in group["params"]}
    for name in LINEARS:
        layer = compact.get_submodule(name)
        assert is_compact(layer) and isinstance(layer, nn.Linear)
        assert id(layer.weight_values) in optimizer_params
        assert layer.weight_values.numel() == int(rigl.masks[f"{name}.weight"].sum())
        assert not isinstance(layer.weight, nn.Parameter)
    state = compact.trainer.optimizers[0].state
    assert all(t.shape == v.shape for v, s in state.items() for t in s.values() if torch.is_tensor(t) and t.dim())


@pytest.mark.parametrize("method", ["set", "static"])
def test_set_and_static_masks_also_train_alike(method):
    dense, dense_rigl = fit("dense", method=method, steps=7)
    compact, rigl = fit("compact", method=method, steps=7)
    assert_same_run(dense, dense_rigl, compact, rigl)


class WithConv(F64Net):
    """A Conv1d before the Linear layers: compact storage cannot serve it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, dtype=torch.float64)

    def forward(self, x):
        return self.net(self.conv(x.unsqueeze(1)).squeeze(1))


def test_layers_it_cannot_serve_stay_dense_and_are_listed_once():
    with pytest.warns(UserWarning, match=r"keeps these masked layers stored densely: conv.weight: not a Linear-type"):
        model, rigl = fit("compact", model=WithConv(), steps=3)
    assert not is_compact(model.conv) and is_compact(model.net[0])
    assert list(rigl.masks) == [f"{name}.weight" for name in LINEARS] + ["conv.weight"]  # the selection's order
    assert int(rigl.masks["conv.weight"].sum()) == int((model.conv.weight != 0).sum())


class OnlyConv(F64Net):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, dtype=torch.float64)


class LayerInConfigureModel(F64Net):
    def configure_model(self):
        if not hasattr(self, "late"):
            self.late = nn.Linear(3, 3, dtype=torch.float64)


@pytest.mark.parametrize(
    ("model", "kwargs", "match"),
    [
        (OnlyConv, {"include": ["conv.weight"]}, r"cannot serve the layers named in `include`: conv.weight \(not a"),
        (OnlyConv, {"include": ["conv.*"]}, "can serve none of the masked layers: 'conv.weight'"),
        (lambda: F64Net("lbfgs"), {}, r"elementwise optimizers only .*got \['LBFGS'\]"),
        (LayerInConfigureModel, {}, r"created in `configure_model`: \['late.weight'\]"),
    ],
)
def test_what_compact_storage_cannot_serve_is_refused_with_a_clear_message(model, kwargs, match):
    with pytest.raises(Exception, match=match):
        fit("compact", model=model(), steps=1, **kwargs)


def test_weight_averaging_copies_are_refused_naming_the_callback():
    rigl = compact_rigl("compact")
    with pytest.raises(Exception, match=r"model copies of \['EMAWeightAveraging'\]"):
        make_trainer([rigl, EMAWeightAveraging(decay=0.9)], max_steps=1).fit(F64Net(), f64_loader())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"storage": "sparse"}, r"`storage` must be one of \('dense', 'compact'\), got 'sparse'"),
        ({"storage": "compact", "method": "snfs"}, "cannot serve method='snfs'"),
        ({"storage": "compact", "kernels": "dense"}, "kernels='dense' needs dense weights"),
    ],
)
def test_bad_storage_arguments_are_refused_naming_them(kwargs, match):
    with pytest.raises(Exception, match=match):
        RigLCallback(**kwargs)


def test_bf16_autocast_computes_compact_layers_in_float32_and_true_bf16_is_refused():
    model = F64Net().float()
    x, y = f64_loader().dataset.tensors
    loader = DataLoader(TensorDataset(x.float(), y.float()), batch_size=16)
    make_trainer([compact_rigl("compact")], max_steps=3, precision="bf16-mixed").fit(model, loader)
    assert model.net[0].weight_values.dtype == torch.float32
    with pytest.raises(Exception, match="computes in float32 or float64"):
        make_trainer([compact_rigl("compact")], max_steps=1, precision="bf16-true").fit(F64Net().float(), loader)


class DataParallelNet(F64Net):
    """Rank r of W takes samples r, r + W, ..., 16 / W a batch: together, the batch one process takes."""

    def train_dataloader(self):
        dataset, world = f64_loader().dataset, self.trainer.world_size
        sampler = DistributedSampler(dataset, world, self.trainer.global_rank, shuffle=False)
        return DataLoader(dataset, batch_size=16 // world, sampler=sampler)


class SaveRun(Callback):
    """Each rank saves its masks, weights and update record at the end of training."""

    def __init__(self, rigl, directory):
        self.rigl, self.directory = rigl, directory

    def on_train_end(self, trainer, pl_module):
        weights = {name: pl_module.get_submodule(name).weight.detach() for name in LINEARS}
        run = {"masks": dict(self.rigl.masks), "weights": weights, "history": self.rigl.sparse.history}
        torch.save(run, self.directory / f"rank{trainer.global_rank}.pt")


def test_two_ddp_processes_train_as_one_on_the_whole_batch_and_hand_back_dense_weights(tmp_path):
    torch.manual_seed(0)
    model, rigl = DataParallelNet(), compact_rigl("compact", consistency_checks=-1)  # masks compared at every update
    trainer = make_trainer(
        [rigl, SaveRun(rigl, tmp_path)], max_steps=10, strategy="ddp_spawn", devices=2, use_distributed_sampler=False
    )
    trainer.fit(model)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    torch.manual_seed(0)
    single_model, single = DataParallelNet(), compact_rigl("dense")
    make_trainer([single], max_steps=10).fit(single_model)
    assert ranks[0]["history"] == ranks[1]["history"] == single.sparse.history and len(single.sparse.history) == 4
    for name, mask in single.masks.items():
        assert torch.equal(ranks[0]["masks"][name], mask) and torch.equal(ranks[1]["masks"][name], mask), name
    for name in LINEARS:
        for rank in ranks:
            torch.testing.assert_close(rank["weights"][name], single_model.get_submodule(name).weight.detach(), **F64)
        # The main process's model (never compact) holds rank 0's trained weights, zeros included, and its masks.
        assert not is_compact(model.get_submodule(name))
        assert torch.equal(model.get_submodule(name).weight.detach(), ranks[0]["weights"][name])
        assert torch.equal(rigl.masks[f"{name}.weight"], ranks[0]["masks"][f"{name}.weight"])


def test_sparsity_monitor_reports_compact_layers_under_their_weights_names():
    torch.manual_seed(0)
    logger, rigl = RecordingLogger(), compact_rigl("compact")
    make_trainer([rigl, SparsityMonitor(table=False, plot=False)], max_steps=4, logger=logger).fit(
        F64Net(), f64_loader()
    )
    last = logger.monitored()[max(logger.monitored())]
    for name in LINEARS:
        mask = rigl.masks[f"{name}.weight"]
        assert last[f"sparsity/{name}.weight"] == pytest.approx(1 - mask.sum().item() / mask.numel())


class NormedNet(F64Net):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(3, dtype=torch.float64)

    def forward(self, x):
        return self.norm(self.net(x))


def test_a_model_built_on_the_meta_device_trains_with_compact_layers_and_the_rest_initialised():
    with torch.device("meta"):
        model = NormedNet()
    _, rigl = fit("compact", model=model, steps=5)
    assert not [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    bound = 1 / 12**0.5  # nn.Linear's initialisation, drawn for the active values only (then 5 small steps)
    assert model.net[0].weight_values.abs().max() < 1.5 * bound and rigl.sparse.updates == 2


class TwoOptimizers(F64Net):
    """Manual optimization: one optimizer for the first layer, another for the rest, stepped in turn."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, rest = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        for optimizer in (first, rest):
            optimizer.step()
            optimizer.zero_grad()

    def configure_optimizers(self):
        rest = [p for name, p in self.named_parameters() if not name.startswith("net.0.")]
        return torch.optim.SGD(self.net[0].parameters(), lr=0.1, momentum=0.9), torch.optim.Adam(rest, lr=0.01)


def test_two_optimizers_in_manual_optimization_update_each_layer_alike():
    torch.manual_seed(0)
    dense, dense_rigl = fit("dense", model=TwoOptimizers(), steps=14, t_end=13)
    torch.manual_seed(0)
    compact, rigl = fit("compact", model=TwoOptimizers(), steps=14, t_end=13)
    assert rigl.sparse.updates >= 4
    assert_same_run(dense, dense_rigl, compact, rigl)


def test_training_never_builds_a_compact_layers_dense_weight(monkeypatch):
    # `layer.weight` is computed whole at each read: the library's own steps and updates must never read it.
    from lightning_rigl.core.storage.layer import CompactLayer

    reads = []
    original = CompactLayer.weight

    def counted(layer):
        reads.append(tuple(layer.stored_shape))
        return original.fget(layer)

    monkeypatch.setattr(CompactLayer, "weight", property(counted, original.fset))
    model, rigl = fit("compact", "adam", steps=6)
    assert rigl.sparse.updates >= 2 and all(is_compact(model.get_submodule(name)) for name in LINEARS)
    assert reads == []


def test_sparsity_monitor_counts_compact_layers_flops_as_the_dense_run_does():
    logged = {}
    for storage in ("dense", "compact"):
        torch.manual_seed(0)
        logger, model = RecordingLogger(), F64Net()
        model.example_input_array = torch.randn(2, 12, dtype=torch.float64)
        monitor = SparsityMonitor(table=False, plot=False)
        make_trainer([compact_rigl(storage), monitor], max_steps=4, logger=logger).fit(model, f64_loader())
        last = logger.monitored()[max(logger.monitored())]
        logged[storage] = {key: value for key, value in last.items() if key.startswith("flops/")}
        assert set(monitor.flops.per_layer) == {f"{name}.weight" for name in LINEARS}
    assert logged["compact"]["flops/sparse_ratio"] < 0.5  # the masks' zeros counted, not a dense 1.0
    assert logged["compact"] == pytest.approx(logged["dense"], rel=1e-12)


class TiedHead(F64Net):
    """A token embedding tied to the output layer (GPT-2's lm_head), before the Linear layers."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 12, dtype=torch.float64)
        self.head = nn.Linear(12, 5, bias=False, dtype=torch.float64)
        self.head.weight = self.embed.weight  # one Parameter under two names

    def forward(self, x):
        return self.net(x + self.head(x) @ self.embed.weight)


def test_a_head_tied_to_an_embedding_is_not_taken_for_a_layer_made_in_configure_model():
    model, rigl = fit("compact", model=TiedHead())
    assert rigl.sparse.updates >= 2 and all(is_compact(model.get_submodule(name)) for name in LINEARS)
    assert not is_compact(model.head) and model.head.weight is model.embed.weight  # the tie stays dense


class CompiledNet(F64Net):
    """F64Net whose layers run through ``torch.compile`` (the compiled module is not registered a second time)."""

    def __init__(self, optimizer="sgd"):
        super().__init__(optimizer)
        self.__dict__["compiled"] = torch.compile(self.net, backend="aot_eager")

    def forward(self, x):
        return self.compiled(x)


def test_a_compiled_model_makes_the_updates_and_weights_of_the_eager_one():
    eager, eager_rigl = fit("compact", steps=8)
    torch.manual_seed(0)  # the eager model's initial weights
    compiled, rigl = fit("compact", steps=8, model=CompiledNet())
    assert rigl.sparse.updates == eager_rigl.sparse.updates >= 2
    assert_same_run(eager, eager_rigl, compiled, rigl)


class TwiceNamed(F64Net):
    """The same layers registered under a second name (a model kept bare and inside a wrapper)."""

    def __init__(self):
        super().__init__()
        self.alias = self.net


def test_a_module_under_two_names_is_one_compact_layer_trained_as_dense_storage_trains_it():
    torch.manual_seed(0)
    dense, dense_rigl = fit("dense", model=TwiceNamed())
    torch.manual_seed(0)
    compact, rigl = fit("compact", model=TwiceNamed())
    assert rigl.sparse.history == dense_rigl.sparse.history and rigl.sparse.updates >= 2
    for name in LINEARS:
        assert is_compact(compact.get_submodule(name)) and compact.get_submodule(name) is compact.alias[int(name[-1])]
        torch.testing.assert_close(compact.get_submodule(name).weight, dense.get_submodule(name).weight.detach(), **F64)
