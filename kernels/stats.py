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
3. **Apply.** ``act(z * scale + shift)`` (:class:`NormIn` says how): either by whatever reads the map next, on
   the fly (the conv's loader, the transposed conv's, the upsample kernel, the head), or by :func:`normalize_nhwc`,
   one memory-bound pass (the eval forward's choice before a conv: normalizing in a conv's loader takes the
   operand through registers and costs more issue slots than the pass's bytes); a max-pool after the norm runs as
   :func:`normalize_nhwc` (normalize, activate and pool in one memory-bound pass, the whole map stored too when
   asked).

The statistics are those of the stored map (rounded to its dtype), as PyTorch computes them from the tensor it
is given. A NaN or inf anywhere in an (image, group) makes that group's statistics NaN, as in PyTorch.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from fastunet.kernels._common import (
    ACTIVATIONS,
    INTERPRET,
    LaunchRecord,
    acc_type,
    activate,
    alloc,
    check_runnable,
    is_dry_run,
    launch_guard,
    next_pow2,
    pixel_offset,
    record_launch,
    recording,
    stat_dtype,
    tensor_meta,
    to_storage,
)


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """A norm whose statistics come from the data: ``groups`` channel groups per image share them (InstanceNorm:
    one channel a group; GroupNorm: ``num_groups``), or with ``over_batch`` per channel over the whole batch
    (BatchNorm in training mode: ``groups`` = channels); ``weight``/``bias`` its affine parameters (both or neither,
    (C,) tensors, kept in fp32), ``eps`` as in the module."""

    groups: int
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    eps: float = 1e-5
    over_batch: bool = False  # BatchNorm with batch statistics: a group's statistics span every image


@dataclasses.dataclass(frozen=True)
class NormIn:
    """How a consumer reads a stored pre-norm map ``z``: ``act(z * scale + shift)`` with fp32 ``scale``/``shift`` of
    shape (N, C), then the activation that followed the norm (``activation``: a key of ``ACTIVATIONS``, with its
    ``slope``, clamp ``lo``/``hi`` or PReLU ``slopes`` (C,)). Zero padding is applied after it, as in the math."""

    scale: torch.Tensor
    shift: torch.Tensor
    activation: str = "none"
    slope: float = 0.0
    lo: float = 0.0
    hi: float = 0.0
    slopes: torch.Tensor | None = None
    # The statistics behind scale and shift, (N, C) fp32 each: mean and biased variance of each channel's group (what
    # a backward and BatchNorm's running statistics need; consumers never read them). None where not kept.
    mean: torch.Tensor | None = None
    var: torch.Tensor | None = None

    def check(self, z: torch.Tensor, what: str) -> None:
        """Refuse a NormIn that does not fit the (N, H, W, C) map ``z``."""
        batch, channels = z.shape[0], z.shape[-1]
        wanted = stat_dtype(z.dtype)
        wanted_name = str(wanted).removeprefix("torch.")
        for t, name in ((self.scale, "scale"), (self.shift, "shift")):
            if t.shape != (batch, channels) or t.dtype != wanted or t.device != z.device:
                raise ValueError(
                    f"{what} normalization {name}: expected {wanted_name} ({batch}, {channels}) on {z.device}, got "
                    f"{t.dtype} {tuple(t.shape)} on {t.device}"
                )
            if not t.is_contiguous():
                raise ValueError(f"{what} normalization {name} must be contiguous")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"{what} activation must be one of {list(ACTIVATIONS)}, got {self.activation!r}")
        if (self.activation == "prelu") != (self.slopes is not None):
            raise ValueError(f"{what}: PReLU slopes are given with the 'prelu' activation, and only with it")
        if self.slopes is not None and (self.slopes.shape != (channels,) or self.slopes.device != z.device):
            raise ValueError(
                f"{what} PReLU slopes: expected shape ({channels},) on {z.device}, got {tuple(self.slopes.shape)} on "
                f"{self.slopes.device}"
            )
        if self.activation == "clamp" and not self.lo <= self.hi:
            raise ValueError(f"{what}: a clamp needs lo <= hi, got [{self.lo}, {self.hi}]")

    def signature(self) -> tuple:
        """What :meth:`check` reads (a launch signature's part; ``slope`` and the statistics are read per call)."""
        return (
            tensor_meta(self.scale),
            tensor_meta(self.shift),
            self.activation,
            self.lo,
            self.hi,
            tensor_meta(self.slopes),
        )

    def args(self, dummy: torch.Tensor) -> tuple:
        """(scale, shift, slopes, slope, lo, hi) kernel arguments (``dummy`` for absent slopes)."""
        slopes = self.slopes.contiguous() if self.slopes is not None else dummy
        return self.scale, self.shift, slopes, float(self.slope), float(self.lo), float(self.hi)


@triton.jit
def normalize(z, scale, shift, slopes_ptr, offs_c, c_mask, slope, lo, hi, ACT: tl.constexpr):
    """``act(z * scale + shift)`` in fp32 (fp64 for a float64 map) on a tile whose columns are channels ``offs_c``:
    ``scale`` and ``shift`` broadcast against it (``[None, :]`` for one image's channels, or a row per pixel)."""
    return activate(z.to(acc_type(z.dtype)) * scale + shift, slopes_ptr, offs_c, c_mask, slope, lo, hi, ACT)


@triton.jit
def tile_moments(z, valid):
    """(count, mean, M2) per column of a ``[BLOCK_M, BLOCK_N]`` fp32 (or fp64) tile over its ``valid`` rows, in the
    tile's dtype: ``count`` a scalar, ``mean`` and ``M2`` ``[BLOCK_N]`` vectors (zeros where no row is valid)."""
    count = tl.sum(valid.to(z.dtype), axis=0)
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
    ).to(acc_type(z_ptr.dtype.element_ty))
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
    stat_mean_ptr,  # (batch, channels) fp32 (WRITE_STATS): the group's mean and biased variance
    stat_var_ptr,
    tiles,
    channels,
    group_size,
    eps,
    HAS_AFFINE: tl.constexpr,
    OVER_BATCH: tl.constexpr,
    WRITE_STATS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Grid: (batch, groups). Merges the ``tiles x group_size`` partials of one (image, group) block by block, in a
    fixed order, then writes its channels' scale and shift. ``OVER_BATCH``: the partials of every image (rows
    0 .. batch * tiles, the same order for every program), each image's row written with the same values."""
    img = tl.program_id(0)
    group = tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T)
    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < group_size
    chans = group * group_size + offs_g
    stat_t: tl.constexpr = mean_ptr.dtype.element_ty  # fp32, or fp64 for a float64 map's partials
    n = tl.zeros((), dtype=stat_t)
    mean = tl.zeros((), dtype=stat_t)
    m2 = tl.zeros((), dtype=stat_t)
    first_row = img.to(tl.int64) * tiles
    rows_total = tiles
    if OVER_BATCH:
        first_row = first_row * 0
        rows_total = tiles * tl.num_programs(0)
    for t0 in range(0, rows_total, BLOCK_T):
        t = t0 + offs_t
        t_mask = t < rows_total
        rows = first_row + t
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
    var = m2 / tl.maximum(n, 1.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    scale = tl.zeros((BLOCK_G,), dtype=stat_t) + rstd
    shift = tl.zeros((BLOCK_G,), dtype=stat_t)
    if HAS_AFFINE:
        gamma = tl.load(weight_ptr + chans, mask=g_mask, other=0.0).to(stat_t)
        beta = tl.load(bias_ptr + chans, mask=g_mask, other=0.0).to(stat_t)
        scale = gamma * rstd
        shift = beta
    shift = shift - mean * scale
    out = img.to(tl.int64) * channels + chans
    tl.store(scale_ptr + out, scale, mask=g_mask)
    tl.store(shift_ptr + out, shift, mask=g_mask)
    if WRITE_STATS:
        tl.store(stat_mean_ptr + out, tl.zeros((BLOCK_G,), dtype=stat_t) + mean, mask=g_mask)
        tl.store(stat_var_ptr + out, tl.zeros((BLOCK_G,), dtype=stat_t) + var, mask=g_mask)


@triton.jit
def _normalize_nhwc_kernel(
    z_ptr,  # (batch, height, width, channels): the stored pre-norm map
    y_ptr,  # (batch, height, width, channels), or (batch, height // 2, width // 2, channels) with POOL
    full_ptr,  # FULL: (batch, height, width, channels), the normalized map the pooled one is taken from
    scale_ptr,  # (batch, channels) fp32
    shift_ptr,
    slopes_ptr,  # (channels,): PReLU's
    slope,
    lo,
    hi,
    batch,
    out_h,
    out_w,
    channels,
    height,  # FULL: z's size (out_h, out_w count the windows then, ceil(height / 2) x ceil(width / 2))
    width,
    stride_zn,
    stride_zh,
    stride_zw,
    stride_zc,
    stride_yn,
    stride_yh,
    stride_yw,
    stride_yc,
    ACT: tl.constexpr,
    POOL: tl.constexpr,
    FULL: tl.constexpr,
    INTERPRETER: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """y = act(z * scale + shift) over a (BLOCK_P output pixels) x (BLOCK_C channels) tile; with POOL, the 2x2
    max-pool (floor) of it, NaN-propagating like ``nn.MaxPool2d``; with FULL (and POOL) also the normalized map
    itself into ``full_ptr`` (contiguous NHWC), every pixel of it: the windows then cover the map (ceil), and a
    window past the floor-mode pooled map's edge (an odd size's last row or column) stores its full pixels only.

    Grid: (cdiv(batch * out_h * out_w, BLOCK_P), cdiv(channels, BLOCK_C)). Memory-bound: one read of z (of the
    pooled windows), one write (two with FULL); scale and shift are gathered per pixel's image from a table of N x C
    floats.
    """
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    ox = offs_p % out_w
    oy = (offs_p // out_w) % out_h
    img = offs_p // (out_w * out_h)
    p_mask = img < batch
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < channels
    mask = p_mask[:, None] & c_mask[None, :]
    table = img.to(tl.int64)[:, None] * channels + offs_c[None, :]
    scale = tl.load(scale_ptr + table, mask=mask, other=0.0)
    shift = tl.load(shift_ptr + table, mask=mask, other=0.0)
    col = offs_c.to(tl.int64)[None, :] * stride_zc
    acc_t: tl.constexpr = acc_type(y_ptr.dtype.element_ty)
    if POOL:
        result = tl.zeros((BLOCK_P, BLOCK_C), dtype=acc_t)
        has_nan = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.int1)
        for corner in tl.static_range(4):
            iy = 2 * oy + corner // 2
            ix = 2 * ox + corner % 2
            src = pixel_offset(img, iy, ix, stride_zn, stride_zh, stride_zw)
            if FULL:
                inside = mask & ((iy < height) & (ix < width))[:, None]
            else:
                inside = mask
            z = tl.load(z_ptr + src[:, None] + col, mask=inside, other=0.0)
            v = normalize(z, scale, shift, slopes_ptr, offs_c, c_mask, slope, lo, hi, ACT)
            # The max of the values as the map would store them (rounded once), as pooling a stored map does.
            stored = to_storage(v, y_ptr.dtype.element_ty, INTERPRETER)
            if FULL:
                at = ((img.to(tl.int64) * height + iy) * width + ix) * channels
                tl.store(full_ptr + at[:, None] + offs_c[None, :], stored, mask=inside)
            v = stored.to(acc_t)
            if corner == 0:
                result = v
            else:
                result = tl.where(v > result, v, result)
            has_nan = has_nan | (v != v)
        result = tl.where(has_nan, float("nan"), result)
        if FULL:  # the floor-mode pooled map's windows only
            mask = mask & ((oy < height // 2) & (ox < width // 2))[:, None]
    else:
        z = tl.load(z_ptr + pixel_offset(img, oy, ox, stride_zn, stride_zh, stride_zw)[:, None] + col, mask=mask)
        result = normalize(z, scale, shift, slopes_ptr, offs_c, c_mask, slope, lo, hi, ACT)
    out = to_storage(result, y_ptr.dtype.element_ty, INTERPRETER)
    dst = pixel_offset(img, oy, ox, stride_yn, stride_yh, stride_yw)
    tl.store(y_ptr + dst[:, None] + offs_c.to(tl.int64)[None, :] * stride_yc, out, mask=mask)


def normalize_nhwc(
    z: torch.Tensor, norm_in: NormIn, pool: bool = False, *, full: bool = False, name: str = "normalize"
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``act(z * scale + shift)`` of an (N, H, W, C) view as a contiguous NHWC map in z's dtype; with ``pool``, its
    2x2 max-pool (floor mode, like ``nn.MaxPool2d(2)``): a norm and activation followed by a max-pool, in one
    memory-bound pass over ``z``. ``full`` (with ``pool``): returns ``(normalized map, pooled map)`` from that one
    pass, e.g. an encoder's skip map read by a decoder conv and pooled for the next level."""
    if z.dim() != 4:
        raise ValueError(f"normalize_nhwc input: expected a 4-D (N, H, W, C) view, got shape {tuple(z.shape)}")
    if full and not pool:
        raise ValueError("normalize_nhwc: full=True returns the normalized map next to the pooled one; it needs pool")
    check_runnable(z, "normalize_nhwc input")
    norm_in.check(z, "normalize_nhwc")
    batch, height, width, channels = z.shape
    out_h, out_w = (height // 2, width // 2) if pool else (height, width)
    # FULL: the windows cover the whole map (ceil), the pooled map keeps floor mode's.
    grid_h, grid_w = ((height + 1) // 2, (width + 1) // 2) if full else (out_h, out_w)
    pixels = batch * grid_h * grid_w
    if pixels + 1024 >= 2**31:
        raise ValueError(f"at most 2**31 - 1025 output pixels per launch, got {pixels}")
    y = alloc((batch, out_h, out_w, channels), z.dtype, z.device)
    whole = alloc((batch, height, width, channels), z.dtype, z.device) if full else y
    if pixels == 0 or channels == 0:
        return (whole, y) if full else y
    block_c = min(64, max(16, next_pow2(channels)))
    block_p = max(16, (2048 if pool else 8192) // block_c)
    grid = (triton.cdiv(pixels, block_p), triton.cdiv(channels, block_c))
    args = (z, y, whole, *norm_in.args(norm_in.scale), batch, grid_h, grid_w, channels, height, width, *z.stride(),
            *y.stride())  # fmt: skip
    constexprs = {"ACT": ACTIVATIONS[norm_in.activation].value, "POOL": pool, "FULL": full, "INTERPRETER": INTERPRET,
                  "BLOCK_P": block_p, "BLOCK_C": block_c}  # fmt: skip
    if recording():
        read = batch * (height if full else 2 * out_h) * (width if full else 2 * out_w) if pool else pixels
        read *= channels * z.element_size()
        written = (y.numel() + (whole.numel() if full else 0)) * y.element_size()
        record_launch(
            LaunchRecord(
                name=name + ("+pool" if pool else "") + ("+full" if full else ""),
                kernel=_normalize_nhwc_kernel,
                grid=grid,
                flops=0,
                bytes_read=read + 2 * norm_in.scale.numel() * norm_in.scale.element_size(),
                bytes_written=written,
                args=args,
                constexprs=constexprs,
                launch_options={"num_warps": 4, "num_stages": 1},
            )
        )
    if not is_dry_run():
        with launch_guard(z):
            _normalize_nhwc_kernel[grid](*args, **constexprs, num_warps=4, num_stages=1)
    return (whole, y) if full else y


def partial_moments(z: torch.Tensor, block_m: int = 128, *, name: str = "partial_moments"):
    """Per-tile (mean, M2, count) of an (N, H, W, C) map: tiles of ``block_m`` consecutive pixels (row-major) of one
    image. Returns ``mean`` and ``M2`` as fp32 (N, tiles, C) and ``count`` as fp32 (N, tiles); fp64 for a float64
    map."""
    if z.dim() != 4:
        raise ValueError(f"partial_moments input: expected a 4-D (N, H, W, C) view, got shape {tuple(z.shape)}")
    check_runnable(z, "partial_moments input")
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    batch, height, width, channels = z.shape
    pixels = height * width
    tiles = triton.cdiv(pixels, block_m)
    stat = stat_dtype(z.dtype)
    mean = alloc((batch, tiles, channels), stat, z.device)
    m2 = alloc((batch, tiles, channels), stat, z.device)
    count = alloc((batch, tiles), stat, z.device)
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
                bytes_written=(2 * mean.numel() + count.numel()) * mean.element_size(),
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
    over_batch: bool = False,
    stats: bool = False,
    name: str = "norm_scale_shift",
) -> tuple[torch.Tensor, ...]:
    """Per-(image, channel) ``scale`` and ``shift`` (N, C) in the partials' dtype (fp32; fp64 for a float64 map's) from
    tile partials (see :func:`partial_moments`):
    ``groups`` channel groups share statistics (``groups == C``: InstanceNorm; ``weight``/``bias``: the norm's
    affine parameters, both or neither), so that ``z * scale + shift`` is the normalized map. ``over_batch``: a
    group's statistics span every image (BatchNorm with batch statistics). ``stats``: also return the (N, C) mean
    and biased variance of each channel's group: ``(scale, shift, mean, var)``."""
    if mean.dim() != 3 or m2.shape != mean.shape or count.shape != mean.shape[:2]:
        raise ValueError(
            "norm_scale_shift: expected mean and M2 of shape (N, tiles, C) and count of shape (N, tiles), got "
            f"{tuple(mean.shape)}, {tuple(m2.shape)} and {tuple(count.shape)}"
        )
    if mean.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"norm_scale_shift: mean must be float32 (float64 for a float64 map), got {mean.dtype}")
    for t, what in ((mean, "mean"), (m2, "M2"), (count, "count")):
        if t.dtype != mean.dtype or not t.is_contiguous():
            raise ValueError(
                f"norm_scale_shift: {what} must be contiguous {str(mean.dtype).removeprefix('torch.')}, got {t.dtype}"
            )
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
    scale = alloc((batch, channels), mean.dtype, mean.device)
    shift = alloc((batch, channels), mean.dtype, mean.device)
    stat_mean = alloc((batch, channels), mean.dtype, mean.device) if stats else scale
    stat_var = alloc((batch, channels), mean.dtype, mean.device) if stats else shift
    outputs = (scale, shift, stat_mean, stat_var) if stats else (scale, shift)
    if batch * channels == 0:
        return outputs
    block_g = next_pow2(group_size)
    block_t = max(1, min(next_pow2(tiles), 4096 // block_g))
    affine = weight is not None
    weight = weight.contiguous() if affine else mean
    bias = bias.contiguous() if affine else mean
    grid = (batch, groups)
    args = (mean, m2, count, weight, bias, scale, shift, stat_mean, stat_var, tiles, channels, group_size, float(eps))
    constexprs = {
        "HAS_AFFINE": affine,
        "OVER_BATCH": bool(over_batch),
        "WRITE_STATS": bool(stats),
        "BLOCK_T": block_t,
        "BLOCK_G": block_g,
    }
    if recording():
        record_launch(
            LaunchRecord(
                name=name,
                kernel=_norm_scale_shift_kernel,
                grid=grid,
                flops=0,
                bytes_read=(2 * mean.numel() + count.numel()) * mean.element_size() * (batch if over_batch else 1),
                bytes_written=len(outputs) * scale.numel() * scale.element_size(),
                args=args,
                constexprs=constexprs,
                launch_options={"num_warps": 4, "num_stages": 1},
            )
        )
    if not is_dry_run():
        with launch_guard(mean):
            _norm_scale_shift_kernel[grid](*args, **constexprs, num_warps=4, num_stages=1)
    return outputs


__all__ = ["NormIn", "NormSpec", "norm_scale_shift", "normalize", "normalize_nhwc", "partial_moments", "tile_moments"]
