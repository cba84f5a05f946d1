"""Implicit-GEMM convolution over NHWC maps, with the U-Net's neighbouring stages fused into it.

One kernel serves every convolution of the network; constexpr flags select the fused work:

* loader: one source, or the decoder's two sources (``TWO_SOURCES``): channels ``[0, c_main)`` from the skip map
  and ``[c_main, c_main + c_up)`` from the upsampled map (a transposed-conv output, or the nearest/bilinear map that
  :mod:`fastunet.kernels.upsample` writes once per level), with the centered zero padding of odd sizes as a loader
  offset. The concatenated tensor is never materialized. Both sources run the same flat (tap, channel block)
  loop, whose per-pixel address work is hoisted out of it (:func:`_accumulate_source`). How the two maps meet
  (``join``): the upsampled map zero-padded, centered (``pad_top``/``pad_left``); padded at the bottom/right by
  repeating its last row and column (``CLAMP_UP``: its coordinates clamped in the loop); or the skip read through a
  centered crop (``crop_top``/``crop_left``: a base offset). A conv with padding 0 (a valid conv) reads its input
  at a constant +1 offset (``conv_off``) and writes an output two rows and columns smaller. The one even kernel,
  2x2 with stride 2 and padding 0 (the transposed conv's input gradient), reads taps at offsets -1 and 0 from
  ``2 o + conv_off`` (``conv_off`` 1): rows and columns ``2 o`` and ``2 o + 1``, each output pixel's own 2x2 block.
* ``PACKED_K``: small-channel path (the network's first conv, ``c_in=3``): K runs over the flattened
  (tap, channel) axis so that 27 useful products fill one 32-wide K block instead of nine mostly empty ones.
* epilogue: bias, the activation (``ACT``: ReLU, LeakyReLU, PReLU with per-channel slopes, SiLU, a clamp to
  ``[lo, hi]`` as in ReLU6/Hardtanh, or none; NaN and infinities as torch's), store; the 2x2 max-pooled map
  (``POOL``, of the activated map); the 1x1 head (``HEAD``: logits written in the caller's layout; the feature map
  itself is stored too only with ``HEAD == HEAD_MAP``, where a training forward keeps it for the head's weight
  gradient); or a depth-to-space store (``D2S``: a stride-2 2x2 transposed conv is a per-pixel GEMM
  ``c_in -> 4*c_out``).

GEMM view: M = output pixels, N = output channels, K = input channels x taps. The M axis is ordered
window-major: four consecutive rows are one 2x2 pooling window, so the pooled map is a reshape and a max over the
accumulator tile. Rows that fall outside an odd-sized map are masked.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from fastunet.kernels._common import (
    ACT_CLAMP,
    ACT_LEAKY_RELU,
    ACT_NONE,
    ACT_RELU,
    ACTIVATIONS,
    INTERPRET,
    LaunchCache,
    LaunchRecord,
    acc_type,
    activate,
    alloc,
    capability,
    check_runnable,
    choose_config,
    dot_flags,
    element_span,
    is_dry_run,
    launch_environment,
    launch_guard,
    mma,
    next_pow2,
    pixel_offset,
    record_launch,
    recording,
    requested_load_path,
    sm_count,
    stat_dtype,
    tensor_facts,
    tensor_meta,
    to_storage,
)
from fastunet.kernels.stats import NormIn, NormSpec, norm_scale_shift, normalize, tile_moments
from fastunet.kernels.upsample import MODES as UPSAMPLE_MODES
from fastunet.kernels.upsample import upsample2x_nhwc

# The fused head keeps every output channel of one pixel in a single tile, and the logits of its pixels in a
# (BLOCK_M, next_pow2(n_cls)) fp32 accumulator beside the main one: both bounded so the tile stays in registers.
MAX_HEAD_CHANNELS = 128
MAX_HEAD_CLASSES = 64
# Pixels of the narrowest TMA row box: the sm_90 warpgroup MMA takes 64 rows a warpgroup (a 32-row dot falls back to
# the sm_80 MMA). Automatic path choice keeps narrower maps on pointer loads, where a row box would be half padding.
TMA_MIN_ROW = 64
# How the decoder's second source reaches full size: already there (a transposed-conv output), or 2x upsampled.
UP_MODES = ("direct", *UPSAMPLE_MODES)
# How the upsampled map and the skip are brought to one size (see conv2d_nhwc).
JOINS = ("pad", "replicate", "crop")
# Persistent launches number their tiles in groups of this many pixel tiles by every channel tile (_grouped_tile).
PERSISTENT_GROUP_M = tl.constexpr(8)
# The fused head (HEAD): logits only, or the logits and the activated map under them (to pool_ptr's strides).
HEAD_LOGITS = tl.constexpr(1)
HEAD_MAP = tl.constexpr(2)
# The kernel's GRAD_MASK (an input gradient's epilogue): the derivative of a ReLU whose stored output pool_ptr is,
# or the gradient through a normalized read act(z * scale + shift) of the pre-norm map z pool_ptr is; GRAD_NORM_APPLIED
# also writes the values that read gave (the weight gradient's operand) to count_ptr.
GRAD_RELU = tl.constexpr(1)
GRAD_NORM_READ = tl.constexpr(2)
GRAD_NORM_APPLIED = tl.constexpr(3)


@triton.jit
def _tap_bits(y, x, valid, height, width, KSIZE: tl.constexpr):
    """Per pixel, bit ``tap`` set where tap ``tap`` (row-major over the KSIZE x KSIZE window) reads inside the
    (height, width) map: computed once per tile, so the K loop tests one bit instead of four bounds per pixel."""
    pad: tl.constexpr = KSIZE // 2
    bits = tl.zeros(y.shape, dtype=tl.int32)
    for tap in tl.static_range(KSIZE * KSIZE):
        iy = y + (tap // KSIZE - pad)
        ix = x + (tap % KSIZE - pad)
        inside = valid & (iy >= 0) & (iy < height) & (ix >= 0) & (ix < width)
        bits = bits | (inside.to(tl.int32) << tap)
    return bits


@triton.jit
def _split_range(steps, split, SPLIT_K: tl.constexpr):
    """(first, count) of split ``split``'s K-steps out of ``steps``: [split * steps // SPLIT_K, (split + 1) * steps //
    SPLIT_K), a fixed partition, so each partial sum is the same on every run."""
    first = split * steps // SPLIT_K
    return first, (split + 1) * steps // SPLIT_K - first


@triton.jit
def _accumulate_source(
    acc,
    src_ptr,
    w_ptr,
    row_base,  # (BLOCK_M,) int64: element offset of each output pixel's centre tap (CLAMP: of its image) here
    tap_bits,  # (BLOCK_M,) from _tap_bits
    row_y,  # (BLOCK_M,) CLAMP only: each pixel's centre tap in this source, and the source's last row/column
    row_x,
    last_y,
    last_x,
    c_src,
    w_row0,  # first row of this source's channels within a tap's rows of the packed weight
    c_in,
    c_out,
    offs_k,
    offs_n,
    n_mask,
    stride_h,
    stride_w,
    stride_c,
    norm_scale_ptr,  # NORM: (batch, c_src) fp32 scale and shift, the producer's PReLU slopes and scalars
    norm_shift_ptr,
    norm_slopes_ptr,
    norm_slope,
    norm_lo,
    norm_hi,
    norm_img,  # NORM: the tile's image (every row of a NORM tile is in one image)
    split,  # SPLIT_K: this program's part of the (tap, channel block) steps
    phase_y,  # POLYPHASE: the tile's output phase (oy % 2, ox % 2)
    phase_x,
    KSIZE: tl.constexpr,
    EVEN_K: tl.constexpr,
    WIDE: tl.constexpr,
    CLAMP: tl.constexpr,
    NORM: tl.constexpr,
    NORM_ACT: tl.constexpr,
    POLYPHASE: tl.constexpr,
    INTERPRETER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """acc += A_src @ W_src over every (tap, channel block) of one source, as a single flat loop.

    One flat loop is what the software pipeliner overlaps (a tap loop around a one-iteration channel loop would
    not pipeline). Everything that depends on the pixel is computed before the loop (``row_base``, ``tap_bits``);
    inside it the tap and channel block are loop-carried counters (no division), a tap moves every row by one
    scalar offset, and its padding is one bit test per row. Offsets are int32 unless ``WIDE`` (a source or the
    weight spans 2**31 elements or more): 64-bit address arithmetic doubles the loop's integer work.

    ``NORM``: the source is a stored pre-norm map; each element becomes ``act(z * scale + shift)`` (one scale and
    shift vector per K block: the tile is one image's) and then the padding's zero, in fp32, rounded once to the
    operand dtype. The transform sits between the load and the dot, so these loads go through registers.

    ``SPLIT_K`` > 1: only steps [split * S / SPLIT_K, (split + 1) * S / SPLIT_K) of the S steps (see
    :func:`_split_range`).

    ``POLYPHASE`` (the input gradient of a 3x3 stride-2 padding-1 conv, its weight flipped): every pixel of the tile
    has output phase (``phase_y``, ``phase_x``); the gradient at (2 qy + py, 2 qx + px) sums the flipped taps (ty,
    tx) with ``py + ty`` and ``px + tx`` odd, tap (ty, tx) reading the source (``dz``) at (qy + sy, qx + sx), ``s =
    (p + t - 1) / 2`` in {0, 1}: 1, 2, 2 or 4 taps, the multiply-adds the gradient needs and no zero tap, each tap
    still one scalar offset for the whole tile. ``row_base`` and ``tap_bits`` are then those of (qy, qx) in dz.
    """
    pad: tl.constexpr = KSIZE // 2
    offset_type: tl.constexpr = tl.int64 if WIDE else tl.int32
    blocks = tl.cdiv(c_src, BLOCK_K)
    b_offs = offs_k[:, None] * c_out + offs_n[None, :]
    rows = row_base.to(offset_type)
    tap = 0
    c0 = 0
    if POLYPHASE:
        tl.static_assert(KSIZE == 3, "the polyphase input gradient is that of a 3x3 conv")
        tl.static_assert(SPLIT_K == 1, "the polyphase input gradient runs whole tiles")
        # The phase's first tap; ty (tx) steps by 2 through the taps of the right parity.
        ty = 1 - phase_y
        tx = 1 - phase_x
        count = (1 + phase_y) * (1 + phase_x) * blocks
    elif SPLIT_K > 1:
        first, count = _split_range(KSIZE * KSIZE * blocks, split, SPLIT_K)
        tap = first // blocks
        c0 = first % blocks * BLOCK_K
    else:
        count = KSIZE * KSIZE * blocks
    for _ in range(0, count):
        if POLYPHASE:
            sy = (phase_y + ty - 1) // 2
            sx = (phase_x + tx - 1) // 2
            tap = ty * KSIZE + tx
            bit = (sy + pad) * KSIZE + (sx + pad)
            tap_rows = rows + sy.to(offset_type) * stride_h + sx.to(offset_type) * stride_w
        elif CLAMP:
            bit = tap
            yy = tl.minimum(row_y + (tap // KSIZE - pad), last_y).to(offset_type)
            xx = tl.minimum(row_x + (tap % KSIZE - pad), last_x).to(offset_type)
            tap_rows = rows + yy * stride_h + xx * stride_w
        else:
            bit = tap
            shift = (tap // KSIZE - pad).to(offset_type) * stride_h + (tap % KSIZE - pad).to(offset_type) * stride_w
            tap_rows = rows + shift
        inside = ((tap_bits >> bit) & 1) != 0
        a_ptrs = src_ptr + tap_rows[:, None] + (c0 + offs_k).to(offset_type)[None, :] * stride_c
        b_ptrs = w_ptr + (tap * c_in + w_row0 + c0).to(offset_type) * c_out + b_offs
        if EVEN_K:
            keep = inside[:, None]
            a = tl.load(a_ptrs, mask=keep, other=0.0)
            b = tl.load(b_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = (c0 + offs_k) < c_src
            keep = inside[:, None] & k_mask[None, :]
            a = tl.load(a_ptrs, mask=keep, other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if NORM:
            channels = c0 + offs_k
            c_ok = channels < c_src
            table = norm_img.to(tl.int64) * c_src + channels
            scale = tl.load(norm_scale_ptr + table, mask=c_ok, other=0.0)
            shift = tl.load(norm_shift_ptr + table, mask=c_ok, other=0.0)
            v = normalize(a, scale[None, :], shift[None, :], norm_slopes_ptr, channels, c_ok, norm_slope, norm_lo,
                          norm_hi, NORM_ACT)  # fmt: skip
            a = to_storage(tl.where(keep, v, 0.0), src_ptr.dtype.element_ty, INTERPRETER)
        acc = mma(a, b, acc, INTERPRETER, DOT_PRECISION)
        c0 += BLOCK_K
        next_tap = c0 >= c_src
        if POLYPHASE:
            tx += 2 * next_tap.to(tl.int32)
            next_row = tx > 2
            tx = tl.where(next_row, 1 - phase_x, tx)
            ty += 2 * next_row.to(tl.int32)
        else:
            tap += next_tap.to(tl.int32)
        c0 = tl.where(next_tap, 0, c0)
    return acc


@triton.jit
def _accumulate_source_tma(
    acc_top,
    acc_bottom,
    src_desc,  # 4-D (batch, height, width, c_src) descriptor, box (1, 1, BLOCK_W, BLOCK_K)
    w_desc,  # 3-D (taps, c_src, c_out) descriptor over this source's rows of the packed weight, box (1, BLOCK_K, N)
    img,
    y0,  # the tile's first output row and column, in this source's coordinates
    x0,
    n0,
    c_src,
    split,  # SPLIT_K: this program's part of the (tap, channel block) steps
    phase_y,  # POLYPHASE: the tile's output phase (see _accumulate_source)
    phase_x,
    KSIZE: tl.constexpr,
    ROWS: tl.constexpr,
    POLYPHASE: tl.constexpr,
    INTERPRETER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """acc_top (+ acc_bottom) += A_src @ W_src over every (tap, channel block) of one source, loaded by TMA.

    Tap (dy, dx) of output row y is the box at (img, y + dy, x0 + dx, c0): coordinates outside the map (negative
    or past the end) are zero-filled by the hardware, which is the convolution's zero padding, and channels past
    ``c_src`` are zero in both operands (each source has its own weight descriptor), so no mask is computed. Both
    operands stay in shared memory for the wgmma. A 2-row tile takes one row box per row and one accumulator per
    row: a 2-D spatial box reshaped to one operand goes through registers and serializes the wgmma on sm_90.
    ``SPLIT_K`` > 1: only this program's steps (see :func:`_split_range`).

    ``POLYPHASE``: the phase's taps only, as in :func:`_accumulate_source`; (y0, x0) in dz, tap (ty, tx) the box at
    (y0 + sy, x0 + sx), past dz's end zero-filled.
    """
    tl.static_assert(KSIZE % 2 == 1, "row boxes take odd kernels (the 2x2 conv is strided: pointer loads)")
    pad: tl.constexpr = KSIZE // 2
    if POLYPHASE:
        tl.static_assert(KSIZE == 3, "the polyphase input gradient is that of a 3x3 conv")
        tl.static_assert(SPLIT_K == 1, "the polyphase input gradient runs whole tiles")
        c0 = 0
        ty = 1 - phase_y
        tx = 1 - phase_x
        count = (1 + phase_y) * (1 + phase_x) * tl.cdiv(c_src, BLOCK_K)
    elif SPLIT_K > 1:
        blocks = tl.cdiv(c_src, BLOCK_K)
        first, count = _split_range(KSIZE * KSIZE * blocks, split, SPLIT_K)
        tap = first // blocks
        c0 = first % blocks * BLOCK_K
        dy = tap // KSIZE - pad
        dx = tap % KSIZE - pad
    else:
        count = KSIZE * KSIZE * tl.cdiv(c_src, BLOCK_K)
        dy = -pad
        dx = -pad
        tap = 0
        c0 = 0
    for _ in range(0, count):
        if POLYPHASE:
            tap = ty * KSIZE + tx
            dy = (phase_y + ty - 1) // 2
            dx = (phase_x + tx - 1) // 2
        b = w_desc.load([tap, c0, n0]).reshape(BLOCK_K, BLOCK_N)
        a = src_desc.load([img, y0 + dy, x0 + dx, c0]).reshape(BLOCK_W, BLOCK_K)
        acc_top = mma(a, b, acc_top, INTERPRETER, DOT_PRECISION)
        if ROWS == 2:
            a = src_desc.load([img, y0 + 1 + dy, x0 + dx, c0]).reshape(BLOCK_W, BLOCK_K)
            acc_bottom = mma(a, b, acc_bottom, INTERPRETER, DOT_PRECISION)
        c0 += BLOCK_K
        next_tap = c0 >= c_src
        c0 = tl.where(next_tap, 0, c0)
        if POLYPHASE:
            tx += 2 * next_tap.to(tl.int32)
            next_row = tx > 2
            tx = tl.where(next_row, 1 - phase_x, tx)
            ty += 2 * next_row.to(tl.int32)
        else:
            tap += next_tap.to(tl.int32)
            dx += next_tap.to(tl.int32)
            next_row = dx > pad
            dx = tl.where(next_row, -pad, dx)
            dy += next_row.to(tl.int32)
    return acc_top, acc_bottom


@triton.jit
def _window_major(top, bottom):
    """Accumulators of two output rows, (BLOCK_W, N) each, as one (2 BLOCK_W, N) tile ordered like the pointer
    path's: row 4 w + 2 dy + dx is pixel (y0 + dy, x0 + 2 w + dx), so each 2x2 pooling window is 4 rows."""
    block_w: tl.constexpr = top.shape[0]
    block_n: tl.constexpr = top.shape[1]
    both = tl.join(top, bottom)  # (x, n, dy)
    both = tl.reshape(both, (block_w // 2, 2, block_n, 2))  # (window, dx, n, dy)
    both = tl.permute(both, (0, 3, 1, 2))  # (window, dy, dx, n)
    return tl.reshape(both, (2 * block_w, block_n))


@triton.jit
def _grouped_tile(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of persistent work item ``tile``: items run in groups of GROUP_M pixel tiles (fewer in the
    last group), the pixel tile moving fastest inside a group, so consecutive items share a weight slice and
    neighbouring input rows."""
    per_group = GROUP_M * tiles_n
    first_m = tile // per_group * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    inside = tile % per_group
    return first_m + inside % group_m, inside // group_m


@triton.jit
def _relu_derivative(grad, a, INTERPRETER: tl.constexpr):
    """``where(a <= 0, 0, grad)`` (torch's ``threshold_backward``: a NaN ``a`` passes ``grad``): the gradient of a map
    before a ReLU from the gradient after it and the stored output ``a``. Done on the bits, an AND with an all-ones or
    all-zeros mask: as a select on the values, ptxas serializes the conv's wgmma (warning C7514) and splits the
    packed 16-bit conversions of the epilogue. The interpreter cannot bitcast bf16 (numpy has none): a select there,
    the same values. The interpreter also compares a bf16 NaN as neither ``> 0`` nor ``!= itself``: ``a`` is
    compared in fp32 there."""
    if INTERPRETER:
        a = a.to(tl.float32)
    if INTERPRETER and grad.dtype == tl.bfloat16:
        return tl.where(a <= 0, tl.zeros_like(grad), grad)
    bits: tl.constexpr = grad.dtype.primitive_bitwidth
    if bits == 16:
        int_t: tl.constexpr = tl.int16
    elif bits == 32:
        int_t: tl.constexpr = tl.int32
    else:
        int_t: tl.constexpr = tl.int64
    keep = tl.where((a > 0) | (a != a), -1, 0).to(int_t)
    return (grad.to(int_t, bitcast=True) & keep).to(grad.dtype, bitcast=True)


@triton.jit
def _keep(grad, keep, INTERPRETER: tl.constexpr):
    """``where(keep, grad, 0)`` for an fp32 or fp64 ``grad`` (the accumulator), done on the bits like
    :func:`_relu_derivative` (a select on the accumulator's values serializes the conv's wgmma); a select under the
    interpreter, the same values."""
    if INTERPRETER:
        return tl.where(keep, grad, tl.zeros_like(grad))
    if grad.dtype.primitive_bitwidth == 32:
        int_t: tl.constexpr = tl.int32
    else:
        int_t: tl.constexpr = tl.int64
    return (grad.to(int_t, bitcast=True) & tl.where(keep, -1, 0).to(int_t)).to(grad.dtype, bitcast=True)


@triton.jit
def _norm_read_grad(acc, u, scale, normed, valid, slope, lo, hi, ACT: tl.constexpr, INTERPRETER: tl.constexpr):
    """``(dx, g)`` of a map read as ``a = act(u)``, ``u = z * scale + shift``, in its ``normed`` columns, from the
    gradient of ``a`` (``acc``): ``g = act'(u) * acc`` as torch's backward of each activation gives it (ReLU:
    threshold_backward on the result, a NaN ``u`` passing; LeakyReLU: ``u > 0``; clamp: zero where ``u <= lo`` or
    ``u >= hi``), zero in rows past the map, and ``dx = g * scale`` (``acc`` itself in the other columns)."""
    plain = (normed == 0)[None, :]
    keep = valid[:, None]
    if ACT == ACT_RELU:
        keep = keep & ((u > 0) | (u != u) | plain)
    elif ACT == ACT_CLAMP:
        keep = keep & ((((u <= lo) | (u >= hi)) == 0) | plain)
    g = _keep(acc, keep, INTERPRETER)
    if ACT == ACT_LEAKY_RELU:
        g = g * tl.where((u > 0) | plain, 1.0, slope)
    return g * tl.where(normed, scale, 1.0)[None, :], g


@triton.jit
def _norm_read_columns(
    acc, offs, valid, rows_y, rows_z, rows_a, y_ptr, z_ptr, applied_ptr, scale_ptr, shift_ptr, slopes_ptr, g_z_ptr,
    g_ptr, c_out, c_norm, stride_yc, stride_zc, slope, lo, hi, ACT: tl.constexpr, APPLIED: tl.constexpr,
    INTERPRETER: tl.constexpr,
):  # fmt: skip
    """The ``GRAD_NORM_READ`` epilogue (see :func:`_conv_nhwc_kernel`) of the input gradient ``acc`` in columns
    ``offs``, rows ``valid`` at offsets ``rows_y`` of y (``rows_z`` of z, ``rows_a`` of the applied map): z's
    gradient through the read (:func:`_norm_read_grad`) stored in the ``c_norm`` read channels (``acc`` as it is in
    the others), the columns' sums of ``g * z`` and ``g`` to ``g_z_ptr`` and ``g_ptr`` (``scale_ptr``,
    ``shift_ptr``: the tile's image's rows), and with ``APPLIED`` the read's values ``act(u)`` first."""
    normed = offs < c_norm
    z_mask = valid[:, None] & normed[None, :]
    z = tl.load(z_ptr + rows_z[:, None] + offs.to(tl.int64)[None, :] * stride_zc, mask=z_mask, other=0.0)
    z = z.to(acc.dtype)
    scale = tl.load(scale_ptr + offs, mask=normed, other=1.0).to(acc.dtype)
    shift = tl.load(shift_ptr + offs, mask=normed, other=0.0).to(acc.dtype)
    u = z * scale[None, :] + shift[None, :]
    if APPLIED:  # as the normalize launch computes and rounds it
        applied = activate(u, slopes_ptr, offs, normed, slope, lo, hi, ACT)
        a_ptrs = applied_ptr + rows_a[:, None] + offs[None, :]
        tl.store(a_ptrs, to_storage(applied, applied_ptr.dtype.element_ty, INTERPRETER), mask=z_mask)
    dx, g = _norm_read_grad(acc, u, scale, normed, valid, slope, lo, hi, ACT, INTERPRETER)
    y_ptrs = y_ptr + rows_y[:, None] + offs.to(tl.int64)[None, :] * stride_yc
    tl.store(y_ptrs, to_storage(dx, y_ptr.dtype.element_ty, INTERPRETER), mask=valid[:, None] & (offs < c_out)[None, :])
    tl.store(g_z_ptr + offs, tl.sum(g * z, axis=0), mask=normed)
    tl.store(g_ptr + offs, tl.sum(g, axis=0), mask=normed)


@triton.jit
def _conv_tile(
    pid_m,  # the tile: its pixel block (see the kernel's grid), its output-channel block and its part of K
    pid_n,
    pid_k,
    x_ptr,  # (batch, height, width, c_main): the input, or the skip map with TWO_SOURCES
    up_ptr,  # (batch, up_h, up_w, c_up): the upsampled map (TWO_SOURCES)
    w_ptr,  # (KSIZE * KSIZE * (c_main + c_up), c_out): packed weights, row = tap * c_in + channel
    b_ptr,  # (c_out,)
    y_ptr,  # (batch, height, width, c_out), (batch, 2 height, 2 width, c_out / 4) with D2S, or logits with HEAD
    pool_ptr,  # (batch, height // 2, width // 2, c_out); (batch, height, width, c_out) with HEAD == HEAD_MAP or
    # GRAD_MASK (a map laid out like y, see there)
    head_w_ptr,  # (c_out, n_cls)
    head_b_ptr,  # (n_cls,)
    x_desc,  # TMA descriptors of x, up and their rows of the packed weight (TMA_ROWS > 0; None on the pointer path)
    up_desc,
    w_desc,
    w_up_desc,
    slopes_ptr,  # (c_out,): PReLU slopes
    in_scale_ptr,  # (batch, c_main) fp32 (NORM_IN): x is a pre-norm map, read as act(x * scale + shift)
    in_shift_ptr,
    in_slopes_ptr,  # (c_main,): PReLU slopes of the activation after x's norm (NORM_IN)
    mean_ptr,  # (batch * tiles_img, c_out) fp32 (STATS): per-tile mean and M2 of the stored map, per channel
    m2_ptr,
    count_ptr,  # (batch * tiles_img,) fp32 (STATS): valid pixels of each tile
    part_ptr,  # (SPLIT_K, batch, height, width, c_out) fp32, contiguous (SPLIT_K > 1): partial sums
    batch,
    height,  # of the output
    width,
    c_main,
    c_up,
    c_out,
    n_cls,
    in_h,  # the input's frame: x's size, or with a crop join the upsampled map's (the skip is read cropped)
    in_w,
    conv_off,  # input coordinate of an output pixel's centre tap minus its own: KSIZE // 2 - padding
    crop_top,  # where the input's frame starts inside x (crop join)
    crop_left,
    up_h,
    up_w,
    pad_top,  # where the upsampled map starts inside the input's frame (centered zero padding)
    pad_left,
    act_slope,  # LeakyReLU
    act_lo,  # clamp
    act_hi,
    in_slope,  # NORM_IN: the activation after x's norm (LeakyReLU slope, clamp bounds)
    in_lo,
    in_hi,
    tiles_img,  # PER_IMAGE: tiles per image
    stride_xn,
    stride_xh,
    stride_xw,
    stride_xc,
    stride_un,
    stride_uh,
    stride_uw,
    stride_uc,
    stride_yn,
    stride_yh,
    stride_yw,
    stride_yc,
    stride_pn,
    stride_ph,
    stride_pw,
    stride_pc,
    KSIZE: tl.constexpr,
    TWO_SOURCES: tl.constexpr,
    CLAMP_UP: tl.constexpr,
    PACKED_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    WIDE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    POOL: tl.constexpr,
    HEAD: tl.constexpr,
    D2S: tl.constexpr,
    TMA_ROWS: tl.constexpr,
    ROW_W: tl.constexpr,
    STRIDE: tl.constexpr,
    POLYPHASE: tl.constexpr,
    PER_IMAGE: tl.constexpr,
    NORM_IN: tl.constexpr,
    IN_ACT: tl.constexpr,
    STATS: tl.constexpr,
    GRAD_MASK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    INTERPRETER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_CLS: tl.constexpr,
):
    """One output tile of :func:`_conv_nhwc_kernel` (see there), at grid position (``pid_m``, ``pid_n``)."""
    half_h = (height + 1) // 2
    half_w = (width + 1) // 2
    c_in = c_main + c_up
    pad: tl.constexpr = KSIZE // 2
    phase_y = 0
    phase_x = 0
    if POLYPHASE:
        tl.static_assert((TMA_ROWS > 0 or ROW_W > 0) and not (POOL or HEAD or D2S or STATS or TWO_SOURCES))
        phase_y = pid_m % 4 // 2
        phase_x = pid_m % 2
        pid_m = pid_m // 4

    if PER_IMAGE:
        img_t = pid_m // tiles_img
        offs_m = (pid_m % tiles_img) * BLOCK_M + tl.arange(0, BLOCK_M)
        window = offs_m // 4
        img = tl.zeros_like(offs_m) + img_t
        win_y = window // half_w  # past the image's last window: oy >= height, masked below
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        window = offs_m // 4
        img = window // (half_w * half_h)
        win_y = (window // half_w) % half_h
    quad = offs_m % 4
    win_x = window % half_w
    oy = 2 * win_y + quad // 2
    ox = 2 * win_x + quad % 2
    if TMA_ROWS or ROW_W:
        # A tile is `rows` output rows of block_w pixels starting at (img_t, y0, x0); two TMA rows are ordered
        # window-major (see _window_major), so the epilogue below serves both paths.
        block_w: tl.constexpr = BLOCK_M // TMA_ROWS if TMA_ROWS else ROW_W
        rows: tl.constexpr = TMA_ROWS if TMA_ROWS else BLOCK_M // ROW_W
        if POLYPHASE:  # tiles over a phase's lattice
            tiles_x = tl.cdiv(half_w, block_w)
            row_groups = tl.cdiv(half_h, rows)
        else:
            tiles_x = tl.cdiv(width, block_w)
            row_groups = tl.cdiv(height, rows)
        x0 = (pid_m % tiles_x) * block_w
        y0 = (pid_m // tiles_x % row_groups) * rows
        img_t = pid_m // (tiles_x * row_groups)
        local = tl.arange(0, BLOCK_M)
        img = tl.zeros_like(local) + img_t
        if TMA_ROWS == 2:
            oy = y0 + local % 4 // 2
            ox = x0 + 2 * (local // 4) + local % 2
        elif rows == 1:
            oy = tl.zeros_like(local) + y0
            ox = x0 + local
        else:
            oy = y0 + local // block_w
            ox = x0 + local % block_w
    if POLYPHASE:
        # (oy, ox) so far on the phase's lattice: that is where the pixel's taps sit in dz.
        jy = oy
        jx = ox
        oy = 2 * oy + phase_y
        ox = 2 * ox + phase_x
    else:
        # The centre tap in the input's frame.
        jy = STRIDE * oy + conv_off
        jx = STRIDE * ox + conv_off
    m_valid = (img < batch) & (oy < height) & (ox < width)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < c_out
    offs_k = tl.arange(0, BLOCK_K)
    acc_t: tl.constexpr = acc_type(x_ptr.dtype.element_ty)  # fp32; fp64 for float64 maps
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_t)

    if TMA_ROWS:
        block_w_: tl.constexpr = BLOCK_M // TMA_ROWS
        top = tl.zeros((block_w_, BLOCK_N), dtype=acc_t)
        bottom = tl.zeros((block_w_, BLOCK_N), dtype=acc_t)
        n0 = pid_n * BLOCK_N
        top, bottom = _accumulate_source_tma(
            top, bottom, x_desc, w_desc, img_t, y0, x0, n0, c_main, pid_k, phase_y, phase_x,
            KSIZE, TMA_ROWS, POLYPHASE, INTERPRETER, DOT_PRECISION, block_w_, BLOCK_N, BLOCK_K, SPLIT_K,
        )  # fmt: skip
        if TWO_SOURCES:
            # The upsampled map's own coordinates (centered in the skip's frame): out-of-map boxes zero-fill.
            top, bottom = _accumulate_source_tma(
                top, bottom, up_desc, w_up_desc, img_t, y0 - pad_top, x0 - pad_left, n0, c_up, 0, 0, 0,
                KSIZE, TMA_ROWS, False, INTERPRETER, DOT_PRECISION, block_w_, BLOCK_N, BLOCK_K, 1,
            )  # fmt: skip
        if TMA_ROWS == 2:
            acc = _window_major(top, bottom)
        else:
            acc = top
    elif PACKED_K:
        # K = (tap, channel) flattened; PACKED_K is the channel count (< 16), a constant so that splitting K into
        # tap and channel costs no division. An element's offset splits into its pixel's centre offset (per row) plus
        # its tap's shift and channel (per column), and its padding into a per-row tap bitmask tested per column:
        # no per-element coordinate arithmetic.
        k_total: tl.constexpr = KSIZE * KSIZE * PACKED_K
        row_base = pixel_offset(img, jy, jx, stride_xn, stride_xh, stride_xw)
        tap_bits = _tap_bits(jy, jx, m_valid, in_h, in_w, KSIZE)
        for k0 in range(0, k_total, BLOCK_K):
            kk = k0 + offs_k
            k_mask = kk < k_total
            tap = kk // PACKED_K
            ch = kk % PACKED_K
            column = (tap // KSIZE - pad).to(tl.int64) * stride_xh + (tap % KSIZE - pad).to(tl.int64) * stride_xw
            column += ch.to(tl.int64) * stride_xc
            ok = (((tap_bits[:, None] >> tap[None, :]) & 1) != 0) & k_mask[None, :]
            a = tl.load(x_ptr + row_base[:, None] + column[None, :], mask=ok, other=0.0)
            b = tl.load(
                w_ptr + kk[:, None] * c_out + offs_n[None, :], mask=k_mask[:, None] & n_mask[None, :], other=0.0
            )
            acc = mma(a, b, acc, INTERPRETER, DOT_PRECISION)
    else:
        acc = _accumulate_source(
            acc,
            x_ptr,
            w_ptr,
            pixel_offset(img, jy + crop_top, jx + crop_left, stride_xn, stride_xh, stride_xw),
            _tap_bits(jy, jx, m_valid, in_h, in_w, KSIZE),
            jy,
            jx,
            0,
            0,
            c_main,
            0,
            c_in,
            c_out,
            offs_k,
            offs_n,
            n_mask,
            stride_xh,
            stride_xw,
            stride_xc,
            in_scale_ptr,
            in_shift_ptr,
            in_slopes_ptr,
            in_slope,
            in_lo,
            in_hi,
            img_t if PER_IMAGE or ROW_W else 0,
            pid_k,
            phase_y,
            phase_x,
            KSIZE,
            EVEN_K,
            WIDE,
            False,
            NORM_IN,
            IN_ACT,
            POLYPHASE,
            INTERPRETER,
            DOT_PRECISION,
            BLOCK_K,
            SPLIT_K,
        )
        if TWO_SOURCES:
            # The upsampled map's own coordinates: it sits at (pad_top, pad_left) in the input's frame.
            uy = jy - pad_top
            ux = jx - pad_left
            if CLAMP_UP:
                # Replicate join: the frame's zero padding applies, and a row or column past the map repeats its last.
                up_base = img.to(tl.int64) * stride_un
                up_bits = _tap_bits(jy, jx, m_valid, in_h, in_w, KSIZE)
            else:
                up_base = pixel_offset(img, uy, ux, stride_un, stride_uh, stride_uw)
                up_bits = _tap_bits(uy, ux, m_valid, up_h, up_w, KSIZE)
                # A map one row or column larger than the frame (negative pad): the frame's zero padding still holds.
                up_bits = up_bits & _tap_bits(jy, jx, m_valid, in_h, in_w, KSIZE)
            acc = _accumulate_source(
                acc,
                up_ptr,
                w_ptr,
                up_base,
                up_bits,
                uy,
                ux,
                up_h - 1,
                up_w - 1,
                c_up,
                c_main,
                c_in,
                c_out,
                offs_k,
                offs_n,
                n_mask,
                stride_uh,
                stride_uw,
                stride_uc,
                in_scale_ptr,
                in_shift_ptr,
                in_slopes_ptr,
                in_slope,
                in_lo,
                in_hi,
                0,
                0,
                0,
                0,
                KSIZE,
                EVEN_K,
                WIDE,
                CLAMP_UP,
                False,
                IN_ACT,
                False,
                INTERPRETER,
                DOT_PRECISION,
                BLOCK_K,
                1,
            )

    if SPLIT_K > 1:
        tl.static_assert(
            not (TWO_SOURCES or PACKED_K or POOL or HEAD or D2S or STATS or GRAD_MASK), "split K: a plain store"
        )
        # A part of K: its fp32 partial sums, at (split, image, y, x, channel) of the contiguous workspace; the sum
        # launch adds the parts in split order and runs the epilogue.
        at = ((pid_k * batch + img.to(tl.int64)) * height + oy) * width + ox
        part_ptrs = part_ptr + at[:, None] * c_out + offs_n[None, :]
        tl.store(part_ptrs, acc, mask=m_valid[:, None] & n_mask[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(acc_t)[None, :]
        # Before the pool (max over the window of the activated map: SiLU is not monotonic) and before a fused head.
        acc = activate(acc, slopes_ptr, offs_n, n_mask, act_slope, act_lo, act_hi, ACT)
        out = to_storage(acc, y_ptr.dtype.element_ty, INTERPRETER)

        if HEAD:
            # Fused 1x1 head: every output channel of these pixels is in this tile (grid dim 1 has size 1). Columns past
            # c_out hold inf * 0 = NaN where an input is infinite (their weights are masked to 0, the input is not):
            # zeroed, or the head's dot would spread the NaN to every logit of the pixel.
            out = tl.where(n_mask[None, :], out, tl.zeros_like(out))
            offs_c = tl.arange(0, BLOCK_CLS)
            c_mask = offs_c < n_cls
            head_w = tl.load(
                head_w_ptr + offs_n[:, None] * n_cls + offs_c[None, :],
                mask=n_mask[:, None] & c_mask[None, :],
                other=0.0,
            )
            logits = mma(out, head_w, tl.zeros((BLOCK_M, BLOCK_CLS), dtype=acc_t), INTERPRETER, DOT_PRECISION)
            logits += tl.load(head_b_ptr + offs_c, mask=c_mask, other=0.0).to(acc_t)[None, :]
            y_ptrs = (
                y_ptr
                + pixel_offset(img, oy, ox, stride_yn, stride_yh, stride_yw)[:, None]
                + offs_c.to(tl.int64)[None, :] * stride_yc
            )
            tl.store(
                y_ptrs, to_storage(logits, y_ptr.dtype.element_ty, INTERPRETER), mask=m_valid[:, None] & c_mask[None, :]
            )
            if HEAD == HEAD_MAP:
                # The activated map as well, to pool_ptr: the input the head's weight gradient reads in a backward.
                map_ptrs = (
                    pool_ptr
                    + pixel_offset(img, oy, ox, stride_pn, stride_ph, stride_pw)[:, None]
                    + offs_n.to(tl.int64)[None, :] * stride_pc
                )
                tl.store(map_ptrs, out, mask=m_valid[:, None] & n_mask[None, :])
        elif D2S:
            # Column n = (dy * 2 + dx) * c_real + channel, stored at pixel (2 oy + dy, 2 ox + dx).
            c_real = c_out // 4
            sub = offs_n // c_real
            ch = offs_n % c_real
            yy = 2 * oy[:, None] + (sub // 2)[None, :]
            xx = 2 * ox[:, None] + (sub % 2)[None, :]
            y_ptrs = (
                y_ptr
                + pixel_offset(img[:, None], yy, xx, stride_yn, stride_yh, stride_yw)
                + ch.to(tl.int64)[None, :] * stride_yc
            )
            tl.store(y_ptrs, out, mask=m_valid[:, None] & n_mask[None, :])
        elif GRAD_MASK == GRAD_NORM_READ or GRAD_MASK == GRAD_NORM_APPLIED:
            # The forward read its input's first n_cls channels (c_norm) as act(z * scale + shift): pool_ptr is z (its
            # own strides), in_scale / in_shift its (batch, c_norm) scale and shift, IN_ACT the activation. The
            # gradient of z through that read is stored, and this tile's sums of g * z and g per channel (the scale's
            # and shift's gradients) go to row (tile, image) of mean_ptr and m2_ptr. GRAD_NORM_APPLIED: also the
            # read's values act(u), rounded to the map's dtype as the normalize launch rounds them, to count_ptr
            # (contiguous (batch, height, width, c_norm)): the weight gradient's operand. The tile's two column halves
            # one after the other: half as many z, u and g values live at once.
            tl.static_assert(TMA_ROWS > 0 or ROW_W > 0 or PER_IMAGE, "a tile of one image")
            tl.static_assert(not (NORM_IN or POLYPHASE or STATS), "an input gradient over one plain tiling")
            c_norm = n_cls
            rows_y = pixel_offset(img, oy, ox, stride_yn, stride_yh, stride_yw)
            rows_z = pixel_offset(img, oy, ox, stride_pn, stride_ph, stride_pw)
            rows_a = ((img.to(tl.int64) * height + oy) * width + ox) * c_norm
            table = img_t.to(tl.int64) * c_norm
            part = ((pid_m % tiles_img).to(tl.int64) * batch + img_t) * c_norm
            args = (m_valid, rows_y, rows_z, rows_a, y_ptr, pool_ptr, count_ptr, in_scale_ptr + table,
                    in_shift_ptr + table, in_slopes_ptr, mean_ptr + part, m2_ptr + part, c_out, c_norm, stride_yc,
                    stride_pc, in_slope, in_lo, in_hi)  # fmt: skip
            applied: tl.constexpr = GRAD_MASK == GRAD_NORM_APPLIED
            half: tl.constexpr = BLOCK_N // 2
            left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, half)), (0, 2, 1)))
            offs_h = pid_n * BLOCK_N + tl.arange(0, half)
            _norm_read_columns(left, offs_h, *args, IN_ACT, applied, INTERPRETER)
            _norm_read_columns(right, offs_h + half, *args, IN_ACT, applied, INTERPRETER)
        else:
            at = pixel_offset(img, oy, ox, stride_yn, stride_yh, stride_yw)[:, None]
            at += offs_n.to(tl.int64)[None, :] * stride_yc
            if GRAD_MASK == GRAD_RELU:
                gate = tl.load(pool_ptr + at, mask=m_valid[:, None] & n_mask[None, :])
                out = _relu_derivative(out, gate, INTERPRETER)
            tl.store(y_ptr + at, out, mask=m_valid[:, None] & n_mask[None, :])

        if STATS:
            # Moments of the values as stored (rounded), as the norm computes them from the tensor it is given.
            count, mean, m2 = tile_moments(out.to(acc_t), m_valid)
            at = pid_m.to(tl.int64) * c_out + offs_n
            tl.store(mean_ptr + at, mean, mask=n_mask)
            tl.store(m2_ptr + at, m2, mask=n_mask)
            if pid_n == 0:
                tl.store(count_ptr + pid_m, count)

        if POOL:
            # Rows 4w..4w+3 of the tile are the 2x2 window w: max over them, NaN-propagating like nn.MaxPool2d.
            quads = tl.reshape(out, (BLOCK_M // 4, 4, BLOCK_N))
            pooled = tl.max(quads, axis=1)
            has_nan = tl.max((quads != quads).to(tl.int32), axis=1) > 0
            pooled = tl.where(has_nan, tl.full(pooled.shape, float("nan"), pooled.dtype), pooled)
            offs_w = pid_m * (BLOCK_M // 4) + tl.arange(0, BLOCK_M // 4)
            pw_x = offs_w % half_w
            pw_y = (offs_w // half_w) % half_h
            p_img = offs_w // (half_w * half_h)
            if PER_IMAGE:
                local_w = (pid_m % tiles_img) * (BLOCK_M // 4) + tl.arange(0, BLOCK_M // 4)
                pw_x = local_w % half_w
                pw_y = local_w // half_w
                p_img = tl.zeros_like(local_w) + img_t
            if TMA_ROWS:
                tl.static_assert(TMA_ROWS == 2, "the pooled epilogue needs 2-row tiles")
                local_w = tl.arange(0, BLOCK_M // 4)
                pw_x = x0 // 2 + local_w
                pw_y = tl.zeros_like(local_w) + y0 // 2
                p_img = tl.zeros_like(local_w) + img_t
            p_valid = (p_img < batch) & (pw_y < height // 2) & (pw_x < width // 2)
            p_ptrs = (
                pool_ptr
                + pixel_offset(p_img, pw_y, pw_x, stride_pn, stride_ph, stride_pw)[:, None]
                + offs_n.to(tl.int64)[None, :] * stride_pc
            )
            tl.store(p_ptrs, pooled, mask=p_valid[:, None] & n_mask[None, :])


@triton.jit
def _conv_nhwc_kernel(
    x_ptr,  # (batch, height, width, c_main): the input, or the skip map with TWO_SOURCES
    up_ptr,  # (batch, up_h, up_w, c_up): the upsampled map (TWO_SOURCES)
    w_ptr,  # (KSIZE * KSIZE * (c_main + c_up), c_out): packed weights, row = tap * c_in + channel
    b_ptr,  # (c_out,)
    y_ptr,  # (batch, height, width, c_out), (batch, 2 height, 2 width, c_out / 4) with D2S, or logits with HEAD
    pool_ptr,  # (batch, height // 2, width // 2, c_out); (batch, height, width, c_out) with HEAD == HEAD_MAP or
    # GRAD_MASK (a map laid out like y, see there)
    head_w_ptr,  # (c_out, n_cls)
    head_b_ptr,  # (n_cls,)
    x_desc,  # TMA descriptors of x, up and their rows of the packed weight (TMA_ROWS > 0; None on the pointer path)
    up_desc,
    w_desc,
    w_up_desc,
    slopes_ptr,  # (c_out,): PReLU slopes
    in_scale_ptr,  # (batch, c_main) fp32 (NORM_IN): x is a pre-norm map, read as act(x * scale + shift)
    in_shift_ptr,
    in_slopes_ptr,  # (c_main,): PReLU slopes of the activation after x's norm (NORM_IN)
    mean_ptr,  # (batch * tiles_img, c_out) fp32 (STATS): per-tile mean and M2 of the stored map, per channel
    m2_ptr,
    count_ptr,  # (batch * tiles_img,) fp32 (STATS): valid pixels of each tile
    part_ptr,  # (SPLIT_K, batch, height, width, c_out) fp32, contiguous (SPLIT_K > 1): partial sums
    batch,
    height,  # of the output
    width,
    c_main,
    c_up,
    c_out,
    n_cls,
    in_h,  # the input's frame: x's size, or with a crop join the upsampled map's (the skip is read cropped)
    in_w,
    conv_off,  # input coordinate of an output pixel's centre tap minus its own: KSIZE // 2 - padding
    crop_top,  # where the input's frame starts inside x (crop join)
    crop_left,
    up_h,
    up_w,
    pad_top,  # where the upsampled map starts inside the input's frame (centered zero padding)
    pad_left,
    act_slope,  # LeakyReLU
    act_lo,  # clamp
    act_hi,
    in_slope,  # NORM_IN: the activation after x's norm (LeakyReLU slope, clamp bounds)
    in_lo,
    in_hi,
    tiles_img,  # PER_IMAGE: tiles per image
    tiles_m,  # PERSISTENT: tiles along M (grid dimension 0 of a launch of one tile a program)
    stride_xn,
    stride_xh,
    stride_xw,
    stride_xc,
    stride_un,
    stride_uh,
    stride_uw,
    stride_uc,
    stride_yn,
    stride_yh,
    stride_yw,
    stride_yc,
    stride_pn,
    stride_ph,
    stride_pw,
    stride_pc,
    KSIZE: tl.constexpr,
    TWO_SOURCES: tl.constexpr,
    CLAMP_UP: tl.constexpr,
    PACKED_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    WIDE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    POOL: tl.constexpr,
    HEAD: tl.constexpr,
    D2S: tl.constexpr,
    TMA_ROWS: tl.constexpr,
    ROW_W: tl.constexpr,
    STRIDE: tl.constexpr,
    POLYPHASE: tl.constexpr,
    PER_IMAGE: tl.constexpr,
    NORM_IN: tl.constexpr,
    IN_ACT: tl.constexpr,
    STATS: tl.constexpr,
    GRAD_MASK: tl.constexpr,
    PERSISTENT: tl.constexpr,
    SPLIT_K: tl.constexpr,
    INTERPRETER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_CLS: tl.constexpr,
):
    """y[p, n] = act(bias[n] + sum_k A[p, k] W[k, n]) over a (BLOCK_M pixels) x (BLOCK_N channels) tile.

    Grid: (cdiv(M, BLOCK_M), cdiv(c_out, BLOCK_N)), M = batch * ceil(height/2) * ceil(width/2) * 4; with TMA loads
    (``TMA_ROWS`` row boxes of BLOCK_M / TMA_ROWS pixels per tile): (batch * cdiv(height, TMA_ROWS) *
    cdiv(width, BLOCK_M / TMA_ROWS), cdiv(c_out, BLOCK_N)); with ``PER_IMAGE`` (pointer loads): (batch * tiles_img,
    cdiv(c_out, BLOCK_N)), each tile the window-major pixels of one image, so that a tile's statistics (``STATS``)
    and its input's normalization (``NORM_IN``) belong to one image. With ``ROW_W`` (pointer loads without the pool
    or the depth-to-space store): tiles of BLOCK_M / ROW_W rows of ROW_W pixels, laid out like the TMA tiles (grid
    (batch * cdiv(height, BLOCK_M / ROW_W) * cdiv(width, ROW_W), ...)): a lane's pixel is a shift and a mask of
    its index, not the three runtime divisions of the window-major order, and a tile lies in one image.

    ``STATS``: the epilogue stores the pre-norm map (bias added, no activation) and the count, mean and M2 of the
    stored values of its tile per channel (tile ``pid_m`` = image * tiles per image + tile, on both load paths);
    :func:`fastunet.kernels.stats.norm_scale_shift` merges them. ``NORM_IN``: x is read as ``act(x * scale +
    shift)`` (per image and channel), zero padding after it.

    Geometry is base-offset arithmetic done once per tile: an output pixel's centre tap sits at (STRIDE oy,
    STRIDE ox) + conv_off in the input's frame (zero padding at that frame's border), at + (crop_top, crop_left)
    in x and at - (pad_top, pad_left) in the upsampled map; tap t is offset by (t // KSIZE, t % KSIZE) - KSIZE // 2
    from it (KSIZE 2: -1 and 0, the "centre" being the 2x2 window's last tap). The TMA path takes the plain geometry
    only (conv_off, crop and the replicate join zero, stride 1; see choose_load_path).

    ``POLYPHASE`` (row tiles or TMA; one source, no bias, no activation, plain stores): the input gradient of a 3x3
    stride-2 padding-1 conv, x being that conv's output gradient dz (in_h x in_w = ceil(height / 2) x ceil(width /
    2)) and the weight flipped (see conv_grad.flip_conv_weight). Program ``pid_m`` serves output phase ``pid_m % 4``
    (py, px): its tile covers pixels (qy, qx) of the phase's lattice, output pixel (2 qy + py, 2 qx + px), and sums
    only that phase's taps of dz around (qy, qx) (see :func:`_accumulate_source`); no zero-interleaved dz is made.

    ``PERSISTENT``: a grid of (programs,) with fewer programs than tiles (the launcher takes SMs x programs an SM);
    program p runs tiles p, p + programs, ... of the ``tiles_m x cdiv(c_out, BLOCK_N)`` tiles above, numbered in
    groups of :data:`PERSISTENT_GROUP_M` pixel tiles by every channel tile (:func:`_grouped_tile`): the programs
    running at once share input rows and weight slices in L2. Each tile is computed exactly as in a launch of one
    tile a program, so results are bitwise the same.

    ``SPLIT_K`` > 1 (one source, a plain store): a grid of (..., ..., SPLIT_K); program (m, n, s) runs part s of the
    tile's (tap, channel block) steps (:func:`_split_range`) and stores its fp32 partial sums to ``part_ptr``;
    :func:`_split_k_sum_kernel` adds the parts in order and runs the epilogue.

    ``GRAD_MASK`` (a plain store, one tile's K whole): the launch is an input gradient. ``GRAD_RELU``: ``pool_ptr``
    (laid out like y, read at y's offsets) is the activated map ``a`` a ReLU stored at the output's pixels, and the
    epilogue stores ``where(a <= 0, 0, acc)``, that ReLU's derivative applied (:func:`_relu_derivative`; see
    :func:`conv2d_nhwc`'s ``grad_mask``). ``GRAD_NORM_READ`` (tiles of one image): ``pool_ptr`` (its own strides) is
    the pre-norm map ``z`` whose first ``n_cls`` channels the conv read as ``act(z * scale + shift)`` (``in_scale``,
    ``in_shift``, ``IN_ACT`` and its parameters), and the epilogue stores z's gradient through that read in those
    channels (:func:`_norm_read_grad`) and the tile's per-channel sums of ``g * z`` and ``g`` to row (tile, image)
    of ``mean_ptr`` and ``m2_ptr`` (see :func:`conv2d_nhwc`'s ``grad_norm``). ``GRAD_NORM_APPLIED``: the same, and the
    read's values ``act(z * scale + shift)`` of those channels to ``count_ptr``, a contiguous (batch, height, width,
    ``n_cls``) map in y's dtype (``grad_norm_applied``).
    """
    if PERSISTENT:
        # Fewer programs than tiles: each program takes every num_programs-th tile in grouped order.
        tl.static_assert(SPLIT_K == 1, "a persistent launch runs whole tiles")
        tl.static_assert(not POLYPHASE, "a polyphase launch numbers its tiles by phase")
        tiles_n = tl.cdiv(c_out, BLOCK_N)
        for tile in range(tl.program_id(0), tiles_m * tiles_n, tl.num_programs(0)):
            pid_m, pid_n = _grouped_tile(tile, tiles_m, tiles_n, PERSISTENT_GROUP_M)
            _conv_tile(
                pid_m, pid_n, 0, x_ptr, up_ptr, w_ptr, b_ptr, y_ptr, pool_ptr, head_w_ptr, head_b_ptr, x_desc,
                up_desc, w_desc, w_up_desc, slopes_ptr, in_scale_ptr, in_shift_ptr, in_slopes_ptr, mean_ptr, m2_ptr,
                count_ptr, part_ptr, batch, height, width, c_main, c_up, c_out, n_cls, in_h, in_w, conv_off, crop_top,
                crop_left, up_h, up_w, pad_top, pad_left, act_slope, act_lo, act_hi, in_slope, in_lo, in_hi,
                tiles_img, stride_xn, stride_xh, stride_xw, stride_xc, stride_un, stride_uh, stride_uw, stride_uc,
                stride_yn, stride_yh, stride_yw, stride_yc, stride_pn, stride_ph, stride_pw, stride_pc, KSIZE,
                TWO_SOURCES, CLAMP_UP, PACKED_K, EVEN_K, WIDE, HAS_BIAS, ACT, POOL, HEAD, D2S, TMA_ROWS, ROW_W,
                STRIDE, POLYPHASE, PER_IMAGE, NORM_IN, IN_ACT, STATS, GRAD_MASK, SPLIT_K, INTERPRETER, DOT_PRECISION,
                BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_CLS,
            )  # fmt: skip
    else:
        _conv_tile(
            tl.program_id(0), tl.program_id(1), tl.program_id(2), x_ptr, up_ptr, w_ptr, b_ptr, y_ptr, pool_ptr,
            head_w_ptr, head_b_ptr, x_desc, up_desc, w_desc, w_up_desc, slopes_ptr, in_scale_ptr, in_shift_ptr,
            in_slopes_ptr, mean_ptr, m2_ptr, count_ptr, part_ptr, batch, height, width, c_main, c_up, c_out, n_cls,
            in_h, in_w, conv_off, crop_top, crop_left, up_h, up_w, pad_top, pad_left, act_slope, act_lo, act_hi,
            in_slope, in_lo, in_hi, tiles_img, stride_xn, stride_xh, stride_xw, stride_xc, stride_un, stride_uh,
            stride_uw, stride_uc, stride_yn, stride_yh, stride_yw, stride_yc, stride_pn, stride_ph, stride_pw,
            stride_pc, KSIZE, TWO_SOURCES, CLAMP_UP, PACKED_K, EVEN_K, WIDE, HAS_BIAS, ACT, POOL, HEAD, D2S, TMA_ROWS,
            ROW_W, STRIDE, POLYPHASE, PER_IMAGE, NORM_IN, IN_ACT, STATS, GRAD_MASK, SPLIT_K, INTERPRETER,
            DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_CLS,
        )  # fmt: skip


@triton.jit
def _split_k_sum_kernel(
    part_ptr,  # (SPLIT_K, pixels, c_out) fp32, contiguous: the conv's partial sums
    b_ptr,  # (c_out,)
    slopes_ptr,  # (c_out,): PReLU slopes
    y_ptr,  # (batch, height, width, c_out)
    pixels,  # batch * height * width
    height,
    width,
    c_out,
    act_slope,
    act_lo,
    act_hi,
    stride_yn,
    stride_yh,
    stride_yw,
    stride_yc,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    SPLIT_K: tl.constexpr,
    INTERPRETER: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """y = act(bias + sum over s of part[s]) of a split-K conv, the parts added in split order (s = 0, 1, ...): the
    same bits on every run. Grid: (cdiv(pixels, BLOCK_P), cdiv(c_out, BLOCK_C))."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = offs_p < pixels
    c_mask = offs_c < c_out
    mask = p_mask[:, None] & c_mask[None, :]
    at = offs_p.to(tl.int64)[:, None] * c_out + offs_c[None, :]
    acc = tl.load(part_ptr + at, mask=mask, other=0.0)
    for split in tl.static_range(1, SPLIT_K):
        acc += tl.load(part_ptr + split * pixels.to(tl.int64) * c_out + at, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    acc = activate(acc, slopes_ptr, offs_c, c_mask, act_slope, act_lo, act_hi, ACT)
    img = offs_p // (height * width)
    oy = offs_p // width % height
    ox = offs_p % width
    y_ptrs = (
        y_ptr
        + pixel_offset(img, oy, ox, stride_yn, stride_yh, stride_yw)[:, None]
        + offs_c.to(tl.int64)[None, :] * stride_yc
    )
    tl.store(y_ptrs, to_storage(acc, y_ptr.dtype.element_ty, INTERPRETER), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ConvProblem:
    """What the tile choice depends on for one launch."""

    m: int  # GEMM rows: batch * ceil(H/2) * ceil(W/2) * 4
    c_out: int  # GEMM columns (4 * channels for the depth-to-space launch)
    c_main: int
    c_up: int
    element_size: int
    packed_k: bool = False
    head: bool = False
    d2s: bool = False
    sm_count: int = 132
    tma: bool = False  # operands land in shared memory by TMA: no per-thread addresses for the A tile
    pool: bool = False  # the pooled epilogue (a TMA tile then covers two whole rows)
    splittable: bool = False  # one source, a plain store: K may be split (see _split_k_configs)
    taps: int = 9  # ksize * ksize: 4 for the 2x2 stride-2 conv


def _tile_rows(problem: ConvProblem, block_m: int) -> int:
    """The pixels a config's tile covers: BLOCK_M, except on the TMA path, whose row boxes are at least
    :data:`TMA_MIN_ROW` pixels wide, two of them where the pooled epilogue needs whole 2x2 windows (see
    :func:`_tma_tile`)."""
    if not problem.tma:
        return block_m
    if problem.pool:
        return 2 * max(TMA_MIN_ROW, block_m // 2)
    return max(TMA_MIN_ROW, block_m)


def _fits(problem: ConvProblem, config: dict) -> bool:
    """sm_90 build limits, from the compile report of the reference network (no spills, 255 registers at most).

    * fp32 accumulator <= 64 registers a thread: at 128 (a 128 x 128 tile on one warpgroup, 128 x 256 on two) the
      pointer-path kernel sits at 232-255 registers. On the TMA path, where no thread holds A-tile addresses, two
      warpgroups may hold 128 each: a 128 x 256 tile builds at 156-172 registers, no spills (three 144 KiB stages,
      one CTA per SM).
    * A-tile elements a thread stages per K step (BLOCK_M * BLOCK_K / threads) <= 64 (the loads go to shared
      memory asynchronously; their addresses and predicates stay in registers); 128 spills. The small-K loader of
      the first conv computes a full address per element: <= 32 there where its whole K is one block (the 128 x 64
      tile on 4 warps: 106 registers, 126 with the statistics, no spills, in bf16 and fp32; half the 8-warp tile's
      instructions per pixel, whose per-warp setup and epilogue cover 16 pixels a warp against 32), else <= 16.
    * Pipeline buffers within 200 KB of shared memory (228 KB per SM).
    * The depth-to-space store serializes the wgmma pipeline at BLOCK_N 128 (ptxas warning): BLOCK_N <= 64 there;
      so does the fused head when two warpgroups share a 64-row tile: BLOCK_M >= 64 rows a warpgroup there.
    """
    threads = 32 * config["num_warps"]
    block_m, block_n, block_k = _tile_rows(problem, config["BLOCK_M"]), config["BLOCK_N"], config["BLOCK_K"]
    smem = config["num_stages"] * (block_m + block_n) * block_k * problem.element_size
    staged = block_m * block_k / threads
    accumulator = 128 if problem.tma and config["num_warps"] == 8 else 64
    one_step = problem.taps * problem.c_main <= block_k
    return (
        staged <= ((32 if one_step else 16) if problem.packed_k else 64)
        and block_m * block_n <= accumulator * threads
        and smem <= 200 * 1024
        and (not problem.d2s or block_n <= 64)
        and (not problem.head or block_m >= 16 * config["num_warps"])
    )


def _block_k(problem: ConvProblem, row_bytes: int = 128) -> int:
    """K block: up to ``row_bytes`` of input channels per tap, the largest power of two that divides every source's
    channel count so no block is masked; flattened (tap, channel) on the small-K path.

    The heuristic takes 128-byte rows (64 channels in 16-bit dtypes): 256-byte rows halve the loop's per-step
    overhead (0.29 against 0.39 issue ratio in the model) but their 192 KiB of 3-stage buffers leave one CTA per SM,
    with nothing to overlap a CTA's epilogue or its pipeline's fill; they are an autotuning candidate."""
    widest = row_bytes // problem.element_size
    if problem.packed_k:
        return min(widest, max(16, next_pow2(problem.taps * problem.c_main)))
    channels = [c for c in (problem.c_main, problem.c_up) if c]
    for block_k in (128, 64, 32, 16):
        if block_k <= widest and all(c % block_k == 0 for c in channels):
            return block_k
    return min(widest, max(16, next_pow2(min(channels))))


@functools.lru_cache(maxsize=4096)
def pick_config(problem: ConvProblem) -> dict:
    """The heuristic tile for one launch (the first autotuning candidate, and the only one by default).

    BLOCK_N covers the output channels (all of them when the head is fused), BLOCK_K from :func:`_block_k`,
    BLOCK_M the pixels; tiles shrink
    for tiny maps so that small launches do not run mostly masked lanes. tl.dot needs every dimension >= 16.
    Warps, pipeline depth and, if need be, a narrower pixel tile are chosen to meet :func:`_fits`.
    """
    widest = max(16, next_pow2(problem.c_out))
    block_n = widest if problem.head else min(64 if problem.d2s else 128, widest)
    # Past 128 channels, a channel count 64-wide blocks cover with less padding (192: three full blocks, where two of
    # 128 run a half-empty one, 25% of the MMAs wasted) takes 64.
    if (
        block_n == 128
        and problem.c_out > 128
        and triton.cdiv(problem.c_out, 64) * 64 < triton.cdiv(problem.c_out, 128) * 128
    ):
        block_n = 64
    block_k = _block_k(problem)
    block_m = min(128, max(16, next_pow2(problem.m)))
    # Fewer tiles than SMs (deep layers at batch 1) leaves SMs idle: halve the pixel tile while that helps.
    while block_m > 64 and triton.cdiv(problem.m, block_m) * triton.cdiv(problem.c_out, block_n) < problem.sm_count:
        block_m //= 2
    # Still at most half as many tiles as SMs (the bottleneck's first conv's input gradient at batch 1: 64 tiles of
    # 64 x 128 on 132 SMs): 64-wide channel blocks double them.
    if not problem.head and block_n == 128:
        if 2 * triton.cdiv(problem.m, block_m) * triton.cdiv(problem.c_out, block_n) <= problem.sm_count:
            block_n = 64
            # Such a 64 x 64 pointer tile's K-step holds half the MMAs of a 64 x 128 one for the same A-tile
            # loads (issue ratio 0.78 with 128-byte rows): 256-byte rows (0.57) halve the per-step overhead, and
            # their three stages (96 KiB) still leave room for two CTAs an SM.
            if not problem.tma and not problem.packed_k:
                block_k = _block_k(problem, row_bytes=256)
    # Preference: the widest pixel tile, then fewer warps, then deeper pipelining, among tiles that meet _fits.
    while True:
        for num_warps, num_stages in ((4, 3), (4, 2), (8, 3), (8, 2)):
            config = {
                "BLOCK_M": block_m,
                "BLOCK_N": block_n,
                "BLOCK_K": block_k,
                "num_warps": num_warps,
                "num_stages": num_stages,
            }
            if _fits(problem, config) or block_m == 16 and num_warps == 8 and num_stages == 2:
                return config
        block_m //= 2


@functools.lru_cache(maxsize=4096)
def candidate_configs(problem: ConvProblem) -> tuple[dict, ...]:
    """Autotuning candidates: the heuristic first, then a small grid around it, pruned by :func:`_fits`.

    No tile is wider than the problem, and the fused head keeps every channel in one tile. Cached per problem
    (like :func:`pick_config`): the launch path only looks the tiles up. Callers must not mutate the configs.
    """
    base = pick_config(problem)
    # Each config carries the tile it launches (a TMA tile may cover more pixels than BLOCK_M asked for).
    configs = [{**base, "BLOCK_M": _tile_rows(problem, base["BLOCK_M"])}]
    depths = tuple(dict.fromkeys((base["BLOCK_K"], _block_k(problem, row_bytes=256))))
    widest = max(16, next_pow2(problem.c_out))
    widths = (base["BLOCK_N"],) if problem.head else tuple(n for n in (64, 128, 256) if n <= widest)
    widths = widths or (base["BLOCK_N"],)
    for block_m, block_n, block_k, num_warps, num_stages in itertools.product(
        (64, 128), widths, depths, (4, 8), (3, 4)
    ):
        config = {
            "BLOCK_M": _tile_rows(problem, min(block_m, base["BLOCK_M"])),
            "BLOCK_N": block_n,
            "BLOCK_K": block_k,
            "num_warps": num_warps,
            "num_stages": num_stages,
        }
        if config not in configs and _fits(problem, config):
            configs.append(config)
    configs += _persistent_configs(problem, configs[0])
    configs += _split_k_configs(problem, configs[0])
    return tuple(configs)


# Split-K parts: the most a candidate takes, and the fewest K-steps each part keeps; pixels a program of the sum.
SPLIT_K_MAX = 4
SPLIT_K_MIN_STEPS = 8
SPLIT_K_SUM_PIXELS = 64
SPLIT_K_SUM_OPTIONS = {"num_warps": 4, "num_stages": 1}


def _split_k_configs(problem: ConvProblem, base: dict) -> list[dict]:
    """Split-K candidates where the heuristic's tile leaves SMs idle (fewer output tiles than SMs: the deep layers at
    batch 1): K (taps x input-channel blocks) split in 2 or 4 parts (one program each, fp32 partial sums), then one
    launch that adds the parts in a fixed order and runs the epilogue (bias, activation, store). One source and a
    plain store only (no pool, head, depth-to-space store or statistics). Not the heuristic's choice: the issue
    model already counts such a launch at the tensor cores' peak over every SM (its FLOPs bound it), so it gains
    nothing there and pays the partial sums' traffic and one more launch."""
    if not problem.splittable:
        return []
    tiles = triton.cdiv(problem.m, base["BLOCK_M"]) * triton.cdiv(problem.c_out, base["BLOCK_N"])
    steps = problem.taps * triton.cdiv(problem.c_main, base["BLOCK_K"])
    parts = [s for s in (2, SPLIT_K_MAX) if steps >= s * SPLIT_K_MIN_STEPS and tiles * s <= 2 * problem.sm_count]
    return [{**base, "SPLIT_K": s} for s in parts] if tiles < problem.sm_count else []


# Shared memory of an sm_90 SM that CTAs may share (228 KiB less 1 KiB the driver keeps per CTA).
_SM90_SHARED = 228 * 1024


def programs_per_sm(problem: ConvProblem, config: dict) -> int:
    """The most programs a persistent launch of ``config`` may put on each SM: the CTAs its pipeline buffers and
    warps leave room for, at most 2. Registers are not known before compiling (two 8-warp CTAs fit at up to 128
    registers a thread): a program that is not resident waits for a whole program, not a tile, so the candidates
    also take one program an SM."""
    block_m = _tile_rows(problem, config["BLOCK_M"])
    smem = config["num_stages"] * (block_m + config["BLOCK_N"]) * config["BLOCK_K"] * problem.element_size
    return max(1, min(2, _SM90_SHARED // (smem + 1024), 64 // (4 * config["num_warps"])))


def _persistent_configs(problem: ConvProblem, base: dict) -> list[dict]:
    """Persistent candidates (TMA path): the heuristic's tile on a grid of SMs x :func:`programs_per_sm` and SMs x 1
    programs looping over the tiles, where there are more tiles than programs. Not the
    heuristic's choice: the issue model ignores prologues and epilogues, which is all a persistent grid overlaps,
    so it never models one faster."""
    if not problem.tma:
        return []
    tiles = triton.cdiv(problem.m, base["BLOCK_M"]) * triton.cdiv(problem.c_out, base["BLOCK_N"])
    counts = dict.fromkeys((programs_per_sm(problem, base), 1))
    return [{**base, "PROGRAMS_PER_SM": n} for n in counts if tiles > problem.sm_count * n]


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------
def pack_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """(c_out, c_in, k, k) conv weight -> (k * k * c_in, c_out), row = tap * c_in + channel."""
    c_out, c_in, kh, kw = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(kh * kw * c_in, c_out).contiguous()


def pack_conv_transpose_weight(weight: torch.Tensor) -> torch.Tensor:
    """(c_in, c_out, 2, 2) transposed-conv weight -> (c_in, 4 * c_out), column = (dy * 2 + dx) * c_out + channel."""
    c_in, c_out, kh, kw = weight.shape
    if (kh, kw) != (2, 2):
        raise ValueError(f"expected a 2x2 transposed-conv kernel, got {kh}x{kw}")
    return weight.permute(0, 2, 3, 1).reshape(c_in, 4 * c_out).contiguous()


def _check_nhwc(t: torch.Tensor, what: str) -> None:
    if t.dim() != 4:
        raise ValueError(f"{what}: expected a 4-D (N, H, W, C) view, got shape {tuple(t.shape)}")
    check_runnable(t, what)


def _check_no_overlap(out: torch.Tensor, inputs: list[torch.Tensor | None]) -> None:
    """A caller-provided output must not share memory with what the launch reads (results would depend on the
    order in which tiles run)."""
    if out.device.type == "meta" or out.numel() == 0:  # dry run, or nothing written
        return
    storage = out.untyped_storage().data_ptr()
    for t in inputs:
        if t is not None and t.numel() and t.untyped_storage().data_ptr() == storage:
            raise ValueError("out must not share memory with an input of the same launch")


# Weight addresses are int32 inside the kernel, (row * c_out + column), computed for masked lanes too: a row may
# run one K block (<= 128) past the last and a column one N block (<= 256) past c_out without wrapping.
_WEIGHT_ROW_SLACK, _WEIGHT_COL_SLACK = 128, 256


def check_weight_addressable(rows: int, columns: int) -> None:
    """Refuse a packed (rows, columns) weight whose element offsets would pass 2**31 (they are int32 in the kernel,
    where int64 arithmetic would cost instructions in the main loop for weights no U-Net has)."""
    if (rows + _WEIGHT_ROW_SLACK) * columns + _WEIGHT_COL_SLACK >= 2**31:
        raise ValueError(
            f"packed weight of {rows} x {columns} = {rows * columns} elements: the kernel addresses weights with "
            f"32-bit offsets, so (rows + {_WEIGHT_ROW_SLACK}) * columns + {_WEIGHT_COL_SLACK} must stay below 2**31 "
            "(fewer channels per conv)"
        )


def _has_internal_overlap(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share a memory location (an expanded tensor, say): dimensions sorted by
    stride must each step past everything the smaller ones span. Conservative: a layout it cannot prove free of
    overlap counts as overlapping."""
    span = 0
    for size, stride in sorted(
        ((s, abs(st)) for s, st in zip(t.shape, t.stride(), strict=True) if s > 1), key=lambda d: d[1]
    ):
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False


def _address(t: torch.Tensor) -> int:
    """The tensor's first element address (on ``meta``, its byte offset: storage itself is taken as aligned)."""
    return t.storage_offset() * t.element_size() if t.device.type == "meta" else t.data_ptr()


def _tma_problem(t: torch.Tensor, what: str) -> str | None:
    """Why a TMA descriptor cannot address ``t`` (None when it can): every dimension non-empty, the last one
    contiguous, the other strides and the first element 16-byte aligned."""
    elem = t.element_size()
    if any(size == 0 for size in t.shape):
        return f"{what} has an empty dimension {tuple(t.shape)}"
    if t.stride(-1) != 1:
        return f"{what} is not contiguous in its last dimension (stride {t.stride(-1)})"
    unaligned = [stride for stride in t.stride()[:-1] if stride * elem % 16]
    if unaligned:
        return (
            f"{what} strides {tuple(t.stride())} x {elem} B are not all multiples of 16 bytes "
            f"({t.shape[-1]} channels; TMA needs a multiple of {16 // elem})"
        )
    if _address(t) % 16:
        return f"{what} starts {_address(t) % 16} bytes past a 16-byte boundary (storage offset {t.storage_offset()})"
    return None


def choose_load_path(
    x: torch.Tensor,
    up: torch.Tensor | None,
    w_packed: torch.Tensor,
    *,
    packed_k: bool,
    plain_geometry: bool = True,
    strided: bool = False,
    normalized: bool = False,
) -> tuple[str, str]:
    """("tma" or "pointer", why) for a conv launch reading ``x`` (and ``up``) with ``w_packed``.

    TMA needs sm_90 or newer (off the GPU: the modeled target; under the interpreter: only when asked for, see
    :func:`fastunet.kernels._common.load_path`) and tensors a descriptor can address (:func:`_tma_problem`). The
    small-K first conv keeps its packed (tap, channel) loader, and so do the valid conv, the cropped skip and the
    replicate join (``plain_geometry`` False), a strided conv (a row box reads consecutive pixels) and an input
    normalized on load (``normalized``: TMA lands operands in shared memory for the wgmma, with no register pass to
    apply ``act(z * scale + shift)``). Asked for automatically, maps narrower than
    :data:`TMA_MIN_ROW` pixels stay on pointer loads (a row box would be mostly padding)."""
    requested = requested_load_path()
    if requested == "pointer":
        return "pointer", "pointer loads asked for (load_path or FASTUNET_LOAD_PATH)"
    if packed_k:
        return "pointer", f"small-K loader: {x.shape[-1]} input channels packed with the taps into one K axis"
    if not plain_geometry:
        return "pointer", (
            "valid conv, cropped skip, replicate join or an upsampled map larger than the skip: the row boxes take "
            "the padded geometry only"
        )
    if strided:
        return "pointer", "strided conv: a TMA row box reads consecutive pixels, a stride-2 tap every other one"
    if normalized:
        return "pointer", (
            "input normalized on load: TMA lands the operand in shared memory for the wgmma, with no register pass "
            "to apply act(z * scale + shift)"
        )
    if INTERPRET:
        if requested == "auto":
            return "pointer", "the interpreter runs pointer loads unless TMA is asked for (load_path('tma'))"
    elif capability(x) < 90:
        return "pointer", f"sm_{capability(x)}: TMA needs sm_90 or newer"
    for t, what in ((x, "input"), (up, "upsampled input"), (w_packed, "packed weight")):
        problem = None if t is None else _tma_problem(t, what)
        if problem:
            return "pointer", problem
    width = x.shape[2]
    if requested == "auto" and width < TMA_MIN_ROW:
        return "pointer", f"map {width} px wide: a {TMA_MIN_ROW}-px TMA row box would be mostly padding"
    if requested == "tma":
        return "tma", "TMA asked for; strides and addresses 16-byte aligned"
    return "tma", f"sm_{capability(x)}: NHWC strides and addresses 16-byte aligned"


def _tma_tile(config: dict, width: int, pool: bool) -> tuple[int, int]:
    """(row boxes, BLOCK_M) of a TMA tile for a config chosen by pixel count: rows of at least :data:`TMA_MIN_ROW`
    pixels, as wide as BLOCK_M where the map is; two rows where the pooled epilogue needs whole 2x2 windows."""
    if pool:
        return 2, 2 * max(TMA_MIN_ROW, config["BLOCK_M"] // 2)
    block_w = max(TMA_MIN_ROW, min(config["BLOCK_M"], next_pow2(width)))
    rows = max(1, config["BLOCK_M"] // block_w)
    return rows, rows * block_w


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Sizes of one conv launch beyond its input's shape (see the kernel's arguments of the same names)."""

    c_out: int  # GEMM columns (4 * channels for the depth-to-space launch)
    out_h: int  # the output's size (the input's, 2 rows and columns less for a 3x3 conv with padding 0)
    out_w: int
    in_h: int  # the input's frame: x's size, or with a crop join the upsampled map's
    in_w: int
    conv_off: int = 0
    crop_top: int = 0
    crop_left: int = 0
    c_up: int = 0  # channels of the second source
    n_cls: int = 0  # classes of a fused head
    up_h: int = 0  # the second source's size, and its offset inside the input's frame (centered zero padding)
    up_w: int = 0
    pad_top: int = 0
    pad_left: int = 0
    clamp_up: bool = False  # replicate join


@dataclasses.dataclass(frozen=True)
class _ConvTile:
    """What one config comes to in one launch: row boxes and pixel tile, tiles per image, grid, constexprs, launch
    options, and on the TMA path the descriptors' boxes. Shared by every launch of the signature: never mutated."""

    rows: int  # TMA row boxes a tile; 0 on the pointer path
    block_m: int
    tiles: int  # tiles per image
    grid: tuple[int, ...]  # (tiles along M, tiles along N), or (programs,) for a persistent launch
    constexprs: dict
    options: dict
    map_box: tuple[int, ...] = ()  # TMA: box of a source map (1, 1, pixels, BLOCK_K), of a weight slice
    weight_box: tuple[int, ...] = ()
    tiles_m: int = 0  # tiles along M
    persistent_tiles: int = 0  # a persistent launch: the tiles its programs loop over; 0: one tile a program
    split_k: int = 1  # parts of K, one program each, added by a second launch (_split_k_sum_kernel)


@dataclasses.dataclass(eq=False)
class _ConvStatic:
    """Everything a conv launch comes to before tensors are bound to it, derived once per signature (shapes,
    strides, dtypes, device, alignment, the thread's switches): the tile candidates and the autotuning key, the
    load path and its reason, the kernel's integer size arguments and constexpr flags, and per config a
    :class:`_ConvTile`."""

    empty: bool  # nothing to compute (no pixel or no output channel): no launch
    m: int  # GEMM rows (pixels padded to whole 2x2 windows)
    candidates: tuple[dict, ...]
    tune_key: tuple | None
    path: str
    path_reason: str
    sizes: tuple[int, ...]  # batch, height, width, c_main, c_up, c_out, n_cls, in_h, in_w, conv_off, ..., pad_left
    flags: dict
    # TMA: each source's rows of the packed weight as (taps, channels, c_out): (shape, strides, storage offset past
    # the packed weight's own)
    weight_views: tuple = ()
    # Pointer tiles of whole row segments (the kernel's ROW_W), except where the epilogue needs the window-major
    # order (the pool) or stores 2x2 pixels a lane (depth-to-space).
    row_tiles: bool = False
    sm_count: int = 132  # of the launch's GPU (or the modeled one): a persistent grid's programs
    first: _ConvTile | None = None  # the tile of candidates[0], the config launched unless autotuning picks another
    others: dict = dataclasses.field(default_factory=dict)

    def tile(self, cfg: dict) -> _ConvTile:
        if cfg is self.candidates[0] and self.first is not None:
            return self.first
        key = tuple(cfg.items())
        tile = self.others.get(key)
        if tile is None:
            tile = self.others[key] = self._derive_tile(cfg)
        return tile

    def _derive_tile(self, cfg: dict) -> _ConvTile:
        batch, height, width, c_main, c_up, c_out = self.sizes[:6]
        phases = 1
        if self.flags["POLYPHASE"]:  # tiles over one phase's lattice, four phases
            height, width, phases = (height + 1) // 2, (width + 1) // 2, 4
        row_w = 0
        if self.path == "tma":
            rows, block_m = _tma_tile(cfg, width, self.flags["POOL"])
            tiles = triton.cdiv(height, rows) * triton.cdiv(width, block_m // rows)
        elif self.row_tiles:
            rows, block_m = 0, cfg["BLOCK_M"]
            row_w = min(block_m, next_pow2(width))
            tiles = triton.cdiv(height, block_m // row_w) * triton.cdiv(width, row_w)
        else:
            rows, block_m = 0, cfg["BLOCK_M"]
            tiles = triton.cdiv(((height + 1) // 2) * ((width + 1) // 2) * 4, block_m)
        if rows or row_w or self.flags["PER_IMAGE"]:
            grid = (phases * batch * tiles, triton.cdiv(c_out, cfg["BLOCK_N"]))
        else:
            grid = (triton.cdiv(self.m, cfg["BLOCK_M"]), triton.cdiv(c_out, cfg["BLOCK_N"]))
        tiles_m, persistent_tiles, split_k = grid[0], 0, cfg.get("SPLIT_K", 1)
        if cfg.get("PROGRAMS_PER_SM"):
            persistent_tiles = grid[0] * grid[1]
            grid = (min(persistent_tiles, self.sm_count * cfg["PROGRAMS_PER_SM"]),)
        elif split_k > 1:
            grid = (*grid, split_k)
        # Channel counts that fill whole K blocks (every layer of the usual U-Nets) drop the K masks.
        even_k = c_main % cfg["BLOCK_K"] == 0 and c_up % cfg["BLOCK_K"] == 0
        tile = {"BLOCK_M": block_m, "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"]}
        constexprs = {**self.flags, "EVEN_K": even_k, "TMA_ROWS": rows, "ROW_W": row_w, **tile}
        constexprs["PERSISTENT"] = bool(persistent_tiles)
        constexprs["SPLIT_K"] = split_k
        options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
        boxes = ((1, 1, block_m // rows, cfg["BLOCK_K"]), (1, cfg["BLOCK_K"], cfg["BLOCK_N"])) if rows else ((), ())
        return _ConvTile(rows, block_m, tiles, grid, constexprs, options, *boxes, tiles_m, persistent_tiles, split_k)


def _conv_static(
    x: torch.Tensor,
    up: torch.Tensor | None,
    w_packed: torch.Tensor,
    *,
    geometry: _Geometry,
    ksize: int,
    packed_k: bool,
    act: str,
    has_bias: bool,
    pool: bool,
    head: int,
    d2s: bool,
    stride: int = 1,
    norm_in: NormIn | None = None,
    stats: bool = False,
    polyphase: bool = False,
    grad_mask: bool = False,
    grad_norm: NormIn | None = None,
    grad_norm_applied: bool = False,
) -> _ConvStatic:
    """Derive a conv launch (see :class:`_ConvStatic`) from what its tensors look like; refuses sizes the kernel
    cannot address. ``head``: the kernel's ``HEAD`` (False, :data:`HEAD_LOGITS` or :data:`HEAD_MAP`)."""
    batch, _, _, c_main = x.shape
    g = geometry
    height, width = g.out_h, g.out_w
    m = batch * ((height + 1) // 2) * ((width + 1) // 2) * 4
    if m + 128 >= 2**31:
        # Pixel indices are int32 inside the kernel (addresses are int64): refuse rather than wrap.
        raise ValueError(f"at most 2**31 - 129 output pixels per launch (padded to even H and W), got {m}")
    check_weight_addressable(*w_packed.shape)
    plain = not (g.conv_off or g.crop_top or g.crop_left or g.clamp_up or g.pad_top < 0 or g.pad_left < 0)
    path, path_reason = choose_load_path(
        x, up, w_packed, packed_k=packed_k, plain_geometry=plain, strided=stride != 1, normalized=norm_in is not None
    )
    problem = ConvProblem(
        m=m,
        c_out=g.c_out,
        c_main=c_main,
        c_up=g.c_up,
        element_size=x.element_size(),
        packed_k=packed_k,
        head=bool(head),
        d2s=d2s,
        sm_count=sm_count(x),
        tma=path == "tma",
        pool=pool,
        taps=ksize * ksize,
        splittable=ksize in (2, 3)
        and x.dtype != torch.float64
        and not (packed_k or head or d2s or pool or stats or polyphase or grad_mask or norm_in is not None)
        and up is None,
    )
    candidates = candidate_configs(problem)
    if polyphase:  # its programs are numbered by phase: one tile a program
        candidates = [c for c in candidates if "PROGRAMS_PER_SM" not in c]
    interpreter, precision = dot_flags(x.dtype, torch.backends.cudnn.allow_tf32)
    up_t = up if up is not None else x
    read = norm_in if norm_in is not None else grad_norm  # the loader's normalized read, or the epilogue's gradient
    flags = {
        "KSIZE": ksize,
        "TWO_SOURCES": up is not None,
        "CLAMP_UP": g.clamp_up,
        "PACKED_K": c_main if packed_k else 0,  # the channel count, a constant on the small-K path
        "HAS_BIAS": has_bias,
        "ACT": ACTIVATIONS[act].value,
        "POOL": pool,
        "HEAD": head,
        "D2S": d2s,
        "STRIDE": stride,
        "POLYPHASE": polyphase,
        "NORM_IN": norm_in is not None,
        "IN_ACT": ACTIVATIONS[read.activation].value if read is not None else ACT_NONE.value,
        "STATS": stats,
        "GRAD_MASK": (GRAD_NORM_APPLIED if grad_norm_applied else GRAD_NORM_READ).value
        if grad_norm is not None
        else GRAD_RELU.value
        if grad_mask
        else 0,
        # int32 offsets in the main loop unless a source or the weight spans 2**31 elements (see _accumulate_source)
        "WIDE": max(element_span(t) for t in (x, up_t, w_packed)) >= 2**31,
        "INTERPRETER": interpreter,
        "DOT_PRECISION": precision,
        "BLOCK_CLS": max(16, next_pow2(g.n_cls)),
    }
    # n_cls: the fused head's classes; with grad_norm the channels read through the norm (the epilogue's c_norm).
    n_cls = grad_norm.scale.shape[1] if grad_norm is not None else g.n_cls
    sizes = (batch, height, width, c_main, g.c_up, g.c_out, n_cls, g.in_h, g.in_w, g.conv_off, g.crop_top,
             g.crop_left, g.up_h, g.up_w, g.pad_top, g.pad_left)  # fmt: skip
    if m == 0 or g.c_out == 0:
        return _ConvStatic(True, m, candidates, None, "", "", sizes, flags)
    row_tiles = path == "pointer" and not pool and not d2s
    # Window-major pointer tiles of one image each where a tile's statistics or its input's normalization are per
    # image (a row tile lies in one image anyway).
    flags["PER_IMAGE"] = path == "pointer" and not row_tiles and (stats or read is not None)
    # Shapes share a tuning result when they differ only in the pixel count's power-of-two bucket.
    tune_key = ("conv", x.dtype, tuple(flags.items()), path, next_pow2(m), c_main, g.c_up, g.c_out, g.n_cls)
    weight_views = ()
    if path == "tma":
        # The descriptors read each source's rows of the packed weight viewed as (taps, c_in, c_out), so channels
        # past a source's own read as zero.
        w_rows = w_packed.view(-1, c_main + g.c_up, w_packed.shape[-1])
        views = [w_rows[:, :c_main]] + ([w_rows[:, c_main:]] if up is not None else [])
        base = w_packed.storage_offset()
        weight_views = tuple((tuple(v.shape), v.stride(), v.storage_offset() - base) for v in views)
    static = _ConvStatic(
        False, m, candidates, tune_key, path, path_reason, sizes, flags, weight_views, row_tiles, problem.sm_count
    )
    static.first = static._derive_tile(candidates[0])
    return static


def _tma_descriptors(static: _ConvStatic, tile: _ConvTile, x, up, w_packed) -> tuple:
    """Host-side descriptors over this launch's tensors: one per source over its NHWC map (row boxes), one per source
    over its rows of the packed weight (see :attr:`_ConvStatic.weight_views`)."""
    if not tile.rows:
        return None, None, None, None

    def describe(t: torch.Tensor, box: tuple[int, ...]) -> TensorDescriptor:
        return TensorDescriptor(t, list(t.shape), list(t.stride()), list(box))

    offset = w_packed.storage_offset()
    weights = [w_packed.as_strided(shape, strides, offset + delta) for shape, strides, delta in static.weight_views]
    x_desc = describe(x, tile.map_box)
    w_desc = describe(weights[0], tile.weight_box)
    if up is None:
        return x_desc, None, w_desc, None
    return x_desc, describe(up, tile.map_box), w_desc, describe(weights[1], tile.weight_box)


def _launch(
    static: _ConvStatic,
    x,
    up,
    w_packed,
    bias,
    y,
    pooled,
    head_w,
    head_b,
    *,
    slope: float,
    lo: float,
    hi: float,
    slopes: torch.Tensor | None,
    name: str,
    flops: int,
    norm_in: NormIn | None = None,
    stats: NormSpec | None = None,
    grad_mask: torch.Tensor | None = None,
    grad_norm: NormIn | None = None,
    applied: torch.Tensor | None = None,
) -> tuple | None:
    """Launch the conv kernel as ``static`` says over these tensors (and, with ``stats``, the finalize step: returns
    the (N, C) fp32 scale and shift). ``slope``, ``lo``, ``hi``, ``slopes``: the epilogue activation's.
    ``grad_mask``: the map whose ReLU derivative the epilogue applies (passed where the pooled map goes); with
    ``grad_norm`` the pre-norm map read through it: returns the (N, C_norm) gradients of its scale and shift.
    ``applied`` (``GRAD_NORM_APPLIED``): the contiguous (N, H, W, C_norm) map the read's values go to."""
    batch, c_out = static.sizes[0], static.sizes[5]
    read = norm_in if norm_in is not None else grad_norm
    in_args = read.args(w_packed) if read is not None else (w_packed, w_packed, w_packed, 0.0, 0.0, 0.0)
    c_norm = static.sizes[6]
    if grad_norm is not None and static.empty:
        return tuple(torch.zeros((batch, c_norm), dtype=stat_dtype(x.dtype), device=x.device) for _ in range(2))
    if static.empty:
        if stats is None:
            return None
        empty = alloc((batch, 0, c_out), stat_dtype(x.dtype), x.device)
        count = alloc((batch, 0), stat_dtype(x.dtype), x.device)
        return norm_scale_shift(
            empty, empty.clone(), count, stats.groups, stats.weight, stats.bias, stats.eps,
            over_batch=stats.over_batch, stats=True,
        )  # fmt: skip
    up_t = up if up is not None else x
    pool_t = pooled if pooled is not None else grad_mask if grad_mask is not None else y
    hw = head_w if head_w is not None else w_packed
    hb = head_b if head_b is not None else w_packed
    b = bias if bias is not None else w_packed
    slopes_t = slopes if slopes is not None else w_packed
    scalars = (float(slope), float(lo), float(hi), *in_args[3:])
    strides = (*x.stride(), *up_t.stride(), *y.stride(), *pool_t.stride())
    moments: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def moments_of(tile: _ConvTile) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, M2, count) buffers of a STATS launch: a row per (image, tile)."""
        if tile.tiles not in moments:
            moments[tile.tiles] = (
                alloc((batch, tile.tiles, c_out), stat_dtype(x.dtype), x.device),
                alloc((batch, tile.tiles, c_out), stat_dtype(x.dtype), x.device),
                alloc((batch, tile.tiles), stat_dtype(x.dtype), x.device),
            )
        return moments[tile.tiles]

    read_parts: dict[int, torch.Tensor] = {}

    def read_parts_of(tile: _ConvTile) -> torch.Tensor:
        """grad_norm: the per-tile sums of g * z and of g, (2, tiles per image, batch, C_norm)."""
        if tile.tiles not in read_parts:
            read_parts[tile.tiles] = alloc((2, tile.tiles, batch, c_norm), stat_dtype(x.dtype), x.device)
        return read_parts[tile.tiles]

    parts: dict[int, torch.Tensor] = {}

    def parts_of(tile: _ConvTile) -> torch.Tensor:
        """The fp32 partial sums of a split-K launch, (SPLIT_K, batch, height, width, c_out); else a stand-in."""
        if tile.split_k == 1:
            return w_packed
        if tile.split_k not in parts:
            parts[tile.split_k] = alloc((tile.split_k, *y.shape[:3], c_out), torch.float32, x.device)
        return parts[tile.split_k]

    def args_of(tile: _ConvTile) -> tuple:
        stat_args = moments_of(tile) if stats is not None else (w_packed, w_packed, w_packed)
        if grad_norm is not None:
            stat_args = (*read_parts_of(tile), applied if applied is not None else w_packed)
        return (
            x, up_t, w_packed, b, y, pool_t, hw, hb, *_tma_descriptors(static, tile, x, up, w_packed), slopes_t,
            *in_args[:3], *stat_args, parts_of(tile), *static.sizes, *scalars, tile.tiles, tile.tiles_m, *strides,
        )  # fmt: skip

    def sum_launch(tile: _ConvTile) -> tuple[tuple[int, int], tuple, dict]:
        """Grid, arguments and constexprs of a split-K launch's sum of parts (see _split_k_sum_kernel)."""
        pixels = y.shape[0] * y.shape[1] * y.shape[2]
        block_c = min(128, max(16, next_pow2(c_out)))
        grid = (triton.cdiv(pixels, SPLIT_K_SUM_PIXELS), triton.cdiv(c_out, block_c))
        args = (parts_of(tile), b, slopes_t, y, pixels, y.shape[1], y.shape[2], c_out, *scalars[:3], *y.stride())
        constexprs = {
            "HAS_BIAS": static.flags["HAS_BIAS"],
            "ACT": static.flags["ACT"],
            "SPLIT_K": tile.split_k,
            "INTERPRETER": static.flags["INTERPRETER"],
            "BLOCK_P": SPLIT_K_SUM_PIXELS,
            "BLOCK_C": block_c,
        }
        return grid, args, constexprs

    def launch(tile: _ConvTile, args: tuple) -> None:
        with launch_guard(x):
            _conv_nhwc_kernel[tile.grid](*args, **tile.constexprs, **tile.options)
            if tile.split_k > 1:
                grid, sum_args, sum_constexprs = sum_launch(tile)
                _split_k_sum_kernel[grid](*sum_args, **sum_constexprs, **SPLIT_K_SUM_OPTIONS)

    def run(cfg: dict) -> None:
        tile = static.tile(cfg)
        launch(tile, args_of(tile))

    cfg = choose_config(static.tune_key, static.candidates, run)
    tile = static.tile(cfg)
    args = args_of(tile)
    if recording():
        tensors = [t for t in (x, up, w_packed, bias, head_w, head_b, slopes, grad_mask) if t is not None]
        if norm_in is not None:
            tensors += [t for t in (norm_in.scale, norm_in.shift, norm_in.slopes) if t is not None]
        written = [t for t in (y, pooled) if t is not None]
        if stats is not None:
            written += list(moments_of(tile))
        if grad_norm is not None:
            written.append(read_parts_of(tile))
        if applied is not None:
            written.append(applied)
        if tile.split_k > 1:
            written = [parts_of(tile)]
        record_launch(
            LaunchRecord(
                name=name,
                kernel=_conv_nhwc_kernel,
                grid=tile.grid,
                flops=flops,
                bytes_read=sum(t.numel() * t.element_size() for t in tensors),
                bytes_written=sum(t.numel() * t.element_size() for t in written),
                args=args,
                constexprs=dict(tile.constexprs),
                launch_options=dict(tile.options),
                candidates=static.candidates,
                path=static.path,
                path_reason=static.path_reason,
                retile=lambda cfg: (args_of(static.tile(cfg)), dict(static.tile(cfg).constexprs)),
                persistent_tiles=tile.persistent_tiles,
            )
        )
        if tile.split_k > 1:
            grid, sum_args, sum_constexprs = sum_launch(tile)
            part = parts_of(tile)
            record_launch(
                LaunchRecord(
                    name=f"{name}.split_k_sum",
                    kernel=_split_k_sum_kernel,
                    grid=grid,
                    flops=0,
                    bytes_read=part.numel() * 4
                    + sum(t.numel() * t.element_size() for t in (bias, slopes) if t is not None),
                    bytes_written=y.numel() * y.element_size(),
                    args=sum_args,
                    constexprs=sum_constexprs,
                    launch_options=dict(SPLIT_K_SUM_OPTIONS),
                )
            )
    if not is_dry_run():
        launch(tile, args)
    if grad_norm is not None:
        return _sum_read_parts(read_parts_of(tile), f"{name}.sum", x)
    if stats is None:
        return None
    mean, m2, count = moments_of(tile)
    return norm_scale_shift(
        mean, m2, count, stats.groups, stats.weight, stats.bias, stats.eps, over_batch=stats.over_batch, stats=True
    )


def _sum_read_parts(parts: torch.Tensor, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of a normalized read's scale and shift, (N, C) each: a launch's per-tile sums of ``g * z`` and
    ``g``, ``parts`` (2, tiles per image, N, C), added over the tiles in a fixed order (no atomics: two runs give the
    same bits). The conv's input gradient (``grad_norm``) and the pool's backward (``norm_read``) use it."""
    from fastunet.kernels.conv_grad import _sum_splits_kernel

    _, tiles, batch, c_norm = parts.shape
    sums = tuple(alloc((batch, c_norm), parts.dtype, parts.device) for _ in range(2))
    elements, block = batch * c_norm, 1024
    grid = (triton.cdiv(elements, block),)
    launches = [(parts[i], sums[i], tiles, elements, 0, c_norm) for i in range(2)]
    if recording():
        for args in launches:
            record_launch(
                LaunchRecord(
                    name=name,
                    kernel=_sum_splits_kernel,
                    grid=grid,
                    flops=0,
                    bytes_read=tiles * elements * parts.element_size(),
                    bytes_written=elements * parts.element_size(),
                    args=args,
                    constexprs={"BLOCK": block},
                    launch_options={"num_warps": 4, "num_stages": 1},
                )
            )
    if not is_dry_run():
        with launch_guard(x):
            for args in launches:
                _sum_splits_kernel[grid](*args, BLOCK=block, num_warps=4, num_stages=1)
    return sums


@dataclasses.dataclass(eq=False)
class _PreparedConv:
    """A validated :func:`conv2d_nhwc` signature: its output sizes, fused work and record name, and its derived
    launches per second source as the conv reads it (an upsampled map is a fresh buffer of the upsample launcher's:
    its layout is read per call)."""

    geometry: _Geometry
    out_shape: tuple[int, int, int, int]
    pooled_shape: tuple[int, int, int, int] | None
    packed_k: bool
    act: str  # the epilogue's activation ("none" before a norm with data statistics)
    name: str
    flops: int
    launches: dict = dataclasses.field(default_factory=dict)


# Derived launches keyed by launch signature (see LaunchCache): a forward makes a few dozen distinct ones.
_CONV_LAUNCHES = LaunchCache(maxsize=1024)
# Second-source layouts kept per signature: one in practice (the upsample launcher's contiguous map).
_MAX_SOURCE_LAYOUTS = 8
_PLAIN_NUMBERS = (int, float)


def _signature(norm_in: NormIn | None) -> tuple | None:
    return norm_in.signature() if norm_in is not None else None


def _environment() -> tuple:
    """What this module's launch choices read beyond :func:`~fastunet.kernels._common.launch_environment`: the kernel
    mode the module was imported for and the span rule that picks 64-bit offsets (module globals, looked up per
    call so that a substitute takes effect)."""
    return INTERPRET, element_span, launch_environment()


def conv2d_nhwc(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ksize: int = 3,
    padding: int | None = None,
    up: torch.Tensor | None = None,
    up_mode: str | None = None,
    align_corners: bool = False,
    join: str = "pad",
    activation: str = "relu",
    slope: float = 0.0,
    lo: float = 0.0,
    hi: float = 0.0,
    slopes: torch.Tensor | None = None,
    pool: bool = False,
    head_weight: torch.Tensor | None = None,
    head_bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    stride: int = 1,
    norm_in: NormIn | None = None,
    norm: NormSpec | None = None,
    polyphase: tuple[int, int] | None = None,
    head_map: bool = False,
    grad_mask: torch.Tensor | None = None,
    grad_norm: NormIn | None = None,
    grad_norm_applied: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | NormIn | tuple | None]:
    """``ksize x ksize`` convolution (stride 1 or 2) of an NHWC view, with its fused neighbours.

    Args:
        x: (N, H, W, C_main) view, any strides (an NCHW tensor permuted to NHWC is read in place).
        w_packed: (ksize * ksize * (C_main + C_up), C_out) from :func:`pack_conv_weight`.
        bias: (C_out,) or None.
        ksize: odd, or 2 with stride 2 and padding 0 (each output pixel reads its own 2x2 block: output
            ``H // 2 x W // 2``; the input gradient of a 2x2 stride-2 transposed conv).
        padding: zero padding on every side, ``ksize // 2`` (the default: same size) or 0 (a valid conv: the
            output is ``ksize - 1`` rows and columns smaller); 0 (the default) for ksize 2.
        up: optional (N, h, w, C_up) second input whose channels follow x's (the decoder's ``cat([skip, up])``).
        up_mode: ``"direct"`` (up is already at full size, e.g. a transposed-conv output), ``"nearest"`` or
            ``"bilinear"`` (2x upsampling: one :func:`fastunet.kernels.upsample.upsample2x_nhwc` launch writes the
            upsampled map, then the conv reads it directly).
        align_corners: bilinear ``up_mode`` only, as in ``F.interpolate``.
        join: how the upsampled map and the skip ``x`` meet: ``"pad"``: the upsampled map zero-padded, centered, to
            (H, W) (one row or column more than the skip: the first one dropped, as a negative centered pad does);
            ``"replicate"``: padded at the bottom/right to (H, W) by repeating its last row and column;
            ``"crop"``: ``x`` center-cropped to the upsampled map's size (the conv's input is then that size).
        activation: ``"relu"``, ``"leaky_relu"`` (negative ``slope``), ``"prelu"`` (``slopes``: (C_out,)),
            ``"silu"``, ``"clamp"`` (to ``[lo, hi]``) or ``"none"``, applied after the bias (before the pool and
            the fused head).
        pool: also return the 2x2 max-pooled map (floor mode, like ``nn.MaxPool2d(2)``).
        head_weight, head_bias: (C_out, n_cls) and (n_cls,): fuse a 1x1 conv; the return value is then the
            logits, and the C_out feature map is not stored (unless ``head_map``).
        out: optional destination (N, H_out, W_out, C_out or n_cls) view, e.g. an NCHW tensor permuted to NHWC.
        stride: 1, or 2 (a down-sampling conv: output ``(H + 2 padding - ksize) // 2 + 1`` as in torch; one source).
        norm_in: x is a stored pre-norm map: the loader reads ``act(x * scale + shift)`` (see
            :class:`~fastunet.kernels.stats.NormIn`), zero padding after it.
        norm: a norm with data statistics follows the conv (InstanceNorm, GroupNorm): the conv stores the pre-norm
            map (bias added, no activation) and its per-tile moments, one more launch turns them into per-(image,
            channel) scale and shift; ``activation`` is then the one after the norm, applied by whatever reads the
            map. Not with ``pool`` or a head (their inputs would need the normalized map).
        polyphase: ``(H, W)``: run the input gradient of a 3x3 stride-2 padding-1 conv over an H x W map instead:
            ``x`` is that conv's output gradient, ``(N, ceil(H / 2), ceil(W / 2), C)``, ``w_packed`` its flipped
            weight (:func:`fastunet.kernels.conv_grad.flip_conv_weight`), the result ``(N, H, W, C_out)``; each of
            its four phases (row and column parity) sums only its own taps (1, 2, 2 or 4). ``ksize`` 3,
            ``padding`` 1, ``stride`` 1, one source, no bias, activation "none", nothing else fused.
        head_map: with a fused head (not with ``pool``), the epilogue also stores the activated C_out map (what a
            training forward keeps for the head's weight gradient): returned in place of the pooled map.
        grad_mask: the launch is a gradient (an input gradient of a conv) and ``grad_mask``, (N, H_out, W_out, C_out)
            any strides, the map ``a = relu(z)`` a ReLU stored at those pixels and channels: the output is
            ``where(a <= 0, 0, g)``, the ReLU's derivative applied as ``threshold_backward`` does (a NaN ``a`` passes
            ``g``), in the epilogue instead of a launch of its own (a mask laid out unlike the output is copied
            into the output's layout first). Activation "none", one tile's K whole (no split K), no pool, head or
            norm.
        grad_norm: with ``grad_mask``, which is then ``z``, (N, H_out, W_out, C_norm) any strides with C_norm <=
            C_out: the conv whose input gradient this is read the first C_norm channels of its input as ``a =
            act(z * scale + shift)`` (``grad_norm``: that :class:`~fastunet.kernels.stats.NormIn`; ReLU,
            LeakyReLU, clamp or no activation). Those channels of the output are then z's gradient through the
            read, ``g * scale`` with ``g = act'(u) * dx`` (each activation's derivative as torch's backward of it
            gives it), the others ``dx`` as it is; the launch also sums ``g * z`` and ``g`` over each image's
            pixels (per tile, then the tiles in a fixed order), the gradients of the read's scale and shift.
            Stride 1, one tile a program's K (no split K), nothing else fused.
        grad_norm_applied: with ``grad_norm``, the epilogue also writes the values the forward read, ``act(z * scale +
            shift)`` of those C_norm channels, rounded to the map's dtype as
            :func:`~fastunet.kernels.stats.normalize_nhwc` rounds them, to a new contiguous (N, H_out, W_out, C_norm)
            map: the conv's weight gradient reads it, with no normalize launch (which would read z once more).

    Returns:
        (y, pooled): y in NHWC (or ``out``), pooled None unless ``pool`` (with ``head_map``: the activated map, NHWC,
        under the logits y); with ``norm``: (z, how to read it), the pre-norm map and the
        :class:`~fastunet.kernels.stats.NormIn` (scale, shift and the activation) a consumer passes as ``norm_in``;
        with ``grad_norm``: (y, (grad_scale, grad_shift)), two fp32 (N, C_norm) tensors (fp64 for float64 maps),
        and with ``grad_norm_applied`` (y, (grad_scale, grad_shift, applied)).

    What the launch comes to for a signature (sizes, strides, dtypes, devices, alignment, the arguments and this
    thread's switches) is derived once and reused (:class:`~fastunet.kernels._common.LaunchCache`); each call still
    checks that its tensors can run in the current mode and that ``out`` shares no memory with an input.
    """
    key = None
    numbers = type(slope) in _PLAIN_NUMBERS and type(lo) in _PLAIN_NUMBERS and type(hi) in _PLAIN_NUMBERS
    if numbers and type(ksize) is int and type(stride) is int and (padding is None or type(padding) is int):
        try:
            key = (
                tensor_facts(x), tensor_facts(w_packed), tensor_meta(bias), tensor_facts(up), tensor_meta(head_weight),
                tensor_meta(head_bias), tensor_meta(slopes), tensor_meta(out), ksize, padding, up_mode,
                align_corners, join, activation, slope, lo, hi, pool, stride, _signature(norm_in),
                None if norm is None else (norm.groups, type(norm.groups), tensor_meta(norm.weight),
                                           tensor_meta(norm.bias)),
                polyphase, head_map, tensor_meta(grad_mask), _signature(grad_norm), grad_norm_applied, _environment(),
            )  # fmt: skip
        except (AttributeError, RuntimeError):  # not a tensor, or one without storage: validated and derived anew
            key = None
    prepared = _CONV_LAUNCHES.get(key) if key is not None else None
    checked = prepared is None
    if checked:
        prepared = _prepare_conv2d(
            x, w_packed, bias, ksize=ksize, padding=padding, up=up, up_mode=up_mode, align_corners=align_corners,
            join=join, activation=activation, lo=lo, hi=hi, slopes=slopes, pool=pool, head_weight=head_weight,
            head_bias=head_bias, out=out, stride=stride, norm_in=norm_in, norm=norm, polyphase=polyphase,
            head_map=head_map,
            grad_mask=grad_mask,
            grad_norm=grad_norm,
            grad_norm_applied=grad_norm_applied,
        )  # fmt: skip
        if key is not None:
            _CONV_LAUNCHES.put(key, prepared)
    if slopes is not None:
        slopes = slopes.contiguous()
    if head_weight is not None:
        head_weight, head_bias = head_weight.contiguous(), head_bias.contiguous()
    if not checked:
        # What a signature cannot vouch for: whether these tensors run in this thread's mode (a dry run, the
        # interpreter, a GPU) and whether the output shares memory with an input.
        check_runnable(x, "conv2d_nhwc input")
        if up is not None:
            check_runnable(up, "conv2d_nhwc upsampled input")
        if out is not None:
            _check_no_overlap(out, [x, up, w_packed, bias, head_weight, head_bias, slopes, grad_mask])
    if out is None:
        out = alloc(prepared.out_shape, x.dtype, x.device)
    if grad_norm is None and grad_mask is not None and grad_mask.stride() != out.stride():
        # The ReLU's map is read at the output's offsets (z, under grad_norm, at its own strides).
        grad_mask = torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device=out.device).copy_(grad_mask)
    pooled = alloc(prepared.pooled_shape, x.dtype, x.device) if prepared.pooled_shape is not None else None
    if head_map:  # written where the pooled map would be (a head with its map has no pool)
        pooled = alloc((*prepared.out_shape[:3], prepared.geometry.c_out), x.dtype, x.device)
    head = False if head_weight is None else HEAD_MAP.value if head_map else HEAD_LOGITS.value
    source = None
    if up is not None and up_mode != "direct":
        up = upsample2x_nhwc(up, up_mode, align_corners)
        source = tensor_facts(up)
    static = prepared.launches.get(source)
    if static is None:
        static = _conv_static(
            x, up, w_packed, geometry=prepared.geometry, ksize=ksize, packed_k=prepared.packed_k, act=prepared.act,
            has_bias=bias is not None, pool=prepared.pooled_shape is not None, head=head, d2s=False,
            stride=stride, norm_in=norm_in, stats=norm is not None, polyphase=polyphase is not None,
            grad_mask=grad_mask is not None, grad_norm=grad_norm, grad_norm_applied=grad_norm_applied,
        )  # fmt: skip
        if len(prepared.launches) >= _MAX_SOURCE_LAYOUTS:
            prepared.launches.clear()
        prepared.launches[source] = static
    epilogue = (slope, lo, hi, slopes) if norm is None else (0.0, 0.0, 0.0, None)
    applied = alloc((*out.shape[:3], grad_mask.shape[3]), x.dtype, x.device) if grad_norm_applied else None
    scale_shift = _launch(
        static, x, up, w_packed, bias.contiguous() if bias is not None else None, out, pooled, head_weight, head_bias,
        slope=epilogue[0], lo=epilogue[1], hi=epilogue[2], slopes=epilogue[3], name=prepared.name,
        flops=prepared.flops, norm_in=norm_in, stats=norm, grad_mask=grad_mask, grad_norm=grad_norm, applied=applied,
    )  # fmt: skip
    if grad_norm is not None:
        return out, scale_shift if applied is None else (*scale_shift, applied)
    if norm is not None:
        scale, shift, mean, var = scale_shift
        return out, NormIn(scale, shift, activation, float(slope), float(lo), float(hi), slopes, mean, var)
    return out, pooled


def _prepare_conv2d(
    x, w_packed, bias, *, ksize, padding, up, up_mode, align_corners, join, activation, lo, hi, slopes, pool,
    head_weight, head_bias, out, stride, norm_in, norm, polyphase=None, head_map=False, grad_mask=None,
    grad_norm=None, grad_norm_applied=False,
) -> _PreparedConv:  # fmt: skip
    """Validate a :func:`conv2d_nhwc` call (every check, in order, with the error a bad input gets) and derive its
    sizes (see :class:`_PreparedConv`)."""
    _check_nhwc(x, "conv2d_nhwc input")
    if ksize < 1 or ksize % 2 != 1 and ksize != 2:
        raise ValueError(f"ksize must be odd, or 2 with stride 2 and padding 0, got {ksize}")
    padding = (0 if ksize == 2 else ksize // 2) if padding is None else padding
    # The one even kernel: 2x2 with stride 2 and padding 0 (each output pixel reads its own 2x2 block: the input
    # gradient of a 2x2 stride-2 transposed conv).
    if ksize == 2 and (stride, padding) != (2, 0):
        raise ValueError(
            f"a 2x2 conv runs with stride 2 and padding 0 only (output H // 2 x W // 2), got stride {stride}, "
            f"padding {padding}"
        )
    if ksize != 2 and padding not in (0, ksize // 2):
        raise ValueError(
            f"padding must be {ksize // 2} (same size) or 0 (valid) for a {ksize}x{ksize} conv, got {padding}"
        )
    if join not in JOINS:
        raise ValueError(f"join must be one of {list(JOINS)}, got {join!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if activation == "clamp" and not lo <= hi:
        raise ValueError(f"a clamp needs lo <= hi, got [{lo}, {hi}]")
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    if stride != 1 and up is not None:
        raise ValueError("a strided conv reads one source (no upsampled input)")
    if norm is not None and (pool or head_weight is not None):
        raise ValueError(
            "a conv followed by a norm with data statistics stores the pre-norm map: no fused pool or head (their "
            "inputs are the normalized map)"
        )
    if head_map and (head_weight is None or pool):
        raise ValueError(
            f"head_map stores the map under a fused head: it needs head_weight and no pool, got "
            f"head_weight={'a tensor' if head_weight is not None else None}, pool={pool}"
        )
    if norm_in is not None:
        norm_in.check(x, "conv2d_nhwc input")
    batch, height, width, c_main = x.shape
    in_h, in_w = height, width
    c_up = up_h = up_w = pad_top = pad_left = crop_top = crop_left = 0
    if up is not None:
        _check_nhwc(up, "conv2d_nhwc upsampled input")
        if up_mode not in UP_MODES:
            raise ValueError(f"up_mode must be one of {list(UP_MODES)}, got {up_mode!r}")
        if up.shape[0] != batch or up.dtype != x.dtype or up.device != x.device:
            raise ValueError(
                f"upsampled input must match the skip map's batch, dtype and device: got {tuple(up.shape)} "
                f"{up.dtype} {up.device} against {tuple(x.shape)} {x.dtype} {x.device}"
            )
        low_h, low_w, c_up = up.shape[1], up.shape[2], up.shape[3]
        up_h, up_w = (low_h, low_w) if up_mode == "direct" else (2 * low_h, 2 * low_w)
        # The pad join takes an upsampled map one row or column larger than the skip (strided down-sampling of an
        # odd size rounds up): a negative centered pad, the first row or column dropped, as center_pad does.
        slack = 1 if join == "pad" else 0
        if up_h > height + slack or up_w > width + slack:
            raise ValueError(f"upsampled map ({up_h}x{up_w}) is larger than the skip map ({height}x{width})")
        if align_corners and up_mode != "bilinear":
            raise ValueError(f"align_corners applies to bilinear upsampling only, got up_mode={up_mode!r}")
        if join == "pad":
            pad_top, pad_left = (height - up_h) // 2, (width - up_w) // 2
        elif join == "crop":
            crop_top, crop_left = (height - up_h) // 2, (width - up_w) // 2
            in_h, in_w = up_h, up_w
        elif up_h == 0 or up_w == 0:
            raise ValueError(f"replicate join: an empty upsampled map ({up_h}x{up_w}) has no row to repeat")
    elif up_mode is not None:
        raise ValueError("up_mode given without an upsampled input")
    # Torch's (H + 2 padding - ksize) // stride + 1: the rows and columns a conv's window loses at stride 1.
    shrink = ksize - 1 - 2 * padding
    out_h, out_w = (in_h - shrink - 1) // stride + 1, (in_w - shrink - 1) // stride + 1
    if polyphase is not None:
        out_h, out_w = _check_polyphase(polyphase, x, ksize, padding, stride, up, pool, head_weight, norm, norm_in,
                                        activation, bias)  # fmt: skip
    if in_h - shrink < 1 or in_w - shrink < 1:
        raise ValueError(
            f"a {ksize}x{ksize} conv with padding {padding} needs an input of at least {shrink + 1}x{shrink + 1}, "
            f"got {in_h}x{in_w}"
        )
    c_in = c_main + c_up
    if w_packed.dim() != 2 or w_packed.shape[0] != ksize * ksize * c_in:
        raise ValueError(
            f"packed weight: expected ({ksize * ksize * c_in}, C_out) for {c_in} input channels and a "
            f"{ksize}x{ksize} kernel, got {tuple(w_packed.shape)}"
        )
    c_out = w_packed.shape[1]
    if norm is not None:
        if not isinstance(norm.groups, int) or norm.groups < 1 or c_out % norm.groups:
            raise ValueError(
                f"norm groups must be a positive divisor of the {c_out} output channels, got {norm.groups}"
            )
        for t, what in ((norm.weight, "norm weight"), (norm.bias, "norm bias")):
            if t is not None and (t.shape != (c_out,) or t.device != x.device):
                raise ValueError(f"{what}: expected shape ({c_out},) on {x.device}, got {tuple(t.shape)} on {t.device}")
    tensors = ((w_packed, "weight"), (bias, "bias"), (head_weight, "head weight"), (head_bias, "head bias"),
               (slopes, "PReLU slopes"))  # fmt: skip
    for t, what in tensors:
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{what}: expected {x.dtype} on {x.device}, got {t.dtype} on {t.device}")
    if bias is not None and bias.shape != (c_out,):
        raise ValueError(f"bias: expected shape ({c_out},), got {tuple(bias.shape)}")
    if (activation == "prelu") != (slopes is not None):
        raise ValueError("PReLU slopes are given with the 'prelu' activation, and only with it")
    if slopes is not None:
        if slopes.shape != (c_out,):
            raise ValueError(
                f"PReLU slopes: expected shape ({c_out},) (one slope per channel), got {tuple(slopes.shape)}"
            )
        slopes = slopes.contiguous()
    if not w_packed.is_contiguous():
        raise ValueError("packed weight must be contiguous")
    n_cls = 0
    if head_weight is not None:
        if head_bias is None or head_weight.dim() != 2 or head_weight.shape[0] != c_out:
            raise ValueError(f"head: expected a ({c_out}, n_cls) weight and a bias, got {tuple(head_weight.shape)}")
        if c_out > MAX_HEAD_CHANNELS:
            raise ValueError(f"fused head needs C_out <= {MAX_HEAD_CHANNELS}, got {c_out}")
        n_cls = head_weight.shape[1]
        if n_cls > MAX_HEAD_CLASSES:
            raise ValueError(f"fused head needs at most {MAX_HEAD_CLASSES} classes, got {n_cls}")
        if head_bias.shape != (n_cls,):
            raise ValueError(f"head bias: expected shape ({n_cls},), got {tuple(head_bias.shape)}")
        head_weight, head_bias = head_weight.contiguous(), head_bias.contiguous()
    y_channels = n_cls if head_weight is not None else c_out
    if out is not None:
        if out.shape != (batch, out_h, out_w, y_channels) or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(
                f"out: expected shape {(batch, out_h, out_w, y_channels)} {x.dtype} on {x.device}, "
                f"got {tuple(out.shape)} {out.dtype} on {out.device}"
            )
        if out.numel() and _has_internal_overlap(out):
            raise RuntimeError(
                "out: unsupported operation: more than one element of the written-to tensor refers to a single "
                f"memory location (shape {tuple(out.shape)}, strides {out.stride()}); pass a tensor whose elements "
                "do not overlap (clone() an expanded one)"
            )
        _check_no_overlap(out, [x, up, w_packed, bias, head_weight, head_bias, slopes, grad_mask])
    if grad_norm is not None:
        _check_grad_norm(grad_norm, grad_mask, (batch, out_h, out_w, c_out), stride, polyphase, norm_in)
    if grad_norm_applied is not False and (grad_norm_applied is not True or grad_norm is None):
        raise ValueError(
            f"grad_norm_applied: expected a bool, True only with grad_norm (the read whose values it writes), got "
            f"{grad_norm_applied!r} with grad_norm={'None' if grad_norm is None else 'a NormIn'}"
        )
    if grad_mask is not None:
        shape = (batch, out_h, out_w, c_out if grad_norm is None else grad_mask.shape[-1])
        _check_grad_mask(grad_mask, shape, x, activation, pool, head_weight, norm)
    packed_k = up is None and ksize > 1 and c_main < 16 and norm_in is None and polyphase is None
    pixels = batch * out_h * out_w
    name = (
        f"conv{ksize}x{ksize}"
        + ("/2" if stride == 2 else "")
        + ("/2.input_grad" if polyphase is not None else "")
        + ("+norm_in" if norm_in is not None else "")
        + ("+up" if up is not None else "")
        + ("+pool" if pool else "")
        + ("+head" if head_weight is not None else "")
        + ("+stats" if norm is not None else "")
        + ("+norm_read" if grad_norm is not None else "+mask" if grad_mask is not None else "")
        + ("+applied" if grad_norm_applied else "")
    )
    geometry = _Geometry(
        c_out,
        out_h,
        out_w,
        in_h,
        in_w,
        ksize // 2 - padding,
        crop_top,
        crop_left,
        c_up,
        n_cls,
        up_h,
        up_w,
        pad_top,
        pad_left,
        up is not None and join == "replicate",
    )  # fmt: skip
    return _PreparedConv(
        geometry,
        (batch, out_h, out_w, y_channels),
        (batch, out_h // 2, out_w // 2, c_out) if pool else None,
        packed_k,
        activation if norm is None else "none",
        name,
        # The polyphase input gradient: the strided conv's multiply-adds (9 taps of each of its output pixels).
        2 * (batch * height * width if polyphase is not None else pixels) * c_out * ksize * ksize * c_in
        + 2 * pixels * c_out * n_cls,
    )


def _check_grad_mask(grad_mask, shape, x, activation, pool, head_weight, norm) -> None:
    """The error a :func:`conv2d_nhwc` ``grad_mask`` earns, if any."""
    if not isinstance(grad_mask, torch.Tensor) or tuple(grad_mask.shape) != shape:
        got = tuple(grad_mask.shape) if isinstance(grad_mask, torch.Tensor) else type(grad_mask).__name__
        raise ValueError(f"grad_mask: expected the output's shape {shape} (the ReLU's stored map), got {got}")
    if grad_mask.dtype != x.dtype or grad_mask.device != x.device:
        raise ValueError(
            f"grad_mask: expected {x.dtype} on {x.device} (the input's), got {grad_mask.dtype} on {grad_mask.device}"
        )
    fused = [what for what, on in (("a pool", pool), ("a head", head_weight is not None), ("a norm", norm is not None),
             (f"the {activation} activation", activation != "none")) if on]  # fmt: skip
    if fused:
        raise ValueError(f"grad_mask: a masked gradient fuses nothing else, got {', '.join(fused)}")


def _check_grad_norm(grad_norm, z, shape, stride, polyphase, norm_in) -> None:
    """The error a :func:`conv2d_nhwc` ``grad_norm`` earns, if any (``z``: the ``grad_mask`` it comes with)."""
    if not isinstance(grad_norm, NormIn):
        raise ValueError(
            f"grad_norm: expected a NormIn (the forward's normalized read), got {type(grad_norm).__name__}"
        )
    if not isinstance(z, torch.Tensor) or z.dim() != 4:
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"grad_norm: grad_mask must be the pre-norm map z, a 4-D (N, H, W, C_norm) view, got {got}")
    if tuple(z.shape[:3]) != shape[:3] or not 1 <= z.shape[3] <= shape[3]:
        raise ValueError(
            f"grad_norm: z must be ({shape[0]}, {shape[1]}, {shape[2]}, C_norm) with 1 <= C_norm <= {shape[3]} (the "
            f"output's first channels), got {tuple(z.shape)}"
        )
    grad_norm.check(z, "grad_norm")
    if grad_norm.activation not in ("relu", "leaky_relu", "clamp", "none"):
        raise ValueError(
            f"grad_norm: the read's activation must be relu, leaky_relu, clamp or none, got {grad_norm.activation!r}"
        )
    fused = [what for what, on in (("stride 2", stride != 1), ("a polyphase launch", polyphase is not None),
             ("a normalized input", norm_in is not None)) if on]  # fmt: skip
    if fused:
        raise ValueError(
            f"grad_norm: an input gradient's epilogue over a plain stride-1 tiling, got {', '.join(fused)}"
        )


def _check_polyphase(
    size, x, ksize, padding, stride, up, pool, head_weight, norm, norm_in, activation, bias
) -> tuple[int, int]:  # fmt: skip
    """The output size of a polyphase input-gradient launch (see :func:`conv2d_nhwc`), or the error its arguments
    earn."""
    if not (isinstance(size, tuple) and len(size) == 2 and all(type(v) is int and v >= 1 for v in size)):
        raise ValueError(f"polyphase: expected the strided conv's input size (H, W) as two positive ints, got {size!r}")
    if (ksize, padding, stride) != (3, 1, 1):
        raise ValueError(
            f"polyphase: the input gradient of a 3x3 stride-2 padding-1 conv runs with ksize 3, padding 1, stride 1; "
            f"got ksize {ksize}, padding {padding}, stride {stride}"
        )
    fused = [what for what, on in (("an upsampled input", up is not None), ("a pool", pool), ("a head",
             head_weight is not None), ("a norm", norm is not None), ("a normalized input", norm_in is not None),
             ("a bias", bias is not None), (f"the {activation} activation", activation != "none")) if on]  # fmt: skip
    if fused:
        raise ValueError(f"polyphase: the input gradient fuses nothing, got {', '.join(fused)}")
    height, width = size
    expected = ((height + 1) // 2, (width + 1) // 2)
    if tuple(x.shape[1:3]) != expected:
        raise ValueError(
            f"polyphase: a stride-2 conv over {height}x{width} has a {expected[0]}x{expected[1]} output gradient, "
            f"got {tuple(x.shape)}"
        )
    return height, width


_CONV_TRANSPOSE_LAUNCHES = LaunchCache(maxsize=256)


def conv_transpose2x2_nhwc(
    x: torch.Tensor, w_packed: torch.Tensor, bias4: torch.Tensor | None = None, *, norm_in: NormIn | None = None
) -> torch.Tensor:
    """ConvTranspose2d(kernel 2, stride 2) of an NHWC view as one GEMM with a depth-to-space store.

    Args:
        x: (N, h, w, C_in) view.
        w_packed: (C_in, 4 * C_out) from :func:`pack_conv_transpose_weight`.
        bias4: the (C_out,) bias repeated 4 times, or None.
        norm_in: x is a stored pre-norm map, read as ``act(x * scale + shift)`` (see :func:`conv2d_nhwc`).

    Returns:
        (N, 2h, 2w, C_out) NHWC tensor.
    """
    try:
        key = (tensor_facts(x), tensor_facts(w_packed), tensor_meta(bias4), _signature(norm_in), _environment())
    except (AttributeError, RuntimeError):  # not a tensor, or one without storage: validated and derived anew
        key = None
    static = _CONV_TRANSPOSE_LAUNCHES.get(key) if key is not None else None
    if static is None:
        static = _prepare_conv_transpose(x, w_packed, bias4, norm_in)
        if key is not None:
            _CONV_TRANSPOSE_LAUNCHES.put(key, static)
    else:
        check_runnable(x, "conv_transpose2x2_nhwc input")
    batch, h, w, c_in = x.shape
    c_out4 = w_packed.shape[1]
    y = alloc((batch, 2 * h, 2 * w, c_out4 // 4), x.dtype, x.device)
    _launch(
        static,
        x,
        None,
        w_packed,
        bias4.contiguous() if bias4 is not None else None,
        y,
        None,
        None,
        None,
        slope=0.0,
        lo=0.0,
        hi=0.0,
        slopes=None,
        name="conv_transpose2x2" + ("+norm_in" if norm_in is not None else ""),
        flops=2 * batch * h * w * c_in * c_out4,
        norm_in=norm_in,
    )
    return y


def _prepare_conv_transpose(x, w_packed, bias4, norm_in) -> _ConvStatic:
    """Validate a :func:`conv_transpose2x2_nhwc` call (every check, in order) and derive its launch."""
    _check_nhwc(x, "conv_transpose2x2_nhwc input")
    batch, h, w, c_in = x.shape
    if w_packed.dim() != 2 or w_packed.shape[0] != c_in or w_packed.shape[1] % 4:
        raise ValueError(f"packed weight: expected ({c_in}, 4 * C_out), got {tuple(w_packed.shape)}")
    if w_packed.dtype != x.dtype or w_packed.device != x.device:
        raise ValueError(f"weight: expected {x.dtype} on {x.device}, got {w_packed.dtype} on {w_packed.device}")
    c_out4 = w_packed.shape[1]
    if norm_in is not None:
        norm_in.check(x, "conv_transpose2x2_nhwc input")
    if bias4 is not None:
        if bias4.shape != (c_out4,) or bias4.dtype != x.dtype or bias4.device != x.device:
            raise ValueError(
                f"bias4: expected the bias repeated 4 times, shape ({c_out4},) {x.dtype} on {x.device}, "
                f"got {tuple(bias4.shape)} {bias4.dtype} on {bias4.device}"
            )
    return _conv_static(
        x, None, w_packed, geometry=_Geometry(c_out4, h, w, h, w), ksize=1, packed_k=False, act="none",
        has_bias=bias4 is not None, pool=False, head=False, d2s=True, norm_in=norm_in,
    )  # fmt: skip


__all__ = [
    "ACTIVATIONS",
    "INTERPRET",
    "JOINS",
    "MAX_HEAD_CHANNELS",
    "MAX_HEAD_CLASSES",
    "conv2d_nhwc",
    "conv_transpose2x2_nhwc",
    "pack_conv_transpose_weight",
    "pack_conv_weight",
    "ConvProblem",
    "candidate_configs",
    "check_weight_addressable",
    "choose_load_path",
    "pick_config",
]
