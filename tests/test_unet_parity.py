"""Whole-network parity: FastUNet's Triton forward against the reference U-Net evaluated in float64."""

from __future__ import annotations

import itertools

import pytest
import torch

from fastunet import FastUNet, UNet
from fastunet.kernels import launch_log
from fastunet.parity import randomize_norm_stats
from tolerances import assert_network_close, precision_key

UPSAMPLES = [
    pytest.param("transpose", False, id="transpose"),
    pytest.param("bilinear", False, id="bilinear"),
    pytest.param("bilinear", True, id="bilinear-ac"),
    pytest.param("nearest", False, id="nearest"),
]
NORMS = [pytest.param(None, id="no-norm"), pytest.param("batch", id="batchnorm")]
DEPTHS = [1, 2, 3, 4]
# (height, width): even, odd, prime, H != W; all survive four poolings.
SIZES = [(16, 16), (17, 19), (23, 29), (31, 18)]
BATCHES = [1, 3, 2]
BASE = 4


def build_pair(device, dtype, **config) -> tuple[FastUNet, UNet]:
    """A FastUNet in ``dtype`` and a float64 CPU reference holding the same (rounded) parameters."""
    reference = UNet(**config)
    randomize_norm_stats(reference)
    fast = FastUNet(**config)
    fast.load_state_dict(reference.state_dict(), strict=True)
    fast = fast.to(device, dtype).eval()
    reference64 = UNet(**config).double()
    reference64.load_state_dict(fast.state_dict(), strict=True)
    return fast, reference64.eval()


def check_parity(device, dtype, batch, height, width, **config) -> None:
    fast, reference64 = build_pair(device, dtype, **config)
    x = torch.randn(batch, config["in_channels"], height, width).to(device, dtype)
    with torch.no_grad(), launch_log() as launches:
        out = fast(x)
        expected = reference64(x.double().cpu())
    assert fast.last_backend in ("triton", "triton-interpreter")
    if batch:
        assert launches, "no kernel ran"
    assert out.dtype == dtype
    assert_network_close(out, expected, precision_key(dtype, device))


def _matrix():
    """Every (upsample, norm, depth), with sizes, batches and dtypes rotated across them."""
    cases = []
    for index, (up, norm, depth) in enumerate(itertools.product(UPSAMPLES, NORMS, DEPTHS)):
        height, width = SIZES[index % len(SIZES)]
        batch = BATCHES[index % len(BATCHES)]
        upsample, align_corners = up.values
        for dtype_name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            cases.append(
                pytest.param(
                    upsample, align_corners, norm.values[0], depth, batch, height, width, dtype,
                    id=f"{up.id}-{norm.id}-d{depth}-n{batch}-{height}x{width}-{dtype_name}",
                )
            )  # fmt: skip
    return cases


@pytest.mark.parametrize("upsample, align_corners, norm, depth, batch, height, width, dtype", _matrix())
def test_unet_parity(device, ieee_fp32, upsample, align_corners, norm, depth, batch, height, width, dtype):
    check_parity(
        device, dtype, batch, height, width,
        in_channels=3, num_classes=2, base_channels=BASE, depth=depth, upsample=upsample, norm=norm,
        align_corners=align_corners,
    )  # fmt: skip


@pytest.mark.parametrize("upsample, align_corners", UPSAMPLES)
def test_unet_parity_batch_zero(device, upsample, align_corners):
    fast, _ = build_pair(device, torch.float32, in_channels=3, num_classes=2, base_channels=BASE, depth=2,
                         upsample=upsample, align_corners=align_corners)  # fmt: skip
    with torch.no_grad(), launch_log() as launches:
        out = fast(torch.randn(0, 3, 9, 10, device=device))
    assert out.shape == (0, 2, 9, 10)
    assert launches == []


@pytest.mark.parametrize("upsample, align_corners", UPSAMPLES)
def test_unet_parity_bf16(device, upsample, align_corners):
    check_parity(device, torch.bfloat16, 2, 19, 17, in_channels=3, num_classes=2, base_channels=BASE, depth=3,
                 upsample=upsample, norm="batch", align_corners=align_corners)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("upsample, align_corners", UPSAMPLES)
@pytest.mark.parametrize("depth", DEPTHS)
def test_unet_parity_tf32_gpu(device, upsample, align_corners, depth):
    torch.backends.cudnn.allow_tf32 = True
    check_parity(device, torch.float32, 2, 37, 45, in_channels=3, num_classes=2, base_channels=16, depth=depth,
                 upsample=upsample, norm="batch", align_corners=align_corners)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("upsample, align_corners", UPSAMPLES)
def test_unet_parity_reference_width_gpu(device, dtype, upsample, align_corners):
    """The classic 64-channel, depth-4 network at a moderate size."""
    check_parity(device, dtype, 2, 128, 96, in_channels=3, num_classes=2, base_channels=64, depth=4,
                 upsample=upsample, norm=None, align_corners=align_corners)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("height, width", SIZES + [(16, 33), (47, 16)])
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("upsample, align_corners", UPSAMPLES)
def test_unet_parity_full_sweep(device, ieee_fp32, upsample, align_corners, norm, depth, height, width, batch, dtype):
    check_parity(
        device, dtype, batch, height, width,
        in_channels=3, num_classes=2, base_channels=BASE, depth=depth, upsample=upsample, norm=norm,
        align_corners=align_corners,
    )  # fmt: skip
