"""Odd models and odd runs: handled correctly or refused clearly."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_rigl import RigLCallback
from tests.helpers import MLP, InvariantChecker, assert_invariants, make_loader, make_trainer


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


def test_layers_that_erk_makes_dense_stay_dense_through_updates():
    rigl = RigLCallback(0.98, delta_t=2, t_end=100)
    model = MLP(hidden=1024)
    make_trainer([rigl], max_steps=8).fit(model, make_loader())
    dense = [name for name, s in rigl.sparse.sparsities.items() if s == 0.0]
    assert dense == ["net.5.weight"]  # the 1024 -> 4 head at 98 %
    for name in dense:
        assert rigl.masks[name].all()


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


class Evaluated(MLP):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.training_step(batch, batch_idx))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self.training_step(batch, batch_idx))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


def test_validate_test_predict_without_fit_do_nothing_harmful():
    rigl = RigLCallback(0.9)
    model = Evaluated()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer([rigl])
    trainer.validate(model, make_loader())
    trainer.test(model, make_loader())
    trainer.predict(model, make_loader())
    assert rigl.masks == {} and rigl.sparse is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class Interrupt(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 6:
            raise KeyboardInterrupt


def test_keyboard_interrupt_then_resume_from_last_checkpoint(tmp_path):
    rigl = RigLCallback(0.8, delta_t=3, t_end=100, seed=1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=4)
    trainer = make_trainer([rigl, checkpoint, Interrupt()], max_steps=12, enable_checkpointing=True)
    with pytest.raises(SystemExit):  # Lightning turns a KeyboardInterrupt into a graceful exit
        trainer.fit(MLP(), make_loader(64, 16))
    assert trainer.interrupted and trainer.global_step == 6

    resumed = RigLCallback(0.8, delta_t=3, t_end=100, seed=1)
    checker = InvariantChecker(resumed)
    trainer = make_trainer([resumed, checker], max_steps=12)
    trainer.fit(MLP(), make_loader(64, 16), ckpt_path=tmp_path / "last.ckpt")
    assert trainer.global_step == 12
    # Step 3's update comes from the step-4 checkpoint; 6, 9 and 12 ran after the resume.
    assert [r.step for r in resumed.sparse.history] == [3, 6, 9, 12]
    assert_invariants(resumed, trainer.lightning_module)


class NaNFrom(MLP):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step >= 5 else loss


def test_nan_losses_defer_updates_and_do_not_crash():
    rigl = RigLCallback(0.8, delta_t=2, t_end=100)
    make_trainer([rigl], max_steps=10).fit(NaNFrom(), make_loader())
    assert rigl.sparse.updates == 2  # steps 2 and 4; every later one is deferred
    assert rigl.sparse.nonfinite_steps == 5  # steps 6..10 were all due and all non-finite
