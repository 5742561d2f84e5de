"""RigLCallback(kernels=...): sparse kernels in real Trainer runs train like the masked dense path."""

from __future__ import annotations

import copy
import pickle
import re
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from lightning_rigl import RigLCallback, SparseTraining, SparsityMonitor, count_flops, sparsify
from tests.helpers import MLP, Wide, assert_trained_alike, fit_with_kernels, make_loader, make_trainer

README = Path(__file__).parent.parent / "README.md"
MASKED = ["net.0.weight", "net.2.weight", "net.5.weight"]
SPARSE_OPS = (torch.ops.lightning_rigl.sparse_linear, torch.ops.lightning_rigl.sparse_linear_backward)


class SequenceMLP(MLP):
    """Linear layers on (batch, sequence, features) inputs, without biases, mean-pooled over the sequence."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 32, bias=False), nn.ReLU(), nn.Linear(32, 4)
        )

    def forward(self, x):
        return self.net(x).mean(dim=1)


class TwoOptimizers(MLP):
    """Manual optimization: one optimizer for the first layer, one for the rest, each with its own forward."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        for opt in self.optimizers():
            opt.zero_grad()
            loss = super().training_step(batch, batch_idx)
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self):
        first = list(self.net[0].parameters())
        rest = [p for p in self.parameters() if all(p is not q for q in first)]
        return torch.optim.SGD(first, lr=0.05, momentum=0.9), torch.optim.SGD(rest, lr=0.05, momentum=0.9)


def sequence_loader(n: int = 256, batch_size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 5, 16, generator=g)
    y = x.mean(dim=1)[:, :4].argmax(dim=1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


@pytest.mark.parametrize(
    ("module", "loader", "trainer_kwargs"),
    [
        (MLP, None, {}),
        (MLP, None, {"accumulate_grad_batches": 2}),
        (MLP, None, {"gradient_clip_val": 0.05}),
        (SequenceMLP, sequence_loader, {}),
        (TwoOptimizers, None, {}),
    ],
    ids=["biases", "accumulation", "clipping", "sequence-no-bias", "manual-two-optimizers"],
)
def test_float64_sparse_kernels_train_like_dense_kernels(module, loader, trainer_kwargs):
    args = dict(module=module, loader=loader() if loader else None, precision="64-true", **trainer_kwargs)
    assert_trained_alike(fit_with_kernels("sparse", **args), fit_with_kernels("dense", **args), rtol=1e-10)


def test_float32_sparse_kernels_stay_within_1e_4_of_dense_kernels():
    assert_trained_alike(fit_with_kernels("sparse", steps=10), fit_with_kernels("dense", steps=10), rtol=1e-4)


def test_bf16_mixed_runs_on_dense_kernels():
    rigl, model = fit_with_kernels("sparse", steps=12, precision="bf16-mixed")
    assert rigl.kernel_choices == dict.fromkeys(MASKED, "dense")  # the CPU sparse kernels have no bf16
    assert rigl.sparse.updates == 3
    assert all(model.get_parameter(name)[~mask].eq(0).all() for name, mask in rigl.masks.items())


class Scaled(nn.Linear):
    """A Linear subclass with a forward of its own: the sparse product would skip its scale."""

    def forward(self, x):
        return 1.5 * super().forward(x)


class Shifted:
    """A forward set on a layer instance, as a library's wrapper does: it adds to the layer's output."""

    def __init__(self, layer: nn.Linear) -> None:
        self.layer, self.calls = layer, 0

    def __call__(self, x):
        self.calls += 1
        return nn.Linear.forward(self.layer, x) + 0.25


class OwnForwards(MLP):
    """``net.0`` a Linear subclass with its own forward, ``net.2`` a Linear whose instance forward is wrapped."""

    def __init__(self):
        super().__init__()
        self.net[0] = Scaled(16, 32)
        self.net[2].forward = self.shifted = Shifted(self.net[2])


def test_layers_with_a_forward_of_their_own_stay_dense_and_train_as_on_dense_kernels():
    sparse, dense = (
        fit_with_kernels(kernels, module=OwnForwards, precision="64-true", steps=12) for kernels in ("sparse", "dense")
    )
    assert sparse[0].kernel_choices == {"net.0.weight": "dense", "net.2.weight": "dense", "net.5.weight": "sparse"}
    assert sparse[1].shifted.calls == dense[1].shifted.calls == 12  # the wrapper ran at every batch
    assert sparse[0].sparse.updates == dense[0].sparse.updates == 3
    for name, value in dense[1].state_dict().items():  # the scale and the shift were applied on both
        torch.testing.assert_close(sparse[1].state_dict()[name], value, rtol=1e-10, atol=1e-10 * value.abs().max())


def test_auto_picks_sparse_for_a_large_very_sparse_layer_and_dense_for_small_ones():
    loader = make_loader(512, batch_size=256, in_features=64)
    rigl, _ = fit_with_kernels("auto", module=Wide, loader=loader, steps=2, sparsity=0.95)
    assert rigl.kernel_choices == {"net.0.weight": "dense", "net.2.weight": "sparse", "net.5.weight": "dense"}


def test_snfs_stays_dense_under_auto():
    loader = make_loader(512, batch_size=256, in_features=64)
    rigl, _ = fit_with_kernels("auto", module=Wide, loader=loader, steps=2, sparsity=0.95, method="snfs")
    assert set(rigl.kernel_choices.values()) == {"dense"}  # SNFS reads the dense gradient every step


def test_the_first_batch_chooses_and_teardown_gives_layers_their_dense_forward():
    rigl, model = fit_with_kernels("sparse", steps=3)
    assert rigl.kernel_choices == dict.fromkeys(MASKED, "sparse")
    assert all("forward" not in vars(module) for module in model.modules())  # the class forward is back


def test_an_unknown_kernels_value_is_refused_naming_the_argument():
    message = "`kernels` must be one of ('auto', 'sparse', 'dense'), got 'fast'."
    with pytest.raises(MisconfigurationException, match=re.escape(message)):
        RigLCallback(kernels="fast")
    # The run of a plain loop and sparsify give the same message (one check), before any work.
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match=re.escape(message)):
        SparseTraining.from_model(model, 0.5, kernels="fast")
    with pytest.raises(ValueError, match=re.escape(message)):
        sparsify(model, kernels="fast")


class CountSparseOps(Callback):
    """Counts the calls of the sparse op in training batches (FlopCounterMode sees them by their formula)."""

    def __init__(self):
        self.calls, self._mode = 0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._mode = FlopCounterMode(display=False)
        self._mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._mode.__exit__(None, None, None)
        self.calls += sum(self._mode.get_flop_counts()["Global"].get(op, 0) > 0 for op in SPARSE_OPS)


def test_compiled_model_trains_on_sparse_kernels_like_dense_kernels():
    eager = []

    def compiled():
        eager.append(MLP())
        return torch.compile(eager[-1], backend="aot_eager")

    counter = CountSparseOps()
    rigl, _ = fit_with_kernels("sparse", module=compiled, steps=12, callbacks=[counter])
    assert counter.calls == 2 * 11  # forward and backward ops of every batch after the first
    assert_trained_alike((rigl, eager[-1]), fit_with_kernels("dense", steps=12), rtol=1e-4)


def _checkpointed_fit(tmp_path: Path, kernels: str, epochs: int, ckpt_path=None):
    """4 steps an epoch (resumed at an epoch's end), updates after steps 3, 6, 9, 12, 15.

    Float32: Lightning's own "64-true" resume is not bit-exact (1e-8 apart with dense kernels alone).
    """
    pl.seed_everything(0, verbose=False)
    rigl = RigLCallback(0.8, delta_t=3, t_end=100, alpha=0.5, seed=1, kernels=kernels)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    model = MLP()
    trainer = make_trainer([rigl, checkpoint], max_steps=-1, max_epochs=epochs, enable_checkpointing=True)
    trainer.fit(model, make_loader(64, 16), ckpt_path=ckpt_path)
    return rigl, model


@pytest.mark.parametrize("kernels", ["sparse", "dense"])
def test_resume_is_bit_exact_within_one_kernels_setting(tmp_path, kernels):
    straight, straight_model = _checkpointed_fit(tmp_path / "straight", kernels, 4)
    _checkpointed_fit(tmp_path / "resumed", kernels, 2)
    saved = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=True)["callbacks"]["RigLCallback"]
    assert saved["kernels"] == {"setting": kernels, "choices": dict.fromkeys(MASKED, kernels)}
    resumed, resumed_model = _checkpointed_fit(tmp_path / "resumed", kernels, 4, tmp_path / "resumed" / "last.ckpt")
    assert resumed.sparse.updates == straight.sparse.updates == 5
    assert resumed.kernel_choices == straight.kernel_choices
    for name, mask in straight.masks.items():
        assert torch.equal(resumed.masks[name], mask), name
    for name, value in straight_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[name], value), name


@pytest.mark.parametrize(("saved_with", "resumed_with"), [("sparse", "dense"), ("dense", "sparse")])
def test_a_checkpoint_moves_between_kernels_settings(tmp_path, saved_with, resumed_with):
    straight, straight_model = _checkpointed_fit(tmp_path / "straight", saved_with, 4)
    _checkpointed_fit(tmp_path / "moved", saved_with, 2)
    moved, moved_model = _checkpointed_fit(tmp_path / "moved", resumed_with, 4, tmp_path / "moved" / "last.ckpt")
    assert moved.kernel_choices == dict.fromkeys(MASKED, resumed_with)  # chosen anew for the new setting
    assert moved.sparse.updates == straight.sparse.updates == 5
    for name, mask in straight.masks.items():
        assert torch.equal(moved.masks[name], mask), name
    assert list(moved_model.state_dict()) == list(straight_model.state_dict())
    for name, value in straight_model.state_dict().items():
        torch.testing.assert_close(moved_model.state_dict()[name], value, rtol=1e-4, atol=1e-5)


class SaveRankState(Callback):
    def __init__(self, rigl, directory):
        self.rigl, self.directory = rigl, directory

    def on_train_end(self, trainer, pl_module):
        state = {"masks": self.rigl.masks, "choices": self.rigl.kernel_choices, "updates": self.rigl.sparse.updates}
        torch.save(state, self.directory / f"rank{trainer.global_rank}.pt")


def ddp_fit_on_sparse_kernels(directory: Path) -> None:
    """Run on each of 2 ranks: a DDP fit on sparse kernels that saves the rank's state in `directory`."""
    pl.seed_everything(0, verbose=False)
    rigl = RigLCallback(0.8, delta_t=2, t_end=100, alpha=0.5, seed=5, kernels="sparse")
    make_trainer([rigl, SaveRankState(rigl, directory)], max_steps=8, strategy="ddp", devices=2).fit(
        MLP(), make_loader()
    )


def test_ddp_ranks_keep_identical_masks_on_sparse_kernels(tmp_path, two_ranks):
    two_ranks(ddp_fit_on_sparse_kernels, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["updates"] == ranks[1]["updates"] == 4
    assert ranks[0]["choices"] == ranks[1]["choices"] == dict.fromkeys(MASKED, "sparse")
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(ranks[1]["masks"][name], mask), name


def test_monitor_counts_the_same_flops_through_the_sparse_kernels_and_shows_them(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "rich", None)  # the plain-text table
    model, x = MLP(), torch.randn(8, 16)
    rigl = RigLCallback(0.8, delta_t=4, t_end=100, kernels="sparse")
    make_trainer([rigl], max_steps=2).fit(model, make_loader())
    # A second fit with the same callback computes on sparse kernels from its first batch, and the
    # monitor (listed after it) counts its FLOPs through them.
    monitor = SparsityMonitor(example_input=x, plot=False)
    make_trainer([rigl, monitor], max_steps=2).fit(model, make_loader())
    expected = count_flops(model, x)  # after the fit: dense kernels again
    assert monitor.flops.dense == expected.dense > 0 and monitor.flops.sparse == pytest.approx(expected.sparse)
    assert {name: layer.dense for name, layer in monitor.flops.per_layer.items()} == {
        name: layer.dense for name, layer in expected.per_layer.items()
    }
    table = capsys.readouterr().out.split("SparsityMonitor at fit end")[-1]
    assert re.search(r"^layer .*\| +kernels$", table, re.MULTILINE)
    for name in MASKED:
        assert re.search(rf"{re.escape(name)} .*\| +sparse$", table, re.MULTILINE), name


def test_cli_sets_kernels_from_yaml_and_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cli"])

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return make_loader(64)

    trainer = {
        "accelerator": "cpu",
        "max_steps": 3,
        "logger": False,
        "enable_checkpointing": False,
        "default_root_dir": str(tmp_path),  # where the CLI saves its config
    }
    config = tmp_path / "rigl.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    **trainer,
                    "callbacks": [{"class_path": "lightning_rigl.RigLCallback", "init_args": {"kernels": "sparse"}}],
                }
            }
        )
    )
    from_yaml = LightningCLI(MLP, Data, args=["fit", "--config", str(config)])
    (rigl,) = [cb for cb in from_yaml.trainer.callbacks if isinstance(cb, RigLCallback)]
    assert rigl.kernels == "sparse" and rigl.kernel_choices == dict.fromkeys(MASKED, "sparse")
    args = ["--trainer.callbacks+=RigLCallback", "--trainer.callbacks.kernels=dense"]
    from_command_line = LightningCLI(MLP, Data, args=args, run=False)
    (rigl,) = [cb for cb in from_command_line.trainer.callbacks if isinstance(cb, RigLCallback)]
    assert rigl.kernels == "dense"
    with pytest.raises(SystemExit):
        LightningCLI(
            MLP, Data, args=["--trainer.callbacks+=RigLCallback", "--trainer.callbacks.kernels=fast"], run=False
        )


def test_readme_deployment_round_trip_gives_the_same_outputs(tmp_path, monkeypatch):
    text = README.read_text()
    snippet = re.search(r"<!-- deployment -->\n```python\n(.*?)```", text, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    pl.seed_everything(0, verbose=False)
    rigl = RigLCallback(0.9, delta_t=4, t_end=100)
    model = MLP()
    make_trainer([rigl], max_steps=8).fit(model, make_loader())
    namespace = {"model": model, "rigl": rigl, "MyModel": MLP, "x": torch.randn(32, 16)}
    exec(snippet, namespace)
    assert namespace["fast"] is not namespace["model"]
    torch.testing.assert_close(namespace["fast_out"], namespace["out"], rtol=1e-5, atol=1e-6)


class Encoder(MLP):
    """Two Transformer encoder layers on (batch, sequence, features) inputs, mean-pooled."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
        self.net = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(16, 4))

    def forward(self, x):
        return self.net[1](self.net[0](x).mean(dim=1))


def test_attention_projections_stay_dense_and_feed_forward_layers_go_sparse():
    rigl, _ = fit_with_kernels("sparse", module=Encoder, loader=sequence_loader(), steps=4)
    choices = rigl.kernel_choices
    # nn.MultiheadAttention multiplies by in_proj_weight and out_proj.weight itself: no layer forward to swap.
    assert {name for name, choice in choices.items() if choice == "dense"} == {
        f"net.0.layers.{i}.self_attn.{weight}" for i in range(2) for weight in ("in_proj_weight", "out_proj.weight")
    }
    assert choices["net.0.layers.1.linear2.weight"] == choices["net.1.weight"] == "sparse"
    assert rigl.sparse.updates == 1


class WeightUsedTwice(MLP):
    """The middle layer's weight also enters the loss directly: its gradient is nonzero at every position."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + 0.05 * self.net[2].weight.sum()


class GradientNoise(Callback):
    """Adds signed noise to every gradient in place after the backward, as gradient-noise methods do."""

    def on_after_backward(self, trainer, pl_module):
        gen = torch.Generator().manual_seed(trainer.global_step)
        for p in pl_module.parameters():
            p.grad.add_(torch.randn(p.shape, generator=gen) * 0.01)


@pytest.mark.parametrize(
    ("module", "callbacks"), [(WeightUsedTwice, ()), (MLP, (GradientNoise(),))], ids=["second-use", "noise-hook"]
)
def test_gradients_changed_after_the_sparse_op_are_still_masked(module, callbacks):
    rigl, model = fit_with_kernels("sparse", module=module, steps=12, callbacks=callbacks, method="set")
    assert rigl.kernel_choices == dict.fromkeys(MASKED, "sparse")
    optimizer = model.trainer.optimizers[0]
    for name, mask in rigl.masks.items():
        weight = model.get_parameter(name)
        assert weight[~mask].eq(0).all(), name  # no check ran yet (every 100 steps): masking alone held them
        assert optimizer.state[weight]["momentum_buffer"][~mask].eq(0).all(), name


def test_ordinary_steps_do_not_mask_the_gradients_the_sparse_kernels_wrote(monkeypatch):
    import lightning_rigl.core.topology.masks as masks_module  # where the multiply is called

    masked_gradients_per_step = []
    multiply = masks_module.multiply_by_masks

    def spy(tensors, masks):
        params = list(model.parameters())
        masked_gradients_per_step.append(sum(any(t is p.grad for p in params) for t in tensors))
        multiply(tensors, masks)

    monkeypatch.setattr(masks_module, "multiply_by_masks", spy)
    model = MLP()
    masked_gradients_per_step.clear()
    steps = 9
    pl.seed_everything(0, verbose=False)
    rigl = RigLCallback(0.8, method="rigl", delta_t=4, t_end=100, seed=1, kernels="sparse")
    make_trainer([rigl], max_steps=steps).fit(model, make_loader())
    gradient_calls = [n for n in masked_gradients_per_step if n]
    # Step 1 runs dense (it measures the tokens): each layer's gradient is masked as it is accumulated; steps 4
    # and 8 read the dense gradient for RigL's update: they mask all three layers at once before the step. No
    # other step masks any.
    assert gradient_calls == [1, 1, 1, 3, 3]
    assert all(model.get_parameter(name)[~mask].eq(0).all() for name, mask in rigl.masks.items())


class ReplaceMasks(Callback):
    """Replaces RigL's masks with fresh random ones at one batch start (listed before RigLCallback)."""

    def __init__(self, rigl: RigLCallback, at_step: int) -> None:
        self.rigl, self.at_step, self.new_masks = rigl, at_step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            gen = torch.Generator().manual_seed(7)
            masks = self.rigl.masks
            self.new_masks = {name: torch.rand(mask.shape, generator=gen) < 0.3 for name, mask in masks.items()}
            self.rigl.sparse.set_masks(self.new_masks)


def test_masks_replaced_mid_run_get_new_sparse_structures():
    def run(kernels):
        pl.seed_everything(0, verbose=False)
        rigl = RigLCallback(0.8, method="static", seed=1, kernels=kernels)
        replace = ReplaceMasks(rigl, at_step=3)
        model = MLP()
        make_trainer([replace, rigl], max_steps=12, precision="64-true").fit(model, make_loader())
        return rigl, replace.new_masks, model

    rigl, new_masks, model = run("sparse")
    _, _, dense_model = run("dense")
    assert rigl.kernel_choices == dict.fromkeys(MASKED, "sparse")
    for name, mask in new_masks.items():
        assert torch.equal(rigl.masks[name], mask), name
        assert model.get_parameter(name)[~mask].eq(0).all(), name  # the old structure's gradients would move these
    for name, value in dense_model.state_dict().items():  # newly active weights train as on dense kernels
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-10, atol=1e-10 * value.abs().max())


class SnapshotAt(Callback):
    """Deep-copies and pickles the module at one batch's end, as a best-model snapshot would."""

    def __init__(self, batch: int, x: Tensor, rigl: RigLCallback) -> None:
        self.batch, self.x, self.rigl = batch, x, rigl

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch:
            self.original_sparse = computes_sparse(pl_module.net, self.x)
            self.masks = {name: mask.clone() for name, mask in self.rigl.masks.items()}
            self.copied = copy.deepcopy(pl_module.net)
            self.unpickled = pickle.loads(pickle.dumps(pl_module.net))


def computes_sparse(module: nn.Module, x: Tensor) -> bool:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return any(counter.get_flop_counts()["Global"].get(op, 0) > 0 for op in SPARSE_OPS)


def test_a_copy_taken_mid_run_computes_with_its_own_weights_on_dense_kernels():
    pl.seed_everything(0, verbose=False)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(5))
    rigl = RigLCallback(0.8, delta_t=4, t_end=100, alpha=0.5, seed=1, kernels="sparse")
    snapshot, model = SnapshotAt(batch=2, x=x, rigl=rigl), MLP()
    make_trainer([rigl, snapshot], max_steps=18).fit(model, make_loader())  # two steps after the 4th update
    assert rigl.sparse.updates == 4 and snapshot.original_sparse
    # Weights grown since the snapshot and trained: what a copy computing with its old structure would miss.
    assert any(model.get_parameter(name)[~mask].ne(0).any() for name, mask in snapshot.masks.items())
    for copied in (snapshot.copied, snapshot.unpickled):
        assert not computes_sparse(copied, x)
        # No structure of batch 2 in the copy: the weights it is given later, grown connections and all, count.
        copied.load_state_dict(model.net.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(copied(x), model.net(x), rtol=1e-6, atol=1e-6)
    # A later fit serves the copy's layers again.
    again = MLP()
    again.net = snapshot.copied
    rigl_again = RigLCallback(0.8, delta_t=4, seed=1, kernels="sparse")
    make_trainer([rigl_again], max_steps=3).fit(again, make_loader())
    assert rigl_again.kernel_choices == dict.fromkeys(MASKED, "sparse")
