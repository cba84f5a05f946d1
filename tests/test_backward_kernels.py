"""The backward's elementwise and gather kernels (kernels/backward.py) against float64 autograd of the torch ops they
differentiate: ``F.max_pool2d(F.relu(z), 2)`` plus a direct gradient, and ``center_pad(F.interpolate(low, 2x))``.

Every input the kernels read sits inside a larger NaN-filled buffer (a row and column of NaN around the map, NaN
channels before and after it): a read outside the view pulls NaN into the result. Outputs start as NaN
(``poison_outputs``): an element never written cannot pass. The moat cases at the end also place the outputs in
fill (and, under the interpreter, audit every address the kernels touch), with ``tests/test_moat.py``'s tools.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from test_moat import AddressAudit, HostGuard, MoatedLaunch, hooked_memory_ops

from fastunet.kernels import INTERPRET, launch_log
from fastunet.kernels import backward as backward_module
from fastunet.kernels.backward import (
    activation_pool_backward_nhwc,
    center_pad_offsets,
    head_backward_nhwc,
    upsample2x_adjoint_nhwc,
)
from fastunet.kernels.stats import NormIn
from fastunet.reference import center_pad

NAN = float("nan")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
# Unit roundoff of one rounding to the storage dtype.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}


def nchw(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


def nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1)


def in_moat(t: torch.Tensor, channels_before: int = 3) -> torch.Tensor:
    """``t`` (N, H, W, C) copied into the interior of an (N, H + 2, W + 2, C + channels_before + 2) NaN buffer:
    a strided view, a channel slice ``wide[..., c0:c0 + C]`` of a wider map, with NaN in every neighbour."""
    batch, height, width, channels = t.shape
    wide = torch.full((batch, height + 2, width + 2, channels + channels_before + 2), NAN, dtype=t.dtype)
    wide = wide.to(t.device)
    view = wide[:, 1 : height + 1, 1 : width + 1, channels_before : channels_before + channels]
    view.copy_(t)
    return view


def pre_activation(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """NHWC map with many ties (half the elements on the grid {-1, -0.5, 0, 0.5, 1}) and a few NaNs."""
    normal = torch.randn(shape)
    grid = torch.randint(-2, 3, shape).double() * 0.5
    z = torch.where(torch.rand(shape) < 0.5, grid, normal)
    z[torch.rand(shape) < 0.04] = NAN
    return z.to(device, dtype)


# ---------------------------------------------------------------------------------------------------------------
# Activation and max-pool backward
# ---------------------------------------------------------------------------------------------------------------
def pool_reference(z, grad_y, grad_pooled, activation: str) -> torch.Tensor:
    """dz by float64 autograd: y = relu(z) (or z), gradient grad_y at y and grad_pooled at max_pool2d(y, 2)."""
    z64 = nchw(z).double().cpu().requires_grad_()
    y64 = F.relu(z64) if activation == "relu" else z64
    outputs, grads = [], []
    if grad_y is not None:
        outputs.append(y64)
        grads.append(nchw(grad_y).double().cpu())
    if grad_pooled is not None and grad_pooled.numel():  # max_pool2d refuses maps without a window
        outputs.append(F.max_pool2d(y64, 2))
        grads.append(nchw(grad_pooled).double().cpu())
    if not outputs or z64.numel() == 0:
        return nhwc(torch.zeros_like(z64))
    (dz,) = torch.autograd.grad(outputs, z64, grads)
    return nhwc(dz)


def check_pool_backward(z, grad_y, grad_pooled, activation, dtype):
    """The kernel against float64 autograd, bit for bit: the float64 sum of the (at most two) storage-dtype terms is
    exact, and the kernel's fp32 sum rounded to the storage dtype is the same as that exact sum rounded through fp32
    (what ``.to(dtype)`` does)."""
    y = F.relu(z) if activation == "relu" else z
    dz = activation_pool_backward_nhwc(
        in_moat(y),
        None if grad_y is None else in_moat(grad_y),
        None if grad_pooled is None else in_moat(grad_pooled),
        activation=activation,
    )
    assert dz.shape == z.shape and dz.dtype == dtype and dz.is_contiguous()
    expected = pool_reference(z, grad_y, grad_pooled, activation).to(dtype)
    torch.testing.assert_close(dz.cpu(), expected, rtol=0, atol=0, equal_nan=True)


# (batch, height, width, channels): odd sizes (half windows in the last row and column), one window, no window
# (H or W == 1), batch 0, channel counts below, at and past the 64-wide block.
POOL_SHAPES = [
    pytest.param(2, 5, 7, 17, id="5x7-c17"),
    pytest.param(1, 3, 3, 1, id="3x3-c1"),
    pytest.param(1, 2, 2, 70, id="2x2-c70"),
    pytest.param(2, 6, 4, 3, id="6x4-c3"),
    pytest.param(1, 1, 1, 5, id="1x1"),
    pytest.param(2, 1, 6, 4, id="1x6"),
    pytest.param(1, 5, 1, 2, id="5x1"),
    pytest.param(0, 4, 4, 3, id="batch0"),
]
GRADS = [
    pytest.param(True, True, id="both"),
    pytest.param(False, True, id="pooled-only"),
    pytest.param(True, False, id="direct-only"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_direct, with_pooled", GRADS)
@pytest.mark.parametrize("batch, height, width, channels", POOL_SHAPES)
def test_activation_pool_backward_matches_float64(device, dtype, with_direct, with_pooled, batch, height, width,
                                                  channels):  # fmt: skip
    z = pre_activation((batch, height, width, channels), dtype, device)
    grad_y = torch.randn(batch, height, width, channels).to(device, dtype) if with_direct else None
    pooled_shape = (batch, height // 2, width // 2, channels)
    grad_pooled = torch.randn(pooled_shape).to(device, dtype) if with_pooled else None
    check_pool_backward(z, grad_y, grad_pooled, "relu", dtype)


# Windows written out (row-major: top-left, top-right, bottom-left, bottom-right), each next to one of 1.5s.
SPECIAL_WINDOWS = [
    pytest.param([3.0, 3.0, 3.0, 3.0], id="all-equal"),
    pytest.param([1.0, 3.0, 3.0, 0.0], id="tie-second-third"),
    pytest.param([2.0, 1.0, 0.5, 2.0], id="tie-first-last"),
    pytest.param([NAN, 1.0, NAN, 2.0], id="two-nans"),
    pytest.param([1.0, NAN, 5.0, 0.0], id="nan-then-larger"),
    pytest.param([NAN, NAN, NAN, NAN], id="all-nan"),
    pytest.param([-float("inf")] * 4, id="all-minus-inf"),
    pytest.param([-1.0, -2.0, -1.0, -3.0], id="negative-tie"),
    pytest.param([float("inf"), float("inf"), 0.0, 1.0], id="inf-tie"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("window", SPECIAL_WINDOWS)
def test_pool_routes_ties_and_nans_like_torch(device, dtype, activation, window):
    """The pooled gradient goes where ``max_pool2d``'s backward sends it: the first of equal maxima, the window's
    last NaN, the first element of an all -inf window."""
    z = torch.full((1, 2, 4, 3), 1.5, dtype=torch.float64)
    z[0, :, :2, 1] = torch.tensor(window, dtype=torch.float64).view(2, 2)
    z = z.to(device, dtype)
    grad_pooled = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0]).view(1, 1, 2, 3).to(device, dtype)
    check_pool_backward(z, None, grad_pooled, activation, dtype)
    grad_y = torch.randn(1, 2, 4, 3).to(device, dtype)
    check_pool_backward(z, grad_y, grad_pooled, activation, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_none_and_any_strides(device, dtype):
    """No activation: dz is grad_y plus the routed pooled gradient. y, grad_y and grad_pooled are NCHW tensors read
    through their NHWC views (channel strides H W and H W / 4), grad_y a channel slice of a wider gradient."""
    z = nhwc(nchw(pre_activation((2, 5, 6, 20), dtype, device)).contiguous())
    grad_y = nhwc(torch.randn(2, 36, 5, 6).to(device, dtype))[..., 16:]
    grad_pooled = nhwc(torch.randn(2, 20, 2, 3).to(device, dtype))
    assert z.stride(3) == 30 and grad_y.stride(3) == 30 and grad_pooled.stride(3) == 6
    dz = activation_pool_backward_nhwc(z, grad_y, grad_pooled, activation="none")
    expected = pool_reference(z, grad_y, grad_pooled, "none").to(dtype)
    torch.testing.assert_close(dz.cpu(), expected, rtol=0, atol=0, equal_nan=True)


def read_pool_reference(z, scale, shift, grad_pooled, activation, dtype):
    """Float64 reference of the normalize+pool launch's backward: the pool's input ``a = act(z * scale + shift)``
    rounded to ``dtype`` as the forward stored it, ``max_pool2d``'s own routing of the pooled gradient over it, then
    autograd of the read (z NHWC; scale and shift (N, C)). Returns (dz, grad_scale, grad_shift)."""
    z64 = z.double().cpu().requires_grad_()
    s64, t64 = scale.double().cpu().requires_grad_(), shift.double().cpu().requires_grad_()
    u = z64 * s64[:, None, None, :] + t64[:, None, None, :]
    a = {"relu": F.relu, "leaky_relu": lambda v: F.leaky_relu(v, 0.1), "clamp": lambda v: F.hardtanh(v, -0.4, 0.6),
         "none": lambda v: v}[activation](u)  # fmt: skip
    stored = nchw(a.detach().to(dtype).double()).requires_grad_()
    if grad_pooled.numel() == 0:  # no whole window (max_pool2d refuses such a map): nothing routed
        return torch.autograd.grad(a, (z64, s64, t64), torch.zeros_like(a))
    F.max_pool2d(stored, 2).backward(nchw(grad_pooled.double().cpu()))
    return torch.autograd.grad(a, (z64, s64, t64), nhwc(stored.grad))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "clamp", "none"])
@pytest.mark.parametrize(("height", "width"), [(7, 9), (8, 6), (1, 5)], ids=["odd", "even", "one-row"])
def test_pool_backward_through_a_normalized_read_matches_float64(device, dtype, activation, height, width):
    """The normalize+pool launch's backward in one pass over z (``norm_read``): the pool's input made again as the
    forward stored it, the pooled gradient routed like ``max_pool2d``'s backward (ties, a NaN), then z's gradient
    through the read and the scale's and shift's per-image sums; against float64 (the gradient's one rounding to the
    storage dtype, the sums' fp32 accumulation)."""
    torch.manual_seed(height * width)
    z = torch.randn(2, height, width, 5).to(dtype)
    if activation != "clamp":
        # A NaN u: the window's gradient goes to it. (Not with the clamp: torch's own hardtanh backward passes a NaN
        # u's gradient on its scalar path and zeroes it on its vectorized one; the kernels pass it, as the scalar
        # path and norm_input_backward do.)
        z[0, height - 1, 2, 3] = float("nan")
    z[1, :2, :2, 1] = 0.25  # a window of equal values: the first takes the gradient
    scale, shift = torch.randn(2, 5), torch.randn(2, 5)
    grad_pooled = torch.randn(2, height // 2, width // 2, 5).to(dtype)
    read = NormIn(scale.to(device), shift.to(device), activation, 0.1, -0.4, 0.6)
    with launch_log() as records:
        dz, d_scale, d_shift = activation_pool_backward_nhwc(
            z.to(device), None, grad_pooled.to(device), activation="none", norm_read=read
        )  # fmt: skip
    names = [r.name for r in records]
    assert names[0].endswith("+norm_read") and names[1:] == ["activation_pool_backward.sum"] * 2, names
    expected, e_scale, e_shift = read_pool_reference(z, scale, shift, grad_pooled, activation, dtype)
    # One rounding to the storage dtype after fp32 products (u and g * scale): a unit roundoff of each, twice over.
    eps = 2 * (2**-8 if dtype == torch.bfloat16 else 2**-24) + 2**-22
    assert torch.equal(dz.cpu().isnan(), expected.isnan())
    err = (dz.double().cpu() - expected).abs().nan_to_num()
    assert (err <= eps * expected.abs().nan_to_num() + 1e-30).all(), f"max error {err.max():.3e}"
    for got, want in ((d_scale, e_scale), (d_shift, e_shift)):
        assert got.shape == (2, 5) and got.dtype == torch.float32
        assert torch.equal(got.cpu().isnan(), want.isnan())
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_pool_backward_through_a_normalized_read_refuses_bad_input(device):
    z = torch.randn(1, 4, 4, 3, device=device)
    gp = torch.randn(1, 2, 2, 3, device=device)
    read = NormIn(torch.ones(1, 3, device=device), torch.zeros(1, 3, device=device), "relu")
    with pytest.raises(ValueError, match="got activation 'relu', the read's 'relu'"):
        activation_pool_backward_nhwc(z, None, gp, activation="relu", norm_read=read)
    with pytest.raises(ValueError, match="the read's 'silu'"):
        activation_pool_backward_nhwc(z, None, gp, activation="none", norm_read=NormIn(read.scale, read.shift, "silu"))
    with pytest.raises(ValueError, match=r"norm_read normalization scale: expected float32 \(1, 3\)"):
        activation_pool_backward_nhwc(z, None, gp, activation="none", norm_read=NormIn(read.scale[:, :2], read.shift))


# ---------------------------------------------------------------------------------------------------------------
# Adjoint of the 2x upsampling placed into the skip's frame
# ---------------------------------------------------------------------------------------------------------------
MODES = [
    pytest.param("nearest", False, id="nearest"),
    pytest.param("bilinear", False, id="bilinear"),
    pytest.param("bilinear", True, id="bilinear-ac"),
]
# (batch, channels, low_h, low_w, frame H, frame W): the frame equal to the upsampled map, one larger (odd skip
# sizes: the extra row and column at the bottom and right), one smaller (a negative offset: the first row or column
# cropped), three larger and two smaller (offsets +1 and -1), mixed, h or w == 1, a channel count past the 64-wide
# block, batch 0.
GEOMETRIES = [
    pytest.param(2, 3, 3, 4, 6, 8, id="same"),
    pytest.param(1, 17, 3, 4, 7, 9, id="frame-larger"),
    pytest.param(2, 5, 3, 4, 5, 7, id="frame-smaller"),
    pytest.param(1, 3, 2, 3, 7, 9, id="frame-larger-by-3"),
    pytest.param(1, 3, 3, 3, 4, 5, id="frame-smaller-by-2"),
    pytest.param(1, 4, 4, 3, 9, 5, id="mixed"),
    pytest.param(1, 3, 1, 3, 3, 6, id="h1"),
    pytest.param(1, 2, 5, 1, 10, 1, id="w1-cropped"),
    pytest.param(1, 70, 2, 2, 5, 4, id="c70"),
    pytest.param(0, 3, 2, 2, 4, 4, id="batch0"),
]


def interpolate(low: torch.Tensor, mode: str, align_corners: bool) -> torch.Tensor:
    kwargs = {"align_corners": align_corners} if mode == "bilinear" else {}
    return F.interpolate(low, scale_factor=2, mode=mode, **kwargs)


def adjoint_reference(grad, low_hw, mode, align_corners, gate=None):
    """Float64 autograd of ``center_pad(F.interpolate(low, 2x), H, W)`` (of ``relu(gate)`` upsampled when gated).

    Returns the low map's gradient; the same with |grad| (the sum of the terms' magnitudes); and, per low pixel,
    the sum of |grad| over the upsampled pixels (2j-2 .. 2j+3) x (2i-2 .. 2i+3) that may read it with any weight.
    """
    batch, height, width, channels = grad.shape
    low_h, low_w = low_hw
    frame_grad = nchw(grad).double().cpu()
    results = []
    for direction in (frame_grad, frame_grad.abs()):
        if gate is None:
            low = torch.zeros(batch, channels, low_h, low_w, dtype=torch.float64, requires_grad=True)
            source = low
        else:
            low = nchw(gate).double().cpu().requires_grad_()
            source = F.relu(low)
        frame = center_pad(interpolate(source, mode, align_corners), height, width)
        if frame.numel() == 0:
            results.append(torch.zeros(batch, low_h, low_w, channels, dtype=torch.float64))
            continue
        (grad_low,) = torch.autograd.grad(frame, low, direction)
        results.append(nhwc(grad_low))
    up = torch.zeros(batch, channels, 2 * low_h, 2 * low_w, dtype=torch.float64, requires_grad=True)
    if up.numel():
        (up_abs,) = torch.autograd.grad(center_pad(up, height, width), up, frame_grad.abs())
        nearby = 36 * F.avg_pool2d(up_abs, 6, stride=2, padding=2, count_include_pad=True)
        results.append(nhwc(nearby))
    else:
        results.append(torch.zeros(batch, low_h, low_w, channels, dtype=torch.float64))
    return results


def check_adjoint(got, reference, dtype, align_corners, low_hw):
    """|got - expected| <= 16 u_fp32 sum|terms| (+ the weights' error) + one rounding to the storage dtype.

    The fp32 sum of at most 25 products, each row's sum weighted once more, is within 16 u_fp32 of the exact sum
    relative to the terms' magnitudes. Nearest and half-pixel bilinear weights (1, 0.75, 0.25, 0) are exact in fp32;
    with ``align_corners`` the fp32 source coordinate ``dst * scale`` is off by up to 2 size u_fp32, which each
    weight carries over to the |grad| of the pixels that may read the low pixel.
    """
    expected, magnitude, nearby = reference
    u32 = 2.0**-24
    tol = 16 * u32 * magnitude
    if align_corners:
        tol = tol + 2 * max(low_hw) * u32 * 2 * nearby  # two weights (row and column) per term
    if dtype != torch.float32:
        tol = tol + UNIT_ROUNDOFF[dtype] * expected.abs()
    err = (got.double().cpu() - expected).abs()
    assert not got.isnan().any(), "NaN in the result (an unwritten element, or a read outside the views)"
    assert (err <= tol).all(), f"max error {err.max():.3e} (allowed there {tol.flatten()[err.argmax()]:.3e})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode, align_corners", MODES)
@pytest.mark.parametrize("batch, channels, low_h, low_w, height, width", GEOMETRIES)
def test_upsample_adjoint_matches_float64(device, dtype, mode, align_corners, batch, channels, low_h, low_w, height,
                                          width):  # fmt: skip
    grad = torch.randn(batch, height, width, channels).to(device, dtype)
    pad_top, pad_left = center_pad_offsets(height, width, 2 * low_h, 2 * low_w)
    got = upsample2x_adjoint_nhwc(in_moat(grad), (low_h, low_w), mode, align_corners, pad_top=pad_top,
                                  pad_left=pad_left)  # fmt: skip
    assert got.shape == (batch, low_h, low_w, channels) and got.dtype == dtype and got.is_contiguous()
    check_adjoint(got, adjoint_reference(grad, (low_h, low_w), mode, align_corners), dtype, align_corners,
                  (low_h, low_w))  # fmt: skip


@pytest.mark.parametrize("gate_layout", ["moat", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode, align_corners", MODES)
def test_upsample_adjoint_gate(device, dtype, mode, align_corners, gate_layout):
    """The fused ReLU derivative: zero where the gate is <= 0 (zeros and negatives), passed where it is NaN, like
    autograd through ``relu``; the gradient a channel slice of a wider NCHW map, the gate inside a NaN moat or an
    NCHW tensor read through its NHWC view."""
    low_hw, channels = (3, 4), 5
    gate = torch.randn(2, *low_hw, channels)
    gate[torch.rand(gate.shape) < 0.2] = 0.0
    gate[torch.rand(gate.shape) < 0.1] = NAN
    gate = gate.to(device, dtype)
    grad = nhwc(torch.randn(2, channels + 11, 7, 9).to(device, dtype))[..., 11:]  # channel stride 63
    pad_top, pad_left = center_pad_offsets(7, 9, 6, 8)
    gate_view = in_moat(gate) if gate_layout == "moat" else nhwc(nchw(gate).contiguous())
    got = upsample2x_adjoint_nhwc(grad, low_hw, mode, align_corners, pad_top=pad_top, pad_left=pad_left,
                                  gate=gate_view)  # fmt: skip
    assert (got[gate <= 0] == 0).all()
    check_adjoint(got, adjoint_reference(grad, low_hw, mode, align_corners, gate=gate), dtype, align_corners, low_hw)


@pytest.mark.parametrize("mode, align_corners", MODES)
@pytest.mark.parametrize("pad_top, pad_left", [(2, -3), (-2, 1)])
def test_upsample_adjoint_any_offsets(device, mode, align_corners, pad_top, pad_left):
    """Offsets other than centered ones: the adjoint of ``F.pad`` with those pads (negative: cropped)."""
    low_hw, frame = (3, 4), (7, 6)
    grad = torch.randn(2, *frame, 3)
    got = upsample2x_adjoint_nhwc(in_moat(grad.to(device)), low_hw, mode, align_corners, pad_top=pad_top,
                                  pad_left=pad_left)  # fmt: skip
    low = torch.zeros(2, 3, *low_hw, dtype=torch.float64, requires_grad=True)
    up = interpolate(low, mode, align_corners)
    pads = [pad_left, frame[1] - up.shape[3] - pad_left, pad_top, frame[0] - up.shape[2] - pad_top]
    (expected,) = torch.autograd.grad(F.pad(up, pads), low, nchw(grad).double())
    torch.testing.assert_close(got.cpu().double(), nhwc(expected), rtol=1e-5, atol=1e-5)


def test_center_pad_offsets_place_like_center_pad():
    """Each upsampled pixel lands where ``center_pad`` puts it, for frames larger, equal and smaller (cropping)."""
    for height, width, up_h, up_w in [(7, 9, 6, 8), (6, 8, 6, 8), (5, 7, 6, 8), (9, 4, 6, 8), (1, 2, 2, 2)]:
        up = torch.arange(1, up_h * up_w + 1, dtype=torch.float64).view(1, 1, up_h, up_w)
        frame = center_pad(up, height, width)[0, 0]
        pad_top, pad_left = center_pad_offsets(height, width, up_h, up_w)
        for fy in range(height):
            for fx in range(width):
                uy, ux = fy - pad_top, fx - pad_left
                inside = 0 <= uy < up_h and 0 <= ux < up_w
                assert frame[fy, fx] == (up[0, 0, uy, ux] if inside else 0), (height, width, fy, fx)


def test_bilinear_adjoint_long_align_corners_map(device):
    """A long low map: the fp32 source coordinate of ``align_corners`` drifts by up to 2 size u_fp32, the bound
    holds."""
    low_hw = (1, 600)
    grad = torch.randn(1, 2, 1200, 2, device=device)
    got = upsample2x_adjoint_nhwc(grad, low_hw, "bilinear", True)
    check_adjoint(got, adjoint_reference(grad, low_hw, "bilinear", True), torch.float32, True, low_hw)


@pytest.mark.parametrize("mode, align_corners", MODES)
def test_upsample_adjoint_nan_reaches_the_pixels_that_read_it(device, mode, align_corners):
    """A NaN gradient reaches exactly the low pixels that read its pixel with a nonzero weight (the float64 adjoint
    of the NaN indicator is positive there); the others match the adjoint of the finite part. Eager PyTorch also
    spreads a NaN at bilinear output row 0 through a zero weight to low row 1: not here (see the docstring)."""
    low_hw = (4, 5)
    grad = torch.randn(1, 9, 10, 2)
    grad[0, 0, 0, 0] = NAN  # output (0, 0): the extra frame row is at the bottom
    grad[0, 6, 7, 1] = NAN
    grad[0, 8, 3, 1] = NAN  # the frame's padded last row: read by nothing
    pad_top, pad_left = center_pad_offsets(9, 10, 8, 10)
    got = upsample2x_adjoint_nhwc(grad.to(device), low_hw, mode, align_corners, pad_top=pad_top, pad_left=pad_left)
    reached = adjoint_reference(grad.isnan().double(), low_hw, mode, align_corners)[0] > 0
    assert reached.sum() >= 2 and torch.equal(got.isnan().cpu(), reached)
    expected = adjoint_reference(grad.nan_to_num(0.0), low_hw, mode, align_corners)[0]
    torch.testing.assert_close(got.cpu()[~reached].double(), expected[~reached], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The 1x1 head's backward in one pass
# ---------------------------------------------------------------------------------------------------------------
def head_case(batch, height, width, channels, classes, dtype, device):
    """The map (NHWC view in a NaN moat), the logits' gradient (an NCHW tensor's NHWC view, in a moat) and the
    packed weight."""
    a = in_moat(torch.randn(batch, height, width, channels).to(device, dtype))
    grad = nhwc(in_moat(torch.randn(batch, classes, height, width).to(device, dtype), channels_before=1))
    weight = torch.randn(channels, classes).to(device, dtype)
    return a, grad, weight


def head_reference(a, grad, weight):
    a64, g64, w64 = (t.detach().double().cpu() for t in (a, grad, weight))
    return g64 @ w64.t(), torch.einsum("nhwc,nhwk->ck", a64, g64), g64.sum((0, 1, 2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("batch", "height", "width", "channels", "classes", "programs"),
    [
        pytest.param(2, 7, 5, 19, 3, None, id="odd"),
        pytest.param(1, 16, 9, 64, 2, None, id="64-channels"),
        pytest.param(3, 5, 33, 128, 17, None, id="widest"),
        pytest.param(1, 1, 1, 1, 1, None, id="one-pixel"),
        pytest.param(2, 19, 23, 24, 5, 3, id="three-programs"),  # 14 steps: 5, 5 and 4 a program
        pytest.param(1, 16, 8, 64, 2, 1, id="one-program"),
    ],
)
def test_head_backward_matches_float64(device, dtype, batch, height, width, channels, classes, programs):
    """``da = g W^T``, ``dW = a^T g`` and ``db = sum g`` against float64, inputs in NaN moats (a stray read
    poisons the result) and outputs poisoned (an unwritten element fails); each error within its fp32
    accumulation's bound (``K * 2^-24`` times the sum of the products' magnitudes), plus da's storage rounding."""
    a, grad, weight = head_case(batch, height, width, channels, classes, dtype, device)
    da, dw, db = head_backward_nhwc(a, grad, weight, programs=programs)
    expected_da, expected_dw, expected_db = head_reference(a, grad, weight)
    assert da.dtype == dtype and dw.dtype == db.dtype == torch.float32 and da.is_contiguous()
    pixels = batch * height * width
    tf32 = 2 * 2.0**-11 if dtype == torch.float32 and device.type == "cuda" else 0.0  # operands rounded on a GPU
    a64, g64, w64 = a.double().abs().cpu(), grad.double().abs().cpu(), weight.double().abs().cpu()
    da_bound = ((classes + 1) * 2.0**-24 + tf32 + UNIT_ROUNDOFF[dtype]) * (g64 @ w64.t())
    dw_bound = (pixels * 2.0**-24 + tf32) * torch.einsum("nhwc,nhwk->ck", a64, g64)
    db_bound = pixels * 2.0**-24 * g64.sum((0, 1, 2))
    for got, expected, bound in ((da, expected_da, da_bound), (dw, expected_dw, dw_bound), (db, expected_db, db_bound)):
        assert not got.isnan().any()
        assert ((got.double().cpu() - expected).abs() <= bound + 1e-30).all()
    _, _, no_bias = head_backward_nhwc(a, grad, weight, bias=False)
    assert no_bias is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_head_backward_with_the_relu_mask(device, dtype):
    """``mask=True`` (the map is a ReLU's output): ``da = where(a <= 0, 0, g W^T)`` as threshold_backward has it (a
    NaN map value passes the gradient, +inf keeps it, zero and negative zero drop it), bit for bit the unmasked
    launch's ``da`` where kept, and the same dW (NaN where the map has one) and db bit for bit."""
    a, grad, weight = head_case(2, 9, 7, 24, 3, dtype, device)
    values = a.clone()
    values.copy_(torch.relu(values))
    values[0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), 0.0, -0.0])
    values[1, 2, 3, 5] = float("nan")
    with launch_log() as records:
        da, dw, db = head_backward_nhwc(values, grad, weight, mask=True)
    plain_da, plain_dw, plain_db = head_backward_nhwc(values, grad, weight)
    assert [r.name for r in records] == ["head_backward+mask", "head_backward.sum"]
    kept = ~(values <= 0)
    assert kept.sum() < kept.numel() and (~kept).sum() > 0
    assert torch.equal(da[~kept], torch.zeros_like(da[~kept]))
    assert torch.equal(da[kept], plain_da[kept]) and not da[kept].isnan().any()
    torch.testing.assert_close(dw, plain_dw, rtol=0, atol=0, equal_nan=True)  # NaN and inf rows of a^T g alike
    assert torch.equal(db, plain_db)
    expected = torch.where(values.double().cpu() <= 0, 0.0, head_reference(values, grad, weight)[0])
    g64, w64 = grad.double().abs().cpu(), weight.double().abs().cpu()
    bound = (4 * 2.0**-24 + 2 * 2.0**-11 + UNIT_ROUNDOFF[dtype]) * (g64 @ w64.t())
    assert ((da.double().cpu() - expected).abs() <= bound + 1e-30).all()


def test_head_backward_is_bitwise_repeatable_in_two_launches(device):
    a, grad, weight = head_case(2, 13, 11, 64, 2, torch.bfloat16, device)
    with launch_log() as records:
        first = head_backward_nhwc(a, grad, weight)
        second = head_backward_nhwc(a, grad, weight)
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    assert [record.name for record in records] == ["head_backward", "head_backward.sum"] * 2


READ_ACTIVATIONS = ["relu", "leaky_relu", "clamp", "none"]


def read_reference(z, scale, shift, activation):
    """Float64 ``act(z * scale + shift)`` (z NHWC, scale and shift (N, C)), differentiable."""
    u = z * scale[:, None, None, :] + shift[:, None, None, :]
    if activation == "relu":
        return F.relu(u)
    if activation == "leaky_relu":
        return F.leaky_relu(u, 0.1)
    if activation == "clamp":
        return F.hardtanh(u, -0.4, 0.6)
    return u


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", READ_ACTIVATIONS)
@pytest.mark.parametrize(
    ("batch", "height", "width", "channels", "classes", "programs"),
    [pytest.param(2, 7, 5, 19, 3, None, id="odd"), pytest.param(3, 9, 11, 24, 2, 2, id="two-programs-an-image")],
)
def test_head_backward_through_a_normalized_read_matches_float64(
    device, dtype, activation, batch, height, width, channels, classes, programs
):  # fmt: skip
    """``norm_read`` (the head read its map as ``act(z * scale + shift)``): one pass over z gives z's gradient through
    the read, the read's scale and shift gradients (per image), and ``dW = a^T g`` over the values the head read (made
    again, rounded once to the map's dtype as its loader rounded them) and ``db``, against float64 autograd; inputs
    in NaN moats, outputs poisoned. Bounds: the fp32 sums' (``K * 2^-24`` times the products' magnitudes) carried
    through the read, plus the storage roundings."""
    torch.manual_seed(batch + channels)
    z, grad, weight = head_case(batch, height, width, channels, classes, dtype, device)
    scale = (torch.rand(batch, channels) + 0.5) * torch.where(torch.rand(batch, channels) < 0.3, -1.0, 1.0)
    shift = torch.randn(batch, channels)
    read = NormIn(scale.to(device), shift.to(device), activation, 0.1, -0.4, 0.6)
    with launch_log() as records:
        dz, sums, d_scale, d_shift = backward_module.head_backward_sums_nhwc(
            z, grad, weight, programs=programs, norm_read=read
        )  # fmt: skip
    names = [r.name for r in records]
    assert names == ["head_backward+norm_read", "head_backward.sum"] + ["head_backward+norm_read.sum"] * 2, names
    assert dz.dtype == dtype and dz.is_contiguous() and d_scale.shape == d_shift.shape == (batch, channels)
    z64 = z.detach().double().cpu().requires_grad_()
    s64, t64 = scale.double().requires_grad_(), shift.double().requires_grad_()
    a64 = read_reference(z64, s64, t64, activation)
    g64, w64 = grad.double().cpu(), weight.double().cpu()
    da64 = g64 @ w64.t()
    expected_z, expected_s, expected_t = torch.autograd.grad(a64, (z64, s64, t64), da64)
    read_values = a64.detach().to(dtype).double()  # what the head's loader read
    tf32 = 2 * 2.0**-11 if dtype == torch.float32 and device.type == "cuda" else 0.0
    da_bound = ((classes + 1) * 2.0**-24 + tf32) * (g64.abs() @ w64.abs().t())  # act' is 0, 1 or the slope
    zd, sd = z64.detach().abs(), s64.detach().abs()[:, None, None, :]
    per_image = height * width
    checks = [
        (dz, expected_z, (da_bound + 2.0**-23 * da64.abs()) * sd + UNIT_ROUNDOFF[dtype] * expected_z.abs()),
        (d_scale, expected_s, (da_bound * zd).sum((1, 2)) + per_image * 2.0**-23 * (da64.abs() * zd).sum((1, 2))),
        (d_shift, expected_t, da_bound.sum((1, 2)) + per_image * 2.0**-23 * da64.abs().sum((1, 2))),
        (sums[:channels], torch.einsum("nhwc,nhwk->ck", read_values, g64),
         (batch * per_image * 2.0**-24 + tf32 + UNIT_ROUNDOFF[dtype])
         * torch.einsum("nhwc,nhwk->ck", read_values.abs(), g64.abs())),
        (sums[channels], g64.sum((0, 1, 2)), batch * per_image * 2.0**-24 * g64.abs().sum((0, 1, 2))),
    ]  # fmt: skip
    for index, (got, expected, bound) in enumerate(checks):
        assert not got.isnan().any(), index
        err = (got.double().cpu() - expected).abs()
        assert (err <= bound + 1e-30).all(), f"output {index}: max error {err.max():.3e}"


def test_head_backward_through_a_read_is_the_unfused_launches_bit_for_bit(device):
    """fp32, one image, the same programs: dW and db bit for bit the plain launch's over the map the read gives
    (:func:`normalize_nhwc`), and z's gradient bit for bit :func:`norm_input_backward_nhwc` of the plain launch's
    ``da``, special values included (NaN in z, inf and NaN in the logits' gradient): the masks are torch's."""
    from fastunet.kernels.norm_grad import norm_input_backward_nhwc
    from fastunet.kernels.stats import normalize_nhwc

    z, grad, weight = head_case(1, 12, 10, 24, 3, torch.float32, device)
    z[0, 2, 3, 4], z[0, 7, 1, 0] = NAN, float("inf")
    grad[0, 5, 5, 1], grad[0, 9, 2, 0] = float("inf"), NAN
    scale, shift = torch.randn(1, 24, device=device), torch.randn(1, 24, device=device)
    for activation in READ_ACTIVATIONS:
        read = NormIn(scale, shift, activation, 0.1, -0.4, 0.6)
        dz, sums, d_scale, d_shift = backward_module.head_backward_sums_nhwc(z, grad, weight, programs=2,
                                                                             norm_read=read)  # fmt: skip
        applied = normalize_nhwc(z, read)
        da, plain_sums = backward_module.head_backward_sums_nhwc(applied, grad, weight, programs=2)
        torch.testing.assert_close(sums, plain_sums, rtol=0, atol=0, equal_nan=True)
        expected = norm_input_backward_nhwc(da, z, scale, shift, activation, 0.1, -0.4, 0.6)
        torch.testing.assert_close(dz, expected[0], rtol=0, atol=0, equal_nan=True)
        for got, want in zip((d_scale, d_shift), expected[1:], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_head_backward_refuses_bad_input(device):
    a, grad, weight = head_case(1, 4, 4, 8, 2, torch.float32, device)
    with pytest.raises(ValueError, match=r"weight: expected a \(8, n_cls\) packed 1x1 weight, got \(7, 2\)"):
        head_backward_nhwc(a, grad, weight[:7])
    with pytest.raises(ValueError, match=r"grad_logits: expected shape \(1, 4, 4, 3\), got \(1, 4, 4, 2\)"):
        head_backward_nhwc(a, grad, torch.randn(8, 3, device=device))
    with pytest.raises(ValueError, match="weight: expected torch.float32 on"):
        head_backward_nhwc(a, grad, weight.bfloat16())
    with pytest.raises(ValueError, match="programs: expected a positive int, got 0"):
        head_backward_nhwc(a, grad, weight, programs=0)
    with pytest.raises(ValueError, match="at most 128 channels and 64 classes, got 8 and 65"):
        head_backward_nhwc(a, torch.randn(1, 4, 4, 65, device=device), torch.randn(8, 65, device=device))
    read = NormIn(torch.ones(1, 8, device=device), torch.zeros(1, 8, device=device), "relu")
    with pytest.raises(ValueError, match="mask .* and norm_read .* describe different maps"):
        backward_module.head_backward_sums_nhwc(a, grad, weight, mask=True, norm_read=read)
    with pytest.raises(ValueError, match=r"norm_read normalization scale: expected float32 \(1, 8\)"):
        backward_module.head_backward_sums_nhwc(
            a, grad, weight, norm_read=NormIn(read.scale[:, :4], read.shift, "relu")
        )
    with pytest.raises(
        ValueError, match="the read's activation must be one of relu, leaky_relu, clamp, none, got 'silu'"
    ):
        backward_module.head_backward_sums_nhwc(a, grad, weight, norm_read=NormIn(read.scale, read.shift, "silu"))


# ---------------------------------------------------------------------------------------------------------------
# Both kernels: determinism, launches, bad input
# ---------------------------------------------------------------------------------------------------------------
def test_runs_are_bitwise_identical_and_launch_once(device):
    z = pre_activation((2, 7, 5, 19), torch.bfloat16, device)
    y = F.relu(z)
    grad_y = torch.randn(2, 7, 5, 19).to(device, torch.bfloat16)
    grad_pooled = torch.randn(2, 3, 2, 19).to(device, torch.bfloat16)
    grad = torch.randn(2, 9, 11, 19).to(device, torch.bfloat16)
    with launch_log() as records:
        first = activation_pool_backward_nhwc(y, grad_y, grad_pooled)
        second = activation_pool_backward_nhwc(y, grad_y, grad_pooled)
        adjoint = upsample2x_adjoint_nhwc(grad, (4, 5), "bilinear", pad_top=1, pad_left=0, gate=y[:, :4])
        again = upsample2x_adjoint_nhwc(grad, (4, 5), "bilinear", pad_top=1, pad_left=0, gate=y[:, :4])
    assert torch.equal(first, second) and torch.equal(adjoint, again)
    names = [record.name for record in records]
    assert names == ["activation_pool_backward+pool"] * 2 + ["upsample2x_adjoint+gate"] * 2


# ---------------------------------------------------------------------------------------------------------------
# Moats: inputs and outputs inside fill (gaps between rows, pixels and channels); under the interpreter, an audit
# of every address read and written
# ---------------------------------------------------------------------------------------------------------------
def pool_moat_case(m: MoatedLaunch, layout: str):
    z = nchw(pre_activation((2, 5, 7, 17), torch.bfloat16, torch.device("cpu")))
    grad_y, grad_pooled = torch.randn(2, 17, 5, 7).bfloat16(), torch.randn(2, 17, 2, 3).bfloat16()
    dz = activation_pool_backward_nhwc(nhwc(m.input("y", F.relu(z), layout)), nhwc(m.input("grad_y", grad_y, layout)),
                                       nhwc(m.input("grad_pooled", grad_pooled, layout)))  # fmt: skip
    return dz, pool_reference(nhwc(z), nhwc(grad_y), nhwc(grad_pooled), "relu").to(torch.bfloat16)


def adjoint_moat_case(m: MoatedLaunch, layout: str, mode: str, align_corners: bool, frame: tuple[int, int]):
    low_hw = (3, 4)
    grad = torch.randn(2, 6, *frame)
    gate = torch.randn(2, 6, *low_hw)
    gate[:, :, 0] = 0.0
    gate[:, 2, 1, 1] = NAN
    pad_top, pad_left = center_pad_offsets(*frame, 6, 8)
    got = upsample2x_adjoint_nhwc(nhwc(m.input("grad", grad, layout)), low_hw, mode, align_corners, pad_top=pad_top,
                                  pad_left=pad_left, gate=nhwc(m.input("gate", gate, layout)))  # fmt: skip
    expected = adjoint_reference(nhwc(grad), low_hw, mode, align_corners, gate=nhwc(gate))
    return got, expected


MOAT_CASES = [
    pytest.param(pool_moat_case, {}, id="pool"),
    pytest.param(adjoint_moat_case, {"mode": "nearest", "align_corners": False, "frame": (7, 9)}, id="nearest-pad"),
    pytest.param(adjoint_moat_case, {"mode": "bilinear", "align_corners": False, "frame": (5, 7)}, id="bilinear-crop"),
    pytest.param(adjoint_moat_case, {"mode": "bilinear", "align_corners": True, "frame": (7, 7)}, id="bilinear-ac"),
]


def run_moat_case(device, monkeypatch, case, kwargs, layout, audit):
    m = MoatedLaunch(device, audit=audit if isinstance(audit, AddressAudit) else None,
                     guard=audit if isinstance(audit, HostGuard) else None)  # fmt: skip
    monkeypatch.setattr(backward_module, "alloc", m.alloc)
    with hooked_memory_ops(audit) if audit is not None else contextlib.nullcontext():
        got, expected = case(m, layout, **kwargs)
    return m, got, expected


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case, kwargs", MOAT_CASES)
def test_value_moat(device, monkeypatch, case, kwargs, layout):
    """Results match float64 (no fill read in, nothing unwritten), inputs untouched, the fill around outputs intact."""
    guard = HostGuard() if INTERPRET else None
    m, got, expected = run_moat_case(device, monkeypatch, case, kwargs, layout, guard)
    m.check()
    if guard is not None:
        guard.verify()
    assert any(got.data_ptr() == moat.view.data_ptr() for moat in m.moats), "the output is not in a moat"
    if case is pool_moat_case:
        torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0, equal_nan=True)
    else:
        check_adjoint(got, expected, torch.float32, kwargs["align_corners"], (3, 4))


@pytest.mark.skipif(not INTERPRET, reason="the address audit wraps Triton's interpreter; on a GPU the value moat "
                    "covers stray accesses")  # fmt: skip
@pytest.mark.parametrize("case, kwargs", MOAT_CASES)
def test_address_audit(device, monkeypatch, case, kwargs):
    """Reads only from the launch's inputs, writes only to its output, each output element exactly once."""
    audit = AddressAudit()
    run_moat_case(device, monkeypatch, case, kwargs, "channels_last", audit)
    audit.verify()


def test_bad_input_is_refused(device):
    y = torch.randn(1, 4, 4, 3, device=device)
    pooled = torch.randn(1, 2, 2, 3, device=device)
    with pytest.raises(ValueError, match="expected grad_y, grad_pooled or both, got neither"):
        activation_pool_backward_nhwc(y)
    with pytest.raises(ValueError, match=r"y: expected a 4-D \(N, H, W, C\) view, got shape \(4, 4, 3\)"):
        activation_pool_backward_nhwc(y[0], grad_pooled=pooled)
    with pytest.raises(ValueError, match=r"grad_y: expected shape \(1, 4, 4, 3\), got \(1, 4, 4, 2\)"):
        activation_pool_backward_nhwc(y, y[..., :2])
    with pytest.raises(ValueError, match=r"grad_pooled: expected shape \(1, 2, 2, 3\), got \(1, 3, 3, 3\)"):
        activation_pool_backward_nhwc(y, grad_pooled=torch.randn(1, 3, 3, 3, device=device))
    with pytest.raises(ValueError, match=r"grad_pooled: expected y's dtype and device \(torch.float32"):
        activation_pool_backward_nhwc(y, grad_pooled=pooled.bfloat16())
    with pytest.raises(ValueError, match="activation must be one of \\['relu', 'none'\\], got 'gelu'"):
        activation_pool_backward_nhwc(y, y, activation="gelu")
    with pytest.raises(TypeError, match=r"bfloat16 tensor \(or float64 under TRITON_INTERPRET=1\), got torch.int32"):
        activation_pool_backward_nhwc(y.int(), y)

    grad = torch.randn(1, 7, 9, 3, device=device)
    with pytest.raises(ValueError, match=r"mode must be one of \['nearest', 'bilinear'\], got 'bicubic'"):
        upsample2x_adjoint_nhwc(grad, (3, 4), "bicubic")
    with pytest.raises(ValueError, match="align_corners applies to bilinear upsampling only"):
        upsample2x_adjoint_nhwc(grad, (3, 4), "nearest", True)
    with pytest.raises(ValueError, match=r"low_hw: expected \(h, w\), two non-negative ints, got \(3, -1\)"):
        upsample2x_adjoint_nhwc(grad, (3, -1), "nearest")
    with pytest.raises(ValueError, match="pad_top: expected an int, got 0.5"):
        upsample2x_adjoint_nhwc(grad, (3, 4), "nearest", pad_top=0.5)
    with pytest.raises(ValueError, match=r"gate: expected shape \(1, 3, 4, 3\), got \(1, 4, 3, 3\)"):
        upsample2x_adjoint_nhwc(grad, (3, 4), "nearest", gate=torch.randn(1, 4, 3, 3, device=device))
    with pytest.raises(ValueError, match=r"gate: expected grad's dtype and device \(torch.float32"):
        upsample2x_adjoint_nhwc(grad, (3, 4), "nearest", gate=torch.randn(1, 3, 4, 3, device=device).bfloat16())
    with pytest.raises(ValueError, match=r"grad: expected a 4-D \(N, H, W, C\) view, got shape \(7, 9, 3\)"):
        upsample2x_adjoint_nhwc(grad[0], (3, 4), "nearest")
