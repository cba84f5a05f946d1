"""Weight and bias gradients of a conv (kernels/conv_grad.py) against float64 ``torch.nn.grad.conv2d_weight``.

Error bound per element: the products summed are bounded by ``(|X|^T |dZ|)[k, n]`` (the same im2col GEMM on absolute
values), so an fp32-accumulated sum of half-precision products is within ``c * eps * that`` (an atol scaled by K
alone is useless at K ~ 10^6)."""

from __future__ import annotations

import pytest
import torch

from fastunet.kernels.conv import pack_conv_weight
from fastunet.kernels.conv_grad import conv2d_weight_grad_nhwc
from fastunet.parity import math_mode


def _reference(x_nchw, dz_nchw, ksize, padding):
    x64, dz64 = x_nchw.double().cpu(), dz_nchw.double().cpu()
    shape = (dz64.shape[1], x64.shape[1], ksize, ksize)
    dw = torch.nn.grad.conv2d_weight(x64, shape, dz64, padding=padding)
    bound = torch.nn.grad.conv2d_weight(x64.abs(), shape, dz64.abs(), padding=padding)
    return pack_conv_weight(dw), pack_conv_weight(bound), dz64.sum((0, 2, 3)), dz64.abs().sum((0, 2, 3))


def _check(got, expected, bound, dtype):
    # Inputs are exact in the storage dtype; products are exact in fp32; the error is fp32 accumulation only.
    # fp32 run as TF32 (10-bit mantissa, cuDNN's switch on a GPU) rounds the operands too: the bound covers that.
    eps = 2**-10 if math_mode(dtype, got.device.type) == "tf32" else 2**-23
    tol = 64 * eps * bound + 1e-30
    err = (got.double().cpu() - expected).abs()
    assert (err <= tol).all(), f"max error {err.max():.3e}, max allowed {tol.min():.3e}..{tol.max():.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("ksize", "padding"), [(3, 1), (3, 0), (1, 0)])
@pytest.mark.parametrize("shape", [(2, 5, 7, 9, 6), (1, 17, 3, 8, 20)])
def test_matches_float64(device, dtype, ksize, padding, shape):
    batch, c_in, height, width, c_out = shape
    torch.manual_seed(0)
    x = torch.randn(batch, c_in, height, width).to(dtype).to(device)
    out_h, out_w = height + 2 * padding - ksize + 1, width + 2 * padding - ksize + 1
    dz = torch.randn(batch, c_out, out_h, out_w).to(dtype).to(device)
    dw, db = conv2d_weight_grad_nhwc(x.permute(0, 2, 3, 1), dz.permute(0, 2, 3, 1), ksize, padding, splits=3)
    expected, bound, db_expected, db_bound = _reference(x, dz, ksize, padding)
    assert dw.dtype == torch.float32 and dw.shape == expected.shape
    _check(dw, expected, bound, dtype)
    _check(db, db_expected, db_bound, dtype)


def test_splits_do_not_change_the_result_beyond_rounding_and_runs_are_bitwise_equal(device):
    torch.manual_seed(1)
    x = torch.randn(2, 9, 10, 8, device=device).to(torch.bfloat16)  # NHWC already
    dz = torch.randn(2, 9, 10, 5, device=device).to(torch.bfloat16)
    one, _ = conv2d_weight_grad_nhwc(x, dz, splits=1)
    four, _ = conv2d_weight_grad_nhwc(x, dz, splits=4)
    again, _ = conv2d_weight_grad_nhwc(x, dz, splits=4)
    assert torch.equal(four, again)
    torch.testing.assert_close(one, four, rtol=1e-5, atol=1e-5)


def test_two_sources_fill_their_rows(device):
    """A decoder conv on cat([skip, up]): two launches, one per source, into one packed gradient."""
    torch.manual_seed(2)
    skip = torch.randn(1, 6, 7, 3, device=device)
    up = torch.randn(1, 6, 7, 5, device=device)
    dz = torch.randn(1, 6, 7, 4, device=device)
    out = torch.full((9 * 8, 4), float("nan"), device=device)
    conv2d_weight_grad_nhwc(skip, dz, out=out, row_offset=0, bias=False)
    conv2d_weight_grad_nhwc(up, dz, out=out, row_offset=27, bias=False)
    joined = torch.cat([skip, up], dim=3)
    expected, bound, _, _ = _reference(joined.permute(0, 3, 1, 2), dz.permute(0, 3, 1, 2), 3, 1)
    # The packed rows of the joined conv are tap-major: regroup the two sources' blocks to compare.
    got = torch.cat([out[:27].view(9, 3, 4), out[27:].view(9, 5, 4)], dim=1).reshape(72, 4)
    _check(got, expected, bound, torch.float32)


def test_nan_and_inf_propagate(device):
    x = torch.randn(1, 4, 4, 2, device=device)
    dz = torch.randn(1, 4, 4, 3, device=device)
    dz[0, 1, 1, 0] = float("nan")
    x[0, 2, 2, 1] = float("inf")
    dw, db = conv2d_weight_grad_nhwc(x, dz)
    dw, db = dw.cpu(), db.cpu()
    x64, dz64 = x.permute(0, 3, 1, 2).double().cpu(), dz.permute(0, 3, 1, 2).double().cpu()
    expected = pack_conv_weight(torch.nn.grad.conv2d_weight(x64, (3, 2, 3, 3), dz64, padding=1))
    assert torch.equal(dw.isnan(), expected.isnan())
    assert torch.equal(dw.isinf(), expected.isinf())
    assert db[0].isnan() and not db[1:].isnan().any()


def test_bad_arguments_are_refused(device):
    x, dz = torch.randn(1, 4, 4, 2, device=device), torch.randn(1, 4, 4, 3, device=device)
    with pytest.raises(ValueError, match=r"dz: expected shape \(1, 2, 2, C_out\)"):
        conv2d_weight_grad_nhwc(x, dz, 3, 0)
    with pytest.raises(ValueError, match="share dtype"):
        conv2d_weight_grad_nhwc(x, dz.half())
    with pytest.raises(ValueError, match="ksize 1 or 3"):
        conv2d_weight_grad_nhwc(x, dz, 5, 2)
    with pytest.raises(ValueError, match="rows"):
        conv2d_weight_grad_nhwc(x, dz, out=torch.zeros(10, 3, device=device), row_offset=0)
    with pytest.raises(ValueError, match="splits must be"):
        conv2d_weight_grad_nhwc(x, dz, splits=0)
    with pytest.raises(ValueError, match="4-D"):
        conv2d_weight_grad_nhwc(x[0], dz)
