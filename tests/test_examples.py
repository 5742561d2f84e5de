"""The examples run end to end (a short version)."""

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


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
