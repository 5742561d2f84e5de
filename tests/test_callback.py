"""RigLCallback in a real Trainer: masks, counts, gradients, growth, non-finite steps, seeds, weight
averaging and repeated fits."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint, StochasticWeightAveraging
from torch import nn

from lightning_rigl import RigLCallback
from tests.helpers import MLP, InvariantChecker, WithValidation, make_loader, make_trainer


class GradientCheckModule(MLP):
    """Asserts in its own on_before_optimizer_step (after the callbacks', before clipping and the
    optimizer) that inactive gradients are exactly 0."""

    rigl: RigLCallback
    grad_checks = 0

    def on_before_optimizer_step(self, optimizer):
        params = dict(self.named_parameters())
        for name, mask in self.rigl.masks.items():
            assert params[name].grad[~mask].eq(0).all(), name
        self.grad_checks += 1


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_exact_counts_zero_weights_and_zero_gradients_every_step(optimizer):
    rigl = RigLCallback(0.8, delta_t=4, t_end=30)
    model = GradientCheckModule(optimizer=optimizer)
    model.rigl = rigl
    checker = InvariantChecker(rigl)
    make_trainer([rigl, checker], max_steps=30, gradient_clip_val=0.5).fit(model, make_loader())
    assert checker.checks == 30 and model.grad_checks == 30
    assert rigl.sparse.updates == 7


@pytest.mark.parametrize("method", ["static", "rigl"])
def test_optimizer_state_is_absent_at_inactive_positions(method):
    rigl = RigLCallback(0.8, method=method, delta_t=3)
    model = MLP(optimizer="adamw")
    trainer = make_trainer([rigl], max_steps=15)
    trainer.fit(model, make_loader())
    state = trainer.optimizers[0].state
    params = dict(model.named_parameters())
    for name, mask in rigl.masks.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[params[name]][key][~mask].eq(0).all(), (name, key)


class GradientSpy(Callback):
    """Placed before RigLCallback: sees the dense gradient and the masks before each update."""

    def __init__(self, rigl):
        self.rigl, self.seen = rigl, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.rigl.sparse.schedule.is_update_step(trainer.global_step + 1):
            params = dict(pl_module.named_parameters())
            self.seen.append(({n: params[n].grad.clone() for n in self.rigl.masks}, self.rigl.masks))


@pytest.mark.parametrize("accumulate", [1, 3])
def test_growth_follows_the_dense_accumulated_gradient(accumulate):
    rigl = RigLCallback(0.9, delta_t=5, t_end=100, alpha=0.5)
    spy = GradientSpy(rigl)
    checks = []

    class AfterUpdate(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if spy.seen and len(checks) < len(spy.seen) and trainer.global_step % 5 == 0:
                checks.append((spy.seen[-1], rigl.masks))

    make_trainer([spy, rigl, AfterUpdate()], max_steps=20, accumulate_grad_batches=accumulate).fit(MLP(), make_loader())
    assert len(checks) == 4  # steps 5, 10, 15, 20
    for (grads, old_masks), new_masks in checks:
        for name, grad in grads.items():
            new, old = new_masks[name], old_masks[name]
            grown = new & ~old
            assert grown.any(), name
            # Every new connection scores at least as high as every position still inactive: the
            # score is the dense gradient (a masked one would be 0 at every inactive position).
            assert grad.abs()[grown].min() >= grad.abs()[~new].max(), name


class NonFiniteModule(MLP):
    """Its loss is NaN on step `bad_step`; its own hook then zeroes the NaN gradients (as an AMP
    scaler would skip the step) so that the run goes on."""

    bad_step = 4

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step == self.bad_step else loss

    def on_before_optimizer_step(self, optimizer):
        for p in self.parameters():
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0)


def test_a_step_with_non_finite_gradients_makes_no_update_and_is_counted():
    rigl = RigLCallback(0.8, delta_t=5, t_end=100)
    make_trainer([rigl], max_steps=12).fit(NonFiniteModule(), make_loader())
    assert rigl.sparse.nonfinite_steps == 1
    assert [record.step for record in rigl.sparse.history] == [5, 10]  # step 5's update ran at step 6
    assert rigl.sparse.updates == 2


class NaNFrom(MLP):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step >= 5 else loss


def test_nan_losses_defer_updates_and_do_not_crash():
    rigl = RigLCallback(0.8, delta_t=2, t_end=100)
    make_trainer([rigl], max_steps=10).fit(NaNFrom(), make_loader())
    assert rigl.sparse.updates == 2  # steps 2 and 4; every later one is deferred
    assert rigl.sparse.nonfinite_steps == 5  # steps 6..10 were all due and all non-finite


def _train_masks(seed, rigl_seed, method="rigl"):
    pl.seed_everything(seed, verbose=False)
    rigl = RigLCallback(0.8, method=method, delta_t=3, seed=rigl_seed)
    make_trainer([rigl], max_steps=12).fit(MLP(), make_loader())
    return rigl.masks


@pytest.mark.parametrize("method", ["rigl", "set", "snfs"])
def test_same_seed_same_masks(method):
    first, second = _train_masks(0, 7, method), _train_masks(0, 7, method)
    assert all(torch.equal(first[n], second[n]) for n in first)
    other = _train_masks(0, 8, method)
    assert not all(torch.equal(first[n], other[n]) for n in first)


def test_seed_none_follows_seed_everything():
    first, second = _train_masks(3, None), _train_masks(3, None)
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_no_full_sort(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("full sort called")

    for name in ("sort", "argsort", "msort"):
        monkeypatch.setattr(torch, name, refuse)
        monkeypatch.setattr(torch.Tensor, name, refuse)
    rigl = RigLCallback(0.8, delta_t=2, t_end=100)
    make_trainer([rigl], max_steps=8).fit(MLP(), make_loader())
    assert rigl.sparse.updates == 4


class ManualModule(MLP):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=1.0)
        opt.step()
        return loss


class SchedulerModule(MLP):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return [opt], [{"scheduler": torch.optim.lr_scheduler.StepLR(opt, 5), "interval": "step"}]


@pytest.mark.parametrize(
    ("module", "trainer_kwargs"),
    [
        (ManualModule, {}),
        (MLP, {"accumulate_grad_batches": 2}),
        (MLP, {"gradient_clip_val": 0.1, "gradient_clip_algorithm": "value"}),
        (MLP, {"precision": "bf16-mixed"}),
        (SchedulerModule, {}),
    ],
    ids=["manual", "accumulation", "clipping", "bf16-mixed", "lr-scheduler"],
)
def test_works_with(module, trainer_kwargs):
    rigl = RigLCallback(0.8, delta_t=4, t_end=100)
    model = module()
    checker = InvariantChecker(rigl)
    make_trainer([rigl, checker], max_steps=16, **trainer_kwargs).fit(model, make_loader())
    assert rigl.sparse.updates == 4
    assert checker.checks >= 16


def test_works_with_torch_compile():
    rigl = RigLCallback(0.8, delta_t=4, t_end=100)
    model = MLP()
    compiled = torch.compile(model, backend="aot_eager")
    checker = InvariantChecker(rigl)
    make_trainer([rigl, checker], max_steps=12).fit(compiled, make_loader())
    assert rigl.sparse.updates == 3 and checker.checks == 12
    assert list(rigl.masks) == ["net.0.weight", "net.2.weight", "net.5.weight"]


@pytest.mark.parametrize(
    "averaging",
    [lambda: EMAWeightAveraging(decay=0.9), lambda: StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)],
    ids=["ema", "swa"],
)
def test_averaged_weights_respect_the_masks_in_validation_checkpoints_and_the_final_model(tmp_path, averaging):
    rigl = RigLCallback(0.8, delta_t=2, t_end=100, alpha=0.5)
    model = WithValidation()
    model.rigl = rigl
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer = make_trainer([averaging(), rigl, saver], max_steps=-1, max_epochs=4, enable_checkpointing=True)
    trainer.fit(model, make_loader(64, 16), make_loader(32, 16, seed=1))
    assert rigl.sparse.updates == 8 and model.validated > 4
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    params = dict(model.named_parameters())
    for name, mask in rigl.masks.items():
        assert params[name][~mask].eq(0).all(), name  # the final model, averaged weights copied in
        assert saved[name][~mask].eq(0).all(), name  # the checkpoint, which holds the averaged weights
        assert params[name][mask].ne(0).any(), name


def test_fit_twice_with_the_same_callback_goes_on_from_its_masks():
    rigl = RigLCallback(0.8, delta_t=4, t_end=100)
    model = MLP()
    make_trainer([rigl], max_steps=8).fit(model, make_loader())
    masks = rigl.masks
    sparse = rigl.sparse
    checker = InvariantChecker(rigl)
    make_trainer([rigl, checker], max_steps=8).fit(model, make_loader())
    assert rigl.sparse is sparse and rigl.sparse.updates == 4 and checker.checks == 8
    assert not all(torch.equal(masks[n], rigl.masks[n]) for n in masks)  # it kept updating
    other = MLP()  # a new model gets new masks
    make_trainer([rigl], max_steps=2).fit(other, make_loader())
    assert rigl.sparse is not sparse and rigl.sparse.params["net.0.weight"] is other.net[0].weight


def test_state_dict_keys_unchanged_and_checkpoint_loads_into_a_plain_model(tmp_path):
    rigl = RigLCallback(0.9, delta_t=4)
    model = MLP()
    keys = list(model.state_dict())
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last")
    make_trainer([rigl, checkpoint], max_steps=12, enable_checkpointing=True).fit(model, make_loader())
    assert list(model.state_dict()) == keys
    loaded = MLP.load_from_checkpoint(tmp_path / "last.ckpt")
    assert type(loaded) is MLP and list(loaded.state_dict()) == keys
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    for name, mask in rigl.masks.items():
        assert loaded.state_dict()[name][~mask].eq(0).all()


class TeacherTask(pl.LightningModule):
    """Regression on 4 of 64 inputs through a 64-64-1 MLP. At 97 % sparsity a random static mask rarely
    connects the informative inputs; RigL's gradient-based growth finds them."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).squeeze(1), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def _teacher_loss(method):
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=g)
    y = x[:, :4].sum(dim=1) + 0.5 * x[:, :4].abs().sum(dim=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True)
    # 22 updates (every 10 steps up to t_end, 75 % of the steps): RigL's loss ends at about 0.15x static's.
    rigl = RigLCallback(0.97, distribution="uniform", dense_first_layer=False, method=method, delta_t=10, seed=1)
    model = TeacherTask()
    make_trainer([rigl], max_steps=300, max_epochs=None).fit(model, loader)
    with torch.no_grad():
        return nn.functional.mse_loss(model.net(x).squeeze(1), y).item()


def test_rigl_learns_better_than_static_at_high_sparsity():
    rigl, static = _teacher_loss("rigl"), _teacher_loss("static")
    assert rigl < 0.5 * static, (rigl, static)
