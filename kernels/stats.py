"""Per-(image, channel) statistics of an NHWC map for norms that cannot fold into the conv weights.

InstanceNorm2d and GroupNorm normalize each image (and channel, or channel group) by statistics of the data, so a
conv followed by one cannot be folded the way eval-mode BatchNorm is. The statistics unit splits the work into
three parts, each deterministic (fixed reduction order, no atomics):

1. **Partial moments.** Each tile of ``BLOCK_M`` pixels of one image (a tile never spans two images) reduces its
   values to a count, a mean and M2 (the sum of squared deviations from that mean) per channel. The conv epilogue
   produces these for the map it stores (:func:`tile_moments` is the jit helper it calls); :func:`partial_moments`
   computes them for a map that already exists.
2. **Finalize.** :func:`norm_scale_shift` merges the partials of each (image, group) in a fixed order with Chan's
   formula (``n = na + nb``, ``delta = mb - ma``, ``mean = ma + delta nb / n``, ``M2 = M2a + M2b + delta^2 na nb /
   n``) and turns them into a per-(image, channel) ``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean
   scale`` (biased variance, as the norms use). Sums of values and of squares would cancel catastrophically when
   the mean is large against the spread; merged moments do not.
3. **Apply.** Whatever reads the map next applies ``act(z * scale + shift)`` on the fly.

The statistics are those of the stored map (rounded to its dtype), as PyTorch computes them from the tensor it
is given. A NaN or inf anywhere in an (image, group) makes that group's statistics NaN, as in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastunet.kernels._common import (
    LaunchRecord,
    alloc,
    check_runnable,
    is_dry_run,
    launch_guard,
    next_pow2,
    record_launch,
    recording,
)


@triton.jit
def tile_moments(z, valid):
    """(count, mean, M2) per column of a ``[BLOCK_M, BLOCK_N]`` fp32 tile over its ``valid`` rows: ``count`` a
    scalar, ``mean`` and ``M2`` ``[BLOCK_N]`` vectors (zeros where no row is valid)."""
    count = tl.sum(valid.to(tl.float32), axis=0)
    keep = valid[:, None]
    mean = tl.sum(tl.where(keep, z, 0.0), axis=0) / tl.maximum(count, 1.0)
    deviation = tl.where(keep, z - mean[None, :], 0.0)
    return count, mean, tl.sum(deviation * deviation, axis=0)


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan's pairwise merge of two (count, mean, M2) summaries; empty summaries (count 0) are neutral."""
    n = n_a + n_b
    weight_b = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * weight_b
    m2 = m2_a + m2_b + delta * delta * n_a * weight_b
    return n, mean, m2


@triton.jit
def _partial_moments_kernel(
    z_ptr,  # (batch, height, width, channels) view
    mean_ptr,  # (batch, tiles, channels) fp32
    m2_ptr,  # (batch, tiles, channels) fp32
    count_ptr,  # (batch, tiles) fp32
    pixels,  # height * width
    width,
    channels,
    tiles,
    stride_zn,
    stride_zh,
    stride_zw,
    stride_zc,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Grid: (batch * tiles, cdiv(channels, BLOCK_C)); tile t of image n covers its pixels [t BLOCK_M, ...)."""
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    img = pid // tiles
    tile = pid % tiles
    offs_p = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = offs_p < pixels
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < channels
    row = img.to(tl.int64) * stride_zn + (offs_p // width).to(tl.int64) * stride_zh
    row += (offs_p % width).to(tl.int64) * stride_zw
    z = tl.load(
        z_ptr + row[:, None] + offs_c.to(tl.int64)[None, :] * stride_zc,
        mask=valid[:, None] & c_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    count, mean, m2 = tile_moments(z, valid)
    out = pid.to(tl.int64) * channels + offs_c
    tl.store(mean_ptr + out, mean, mask=c_mask)
    tl.store(m2_ptr + out, m2, mask=c_mask)
    if pid_c == 0:
        tl.store(count_ptr + pid, count)


@triton.jit
def _norm_scale_shift_kernel(
    mean_ptr,  # (batch, tiles, channels) fp32
    m2_ptr,
    count_ptr,  # (batch, tiles) fp32
    weight_ptr,  # (channels,) or unused
    bias_ptr,
    scale_ptr,  # (batch, channels) fp32
    shift_ptr,
    tiles,
    channels,
    group_size,
    eps,
    HAS_AFFINE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Grid: (batch, groups). Merges the ``tiles x group_size`` partials of one (image, group) block by block, in a
    fixed order, then writes its channels' scale and shift."""
    img = tl.program_id(0)
    group = tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T)
    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < group_size
    chans = group * group_size + offs_g
    n = tl.zeros((), dtype=tl.float32)
    mean = tl.zeros((), dtype=tl.float32)
    m2 = tl.zeros((), dtype=tl.float32)
    for t0 in range(0, tiles, BLOCK_T):
        t = t0 + offs_t
        t_mask = t < tiles
        rows = img.to(tl.int64) * tiles + t
        mask = t_mask[:, None] & g_mask[None, :]
        at = rows[:, None] * channels + chans[None, :]
        block_mean = tl.load(mean_ptr + at, mask=mask, other=0.0)
        block_m2 = tl.load(m2_ptr + at, mask=mask, other=0.0)
        block_n = tl.load(count_ptr + rows, mask=t_mask, other=0.0)
        block_n = tl.where(mask, block_n[:, None], 0.0)
        flat = (
            tl.reshape(block_n, (BLOCK_T * BLOCK_G,)),
            tl.reshape(block_mean, (BLOCK_T * BLOCK_G,)),
            tl.reshape(block_m2, (BLOCK_T * BLOCK_G,)),
        )
        b_n, b_mean, b_m2 = tl.reduce(flat, 0, _chan_merge)
        n, mean, m2 = _chan_merge(n, mean, m2, b_n, b_mean, b_m2)
    rstd = 1.0 / tl.sqrt(m2 / tl.maximum(n, 1.0) + eps)
    scale = tl.zeros((BLOCK_G,), dtype=tl.float32) + rstd
    shift = tl.zeros((BLOCK_G,), dtype=tl.float32)
    if HAS_AFFINE:
        gamma = tl.load(weight_ptr + chans, mask=g_mask, other=0.0).to(tl.float32)
        beta = tl.load(bias_ptr + chans, mask=g_mask, other=0.0).to(tl.float32)
        scale = gamma * rstd
        shift = beta
    shift = shift - mean * scale
    out = img.to(tl.int64) * channels + chans
    tl.store(scale_ptr + out, scale, mask=g_mask)
    tl.store(shift_ptr + out, shift, mask=g_mask)


def partial_moments(z: torch.Tensor, block_m: int = 128, *, name: str = "partial_moments"):
    """Per-tile (mean, M2, count) of an (N, H, W, C) map: tiles of ``block_m`` consecutive pixels (row-major) of one
    image. Returns ``mean`` and ``M2`` as fp32 (N, tiles, C) and ``count`` as fp32 (N, tiles)."""
    if z.dim() != 4:
        raise ValueError(f"partial_moments input: expected a 4-D (N, H, W, C) view, got shape {tuple(z.shape)}")
    check_runnable(z, "partial_moments input")
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    batch, height, width, channels = z.shape
    pixels = height * width
    tiles = triton.cdiv(pixels, block_m)
    mean = alloc((batch, tiles, channels), torch.float32, z.device)
    m2 = alloc((batch, tiles, channels), torch.float32, z.device)
    count = alloc((batch, tiles), torch.float32, z.device)
    if batch * tiles * channels == 0:
        return mean, m2, count
    block_c = min(64, max(16, next_pow2(channels)))
    grid = (batch * tiles, triton.cdiv(channels, block_c))
    args = (z, mean, m2, count, pixels, width, channels, tiles, *z.stride())
    constexprs = {"BLOCK_M": block_m, "BLOCK_C": block_c}
    if recording():
        record_launch(
            LaunchRecord(
                name=name,
                kernel=_partial_moments_kernel,
                grid=grid,
                flops=0,
                bytes_read=z.numel() * z.element_size(),
                bytes_written=(2 * mean.numel() + count.numel()) * 4,
                args=args,
                constexprs=constexprs,
                launch_options={"num_warps": 4, "num_stages": 1},
            )
        )
    if not is_dry_run():
        with launch_guard(z):
            _partial_moments_kernel[grid](*args, **constexprs, num_warps=4, num_stages=1)
    return mean, m2, count


def norm_scale_shift(
    mean: torch.Tensor,
    m2: torch.Tensor,
    count: torch.Tensor,
    groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    name: str = "norm_scale_shift",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(image, channel) ``scale`` and ``shift`` (fp32, (N, C)) from tile partials (see :func:`partial_moments`):
    ``groups`` channel groups share statistics (``groups == C``: InstanceNorm; ``weight``/``bias``: the norm's
    affine parameters, both or neither), so that ``z * scale + shift`` is the normalized map."""
    if mean.dim() != 3 or m2.shape != mean.shape or count.shape != mean.shape[:2]:
        raise ValueError(
            "norm_scale_shift: expected mean and M2 of shape (N, tiles, C) and count of shape (N, tiles), got "
            f"{tuple(mean.shape)}, {tuple(m2.shape)} and {tuple(count.shape)}"
        )
    for t, what in ((mean, "mean"), (m2, "M2"), (count, "count")):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"norm_scale_shift: {what} must be contiguous float32, got {t.dtype}")
    batch, tiles, channels = mean.shape
    if not isinstance(groups, int) or groups < 1 or channels % groups:
        raise ValueError(f"groups must be a positive divisor of the {channels} channels, got {groups!r}")
    if (weight is None) != (bias is None):
        raise ValueError("norm_scale_shift: pass both weight and bias (an affine norm) or neither")
    for t, what in ((weight, "weight"), (bias, "bias")):
        if t is not None and (t.shape != (channels,) or t.device != mean.device):
            raise ValueError(
                f"norm_scale_shift: {what} must have shape ({channels},) on {mean.device}, got "
                f"{tuple(t.shape)} on {t.device}"
            )
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    group_size = channels // groups
    scale = alloc((batch, channels), torch.float32, mean.device)
    shift = alloc((batch, channels), torch.float32, mean.device)
    if batch * channels == 0:
        return scale, shift
    block_g = next_pow2(group_size)
    block_t = max(1, min(next_pow2(tiles), 4096 // block_g))
    affine = weight is not None
    weight = weight.contiguous() if affine else mean
    bias = bias.contiguous() if affine else mean
    grid = (batch, groups)
    args = (mean, m2, count, weight, bias, scale, shift, tiles, channels, group_size, float(eps))
    constexprs = {"HAS_AFFINE": affine, "BLOCK_T": block_t, "BLOCK_G": block_g}
    if recording():
        record_launch(
            LaunchRecord(
                name=name,
                kernel=_norm_scale_shift_kernel,
                grid=grid,
                flops=0,
                bytes_read=(2 * mean.numel() + count.numel()) * 4,
                bytes_written=2 * scale.numel() * 4,
                args=args,
                constexprs=constexprs,
                launch_options={"num_warps": 4, "num_stages": 1},
            )
        )
    if not is_dry_run():
        with launch_guard(mean):
            _norm_scale_shift_kernel[grid](*args, **constexprs, num_warps=4, num_stages=1)
    return scale, shift


__all__ = ["norm_scale_shift", "partial_moments", "tile_moments"]
