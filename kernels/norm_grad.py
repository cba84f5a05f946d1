"""Backward of the norms whose statistics come from the data (InstanceNorm, GroupNorm, BatchNorm with batch
statistics), over NHWC maps, in two memory-bound launches per side:

* the consumer side, :func:`norm_input_backward_nhwc`: a map ``z`` read as ``a = act(z * scale + shift)`` (per
  image and channel ``scale``/``shift``, see :class:`fastunet.kernels.stats.NormIn`) gets, from the gradient of
  ``a``, the gradient of ``z`` *through the read alone* (``g * scale`` with ``g = act'(u) * grad_a``,
  ``u = z * scale + shift``) and the gradients of ``scale`` and ``shift`` (``sum g * z`` and ``sum g`` over each
  image's pixels): fp32 partial sums over pixel slices (fp64 for float64 maps), summed over the slices in a fixed
  order. A stride-1 conv reader does the same in its input gradient's epilogue instead (the conv kernel's
  ``GRAD_MASK`` = ``GRAD_NORM_READ``, or ``GRAD_NORM_APPLIED`` writing the values read too,
  :func:`fastunet.kernels.conv.conv2d_nhwc`'s ``grad_norm``), a 1x1 head in its one-pass backward
  (:func:`fastunet.kernels.backward.head_backward_sums_nhwc`'s ``norm_read``) and the pool's backward in its pass
  over z (:func:`fastunet.kernels.backward.activation_pool_backward_nhwc`'s ``norm_read``), so this launch serves the
  strided conv and the low-resolution map an upsample or transposed conv reads;
* the producer side, :func:`norm_stats_backward_nhwc`: ``scale`` and ``shift`` are functions of the statistics
  of ``z`` (mean and variance of each group), so ``z`` gets ``A + B * (z - mean)`` more per (image, channel), the
  coefficients following from the gradients of ``scale`` and ``shift`` (:func:`norm_coefficients`, on (N, C)
  tensors).

No atomics: two runs give the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastunet.kernels._common import (
    ACT_CLAMP,
    ACT_LEAKY_RELU,
    ACT_NONE,
    ACT_RELU,
    INTERPRET,
    LaunchRecord,
    alloc,
    check_runnable,
    is_dry_run,
    launch_guard,
    next_pow2,
    record_launch,
    recording,
    sm_count,
    stat_dtype,
    to_storage,
)
from fastunet.kernels.conv import _sum_read_parts

# Activations after a norm whose derivative the consumer side applies, from the pre-activation value u as torch's
# backward of each does (ReLU: threshold_backward on the result, so a NaN passes the gradient; LeakyReLU: u > 0;
# clamp: hardtanh_backward, zero where u <= lo or u >= hi).
NORM_ACTIVATIONS = {"relu": ACT_RELU, "leaky_relu": ACT_LEAKY_RELU, "clamp": ACT_CLAMP, "none": ACT_NONE}


@triton.jit
def _activation_grad(u, g, slope, lo, hi, ACT: tl.constexpr):
    if ACT == ACT_RELU:
        return tl.where((u > 0) | (u != u), g, 0.0)
    if ACT == ACT_LEAKY_RELU:
        return tl.where(u > 0, g, g * slope)
    if ACT == ACT_CLAMP:
        return tl.where((u <= lo) | (u >= hi), 0.0, g)
    return g


@triton.jit
def _norm_input_backward_kernel(
    grad_ptr,  # (batch, height, width, channels) view: the gradient of a
    z_ptr,  # (batch, height, width, channels) view: the stored pre-norm map
    scale_ptr,  # (batch, channels) fp32
    shift_ptr,
    dz_ptr,  # (batch, height, width, channels) contiguous
    part_ptr,  # (2, splits, batch, channels) fp32: sums of g * z, then of g, over each split's pixels
    batch,
    width,
    channels,
    pixels,  # height * width
    per_split,  # pixels of a split (a multiple of BLOCK_P)
    slope,
    lo,
    hi,
    stride_gn,
    stride_gh,
    stride_gw,
    stride_gc,
    stride_zn,
    stride_zh,
    stride_zw,
    stride_zc,
    ACT: tl.constexpr,
    INTERPRETER: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Grid: (batch * splits, cdiv(channels, BLOCK_C)); program (image * splits + split, channel block)."""
    splits = tl.num_programs(0) // batch
    img = tl.program_id(0) // splits
    split = tl.program_id(0) % splits
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < channels
    at = img.to(tl.int64) * channels + offs_c
    scale = tl.load(scale_ptr + at, mask=c_mask, other=0.0)
    shift = tl.load(shift_ptr + at, mask=c_mask, other=0.0)
    acc_t: tl.constexpr = part_ptr.dtype.element_ty  # fp32; fp64 for float64 maps
    sum_gz = tl.zeros((BLOCK_C,), dtype=acc_t)
    sum_g = tl.zeros((BLOCK_C,), dtype=acc_t)
    start = split * per_split
    for p0 in range(start, start + per_split, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_mask = p < pixels
        y = p // width
        x = p % width
        mask = p_mask[:, None] & c_mask[None, :]
        g_off = img.to(tl.int64) * stride_gn + y.to(tl.int64) * stride_gh + x.to(tl.int64) * stride_gw
        z_off = img.to(tl.int64) * stride_zn + y.to(tl.int64) * stride_zh + x.to(tl.int64) * stride_zw
        ga = tl.load(grad_ptr + g_off[:, None] + offs_c.to(tl.int64)[None, :] * stride_gc, mask=mask, other=0.0)
        z = tl.load(z_ptr + z_off[:, None] + offs_c.to(tl.int64)[None, :] * stride_zc, mask=mask, other=0.0)
        z = z.to(acc_t)
        u = z * scale[None, :] + shift[None, :]
        g = _activation_grad(u, ga.to(acc_t), slope, lo, hi, ACT)
        g = tl.where(mask, g, 0.0)
        dz = g * scale[None, :]
        out = (img.to(tl.int64) * pixels + p.to(tl.int64))[:, None] * channels + offs_c.to(tl.int64)[None, :]
        tl.store(dz_ptr + out, to_storage(dz, dz_ptr.dtype.element_ty, INTERPRETER), mask=mask)
        sum_gz += tl.sum(g * z, axis=0)
        sum_g += tl.sum(g, axis=0)
    row = (split.to(tl.int64) * batch + img) * channels + offs_c
    tl.store(part_ptr + row, sum_gz, mask=c_mask)
    tl.store(part_ptr + row + splits * batch * channels, sum_g, mask=c_mask)


def _check_map(t: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{what}: expected a 4-D (N, H, W, C) view, got {shape}")
    check_runnable(t, what)


def _check_per_channel(t: torch.Tensor, what: str, batch: int, channels: int, z: torch.Tensor) -> None:
    """``t`` is a contiguous (batch, channels) table of ``z``'s statistics dtype (float32; float64 for float64 maps)."""
    wanted, device = stat_dtype(z.dtype), z.device
    wanted_name = str(wanted).removeprefix("torch.")
    if t.shape != (batch, channels) or t.dtype != wanted or t.device != device or not t.is_contiguous():
        raise ValueError(
            f"{what}: expected a contiguous {wanted_name} ({batch}, {channels}) tensor on {device}, got {t.dtype} "
            f"{tuple(t.shape)} on {t.device}"
        )


def norm_input_backward_nhwc(
    grad_a: torch.Tensor,
    z: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    activation: str = "none",
    slope: float = 0.0,
    lo: float = 0.0,
    hi: float = 0.0,
    *,
    name: str = "norm_input_backward",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients through a normalized read ``a = act(z * scale + shift)``.

    Args:
        grad_a: (N, H, W, C) view, any strides: the gradient of ``a``.
        z: (N, H, W, C) view: the stored pre-norm map.
        scale, shift: contiguous fp32 (N, C).
        activation: ``"relu"``, ``"leaky_relu"`` (``slope``), ``"clamp"`` (``lo``, ``hi``) or ``"none"``.

    Returns:
        (dz: contiguous (N, H, W, C) in z's dtype, ``g * scale``; grad_scale, grad_shift: fp32 (N, C), ``sum g * z``
        and ``sum g`` over each image's pixels), ``g = act'(u) * grad_a`` in fp32.
    """
    _check_map(grad_a, "norm_input_backward_nhwc grad_a")
    _check_map(z, "norm_input_backward_nhwc z")
    if grad_a.shape != z.shape or grad_a.device != z.device:
        raise ValueError(
            f"norm_input_backward_nhwc: grad_a must match z's shape and device, got {tuple(grad_a.shape)} on "
            f"{grad_a.device} against {tuple(z.shape)} on {z.device}"
        )
    if activation not in NORM_ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(NORM_ACTIVATIONS)}, got {activation!r}")
    batch, height, width, channels = z.shape
    _check_per_channel(scale, "norm_input_backward_nhwc scale", batch, channels, z)
    _check_per_channel(shift, "norm_input_backward_nhwc shift", batch, channels, z)
    pixels = height * width
    if batch * pixels >= 2**31 - 1024:
        raise ValueError(f"at most 2**31 - 1025 pixels per launch, got {batch * pixels}")
    dz = alloc((batch, height, width, channels), z.dtype, z.device)
    stat = stat_dtype(z.dtype)
    if batch * channels == 0 or pixels == 0:  # no pixel: zero sums
        return dz, *(torch.zeros((batch, channels), dtype=stat, device=z.device) for _ in range(2))
    block_c = min(64, max(16, next_pow2(channels)))
    block_p = max(16, 2048 // block_c)
    c_blocks = triton.cdiv(channels, block_c)
    splits = max(1, min(triton.cdiv(2 * sm_count(z), batch * c_blocks), triton.cdiv(pixels, 8 * block_p)))
    per_split = triton.cdiv(triton.cdiv(pixels, splits), block_p) * block_p
    splits = triton.cdiv(pixels, per_split)
    part = alloc((2, splits, batch, channels), stat, z.device)
    grid = (batch * splits, c_blocks)
    args = (grad_a, z, scale, shift, dz, part, batch, width, channels, pixels, per_split, float(slope), float(lo),
            float(hi), *grad_a.stride(), *z.stride())  # fmt: skip
    constexprs = {
        "ACT": NORM_ACTIVATIONS[activation].value,
        "INTERPRETER": INTERPRET,
        "BLOCK_P": block_p,
        "BLOCK_C": block_c,
    }
    if recording():
        size = z.element_size()
        record_launch(
            LaunchRecord(
                name=name,
                kernel=_norm_input_backward_kernel,
                grid=grid,
                flops=0,
                bytes_read=(
                    grad_a.numel() * grad_a.element_size() + z.numel() * size + 2 * scale.numel() * scale.element_size()
                ),
                bytes_written=dz.numel() * size + part.numel() * part.element_size(),
                args=args,
                constexprs=constexprs,
                launch_options={"num_warps": 4, "num_stages": 2},
            )
        )
    if not is_dry_run():
        with launch_guard(z):
            _norm_input_backward_kernel[grid](*args, **constexprs, num_warps=4, num_stages=2)
    # Each sum's partials are (splits, batch, channels): the fixed-order sum over the splits the conv's and the
    # pool's read backward use too.
    return dz, *_sum_read_parts(part, f"{name}.sum", z)


@triton.jit
def _norm_stats_backward_kernel(
    z_ptr,  # (batch, height, width, channels) view
    grad_ptr,  # (batch, height, width, channels) view (HAS_GRAD)
    coef_a_ptr,  # (batch, channels) fp32
    coef_b_ptr,
    mean_ptr,
    dz_ptr,  # contiguous
    channels,
    width,
    pixels,
    stride_zn,
    stride_zh,
    stride_zw,
    stride_zc,
    stride_gn,
    stride_gh,
    stride_gw,
    stride_gc,
    HAS_GRAD: tl.constexpr,
    INTERPRETER: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Grid: (batch * cdiv(pixels, BLOCK_P), cdiv(channels, BLOCK_C))."""
    blocks = tl.cdiv(pixels, BLOCK_P)
    img = tl.program_id(0) // blocks
    p = (tl.program_id(0) % blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < channels
    mask = (p < pixels)[:, None] & c_mask[None, :]
    y = p // width
    x = p % width
    at = img.to(tl.int64) * channels + offs_c
    coef_a = tl.load(coef_a_ptr + at, mask=c_mask, other=0.0)
    coef_b = tl.load(coef_b_ptr + at, mask=c_mask, other=0.0)
    mean = tl.load(mean_ptr + at, mask=c_mask, other=0.0)
    z_off = img.to(tl.int64) * stride_zn + y.to(tl.int64) * stride_zh + x.to(tl.int64) * stride_zw
    z = tl.load(z_ptr + z_off[:, None] + offs_c.to(tl.int64)[None, :] * stride_zc, mask=mask, other=0.0)
    acc_t: tl.constexpr = coef_a_ptr.dtype.element_ty  # fp32; fp64 for float64 maps
    dz = coef_a[None, :] + coef_b[None, :] * (z.to(acc_t) - mean[None, :])
    if HAS_GRAD:
        g_off = img.to(tl.int64) * stride_gn + y.to(tl.int64) * stride_gh + x.to(tl.int64) * stride_gw
        g = tl.load(grad_ptr + g_off[:, None] + offs_c.to(tl.int64)[None, :] * stride_gc, mask=mask, other=0.0)
        dz += g.to(acc_t)
    out = (img.to(tl.int64) * pixels + p.to(tl.int64))[:, None] * channels + offs_c.to(tl.int64)[None, :]
    tl.store(dz_ptr + out, to_storage(dz, dz_ptr.dtype.element_ty, INTERPRETER), mask=mask)


def norm_coefficients(
    grad_scale: torch.Tensor | None,
    grad_shift: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    groups: int,
    eps: float,
    count: int,
    over_batch: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The producer side's per-(image, channel) coefficients and the affine parameters' gradients, on (N, C)
    tensors (float64 inside, out in ``mean``'s dtype: fp32, fp64 for a float64 map's statistics).

    ``scale = weight * rstd`` and ``shift = bias - mean * scale`` per (image, channel), ``rstd = (var + eps)^-1/2``,
    mean and var those of the channel's group (``groups`` groups per image; ``over_batch``: per channel over the
    batch); ``count`` values per group. Returns ``(A, B, grad_weight, grad_bias)`` with ``dz += A + B * (z -
    mean)``: ``A = dL/dmean / count``, ``B = 2 dL/dvar / count`` of the element's group (the affine gradients None
    without affine parameters)."""
    batch, channels = mean.shape
    zeros = torch.zeros((batch, channels), dtype=torch.float64, device=mean.device)
    gs = grad_scale.double() if grad_scale is not None else zeros
    gt = grad_shift.double() if grad_shift is not None else zeros
    mean64, var64 = mean.double(), var.double()
    rstd = (var64 + eps).rsqrt()
    gamma = weight.double()[None, :] if weight is not None else torch.ones_like(mean64)
    grad_weight = (gs * rstd - gt * mean64 * rstd).sum(0) if weight is not None else None
    grad_bias = gt.sum(0) if weight is not None else None
    d_mean = -gt * gamma * rstd  # per element of the group, summed below
    d_rstd = gs * gamma - gt * mean64 * gamma

    def group_sum(t: torch.Tensor) -> torch.Tensor:
        if over_batch:
            return t.sum(0, keepdim=True).expand(batch, channels)
        size = channels // groups
        return t.view(batch, groups, size).sum(2, keepdim=True).expand(batch, groups, size).reshape(batch, channels)

    d_var = group_sum(d_rstd) * (-0.5) * rstd**3
    coef_a = group_sum(d_mean) / count
    coef_b = 2.0 * d_var / count
    stat = mean.dtype  # fp32, or fp64 for a float64 map's statistics
    out = [coef_a.to(stat).contiguous(), coef_b.to(stat).contiguous()]
    out += [g.to(stat) if g is not None else None for g in (grad_weight, grad_bias)]
    return tuple(out)


def norm_stats_backward_nhwc(
    z: torch.Tensor,
    grad_z: torch.Tensor | None,
    coef_a: torch.Tensor,
    coef_b: torch.Tensor,
    mean: torch.Tensor,
    *,
    name: str = "norm_stats_backward",
) -> torch.Tensor:
    """``dz = grad_z + A + B * (z - mean)`` per (image, channel) (see :func:`norm_coefficients`), fp32 inside,
    rounded once; a new contiguous (N, H, W, C) tensor in z's dtype. ``grad_z`` None: no direct gradient."""
    _check_map(z, "norm_stats_backward_nhwc z")
    batch, height, width, channels = z.shape
    if grad_z is not None:
        _check_map(grad_z, "norm_stats_backward_nhwc grad_z")
        if grad_z.shape != z.shape or grad_z.device != z.device:
            raise ValueError(
                f"norm_stats_backward_nhwc: grad_z must match z, got {tuple(grad_z.shape)} on {grad_z.device} "
                f"against {tuple(z.shape)} on {z.device}"
            )
    for t, what in ((coef_a, "A"), (coef_b, "B"), (mean, "mean")):
        _check_per_channel(t, f"norm_stats_backward_nhwc {what}", batch, channels, z)
    dz = alloc((batch, height, width, channels), z.dtype, z.device)
    pixels = height * width
    if dz.numel() == 0:
        return dz
    block_c = min(64, max(16, next_pow2(channels)))
    block_p = max(16, 2048 // block_c)
    grid = (batch * triton.cdiv(pixels, block_p), triton.cdiv(channels, block_c))
    g = grad_z if grad_z is not None else z
    args = (z, g, coef_a, coef_b, mean, dz, channels, width, pixels, *z.stride(), *g.stride())
    constexprs = {"HAS_GRAD": grad_z is not None, "INTERPRETER": INTERPRET, "BLOCK_P": block_p, "BLOCK_C": block_c}
    if recording():
        size = z.element_size()
        record_launch(
            LaunchRecord(
                name=name,
                kernel=_norm_stats_backward_kernel,
                grid=grid,
                flops=0,
                bytes_read=z.numel() * size * (2 if grad_z is not None else 1),
                bytes_written=dz.numel() * size,
                args=args,
                constexprs=constexprs,
                launch_options={"num_warps": 4, "num_stages": 1},
            )
        )
    if not is_dry_run():
        with launch_guard(z):
            _norm_stats_backward_kernel[grid](*args, **constexprs, num_warps=4, num_stages=1)
    return dz


__all__ = ["NORM_ACTIVATIONS", "norm_coefficients", "norm_input_backward_nhwc", "norm_stats_backward_nhwc"]
