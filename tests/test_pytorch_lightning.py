"""Under the standalone `pytorch_lightning` package: its Trainer, strategies, loggers, errors and LightningCLI."""

from __future__ import annotations

import sys

import pytest
import torch
import yaml

pl = pytest.importorskip("pytorch_lightning")
from pytorch_lightning.callbacks import Callback, ModelCheckpoint  # noqa: E402
from pytorch_lightning.cli import LightningCLI  # noqa: E402
from pytorch_lightning.loggers import Logger  # noqa: E402
from pytorch_lightning.strategies import (  # noqa: E402
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from pytorch_lightning.utilities.exceptions import MisconfigurationException  # noqa: E402

import lightning_rigl  # noqa: E402
from lightning_rigl.adapters.strategies import check_strategy  # noqa: E402
from lightning_rigl.core import num_active  # noqa: E402
from lightning_rigl.pytorch_lightning import RigLCallback, SparsityMonitor  # noqa: E402
from tests.helpers import (  # noqa: E402
    CLI_TRAINER_ARGS,
    QUIET_TRAINER,  # noqa: E402
    DestroyProcessGroup,
    command_line,
    run_at_once,
)
from tests.helpers import RecordingLogger as LightningRecordingLogger  # noqa: E402
from tests.helpers_pytorch_lightning import MLP  # noqa: E402


class RecordingLogger(LightningRecordingLogger, Logger):
    """tests.helpers' recording logger, also a pytorch_lightning Logger (the Trainer checks the type)."""


def trainer(callbacks, **kwargs) -> pl.Trainer:
    return pl.Trainer(callbacks=callbacks, **{**QUIET_TRAINER, "max_steps": 8, **kwargs})


def assert_exact_and_zero(rigl, model):
    params = dict(model.named_parameters())
    for name, mask in rigl.masks.items():
        assert int(mask.sum()) == num_active(mask.numel(), rigl.sparse.sparsities[name]), name
        assert torch.all(params[name][~mask] == 0), name


def test_the_callbacks_are_both_packages_callbacks_with_one_implementation():
    assert issubclass(RigLCallback, pl.Callback) and issubclass(RigLCallback, lightning_rigl.RigLCallback)
    assert issubclass(SparsityMonitor, pl.Callback) and issubclass(SparsityMonitor, lightning_rigl.SparsityMonitor)
    assert not [name for name in {**vars(RigLCallback), **vars(SparsityMonitor)} if not name.startswith("__")]
    assert RigLCallback(0.5).state_key == lightning_rigl.RigLCallback(0.5).state_key == "RigLCallback"


@pytest.mark.parametrize("cls", [RigLCallback, lightning_rigl.RigLCallback], ids=["pytorch_lightning", "lightning"])
def test_single_device_fit_makes_updates_with_exact_counts(cls):
    rigl = cls(0.8, delta_t=2, t_end=7)
    model = MLP()
    trainer([rigl]).fit(model)
    assert rigl.sparse.updates == 3  # after steps 2, 4 and 6
    assert [record.step for record in rigl.sparse.history] == [2, 4, 6]
    assert_exact_and_zero(rigl, model)


class MasksAtTrainStart(Callback):
    def __init__(self, rigl):
        self.rigl, self.masks = rigl, None

    def on_train_start(self, trainer, pl_module):
        self.masks = {name: mask.clone() for name, mask in self.rigl.masks.items()}


def test_a_pytorch_lightning_checkpoint_restores_the_masks_and_the_update_count(tmp_path):
    first = RigLCallback(0.8, delta_t=2, t_end=100)
    saver = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=4, save_top_k=-1)
    trainer([first, saver], max_steps=4, enable_checkpointing=True).fit(MLP())

    resumed = RigLCallback(0.8, delta_t=2, t_end=100)
    seen = MasksAtTrainStart(resumed)
    model = MLP()
    trainer([resumed, seen], max_steps=8).fit(model, ckpt_path=tmp_path / "step=4.ckpt")

    assert first.sparse.updates == 2 and resumed.sparse.updates == 4  # 2 saved, 2 after the resume
    assert seen.masks.keys() == first.masks.keys()
    for name, mask in first.masks.items():
        assert torch.equal(seen.masks[name], mask), name
    assert_exact_and_zero(resumed, model)


def test_sparsity_monitor_logs_rigl_keys_and_finds_either_rigl_callback():
    logger = RecordingLogger()
    rigl = RigLCallback(0.8, delta_t=3, t_end=100)
    trainer([SparsityMonitor(plot=False), rigl], log_every_n_steps=4, logger=logger).fit(MLP())

    logged = {step: metrics for step, metrics in logger.steps.items() if "rigl/updates" in metrics}
    assert sorted(logged) == [2, 3, 5, 7]  # updates after steps 3 and 6, logging steps 4 and 8
    last = logged[7]
    active = {name: int(mask.sum()) for name, mask in rigl.masks.items()}
    assert last["rigl/updates"] == 2
    assert last["flops/sparse_forward"] == 2 * sum(active.values())  # an MLP: 2 FLOPs per active weight
    assert last["sparsity/net.2.weight"] == pytest.approx(1 - active["net.2.weight"] / 32 / 32)


def test_sparsity_monitor_sends_its_image_to_a_pytorch_lightning_tensorboard_logger(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    trainer([SparsityMonitor(), RigLCallback(0.8, delta_t=2)], max_steps=4, logger=logger).fit(MLP())
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert [image.step for image in events.Images("sparsity_monitor")] == [4]
    assert not list(tmp_path.rglob("*.png"))


class SaveRank(Callback):
    def __init__(self, rigl, directory):
        self.rigl, self.directory = rigl, directory

    def on_train_end(self, trainer, pl_module):
        weights = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
        sparse = self.rigl.sparse
        state = {"masks": self.rigl.masks, "updates": sparse.updates, "sparsities": sparse.sparsities}
        state["weights"] = weights
        torch.save(state, self.directory / f"rank{trainer.global_rank}.pt")


def test_two_process_ddp_spawn_fit_keeps_equal_exact_masks_on_both_ranks(tmp_path):
    rigl = RigLCallback(0.8, delta_t=2, t_end=100)
    callbacks = [rigl, SaveRank(rigl, tmp_path), DestroyProcessGroup()]
    trainer(callbacks, devices=2, strategy="ddp_spawn").fit(MLP())

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["updates"] == ranks[1]["updates"] == 4
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(ranks[1]["masks"][name], mask), name
        assert int(mask.sum()) == num_active(mask.numel(), ranks[0]["sparsities"][name]), name
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
        assert torch.all(ranks[0]["weights"][name][~mask] == 0), name


@pytest.mark.parametrize(
    ("strategy", "words"),
    [
        (FSDPStrategy(), ["FSDPStrategy", "FSDP1 flattens", "Supported"]),
        # DeepSpeed is not installed: an instance without __init__ is enough for the class check.
        (DeepSpeedStrategy.__new__(DeepSpeedStrategy), ["DeepSpeedStrategy", "DeepSpeed hides gradients"]),
        (ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2), ["tensor_parallel_size=2"]),
    ],
    ids=["fsdp1", "deepspeed", "tensor-parallel"],
)
def test_pytorch_lightning_strategies_rigl_cannot_keep_exact_are_refused_naming_them(strategy, words):
    with pytest.raises(MisconfigurationException) as error:
        check_strategy(strategy)
    for word in words:
        assert word in str(error.value)


def test_pytorch_lightning_supported_strategies_pass():
    check_strategy(SingleDeviceStrategy("cpu"))
    check_strategy(DDPStrategy())
    check_strategy(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"sparsity": 1.5}, r"`sparsity` must be in \[0, 1\), got 1.5"), ({"delta_t": -5}, "`delta_t`")],
)
def test_refused_arguments_raise_both_packages_misconfiguration_exception(kwargs, match):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException as Lightning

    with pytest.raises(MisconfigurationException, match=match) as error:
        RigLCallback(**kwargs)
    assert isinstance(error.value, Lightning)


# Programs for fresh interpreters: what one imports depends on everything imported before it.
FRESH = {
    "without-pytorch-lightning": (
        "import sys; sys.modules['pytorch_lightning'] = None; sys.modules['lightning_fabric'] = None\n"
        "import lightning.pytorch as L\n"
        "from lightning_rigl import RigLCallback\n"
        "from tests.helpers import MLP, make_loader\n"
        "rigl = RigLCallback(0.8, delta_t=2)\n"
        "L.Trainer(accelerator='cpu', max_steps=4, logger=False, enable_checkpointing=False,\n"
        "          enable_progress_bar=False, enable_model_summary=False, callbacks=[rigl]).fit(MLP(), make_loader())\n"
        "print(rigl.sparse.updates)\n"
    ),
    "lightning-fit": (
        "import sys\n"
        "import lightning.pytorch as L\n"
        "from lightning_rigl import RigLCallback, SparsityMonitor\n"
        "from tests.helpers import MLP, make_loader\n"
        "model = MLP(); model.example_input_array = __import__('torch').randn(2, 16)\n"
        "L.Trainer(accelerator='cpu', max_steps=2, logger=False, enable_checkpointing=False,\n"
        "          callbacks=[RigLCallback(0.8), SparsityMonitor(plot=False, table=False)]).fit(model, make_loader())\n"
        "print('pytorch_lightning' in sys.modules)\n"
    ),
}


@pytest.fixture(scope="module")
def fresh_runs():
    """The results of the FRESH programs, each in a fresh interpreter, side by side."""
    return run_at_once({name: ([sys.executable, "-c", code], None) for name, code in FRESH.items()}, timeout=120)


def test_lightning_rigl_imports_and_trains_without_pytorch_lightning_installed(fresh_runs):
    result = fresh_runs["without-pytorch-lightning"]
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "1"


def test_a_lightning_fit_does_not_import_pytorch_lightning(fresh_runs):
    result = fresh_runs["lightning-fit"]
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "False"


RIGL_ARGS = {"sparsity": 0.8, "method": "set", "delta_t": 2, "t_end": 5, "seed": 7}


@pytest.fixture
def no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cli"])  # LightningCLI warns when sys.argv also holds arguments


def _rigl_of(cli: LightningCLI) -> RigLCallback:
    (rigl,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, lightning_rigl.RigLCallback)]
    return rigl


def _assert_trained(cli: LightningCLI) -> None:
    rigl = _rigl_of(cli)
    assert type(rigl) is RigLCallback
    assert {key: getattr(rigl, key) for key in RIGL_ARGS} == RIGL_ARGS
    assert rigl.sparse.updates == 2  # after steps 2 and 4 (t_end=5)
    assert_exact_and_zero(rigl, cli.model)


def test_pytorch_lightning_cli_takes_the_callbacks_from_yaml(tmp_path, no_pytest_argv):
    callbacks = [
        {"class_path": "lightning_rigl.pytorch_lightning.SparsityMonitor", "init_args": {"plot": False}},
        {"class_path": "lightning_rigl.pytorch_lightning.RigLCallback", "init_args": RIGL_ARGS},
    ]
    trainer_args = {**CLI_TRAINER_ARGS, "default_root_dir": str(tmp_path), "callbacks": callbacks}
    config = {"seed_everything": 0, "trainer": trainer_args}
    path = tmp_path / "rigl.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(MLP, args=["fit", "--config", str(path)])
    _assert_trained(cli)
    assert type(cli.trainer.callbacks[0]) is SparsityMonitor


def test_pytorch_lightning_cli_takes_the_callback_from_the_command_line(tmp_path, no_pytest_argv):
    args = [*command_line(CLI_TRAINER_ARGS, "trainer"), f"--trainer.default_root_dir={tmp_path}"]
    args += ["--trainer.callbacks+=lightning_rigl.pytorch_lightning.RigLCallback", *command_line(RIGL_ARGS)]
    cli = LightningCLI(MLP, args=["fit", *args, "--seed_everything=0"])
    _assert_trained(cli)


def test_lightning_cli_short_names_still_resolve_with_these_classes_imported(no_pytest_argv):
    from lightning.pytorch.cli import LightningCLI as LightningsCLI

    from tests.helpers import MLP as LightningMLP

    cli = LightningsCLI(LightningMLP, args=["--trainer.callbacks+=RigLCallback"], run=False)
    assert type(cli.trainer.callbacks[0]) is lightning_rigl.RigLCallback
