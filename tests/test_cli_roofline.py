"""The roofline model against hand counts, the ``fastunet`` command, and the benchmark shapes and providers."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from fastunet import cli, parity
from fastunet.kernels._common import dry_run, launch_log
from fastunet.kernels.conv import conv2d_nhwc
from fastunet.tooling import providers, shapes
from fastunet.tooling.roofline import H100, config_roofline, eager_estimate
from fastunet.tooling.trace import stage_labels, trace_config

PEAK_FP16, PEAK_TF32, PEAK_FP32, BANDWIDTH = 798e12, 399e12, 67e12, 3.0e12

# in 3, classes 2, base 8, depth 2, bilinear, batch 2, 16x16: levels 16x16x8, 8x8x16, bottleneck 4x4x32.
TINY = {"in_channels": 3, "num_classes": 2, "base_channels": 8, "depth": 2, "upsample": "bilinear"}
TINY_INPUT = (2, 3, 16, 16)


def _conv(n, h, w, c_in, c_out, *, pool=False, head=0):
    """(flops, elements read, elements written) of one fused conv3x3 launch, counted by hand."""
    flops = 2 * n * h * w * c_out * 9 * c_in + 2 * n * h * w * c_out * head
    read = n * h * w * c_in + 9 * c_in * c_out + c_out  # the skip and the full-size upsampled map
    if head:
        read += c_out * head + head
        written = n * h * w * head  # the feature map itself is never stored
    else:
        written = n * h * w * c_out + (n * (h // 2) * (w // 2) * c_out if pool else 0)
    return flops, read, written


def _upsample(n, low_h, low_w, channels):
    """(flops, elements read, elements written) of one 2x upsample launch: data movement, no network FLOPs."""
    return 0, n * low_h * low_w * channels, n * 4 * low_h * low_w * channels


TINY_HAND_COUNT = [
    ("enc0.conv1", _conv(2, 16, 16, 3, 8)),
    ("enc0.conv2", _conv(2, 16, 16, 8, 8, pool=True)),
    ("enc1.conv1", _conv(2, 8, 8, 8, 16)),
    ("enc1.conv2", _conv(2, 8, 8, 16, 16, pool=True)),
    ("bottleneck.conv1", _conv(2, 4, 4, 16, 32)),
    ("bottleneck.conv2", _conv(2, 4, 4, 32, 32)),
    ("dec1.up", _upsample(2, 4, 4, 32)),
    ("dec1.conv1", _conv(2, 8, 8, 16 + 32, 16)),  # skip 16 channels + 32 upsampled from 4x4
    ("dec1.conv2", _conv(2, 8, 8, 16, 16)),
    ("dec0.up", _upsample(2, 8, 8, 16)),
    ("dec0.conv1", _conv(2, 16, 16, 8 + 16, 8)),
    ("dec0.conv2", _conv(2, 16, 16, 8, 8, head=2)),
]


@pytest.mark.parametrize(
    ("dtype", "allow_tf32", "peak"),
    [
        pytest.param(torch.float16, True, PEAK_FP16, id="fp16"),
        pytest.param(torch.bfloat16, True, PEAK_FP16, id="bf16"),
        pytest.param(torch.float32, True, PEAK_TF32, id="tf32"),
        pytest.param(torch.float32, False, PEAK_FP32, id="fp32-ieee"),
    ],
)
def test_roofline_matches_hand_count(dtype, allow_tf32, peak):
    size = torch.empty((), dtype=dtype).element_size()
    net = config_roofline(TINY, TINY_INPUT, dtype, allow_tf32=allow_tf32)
    assert [launch.stage for launch in net.launches] == [label for label, _ in TINY_HAND_COUNT]
    expected_total = 0.0
    for launch, (label, (flops, read, written)) in zip(net.launches, TINY_HAND_COUNT, strict=True):
        nbytes = (read + written) * size
        assert (launch.flops, launch.bytes_read, launch.bytes_written) == (flops, read * size, written * size), label
        assert launch.intensity == pytest.approx(flops / nbytes)
        floor = max(flops / peak, nbytes / BANDWIDTH)
        assert launch.floor_s == pytest.approx(floor, rel=1e-12)
        assert launch.bound == ("compute" if flops / peak >= nbytes / BANDWIDTH else "memory")
        expected_total += floor
    assert net.floor_s == pytest.approx(expected_total, rel=1e-12)
    total_flops = sum(count[0] for _, count in TINY_HAND_COUNT)
    total_bytes = sum(count[1] + count[2] for _, count in TINY_HAND_COUNT) * size
    assert (net.flops, net.bytes) == (total_flops, total_bytes)
    assert net.aggregate_floor_s == pytest.approx(max(total_flops / peak, total_bytes / BANDWIDTH), rel=1e-12)
    assert net.aggregate_floor_s <= net.floor_s


def test_eager_estimate_matches_hand_count():
    # Per conv3x3: cuDNN conv, bias add, ReLU, each writing the output; pools write values and int64 indices.
    e = 2  # fp16
    conv_outputs = [2 * 8 * 16 * 16] * 4 + [2 * 16 * 8 * 8] * 4 + [2 * 32 * 4 * 4] * 2
    written = 3 * e * sum(conv_outputs)
    written += (2 * 8 * 8 * 8 + 2 * 16 * 4 * 4) * (e + 8)  # max_pool2d_with_indices
    written += (2 * 32 * 8 * 8 + 2 * 16 * 16 * 16) * e  # 2x bilinear upsampling
    written += (2 * 48 * 8 * 8 + 2 * 24 * 16 * 16) * e  # torch.cat
    written += 2 * (2 * 2 * 16 * 16) * e  # head conv and its bias add
    eager = eager_estimate(TINY, TINY_INPUT, torch.float16)
    assert eager.kernels == 10 * 3 + 2 + 2 + 2 + 2
    assert eager.bytes_written == written
    assert eager.flops == sum(count[0] for _, count in TINY_HAND_COUNT)


def test_reference_config_matches_design_numbers():
    reference = {"in_channels": 3, "num_classes": 2, "base_channels": 64, "depth": 4}
    shape = (1, 3, 512, 512)
    net = config_roofline({**reference, "upsample": "bilinear"}, shape, torch.float16)
    eager = eager_estimate({**reference, "upsample": "bilinear"}, shape, torch.float16)
    assert len(net.launches) == 22 and eager.kernels == 68
    assert net.flops / 1e9 == pytest.approx(445.5, abs=0.05)
    # The fully fused design's 0.57 GB and 0.57 ms, plus the upsampled maps written once per level and read by the
    # decoder's first conv (0.22 GB, 52 us): the price of a decoder loop that is not issue-bound.
    assert net.floor_s * 1e3 == pytest.approx(0.62, abs=0.01)
    assert net.bytes / 1e9 == pytest.approx(0.79, rel=0.05)
    assert eager.bytes_written / 1e6 == pytest.approx(1100, rel=0.1)
    assert eager.bytes / 1e9 == pytest.approx(2.3, rel=0.1)
    transposed = config_roofline({**reference, "upsample": "transpose", "norm": "batch"}, shape, torch.float16)
    assert transposed.flops / 1e9 == pytest.approx(385, abs=0.5)
    assert H100.peak_for("fp16") == PEAK_FP16 and H100.bandwidth == BANDWIDTH


@pytest.mark.parametrize("upsample", ["bilinear", "transpose"])
def test_launch_records_carry_their_stage(upsample):
    """The fused forward names each launch's stage, in the order of the hand count; a launch after the forward
    carries none, and its label says only where it sits in the list."""
    kwargs = {**TINY, "upsample": upsample}
    records = trace_config(kwargs, TINY_INPUT)
    assert [r.stage for r in records] == stage_labels(records) == [name for name, _ in TINY_HAND_COUNT]
    with dry_run(), launch_log() as later:
        conv2d_nhwc(torch.empty(1, 4, 4, 16, device="meta"), torch.empty(9 * 16, 16, device="meta"))
    (record,) = later
    assert record.stage is None
    assert stage_labels([*records, record])[-1] == f"launch{len(records)}"
    unnamed = [dataclasses.replace(r, stage=None) for r in records[:2]]
    assert stage_labels(unnamed) == ["launch0", "launch1"]


# -- the fastunet command -------------------------------------------------------------------------------------------
TINY_CHECK = ["check", "--base-channels", "8", "--depth", "2", "--size", "16", "--batch", "1"]


def test_cli_check_passes(capsys):
    assert cli.main(TINY_CHECK) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out
    assert re.search(r"fastunet vs float64 reference: relative L2 \d", out)
    assert "(triton" in out  # the kernels ran, not the reference fallback


def test_cli_check_fails_outside_budget(capsys, monkeypatch):
    for key in parity.NETWORK_BUDGETS:
        monkeypatch.setitem(parity.NETWORK_BUDGETS, key, parity.Budget(rel_l2=0.0, max_norm=0.0))
    assert cli.main([*TINY_CHECK, "--upsample", "transpose"]) == 1
    assert capsys.readouterr().out.rstrip().endswith("FAIL")


@pytest.mark.parametrize(("upsample", "launches"), [("bilinear", 22), ("transpose", 22)])
def test_cli_trace_lists_the_launches(capsys, upsample, launches):
    assert cli.main(["trace", "--base-channels", "64", "--depth", "4", "--upsample", upsample]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"\s*\d+\s+(enc|dec|bottleneck)", line)]
    assert len(rows) == launches
    assert f"launches: {launches} " in out


def test_cli_roofline_says_it_is_a_model(capsys):
    assert cli.main(["roofline", "--base-channels", "16", "--depth", "3", "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "not a measurement" in out and "TF32 399 TFLOP/s: assumed" in out
    assert "fused forward: 17 launches" in out and "eager estimate:" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what bench does without a GPU")
def test_cli_bench_without_gpu_runs_the_labelled_analysis(capfd, tmp_path):
    """No GPU: says so, makes no timings, runs parity under the interpreter, prints the roofline model (H100 and
    H200), the sm_90 compile report and the issue model of the chosen configuration; --json keeps all of them."""
    out_json = tmp_path / "bench.json"
    argv = ["bench", "--base-channels", "8", "--depth", "2", "--size", "32", "--report-dtypes", "fp16"]
    argv += ["--check-size", "16", "--check-depth", "2", "--check-base-channels", "4", "--json", str(out_json)]
    assert cli.main(argv) == 0
    out = capfd.readouterr().out
    assert "no GPU here" in out and "no timings are made" in out
    assert "PASS" in out and "(triton-interpreter" in out  # the parity child ran the kernels under the interpreter
    assert "Roofline MODEL" in out and "H100 fused" in out and "H200 fused" in out
    assert "compile report: built, not run" in out and "HGMMA" in out
    assert not re.search(r"\b(ms|images/s)\b.*fastunet", out)  # no provider timing table
    result = json.loads(out_json.read_text())
    assert result["sections"]["parity"]["passed"] is True
    roofline = result["sections"]["roofline"]
    expected = config_roofline({**TINY, "base_channels": 8}, (1, 3, 32, 32), torch.float16)
    assert roofline["total"]["flops"] == expected.flops
    variants = result["sections"]["compile_report"]["variants"]
    assert variants and all(v["arch"] == "sm_90" and v["config"]["dtype"] == "fp16" for v in variants)
    assert all(v["occupancy"] for v in variants)
    assert all(v["issue_ratio"] for v in variants if "BLOCK_K" in v["config"])
    assert "Issue-slot MODEL" in out and "MODEL forward bilinear fp16 batch 1 32x32" in out
    (model,) = result["sections"]["compile_report"]["model"]
    assert model["dtype"] == "fp16" and model["batch"] == 1 and model["ms"] > 0


def test_cli_roofline_prints_the_reference_flops(capsys):
    """The figure to check against: 445.5 GFLOP per 512x512 image, bilinear, no channel reduction."""
    assert cli.main(["roofline", "--batch", "2"]) == 0
    assert "891.0 GFLOP per forward (445.5 GFLOP per image)" in capsys.readouterr().out


def test_cli_without_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "check" in capsys.readouterr().out


# -- benchmark plumbing: stages derived from the trace, and each stage's fused and eager versions agree ----------
def test_bench_configs_and_stages():
    reference = shapes.CONFIGS["ref-bilinear-b1"]
    assert reference.model_kwargs()["upsample"] == "bilinear" and reference.input_shape() == (1, 3, 512, 512)
    assert {"ref-bilinear-b16", "ref-transpose-b1", "ref-transpose-b16", "milesial-b1", "smoke"} <= set(shapes.CONFIGS)
    stages = shapes.stages(reference)
    encoder = ["conv", "conv+pool"] * 4 + ["conv", "conv"]
    decoder = ["upsample", "conv+up", "conv"] * 3 + ["upsample", "conv+up", "conv+head"]
    assert [s.kind for s in stages] == encoder + decoder
    traced = trace_config(reference.model_kwargs(), reference.input_shape())
    assert [s.flops for s in stages] == [r.flops for r in traced]
    upsample, up = stages[10], stages[11]
    assert (upsample.label, upsample.up_mode, upsample.x_shape, upsample.y_shape) == (
        "dec3.up",
        "bilinear",
        (1, 32, 32, 1024),
        (1, 64, 64, 1024),
    )
    assert (up.label, up.up_mode, up.x_shape, up.up_shape) == (
        "dec3.conv1",
        "direct",
        (1, 64, 64, 512),
        (1, 64, 64, 1024),
    )
    assert [s.kind for s in shapes.stages(shapes.CONFIGS["milesial-b1"])].count("conv-transpose") == 4


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(("bilinear", None, False, (2, 3, 13, 10)), id="bilinear-odd"),
        pytest.param(("bilinear", None, True, (1, 3, 12, 9)), id="bilinear-align-corners"),
        pytest.param(("nearest", "batch", False, (1, 3, 11, 16)), id="nearest"),
        pytest.param(("transpose", "batch", False, (2, 4, 13, 10)), id="transpose"),
    ],
)
def test_bench_stage_providers_agree(device, config):
    upsample, norm, align_corners, (batch, c_in, height, width) = config
    bench_config = shapes.BenchConfig("tiny", c_in, 3, 8, 2, upsample, norm, batch, height, width, align_corners)
    for stage in shapes.stages(bench_config, torch.float32):
        tensors = providers.stage_tensors(stage, torch.float32, device)
        fused = providers.stage_callable(stage, "fastunet", tensors)()
        eager = providers.stage_callable(stage, "torch-eager", tensors)()
        assert len(fused) == len(eager)
        for got, want in zip(fused, eager, strict=True):
            error = parity.network_error(got, want)
            assert error.within(parity.NETWORK_BUDGETS[parity.math_mode(torch.float32, device.type)]), stage.id
