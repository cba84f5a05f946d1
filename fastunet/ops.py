"""The fused forward: the U-Net layout it reads, its plan of packed parameters, the kernels as torch custom ops,
and its autograd wrapper.

The launchers are registered with ``torch.library`` as opaque custom ops (``fastunet::conv2d_nhwc`` and
``fastunet::conv_transpose2x2_nhwc``) with fake (meta) implementations, so ``torch.compile(fullgraph=True)`` traces
a fused model without a graph break and CUDA-graph capture sees plain kernel launches. They are opaque rather than
``triton_op``-wrapped on purpose: the launch path chooses tiles, validates and records in Python, and keeping it
out of the compiler keeps the compiled model's kernels exactly the ones the parity suite tests.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

from fastunet.kernels import INTERPRET
from fastunet.kernels._common import alloc, is_dry_run
from fastunet.kernels.conv import (
    MAX_HEAD_CHANNELS,
    MAX_HEAD_CLASSES,
    conv2d_nhwc,
    conv_transpose2x2_nhwc,
    pack_conv_transpose_weight,
    pack_conv_weight,
)
from fastunet.kernels.upsample import upsample2x_nhwc

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "INTERPRET",
    "ConvSpec",
    "ConvStage",
    "Layout",
    "Plan",
    "UpSpec",
    "build_plan",
    "fold_batchnorm",
    "run_plan",
    "unet_forward",
]


# ---------------------------------------------------------------------------------------------------------------
# Layout: which modules make up the network, in the order the fused forward uses them
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """A 3x3 conv (padding 1) and the eval-mode BatchNorm after it, if any; a ReLU follows both."""

    conv: nn.Conv2d
    norm: nn.BatchNorm2d | None = None


@dataclasses.dataclass(frozen=True)
class UpSpec:
    """How a decoder level upsamples the map below it: ``"transpose"`` (``conv``: ConvTranspose2d k=2 s=2),
    ``"bilinear"`` or ``"nearest"`` (2x interpolation)."""

    mode: str
    align_corners: bool = False
    conv: nn.ConvTranspose2d | None = None


@dataclasses.dataclass(frozen=True)
class Layout:
    """A U-Net as the fused forward reads it.

    ``encoders[level]`` for levels 0..depth (the last is the bottleneck; each level but it ends in a 2x2
    max-pool); ``ups[level]`` and ``decoders[level]`` for levels 0..depth-1 (the decoder at ``level`` reads
    ``cat([skip[level], up(map below)])``, the upsampled map zero-padded, centered, to the skip's size); ``head``:
    the 1x1 conv to the logits. Channel widths come from the weights, so they need not double per level.
    """

    encoders: tuple[tuple[ConvSpec, ConvSpec], ...]
    ups: tuple[UpSpec, ...]
    decoders: tuple[tuple[ConvSpec, ConvSpec], ...]
    head: nn.Conv2d

    @property
    def depth(self) -> int:
        return len(self.decoders)

    @property
    def in_channels(self) -> int:
        return self.encoders[0][0].conv.in_channels


# ---------------------------------------------------------------------------------------------------------------
# Plan: folded, packed, cast parameters
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ConvStage:
    """One conv (+ folded eval BatchNorm): packed weight and bias in the compute dtype."""

    weight: torch.Tensor
    bias: torch.Tensor


@dataclasses.dataclass
class Plan:
    """Everything a forward launches with, in the compute dtype and on the compute device."""

    encoders: list[tuple[ConvStage, ConvStage]]  # weights (9 c_in, c_out)
    ups: list[tuple[str, bool, ConvStage | None]]  # (kernel up mode, align_corners, transposed conv) per level
    decoders: list[tuple[ConvStage, ConvStage]]
    head: ConvStage  # weight (c_out, n_cls), bias (n_cls,)
    fuse_head: bool


def plan_tensors(plan: Plan) -> list[torch.Tensor]:
    """Every tensor of a plan, in a fixed order."""
    stages = [stage for pair in (*plan.encoders, *plan.decoders) for stage in pair]
    stages += [up for _, _, up in plan.ups if up is not None] + [plan.head]
    return [t for stage in stages for t in (stage.weight, stage.bias)]


def fold_batchnorm(conv: nn.Conv2d, norm: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight and bias with an eval-mode BatchNorm folded in, computed in float64."""
    weight = conv.weight.detach().double()
    if conv.bias is not None:
        bias = conv.bias.detach().double()
    else:
        bias = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    if isinstance(norm, nn.BatchNorm2d):
        if norm.running_mean is None or norm.running_var is None:
            raise ValueError("BatchNorm2d without running statistics cannot be folded for eval-mode inference")
        scale = norm.running_var.detach().double().add(norm.eps).rsqrt()
        if norm.weight is not None:
            scale = scale * norm.weight.detach().double()
        bias = (bias - norm.running_mean.detach().double()) * scale
        if norm.bias is not None:
            bias = bias + norm.bias.detach().double()
        weight = weight * scale[:, None, None, None]
    return weight, bias


def build_plan(layout: Layout, dtype: torch.dtype, device: torch.device) -> Plan:
    """Fold, pack and cast the parameters of ``layout`` for the kernels."""

    def stage(spec: ConvSpec) -> ConvStage:
        weight, bias = fold_batchnorm(spec.conv, spec.norm)
        return ConvStage(pack_conv_weight(weight).to(device, dtype), bias.to(device, dtype).contiguous())

    def double(pair: tuple[ConvSpec, ConvSpec]) -> tuple[ConvStage, ConvStage]:
        return stage(pair[0]), stage(pair[1])

    ups: list[tuple[str, bool, ConvStage | None]] = []
    for up in layout.ups:
        if up.mode == "transpose":
            weight = up.conv.weight.detach()
            if up.conv.bias is not None:
                bias = up.conv.bias.detach()
            else:
                bias = torch.zeros(weight.shape[1], dtype=weight.dtype, device=weight.device)
            packed = ConvStage(
                pack_conv_transpose_weight(weight).to(device, dtype), bias.repeat(4).to(device, dtype).contiguous()
            )
            ups.append(("direct", False, packed))
        else:
            ups.append((up.mode, up.align_corners, None))
    head = layout.head
    head_weight = head.weight.detach()[:, :, 0, 0].t().contiguous()
    if head.bias is not None:
        head_bias = head.bias.detach()
    else:
        head_bias = torch.zeros(head.out_channels, dtype=head_weight.dtype, device=head_weight.device)
    return Plan(
        encoders=[double(pair) for pair in layout.encoders],
        ups=ups,
        decoders=[double(pair) for pair in layout.decoders],
        head=ConvStage(head_weight.to(device, dtype), head_bias.to(device, dtype).contiguous()),
        fuse_head=head.in_channels <= MAX_HEAD_CHANNELS and head.out_channels <= MAX_HEAD_CLASSES,
    )


# ---------------------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------------------
_CONV_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor? bias, Tensor? up, Tensor? head_weight, Tensor? head_bias, int ksize, "
    "str up_mode, bool align_corners, bool relu, bool pool, bool nchw_out) -> (Tensor, Tensor)"
)


def _conv_output(x: torch.Tensor, channels: int, nchw_out: bool) -> torch.Tensor:
    """The (N, H, W, channels) output view: contiguous NHWC, or a permuted contiguous NCHW tensor."""
    batch, height, width, _ = x.shape
    if nchw_out:
        return alloc((batch, channels, height, width), x.dtype, x.device).permute(0, 2, 3, 1)
    return alloc((batch, height, width, channels), x.dtype, x.device)


def _conv2d_launch(x, weight, bias, up, head_weight, head_bias, ksize, up_mode, align_corners, relu, pool, nchw_out):
    """:func:`fastunet.kernels.conv2d_nhwc` as a custom op. Returns (y, pooled): y is (N, H, W, C_out or n_cls),
    a view of an NCHW tensor when ``nchw_out``; pooled is empty unless ``pool``. ``up_mode`` "" means no second
    source."""
    channels = head_weight.shape[1] if head_weight is not None else weight.shape[1]
    out = _conv_output(x, channels, nchw_out)
    y, pooled = conv2d_nhwc(
        x,
        weight,
        bias,
        ksize=ksize,
        up=up,
        up_mode=up_mode or None,
        align_corners=align_corners,
        relu=relu,
        pool=pool,
        head_weight=head_weight,
        head_bias=head_bias,
        out=out,
    )
    return y, pooled if pooled is not None else x.new_empty(0)


_conv2d_op = torch.library.custom_op("fastunet::conv2d_nhwc", mutates_args=(), schema=_CONV_SCHEMA)(_conv2d_launch)


@_conv2d_op.register_fake
def _conv2d_fake(x, weight, bias, up, head_weight, head_bias, ksize, up_mode, align_corners, relu, pool, nchw_out):
    channels = head_weight.shape[1] if head_weight is not None else weight.shape[1]
    batch, height, width, _ = x.shape
    if nchw_out:
        y = x.new_empty((batch, channels, height, width)).permute(0, 2, 3, 1)
    else:
        y = x.new_empty((batch, height, width, channels))
    pooled = x.new_empty((batch, height // 2, width // 2, weight.shape[1])) if pool else x.new_empty(0)
    return y, pooled


@torch.library.custom_op(
    "fastunet::conv_transpose2x2_nhwc", mutates_args=(), schema="(Tensor x, Tensor weight, Tensor? bias4) -> Tensor"
)
def _conv_transpose_op(x, weight, bias4):
    """:func:`fastunet.kernels.conv_transpose2x2_nhwc` as a custom op: (N, 2h, 2w, C_out) contiguous NHWC."""
    return conv_transpose2x2_nhwc(x, weight, bias4)


@_conv_transpose_op.register_fake
def _conv_transpose_fake(x, weight, bias4):
    batch, height, width, _ = x.shape
    return x.new_empty((batch, 2 * height, 2 * width, weight.shape[1] // 4))


@torch.library.custom_op(
    "fastunet::upsample2x_nhwc", mutates_args=(), schema="(Tensor x, str mode, bool align_corners) -> Tensor"
)
def _upsample_op(x, mode, align_corners):
    """:func:`fastunet.kernels.upsample.upsample2x_nhwc` as a custom op: (N, 2h, 2w, C) contiguous NHWC."""
    return upsample2x_nhwc(x, mode, align_corners)


@_upsample_op.register_fake
def _upsample_fake(x, mode, align_corners):
    batch, height, width, channels = x.shape
    return x.new_empty((batch, 2 * height, 2 * width, channels))


def is_traced() -> bool:
    """Whether TorchDynamo is tracing or a dispatch mode (FakeTensorMode, make_fx's proxy mode) is active: then
    the launches must go through the custom ops, and nothing built from the tensors may be cached."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def _direct() -> bool:
    """Whether a launch may skip the dispatcher: a dry run, or eager mode (see :func:`is_traced`)."""
    return is_dry_run() or not is_traced()


def _conv(
    x: torch.Tensor,
    stage: ConvStage,
    *,
    up: torch.Tensor | None = None,
    up_mode: str = "",
    align_corners: bool = False,
    pool: bool = False,
    head: ConvStage | None = None,
    ksize: int = 3,
    relu: bool = True,
    nchw_out: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One conv launch: through the custom op while a compiler or a tracing mode is watching, else (eager calls,
    dry runs) straight to the op's own implementation, saving the dispatcher's ~10-20 us a launch."""
    op: Callable = _conv2d_launch if _direct() else torch.ops.fastunet.conv2d_nhwc
    return op(
        x,
        stage.weight,
        stage.bias,
        up,
        head.weight if head is not None else None,
        head.bias if head is not None else None,
        ksize,
        up_mode,
        align_corners,
        relu,
        pool,
        nchw_out,
    )


def _conv_transpose(x: torch.Tensor, stage: ConvStage) -> torch.Tensor:
    if _direct():
        return conv_transpose2x2_nhwc(x, stage.weight, stage.bias)
    return torch.ops.fastunet.conv_transpose2x2_nhwc(x, stage.weight, stage.bias)


def _upsample(x: torch.Tensor, mode: str, align_corners: bool) -> torch.Tensor:
    if _direct():
        return upsample2x_nhwc(x, mode, align_corners)
    return torch.ops.fastunet.upsample2x_nhwc(x, mode, align_corners)


# ---------------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------------
def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, W, C) view, no copy."""
    return t.permute(0, 2, 3, 1)


def run_plan(plan: Plan, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode U-Net forward on the Triton kernels.

    Launches: 2 per encoder level (the second also writes the pooled map), 3 per decoder level (the upsampled map:
    a transposed conv, or a nearest/bilinear upsample; then two convs, the first reading the skip map and the
    upsampled map directly, no concatenation); the 1x1 head runs in the last conv's epilogue. Activations are
    NHWC; the input is read and the logits written in the caller's layout (NCHW, or channels_last for a
    channels_last input).
    """
    depth = len(plan.decoders)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    logits_nchw = not channels_last

    skips = []
    features = _nhwc(x)
    for level, (conv1, conv2) in enumerate(plan.encoders):
        features, _ = _conv(features, conv1)
        if level < depth:
            skip, features = _conv(features, conv2, pool=True)
            skips.append(skip)
        else:
            features, _ = _conv(features, conv2)

    for level in reversed(range(depth)):
        conv1, conv2 = plan.decoders[level]
        mode, align_corners, up_stage = plan.ups[level]
        if up_stage is not None:
            up = _conv_transpose(features, up_stage)
        else:
            up = _upsample(features, mode, align_corners)
        features, _ = _conv(skips[level], conv1, up=up, up_mode="direct")
        if level == 0 and plan.fuse_head:
            logits, _ = _conv(features, conv2, head=plan.head, nchw_out=logits_nchw)
            return logits.permute(0, 3, 1, 2)
        features, _ = _conv(features, conv2)
    logits, _ = _conv(features, plan.head, ksize=1, relu=False, nchw_out=logits_nchw)
    return logits.permute(0, 3, 1, 2)


class _TritonForwardReferenceBackward(torch.autograd.Function):
    """Output of the Triton forward; backward differentiates the eval-mode reference forward recomputed on the
    inputs, parameters and buffers the forward saw (autograd's version check refuses any of them edited in place
    since), so double backward works as the reference's does."""

    @staticmethod
    def forward(ctx, model: nn.Module, plan: Plan, names: tuple[str, ...], x: torch.Tensor, *state: torch.Tensor):
        device_type = x.device.type
        ctx.model, ctx.names = model, names
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.save_for_backward(x, *state)
        return run_plan(plan, x)

    @staticmethod
    def backward(ctx, grad_logits: torch.Tensor):
        x, *state = ctx.saved_tensors
        model = ctx.model
        current = dict(model.named_parameters()) | dict(model.named_buffers())
        if any(current.get(name) is not tensor for name, tensor in zip(ctx.names, state, strict=True)):
            raise RuntimeError(
                "FastUNet: parameters or buffers were replaced between forward and backward; "
                "the reference recompute would not see the ones the forward used"
            )
        # Under create_graph=True autograd runs this with grad mode on: the recompute's graph is kept, so second
        # derivatives (a gradient penalty, say) flow to the input and the parameters like the reference's.
        create_graph = torch.is_grad_enabled()
        device_type, autocast_on, autocast_dtype = ctx.autocast
        modes = [(module, module.training) for module in model.modules()]
        try:
            model.eval()
            with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
                source = x if x.requires_grad else x.detach()
                logits = model.reference_forward(source)
                wanted = [t for t in (source, *state) if t.requires_grad]
                grads = iter(torch.autograd.grad(logits, wanted, grad_logits, create_graph=create_graph))
        finally:
            for module, training in modes:
                module.training = training
        grad_x = next(grads) if x.requires_grad else None
        return (None, None, None, grad_x, *(next(grads) if t.requires_grad else None for t in state))


def unet_forward(model: nn.Module, plan: Plan, x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """Run the plan; attach reference gradients when autograd needs them (``params``: the model's parameters;
    ``model.reference_forward(x)`` is the reference math the backward differentiates)."""
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        named = list(model.named_parameters()) + list(model.named_buffers())
        names = tuple(name for name, _ in named)
        return _TritonForwardReferenceBackward.apply(model, plan, names, x, *(t for _, t in named))
    return run_plan(plan, x)
