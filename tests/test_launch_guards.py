"""Launch-path guards: infinities through the fused head, weight offsets that would pass 2**31, self-overlapping
outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_unet_parity import build_pair

import fastunet
from fastunet.kernels import _common
from fastunet.kernels.conv import conv2d_nhwc, pack_conv_weight
from tolerances import assert_kernel_close, assert_network_close, precision_key


# -- 3. +-inf through the fused head --------------------------------------------------------------------------------
@pytest.mark.parametrize("last_conv_sign", [1.0, -1.0], ids=["positive-weights", "negative-last-conv"])
def test_infinity_through_a_head_whose_width_is_not_a_power_of_two(device, last_conv_sign):
    """base_channels 24: the fused head's tile has 8 masked columns. With positive weights one +inf pixel gives
    +inf logits around it; with the last conv negative, ReLU turns its -inf into 0 and every logit is finite.
    Infinities and NaN must sit where float64 PyTorch puts them, the finite logits within the budget."""
    config = {"in_channels": 3, "num_classes": 2, "base_channels": 24, "depth": 1, "upsample": "transpose"}
    fast, reference64 = build_pair(device, torch.float32, **config)
    with torch.no_grad():
        for model in (fast, reference64):
            for p in model.parameters():
                p.abs_()
            model.decoders[0].conv.conv2.weight.mul_(last_conv_sign)
        x = torch.rand(1, 3, 6, 7, device=device)
        x[0, 1, 2, 3] = float("inf")
        out = fast(x)
        expected = reference64(x.double().cpu())
    assert fast.last_backend != "reference"
    out = out.cpu()
    assert expected.isposinf().any() == (last_conv_sign > 0), "the case does not exercise what it says"
    for what in ("isnan", "isposinf", "isneginf"):
        got, want = getattr(out, what)(), getattr(expected, what)()
        assert torch.equal(got, want), f"{what}: {int(got.sum())} in the output, {int(want.sum())} in float64"
    finite = expected.isfinite()
    assert_network_close(out[finite], expected[finite], precision_key(torch.float32, device))


# -- 4. weight offsets are int32 in the kernel: refused past 2**31 ---------------------------------------------------
def _meta_conv(channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.empty(1, 4, 4, channels, device="meta")
    return x, torch.empty(9 * channels, channels, device="meta")


def test_a_weight_past_int32_offsets_is_refused():
    x, weight = _meta_conv(16384)  # 9 * 16384 * 16384 = 2.4e9 elements
    with _common.dry_run(), pytest.raises(ValueError, match=r"32-bit offsets.*2\*\*31"):
        conv2d_nhwc(x, weight)


def test_a_weight_just_inside_int32_offsets_is_accepted():
    x, weight = _meta_conv(15000)  # (9 * 15000 + 128) * 15000 + 256 < 2**31
    with _common.dry_run(), _common.launch_log() as records:
        y, _ = conv2d_nhwc(x, weight)
    assert y.shape == (1, 4, 4, 15000) and len(records) == 1


def test_tracing_a_too_wide_model_is_refused():
    model = fastunet.UNet(3, 2, base_channels=100000, depth=1, device="meta")
    with pytest.raises(ValueError, match="32-bit offsets"):
        fastunet.trace(model, torch.empty(1, 3, 64, 64, device="meta"))


# -- 5. self-overlapping out= ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make_out",
    [
        pytest.param(lambda device: torch.empty(1, 1, 1, 8, device=device).expand(2, 5, 6, 8), id="expanded"),
        pytest.param(
            lambda device: torch.empty(400, device=device).as_strided((2, 5, 6, 8), (120, 24, 4, 1)), id="strided"
        ),
    ],
)
def test_a_self_overlapping_out_is_refused(device, make_out):
    x = torch.randn(2, 5, 6, 4, device=device)
    weight = pack_conv_weight(torch.randn(8, 4, 3, 3, device=device))
    out = make_out(device)
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor refers to a single"):
        conv2d_nhwc(x, weight, out=out)


def test_a_permuted_out_is_accepted(device):
    x = torch.randn(2, 5, 6, 4, device=device)
    weight = torch.randn(8, 4, 3, 3, device=device)
    out = torch.full((2, 8, 5, 6), float("nan"), device=device).permute(0, 2, 3, 1)
    y, _ = conv2d_nhwc(x, pack_conv_weight(weight), out=out)
    assert y is out
    expected = torch.relu(F.conv2d(x.permute(0, 3, 1, 2).double().cpu(), weight.double().cpu(), padding=1))
    assert_kernel_close(out.permute(0, 3, 1, 2), expected, 36, precision_key(torch.float32, device))
