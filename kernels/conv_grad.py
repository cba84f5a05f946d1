"""Weight and bias gradients of a stride-1 convolution over NHWC maps: ``dW = A^T dZ`` and ``db = sum_p dZ``.

``A`` is the forward loader's implicit im2col of the conv's input (rows: output pixels; columns: (tap, input
channel)), ``dZ`` the gradient of the conv's output before its activation. The reduction runs over every output
pixel of the batch (10^6 and more at 512x512), so it is split: each program reduces one slice of the output rows
for one (tap, channel block) x (output-channel block) tile of ``dW`` into an fp32 partial (fp64 for float64 maps, under
the interpreter), and a second launch sums
the partials of each element in a fixed order. No atomics: two runs give the same bits. The bias gradient's
partials come from programs of their own in the same launch, which read only ``dZ``.

A decoder conv that reads two sources (the skip map and the upsampled map, never concatenated) has
``dW = [A_skip | A_up]^T dZ``: its gradient is two launches of this kernel, one per source, each writing its rows
(the ``row_offset`` argument).

``dW`` comes in the forward's packed layout, ``(k * k * c_in, c_out)`` with row ``tap * c_in + channel`` (see
:func:`fastunet.kernels.conv.pack_conv_weight`), in fp32 (fp64 for float64 maps).

Input gradients run on the forward conv kernel (:func:`fastunet.kernels.conv.conv2d_nhwc`, no activation, no bias),
no kernel of their own: the input gradient of a stride-1 "same" conv is the same conv of ``dZ`` with the taps
flipped and the input and output channels swapped (:func:`flip_conv_weight`, :func:`conv2d_input_grad_nhwc`).
The 2x2 stride-2 transposed conv's input gradient is a 2x2 stride-2 conv of its output gradient, padding 0
(:func:`conv_transpose2x2_input_grad_nhwc`); its weight gradient is four 1x1 weight gradients, one per output phase,
in one launch (``PHASES``, :func:`conv_transpose2x2_weight_grad_nhwc`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from fastunet.kernels._common import (
    INTERPRET,
    LaunchRecord,
    alloc,
    capability,
    check_runnable,
    dot_flags,
    element_span,
    is_dry_run,
    launch_guard,
    mma,
    next_pow2,
    record_launch,
    recording,
    requested_load_path,
    sm_count,
    stat_dtype,
)
from fastunet.kernels.conv import _tma_problem, conv2d_nhwc


@triton.jit
def _load_dz(ptrs, lanes, g_end, n_mask, EVEN_W: tl.constexpr, EVEN_N: tl.constexpr):
    """A step's (BLOCK_P, BLOCK_N) block of dz, lanes from ``g_end`` on and channels past c_out zero. ``EVEN_W``
    (the width a multiple of BLOCK_P: no lane past a row's end) and ``EVEN_N`` drop those masks."""
    if EVEN_W:
        if EVEN_N:
            g = tl.load(ptrs)
        else:
            g = tl.load(ptrs, mask=n_mask[None, :], other=0.0)
    else:
        if EVEN_N:
            g = tl.load(ptrs, mask=(lanes < g_end)[:, None], other=0.0)
        else:
            g = tl.load(ptrs, mask=(lanes < g_end)[:, None] & n_mask[None, :], other=0.0)
    return g


@triton.jit
def _next_block(x0, oy, img, out_w, out_h, BLOCK_P: tl.constexpr):
    """The next step's pixel block: BLOCK_P pixels on along the row, then the next row, then the next image."""
    x0 += BLOCK_P
    next_row = x0 >= out_w
    x0 = tl.where(next_row, 0, x0)
    oy += next_row.to(tl.int32)
    next_img = oy >= out_h
    oy = tl.where(next_img, 0, oy)
    img += next_img.to(tl.int32)
    return x0, oy, img


@triton.jit
def _weight_grad_partial_kernel(
    x_ptr,  # (batch, in_h, in_w, c_in) view: the conv's input
    dz_ptr,  # (batch, out_h, out_w, c_out) view: gradient of the conv's output
    x_desc,  # TMA only: descriptor over x, box (1, 1, BLOCK_P, BLOCK_C)
    dz_desc,  # TMA only: descriptor over dz, box (1, 1, BLOCK_P, BLOCK_N)
    part_ptr,  # (splits, rows, c_out) fp32
    bias_part_ptr,  # (splits, c_out) fp32
    in_h,
    in_w,
    out_h,
    out_w,
    c_in,
    c_out,
    rows,  # rows of the partial: k * k * c_in
    image_rows,  # output rows of the batch: batch * out_h
    rows_per_split,
    blocks_per_row,  # cdiv(out_w, BLOCK_P)
    stride_xn,
    stride_xh,
    stride_xw,
    stride_xc,
    stride_zn,
    stride_zh,
    stride_zw,
    stride_zc,
    KSIZE: tl.constexpr,
    PAD: tl.constexpr,
    STRIDE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WIDE: tl.constexpr,
    EVEN_C: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_W: tl.constexpr,
    TMA: tl.constexpr,
    PACK_TAPS: tl.constexpr,
    BIAS_ROW: tl.constexpr,
    PHASES: tl.constexpr,
    INTERPRETER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """partial[s, tap * c_in + c, n] = sum over split s's output pixels p of x[p shifted by tap, c] dz[p, n].

    Grid: (k * k * cdiv(c_in, BLOCK_C) (+ 1 with ``HAS_BIAS``), cdiv(c_out, BLOCK_N), splits). Split ``s`` reduces
    the output rows ``[s * rows_per_split, (s + 1) * rows_per_split)`` of the batch (row ``image * out_h + oy``),
    each row ``BLOCK_P`` pixels at a time, as one flat loop (what the software pipeliner overlaps): the column
    ``x0``, the row ``oy`` and the image are loop-carried counters, so the loop divides nothing; a row's image
    offsets and its vertical padding test are scalars, and per step only the pixel columns ``x0 + arange`` and
    their masks are vectors. Offsets are int32 unless ``WIDE`` (a map reaches 2**31 elements).

    ``STRIDE`` 2 (a 3x3 stride-2 padding-1 down-sampling conv): output pixel (oy, ox)'s tap reads x at (2 oy + dy,
    2 ox + dx), so a step reads every other pixel of an input row. On pointer loads each lane's padding test is a
    compare of its own column; with ``TMA`` (an even input width, dense pixels) x is viewed as (N, H, W / 2, 2 C),
    pixel pairs, and a tap's row box is one member of ``BLOCK_P`` consecutive pairs (its channels at 0 or C).

    With ``HAS_BIAS`` one program per (output-channel block, split) sums ``dz`` over the same rows into
    ``bias_part[s]`` instead of a ``dW`` tile (a loop without the GEMM); the other programs carry no bias work. The
    grid keeps its shape, but its programs are renumbered in launch order so that every GEMM program comes before
    every bias program: the cheap bias sums run in the last wave's gaps instead of taking slots from GEMM programs.

    With ``TMA`` (sm_90; every row a whole number of pixel blocks) a step's two operands are row boxes: ``x`` at
    (image, oy + dy, x0 + dx, c0), whose out-of-map coordinates the hardware zero-fills (the conv's padding; channels
    past ``c_in`` too), and ``dz`` at (image, oy, x0, n0). No lane offsets or masks are computed, and both operands
    stay in shared memory for the wgmma.

    With ``PACK_TAPS`` (few input channels: ``k * k * c_in <= BLOCK_C``, the 3-channel first conv) one program
    covers every (tap, channel) row of ``dW`` at once: a step gathers the ``(BLOCK_P, BLOCK_C)`` im2col block of all
    taps, whose offsets past the row's base are fixed (``tap`` and channel of each column, computed once), and
    ``dz`` is read once per step instead of once per tap. Axis 0 then has one program (+ 1 with ``HAS_BIAS``).
    ``BIAS_ROW`` (``PACK_TAPS`` with a spare row, ``rows < BLOCK_C``; ``HAS_BIAS`` off): the bias gradient comes out of
    the GEMM itself, im2col column ``rows`` being 1 (``dz`` is 0 past a row's end), so ``acc[n, rows] = sum_p dz[p,
    n]`` over the slice's pixels: no bias programs, ``dz`` read once.

    ``PHASES`` 4 (ConvTranspose2d(2, 2), a 1x1 ``KSIZE``): axis 1 is (phase, output-channel block), phase ``(a, b)``
    reading ``dy[:, a::2, b::2]`` (``dz`` is the phase (0, 0) view, the others sit ``a`` rows and ``b`` pixels of dy
    on) and writing columns ``(a * 2 + b) * c_out + n`` of partial rows ``4 * c_out`` long: the packed transposed-conv
    weight's order. Its TMA descriptor views dy as (N, 2 h, w, 2, c_out), a phase's row box at (image, 2 oy + a, x0,
    b, n0). The bias partials are (split, phase, channel).
    """
    offset_type: tl.constexpr = tl.int64 if WIDE else tl.int32
    c_blocks = tl.cdiv(c_in, BLOCK_C)
    kc_programs = 1 if PACK_TAPS else KSIZE * KSIZE * c_blocks
    pid_kc = tl.program_id(0)
    pid_n = tl.program_id(1)  # (phase, output-channel block) with PHASES 4
    split = tl.program_id(2)
    if HAS_BIAS:
        # The launch order (axis 0 fastest) runs every GEMM program first, the bias programs last: program i of
        # the launch is GEMM program i while i < kc_programs * n_blocks * splits (kc fastest, then n, then the
        # split), after that bias program i - that (n, then the split).
        n_blocks = tl.num_programs(1)
        i = tl.program_id(0) + tl.num_programs(0) * (pid_n + n_blocks * split)
        gemm_programs = kc_programs * n_blocks * tl.num_programs(2)
        is_bias = i >= gemm_programs
        i = tl.where(is_bias, i - gemm_programs, i)
        per_tile = tl.where(is_bias, 1, kc_programs)
        pid_kc = tl.where(is_bias, kc_programs, i % per_tile)
        pid_n = (i // per_tile) % n_blocks
        split = (i // per_tile) // n_blocks
    # PHASES 4: output phase (a, b) = divmod(phase, 2) reads dz = dy[:, a::2, b::2]; dz's strides are the phase
    # (0, 0) view's, twice dy's row and pixel strides.
    phase = 0
    phase_a = 0
    phase_b = 0
    if PHASES != 1:
        tl.static_assert(PHASES == 4 and KSIZE == 1 and STRIDE == 1, "output phases: the 2x2 transposed conv only")
        phase = pid_n // tl.cdiv(c_out, BLOCK_N)
        pid_n = pid_n % tl.cdiv(c_out, BLOCK_N)
        phase_a = phase // 2
        phase_b = phase % 2
        dz_ptr += phase_a.to(offset_type) * (stride_zh // 2) + phase_b.to(offset_type) * (stride_zw // 2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < c_out
    # Column phase * c_out + n of the partial's rows (PHASES * c_out long): the packed transposed-conv order.
    part_cols = PHASES * c_out
    offs_col = phase * c_out + offs_n
    # A step's pixels are x0 + lanes of one row: its offsets are a scalar (the row and x0) plus these, fixed.
    lanes = tl.arange(0, BLOCK_P)
    g_lanes = (lanes.to(offset_type) * stride_zw)[:, None] + (offs_n.to(offset_type) * stride_zc)[None, :]
    row0 = split * rows_per_split
    steps = tl.minimum(rows_per_split, image_rows - row0) * blocks_per_row  # <= 0 past the last row
    img = row0 // tl.maximum(out_h, 1)  # (no rows: an empty loop)
    oy = row0 - img * out_h
    x0 = 0
    acc_t: tl.constexpr = part_ptr.dtype.element_ty  # fp32; fp64 for float64 maps
    if HAS_BIAS and pid_kc == kc_programs:
        bias_acc = tl.zeros((BLOCK_N,), dtype=acc_t)
        for _ in range(0, steps):
            z_at = img.to(offset_type) * stride_zn + oy.to(offset_type) * stride_zh + x0 * stride_zw
            g = _load_dz((dz_ptr + z_at) + g_lanes, lanes, out_w - x0, n_mask, EVEN_W, EVEN_N)
            bias_acc += tl.sum(g.to(acc_t), axis=0)
            x0, oy, img = _next_block(x0, oy, img, out_w, out_h, BLOCK_P)
        tl.store(bias_part_ptr + (split * PHASES + phase).to(tl.int64) * c_out + offs_n, bias_acc, mask=n_mask)
    elif PACK_TAPS:
        tl.static_assert(STRIDE == 1, "the packed taps read consecutive pixels: stride 1 only")
        # Column r of the im2col block is (tap, channel) = divmod(r, c_in): row r of dW. Its offset from a pixel's
        # own is fixed; per step only the row's base, the taps' rows inside the map and the pixels' columns vary.
        r = tl.arange(0, BLOCK_C)
        r_tap = r // c_in
        r_dy = r_tap // KSIZE - PAD
        r_dx = r_tap % KSIZE - PAD
        r_ok = r < rows
        r_off = (
            r_dy.to(offset_type) * stride_xh + r_dx.to(offset_type) * stride_xw + (r % c_in).to(offset_type) * stride_xc
        )
        a_offs = (lanes.to(offset_type) * stride_xw)[:, None] + r_off[None, :]
        # BIAS_ROW: the spare row r == rows (never loaded: past r_ok) reads as 1 in every lane. Past a row's end dz is
        # loaded as 0, so that row of the GEMM sums exactly the pixels of the slice. (Through fp32: the interpreter
        # casts a bool to bf16 as the bit pattern 1, not the number.)
        ones = r == rows
        a_other = 0.0
        if BIAS_ROW:
            a_other = ones[None, :].to(tl.float32).to(x_ptr.dtype.element_ty)
        col = lanes[:, None] + r_dx[None, :]  # the input column of (pixel, tap) less the block's x0
        acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=acc_t)  # dW^T = dz^T A: A stays (K, N)
        for _ in range(0, steps):
            z_at = img.to(offset_type) * stride_zn + oy.to(offset_type) * stride_zh + x0 * stride_zw
            x_at = img.to(offset_type) * stride_xn + oy.to(offset_type) * stride_xh + x0 * stride_xw
            g_end = out_w - x0
            iy = oy + r_dy
            col_ok = (col >= -x0) & (col < in_w - x0) & (lanes < g_end)[:, None]
            a_ok = col_ok & (r_ok & (iy >= 0) & (iy < in_h))[None, :]
            a = tl.load((x_ptr + x_at) + a_offs, mask=a_ok, other=a_other)
            g = _load_dz((dz_ptr + z_at) + g_lanes, lanes, g_end, n_mask, EVEN_W, EVEN_N)
            acc = mma(tl.trans(g), a, acc, INTERPRETER, DOT_PRECISION)
            x0, oy, img = _next_block(x0, oy, img, out_w, out_h, BLOCK_P)
        part = part_ptr + split.to(tl.int64) * rows * part_cols
        tl.store(
            part + r.to(tl.int64)[None, :] * part_cols + offs_col[:, None], acc, mask=r_ok[None, :] & n_mask[:, None]
        )
        if BIAS_ROW:
            bias_part = bias_part_ptr + split.to(tl.int64) * c_out
            tl.store(bias_part + offs_n[:, None] + 0 * r[None, :], acc, mask=ones[None, :] & n_mask[:, None])
    else:
        tap = pid_kc // c_blocks
        dy = tap // KSIZE - PAD
        dx = tap % KSIZE - PAD
        offs_c = (pid_kc % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = offs_c < c_in
        a_lanes = (lanes.to(offset_type) * (STRIDE * stride_xw))[:, None] + (offs_c.to(offset_type) * stride_xc)[
            None, :
        ]
        acc = tl.zeros((BLOCK_C, BLOCK_N), dtype=acc_t)
        c0 = (pid_kc % c_blocks) * BLOCK_C
        n0 = pid_n * BLOCK_N
        if TMA:
            # STRIDE 2: x viewed as (N, H, W / 2, 2 C), a pixel pair's channels one after the other. Input column
            # 2 (x0 + lane) + dx (dx in -1, 0, 1) is member dx * dx of pair x0 + lane - (dx < 0): its channels start at
            # dx * dx * c_in. Pair -1 (the left padding) the hardware zero-fills; a block of member 0 past c_in reads
            # member 1's channels, which land in rows of dW past c_in (each row its own sum, never stored).
            tl.static_assert(STRIDE == 1 or (STRIDE == 2 and KSIZE == 3 and PAD == 1), "stride 2: 3x3, padding 1")
            ix_off = dx
            a_c0 = c0
            if STRIDE == 2:
                ix_off = -(dx < 0).to(tl.int32)
                a_c0 = c0 + dx * dx * c_in
            for _ in range(0, steps):
                a = x_desc.load([img, STRIDE * oy + dy, x0 + ix_off, a_c0]).reshape(BLOCK_P, BLOCK_C)
                if PHASES == 1:
                    g = dz_desc.load([img, oy, x0, n0]).reshape(BLOCK_P, BLOCK_N)
                else:  # dy as (N, 2 h, w, 2, C): row 2 oy + a, pixel pair x0.., member b
                    g = dz_desc.load([img, 2 * oy + phase_a, x0, phase_b, n0]).reshape(BLOCK_P, BLOCK_N)
                acc = mma(tl.trans(a), g, acc, INTERPRETER, DOT_PRECISION)
                x0, oy, img = _next_block(x0, oy, img, out_w, out_h, BLOCK_P)
        else:
            for _ in range(0, steps):
                iy = STRIDE * oy + dy
                ix0 = STRIDE * x0 + dx
                z_at = img.to(offset_type) * stride_zn + oy.to(offset_type) * stride_zh + x0 * stride_zw
                x_at = img.to(offset_type) * stride_xn + iy.to(offset_type) * stride_xh + ix0 * stride_xw
                # Lanes up to the row's end, and for x those reading inside the input: scalar bounds, one or two
                # compares per lane.
                g_end = out_w - x0
                if PAD == 0:
                    a_ok = lanes < g_end  # a valid conv: every tap of an output pixel lies inside the input
                elif STRIDE != 1:
                    ix = ix0 + STRIDE * lanes
                    a_ok = (ix >= 0) & (ix < in_w) & (lanes < g_end) & (iy >= 0) & (iy < in_h)
                else:
                    a_end = tl.minimum(tl.where((iy >= 0) & (iy < in_h), in_w - ix0, -ix0), g_end)
                    a_ok = (lanes >= -ix0) & (lanes < a_end)
                if EVEN_C:
                    a = tl.load((x_ptr + x_at) + a_lanes, mask=a_ok[:, None], other=0.0)
                else:
                    a = tl.load((x_ptr + x_at) + a_lanes, mask=a_ok[:, None] & c_mask[None, :], other=0.0)
                g = _load_dz((dz_ptr + z_at) + g_lanes, lanes, g_end, n_mask, EVEN_W, EVEN_N)
                acc = mma(tl.trans(a), g, acc, INTERPRETER, DOT_PRECISION)
                x0, oy, img = _next_block(x0, oy, img, out_w, out_h, BLOCK_P)
        out_rows = tap * c_in + offs_c
        part = part_ptr + split.to(tl.int64) * rows * part_cols
        tl.store(
            part + out_rows.to(tl.int64)[:, None] * part_cols + offs_col[None, :],
            acc,
            mask=c_mask[:, None] & n_mask[None, :],
        )


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, splits, elements, out_row_offset, row_len, BLOCK: tl.constexpr):
    """out[row_offset * row_len + e] = sum_s part[s, e] (in order s = 0, 1, ...) for the partials' elements e."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < elements
    acc = tl.zeros((BLOCK,), dtype=out_ptr.dtype.element_ty)
    for s in range(0, splits):  # splits * elements < 2**31 (see MAX_PARTIAL_ELEMENTS)
        acc += tl.load(part_ptr + s * elements + offs, mask=mask, other=0.0)
    tl.store(out_ptr + out_row_offset * row_len + offs, acc, mask=mask)


# A k x k conv with at most this many (tap, input channel) rows takes them all in one block (``PACK_TAPS``).
PACK_TAPS_ROWS = 64

# The fp32 partials: at most 2**26 elements (256 MB), and element offsets that fit int32.
MAX_PARTIAL_ELEMENTS = 2**26


# sm_90 limits for the resident-CTA estimate: shared memory an SM's CTAs share (the driver keeps 1 KiB a CTA),
# registers, warps and CTAs an SM holds.
_SM_SHARED = 228 * 1024
_SM_REGISTERS = 65536
_SM_WARPS = 64
_SM_CTAS = 32


def ctas_per_sm(
    block_p: int, block_c: int, block_n: int, element_size: int, acc_size: int, pack_taps: bool = False
) -> int:
    """Resident CTAs an SM holds of a weight-gradient tile (4 warps, 3 stages), estimated before compiling.

    Shared memory: three stages of the ``(BLOCK_P, BLOCK_C)`` and ``(BLOCK_P, BLOCK_N)`` operand blocks, plus the
    1 KiB the driver keeps per CTA. Registers: the accumulator's share a thread, plus 50 for addresses, counters and
    the pipeline (the packed-taps gather holds three ``(BLOCK_P, BLOCK_C)`` offset and mask sets a thread more),
    rounded to 8 a thread as allocated. It matches the compile report's CTA/SM column for the tiles the reference
    U-Net's training step builds (2 for 64x64x128 and 128x128x32, 3 for 64x128x64 and 64x16x128, 4 for the packed
    32x64x64)."""
    threads = 4 * 32
    shared = 3 * block_p * (block_c + block_n) * element_size + 1024
    registers = block_c * block_n * (acc_size // 4) // threads + 50
    if pack_taps:
        registers += 3 * block_p * block_c // threads
    registers = -(-registers // 8) * 8
    return max(1, min(_SM_SHARED // shared, _SM_REGISTERS // (registers * threads), _SM_WARPS // 4, _SM_CTAS))


# A split's fixed work (prologue, pipeline fill, the partial's store), in pixel-block steps: it makes fewer, longer
# slices win where the waves come out even.
_SPLIT_OVERHEAD_STEPS = 2
# What a split's partials cost against a step, with the issue model's H200 figures: a step's MMA work at one SM's share
# of the dense 16-bit peak, a partial read back by the sum at the memory bandwidth (its store overlaps the GEMM).
_SM_FLOPS = 790e12 / 132
_BANDWIDTH = 4.3e12


def _partial_steps(elements: int, acc_size: int, step_flops: int) -> float:
    """One more split's partials (``elements`` accumulators of ``acc_size`` bytes the sum reads), in the time of a
    step of ``step_flops`` on one SM."""
    return elements * acc_size / _BANDWIDTH / (step_flops / _SM_FLOPS)


@functools.lru_cache(maxsize=1024)
def _splits(
    image_rows: int,
    blocks_per_row: int,
    tiles: int,
    sms: int,
    elements: int,
    per_sm: int = 1,
    partial_steps: float = 0.0,
) -> int:
    """Row slices for ``tiles`` GEMM programs per slice over ``sms`` SMs holding ``per_sm`` CTAs each.

    The launch takes as long as its busiest SM: ``ceil(tiles * splits / sms)`` programs of ``ceil(image_rows /
    splits) * blocks_per_row`` steps each (the CTAs on one SM share its tensor cores), plus a fixed cost a program,
    and each split's partials cost ``partial_steps`` more (their traffic, see :func:`_partial_steps`). Among the
    split counts that keep each slice at least 8 pixel blocks long (or one row) and the partials within
    :data:`MAX_PARTIAL_ELEMENTS`, the one of least cost; within 1% of that, the one with the fewest waves of
    resident CTAs (``sms * per_sm`` slots: the GEMM programs all resident at once where they fit), then the fewest
    splits. The bias programs (launched after the GEMM programs, each only a sum of ``dz``) are not counted."""
    tiles = max(1, tiles)
    slots = sms * max(1, per_sm)
    by_length = max(1, image_rows * blocks_per_row // 8)
    by_memory = max(1, MAX_PARTIAL_ELEMENTS // max(1, elements))
    # More than four waves of slots never evens out a wave better than fewer do by more than a percent or so.
    by_waves = max(1, triton.cdiv(4 * slots, tiles))
    cap = int(min(by_length, by_memory, by_waves, max(1, image_rows)))
    best = []
    for s in range(1, cap + 1):
        programs = tiles * s
        steps = triton.cdiv(image_rows, s) * blocks_per_row + _SPLIT_OVERHEAD_STEPS
        cost = triton.cdiv(programs, sms) * steps + s * partial_steps
        best.append((cost, triton.cdiv(programs, slots), s))
    least = min(cost for cost, _, _ in best)
    return min((waves, s) for cost, waves, s in best if cost <= 1.01 * least)[1]


def weight_grad_load_path(
    x: torch.Tensor, dz: torch.Tensor, out_w: int, block_p: int, stride: int = 1
) -> tuple[str, str]:
    """("tma" or "pointer", why) for a weight-gradient launch over ``x`` and ``dz``, as the forward conv chooses
    (:func:`fastunet.kernels.conv.choose_load_path`: sm_90 or newer, descriptors that can address both maps, pointer
    loads under the interpreter unless TMA is asked for), plus: every output row a whole number of ``block_p``-pixel
    blocks. A row box past a row's end would pair dz's zero fill with real pixels of x, and ``0 * inf`` is NaN. A
    stride-2 conv reads x as pixel pairs (a (N, H, W / 2, 2 C) view, a tap's row box one member of each pair), so
    its pixels must be dense (pixel stride C, channel stride 1) and its width even: with an odd one the last pair's
    second member would be the next row's first pixel, not the padding."""
    requested = requested_load_path()
    if requested == "pointer":
        return "pointer", "pointer loads asked for (load_path or FASTUNET_LOAD_PATH)"
    if stride != 1 and x.shape[2] % 2:
        return "pointer", (
            f"strided conv over an odd input width ({x.shape[2]} px): the pixel-pair view's last pair would run into "
            "the next row"
        )
    if stride != 1 and (x.stride(3) != 1 or x.stride(2) != x.shape[3]):
        return "pointer", (
            f"strided conv over an input whose pixels are not dense (strides {tuple(x.stride())}): the pixel-pair "
            "view needs pixel stride C and channel stride 1"
        )
    if INTERPRET:
        if requested == "auto":
            return "pointer", "the interpreter runs pointer loads unless TMA is asked for (load_path('tma'))"
    elif capability(x) < 90:
        return "pointer", f"sm_{capability(x)}: TMA needs sm_90 or newer"
    if out_w % block_p:
        return "pointer", f"output rows of {out_w} px are not whole {block_p}-px blocks"
    for t, what in ((x, "input"), (dz, "output gradient")):
        problem = _tma_problem(t, what)
        if problem:
            return "pointer", problem
    if requested == "tma":
        return "tma", "TMA asked for; strides and addresses 16-byte aligned, whole pixel blocks per row"
    return "tma", f"sm_{capability(x)}: NHWC strides and addresses 16-byte aligned, whole pixel blocks per row"


def conv2d_weight_grad_nhwc(
    x: torch.Tensor,
    dz: torch.Tensor,
    ksize: int = 3,
    padding: int = 1,
    *,
    bias: bool = True,
    out: torch.Tensor | None = None,
    row_offset: int = 0,
    splits: int | None = None,
    name: str = "conv_weight_grad",
    stride: int = 1,
    phases: int = 1,
    sum_phases: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of a stride-1 ``ksize x ksize`` conv with ``padding`` (or of a 3x3 stride-2 padding-1 conv) w.r.t.
    its weight and bias.

    Args:
        x: (N, H, W, C_in) view, the conv's input (any strides).
        dz: (N, H + 2 padding - ksize + 1, W + ..., C_out) view, the gradient of the conv's output; with stride 2
            (N, ceil(H / 2), ceil(W / 2), C_out).
        bias: also return the bias gradient ``dz.sum((0, 1, 2))`` (fp32), computed in the same pass.
        out: fp32 (rows, C_out) tensor to write into at rows ``[row_offset, row_offset + k*k*C_in)`` (a decoder conv's
            two sources), else a new (k*k*C_in, C_out) tensor.
        splits: slices of the reduction, each a range of output rows (``image * H_out + y``) of the batch; more
            slices than rows leave the extra partials zero (default: the count that fills the SMs' rounds of GEMM
            programs best, see :func:`_splits`).
        stride: 1, or 2 with ksize 3 and padding 1 (tap (ky, kx) of output pixel (oy, ox) reads x at (2 oy + ky - 1,
            2 ox + kx - 1); pointer loads).
        phases: 1, or 4 for ConvTranspose2d(2, 2) (ksize 1, padding 0, stride 1): ``dz`` is then its output gradient
            ``dy`` (N, 2 H, 2 W, C_out), each output phase (a, b) a 1x1 weight gradient against ``dy[:, a::2, b::2]``,
            all four in the one launch, and ``dW`` is ``(C_in, 4 * C_out)``, column ``(a * 2 + b) * C_out + co`` (the
            order of :func:`fastunet.kernels.conv.pack_conv_transpose_weight`); ``db`` sums every phase.
        sum_phases: with ``phases=4``, False returns ``db`` per phase instead, ``(4 * C_out,)`` in dW's column order:
            the gradient of the forward's repeated bias.

    Returns:
        (dW packed as ``(k*k*C_in, C_out)`` fp32, row ``tap * C_in + channel``; db fp32 (C_out,) or None); fp64
        for float64 maps (``out`` too).
    """
    for t, what in ((x, "x"), (dz, "dz")):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"conv2d_weight_grad_nhwc {what}: expected a 4-D (N, H, W, C) view, got {shape}")
        check_runnable(t, f"conv2d_weight_grad_nhwc {what}")
    if x.dtype != dz.dtype or x.device != dz.device:
        raise ValueError(f"x and dz must share dtype and device, got {x.dtype}/{x.device} and {dz.dtype}/{dz.device}")
    if ksize not in (1, 3) or padding not in (0, ksize // 2):
        raise ValueError(f"expected ksize 1 or 3 with padding 0 or ksize // 2, got ksize={ksize}, padding={padding}")
    if stride not in (1, 2) or stride == 2 and (ksize, padding) != (3, 1):
        raise ValueError(f"expected stride 1, or 2 with ksize 3 and padding 1, got stride={stride!r}, ksize={ksize}, "
                         f"padding={padding}")  # fmt: skip
    if phases not in (1, 4) or phases == 4 and (ksize, padding, stride) != (1, 0, 1):
        raise ValueError(f"expected phases 1, or 4 with ksize 1, padding 0 and stride 1 (a 2x2 transposed conv), got "
                         f"phases={phases!r}, ksize={ksize}, padding={padding}, stride={stride}")  # fmt: skip
    batch, in_h, in_w, c_in = x.shape
    out_h = (in_h + 2 * padding - ksize) // stride + 1
    out_w = (in_w + 2 * padding - ksize) // stride + 1
    c_out = dz.shape[3]
    up = 2 if phases == 4 else 1
    if tuple(dz.shape[:3]) != (batch, up * out_h, up * out_w):
        what = (
            "a stride-2 transposed conv"
            if phases == 4
            else f"a {ksize}x{ksize} conv with padding {padding} and stride {stride}"
        )
        raise ValueError(
            f"dz: expected shape ({batch}, {up * out_h}, {up * out_w}, C_out) for {what} of a {tuple(x.shape)} input, "
            f"got {tuple(dz.shape)}"
        )
    dy = dz
    if phases == 4:
        dz = dy[:, ::2, ::2, :]  # phase (0, 0); the kernel offsets it to the others
    rows = ksize * ksize * c_in
    cols = phases * c_out
    stat = stat_dtype(x.dtype)  # the partials and results: fp32, fp64 for float64 maps
    stat_name = str(stat).removeprefix("torch.")
    if out is None:
        if row_offset:
            raise ValueError("row_offset needs out=")
        out = alloc((rows, cols), stat, x.device)
    elif (
        out.dtype != stat
        or out.dim() != 2
        or out.shape[1] != cols
        or not out.is_contiguous()
        or not 0 <= row_offset <= out.shape[0] - rows
    ):
        raise ValueError(
            f"out: expected a contiguous {stat_name} (>= {row_offset + rows}, {cols}) tensor for rows "
            f"[{row_offset}, {row_offset + rows}), got {out.dtype} {tuple(out.shape)}"
        )
    db_len = c_out if sum_phases else cols
    db = alloc((db_len,), stat, x.device) if bias else None
    pixels = batch * out_h * out_w
    if pixels + 1024 >= 2**31:
        raise ValueError(f"at most 2**31 - 1025 output pixels per launch, got {pixels}")
    if rows * cols == 0:
        return out[row_offset : row_offset + rows], db
    block_n = min(128, max(16, next_pow2(c_out)))
    # Pixel blocks walk one output row: no wider than the row (a 16-pixel floor for the MMA's K); 128 pixels for an
    # output-channel block of at most 64, whose steps would otherwise be mostly fixed per-step work.
    block_p = min(128 if block_n <= 64 else 64, max(16, next_pow2(out_w)))
    path, path_reason = weight_grad_load_path(x, dz, out_w, block_p, stride)
    if path == "tma" and phases == 4 and _tma_problem(dy, "output gradient"):
        path, path_reason = "pointer", _tma_problem(dy, "output gradient")
    # A TMA step's instructions hardly depend on the tile: where rows are short (steps under 64 pixels), 128 input
    # channels double each step's MMA work (issue ratio 0.31 against 0.62 at 32-px rows in the model).
    block_c = min(128 if path == "tma" and block_p < 64 else 64, max(16, next_pow2(c_in)))
    # Few input channels (the 3-channel first conv: 27 rows): all taps in one block of rows, one program along
    # axis 0 reading dz once per step, instead of nine programs each padding 3 channels to 16 and reading dz again.
    pack_taps = ksize > 1 and stride == 1 and path == "pointer" and rows <= PACK_TAPS_ROWS
    bias_row = False
    if pack_taps:
        block_c = max(16, next_pow2(rows))
        # A spare row of the block (27 of 32 for 3 channels) sums dz for the bias inside the GEMM: dz read once.
        bias_row = bias and rows < block_c
        block_p = min(block_p, 64)  # 32 x 64 x 64 steps: 119 registers (128-px steps: 253, twice the issue)
    image_rows = batch * out_h
    blocks_per_row = triton.cdiv(out_w, block_p)
    kc_programs = 1 if pack_taps else ksize * ksize * triton.cdiv(c_in, block_c)
    tiles = kc_programs * phases * triton.cdiv(c_out, block_n)
    if splits is None:
        acc_size = torch.finfo(stat).bits // 8
        per_sm = ctas_per_sm(block_p, block_c, block_n, x.element_size(), acc_size, pack_taps)
        partial = _partial_steps(rows * cols, acc_size, 2 * block_c * block_n * block_p)
        splits = _splits(image_rows, blocks_per_row, tiles, sm_count(x), rows * cols, per_sm, partial)
    if not isinstance(splits, int) or not 1 <= splits <= max(1, MAX_PARTIAL_ELEMENTS // (rows * cols)):
        raise ValueError(
            f"splits must be an int in [1, {max(1, MAX_PARTIAL_ELEMENTS // (rows * cols))}] (the partials' size "
            f"limit for a {rows} x {cols} gradient), got {splits!r}"
        )
    rows_per_split = triton.cdiv(max(image_rows, 1), splits)
    part = alloc((splits, rows, cols), stat, x.device)
    # Bias partials (split, phase, channel): summed over splits and phases together, in that order.
    bias_part = alloc((splits, phases, c_out), stat, x.device) if bias else part
    interpreter, precision = dot_flags(x.dtype, torch.backends.cudnn.allow_tf32)
    # With a bias (not in the GEMM's spare row), one more program per (phase, output-channel block, split) along
    # axis 0 sums dz for it.
    bias_programs = bias and not bias_row
    grid = (kc_programs + int(bias_programs), phases * triton.cdiv(c_out, block_n), splits)
    descriptors = (None, None)
    if path == "tma":
        x_shape, x_strides = list(x.shape), list(x.stride())
        if stride == 2:
            # x as (N, H, W / 2, 2 C_in): pixel pair j's channels, pixel 2 j's then pixel 2 j + 1's (dense pixels, see
            # weight_grad_load_path); a tap's row box takes one member of block_p consecutive pairs.
            x_shape, x_strides = [batch, in_h, in_w // 2, 2 * c_in], [x.stride(0), x.stride(1), 2 * x.stride(2), 1]
        x_desc = TensorDescriptor(x, x_shape, x_strides, [1, 1, block_p, block_c])
        if phases == 1:
            dz_desc = TensorDescriptor(dz, list(dz.shape), list(dz.stride()), [1, 1, block_p, block_n])
        else:
            # dy as (N, 2 H, W, 2, C_out): phase (a, b)'s row box is every other pixel of row 2 oy + a from pixel b.
            shape = [batch, 2 * out_h, out_w, 2, c_out]
            strides = [dy.stride(0), dy.stride(1), 2 * dy.stride(2), dy.stride(2), dy.stride(3)]
            dz_desc = TensorDescriptor(dy, shape, strides, [1, 1, block_p, 1, block_n])
        descriptors = (x_desc, dz_desc)
    args = (
        x, dz, *descriptors, part, bias_part, in_h, in_w, out_h, out_w, c_in, c_out, rows, image_rows, rows_per_split,
        blocks_per_row, *x.stride(), *dz.stride(),
    )  # fmt: skip
    # Offsets reached: the maps' spans, plus the padding row and column and a pixel block's overhang past the row.
    reach_x = element_span(x) + abs(x.stride(1)) + (stride * block_p + 1) * abs(x.stride(2))
    reach_z = element_span(dy) + block_p * abs(dz.stride(2))
    constexprs = {
        "KSIZE": ksize,
        "PAD": padding,
        "STRIDE": stride,
        "HAS_BIAS": bias_programs,
        "WIDE": max(reach_x, reach_z) >= 2**31,
        "EVEN_C": c_in % block_c == 0,
        "EVEN_N": c_out % block_n == 0,
        "EVEN_W": out_w % block_p == 0,
        "TMA": path == "tma",
        "PACK_TAPS": pack_taps,
        "BIAS_ROW": bias_row,
        "PHASES": phases,
        "INTERPRETER": interpreter,
        "DOT_PRECISION": precision,
        "BLOCK_P": block_p,
        "BLOCK_C": block_c,
        "BLOCK_N": block_n,
    }
    options = {"num_warps": 4, "num_stages": 3}
    if recording():
        record_launch(
            LaunchRecord(
                name=name,
                kernel=_weight_grad_partial_kernel,
                grid=grid,
                flops=2 * pixels * rows * cols,
                # The bias programs read dz once more.
                bytes_read=(x.numel() + dy.numel() * (1 + int(bias_programs))) * x.element_size(),
                bytes_written=(part.numel() + (bias_part.numel() if bias else 0)) * part.element_size(),
                args=args,
                constexprs=constexprs,
                launch_options=options,
                path=path,
                path_reason=path_reason,
                light_programs=grid[1] * grid[2] if bias_programs else 0,
            )
        )
    # (partials, target, partials summed, elements, target row offset): the bias sums splits x phases in one pass.
    reductions = [(part, out, splits, rows * cols, row_offset)]
    if bias:
        reductions.append(
            (bias_part, db, splits * phases, c_out, 0) if sum_phases else (bias_part, db, splits, cols, 0)
        )
    block = 1024
    for source, target, count, elements, offset in reductions:
        sum_args = (source, target, count, elements, offset, cols)
        if recording():
            record_launch(
                LaunchRecord(
                    name=f"{name}.sum",
                    kernel=_sum_splits_kernel,
                    grid=(triton.cdiv(elements, block),),
                    flops=0,
                    bytes_read=source.numel() * source.element_size(),
                    bytes_written=elements * target.element_size(),
                    args=sum_args,
                    constexprs={"BLOCK": block},
                    launch_options={"num_warps": 4, "num_stages": 1},
                )
            )
    if not is_dry_run():
        with launch_guard(x):
            _weight_grad_partial_kernel[grid](*args, **constexprs, **options)
            for source, target, count, elements, offset in reductions:
                _sum_splits_kernel[(triton.cdiv(elements, block),)](
                    source, target, count, elements, offset, cols, BLOCK=block, num_warps=4, num_stages=1
                )
    return out[row_offset : row_offset + rows], db


def _check_packed(w: torch.Tensor, rows: int, what: str, why: str) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[0] != rows:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{what}: expected a packed weight of shape ({rows}, C_out) ({why}), got {shape}")


def flip_conv_weight(w_packed: torch.Tensor, c_in: int, ksize: int) -> torch.Tensor:
    """The packed weight of a conv's input-gradient conv: taps flipped, input and output channels swapped.

    For a stride-1 conv ``z[p] = sum_{tap, ci} x[p + tap - pad, ci] W[co, ci, ky, kx]`` with padding ``pad = k // 2``,
    ``dx[q, ci] = sum_{tap, co} dz[q - tap + pad, co] W[co, ci, ky, kx]``: substituting ``tap' = (k - 1 - ky,
    k - 1 - kx)`` makes it the same conv of ``dz`` (same padding) with ``W'[ci, co, ky, kx] = W[co, ci, k-1-ky,
    k-1-kx]``.

    Args:
        w_packed: the forward's ``(k * k * c_in, c_out)`` packed weight (row ``tap * c_in + channel``, ``tap = ky * k
            + kx``; see :func:`fastunet.kernels.conv.pack_conv_weight`). Not modified.
        c_in: the forward conv's input channels.
        ksize: the forward conv's kernel size ``k``.

    Returns:
        A new contiguous ``(k * k * c_out, c_in)`` packed weight of ``W'`` in ``w_packed``'s dtype and device.
    """
    if not isinstance(ksize, int) or ksize < 1:
        raise ValueError(f"ksize: expected a positive int, got {ksize!r}")
    if not isinstance(c_in, int) or c_in < 0:
        raise ValueError(f"c_in: expected a non-negative int, got {c_in!r}")
    _check_packed(w_packed, ksize * ksize * c_in, "flip_conv_weight w_packed", f"k*k*c_in rows, k={ksize}, c_in={c_in}")
    c_out = w_packed.shape[1]
    taps = w_packed.reshape(ksize, ksize, c_in, c_out)
    return taps.flip(0, 1).transpose(2, 3).reshape(ksize * ksize * c_out, c_in).contiguous()


def conv2d_input_grad_nhwc(
    dz: torch.Tensor,
    w_packed: torch.Tensor,
    c_in: int,
    ksize: int = 3,
    padding: int = 1,
    *,
    stride: int = 1,
    in_size: tuple[int, int] | None = None,
    grad_mask: torch.Tensor | None = None,
    grad_norm=None,
    grad_norm_applied: bool = False,
):
    """Gradient w.r.t. its input of a stride-1 ``ksize x ksize`` conv with padding ``ksize // 2`` (same size), or of
    a 3x3 stride-2 padding-1 conv.

    ``dx = conv(dz, W')`` with the flipped, channel-swapped weight of :func:`flip_conv_weight` and the same padding,
    one launch of :func:`fastunet.kernels.conv.conv2d_nhwc` (no bias, no activation): fp32 accumulation, stored in
    ``dz``'s dtype. ``dz`` is the gradient of the conv's output before its activation (the caller applies the
    activation's derivative first). ``grad_mask``: the conv's input was a ReLU's stored output ``a``; the launch's
    epilogue then applies that ReLU's derivative, ``where(a <= 0, 0, dx)`` (a NaN ``a`` passes ``dx``, like
    ``threshold_backward``), so that the gradient returned is the one of the map before that ReLU.

    A decoder conv that read two sources (the skip map's channels first, then the upsampled map's) has one packed
    weight over ``[skip | up]``: the returned gradient's channels are in that order, ``dx[..., :c_skip]`` for the
    skip and ``dx[..., c_skip:]`` for the upsampled map, which the caller slices (and, for a map padded into the
    skip's frame, crops back to its own size).

    Stride 2 (the down-sampling conv, output ``ceil(H / 2) x ceil(W / 2)``): ``dx[2q + p] = sum dz[q + s] W'[t]``
    over the flipped taps ``t`` with ``p + t`` odd, ``s = (p + t - 1) / 2``: each of dx's four phases (row and
    column parity ``p``) is a small conv of ``dz`` with 1, 2, 2 or 4 of the nine flipped taps. One launch of the same
    kernel runs all four (``polyphase=``, one phase per program): no zero-interleaved ``dz`` is made and no
    multiply-add spent on a zero; an odd H or W only shortens the last phase's lattice.

    Args:
        dz: (N, H, W, C_out) view, any strides (an NCHW gradient permuted to NHWC is read in place).
        w_packed: the forward's ``(k * k * c_in, C_out)`` packed weight, ``dz``'s dtype and device.
        c_in: the forward conv's input channels (both sources together for a decoder conv).
        ksize: 1 or 3. padding: ``ksize // 2``. stride: 1, or 2 with ksize 3 and padding 1.
        in_size: stride 2: the conv's input (H, W), which ``dz``'s size fixes only up to parity.
        grad_mask: None, or (N, H, W, c_in), ``dz``'s dtype and device, any strides: the ReLU output the conv read.
        grad_norm: None, or (stride 1, with ``grad_mask`` the pre-norm map ``z``, (N, H, W, C_norm), C_norm <= c_in)
            the :class:`~fastunet.kernels.stats.NormIn` through which the conv read its input's first C_norm
            channels as ``act(z * scale + shift)``: the launch's epilogue turns those channels into z's gradient
            through the read and sums the read's scale and shift gradients (see
            :func:`fastunet.kernels.conv.conv2d_nhwc`'s ``grad_norm``).
        grad_norm_applied: with ``grad_norm``, the epilogue also writes the values the forward read, ``act(z * scale
            + shift)``, as a new contiguous (N, H, W, C_norm) map in ``dz``'s dtype: the weight gradient's operand,
            with no normalize launch of its own.

    Returns:
        A new contiguous (N, H, W, c_in) tensor in ``dz``'s dtype; with ``grad_norm`` ``(dx, grad_scale,
        grad_shift)``, the two sums fp32 (N, C_norm) (fp64 for float64 maps); with ``grad_norm_applied`` ``(dx,
        grad_scale, grad_shift, applied)``.

    Raises:
        NotImplementedError: a valid conv (padding 0 with ksize 3), or a strided conv other than 3x3 stride 2
            padding 1.
    """
    if stride not in (1, 2) or stride == 2 and (ksize, padding) != (3, 1):
        raise NotImplementedError(
            f"input gradient of a strided conv (stride {stride}, ksize {ksize}, padding {padding}): stride 1, or "
            "stride 2 with ksize 3 and padding 1"
        )
    if (stride == 2) != (in_size is not None):
        raise ValueError(f"in_size: expected the input (H, W) with stride 2 and only then, got {in_size!r}")
    if ksize not in (1, 3):
        raise ValueError(f"ksize: expected 1 or 3, got {ksize!r}")
    if padding != ksize // 2:
        if padding == 0:
            raise NotImplementedError(
                f"input gradient of a valid conv (ksize {ksize}, padding 0): only padding ksize // 2 = {ksize // 2} "
                "(same size) is supported"
            )
        raise ValueError(f"padding: expected {ksize // 2} (ksize // 2) for ksize {ksize}, got {padding!r}")
    if not isinstance(dz, torch.Tensor) or dz.dim() != 4:
        shape = tuple(dz.shape) if isinstance(dz, torch.Tensor) else type(dz).__name__
        raise ValueError(f"conv2d_input_grad_nhwc dz: expected a 4-D (N, H, W, C_out) view, got {shape}")
    w_flipped = flip_conv_weight(w_packed, c_in, ksize)
    if w_packed.shape[1] != dz.shape[3]:
        raise ValueError(
            f"dz: expected {w_packed.shape[1]} channels (the packed weight's C_out), got {dz.shape[3]} "
            f"(dz shape {tuple(dz.shape)})"
        )
    if stride == 2:
        dx, _ = conv2d_nhwc(
            dz, w_flipped, None, ksize=3, padding=1, activation="none", polyphase=tuple(in_size), grad_mask=grad_mask,
            grad_norm=grad_norm, grad_norm_applied=grad_norm_applied,
        )  # fmt: skip
        return dx
    dx, sums = conv2d_nhwc(
        dz, w_flipped, None, ksize=ksize, padding=padding, activation="none", grad_mask=grad_mask, grad_norm=grad_norm,
        grad_norm_applied=grad_norm_applied,
    )  # fmt: skip
    return dx if grad_norm is None else (dx, *sums)


def conv_transpose2x2_input_grad_nhwc(
    dy: torch.Tensor, w_packed_t: torch.Tensor, grad_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Gradient w.r.t. its input of ConvTranspose2d(kernel 2, stride 2), the forward being
    :func:`fastunet.kernels.conv.conv_transpose2x2_nhwc` with ``pack_conv_transpose_weight(W)``, W (C_in, C_out, 2, 2).

    ``dx[i, j, ci] = sum_{a, b, co} dy[2i + a, 2j + b, co] W[ci, co, a, b]``: a 2x2 conv of ``dy`` with stride 2 and
    padding 0, run on :func:`fastunet.kernels.conv.conv2d_nhwc` (``ksize=2``): output (i, j)'s tap (a, b)
    reads ``dy[2i + a, 2j + b]`` with weight rows ``(a * 2 + b) * C_out + co`` (the packed transposed weight's
    transpose). Four taps, the multiply-adds the gradient needs and no zero tap: each element of ``dy`` reaches one
    input pixel only, so a NaN or infinity in ``dy`` stays in the pixel whose 2x2 block holds it.

    Args:
        dy: (N, 2h, 2w, C_out) view, any strides, the gradient of the transposed conv's output.
        w_packed_t: the forward's ``(C_in, 4 * C_out)`` packed weight (column ``(a * 2 + b) * C_out + channel``),
            ``dy``'s dtype and device.
        grad_mask: None, or the transposed conv's input (N, h, w, C_in) when that is a ReLU's stored output ``a``:
            the result is then ``where(a <= 0, 0, dx)``, the ReLU's derivative applied in the launch's epilogue.

    Returns:
        A new contiguous (N, h, w, C_in) tensor in ``dy``'s dtype.
    """
    if not isinstance(dy, torch.Tensor) or dy.dim() != 4:
        shape = tuple(dy.shape) if isinstance(dy, torch.Tensor) else type(dy).__name__
        raise ValueError(f"conv_transpose2x2_input_grad_nhwc dy: expected a 4-D (N, 2h, 2w, C_out) view, got {shape}")
    if dy.shape[1] % 2 or dy.shape[2] % 2:
        raise ValueError(
            f"dy: expected an even height and width (the 2x output of a stride-2 transposed conv), got "
            f"{tuple(dy.shape)}"
        )
    c_out = dy.shape[3]
    if not isinstance(w_packed_t, torch.Tensor) or w_packed_t.dim() != 2 or w_packed_t.shape[1] != 4 * c_out:
        shape = tuple(w_packed_t.shape) if isinstance(w_packed_t, torch.Tensor) else type(w_packed_t).__name__
        raise ValueError(
            f"w_packed_t: expected a packed transposed-conv weight (C_in, 4 * {c_out}) for dy's {c_out} channels, "
            f"got {shape}"
        )
    if w_packed_t.dtype != dy.dtype or w_packed_t.device != dy.device:
        raise ValueError(
            f"w_packed_t: expected {dy.dtype} on {dy.device} (dy's), got {w_packed_t.dtype} on {w_packed_t.device}"
        )
    if dy.shape[1] == 0 or dy.shape[2] == 0:
        # An empty map: nothing to read; the conv launcher refuses inputs smaller than 1x1.
        return alloc((dy.shape[0], dy.shape[1] // 2, dy.shape[2] // 2, w_packed_t.shape[0]), dy.dtype, dy.device)
    # The 2x2 conv's packed weight, row (a * 2 + b) * C_out + co, column ci: W[ci, co, a, b], w_packed_t transposed.
    w2 = w_packed_t.t().contiguous()
    dx, _ = conv2d_nhwc(dy, w2, None, ksize=2, padding=0, stride=2, activation="none", grad_mask=grad_mask)
    return dx


def conv_transpose2x2_weight_grad_nhwc(
    x: torch.Tensor, dy: torch.Tensor, bias: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias gradients of ConvTranspose2d(kernel 2, stride 2) (forward: ``conv_transpose2x2_nhwc(x,
    pack_conv_transpose_weight(W), bias.repeat(4))``).

    ``dW[ci, co, a, b] = sum_{n, i, j} x[n, i, j, ci] dy[n, 2i + a, 2j + b, co]``: for each output phase (a, b) a 1x1
    weight gradient of ``x`` against the strided view ``dy[:, a::2, b::2, :]``. All four run in one launch of the
    weight-gradient kernel (:func:`conv2d_weight_grad_nhwc` with ``phases=4``: the phase is part of the program's
    output-channel block, its ``dy`` base offset by ``a`` rows and ``b`` pixels), deterministic split-K, each tile
    written straight into :func:`fastunet.kernels.conv.pack_conv_transpose_weight`'s column order
    ``(a * 2 + b) * C_out + co``, then one fixed-order sum of the splits. ``db[co] = sum dy[..., co]``: the bias
    programs' partials summed over splits and phases in one fixed order.

    Args:
        x: (N, h, w, C_in) view, the transposed conv's input (any strides).
        dy: (N, 2h, 2w, C_out) view, the gradient of its output (any strides), ``x``'s dtype and device.
        bias: also return the bias gradient.

    Returns:
        (dW packed as ``(C_in, 4 * C_out)`` fp32, db fp32 (C_out,) or None).
    """
    for t, what in ((x, "x"), (dy, "dy")):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"conv_transpose2x2_weight_grad_nhwc {what}: expected a 4-D (N, H, W, C) view, got {shape}"
            )
    batch, h, w, c_in = x.shape
    if tuple(dy.shape[:3]) != (batch, 2 * h, 2 * w):
        raise ValueError(
            f"dy: expected shape ({batch}, {2 * h}, {2 * w}, C_out) for a stride-2 transposed conv of a "
            f"{tuple(x.shape)} input, got {tuple(dy.shape)}"
        )
    return conv2d_weight_grad_nhwc(x, dy, 1, 0, bias=bias, phases=4, name="conv_transpose2x2_weight_grad")


__all__ = [
    "conv2d_input_grad_nhwc",
    "conv2d_weight_grad_nhwc",
    "conv_transpose2x2_input_grad_nhwc",
    "conv_transpose2x2_weight_grad_nhwc",
    "flip_conv_weight",
]
