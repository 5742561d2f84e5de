"""The wheel ships what the package declares: its licence text and the py.typed marker of its typed API."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def test_the_wheel_holds_the_license_and_the_typed_marker(tmp_path):
    pytest.importorskip("setuptools")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("lightning_rigl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lightning_rigl/py.typed" in names
    licence = next(name for name in names if name.endswith("LICENSE"))
    assert "Apache License" in zipfile.ZipFile(wheel).read(licence).decode()
