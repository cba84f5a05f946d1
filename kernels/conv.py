"""Implicit-GEMM convolution over NHWC maps, with the U-Net's neighbouring stages fused into it.

One kernel serves every convolution of the network; constexpr flags select the fused work:

* loader: one source (``UP_MODE=0``), or the decoder's two sources: channels ``[0, c_main)`` from the skip map and
  ``[c_main, c_main + c_up)`` from a second map that is upsampled on the fly (direct read of a transposed-conv
  output, nearest, or bilinear with either ``align_corners``), with the centered zero padding of odd sizes as a
  loader offset. The concatenated tensor is never materialized.
* ``PACKED_K``: small-channel path (the network's first conv, ``c_in=3``): K runs over the flattened
  (tap, channel) axis so that 27 useful products fill one 32-wide K block instead of nine mostly empty ones.
* epilogue: bias, ReLU (NaN-preserving, like ``torch.relu``), store; the 2x2 max-pooled map (``POOL``); the 1x1
  head (``HEAD``: logits written in the caller's layout, the feature map itself never stored); or a
  depth-to-space store (``D2S``: a stride-2 2x2 transposed conv is a per-pixel GEMM ``c_in -> 4*c_out``).

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

from fastunet.kernels._common import (
    INTERPRET,
    LaunchRecord,
    alloc,
    check_runnable,
    choose_config,
    dot_flags,
    is_dry_run,
    launch_guard,
    mma,
    next_pow2,
    pixel_offset,
    record_launch,
    sm_count,
    to_storage,
)

UP_NONE, UP_DIRECT, UP_NEAREST, UP_BILINEAR, UP_BILINEAR_AC = 0, 1, 2, 3, 4
_UP_MODES = {"direct": UP_DIRECT, "nearest": UP_NEAREST, "bilinear": UP_BILINEAR}

# The fused head keeps every output channel of one pixel in a single tile, and the logits of its pixels in a
# (BLOCK_M, next_pow2(n_cls)) fp32 accumulator beside the main one: both bounded so the tile stays in registers.
MAX_HEAD_CHANNELS = 128
MAX_HEAD_CLASSES = 64


@triton.jit
def _conv_nhwc_kernel(
    x_ptr,  # (batch, height, width, c_main): the input, or the skip map when UP_MODE != 0
    up_ptr,  # (batch, low_h, low_w, c_up): map upsampled on the fly
    w_ptr,  # (KSIZE * KSIZE * (c_main + c_up), c_out): packed weights, row = tap * c_in + channel
    b_ptr,  # (c_out,)
    y_ptr,  # (batch, height, width, c_out), (batch, 2 height, 2 width, c_out / 4) with D2S, or logits with HEAD
    pool_ptr,  # (batch, height // 2, width // 2, c_out)
    head_w_ptr,  # (c_out, n_cls)
    head_b_ptr,  # (n_cls,)
    batch,
    height,
    width,
    c_main,
    c_up,
    c_out,
    n_cls,
    low_h,
    low_w,
    up_h,
    up_w,
    pad_top,
    pad_left,
    scale_h,
    scale_w,
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
    UP_MODE: tl.constexpr,
    PACKED_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    POOL: tl.constexpr,
    HEAD: tl.constexpr,
    D2S: tl.constexpr,
    INTERPRETER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_CLS: tl.constexpr,
):
    """y[p, n] = act(bias[n] + sum_k A[p, k] W[k, n]) over a (BLOCK_M pixels) x (BLOCK_N channels) tile.

    Grid: (cdiv(M, BLOCK_M), cdiv(c_out, BLOCK_N)), M = batch * ceil(height/2) * ceil(width/2) * 4.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    half_h = (height + 1) // 2
    half_w = (width + 1) // 2
    c_in = c_main + c_up
    pad: tl.constexpr = KSIZE // 2

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    quad = offs_m % 4
    window = offs_m // 4
    win_x = window % half_w
    win_y = (window // half_w) % half_h
    img = window // (half_w * half_h)
    oy = 2 * win_y + quad // 2
    ox = 2 * win_x + quad % 2
    m_valid = (img < batch) & (oy < height) & (ox < width)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < c_out
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if PACKED_K:
        # K = (tap, channel) flattened: the address of every A element depends on both its row and its column.
        k_total = KSIZE * KSIZE * c_main
        for k0 in range(0, k_total, BLOCK_K):
            kk = k0 + offs_k
            k_mask = kk < k_total
            tap = kk // c_main
            ch = kk % c_main
            iy = oy[:, None] + (tap // KSIZE - pad)[None, :]
            ix = ox[:, None] + (tap % KSIZE - pad)[None, :]
            ok = m_valid[:, None] & k_mask[None, :] & (iy >= 0) & (iy < height) & (ix >= 0) & (ix < width)
            a_ptrs = (
                x_ptr
                + pixel_offset(img[:, None], iy, ix, stride_xn, stride_xh, stride_xw)
                + ch.to(tl.int64)[None, :] * stride_xc
            )
            a = tl.load(a_ptrs, mask=ok, other=0.0)
            b = tl.load(
                w_ptr + kk[:, None] * c_out + offs_n[None, :], mask=k_mask[:, None] & n_mask[None, :], other=0.0
            )
            acc = mma(a, b, acc, INTERPRETER, DOT_PRECISION)
    else:
        # One flattened loop per source over (tap, channel block): a single long loop is what the software
        # pipeliner overlaps; a tap loop around a one-iteration channel loop (64 channels) would not pipeline.
        main_blocks = tl.cdiv(c_main, BLOCK_K)
        for it in range(0, KSIZE * KSIZE * main_blocks):
            tap = it // main_blocks
            ck = (it - tap * main_blocks) * BLOCK_K + offs_k
            iy = oy + (tap // KSIZE - pad)
            ix = ox + (tap % KSIZE - pad)
            inside = m_valid & (iy >= 0) & (iy < height) & (ix >= 0) & (ix < width)
            row = pixel_offset(img, iy, ix, stride_xn, stride_xh, stride_xw)
            k_mask = ck < c_main
            a = tl.load(
                x_ptr + row[:, None] + ck.to(tl.int64)[None, :] * stride_xc,
                mask=inside[:, None] & k_mask[None, :],
                other=0.0,
            )
            b = tl.load(
                w_ptr + (tap * c_in + ck)[:, None] * c_out + offs_n[None, :],
                mask=k_mask[:, None] & n_mask[None, :],
                other=0.0,
            )
            acc = mma(a, b, acc, INTERPRETER, DOT_PRECISION)
        if UP_MODE != 0:
            up_blocks = tl.cdiv(c_up, BLOCK_K)
            for it in range(0, KSIZE * KSIZE * up_blocks):
                tap = it // up_blocks
                ck = (it - tap * up_blocks) * BLOCK_K + offs_k
                iy = oy + (tap // KSIZE - pad)
                ix = ox + (tap % KSIZE - pad)
                # Coordinates in the (virtual) upsampled map, shifted by the centered zero padding.
                uy = iy - pad_top
                ux = ix - pad_left
                u_inside = m_valid & (iy >= 0) & (iy < height) & (ix >= 0) & (ix < width)
                u_inside = u_inside & (uy >= 0) & (uy < up_h) & (ux >= 0) & (ux < up_w)
                k_mask = ck < c_up
                ld_mask = u_inside[:, None] & k_mask[None, :]
                col = ck.to(tl.int64)[None, :] * stride_uc
                if UP_MODE == 1:
                    u_row = pixel_offset(img, uy, ux, stride_un, stride_uh, stride_uw)
                    a = tl.load(up_ptr + u_row[:, None] + col, mask=ld_mask, other=0.0)
                elif UP_MODE == 2:
                    u_row = pixel_offset(img, uy // 2, ux // 2, stride_un, stride_uh, stride_uw)
                    a = tl.load(up_ptr + u_row[:, None] + col, mask=ld_mask, other=0.0)
                else:
                    if UP_MODE == 3:
                        src_y = tl.maximum((uy.to(tl.float32) + 0.5) * scale_h - 0.5, 0.0)
                        src_x = tl.maximum((ux.to(tl.float32) + 0.5) * scale_w - 0.5, 0.0)
                    else:
                        src_y = uy.to(tl.float32) * scale_h
                        src_x = ux.to(tl.float32) * scale_w
                    y0 = tl.minimum(src_y.to(tl.int32), low_h - 1)
                    x0 = tl.minimum(src_x.to(tl.int32), low_w - 1)
                    y1 = tl.minimum(y0 + 1, low_h - 1)
                    x1 = tl.minimum(x0 + 1, low_w - 1)
                    ly = (src_y - y0.to(tl.float32))[:, None]
                    lx = (src_x - x0.to(tl.float32))[:, None]
                    p00 = pixel_offset(img, y0, x0, stride_un, stride_uh, stride_uw)
                    p01 = pixel_offset(img, y0, x1, stride_un, stride_uh, stride_uw)
                    p10 = pixel_offset(img, y1, x0, stride_un, stride_uh, stride_uw)
                    p11 = pixel_offset(img, y1, x1, stride_un, stride_uh, stride_uw)
                    v00 = tl.load(up_ptr + p00[:, None] + col, mask=ld_mask, other=0.0).to(tl.float32)
                    v01 = tl.load(up_ptr + p01[:, None] + col, mask=ld_mask, other=0.0).to(tl.float32)
                    v10 = tl.load(up_ptr + p10[:, None] + col, mask=ld_mask, other=0.0).to(tl.float32)
                    v11 = tl.load(up_ptr + p11[:, None] + col, mask=ld_mask, other=0.0).to(tl.float32)
                    top = (1.0 - lx) * v00 + lx * v01
                    bottom = (1.0 - lx) * v10 + lx * v11
                    # Rounded to the storage dtype, as the materialized upsampled map would be.
                    a = to_storage((1.0 - ly) * top + ly * bottom, up_ptr.dtype.element_ty, INTERPRETER)
                b = tl.load(
                    w_ptr + (tap * c_in + c_main + ck)[:, None] * c_out + offs_n[None, :],
                    mask=k_mask[:, None] & n_mask[None, :],
                    other=0.0,
                )
                acc = mma(a, b, acc, INTERPRETER, DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if ACT:
        acc = tl.where(acc < 0.0, 0.0, acc)  # relu that keeps NaN (tl.maximum would drop it)
    out = to_storage(acc, y_ptr.dtype.element_ty, INTERPRETER)

    if HEAD:
        # Fused 1x1 head: every output channel of these pixels is in this tile (grid dim 1 has size 1). Columns past
        # c_out hold inf * 0 = NaN where an input is infinite (their weights are masked to 0, the input is not):
        # zeroed, or the head's dot would spread the NaN to every logit of the pixel.
        out = tl.where(n_mask[None, :], out, tl.zeros_like(out))
        offs_c = tl.arange(0, BLOCK_CLS)
        c_mask = offs_c < n_cls
        head_w = tl.load(
            head_w_ptr + offs_n[:, None] * n_cls + offs_c[None, :], mask=n_mask[:, None] & c_mask[None, :], other=0.0
        )
        logits = mma(out, head_w, tl.zeros((BLOCK_M, BLOCK_CLS), dtype=tl.float32), INTERPRETER, DOT_PRECISION)
        logits += tl.load(head_b_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
        y_ptrs = (
            y_ptr
            + pixel_offset(img, oy, ox, stride_yn, stride_yh, stride_yw)[:, None]
            + offs_c.to(tl.int64)[None, :] * stride_yc
        )
        tl.store(
            y_ptrs, to_storage(logits, y_ptr.dtype.element_ty, INTERPRETER), mask=m_valid[:, None] & c_mask[None, :]
        )
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
    else:
        y_ptrs = (
            y_ptr
            + pixel_offset(img, oy, ox, stride_yn, stride_yh, stride_yw)[:, None]
            + offs_n.to(tl.int64)[None, :] * stride_yc
        )
        tl.store(y_ptrs, out, mask=m_valid[:, None] & n_mask[None, :])

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
        p_valid = (p_img < batch) & (pw_y < height // 2) & (pw_x < width // 2)
        p_ptrs = (
            pool_ptr
            + pixel_offset(p_img, pw_y, pw_x, stride_pn, stride_ph, stride_pw)[:, None]
            + offs_n.to(tl.int64)[None, :] * stride_pc
        )
        tl.store(p_ptrs, pooled, mask=p_valid[:, None] & n_mask[None, :])


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
    bilinear: bool = False
    sm_count: int = 132


def _fits(problem: ConvProblem, config: dict) -> bool:
    """sm_90 build limits, from the compile report of the reference network.

    * A-tile elements a thread loads per K step (BLOCK_M * BLOCK_K / threads) <= 32: at 64 (a 128 x 64 tile on one
      warpgroup) the loader state takes the registers to 248-255 and the bilinear loader, holding four corner
      tiles, spills; the small-K loader of the first conv sits at 255 with 32.
    * fp32 accumulator <= 64 registers a thread.
    * Pipeline buffers within ~200 KB of shared memory; the bilinear loader stages its four corner gathers.
    * The depth-to-space store serializes the wgmma pipeline at BLOCK_N 128 (ptxas warning): BLOCK_N <= 64 there;
      so does the fused head when two warpgroups share a 64-row tile: BLOCK_M >= 64 rows a warpgroup there.
    """
    threads = 32 * config["num_warps"]
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    a_tiles = 4 if problem.bilinear else 1
    smem = config["num_stages"] * (a_tiles * block_m + block_n) * block_k * problem.element_size
    # The small-K path computes a full address per A element (tap and channel vary along K): twice the state.
    loader_weight = 2 if problem.packed_k else 1
    return (
        loader_weight * block_m * block_k <= 32 * threads
        and block_m * block_n <= 64 * threads
        and smem <= 200 * 1024
        and (not problem.d2s or block_n <= 64)
        and (not problem.head or block_m >= 16 * config["num_warps"])
    )


@functools.lru_cache(maxsize=4096)
def pick_config(problem: ConvProblem) -> dict:
    """The heuristic tile for one launch (the first autotuning candidate, and the only one by default).

    BLOCK_N covers the output channels (all of them when the head is fused), BLOCK_K one 128-byte row of input
    channels per tap and source (or of the flattened taps on the small-K path), BLOCK_M the pixels; tiles shrink
    for tiny maps so that small launches do not run mostly masked lanes. tl.dot needs every dimension >= 16.
    Warps, pipeline depth and, if need be, a narrower pixel tile are chosen to meet :func:`_fits`.
    """
    widest = max(16, next_pow2(problem.c_out))
    block_n = widest if problem.head else min(64 if problem.d2s else 128, widest)
    if problem.packed_k:
        k_extent = 9 * problem.c_main
    else:
        k_extent = min(problem.c_main, problem.c_up) if problem.c_up else problem.c_main
    block_k = min(128 // problem.element_size, max(16, next_pow2(k_extent)))
    block_m = min(128, max(16, next_pow2(problem.m)))
    # Fewer tiles than SMs (deep layers at batch 1) leaves SMs idle: halve the pixel tile while that helps.
    while block_m > 64 and triton.cdiv(problem.m, block_m) * triton.cdiv(problem.c_out, block_n) < problem.sm_count:
        block_m //= 2
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
    configs = [base]
    widest = max(16, next_pow2(problem.c_out))
    widths = (base["BLOCK_N"],) if problem.head else tuple(n for n in (64, 128, 256) if n <= widest)
    widths = widths or (base["BLOCK_N"],)
    # Half-depth K blocks only for the bilinear loader, whose four staged corner tiles crowd shared memory.
    halve = problem.bilinear and base["BLOCK_K"] >= 32
    depths = (base["BLOCK_K"], base["BLOCK_K"] // 2) if halve else (base["BLOCK_K"],)
    for block_m, block_n, block_k, num_warps, num_stages in itertools.product(
        (64, 128), widths, depths, (4, 8), (3, 4)
    ):
        config = {
            "BLOCK_M": min(block_m, base["BLOCK_M"]),
            "BLOCK_N": block_n,
            "BLOCK_K": block_k,
            "num_warps": num_warps,
            "num_stages": num_stages,
        }
        if config not in configs and _fits(problem, config):
            configs.append(config)
    return tuple(configs)


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


def _launch(
    x, up, w_packed, bias, y, pooled, head_w, head_b, *, ksize, up_mode, packed_k, relu, d2s, sizes, name, flops
):
    batch, height, width, c_main = x.shape
    c_up, c_out, n_cls, low_h, low_w, up_h, up_w, pad_top, pad_left, scale_h, scale_w = sizes
    m = batch * ((height + 1) // 2) * ((width + 1) // 2) * 4
    if m + 128 >= 2**31:
        # Pixel indices are int32 inside the kernel (addresses are int64): refuse rather than wrap.
        raise ValueError(f"at most 2**31 - 129 output pixels per launch (padded to even H and W), got {m}")
    check_weight_addressable(*w_packed.shape)
    problem = ConvProblem(
        m=m,
        c_out=c_out,
        c_main=c_main,
        c_up=c_up,
        element_size=x.element_size(),
        packed_k=packed_k,
        head=head_w is not None,
        d2s=d2s,
        bilinear=up_mode in (UP_BILINEAR, UP_BILINEAR_AC),
        sm_count=sm_count(x),
    )
    candidates = candidate_configs(problem)
    interpreter, precision = dot_flags(x.dtype, torch.backends.cudnn.allow_tf32)
    up_t = up if up is not None else x
    pool_t = pooled if pooled is not None else y
    hw = head_w if head_w is not None else w_packed
    hb = head_b if head_b is not None else w_packed
    b = bias if bias is not None else w_packed
    args = (
        x, up_t, w_packed, b, y, pool_t, hw, hb,
        batch, height, width, c_main, c_up, c_out, n_cls, low_h, low_w, up_h, up_w, pad_top, pad_left,
        scale_h, scale_w, *x.stride(), *up_t.stride(), *y.stride(), *pool_t.stride(),
    )  # fmt: skip
    flags = {
        "KSIZE": ksize,
        "UP_MODE": up_mode,
        "PACKED_K": packed_k,
        "HAS_BIAS": bias is not None,
        "ACT": relu,
        "POOL": pooled is not None,
        "HEAD": head_w is not None,
        "D2S": d2s,
        "INTERPRETER": interpreter,
        "DOT_PRECISION": precision,
        "BLOCK_CLS": max(16, next_pow2(n_cls)),
    }
    if m == 0 or c_out == 0:
        return

    def grid_of(cfg: dict) -> tuple[int, int]:
        return (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(c_out, cfg["BLOCK_N"]))

    def run(cfg: dict) -> None:
        tiles = {key: cfg[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
        with launch_guard(x):
            _conv_nhwc_kernel[grid_of(cfg)](
                *args, **flags, **tiles, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]
            )

    # Shapes share a tuning result when they differ only in the pixel count's power-of-two bucket.
    key = ("conv", x.dtype, tuple(flags.items()), next_pow2(m), c_main, c_up, c_out, n_cls)
    cfg = choose_config(key, candidates, run)
    tensors = [t for t in (x, up, w_packed, bias, head_w, head_b) if t is not None]
    record_launch(
        LaunchRecord(
            name=name,
            kernel=_conv_nhwc_kernel,
            grid=grid_of(cfg),
            flops=flops,
            bytes_read=sum(t.numel() * t.element_size() for t in tensors),
            bytes_written=sum(t.numel() * t.element_size() for t in (y, pooled) if t is not None),
            args=args,
            constexprs={**flags, **{key: cfg[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}},
            launch_options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]},
            candidates=tuple(candidates),
        )
    )
    if not is_dry_run():
        run(cfg)


def conv2d_nhwc(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ksize: int = 3,
    up: torch.Tensor | None = None,
    up_mode: str | None = None,
    align_corners: bool = False,
    relu: bool = True,
    pool: bool = False,
    head_weight: torch.Tensor | None = None,
    head_bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same-padded ``ksize x ksize`` convolution (stride 1) of an NHWC view, with its fused neighbours.

    Args:
        x: (N, H, W, C_main) view, any strides (an NCHW tensor permuted to NHWC is read in place).
        w_packed: (ksize * ksize * (C_main + C_up), C_out) from :func:`pack_conv_weight`.
        bias: (C_out,) or None.
        up: optional (N, h, w, C_up) second input whose channels follow x's (the decoder's ``cat([skip, up])``).
        up_mode: ``"direct"`` (up is already at full size, e.g. a transposed-conv output), ``"nearest"`` or
            ``"bilinear"`` (2x upsampling computed in the loader). The upsampled map is zero-padded, centered,
            to (H, W).
        relu: apply ReLU after the bias.
        pool: also return the 2x2 max-pooled map (floor mode, like ``nn.MaxPool2d(2)``).
        head_weight, head_bias: (C_out, n_cls) and (n_cls,): fuse a 1x1 conv; the return value is then the
            logits, and the C_out feature map is not stored.
        out: optional destination (N, H, W, C_out or n_cls) view, e.g. an NCHW tensor permuted to NHWC.

    Returns:
        (y, pooled): y in NHWC (or ``out``), pooled None unless ``pool``.
    """
    _check_nhwc(x, "conv2d_nhwc input")
    if ksize % 2 != 1 or ksize < 1:
        raise ValueError(f"ksize must be odd (same padding of ksize // 2), got {ksize}")
    batch, height, width, c_main = x.shape
    c_up = 0
    low_h = low_w = up_h = up_w = pad_top = pad_left = 0
    scale_h = scale_w = 0.0
    mode = UP_NONE
    if up is not None:
        _check_nhwc(up, "conv2d_nhwc upsampled input")
        if up_mode not in _UP_MODES:
            raise ValueError(f"up_mode must be one of {sorted(_UP_MODES)}, got {up_mode!r}")
        if up.shape[0] != batch or up.dtype != x.dtype or up.device != x.device:
            raise ValueError(
                f"upsampled input must match the skip map's batch, dtype and device: got {tuple(up.shape)} "
                f"{up.dtype} {up.device} against {tuple(x.shape)} {x.dtype} {x.device}"
            )
        mode = _UP_MODES[up_mode]
        low_h, low_w, c_up = up.shape[1], up.shape[2], up.shape[3]
        up_h, up_w = (low_h, low_w) if mode == UP_DIRECT else (2 * low_h, 2 * low_w)
        if up_h > height or up_w > width:
            raise ValueError(f"upsampled map ({up_h}x{up_w}) is larger than the skip map ({height}x{width})")
        pad_top, pad_left = (height - up_h) // 2, (width - up_w) // 2
        if mode == UP_BILINEAR and align_corners:
            mode = UP_BILINEAR_AC
            scale_h = (low_h - 1) / (up_h - 1) if up_h > 1 else 0.0
            scale_w = (low_w - 1) / (up_w - 1) if up_w > 1 else 0.0
        else:
            scale_h = scale_w = 0.5
    elif up_mode is not None:
        raise ValueError("up_mode given without an upsampled input")
    c_in = c_main + c_up
    if w_packed.dim() != 2 or w_packed.shape[0] != ksize * ksize * c_in:
        raise ValueError(
            f"packed weight: expected ({ksize * ksize * c_in}, C_out) for {c_in} input channels and a "
            f"{ksize}x{ksize} kernel, got {tuple(w_packed.shape)}"
        )
    c_out = w_packed.shape[1]
    for t, what in ((w_packed, "weight"), (bias, "bias"), (head_weight, "head weight"), (head_bias, "head bias")):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{what}: expected {x.dtype} on {x.device}, got {t.dtype} on {t.device}")
    if bias is not None and bias.shape != (c_out,):
        raise ValueError(f"bias: expected shape ({c_out},), got {tuple(bias.shape)}")
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
    if out is None:
        out = alloc((batch, height, width, y_channels), x.dtype, x.device)
    elif out.shape != (batch, height, width, y_channels) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out: expected shape {(batch, height, width, y_channels)} {x.dtype} on {x.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    else:
        if out.numel() and _has_internal_overlap(out):
            raise RuntimeError(
                "out: unsupported operation: more than one element of the written-to tensor refers to a single "
                f"memory location (shape {tuple(out.shape)}, strides {out.stride()}); pass a tensor whose elements "
                "do not overlap (clone() an expanded one)"
            )
        _check_no_overlap(out, [x, up, w_packed, bias, head_weight, head_bias])
    pooled = alloc((batch, height // 2, width // 2, c_out), x.dtype, x.device) if pool else None
    packed_k = up is None and ksize > 1 and c_main < 16
    flops = 2 * batch * height * width * c_out * ksize * ksize * c_in + 2 * batch * height * width * c_out * n_cls
    _launch(
        x,
        up,
        w_packed,
        bias.contiguous() if bias is not None else None,
        out,
        pooled,
        head_weight,
        head_bias,
        ksize=ksize,
        up_mode=mode,
        packed_k=packed_k,
        relu=relu,
        d2s=False,
        sizes=(c_up, c_out, n_cls, low_h, low_w, up_h, up_w, pad_top, pad_left, scale_h, scale_w),
        name=f"conv{ksize}x{ksize}"
        + ("+up" if up is not None else "")
        + ("+pool" if pool else "")
        + ("+head" if head_weight is not None else ""),
        flops=flops,
    )
    return out, pooled


def conv_transpose2x2_nhwc(x: torch.Tensor, w_packed: torch.Tensor, bias4: torch.Tensor | None = None) -> torch.Tensor:
    """ConvTranspose2d(kernel 2, stride 2) of an NHWC view as one GEMM with a depth-to-space store.

    Args:
        x: (N, h, w, C_in) view.
        w_packed: (C_in, 4 * C_out) from :func:`pack_conv_transpose_weight`.
        bias4: the (C_out,) bias repeated 4 times, or None.

    Returns:
        (N, 2h, 2w, C_out) NHWC tensor.
    """
    _check_nhwc(x, "conv_transpose2x2_nhwc input")
    batch, h, w, c_in = x.shape
    if w_packed.dim() != 2 or w_packed.shape[0] != c_in or w_packed.shape[1] % 4:
        raise ValueError(f"packed weight: expected ({c_in}, 4 * C_out), got {tuple(w_packed.shape)}")
    if w_packed.dtype != x.dtype or w_packed.device != x.device:
        raise ValueError(f"weight: expected {x.dtype} on {x.device}, got {w_packed.dtype} on {w_packed.device}")
    c_out4 = w_packed.shape[1]
    if bias4 is not None:
        if bias4.shape != (c_out4,) or bias4.dtype != x.dtype or bias4.device != x.device:
            raise ValueError(
                f"bias4: expected the bias repeated 4 times, shape ({c_out4},) {x.dtype} on {x.device}, "
                f"got {tuple(bias4.shape)} {bias4.dtype} on {bias4.device}"
            )
        bias4 = bias4.contiguous()
    y = alloc((batch, 2 * h, 2 * w, c_out4 // 4), x.dtype, x.device)
    _launch(
        x,
        None,
        w_packed,
        bias4,
        y,
        None,
        None,
        None,
        ksize=1,
        up_mode=UP_NONE,
        packed_k=False,
        relu=False,
        d2s=True,
        sizes=(0, c_out4, 0, 0, 0, 0, 0, 0, 0, 0.0, 0.0),
        name="conv_transpose2x2",
        flops=2 * batch * h * w * c_in * c_out4,
    )
    return y


__all__ = [
    "INTERPRET",
    "MAX_HEAD_CHANNELS",
    "MAX_HEAD_CLASSES",
    "conv2d_nhwc",
    "conv_transpose2x2_nhwc",
    "pack_conv_transpose_weight",
    "pack_conv_weight",
    "ConvProblem",
    "candidate_configs",
    "check_weight_addressable",
    "pick_config",
]
