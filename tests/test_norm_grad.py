"""The norms' backward (kernels/norm_grad.py): the consumer side and the producer side together give the gradient
of ``act(norm(z))`` that float64 autograd of torch's own InstanceNorm, GroupNorm and batch-statistics BatchNorm
gives, for the input and the affine parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastunet.kernels.norm_grad import norm_coefficients, norm_input_backward_nhwc, norm_stats_backward_nhwc

ACTS = {
    "relu": (lambda t: F.relu(t), {}),
    "leaky_relu": (lambda t: F.leaky_relu(t, 0.1), {"slope": 0.1}),
    "clamp": (lambda t: F.hardtanh(t, -0.5, 0.7), {"lo": -0.5, "hi": 0.7}),
    "none": (lambda t: t, {}),
}


def _norm(kind: str, z: torch.Tensor, weight, bias, groups: int, eps: float) -> torch.Tensor:
    if kind == "instance":
        return F.instance_norm(z, weight=weight, bias=bias, eps=eps)
    if kind == "group":
        return F.group_norm(z, groups, weight, bias, eps)
    return F.batch_norm(z, None, None, weight, bias, True, 0.0, eps)


def _statistics(kind: str, z64: torch.Tensor, groups: int):
    """(mean, biased var) of each channel's group, (N, C), and the group's element count."""
    batch, channels, height, width = z64.shape
    if kind == "batch":
        mean = z64.mean((0, 2, 3))[None].expand(batch, channels)
        var = z64.var((0, 2, 3), unbiased=False)[None].expand(batch, channels)
        return mean, var, batch * height * width
    grouped = z64.reshape(batch, groups, -1)
    size = channels // groups
    mean = grouped.mean(2).repeat_interleave(size, 1)
    var = grouped.var(2, unbiased=False).repeat_interleave(size, 1)
    return mean, var, grouped.shape[2]


@pytest.mark.parametrize("kind", ["instance", "group", "batch"])
@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_sides_give_the_norms_gradient(device, kind, act, affine, dtype):
    torch.manual_seed(0)
    batch, channels, height, width = 3, 6, 5, 7
    groups = {"instance": channels, "group": 2, "batch": channels}[kind]
    eps = 1e-5
    z = (torch.randn(batch, channels, height, width) * 2 + 0.5).to(dtype)
    grad = torch.randn(batch, channels, height, width).to(dtype)
    weight = torch.rand(channels) + 0.5 if affine else None
    bias = torch.randn(channels) * 0.1 if affine else None
    fn, params = ACTS[act]
    # float64 reference on the values as stored
    z64 = z.double().requires_grad_()
    w64 = weight.double().requires_grad_() if affine else None
    b64 = bias.double().requires_grad_() if affine else None
    fn(_norm(kind, z64, w64, b64, groups, eps)).backward(grad.double())
    # scale and shift as the forward computes them (from the stored values' statistics)
    mean, var, count = _statistics(kind, z.double(), groups)
    rstd = (var + eps).rsqrt()
    gamma = weight.double()[None] if affine else 1.0
    scale = (gamma * rstd).float().contiguous()
    shift = ((bias.double()[None] if affine else 0.0) - mean * gamma * rstd).float().contiguous()
    nhwc = lambda t: t.permute(0, 2, 3, 1).to(device)  # noqa: E731
    dz_read, g_scale, g_shift = norm_input_backward_nhwc(nhwc(grad), nhwc(z), scale.to(device), shift.to(device),
                                                         act, **params)  # fmt: skip
    coef_a, coef_b, g_weight, g_bias = norm_coefficients(
        g_scale, g_shift, mean.float().contiguous().to(device), var.float().contiguous().to(device),
        weight.to(device) if affine else None, groups, eps, count, kind == "batch",
    )  # fmt: skip
    dz = norm_stats_backward_nhwc(nhwc(z), dz_read, coef_a, coef_b, mean.float().contiguous().to(device))
    assert dz.dtype == dtype and dz.is_contiguous()
    got = dz.permute(0, 3, 1, 2).double().cpu()
    # fp32 sums of O(100) terms and one storage rounding of dz_read and dz (bf16: 2**-8 each)
    rounding = 2**-8 if dtype == torch.bfloat16 else 2**-20
    scale_of = z64.grad.abs().max() + (grad.double().abs() * scale.double()[..., None, None]).max()
    assert (got - z64.grad).abs().max() <= 4 * rounding * scale_of, (got - z64.grad).abs().max()
    if affine:
        for found, expected in ((g_weight, w64.grad), (g_bias, b64.grad)):
            tol = 1e-4 * expected.abs().max() + 1e-5
            torch.testing.assert_close(found.double().cpu(), expected, rtol=1e-4, atol=float(tol))


def test_runs_are_bitwise_identical_and_bad_input_is_refused(device):
    z = torch.randn(2, 9, 11, 5, device=device)
    grad = torch.randn(2, 9, 11, 5, device=device)
    scale, shift = torch.rand(2, 5, device=device), torch.randn(2, 5, device=device)
    first = norm_input_backward_nhwc(grad, z, scale, shift, "relu")
    second = norm_input_backward_nhwc(grad, z, scale, shift, "relu")
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    with pytest.raises(ValueError, match="scale: expected a contiguous float32 \\(2, 5\\)"):
        norm_input_backward_nhwc(grad, z, scale.double(), shift, "relu")
    with pytest.raises(ValueError, match="activation must be one of"):
        norm_input_backward_nhwc(grad, z, scale, shift, "silu")
    with pytest.raises(ValueError, match="grad_z must match z"):
        norm_stats_backward_nhwc(z, grad[:, :3], scale, shift, scale)
