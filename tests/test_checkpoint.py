"""Masks survive checkpoints: bit-exact resume (after an interrupt too), and clear behaviour for foreign
checkpoints."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_rigl import RigLCallback
from lightning_rigl.core import num_active
from tests.helpers import (
    MLP,
    InvariantChecker,
    SaveFinal,
    assert_invariants,
    assert_same_run,
    digest,
    make_loader,
    make_trainer,
)

STEPS_PER_EPOCH = 4  # 64 samples, batches of 16


def _run(tmp_path, method, optimizer, epochs, accumulate=1, ckpt_path=None, strategy="auto", devices=1):
    """Fit to `epochs` with a last-checkpoint saver; return the callback and the model."""
    pl.seed_everything(0, verbose=False)
    rigl = RigLCallback(0.8, method=method, delta_t=3, t_end=100, alpha=0.5, seed=1)
    saver = SaveFinal(rigl, tmp_path)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    model = MLP(optimizer=optimizer)
    trainer = make_trainer(
        [rigl, saver, checkpoint],
        max_steps=-1,
        max_epochs=epochs,
        accumulate_grad_batches=accumulate,
        enable_checkpointing=True,
        strategy=strategy,
        devices=devices,
    )
    trainer.fit(model, make_loader(64, 16), ckpt_path=ckpt_path)
    return rigl, model


@pytest.mark.parametrize(
    ("method", "optimizer", "accumulate", "first_epochs"),
    [
        ("rigl", "sgd", 1, 2),  # resume after step 8: not an update step
        ("rigl", "adam", 1, 2),
        ("set", "sgd", 1, 2),
        ("set", "adam", 1, 2),
        ("rigl", "adam", 2, 4),  # 2 steps an epoch: resume after step 8
        ("set", "sgd", 2, 4),
        ("rigl", "sgd", 1, 3),  # resume after step 12: an update step
    ],
)
def test_resume_is_bit_exact(tmp_path, method, optimizer, accumulate, first_epochs):
    epochs = 5 * accumulate
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir(), resumed.mkdir()
    _run(straight, method, optimizer, epochs, accumulate)
    _run(resumed, method, optimizer, first_epochs, accumulate)
    _run(resumed, method, optimizer, epochs, accumulate, ckpt_path=resumed / "last.ckpt")
    assert_same_run(straight, resumed)


def ddp_straight_and_resumed(straight: Path, resumed: Path) -> None:
    """Run on each of 2 ranks: the straight DDP fit, then the interrupted one and its resumption."""
    ddp = dict(strategy="ddp", devices=2)
    # 2 ranks: 2 steps an epoch; resume after step 4 (updates follow steps 3, 6, 9).
    _run(straight, "rigl", "adam", 5, **ddp)
    _run(resumed, "rigl", "adam", 2, **ddp)
    _run(resumed, "rigl", "adam", 5, ckpt_path=resumed / "last.ckpt", **ddp)


def test_resume_is_bit_exact_under_ddp(tmp_path, two_ranks):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir(), resumed.mkdir()
    two_ranks(ddp_straight_and_resumed, straight, resumed)
    assert_same_run(straight, resumed, ranks=2)


def test_callback_state_is_compact_and_loads_weights_only(tmp_path):
    rigl, model = _run(tmp_path, "rigl", "sgd", 1)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    state = checkpoint["callbacks"][rigl.state_key]
    for name, packed in state["masks"].items():
        numel = dict(model.named_parameters())[name].numel()
        assert packed.dtype == torch.uint8 and packed.numel() == -(-numel // 8)  # 1 bit a weight


def test_dense_checkpoint_starts_fresh_masks_with_one_warning(tmp_path):
    dense = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    make_trainer([dense], max_steps=4, enable_checkpointing=True).fit(MLP(), make_loader(64, 16))
    rigl = RigLCallback(0.8, delta_t=3)
    with pytest.warns(UserWarning, match="holds no RigLCallback state") as record:
        make_trainer([rigl], max_steps=8).fit(MLP(), make_loader(64, 16), ckpt_path=tmp_path / "last.ckpt")
    assert len([w for w in record if "RigLCallback" in str(w.message)]) == 1
    for name, mask in rigl.masks.items():
        assert int(mask.sum()) == num_active(mask.numel(), rigl.sparse.sparsities[name])


def test_rigl_state_for_other_parameters_raises_naming_them(tmp_path):
    _run(tmp_path, "rigl", "sgd", 1)
    rigl = RigLCallback(0.8, exclude=["net.5.weight"])
    with pytest.raises(MisconfigurationException, match=r"not in the model \['net.5.weight'\]"):
        make_trainer([rigl], max_steps=8).fit(MLP(), make_loader(64, 16), ckpt_path=tmp_path / "last.ckpt")


def test_weights_only_checkpoint(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="weights", save_weights_only=True)
    rigl = RigLCallback(0.8, delta_t=3, t_end=100)
    model = MLP()
    make_trainer([rigl, checkpoint], max_steps=4, enable_checkpointing=True).fit(model, make_loader(64, 16))
    # It holds no callback or optimizer state: Lightning itself refuses to resume from it ...
    with pytest.raises(KeyError, match="save_weights_only"):
        make_trainer([RigLCallback(0.8)], max_steps=8).fit(
            MLP(), make_loader(64, 16), ckpt_path=tmp_path / "weights.ckpt"
        )
    # ... and it loads as a plain model, zeros included; a new fit from it draws fresh masks.
    loaded = MLP.load_from_checkpoint(tmp_path / "weights.ckpt")
    for name, mask in rigl.masks.items():
        assert torch.equal(loaded.state_dict()[name], model.state_dict()[name])
        assert loaded.state_dict()[name][~mask].eq(0).all()
    fresh = RigLCallback(0.8, seed=123)
    make_trainer([fresh], max_steps=2).fit(loaded, make_loader(64, 16))
    assert any(not torch.equal(fresh.masks[n], rigl.masks[n]) for n in rigl.masks)


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


def test_a_checkpoint_of_state_version_1_resumes_exactly(two_threads):
    # Written by the first release (RigL state version 1): SNFS at step 10, two updates made, with the
    # moving average of gradients and the update history in its old layout. The digests are those of
    # the same resumed run under that release.
    path = Path(__file__).parent / "data" / "state_v1_snfs.ckpt"
    assert torch.load(path, weights_only=True)["callbacks"]["RigLCallback"]["version"] == 1
    rigl = RigLCallback(0.8, method="snfs", delta_t=4, t_end=100, alpha=0.5, seed=5)
    model = MLP(hidden=16)
    make_trainer([rigl], max_steps=20).fit(model, make_loader(128, 16), ckpt_path=path)
    assert rigl.sparse.updates == 5
    assert (digest(model.state_dict()), digest(rigl.masks)) == ("2cb29b824a788e93", "f82680d69486a9df")


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
