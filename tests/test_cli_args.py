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
