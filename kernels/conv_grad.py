"""Weight and bias gradients of a stride-1 convolution over NHWC maps: ``dW = A^T dZ`` and ``db = sum_p dZ``.

``A`` is the forward loader's implicit im2col of the conv's input (rows: output pixels; columns: (tap, input
channel)), ``dZ`` the gradient of the conv's output before its activation. The reduction runs over every output
pixel of the batch (10^6 and more at 512x512), so it is split: each program reduces one slice of the pixels for
one (tap, channel block) x (output-channel block) tile of ``dW`` into an fp32 partial, and a second launch sums the
partials of each element in a fixed order. No atomics: two runs give the same bits.

A decoder conv that reads two sources (the skip map and the upsampled map, never concatenated) has
``dW = [A_skip | A_up]^T dZ``: its gradient is two launches of this kernel, one per source, each writing its rows
(the ``row_offset`` argument).

``dW`` comes in the forward's packed layout, ``(k * k * c_in, c_out)`` with row ``tap * c_in + channel`` (see
:func:`fastunet.kernels.conv.pack_conv_weight`), in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastunet.kernels._common import (
    LaunchRecord,
    alloc,
    check_runnable,
    dot_flags,
    is_dry_run,
    launch_guard,
    mma,
    next_pow2,
    pixel_offset,
    record_launch,
    recording,
    sm_count,
)


@triton.jit
def _weight_grad_partial_kernel(
    x_ptr,  # (batch, in_h, in_w, c_in) view: the conv's input
    dz_ptr,  # (batch, out_h, out_w, c_out) view: gradient of the conv's output
    part_ptr,  # (splits, rows, c_out) fp32
    bias_part_ptr,  # (splits, c_out) fp32
    batch,
    in_h,
    in_w,
    out_h,
    out_w,
    c_in,
    c_out,
    rows,  # rows of the partial: k * k * c_in
    pixels_per_split,
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
    HAS_BIAS: tl.constexpr,
    INTERPRETER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """partial[s, tap * c_in + c, n] = sum over split s's output pixels p of x[p shifted by tap, c] dz[p, n].

    Grid: (k * k * cdiv(c_in, BLOCK_C), cdiv(c_out, BLOCK_N), splits).
    """
    pid_kc = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    c_blocks = tl.cdiv(c_in, BLOCK_C)
    tap = pid_kc // c_blocks
    dy = tap // KSIZE - PAD
    dx = tap % KSIZE - PAD
    offs_c = (pid_kc % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < c_in
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < c_out
    col_x = offs_c.to(tl.int64) * stride_xc
    col_z = offs_n.to(tl.int64) * stride_zc
    total = batch * out_h * out_w
    start = split * pixels_per_split
    end = tl.minimum(start + pixels_per_split, total)
    acc = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_valid = offs_p < end
        ox = offs_p % out_w
        oy = (offs_p // out_w) % out_h
        img = offs_p // (out_w * out_h)
        iy = oy + dy
        ix = ox + dx
        a_ok = p_valid & (iy >= 0) & (iy < in_h) & (ix >= 0) & (ix < in_w)
        a = tl.load(
            x_ptr + pixel_offset(img, iy, ix, stride_xn, stride_xh, stride_xw)[:, None] + col_x[None, :],
            mask=a_ok[:, None] & c_mask[None, :],
            other=0.0,
        )
        g = tl.load(
            dz_ptr + pixel_offset(img, oy, ox, stride_zn, stride_zh, stride_zw)[:, None] + col_z[None, :],
            mask=p_valid[:, None] & n_mask[None, :],
            other=0.0,
        )
        acc = mma(tl.trans(a), g, acc, INTERPRETER, DOT_PRECISION)
        if HAS_BIAS:
            bias_acc += tl.sum(g.to(tl.float32), axis=0)
    out_rows = tap * c_in + offs_c
    part = part_ptr + split.to(tl.int64) * rows * c_out
    tl.store(
        part + out_rows.to(tl.int64)[:, None] * c_out + offs_n[None, :], acc, mask=c_mask[:, None] & n_mask[None, :]
    )
    if HAS_BIAS:
        if pid_kc == 0:
            tl.store(bias_part_ptr + split.to(tl.int64) * c_out + offs_n, bias_acc, mask=n_mask)


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, splits, elements, out_row_offset, row_len, BLOCK: tl.constexpr):
    """out[row_offset * row_len + e] = sum_s part[s, e] (in order s = 0, 1, ...) for the partials' elements e."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < elements
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, splits):  # splits * elements < 2**31 (see MAX_PARTIAL_ELEMENTS)
        acc += tl.load(part_ptr + s * elements + offs, mask=mask, other=0.0)
    tl.store(out_ptr + out_row_offset * row_len + offs, acc, mask=mask)


# The fp32 partials: at most 2**26 elements (256 MB), and element offsets that fit int32.
MAX_PARTIAL_ELEMENTS = 2**26


def _splits(pixels: int, tiles: int, sms: int, block_p: int, elements: int) -> int:
    """Pixel slices: enough programs for two waves over the SMs, each slice at least 8 pixel blocks long, the
    partials within :data:`MAX_PARTIAL_ELEMENTS`."""
    by_occupancy = max(1, triton.cdiv(2 * sms, max(1, tiles)))
    by_length = max(1, pixels // (8 * block_p))
    by_memory = max(1, MAX_PARTIAL_ELEMENTS // max(1, elements))
    return int(min(by_occupancy, by_length, by_memory))


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of a stride-1 ``ksize x ksize`` conv with ``padding`` w.r.t. its weight and bias.

    Args:
        x: (N, H, W, C_in) view, the conv's input (any strides).
        dz: (N, H + 2 padding - ksize + 1, W + ..., C_out) view, the gradient of the conv's output.
        bias: also return the bias gradient ``dz.sum((0, 1, 2))`` (fp32), computed in the same pass.
        out: fp32 (rows, C_out) tensor to write into at rows ``[row_offset, row_offset + k*k*C_in)`` (a decoder conv's
            two sources), else a new (k*k*C_in, C_out) tensor.
        splits: pixel slices of the reduction (default: enough for two waves of programs).

    Returns:
        (dW packed as ``(k*k*C_in, C_out)`` fp32, row ``tap * C_in + channel``; db fp32 (C_out,) or None).
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
    batch, in_h, in_w, c_in = x.shape
    out_h, out_w = in_h + 2 * padding - ksize + 1, in_w + 2 * padding - ksize + 1
    c_out = dz.shape[3]
    if tuple(dz.shape[:3]) != (batch, out_h, out_w):
        raise ValueError(
            f"dz: expected shape ({batch}, {out_h}, {out_w}, C_out) for a {ksize}x{ksize} conv with padding "
            f"{padding} of a {tuple(x.shape)} input, got {tuple(dz.shape)}"
        )
    rows = ksize * ksize * c_in
    if out is None:
        if row_offset:
            raise ValueError("row_offset needs out=")
        out = alloc((rows, c_out), torch.float32, x.device)
    elif (
        out.dtype != torch.float32
        or out.dim() != 2
        or out.shape[1] != c_out
        or not out.is_contiguous()
        or not 0 <= row_offset <= out.shape[0] - rows
    ):
        raise ValueError(
            f"out: expected a contiguous float32 (>= {row_offset + rows}, {c_out}) tensor for rows "
            f"[{row_offset}, {row_offset + rows}), got {out.dtype} {tuple(out.shape)}"
        )
    db = alloc((c_out,), torch.float32, x.device) if bias else None
    pixels = batch * out_h * out_w
    if pixels + 1024 >= 2**31:
        raise ValueError(f"at most 2**31 - 1025 output pixels per launch, got {pixels}")
    if rows * c_out == 0:
        return out[row_offset : row_offset + rows], db
    block_c = min(64, max(16, next_pow2(c_in)))
    block_n = min(128, max(16, next_pow2(c_out)))
    block_p = 64
    tiles = ksize * ksize * triton.cdiv(c_in, block_c) * triton.cdiv(c_out, block_n)
    if splits is None:
        splits = _splits(pixels, tiles, sm_count(x), block_p, rows * c_out)
    if not isinstance(splits, int) or not 1 <= splits <= max(1, MAX_PARTIAL_ELEMENTS // (rows * c_out)):
        raise ValueError(
            f"splits must be an int in [1, {max(1, MAX_PARTIAL_ELEMENTS // (rows * c_out))}] (the partials' size "
            f"limit for a {rows} x {c_out} gradient), got {splits!r}"
        )
    per_split = triton.cdiv(max(pixels, 1), splits)
    per_split = triton.cdiv(per_split, block_p) * block_p
    part = alloc((splits, rows, c_out), torch.float32, x.device)
    bias_part = alloc((splits, c_out), torch.float32, x.device) if bias else part
    interpreter, precision = dot_flags(x.dtype, torch.backends.cudnn.allow_tf32)
    grid = (ksize * ksize * triton.cdiv(c_in, block_c), triton.cdiv(c_out, block_n), splits)
    args = (
        x, dz, part, bias_part, batch, in_h, in_w, out_h, out_w, c_in, c_out, rows, per_split,
        *x.stride(), *dz.stride(),
    )  # fmt: skip
    constexprs = {
        "KSIZE": ksize,
        "PAD": padding,
        "HAS_BIAS": bias,
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
                flops=2 * pixels * rows * c_out,
                bytes_read=(x.numel() + dz.numel()) * x.element_size(),
                bytes_written=part.numel() * 4 + (bias_part.numel() * 4 if bias else 0),
                args=args,
                constexprs=constexprs,
                launch_options=options,
            )
        )
    reductions = [(part, out, rows * c_out, row_offset)]
    if bias:
        reductions.append((bias_part, db, c_out, 0))
    block = 1024
    for source, target, elements, offset in reductions:
        sum_args = (source, target, splits, elements, offset, c_out)
        if recording():
            record_launch(
                LaunchRecord(
                    name=f"{name}.sum",
                    kernel=_sum_splits_kernel,
                    grid=(triton.cdiv(elements, block),),
                    flops=0,
                    bytes_read=source.numel() * 4,
                    bytes_written=elements * 4,
                    args=sum_args,
                    constexprs={"BLOCK": block},
                    launch_options={"num_warps": 4, "num_stages": 1},
                )
            )
    if not is_dry_run():
        with launch_guard(x):
            _weight_grad_partial_kernel[grid](*args, **constexprs, **options)
            for source, target, elements, offset in reductions:
                _sum_splits_kernel[(triton.cdiv(elements, block),)](
                    source, target, splits, elements, offset, c_out, BLOCK=block, num_warps=4, num_stages=1
                )
    return out[row_offset : row_offset + rows], db


__all__ = ["conv2d_weight_grad_nhwc"]
