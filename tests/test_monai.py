"""Real MONAI networks through ``convert`` (skipped where MONAI is not installed): BasicUNet 2-D with ReLU and
BatchNorm in each upsampling mode is recognised, its recognised math equals its own forward at sizes divisible by
16 and at odd sizes, and ``convert`` either fuses it (parity with its float64 forward) or names the feature the
kernels lack; the configurations that cannot be mapped are refused naming MONAI's module path."""

from __future__ import annotations

import pytest
import torch

monai_nets = pytest.importorskip("monai.networks.nets")

from test_convert_structure import assert_converts_or_names_the_gap, assert_recognized  # noqa: E402

from fastunet import ConversionError, convert  # noqa: E402
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


@pytest.mark.parametrize(
    "kw, message",
    [
        pytest.param(
            dict(act=("LeakyReLU", {"negative_slope": 0.1}), norm=("instance", {"affine": True})),
            "BasicUNet: InstanceNorm2d at 'conv_0.conv_0.adn.N': not supported yet (norms that cannot fold",
            id="default-instance-norm",
        ),
        pytest.param(
            dict(norm=("group", {"num_groups": 2})),
            "BasicUNet: GroupNorm at 'conv_0.conv_0.adn.N': not supported yet",
            id="group-norm",
        ),
        pytest.param(
            dict(spatial_dims=3), "BasicUNet: Conv3d at 'conv_0.conv_0.conv': only 2-D U-Nets convert", id="3d"
        ),
    ],
)
def test_basic_unet_refusals_name_the_blocker(kw, message):
    with pytest.raises(ConversionError) as info:
        convert(basic_unet("deconv", **kw))
    assert message in str(info.value), str(info.value)


def test_monai_unet_is_refused_at_its_strided_conv():
    model = monai_nets.UNet(spatial_dims=2, in_channels=3, out_channels=2, channels=(4, 8, 16), strides=(2, 2)).eval()
    with pytest.raises(ConversionError, match=r"UNet: Conv2d at 'model.0.conv': stride \(2, 2\)"):
        convert(model)
