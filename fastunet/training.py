"""Gradients on the kernels: the backward of each fused launch, registered with ``torch.library``.

Every launch of the forward is a custom op (:mod:`fastunet.ops`); this module gives three of them a backward made
of Triton launches and registers it with :func:`torch.library.register_autograd`, so that eager autograd and
``torch.compile`` (which traces the backward ops like the forward ones) both run it:

* ``fastunet::conv2d_nhwc`` (a 3x3 conv with bias and ReLU, optionally pooled; a decoder conv reading the skip and
  the upsampled map; the 1x1 head): the gradient arriving at the activated map ``y`` and at the pooled map is
  turned into ``dZ = relu'(y) * (g_y + unpool(g_pooled))`` by one memory-bound launch that recomputes each window's
  maximum from ``y`` (PyTorch's rule: the first maximum in row-major order; a NaN beats any number, the last NaN
  wins); then ``dW = A^T dZ`` and the
  bias gradient (deterministic split-K, :func:`fastunet.kernels.conv_grad.conv2d_weight_grad_nhwc`; one launch per
  source for the decoder conv) and ``dX``, the forward conv kernel itself run on ``dZ`` with the taps flipped and
  the channels swapped (:func:`fastunet.kernels.conv_grad.conv2d_input_grad_nhwc`). The decoder conv's input
  gradient comes out as one map of ``[skip | up]`` channels; each part goes back to its producer as a view.
* ``fastunet::upsample2x_nhwc`` (nearest, bilinear): the adjoint as a gather, one program per low-resolution tile
  in a fixed order (:func:`fastunet.kernels.backward.upsample2x_adjoint_nhwc`): deterministic, unlike eager
  PyTorch's atomics.
* ``fastunet::conv_transpose2x2_nhwc``: its input gradient on the conv kernel (a stride-2 conv of ``dY``), its
  weight and bias gradients as four weight-gradient launches, one per sub-pixel.

What the backward reads is what autograd saves for these ops: each op's input and its activated output (the next
op's input: one tensor, saved once), the pooled maps and the upsampled maps. No argmax indices are kept.

Which forwards take this path: :func:`kernel_training_blocker` says, for a layout, what would keep it on the
reference math (BatchNorm with batch statistics, InstanceNorm/GroupNorm, activations other than ReLU, valid or
strided convs, other joins; see the README's gradients section). The packed weights are built from the parameters
by differentiable torch ops on every such forward (a cast and a permute per tensor), so the gradients reach the
parameters (and, under autocast, come back in their dtype) through autograd.

Second derivatives (``create_graph=True``): each op's backward then recomputes its own PyTorch math and
differentiates it with the graph kept, so higher-order gradients are the reference's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastunet.kernels._common import alloc, current_launch_stage, is_dry_run, set_launch_stage
from fastunet.ops import (
    RELU,
    Act,
    ConvSpec,
    ConvStage,
    Layout,
    Plan,
    UpStage,
    conv_padding,
    norm_kind,
    unfused_reason,
)

__all__ = ["build_training_plan", "kernel_training_blocker"]


# ---------------------------------------------------------------------------------------------------------------
# Which layouts train on the kernels
# ---------------------------------------------------------------------------------------------------------------
def kernel_training_blocker(layout: Layout, training: bool) -> str | None:
    """Why the kernels' backward cannot run a forward of ``layout`` (the first reason), or None when it can.

    ``training``: the forward is in training mode (a BatchNorm there normalizes with batch statistics)."""
    reason = unfused_reason(layout)
    if reason is not None:
        return reason
    if layout.down != "pool":
        return "strided-conv down-sampling has no backward kernels yet (2x2 max-pool down-sampling has)"
    if layout.join != "pad":
        return f"the {layout.join!r} join has no backward kernels yet (the centered zero-pad join has)"
    for name, spec in layout.conv_specs():
        kind = norm_kind(spec.norm)
        if kind not in (None, "folds"):
            return f"{name}: {type(spec.norm).__name__} has no backward kernels yet"
        if kind == "folds" and training and spec.norm.training:
            return f"{name}: BatchNorm2d in training mode (batch statistics) has no backward kernels yet"
        if spec.activation.kind != "relu":
            return f"{name}: the {spec.activation.kind} activation has no backward kernels yet (ReLU has)"
        if conv_padding(spec.conv) != 1 or tuple(spec.conv.stride) != (1, 1):
            return f"{name}: only 3x3 stride-1 'same' convs have backward kernels yet"
    for level, up in enumerate(layout.ups):
        if up.mode not in ("transpose", "bilinear", "nearest") or up.pre_conv is not None:
            what = "a 1x1 conv before the interpolation" if up.pre_conv is not None else f"the {up.mode} upsampling"
            return f"dec{level}.up: {what} has no backward kernels yet"
    if tuple(layout.head.kernel_size) != (1, 1):
        return "head: a 3x3 head has no backward kernels yet (a 1x1 head has)"
    return None


# ---------------------------------------------------------------------------------------------------------------
# The plan, built differentiably from the parameters
# ---------------------------------------------------------------------------------------------------------------
def _fold(conv: nn.Conv2d, norm: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fastunet.ops.fold_batchnorm` without the detach: the same float64 operations, differentiable."""
    weight = conv.weight.double()
    bias = conv.bias.double() if conv.bias is not None else weight.new_zeros(weight.shape[0])
    if norm is not None:
        scale = norm.running_var.double().add(norm.eps).rsqrt()
        if norm.weight is not None:
            scale = scale * norm.weight.double()
        bias = (bias - norm.running_mean.double()) * scale
        if norm.bias is not None:
            bias = bias + norm.bias.double()
        weight = weight * scale[:, None, None, None]
    return weight, bias


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """:func:`fastunet.kernels.conv.pack_conv_weight` as differentiable ops."""
    c_out, c_in, kh, kw = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(kh * kw * c_in, c_out)


def build_training_plan(layout: Layout, dtype: torch.dtype, device: torch.device) -> Plan:
    """The plan of ``layout`` (see :func:`fastunet.ops.build_plan`) whose tensors are differentiable functions of
    the modules' parameters, in ``dtype``: folded (an eval-mode BatchNorm), packed and cast by torch ops, so the
    gradients of the packed tensors flow back to the parameters. The head is never fused: its input, the last
    conv's activated map, is what the head's weight gradient reads. Raises ``ValueError`` where
    :func:`kernel_training_blocker` (in eval mode) has a reason."""
    reason = kernel_training_blocker(layout, training=False)
    if reason is not None:
        raise ValueError(f"the backward kernels cannot run this layout: {reason}")

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    def stage(spec: ConvSpec, skip_after: int = 0) -> ConvStage:
        weight, bias = _fold(spec.conv, spec.norm)
        if skip_after:  # cat([up, skip]): the kernel reads the skip's channels first
            weight = torch.cat([weight[:, skip_after:], weight[:, :skip_after]], dim=1)
        return ConvStage(cast(_pack(weight)), cast(bias), 3, 1, RELU)

    def double(pair: tuple[ConvSpec, ConvSpec], skip_after: int = 0) -> tuple[ConvStage, ConvStage]:
        return stage(pair[0], skip_after), stage(pair[1])

    decoders = []
    for level, pair in enumerate(layout.decoders):
        skip_after = 0
        if layout.concat_up_first(level):
            skip_after = pair[0].conv.in_channels - layout.encoders[level][1].conv.out_channels
        decoders.append(double(pair, skip_after))
    ups = []
    for up in layout.ups:
        if up.mode == "transpose":
            weight = up.conv.weight
            bias = up.conv.bias if up.conv.bias is not None else weight.new_zeros(weight.shape[1])
            packed = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], 4 * weight.shape[1])
            ups.append(UpStage("direct", False, ConvStage(cast(packed), cast(bias.repeat(4)))))
        else:
            ups.append(UpStage(up.mode, up.align_corners))
    head_weight, head_bias = _fold(layout.head, None)
    head = ConvStage(cast(_pack(head_weight)), cast(head_bias), 1, 0, Act("none"))
    return Plan(
        encoders=[double(pair) for pair in layout.encoders],
        ups=ups,
        decoders=decoders,
        head=head,
        fuse_head=False,
        layout=layout,
        join=layout.join,
        down=layout.down,
    )


# ---------------------------------------------------------------------------------------------------------------
# Backward ops: the kernels, as custom ops so that torch.compile traces the backward too
# ---------------------------------------------------------------------------------------------------------------
@torch.library.custom_op(
    "fastunet::conv2d_nhwc_backward",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor weight, Tensor? up, Tensor? y, Tensor? grad_y, Tensor? grad_pooled, int ksize, "
        "int padding, str activation, bool pool, bool has_bias, bool need_input, str up_mode, bool align_corners) "
        "-> (Tensor, Tensor, Tensor)"
    ),
)
def _conv_backward_op(
    x, weight, up, y, grad_y, grad_pooled, ksize, padding, activation, pool, has_bias, need_input, up_mode,
    align_corners,
):  # fmt: skip
    return _conv_backward(
        x, weight, up, y, grad_y, grad_pooled, ksize, padding, activation, pool, has_bias, need_input, up_mode,
        align_corners,
    )  # fmt: skip


def _frame_pads(height: int, width: int, up_h: int, up_w: int) -> tuple[int, int]:
    """Where the upsampled map sits in the skip's frame (centered; negative: its first row/column dropped)."""
    return (height - up_h) // 2, (width - up_w) // 2


def _conv_backward(
    x, weight, up, y, grad_y, grad_pooled, ksize, padding, activation, pool, has_bias, need_input, up_mode,
    align_corners,
):  # fmt: skip
    """(d_in, dW, db) of one conv launch: the input gradient over the conv's input frame with the channels of both
    sources (``[x | up]``; empty unless ``need_input``), dW packed and db in fp32 (db empty unless ``has_bias``).
    With ``up_mode`` nearest or bilinear, ``up`` is the low-resolution map: the upsampled map the forward read is
    written again (one memory-bound launch) for the weight gradient."""
    from fastunet.kernels.backward import activation_pool_backward_nhwc
    from fastunet.kernels.conv_grad import conv2d_input_grad_nhwc, conv2d_weight_grad_nhwc
    from fastunet.kernels.upsample import upsample2x_nhwc

    if up is not None and up_mode != "direct":
        up = upsample2x_nhwc(up, up_mode, align_corners)

    batch, height, width, c_main = x.shape
    c_up = up.shape[3] if up is not None else 0
    c_out = weight.shape[1]
    if activation == "none" and not pool:
        dz = grad_y if grad_y is not None else x.new_zeros((batch, height, width, c_out))
    else:
        dz = activation_pool_backward_nhwc(y, grad_y, grad_pooled if pool else None, activation=activation)
    empty = x.new_empty(0)
    if up is None:
        dw, db = conv2d_weight_grad_nhwc(x, dz, ksize, padding, bias=has_bias)
    else:
        taps = ksize * ksize
        parts = alloc((taps * c_main, c_out), torch.float32, x.device)
        up_parts = alloc((taps * c_up, c_out), torch.float32, x.device)
        _, db = conv2d_weight_grad_nhwc(x, dz, ksize, padding, bias=has_bias, out=parts)
        framed = up if up.shape[1:3] == x.shape[1:3] else _frame(up, height, width)
        conv2d_weight_grad_nhwc(framed, dz, ksize, padding, bias=False, out=up_parts)
        # The two sources' rows regrouped into the joined weight's tap-major order (row tap * c_in + channel).
        dw = alloc((taps, c_main + c_up, c_out), torch.float32, x.device)
        dw[:, :c_main] = parts.view(taps, c_main, c_out)
        dw[:, c_main:] = up_parts.view(taps, c_up, c_out)
        dw = dw.view(taps * (c_main + c_up), c_out)
    d_in = conv2d_input_grad_nhwc(dz, weight, c_main + c_up, ksize, padding) if need_input else empty
    return d_in, dw, db if db is not None else empty.clone()


def _frame(up: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The upsampled map placed into the skip's (height, width) frame, as the forward's loader reads it (odd
    sizes only: a copy)."""
    up_h, up_w = up.shape[1], up.shape[2]
    dy, dx = height - up_h, width - up_w
    return F.pad(up, (0, 0, dx // 2, dx - dx // 2, dy // 2, dy - dy // 2))


def _unframe(grad: torch.Tensor, up_h: int, up_w: int) -> torch.Tensor:
    """The adjoint of :func:`_frame`: the frame's gradient cut (or zero-extended) back to the upsampled map."""
    height, width = grad.shape[1], grad.shape[2]
    dy, dx = height - up_h, width - up_w
    return F.pad(grad, (0, 0, -(dx // 2), -(dx - dx // 2), -(dy // 2), -(dy - dy // 2)))


@_conv_backward_op.register_fake
def _conv_backward_fake(
    x, weight, up, y, grad_y, grad_pooled, ksize, padding, activation, pool, has_bias, need_input, up_mode,
    align_corners,
):  # fmt: skip
    batch, height, width, c_main = x.shape
    c_in = c_main + (up.shape[3] if up is not None else 0)
    c_out = weight.shape[1]
    d_in = x.new_empty((batch, height, width, c_in)) if need_input else x.new_empty(0)
    db = x.new_empty((c_out,), dtype=torch.float32) if has_bias else x.new_empty(0)
    return d_in, x.new_empty((weight.shape[0], c_out), dtype=torch.float32), db


def _upsample_backward(grad, height, width, mode, align_corners, pad_top=0, pad_left=0):
    """The gradient of the (height, width) map whose 2x upsampling sat at (pad_top, pad_left) in ``grad``'s frame."""
    from fastunet.kernels.backward import upsample2x_adjoint_nhwc

    return upsample2x_adjoint_nhwc(grad, (height, width), mode, align_corners, pad_top=pad_top, pad_left=pad_left)


_upsample_backward_op = torch.library.custom_op(
    "fastunet::upsample2x_nhwc_backward",
    mutates_args=(),
    schema=(
        "(Tensor grad, int height, int width, str mode, bool align_corners, int pad_top=0, int pad_left=0) -> Tensor"
    ),
)(_upsample_backward)


@_upsample_backward_op.register_fake
def _upsample_backward_fake(grad, height, width, mode, align_corners, pad_top=0, pad_left=0):
    return grad.new_empty((grad.shape[0], height, width, grad.shape[3]))


def _conv_transpose_backward(x, weight, grad, has_bias, need_x):
    """(dx, dW packed, db4) of a 2x2 stride-2 transposed conv; dW and db4 (one bias block per sub-pixel) in fp32."""
    from fastunet.kernels.conv_grad import conv2d_weight_grad_nhwc, conv_transpose2x2_input_grad_nhwc

    c_in, c_out = x.shape[3], weight.shape[1] // 4
    dx = conv_transpose2x2_input_grad_nhwc(grad, weight) if need_x else x.new_empty(0)
    # Sub-pixel (a, b) of every low-resolution pixel: a 1x1 conv of x to that strided view of the gradient. The
    # packed weight's columns are (a * 2 + b) * c_out + channel; so are the repeated bias's.
    dw = alloc((4, c_in, c_out), torch.float32, x.device)
    db = alloc((4, c_out), torch.float32, x.device) if has_bias else None
    for sub in range(4):
        a, b = divmod(sub, 2)
        _, db_sub = conv2d_weight_grad_nhwc(x, grad[:, a::2, b::2, :], 1, 0, bias=has_bias, out=dw[sub])
        if has_bias:
            db[sub] = db_sub
    dw = dw.permute(1, 0, 2).reshape(c_in, 4 * c_out)
    return dx, dw, db.reshape(-1) if has_bias else x.new_empty(0)


_conv_transpose_backward_op = torch.library.custom_op(
    "fastunet::conv_transpose2x2_nhwc_backward",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor grad, bool has_bias, bool need_x) -> (Tensor, Tensor, Tensor)",
)(_conv_transpose_backward)


@_conv_transpose_backward_op.register_fake
def _conv_transpose_backward_fake(x, weight, grad, has_bias, need_x):
    dx = x.new_empty(x.shape) if need_x else x.new_empty(0)
    db = x.new_empty((weight.shape[1],), dtype=torch.float32) if has_bias else x.new_empty(0)
    return dx, x.new_empty(weight.shape, dtype=torch.float32), db


def _backward_op(name: str):
    """The backward launch ``name`` as its custom op; in a dry run (:func:`fastunet.kernels.dry_run`: tensors on the
    ``meta`` device, the launchers record and launch nothing) its implementation itself, so that a traced backward
    lists its launches (the op would dispatch meta tensors to its fake implementation, which records nothing)."""
    if is_dry_run():
        return _IMPLEMENTATIONS[name]
    return getattr(torch.ops.fastunet, name)


# ---------------------------------------------------------------------------------------------------------------
# The ops' own math in PyTorch, for second derivatives
# ---------------------------------------------------------------------------------------------------------------
def _conv_math(x, weight, bias, up, ksize, padding, activation, pool, up_mode="direct", align_corners=False):
    """The conv launch in PyTorch (NHWC in and out): (y, pooled or None)."""
    inputs = x.permute(0, 3, 1, 2)
    if up is not None and up_mode != "direct":
        align = align_corners if up_mode == "bilinear" else None
        up = F.interpolate(up.permute(0, 3, 1, 2), scale_factor=2, mode=up_mode, align_corners=align)
        up = up.permute(0, 2, 3, 1)
    if up is not None:
        framed = _frame(up, x.shape[1], x.shape[2]) if up.shape[1:3] != x.shape[1:3] else up
        inputs = torch.cat([inputs, framed.permute(0, 3, 1, 2)], dim=1)
    c_in = inputs.shape[1]
    w = weight.view(ksize, ksize, c_in, weight.shape[1]).permute(3, 2, 0, 1)
    y = F.conv2d(inputs, w, bias, padding=padding)
    if activation == "relu":
        y = torch.relu(y)
    pooled = F.max_pool2d(y, 2).permute(0, 2, 3, 1) if pool else None
    return y.permute(0, 2, 3, 1), pooled


def _grads_of(outputs, grads, inputs):
    """torch.autograd.grad with the graph kept, None for inputs that do not need one."""
    pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if o is not None and g is not None]
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    if not wanted or not pairs:
        return [None] * len(inputs)
    found = iter(
        torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True, allow_unused=True)
    )
    return [next(found) if t is not None and t.requires_grad else None for t in inputs]


# ---------------------------------------------------------------------------------------------------------------
# Autograd registrations of the forward ops
# ---------------------------------------------------------------------------------------------------------------
# fastunet::conv2d_nhwc's schema, by position (see fastunet.ops._CONV_SCHEMA).
_CONV_ARGS = 30
_X, _W, _B, _UP, _HEAD_W, _HEAD_B, _SLOPES, _KSIZE, _PADDING, _UP_MODE, _ALIGN, _JOIN, _ACT = range(13)
_POOL, _NCHW, _STRIDE, _IN_SCALE = 16, 17, 18, 19
_NORM_GROUPS = 26


def _unsupported_conv(inputs) -> str | None:
    if inputs[_HEAD_W] is not None:
        return "a fused head"
    if inputs[_ACT] not in ("relu", "none"):
        return f"the {inputs[_ACT]} activation"
    if inputs[_STRIDE] != 1 or inputs[_PADDING] != inputs[_KSIZE] // 2 or inputs[_KSIZE] not in (1, 3):
        return "a valid or strided conv"
    if inputs[_IN_SCALE] is not None or inputs[_NORM_GROUPS]:
        return "a norm with data statistics"
    up_modes = ("direct", "nearest", "bilinear")
    if inputs[_UP] is not None and (inputs[_UP_MODE] not in up_modes or inputs[_JOIN] != "pad"):
        return "a second source joined otherwise than by zero padding"
    if inputs[_SLOPES] is not None:
        return "PReLU slopes"
    return None


def _conv_setup(ctx, inputs, output):
    ctx.unsupported = _unsupported_conv(inputs)
    ctx.stage = current_launch_stage()
    ctx.constants = (inputs[_KSIZE], inputs[_PADDING], inputs[_ACT], inputs[_POOL], inputs[_B] is not None)
    ctx.up = (inputs[_UP_MODE], inputs[_ALIGN])
    y = output[0] if inputs[_ACT] != "none" or inputs[_POOL] else None
    ctx.save_for_backward(inputs[_X], inputs[_W], inputs[_B], inputs[_UP], y)


def _conv_autograd(ctx, grad_y, grad_pooled, _grad_scale, _grad_shift):
    if ctx.unsupported is not None:
        raise NotImplementedError(f"fastunet::conv2d_nhwc has no backward for {ctx.unsupported}")
    x, weight, bias, up, y = ctx.saved_tensors
    ksize, padding, activation, pool, has_bias = ctx.constants
    up_mode, align_corners = ctx.up
    need = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph=True: differentiate the op's own math, graph kept
        outputs = _conv_math(x, weight, bias, up, ksize, padding, activation, pool, up_mode, align_corners)
        dx, dw, db, dup = _grads_of(outputs, (grad_y, grad_pooled), (x, weight, bias, up))
    else:
        stage = current_launch_stage()
        set_launch_stage(f"{ctx.stage}.backward" if ctx.stage else None)
        try:
            need_up = up is not None and need[_UP]
            d_in, dw, db = _backward_op("conv2d_nhwc_backward")(
                x, weight, up, y, grad_y, grad_pooled if pool else None, ksize, padding, activation, pool,
                has_bias and need[_B], need[_X] or need_up, up_mode or "direct", align_corners,
            )  # fmt: skip
            c_main = x.shape[3]
            dx = d_in[..., :c_main] if need[_X] else None
            dup = None
            if need_up and up_mode != "direct":  # the adjoint of the upsampling, read from the skip's frame
                height, width = x.shape[1], x.shape[2]
                pad_top, pad_left = _frame_pads(height, width, 2 * up.shape[1], 2 * up.shape[2])
                dup = _backward_op("upsample2x_nhwc_backward")(
                    d_in[..., c_main:], up.shape[1], up.shape[2], up_mode, align_corners, pad_top, pad_left
                )
            elif need_up:  # the map itself, cut back from the skip's frame where the sizes differ
                dup = d_in[..., c_main:]
                if dup.shape[1:3] != up.shape[1:3]:
                    dup = _unframe(dup, up.shape[1], up.shape[2])
        finally:
            set_launch_stage(stage)
        dw = dw.to(weight.dtype) if need[_W] else None
        db = db.to(bias.dtype) if has_bias and need[_B] else None
    grads = [None] * _CONV_ARGS
    grads[_X], grads[_W], grads[_B], grads[_UP] = dx, dw, db, dup
    return tuple(grads)


def _upsample_setup(ctx, inputs, output):
    x, mode, align_corners = inputs[0], inputs[1], inputs[2]
    ctx.unsupported = "a norm applied on load" if inputs[3] is not None else None
    ctx.constants = (x.shape[1], x.shape[2], mode, align_corners)
    ctx.stage = current_launch_stage()
    ctx.save_for_backward(x)  # the producer's output, saved by it too: no extra memory


def _upsample_autograd(ctx, grad):
    if ctx.unsupported is not None:
        raise NotImplementedError(f"fastunet::upsample2x_nhwc has no backward for {ctx.unsupported}")
    height, width, mode, align_corners = ctx.constants
    if torch.is_grad_enabled():
        (x,) = ctx.saved_tensors
        align = align_corners if mode == "bilinear" else None
        out = F.interpolate(x.permute(0, 3, 1, 2), scale_factor=2, mode=mode, align_corners=align)
        (dx,) = _grads_of([out.permute(0, 2, 3, 1)], [grad], [x])
    else:
        stage = current_launch_stage()
        set_launch_stage(f"{ctx.stage}.backward" if ctx.stage else None)
        try:
            dx = _backward_op("upsample2x_nhwc_backward")(grad, height, width, mode, align_corners)
        finally:
            set_launch_stage(stage)
    return (dx,) + (None,) * 9


def _conv_transpose_setup(ctx, inputs, output):
    ctx.unsupported = "a norm applied on load" if inputs[3] is not None else None
    ctx.stage = current_launch_stage()
    ctx.has_bias = inputs[2] is not None
    ctx.save_for_backward(inputs[0], inputs[1], inputs[2])


def _conv_transpose_autograd(ctx, grad):
    if ctx.unsupported is not None:
        raise NotImplementedError(f"fastunet::conv_transpose2x2_nhwc has no backward for {ctx.unsupported}")
    x, weight, bias4 = ctx.saved_tensors
    need = ctx.needs_input_grad
    if torch.is_grad_enabled():
        c_in, c_out = weight.shape[0], weight.shape[1] // 4
        w = weight.view(c_in, 2, 2, c_out).permute(0, 3, 1, 2)
        bias = bias4[:c_out] if bias4 is not None else None
        out = F.conv_transpose2d(x.permute(0, 3, 1, 2), w, bias, stride=2).permute(0, 2, 3, 1)
        dx, dw = _grads_of([out], [grad], [x, weight])
        db = None
        if bias4 is not None and bias4.requires_grad:  # each sub-pixel's bias block gets its own pixels' sum
            db = grad.reshape(grad.shape[0], grad.shape[1] // 2, 2, grad.shape[2] // 2, 2, c_out).sum((0, 1, 3))
            db = db.reshape(-1)
    else:
        stage = current_launch_stage()
        set_launch_stage(f"{ctx.stage}.backward" if ctx.stage else None)
        try:
            dx, dw, db = _backward_op("conv_transpose2x2_nhwc_backward")(
                x, weight, grad, ctx.has_bias and need[2], need[0]
            )
        finally:
            set_launch_stage(stage)
        dx = dx if need[0] else None
        dw = dw.to(weight.dtype) if need[1] else None
        db = db.to(bias4.dtype) if ctx.has_bias and need[2] else None
    return (dx, dw, db) + (None,) * 7


torch.library.register_autograd("fastunet::conv2d_nhwc", _conv_autograd, setup_context=_conv_setup)
torch.library.register_autograd("fastunet::upsample2x_nhwc", _upsample_autograd, setup_context=_upsample_setup)
torch.library.register_autograd(
    "fastunet::conv_transpose2x2_nhwc", _conv_transpose_autograd, setup_context=_conv_transpose_setup
)

_IMPLEMENTATIONS = {
    "conv2d_nhwc_backward": _conv_backward,
    "upsample2x_nhwc_backward": _upsample_backward,
    "conv_transpose2x2_nhwc_backward": _conv_transpose_backward,
}
