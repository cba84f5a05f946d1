"""The tolerance table guards itself: a float32 output is checked with the row of the math it ran (TF32 on CUDA by
default), so a test that names the strict fp32 budget fails on the CPU already instead of on the first GPU run."""

from __future__ import annotations

import pytest
import torch

from tolerances import assert_kernel_close, assert_network_close, check_precision_key


@pytest.mark.parametrize(
    ("key", "dtype", "device_type", "allow_tf32", "accepted"),
    [
        pytest.param("fp32", torch.float32, "cuda", True, False, id="fp32-budget-on-tf32-cuda"),
        pytest.param("tf32", torch.float32, "cuda", True, True, id="tf32-on-cuda"),
        pytest.param("fp32", torch.float32, "cuda", False, True, id="fp32-on-ieee-cuda"),
        pytest.param("tf32", torch.float32, "cuda", False, False, id="tf32-budget-on-ieee-cuda"),
        pytest.param("fp32", torch.float32, "cpu", True, True, id="fp32-on-cpu"),
        pytest.param("tf32", torch.float32, "cpu", True, False, id="tf32-budget-on-cpu"),
        pytest.param("fp16", torch.float16, "cuda", True, True, id="fp16"),
        pytest.param("bf16", torch.bfloat16, "cuda", True, True, id="bf16"),
    ],
)
def test_precision_key_must_match_the_math(key, dtype, device_type, allow_tf32, accepted):
    if accepted:
        check_precision_key(key, dtype, device_type, allow_tf32)
    else:
        with pytest.raises(AssertionError, match=r"runs as (tf32|fp32).*precision_key\(dtype, device\)"):
            check_precision_key(key, dtype, device_type, allow_tf32)


def test_the_assertions_apply_the_guard():
    """On the CPU a float32 result is exact-fp32 math: the ten-times looser TF32 rows are refused for it."""
    out = torch.randn(2, 3, 4, 4)
    with pytest.raises(AssertionError, match="runs as fp32"):
        assert_network_close(out, out.double(), "tf32")
    with pytest.raises(AssertionError, match="runs as fp32"):
        assert_kernel_close(out, out.double(), 9, "tf32")
    assert_network_close(out, out.double(), "fp32")
    assert_kernel_close(out, out.double(), 9, "fp32")
