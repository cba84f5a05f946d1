"""The ``fastunet`` command refuses bad options with what was expected and what was given, never a traceback or
an empty check that passes."""

from __future__ import annotations

import re

import pytest

from fastunet import cli


@pytest.mark.parametrize(
    "argv, option, given",
    [
        pytest.param(["check", "--batch", "-1"], "--batch", "-1", id="check-negative-batch"),
        pytest.param(["check", "--batch", "0"], "--batch", "0", id="check-empty-batch"),
        pytest.param(["roofline", "--batch", "0"], "--batch", "0", id="roofline-empty-batch"),
        pytest.param(["trace", "--batch", "-1"], "--batch", "-1", id="trace-negative-batch"),
        pytest.param(["trace", "--depth", "0"], "--depth", "0", id="depth-zero"),
        pytest.param(["trace", "--size", "x"], "--size", "'x'", id="size-not-a-number"),
        pytest.param(["trace", "--width", "-3"], "--width", "-3", id="negative-width"),
        pytest.param(["bench", "--check-size", "0"], "--check-size", "0", id="bench-check-size"),
    ],
)
def test_out_of_range_options_are_refused_while_parsing(capsys, argv, option, given):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: expected an integer >= 1, got {given}" in err, err


@pytest.mark.parametrize(
    "argv, message",
    [
        pytest.param(
            ["trace", "--depth", "40"], r"depth 40 needs H and W >= 2\*\*40 = 1099511627776, got 512x512", id="depth-40"
        ),
        pytest.param(
            ["roofline", "--depth", "3", "--height", "7"], r"depth 3 needs H and W >= 2\*\*3 = 8, got 7x512", id="h"
        ),
        pytest.param(
            ["trace", "--base-channels", "100000", "--size", "64"],
            r"1600000-channel bottleneck: packed weight .* 32-bit offsets",
            id="too-wide",
        ),
        pytest.param(
            ["trace", "--depth", "40", "--size", str(2**40)], r"at --depth 40 gives a .*-channel bottleneck", id="deep"
        ),
    ],
)
def test_configurations_the_kernels_cannot_run_are_refused(capsys, argv, message):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert not captured.out, "nothing may be printed as a result"
    assert re.search(message, captured.err), captured.err


# -- one set of spellings for dtypes and targets, in every command ------------------------------------------------
@pytest.mark.parametrize(
    "spellings, canonical",
    [
        pytest.param(("--arch", "sm_90", "sm_80", "--dtype", "bf16", "fp16"), ([90, 80], ["bf16", "fp16"]), id="short"),
        pytest.param(
            ("--arch", "90", "sm_80a", "--dtype", "bfloat16", "float16"), ([90, 80], ["bf16", "fp16"]), id="long"
        ),
        pytest.param(("--arch", "SM_90", "--dtype", "BF16", "float32"), ([90], ["bf16", "fp32"]), id="mixed"),
    ],
)
def test_report_accepts_either_spelling(spellings, canonical):
    """``fastunet report`` and ``python -m bench.compile_report`` parse one command line: ``sm_90`` and ``90`` name
    one target, ``bf16`` and ``bfloat16`` one dtype; the report's labels use the short names."""
    from fastunet.tooling.compile_report import build_parser

    args = build_parser().parse_args(list(spellings))
    assert (args.arch, args.dtype) == canonical


@pytest.mark.parametrize("command", ["check", "trace", "roofline", "bench"])
@pytest.mark.parametrize("spelling, name", [("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("fp32", "float32")])
def test_commands_accept_either_dtype_spelling(command, spelling, name):
    args = cli.build_parser().parse_args([command, "--dtype", spelling])
    assert args.dtype == name


@pytest.mark.parametrize(
    "argv, option, given",
    [
        pytest.param(["--dtype", "half"], "--dtype", "'half'", id="report-dtype"),
        pytest.param(["--arch", "hopper"], "--arch", "'hopper'", id="report-arch"),
    ],
)
def test_report_refuses_unknown_spellings(capsys, argv, option, given):
    from fastunet.tooling.compile_report import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv, prog="fastunet report")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    expected = "expected a dtype, one of float32 (fp32), float16 (fp16), bfloat16 (bf16)"
    if option == "--arch":
        expected = "expected an architecture like sm_90 or 90"
    assert f"argument {option}: {expected}, got {given}" in err, err


def test_commands_refuse_an_unknown_dtype(capsys):
    with pytest.raises(SystemExit):
        cli.main(["trace", "--dtype", "float64"])
    assert (
        "argument --dtype: expected a dtype, one of float32 (fp32), float16 (fp16), bfloat16 (bf16), got 'float64'"
        in (capsys.readouterr().err)
    )
