"""Per-kernel parity of the conv family: conv3x3 (+bias+ReLU), pool epilogue, upsample+concat loader,
transposed conv (depth-to-space store) and fused 1x1 head, against float64 PyTorch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastunet.kernels import _common
from fastunet.kernels.conv import (
    conv2d_nhwc,
    conv_transpose2x2_nhwc,
    pack_conv_transpose_weight,
    pack_conv_weight,
)
from fastunet.reference import center_pad
from tolerances import assert_error_ratio, assert_kernel_close, precision_key

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]

# (batch, c_in, c_out, height, width)
CONV_SHAPES = [
    pytest.param(1, 1, 16, 1, 1, id="cin1-1x1"),
    pytest.param(2, 3, 16, 7, 5, id="cin3-smallk-odd"),
    pytest.param(1, 16, 16, 2, 3, id="cin16-2x3"),
    pytest.param(3, 17, 17, 5, 7, id="partial-every-dim"),
    pytest.param(1, 64, 64, 17, 31, id="cin64-17x31"),
    pytest.param(2, 8, 64, 33, 3, id="tall-33x3"),
    pytest.param(1, 5, 16, 1, 7, id="h1-w7"),
]


def nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1)


def nchw(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


def rand_conv(c_out: int, c_in: int, k: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights scaled so outputs are O(1) whatever the reduction length."""
    weight = torch.randn(c_out, c_in, k, k) / math.sqrt(c_in * k * k)
    bias = torch.randn(c_out) * 0.1
    return weight.to(device, dtype), bias.to(device, dtype)


def ref_conv(x, weight, bias, relu=True):
    y = F.conv2d(x.double().cpu(), weight.double().cpu(), bias.double().cpu(), padding=weight.shape[-1] // 2)
    return y.relu() if relu else y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, c_in, c_out, height, width", CONV_SHAPES)
def test_conv3x3_bias_relu_matches_float64(device, dtype, batch, c_in, c_out, height, width):
    x = torch.randn(batch, c_in, height, width).to(device, dtype)
    weight, bias = rand_conv(c_out, c_in, 3, dtype, device)
    y, pooled = conv2d_nhwc(nhwc(x), pack_conv_weight(weight), bias)
    assert pooled is None
    reference = ref_conv(x, weight, bias)
    assert_kernel_close(nchw(y), reference, 9 * c_in, precision_key(dtype, device))
    if dtype != torch.float32:
        same_dtype = F.conv2d(x.cpu(), weight.cpu(), bias.cpu(), padding=1).relu()
        assert_error_ratio(nchw(y), same_dtype, reference)


LAYOUTS = ["nchw", "nhwc", "offset-view"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv_reads_any_input_layout(device, layout):
    batch, c_in, c_out, height, width = 2, 5, 16, 6, 7
    base = torch.randn(batch, c_in + 2, height + 3, width + 1).to(device)
    if layout == "offset-view":
        x = base[:, 1 : 1 + c_in, 2 : 2 + height, :width]
        assert x.storage_offset() > 0 and not x.is_contiguous()
    else:
        x = base[:, :c_in, :height, :width].contiguous()
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = rand_conv(c_out, c_in, 3, torch.float32, device)
    y, _ = conv2d_nhwc(nhwc(x), pack_conv_weight(weight), bias)
    assert_kernel_close(nchw(y), ref_conv(x, weight, bias), 9 * c_in, precision_key(torch.float32, device))


def test_conv_batch_zero(device):
    x = torch.randn(0, 4, 5, 5, device=device)
    weight, bias = rand_conv(16, 4, 3, torch.float32, device)
    y, pooled = conv2d_nhwc(nhwc(x), pack_conv_weight(weight), bias, pool=True)
    assert y.shape == (0, 5, 5, 16) and pooled.shape == (0, 2, 2, 16)


# ---------------------------------------------------------------------------------------------------------------
# Pool epilogue
# ---------------------------------------------------------------------------------------------------------------
POOL_SHAPES = [
    pytest.param(1, 4, 16, 2, 2, id="2x2"),
    pytest.param(2, 3, 16, 7, 5, id="odd-7x5"),
    pytest.param(1, 17, 24, 9, 6, id="partial-9x6"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, c_in, c_out, height, width", POOL_SHAPES)
def test_pool_epilogue(device, dtype, batch, c_in, c_out, height, width):
    x = torch.randn(batch, c_in, height, width).to(device, dtype)
    weight, bias = rand_conv(c_out, c_in, 3, dtype, device)
    y, pooled = conv2d_nhwc(nhwc(x), pack_conv_weight(weight), bias, pool=True)
    assert pooled.shape == (batch, height // 2, width // 2, c_out)
    # Pooling is data movement: bit-exact against torch's max-pool of the kernel's own skip output.
    expected = F.max_pool2d(nchw(y).float().cpu(), 2).to(dtype)
    assert torch.equal(nchw(pooled).cpu(), expected)
    reference = F.max_pool2d(ref_conv(x, weight, bias), 2)
    assert_kernel_close(nchw(pooled), reference, 9 * c_in, precision_key(dtype, device))


def test_pool_epilogue_single_row(device):
    """Floor mode: a one-row map has no complete 2x2 window, so the pooled map is empty and the skip is whole."""
    x = torch.randn(3, 16, 1, 4, device=device)
    weight, bias = rand_conv(32, 16, 3, torch.float32, device)
    y, pooled = conv2d_nhwc(nhwc(x), pack_conv_weight(weight), bias, pool=True)
    assert pooled.shape == (3, 0, 2, 32)
    assert_kernel_close(nchw(y), ref_conv(x, weight, bias), 9 * 16, precision_key(torch.float32, device))


SPECIAL_VALUES = [pytest.param(float("nan"), id="nan"), pytest.param(float("inf"), id="inf"),
                  pytest.param(float("-inf"), id="-inf")]  # fmt: skip


def assert_special_positions(out: torch.Tensor, expected: torch.Tensor) -> None:
    out = out.cpu().double()
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.isinf(), expected.isinf())
    assert torch.equal(out[out.isinf()], expected[expected.isinf()])
    assert expected.isnan().any() or expected.isinf().any()


@pytest.mark.parametrize("value", SPECIAL_VALUES)
@pytest.mark.parametrize("c_in", [4, 32], ids=["small-k", "main-loop"])
def test_special_values_follow_torch(device, value, c_in):
    """NaN and +-inf through conv, ReLU and max-pool land where torch puts them."""
    x = torch.randn(1, c_in, 8, 9)
    x[0, 1, 2, 3] = value
    x[0, 3, 6, 8] = value
    weight, bias = rand_conv(16, c_in, 3, torch.float32, "cpu")
    y, pooled = conv2d_nhwc(nhwc(x.to(device)), pack_conv_weight(weight.to(device)), bias.to(device), pool=True)
    ref = ref_conv(x, weight, bias)
    assert_special_positions(nchw(y), ref)
    assert_special_positions(nchw(pooled), F.max_pool2d(ref, 2))


@pytest.mark.parametrize("value", SPECIAL_VALUES)
@pytest.mark.parametrize("mode, align_corners", [("nearest", False), ("bilinear", False), ("bilinear", True)])
def test_special_values_through_the_upsampling_loader(device, value, mode, align_corners):
    skip = torch.randn(1, 16, 9, 8)
    low = torch.randn(1, 16, 4, 4)
    low[0, 2, 1, 2] = value
    weight, bias = rand_conv(16, 32, 3, torch.float32, "cpu")
    y, _ = conv2d_nhwc(
        nhwc(skip.to(device)), pack_conv_weight(weight.to(device)), bias.to(device), up=nhwc(low.to(device)),
        up_mode=mode, align_corners=align_corners,
    )  # fmt: skip
    up = center_pad(upsample_ref(low, mode, align_corners), 9, 8)
    assert_special_positions(nchw(y), ref_conv(torch.cat([skip.double(), up], dim=1), weight, bias))


# ---------------------------------------------------------------------------------------------------------------
# Decoder loader: skip map + upsampled map, never concatenated
# ---------------------------------------------------------------------------------------------------------------
UP_CASES = [
    pytest.param("nearest", False, id="nearest"),
    pytest.param("bilinear", False, id="bilinear"),
    pytest.param("bilinear", True, id="bilinear-align-corners"),
    pytest.param("direct", False, id="direct"),
]

# (batch, c_skip, c_up, c_out, height, width, low_h, low_w)
UP_SHAPES = [
    pytest.param(2, 8, 16, 24, 7, 9, 3, 4, id="odd-pad"),
    pytest.param(1, 17, 20, 16, 4, 4, 2, 2, id="partial-k"),
    pytest.param(1, 4, 3, 16, 3, 5, 1, 2, id="low-1x2"),
    pytest.param(3, 16, 32, 16, 2, 2, 1, 1, id="low-1x1"),
]


def upsample_ref(low: torch.Tensor, mode: str, align_corners: bool) -> torch.Tensor:
    low = low.double().cpu()
    if mode == "direct":
        return low
    if mode == "nearest":
        return F.interpolate(low, scale_factor=2, mode="nearest")
    return F.interpolate(low, scale_factor=2, mode="bilinear", align_corners=align_corners)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode, align_corners", UP_CASES)
@pytest.mark.parametrize("batch, c_skip, c_up, c_out, height, width, low_h, low_w", UP_SHAPES)
def test_upsample_concat_loader(
    device, dtype, mode, align_corners, batch, c_skip, c_up, c_out, height, width, low_h, low_w
):
    if mode == "direct":  # the map is already at (about) full size, as a transposed conv leaves it
        low_h, low_w = 2 * low_h, 2 * low_w
    skip = torch.randn(batch, c_skip, height, width).to(device, dtype)
    low = torch.randn(batch, c_up, low_h, low_w).to(device, dtype)
    weight, bias = rand_conv(c_out, c_skip + c_up, 3, dtype, device)
    y, _ = conv2d_nhwc(
        nhwc(skip), pack_conv_weight(weight), bias, up=nhwc(low), up_mode=mode, align_corners=align_corners
    )
    # The unfused network stores the upsampled map in the storage dtype: so does the reference.
    up = center_pad(upsample_ref(low, mode, align_corners).to(dtype).double(), height, width)
    reference = ref_conv(torch.cat([skip.double().cpu(), up], dim=1), weight, bias)
    assert_kernel_close(nchw(y), reference, 9 * (c_skip + c_up), precision_key(dtype, device))


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "direct"])
def test_fused_concat_is_exact(device, mode):
    """Upsampling and concatenation are data movement (bilinear: dyadic weights). On small integers every sum is
    exact in float32 in any order, so the fused loader must give the very bits of torch's materialized
    ``cat([skip, pad(upsample(low))])`` convolved in float64, and of the same kernel run on that concatenation."""
    batch, c_skip, c_up, c_out, height, width = 2, 24, 40, 16, 7, 9
    low_h, low_w = (3, 4) if mode != "direct" else (6, 8)
    skip = torch.randint(-3, 4, (batch, c_skip, height, width)).float()
    low = torch.randint(-3, 4, (batch, c_up, low_h, low_w)).float()
    weight = torch.randint(-2, 3, (c_out, c_skip + c_up, 3, 3)).float()
    bias = torch.randint(-2, 3, (c_out,)).float()
    fused, _ = conv2d_nhwc(
        nhwc(skip.to(device)), pack_conv_weight(weight.to(device)), bias.to(device), up=nhwc(low.to(device)),
        up_mode=mode,
    )  # fmt: skip
    concatenated = torch.cat([skip.double(), center_pad(upsample_ref(low, mode, False), height, width)], dim=1)
    reference = ref_conv(concatenated, weight, bias)
    assert torch.equal(nchw(fused).cpu(), reference.float())
    materialized, _ = conv2d_nhwc(
        nhwc(concatenated.float().to(device)), pack_conv_weight(weight.to(device)), bias.to(device)
    )
    assert torch.equal(fused, materialized)


# ---------------------------------------------------------------------------------------------------------------
# Transposed conv (GEMM + depth-to-space store) and fused head
# ---------------------------------------------------------------------------------------------------------------
# (batch, c_in, c_out, height, width)
TRANSPOSE_SHAPES = [
    pytest.param(1, 16, 8, 1, 1, id="1x1"),
    pytest.param(2, 17, 5, 3, 4, id="partial"),
    pytest.param(1, 64, 32, 5, 3, id="c64"),
    pytest.param(0, 8, 4, 2, 2, id="batch0"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, c_in, c_out, height, width", TRANSPOSE_SHAPES)
def test_conv_transpose2x2(device, dtype, batch, c_in, c_out, height, width):
    x = torch.randn(batch, c_in, height, width).to(device, dtype)
    weight = (torch.randn(c_in, c_out, 2, 2) / math.sqrt(c_in)).to(device, dtype)
    bias = (torch.randn(c_out) * 0.1).to(device, dtype)
    y = conv_transpose2x2_nhwc(nhwc(x), pack_conv_transpose_weight(weight), bias.repeat(4))
    reference = F.conv_transpose2d(x.double().cpu(), weight.double().cpu(), bias.double().cpu(), stride=2)
    assert_kernel_close(nchw(y), reference, c_in, precision_key(dtype, device))


# (c_in, c_mid, n_cls)
HEAD_SHAPES = [
    pytest.param(8, 16, 1, id="1-class"),
    pytest.param(16, 64, 2, id="c64-2-classes"),
    pytest.param(4, 24, 17, id="17-classes-partial"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw-out", "channels-last-out"])
@pytest.mark.parametrize("c_in, c_mid, n_cls", HEAD_SHAPES)
def test_fused_head(device, dtype, channels_last, c_in, c_mid, n_cls):
    batch, height, width = 2, 5, 6
    x = torch.randn(batch, c_in, height, width).to(device, dtype)
    weight, bias = rand_conv(c_mid, c_in, 3, dtype, device)
    head_w, head_b = rand_conv(n_cls, c_mid, 1, dtype, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    logits = torch.full((batch, n_cls, height, width), float("nan"), device=device, dtype=dtype)
    logits = logits.contiguous(memory_format=memory_format)
    out, _ = conv2d_nhwc(
        nhwc(x), pack_conv_weight(weight), bias, head_weight=pack_conv_weight(head_w), head_bias=head_b,
        out=nhwc(logits),
    )  # fmt: skip
    assert out.data_ptr() == logits.data_ptr()
    features = ref_conv(x, weight, bias)
    # The features are rounded to the storage dtype before the head, as the unfused network stores them.
    features = features.to(dtype).double()
    reference = F.conv2d(features, head_w.double().cpu(), head_b.double().cpu())
    assert_kernel_close(logits, reference, 9 * c_in + c_mid, precision_key(dtype, device))


# ---------------------------------------------------------------------------------------------------------------
# Offsets past 2**31, bad input
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("c_in", [4, 16], ids=["small-k", "main-loop"])
@pytest.mark.parametrize("axis", ["image", "row"])
def test_int64_offsets(device, axis, c_in):
    """Strides that fit in int32 but whose products with the index pass 2**31: the image (or row) index times its
    stride must be computed in int64, for the loads and for the stores (the main loop switches to 64-bit offsets,
    ``WIDE``, for such a tensor). Storage is allocated lazily: only the touched pages are real."""
    c_out = 16
    big = 2**30 + 64
    if axis == "image":
        shape, strides = (3, 3, 4, c_in), (big, 4 * c_in, c_in, 1)
        out_shape, out_strides = (3, 3, 4, c_out), (big, 4 * c_out, c_out, 1)
    else:
        shape, strides = (1, 3, 4, c_in), (3 * big, big, c_in, 1)
        out_shape, out_strides = (1, 3, 4, c_out), (3 * big, big, c_out, 1)
    x = torch.empty(3 * big, dtype=torch.float16, device=device).as_strided(shape, strides)
    out = torch.empty(3 * big, dtype=torch.float16, device=device).as_strided(out_shape, out_strides)
    images = torch.randn(shape).to(device, torch.float16)
    x.copy_(images)
    out.fill_(float("nan"))
    weight, bias = rand_conv(c_out, c_in, 3, torch.float16, device)
    with _common.launch_log() as records:
        conv2d_nhwc(x, pack_conv_weight(weight), bias, out=out)
        expected, _ = conv2d_nhwc(images, pack_conv_weight(weight), bias)
    assert [r.constexprs["WIDE"] for r in records] == [True, False]
    assert torch.equal(out, expected)


@pytest.mark.parametrize("two_sources", [False, True], ids=["one-source", "two-sources"])
def test_wide_offsets_compute_the_same(device, monkeypatch, two_sources):
    """The 64-bit offset variant of the main loop (chosen for tensors spanning 2**31 elements) forced on small
    tensors gives the same bits as the 32-bit one, so both variants are tested on every machine."""
    import fastunet.kernels.conv as conv_module

    skip = torch.randn(2, 32, 7, 9, device=device)
    low = torch.randn(2, 16, 3, 4, device=device) if two_sources else None
    weight, bias = rand_conv(24, 32 + (16 if two_sources else 0), 3, torch.float32, device)
    kwargs = {"up": nhwc(low), "up_mode": "nearest"} if two_sources else {}
    narrow, _ = conv2d_nhwc(nhwc(skip), pack_conv_weight(weight), bias, **kwargs)
    monkeypatch.setattr(conv_module, "element_span", lambda t: 2**31)
    with _common.launch_log() as records:
        wide, _ = conv2d_nhwc(nhwc(skip), pack_conv_weight(weight), bias, **kwargs)
    assert records[-1].constexprs["WIDE"]
    assert torch.equal(wide, narrow)
    expected_input = skip if low is None else torch.cat([skip, center_pad(F.interpolate(low, scale_factor=2), 7, 9)], 1)
    assert_kernel_close(nchw(wide), ref_conv(expected_input, weight, bias), 9 * weight.shape[1], "fp32")


def test_bad_input_errors(device):
    x = torch.randn(1, 4, 4, 3, device=device)
    weight, bias = rand_conv(8, 3, 3, torch.float32, device)
    w_packed = pack_conv_weight(weight)
    with pytest.raises(ValueError, match="4-D"):
        conv2d_nhwc(x[0], w_packed, bias)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        conv2d_nhwc(x.to(torch.int32), w_packed, bias)
    with pytest.raises(ValueError, match=r"expected \(45, C_out\) for 5 input channels"):
        conv2d_nhwc(torch.randn(1, 4, 4, 5, device=device), w_packed, bias)
    with pytest.raises(ValueError, match="weight: expected torch.float32"):
        conv2d_nhwc(x, w_packed.half(), bias)
    with pytest.raises(ValueError, match="up_mode must be one of"):
        conv2d_nhwc(x, w_packed, bias, up=x, up_mode="bicubic")
    with pytest.raises(ValueError, match="larger than the skip map"):
        conv2d_nhwc(x, pack_conv_weight(rand_conv(8, 6, 3, torch.float32, device)[0]), bias,
                    up=torch.randn(1, 3, 3, 3, device=device), up_mode="nearest")  # fmt: skip


def test_more_bad_launcher_input(device):
    x = torch.randn(1, 4, 4, 8, device=device)
    weight, bias = rand_conv(16, 8, 3, torch.float32, device)
    w_packed = pack_conv_weight(weight)
    with pytest.raises(ValueError, match="ksize must be odd"):
        conv2d_nhwc(x, pack_conv_weight(torch.randn(16, 8, 4, 4, device=device)), bias, ksize=4)
    head_w = torch.randn(16, 3, device=device)
    with pytest.raises(ValueError, match=r"head bias: expected shape \(3,\)"):
        conv2d_nhwc(x, w_packed, bias, head_weight=head_w, head_bias=torch.randn(1, device=device))
    aliased = torch.randn(1, 4, 4, 16, device=device)
    with pytest.raises(ValueError, match="must not share memory"):
        conv2d_nhwc(aliased[..., :8], w_packed, bias, out=aliased)
    t_weight = pack_conv_transpose_weight(torch.randn(8, 4, 2, 2, device=device))
    with pytest.raises(ValueError, match="bias4: expected the bias repeated 4 times"):
        conv_transpose2x2_nhwc(x, t_weight, torch.randn(4, device=device))
    with pytest.raises(ValueError, match="bias4"):
        conv_transpose2x2_nhwc(x, t_weight, torch.randn(16, device=device).half())


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv1x1_without_activation(device, dtype):
    """The standalone head of wide nets: a 1x1 conv, no ReLU, written into the caller's NCHW logits."""
    x = torch.randn(2, 160, 5, 7).to(device, dtype)
    weight, bias = rand_conv(3, 160, 1, dtype, device)
    logits = torch.full((2, 3, 5, 7), float("nan"), device=device, dtype=dtype)
    conv2d_nhwc(nhwc(x), pack_conv_weight(weight), bias, ksize=1, activation="none", out=nhwc(logits))
    reference = F.conv2d(x.double().cpu(), weight.double().cpu(), bias.double().cpu())
    assert (reference < 0).any()
    assert_kernel_close(logits, reference, 160, precision_key(dtype, device))


# (batch, c_in, c_out, height, width): odd sizes (torch drops the last row or column), c_in under 16 (the packed
# (tap, channel) K axis) and not a multiple of 8.
KSIZE2_SHAPES = [
    pytest.param(2, 5, 7, 6, 10, id="cin5-packed-6x10"),
    pytest.param(1, 20, 12, 7, 9, id="cin20-odd-7x9"),
    pytest.param(1, 3, 17, 2, 3, id="cin3-2x3"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch, c_in, c_out, height, width", KSIZE2_SHAPES)
def test_ksize2_stride2_matches_float64(device, dtype, batch, c_in, c_out, height, width):
    """The one even kernel: 2x2, stride 2, padding 0, as ``F.conv2d`` in float64 (output H // 2 x W // 2), one
    ``conv2x2/2`` launch of the forward kernel with 4 taps' multiply-adds, read from a permuted NCHW tensor."""
    x = torch.randn(batch, c_in, height, width).to(device, dtype)
    weight, bias = rand_conv(c_out, c_in, 2, dtype, device)
    with _common.launch_log() as records:
        y, _ = conv2d_nhwc(nhwc(x), pack_conv_weight(weight), bias, ksize=2, stride=2)
    assert [r.name for r in records] == ["conv2x2/2"]
    assert records[0].constexprs["PACKED_K"] == (c_in if c_in < 16 else 0)
    assert records[0].flops == 2 * batch * (height // 2) * (width // 2) * c_out * 4 * c_in
    assert y.shape == (batch, height // 2, width // 2, c_out)
    reference = F.conv2d(x.double().cpu(), weight.double().cpu(), bias.double().cpu(), stride=2).relu()
    assert_kernel_close(nchw(y), reference, 4 * c_in, precision_key(dtype, device))


def test_ksize2_stride2_split_k(device, monkeypatch):
    """A 2x2 stride-2 conv's K (4 taps x channel blocks) in two parts, summed in a fixed order: float64's result."""
    import fastunet.kernels.conv as conv_module

    def choose(key, candidates, run, timer=None):
        return {**candidates[0], "BLOCK_M": 16, "BLOCK_K": 16, "SPLIT_K": 2}

    monkeypatch.setattr(conv_module, "choose_config", choose)
    x = torch.randn(1, 40, 5, 8, device=device)
    weight, bias = rand_conv(24, 40, 2, torch.float32, device)
    with _common.launch_log() as records:
        y, _ = conv2d_nhwc(nhwc(x), pack_conv_weight(weight), bias, ksize=2, stride=2, activation="none")
    assert [r.constexprs["SPLIT_K"] for r in records] == [2, 2]
    reference = F.conv2d(x.double().cpu(), weight.double().cpu(), bias.double().cpu(), stride=2)
    assert_kernel_close(nchw(y), reference, 4 * 40, precision_key(torch.float32, device))


def test_ksize2_needs_stride2_and_no_padding(device):
    x = torch.randn(1, 4, 4, 8, device=device)
    w_packed = pack_conv_weight(torch.randn(16, 8, 2, 2, device=device))
    with pytest.raises(ValueError, match="a 2x2 conv runs with stride 2 and padding 0 only .*got stride 1, padding 0"):
        conv2d_nhwc(x, w_packed, ksize=2)
    with pytest.raises(ValueError, match="a 2x2 conv runs with stride 2 and padding 0 only .*got stride 2, padding 1"):
        conv2d_nhwc(x, w_packed, ksize=2, stride=2, padding=1)
    with pytest.raises(ValueError, match="ksize must be odd, or 2 with stride 2 and padding 0, got 4"):
        conv2d_nhwc(x, pack_conv_weight(torch.randn(16, 8, 4, 4, device=device)), ksize=4, stride=2, padding=0)
    with pytest.raises(ValueError, match="a 2x2 conv with padding 0 needs an input of at least 2x2, got 1x4"):
        conv2d_nhwc(x[:, :1], w_packed, ksize=2, stride=2)


def test_pixel_count_beyond_int32_is_refused():
    """Pixel indices are int32 in the kernel: a launch with 2**31 pixels is refused, not wrapped (meta tensors:
    nothing is allocated)."""
    x = torch.empty(2**15, 256, 256, 4, device="meta")
    with _common.dry_run(), pytest.raises(ValueError, match="at most 2\\*\\*31"):
        conv2d_nhwc(x, torch.empty(36, 16, device="meta"))


def test_cpu_tensor_never_reaches_a_compiled_kernel(monkeypatch):
    monkeypatch.setattr(_common, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="need a CUDA tensor"):
        _common.check_runnable(torch.randn(2, 2), "input")
