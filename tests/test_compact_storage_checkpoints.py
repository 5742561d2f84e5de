"""Checkpoints of RigLCallback(storage="compact"): compact on disk, bit-exact resume, dense ones resumed, conversion."""

import torch

from lightning_rigl import load_sparse, save_sparse, sparsify, to_dense_checkpoint
from lightning_rigl.core.storage import is_compact
from tests.helpers import F64Net, compact_rigl, f64_loader, make_trainer

LINEARS = ("net.0", "net.2", "net.4")


def fit(storage, epochs, optimizer="adam", save=None, ckpt_path=None):
    """4 steps an epoch, updates after steps 2, 4, 6 and 8; `save`: a checkpoint at the end."""
    torch.manual_seed(0)
    model, rigl = F64Net(optimizer), compact_rigl(storage)
    trainer = make_trainer([rigl], max_steps=-1, max_epochs=epochs)
    trainer.fit(model, f64_loader(64), ckpt_path=ckpt_path)
    if save is not None:
        trainer.save_checkpoint(save)
    return model, rigl


def weights(model):
    return {name: model.get_submodule(name).weight.detach() for name in LINEARS}


def test_a_compact_checkpoint_is_compact_and_resumes_bit_exactly(tmp_path):
    straight, straight_rigl = fit("compact", 3)
    first, first_rigl = fit("compact", 1, save=tmp_path / "first.ckpt")
    checkpoint = torch.load(tmp_path / "first.ckpt", weights_only=True)
    state = checkpoint["state_dict"]
    for name in LINEARS:  # the active values only: in proportion to density
        assert f"{name}.weight" not in state
        assert state[f"{name}.weight_values"].numel() == first_rigl.sparse.counts[f"{name}.weight"]
    assert sum(t.numel() for t in state.values() if torch.is_tensor(t)) < 0.4 * sum(
        p.numel() for p in F64Net().parameters()
    )
    assert "net.0.weight" not in checkpoint["callbacks"][first_rigl.state_key]["masks"]  # no mask on disk
    for name in LINEARS:  # the ever-active record: positions, or bits where they are smaller
        ever = checkpoint["callbacks"][first_rigl.state_key]["compact"][f"{name}.weight"]["ever_active"]
        numel = F64Net().get_submodule(name).weight.numel()
        assert ever.numel() * ever.element_size() <= -(-numel // 8)
    resumed, rigl = fit("compact", 3, ckpt_path=tmp_path / "first.ckpt")
    assert rigl.sparse.history == straight_rigl.sparse.history and rigl.sparse.updates == 4
    assert rigl.sparse.itop_rate == straight_rigl.sparse.itop_rate > 0.2  # connections moved, record kept
    for name, weight in weights(straight).items():
        assert torch.equal(weights(resumed)[name], weight), name
        assert torch.equal(rigl.masks[f"{name}.weight"], straight_rigl.masks[f"{name}.weight"])
    adam = resumed.trainer.optimizers[0].state[resumed.net[0].weight_values]
    assert adam["exp_avg"].shape == resumed.net[0].weight_values.shape


def test_a_dense_runs_checkpoint_resumes_into_compact_storage_as_the_dense_run_goes_on(tmp_path):
    dense, dense_rigl = fit("dense", 3)
    fit("dense", 1, save=tmp_path / "first.ckpt")
    compact, rigl = fit("compact", 3, ckpt_path=tmp_path / "first.ckpt")
    assert all(is_compact(compact.get_submodule(name)) for name in LINEARS)
    assert rigl.sparse.history == dense_rigl.sparse.history
    for name, weight in weights(dense).items():
        torch.testing.assert_close(weights(compact)[name], weight, rtol=1e-10, atol=1e-12)
        assert torch.equal(rigl.masks[f"{name}.weight"], dense_rigl.masks[f"{name}.weight"])


def test_the_converted_checkpoint_loads_into_the_plain_model(tmp_path):
    compact, rigl = fit("compact", 2, save=tmp_path / "compact.ckpt")
    to_dense_checkpoint(tmp_path / "compact.ckpt", tmp_path / "dense.ckpt")
    plain = F64Net.load_from_checkpoint(tmp_path / "dense.ckpt", weights_only=True)
    assert not any(is_compact(module) for module in plain.modules())
    for name, weight in weights(compact).items():
        assert torch.equal(plain.get_submodule(name).weight, weight)
    # RigLCallback's state is a dense run's: a test run from it sees the same masks.
    tester = compact_rigl("dense")
    make_trainer([tester]).test(F64Net(), f64_loader(), ckpt_path=tmp_path / "dense.ckpt")
    for name, mask in rigl.masks.items():
        assert torch.equal(tester.masks[name], mask), name


def test_save_sparse_of_a_compact_model_loads_into_the_plain_model_and_sparsify_keeps_its_outputs(tmp_path):
    compact, rigl = fit("compact", 2)
    save_sparse(compact, tmp_path / "model.pt", masks=rigl.masks)
    plain = load_sparse(tmp_path / "model.pt", F64Net())
    for name, weight in weights(compact).items():
        assert torch.equal(plain.get_submodule(name).weight, weight)
    x = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(sparsify(compact.eval())(x), plain.eval()(x), rtol=1e-10, atol=1e-12)
