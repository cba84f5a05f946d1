"""The ``kernels/`` folder ships as ``fastunet.kernels`` (never as a top-level ``kernels`` package)."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_kernels_import_as_subpackage():
    import fastunet.kernels

    assert pathlib.Path(fastunet.kernels.__file__).parent.name == "kernels"
    assert "kernels" not in sys.modules or sys.modules["kernels"] is not fastunet.kernels


@pytest.mark.tooling
def test_wheel_maps_kernels_under_fastunet(tmp_path):
    pytest.importorskip("setuptools")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
        + [str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("fastunet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("__init__.py", "_common.py", "conv.py"):
        assert f"fastunet/kernels/{module}" in names
    assert not [name for name in names if name.startswith("kernels/")]
    assert "fastunet/reference.py" in names
