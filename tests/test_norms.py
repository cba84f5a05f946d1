"""Norms that do not fold (InstanceNorm2d, GroupNorm) and strided-conv down-sampling on the kernels: the statistics
epilogue (pre-norm map + tile moments), the finalize launch, normalize-on-load in every consumer that supports it
(conv loader, transposed conv, upsample kernel, head), the normalize (+pool, +full) launch and stride-2 convs;
launcher by launcher against float64 torch, and whole layouts through ``build_plan``/``run_plan`` (which apply each
norm by a normalize launch ahead of a conv or transposed conv reader) against ``layout_forward``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_features import _conv, _rounded
from test_layout_math import NORMS, _StridedInstanceNormNet
from torch import nn

from fastunet import ops
from fastunet.kernels import launch_log
from fastunet.kernels._common import load_path
from fastunet.kernels.conv import conv2d_nhwc, conv_transpose2x2_nhwc, pack_conv_transpose_weight, pack_conv_weight
from fastunet.kernels.stats import NormIn, NormSpec, normalize_nhwc
from fastunet.kernels.upsample import upsample2x_nhwc
from fastunet.ops import ConvSpec, Layout, UpSpec
from tolerances import assert_kernel_close, assert_network_close, precision_key

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1)


def _nchw(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2).cpu()


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "c_in, height, width", [(3, 9, 7), (20, 8, 11), (17, 1, 5)], ids=["small-k-odd", "even-odd", "one-row"]
)
def test_strided_conv(device, dtype, c_in, height, width):
    """3x3 stride 2 padding 1: output ceil(H/2) x ceil(W/2) as torch's, the small-K and the flat loaders."""
    x = torch.randn(2, c_in, height, width).to(dtype)
    weight = (torch.randn(24, c_in, 3, 3) / math.sqrt(9 * c_in)).to(dtype)
    bias = torch.randn(24).to(dtype)
    y, _ = conv2d_nhwc(_nhwc(x).to(device), pack_conv_weight(weight).to(device), bias.to(device), stride=2)
    expected = F.conv2d(x.double(), weight.double(), bias.double(), stride=2, padding=1).relu()
    assert y.shape == _nhwc(expected).shape
    assert_kernel_close(_nchw(y), expected, 9 * c_in, precision_key(dtype, device))


def test_strided_valid_conv_size_and_refusals(device):
    x = torch.randn(1, 8, 10, 16)
    weight = torch.randn(16, 8, 3, 3)
    y, _ = conv2d_nhwc(_nhwc(x).to(device), pack_conv_weight(weight).to(device), None, padding=0, stride=2)
    expected = F.conv2d(x.double(), weight.double(), stride=2).relu()
    assert_kernel_close(_nchw(y), expected, 72, "fp32")
    with pytest.raises(ValueError, match="stride must be 1 or 2, got 3"):
        conv2d_nhwc(_nhwc(x).to(device), pack_conv_weight(weight).to(device), stride=3)
    with pytest.raises(ValueError, match="a strided conv reads one source"):
        conv2d_nhwc(_nhwc(x[:, :4]).to(device), pack_conv_weight(weight).to(device), stride=2,
                    up=_nhwc(x[:, 4:]).to(device), up_mode="direct")  # fmt: skip


def _norm_reference(pre: torch.Tensor, spec: NormSpec) -> torch.Tensor:
    weight = spec.weight.double().cpu() if spec.weight is not None else None
    bias = spec.bias.double().cpu() if spec.bias is not None else None
    if spec.groups == pre.shape[1]:
        return F.instance_norm(pre, weight=weight, bias=bias, eps=spec.eps)
    return F.group_norm(pre, spec.groups, weight, bias, spec.eps)


NORM_CASES = {
    "instance-affine": lambda c: NormSpec(c, torch.rand(c) + 0.5, torch.randn(c), 1e-5),
    "instance": lambda c: NormSpec(c, None, None, 1e-5),
    "group": lambda c: NormSpec(4, torch.rand(c) + 0.5, torch.randn(c), 1e-3),
}


def _on(spec: NormSpec, device) -> NormSpec:
    move = (lambda t: t.to(device)) if spec.weight is not None else (lambda t: t)
    return NormSpec(spec.groups, move(spec.weight), move(spec.bias), spec.eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", sorted(NORM_CASES))
@pytest.mark.parametrize("path", ["pointer", "tma"])
def test_stats_epilogue_then_normalize_on_load(device, dtype, norm, path):
    """The producer stores the pre-norm map (bias, no activation) and returns per-(image, channel) scale and shift;
    the consumer conv reads act(z * scale + shift), zero padding after it. Batch 3, odd sizes; the producer on both
    load paths (its tiles are one image's on each)."""
    batch, c_in, c_mid, c_out, height, width = 3, 16, 16, 24, 7, 9
    x = torch.randn(batch, c_in, height, width).to(dtype)
    weight = (torch.randn(c_mid, c_in, 3, 3) / math.sqrt(9 * c_in)).to(dtype)
    bias = (torch.randn(c_mid) + 1.0).to(dtype)
    spec = NORM_CASES[norm](c_mid)
    with load_path(path), launch_log() as records:
        z, norm_in = conv2d_nhwc(
            _nhwc(x).contiguous().to(device), pack_conv_weight(weight).to(device), bias.to(device),
            activation="leaky_relu", slope=0.01, norm=_on(spec, device),
        )  # fmt: skip
    assert records[0].path == path and records[0].constexprs["STATS"] and records[1].name == "norm_scale_shift"
    key = precision_key(dtype, device)
    pre = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    assert_kernel_close(_nchw(z), pre, 9 * c_in, key)
    assert isinstance(norm_in, NormIn) and norm_in.activation == "leaky_relu" and norm_in.scale.shape == (batch, c_mid)
    # The statistics are those of the stored map: the consumer must match the norm of z itself.
    normalized = F.leaky_relu(_norm_reference(_nchw(z).double(), spec), 0.01)
    weight2 = (torch.randn(c_out, c_mid, 3, 3) / math.sqrt(9 * c_mid)).to(dtype)
    y, _ = conv2d_nhwc(z, pack_conv_weight(weight2).to(device), None, activation="none", norm_in=norm_in)
    expected = F.conv2d(normalized.to(dtype).double(), weight2.double(), padding=1)
    assert_kernel_close(_nchw(y), expected, 9 * c_mid, key)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "prelu", "silu", "clamp"])
def test_every_consumer_reads_the_normalized_map(device, dtype, act):
    """Transposed conv, nearest and bilinear upsampling, the normalize+pool launch, a 1x1 head, a pooled conv and a
    stride-2 conv, all reading one pre-norm map through its norm and activation."""
    batch, channels, height, width = 3, 6, 7, 5
    z = (torch.randn(batch, channels, height, width) * 2 + 0.5).to(dtype)
    spec = NormSpec(2, torch.rand(channels) + 0.5, torch.randn(channels), 1e-5)
    kwargs = {"leaky_relu": {"slope": 0.1}, "clamp": {"lo": -0.5, "hi": 0.7}}.get(act, {})
    slopes = torch.linspace(-0.5, 0.9, channels) if act == "prelu" else None
    # scale and shift in fp32 from float64 statistics of z: the consumers alone are under test here.
    z64 = z.double()
    mean = z64.view(batch, 2, -1).mean(-1).repeat_interleave(3, 1)
    var = z64.view(batch, 2, -1).var(-1, unbiased=False).repeat_interleave(3, 1)
    scale = spec.weight.double() / (var + spec.eps).sqrt()
    shift = spec.bias.double() - mean * scale
    norm_in = NormIn(scale.float().to(device), shift.float().to(device), act, slopes=slopes.to(dtype).to(device)
                     if slopes is not None else None, **kwargs)  # fmt: skip
    normalized = z64 * scale.float().double()[:, :, None, None] + shift.float().double()[:, :, None, None]
    act_fn = {
        "relu": F.relu,
        "leaky_relu": lambda t: F.leaky_relu(t, 0.1),
        "silu": F.silu,
        "prelu": lambda t: F.prelu(t, slopes.to(dtype).double()),
        "clamp": lambda t: t.clamp(-0.5, 0.7),
    }[act]
    ref = act_fn(normalized)
    key = precision_key(dtype, device)
    zd = _nhwc(z).to(device)

    assert_kernel_close(_nchw(normalize_nhwc(zd, norm_in)), ref, 1, key)
    assert_kernel_close(_nchw(normalize_nhwc(zd, norm_in, pool=True)), F.max_pool2d(ref, 2), 1, key)
    # full=True: the whole normalized map (odd 7x5: its last row and column lie past every pooled window) and the
    # pooled one from one pass, each bit for bit what its own launch stores
    whole, pooled_map = normalize_nhwc(zd, norm_in, pool=True, full=True)
    assert_kernel_close(_nchw(whole), ref, 1, key)
    assert torch.equal(whole, normalize_nhwc(zd, norm_in)) and whole.is_contiguous()
    assert torch.equal(pooled_map, normalize_nhwc(zd, norm_in, pool=True))
    for mode in ("nearest", "bilinear"):
        got = upsample2x_nhwc(zd, mode, norm_in=norm_in)
        assert_kernel_close(_nchw(got), F.interpolate(ref, scale_factor=2, mode=mode), 4, key)
    wt = torch.randn(channels, 4, 2, 2).to(dtype)
    got = conv_transpose2x2_nhwc(zd, pack_conv_transpose_weight(wt).to(device), None, norm_in=norm_in)
    rounded = ref.to(dtype).double()  # the loader rounds the normalized operand once to the storage dtype
    assert_kernel_close(_nchw(got), F.conv_transpose2d(rounded, wt.double(), stride=2), channels, key)
    w1 = torch.randn(16, channels, 3, 3).to(dtype)
    y, pooled = conv2d_nhwc(zd, pack_conv_weight(w1).to(device), None, norm_in=norm_in, pool=True)
    full = F.conv2d(rounded, w1.double(), padding=1).relu()
    assert_kernel_close(_nchw(y), full, 9 * channels, key)
    assert_kernel_close(_nchw(pooled), F.max_pool2d(full, 2), 9 * channels, key)
    y, _ = conv2d_nhwc(zd, pack_conv_weight(w1).to(device), None, norm_in=norm_in, stride=2)
    assert_kernel_close(_nchw(y), F.conv2d(rounded, w1.double(), padding=1, stride=2).relu(), 9 * channels, key)
    head_w = torch.randn(2, channels, 1, 1).to(dtype)
    logits, _ = conv2d_nhwc(zd, pack_conv_weight(head_w).to(device), None, ksize=1, activation="none",
                            norm_in=norm_in)  # fmt: skip
    assert_kernel_close(_nchw(logits), F.conv2d(rounded, head_w.double()), channels, key)


def test_norm_launch_refusals(device):
    x = torch.randn(1, 4, 4, 8, device=device)
    weight = pack_conv_weight(torch.randn(16, 8, 3, 3, device=device))
    with pytest.raises(ValueError, match="no fused pool or head"):
        conv2d_nhwc(x, weight, norm=NormSpec(16), pool=True)
    with pytest.raises(ValueError, match="positive divisor of the 16 output channels, got 5"):
        conv2d_nhwc(x, weight, norm=NormSpec(5))
    bad = NormIn(torch.ones(1, 7, device=device), torch.zeros(1, 7, device=device))
    with pytest.raises(ValueError, match=r"normalization scale: expected float32 \(1, 8\)"):
        conv2d_nhwc(x, weight, norm_in=bad)
    with pytest.raises(ValueError, match="PReLU slopes are given with the 'prelu' activation"):
        normalize_nhwc(x, NormIn(torch.ones(1, 8, device=device), torch.zeros(1, 8, device=device), "prelu"))
    with pytest.raises(ValueError, match="full=True returns the normalized map next to the pooled one; it needs pool"):
        normalize_nhwc(x, NormIn(torch.ones(1, 8, device=device), torch.zeros(1, 8, device=device)), full=True)


# ---------------------------------------------------------------------------------------------------------------
# Whole layouts
# ---------------------------------------------------------------------------------------------------------------
def _norm_module(kind: str | None, channels: int) -> nn.Module | None:
    if kind is None:
        return None
    if kind == "batch":
        module = nn.BatchNorm2d(channels).eval()
        with torch.no_grad():
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    elif kind == "group":
        module = nn.GroupNorm(2, channels)
    else:
        module = nn.InstanceNorm2d(channels, affine=kind == "instance_affine")
    if module.weight is not None:
        with torch.no_grad():
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.5, 0.5)
    return _rounded(module)


def norm_layout(
    *,
    depth: int = 1,
    norm: str | None = "instance_affine",
    act: str = "leaky_relu",
    down: str = "pool",
    up: str = "transpose",
    up_first: bool = False,
    in_channels: int = 2,
    base: int = 4,
    classes: int = 3,
    head_norm: bool = True,
) -> Layout:
    """A U-Net layout with ``norm`` after every conv (the last decoder conv too unless ``head_norm`` is False) and
    ``act`` after it; ``down="stride"``: the first conv of each deeper level has stride 2 (nnU-Net, DynUNet)."""

    def spec(c_in: int, c_out: int, stride: int = 1, kind: str | None = norm) -> ConvSpec:
        conv = _conv(c_in, c_out)
        conv.stride = (stride, stride)
        activation = ops.act_of(nn.LeakyReLU(0.01) if act == "leaky_relu" else nn.ReLU())
        return ConvSpec(conv, _norm_module(kind, c_out), activation)

    widths = [base * 2**level for level in range(depth + 1)]
    encoders = tuple(
        (
            spec(in_channels if level == 0 else widths[level - 1], width, 2 if down == "stride" and level else 1),
            spec(width, width),
        )
        for level, width in enumerate(widths)
    )
    ups, decoders = [], []
    for level in range(depth):
        low, skip = widths[level + 1], widths[level]
        if up == "transpose":
            ups.append(UpSpec("transpose", conv=_rounded(nn.ConvTranspose2d(low, skip, 2, stride=2))))
            up_channels = skip
        else:
            ups.append(UpSpec(up, align_corners=False))
            up_channels = low
        last = spec(skip, skip, kind=norm if head_norm or level else None)
        decoders.append((spec(skip + up_channels, skip), last))
    head = _conv(widths[0], classes, 1, 0)
    return Layout(encoders, tuple(ups), tuple(decoders), head, (up_first,) * depth, "pad", down)


def run_layout(layout: Layout, x64: torch.Tensor, dtype: torch.dtype, device) -> tuple[torch.Tensor, list]:
    plan = ops.build_plan(layout, dtype, device)
    with torch.no_grad(), launch_log() as records:
        out = ops.run_plan(plan, x64.to(device, dtype))
    assert out.dtype == dtype
    return out, records


def check(layout: Layout, dtype: torch.dtype, device, shape=(3, 2, 13, 11)) -> list:
    assert ops.unfused_reason(layout) is None
    x = torch.randn(shape).half().double()
    expected = ops.layout_forward(layout, x)
    out, records = run_layout(layout, x, dtype, device)
    assert_network_close(out, expected, precision_key(dtype, device))
    return records


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "norm, act",
    [("instance_affine", "leaky_relu"), ("instance", "relu"), ("group", "leaky_relu")],
    ids=["instance-affine-lrelu", "instance-relu", "group-lrelu"],
)
def test_norm_layout_pool_down(device, dtype, norm, act):
    """Max-pool down-sampling after the norm (the normalize+pool launch), transposed-conv up, unfused head."""
    records = check(norm_layout(norm=norm, act=act), dtype, device)
    stages = [r.stage for r in records]
    assert "enc0.pool" in stages and stages[-1] == "head"
    assert not any(r.constexprs.get("POOL") for r in records if "conv" in r.name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3])
def test_strided_down_sampling_depth2(device, dtype, batch):
    """nnU-Net's encoder: the first conv of each deeper level strided, no pool; odd sizes (the up map one row
    larger than the skip: a negative centred pad), cat([up, skip])."""
    layout = norm_layout(depth=2, down="stride", up_first=True)
    records = check(layout, dtype, device, shape=(batch, 2, 13, 11))
    strided = [r.stage for r in records if r.constexprs.get("STRIDE") == 2]
    assert strided == ["enc1.conv1", "bottleneck.conv1"]
    assert not any("pool" in r.name for r in records)


def test_basic_unet_like_and_mixed_norms(device):
    """MONAI BasicUNet's defaults: instance norm + LeakyReLU, max-pool, deconv; here mixed with a plain last conv
    (its epilogue fuses the head while reading a normalized map) and a bilinear upsample of a normalized map."""
    check(norm_layout(depth=2, head_norm=False), torch.float16, device, shape=(1, 2, 17, 14))
    check(norm_layout(depth=1, up="bilinear", norm="group"), torch.float32, device, shape=(2, 2, 9, 12))


def test_folded_and_data_norms_mix(device):
    """A layout where some convs fold a BatchNorm and others carry an InstanceNorm: a folded conv with a fused pool
    reading a normalized map (the eval forward applies the norm by one pass first, then the conv loads it as stored;
    the pooled conv normalizing on load itself is test_every_consumer_reads_the_normalized_map's)."""
    layout = norm_layout(norm="instance_affine")
    enc0 = layout.encoders[0]
    folded = ConvSpec(enc0[1].conv, _norm_module("batch", enc0[1].conv.out_channels), enc0[1].activation)
    layout = Layout(((enc0[0], folded), layout.encoders[1]), layout.ups, layout.decoders, layout.head,
                    layout.up_first, layout.join, layout.down)  # fmt: skip
    records = check(layout, torch.float32, device, shape=(3, 2, 11, 9))
    pooled = [r for r in records if r.stage == "enc0.conv2"]
    assert len(pooled) == 1 and pooled[0].constexprs["POOL"] and not pooled[0].constexprs["NORM_IN"]
    assert [r.name for r in records if r.stage == "enc0.conv2.normalize"] == ["normalize"]


@pytest.mark.parametrize("norm", ["instance_affine", "instance", "group"])
def test_nnunet_structured_model(device, norm):
    """The nnU-Net-structured model of tests/test_layout_math.py through build_plan/run_plan, fp32 and fp16."""
    torch.manual_seed(0)
    net = _StridedInstanceNormNet(NORMS[norm]).eval()
    for module in net.modules():
        if isinstance(module, (nn.InstanceNorm2d, nn.GroupNorm)) and module.weight is not None:
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    net = _rounded(net)
    layout = net.layout()
    x = torch.randn(3, 2, 16, 12).half().double()
    with torch.no_grad():
        expected = net(x)
    for dtype in (torch.float32, torch.float16):
        out, records = run_layout(layout, x, dtype, device)
        assert_network_close(out, expected, precision_key(dtype, device))
    # 10 convs with their finalize launches, 2 transposed convs, the head; and 9 passes applying a norm before a
    # (transposed) conv reads the map: each conv's output but the last, the skips applied once for both readers
    assert len(records) == 2 * 10 + 2 + 1 + 9
    assert sum(r.name == "norm_scale_shift" for r in records) == 10
    applied = [r.stage for r in records if r.name == "normalize"]
    assert applied == ["enc0.conv2.normalize", "enc0.skip.normalize", "enc1.conv2.normalize", "enc1.skip.normalize",
                       "bottleneck.conv2.normalize", "dec1.up.normalize", "dec1.conv2.normalize", "dec0.up.normalize",
                       "dec0.conv2.normalize"]  # fmt: skip
    # only the 1x1 head still normalizes on load
    assert [r.stage for r in records if r.constexprs.get("NORM_IN")] == ["head"]


def test_batch_independence_and_determinism(device):
    """The statistics are per image: image i of a batch of 3 equals that image alone, bit for bit; two runs equal."""
    layout = norm_layout(depth=2, down="stride", norm="group")
    x = torch.randn(3, 2, 13, 11).half().double()
    batched, _ = run_layout(layout, x, torch.float16, device)
    again, _ = run_layout(layout, x, torch.float16, device)
    assert torch.equal(batched, again)
    for i in range(3):
        alone, _ = run_layout(layout, x[i : i + 1], torch.float16, device)
        assert torch.equal(batched[i : i + 1], alone), i


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_special_values_poison_only_their_image(device, value):
    """One NaN or inf pixel in image 1: its instance statistics are NaN, so image 1's logits are NaN as in torch;
    images 0 and 2 are untouched."""
    layout = norm_layout(depth=1)
    x = torch.randn(3, 2, 9, 7).half().double()
    x[1, 0, 4, 3] = value
    expected = ops.layout_forward(layout, x)
    out, _ = run_layout(layout, x, torch.float32, device)
    assert torch.equal(out.isnan().cpu(), expected.isnan())
    assert expected[1].isnan().all() and not expected[[0, 2]].isnan().any()
    assert_network_close(out[[0, 2]], expected[[0, 2]], precision_key(torch.float32, device))


def test_norm_params_are_plan_tensors_refreshed_in_place(device):
    layout = norm_layout()
    plan = ops.build_plan(layout, torch.float16, device)
    norm_stage = plan.encoders[0][0].norm
    assert norm_stage is not None and norm_stage.weight.dtype == torch.float32
    assert any(norm_stage.weight is t for t in ops.plan_tensors(plan))
    module = layout.encoders[0][0].norm
    with torch.no_grad():
        module.weight.mul_(2.0)
    assert ops.refresh_in_place(plan, ops.build_plan(layout, torch.float16, device))
    torch.testing.assert_close(norm_stage.weight.cpu().double(), module.weight.detach(), rtol=0, atol=0)
    # another eps is another launch constant: no in-place refresh
    module.eps = 1e-3
    assert not ops.refresh_in_place(plan, ops.build_plan(layout, torch.float16, device))


def test_strided_convs_elsewhere_are_refused():
    layout = norm_layout(depth=2, down="stride")
    layout.decoders[0][1].conv.stride = (2, 2)
    assert "dec0.conv2: a strided conv is fused only as the first conv of a deeper level" in ops.unfused_reason(layout)
    pooled = norm_layout(depth=1, down="pool")
    pooled.encoders[1][0].conv.stride = (2, 2)
    assert "bottleneck.conv1: a strided conv is fused only" in ops.unfused_reason(pooled)
    missing = norm_layout(depth=2, down="stride")
    missing.encoders[1][0].conv.stride = (1, 1)
    assert "enc1.conv1: with strided down-sampling" in ops.unfused_reason(missing)
