"""The layout features beyond the plain U-Net, run on the kernels (``build_plan`` + ``run_plan``) against the
layout's math (``ops.layout_forward``) in float64: epilogue activations, the replicate and crop joins, valid convs,
a 1x1 conv before the upsampling, pixel shuffle (+ blur), a 3x3 head; and the activations' NaN/inf behaviour
against torch's."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_blind_spots import all_nan_windows, gpu_nan_rules
from torch import nn

from fastunet import ops
from fastunet.kernels import launch_log
from fastunet.kernels.conv import ACTIVATIONS as KERNEL_ACTIVATIONS
from fastunet.kernels.conv import conv2d_nhwc, pack_conv_weight
from fastunet.kernels.upsample import upsample2x_nhwc
from fastunet.ops import ConvSpec, Layout, UpSpec
from tolerances import assert_kernel_close, assert_network_close, precision_key

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


def _rounded(module: nn.Module) -> nn.Module:
    """``module`` in float64 holding values that fp16 represents exactly, so every dtype's plan and the float64
    reference read the same parameters."""
    module = module.double()
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point():
                t.copy_(t.half().double())
    return module


def _conv(c_in: int, c_out: int, k: int = 3, padding: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, k, padding=padding)
    with torch.no_grad():
        conv.bias.uniform_(-0.3, 0.3)
    return _rounded(conv)


def _norm(channels: int) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        norm.running_mean.uniform_(-0.2, 0.2)
        norm.running_var.uniform_(0.5, 1.5)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
    return _rounded(norm)


def make_layout(
    *,
    depth: int = 1,
    act=None,
    norm: bool = False,
    padding: int = 1,
    up: str = "transpose",
    pre_conv: bool = False,
    blur: bool = False,
    join: str = "pad",
    head_k: int = 1,
    up_first: bool = False,
    in_channels: int = 3,
    base: int = 5,
    classes: int = 2,
) -> Layout:
    """A U-Net layout of ``depth`` levels, ``base`` channels doubling per level, every conv followed by ``act()``
    (a fresh activation module per conv; None: ReLU)."""

    def spec(c_in: int, c_out: int) -> ConvSpec:
        module = act(c_out) if act is not None else None
        if isinstance(module, nn.Module):
            module = _rounded(module)
        return ConvSpec(_conv(c_in, c_out, padding=padding), _norm(c_out) if norm else None, ops.act_of(module))

    widths = [base * 2**level for level in range(depth + 1)]
    encoders = tuple(
        (spec(in_channels if level == 0 else widths[level - 1], width), spec(width, width))
        for level, width in enumerate(widths)
    )
    ups, decoders = [], []
    for level in range(depth):
        low, skip = widths[level + 1], widths[level]
        up_channels = skip if up in ("transpose", "pixelshuffle") or pre_conv else low
        if up == "transpose":
            ups.append(UpSpec("transpose", conv=_rounded(nn.ConvTranspose2d(low, up_channels, 2, stride=2))))
        elif up == "pixelshuffle":
            ups.append(UpSpec("pixelshuffle", conv=_conv(low, 4 * up_channels), blur=blur))
        else:
            pre = _conv(low, up_channels, 1, 0) if pre_conv else None
            ups.append(UpSpec(up, align_corners=up == "bilinear", pre_conv=pre))
        decoders.append((spec(skip + up_channels, skip), spec(skip, skip)))
    head = _conv(widths[0], classes, head_k, head_k // 2)
    return Layout(encoders, tuple(ups), tuple(decoders), head, (up_first,) * depth, join)


def check_layout(layout: Layout, dtype: torch.dtype, device, shape=(2, 3, 13, 11)) -> list:
    """Run the plan on the kernels and compare it with the layout's float64 math; return the launch records."""
    assert ops.unfused_reason(layout) is None
    x = torch.randn(shape).half().double()
    expected = ops.layout_forward(layout, x)
    plan = ops.build_plan(layout, dtype, device)
    with torch.no_grad(), launch_log() as records:
        out = ops.run_plan(plan, x.to(device, dtype))
    assert records and all(r.kernel is not None for r in records)
    assert out.dtype == dtype
    assert_network_close(out, expected, precision_key(dtype, device))
    return records


# ---------------------------------------------------------------------------------------------------------------
# 1. Activations in the conv epilogue
# ---------------------------------------------------------------------------------------------------------------
ACTIVATIONS = {
    "leaky_relu": lambda c: nn.LeakyReLU(0.1),
    "leaky_relu_steep": lambda c: nn.LeakyReLU(1.7),
    "prelu_per_channel": lambda c: nn.PReLU(c, init=0.2),
    "prelu_one": lambda c: nn.PReLU(init=-0.3),
    "silu": lambda c: nn.SiLU(),
    "relu6": lambda c: nn.ReLU6(),
    "hardtanh": lambda c: nn.Hardtanh(-0.4, 0.3),
    "none": lambda c: nn.Identity(),
}


def _perturb_prelu(layout: Layout) -> None:
    """Per-channel PReLU slopes that differ per channel (a kernel reading one slope for all would fail)."""
    for _, spec in layout.conv_specs():
        module = spec.activation.module
        if module is not None and module.weight.numel() > 1:
            with torch.no_grad():
                module.weight.copy_(torch.linspace(-0.5, 0.9, module.weight.numel()).half().double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_network(device, dtype, name):
    layout = make_layout(act=ACTIVATIONS[name], norm=name == "silu")
    _perturb_prelu(layout)
    records = check_layout(layout, dtype, device)
    kind = layout.encoders[0][0].activation.kind
    assert records[0].stage == "enc0.conv1" and records[0].constexprs["ACT"] == KERNEL_ACTIVATIONS[kind].value


def test_activation_depth2_with_unfused_head(device):
    """Depth 2, PReLU, 70 > 64 classes: the head runs as its own launch after the last conv's PReLU."""
    layout = make_layout(depth=2, act=ACTIVATIONS["prelu_per_channel"], classes=70, up="nearest")
    _perturb_prelu(layout)
    records = check_layout(layout, torch.float32, device, shape=(1, 3, 17, 15))
    assert records[-1].stage == "head" and not records[-1].constexprs["HEAD"]


def _pointwise(c_out: int = 4) -> torch.Tensor:
    """A 1x1 conv from one channel to ``c_out`` copies of it (weight 1, no bias): the output is act(x) exactly."""
    return pack_conv_weight(torch.ones(c_out, 1, 1, 1))


SPECIALS = [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, -1e30, 1e30, -100.0, -3.0, 0.5, 7.0]
TORCH_ACT = {
    "relu": (lambda t, s: F.relu(t), {}),
    "leaky_relu": (lambda t, s: F.leaky_relu(t, 0.1), {"slope": 0.1}),
    "leaky_relu0": (lambda t, s: F.leaky_relu(t, 0.0), {"slope": 0.0}),
    "prelu": (lambda t, s: F.prelu(t, s), {}),
    "silu": (lambda t, s: F.silu(t), {}),
    "clamp": (lambda t, s: F.hardtanh(t, -0.5, 6.0), {"lo": -0.5, "hi": 6.0}),
    "none": (lambda t, s: t, {}),
}


@all_nan_windows
@pytest.mark.parametrize("name", sorted(TORCH_ACT))
def test_activation_special_values_follow_torch(device, name):
    """NaN, +-inf, -0 and huge values through each activation (and the pool after it) land where torch puts them,
    under the GPU's NaN rules for maximum/minimum: an activation built on tl.maximum would drop the NaN."""
    reference, kwargs = TORCH_ACT[name]
    c_out = 4
    values = torch.tensor(SPECIALS * 2, dtype=torch.float32)[: 4 * 5]
    x = values.view(1, 4, 5, 1)  # NHWC, one channel; 4 x 5 pixels
    slopes = torch.tensor([0.0, 0.25, -1.5, 2.0]) if name == "prelu" else None
    activation = "leaky_relu" if name.startswith("leaky") else name
    with gpu_nan_rules():
        y, pooled = conv2d_nhwc(
            x.to(device), _pointwise(c_out).to(device), None, ksize=1, activation=activation, pool=True,
            slopes=slopes.to(device) if slopes is not None else None, **kwargs,
        )  # fmt: skip
    t = x.permute(0, 3, 1, 2).expand(1, c_out, 4, 5)
    expected = reference(t, slopes)
    got = y.permute(0, 3, 1, 2).cpu()
    assert torch.equal(got.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert torch.equal(got[finite], expected[finite]), (got, expected)
    expected_pool = F.max_pool2d(expected, 2)
    got_pool = pooled.permute(0, 3, 1, 2).cpu()
    assert torch.equal(got_pool.isnan(), expected_pool.isnan())
    assert torch.equal(got_pool[~expected_pool.isnan()], expected_pool[~expected_pool.isnan()])


def test_pool_comes_after_a_non_monotonic_activation(device):
    """SiLU is not monotonic: max(silu(window)) differs from silu(max(window)); the kernel pools the activated
    map."""
    x = torch.tensor([[-5.0, -1.3], [-0.9, -4.0]]).view(1, 2, 2, 1)
    y, pooled = conv2d_nhwc(x.to(device), _pointwise(16).to(device), None, ksize=1, activation="silu", pool=True)
    expected = F.silu(x.double()).max()
    assert F.silu(x.double().max()) != expected
    assert torch.allclose(pooled.cpu().double(), expected.expand(1, 1, 1, 16), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["leaky_relu", "prelu", "silu", "clamp"])
def test_activation_with_fused_head_and_pool(device, dtype, name):
    """One launch, many channels: the activation before the pool and before the fused 1x1 head."""
    reference, kwargs = TORCH_ACT[name]
    batch, c_in, c_mid, n_cls, height, width = 2, 20, 24, 3, 7, 9
    x = torch.randn(batch, c_in, height, width).to(dtype)
    weight = (torch.randn(c_mid, c_in, 3, 3) / math.sqrt(9 * c_in)).to(dtype)
    bias = (torch.randn(c_mid) * 0.3).to(dtype)
    slopes = torch.linspace(-0.5, 0.8, c_mid).to(dtype) if name == "prelu" else None
    head_w = (torch.randn(n_cls, c_mid, 1, 1) / math.sqrt(c_mid)).to(dtype)
    head_b = (torch.randn(n_cls) * 0.1).to(dtype)
    to = {"device": device}
    features, pooled = conv2d_nhwc(
        x.permute(0, 2, 3, 1).to(**to), pack_conv_weight(weight).to(**to), bias.to(**to), activation=name,
        slopes=slopes.to(**to) if slopes is not None else None, pool=True, **kwargs,
    )  # fmt: skip
    logits, _ = conv2d_nhwc(
        x.permute(0, 2, 3, 1).to(**to), pack_conv_weight(weight).to(**to), bias.to(**to), activation=name,
        slopes=slopes.to(**to) if slopes is not None else None, head_weight=pack_conv_weight(head_w).to(**to),
        head_bias=head_b.to(**to), **kwargs,
    )  # fmt: skip
    pre = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    act = reference(pre, slopes.double() if slopes is not None else None)
    key = precision_key(dtype, device)
    assert_kernel_close(features.permute(0, 3, 1, 2), act, 9 * c_in, key)
    assert_kernel_close(pooled.permute(0, 3, 1, 2), F.max_pool2d(act, 2), 9 * c_in, key)
    head_ref = F.conv2d(act.to(dtype).double(), head_w.double(), head_b.double())
    assert_kernel_close(logits.permute(0, 3, 1, 2), head_ref, 9 * c_in + c_mid, key)


def test_prelu_slopes_are_plan_tensors_refreshed_in_place(device):
    layout = make_layout(act=ACTIVATIONS["prelu_per_channel"])
    _perturb_prelu(layout)
    plan = ops.build_plan(layout, torch.float32, device)
    slopes = [stage.slopes for pair in plan.encoders for stage in pair]
    assert all(s is not None for s in slopes)
    assert any(any(s is t for t in ops.plan_tensors(plan)) for s in slopes)
    module = layout.encoders[0][0].activation.module
    with torch.no_grad():
        module.weight.mul_(-2.0)
    fresh = ops.build_plan(layout, torch.float32, device)
    kept = plan.encoders[0][0].slopes
    assert ops.refresh_in_place(plan, fresh)
    assert plan.encoders[0][0].slopes is kept
    torch.testing.assert_close(kept.cpu().double(), module.weight.detach(), rtol=0, atol=0)
    # A changed activation kind or slope is a different launch: no in-place refresh.
    other = make_layout(act=ACTIVATIONS["leaky_relu"])
    steeper = make_layout(act=ACTIVATIONS["leaky_relu_steep"])
    assert not ops.refresh_in_place(ops.build_plan(other, torch.float32, device),
                                    ops.build_plan(steeper, torch.float32, device))  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# 2. Replicate join; 3. a 1x1 conv before the upsampling
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("up", ["transpose", "bilinear", "nearest"])
def test_replicate_join(device, dtype, up):
    # 13 x 11: the upsampled map is one row and one column short of the skip, repeated at the bottom/right.
    check_layout(make_layout(up=up, join="replicate", up_first=up == "nearest"), dtype, device)


def test_replicate_join_depth2_even_and_odd(device):
    check_layout(make_layout(depth=2, join="replicate", up="bilinear"), torch.float32, device, shape=(1, 3, 18, 13))


def test_replicate_join_kernel_reads_the_last_row_and_column(device):
    """Launcher level, one up-map row and column short, integer data: bit-exact against torch's replicate pad."""
    skip = torch.randint(-3, 4, (2, 6, 7, 9)).float()
    low = torch.randint(-3, 4, (2, 16, 6, 8)).float()
    weight = torch.randint(-2, 3, (16, 22, 3, 3)).float()
    bias = torch.randint(-2, 3, (16,)).float()
    y, _ = conv2d_nhwc(
        skip.permute(0, 2, 3, 1).to(device), pack_conv_weight(weight).to(device), bias.to(device),
        up=low.permute(0, 2, 3, 1).to(device), up_mode="direct", join="replicate",
    )  # fmt: skip
    joined = torch.cat([skip, F.pad(low, [0, 1, 0, 1], mode="replicate")], 1)
    expected = F.conv2d(joined.double(), weight.double(), bias.double(), padding=1).relu()
    assert torch.equal(y.permute(0, 3, 1, 2).cpu(), expected.float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("up", ["bilinear", "nearest"])
def test_conv_before_the_upsampling(device, dtype, up):
    records = check_layout(make_layout(depth=2, up=up, pre_conv=True), dtype, device, shape=(1, 3, 15, 13))
    pre = [r for r in records if r.stage and r.stage.endswith(".pre_conv")]
    assert len(pre) == 2 and all(r.constexprs["KSIZE"] == 1 and r.constexprs["ACT"] == 0 for r in pre)


# ---------------------------------------------------------------------------------------------------------------
# 4. Valid convs and the crop join
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("up", ["transpose", "bilinear"])
def test_valid_convs_crop_join(device, dtype, up):
    # 31 x 27 -> 27 x 23 (pool: 13 x 11, floor) -> 9 x 7 -> up 18 x 14; the skip cropped to it -> 14 x 10
    layout = make_layout(padding=0, join="crop", up=up)
    check_layout(layout, dtype, device, shape=(2, 3, 31, 27))


def test_valid_convs_depth2_with_3x3_head(device):
    layout = make_layout(depth=2, padding=0, join="crop", head_k=3, up_first=True)
    check_layout(layout, torch.float32, device, shape=(1, 3, 45, 47))


def test_valid_conv_kernel_shape_and_crop_offset(device):
    """Launcher level, integer data: a valid conv over the skip cropped (odd margins) to the upsampled map's size,
    bit-exact, with the floor-mode pool of the smaller output."""
    skip = torch.randint(-3, 4, (1, 5, 12, 11)).float()
    up = torch.randint(-3, 4, (1, 4, 9, 6)).float()
    weight = torch.randint(-2, 3, (16, 9, 3, 3)).float()
    y, pooled = conv2d_nhwc(
        skip.permute(0, 2, 3, 1).to(device), pack_conv_weight(weight).to(device), None, padding=0,
        up=up.permute(0, 2, 3, 1).to(device), up_mode="direct", join="crop", pool=True,
    )  # fmt: skip
    top, left = (12 - 9) // 2, (11 - 6) // 2
    joined = torch.cat([skip[..., top : top + 9, left : left + 6], up], 1)
    expected = F.conv2d(joined.double(), weight.double()).relu()
    assert y.shape == (1, 7, 4, 16) and pooled.shape == (1, 3, 2, 16)
    assert torch.equal(y.permute(0, 3, 1, 2).cpu(), expected.float())
    assert torch.equal(pooled.permute(0, 3, 1, 2).cpu(), F.max_pool2d(expected, 2).float())


def test_valid_conv_too_small_is_refused(device):
    x = torch.randn(1, 2, 5, 4, device=device)
    with pytest.raises(ValueError, match="needs an input of at least 3x3, got 2x5"):
        conv2d_nhwc(x, pack_conv_weight(torch.randn(16, 4, 3, 3, device=device)), padding=0)
    with pytest.raises(ValueError, match="padding must be 1"):
        conv2d_nhwc(x, pack_conv_weight(torch.randn(16, 4, 3, 3, device=device)), padding=2)


# ---------------------------------------------------------------------------------------------------------------
# 5. Pixel shuffle (+ blur); 6. a 3x3 head
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blur", [False, True], ids=["shuffle", "shuffle-blur"])
def test_pixel_shuffle(device, dtype, blur):
    records = check_layout(make_layout(up="pixelshuffle", blur=blur, join="replicate"), dtype, device)
    assert [r.stage for r in records].count("dec0.up") == 2


@pytest.mark.parametrize("dtype", [*DTYPES, pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("blur", [False, True], ids=["shuffle", "shuffle-blur"])
def test_pixel_shuffle_kernel(device, dtype, blur):
    """The shuffle is a copy (bit-exact against F.pixel_shuffle); the blur rounds its fp32 average once."""
    channels, low_h, low_w = 5, 3, 4
    conv_out = torch.randn(2, 4 * channels, low_h, low_w).to(dtype)  # pixel_shuffle's channel order c * 4 + k
    sub_major = conv_out.view(2, channels, 4, low_h, low_w).transpose(1, 2).reshape(2, 4 * channels, low_h, low_w)
    mode = "pixelshuffle_blur" if blur else "pixelshuffle"
    y = upsample2x_nhwc(sub_major.permute(0, 2, 3, 1).to(device), mode).permute(0, 3, 1, 2).cpu()
    shuffled = F.pixel_shuffle(conv_out.double(), 2)
    if not blur:
        assert torch.equal(y, shuffled.to(dtype))
        return
    expected = F.avg_pool2d(F.pad(shuffled, [1, 0, 1, 0]), 2, stride=1)
    assert_kernel_close(y, expected, 4, precision_key(dtype, torch.device(device)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_3x3_head(device, dtype):
    records = check_layout(make_layout(depth=2, head_k=3, act=ACTIVATIONS["silu"]), dtype, device, (1, 3, 15, 17))
    head = records[-1]
    assert head.stage == "head" and head.constexprs["KSIZE"] == 3 and head.constexprs["ACT"] == 0


def test_every_feature_together_and_launch_count(device):
    """Depth 2: PReLU, replicate join, a conv before the bilinear upsample, a 3x3 head, cat([up, skip])."""
    layout = make_layout(depth=2, act=ACTIVATIONS["prelu_one"], up="bilinear", pre_conv=True, join="replicate",
                         head_k=3, up_first=True)  # fmt: skip
    records = check_layout(layout, torch.float16, device, shape=(2, 3, 17, 14))
    # 2 per encoder level and the bottleneck, per decoder level the 1x1 conv, the upsample and 2 convs, the head.
    assert len(records) == 2 * 3 + 4 * 2 + 1


def test_unsupported_layouts_say_why():
    cases = {
        "a (5, 5) conv": make_layout(),
        "padding (2, 2)": make_layout(),
        "head": make_layout(head_k=5),
    }
    cases["a (5, 5) conv"].encoders[0][0].conv.kernel_size = (5, 5)
    cases["padding (2, 2)"].decoders[0][1].conv.padding = (2, 2)
    for words, layout in cases.items():
        reason = ops.unfused_reason(layout)
        assert reason is not None and words in reason, (words, reason)
        with pytest.raises(ValueError, match="cannot run this layout"):
            ops.build_plan(layout, torch.float32, torch.device("cpu"))
