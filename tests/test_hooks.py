"""Where RigLCallback does its work: gradients in on_before_optimizer_step, drop/grow in on_train_batch_end.

What other callbacks see at each hook, what a checkpoint saved there resumes to, AMP-skipped steps,
manual optimization with several optimizer steps in one batch, the dense-gradient decision, and no work
in validate, test or predict without a fit.
"""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from lightning_rigl import RigLCallback, SparseTraining, SparsityMonitor, UpdateSchedule
from tests.helpers import MLP, InfAt, RecordingLogger, StepWatch, digest, make_loader, make_trainer


def _rigl():
    return RigLCallback(0.8, delta_t=3, t_end=100, alpha=0.5, seed=2)


def _assert_inactive_zero(masks, module):
    params = dict(module.named_parameters())
    for name, mask in masks.items():
        assert params[name][~mask].eq(0).all(), name


class Observer(Callback):
    """At each batch end: the update count and masks it sees, and that the weights are 0 where they say so."""

    def __init__(self, rigl):
        self.rigl, self.seen = rigl, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        masks = self.rigl.masks
        _assert_inactive_zero(masks, pl_module)
        self.seen[trainer.global_step] = (self.rigl.sparse.updates, masks)


def test_callbacks_before_rigl_see_the_masks_before_the_update_and_callbacks_after_see_them_after():
    rigl = _rigl()
    before, after = Observer(rigl), Observer(rigl)
    make_trainer([before, rigl, after], max_steps=9).fit(MLP(), make_loader())
    for step in (3, 6, 9):  # update steps
        assert after.seen[step][0] == before.seen[step][0] + 1 == step // 3
        assert any(not torch.equal(before.seen[step][1][n], after.seen[step][1][n]) for n in rigl.masks)
    for step in (1, 2, 4, 5, 7, 8):
        assert before.seen[step][0] == after.seen[step][0]


class SaveAt(Callback):
    """Listed before RigLCallback: saves a checkpoint at the end of step `step`, before that step's update."""

    def __init__(self, step, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def _fit(callbacks, steps, ckpt_path=None, model=None):
    pl.seed_everything(0, verbose=False)
    model = model or MLP(optimizer="adam")
    # One batch an epoch: every step ends an epoch, so a resumed run meets the same batches.
    make_trainer(callbacks, max_steps=steps).fit(model, make_loader(16, 16), ckpt_path=ckpt_path)
    return model


def test_a_checkpoint_saved_between_a_step_and_its_update_resumes_exactly(tmp_path):
    straight_rigl = _rigl()
    straight = _fit([straight_rigl], 12)

    path = tmp_path / "mid.ckpt"
    _fit([SaveAt(6, path), _rigl()], 6)
    saved = torch.load(path, weights_only=True)["callbacks"]["RigLCallback"]
    assert set(saved["grow_candidates"]) == set(straight_rigl.masks)  # the update of step 6 had not run yet

    resumed_rigl = _rigl()
    resumed = _fit([resumed_rigl], 12, ckpt_path=path)
    assert resumed_rigl.sparse.updates == straight_rigl.sparse.updates == 4
    assert digest(resumed.state_dict()) == digest(straight.state_dict())
    assert digest(resumed_rigl.masks) == digest(straight_rigl.masks)


def test_model_checkpoint_every_step_saves_after_the_update_and_resumes_exactly(tmp_path):
    straight_rigl = _rigl()
    straight = _fit([straight_rigl], 12)

    every_step = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer_rigl = _rigl()
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer([every_step, trainer_rigl], max_steps=6, enable_checkpointing=True)
    trainer.fit(MLP(optimizer="adam"), make_loader(16, 16))
    saved = torch.load(tmp_path / "step=6.ckpt", weights_only=True)["callbacks"]["RigLCallback"]
    assert saved["grow_candidates"] == {} and len(saved["history"]) == 2  # ModelCheckpoint runs last: after it

    resumed_rigl = _rigl()
    resumed = _fit([resumed_rigl], 12, ckpt_path=tmp_path / "step=6.ckpt")
    assert digest(resumed.state_dict()) == digest(straight.state_dict())
    assert digest(resumed_rigl.masks) == digest(straight_rigl.masks)


@pytest.mark.parametrize("monitor_first", [True, False])
def test_sparsity_monitor_logs_each_update_at_its_step_wherever_it_is_listed(monitor_first):
    rigl, monitor, logger = _rigl(), SparsityMonitor(plot=False, table=False), RecordingLogger()
    callbacks = [monitor, rigl] if monitor_first else [rigl, monitor]
    make_trainer(callbacks, max_steps=9, logger=logger, log_every_n_steps=100).fit(MLP(), make_loader())
    logged = {step: metrics["rigl/updates"] for step, metrics in logger.monitored().items()}
    assert logged == {2: 1.0, 5: 2.0, 8: 3.0}  # the loggers' step index counts from 0


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_a_step_skipped_by_the_grad_scaler_makes_no_update_and_the_next_finite_step_does(device):
    # The decision for AMP: a skipped step still advances global_step (Lightning's clock), but its
    # non-finite gradients give no update: the due update is made at the next finite step.
    rigl = RigLCallback(0.8, delta_t=4, t_end=100)
    watch = StepWatch(rigl)
    # A small initial scale: no overflow of the scaled loss on finite steps, so the inf step is the only skip.
    precision = MixedPrecision("16-mixed", device, scaler=torch.amp.GradScaler(device, init_scale=2.0**10))
    accelerator = "gpu" if device == "cuda" else "cpu"
    trainer = make_trainer([rigl, watch], max_steps=10, plugins=[precision], accelerator=accelerator)
    trainer.fit(InfAt(), make_loader())

    assert trainer.global_step == 10 and watch.ran == 9  # the scaler skipped exactly the inf step
    assert rigl.sparse.nonfinite_steps == 1
    (masks_before, weight_before), (masks_after, weight_after) = watch.around[InfAt.bad_step]
    assert torch.equal(weight_before, weight_after)  # the step was skipped ...
    assert all(torch.equal(masks_before[n], masks_after[n]) for n in masks_before)  # ... and so was the update
    (masks_before, _), (masks_after, _) = watch.around[InfAt.bad_step + 1]
    assert any(not torch.equal(masks_before[n], masks_after[n]) for n in masks_before)  # made at the next step
    assert [record.step for record in rigl.sparse.history] == [4, 8]
    assert all(mask.device.type == device for mask in rigl.masks.values())


class TwoOptimizers(MLP):
    """Manual optimization: the first layer and the rest have their own optimizer, stepped one after the
    other in each batch, each after its own forward pass. Records, before each step, how many updates
    the callback has made and whether the weights are 0 where the masks say."""

    def __init__(self, rigl):
        super().__init__()
        self.automatic_optimization = False
        self.rigl, self.seen = rigl, []

    def configure_optimizers(self):
        first = list(self.net[0].parameters())
        rest = [p for p in self.parameters() if all(p is not q for q in first)]
        return torch.optim.SGD(first, lr=0.05, momentum=0.9), torch.optim.Adam(rest, lr=0.01)

    def training_step(self, batch, batch_idx):
        for optimizer in self.optimizers():
            self.seen.append((self.trainer.global_step, self.rigl.sparse.updates))
            _assert_inactive_zero(self.rigl.masks, self)
            loss = super().training_step(batch, batch_idx)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()


def test_manual_optimization_updates_right_after_each_step_even_with_two_steps_in_a_batch():
    rigl = RigLCallback(0.8, delta_t=3, t_end=100, seed=1)
    model = TwoOptimizers(rigl)
    make_trainer([rigl], max_steps=12).fit(model, make_loader())
    # Steps are counted per optimizer step: 6 batches of 2 steps. The update due after step 3 (the
    # first optimizer's step of the second batch) is in place before that batch's second forward pass.
    assert (3, 1) in model.seen and (9, 3) in model.seen
    assert [record.step for record in rigl.sparse.history] == [3, 6, 9, 12]


class DenseGradientLog(Callback):
    """Records, before each (micro-)batch's forward pass, whether its optimizer step reads the dense gradient."""

    def __init__(self, rigl):
        self.rigl, self.needed = rigl, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.needed.append((trainer.global_step, self.rigl.sparse.dense_gradient_needed(trainer.global_step)))


@pytest.mark.parametrize(("method", "expected"), [("rigl", {2, 5}), ("snfs", set(range(8))), ("set", set())])
def test_the_dense_gradient_is_known_to_be_needed_before_every_micro_batch_of_its_step(method, expected):
    rigl = RigLCallback(0.8, method=method, delta_t=3, t_end=100)
    log = DenseGradientLog(rigl)
    make_trainer([rigl, log], max_steps=8, accumulate_grad_batches=2).fit(MLP(), make_loader())
    assert len(log.needed) == 16  # two micro-batches a step
    assert {step for step, needed in log.needed if needed} == expected  # steps 2 and 5 bring the count to 3, 6
    assert all(needed == (step in expected) for step, needed in log.needed)


def test_a_deferred_update_keeps_the_dense_gradient_needed_until_it_is_made():
    layer = nn.Linear(6, 3)
    sparse = SparseTraining.from_model(layer, 0.5, schedule=UpdateSchedule(delta_t=2, t_end=100))
    assert [sparse.dense_gradient_needed(step) for step in range(4)] == [False, True, False, True]
    layer.weight.grad = torch.full_like(layer.weight, float("nan"))
    sparse.before_step(1)  # step 2 is due; its gradients are not finite
    sparse.after_step([])
    assert sparse.updates == 0 and sparse.dense_gradient_needed(2)  # not an update step, but one is waiting
    layer.weight.grad = torch.randn(3, 6)
    sparse.before_step(2)
    sparse.after_step([])
    assert sparse.updates == 1 and not sparse.dense_gradient_needed(4)


class MaskUnion(Callback):
    """Listed after RigLCallback: the union of every mask it has seen (at fit start and after each batch)."""

    def __init__(self, rigl):
        self.rigl, self.union = rigl, None

    def _see(self):
        masks = self.rigl.masks
        self.union = masks if self.union is None else {n: self.union[n] | masks[n] for n in masks}

    def on_train_start(self, trainer, pl_module):
        self._see()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._see()


def test_itop_rate_is_the_fraction_of_weights_in_the_union_of_all_masks_seen():
    rigl = RigLCallback(0.9, delta_t=2, t_end=100, alpha=0.5)
    union = MaskUnion(rigl)
    make_trainer([rigl, union], max_steps=16).fit(MLP(), make_loader())
    ever = sum(int(mask.sum()) for mask in union.union.values())
    total = sum(mask.numel() for mask in union.union.values())
    assert rigl.sparse.updates == 8 and ever > sum(int(m.sum()) for m in rigl.masks.values())
    assert rigl.sparse.itop_rate == ever / total


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
