"""RigLCallback and SparsityMonitor configured from a LightningCLI: YAML, command line, --print_config."""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_rigl import RigLCallback, SparsityMonitor
from tests.helpers import CLI_TRAINER_ARGS, MLP, command_line, make_loader, run_at_once

# Every RigLCallback argument, each away from its default. MLP's weights: net.0, net.2, net.3 (LayerNorm), net.5.
RIGL_ARGS = {
    "sparsity": 0.8,
    "distribution": "uniform",
    "method": "set",
    "delta_t": 2,
    "t_end": 5,
    "alpha": 0.4,
    "decay": "linear",
    "include": ["net.0.weight", "net.2.weight", "net.5.weight"],
    "exclude": ["net.5.*"],
    "dense_first_layer": False,
    "custom_sparsity": {"net.2.weight": 0.5},
    "erk_power_scale": 0.5,
    "seed": 7,
    "consistency_checks": 0,
    "kernels": "sparse",
    "storage": "compact",
}
# Every SparsityMonitor argument but example_input (a tensor: set it in Python or as example_input_array).
MONITOR_ARGS = {
    "example_batch_size": 4,
    "include": ["net.*.weight"],
    "exclude": ["net.3.weight"],
    "table": False,
    "plot": False,
}


class ToyData(pl.LightningDataModule):
    def __init__(self, n: int = 64, batch_size: int = 16) -> None:
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def train_dataloader(self):
        return make_loader(self.n, self.batch_size)


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cli"])  # LightningCLI warns when sys.argv also holds arguments


def cli(*args: str, run: bool = True) -> LightningCLI:
    return LightningCLI(MLP, ToyData, args=["fit", *args] if run else list(args), run=run)


def callback(result: LightningCLI, cls: type) -> pl.Callback:
    (found,) = [cb for cb in result.trainer.callbacks if isinstance(cb, cls)]
    return found


def write_config(tmp_path, callbacks: list[dict]):
    config = {
        "seed_everything": 0,
        "trainer": {**CLI_TRAINER_ARGS, "default_root_dir": str(tmp_path), "callbacks": callbacks},
    }
    path = tmp_path / "rigl.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def assert_received(cb: pl.Callback, args: dict) -> None:
    assert {key: getattr(cb, key) for key in args} == args
    for key, value in args.items():
        assert type(getattr(cb, key)) is type(value), key  # t_end=5 stays an int (a step), not 5.0


def assert_trained_with_rigl_args(result: LightningCLI) -> None:
    rigl = callback(result, RigLCallback)
    assert_received(rigl, RIGL_ARGS)
    assert list(rigl.masks) == ["net.0.weight", "net.2.weight"]  # include minus exclude
    densities = {name: mask.float().mean().item() for name, mask in rigl.masks.items()}
    assert densities == pytest.approx({"net.0.weight": 0.2, "net.2.weight": 0.5}, abs=0.01)
    assert rigl.sparse.updates == 2  # after steps 2 and 4: t_end=5 is a step, delta_t=2
    assert result.trainer.global_step == 6


def test_the_tests_set_every_argument_of_both_callbacks():
    assert set(RIGL_ARGS) == set(inspect.signature(RigLCallback).parameters)
    assert set(MONITOR_ARGS) | {"example_input"} == set(inspect.signature(SparsityMonitor).parameters)


def test_yaml_config_passes_every_value_to_the_callbacks(tmp_path):
    config = write_config(
        tmp_path,
        [
            {"class_path": "lightning_rigl.SparsityMonitor", "init_args": MONITOR_ARGS},
            {"class_path": "lightning_rigl.RigLCallback", "init_args": RIGL_ARGS},
        ],
    )
    result = cli("--config", str(config))
    assert_trained_with_rigl_args(result)
    assert_received(callback(result, SparsityMonitor), MONITOR_ARGS)


def test_command_line_passes_every_value_to_the_callbacks(tmp_path):
    args = command_line(CLI_TRAINER_ARGS, "trainer")
    args += ["--trainer.callbacks+=lightning_rigl.SparsityMonitor", *command_line(MONITOR_ARGS)]
    args += ["--trainer.callbacks+=lightning_rigl.RigLCallback", *command_line(RIGL_ARGS)]
    result = cli(*args, f"--trainer.default_root_dir={tmp_path}", "--seed_everything=0")
    assert_trained_with_rigl_args(result)
    assert_received(callback(result, SparsityMonitor), MONITOR_ARGS)


def test_command_line_sets_sparsity_and_keeps_the_other_defaults():
    result = cli("--trainer.callbacks+=lightning_rigl.RigLCallback", "--trainer.callbacks.sparsity=0.95", run=False)
    defaults = {name: p.default for name, p in inspect.signature(RigLCallback).parameters.items()}
    assert_received(callback(result, RigLCallback), {**defaults, "sparsity": 0.95})


def test_short_class_names_resolve_once_lightning_rigl_is_imported():
    result = cli("--trainer.callbacks+=SparsityMonitor", "--trainer.callbacks+=RigLCallback", run=False)
    assert [type(cb) for cb in result.trainer.callbacks[:2]] == [SparsityMonitor, RigLCallback]


@pytest.mark.parametrize(
    ("given", "expected"),
    [("100", 100), ("1", 1), ("0.5", 0.5), ("1.0", 1.0)],
    ids=["int-is-a-step", "1-is-step-1", "float-is-a-fraction", "1.0-is-the-whole-run"],
)
def test_t_end_from_the_command_line_keeps_int_and_float_apart(given, expected):
    result = cli("--trainer.callbacks+=RigLCallback", f"--trainer.callbacks.t_end={given}", run=False)
    t_end = callback(result, RigLCallback).t_end
    assert t_end == expected and type(t_end) is type(expected)


def test_a_value_the_callback_refuses_stops_the_cli_with_its_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli("--trainer.callbacks+=RigLCallback", "--trainer.callbacks.sparsity=1.5", run=False)
    assert exit_info.value.code == 2  # as a parse error
    assert "error: RigLCallback: `sparsity` must be in [0, 1), got 1.5." in capsys.readouterr().err


SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from {package}.cli import LightningCLI
from {model_module} import MLP

LightningCLI(MLP, run=False)
"""


def script_command(directory: Path, *args: str, package: str = "lightning.pytorch") -> tuple[list[str], Path]:
    """A LightningCLI script on tests.helpers.MLP (on its pytorch_lightning twin for that package), written to
    `directory`; returns the command line that runs it there and the folder."""
    model_module = "tests.helpers_pytorch_lightning" if package == "pytorch_lightning" else "tests.helpers"
    script = directory / "train.py"
    script.write_text(SCRIPT.format(root=str(Path(__file__).parent.parent), package=package, model_module=model_module))
    return [sys.executable, str(script), "--seed_everything=false", *args], directory


def assert_one_clean_line(result: subprocess.CompletedProcess, line: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Union" not in result.stderr
    assert result.stderr.strip().splitlines() == [line]


# A refused value in a YAML config: (the callback's init_args, the message).
YAML_CASES = {
    "sparsity": ({"sparsity": 1.5}, "`sparsity` must be in [0, 1), got 1.5."),
    "delta_t": ({"delta_t": -5}, "`delta_t` must be an int >= 1, got -5."),
    "custom_sparsity": ({"custom_sparsity": {"x": 1.5}}, "`custom_sparsity['x']` must be in [0, 1), got 1.5."),
}


@pytest.fixture(scope="module")
def refused_runs(tmp_path_factory):
    """The results of the scripts the refused-value tests run: each a fresh process, all started together."""
    commands = {}
    for case, (init_args, _) in YAML_CASES.items():
        directory = tmp_path_factory.mktemp(f"yaml-{case}")
        callbacks = [{"class_path": "lightning_rigl.RigLCallback", "init_args": init_args}]
        config = directory / "rigl.yaml"
        config.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
        commands[f"yaml-{case}"] = script_command(directory, "--config", str(config))
    commands["command-line"] = script_command(
        tmp_path_factory.mktemp("command-line"),
        "--trainer.callbacks+=lightning_rigl.RigLCallback",
        "--trainer.callbacks.delta_t=-5",
    )
    commands["monitor"] = script_command(
        tmp_path_factory.mktemp("monitor"),
        "--trainer.callbacks+=lightning_rigl.SparsityMonitor",
        "--trainer.callbacks.example_batch_size=0",
    )
    if importlib.util.find_spec("pytorch_lightning") is not None:
        args = [
            "--trainer.callbacks+=lightning_rigl.pytorch_lightning.RigLCallback",
            "--trainer.callbacks.sparsity=1.5",
        ]
        commands["pytorch_lightning"] = script_command(
            tmp_path_factory.mktemp("pytorch_lightning"), *args, package="pytorch_lightning"
        )
    return run_at_once(commands)


@pytest.mark.parametrize("case", list(YAML_CASES))
def test_a_refused_value_in_a_yaml_config_is_one_line_naming_the_argument(refused_runs, case):
    _, message = YAML_CASES[case]
    assert_one_clean_line(refused_runs[f"yaml-{case}"], f"train.py: error: RigLCallback: {message}")


def test_a_refused_value_on_the_command_line_is_one_line_naming_the_argument(refused_runs):
    line = "train.py: error: RigLCallback: `delta_t` must be an int >= 1, got -5."
    assert_one_clean_line(refused_runs["command-line"], line)


def test_a_value_sparsity_monitor_refuses_is_one_line_naming_the_argument(refused_runs):
    line = (
        "train.py: error: SparsityMonitor: `example_batch_size` must be None (dim 0 of the example input) "
        "or an int >= 1, got 0."
    )
    assert_one_clean_line(refused_runs["monitor"], line)


def test_a_refused_value_under_pytorch_lightning_cli_is_one_line_naming_the_argument(refused_runs):
    pytest.importorskip("pytorch_lightning")
    line = "train.py: error: RigLCallback: `sparsity` must be in [0, 1), got 1.5."
    assert_one_clean_line(refused_runs["pytorch_lightning"], line)


def test_a_value_outside_a_literal_is_refused_at_parse_time(capsys):
    with pytest.raises(SystemExit):
        cli("--trainer.callbacks+=RigLCallback", "--trainer.callbacks.distribution=gaussian", run=False)
    assert "distribution" in capsys.readouterr().err


def print_config(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli(*args, "--print_config")
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def test_print_config_writes_every_value_back_and_runs_again(tmp_path, capsys):
    args = ["--trainer.callbacks+=lightning_rigl.SparsityMonitor", *command_line(MONITOR_ARGS)]
    args += ["--trainer.callbacks+=lightning_rigl.RigLCallback", *command_line(RIGL_ARGS)]
    args += command_line(CLI_TRAINER_ARGS, "trainer")
    printed = print_config(capsys, *args, f"--trainer.default_root_dir={tmp_path}", "--seed_everything=0")

    callbacks = yaml.safe_load(printed)["trainer"]["callbacks"]
    assert [cb["class_path"] for cb in callbacks] == ["lightning_rigl.SparsityMonitor", "lightning_rigl.RigLCallback"]
    assert callbacks[0]["init_args"] == {**MONITOR_ARGS, "example_input": None}
    assert callbacks[1]["init_args"] == RIGL_ARGS
    assert type(callbacks[1]["init_args"]["t_end"]) is int

    config = tmp_path / "printed.yaml"
    config.write_text(printed)
    assert print_config(capsys, "--config", str(config)) == printed  # a fixed point
    assert_trained_with_rigl_args(cli("--config", str(config)))


def test_print_config_of_a_float_t_end_runs_back_as_a_fraction(tmp_path, capsys):
    args = ["--trainer.callbacks+=RigLCallback", "--trainer.callbacks.t_end=0.5", "--trainer.callbacks.delta_t=1"]
    printed = print_config(
        capsys, *args, *command_line(CLI_TRAINER_ARGS, "trainer"), f"--trainer.default_root_dir={tmp_path}"
    )
    assert "t_end: 0.5\n" in printed
    config = tmp_path / "printed.yaml"
    config.write_text(printed)
    rigl = callback(cli("--config", str(config)), RigLCallback)
    assert rigl.t_end == 0.5 and isinstance(rigl.t_end, float)
    assert rigl.sparse.updates == 2  # t_end = int(0.5 * 6 steps) = 3: updates after steps 1 and 2


def test_a_cli_run_masks_the_weights_it_trains(tmp_path):
    result = cli(
        "--trainer.callbacks+=RigLCallback",
        "--trainer.callbacks.sparsity=0.9",
        *command_line(CLI_TRAINER_ARGS, "trainer"),
        f"--trainer.default_root_dir={tmp_path}",
    )
    params = dict(result.model.named_parameters())
    for name, mask in callback(result, RigLCallback).masks.items():
        assert torch.all(params[name][~mask] == 0), name
