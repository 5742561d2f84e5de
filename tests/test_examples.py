"""The examples run end to end on short settings: digits.py, the LightningCLI digits configs, the CIFAR-10
WRN-22-2 recipe and the Transformer example."""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import pickle
import sys
from pathlib import Path

import pytest
import torch

from lightning_rigl import RigLCallback, SparsityMonitor

EXAMPLES = Path(__file__).parent.parent / "examples"
CONFIGS = EXAMPLES / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture
def examples(monkeypatch):
    """Import examples as modules (digits_cli imports its sibling digits.py); no pytest argv for LightningCLI."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(sys, "argv", ["example"])


def rigl_of(trainer) -> RigLCallback | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, RigLCallback)), None)


def assert_masked_weights_are_zero(model, rigl: RigLCallback) -> None:
    params = dict(model.named_parameters())
    for name, mask in rigl.masks.items():
        assert torch.all(params[name][~mask] == 0), name


def global_sparsity(rigl: RigLCallback) -> float:
    return 1 - sum(int(m.sum()) for m in rigl.masks.values()) / sum(m.numel() for m in rigl.masks.values())


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_example_trains_a_90_percent_sparse_network(capsys):
    result = load("digits").main(["--epochs", "8", "--delta-t", "10"])
    out = capsys.readouterr().out
    assert "test accuracy" in out and "net.2.weight" in out and "topology updates" in out
    assert abs(result["sparsity"] - 0.9) < 0.001
    assert result["accuracy"] > 0.8


# config: (method, distribution, topology updates in one 23-step epoch with delta_t=5 and t_end=0.75)
DIGITS_CONFIGS = {
    "digits_dense": None,
    "digits_static": ("static", "erk", 0),
    "digits_set": ("set", "erk", 3),
    "digits_rigl_erk": ("rigl", "erk", 3),
    "digits_rigl_uniform": ("rigl", "uniform", 3),
}


def test_every_digits_config_is_tested():
    assert {path.stem for path in CONFIGS.glob("digits_*.yaml")} == set(DIGITS_CONFIGS)


@pytest.mark.parametrize("config", list(DIGITS_CONFIGS))
def test_digits_cli_config_trains_one_epoch(config, examples, tmp_path, capsys):
    from digits_cli import main

    expected = DIGITS_CONFIGS[config]
    shorter = ["--trainer.callbacks.delta_t=5"] if expected else []  # the last callback is RigL's
    cli = main(
        ["fit", "--config", str(CONFIGS / f"{config}.yaml"), "--trainer.max_epochs=1", *shorter]
        + [f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", *QUIET]
    )
    assert "test accuracy" in capsys.readouterr().out
    assert cli.trainer.global_step == 23
    assert any(isinstance(cb, SparsityMonitor) for cb in cli.trainer.callbacks)
    rigl = rigl_of(cli.trainer)
    if expected is None:
        assert rigl is None
        return
    method, distribution, updates = expected
    assert (rigl.method, rigl.distribution, rigl.sparsity) == (method, distribution, 0.9)
    assert rigl.sparse.updates == updates
    assert_masked_weights_are_zero(cli.model, rigl)
    if distribution == "uniform":  # the first layer stays dense and the others hold exactly 90 % zeros
        assert rigl.masks.get("net.0.weight", torch.ones(1, dtype=torch.bool)).all()
        others = [mask for name, mask in rigl.masks.items() if name != "net.0.weight"]
        assert all(1 - mask.float().mean().item() == pytest.approx(0.9, abs=0.01) for mask in others)
    else:
        assert global_sparsity(rigl) == pytest.approx(0.9, abs=0.001)


def test_cifar10_recipe_has_the_papers_hyper_parameters(examples):
    from cifar10_wrn import main

    cli = main(["--config", str(CONFIGS / "cifar10_wrn22_2_rigl.yaml")], run=False)
    assert cli.datamodule.batch_size == 128
    assert cli.trainer.max_steps == 97_656
    assert (cli.model.hparams.depth, cli.model.hparams.width) == (22, 2)
    optimizers = cli.model.configure_optimizers()
    sgd, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]
    assert type(sgd) is torch.optim.SGD
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.1, 0.9, True, 5e-4)
    assert scheduler["interval"] == "step"  # milestones count optimizer steps
    assert isinstance(scheduler["scheduler"], torch.optim.lr_scheduler.MultiStepLR)
    assert sorted(scheduler["scheduler"].milestones) == [30_000, 60_000, 90_000]
    assert scheduler["scheduler"].gamma == 0.2  # divided by 5
    rigl = rigl_of(cli.trainer)
    recipe = {"sparsity": 0.9, "distribution": "erk", "method": "rigl", "delta_t": 100, "t_end": 75_000}
    recipe |= {"alpha": 0.3, "decay": "cosine"}
    assert {key: getattr(rigl, key) for key in recipe} == recipe
    assert isinstance(rigl.t_end, int)


def test_cifar10_recipe_smoke_run_on_random_tensors_of_cifar_shape(examples, tmp_path):
    from cifar10_wrn import main

    cli = main(
        ["fit", "--config", str(CONFIGS / "cifar10_wrn22_2_rigl.yaml"), "--trainer.accelerator=cpu"]
        + ["--data.fake=true", "--data.fake_size=8", "--data.batch_size=4", "--data.num_workers=0"]
        + ["--trainer.max_steps=4", "--trainer.callbacks.delta_t=2", "--trainer.callbacks.t_end=4"]
        + ["--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0", *QUIET]
        + [f"--trainer.default_root_dir={tmp_path}"]
    )
    rigl = rigl_of(cli.trainer)
    assert cli.trainer.global_step == 4
    assert rigl.sparse.updates == 1  # after step 2; t_end=4
    assert global_sparsity(rigl) == pytest.approx(0.9, abs=0.001)
    assert len(rigl.masks) == 23  # every conv (first, 18 in blocks, 3 shortcuts) and the classifier
    assert_masked_weights_are_zero(cli.model, rigl)
    assert torch.isfinite(cli.trainer.callback_metrics["train_loss"])


def write_cifar_batches(folder: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """The official python format: six pickled dicts of uint8 rows (1024 red, 1024 green, 1024 blue) and labels."""
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, rows, targets in zip(names, images.flatten(1).chunk(6), labels.chunk(6), strict=True):
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rows.numpy(), b"labels": targets.tolist()}, f)


def test_cifar10_reads_the_python_batches_from_disk(examples, tmp_path):
    from cifar10_wrn import load_cifar10

    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (12,))
    write_cifar_batches(tmp_path / "cifar-10-batches-py", images, labels)
    train_images, train_labels = load_cifar10(tmp_path, train=True)
    test_images, test_labels = load_cifar10(tmp_path, train=False)
    assert train_images.dtype == torch.uint8 and train_labels.dtype == torch.long
    assert torch.equal(train_images, images[:10]) and torch.equal(train_labels, labels[:10])
    assert torch.equal(test_images, images[10:]) and torch.equal(test_labels, labels[10:])


def test_cifar10_never_downloads_and_says_where_the_data_goes(examples, tmp_path):
    from cifar10_wrn import CIFAR10DataModule

    with pytest.raises(FileNotFoundError, match="never downloads") as error:
        CIFAR10DataModule(data_dir=str(tmp_path)).setup("fit")
    assert "cifar-10-batches-py" in str(error.value) and "--data.fake=true" in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_random_crop_flip_gives_a_window_of_the_zero_padded_image(examples):
    from cifar10_wrn import random_crop_flip

    images = torch.arange(1, 1 + 16 * 3 * 8 * 8, dtype=torch.float32).view(16, 3, 8, 8)
    out = random_crop_flip(images, padding=2)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    windows = [(dy, dx, flip) for dy in range(5) for dx in range(5) for flip in (False, True)]
    for image, crop in zip(padded, out, strict=True):
        assert sum(torch.equal(_window(image, *window), crop) for window in windows) == 1
    assert not torch.equal(out, images)  # 16 images: some offset or flip happened


def _window(image: torch.Tensor, dy: int, dx: int, flip: bool) -> torch.Tensor:
    crop = image[:, dy : dy + 8, dx : dx + 8]
    return crop.flip(-1) if flip else crop


def test_transformer_example_masks_attention_and_mlp_and_the_loss_goes_down(examples, capsys):
    from transformer import main

    result = main(["--steps", "30", "--delta-t", "5"])
    assert "held-out loss" in capsys.readouterr().out
    rigl, masked = result["callback"], result["masked"]
    attention_and_mlp = ["*attn.in_proj_weight", "*attn.out_proj.weight", "*.linear1.weight", "*.linear2.weight"]
    assert all(any(fnmatch.fnmatch(name, pattern) for pattern in attention_and_mlp) for name in masked)
    assert len(masked) == 2 * 4 + 2 * 6  # 2 encoder layers of 4 such weights, 2 decoder layers of 6
    assert not [name for name in masked if "embedding" in name or "norm" in name or name == "model.decoder.weight"]
    assert global_sparsity(rigl) == pytest.approx(0.9, abs=0.001)
    assert rigl.sparse.updates >= 4
    assert result["loss_after"] < 0.5 * result["loss_before"]


@pytest.mark.parametrize("config", sorted(path.name for path in CONFIGS.glob("*.yaml")))
def test_example_config_print_config_round_trips(config, examples, tmp_path, capsys):
    script = "cifar10_wrn" if config.startswith("cifar10") else "digits_cli"
    main = importlib.import_module(script).main

    def print_config(path: Path) -> str:
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(path), "--print_config"])
        return capsys.readouterr().out

    printed = print_config(CONFIGS / config)
    assert "class_path: lightning_rigl.SparsityMonitor" in printed
    (tmp_path / config).write_text(printed)
    assert print_config(tmp_path / config) == printed
