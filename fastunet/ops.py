"""The fused forward as a sequence of launcher calls, and its autograd wrapper."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fastunet.kernels._common import alloc
from fastunet.kernels.conv import conv2d_nhwc, conv_transpose2x2_nhwc
from fastunet.reference import UNet

if TYPE_CHECKING:
    from fastunet.model import FastUNet, Plan


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
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
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
    """Output of the Triton forward; backward differentiates the reference forward recomputed on the same inputs."""

    @staticmethod
    def forward(ctx, model: FastUNet, plan: Plan, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.model = model
        device_type = x.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.save_for_backward(x, *params)
        return run_plan(plan, x, model.upsample, model.align_corners)

    @staticmethod
    def backward(ctx, grad_logits: torch.Tensor):
        x, *params = ctx.saved_tensors
        device_type, autocast_on, autocast_dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
            detached_x = x.detach().requires_grad_(x.requires_grad)
            logits = UNet.forward(ctx.model, detached_x)
            sources = [detached_x if x.requires_grad else None] + [p for p in params if p.requires_grad]
            sources = [s for s in sources if s is not None]
            grads = torch.autograd.grad(logits, sources, grad_logits, allow_unused=True)
        grads_iter = iter(grads)
        result = [None, None, next(grads_iter) if x.requires_grad else None]
        result += [next(grads_iter) if p.requires_grad else None for p in params]
        return tuple(result)


def unet_forward(model: FastUNet, plan: Plan, x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """Run the plan; attach reference gradients when autograd needs them."""
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return _TritonForwardReferenceBackward.apply(model, plan, x, *params)
    return run_plan(plan, x, model.upsample, model.align_corners)
