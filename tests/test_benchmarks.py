"""The benchmark scripts run end to end on tiny settings and write their JSON (no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, out: Path) -> dict:
    command = [sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)]
    subprocess.run(command, check=True, cwd=out.parent, timeout=300, capture_output=True)
    return json.loads(out.read_text())


def test_overhead_runs_every_fit_in_turns_and_reports_ratios(tmp_path):
    args = ("--models", "mlp", "--rounds", "1", "--warmup-rounds", "0", "--steps", "4", "--warmup", "1", "--block", "2")
    written = _run("overhead.py", *args, "--keep-freed-memory", out=tmp_path / "overhead.json")
    # The fits' processes were started with glibc keeping freed blocks of up to 32 MiB.
    assert written["meta"]["malloc"] == {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
    result = written["results"]["mlp"]
    assert list(result) == ["dense", "static", "rigl", "pruning", "rigl+monitor"]
    assert all(row["median_ms"] > 0 and row["ratio"] > 0 for row in result.values())
    assert result["dense"]["ratio"] == 1.0
    assert all(len(row["all_ms"]) == 1 for row in result.values())


def test_overhead_hands_every_run_to_another_worker_each_round(tmp_path):
    # A process that runs slower than the others (an A/A check measured one 2 % slower in 8 of 9 rounds)
    # must not weigh on one run only: worker i fits run i + r in round r; the default warm-up rounds (one
    # a run) are not counted.
    args = ("--models", "mlp", "--runs", "dense", "static", "rigl", "--rounds", "3", "--steps", "3", "--warmup", "1")
    result = _run("overhead.py", *args, "--block", "2", out=tmp_path / "overhead.json")["results"]["mlp"]
    assert {run: row["workers"] for run, row in result.items()} == {
        "dense": [0, 2, 1],
        "static": [1, 0, 2],
        "rigl": [2, 1, 0],
    }
    assert all(len(row["all_ms"]) == 3 and min(row["all_ms"]) > 0 for row in result.values())


def test_overhead_refuses_to_keep_freed_memory_in_threads(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--keep-freed-memory", "--in-threads"]
    done = subprocess.run(command, cwd=tmp_path, timeout=120, capture_output=True, text=True)
    assert done.returncode == 2
    assert "--keep-freed-memory" in done.stderr and "--in-threads" in done.stderr
    assert not (tmp_path / "overhead.json").exists()


def test_overhead_a_a_check_names_the_repeated_run_and_runs_in_threads_on_request(tmp_path):
    args = ("--models", "mlp", "--runs", "dense", "dense", "--rounds", "2", "--steps", "3", "--warmup", "1")
    result = _run("overhead.py", *args, "--in-threads", out=tmp_path / "aa.json")["results"]["mlp"]
    assert list(result) == ["dense", "dense#2"]
    assert all(len(row["all_ms"]) == 2 for row in result.values())  # one figure a round, the warm-up one dropped


def test_mask_dtype_times_every_variant(tmp_path):
    result = _run("mask_dtype.py", "--rows", "64", "--cols", "64", "--rounds", "2", out=tmp_path / "m.json")
    rows = result["results"]
    assert rows["float32 mask, mul_"]["ratio"] == 1.0
    assert {row["bytes_per_weight"] for row in rows.values()} == {1, 2, 4}


def test_overhead_times_a_fit_with_compact_storage(tmp_path):
    args = ("--models", "mlp", "--runs", "dense", "rigl-compact", "--rounds", "1", "--warmup-rounds", "0")
    result = _run("overhead.py", *args, "--steps", "3", "--warmup", "1", "--block", "2", out=tmp_path / "c.json")
    rows = result["results"]["mlp"]
    assert list(rows) == ["dense", "rigl-compact"] and all(row["median_ms"] > 0 for row in rows.values())
