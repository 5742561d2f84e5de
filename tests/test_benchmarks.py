"""The benchmark scripts run end to end on tiny settings and write their JSON (no timing is asserted).

Each script's ``main()`` runs in this process, with the command line ``python benchmarks/<script>.py ...``
would give it: no second start of Python and Lightning. overhead.py's fits still run in processes of their
own (or threads, with ``--in-threads``), on its ``tiny`` model: the harness is under test, not the model.
"""

import importlib
import json
import os
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
MALLOC = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def run_main(monkeypatch: pytest.MonkeyPatch, script: str, *args: str, out: Path | None = None) -> dict | None:
    """Runs ``benchmarks/<script>.py``'s main() on these arguments; returns the JSON it wrote to `out`."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # imported by name: the fits overhead.py spawns import it so
    for name in MALLOC:  # --keep-freed-memory sets them for the fits' processes: unset again afterwards
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *args, *(["--out", str(out)] if out else [])])
    module.main()
    return json.loads(out.read_text()) if out else None


@pytest.fixture(scope="module")
def overhead_run(tmp_path_factory):
    """One run of overhead.py, every default run, one warm-up round, freed memory kept: the tests of how it fits
    and reports share it (each of its five workers is a process that imports Lightning)."""
    out = tmp_path_factory.mktemp("overhead") / "overhead.json"
    args = ("--models", "tiny", "--rounds", "3", "--warmup-rounds", "1", "--steps", "3", "--warmup", "1")
    args += ("--block", "2", "--keep-freed-memory")
    with pytest.MonkeyPatch.context() as monkeypatch:
        return run_main(monkeypatch, "overhead", *args, out=out)


def test_overhead_runs_every_fit_in_turns_and_reports_ratios(overhead_run):
    # The fits' processes were started with glibc keeping freed blocks of up to 32 MiB.
    assert overhead_run["meta"]["malloc"] == {
        "MALLOC_MMAP_THRESHOLD_": "33554432",
        "MALLOC_TRIM_THRESHOLD_": "4294967296",
    }
    result = overhead_run["results"]["tiny"]
    assert list(result) == ["dense", "static", "rigl", "pruning", "rigl+monitor"]
    assert all(row["median_ms"] > 0 and row["ratio"] > 0 for row in result.values())
    assert result["dense"]["ratio"] == 1.0
    assert all(len(row["all_ms"]) == 3 for row in result.values())  # one figure a counted round


def test_overhead_hands_every_run_to_another_worker_each_round(overhead_run):
    # A process that runs slower than the others (an A/A check measured one 2 % slower in 8 of 9 rounds)
    # must not weigh on one run only: worker i fits run i + r in round r (modulo the 5 runs); the warm-up
    # round (round 0, worker i fitting run i) is not counted. (The default, one warm-up round a run, makes
    # whole turns of the rotation: it cannot show in which worker fitted what.)
    result = overhead_run["results"]["tiny"]
    assert {run: row["workers"] for run, row in result.items()} == {
        "dense": [4, 3, 2],
        "static": [0, 4, 3],
        "rigl": [1, 0, 4],
        "pruning": [2, 1, 0],
        "rigl+monitor": [3, 2, 1],
    }
    assert all(len(row["all_ms"]) == 3 and min(row["all_ms"]) > 0 for row in result.values())


def test_overhead_refuses_to_keep_freed_memory_in_threads(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_main(monkeypatch, "overhead", "--keep-freed-memory", "--in-threads")
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert "--keep-freed-memory" in stderr and "--in-threads" in stderr
    assert not (tmp_path / "overhead.json").exists()
    assert not any(name in os.environ for name in MALLOC)  # refused before setting them


def test_overhead_a_a_check_names_the_repeated_run_and_runs_in_threads_on_request(monkeypatch, tmp_path):
    args = ("--models", "tiny", "--runs", "dense", "dense", "--rounds", "2", "--steps", "3", "--warmup", "1")
    result = run_main(monkeypatch, "overhead", *args, "--in-threads", out=tmp_path / "aa.json")["results"]["tiny"]
    assert list(result) == ["dense", "dense#2"]
    assert all(len(row["all_ms"]) == 2 for row in result.values())  # one figure a round, the warm-up one dropped


def test_mask_dtype_times_every_variant(monkeypatch, tmp_path):
    args = ("--rows", "64", "--cols", "64", "--rounds", "2")
    rows = run_main(monkeypatch, "mask_dtype", *args, out=tmp_path / "m.json")["results"]
    assert rows["float32 mask, mul_"]["ratio"] == 1.0
    assert {row["bytes_per_weight"] for row in rows.values()} == {1, 2, 4}


def test_overhead_times_a_fit_with_compact_storage(monkeypatch, tmp_path):
    args = ("--models", "tiny", "--runs", "dense", "rigl-compact", "--rounds", "1", "--warmup-rounds", "0")
    args += ("--steps", "3", "--warmup", "1", "--block", "2")
    rows = run_main(monkeypatch, "overhead", *args, out=tmp_path / "c.json")["results"]["tiny"]
    assert list(rows) == ["dense", "rigl-compact"] and all(row["median_ms"] > 0 for row in rows.values())
