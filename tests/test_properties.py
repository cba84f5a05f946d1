"""Property tests of the conv kernel over random shapes, dtypes and layouts (hypothesis).

CI runs a small derandomized profile; ``HYPOTHESIS_PROFILE=thorough`` runs a larger random one.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastunet.kernels.conv import conv2d_nhwc, pack_conv_weight
from tolerances import assert_kernel_close, precision_key

settings.register_profile(
    "ci", max_examples=12, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@st.composite
def conv_cases(draw):
    return {
        "batch": draw(st.integers(1, 3)),
        "c_in": draw(st.integers(1, 40)),
        "c_out": draw(st.integers(1, 40)),
        "height": draw(st.integers(1, 12)),
        "width": draw(st.integers(1, 12)),
        "dtype": draw(st.sampled_from(sorted(DTYPES))),
        "channels_last": draw(st.booleans()),
        "pool": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _inputs(case, device):
    """Tensors drawn from the example's own seed, so that a failing example replays exactly."""
    dtype = DTYPES[case["dtype"]]
    generator = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(case["batch"], case["c_in"], case["height"], case["width"], generator=generator)
    x = x.to(device, dtype)
    if case["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(case["c_out"], case["c_in"], 3, 3, generator=generator) / (3 * case["c_in"] ** 0.5)
    bias = torch.randn(case["c_out"], generator=generator) * 0.1
    return x, weight.to(device, dtype), bias.to(device, dtype)


@given(case=conv_cases())
def test_conv_matches_float64(device, case):
    x, weight, bias = _inputs(case, device)
    y, pooled = conv2d_nhwc(x.permute(0, 2, 3, 1), pack_conv_weight(weight), bias, pool=case["pool"])
    reference = F.conv2d(x.double().cpu(), weight.double().cpu(), bias.double().cpu(), padding=1).relu()
    key = precision_key(x.dtype, device)
    assert_kernel_close(y.permute(0, 3, 1, 2), reference, 9 * case["c_in"], key)
    if case["pool"] and case["height"] >= 2 and case["width"] >= 2:
        assert_kernel_close(pooled.permute(0, 3, 1, 2), F.max_pool2d(reference, 2), 9 * case["c_in"], key)


@given(case=conv_cases(), exponent=st.integers(0, 3))
def test_conv_is_positively_homogeneous(device, case, exponent):
    """relu(conv(a x)) == a relu(conv(x)) bit for bit for a = 2**k and no bias: scaling by a power of two is exact,
    except where the unscaled output is subnormal in the storage dtype (fewer mantissa bits there)."""
    x, weight, _ = _inputs(case, device)
    scale = 2.0**exponent
    w_packed = pack_conv_weight(weight)
    y, _ = conv2d_nhwc(x.permute(0, 2, 3, 1), w_packed)
    y_scaled, _ = conv2d_nhwc((x * scale).permute(0, 2, 3, 1), w_packed)
    normal = (y.abs() >= torch.finfo(y.dtype).tiny) | (y == 0)
    assert torch.equal(y_scaled[normal], (y * scale)[normal])


@given(case=conv_cases())
def test_conv_commutes_with_batch_permutation(device, case):
    x, weight, bias = _inputs(case, device)
    order = torch.randperm(case["batch"], generator=torch.Generator().manual_seed(case["seed"] + 1))
    w_packed = pack_conv_weight(weight)
    y, _ = conv2d_nhwc(x.permute(0, 2, 3, 1), w_packed, bias)
    y_perm, _ = conv2d_nhwc(x[order.to(x.device)].permute(0, 2, 3, 1), w_packed, bias)
    assert torch.equal(y_perm, y[order.to(y.device)])
