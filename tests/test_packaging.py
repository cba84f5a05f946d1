"""The wheel: ``kernels/`` ships as ``fastunet.kernels`` (never as a top-level ``kernels`` package), and the tooling,
GPU timing run included, works from an installed wheel without the source tree."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    """The package built as a wheel, offline (``--no-build-isolation``: the setuptools already installed)."""
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (found,) = out.glob("fastunet-*.whl")
    return found


def test_kernels_import_as_subpackage():
    import fastunet.kernels

    assert pathlib.Path(fastunet.kernels.__file__).parent.name == "kernels"
    assert "kernels" not in sys.modules or sys.modules["kernels"] is not fastunet.kernels


@pytest.mark.tooling
def test_wheel_maps_kernels_under_fastunet(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("__init__.py", "_common.py", "conv.py"):
        assert f"fastunet/kernels/{module}" in names
    assert not [name for name in names if name.startswith("kernels/")]
    assert "fastunet/reference.py" in names
    for module in ("timing.py", "timing_args.py", "providers.py", "shapes.py", "compile_report.py", "roofline.py"):
        assert f"fastunet/tooling/{module}" in names
    assert not [name for name in names if name.startswith("bench/")]


# Run from the wheel's install folder: every fastunet module must load from there, nothing from the checkout; then
# the GPU timing run's own code path (fastunet bench's) goes through its dry run on the CPU.
_FROM_WHEEL = textwrap.dedent(
    """
    import json, os, sys
    target, root, out = sys.argv[1:4]
    assert root not in [os.path.abspath(p or ".") for p in sys.path], sys.path
    from fastunet import cli
    from fastunet.tooling import timing
    loaded = {name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())}
    outside = {name: path for name, path in loaded.items() if name.startswith("fastunet")
               and not (path or "").startswith(target + os.sep)}
    assert not outside, outside
    assert not [name for name in loaded if name in ("run_gpu", "shapes", "providers") or name.startswith("bench")]
    status = timing.main(["--dry-run", "--configs", "smoke", "--dtypes", "fp32", "--no-stages", "--no-fp64",
                          "--providers", "fastunet", "torch-eager", "--json", out], prog="from-wheel")
    print(json.dumps({"status": status, "timing": timing.__file__, "cli_parses_bench": bool(
        cli.build_parser().parse_args(["bench", "--dtype", "bf16", "--quick"]).quick)}))
    """
)


@pytest.mark.tooling
def test_gpu_timing_runs_from_an_installed_wheel(wheel, tmp_path):
    """``fastunet bench``'s timing code ships in the wheel: installed into a folder of its own and imported with
    the checkout off ``sys.path``, it loads only from there and its run goes through (as a dry run on the CPU, the
    same steps a GPU run takes, with wall-clock placeholders instead of timings)."""
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target)]
    result = subprocess.run([*install, str(wheel)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = tmp_path / "dry.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "FASTUNET_"))}
    env |= {"PYTHONPATH": str(target), "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _FROM_WHEEL, str(target), str(ROOT), str(out)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["status"] == 0 and summary["cli_parses_bench"]
    assert pathlib.Path(summary["timing"]).is_relative_to(target)
    payload = json.loads(out.read_text())
    (run,) = payload["runs"]
    assert run["config"] == "smoke-dry" and run["fastunet_backend"] == "triton-interpreter" and run["parity"]["ok"]
    assert run["providers"]["fastunet"]["median_ms"] > 0 and "not speed" in run["providers"]["fastunet"]["timer"]
    assert payload["environment"]["commit"] is None  # a wheel knows no checkout


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


CORE = ("model", "ops", "convert", "dispatch", "plan_cache", "sharing", "reference", "parity")


def _module_level_imports(path: pathlib.Path) -> list[str]:
    """Modules a file imports when it is imported (module level, ``if``/``try`` blocks included; not inside
    functions or classes)."""
    import ast

    found, todo = [], list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            found += [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, (ast.If, ast.Try)):
            todo += node.body + node.orelse + getattr(node, "finalbody", [])
            todo += [stmt for handler in getattr(node, "handlers", []) for stmt in handler.body]
    return found


@pytest.mark.parametrize(
    "path",
    [ROOT / "fastunet" / f"{name}.py" for name in CORE] + sorted((ROOT / "kernels").glob("*.py")),
    ids=lambda path: path.relative_to(ROOT).as_posix(),
)
def test_the_forward_path_does_not_import_the_tooling(path):
    """The forward path (model, ops, convert, kernels, ...) imports neither the tooling nor the command line when it
    is imported: the core reads on its own."""
    imports = _module_level_imports(path)
    assert any(name.startswith(("torch", "triton", "fastunet")) for name in imports)  # the walk sees its imports
    assert not [name for name in imports if name.startswith(("fastunet.tooling", "fastunet.cli"))]


def test_the_tooling_package_imports_nothing_itself():
    assert _module_level_imports(ROOT / "fastunet" / "tooling" / "__init__.py") == []
