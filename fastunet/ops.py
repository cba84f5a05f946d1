"""The fused forward: the U-Net layout it reads, its plan of packed parameters, the layout's math in plain PyTorch,
the kernels as torch custom ops, and the autograd wrapper whose backward differentiates that math.

The launchers are registered with ``torch.library`` as opaque custom ops (``fastunet::conv2d_nhwc`` and
``fastunet::conv_transpose2x2_nhwc``) with fake (meta) implementations, so ``torch.compile(fullgraph=True)`` traces
a fused model without a graph break and CUDA-graph capture sees plain kernel launches. They are opaque rather than
``triton_op``-wrapped on purpose: the launch path chooses tiles, validates and records in Python, and keeping it
out of the compiler keeps the compiled model's kernels exactly the ones the parity suite tests.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fastunet.kernels import INTERPRET
from fastunet.kernels._common import alloc, is_dry_run, set_launch_stage, stat_dtype
from fastunet.kernels.conv import (
    MAX_HEAD_CHANNELS,
    MAX_HEAD_CLASSES,
    conv2d_nhwc,
    conv_transpose2x2_nhwc,
    pack_conv_transpose_weight,
    pack_conv_weight,
)
from fastunet.kernels.pack import pack_pieces, pack_weights
from fastunet.kernels.stats import NormIn, NormSpec, normalize_nhwc
from fastunet.kernels.upsample import upsample2x_nhwc
from fastunet.reference import center_pad

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "ACT_KINDS",
    "INTERPRET",
    "DOWNS",
    "JOINS",
    "RELU",
    "Act",
    "ConvSpec",
    "ConvStage",
    "Layout",
    "NormStage",
    "Plan",
    "UpSpec",
    "UpStage",
    "build_plan",
    "conv_padding",
    "fold_batchnorm",
    "layout_forward",
    "layout_values",
    "norm_kind",
    "act_of",
    "apply_act",
    "plan_tensors",
    "refresh_in_place",
    "run_plan",
    "differentiable",
    "unet_forward",
    "unet_forward_kernel_grad",
    "unfused_reason",
]


# ---------------------------------------------------------------------------------------------------------------
# Layout: which modules make up the network, in the order the fused forward uses them
# ---------------------------------------------------------------------------------------------------------------
ACT_KINDS = ("relu", "leaky_relu", "prelu", "silu", "clamp", "none")


@dataclasses.dataclass(frozen=True)
class Act:
    """The activation after a conv (and its norm): ``kind`` is ``"relu"``, ``"leaky_relu"`` (negative ``slope``),
    ``"prelu"`` (``module``: the ``nn.PReLU`` whose weight holds one slope or one per channel), ``"silu"``,
    ``"clamp"`` (to ``[lo, hi]``: ReLU6, Hardtanh) or ``"none"``."""

    kind: str = "relu"
    slope: float = 0.0
    lo: float = 0.0
    hi: float = 0.0
    module: nn.PReLU | None = None

    def __post_init__(self) -> None:
        if self.kind not in ACT_KINDS:
            raise ValueError(f"activation kind must be one of {ACT_KINDS}, got {self.kind!r}")
        if (self.kind == "prelu") != isinstance(self.module, nn.PReLU):
            raise ValueError("a 'prelu' activation needs its nn.PReLU module (and only it carries one)")
        if self.kind == "clamp" and not self.lo <= self.hi:
            raise ValueError(f"a clamp needs lo <= hi, got [{self.lo}, {self.hi}]")


RELU = Act()


def act_of(module: nn.Module | None) -> Act:
    """The :class:`Act` of an activation module (``None`` and ``nn.Identity``: no activation); raises
    ``ValueError`` naming the module type for any other."""
    kind = type(module)
    if module is None or kind is nn.Identity:
        return Act("none")
    if kind is nn.ReLU:
        return RELU
    if kind is nn.LeakyReLU:
        return Act("leaky_relu", slope=float(module.negative_slope))
    if kind is nn.PReLU:
        return Act("prelu", module=module)
    if kind is nn.SiLU:
        return Act("silu")
    if kind is nn.ReLU6:
        return Act("clamp", lo=0.0, hi=6.0)
    if kind is nn.Hardtanh:
        return Act("clamp", lo=float(module.min_val), hi=float(module.max_val))
    raise ValueError(
        f"{kind.__name__} is not a supported activation (ReLU, LeakyReLU, PReLU, SiLU, ReLU6, Hardtanh or none)"
    )


def apply_act(act: Act, t: torch.Tensor, prelu_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``act`` applied to ``t`` in PyTorch (``prelu_weight``: the PReLU slopes to use, default the module's)."""
    if act.kind == "relu":
        return F.relu(t)
    if act.kind == "leaky_relu":
        return F.leaky_relu(t, act.slope)
    if act.kind == "prelu":
        return F.prelu(t, act.module.weight if prelu_weight is None else prelu_weight)
    if act.kind == "silu":
        return F.silu(t)
    if act.kind == "clamp":
        return F.hardtanh(t, act.lo, act.hi)
    return t


def norm_kind(norm: nn.Module | None) -> str | None:
    """How a norm acts in eval mode: ``"folds"`` (running statistics: BatchNorm2d, or an InstanceNorm2d that tracks
    them; an affine map that folds into the conv before it), ``"instance"`` (per-(image, channel) statistics of the
    data), ``"group"`` (per-(image, group)); None for no norm. Raises ``ValueError`` for anything else."""
    if norm is None:
        return None
    if type(norm) in (nn.BatchNorm2d, nn.InstanceNorm2d):
        running = norm.track_running_stats and norm.running_mean is not None and norm.running_var is not None
        if running:
            return "folds"
        if type(norm) is nn.InstanceNorm2d:
            return "instance"
        raise ValueError("a BatchNorm2d without running statistics normalizes by batch statistics even in eval mode")
    if type(norm) is nn.GroupNorm:
        return "group"
    raise ValueError(f"{type(norm).__name__} is not a supported norm (BatchNorm2d, InstanceNorm2d, GroupNorm)")


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """A conv (3x3, padding 1 or 0; stride 2 where it down-samples), the norm after it, if any, and the activation
    after both. The norm, as in eval mode (see :func:`norm_kind`): BatchNorm2d with running statistics (folds into
    the conv), InstanceNorm2d (per-image statistics, or running ones where it tracks them) or GroupNorm."""

    conv: nn.Conv2d
    norm: nn.BatchNorm2d | nn.InstanceNorm2d | nn.GroupNorm | None = None
    act: Act | None = None  # None: ReLU (a default that torch.compile can trace through)

    @property
    def activation(self) -> Act:
        return RELU if self.act is None else self.act


@dataclasses.dataclass(frozen=True)
class UpSpec:
    """How a decoder level upsamples the map below it: ``"transpose"`` (``conv``: ConvTranspose2d k=2 s=2),
    ``"bilinear"`` or ``"nearest"`` (2x interpolation, after the 1x1 conv ``pre_conv`` if there is one), or
    ``"pixelshuffle"`` (``conv``: a Conv2d to 4x the channels, then a 2x depth-to-space; with ``blur``, the result is
    zero-padded by one row and column at the top and left and averaged over 2x2 windows, stride 1)."""

    mode: str
    align_corners: bool = False
    conv: nn.ConvTranspose2d | nn.Conv2d | None = None
    pre_conv: nn.Conv2d | None = None
    blur: bool = False


JOINS = ("pad", "replicate", "crop")
DOWNS = ("pool", "stride")


@dataclasses.dataclass(frozen=True)
class Layout:
    """A U-Net as the fused forward reads it.

    ``encoders[level]`` for levels 0..depth (the last is the bottleneck); ``down`` says how a level passes its
    map to the next: ``"pool"``, a 2x2 max-pool, or ``"stride"``, the next level's first conv has stride 2 (the
    nnU-Net and DynUNet encoders); ``ups[level]`` and ``decoders[level]`` for levels 0..depth-1 (the decoder at
    ``level`` reads ``cat([skip[level], up(map below)])``, or ``cat([up(...), skip[level]])`` where
    ``up_first[level]``); ``head``: the last conv, to the logits (1x1, or a 3x3 with no activation). Channel widths
    come from the weights, so they need not double per level.

    ``join`` says how the upsampled map and the skip are brought to one size: ``"pad"``: the upsampled map
    zero-padded, centered (the extra row/column at the bottom/right); ``"replicate"``: the upsampled map padded at
    the bottom/right by repeating its last row/column; ``"crop"``: the skip center-cropped to the upsampled map
    (the valid-conv U-Net; the extra row/column cropped at the bottom/right).
    """

    encoders: tuple[tuple[ConvSpec, ConvSpec], ...]
    ups: tuple[UpSpec, ...]
    decoders: tuple[tuple[ConvSpec, ConvSpec], ...]
    head: nn.Conv2d
    up_first: tuple[bool, ...] = ()  # per decoder level; empty: the skip first everywhere
    join: str = "pad"
    down: str = "pool"

    def __post_init__(self) -> None:
        if self.join not in JOINS:
            raise ValueError(f"join must be one of {JOINS}, got {self.join!r}")
        if self.down not in DOWNS:
            raise ValueError(f"down must be one of {DOWNS}, got {self.down!r}")

    def concat_up_first(self, level: int) -> bool:
        return bool(self.up_first) and self.up_first[level]

    @property
    def depth(self) -> int:
        return len(self.decoders)

    @property
    def in_channels(self) -> int:
        return self.encoders[0][0].conv.in_channels

    def conv_specs(self) -> list[tuple[str, ConvSpec]]:
        """Every conv of the encoders and decoders with its stage name (``enc0.conv1`` ... ``dec0.conv2``)."""
        named = []
        for level, pair in enumerate(self.encoders):
            tag = f"enc{level}" if level < self.depth else "bottleneck"
            named += [(f"{tag}.conv{i + 1}", spec) for i, spec in enumerate(pair)]
        for level, pair in enumerate(self.decoders):
            named += [(f"dec{level}.conv{i + 1}", spec) for i, spec in enumerate(pair)]
        return named


def unfused_reason(layout: Layout) -> str | None:
    """Why the kernels cannot run ``layout`` (the first feature they lack), or None when they can. The layout's
    math (:func:`layout_forward`) covers every feature; the kernels grow into it."""
    down_convs = {f"enc{level}.conv1" for level in range(1, layout.depth)} | {"bottleneck.conv1"}
    for name, spec in layout.conv_specs():
        norm_kind(spec.norm)  # raises for a norm the layout cannot describe
        stride = _pair(spec.conv.stride)
        if _pair(spec.conv.kernel_size) != (3, 3):
            return f"{name}: a {_pair(spec.conv.kernel_size)} conv is not fused (3x3 is)"
        if layout.down == "stride" and name in down_convs and layout.depth:
            if stride != (2, 2) or conv_padding(spec.conv) != 1:
                return (
                    f"{name}: with strided down-sampling the first conv of a deeper level is 3x3 stride 2 padding 1, "
                    f"got stride {spec.conv.stride} padding {spec.conv.padding}"
                )
        elif stride != (1, 1):
            return (
                f"{name}: a strided conv is fused only as the first conv of a deeper level of a layout that "
                "down-samples by strided convs (Layout.down == 'stride')"
            )
        if conv_padding(spec.conv) is None:
            return f"{name}: convs with padding {spec.conv.padding} are not fused (padding 1 and 0 are)"
    for level, up in enumerate(layout.ups):
        if up.mode == "transpose":
            t = up.conv
            shape = tuple(_pair(v) for v in (t.kernel_size, t.stride, t.padding, t.output_padding, t.dilation))
            if shape != ((2, 2), (2, 2), (0, 0), (0, 0), (1, 1)) or t.groups != 1:
                return f"dec{level}.up: transposed convs other than kernel 2, stride 2 are not fused yet"
        if up.mode == "pixelshuffle" and (conv_padding(up.conv) != _pair(up.conv.kernel_size)[0] // 2):
            return f"dec{level}.up: the pixel shuffle's conv must keep the size (padding kernel_size // 2)"
    head_size = _pair(layout.head.kernel_size)
    if head_size not in ((1, 1), (3, 3)) or conv_padding(layout.head) is None:
        return f"head: a {head_size} head conv with padding {layout.head.padding} is not fused (1x1, or 3x3 is)"
    return None


def conv_padding(conv: nn.Conv2d) -> int | None:
    """The conv's padding when the kernels run it (stride 1 or 2 alike in both dimensions, no dilation, one group,
    zero padding: ``kernel // 2`` on every side, or 0), else None. Where a stride 2 may sit is
    :func:`unfused_reason`'s call."""
    size = _pair(conv.kernel_size)
    if size[0] != size[1] or size[0] % 2 != 1 or _pair(conv.stride) not in ((1, 1), (2, 2)):
        return None
    if _pair(conv.dilation) != (1, 1):
        return None
    if conv.groups != 1 or conv.padding_mode != "zeros":
        return None
    if conv.padding == "same":
        return size[0] // 2 if _pair(conv.stride) == (1, 1) else None
    if conv.padding == "valid":
        return 0
    padding = _pair(conv.padding)
    if padding[0] != padding[1] or padding[0] not in (0, size[0] // 2):
        return None
    return padding[0]


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


# ---------------------------------------------------------------------------------------------------------------
# Plan: folded, packed, cast parameters
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class NormStage:
    """A norm with data statistics after a conv (InstanceNorm2d: ``groups`` = channels; GroupNorm): its affine
    parameters as fp32 plan tensors (or none) and ``eps``."""

    groups: int
    eps: float
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    over_batch: bool = False  # BatchNorm in training mode: statistics per channel over the batch (groups = C)

    def spec(self) -> NormSpec:
        return NormSpec(self.groups, self.weight, self.bias, self.eps, self.over_batch)


@dataclasses.dataclass
class ConvStage:
    """One conv (+ folded eval BatchNorm): packed weight and bias in the compute dtype, its size, padding and
    stride, and the activation after it (``slopes``: PReLU's, one per output channel). With ``norm`` (a norm with
    data statistics) the conv stores the pre-norm map and its statistics, and the activation is applied by whatever
    reads the map; otherwise the epilogue applies it."""

    weight: torch.Tensor
    bias: torch.Tensor
    ksize: int = 3
    padding: int = 1
    act: Act | None = None  # None: ReLU (a default that torch.compile can trace through)
    slopes: torch.Tensor | None = None
    stride: int = 1
    norm: NormStage | None = None
    # Set by the training plan only: every reader of this conv's (ReLU) output applies the ReLU's derivative to the
    # gradient it sends back, so the conv's backward takes the arriving gradient as the pre-activation one.
    grad_is_dz: bool = False

    @property
    def activation(self) -> Act:
        return RELU if self.act is None else self.act

    def launch_constants(self) -> tuple:
        """What the launches read of this stage besides its tensors."""
        act = self.activation
        norm = None
        if self.norm is not None:
            norm = (self.norm.groups, self.norm.eps, self.norm.weight is not None, self.norm.over_batch)
        return self.ksize, self.padding, act.kind, act.slope, act.lo, act.hi, self.stride, norm


@dataclasses.dataclass(frozen=True)
class UpStage:
    """How the plan upsamples at one decoder level: ``mode`` ``"direct"``: the map below goes through the
    transposed conv ``conv``; ``"bilinear"``, ``"nearest"``: the upsample kernel interpolates it (after the 1x1
    conv ``pre_conv`` at low resolution, if any); ``"pixelshuffle"``, ``"pixelshuffle_blur"``: the conv ``conv``
    at low resolution (output channels sub-pixel-major), then the upsample kernel's pixel shuffle. Either way the
    decoder's first conv then reads the full-size map directly.

    Two stages are equal when they upsample the same way; the packed tensors are not compared (a plan whose
    stages all compare equal to a rebuilt one can take the rebuilt tensors in place)."""

    mode: str
    align_corners: bool = False
    conv: ConvStage | None = dataclasses.field(default=None, compare=False)
    pre_conv: ConvStage | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass
class Plan:
    """Everything a forward launches with, in the compute dtype and on the compute device, and the layout it was
    built from (the eval-mode backward differentiates that layout's math)."""

    encoders: list[tuple[ConvStage, ConvStage]]  # weights (9 c_in, c_out)
    ups: list[UpStage]
    decoders: list[tuple[ConvStage, ConvStage]]
    head: ConvStage  # weight (k * k * c_out, n_cls), bias (n_cls,)
    fuse_head: bool
    layout: Layout
    join: str = "pad"
    down: str = "pool"
    # The fused head's launch also stores the last conv's activated map (a training forward: the head's weight
    # gradient reads it).
    head_map: bool = False


def _stages(plan: Plan) -> list[ConvStage]:
    stages = [stage for pair in (*plan.encoders, *plan.decoders) for stage in pair]
    stages += [conv for up in plan.ups for conv in (up.pre_conv, up.conv) if conv is not None]
    return [*stages, plan.head]


def plan_tensors(plan: Plan) -> list[torch.Tensor]:
    """Every tensor of a plan, in a fixed order."""
    tensors = []
    for stage in _stages(plan):
        tensors += [stage.weight, stage.bias] + ([stage.slopes] if stage.slopes is not None else [])
        if stage.norm is not None and stage.norm.weight is not None:
            tensors += [stage.norm.weight, stage.norm.bias]
    return tensors


def fold_batchnorm(conv: nn.Conv2d, norm: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight and bias with an eval-mode BatchNorm folded in, computed in float64."""
    weight = conv.weight.detach().double()
    if conv.bias is not None:
        bias = conv.bias.detach().double()
    else:
        bias = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    if isinstance(norm, (nn.BatchNorm2d, nn.InstanceNorm2d)):
        if norm_kind(norm) != "folds":
            raise ValueError("BatchNorm2d without running statistics cannot be folded for eval-mode inference")
        scale = norm.running_var.detach().double().add(norm.eps).rsqrt()
        if norm.weight is not None:
            scale = scale * norm.weight.detach().double()
        bias = (bias - norm.running_mean.detach().double()) * scale
        if norm.bias is not None:
            bias = bias + norm.bias.detach().double()
        weight = weight * scale[:, None, None, None]
    return weight, bias


def _owned(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous copy of ``t`` in ``dtype`` on ``device``, always in storage of its own: ``.to()`` returns the
    tensor itself (a parameter, or a view of one) when nothing changes, and a plan tensor that aliased a parameter
    would be overwritten by the next in-place refresh."""
    return t.to(device=device, dtype=dtype, memory_format=torch.contiguous_format, copy=True)


def build_plan(layout: Layout, dtype: torch.dtype, device: torch.device) -> Plan:
    """Fold, pack and cast the parameters of ``layout`` for the kernels (every tensor a fresh copy); raises
    ``ValueError`` with :func:`unfused_reason` for a layout the kernels cannot run."""
    reason = unfused_reason(layout)
    if reason is not None:
        raise ValueError(f"the fused kernels cannot run this layout: {reason}")

    def packed(
        conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor, act: Act = RELU, norm: NormStage | None = None
    ) -> ConvStage:
        slopes = None
        if act.kind == "prelu":  # one slope per output channel (a single one broadcast)
            slopes = _owned(act.module.weight.detach().expand(weight.shape[0]), device, dtype)
        return ConvStage(
            _owned(pack_conv_weight(weight), device, dtype),
            _owned(bias, device, dtype),
            _pair(conv.kernel_size)[0],
            conv_padding(conv),
            act,
            slopes,
            _pair(conv.stride)[0],
            norm,
        )

    def data_norm(module: nn.Module) -> NormStage:
        """InstanceNorm2d or GroupNorm: statistics in fp32 (fp64 for a float64 plan), so are its affine parameters."""
        groups = module.num_groups if isinstance(module, nn.GroupNorm) else module.num_features
        affine = module.weight is not None and module.bias is not None
        return NormStage(
            int(groups),
            float(module.eps),
            _owned(module.weight.detach(), device, stat_dtype(dtype)) if affine else None,
            _owned(module.bias.detach(), device, stat_dtype(dtype)) if affine else None,
        )

    def stage(spec: ConvSpec, skip_after: int = 0) -> ConvStage:
        folds = norm_kind(spec.norm) in (None, "folds")
        weight, bias = fold_batchnorm(spec.conv, spec.norm if folds else None)
        if skip_after:  # cat([up, skip]): the kernel reads the skip's channels first, so its weight rows move up
            weight = torch.cat([weight[:, skip_after:], weight[:, :skip_after]], dim=1)
        return packed(spec.conv, weight, bias, spec.activation, None if folds else data_norm(spec.norm))

    def plain(conv: nn.Conv2d) -> ConvStage:  # no norm, no activation
        return packed(conv, *fold_batchnorm(conv, None), Act("none"))

    def double(pair: tuple[ConvSpec, ConvSpec], skip_after: int = 0) -> tuple[ConvStage, ConvStage]:
        return stage(pair[0], skip_after), stage(pair[1])

    def decoder(level: int) -> tuple[ConvStage, ConvStage]:
        pair = layout.decoders[level]
        if not layout.concat_up_first(level):
            return double(pair)
        skip_channels = layout.encoders[level][1].conv.out_channels
        return double(pair, pair[0].conv.in_channels - skip_channels)

    ups: list[UpStage] = []
    for up in layout.ups:
        if up.mode == "transpose":
            weight = up.conv.weight.detach()
            if up.conv.bias is not None:
                bias = up.conv.bias.detach()
            else:
                bias = torch.zeros(weight.shape[1], dtype=weight.dtype, device=weight.device)
            transposed = ConvStage(
                _owned(pack_conv_transpose_weight(weight), device, dtype), _owned(bias.repeat(4), device, dtype)
            )
            ups.append(UpStage("direct", False, transposed))
        elif up.mode == "pixelshuffle":
            # Output channel c * 4 + k of the conv (pixel_shuffle's order) becomes k * C + c: each sub-pixel's
            # channels contiguous for the shuffle.
            weight, bias = fold_batchnorm(up.conv, None)
            order = torch.arange(weight.shape[0], device=weight.device).view(-1, 4).t().reshape(-1)
            conv = packed(up.conv, weight[order], bias[order], Act("none"))
            ups.append(UpStage("pixelshuffle_blur" if up.blur else "pixelshuffle", False, conv))
        else:
            pre_conv = plain(up.pre_conv) if up.pre_conv is not None else None
            ups.append(UpStage(up.mode, up.align_corners, pre_conv=pre_conv))
    head = layout.head
    head_stage = plain(head)
    decoders = [decoder(level) for level in range(layout.depth)]
    last = decoders[0][1] if decoders else None
    return Plan(
        encoders=[double(pair) for pair in layout.encoders],
        ups=ups,
        decoders=decoders,
        head=head_stage,
        # A fused head reads the last conv's activated map in its epilogue: not a map that still needs its norm.
        fuse_head=head_stage.ksize == 1
        and head.in_channels <= MAX_HEAD_CHANNELS
        and head.out_channels <= MAX_HEAD_CLASSES
        and (last is None or last.norm is None),
        layout=layout,
        join=layout.join,
        down=layout.down,
    )


def refresh_in_place(cached: Plan, fresh: Plan) -> bool:
    """Copy ``fresh`` into ``cached`` when both launch the same way (same upsampling stages, head fusion, join, each
    conv's size, padding and activation, and every tensor's shape, dtype and device), so that a captured CUDA graph
    replays the new weights; False (``cached`` untouched) otherwise."""
    old, new = plan_tensors(cached), plan_tensors(fresh)
    if cached.fuse_head != fresh.fuse_head or cached.ups != fresh.ups or len(old) != len(new):
        return False
    constants = [[stage.launch_constants() for stage in _stages(plan)] for plan in (cached, fresh)]
    if cached.join != fresh.join or cached.down != fresh.down or constants[0] != constants[1]:
        return False
    for a, b in zip(old, new, strict=True):
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            return False
        if a.is_inference() and not torch.is_inference_mode_enabled():
            return False
    with torch.no_grad():
        for a, b in zip(old, new, strict=True):
            a.copy_(b)
    cached.layout = fresh.layout
    return True


# ---------------------------------------------------------------------------------------------------------------
# The layout's math in PyTorch: what the kernels compute, and what the eval-mode backward differentiates
# ---------------------------------------------------------------------------------------------------------------
def _layout_modules(layout: Layout) -> list[nn.Module]:
    modules: list[nn.Module] = []
    for pair in (*layout.encoders, *layout.decoders):
        for spec in pair:
            modules += [spec.conv] + ([spec.norm] if spec.norm is not None else [])
            modules += [spec.activation.module] if spec.activation.module is not None else []
    for up in layout.ups:
        modules += [m for m in (up.pre_conv, up.conv) if m is not None]
    return [*modules, layout.head]


_READ = {
    nn.BatchNorm2d: ("running_mean", "running_var", "weight", "bias", "eps"),
    nn.Conv2d: ("weight", "bias"),
    nn.ConvTranspose2d: ("weight", "bias"),
    nn.PReLU: ("weight",),
    nn.InstanceNorm2d: ("running_mean", "running_var", "weight", "bias", "eps"),
    nn.GroupNorm: ("weight", "bias", "eps"),
}


def layout_values(layout: Layout) -> dict[tuple[int, str], object]:
    """Everything :func:`layout_forward` reads from the layout's modules (tensors, and BatchNorm ``eps``), keyed by
    ``(id(module), attribute)``: a snapshot that the math can be rerun on later."""
    values: dict[tuple[int, str], object] = {}
    for module in _layout_modules(layout):
        kind = next(k for k in _READ if isinstance(module, k))
        for attr in _READ[kind]:
            values[(id(module), attr)] = getattr(module, attr)
    return values


def layout_forward(
    layout: Layout, x: torch.Tensor, values: dict[tuple[int, str], object] | None = None, *, training: bool = False
):
    """The eval-mode math of ``layout`` in plain PyTorch (what the fused kernels compute), on the modules' current
    tensors or on a :func:`layout_values` snapshot. Functional: no module is called and no mode is changed.

    ``training``: the training-mode math instead, where the only difference is a norm with running statistics in
    training mode: it is called, so it normalizes by the batch's statistics and updates its running ones as the
    module does (this mutates the modules' buffers: run it on copies)."""
    if training and values is not None:
        raise ValueError("layout_forward: training=True runs on the modules' own tensors, not on a snapshot")

    def get(module: nn.Module, attr: str):
        return getattr(module, attr) if values is None else values[(id(module), attr)]

    def conv(module: nn.Conv2d, t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, get(module, "weight"), get(module, "bias"), stride=module.stride, padding=module.padding)

    def double(pair: tuple[ConvSpec, ConvSpec], t: torch.Tensor) -> torch.Tensor:
        for spec in pair:
            t = conv(spec.conv, t)
            norm = spec.norm
            kind = norm_kind(norm)
            if kind == "instance":
                t = F.instance_norm(t, weight=get(norm, "weight"), bias=get(norm, "bias"), eps=get(norm, "eps"))
            elif kind == "group":
                t = F.group_norm(t, norm.num_groups, get(norm, "weight"), get(norm, "bias"), get(norm, "eps"))
            elif kind == "folds" and training and norm.training:
                t = norm(t)
            elif kind == "folds":
                t = F.batch_norm(
                    t,
                    get(norm, "running_mean"),
                    get(norm, "running_var"),
                    get(norm, "weight"),
                    get(norm, "bias"),
                    False,
                    0.0,
                    get(norm, "eps"),
                )
            act = spec.activation
            t = apply_act(act, t, get(act.module, "weight") if act.module is not None else None)
        return t

    skips = []
    features = x
    for level, pair in enumerate(layout.encoders):
        features = double(pair, features)
        if level < layout.depth:
            skips.append(features)
            if layout.down == "pool":
                features = F.max_pool2d(features, 2)
    for level in reversed(range(layout.depth)):
        features = upsample(layout.ups[level], features, get)
        skip, features = join(layout.join, skips[level], features)
        joined = torch.cat([features, skip] if layout.concat_up_first(level) else [skip, features], 1)
        features = double(layout.decoders[level], joined)
    return conv(layout.head, features)


def upsample(spec: UpSpec, t: torch.Tensor, get=getattr) -> torch.Tensor:
    """One decoder level's 2x upsampling as ``spec`` describes it, in PyTorch (``get(module, attr)`` reads the
    modules' tensors)."""
    if spec.mode == "transpose":
        module = spec.conv
        return F.conv_transpose2d(
            t,
            get(module, "weight"),
            get(module, "bias"),
            stride=module.stride,
            padding=module.padding,
            output_padding=module.output_padding,
        )
    if spec.mode == "pixelshuffle":
        t = F.conv2d(t, get(spec.conv, "weight"), get(spec.conv, "bias"), padding=spec.conv.padding)
        t = F.pixel_shuffle(t, 2)
        return F.avg_pool2d(F.pad(t, [1, 0, 1, 0]), 2, stride=1) if spec.blur else t
    if spec.pre_conv is not None:
        t = F.conv2d(t, get(spec.pre_conv, "weight"), get(spec.pre_conv, "bias"))
    align = spec.align_corners if spec.mode == "bilinear" else None
    return F.interpolate(t, scale_factor=2, mode=spec.mode, align_corners=align)


def join(how: str, skip: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(skip, upsampled map) brought to one size as :attr:`Layout.join` ``how`` says."""
    dy, dx = skip.shape[-2] - up.shape[-2], skip.shape[-1] - up.shape[-1]
    if how == "pad":
        return skip, center_pad(up, *skip.shape[-2:])
    if how == "replicate":
        if dy < 0 or dx < 0:
            raise ValueError(f"replicate join: the upsampled map {tuple(up.shape)} is larger than the skip")
        return skip, F.pad(up, [0, dx, 0, dy], mode="replicate") if dy or dx else up
    if dy < 0 or dx < 0:
        raise ValueError(f"crop join: the skip {tuple(skip.shape)} is smaller than the upsampled map")
    top, left = dy // 2, dx // 2
    return skip[..., top : top + up.shape[-2], left : left + up.shape[-1]], up


# ---------------------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------------------
# A map read through its norm (NormIn): scale, shift, the activation after the norm and its parameters.
_NORM_IN_ARGS = (
    'Tensor? in_scale=None, Tensor? in_shift=None, str in_activation="none", float in_slope=0.0, float in_lo=0.0, '
    "float in_hi=0.0, Tensor? in_slopes=None"
)
# The same for the low-resolution map a decoder conv's launch upsamples itself (``up_`` prefix).
_UP_NORM_IN_ARGS = _NORM_IN_ARGS.replace("in_", "up_")
_CONV_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor? bias, Tensor? up, Tensor? head_weight, Tensor? head_bias, Tensor? slopes, "
    "int ksize, int padding, str up_mode, bool align_corners, str join, str activation, float slope, float lo, "
    f"float hi, bool pool, bool nchw_out, int stride=1, {_NORM_IN_ARGS}, int norm_groups=0, "
    "Tensor? norm_weight=None, Tensor? norm_bias=None, float norm_eps=0.0, bool norm_over_batch=False, "
    f"Tensor? up_weight=None, Tensor? up_bias=None, {_UP_NORM_IN_ARGS}, bool head_map=False, bool grad_is_dz=False, "
    "bool mask_x=False, bool mask_up=False, Tensor? x_applied=None, Tensor? up_applied=None) -> "
    "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def _norm_in(scale, shift, activation, slope, lo, hi, slopes) -> NormIn | None:
    """The custom ops' flattened NormIn arguments, back as one (None when ``scale`` is None)."""
    if scale is None:
        return None
    return NormIn(scale, shift, activation, slope, lo, hi, slopes)


def _norm_in_args(norm_in: NormIn | None) -> tuple:
    """A NormIn as the custom ops' flattened arguments (see :data:`_NORM_IN_ARGS`)."""
    if norm_in is None:
        return (None, None, "none", 0.0, 0.0, 0.0, None)
    n = norm_in
    return (n.scale, n.shift, n.activation, float(n.slope), float(n.lo), float(n.hi), n.slopes)


def _conv_output(x: torch.Tensor, height: int, width: int, channels: int, nchw_out: bool) -> torch.Tensor:
    """The (N, H, W, channels) output view: contiguous NHWC, or a permuted contiguous NCHW tensor."""
    batch = x.shape[0]
    if nchw_out:
        return alloc((batch, channels, height, width), x.dtype, x.device).permute(0, 2, 3, 1)
    return alloc((batch, height, width, channels), x.dtype, x.device)


def _conv_size(
    x: torch.Tensor, up: torch.Tensor | None, up_mode: str, join: str, ksize: int, padding: int, stride: int = 1
):
    """(height, width) of a conv launch's output: the input's frame (x's, or the upsampled map's with a crop
    join), ``ksize - 1 - 2 padding`` smaller, then divided by the stride as torch does (``(H + 2p - k) // s + 1``,
    the 2x2 stride-2 conv's ``H // 2`` included)."""
    height, width = x.shape[1], x.shape[2]
    if up is not None and join == "crop":
        scale = 1 if up_mode == "direct" else 2
        height, width = scale * up.shape[1], scale * up.shape[2]
    shrink = ksize - 1 - 2 * padding
    return (height - shrink - 1) // stride + 1, (width - shrink - 1) // stride + 1


def _applied_ahead(applied: torch.Tensor, z: torch.Tensor | None, read: NormIn, name: str, z_name: str, what: str):
    """``applied`` (a map normalized ahead for a launch) once it matches the pre-norm map ``z`` it stands for: the
    same shape, dtype and device, ``read`` fitting ``z``."""
    if z is None:
        raise ValueError(f"{name}: given without the pre-norm map {z_name} it stands for")
    if applied.shape != z.shape or applied.dtype != z.dtype or applied.device != z.device:
        raise ValueError(
            f"{name}: expected {z_name}'s shape {tuple(z.shape)} {z.dtype} on {z.device}, got "
            f"{tuple(applied.shape)} {applied.dtype} on {applied.device}"
        )
    read.check(z, what)
    return applied


def _conv2d_run(
    x, weight, bias, up, head_weight, head_bias, slopes, ksize, padding, up_mode, align_corners, join, activation,
    slope, lo, hi, pool, nchw_out, stride=1, in_scale=None, in_shift=None, in_activation="none", in_slope=0.0,
    in_lo=0.0, in_hi=0.0, in_slopes=None, norm_groups=0, norm_weight=None, norm_bias=None, norm_eps=0.0,
    norm_over_batch=False, up_weight=None, up_bias=None, up_scale=None, up_shift=None, up_activation="none",
    up_slope=0.0, up_lo=0.0, up_hi=0.0, up_slopes=None, head_map=False, grad_is_dz=False, mask_x=False,
    mask_up=False, x_applied=None, up_applied=None,
):  # fmt: skip
    """:func:`fastunet.kernels.conv2d_nhwc` with the custom op's arguments (see :func:`_conv2d_launch`). Returns (y,
    pooled (with ``head_map``: the activated map under the logits) or None, the :class:`NormIn` of a conv followed by
    a norm with data statistics or None)."""
    read_x = _norm_in(in_scale, in_shift, in_activation, in_slope, in_lo, in_hi, in_slopes)
    if x_applied is not None:
        if read_x is None:
            raise ValueError("x_applied: x read through its norm, applied ahead; it needs in_scale and in_shift")
        x, read_x = _applied_ahead(x_applied, x, read_x, "x_applied", "x", "conv2d_nhwc input"), None
    channels = head_weight.shape[1] if head_weight is not None else weight.shape[1]
    height, width = _conv_size(x, up, up_mode, join, ksize, padding, stride)
    out = _conv_output(x, max(height, 0), max(width, 0), channels, nchw_out)
    up_read = _norm_in(up_scale, up_shift, up_activation, up_slope, up_lo, up_hi, up_slopes)
    if up_applied is not None:
        if up_read is None or up_mode != "transpose":
            raise ValueError(
                "up_applied: the low-resolution map read through its norm by the launch's transposed conv, applied "
                f"ahead; it needs up_scale, up_shift and up_mode 'transpose', got up_mode={up_mode!r}"
                + ("" if up_read is not None else " and no up_scale")
            )
        up, up_read = (
            _applied_ahead(up_applied, up, up_read, "up_applied", "up", "conv2d_nhwc low-resolution input"),
            None,
        )
    if up_mode == "transpose":
        if up is None or up_weight is None:
            raise ValueError("up_mode 'transpose' takes the low-resolution map (up) and the packed up_weight")
        up, up_mode = conv_transpose2x2_nhwc(up, up_weight, up_bias, norm_in=up_read), "direct"
    elif up_weight is not None or up_bias is not None:
        raise ValueError(f"up_weight and up_bias go with up_mode 'transpose', got up_mode={up_mode!r}")
    elif up_read is not None:
        if up is None or up_mode not in ("nearest", "bilinear"):
            raise ValueError(
                f"a low-resolution map read through its norm needs up_mode 'nearest', 'bilinear' or 'transpose', "
                f"got {up_mode!r}"
            )
        up, up_mode = upsample2x_nhwc(up, up_mode, align_corners, norm_in=up_read), "direct"
        align_corners = False
    norm = NormSpec(norm_groups, norm_weight, norm_bias, norm_eps, norm_over_batch) if norm_groups else None
    y, second = conv2d_nhwc(
        x,
        weight,
        bias,
        ksize=ksize,
        padding=padding,
        up=up,
        up_mode=up_mode or None,
        align_corners=align_corners,
        join=join,
        activation=activation,
        slope=slope,
        lo=lo,
        hi=hi,
        slopes=slopes,
        pool=pool,
        head_weight=head_weight,
        head_bias=head_bias,
        out=out,
        stride=stride,
        norm_in=read_x,
        norm=norm,
        head_map=head_map,
    )
    if norm is not None:
        return y, None, second
    return y, second, None


def _conv2d_launch(
    x, weight, bias, up, head_weight, head_bias, slopes, ksize, padding, up_mode, align_corners, join, activation,
    slope, lo, hi, pool, nchw_out, stride=1, in_scale=None, in_shift=None, in_activation="none", in_slope=0.0,
    in_lo=0.0, in_hi=0.0, in_slopes=None, norm_groups=0, norm_weight=None, norm_bias=None, norm_eps=0.0,
    norm_over_batch=False, up_weight=None, up_bias=None, up_scale=None, up_shift=None, up_activation="none",
    up_slope=0.0, up_lo=0.0, up_hi=0.0, up_slopes=None, head_map=False, grad_is_dz=False, mask_x=False,
    mask_up=False, x_applied=None, up_applied=None,
):  # fmt: skip
    """:func:`fastunet.kernels.conv2d_nhwc` as a custom op. Returns (y, pooled, scale, shift, mean, var): y is (N,
    H, W, C_out or n_cls), a view of an NCHW tensor when ``nchw_out``; pooled is empty unless ``pool``; with
    ``norm_groups`` (a norm with data statistics after the conv; ``norm_over_batch``: BatchNorm's batch statistics)
    y is the pre-norm map, scale and shift its fp32 (N, C_out) normalization and mean, var (N, C_out) the statistics
    of each channel's group, else all four empty. ``up_mode`` "" means no second source; ``in_scale`` given: x is
    read through its norm. ``head_map`` (with a fused head): the launch also stores the activated map under the
    logits (what the head's weight gradient reads), returned in the pooled map's place.

    The launch may make the upsampled map itself from the low-resolution map ``up`` (a training forward does, so
    that autograd keeps the low-resolution map only): ``up_mode`` ``"nearest"``/``"bilinear"`` interpolates it,
    ``"transpose"`` runs the 2x2 stride-2 transposed conv ``up_weight`` (packed, (C_low, 4 C_up)) with ``up_bias``
    ((4 C_up,), one block per sub-pixel) on it; ``up_scale`` given: ``up`` is a pre-norm map read through its norm
    by that launch. Its own launch (the same as the forward's separate one) writes the upsampled map, then the conv
    reads it directly.

    ``x_applied`` (with ``in_scale``): ``act(x * scale + shift)`` written ahead by the caller (the normalize op, out of
    autograd's sight): the launch loads it as stored (TMA on sm_90) instead of normalizing x on load, while the
    registered backward, which never sees it, differentiates the read of x through its norm as without it; the
    caller vouches that it holds those values (its shape, dtype and device are checked). A training forward passes
    it so that autograd keeps the pre-norm map only. ``up_applied`` (with ``up_scale`` and ``up_mode``
    ``"transpose"``): the same for the low-resolution map the launch's transposed conv reads.

    ``grad_is_dz``, ``mask_x``, ``mask_up`` change nothing here; they tell the registered backward
    (:mod:`fastunet.training`) where a ReLU's derivative is applied: ``mask_x`` (``mask_up``): this launch's backward
    applies that of the ReLU which produced ``x`` (the low-resolution map ``up``) to the gradient it sends there;
    ``grad_is_dz``: every reader of ``y`` does so for this launch's ReLU, which the backward then skips."""
    y, pooled, read = _conv2d_run(
        x, weight, bias, up, head_weight, head_bias, slopes, ksize, padding, up_mode, align_corners, join, activation,
        slope, lo, hi, pool, nchw_out, stride, in_scale, in_shift, in_activation, in_slope, in_lo, in_hi, in_slopes,
        norm_groups, norm_weight, norm_bias, norm_eps, norm_over_batch, up_weight, up_bias, up_scale, up_shift,
        up_activation, up_slope, up_lo, up_hi, up_slopes, head_map, x_applied=x_applied, up_applied=up_applied,
    )  # fmt: skip
    if read is not None:
        return y, x.new_empty(0), read.scale, read.shift, read.mean, read.var
    empty = x.new_empty(0, dtype=stat_dtype(x.dtype))
    return y, pooled if pooled is not None else x.new_empty(0), empty, empty.clone(), empty.clone(), empty.clone()


_conv2d_op = torch.library.custom_op("fastunet::conv2d_nhwc", mutates_args=(), schema=_CONV_SCHEMA)(_conv2d_launch)


@_conv2d_op.register_fake
def _conv2d_fake(
    x, weight, bias, up, head_weight, head_bias, slopes, ksize, padding, up_mode, align_corners, join, activation,
    slope, lo, hi, pool, nchw_out, stride=1, in_scale=None, in_shift=None, in_activation="none", in_slope=0.0,
    in_lo=0.0, in_hi=0.0, in_slopes=None, norm_groups=0, norm_weight=None, norm_bias=None, norm_eps=0.0,
    norm_over_batch=False, up_weight=None, up_bias=None, up_scale=None, up_shift=None, up_activation="none",
    up_slope=0.0, up_lo=0.0, up_hi=0.0, up_slopes=None, head_map=False, grad_is_dz=False, mask_x=False,
    mask_up=False, x_applied=None, up_applied=None,
):  # fmt: skip
    channels = head_weight.shape[1] if head_weight is not None else weight.shape[1]
    batch = x.shape[0]
    height, width = _conv_size(x, up, up_mode, join, ksize, padding, stride)
    if nchw_out:
        y = x.new_empty((batch, channels, height, width)).permute(0, 2, 3, 1)
    else:
        y = x.new_empty((batch, height, width, channels))
    pooled = x.new_empty((batch, height // 2, width // 2, weight.shape[1])) if pool else x.new_empty(0)
    if head_map:
        pooled = x.new_empty((batch, height, width, weight.shape[1]))
    stats = (batch, weight.shape[1]) if norm_groups else (0,)
    return (y, pooled, *(x.new_empty(stats, dtype=stat_dtype(x.dtype)) for _ in range(4)))


@torch.library.custom_op(
    "fastunet::conv_transpose2x2_nhwc",
    mutates_args=(),
    schema=f"(Tensor x, Tensor weight, Tensor? bias4, {_NORM_IN_ARGS}) -> Tensor",
)
def _conv_transpose_op(
    x,
    weight,
    bias4,
    in_scale=None,
    in_shift=None,
    in_activation="none",
    in_slope=0.0,
    in_lo=0.0,
    in_hi=0.0,
    in_slopes=None,
):
    """:func:`fastunet.kernels.conv_transpose2x2_nhwc` as a custom op: (N, 2h, 2w, C_out) contiguous NHWC."""
    return conv_transpose2x2_nhwc(
        x, weight, bias4, norm_in=_norm_in(in_scale, in_shift, in_activation, in_slope, in_lo, in_hi, in_slopes)
    )


@_conv_transpose_op.register_fake
def _conv_transpose_fake(
    x,
    weight,
    bias4,
    in_scale=None,
    in_shift=None,
    in_activation="none",
    in_slope=0.0,
    in_lo=0.0,
    in_hi=0.0,
    in_slopes=None,
):
    batch, height, width, _ = x.shape
    return x.new_empty((batch, 2 * height, 2 * width, weight.shape[1] // 4))


@torch.library.custom_op(
    "fastunet::upsample2x_nhwc",
    mutates_args=(),
    schema=f"(Tensor x, str mode, bool align_corners, {_NORM_IN_ARGS}) -> Tensor",
)
def _upsample_op(
    x,
    mode,
    align_corners,
    in_scale=None,
    in_shift=None,
    in_activation="none",
    in_slope=0.0,
    in_lo=0.0,
    in_hi=0.0,
    in_slopes=None,
):
    """:func:`fastunet.kernels.upsample.upsample2x_nhwc` as a custom op: (N, 2h, 2w, C) contiguous NHWC."""
    return upsample2x_nhwc(
        x, mode, align_corners, norm_in=_norm_in(in_scale, in_shift, in_activation, in_slope, in_lo, in_hi, in_slopes)
    )


@_upsample_op.register_fake
def _upsample_fake(
    x,
    mode,
    align_corners,
    in_scale=None,
    in_shift=None,
    in_activation="none",
    in_slope=0.0,
    in_lo=0.0,
    in_hi=0.0,
    in_slopes=None,
):
    batch, height, width, channels = x.shape
    return x.new_empty((batch, 2 * height, 2 * width, channels))


@torch.library.custom_op(
    "fastunet::normalize_nhwc", mutates_args=(), schema=f"(Tensor z, bool pool, {_NORM_IN_ARGS}) -> Tensor"
)
def _normalize_op(
    z, pool, in_scale=None, in_shift=None, in_activation="none", in_slope=0.0, in_lo=0.0, in_hi=0.0, in_slopes=None
):
    """:func:`fastunet.kernels.stats.normalize_nhwc` as a custom op: the normalized (and pooled) contiguous NHWC."""
    return normalize_nhwc(z, _norm_in(in_scale, in_shift, in_activation, in_slope, in_lo, in_hi, in_slopes), pool)


@_normalize_op.register_fake
def _normalize_fake(
    z, pool, in_scale=None, in_shift=None, in_activation="none", in_slope=0.0, in_lo=0.0, in_hi=0.0, in_slopes=None
):
    batch, height, width, channels = z.shape
    return z.new_empty((batch, height // 2, width // 2, channels) if pool else (batch, height, width, channels))


@torch.library.custom_op(
    "fastunet::normalize_pool_nhwc", mutates_args=(), schema=f"(Tensor z, {_NORM_IN_ARGS}) -> (Tensor, Tensor)"
)
def _normalize_pool_op(
    z, in_scale=None, in_shift=None, in_activation="none", in_slope=0.0, in_lo=0.0, in_hi=0.0, in_slopes=None
):
    """:func:`fastunet.kernels.stats.normalize_nhwc` with ``pool`` and ``full`` as a custom op: (the normalized map,
    its 2x2 max-pool), contiguous NHWC, from one pass. The eval forward's (no autograd registration: a forward whose
    backward runs on the kernels reads its maps through their norm instead, see :func:`run_plan`)."""
    read = _norm_in(in_scale, in_shift, in_activation, in_slope, in_lo, in_hi, in_slopes)
    return normalize_nhwc(z, read, True, full=True)


@_normalize_pool_op.register_fake
def _normalize_pool_fake(
    z, in_scale=None, in_shift=None, in_activation="none", in_slope=0.0, in_lo=0.0, in_hi=0.0, in_slopes=None
):
    batch, height, width, channels = z.shape
    return z.new_empty((batch, height, width, channels)), z.new_empty((batch, height // 2, width // 2, channels))


@torch.library.custom_op(
    "fastunet::pack_weights", mutates_args=(), schema="(Tensor[] sources, int[] spec, ScalarType dtype) -> Tensor"
)
def _pack_weights_op(sources, spec, dtype):
    """:func:`fastunet.kernels.pack.pack_weights` as a custom op: every piece of ``spec`` (conv, transposed-conv and
    head weights and biases) from ``sources``, cast to ``dtype``, in one flat buffer (one launch). Its gradient (one
    launch, :func:`fastunet.kernels.pack.pack_weights_adjoint`) is registered in :mod:`fastunet.training`."""
    return pack_weights(list(sources), list(spec), dtype)


@_pack_weights_op.register_fake
def _pack_weights_fake(sources, spec, dtype):
    _, total = pack_pieces(spec, [tuple(t.shape) for t in sources], dtype)
    return sources[0].new_empty((total,), dtype=dtype)


# Set while a forward whose backward runs on the kernels launches: every launch then goes through its custom op, whose
# registered autograd (fastunet.training) saves what the backward reads.
_DIFFERENTIABLE: contextvars.ContextVar[bool] = contextvars.ContextVar("fastunet_differentiable", default=False)


@contextlib.contextmanager
def differentiable():
    """Launch through the custom ops (and so through their registered autograd) inside the block, in eager mode too,
    where a plain inference launch skips the dispatcher."""
    token = _DIFFERENTIABLE.set(True)
    try:
        yield
    finally:
        _DIFFERENTIABLE.reset(token)


def is_traced() -> bool:
    """Whether TorchDynamo is tracing or a dispatch mode (FakeTensorMode, make_fx's proxy mode) is active: then
    the launches must go through the custom ops, and nothing built from the tensors may be cached."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def _direct() -> bool:
    """Whether a launch may skip the dispatcher: a dry run, or eager mode (see :func:`is_traced`) without autograd
    (see :func:`differentiable`)."""
    return is_dry_run() or not (is_traced() or _DIFFERENTIABLE.get())


# A map as the forward passes it on: the tensor, and how to read it (None: as stored; a NormIn: the stored pre-norm
# map of a conv followed by a norm with data statistics, read as act(z * scale + shift)).
_Map = tuple[torch.Tensor, NormIn | None]


def _conv_launch(
    x: _Map,
    stage: ConvStage,
    *,
    up: torch.Tensor | None = None,
    up_mode: str = "",
    join: str = "pad",
    pool: bool = False,
    head: ConvStage | None = None,
    nchw_out: bool = False,
    align_corners: bool = False,
    up_read: NormIn | None = None,
    up_conv: ConvStage | None = None,
    sink: list | None = None,
    head_map: bool = False,
    mask_x: bool = False,
    mask_up: bool = False,
    x_applied: torch.Tensor | None = None,
    up_applied: torch.Tensor | None = None,
) -> tuple[_Map, torch.Tensor | None]:
    """One conv launch (with a norm with data statistics after it: and the finalize launch): through the custom op
    while a compiler or a tracing mode is watching, else (eager calls, dry runs) straight to the op's own
    implementation, saving the dispatcher's ~10-20 us a launch. Returns (the output map, the pooled map: without
    ``pool``, None or an empty tensor). ``sink``: a list that gets ``(stage, NormIn)`` for a conv followed by a norm
    with data statistics. ``up_read``: how the launch reads the low-resolution map ``up`` it upsamples itself;
    ``up_conv``: the transposed conv that does it (``up_mode`` ``"transpose"``). ``head_map``: with ``head``, the
    launch also stores the activated map under the logits (returned in the pooled map's place). ``mask_x``,
    ``mask_up``: the backward applies the ReLU derivative of x's (up's) producer, a stage with ``grad_is_dz``;
    ``x_applied``, ``up_applied``: x (the low-resolution map its transposed conv reads) read through its norm,
    applied ahead (see :func:`_conv2d_launch`)."""
    act = stage.activation
    norm = stage.norm
    args = (
        x[0],
        stage.weight,
        stage.bias,
        up,
        head.weight if head is not None else None,
        head.bias if head is not None else None,
        stage.slopes,
        stage.ksize,
        stage.padding,
        up_mode,
        align_corners,
        join,
        act.kind,
        float(act.slope),
        float(act.lo),
        float(act.hi),
        pool,
        nchw_out,
        stage.stride,
        *_norm_in_args(x[1]),
        norm.groups if norm is not None else 0,
        norm.weight if norm is not None else None,
        norm.bias if norm is not None else None,
        float(norm.eps) if norm is not None else 0.0,
        norm.over_batch if norm is not None else False,
        up_conv.weight if up_conv is not None else None,
        up_conv.bias if up_conv is not None else None,
        *_norm_in_args(up_read),
        head_map,
        stage.grad_is_dz,
        mask_x,
        mask_up,
        x_applied,
        up_applied,
    )
    if _direct():  # the op's implementation itself, without the empty placeholder outputs the op must return
        y, pooled, second = _conv2d_run(*args)
        if norm is not None:
            scale, shift, mean, var = second.scale, second.shift, second.mean, second.var
    else:
        y, pooled, scale, shift, mean, var = torch.ops.fastunet.conv2d_nhwc(*args)
    if norm is None:
        return (y, None), pooled
    read = NormIn(scale, shift, act.kind, float(act.slope), float(act.lo), float(act.hi), stage.slopes, mean, var)
    if sink is not None:
        sink.append((stage, y, read))
    return (y, read), pooled


def _conv_transpose(x: _Map, stage: ConvStage) -> torch.Tensor:
    if _direct():
        return conv_transpose2x2_nhwc(x[0], stage.weight, stage.bias, norm_in=x[1])
    return torch.ops.fastunet.conv_transpose2x2_nhwc(x[0], stage.weight, stage.bias, *_norm_in_args(x[1]))


def _upsample(x: _Map, mode: str, align_corners: bool) -> torch.Tensor:
    if _direct():
        return upsample2x_nhwc(x[0], mode, align_corners, norm_in=x[1])
    return torch.ops.fastunet.upsample2x_nhwc(x[0], mode, align_corners, *_norm_in_args(x[1]))


def _normalize(x: _Map, pool: bool) -> torch.Tensor:
    """The map normalized and activated (and 2x2 max-pooled): one memory-bound launch."""
    if _direct():
        return normalize_nhwc(x[0], x[1], pool)
    return torch.ops.fastunet.normalize_nhwc(x[0], pool, *_norm_in_args(x[1]))


def _normalize_and_pool(x: _Map) -> tuple[torch.Tensor, torch.Tensor]:
    """(the map normalized and activated, its 2x2 max-pool): one memory-bound launch."""
    if _direct():
        return normalize_nhwc(x[0], x[1], True, full=True)
    return torch.ops.fastunet.normalize_pool_nhwc(x[0], *_norm_in_args(x[1]))


# ---------------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------------
def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, W, C) view, no copy."""
    return t.permute(0, 2, 3, 1)


def run_plan(
    plan: Plan, x: torch.Tensor, upsample_in_conv: bool = False, norm_sink: list | None = None
) -> torch.Tensor:
    """Eval-mode U-Net forward on the Triton kernels.

    Launches: 2 per encoder level (the second also writes the pooled map; with strided down-sampling the next
    level's first conv has stride 2 and there is no pool), 3 per decoder level (the upsampled map:
    a transposed conv, or a nearest/bilinear upsample; then two convs, the first reading the skip map and the
    upsampled map directly, no concatenation, joined as the layout says); one more per level for a 1x1 conv before
    the upsample (``decN.pre_conv``) or a pixel shuffle (its conv at low resolution, then the shuffle, both
    ``decN.up``); a 1x1 head runs in the last conv's epilogue when it fits, else (and a 3x3 head) as its own
    launch. A conv followed by a norm with data statistics (InstanceNorm, GroupNorm) stores the pre-norm map and its
    tile statistics, one small launch (same stage name) turns them into per-(image, channel) scale and shift; a
    conv (but a 1x1 head) or a transposed conv that reads the map next reads it applied, ``act(z * scale + shift)``,
    by one memory-bound normalize launch before it (stage ``<reader>.normalize``; ``encN.skip.normalize`` for a
    strided layout's skip, read by two convs), while the upsample kernel and a 1x1 head (then its own launch) apply
    it on load; a max-pool after such a norm is one normalize+activate+pool launch (``encN.pool``) that also stores
    the applied skip map. With ``upsample_in_conv`` (the forward whose backward runs on the kernels) the reader's
    launch gets the applied map next to the pre-norm one (``x_applied``, ``up_applied``: made under no_grad, not
    kept), so that autograd saves the pre-norm map only; the skip is applied again ahead of its decoder conv rather
    than kept from the pool's launch. Activations are
    NHWC; the input is read and the logits written in the caller's layout (NCHW, or channels_last for a
    channels_last input). Each launch's record carries its stage name (``enc0.conv1`` ...
    ``dec0.conv2``, ``decN.up``, ``head``) when the launch runs eagerly or in a dry run.

    ``upsample_in_conv``: a nearest/bilinear upsampling or a transposed conv is part of the decoder conv's launch
    (its custom op takes the low-resolution map, read through its norm where it has one, and writes the upsampled
    map first: the same two kernel launches, under the stage name ``decN.conv1``), so that autograd saves the
    low-resolution map only and the backward recomputes the upsampled one (see :mod:`fastunet.training`).
    ``norm_sink``: a list that gets ``(stage, NormIn)`` for each conv followed by a norm with data statistics (its
    statistics included: BatchNorm's running statistics follow them in training mode).
    """
    named = is_dry_run() or not is_traced()
    try:
        return _run_stages(plan, x, set_launch_stage if named else lambda _: None, upsample_in_conv, norm_sink)
    finally:
        if named:
            set_launch_stage(None)


def _run_stages(
    plan: Plan,
    x: torch.Tensor,
    stage: Callable[[str], None],
    upsample_in_conv: bool = False,
    norm_sink: list | None = None,
) -> torch.Tensor:
    _conv = functools.partial(_conv_launch, sink=norm_sink)
    depth = len(plan.decoders)
    # A norm with data statistics is applied by one memory-bound pass before a conv (or a transposed conv) reads
    # the map: the reader then loads it as stored (TMA on sm_90), where normalizing on load puts the operand through
    # registers and costs more issue slots than the pass's bytes. The eval forward passes the applied map on; a
    # forward whose backward runs on the kernels hands it to the conv's launch next to the pre-norm map
    # (``x_applied``), made out of autograd's sight, so that autograd keeps the pre-norm map only.
    apply_norms = not upsample_in_conv

    def applied(m: _Map, reader: str) -> _Map:
        """The eval forward's map as the (transposed) conv ``reader`` reads it."""
        if m[1] is None or not apply_norms:
            return m
        stage(f"{reader}.normalize")
        return (_normalize(m, False), None)

    def ahead(m: _Map, reader: str) -> torch.Tensor | None:
        """The training forward's map applied for the conv ``reader``'s loader (None: as stored, or eval)."""
        if m[1] is None or apply_norms:
            return None
        stage(f"{reader}.normalize")
        with torch.no_grad():
            return _normalize(m, False)

    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    logits_nchw = not channels_last

    def single_reader(producer: ConvStage | None, reader: str) -> None:
        if producer is not None and producer.grad_is_dz:
            raise ValueError(f"{reader} cannot apply its input's ReLU derivative (its producer has grad_is_dz set)")

    skips: list[_Map] = []
    features: _Map = (_nhwc(x), None)
    producer: ConvStage | None = None  # the conv whose output ``features`` is
    for level, (conv1, conv2) in enumerate(plan.encoders):
        tag = f"enc{level}" if level < depth else "bottleneck"
        # stride 2 where the layout down-samples by strided convs
        features = applied(features, f"{tag}.conv1")
        x_applied = ahead(features, f"{tag}.conv1")
        stage(f"{tag}.conv1")
        features, _ = _conv(features, conv1, mask_x=producer is not None and producer.grad_is_dz, x_applied=x_applied)
        features = applied(features, f"{tag}.conv2")
        x_applied = ahead(features, f"{tag}.conv2")
        stage(f"{tag}.conv2")
        producer = conv2
        if level == depth:
            features, _ = _conv(features, conv2, mask_x=conv1.grad_is_dz, x_applied=x_applied)
            continue
        single_reader(conv2, f"the skip {tag}.conv2 makes")  # its own backward applies its ReLU's derivative
        if plan.down == "stride":
            features, _ = _conv(features, conv2, mask_x=conv1.grad_is_dz, x_applied=x_applied)
            # read by the next level's strided conv and by the decoder's conv: applied once for both
            features = applied(features, f"{tag}.skip")
            skips.append(features)
        elif conv2.norm is None:
            skip, pooled = _conv(features, conv2, pool=True, mask_x=conv1.grad_is_dz, x_applied=x_applied)
            skips.append(skip)
            features = (pooled, None)
        else:  # the pool reads the normalized map: normalize, activate and pool in one pass
            skip, _ = _conv(features, conv2, mask_x=conv1.grad_is_dz, x_applied=x_applied)
            stage(f"{tag}.pool")
            if apply_norms:  # the same pass stores the applied skip for the decoder's conv
                full, pooled = _normalize_and_pool(skip)
                skips.append((full, None))
                features = (pooled, None)
            else:
                skips.append(skip)
                features = (_normalize(skip, pool=True), None)

    for level in reversed(range(depth)):
        conv1, conv2 = plan.decoders[level]
        up_stage = plan.ups[level]
        if up_stage.pre_conv is not None:
            features = applied(features, f"dec{level}.pre_conv")
            stage(f"dec{level}.pre_conv")
            single_reader(producer, f"dec{level}.pre_conv")
            features, _ = _conv(features, up_stage.pre_conv)
            producer = up_stage.pre_conv
        interpolated = up_stage.mode in ("nearest", "bilinear") and up_stage.conv is None
        if upsample_in_conv and (interpolated or up_stage.mode == "direct"):
            x_applied = ahead(skips[level], f"dec{level}.conv1")
            # the transposed conv in the launch reads the low-resolution map; the upsample kernel applies it on load
            up_applied = ahead(features, f"dec{level}.up") if up_stage.mode == "direct" else None
            stage(f"dec{level}.conv1")
            features, _ = _conv(
                skips[level], conv1, up=features[0], up_mode=up_stage.mode if interpolated else "transpose",
                join=plan.join, align_corners=up_stage.align_corners, up_read=features[1], up_conv=up_stage.conv,
                mask_up=producer.grad_is_dz, x_applied=x_applied, up_applied=up_applied,
            )  # fmt: skip
        else:
            if up_stage.mode == "direct" or up_stage.conv is not None:
                # a (transposed) conv reads it; the upsample kernel normalizes on load at no cost (memory-bound)
                features = applied(features, f"dec{level}.up")
            stage(f"dec{level}.up")
            single_reader(producer, f"dec{level}.up")
            if up_stage.mode == "direct":
                up = _conv_transpose(features, up_stage.conv)
            elif up_stage.conv is not None:  # pixel shuffle: the conv at low resolution, then the shuffle (+ blur)
                (shuffled, _), _ = _conv(features, up_stage.conv)
                up = _upsample((shuffled, None), up_stage.mode, False)
            else:
                up = _upsample(features, up_stage.mode, up_stage.align_corners)
            stage(f"dec{level}.conv1")
            features, _ = _conv(skips[level], conv1, up=up, up_mode="direct", join=plan.join)
        features = applied(features, f"dec{level}.conv2")
        x_applied = ahead(features, f"dec{level}.conv2")
        stage(f"dec{level}.conv2")
        if level == 0 and plan.fuse_head:
            (logits, _), _ = _conv(
                features,
                conv2,
                head=plan.head,
                nchw_out=logits_nchw,
                head_map=plan.head_map,
                mask_x=conv1.grad_is_dz,
                x_applied=x_applied,
            )
            return logits.permute(0, 3, 1, 2)
        features, _ = _conv(features, conv2, mask_x=conv1.grad_is_dz, x_applied=x_applied)
        producer = conv2
    if plan.head.ksize > 1:  # a 1x1 head reads its few classes' worth of columns: normalizing on load is cheaper
        features = applied(features, "head")
    stage("head")
    (logits, _), _ = _conv(features, plan.head, nchw_out=logits_nchw, mask_x=producer.grad_is_dz)
    return logits.permute(0, 3, 1, 2)


def _own_nodes(tensors: list) -> list:
    """Each tensor that needs a gradient as a view of itself: a graph node of its own, for an op's create-graph
    backward to recompute its math from and differentiate it with respect to.

    ``torch.autograd.grad`` with respect to the saved inputs themselves would give the total derivative: where one
    input is an ancestor of another (a decoder conv's low-resolution map comes from the skip's producer, through the
    pool and the deeper levels; the map after a norm's read and its scale and shift are outputs of one launch), the
    paths from one back to the other would be run and their gradient added to this op's own, counted again when
    autograd goes on past the op. A view's node is downstream of the input, so only this op's math leads to it."""
    return [t.view_as(t) if t is not None and t.requires_grad else t for t in tensors]


class _TritonForwardReferenceBackward(torch.autograd.Function):
    """Output of the Triton forward; backward differentiates the layout's eval-mode math (:func:`layout_forward`),
    recomputed on the input and on the very tensors the forward read (autograd's version check refuses any of them
    edited in place since). Nothing of the live modules is read or switched, so other threads may run or train the
    model meanwhile, and double backward works as the reference's does."""

    @staticmethod
    def forward(ctx, plan: Plan, slots: tuple, constants: dict, x: torch.Tensor, *tensors: torch.Tensor):
        device_type = x.device.type
        ctx.layout, ctx.slots, ctx.constants = plan.layout, slots, constants
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.save_for_backward(x, *tensors)
        return run_plan(plan, x)

    @staticmethod
    def backward(ctx, grad_logits: torch.Tensor):
        x, *tensors = ctx.saved_tensors
        # Under create_graph=True autograd runs this with grad mode on: the recompute's graph is kept, so second
        # derivatives (a gradient penalty, say) flow to the input and the parameters like the reference's.
        create_graph = torch.is_grad_enabled()
        device_type, autocast_on, autocast_dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
            # Views of the input and the tensors: nodes of their own, so that only this forward's math is
            # differentiated. With respect to the saved tensors themselves, an input computed from one of the
            # parameters would have its own history run again here and that gradient added twice.
            source, *own = _own_nodes([x if x.requires_grad else x.detach(), *tensors])
            values = dict(ctx.constants)
            values.update((key, own[index]) for key, index in ctx.slots)
            logits = layout_forward(ctx.layout, source, values)
            wanted = [t for t in (source, *own) if t.requires_grad]
            grads = iter(torch.autograd.grad(logits, wanted, grad_logits, create_graph=create_graph))
        grad_x = next(grads) if x.requires_grad else None
        return (None, None, None, grad_x, *(next(grads) if t.requires_grad else None for t in tensors))


def unet_forward(plan: Plan, x: torch.Tensor, needs_grad: bool) -> torch.Tensor:
    """Run the plan; with ``needs_grad``, attach the gradients of the plan's layout math recomputed in PyTorch (see
    :class:`_TritonForwardReferenceBackward`). For a backward on the kernels see :func:`unet_forward_kernel_grad`."""
    if not needs_grad:
        return run_plan(plan, x)
    # Each tensor is handed to autograd once, however many modules read it (tied weights get one summed gradient).
    tensors: list[torch.Tensor] = []
    index: dict[int, int] = {}
    slots, constants = [], {}
    for key, value in layout_values(plan.layout).items():
        if isinstance(value, torch.Tensor):
            if id(value) not in index:
                index[id(value)] = len(tensors)
                tensors.append(value)
            slots.append((key, index[id(value)]))
        else:
            constants[key] = value
    return _TritonForwardReferenceBackward.apply(plan, tuple(slots), constants, x, *tensors)


def unet_forward_kernel_grad(
    layout: Layout, x: torch.Tensor, dtype: torch.dtype, training: bool = False, packs=None
) -> torch.Tensor:
    """The forward of ``layout`` whose backward runs on the kernels (:mod:`fastunet.training`): the plan's weights
    packed from the parameters by one differentiable launch (none while ``packs``, a
    :class:`fastunet.training.PackCache`, holds them for unchanged parameters), every launch through its custom op
    and that op's registered autograd. ``training``: BatchNorms in training mode normalize with the batch's
    statistics and update their running ones."""
    from fastunet.training import build_training_plan, update_running_stats

    plan, batch_norms = build_training_plan(layout, dtype, x.device, training, packs)
    sink: list = []
    if is_traced():  # the launches go through the custom ops already
        logits = run_plan(plan, x, upsample_in_conv=True, norm_sink=sink)
    else:
        with differentiable():
            logits = run_plan(plan, x, upsample_in_conv=True, norm_sink=sink)
    if batch_norms:
        update_running_stats(batch_norms, sink)
    return logits
