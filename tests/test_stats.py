"""The statistics unit (kernels/stats.py): tile partial moments and their merge into per-(image, channel) scale and
shift, against float64 ``F.instance_norm`` / ``F.group_norm``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastunet.kernels.stats import norm_scale_shift, partial_moments

DEVICE = None  # set by the autouse fixture below: the suite's device


@pytest.fixture(autouse=True)
def _device(device):
    global DEVICE
    DEVICE = device


def _on(t):
    return None if t is None else t.to(DEVICE)


def _normalized(z_nchw: torch.Tensor, groups: int, weight, bias, eps: float, block_m: int = 16) -> torch.Tensor:
    """z * scale + shift in float64 on the CPU, scale and shift from the kernels on the suite's device."""
    mean, m2, count = partial_moments(_on(z_nchw).permute(0, 2, 3, 1), block_m)
    scale, shift = norm_scale_shift(mean, m2, count, groups, _on(weight), _on(bias), eps)
    scale, shift = scale.double().cpu(), shift.double().cpu()
    return z_nchw.double() * scale[:, :, None, None] + shift[:, :, None, None]


@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("shape", [(2, 6, 7, 9), (1, 6, 16, 16), (3, 6, 1, 5)])
def test_matches_group_and_instance_norm(groups, affine, shape):
    torch.manual_seed(0)
    z = torch.randn(shape) * 3 + 1.5
    weight = torch.randn(shape[1]) if affine else None
    bias = torch.randn(shape[1]) if affine else None
    got = _normalized(z, groups, weight, bias, 1e-5)
    w64 = weight.double() if affine else None
    b64 = bias.double() if affine else None
    if groups == shape[1]:
        expected = F.instance_norm(z.double(), weight=w64, bias=b64, eps=1e-5)
    else:
        expected = F.group_norm(z.double(), groups, w64, b64, eps=1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_large_mean_does_not_cancel():
    """Values 1e4 + O(1): sum and sum of squares lose the variance in fp32; merged moments keep it."""
    torch.manual_seed(1)
    z = 1e4 + torch.randn(2, 4, 32, 32)
    mean, m2, count = partial_moments(_on(z).permute(0, 2, 3, 1), 64)
    scale, _ = norm_scale_shift(mean, m2, count, 4, None, None, 0.0)
    var = 1.0 / scale.double().cpu() ** 2
    expected = z.double().var(dim=(2, 3), unbiased=False)
    # fp32 means near 1e4 carry ~5e-4 of rounding, so ~1e-3 relative is the floor for any fp32 method here ...
    torch.testing.assert_close(var, expected, rtol=1e-3, atol=0)
    # ... and sums of values and squares in fp32 are off by orders of magnitude more.
    flat = z.flatten(2)
    naive = (flat * flat).mean(-1) - flat.mean(-1) ** 2
    assert ((naive.double() - expected).abs() / expected).max() > 0.1


def test_deterministic_and_batch_independent():
    torch.manual_seed(2)
    z = torch.randn(3, 8, 11, 13)
    first = _normalized(z, 8, None, None, 1e-5)
    again = _normalized(z, 8, None, None, 1e-5)
    alone = _normalized(z[1:2], 8, None, None, 1e-5)
    assert torch.equal(first, again)
    assert torch.equal(first[1:2], alone)


def test_half_map_statistics_are_those_of_the_stored_values():
    torch.manual_seed(3)
    z = (torch.randn(2, 4, 9, 9) * 2).to(torch.bfloat16)
    got = _normalized(z, 4, None, None, 1e-5)
    torch.testing.assert_close(got, F.instance_norm(z.double(), eps=1e-5), rtol=1e-5, atol=1e-5)


def test_nan_and_inf_poison_only_their_group():
    z = torch.randn(2, 4, 5, 5)
    z[0, 1, 2, 3] = float("nan")
    z[1, 2, 0, 0] = float("inf")
    got = _normalized(z, 4, None, None, 1e-5)
    expected = F.instance_norm(z.double(), eps=1e-5)
    assert torch.equal(got.isnan(), expected.isnan())
    finite = ~expected.isnan()
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-5, atol=1e-5)


def test_constant_map_gives_eps_scale():
    z = torch.full((1, 2, 4, 4), 3.0)
    mean, m2, count = partial_moments(_on(z).permute(0, 2, 3, 1), 16)
    scale, shift = norm_scale_shift(mean, m2, count, 2, None, None, 0.25)
    torch.testing.assert_close(scale.cpu(), torch.full((1, 2), 2.0))
    torch.testing.assert_close(shift.cpu(), torch.full((1, 2), -6.0))


def test_bad_arguments_are_refused():
    mean, m2, count = partial_moments(_on(torch.randn(1, 4, 4, 6)), 16)
    with pytest.raises(ValueError, match="positive divisor of the 6 channels, got 4"):
        norm_scale_shift(mean, m2, count, 4, None, None, 1e-5)
    with pytest.raises(ValueError, match="both weight and bias"):
        norm_scale_shift(mean, m2, count, 6, _on(torch.ones(6)), None, 1e-5)
    with pytest.raises(ValueError, match=r"weight must have shape \(6,\)"):
        norm_scale_shift(mean, m2, count, 6, _on(torch.ones(5)), _on(torch.ones(5)), 1e-5)
    with pytest.raises(ValueError, match="count of shape"):
        norm_scale_shift(mean, m2, count.reshape(-1), 6, None, None, 1e-5)
    with pytest.raises(ValueError, match="power of two"):
        partial_moments(_on(torch.randn(1, 4, 4, 6)), 24)
    with pytest.raises(ValueError, match="4-D"):
        partial_moments(_on(torch.randn(4, 4, 6)), 16)
