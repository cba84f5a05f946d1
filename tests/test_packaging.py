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


@pytest.mark.parametrize(
    ("triton_version", "numpy_version", "runs"),
    [
        ("3.6.0", "2.3.5", True),
        ("3.6.0", "2.4.0", False),
        ("3.6.0", "2.4.6", False),
        ("3.5.1", "2.4.0rc1", False),
        ("3.7.0", "2.4.6", True),
        ("3.9.0", "2.5.0", True),
        ("3.2.0", "1.26.4", True),
    ],
)
def test_interpreter_numpy_pairing(triton_version, numpy_version, runs):
    """Triton < 3.7's interpreter fails on NumPy >= 2.4 (seen with 3.6.0 and 3.7.0
    against NumPy 2.4.6): the pairing is refused with the fix named, the others pass."""
    from fastunet.kernels._common import interpreter_numpy_problem

    problem = interpreter_numpy_problem(triton_version, numpy_version)
    if runs:
        assert problem is None
    else:
        assert f"Triton {triton_version}" in problem and f"NumPy {numpy_version}" in problem
        assert "pip install 'numpy<2.4'" in problem and "pip install 'triton>=3.7'" in problem


def test_interpreter_refuses_an_incompatible_numpy_before_launching(monkeypatch):
    """Under the interpreter a launch with a known-bad pairing stops with the fix, not numpy's TypeError."""
    import numpy
    import torch
    import triton

    from fastunet.kernels import INTERPRET, conv2d_nhwc
    from fastunet.kernels.conv import pack_conv_weight

    if not INTERPRET:
        pytest.skip("checks the interpreter's launch path")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    x = torch.randn(1, 4, 4, 3)
    with pytest.raises(RuntimeError, match=r"NumPy 2\.4\.6.*pip install 'numpy<2\.4'"):
        conv2d_nhwc(x, pack_conv_weight(torch.randn(2, 3, 3, 3)), torch.randn(2))
