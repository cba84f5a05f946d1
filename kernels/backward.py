"""Elementwise and gather steps of the U-Net's backward pass over NHWC maps: deterministic, no atomics.

Three memory-bound kernels turn the gradient arriving at a stored map into the gradient one step further back:

* :func:`activation_pool_backward_nhwc`: the gradient of a conv's pre-activation map ``z`` from the gradient of its
  stored output ``y = act(z)``. An encoder's second conv also feeds its 2x2 max-pool, so the pooled map's gradient
  is routed back to each window's maximum and added: ``dz = act'(y) * (grad_y + unpool(grad_pooled))``. With
  ``norm_read`` it is the normalize+pool launch's backward: the pool's input ``act(z * scale + shift)`` made again
  from the pre-norm map z, the routed gradient taken through that read, and the scale's and shift's sums.
* :func:`upsample2x_adjoint_nhwc`: the adjoint of the decoder's ``center_pad(F.interpolate(low, scale_factor=2),
  H, W)`` (nearest or bilinear, the upsampled map placed into the skip's frame at (pad_top, pad_left), cropped where
  the offsets are negative), optionally times the ReLU derivative of the layer that produced ``low``.
* :func:`head_backward_nhwc`: the 1x1 head's backward in one pass over its input map: the map's gradient
  ``dlogits W^T`` and per-program partials of ``dW`` and ``db``, summed in program order by a second launch.

All sum in fp32 in a fixed order and round once to the storage dtype, so two runs give the same bits. Eager
PyTorch's upsample backward scatters with atomics instead; here each low-resolution pixel gathers its
contributions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastunet.kernels._common import (
    ACT_NONE,
    ACT_RELU,
    INTERPRET,
    LaunchRecord,
    acc_type,
    activate,
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
    stat_dtype,
    to_storage,
)
from fastunet.kernels.conv import _norm_read_grad, _relu_derivative, _sum_read_parts
from fastunet.kernels.conv_grad import _sum_splits_kernel
from fastunet.kernels.norm_grad import NORM_ACTIVATIONS, _activation_grad
from fastunet.kernels.stats import NormIn
from fastunet.kernels.upsample import BILINEAR, BILINEAR_ALIGN_CORNERS, MODES, NEAREST, _upsample_source

# The activations whose derivative the pool backward applies (the ReLU reads its stored output, as torch's
# ``threshold_backward`` does).
BACKWARD_ACTIVATIONS = {"relu": ACT_RELU, "none": ACT_NONE}
# Output rows (columns) of a bilinear 2x upsampling that read one low-resolution row j (column) with a nonzero
# weight: among 2j - 1 ... 2j + 2 (see :func:`_bilinear_weight`).
BILINEAR_TAPS = tl.constexpr(4)
MAX_PIXELS = 2**31 - 1025


def _check_map(t: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        given = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{what}: expected a 4-D (N, H, W, C) view, got {given}")
    check_runnable(t, what)


def _check_like(t: torch.Tensor, what: str, shape: tuple[int, ...], ref: torch.Tensor, ref_name: str) -> None:
    _check_map(t, what)
    if tuple(t.shape) != shape:
        raise ValueError(f"{what}: expected shape {shape}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(
            f"{what}: expected {ref_name}'s dtype and device ({ref.dtype} on {ref.device}), got {t.dtype} on {t.device}"
        )


# ---------------------------------------------------------------------------------------------------------------
# Activation (and max-pool) backward
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _corner_mask(valid, row, col, height, width, c_mask):
    """Which (window, channel) elements of one corner lie inside the map (a half window's missing corners do not)."""
    return (valid & (row < height) & (col < width))[:, None] & c_mask[None, :]


@triton.jit
def _load_corner(ptr, img, row, col, cols, mask, stride_n, stride_h, stride_w, ENABLED: tl.constexpr):
    """One corner of each window as fp32 (fp64 for a float64 map; 0 where masked, or everywhere when not
    ``ENABLED``)."""
    acc_t: tl.constexpr = acc_type(ptr.dtype.element_ty)
    if ENABLED:
        src = pixel_offset(img, row, col, stride_n, stride_h, stride_w)
        return tl.load(ptr + src[:, None] + cols, mask=mask, other=0.0).to(acc_t)
    return tl.zeros(mask.shape, dtype=acc_t)


@triton.jit
def _store_corner_grad(dz_ptr, img, row, col, col_d, mask, value, grad, routed, pooled, stride_dn, stride_dh,
                       stride_dw, ACT: tl.constexpr, INTERPRETER: tl.constexpr):  # fmt: skip
    """dz at one corner: ``act'(y) * (grad_y + pooled gradient if this corner is the window's maximum)``, rounded
    once to the storage dtype."""
    total = tl.where(routed, grad + pooled, grad)
    if ACT == ACT_RELU:
        total = tl.where(value <= 0.0, 0.0, total)  # threshold_backward(g, y, 0): a NaN y passes g through
    dst = pixel_offset(img, row, col, stride_dn, stride_dh, stride_dw)
    tl.store(dz_ptr + dst[:, None] + col_d, to_storage(total, dz_ptr.dtype.element_ty, INTERPRETER), mask=mask)


@triton.jit
def _corner_read(z, scale, shift, scale_ptr, offs_c, c_mask, slope, lo, hi, ACT: tl.constexpr, OUT_T: tl.constexpr,
                 INTERPRETER: tl.constexpr):  # fmt: skip
    """NORM_READ: the pool's input at one corner, ``act(z * scale + shift)`` as the forward stored it (rounded once
    to the map's dtype, then compared as fp32), and ``u``, the value before the activation (``scale_ptr``: a
    stand-in for PReLU slopes, which no read here has)."""
    u = z * scale[None, :] + shift[None, :]
    value = activate(u, scale_ptr, offs_c, c_mask, slope, lo, hi, ACT)
    return to_storage(value, OUT_T, INTERPRETER).to(z.dtype), u


@triton.jit
def _store_corner_read_grad(dz_ptr, img, row, col, col_d, mask, z, u, scale, grad, routed, pooled, slope, lo, hi,
                            stride_dn, stride_dh, stride_dw, ACT: tl.constexpr, INTERPRETER: tl.constexpr):  # fmt: skip
    """NORM_READ: dz at one corner, the gradient of the pool's input (``grad_y`` plus the pooled gradient where this
    corner is the window's maximum) taken through the read, ``act'(u) * that * scale``; returns the corner's ``g * z``
    and ``g`` (``g = act'(u) * that``, 0 outside the map), which the caller adds over the corners before summing them
    over the windows: two cross-lane sums a program, not two a corner."""
    total = tl.where(routed, grad + pooled, grad)
    g = tl.where(mask, _activation_grad(u, total, slope, lo, hi, ACT), 0.0)
    dst = pixel_offset(img, row, col, stride_dn, stride_dh, stride_dw)
    tl.store(dz_ptr + dst[:, None] + col_d, to_storage(g * scale[None, :], dz_ptr.dtype.element_ty, INTERPRETER),
             mask=mask)  # fmt: skip
    return g * z, g


@triton.jit
def _activation_pool_backward_kernel(
    y_ptr,  # (batch, height, width, channels) view: the stored post-activation map (the pool's input); with
    # NORM_READ the pre-norm map z the pool's input was made from
    gy_ptr,  # (batch, height, width, channels) view: gradient arriving at y directly (HAS_GRAD_Y)
    gp_ptr,  # (batch, height // 2, width // 2, channels) view: gradient of the pooled map (HAS_POOLED)
    dz_ptr,  # (batch, height, width, channels): the gradient of the pre-activation map (with NORM_READ: of z)
    scale_ptr,  # (batch, channels) fp32 (NORM_READ): the read act(z * scale + shift)
    shift_ptr,
    part_ptr,  # (2, tiles_img, batch, channels) fp32 (NORM_READ): per-program sums of g * z and of g
    tiles_img,  # NORM_READ: programs along axis 0 per image
    in_slope,  # NORM_READ: the activation's parameters (LeakyReLU slope, clamp bounds)
    in_lo,
    in_hi,
    batch,
    height,
    width,
    channels,
    win_h,  # cdiv(height, 2): window rows, the odd last row's half windows included
    win_w,
    stride_yn,
    stride_yh,
    stride_yw,
    stride_yc,
    stride_gn,
    stride_gh,
    stride_gw,
    stride_gc,
    stride_pn,
    stride_ph,
    stride_pw,
    stride_pc,
    stride_dn,
    stride_dh,
    stride_dw,
    stride_dc,
    HAS_GRAD_Y: tl.constexpr,
    HAS_POOLED: tl.constexpr,
    ACT: tl.constexpr,
    NORM_READ: tl.constexpr,
    IN_ACT: tl.constexpr,
    INTERPRETER: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dz over a (BLOCK_P 2x2 windows) x (BLOCK_C channels) tile: each program owns every pixel of its windows.

    Grid: (cdiv(batch * win_h * win_w, BLOCK_P), cdiv(channels, BLOCK_C)). The windows tile the map (the odd last
    row and column form half or quarter windows, which receive no pooled gradient, as in floor-mode pooling), so
    every dz element is written exactly once, without atomics. The routing repeats ``max_pool2d``'s scan: corners
    in row-major order, a corner takes over when it is greater than the running maximum or is NaN, so the first of
    equal maxima keeps the gradient and the last NaN takes it. Memory-bound: y, grad_y and grad_pooled read once,
    dz written once.

    ``NORM_READ`` (the normalize+pool launch's backward; ``ACT`` none): ``y_ptr`` is the pre-norm map z, the pool's
    input ``act(z * scale + shift)`` (``IN_ACT``) as the forward stored it is made again in registers for the
    routing, and dz is z's gradient through that read (``act'(u) * g * scale``); axis 0 has ``tiles_img`` programs
    per image, each storing its sums of ``g * z`` and ``g`` per channel to row (program, image) of ``part_ptr``.
    """
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < channels
    if NORM_READ:
        img_t = pid_p // tiles_img
        local = (pid_p % tiles_img) * BLOCK_P + tl.arange(0, BLOCK_P)
        wx = local % win_w
        wy = local // win_w
        img = tl.zeros_like(local) + img_t
        valid = local < win_h * win_w
        acc_n: tl.constexpr = acc_type(y_ptr.dtype.element_ty)
        at_s = img_t.to(tl.int64) * channels + offs_c
        scale = tl.load(scale_ptr + at_s, mask=c_mask, other=0.0).to(acc_n)
        shift = tl.load(shift_ptr + at_s, mask=c_mask, other=0.0).to(acc_n)
    else:
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        wx = offs_p % win_w
        wy = (offs_p // win_w) % win_h
        img = offs_p // (win_w * win_h)
        valid = img < batch
    col_y = offs_c.to(tl.int64)[None, :] * stride_yc
    col_g = offs_c.to(tl.int64)[None, :] * stride_gc
    col_d = offs_c.to(tl.int64)[None, :] * stride_dc
    top, left = 2 * wy, 2 * wx
    m00 = _corner_mask(valid, top, left, height, width, c_mask)
    m01 = _corner_mask(valid, top, left + 1, height, width, c_mask)
    m10 = _corner_mask(valid, top + 1, left, height, width, c_mask)
    m11 = _corner_mask(valid, top + 1, left + 1, height, width, c_mask)
    y00 = _load_corner(y_ptr, img, top, left, col_y, m00, stride_yn, stride_yh, stride_yw, True)
    y01 = _load_corner(y_ptr, img, top, left + 1, col_y, m01, stride_yn, stride_yh, stride_yw, True)
    y10 = _load_corner(y_ptr, img, top + 1, left, col_y, m10, stride_yn, stride_yh, stride_yw, True)
    y11 = _load_corner(y_ptr, img, top + 1, left + 1, col_y, m11, stride_yn, stride_yh, stride_yw, True)
    if NORM_READ:
        out_t: tl.constexpr = y_ptr.dtype.element_ty
        z00, z01, z10, z11 = y00, y01, y10, y11
        y00, u00 = _corner_read(z00, scale, shift, scale_ptr, offs_c, c_mask, in_slope, in_lo, in_hi, IN_ACT,
                                    out_t, INTERPRETER)  # fmt: skip
        y01, u01 = _corner_read(z01, scale, shift, scale_ptr, offs_c, c_mask, in_slope, in_lo, in_hi, IN_ACT,
                                    out_t, INTERPRETER)  # fmt: skip
        y10, u10 = _corner_read(z10, scale, shift, scale_ptr, offs_c, c_mask, in_slope, in_lo, in_hi, IN_ACT,
                                    out_t, INTERPRETER)  # fmt: skip
        y11, u11 = _corner_read(z11, scale, shift, scale_ptr, offs_c, c_mask, in_slope, in_lo, in_hi, IN_ACT,
                                    out_t, INTERPRETER)  # fmt: skip
    g00 = _load_corner(gy_ptr, img, top, left, col_g, m00, stride_gn, stride_gh, stride_gw, HAS_GRAD_Y)
    g01 = _load_corner(gy_ptr, img, top, left + 1, col_g, m01, stride_gn, stride_gh, stride_gw, HAS_GRAD_Y)
    g10 = _load_corner(gy_ptr, img, top + 1, left, col_g, m10, stride_gn, stride_gh, stride_gw, HAS_GRAD_Y)
    g11 = _load_corner(gy_ptr, img, top + 1, left + 1, col_g, m11, stride_gn, stride_gh, stride_gw, HAS_GRAD_Y)
    acc_t: tl.constexpr = acc_type(dz_ptr.dtype.element_ty)
    pooled = tl.zeros((BLOCK_P, BLOCK_C), dtype=acc_t)
    winner = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.int32) - 1  # no corner: a half window, or no pooled gradient
    if HAS_POOLED:
        full = valid & (top + 1 < height) & (left + 1 < width)
        pool_mask = full[:, None] & c_mask[None, :]
        src = pixel_offset(img, wy, wx, stride_pn, stride_ph, stride_pw)
        pooled = tl.load(gp_ptr + src[:, None] + offs_c.to(tl.int64)[None, :] * stride_pc, mask=pool_mask,
                         other=0.0).to(acc_t)  # fmt: skip
        best = y00
        winner = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.int32)
        take = (y01 > best) | (y01 != y01)
        best = tl.where(take, y01, best)
        winner = tl.where(take, 1, winner)
        take = (y10 > best) | (y10 != y10)
        best = tl.where(take, y10, best)
        winner = tl.where(take, 2, winner)
        take = (y11 > best) | (y11 != y11)
        winner = tl.where(take, 3, winner)
        winner = tl.where(pool_mask, winner, -1)
    if NORM_READ:
        tl.static_assert(ACT == ACT_NONE, "the read's own activation (IN_ACT) is the one to differentiate")
        sum_gz, sum_g = _store_corner_read_grad(
            dz_ptr, img, top, left, col_d, m00, z00, u00, scale, g00, winner == 0, pooled, in_slope, in_lo, in_hi,
            stride_dn, stride_dh, stride_dw, IN_ACT, INTERPRETER)  # fmt: skip
        gz, g = _store_corner_read_grad(
            dz_ptr, img, top, left + 1, col_d, m01, z01, u01, scale, g01, winner == 1, pooled, in_slope, in_lo, in_hi,
            stride_dn, stride_dh, stride_dw, IN_ACT, INTERPRETER)  # fmt: skip
        sum_gz, sum_g = sum_gz + gz, sum_g + g
        gz, g = _store_corner_read_grad(
            dz_ptr, img, top + 1, left, col_d, m10, z10, u10, scale, g10, winner == 2, pooled, in_slope, in_lo, in_hi,
            stride_dn, stride_dh, stride_dw, IN_ACT, INTERPRETER)  # fmt: skip
        sum_gz, sum_g = sum_gz + gz, sum_g + g
        gz, g = _store_corner_read_grad(
            dz_ptr, img, top + 1, left + 1, col_d, m11, z11, u11, scale, g11, winner == 3, pooled, in_slope, in_lo,
            in_hi, stride_dn, stride_dh, stride_dw, IN_ACT, INTERPRETER)  # fmt: skip
        sum_gz, sum_g = sum_gz + gz, sum_g + g
        sum_gz = tl.sum(sum_gz, axis=0)
        sum_g = tl.sum(sum_g, axis=0)
        row = ((pid_p % tiles_img).to(tl.int64) * batch + img_t) * channels + offs_c
        tl.store(part_ptr + row, sum_gz, mask=c_mask)
        tl.store(part_ptr + row + tiles_img * batch * channels, sum_g, mask=c_mask)
        return
    _store_corner_grad(dz_ptr, img, top, left, col_d, m00, y00, g00, winner == 0, pooled, stride_dn, stride_dh,
                       stride_dw, ACT, INTERPRETER)  # fmt: skip
    _store_corner_grad(dz_ptr, img, top, left + 1, col_d, m01, y01, g01, winner == 1, pooled, stride_dn, stride_dh,
                       stride_dw, ACT, INTERPRETER)  # fmt: skip
    _store_corner_grad(dz_ptr, img, top + 1, left, col_d, m10, y10, g10, winner == 2, pooled, stride_dn, stride_dh,
                       stride_dw, ACT, INTERPRETER)  # fmt: skip
    _store_corner_grad(dz_ptr, img, top + 1, left + 1, col_d, m11, y11, g11, winner == 3, pooled, stride_dn,
                       stride_dh, stride_dw, ACT, INTERPRETER)  # fmt: skip


def activation_pool_backward_nhwc(
    y: torch.Tensor,
    grad_y: torch.Tensor | None = None,
    grad_pooled: torch.Tensor | None = None,
    *,
    activation: str = "relu",
    norm_read: NormIn | None = None,
    name: str = "activation_pool_backward",
):
    """Gradient of a conv's pre-activation map from the gradients of its stored output ``y = act(z)`` and of
    ``F.max_pool2d(y, 2)`` (floor mode): ``dz = act'(y) * (grad_y + unpool(grad_pooled))``.

    ``unpool`` routes each window's gradient to the element ``max_pool2d``'s backward routes it to: the first
    maximum in row-major order, or the window's last NaN; the odd last row and column get none. ``act'`` is the
    ReLU's ``where(y <= 0, 0, g)`` (torch's ``threshold_backward``: a NaN y passes g) or 1 (``"none"``). The sum is
    taken in fp32 and rounded once.

    Args:
        y: (N, H, W, C) view, any strides: the stored post-activation map.
        grad_y: None or an (N, H, W, C) view (a channel slice of a wider map, say): the gradient arriving at y.
        grad_pooled: None or an (N, H // 2, W // 2, C) view: the gradient of the pooled map.
        activation: ``"relu"`` or ``"none"``.
        norm_read: None, or (activation ``"none"``) the read through which the pool's input was made from ``y``,
            then the stored pre-norm map z: the pool's input ``act(z * scale + shift)`` (ReLU, LeakyReLU, clamp or
            none after the norm) is made again in registers for the routing, as the forward stored it, and the
            result is z's gradient through the read, ``act'(u) * (grad_y + unpool(grad_pooled)) * scale``: the
            normalize+pool launch's backward in one pass over z, with the sums of ``g * z`` and ``g`` over each
            image's pixels (per program, then over the programs in a fixed order).

    Returns:
        (N, H, W, C) contiguous NHWC tensor in y's dtype; with ``norm_read`` ``(dz, grad_scale, grad_shift)``, the
        two sums fp32 (N, C) (fp64 for a float64 map).
    """
    _check_map(y, "activation_pool_backward_nhwc y")
    if grad_y is None and grad_pooled is None:
        raise ValueError("activation_pool_backward_nhwc: expected grad_y, grad_pooled or both, got neither")
    if activation not in BACKWARD_ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(BACKWARD_ACTIVATIONS)}, got {activation!r}")
    if norm_read is not None:
        norm_read.check(y, "activation_pool_backward_nhwc norm_read")
        if activation != "none" or norm_read.activation not in NORM_ACTIVATIONS:
            raise ValueError(
                f"norm_read: the read's own activation (relu, leaky_relu, clamp or none) is the one differentiated, "
                f"with activation 'none'; got activation {activation!r}, the read's {norm_read.activation!r}"
            )
    batch, height, width, channels = y.shape
    if grad_y is not None:
        _check_like(grad_y, "activation_pool_backward_nhwc grad_y", tuple(y.shape), y, "y")
    if grad_pooled is not None:
        pooled_shape = (batch, height // 2, width // 2, channels)
        _check_like(grad_pooled, "activation_pool_backward_nhwc grad_pooled", pooled_shape, y, "y")
    win_h, win_w = triton.cdiv(height, 2), triton.cdiv(width, 2)
    windows = batch * win_h * win_w
    if windows > MAX_PIXELS:
        raise ValueError(f"at most {MAX_PIXELS} 2x2 windows per launch, got {windows}")
    dz = alloc((batch, height, width, channels), y.dtype, y.device)
    stat = stat_dtype(y.dtype)
    if windows == 0 or channels == 0:
        if norm_read is None:
            return dz
        return dz, *(torch.zeros((batch, channels), dtype=stat, device=y.device) for _ in range(2))
    # A pooled gradient with no window (H or W == 1) routes nothing: left out like an absent one.
    has_pooled = grad_pooled is not None and grad_pooled.numel() > 0
    block_c = min(64, max(16, next_pow2(channels)))
    # About 4K elements (1K windows x channels) a program: four corners of y, grad_y and dz live at once.
    block_p = max(16, 1024 // block_c)
    grid = (triton.cdiv(windows, block_p), triton.cdiv(channels, block_c))
    read_args = (y, y, y, 0, 0.0, 0.0, 0.0)
    part = None
    if norm_read is not None:  # programs of one image each: per-image sums
        tiles_img = triton.cdiv(win_h * win_w, block_p)
        grid = (batch * tiles_img, triton.cdiv(channels, block_c))
        part = alloc((2, tiles_img, batch, channels), stat, y.device)
        read_args = (norm_read.scale, norm_read.shift, part, tiles_img, float(norm_read.slope), float(norm_read.lo),
                     float(norm_read.hi))  # fmt: skip
    gy = grad_y if grad_y is not None else y
    gp = grad_pooled if has_pooled else y
    gp_strides = grad_pooled.stride() if has_pooled else (0, 0, 0, 0)
    args = (y, gy, gp, dz, *read_args, batch, height, width, channels, win_h, win_w, *y.stride(), *gy.stride(),
            *gp_strides, *dz.stride())  # fmt: skip
    constexprs = {
        "HAS_GRAD_Y": grad_y is not None,
        "HAS_POOLED": has_pooled,
        "ACT": BACKWARD_ACTIVATIONS[activation].value,
        "NORM_READ": norm_read is not None,
        "IN_ACT": NORM_ACTIVATIONS[norm_read.activation].value if norm_read is not None else 0,
        "INTERPRETER": INTERPRET,
        "BLOCK_P": block_p,
        "BLOCK_C": block_c,
    }
    options = {"num_warps": 4, "num_stages": 1}
    if recording():
        size = y.element_size()
        read = y.numel() * size * (2 if grad_y is not None else 1) + (grad_pooled.numel() * size if has_pooled else 0)
        record_launch(
            LaunchRecord(
                name=name + ("+pool" if has_pooled else "") + ("+norm_read" if norm_read is not None else ""),
                kernel=_activation_pool_backward_kernel,
                grid=grid,
                flops=0,
                bytes_read=read,
                bytes_written=dz.numel() * size + (part.numel() * part.element_size() if part is not None else 0),
                args=args,
                constexprs=constexprs,
                launch_options=options,
            )
        )
    if not is_dry_run():
        with launch_guard(y):
            _activation_pool_backward_kernel[grid](*args, **constexprs, **options)
    if norm_read is None:
        return dz
    return dz, *_sum_read_parts(part, f"{name}.sum", y)


# ---------------------------------------------------------------------------------------------------------------
# Adjoint of the 2x upsampling placed into the skip's frame
# ---------------------------------------------------------------------------------------------------------------
def center_pad_offsets(height: int, width: int, up_h: int, up_w: int) -> tuple[int, int]:
    """(pad_top, pad_left) at which ``fastunet.reference.center_pad`` places an (up_h, up_w) map into an (height,
    width) frame: half the difference, rounded down (the odd extra row or column goes to the bottom or right; a
    negative offset drops the map's first rows or columns), as the conv's two-source loader reads it."""
    return (height - up_h) // 2, (width - up_w) // 2


def _source_scales(mode: str, align_corners: bool, low_h: int, low_w: int) -> tuple[int, float, float]:
    """(kernel mode, scale_h, scale_w) of ``F.interpolate(scale_factor=2)``: the forward's source-coordinate scale."""
    if mode == "nearest":
        return NEAREST.value, 0.5, 0.5
    if align_corners:
        scale_h = (low_h - 1) / (2 * low_h - 1) if low_h > 1 else 0.0
        scale_w = (low_w - 1) / (2 * low_w - 1) if low_w > 1 else 0.0
        return BILINEAR_ALIGN_CORNERS.value, scale_h, scale_w
    return BILINEAR.value, 0.5, 0.5


@triton.jit
def _bilinear_weight(dst, low, scale, size, out_size, MODE: tl.constexpr, ACC: tl.constexpr):
    """Weight of low-resolution coordinate ``low`` in output coordinate ``dst``, and whether ``dst`` is an output
    coordinate at all (every one among the candidates ``2 low - 1 ... 2 low + 2`` reads ``low``, see below).

    The forward blends corners ``lo = min(int(src), size - 1)`` and ``hi = min(lo + 1, size - 1)`` of ``src(dst)``
    with fp32 weights ``1 - frac`` and ``frac`` (:func:`fastunet.kernels.upsample._upsample_source`); the weight of
    ``low`` is their sum over the corners equal to it (both at the clamped last row). ``dst`` reads ``low`` when
    ``lo`` is ``low - 1`` or ``low``: ``dst`` in ``2 low - 1 ... 2 low + 2`` (``lo(dst) >= k`` exactly when
    ``dst >= 2k + 1`` for ``k >= 1``: the source step is 1/2, or ``(size - 1) / (2 size - 1)`` with
    ``align_corners``, and fp32 rounding keeps ``src(2k)`` below ``k`` and ``src(2k + 1)`` at or above it: checked
    for every size up to 16384 and at random sizes up to 2^22), and ``dst = 0`` for ``low = 1``, whose weight is 0
    (output 0 sits exactly on row 0). That one is left out, with one difference from eager PyTorch, whose backward
    multiplies it by the zero weight: a NaN or inf gradient at output row (column) 0 does not reach low row (column)
    1 here. It still reaches row 0, so the gradient is non-finite either way.
    """
    lo, hi, frac = _upsample_source(dst, scale, size, MODE, ACC)
    weight = tl.where(lo == low, 1.0 - frac, 0.0) + tl.where(hi == low, frac, 0.0)
    return weight, (dst >= 0) & (dst < out_size)


@triton.jit
def _upsample2x_adjoint_kernel(
    g_ptr,  # (batch, height, width, channels) view: gradient of the frame holding the upsampled map
    gate_ptr,  # (batch, low_h, low_w, channels) view: the low map's stored post-ReLU values (GATE)
    out_ptr,  # (batch, low_h, low_w, channels): gradient of the low map
    batch,
    low_h,
    low_w,
    channels,
    height,
    width,
    pad_top,  # where the upsampled map's (0, 0) sits in the frame; negative: its first rows/columns dropped
    pad_left,
    scale_h,
    scale_w,
    stride_gn,
    stride_gh,
    stride_gw,
    stride_gc,
    stride_an,
    stride_ah,
    stride_aw,
    stride_ac,
    stride_on,
    stride_oh,
    stride_ow,
    stride_oc,
    MODE: tl.constexpr,
    GATE: tl.constexpr,
    INTERPRETER: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """grad_low[n, j, i, c] = sum over output pixels (oy, ox) reading low pixel (j, i) of
    ``w_y(oy) w_x(ox) grad[n, oy + pad_top, ox + pad_left, c]`` (0 where that is outside the frame), over a
    (BLOCK_P low pixels) x (BLOCK_C channels) tile.

    Grid: (batch * low_h * cdiv(low_w, BLOCK_P), cdiv(channels, BLOCK_C)): a program's low pixels lie in one low
    row, so its image, row, candidate rows and their weights are scalars (worked out once, not per pixel and per
    lane) and only the columns vary. A gather: each program writes its own low pixels, so no atomics and a fixed
    summation order (rows outer, columns inner: each row's column sum, weighted by ``w_x``, is weighted by ``w_y``
    and added). Nearest: the 2x2 block (2j + a, 2i + b), weights 1. Bilinear: the 4 x 4 candidates
    (2j - 1 + a, 2i - 1 + b), masked to those inside the upsampled map (all of which read the pixel,
    :func:`_bilinear_weight`), with the forward's fp32 weights. The frame is read once from memory, its neighbours'
    re-reads hit in cache (its sixteen candidates a pixel keep it issue-bound in the model, about 1.8x its bytes).
    """
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    row_blocks = tl.cdiv(low_w, BLOCK_P)
    low_row = pid_p // row_blocks  # image * low_h + ly
    ly = low_row % low_h
    img = low_row // low_h
    lx = (pid_p % row_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = lx < low_w
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < channels
    col_g = offs_c.to(tl.int64)[None, :] * stride_gc
    acc_t: tl.constexpr = acc_type(out_ptr.dtype.element_ty)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=acc_t)
    if MODE == NEAREST:
        for a in tl.static_range(2):
            fy = 2 * ly + a + pad_top
            # The row's tests as a vector before they meet one (some interpreters refuse a mask of a vector and
            # a scalar).
            fy_v = tl.zeros_like(lx) + fy
            row_ok = valid & (fy_v >= 0) & (fy_v < height)
            for b in tl.static_range(2):
                fx = 2 * lx + b + pad_left
                ok = row_ok & (fx >= 0) & (fx < width)
                src = pixel_offset(img, fy, fx, stride_gn, stride_gh, stride_gw)
                acc += tl.load(g_ptr + src[:, None] + col_g, mask=ok[:, None] & c_mask[None, :], other=0.0).to(acc_t)
    else:
        first_y = 2 * ly - 1
        first_x = 2 * lx - 1
        for a in tl.static_range(BILINEAR_TAPS):
            oy = first_y + a
            w_y, _ = _bilinear_weight(oy, ly, scale_h, low_h, 2 * low_h, MODE, acc_t)
            fy = oy + pad_top
            # The row's tests (it reads the pixel when it is an output row at all) as a vector, as above.
            oy_v = tl.zeros_like(lx) + oy
            row_ok = valid & (oy_v >= 0) & (oy_v < 2 * low_h) & (oy_v + pad_top >= 0) & (oy_v + pad_top < height)
            row = tl.zeros((BLOCK_P, BLOCK_C), dtype=acc_t)
            for b in tl.static_range(BILINEAR_TAPS):
                ox = first_x + b
                w_x, reads_x = _bilinear_weight(ox, lx, scale_w, low_w, 2 * low_w, MODE, acc_t)
                fx = ox + pad_left
                ok = row_ok & reads_x & (fx >= 0) & (fx < width)
                src = pixel_offset(img, fy, fx, stride_gn, stride_gh, stride_gw)
                g = tl.load(g_ptr + src[:, None] + col_g, mask=ok[:, None] & c_mask[None, :], other=0.0)
                # A candidate that does not read the pixel loads 0 (masked), so its finite weight adds exactly 0.
                row += w_x[:, None] * g.to(acc_t)
            acc += w_y * row
    mask = valid[:, None] & c_mask[None, :]
    if GATE:
        gate_src = pixel_offset(img, ly, lx, stride_an, stride_ah, stride_aw)
        gate = tl.load(gate_ptr + gate_src[:, None] + offs_c.to(tl.int64)[None, :] * stride_ac, mask=mask,
                       other=0.0).to(acc_t)  # fmt: skip
        acc = tl.where(gate <= 0.0, 0.0, acc)  # threshold_backward(g, gate, 0): a NaN gate passes g through
    dst = pixel_offset(img, ly, lx, stride_on, stride_oh, stride_ow)
    tl.store(out_ptr + dst[:, None] + offs_c.to(tl.int64)[None, :] * stride_oc,
             to_storage(acc, out_ptr.dtype.element_ty, INTERPRETER), mask=mask)  # fmt: skip


def upsample2x_adjoint_nhwc(
    grad: torch.Tensor,
    low_hw: tuple[int, int],
    mode: str,
    align_corners: bool = False,
    *,
    pad_top: int = 0,
    pad_left: int = 0,
    gate: torch.Tensor | None = None,
    name: str = "upsample2x_adjoint",
) -> torch.Tensor:
    """Gradient of the low-resolution map ``low`` of ``frame = place(F.interpolate(low, scale_factor=2, mode=mode,
    align_corners=...))`` from the frame's gradient: the adjoint of the 2x upsampling and of the placement.

    ``place`` puts the (2h, 2w) upsampled map at (pad_top, pad_left) of the (H, W) frame: rows and columns of the
    upsampled map outside the frame (negative offsets, or a map larger than the frame) get no gradient, frame pixels
    outside it are ignored. With the offsets of :func:`center_pad_offsets` this is the adjoint of
    ``fastunet.reference.center_pad(F.interpolate(low, ...), H, W)``. Each low pixel sums its contributions in fp32,
    in a fixed order, with the forward's fp32 weights, and is rounded once. A NaN gradient reaches the low pixels
    that read its pixel with a nonzero weight; eager PyTorch's scatter also multiplies by the zero weights of bilinear
    output row and column 0 (spreading a NaN or inf there to low row and column 1) and, at a clamped edge, adds the
    two corners' terms separately (``0 * inf`` is NaN there, inf here).

    Args:
        grad: (N, H, W, C) view, any strides (a channel slice ``g[..., c0:]`` of a wider map, say).
        low_hw: (h, w), the low-resolution map's size.
        mode: ``"nearest"`` or ``"bilinear"``.
        align_corners: bilinear only, as in ``F.interpolate``.
        pad_top, pad_left: where the upsampled map's first pixel sits in the frame (may be negative).
        gate: None or the low map's stored post-ReLU values, (N, h, w, C): the result is then
            ``where(gate <= 0, 0, grad_low)`` (the ReLU that produced ``low``; a NaN gate passes the gradient).

    Returns:
        (N, h, w, C) contiguous NHWC tensor in grad's dtype.
    """
    _check_map(grad, "upsample2x_adjoint_nhwc grad")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if align_corners and mode != "bilinear":
        raise ValueError(f"align_corners applies to bilinear upsampling only, got mode={mode!r}")
    if (
        not isinstance(low_hw, (tuple, list))
        or len(low_hw) != 2
        or not all(isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in low_hw)
    ):
        raise ValueError(f"low_hw: expected (h, w), two non-negative ints, got {low_hw!r}")
    for offset, what in ((pad_top, "pad_top"), (pad_left, "pad_left")):
        if not isinstance(offset, int) or isinstance(offset, bool):
            raise ValueError(f"{what}: expected an int, got {offset!r}")
    batch, height, width, channels = grad.shape
    low_h, low_w = low_hw
    if gate is not None:
        _check_like(gate, "upsample2x_adjoint_nhwc gate", (batch, low_h, low_w, channels), grad, "grad")
    pixels = batch * low_h * low_w
    if pixels > MAX_PIXELS:
        raise ValueError(f"at most {MAX_PIXELS} low-resolution pixels per launch, got {pixels}")
    if max(abs(pad_top), abs(pad_left), height, width, 2 * low_h, 2 * low_w) + 8 >= 2**31:
        raise ValueError(f"frame coordinates must fit in int32, got frame {height}x{width}, offsets "
                         f"({pad_top}, {pad_left}), low map {low_h}x{low_w}")  # fmt: skip
    out = alloc((batch, low_h, low_w, channels), grad.dtype, grad.device)
    if pixels == 0 or channels == 0:
        return out
    kernel_mode, scale_h, scale_w = _source_scales(mode, align_corners, low_h, low_w)
    block_c = min(64, max(16, next_pow2(channels)))
    # About 2K elements a program (the accumulator, a row's sum and the candidate tile live at once), pixels of one
    # low row.
    block_p = max(4, min(2048 // block_c, next_pow2(low_w)))
    grid = (batch * low_h * triton.cdiv(low_w, block_p), triton.cdiv(channels, block_c))
    gate_arg = gate if gate is not None else grad
    args = (grad, gate_arg, out, batch, low_h, low_w, channels, height, width, pad_top, pad_left, scale_h, scale_w,
            *grad.stride(), *gate_arg.stride(), *out.stride())  # fmt: skip
    constexprs = {
        "MODE": kernel_mode,
        "GATE": gate is not None,
        "INTERPRETER": INTERPRET,
        "BLOCK_P": block_p,
        "BLOCK_C": block_c,
    }
    options = {"num_warps": 4, "num_stages": 1}
    if recording():
        size = grad.element_size()
        # The frame pixels the upsampled map covers are read once (their re-reads by neighbouring low pixels are
        # cache hits).
        covered = max(0, min(height, pad_top + 2 * low_h) - max(0, pad_top))
        covered *= max(0, min(width, pad_left + 2 * low_w) - max(0, pad_left))
        record_launch(
            LaunchRecord(
                name=name + ("+gate" if gate is not None else ""),
                kernel=_upsample2x_adjoint_kernel,
                grid=grid,
                flops=0,
                bytes_read=batch * covered * channels * size + (gate.numel() * size if gate is not None else 0),
                bytes_written=out.numel() * size,
                args=args,
                constexprs=constexprs,
                launch_options=options,
            )
        )
    if not is_dry_run():
        with launch_guard(grad):
            _upsample2x_adjoint_kernel[grid](*args, **constexprs, **options)
    return out


# The head's backward: a map of at most this many channels and classes in one tile (the fused head's limits).
HEAD_MAX_CHANNELS = 128
HEAD_MAX_CLASSES = 64
# Pixels a step of the head's backward takes, and programs per SM of its grid (each loops over its share of the
# pixel steps in order, its dW and db partial in registers).
HEAD_BLOCK_P = 64
# With a read through a norm (z, u, the values read and their gradient live at once): steps of this many (pixel,
# channel) elements, 32 pixels of 64 channels (64 pixels spill a 64-channel map's build; 32 a 128-channel one's).
HEAD_READ_ELEMENTS = 2048
HEAD_PROGRAMS_PER_SM = 8


@triton.jit
def _head_backward_kernel(
    a_ptr,  # (batch, height, width, c): the map under the head (READ: the pre-norm map z it was read from)
    g_ptr,  # (batch, height, width, n_cls): the logits' gradient (any strides: an NCHW tensor's NHWC view)
    w_ptr,  # (c, n_cls) contiguous: the head's weight
    da_ptr,  # (batch, height, width, c) contiguous: the map's gradient (READ: z's)
    part_ptr,  # (programs, c + 1, n_cls): each program's partial dW (rows 0..c-1) and db (row c)
    scale_ptr,  # READ: (batch, c) fp32, the read's scale and shift
    shift_ptr,
    read_part_ptr,  # READ: (2, programs per image, batch, c): each program's sums of g * z, then of g
    slope,  # READ: the read's activation (LeakyReLU slope, clamp bounds)
    lo,
    hi,
    pixels,
    height,
    width,
    c,
    n_cls,
    steps,  # pixel steps per program
    stride_an,
    stride_ah,
    stride_aw,
    stride_ac,
    stride_gn,
    stride_gh,
    stride_gw,
    stride_gc,
    INTERPRETER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_CLS: tl.constexpr,
    MASK: tl.constexpr,
    READ: tl.constexpr,
    READ_ACT: tl.constexpr,
):
    """One pass of the 1x1 head's backward over the map: per step of BLOCK_P pixels ``da = g @ W^T`` is stored (with
    ``MASK``, the map being a ReLU's output: ``where(a <= 0, 0, da)``, the ReLU's derivative applied too) and
    ``a^T g`` and the pixel sum of ``g`` are added to the program's partials, which a second launch sums over the
    programs in order (:func:`fastunet.kernels.conv_grad._sum_splits_kernel`).

    Grid: (programs, 1); program p takes steps ``p * steps ... (p + 1) * steps - 1`` (pixels in NHWC order). Every
    channel and class of a pixel is in one tile (c <= 128, n_cls <= 64), so the map and the logits' gradient are
    read once and ``da`` written once. Masked lanes load zeros and nothing is stored for them; a column past c or
    n_cls multiplies a zero weight or gradient and is never stored.

    ``READ`` (the head read its map as ``a = act(z * scale + shift)``, ``READ_ACT``, as a norm layout's head launch
    does): ``a_ptr`` is z. Grid (programs per image, batch), program (p, n) taking image n's pixel steps ``p *
    steps ...`` (``pixels``: one image's). Each step makes ``a`` again as the forward's loader read it (rounded once
    to the map's dtype) for ``a^T g``, and stores z's gradient through the read, ``act'(u) * da * scale`` (each
    activation's derivative as torch's backward gives it); the program's sums of ``g * z`` and ``g``, the read's
    scale and shift gradients, go to ``read_part_ptr``. z is read once and its gradient written once: no
    normalized map and no gradient of it is ever stored."""
    pid = tl.program_id(0)
    img0 = tl.program_id(1)  # READ: the program's image (else 0: the pixels run over the batch)
    offs_c = tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_CLS)
    c_mask = offs_c < c
    k_mask = offs_k < n_cls
    w = tl.load(w_ptr + offs_c[:, None] * n_cls + offs_k[None, :], mask=c_mask[:, None] & k_mask[None, :], other=0.0)
    w_t = tl.trans(w)
    acc_t: tl.constexpr = acc_type(da_ptr.dtype.element_ty)
    acc_w = tl.zeros((BLOCK_C, BLOCK_CLS), dtype=acc_t)
    acc_b = tl.zeros((BLOCK_CLS,), dtype=acc_t)
    if READ:
        table = img0.to(tl.int64) * c + offs_c
        scale = tl.load(scale_ptr + table, mask=c_mask, other=0.0).to(acc_t)
        shift = tl.load(shift_ptr + table, mask=c_mask, other=0.0).to(acc_t)
        acc_wt = tl.zeros((BLOCK_CLS, BLOCK_C), dtype=acc_t)
        sum_gz = tl.zeros((BLOCK_C,), dtype=acc_t)
        sum_g = tl.zeros((BLOCK_C,), dtype=acc_t)
    for step in range(0, steps):
        offs_p = (pid * steps + step) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = offs_p < pixels
        ox = offs_p % width
        oy = (offs_p // width) % height
        img = img0 + offs_p // (width * height)
        mask = p_mask[:, None] & c_mask[None, :]
        a_ptrs = (
            a_ptr + pixel_offset(img, oy, ox, stride_an, stride_ah, stride_aw)[:, None] + offs_c[None, :] * stride_ac
        )
        a = tl.load(a_ptrs, mask=mask, other=0.0)
        if READ:  # a is z: the values the forward's loader read, as it rounded them
            z = a.to(acc_t)
            u = z * scale[None, :] + shift[None, :]
            value = activate(u, scale_ptr, offs_c, c_mask, slope, lo, hi, READ_ACT)
            a = to_storage(tl.where(mask, value, 0.0), a_ptr.dtype.element_ty, INTERPRETER)
        g_ptrs = (
            g_ptr + pixel_offset(img, oy, ox, stride_gn, stride_gh, stride_gw)[:, None] + offs_k[None, :] * stride_gc
        )
        g = tl.load(g_ptrs, mask=p_mask[:, None] & k_mask[None, :], other=0.0)
        da = mma(g, w_t, tl.zeros((BLOCK_P, BLOCK_C), dtype=acc_t), INTERPRETER, DOT_PRECISION)
        if READ:  # the derivative's masks on the bits, as the conv's epilogue applies them (a select serializes wgmma)
            da, grad_z = _norm_read_grad(da, u, scale, c_mask, p_mask, slope, lo, hi, READ_ACT, INTERPRETER)
            sum_gz += tl.sum(grad_z * z, axis=0)
            sum_g += tl.sum(grad_z, axis=0)
        elif MASK:
            da = _relu_derivative(da, a, INTERPRETER)
        da_ptrs = da_ptr + (img0.to(tl.int64) * pixels + offs_p)[:, None] * c + offs_c[None, :]
        tl.store(da_ptrs, to_storage(da, da_ptr.dtype.element_ty, INTERPRETER), mask=mask)
        if READ:  # dW^T = g^T a: the values made in registers are the B operand
            acc_wt = mma(tl.trans(g), a, acc_wt, INTERPRETER, DOT_PRECISION)
        else:
            acc_w = mma(tl.trans(a), g, acc_w, INTERPRETER, DOT_PRECISION)
        acc_b += tl.sum(g.to(acc_t), axis=0)
    if READ:
        acc_w = tl.trans(acc_wt)
        row = (pid.to(tl.int64) * tl.num_programs(1) + img0) * c + offs_c
        per_sum = tl.num_programs(0).to(tl.int64) * tl.num_programs(1) * c
        tl.store(read_part_ptr + row, sum_gz, mask=c_mask)
        tl.store(read_part_ptr + per_sum + row, sum_g, mask=c_mask)
    pid = pid + img0 * tl.num_programs(0)  # the dW partial's row: (image, program) with READ
    part = part_ptr + pid.to(tl.int64) * (c + 1) * n_cls
    tl.store(part + offs_c[:, None] * n_cls + offs_k[None, :], acc_w, mask=c_mask[:, None] & k_mask[None, :])
    tl.store(part + c * n_cls + offs_k, acc_b, mask=k_mask)


def head_backward_nhwc(
    a: torch.Tensor,
    grad_logits: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: bool = True,
    programs: int | None = None,
    mask: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The backward of a 1x1 head ``logits = a @ W + b`` in one pass over the map: ``(da, dW, db)``. (A head that read
    its map through a norm: :func:`head_backward_sums_nhwc`'s ``norm_read``.)

    ``da = dlogits @ W^T`` (``a``'s dtype), ``dW = a^T dlogits`` and ``db = sum_p dlogits`` (fp32; fp64 for float64
    maps; db None without ``bias``): one launch reads ``a`` and ``dlogits`` once, writes ``da`` and each program's
    partial dW and db (deterministic: a fixed share of the pixels each, no atomics), a second launch sums the
    partials in program order.

    Args:
        a: (N, H, W, C) view, the head's input (any strides), C <= 128.
        grad_logits: (N, H, W, n_cls) view (any strides: an NCHW gradient's NHWC view), n_cls <= 64.
        weight: (C, n_cls), the head's packed weight (:func:`fastunet.kernels.conv.pack_conv_weight` of a 1x1 conv).
        programs: how many programs share the pixels (each a run of whole ``HEAD_BLOCK_P``-pixel steps; at most
            one per step); default :data:`HEAD_PROGRAMS_PER_SM` per SM.
        mask: ``a`` is the output of a ReLU: ``da = where(a <= 0, 0, dlogits @ W^T)``, the gradient before the ReLU
            (torch's ``threshold_backward``: a NaN ``a`` passes the gradient), in the same pass.
    """
    da, sums = head_backward_sums_nhwc(a, grad_logits, weight, programs=programs, mask=mask)
    c = a.shape[3]
    return da, sums[:c], sums[c] if bias else None


def head_backward_sums_nhwc(
    a: torch.Tensor,
    grad_logits: torch.Tensor,
    weight: torch.Tensor,
    *,
    programs: int | None = None,
    mask: bool = False,
    norm_read: NormIn | None = None,
) -> tuple[torch.Tensor, ...]:
    """:func:`head_backward_nhwc` after its checks, dW and db in one (C + 1, n_cls) tensor (rows 0..C-1: dW; row C:
    db): ``(da, sums)``, two tensors sharing no memory (what a custom op may return).

    ``norm_read``: the head read its input as ``act(a * scale + shift)`` (a norm layout's head launch,
    ``conv2d_nhwc(norm_in=...)``; ReLU, LeakyReLU, clamp or no activation), ``a`` being the stored pre-norm map z.
    The same one pass over z makes the values the head read again (rounded once to z's dtype, as its loader did) for
    dW, and ``da`` is z's gradient through the read, ``act'(u) * (dlogits @ W^T) * scale``; returns ``(da, sums,
    grad_scale, grad_shift)``, the read's scale and shift gradients (N, C) fp32 (fp64 for float64 maps), each
    program's sums added in a fixed order. ``programs`` counts programs per image then."""
    _check_map(a, "head_backward_nhwc a")
    _check_map(grad_logits, "head_backward_nhwc grad_logits")
    batch, height, width, c = a.shape
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != c:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"head_backward_nhwc weight: expected a ({c}, n_cls) packed 1x1 weight, got {shape}")
    n_cls = weight.shape[1]
    _check_like(grad_logits, "grad_logits", (batch, height, width, n_cls), a, "a")
    if weight.dtype != a.dtype or weight.device != a.device:
        raise ValueError(f"head_backward_nhwc weight: expected {a.dtype} on {a.device}, got {weight.dtype} on "
                         f"{weight.device}")  # fmt: skip
    if c > HEAD_MAX_CHANNELS or n_cls > HEAD_MAX_CLASSES:
        raise ValueError(
            f"head_backward_nhwc: at most {HEAD_MAX_CHANNELS} channels and {HEAD_MAX_CLASSES} classes, got {c} and "
            f"{n_cls}"
        )
    if norm_read is not None:
        if not isinstance(norm_read, NormIn):
            raise ValueError(f"head_backward_nhwc norm_read: expected a NormIn, got {type(norm_read).__name__}")
        if mask:
            raise ValueError("head_backward_nhwc: mask (a ReLU's stored output) and norm_read (a pre-norm map read "
                             "through its norm) describe different maps: pass one")  # fmt: skip
        norm_read.check(a, "head_backward_nhwc norm_read")
        if norm_read.activation not in NORM_ACTIVATIONS:
            raise ValueError(f"head_backward_nhwc norm_read: the read's activation must be one of "
                             f"{', '.join(NORM_ACTIVATIONS)}, got {norm_read.activation!r}")  # fmt: skip
    stat = stat_dtype(a.dtype)
    da = alloc((batch, height, width, c), a.dtype, a.device)
    sums = alloc((c + 1, n_cls), stat, a.device)  # dW's rows, then db
    pixels = batch * height * width
    if pixels > MAX_PIXELS:
        raise ValueError(f"head_backward_nhwc: at most {MAX_PIXELS} pixels, got {pixels}")
    if programs is not None and (type(programs) is not int or programs < 1):
        raise ValueError(f"head_backward_nhwc programs: expected a positive int, got {programs!r}")
    if norm_read is not None and batch > 65535:  # the grid's second axis (one image each)
        raise ValueError(f"head_backward_nhwc norm_read: at most 65535 images a launch, got {batch}")
    if pixels == 0 or c == 0 or n_cls == 0:
        if norm_read is not None:
            return da, sums.zero_(), *(torch.zeros((batch, c), dtype=stat, device=a.device) for _ in range(2))
        return da, sums.zero_()
    weight = weight.contiguous()
    # READ: each image's pixels on programs of their own (the read's sums are per image).
    images = batch if norm_read is not None else 1
    per_image = pixels // images
    block_c = max(16, next_pow2(c))
    block_p = HEAD_BLOCK_P if norm_read is None else min(HEAD_BLOCK_P, max(16, HEAD_READ_ELEMENTS // block_c))
    tiles = triton.cdiv(per_image, block_p)
    if programs is None:
        programs = max(1, HEAD_PROGRAMS_PER_SM * sm_count(a) // images)
    programs = min(tiles, programs)
    steps = triton.cdiv(tiles, programs)
    programs = triton.cdiv(tiles, steps)  # no program without a step
    part = alloc((programs * images, c + 1, n_cls), stat, a.device)
    read_part = alloc((2, programs, batch, c), stat, a.device) if norm_read is not None else part
    read_args = norm_read.args(weight)[:2] if norm_read is not None else (weight, weight)
    read_scalars = norm_read.args(weight)[3:] if norm_read is not None else (0.0, 0.0, 0.0)
    interpreter, precision = dot_flags(a.dtype, torch.backends.cudnn.allow_tf32)
    args = (a, grad_logits, weight, da, part, *read_args, read_part, *read_scalars, per_image, height, width, c, n_cls,
            steps, *a.stride(), *grad_logits.stride())  # fmt: skip
    constexprs = {
        "INTERPRETER": interpreter,
        "DOT_PRECISION": precision,
        "BLOCK_P": block_p,
        "BLOCK_C": block_c,
        "BLOCK_CLS": max(16, next_pow2(n_cls)),
        "MASK": bool(mask),
        "READ": norm_read is not None,
        "READ_ACT": NORM_ACTIVATIONS[norm_read.activation].value if norm_read is not None else ACT_NONE.value,
    }
    grid = (programs, images)
    options = {"num_warps": 4, "num_stages": 2}
    elements = (c + 1) * n_cls
    block = 1024
    sum_args = (part, sums, programs * images, elements, 0, n_cls)
    sum_grid = (triton.cdiv(elements, block),)
    sum_options = {"num_warps": 4, "num_stages": 1}
    if recording():
        size = a.element_size()
        record_launch(
            LaunchRecord(
                name="head_backward" + ("+mask" if mask else "+norm_read" if norm_read is not None else ""),
                kernel=_head_backward_kernel,
                grid=grid,
                flops=4 * pixels * c * n_cls,
                bytes_read=(a.numel() + grad_logits.numel() + weight.numel()) * size,
                bytes_written=da.numel() * size + part.numel() * part.element_size(),
                args=args,
                constexprs=constexprs,
                launch_options=options,
            )
        )
        record_launch(
            LaunchRecord(
                name="head_backward.sum",
                kernel=_sum_splits_kernel,
                grid=sum_grid,
                flops=0,
                bytes_read=part.numel() * part.element_size(),
                bytes_written=sums.numel() * sums.element_size(),
                args=sum_args,
                constexprs={"BLOCK": block},
                launch_options=sum_options,
            )
        )
    if not is_dry_run():
        with launch_guard(a):
            _head_backward_kernel[grid](*args, **constexprs, **options)
            _sum_splits_kernel[sum_grid](*sum_args, BLOCK=block, **sum_options)
    if norm_read is not None:
        return da, sums, *_sum_read_parts(read_part, "head_backward+norm_read.sum", a)
    return da, sums


__all__ = [
    "activation_pool_backward_nhwc",
    "center_pad_offsets",
    "head_backward_nhwc",
    "head_backward_sums_nhwc",
    "upsample2x_adjoint_nhwc",
]
