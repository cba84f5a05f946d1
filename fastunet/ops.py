"""The fused forward: its plan of packed parameters, the launcher calls, and its autograd wrapper."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

from fastunet.kernels import INTERPRET
from fastunet.kernels._common import alloc
from fastunet.kernels.conv import (
    MAX_HEAD_CHANNELS,
    conv2d_nhwc,
    conv_transpose2x2_nhwc,
    pack_conv_transpose_weight,
    pack_conv_weight,
)
from fastunet.reference import DoubleConv, UNet

if TYPE_CHECKING:
    from fastunet.model import FastUNet

__all__ = ["INTERPRET", "ConvStage", "Plan", "build_plan", "run_plan", "unet_forward"]


@dataclasses.dataclass
class ConvStage:
    """One conv (+ folded eval BatchNorm): packed weight and bias in the compute dtype."""

    weight: torch.Tensor
    bias: torch.Tensor


@dataclasses.dataclass
class Plan:
    """Everything a forward launches with, in the compute dtype and on the compute device."""

    encoders: list[tuple[ConvStage, ConvStage]]  # weights (9 c_in, c_out)
    ups: list[ConvStage | None]  # transposed conv per decoder level: weight (c_in, 4 c_out), bias repeated 4x
    decoders: list[tuple[ConvStage, ConvStage]]
    head: ConvStage  # weight (c_out, n_cls), bias (n_cls,)
    fuse_head: bool


def fold_batchnorm(conv: nn.Conv2d, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
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


def build_plan(model: UNet, dtype: torch.dtype, device: torch.device) -> Plan:
    """Fold, pack and cast ``model``'s parameters for the kernels."""

    def stage(conv: nn.Conv2d, norm: nn.Module) -> ConvStage:
        weight, bias = fold_batchnorm(conv, norm)
        return ConvStage(pack_conv_weight(weight).to(device, dtype), bias.to(device, dtype).contiguous())

    def double(block: DoubleConv) -> tuple[ConvStage, ConvStage]:
        return stage(block.conv1, block.norm1), stage(block.conv2, block.norm2)

    ups: list[ConvStage | None] = []
    for decoder in model.decoders:
        if model.upsample == "transpose":
            ups.append(
                ConvStage(
                    pack_conv_transpose_weight(decoder.up.weight.detach()).to(device, dtype),
                    decoder.up.bias.detach().repeat(4).to(device, dtype).contiguous(),
                )
            )
        else:
            ups.append(None)
    head_weight = model.head.weight.detach()[:, :, 0, 0].t().contiguous()
    return Plan(
        encoders=[double(encoder) for encoder in model.encoders],
        ups=ups,
        decoders=[double(decoder.conv) for decoder in model.decoders],
        head=ConvStage(head_weight.to(device, dtype), model.head.bias.detach().to(device, dtype).contiguous()),
        fuse_head=model.base_channels <= MAX_HEAD_CHANNELS,
    )


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, W, C) view, no copy."""
    return t.permute(0, 2, 3, 1)


def run_plan(plan: Plan, x: torch.Tensor, upsample: str, align_corners: bool) -> torch.Tensor:
    """Eval-mode U-Net forward on the Triton kernels.

    Launches: 2 per encoder level (the second also writes the pooled map), 2 per decoder level (the first reads
    the skip map and the upsampled map directly, no concatenation), plus 1 per level with transposed-conv
    upsampling; the 1x1 head runs in the last conv's epilogue. Activations are NHWC; the input is read and the
    logits written in the caller's layout.
    """
    depth = len(plan.decoders)
    batch, _, height, width = x.shape
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    logits = alloc((batch, plan.head.weight.shape[1], height, width), x.dtype, x.device, channels_last=channels_last)

    skips = []
    features = _nhwc(x)
    for level, (conv1, conv2) in enumerate(plan.encoders):
        features, _ = conv2d_nhwc(features, conv1.weight, conv1.bias)
        if level < depth:
            skip, features = conv2d_nhwc(features, conv2.weight, conv2.bias, pool=True)
            skips.append(skip)
        else:
            features, _ = conv2d_nhwc(features, conv2.weight, conv2.bias)

    for level in reversed(range(depth)):
        conv1, conv2 = plan.decoders[level]
        up_stage = plan.ups[level]
        if up_stage is not None:
            up, mode = conv_transpose2x2_nhwc(features, up_stage.weight, up_stage.bias), "direct"
        else:
            up, mode = features, upsample
        features, _ = conv2d_nhwc(
            skips[level], conv1.weight, conv1.bias, up=up, up_mode=mode, align_corners=align_corners
        )
        if level == 0 and plan.fuse_head:
            conv2d_nhwc(
                features,
                conv2.weight,
                conv2.bias,
                head_weight=plan.head.weight,
                head_bias=plan.head.bias,
                out=_nhwc(logits),
            )
        else:
            features, _ = conv2d_nhwc(features, conv2.weight, conv2.bias)
    if not plan.fuse_head:
        conv2d_nhwc(features, plan.head.weight, plan.head.bias, ksize=1, relu=False, out=_nhwc(logits))
    return logits


class _TritonForwardReferenceBackward(torch.autograd.Function):
    """Output of the Triton forward; backward differentiates the eval-mode reference forward recomputed on the
    inputs, parameters and buffers the forward saw (autograd's version check refuses any of them edited in place
    since), so double backward works as the reference's does."""

    @staticmethod
    def forward(ctx, model: FastUNet, plan: Plan, names: tuple[str, ...], x: torch.Tensor, *state: torch.Tensor):
        device_type = x.device.type
        ctx.model, ctx.names = model, names
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.save_for_backward(x, *state)
        return run_plan(plan, x, model.upsample, model.align_corners)

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
                logits = UNet.forward(model, source)
                wanted = [t for t in (source, *state) if t.requires_grad]
                grads = iter(torch.autograd.grad(logits, wanted, grad_logits, create_graph=create_graph))
        finally:
            for module, training in modes:
                module.training = training
        grad_x = next(grads) if x.requires_grad else None
        return (None, None, None, grad_x, *(next(grads) if t.requires_grad else None for t in state))


def unet_forward(model: FastUNet, plan: Plan, x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """Run the plan; attach reference gradients when autograd needs them (``params``: the model's parameters)."""
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        named = list(model.named_parameters()) + list(model.named_buffers())
        names = tuple(name for name, _ in named)
        return _TritonForwardReferenceBackward.apply(model, plan, names, x, *(t for _, t in named))
    return run_plan(plan, x, model.upsample, model.align_corners)
