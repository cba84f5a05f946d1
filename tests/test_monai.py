"""Real MONAI networks through ``convert`` (skipped where MONAI is not installed): BasicUNet 2-D in each upsampling
mode, with ReLU and BatchNorm and with its defaults (InstanceNorm, LeakyReLU 0.1), and DynUNet 2-D are recognised,
their recognised math equals their own forward (BasicUNet at sizes divisible by 16 and at odd sizes), and ``convert``
either fuses them (parity with their float64 forward) or names the feature the kernels lack; the configurations that
cannot be mapped (MONAI's UNet, 3-D, DynUNet with deep supervision or residual blocks) are refused naming MONAI's
module path or call."""

from __future__ import annotations

import pytest
import torch

monai_nets = pytest.importorskip("monai.networks.nets")

from test_convert_norms import assert_trains_on_the_kernels, randomize_norms  # noqa: E402
from test_convert_structure import assert_converts_or_names_the_gap, assert_recognized  # noqa: E402

from fastunet import ConversionError, convert, ops  # noqa: E402
from fastunet.convert import recognize  # noqa: E402
from fastunet.parity import randomize_norm_stats  # noqa: E402

FEATURES = (4, 4, 8, 8, 16, 4)


def basic_unet(upsample: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(spatial_dims=2, in_channels=3, out_channels=2, features=FEATURES, act="relu", norm="batch")
    model = monai_nets.BasicUNet(**(args | kw), upsample=upsample)
    randomize_norm_stats(model, torch.Generator().manual_seed(1))
    return model.eval()


@pytest.mark.parametrize("size", [(32, 48), (33, 37)], ids=["div16", "odd"])
@pytest.mark.parametrize("upsample", ["deconv", "nontrainable", "pixelshuffle"])
def test_basic_unet_is_recognised(upsample, size):
    model = basic_unet(upsample)
    layout = assert_recognized(model, size)
    assert layout.depth == 4 and layout.join == "replicate" and not any(layout.up_first)
    mode = {"deconv": "transpose", "nontrainable": "bilinear", "pixelshuffle": "pixelshuffle"}[upsample]
    assert {up.mode for up in layout.ups} == {mode}
    if upsample == "nontrainable":  # a 1x1 conv before the interpolation, but where the channels stay (upcat_1)
        assert [up.pre_conv is not None for up in layout.ups] == [False, True, True, True]


@pytest.mark.parametrize("upsample", ["deconv", "nontrainable", "pixelshuffle"])
def test_basic_unet_converts_or_names_the_gap(device, upsample):
    model = basic_unet(upsample)
    assert assert_converts_or_names_the_gap(model, device, size=(33, 37)) == "fused"


def test_basic_unet_with_leaky_relu(device):
    model = basic_unet("deconv", act="leakyrelu")
    assert {spec.activation.kind for _, spec in assert_recognized(model, (33, 37)).conv_specs()} == {"leaky_relu"}
    assert assert_converts_or_names_the_gap(model, device, size=(32, 32)) == "fused"


def test_keys_and_shared_tensors_where_recognised():
    model = basic_unet("deconv")
    recipe = recognize(model).recipe
    layout = recipe.resolve(model)
    assert layout.encoders[0][0].conv is model.conv_0.conv_0.conv
    assert layout.encoders[0][0].norm is model.conv_0.conv_0.adn.N
    assert layout.ups[-1].conv is model.upcat_4.upsample.deconv
    assert layout.head is model.final_conv


def test_basic_unet_defaults(device):
    """MONAI's defaults: InstanceNorm with affine parameters and LeakyReLU(0.1) after every conv."""
    torch.manual_seed(0)
    model = randomize_norms(monai_nets.BasicUNet(spatial_dims=2, in_channels=3, out_channels=2, features=FEATURES))
    for size in ((32, 48), (33, 37)):
        layout = assert_recognized(model, size)
    assert layout.depth == 4 and layout.down == "pool" and layout.join == "replicate"
    assert {ops.norm_kind(spec.norm) for _, spec in layout.conv_specs()} == {"instance"}
    assert {(spec.activation.kind, spec.activation.slope) for _, spec in layout.conv_specs()} == {("leaky_relu", 0.1)}
    assert layout.encoders[0][0].norm is model.conv_0.conv_0.adn.N
    assert assert_converts_or_names_the_gap(model, device, size=(33, 37)) == "fused"


def test_basic_unet_with_group_norm(device):
    model = randomize_norms(basic_unet("deconv", norm=("group", {"num_groups": 2})))
    layout = assert_recognized(model, (33, 37))
    assert {ops.norm_kind(spec.norm) for _, spec in layout.conv_specs()} == {"group"}
    assert assert_converts_or_names_the_gap(model, device, size=(33, 37)) == "fused"


def test_basic_unet_3d_is_refused():
    with pytest.raises(ConversionError) as info:
        convert(basic_unet("deconv", spatial_dims=3))
    assert "BasicUNet: Conv3d at 'conv_0.conv_0.conv': only 2-D U-Nets convert" in str(info.value), str(info.value)


def dyn_unet(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2], upsample_kernel_size=[2, 2, 2], filters=[4, 8, 8, 16])
    return randomize_norms(monai_nets.DynUNet(2, 3, 2, **(args | kw)))


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_dyn_unet(device, norm):
    """DynUNet 2-D (depth 3, strided down-sampling, ``cat((up, skip))``); its decoder does not pad, so sizes are
    multiples of 8."""
    model = dyn_unet(norm_name=norm)
    for size in ((16, 24), (32, 8)):
        layout = assert_recognized(model, size)
    assert layout.depth == 3 and layout.down == "stride" and all(layout.up_first)
    assert layout.encoders[1][0].conv is model.downsamples[0].conv1.conv and model.downsamples[0].conv1.conv.stride == (
        2,
        2,
    )
    assert {(spec.activation.kind, spec.activation.slope) for _, spec in layout.conv_specs()} == {("leaky_relu", 0.01)}
    assert layout.head is model.output_block.conv.conv
    assert assert_converts_or_names_the_gap(model, device, size=(16, 24)) == "fused"


# InstanceNorm through strided convs trains in the nnU-Net-like and DynUNet-like tests (test_convert_norms.py): the
# MONAI InstanceNorm case runs with -m slow, its BatchNorm case (batch statistics) by default.
@pytest.mark.parametrize("norm", [pytest.param("instance", marks=pytest.mark.slow), "batch"])
def test_dyn_unet_trains_on_the_kernels(device, norm):
    """DynUNet 2-D in training mode (batch statistics with BatchNorm): forward and backward on the kernels, the
    stride-2 down-sampling convs' gradients included, within the budget of float64 autograd of the model."""
    x = torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(5))
    assert_trains_on_the_kernels(dyn_unet(norm_name=norm), x, device)


def test_dyn_unet_refusals():
    """Deep supervision on: its heads run in the eval forward and their results are dropped; residual blocks add."""
    with pytest.raises(ConversionError) as info:
        convert(dyn_unet(deep_supervision=True, deep_supr_num=1))
    expected = "DynUNet: Conv2d at 'deep_supervision_heads.0.conv.conv': runs, but its result does not reach the output"
    assert expected in str(info.value), str(info.value)
    with pytest.raises(ConversionError) as info:
        convert(dyn_unet(res_block=True))
    assert "DynUNet: Tensor.add_ in 'input_block' (UnetResBlock.forward): not part of the U-Net layout" in str(
        info.value
    ), str(info.value)


@pytest.mark.parametrize(
    "kw, message",
    [
        pytest.param(
            {},
            "UNet: ConvTranspose2d at 'model.2.conv': the output comes from a transposed conv: an up-sampling after "
            "the last skip concatenation",
            id="default",
        ),
        pytest.param(
            dict(num_res_units=2),
            "UNet: Tensor.add in 'model.0' (ResidualUnit.forward): not part of the U-Net layout",
            id="residual-units",
        ),
    ],
)
def test_monai_unet_is_refused_naming_the_structure_it_does_not_share(kw, message):
    """MONAI's UNet strides its first conv (no level at full resolution) and up-samples after each concatenation,
    with residual units where asked for: no layout describes it."""
    model = monai_nets.UNet(spatial_dims=2, in_channels=3, out_channels=2, channels=(4, 8, 16), strides=(2, 2), **kw)
    with pytest.raises(ConversionError) as info:
        convert(model.eval())
    assert message in str(info.value), str(info.value)
