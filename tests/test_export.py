"""Compact sparse export: exact round trip, smaller files, the weights of the checkpoint last tested."""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_rigl import RigLCallback, SparseTraining, load_sparse, save_sparse
from tests.helpers import MLP, WithValidation, make_loader, make_trainer


def test_round_trip_of_a_trained_rigl_model_gives_identical_outputs(tmp_path):
    rigl = RigLCallback(0.9, delta_t=3)
    model = MLP()
    make_trainer([rigl], max_steps=12).fit(model, make_loader())
    save_sparse(model, tmp_path / "sparse.pt", masks=rigl.masks)
    restored = load_sparse(tmp_path / "sparse.pt", MLP())
    x = torch.randn(32, 16)
    model.eval(), restored.eval()
    assert torch.equal(model(x), restored(x))
    assert list(restored.state_dict()) == list(model.state_dict())
    for name, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name


def test_buffers_and_integer_tensors_are_kept(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    model(torch.randn(4, 8))  # moves running stats and num_batches_tracked
    state = model.state_dict()
    save_sparse(model, tmp_path / "bn.pt")
    loaded = load_sparse(tmp_path / "bn.pt")
    for name, value in state.items():
        assert torch.equal(loaded[name], value) and loaded[name].dtype == value.dtype, name


@pytest.mark.parametrize("sparsity", [0.8, 0.9, 0.95])
def test_file_is_about_one_minus_s_plus_one_32nd_of_dense(tmp_path, sparsity):
    model = nn.Sequential(nn.Linear(512, 512, bias=False), nn.Linear(512, 512, bias=False))
    SparseTraining.from_model(model, sparsity, "uniform", dense_first_layer=False)
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    save_sparse(model, tmp_path / "sparse.pt")
    ratio = (tmp_path / "sparse.pt").stat().st_size / (tmp_path / "dense.pt").stat().st_size
    assert ratio < (1 - sparsity) + 1 / 32 + 0.01, ratio


def test_active_zero_weights_keep_their_place_when_masks_are_given(tmp_path):
    layer = nn.Linear(64, 64, bias=False)
    mask = torch.rand(64, 64) > 0.9
    with torch.no_grad():
        layer.weight.mul_(mask)
        layer.weight[mask.nonzero()[0][0], mask.nonzero()[0][1]] = 0.0  # an active weight at 0
    save_sparse(layer, tmp_path / "a.pt", masks={"weight": mask})
    saved = torch.load(tmp_path / "a.pt", weights_only=True)["tensors"]["weight"]
    assert saved["values"].numel() == int(mask.sum())
    assert torch.equal(load_sparse(tmp_path / "a.pt")["weight"], layer.weight)


def test_loading_a_foreign_file_raises(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a lightning-rigl-sparse file"):
        load_sparse(tmp_path / "plain.pt")


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
