"""The layout's math (``ops.layout_forward``) for every feature a :class:`~fastunet.ops.Layout` can describe, against
the same network written out by hand in float64 PyTorch; and ``unfused_reason`` accepting each of them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastunet import ops
from fastunet.ops import Act, ConvSpec, Layout, UpSpec


def _conv(c_in, c_out, k=3, padding=1):
    return nn.Conv2d(c_in, c_out, k, padding=padding).double()


def _layout(act_module=None, padding=1, up="transpose", join="pad", head_k=1, up_first=False):
    """Depth-1 layout with 4 -> 6 channels, every conv followed by ``act_module`` (ReLU when None)."""
    act = ops.act_of(act_module) if act_module is not None else None

    def pair(c_in, c_out):
        return ConvSpec(_conv(c_in, c_out, padding=padding), None, act), ConvSpec(
            _conv(c_out, c_out, padding=padding), None, act
        )

    if up == "transpose":
        spec = UpSpec("transpose", conv=nn.ConvTranspose2d(6, 3, 2, stride=2).double())
        up_channels = 3
    elif up == "pixelshuffle":
        spec = UpSpec("pixelshuffle", conv=_conv(6, 12), blur=True)
        up_channels = 3
    else:
        spec = UpSpec("bilinear", align_corners=True, pre_conv=_conv(6, 3, 1, 0))
        up_channels = 3
    head = nn.Conv2d(4, 2, head_k, padding=head_k // 2).double()
    return Layout((pair(2, 4), pair(4, 6)), (spec,), (pair(4 + up_channels, 4),), head, (up_first,), join)


def _by_hand(layout: Layout, x: torch.Tensor, act) -> torch.Tensor:
    def double(pair, t):
        for spec in pair:
            t = act(F.conv2d(t, spec.conv.weight, spec.conv.bias, padding=spec.conv.padding))
        return t

    skip = double(layout.encoders[0], x)
    low = double(layout.encoders[1], F.max_pool2d(skip, 2))
    up = layout.ups[0]
    if up.mode == "transpose":
        u = F.conv_transpose2d(low, up.conv.weight, up.conv.bias, stride=2)
    elif up.mode == "pixelshuffle":
        u = F.pixel_shuffle(F.conv2d(low, up.conv.weight, up.conv.bias, padding=1), 2)
        u = nn.Sequential(nn.ZeroPad2d((1, 0, 1, 0)), nn.AvgPool2d(2, stride=1))(u)
    else:
        u = F.conv2d(low, up.pre_conv.weight, up.pre_conv.bias)
        u = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)(u)
    dy, dx = skip.shape[-2] - u.shape[-2], skip.shape[-1] - u.shape[-1]
    if layout.join == "pad":
        u = F.pad(u, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
    elif layout.join == "replicate":
        u = nn.ReplicationPad2d((0, dx, 0, dy))(u)
    else:
        skip = skip[:, :, dy // 2 : dy // 2 + u.shape[-2], dx // 2 : dx // 2 + u.shape[-1]]
    joined = torch.cat([u, skip] if layout.up_first[0] else [skip, u], 1)
    out = double(layout.decoders[0], joined)
    return F.conv2d(out, layout.head.weight, layout.head.bias, padding=layout.head.padding)


ACTIVATIONS = {
    "relu": (None, F.relu),
    "leaky_relu": (nn.LeakyReLU(0.1), lambda t: torch.where(t >= 0, t, 0.1 * t)),
    "silu": (nn.SiLU(), lambda t: t * torch.sigmoid(t)),
    "relu6": (nn.ReLU6(), lambda t: t.clamp(0, 6)),
    "hardtanh": (nn.Hardtanh(-0.5, 0.25), lambda t: t.clamp(-0.5, 0.25)),
    "none": (nn.Identity(), lambda t: t),
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations(name):
    module, by_hand = ACTIVATIONS[name]
    layout = _layout(module)
    x = torch.randn(2, 2, 9, 11, dtype=torch.float64)
    torch.testing.assert_close(ops.layout_forward(layout, x), _by_hand(layout, x, by_hand), rtol=1e-12, atol=1e-12)


def test_prelu_per_channel_slopes_and_snapshot():
    prelu = nn.PReLU(4).double()
    with torch.no_grad():
        prelu.weight.copy_(torch.linspace(-0.5, 0.7, 4, dtype=torch.float64))
    act = ops.act_of(prelu)
    conv = _conv(3, 4)
    layout_pair = (ConvSpec(conv, None, act), ConvSpec(_conv(4, 4), None, act))
    x = torch.randn(1, 3, 5, 6, dtype=torch.float64)
    t = F.conv2d(x, conv.weight, conv.bias, padding=1)
    slopes = prelu.weight.view(1, 4, 1, 1)
    expected = torch.where(t >= 0, t, slopes * t)
    got = ops.apply_act(act, t)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # The slopes are among the values the math reads (the eval backward differentiates through them).
    deeper = (ConvSpec(_conv(4, 4), None, act), ConvSpec(_conv(4, 4), None, act))
    layout = Layout(
        (layout_pair, deeper),
        (UpSpec("nearest"),),
        ((ConvSpec(_conv(8, 4)), ConvSpec(_conv(4, 4))),),
        _conv(4, 2, 1, 0),
    )
    values = ops.layout_values(layout)
    assert values[(id(prelu), "weight")] is prelu.weight
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    before = ops.layout_forward(layout, x, values)
    values[(id(prelu), "weight")] = prelu.weight.detach() + 1.0
    changed = ops.layout_forward(layout, x, values)
    assert not torch.equal(changed, before)
    with torch.no_grad():
        prelu.weight.add_(1.0)
    torch.testing.assert_close(ops.layout_forward(layout, x), changed, rtol=0, atol=0)


@pytest.mark.parametrize("join", ["pad", "replicate"])
@pytest.mark.parametrize("up", ["transpose", "pixelshuffle", "bilinear"])
@pytest.mark.parametrize("up_first", [False, True])
def test_upsampling_and_joins(up, join, up_first):
    layout = _layout(up=up, join=join, up_first=up_first)
    x = torch.randn(2, 2, 9, 11, dtype=torch.float64)  # odd: every join pads
    torch.testing.assert_close(ops.layout_forward(layout, x), _by_hand(layout, x, F.relu), rtol=1e-12, atol=1e-12)


def test_valid_convs_crop_the_skip_and_3x3_head():
    layout = _layout(padding=0, join="crop", head_k=3)
    x = torch.randn(1, 2, 30, 34, dtype=torch.float64)
    got = ops.layout_forward(layout, x)
    torch.testing.assert_close(got, _by_hand(layout, x, F.relu), rtol=1e-12, atol=1e-12)
    # 30 -> 26 -> pool 13 -> 9 -> up 18; skip 26 cropped to 18 -> 14 -> 3x3 head (padding 1) keeps 14
    assert got.shape == (1, 2, 14, 18)


def test_every_described_feature_is_fused():
    """Each feature the layout describes runs on the kernels (tests/test_features.py checks their results)."""
    layouts = [
        _layout(),
        _layout(nn.LeakyReLU(0.01)),
        _layout(padding=0, join="crop"),
        _layout(join="replicate"),
        _layout(up="pixelshuffle"),
        _layout(up="bilinear"),
        _layout(head_k=3),
    ]
    for layout in layouts:
        assert ops.unfused_reason(layout) is None
        ops.build_plan(layout, torch.float32, torch.device("cpu"))


def test_bad_act_and_join_are_refused():
    with pytest.raises(ValueError, match="GELU is not a supported activation"):
        ops.act_of(nn.GELU())
    with pytest.raises(ValueError, match="activation kind"):
        Act("gelu")
    with pytest.raises(ValueError, match="lo <= hi"):
        Act("clamp", lo=1.0, hi=0.0)
    with pytest.raises(ValueError, match="join must be one of"):
        _layout(join="reflect")


class _StridedInstanceNormNet(nn.Module):
    """Depth 2, conv-norm-LeakyReLU twice per stage, the first conv of each deeper stage strided, transposed-conv
    up steps, cat([up, skip]), 1x1 head: the nnU-Net plain-conv structure, written out as modules."""

    def __init__(self, norm):
        super().__init__()
        widths = [4, 8, 16]

        def stage(c_in, c_out, stride):
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, stride, 1),
                norm(c_out),
                nn.LeakyReLU(0.01),
                nn.Conv2d(c_out, c_out, 3, 1, 1),
                norm(c_out),
                nn.LeakyReLU(0.01),
            )

        self.enc = nn.ModuleList([stage(2, 4, 1), stage(4, 8, 2), stage(8, 16, 2)])
        self.ups = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, 2) for i in range(2)])
        self.dec = nn.ModuleList([stage(2 * widths[i], widths[i], 1) for i in range(2)])
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        skips = []
        for stage in self.enc:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        for level in (1, 0):
            x = self.dec[level](torch.cat([self.ups[level](x), skips[level]], 1))
        return self.head(x)

    def layout(self) -> Layout:
        def pair(seq):
            return (
                ConvSpec(seq[0], seq[1], ops.act_of(seq[2])),
                ConvSpec(seq[3], seq[4], ops.act_of(seq[5])),
            )

        ups = tuple(UpSpec("transpose", conv=up) for up in self.ups)
        encoders = tuple(pair(s) for s in self.enc)
        decoders = tuple(pair(s) for s in self.dec)
        return Layout(encoders, ups, decoders, self.head, (True, True), "pad", "stride")


NORMS = {
    "instance_affine": lambda c: nn.InstanceNorm2d(c, affine=True),
    "instance": lambda c: nn.InstanceNorm2d(c),
    "group": lambda c: nn.GroupNorm(2, c),
    "instance_running": lambda c: nn.InstanceNorm2d(c, affine=True, track_running_stats=True),
}


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_norms_that_do_not_fold_and_strided_down_sampling(norm):
    torch.manual_seed(0)
    net = _StridedInstanceNormNet(NORMS[norm]).double().eval()
    for module in net.modules():
        if isinstance(module, (nn.InstanceNorm2d, nn.GroupNorm)) and module.weight is not None:
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
        if getattr(module, "running_var", None) is not None:
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 2, 16, 12, dtype=torch.float64)
    layout = net.layout()
    with torch.no_grad():
        torch.testing.assert_close(ops.layout_forward(layout, x), net(x), rtol=1e-12, atol=1e-12)
    # Folded (running statistics) or not, and down-sampled by strided convs: the kernels run it (tests/test_norms.py).
    assert ops.unfused_reason(layout) is None


def test_norm_kind():
    assert ops.norm_kind(None) is None
    assert ops.norm_kind(nn.BatchNorm2d(3)) == "folds"
    assert ops.norm_kind(nn.InstanceNorm2d(3)) == "instance"
    assert ops.norm_kind(nn.InstanceNorm2d(3, track_running_stats=True)) == "folds"
    assert ops.norm_kind(nn.GroupNorm(1, 3)) == "group"
    with pytest.raises(ValueError, match="batch statistics even in eval mode"):
        ops.norm_kind(nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="LayerNorm is not a supported norm"):
        ops.norm_kind(nn.LayerNorm(3))
    with pytest.raises(ValueError, match="down must be one of"):
        Layout((), (), (), nn.Conv2d(1, 1, 1), (), "pad", "avgpool")


def test_strided_conv_outside_the_down_step_is_named_unfused():
    net = _StridedInstanceNormNet(nn.BatchNorm2d).double().eval()
    layout = net.layout()
    relu = tuple(tuple(ConvSpec(s.conv, s.norm) for s in pair) for pair in layout.encoders)
    decoders = tuple(tuple(ConvSpec(s.conv, s.norm) for s in pair) for pair in layout.decoders)
    assert ops.unfused_reason(Layout(relu, layout.ups, decoders, layout.head, layout.up_first, "pad", "stride")) is None
    pooled = Layout(relu, layout.ups, decoders, layout.head, layout.up_first, "pad", "pool")
    expected = (
        "enc1.conv1: a strided conv is fused only as the first conv of a deeper level of a layout that down-samples "
        "by strided convs (Layout.down == 'stride')"
    )
    assert ops.unfused_reason(pooled) == expected
