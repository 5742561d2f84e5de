"""save_sparse and load_sparse errors that name what is wrong: a mask's shape, a file that cannot be read."""

import pytest
import torch

from lightning_rigl import RigLCallback, load_sparse, save_sparse
from tests.helpers import MLP, make_loader, make_trainer


def test_a_mask_of_the_wrong_shape_is_refused_naming_the_tensor_and_both_shapes(tmp_path):
    model = MLP()
    masks = {"net.0.weight": torch.rand(32, 16) > 0.5, "net.2.weight": torch.rand(16, 32) > 0.5}
    with pytest.raises(ValueError, match=r"`masks\['net.2.weight'\]` has shape \(16, 32\), .* has shape \(32, 32\)"):
        save_sparse(model, tmp_path / "sparse.pt", masks=masks)
    assert not (tmp_path / "sparse.pt").exists()


def test_masks_of_another_model_are_refused_before_anything_is_written(tmp_path):
    rigl = RigLCallback(0.8)
    make_trainer([rigl], max_steps=2).fit(MLP(hidden=24), make_loader())
    with pytest.raises(ValueError, match=r"`masks\['net.0.weight'\]` has shape \(24, 16\).*\(32, 16\)"):
        save_sparse(MLP(), tmp_path / "sparse.pt", masks=rigl.masks)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.0], ids=["half", "last-bytes-cut", "empty"])
def test_a_truncated_file_raises_naming_the_file(tmp_path, keep):
    path = tmp_path / "sparse.pt"
    save_sparse(MLP(), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(keep * len(data))])
    with pytest.raises(ValueError, match=rf"{path.name}' cannot be read as a lightning-rigl-sparse file"):
        load_sparse(path)


def test_a_file_of_garbage_raises_naming_the_file(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(torch.randn(1000).numpy().tobytes())
    with pytest.raises(ValueError, match="garbage.pt' cannot be read as a lightning-rigl-sparse file"):
        load_sparse(path, MLP())
