"""Runs users bring: resumed with other arguments, weight averaging, testing the best checkpoint, ddp_spawn,
manual optimization with a fractional t_end. Each is the run that was asked for, or a clear error."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint, StochasticWeightAveraging
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_rigl import RigLCallback, load_sparse, save_sparse
from tests.helpers import MLP, make_loader, make_trainer


def _checkpoint(tmp_path, **rigl_kwargs):
    rigl = RigLCallback(**{"sparsity": 0.8, "delta_t": 2, "t_end": 100, **rigl_kwargs})
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    make_trainer([rigl, saver], max_steps=4, enable_checkpointing=True).fit(MLP(), make_loader(64, 16))
    return tmp_path / "last.ckpt"


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"sparsity": 0.9}, ["sparsity of net.0.weight: saved", "given"]),
        ({"method": "snfs"}, ["method: saved 'rigl', given 'snfs'"]),
        ({"distribution": "uniform"}, ["sparsity of net.0.weight: saved", "sparsity of net.2.weight"]),
        ({"dense_first_layer": True}, ["sparsity of net.0.weight: saved", "given 0"]),
        ({"custom_sparsity": {"net.5.weight": 0.5}}, ["sparsity of net.5.weight: saved", "given 0.5"]),
        ({"erk_power_scale": 0.5}, ["sparsity of net.0.weight: saved"]),
    ],
    ids=["sparsity", "method", "distribution", "dense_first_layer", "custom_sparsity", "erk_power_scale"],
)
def test_resuming_with_arguments_that_change_what_is_trained_is_refused_naming_each_difference(tmp_path, given, named):
    path = _checkpoint(tmp_path)
    rigl = RigLCallback(**{"sparsity": 0.8, "delta_t": 2, "t_end": 100, **given})
    with pytest.raises(MisconfigurationException) as error:
        make_trainer([rigl], max_steps=8).fit(MLP(), make_loader(64, 16), ckpt_path=path)
    for words in named:
        assert words in str(error.value), (words, str(error.value))
    assert "checkpoint's RigL run differs" in str(error.value)


def test_resuming_with_arguments_that_only_change_how_it_runs_goes_on(tmp_path):
    path = _checkpoint(tmp_path)
    rigl = RigLCallback(0.8, delta_t=2, t_end=100, consistency_checks=0, seed=123)
    make_trainer([rigl], max_steps=8).fit(MLP(), make_loader(64, 16), ckpt_path=path)
    assert rigl.sparse.updates == 4


class WithValidation(MLP):
    """Logs a score that is best at the first epoch; checks at every validation batch that the weights in
    use (swapped in by an averaging callback, if any) are 0 where the masks say."""

    rigl: RigLCallback
    validated = 0

    def validation_step(self, batch, batch_idx):
        params = dict(self.named_parameters())
        for name, mask in self.rigl.masks.items():
            assert params[name][~mask].eq(0).all(), name
        self.validated += 1
        self.log("score", -float(self.current_epoch))
        return super().training_step(batch, batch_idx)


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


def test_exporting_after_testing_the_best_checkpoint_keeps_that_checkpoints_weights(tmp_path):
    rigl = RigLCallback(0.8, delta_t=2, t_end=100, alpha=0.5)
    model = WithValidation()
    model.rigl = rigl
    best = ModelCheckpoint(dirpath=tmp_path, monitor="score", mode="max", save_top_k=1, filename="best")
    trainer = make_trainer([rigl, best], max_steps=-1, max_epochs=3, enable_checkpointing=True)
    trainer.fit(model, make_loader(64, 16), make_loader(32, 16, seed=1))
    assert best.best_model_path.endswith("best.ckpt")  # the first epoch's: masks changed after it

    model.test_step = model.validation_step
    trainer.test(model, make_loader(32, 16, seed=1), ckpt_path="best")
    tested = torch.load(tmp_path / "best.ckpt", weights_only=True)
    assert rigl.sparse.updates == len(tested["callbacks"]["RigLCallback"]["history"]) == 2

    save_sparse(model, tmp_path / "model.pt", masks=rigl.masks)  # README's recipe
    exported = load_sparse(tmp_path / "model.pt")
    for name, value in tested["state_dict"].items():
        assert torch.equal(exported[name], value), name


class SaveRankZeroMasks(Callback):
    def __init__(self, rigl, path):
        self.rigl, self.path = rigl, path

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            torch.save(self.rigl.masks, self.path)


def test_after_a_ddp_spawn_fit_the_main_process_holds_the_trained_masks(tmp_path):
    rigl = RigLCallback(0.8, delta_t=3, t_end=100, alpha=0.5)
    model = MLP()
    make_trainer([rigl], max_steps=2).fit(MLP(), make_loader())  # a local fit first: a run in this process
    local = rigl.sparse
    make_trainer(
        [rigl, SaveRankZeroMasks(rigl, tmp_path / "rank0.pt")], max_steps=6, strategy="ddp_spawn", devices=2
    ).fit(model, make_loader())
    trained = torch.load(tmp_path / "rank0.pt")
    assert list(rigl.masks) == list(trained)
    for _ in range(2):  # reading the masks twice gives the same masks, and drops nothing
        for name, mask in trained.items():
            assert torch.equal(rigl.masks[name], mask), name
        assert rigl.sparse is local
    # The last step was an update: connections grown at 0 are in the masks, not in the nonzero pattern.
    params = dict(model.named_parameters())
    assert any(not torch.equal(mask, params[name] != 0) for name, mask in rigl.masks.items())
    assert all(params[name][~mask].eq(0).all() for name, mask in rigl.masks.items())


class TwoStepsPerBatch(MLP):
    def __init__(self, optimizers=1):
        super().__init__()
        self.automatic_optimization = False
        self.n_optimizers = optimizers

    def configure_optimizers(self):
        if self.n_optimizers == 1:
            return torch.optim.SGD(self.parameters(), lr=0.05)
        first = list(self.net[0].parameters())
        rest = [p for p in self.parameters() if all(p is not q for q in first)]
        return torch.optim.SGD(first, lr=0.05), torch.optim.SGD(rest, lr=0.05)

    def training_step(self, batch, batch_idx):
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers, optimizers]
        for optimizer in optimizers:
            loss = super().training_step(batch, batch_idx)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()


@pytest.mark.parametrize("optimizers", [1, 2])
def test_a_fractional_t_end_with_several_manual_steps_a_batch_is_refused(optimizers):
    rigl = RigLCallback(0.8, delta_t=50, t_end=0.75)
    model = TwoStepsPerBatch(optimizers)
    with pytest.raises(
        MisconfigurationException, match=r"`t_end=0.75` is a fraction of the run.*Pass `t_end` as an int"
    ):
        make_trainer([rigl], max_steps=-1, max_epochs=2).fit(model, make_loader())
    assert model.trainer.global_step <= 2  # refused before any update, at fit start or after the first batch


def test_an_int_t_end_with_several_manual_steps_a_batch_counts_optimizer_steps():
    rigl = RigLCallback(0.8, delta_t=4, t_end=24)
    make_trainer([rigl], max_steps=-1, max_epochs=2).fit(TwoStepsPerBatch(), make_loader())
    assert [record.step for record in rigl.sparse.history] == [4, 8, 12, 16, 20]
