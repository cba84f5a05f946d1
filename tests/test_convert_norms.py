"""``convert`` on the default U-Nets of nnU-Net and MONAI: InstanceNorm / GroupNorm after each conv, LeakyReLU, and
down-sampling by a 3x3 stride-2 first conv instead of a max-pool; modules that never run in the eval forward (nnU-Net's
deep-supervision heads) left out, modules whose result is discarded refused.

The models are written here with the structure of the originals (nnU-Net's plain conv U-Net, MONAI's ``BasicUNet``
and ``DynUNet``), small. Per model, as in ``tests/test_convert_structure.py``: the recognised layout's float64 math
equals the model's own float64 forward (odd sizes where the model accepts them), and ``convert`` either fuses it with
parity or refuses with ``ops.unfused_reason``'s words, whichever the kernels allow.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_convert_structure import assert_converts_or_names_the_gap, assert_recognized
from torch import nn

import fastunet
from fastunet import ConversionError, ConvertedUNet, ops
from fastunet.convert import recognize
from fastunet.kernels import _common


def randomize_norms(model: nn.Module, seed: int = 1) -> nn.Module:
    """Affine parameters and running statistics of every norm drawn at random (a fresh norm's weight 1 and bias 0
    would let a parameter mapped to the wrong place pass); returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm)):
                if module.weight is not None:
                    module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.2)
                if getattr(module, "running_mean", None) is not None:
                    module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                    module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return model.eval()


# fp32 kernels against float64: the forward's normwise budget, on top of twice eager float32's own error.
GRAD_BUDGET = 1e-5
KERNELS = ("triton", "triton-interpreter")


def _grads(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    model(x).backward(grad)
    return {"input": x.grad, **{name: p.grad for name, p in model.named_parameters() if p.grad is not None}}


def assert_trains_on_the_kernels(source: nn.Module, x: torch.Tensor, device, training: bool = True) -> dict:
    """Convert ``source``, run forward and backward in ``training`` mode on ``device`` and check: the backward ran on
    the kernels (``last_backend_reason``), every gradient the source's own float64 autograd has (input and parameters)
    is there, within twice eager float32 PyTorch's own error plus the budget (a conv bias right before an
    InstanceNorm has a zero gradient in exact math: its error is held to the layer's weight gradient's scale).
    Returns the converted model's gradients."""
    converted = fastunet.convert(copy.deepcopy(source).to(device)).train(training)
    exact = copy.deepcopy(source).double().train(training)
    with torch.no_grad():
        grad = torch.randn(exact(x.double()).shape, generator=torch.Generator().manual_seed(3))
    found = _grads(converted, x.to(device), grad.to(device))
    assert converted.last_backend in KERNELS, converted.last_backend_reason
    assert converted.last_backend_reason == f"{'training' if training else 'eval'} mode; backward kernels", (
        converted.last_backend_reason
    )
    expected = _grads(exact, x.double(), grad.double())
    eager = _grads(copy.deepcopy(source).train(training), x, grad)
    assert set(found) == set(expected)
    for name, value in found.items():
        err = float((value.double().cpu() - expected[name]).norm())
        eager_err = float((eager[name].double() - expected[name]).norm())
        scale = float(expected[name].norm())
        if name.endswith(".bias") and name[: -len("bias")] + "weight" in expected:  # the same layer's scale
            scale = max(scale, float(expected[name[: -len("bias")] + "weight"].norm()))
        assert err <= 2 * eager_err + GRAD_BUDGET * scale, (name, err, eager_err, scale)
    return found


def _refusal(model: nn.Module) -> str:
    with pytest.raises(ConversionError) as info:
        fastunet.convert(model)
    return str(info.value)


NORMS = {
    "instance": lambda c: nn.InstanceNorm2d(c, affine=True),
    "instance-plain": lambda c: nn.InstanceNorm2d(c),
    "instance-running": lambda c: nn.InstanceNorm2d(c, affine=True, track_running_stats=True),
    "group": lambda c: nn.GroupNorm(2, c),
}
KINDS = {"instance": "instance", "instance-plain": "instance", "instance-running": "folds", "group": "group"}


# -- nnU-Net's plain conv U-Net ---------------------------------------------------------------------------------------
class ConvNormAct(nn.Module):
    """conv, dropout (none here), norm, nonlinearity, kept both as attributes and as one ``nn.Sequential`` that the
    forward runs (nnU-Net's ``ConvDropoutNormReLU``)."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride, 1)
        self.norm = norm(c_out)
        self.nonlin = nn.LeakyReLU(0.01, inplace=True)
        self.all_modules = nn.Sequential(self.conv, self.norm, self.nonlin)

    def forward(self, x):
        return self.all_modules(x)


class StackedConvs(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm) -> None:
        super().__init__()
        self.convs = nn.Sequential(ConvNormAct(c_in, c_out, stride, norm), ConvNormAct(c_out, c_out, 1, norm))

    def forward(self, x):
        return self.convs(x)


class PlainEncoder(nn.Module):
    def __init__(self, c_in: int, widths, norm) -> None:
        super().__init__()
        stages, previous = [], c_in
        for level, width in enumerate(widths):
            stages.append(StackedConvs(previous, width, 1 if level == 0 else 2, norm))
            previous = width
        self.stages = nn.Sequential(*stages)

    def forward(self, x):
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class PlainDecoder(nn.Module):
    """Per stage from the bottom: a transposed conv (kernel = stride = 2), ``cat((up, skip))``, two convs; a 1x1
    segmentation layer per stage, of which only the last runs unless ``deep_supervision``."""

    def __init__(self, widths, n_cls: int, norm, deep_supervision: bool) -> None:
        super().__init__()
        self.deep_supervision = deep_supervision
        self.transpconvs, self.stages, self.seg_layers = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(widths) - 1)):
            below, width = widths[level + 1], widths[level]
            self.transpconvs.append(nn.ConvTranspose2d(below, width, 2, 2))
            self.stages.append(StackedConvs(2 * width, width, 1, norm))
            self.seg_layers.append(nn.Conv2d(width, n_cls, 1))

    def forward(self, skips):
        low, outputs = skips[-1], []
        for s, stage in enumerate(self.stages):
            x = torch.cat((self.transpconvs[s](low), skips[-(s + 2)]), 1)
            x = stage(x)
            if self.deep_supervision:
                outputs.append(self.seg_layers[s](x))
            elif s == len(self.stages) - 1:
                outputs.append(self.seg_layers[-1](x))
            low = x
        outputs = outputs[::-1]
        return outputs if self.deep_supervision else outputs[0]


class PlainConvUNet(nn.Module):
    def __init__(self, c_in=2, n_cls=3, widths=(4, 8, 16), norm=NORMS["instance"], deep_supervision=False) -> None:
        super().__init__()
        self.encoder = PlainEncoder(c_in, widths, norm)
        self.decoder = PlainDecoder(widths, n_cls, norm, deep_supervision)

    def forward(self, x):
        return self.decoder(self.encoder(x))


def plain_conv_unet(seed: int = 0, **kw) -> PlainConvUNet:
    torch.manual_seed(seed)
    return randomize_norms(PlainConvUNet(**kw), seed + 1)


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_nnunet_plain_conv_unet(device, norm):
    """Conv-norm-LeakyReLU twice per stage, the first conv of each deeper stage strided, transposed convs up,
    ``cat((up, skip))``, deep-supervision heads present but not run: recognised (their parameters left out) and
    converted or refused naming the kernels' gap. nnU-Net's decoder concatenates without padding, so the sizes are
    multiples of 4 at depth 2."""
    model = plain_conv_unet(norm=NORMS[norm])
    for size in ((16, 24), (8, 12)):
        layout = assert_recognized(model, size)
    assert layout.depth == 2 and layout.down == "stride" and all(layout.up_first)
    assert {ops.norm_kind(spec.norm) for _, spec in layout.conv_specs()} == {KINDS[norm]}
    assert {(spec.activation.kind, spec.activation.slope) for _, spec in layout.conv_specs()} == {("leaky_relu", 0.01)}
    strides = [tuple(spec.conv.stride) for _, spec in layout.conv_specs()]
    assert strides == [(1, 1)] * 2 + [(2, 2), (1, 1)] * 2 + [(1, 1)] * 4
    assert layout.head is model.decoder.seg_layers[-1]
    assert layout.encoders[1][0].norm is model.encoder.stages[1].convs[0].norm
    assert assert_converts_or_names_the_gap(model, device, size=(16, 24)) == "fused"


# The GroupNorm eval case is the slower twin of the InstanceNorm training one (same kernels, no batch statistics).
@pytest.mark.parametrize(
    ("norm", "training"), [("instance", True), pytest.param("group", False, marks=pytest.mark.slow)]
)
def test_nnunet_plain_conv_unet_trains_on_the_kernels(device, norm, training):
    """The whole network's gradients on the backward kernels, the strided first convs of the deeper stages included
    (their weight gradients reading every other pixel, their input gradients as four output phases), against float64
    autograd of the source."""
    model = plain_conv_unet(norm=NORMS[norm])
    x = torch.randn(2, 2, 8, 12, generator=torch.Generator().manual_seed(2))
    assert_trains_on_the_kernels(model, x, device, training)


def test_nnunet_backward_runs_are_bitwise_identical(device):
    converted = fastunet.convert(plain_conv_unet().to(device)).train()
    x, grad = torch.randn(1, 2, 8, 8, device=device), torch.randn(1, 3, 8, 8, device=device)
    first, second = _grads(converted, x, grad), _grads(converted, x, grad)
    assert converted.last_backend_reason == "training mode; backward kernels"
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_unused_deep_supervision_heads_are_left_out_and_kept():
    """The heads that never run in the eval forward are no part of the layout, but stay in the converted module
    (same ``state_dict`` keys, shared tensors) for the source's own forward in training mode."""
    model = plain_conv_unet()
    found = recognize(model)
    layout = found.recipe.resolve(model)
    used = {id(p) for _, spec in layout.conv_specs() for p in spec.conv.parameters()}
    assert all(id(p) not in used for p in model.decoder.seg_layers[0].parameters())
    converted = ConvertedUNet(model, found.recipe)
    assert converted.state_dict().keys() == model.state_dict().keys()
    assert converted.get_parameter("decoder.seg_layers.0.weight") is model.decoder.seg_layers[0].weight


def test_deep_supervision_on_is_refused():
    message = _refusal(plain_conv_unet(deep_supervision=True))
    assert "PlainConvUNet.forward returned list: the fused forward computes one tensor" in message, message


def test_a_head_whose_result_is_discarded_is_refused():
    """A module that runs in the eval forward but whose output does not reach the result is refused, naming it."""

    class Discarding(PlainDecoder):
        def forward(self, skips):
            out = super().forward(skips)
            self.seg_layers[0](skips[0].new_zeros(1, self.seg_layers[0].in_channels, 2, 2))
            return out

    model = plain_conv_unet()
    model.decoder.__class__ = Discarding
    message = _refusal(model)
    assert "PlainConvUNet: Conv2d at 'decoder.seg_layers.0': runs, but its result does not reach the output" in (
        message
    ), message


def test_parameters_read_outside_a_module_call_are_refused():
    """A module that never runs, but whose weight the forward reads (and discards): the trace sees the read."""

    class Peeking(PlainConvUNet):
        def forward(self, x):
            self.decoder.seg_layers[0].weight.sum()
            return super().forward(x)

    torch.manual_seed(0)
    message = _refusal(randomize_norms(Peeking()))
    assert "Peeking: parameter 'decoder.seg_layers.0.weight' of Conv2d: read by the forward, but not used" in (
        message
    ), message


# -- MONAI BasicUNet -------------------------------------------------------------------------------------------------
class TwoConv(nn.Module):
    """(conv, norm, LeakyReLU(0.1)) twice; ``functional``: the norm and the activation called as functions with the
    norm module's own parameters."""

    def __init__(self, c_in: int, c_out: int, norm, functional: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.conv_0 = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), norm(c_out), nn.LeakyReLU(0.1))
        self.conv_1 = nn.Sequential(nn.Conv2d(c_out, c_out, 3, padding=1), norm(c_out), nn.LeakyReLU(0.1))

    def forward(self, x):
        if not self.functional:
            return self.conv_1(self.conv_0(x))
        for block in (self.conv_0, self.conv_1):
            conv, norm = block[0], block[1]
            x = conv(x)
            if isinstance(norm, nn.GroupNorm):
                x = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
            else:
                x = F.instance_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, eps=norm.eps)
            x = F.leaky_relu(x, 0.1)
        return x


class UpCat(nn.Module):
    """A transposed conv, the upsampled map replicate-padded at the bottom/right to the skip, ``cat([skip, up])``."""

    def __init__(self, below: int, skip: int, out: int, norm, functional: bool = False) -> None:
        super().__init__()
        self.upsample = nn.ConvTranspose2d(below, below // 2, 2, 2)
        self.convs = TwoConv(skip + below // 2, out, norm, functional)

    def forward(self, x, skip):
        up = self.upsample(x)
        dy, dx = skip.shape[-2] - up.shape[-2], skip.shape[-1] - up.shape[-1]
        up = F.pad(up, [0, dx, 0, dy], mode="replicate")
        return self.convs(torch.cat([skip, up], dim=1))


class BasicLike(nn.Module):
    """MONAI ``BasicUNet``'s structure with its defaults (InstanceNorm with affine parameters, LeakyReLU 0.1), depth
    2: max-pool down steps, transposed-conv up steps, the replicate join."""

    def __init__(self, c_in=3, n_cls=2, widths=(4, 8, 16), norm=NORMS["instance"], functional=False) -> None:
        super().__init__()
        self.conv_0 = TwoConv(c_in, widths[0], norm, functional)
        self.down_1 = nn.Sequential(nn.MaxPool2d(2), TwoConv(widths[0], widths[1], norm, functional))
        self.down_2 = nn.Sequential(nn.MaxPool2d(2), TwoConv(widths[1], widths[2], norm, functional))
        self.upcat_2 = UpCat(widths[2], widths[1], widths[1], norm, functional)
        self.upcat_1 = UpCat(widths[1], widths[0], widths[0], norm, functional)
        self.final_conv = nn.Conv2d(widths[0], n_cls, 1)

    def forward(self, x):
        x0 = self.conv_0(x)
        x1 = self.down_1(x0)
        x2 = self.down_2(x1)
        return self.final_conv(self.upcat_1(self.upcat_2(x2, x1), x0))


def basic_like(seed: int = 0, **kw) -> BasicLike:
    torch.manual_seed(seed)
    return randomize_norms(BasicLike(**kw), seed + 1)


# Called as functions: a norm with parameters of its own (an instance norm without them has no module to map to,
# and one tracking running statistics is an instance norm of the data when called with the default
# use_input_stats=True: both are refused, see the test below).
BASIC_CASES = [(norm, False) for norm in sorted(NORMS)] + [("instance", True), ("group", True)]


@pytest.mark.parametrize(
    "norm, functional", BASIC_CASES, ids=[f"{n}-{'functional' if f else 'modules'}" for n, f in BASIC_CASES]
)
def test_basic_unet_like(device, norm, functional):
    model = basic_like(norm=NORMS[norm], functional=functional)
    for size in ((13, 22), (16, 20)):
        layout = assert_recognized(model, size)
    assert layout.down == "pool" and layout.join == "replicate" and not any(layout.up_first)
    assert {ops.norm_kind(spec.norm) for _, spec in layout.conv_specs()} == {KINDS[norm]}
    assert layout.encoders[0][0].norm is model.conv_0.conv_0[1]
    assert {(spec.activation.kind, spec.activation.slope) for _, spec in layout.conv_specs()} == {("leaky_relu", 0.1)}
    assert assert_converts_or_names_the_gap(model, device, size=(13, 22)) == "fused"


@pytest.mark.parametrize(
    "call, name, why",
    [
        pytest.param(
            lambda x, norm: F.instance_norm(x, weight=norm.weight, bias=norm.bias, eps=1e-3),
            "F.instance_norm",
            "a functional instance_norm maps onto the layout only as an nn.InstanceNorm2d's own eval-mode call",
            id="instance-other-eps",
        ),
        pytest.param(
            lambda x, norm: F.instance_norm(x),
            "F.instance_norm",
            "a functional instance_norm maps onto the layout only as an nn.InstanceNorm2d's own eval-mode call",
            id="instance-no-module",
        ),
        pytest.param(
            lambda x, norm: F.group_norm(x, 4, norm.weight, norm.bias),
            "F.group_norm",
            "a functional group_norm maps onto the layout only as an nn.GroupNorm's own call",
            id="group-other-groups",
        ),
        pytest.param(
            lambda x, norm: F.layer_norm(x, x.shape[1:]),
            "F.layer_norm",
            "not a supported norm (BatchNorm2d, InstanceNorm2d, GroupNorm)",
            id="layer-norm",
        ),
    ],
)
def test_functional_norms_other_than_their_modules_call_are_refused(call, name, why):
    group = name == "F.group_norm"

    class Other(BasicLike):
        def forward(self, x):
            block = self.conv_0.conv_0
            x = block[2](call(block[0](x), block[1]))
            x = self.conv_0.conv_1(x)
            x1 = self.down_1(x)
            return self.final_conv(self.upcat_1(self.upcat_2(self.down_2(x1), x1), x))

    torch.manual_seed(0)
    model = randomize_norms(Other(norm=NORMS["group" if group else "instance"]))
    message = _refusal(model)
    assert f"Other: {name} in Other.forward: {why}" in message, message


def test_a_norm_of_another_kind_is_refused_naming_the_path():
    model = basic_like()
    model.down_1[1].conv_0[1] = nn.LocalResponseNorm(2)
    message = _refusal(model)
    expected = "BasicLike: LocalResponseNorm at 'down_1.1.conv_0.1': not a supported norm (BatchNorm2d, InstanceNorm2d"
    assert expected in message, message


@pytest.mark.filterwarnings("ignore:input's size at dim=1 does not match num_features")
def test_a_norm_over_other_channels_is_refused():
    model = basic_like(norm=lambda c: nn.InstanceNorm2d(c))
    model.down_1[1].conv_0[1] = nn.InstanceNorm2d(5)  # no affine parameters: it runs on any channel count
    message = _refusal(model)
    assert "InstanceNorm2d at 'down_1.1.conv_0.1': normalizes 5 channels, the conv writes 8" in message, message


# -- MONAI DynUNet ----------------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """conv (stride ``stride``) - norm - LeakyReLU - conv - norm - LeakyReLU, one LeakyReLU module for both, convs
    without bias (MONAI's ``UnetBasicBlock``)."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.lrelu = nn.LeakyReLU(0.01, inplace=True)
        self.norm1, self.norm2 = norm(c_out), norm(c_out)

    def forward(self, x):
        x = self.lrelu(self.norm1(self.conv1(x)))
        return self.lrelu(self.norm2(self.conv2(x)))


class UpBlock(nn.Module):
    """A transposed conv, ``cat((up, skip))``, a basic block; ``fit``: the upsampled map centre-padded (or cropped)
    to the skip first, so that odd sizes run."""

    def __init__(self, below: int, out: int, norm, fit: bool, up_kernel: int = 2) -> None:
        super().__init__()
        padding = (up_kernel - 1) // 2
        output_padding = 2 * padding + 2 - up_kernel  # the output is twice the input
        self.transp_conv = nn.ConvTranspose2d(below, out, up_kernel, 2, padding, output_padding, bias=False)
        self.conv_block = BasicBlock(2 * out, out, 1, norm)
        self.fit = fit

    def forward(self, x, skip):
        up = self.transp_conv(x)
        if self.fit:
            dy, dx = skip.shape[-2] - up.shape[-2], skip.shape[-1] - up.shape[-1]
            up = F.pad(up, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv_block(torch.cat((up, skip), dim=1))


class SkipLayer(nn.Module):
    """One level of the recursion MONAI's ``DynUNet`` builds: down block, the level below, up block."""

    def __init__(self, downsample: nn.Module, next_layer: nn.Module, upsample: nn.Module | None) -> None:
        super().__init__()
        self.downsample, self.next_layer, self.upsample = downsample, next_layer, upsample

    def forward(self, x):
        down = self.downsample(x)
        return self.upsample(self.next_layer(down), down)


class DynLike(nn.Module):
    """MONAI ``DynUNet``'s structure, 2-D, strides (1, 2, 2): an input block, strided down blocks, a strided
    bottleneck, up blocks, a 1x1 output conv, the blocks registered as lists and nested as skip layers too."""

    def __init__(self, c_in=2, n_cls=3, widths=(4, 8, 16), norm=NORMS["instance"], fit=False, up_kernel=2) -> None:
        super().__init__()
        self.input_block = BasicBlock(c_in, widths[0], 1, norm)
        self.downsamples = nn.ModuleList([BasicBlock(widths[0], widths[1], 2, norm)])
        self.bottleneck = BasicBlock(widths[1], widths[2], 2, norm)
        self.upsamples = nn.ModuleList(
            [UpBlock(widths[2], widths[1], norm, fit, up_kernel), UpBlock(widths[1], widths[0], norm, fit, up_kernel)]
        )
        self.output_block = nn.Conv2d(widths[0], n_cls, 1)
        inner = SkipLayer(self.downsamples[0], self.bottleneck, self.upsamples[0])
        self.skip_layers = SkipLayer(self.input_block, inner, self.upsamples[1])

    def forward(self, x):
        return self.output_block(self.skip_layers(x))


def dyn_like(seed: int = 0, **kw) -> DynLike:
    torch.manual_seed(seed)
    return randomize_norms(DynLike(**kw), seed + 1)


@pytest.mark.parametrize("norm", ["instance", pytest.param("group", marks=pytest.mark.slow)])
def test_dynunet_like(device, norm):
    model = dyn_like(norm=NORMS[norm])
    layout = assert_recognized(model, (16, 20))
    assert layout.down == "stride" and all(layout.up_first) and layout.join == "pad"
    assert layout.encoders[2][0].conv is model.bottleneck.conv1 and layout.encoders[2][0].conv.stride == (2, 2)
    assert assert_converts_or_names_the_gap(model, device, size=(16, 20)) == "fused"


def test_dynunet_like_with_a_centred_fit_at_odd_sizes(device):
    """A stride-2 conv rounds odd sizes up, so the upsampled map is one larger than the skip: a centred crop (a
    negative pad) by the same rule as the zero pad is the layout's ``"pad"`` join."""
    model = dyn_like(fit=True)
    for size in ((13, 22), (11, 9), (16, 20)):
        layout = assert_recognized(model, size)
    assert layout.down == "stride" and layout.join == "pad"
    assert assert_converts_or_names_the_gap(model, device, size=(13, 22)) == "fused"


def test_dynunet_like_trains_on_the_kernels_at_odd_sizes(device):
    """DynUNet's structure in training mode on the backward kernels at an odd size: the strided convs round up (odd
    input sizes in the polyphase input gradient) and the upsampled map is cropped back to the skip."""
    x = torch.randn(2, 2, 13, 10, generator=torch.Generator().manual_seed(4))
    assert_trains_on_the_kernels(dyn_like(fit=True), x, device)


def test_dynunet_like_trains_on_tma_loads(device):
    """The same with TMA asked for, at 8x32: the first strided conv's weight gradient reads its 32-px input as pixel
    pairs by TMA row boxes (16-px output rows, one block each; the norm applied ahead, so the map is dense); the
    bottleneck's 8-px output rows are not whole blocks, so its strided conv keeps pointer loads."""
    x = torch.randn(2, 2, 8, 32, generator=torch.Generator().manual_seed(6))
    with _common.load_path("tma"), _common.launch_log() as records:
        assert_trains_on_the_kernels(dyn_like(), x, device)
    strided = {r.path for r in records if r.name == "conv_weight_grad" and r.constexprs["STRIDE"] == 2}
    assert strided == {"tma", "pointer"}, strided


def test_a_kernel_3_transposed_conv_with_output_padding_is_recognised(device):
    """ConvTranspose2d(kernel_size=3, stride=2, padding=1, output_padding=1) doubles the size as the k=2 one does."""
    model = dyn_like(up_kernel=3)
    layout = assert_recognized(model, (16, 20))
    assert all(tuple(up.conv.kernel_size) == (3, 3) and up.mode == "transpose" for up in layout.ups)
    # The kernels run 2x2 stride-2 transposed convs only: recognised, refused naming that.
    assert assert_converts_or_names_the_gap(model, device, size=(16, 20)) == "refused"


# -- down-sampling: one way at every level, strided convs only where a level starts ---------------------------------
def test_mixed_max_pool_and_strided_down_sampling_is_refused():
    class Mixed(DynLike):
        def __init__(self):
            super().__init__()
            self.downsamples[0].conv1.stride = (1, 1)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            top = self.input_block(x)
            middle = self.downsamples[0](self.pool(top))
            low = self.bottleneck(middle)
            return self.output_block(self.upsamples[1](self.upsamples[0](low, middle), top))

    torch.manual_seed(0)
    message = _refusal(randomize_norms(Mixed()))
    expected = (
        "Mixed: down-sampling: mixes max-pools and strided convs (enc1: a 2x2 max-pool (MaxPool2d at 'pool'); "
        "bottleneck: a stride-2 conv ('bottleneck.conv1'"
    )
    assert expected in message, message
    assert "the layout down-samples the same way at every level" in message, message


def test_a_strided_conv_that_is_not_3x3_padding_1_is_refused():
    model = dyn_like()
    model.bottleneck.conv1 = nn.Conv2d(8, 16, 1, 2, 0, bias=False)
    message = _refusal(model)
    assert "DynLike: Conv2d at 'bottleneck.conv1': stride (2, 2) with kernel (1, 1) and padding (0, 0)" in message


def test_a_strided_second_conv_is_refused():
    """The level's first conv reads the skip at the skip's size; the stride sits on the second conv."""
    model = dyn_like()
    block = model.bottleneck
    block.conv1.stride, block.conv2.stride = (1, 1), (2, 2)
    message = _refusal(model)
    assert "DynLike: 'bottleneck.conv1': reads the skip of the level above at its own size (stride (1, 1))" in (
        message
    ), message


def test_strided_layout_math_matches_a_hand_written_forward():
    """``layout_forward`` of the recognised strided layout against the same network written out with torch ops."""
    model = copy.deepcopy(dyn_like(fit=True)).double()
    layout = recognize(model).recipe.resolve(model)
    x = torch.randn(2, 2, 13, 10, dtype=torch.float64)

    def block(b, t):
        t = F.leaky_relu(F.instance_norm(F.conv2d(t, b.conv1.weight, None, b.conv1.stride, 1), weight=b.norm1.weight,
                                         bias=b.norm1.bias), 0.01)  # fmt: skip
        return F.leaky_relu(F.instance_norm(F.conv2d(t, b.conv2.weight, None, 1, 1), weight=b.norm2.weight,
                                            bias=b.norm2.bias), 0.01)  # fmt: skip

    top = block(model.input_block, x)
    middle = block(model.downsamples[0], top)
    low = block(model.bottleneck, middle)
    for up, skip in zip(model.upsamples, (middle, top), strict=True):
        lifted = F.conv_transpose2d(low, up.transp_conv.weight, None, 2)
        # Odd: one row/column more than the skip, cut at the top/left (the centred pad's floor of -1/2 is -1).
        lifted = lifted[..., lifted.shape[-2] - skip.shape[-2] :, lifted.shape[-1] - skip.shape[-1] :]
        low = block(up.conv_block, torch.cat([lifted, skip], 1))
    expected = F.conv2d(low, model.output_block.weight, model.output_block.bias)
    with torch.no_grad():
        torch.testing.assert_close(ops.layout_forward(layout, x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_recognised_layout_is_the_hand_built_one(norm):
    """tests/test_layout_math.py builds the layout of its strided InstanceNorm net by hand: the recogniser finds the
    same modules, down-sampling, concatenation order and join."""
    from test_layout_math import _StridedInstanceNormNet

    torch.manual_seed(0)
    net = randomize_norms(_StridedInstanceNormNet(NORMS[norm]))
    found, expected = recognize(net).recipe.resolve(net), net.layout()
    assert (found.down, found.join, found.up_first) == (expected.down, expected.join, expected.up_first)
    assert found.head is expected.head
    assert [(spec.conv, spec.norm, spec.activation) for _, spec in found.conv_specs()] == [
        (spec.conv, spec.norm, spec.activation) for _, spec in expected.conv_specs()
    ]
    assert [up.conv for up in found.ups] == [up.conv for up in expected.ups]
