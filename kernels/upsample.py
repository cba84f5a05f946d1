"""2x upsampling of an NHWC map (nearest, or bilinear with either ``align_corners``), written once per decoder level.

The decoder's first conv reads ``cat([skip, upsample(low)])``. Blending four corners per element and per tap inside
the conv's loader made that loop issue-bound (four gathers and a blend for each of the nine taps: 935-954 SASS
instructions per K-step on sm_90, 3.7-7.3x the tensor-core time). Producing the upsampled map once here costs one
memory-bound launch per level (read the low map, write the 4x larger map once, read it once more in the conv),
after which the conv's second source is an ordinary map read like the skip.

Numerics follow ``F.interpolate(scale_factor=2)``: the source coordinate of an output pixel is computed in fp32,
the corners are blended in fp32, and the result is rounded once to the storage dtype. Nearest is a bit-exact copy.

The pixel-shuffle modes finish MONAI's subpixel upsampling after its conv (an ordinary conv launch at low
resolution, whose output channels the plan orders sub-pixel-major: channel ``(i * 2 + j) * C + c`` is
``pixel_shuffle``'s ``c * 4 + i * 2 + j``, so each sub-pixel's channels are one contiguous vector):
``"pixelshuffle"`` is the depth-to-space copy (bit-exact), ``"pixelshuffle_blur"`` also zero-pads it by one row
and column at the top and left and averages 2x2 windows with stride 1 (four neighbours summed in fp32 in
``avg_pool2d``'s order, scaled by 1/4, rounded once). Why a mode here rather than a depth-to-space store in the
conv: the blur needs neighbours that other conv tiles write (a second pass whatever the conv stores), and the
conv kernel's depth-to-space store serializes its wgmma pipeline at 128-wide tiles, which a 3x3 conv (nine
times the transposed conv's K) should not pay.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from fastunet.kernels._common import (
    ACTIVATIONS,
    INTERPRET,
    LaunchCache,
    LaunchRecord,
    acc_type,
    alloc,
    check_runnable,
    is_dry_run,
    launch_guard,
    next_pow2,
    pixel_offset,
    record_launch,
    recording,
    tensor_meta,
    to_storage,
)
from fastunet.kernels.stats import NormIn, normalize

# Kernel modes: constexpr globals, so the kernel compares names, not numbers.
NEAREST = tl.constexpr(0)
BILINEAR = tl.constexpr(1)
BILINEAR_ALIGN_CORNERS = tl.constexpr(2)
PIXEL_SHUFFLE = tl.constexpr(3)
PIXEL_SHUFFLE_BLUR = tl.constexpr(4)
# The interpolations (what the conv's loader may take as a second source's up_mode), and the pixel shuffles.
MODES = ("nearest", "bilinear")
SHUFFLE_MODES = ("pixelshuffle", "pixelshuffle_blur")


@triton.jit
def _upsample_source(dst, scale, size, MODE: tl.constexpr, ACC: tl.constexpr):
    """Lower source index, upper source index and the upper one's weight for output coordinate ``dst``, computed in
    ``ACC`` (fp32; fp64 for float64 maps, which run under the interpreter only: there ``scale`` stays the launcher's
    Python float, so the align-corners step is not rounded to fp32)."""
    if MODE == BILINEAR:
        src = tl.maximum((dst.to(ACC) + 0.5) * scale - 0.5, 0.0)
    else:
        src = dst.to(ACC) * scale
    low = tl.minimum(src.to(tl.int32), size - 1)
    high = tl.minimum(low + 1, size - 1)
    return low, high, src - low.to(ACC)


@triton.jit
def _blend_row(x_ptr, row_base, x0, x1, lx, col_x, c_mask, scale, shift, slopes_ptr, offs_c, in_slope, in_lo, in_hi,
               stride_xw, NORM_IN: tl.constexpr, IN_ACT: tl.constexpr, EVEN_C: tl.constexpr,
               ACC: tl.constexpr):  # fmt: skip
    """One source row's horizontal blend ``(1 - lx) * v[x0] + lx * v[x1]`` in ``ACC`` (normalized and activated
    first with ``NORM_IN``); ``row_base`` the row's element offset. Every corner lies in the map, past-the-row lanes'
    too (clamped source indices; their values are never stored): only channels past the map's need a mask, and none
    does where the blocks cover them exactly."""
    left = x_ptr + (row_base + x0.to(tl.int64) * stride_xw)[:, None] + col_x
    right = x_ptr + (row_base + x1.to(tl.int64) * stride_xw)[:, None] + col_x
    if EVEN_C:
        v0 = tl.load(left)
        v1 = tl.load(right)
    else:
        v0 = tl.load(left, mask=c_mask[None, :])
        v1 = tl.load(right, mask=c_mask[None, :])
    if NORM_IN:
        v0 = normalize(v0, scale, shift, slopes_ptr, offs_c, c_mask, in_slope, in_lo, in_hi, IN_ACT)
        v1 = normalize(v1, scale, shift, slopes_ptr, offs_c, c_mask, in_slope, in_lo, in_hi, IN_ACT)
    return (1.0 - lx) * v0.to(ACC) + lx * v1.to(ACC)


@triton.jit
def _shuffled(x_ptr, img, y, x, offs_c, channels, valid, stride_xn, stride_xh, stride_xw, stride_xc):
    """Element (y, x) of the pixel-shuffled map, channels ``offs_c``, as fp32 (fp64 for a float64 map; 0 where
    ``valid`` is false): low pixel (y // 2, x // 2), sub-pixel channel block ``(y % 2) * 2 + x % 2``."""
    sub = (y % 2) * 2 + x % 2
    base = (
        pixel_offset(img, y // 2, x // 2, stride_xn, stride_xh, stride_xw) + (sub * channels).to(tl.int64) * stride_xc
    )
    ptrs = x_ptr + base[:, None] + offs_c.to(tl.int64)[None, :] * stride_xc
    return tl.load(ptrs, mask=valid[:, None] & (offs_c < channels)[None, :], other=0.0).to(
        acc_type(x_ptr.dtype.element_ty)
    )


@triton.jit
def _upsample2x_nhwc_kernel(
    x_ptr,  # (batch, low_h, low_w, channels), or (batch, low_h, low_w, 4 channels) for a pixel shuffle
    y_ptr,  # (batch, 2 low_h, 2 low_w, channels)
    batch,
    low_h,
    low_w,
    channels,
    scale_h,
    scale_w,
    stride_xn,
    stride_xh,
    stride_xw,
    stride_xc,
    stride_yn,
    stride_yh,
    stride_yw,
    stride_yc,
    scale_ptr,  # NORM_IN: (batch, channels) fp32; x is a pre-norm map read as act(x * scale + shift)
    shift_ptr,
    slopes_ptr,  # NORM_IN: (channels,) PReLU slopes of the activation after the norm
    in_slope,
    in_lo,
    in_hi,
    MODE: tl.constexpr,
    NORM_IN: tl.constexpr,
    IN_ACT: tl.constexpr,
    INTERPRETER: tl.constexpr,
    EVEN_C: tl.constexpr,  # channels % BLOCK_C == 0
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """y[n, oy, ox, c] = upsample(x)[n, oy, ox, c] over a (BLOCK_P output pixels of one row) x (BLOCK_C channels)
    tile.

    Grid: (batch * rows * cdiv(2 low_w, BLOCK_P), cdiv(channels, BLOCK_C)), ``rows`` the 2 low_h output rows
    (nearest, the pixel shuffles) or the cdiv(low_h, 2) groups of four output rows (bilinear): a program's pixels lie
    in one output row (or row group), so its image, rows and source rows are scalars (worked out once, not per pixel
    and per lane) and only the columns vary. Channels are the contiguous axis of both maps, so each corner is one
    vector load per pixel. ``NORM_IN`` (nearest and bilinear): each value read is normalized and activated in fp32
    first (the image's scale and shift), so the map upsampled is the normalized one.
    """
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    out_h = 2 * low_h
    out_w = 2 * low_w
    row_blocks = tl.cdiv(out_w, BLOCK_P)
    # Bilinear (either align_corners): a program makes four output rows from four source-row blends.
    ROW_PAIRS: tl.constexpr = MODE == BILINEAR or MODE == BILINEAR_ALIGN_CORNERS
    if ROW_PAIRS:
        # Bilinear: source rows i0 - 1 .. i0 + 2 around a group of two source rows i0, i0 + 1 make its four output
        # rows 2 i0 .. 2 i0 + 3.
        groups = tl.cdiv(low_h, 2)
        row = pid_p // row_blocks  # image * groups + group
        img = row // groups
        oy = 2 * 2 * (row % groups)  # the group's first output row, 2 i0
    else:
        row = pid_p // row_blocks  # image * out_h + oy
        oy = row % out_h
        img = row // out_h
    ox = (pid_p % row_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = ox < out_w
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = p_mask[:, None] & (offs_c < channels)[None, :]
    col_x = offs_c.to(tl.int64)[None, :] * stride_xc
    c_mask = offs_c < channels
    if NORM_IN:
        table = img.to(tl.int64) * channels + offs_c
        scale = tl.load(scale_ptr + table, mask=c_mask, other=0.0)[None, :]
        shift = tl.load(shift_ptr + table, mask=c_mask, other=0.0)[None, :]
    else:
        scale = 0.0
        shift = 0.0
    if MODE == NEAREST:
        src = pixel_offset(img, oy // 2, ox // 2, stride_xn, stride_xh, stride_xw)
        out = tl.load(x_ptr + src[:, None] + col_x, mask=mask, other=0.0)
        if NORM_IN:
            out = normalize(out, scale, shift, slopes_ptr, offs_c, c_mask, in_slope, in_lo, in_hi, IN_ACT)
            out = to_storage(out, y_ptr.dtype.element_ty, INTERPRETER)
    elif MODE == PIXEL_SHUFFLE:
        sub = (oy % 2) * 2 + ox % 2
        src = pixel_offset(img, oy // 2, ox // 2, stride_xn, stride_xh, stride_xw)
        src += (sub * channels).to(tl.int64) * stride_xc
        out = tl.load(x_ptr + src[:, None] + col_x, mask=mask, other=0.0)
    elif MODE == PIXEL_SHUFFLE_BLUR:
        # avg_pool2d(pad(t, [1, 0, 1, 0]), 2, stride=1): the window (oy-1..oy, ox-1..ox), zeros above and left.
        # A row test made a vector before it meets one (some interpreters refuse a mask of a vector and a scalar).
        up_row = p_mask & ((tl.zeros_like(ox) + oy) > 0)
        left = p_mask & (ox > 0)
        total = _shuffled(x_ptr, img, oy - 1, ox - 1, offs_c, channels, up_row & left, stride_xn, stride_xh,
                          stride_xw, stride_xc)  # fmt: skip
        total += _shuffled(x_ptr, img, oy - 1, ox, offs_c, channels, up_row, stride_xn, stride_xh, stride_xw,
                           stride_xc)  # fmt: skip
        total += _shuffled(x_ptr, img, oy, ox - 1, offs_c, channels, left, stride_xn, stride_xh, stride_xw, stride_xc)
        total += _shuffled(x_ptr, img, oy, ox, offs_c, channels, p_mask, stride_xn, stride_xh, stride_xw, stride_xc)
        out = to_storage(total * 0.25, y_ptr.dtype.element_ty, INTERPRETER)
    else:  # bilinear, either align_corners: ROW_PAIRS
        acc_t: tl.constexpr = acc_type(y_ptr.dtype.element_ty)
        x0, x1, lx = _upsample_source(ox, scale_w, low_w, MODE, acc_t)
        lx = lx[:, None]
        i0 = oy // 2
        image = img.to(tl.int64) * stride_xn
        args = (x0, x1, lx, col_x, c_mask, scale, shift, slopes_ptr, offs_c, in_slope, in_lo, in_hi, stride_xw)
        # The blends of source rows i0 - 1, i0, i0 + 1, i0 + 2, clamped to the map: output row 2 i reads rows
        # (i - 1, i) (rows (0, 1) for i = 0), row 2 i + 1 rows (i, i + 1), the last row standing in for i + 1 past it,
        # as _upsample_source computes them in either mode (without align_corners every source coordinate is exact
        # in fp32; with it, fp32 keeps src(2 i) below i and src(2 i + 1) at or above it, the property the adjoint's
        # candidates rest on, see fastunet.kernels.backward._bilinear_weight); each output row's weight comes from
        # _upsample_source too.
        h0 = _blend_row(x_ptr, image + tl.maximum(i0 - 1, 0).to(tl.int64) * stride_xh, *args, NORM_IN, IN_ACT, EVEN_C,
                        acc_t)  # fmt: skip
        h1 = _blend_row(x_ptr, image + i0.to(tl.int64) * stride_xh, *args, NORM_IN, IN_ACT, EVEN_C, acc_t)
        h2 = _blend_row(x_ptr, image + tl.minimum(i0 + 1, low_h - 1).to(tl.int64) * stride_xh, *args, NORM_IN,
                        IN_ACT, EVEN_C, acc_t)  # fmt: skip
        h3 = _blend_row(x_ptr, image + tl.minimum(i0 + 2, low_h - 1).to(tl.int64) * stride_xh, *args, NORM_IN,
                        IN_ACT, EVEN_C, acc_t)  # fmt: skip
        out_cols = offs_c.to(tl.int64)[None, :] * stride_yc
        for k in tl.static_range(4):
            row_y = oy + k
            _, _, ly = _upsample_source(row_y, scale_h, low_h, MODE, acc_t)
            if k == 0:
                top = h0
                bottom = tl.where(i0 == 0, h2, h1)
            elif k == 3:
                top = h2
                bottom = h3
            else:
                top = h1
                bottom = h2
            value = to_storage((1.0 - ly) * top + ly * bottom, y_ptr.dtype.element_ty, INTERPRETER)
            dst = pixel_offset(img, row_y, ox, stride_yn, stride_yh, stride_yw)
            row_ok = (tl.zeros_like(ox) + row_y) < out_h  # a vector (see up_row above)
            tl.store(y_ptr + dst[:, None] + out_cols, value, mask=mask & row_ok[:, None])
    if not ROW_PAIRS:
        dst = pixel_offset(img, oy, ox, stride_yn, stride_yh, stride_yw)
        tl.store(y_ptr + dst[:, None] + offs_c.to(tl.int64)[None, :] * stride_yc, out, mask=mask)


def upsample2x_nhwc(
    x: torch.Tensor,
    mode: str,
    align_corners: bool = False,
    *,
    name: str = "upsample2x",
    norm_in: NormIn | None = None,
) -> torch.Tensor:
    """2x upsampling of an (N, h, w, C) view, like ``F.interpolate(scale_factor=2, mode=mode)`` on NCHW; or the
    pixel shuffle of an (N, h, w, 4 C) view whose channel ``(i * 2 + j) * C + c`` goes to output pixel
    ``(2 y + i, 2 x + j)``, channel ``c`` (see the module's docstring; ``_blur``: then the 2x2 average).

    Args:
        x: (N, h, w, C) view (4 C channels for the pixel shuffles), any strides.
        mode: ``"nearest"``, ``"bilinear"``, ``"pixelshuffle"`` or ``"pixelshuffle_blur"``.
        align_corners: bilinear only, as in ``F.interpolate``.
        norm_in: nearest and bilinear: x is a stored pre-norm map; the map upsampled is ``act(x * scale + shift)``
            (see :class:`~fastunet.kernels.stats.NormIn`).

    Returns:
        (N, 2h, 2w, C) contiguous NHWC tensor in ``x``'s dtype.

    What a launch comes to for a signature (sizes, strides, dtype, device, the arguments) is derived once and reused
    (:class:`~fastunet.kernels._common.LaunchCache`); each call checks that ``x`` can run in the current mode.
    """
    try:
        key = (tensor_meta(x), mode, align_corners, name, norm_in.signature() if norm_in is not None else None,
               INTERPRET)  # fmt: skip
    except (AttributeError, RuntimeError):  # not a tensor, or one without storage: validated and derived anew
        key = None
    launch = _UPSAMPLE_LAUNCHES.get(key) if key is not None else None
    if launch is None:
        launch = _prepare_upsample(x, mode, align_corners, name, norm_in)
        if key is not None:
            _UPSAMPLE_LAUNCHES.put(key, launch)
    else:
        check_runnable(x, "upsample2x_nhwc input")
    y = alloc(launch.out_shape, x.dtype, x.device)
    if launch.empty:  # nothing to write: no launch, like the conv launcher
        return y
    in_args = norm_in.args(x) if norm_in is not None else (x, x, x, 0.0, 0.0, 0.0)
    args = (x, y, *launch.sizes, *x.stride(), *y.stride(), *in_args)
    if recording():
        record_launch(
            LaunchRecord(
                name=launch.name,
                kernel=_upsample2x_nhwc_kernel,
                grid=launch.grid,
                flops=0,  # data movement: the network's FLOPs count the convolutions, like the eager estimate
                bytes_read=x.numel() * x.element_size()
                + (2 * norm_in.scale.numel() * norm_in.scale.element_size() if norm_in else 0),
                bytes_written=y.numel() * y.element_size(),
                args=args,
                constexprs=dict(launch.constexprs),
                launch_options={"num_warps": 4, "num_stages": 1},
            )
        )
    if not is_dry_run():
        with launch_guard(x):
            _upsample2x_nhwc_kernel[launch.grid](*args, **launch.constexprs, num_warps=4, num_stages=1)
    return y


@dataclasses.dataclass(frozen=True)
class _UpsampleLaunch:
    """What an upsample launch comes to for one signature: the output's shape, the kernel's size and scale arguments,
    grid and constexprs (shared by every launch of the signature: never mutated), the record's name."""

    out_shape: tuple[int, int, int, int]
    empty: bool  # nothing to write: no launch
    sizes: tuple  # batch, low_h, low_w, channels, scale_h, scale_w
    grid: tuple[int, int]
    constexprs: dict
    name: str


_UPSAMPLE_LAUNCHES = LaunchCache(maxsize=256)


def _prepare_upsample(
    x: torch.Tensor, mode: str, align_corners: bool, name: str, norm_in: NormIn | None
) -> _UpsampleLaunch:
    """Validate an :func:`upsample2x_nhwc` call (every check, in order) and derive its launch."""
    if x.dim() != 4:
        raise ValueError(f"upsample2x_nhwc input: expected a 4-D (N, H, W, C) view, got shape {tuple(x.shape)}")
    check_runnable(x, "upsample2x_nhwc input")
    if mode not in MODES + SHUFFLE_MODES:
        raise ValueError(f"mode must be one of {list(MODES + SHUFFLE_MODES)}, got {mode!r}")
    if align_corners and mode != "bilinear":
        raise ValueError("align_corners only applies to bilinear upsampling")
    if norm_in is not None:
        if mode in SHUFFLE_MODES:
            raise ValueError(f"normalize-on-load applies to nearest and bilinear upsampling, got mode {mode!r}")
        norm_in.check(x, "upsample2x_nhwc input")
    batch, low_h, low_w, channels = x.shape
    if mode in SHUFFLE_MODES:
        if channels % 4:
            raise ValueError(f"a 2x pixel shuffle needs a multiple of 4 channels, got {channels}")
        channels //= 4
    pixels = batch * 4 * low_h * low_w
    if pixels + 1024 >= 2**31:
        raise ValueError(f"at most 2**31 - 1025 output pixels per launch, got {pixels}")
    if mode == "nearest":
        kernel_mode, scale_h, scale_w = NEAREST.value, 0.5, 0.5
    elif mode in SHUFFLE_MODES:
        kernel_mode = (PIXEL_SHUFFLE if mode == "pixelshuffle" else PIXEL_SHUFFLE_BLUR).value
        scale_h = scale_w = 0.5
    elif align_corners:
        kernel_mode = BILINEAR_ALIGN_CORNERS.value
        scale_h = (low_h - 1) / (2 * low_h - 1) if low_h > 1 else 0.0
        scale_w = (low_w - 1) / (2 * low_w - 1) if low_w > 1 else 0.0
    else:
        kernel_mode, scale_h, scale_w = BILINEAR.value, 0.5, 0.5
    block_c = min(64, max(16, next_pow2(channels)))
    # Bilinear: a program makes output rows 2 i0 .. 2 i0 + 3 from the blends of four source rows (each source row
    # blended once for every two output rows instead of twice for each).
    row_pairs = kernel_mode in (BILINEAR.value, BILINEAR_ALIGN_CORNERS.value)
    # About 8K output elements a program (enough bytes in flight per SM for a memory-bound copy): pixels of one
    # output row, a quarter as many a row for four rows (the four fp32 blends live at once: 128 pixels spill).
    block_p = max(16, min(8192 // (4 if row_pairs else 1) // block_c, next_pow2(2 * low_w)))
    rows = batch * (triton.cdiv(low_h, 2) if row_pairs else 2 * low_h)
    grid = (rows * triton.cdiv(2 * low_w, block_p), triton.cdiv(channels, block_c))
    constexprs = {
        "MODE": kernel_mode,
        "NORM_IN": norm_in is not None,
        "IN_ACT": ACTIVATIONS[norm_in.activation].value if norm_in is not None else 0,
        "INTERPRETER": INTERPRET,
        "EVEN_C": channels % block_c == 0,
        "BLOCK_P": block_p,
        "BLOCK_C": block_c,
    }
    return _UpsampleLaunch(
        (batch, 2 * low_h, 2 * low_w, channels),
        pixels == 0 or channels == 0,
        (batch, low_h, low_w, channels, scale_h, scale_w),
        grid,
        constexprs,
        name + ("+norm_in" if norm_in is not None else ""),
    )


__all__ = ["MODES", "SHUFFLE_MODES", "upsample2x_nhwc"]
