"""The upsample family: 2x nearest (bit-exact) and bilinear (either ``align_corners``) against ``F.interpolate``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastunet.kernels import launch_log
from fastunet.kernels.upsample import upsample2x_nhwc
from tolerances import assert_error_ratio

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]
MODES = [
    pytest.param("nearest", False, id="nearest"),
    pytest.param("bilinear", False, id="bilinear"),
    pytest.param("bilinear", True, id="bilinear-ac"),
]
# (batch, channels, low_h, low_w): one pixel, odd and prime sizes, channels below, at and past the 64-wide block
SHAPES = [
    pytest.param(1, 1, 1, 1, id="1x1-c1"),
    pytest.param(2, 3, 5, 7, id="5x7-c3"),
    pytest.param(1, 17, 2, 13, id="2x13-c17"),
    pytest.param(3, 64, 3, 3, id="3x3-c64"),
    pytest.param(1, 70, 4, 1, id="4x1-c70"),
]


def interpolate(x: torch.Tensor, mode: str, align_corners: bool) -> torch.Tensor:
    kwargs = {"align_corners": align_corners} if mode == "bilinear" else {}
    return F.interpolate(x, scale_factor=2, mode=mode, **kwargs)


def run(x: torch.Tensor, mode: str, align_corners: bool) -> torch.Tensor:
    """The kernel on an NCHW tensor, read in place through its NHWC view; the result back as NCHW."""
    return upsample2x_nhwc(x.permute(0, 2, 3, 1), mode, align_corners).permute(0, 3, 1, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode, align_corners", MODES)
@pytest.mark.parametrize("batch, channels, low_h, low_w", SHAPES)
def test_upsample_matches_interpolate(device, dtype, mode, align_corners, batch, channels, low_h, low_w):
    x = torch.randn(batch, channels, low_h, low_w).to(device, dtype)
    out = run(x, mode, align_corners)
    assert out.shape == (batch, channels, 2 * low_h, 2 * low_w)
    assert not out.isnan().any(), "unwritten output elements"
    if mode == "nearest":
        assert torch.equal(out.cpu(), interpolate(x.cpu(), mode, align_corners))  # a copy: bit-exact
        return
    exact = interpolate(x.double().cpu(), mode, align_corners)
    # Blended in fp32 and rounded once, as PyTorch does: at most its own error against float64 (with a floor).
    same_dtype = interpolate(x.float().cpu(), mode, align_corners).to(dtype)
    assert_error_ratio(out, same_dtype, exact, factor=1.5)
    err = (out.double().cpu() - exact).abs().max().item()
    assert err <= {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype] * max(
        1.0, exact.abs().max().item()
    )


@pytest.mark.parametrize("layout", ["nhwc-contiguous", "channels-last", "sliced"])
def test_upsample_reads_any_layout(device, layout):
    base = torch.randn(2, 8, 6, 10, device=device)
    if layout == "nhwc-contiguous":
        view = base.permute(0, 2, 3, 1).contiguous()
    elif layout == "channels-last":
        view = base.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    else:  # a window of a larger map, storage offset and gaps between rows
        view = base.permute(0, 2, 3, 1)[:, 1:5, 2:9, 1:7]
    out = upsample2x_nhwc(view, "bilinear")
    expected = interpolate(view.permute(0, 3, 1, 2).double().cpu(), "bilinear", False)
    torch.testing.assert_close(out.permute(0, 3, 1, 2).double().cpu(), expected, rtol=1e-6, atol=1e-6)
    assert out.is_contiguous()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("mode, align_corners", MODES)
def test_special_values_follow_torch(device, value, mode, align_corners):
    x = torch.randn(1, 4, 5, 6)
    x[0, 1, 2, 3] = value
    x[0, 3, 0, 0] = value
    out = run(x.to(device), mode, align_corners).cpu()
    expected = interpolate(x, mode, align_corners)
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.isinf(), expected.isinf())
    finite = expected.isfinite()
    torch.testing.assert_close(out[finite], expected[finite])


def test_empty_batch_and_launch_record(device):
    with launch_log() as records:
        out = upsample2x_nhwc(torch.empty(0, 3, 4, 8, device=device), "nearest")
    assert out.shape == (0, 6, 8, 8) and records == []  # nothing to write, nothing launched
    x = torch.randn(2, 3, 4, 8, device=device)
    with launch_log() as records:
        upsample2x_nhwc(x, "bilinear", align_corners=True)
    (record,) = records
    assert record.name == "upsample2x" and record.flops == 0
    assert record.bytes_read == x.numel() * 4 and record.bytes_written == 4 * x.numel() * 4


def test_bad_input_errors(device):
    x = torch.randn(1, 4, 4, 3, device=device)
    with pytest.raises(ValueError, match=r"expected a 4-D \(N, H, W, C\) view, got shape \(4, 4, 3\)"):
        upsample2x_nhwc(x[0], "nearest")
    with pytest.raises(
        ValueError,
        match="mode must be one of \\['nearest', 'bilinear', 'pixelshuffle', 'pixelshuffle_blur'\\], got 'bicubic'",
    ):
        upsample2x_nhwc(x, "bicubic")
    with pytest.raises(ValueError, match="align_corners only applies to bilinear"):
        upsample2x_nhwc(x, "nearest", align_corners=True)
    with pytest.raises(TypeError, match=r"bfloat16 tensor \(or float64 under TRITON_INTERPRET=1\), got torch.int32"):
        upsample2x_nhwc(x.int(), "nearest")


@pytest.mark.parametrize("align_corners", [False, True], ids=["half-pixel", "align-corners"])
def test_source_rows_of_an_output_row_pair(align_corners):
    """The bilinear kernel makes output rows 2i .. 2i + 3 from the blends of source rows i - 1 .. i + 2, taking row
    2i's lower corner as max(i - 1, 0) and row 2i + 1's as i: what the fp32 source coordinate gives for every map up
    to 4096 rows (the scale rounded to fp32 as a kernel argument, the product in fp32, as the kernel computes it)."""
    for low in range(1, 4097):
        out = np.arange(2 * low, dtype=np.float32)
        if align_corners:
            scale = np.float32((low - 1) / (2 * low - 1) if low > 1 else 0.0)
            src = out * scale
        else:
            src = np.maximum((out + np.float32(0.5)) * np.float32(0.5) - np.float32(0.5), np.float32(0.0))
        lower = np.minimum(src.astype(np.int32), low - 1)
        expected = np.maximum((np.arange(2 * low) - 1) // 2, 0)
        assert np.array_equal(lower, expected), f"low size {low}: rows {np.nonzero(lower != expected)[0][:4]}"
