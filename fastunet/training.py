"""Gradients on the kernels: the backward of each fused launch, registered with ``torch.library``.

Every launch of the forward is a custom op (:mod:`fastunet.ops`); this module gives three of them a backward made
of Triton launches and registers it with :func:`torch.library.register_autograd`, so that eager autograd and
``torch.compile`` (which traces the backward ops like the forward ones) both run it:

* ``fastunet::conv2d_nhwc`` (a 3x3 conv with bias and ReLU, optionally pooled; a decoder conv reading the skip and
  the upsampled map; the 1x1 head): the gradient arriving at the activated map ``y`` and at the pooled map is
  turned into ``dZ = relu'(y) * (g_y + unpool(g_pooled))`` by one memory-bound launch that recomputes each window's
  maximum from ``y`` (PyTorch's rule: the first maximum in row-major order; a NaN beats any number, the last NaN
  wins). A ReLU conv whose one reader is a conv launch of the plan (``grad_is_dz``: every conv but the encoders'
  second ones, where no norm follows) has no such launch: that reader's backward applies ``where(y <= 0, 0, g)`` in
  its own launch's epilogue (its input gradient, or the upsample adjoint), so the gradient arrives as dZ. Then
  ``dW = A^T dZ`` and the
  bias gradient (deterministic split-K, :func:`fastunet.kernels.conv_grad.conv2d_weight_grad_nhwc`; one launch per
  source for the decoder conv) and ``dX``, the forward conv kernel itself run on ``dZ`` with the taps flipped and
  the channels swapped (:func:`fastunet.kernels.conv_grad.conv2d_input_grad_nhwc`; for the 3x3 stride-2 down-sampling
  conv one launch of four output phases, each summing only its own taps of ``dZ``, and a weight gradient reading
  the input at every other pixel). The decoder conv's input
  gradient comes out as one map of ``[skip | up]`` channels; the skip's part goes back to its producer as a view.
  In a training forward the decoder conv's launch takes the low-resolution map (read through its norm where it has
  one) and makes the upsampled map itself (an interpolation, or the transposed conv, whose weight and bias are then
  the op's inputs too); its backward writes that map again for the weight gradient and takes the up part of the
  input gradient through the two launches below to the low-resolution map, its norm and the transposed conv's
  parameters. A 1x1 head fused into the last conv (``head_map``: that launch also stores the map under the logits)
  comes first in its backward: one pass over the map (``fastunet::head_backward``,
  :func:`fastunet.kernels.backward.head_backward_nhwc`) gives the map's gradient and the head's dW and db, summed in
  a fixed order; the conv's own backward then takes the map's gradient.
* ``fastunet::upsample2x_nhwc`` (nearest, bilinear): the adjoint as a gather, one program per low-resolution tile
  in a fixed order (:func:`fastunet.kernels.backward.upsample2x_adjoint_nhwc`): deterministic, unlike eager
  PyTorch's atomics.
* ``fastunet::conv_transpose2x2_nhwc``: its input gradient on the conv kernel (a stride-2 conv of ``dY``), its
  weight and bias gradients as four weight-gradient launches, one per sub-pixel.

What the backward reads is what autograd saves for these ops: each op's input and its activated (or pre-norm)
output (the next op's input: one tensor, saved once), the pooled maps, the norms' scale, shift and statistics. No
upsampled map, concatenation or argmax index is kept.

Which forwards take this path: :func:`kernel_training_blocker` says, for a layout, what would keep it on the
reference math (activations other than ReLU in a conv's epilogue, valid convs, the crop join, an InstanceNorm
tracking running statistics in training mode, ...; see the README's gradients section). The packed weights come
from the parameters by one launch (``fastunet::pack_weights``: every conv, transposed-conv and head weight and bias,
cast and laid out into one flat buffer) whose adjoint, one launch too, gives the parameters their gradients in their
own dtype (fp32 masters under autocast); :class:`PackCache` keeps the pack while the parameters are unchanged. A
conv whose norm folds (running statistics) is folded, packed and cast by torch ops instead.

Second derivatives (``create_graph=True``): each op's backward then recomputes its own PyTorch math from views of
its saved inputs (:func:`_own_nodes`) and differentiates it with the graph kept, so higher-order gradients are the
reference's, through the norms' statistics too.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from fastunet.kernels._common import alloc, current_launch_stage, is_dry_run, set_launch_stage, stat_dtype
from fastunet.kernels.backward import center_pad_offsets
from fastunet.kernels.conv import MAX_HEAD_CHANNELS, MAX_HEAD_CLASSES
from fastunet.kernels.pack import (
    CONV,
    TRANSPOSE,
    VECTOR,
    ZEROS,
    pack_pieces,
    pack_weights,
    pack_weights_adjoint,
    source_shapes,
)
from fastunet.kernels.stats import NormIn
from fastunet.ops import (
    Act,
    ConvSpec,
    ConvStage,
    Layout,
    NormStage,
    Plan,
    UpStage,
    _own_nodes,
    apply_act,
    conv_padding,
    is_traced,
    norm_kind,
    unfused_reason,
)

__all__ = ["PackCache", "build_training_plan", "kernel_training_blocker"]


# ---------------------------------------------------------------------------------------------------------------
# Which layouts train on the kernels
# ---------------------------------------------------------------------------------------------------------------
def effective_norm(norm: nn.Module | None, training: bool) -> str | None:
    """How a norm acts in a forward in ``training`` mode (or not): ``"folds"`` (running statistics), ``"batch"``
    (BatchNorm in training mode: per-channel statistics of the batch, running statistics updated), ``"instance"``,
    ``"group"``, ``"instance-tracking"`` (an InstanceNorm2d that tracks running statistics, in training mode), None.
    """
    if isinstance(norm, nn.BatchNorm2d) and ((training and norm.training) or not norm.track_running_stats):
        return "batch"
    kind = norm_kind(norm)
    if kind == "folds" and isinstance(norm, nn.InstanceNorm2d) and training and norm.training:
        return "instance-tracking"
    return kind


# What the backward kernels take after a conv: every activation with a norm with data statistics before it (the
# consumer side applies it, kernels/norm_grad.py), ReLU or none in the conv's epilogue otherwise.
_NORM_ACTIVATIONS = ("relu", "leaky_relu", "clamp", "none")
_EPILOGUE_ACTIVATIONS = ("relu", "none")


def kernel_training_blocker(layout: Layout, training: bool) -> str | None:
    """Why the kernels' backward cannot run a forward of ``layout`` (the first reason), or None when it can.

    ``training``: the forward is in training mode (a BatchNorm there normalizes with batch statistics)."""
    reason = unfused_reason(layout)
    if reason is not None:
        return reason
    if layout.join == "crop":
        return "the 'crop' join (valid convs) has no backward kernels yet (the zero-pad and replicate joins have)"
    for name, spec in layout.conv_specs():
        kind = effective_norm(spec.norm, training)
        act = spec.activation.kind
        if kind == "instance-tracking":
            return f"{name}: an InstanceNorm2d tracking running statistics has no training-mode backward kernels yet"
        allowed = _EPILOGUE_ACTIVATIONS if kind in (None, "folds") else _NORM_ACTIVATIONS
        if act not in allowed:
            where = "after a norm with data statistics" if kind not in (None, "folds") else "in a conv's epilogue"
            return f"{name}: the {act} activation {where} has no backward kernels yet ({', '.join(allowed)} have)"
        # A stride 2 sits only where unfused_reason allows it: the 3x3 padding-1 first conv of a deeper level.
        if conv_padding(spec.conv) != 1 or tuple(spec.conv.stride) not in ((1, 1), (2, 2)):
            return f"{name}: only 3x3 'same' convs and 3x3 stride-2 padding-1 down-sampling convs have backward kernels"
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


class PackCache:
    """The packed weights of a module's latest training forward (:func:`build_training_plan`), reused while every
    tensor they were packed from is the same tensor, at the same address, with the same version counter, dtype,
    shape, strides and ``requires_grad``, for the same compute dtype and device: a forward after an optimizer step
    (versions bumped) repacks in one launch, a forward on unchanged parameters launches nothing for them. The entry
    keeps the pieces and their autograd node (which saves no tensor: any number of backwards may run through it).

    Pickles and deep copies of a cache are empty caches."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entry: tuple | None = None  # (key, weak references to the sources, pieces)

    def __reduce__(self):
        return (type(self), ())

    def __len__(self) -> int:
        return 0 if self._entry is None else 1

    def clear(self) -> None:
        with self._lock:
            self._entry = None

    def get(self, key: tuple) -> tuple[torch.Tensor, ...] | None:
        entry = self._entry
        if entry is None or entry[0] != key or any(ref() is None for ref in entry[1]):
            return None
        return entry[2]

    def put(self, key: tuple, sources: list[torch.Tensor], pieces: tuple[torch.Tensor, ...]) -> None:
        with self._lock:
            self._entry = (key, tuple(weakref.ref(t) for t in sources), pieces)


def _pack_key(sources: list[torch.Tensor], spec: tuple, dtype: torch.dtype, device: torch.device) -> tuple | None:
    """What packed weights are valid for (see :class:`PackCache`); None where they must not be cached: a traced or
    dry-run forward, inference tensors (no version counter)."""
    if is_traced() or is_dry_run() or any(t.is_inference() for t in sources):
        return None
    facts = tuple(
        (id(t), t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape), t.stride(), t.requires_grad)
        for t in sources
    )
    return (spec, dtype, device, torch.is_grad_enabled(), facts)


class _PackedWeights(torch.autograd.Function):
    """The pieces of one ``fastunet::pack_weights`` launch (views of its flat buffer: each conv's packed weight and
    bias) with the gradients of every source from all the pieces' gradients at once, by one
    ``fastunet::pack_weights_backward`` launch (no concatenation of the pieces' gradients first). Under
    ``create_graph`` the backward is the adjoint's PyTorch math (differentiable)."""

    @staticmethod
    def forward(ctx, spec: tuple, dtype: torch.dtype, note: str, *sources: torch.Tensor):
        shapes = [tuple(t.shape) for t in sources]
        ctx.spec, ctx.shapes, ctx.source_dtype = spec, shapes, sources[0].dtype
        ctx.stage = current_launch_stage()
        ctx.set_materialize_grads(False)
        if is_traced() or (sources[0].is_meta and not is_dry_run()):  # fake tensors, or meta ones: the fake op
            flat = torch.ops.fastunet.pack_weights(list(sources), list(spec), dtype)
        else:  # eager or dry run: the launcher itself (with the note for its launch record)
            flat = pack_weights(list(sources), list(spec), dtype, note=note)
        pieces, _ = pack_pieces(spec, shapes, dtype)
        return tuple(flat.narrow(0, start, math.prod(shape)).view(shape) for start, shape in pieces)

    @staticmethod
    def backward(ctx, *grads):
        found = _pack_adjoint(list(grads), ctx.spec, ctx.shapes, ctx.source_dtype, ctx.stage)
        needs = ctx.needs_input_grad[3:]
        return (None, None, None, *(g if need else None for g, need in zip(found, needs, strict=True)))


def _flat_shapes(shapes) -> list[int]:
    return [v for shape in shapes for v in (len(shape), *shape)]


def _pack_adjoint(grads: list, spec: tuple, shapes: list, dtype: torch.dtype, stage: str | None) -> list:
    """Each source's gradient (in ``dtype``, the sources' own) from the pieces' gradients (None: zero): one launch,
    or under ``create_graph`` the adjoint's PyTorch math."""
    grads = [g.contiguous() if g is not None else None for g in grads]
    if all(g is None for g in grads):
        return [None] * len(shapes)
    if torch.is_grad_enabled():
        return _pack_adjoint_math(grads, spec, shapes, dtype)
    previous = current_launch_stage()
    set_launch_stage(f"{stage}.backward" if stage else None)
    try:
        flat = _backward_op("pack_weights_backward")(grads, list(spec), _flat_shapes(shapes), dtype)
    finally:
        set_launch_stage(previous)
    out, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(flat.narrow(0, start, size).view(shape))
        start += size
    return out


def _pack_adjoint_math(grads: list, spec: tuple, shapes: list, dtype: torch.dtype) -> list:
    """The adjoint of the packing in PyTorch ops (a permute, a channel rotation, a sum over a bias's repeats)."""
    like = next(g for g in grads if g is not None)
    out, sources = [], iter(shapes)
    for index in range(0, len(spec), 2):
        kind, argument = spec[index], spec[index + 1]
        if kind == ZEROS:
            continue
        shape = next(sources)
        grad = grads[index // 2]
        if grad is None:
            out.append(like.new_zeros(shape, dtype=dtype))
            continue
        if kind == CONV:
            c_out, c_in, kh, kw = shape
            grad = grad.view(kh, kw, c_in, c_out)
            if argument:  # packed channel c holds source channel (c + argument) % c_in
                grad = torch.cat([grad[:, :, c_in - argument :], grad[:, :, : c_in - argument]], dim=2)
            grad = grad.permute(3, 2, 0, 1)
        elif kind == TRANSPOSE:
            grad = grad.view(shape[0], 2, 2, shape[1]).permute(0, 3, 1, 2)
        else:
            grad = grad.view(argument, shape[0]).sum(0)
        out.append(grad.to(dtype))
    return out


def _pack_backward_impl(grads, spec, shapes, dtype):
    """:func:`fastunet.kernels.pack.pack_weights_adjoint` with the custom op's arguments."""
    return pack_weights_adjoint(list(grads), list(spec), source_shapes(spec, shapes), dtype)


_pack_backward_op = torch.library.custom_op(
    "fastunet::pack_weights_backward",
    mutates_args=(),
    schema="(Tensor?[] grads, int[] spec, int[] shapes, ScalarType dtype) -> Tensor",
)(_pack_backward_impl)


@_pack_backward_op.register_fake
def _pack_backward_fake(grads, spec, shapes, dtype):
    like = next(g for g in grads if g is not None)
    return like.new_empty((sum(math.prod(shape) for shape in source_shapes(spec, shapes)),), dtype=dtype)


def _pack_op_setup(ctx, inputs, output):
    sources, spec, _ = inputs
    ctx.spec, ctx.shapes, ctx.source_dtype = tuple(spec), [tuple(t.shape) for t in sources], sources[0].dtype
    ctx.packed_dtype = output.dtype
    ctx.stage = current_launch_stage()


def _pack_op_autograd(ctx, grad):
    """The gradient of ``fastunet::pack_weights`` called on its own: the flat gradient cut into its pieces (views),
    then the adjoint launch."""
    pieces, _ = pack_pieces(ctx.spec, ctx.shapes, ctx.packed_dtype)
    grads = [grad.narrow(0, start, math.prod(shape)).view(shape) for start, shape in pieces]
    return _pack_adjoint(grads, ctx.spec, ctx.shapes, ctx.source_dtype, ctx.stage), None, None


class _Packer:
    """The conv, transposed-conv and head weights and biases of a training plan, collected while the stages are
    built and packed together by one launch (:class:`_PackedWeights`); each stage's tensors are filled in after."""

    def __init__(self) -> None:
        self.spec: list[int] = []
        self.sources: list[torch.Tensor] = []
        self.fills: list[tuple[ConvStage, str, int]] = []  # (stage, attribute, piece)

    def _piece(self, kind: int, argument: int, source: torch.Tensor | None) -> int:
        self.spec += [kind, argument]
        if source is not None:
            self.sources.append(source)
        return len(self.spec) // 2 - 1

    def conv(self, stage: ConvStage, conv: nn.Conv2d, rotation: int = 0) -> None:
        self.fills.append((stage, "weight", self._piece(CONV, rotation, conv.weight)))
        bias = conv.bias
        piece = self._piece(VECTOR, 1, bias) if bias is not None else self._piece(ZEROS, conv.out_channels, None)
        self.fills.append((stage, "bias", piece))

    def transpose(self, stage: ConvStage, conv: nn.ConvTranspose2d) -> None:
        self.fills.append((stage, "weight", self._piece(TRANSPOSE, 0, conv.weight)))
        bias = conv.bias
        piece = self._piece(VECTOR, 4, bias) if bias is not None else self._piece(ZEROS, 4 * conv.out_channels, None)
        self.fills.append((stage, "bias", piece))

    def run(self, dtype: torch.dtype, device: torch.device, packs: PackCache | None, note: str) -> None:
        if not self.sources:
            return
        spec = tuple(self.spec)
        sources = [t if t.device == device else t.to(device) for t in self.sources]
        key = _pack_key(sources, spec, dtype, device) if packs is not None else None
        pieces = packs.get(key) if key is not None else None
        if pieces is None:
            named = is_dry_run() or not is_traced()
            previous = current_launch_stage()
            if named:
                set_launch_stage("pack")
            try:
                pieces = _PackedWeights.apply(spec, dtype, note, *sources)
            finally:
                if named:
                    set_launch_stage(previous)
            if key is not None:
                packs.put(key, sources, pieces)
        for stage, attribute, piece in self.fills:
            setattr(stage, attribute, pieces[piece])


def build_training_plan(
    layout: Layout,
    dtype: torch.dtype,
    device: torch.device,
    training: bool = False,
    packs: PackCache | None = None,
) -> tuple[Plan, dict[int, nn.BatchNorm2d]]:
    """The plan of ``layout`` (see :func:`fastunet.ops.build_plan`) whose tensors are differentiable functions of
    the modules' parameters, in ``dtype``: every conv, transposed-conv and head weight and bias packed and cast by
    one launch (``fastunet::pack_weights``, stage ``pack``) whose registered adjoint, one launch too, gives each
    parameter its gradient in the parameter's dtype; a conv with a BatchNorm (or tracking InstanceNorm) that folds
    (running statistics) is folded, packed and cast by torch ops instead (the fold is the launch record's note);
    the affine parameters of a norm with data statistics stay fp32 (``.float()``, the parameters themselves when
    they are fp32). A 1x1 head is fused into the last conv's epilogue where the eval plan's would be (no norm with
    data statistics on that conv, its channels and classes within the fused head's limits), and that launch also
    stores the activated map under the logits (``head_map``): the head's weight gradient reads it. ``training``:
    BatchNorms in training mode normalize with batch statistics. ``packs``: reuse the packed weights while their
    parameters are unchanged (:class:`PackCache`).

    Returns the plan and, for each stage with a batch-statistics BatchNorm, ``{id(stage): module}`` (whose running
    statistics follow the batch's). Raises ``ValueError`` where :func:`kernel_training_blocker` has a reason."""
    reason = kernel_training_blocker(layout, training)
    if reason is not None:
        raise ValueError(f"the backward kernels cannot run this layout: {reason}")
    batch_norms: dict[int, nn.BatchNorm2d] = {}
    packer = _Packer()
    names = {id(spec): name for name, spec in layout.conv_specs()}
    folded: list[str] = []

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    def stat(t: torch.Tensor | None) -> torch.Tensor | None:  # fp32; fp64 for a float64 plan
        return t.to(device=device, dtype=stat_dtype(dtype)) if t is not None else None

    def stage(spec: ConvSpec, skip_after: int = 0) -> ConvStage:
        kind = effective_norm(spec.norm, training)
        norm = None
        if kind in ("batch", "instance", "group"):
            module = spec.norm
            groups = module.num_groups if isinstance(module, nn.GroupNorm) else spec.conv.out_channels
            affine = module.weight is not None and module.bias is not None
            norm = NormStage(
                int(groups),
                float(module.eps),
                stat(module.weight) if affine else None,
                stat(module.bias) if affine else None,
                over_batch=kind == "batch",
            )
        stride = int(spec.conv.stride[0])  # 1, or 2 (kernel_training_blocker checked)
        conv_stage = ConvStage(None, None, 3, 1, spec.activation, None, stride, norm)
        if kind == "folds":  # running statistics fold into the weight: torch ops, differentiable to the norm too
            weight, bias = _fold(spec.conv, spec.norm)
            if skip_after:  # cat([up, skip]): the kernel reads the skip's channels first
                weight = torch.cat([weight[:, skip_after:], weight[:, :skip_after]], dim=1)
            conv_stage.weight, conv_stage.bias = cast(_pack(weight)), cast(bias)
            folded.append(names.get(id(spec), "a conv"))
        else:
            packer.conv(conv_stage, spec.conv, skip_after)
        if kind == "batch":
            batch_norms[id(conv_stage)] = spec.norm
        return conv_stage

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
            transposed = ConvStage(None, None)
            packer.transpose(transposed, up.conv)
            ups.append(UpStage("direct", False, transposed))
        else:
            ups.append(UpStage(up.mode, up.align_corners))
    head = ConvStage(None, None, 1, 0, Act("none"))
    packer.conv(head, layout.head)
    encoders = [double(pair) for pair in layout.encoders]
    # A ReLU conv whose one reader is a conv launch of this plan that applies the ReLU's derivative to the gradient
    # it sends back (the next conv's input gradient, the decoder's upsample adjoint or transposed conv's input
    # gradient, the head's): its backward then takes the gradient as dZ, with no launch of its own for it. Every
    # encoder's first conv, the bottleneck's two and the decoders'. An encoder's second conv keeps its own backward
    # launch (routing the pooled gradient, adding the skip's): the derivative costs nothing more there.
    for conv in [pair[0] for pair in encoders] + [encoders[-1][1]] + [conv for pair in decoders for conv in pair]:
        conv.grad_is_dz = conv.norm is None and conv.activation.kind == "relu" and conv.slopes is None
    note = ""
    if folded:
        note = f"folded by torch ops (a norm with running statistics folds into them): {', '.join(folded)}"
    packer.run(dtype, device, packs, note)
    fuse_head = (
        layout.head.in_channels <= MAX_HEAD_CHANNELS
        and layout.head.out_channels <= MAX_HEAD_CLASSES
        and (not decoders or decoders[0][1].norm is None)
    )
    plan = Plan(
        encoders=encoders,
        ups=ups,
        decoders=decoders,
        head=head,
        fuse_head=fuse_head,
        layout=layout,
        join=layout.join,
        down=layout.down,
        head_map=fuse_head,
    )
    return plan, batch_norms


def update_running_stats(batch_norms: dict[int, nn.BatchNorm2d], sink: list) -> None:
    """BatchNorm's running statistics after a training-mode forward, as torch updates them: the batch's mean and
    unbiased variance blended in with ``momentum`` (or the cumulative average where it is None),
    ``num_batches_tracked`` counted. ``sink``: the forward's ``(stage, map, NormIn)`` list."""
    with torch.no_grad():
        for stage, z, read in sink:
            module = batch_norms.get(id(stage))
            if module is None or not module.track_running_stats or module.running_mean is None:
                continue
            count = z.shape[0] * z.shape[1] * z.shape[2]
            module.num_batches_tracked.add_(1)
            factor = module.momentum
            if factor is None:
                factor = 1.0 / float(module.num_batches_tracked)
            mean, var = read.mean[0].to(module.running_mean.dtype), read.var[0].double()
            unbiased = (var * count / max(count - 1, 1)).to(module.running_var.dtype)
            module.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
            module.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)


# ---------------------------------------------------------------------------------------------------------------
# Backward ops: the kernels, as custom ops so that torch.compile traces the backward too
# ---------------------------------------------------------------------------------------------------------------
# A map read through its norm, as the backward ops take it: scale, shift, the activation after the norm.
_READ_ARGS = (
    'Tensor? in_scale=None, Tensor? in_shift=None, str in_activation="none", float in_slope=0.0, float in_lo=0.0, '
    "float in_hi=0.0"
)

_UP_READ_ARGS = _READ_ARGS.replace("in_", "up_")


def _read_of(in_scale, in_shift, in_activation, in_slope, in_lo, in_hi) -> NormIn | None:
    if in_scale is None:
        return None
    return NormIn(in_scale, in_shift, in_activation, float(in_slope), float(in_lo), float(in_hi))


def _read_backward(grad_a: torch.Tensor, z: torch.Tensor, read: NormIn):
    """(dz, grad_scale, grad_shift) of a map read as ``act(z * scale + shift)`` from the read values' gradient."""
    from fastunet.kernels.norm_grad import norm_input_backward_nhwc

    return norm_input_backward_nhwc(grad_a, z, read.scale, read.shift, read.activation, read.slope, read.lo, read.hi)


def _read_grad_apart(stride: int) -> bool:
    """Whether the conv backward op returns the gradient of a map read through its norm as a tensor of its own
    (``dx_read``: the strided conv's polyphase input gradient, then a launch through the read) rather than in the
    input gradient's first channels (stride 1: the input gradient's epilogue goes through the read)."""
    return stride != 1


def _head_read(ksize, up, read, norm_groups, activation, pool, stride, c_in, c_out) -> bool:
    """Whether a conv's backward is a 1x1 head's that read its map through a norm, which
    :func:`fastunet.kernels.backward.head_backward_sums_nhwc` takes in one pass over the map (its limits: 128
    channels, 64 classes)."""
    from fastunet.kernels.backward import HEAD_MAX_CHANNELS, HEAD_MAX_CLASSES

    plain = up is None and not norm_groups and activation == "none" and not pool and stride == 1
    return ksize == 1 and read is not None and plain and c_in <= HEAD_MAX_CHANNELS and c_out <= HEAD_MAX_CLASSES


def _materialized(x: torch.Tensor, read: NormIn | None) -> torch.Tensor:
    """The values a launch read from ``x``: ``x`` itself, or ``act(x * scale + shift)`` written once (a weight
    gradient's operand; the forward's launch read it applied, on load or ahead)."""
    from fastunet.kernels.stats import normalize_nhwc

    return x if read is None else normalize_nhwc(x, read, False)


_CONV_BACKWARD_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor? up, Tensor? y, Tensor? grad_y, Tensor? grad_pooled, int ksize, int padding, "
    "str activation, bool pool, bool has_bias, bool need_input, str up_mode, bool align_corners, str join, "
    f"{_READ_ARGS}, Tensor? grad_scale=None, Tensor? grad_shift=None, Tensor? stat_mean=None, "
    "Tensor? stat_var=None, Tensor? norm_weight=None, int norm_groups=0, float norm_eps=0.0, "
    f"bool norm_over_batch=False, Tensor? up_weight=None, Tensor? up_bias=None, {_UP_READ_ARGS}, int stride=1, "
    "bool grad_is_dz=False, bool mask_x=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def _conv_backward(
    x, weight, up, y, grad_y, grad_pooled, ksize, padding, activation, pool, has_bias, need_input, up_mode,
    align_corners, join, in_scale=None, in_shift=None, in_activation="none", in_slope=0.0, in_lo=0.0, in_hi=0.0,
    grad_scale=None, grad_shift=None, stat_mean=None, stat_var=None, norm_weight=None, norm_groups=0, norm_eps=0.0,
    norm_over_batch=False, up_weight=None, up_bias=None, up_scale=None, up_shift=None, up_activation="none",
    up_slope=0.0, up_lo=0.0, up_hi=0.0, stride=1, grad_is_dz=False, mask_x=False,
):  # fmt: skip
    """The gradients of one conv launch: ``(d_in, dx_read, dW, db, d_in_scale, d_in_shift, d_norm_weight,
    d_norm_bias)``.

    ``d_in``: the input gradient over the conv's input frame with the channels of both sources (``[x | up]``;
    empty unless ``need_input``); where x was read through its norm (``in_scale``), ``dx_read`` is x's own gradient
    and the norm's scale and shift get theirs. dW packed and db in fp32. With a norm with data statistics after the
    conv (``norm_groups``), ``y`` is the stored pre-norm map and the gradients of its scale and shift reach it
    through the statistics (and the norm's affine parameters get theirs). With ``up_mode`` nearest, bilinear or
    transpose, ``up`` is the low-resolution map (read through its norm where ``up_scale`` is given; the transposed
    conv's packed ``up_weight`` and ``up_bias``): the upsampled map the forward read is written again for the weight
    gradient, never kept between forward and backward. ``d_in``'s ``up`` channels are the gradient of that
    upsampled map; the caller takes it on to the low-resolution map. ``stride`` 2 (the 3x3 padding-1 down-sampling
    conv, one source): ``y`` and the gradients are ceil(H / 2) x ceil(W / 2), the weight gradient reads x at every
    other pixel and the input gradient is the polyphase launch of the conv kernel. ``grad_is_dz``: every reader of
    ``y`` applied this conv's ReLU derivative to the gradient it sent back, so ``grad_y`` is dZ itself (no launch).
    ``mask_x`` (one source, x not read through a norm): x is the output of a ReLU (its producer has ``grad_is_dz``);
    the input gradient's launch applies that ReLU's derivative in its epilogue (``where(x <= 0, 0, dx)``). Through a
    read at stride 1 the input gradient runs first and also writes the values the forward read, the weight
    gradient's operand; a 1x1 head read through its norm takes its whole backward in one pass over x
    (:func:`fastunet.kernels.backward.head_backward_sums_nhwc`)."""
    from fastunet.kernels.backward import activation_pool_backward_nhwc, head_backward_sums_nhwc
    from fastunet.kernels.conv import conv_transpose2x2_nhwc
    from fastunet.kernels.conv_grad import conv2d_input_grad_nhwc, conv2d_weight_grad_nhwc
    from fastunet.kernels.norm_grad import norm_coefficients, norm_stats_backward_nhwc
    from fastunet.kernels.upsample import upsample2x_nhwc

    empty = x.new_empty(0)
    batch, height, width, c_main = x.shape
    c_out = weight.shape[1]
    d_norm_weight, d_norm_bias = x.new_empty(0, dtype=stat_dtype(x.dtype)), x.new_empty(0, dtype=stat_dtype(x.dtype))
    if norm_groups:  # the gradient of the pre-norm map: directly, and through the norm's statistics
        count = y.shape[1] * y.shape[2] * (batch if norm_over_batch else c_out // norm_groups)
        coef_a, coef_b, d_weight, d_bias = norm_coefficients(
            grad_scale, grad_shift, stat_mean, stat_var, norm_weight, norm_groups, norm_eps, count, norm_over_batch
        )
        dz = norm_stats_backward_nhwc(y, grad_y, coef_a, coef_b, stat_mean)
        if d_weight is not None:
            d_norm_weight, d_norm_bias = d_weight, d_bias
    elif grad_is_dz or (activation == "none" and not pool):
        out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
        dz = grad_y if grad_y is not None else x.new_zeros((batch, out_h, out_w, c_out))
    else:
        dz = activation_pool_backward_nhwc(y, grad_y, grad_pooled if pool else None, activation=activation)
    up_read = _read_of(up_scale, up_shift, up_activation, up_slope, up_lo, up_hi)
    if up is not None and up_mode == "transpose":  # the low-resolution map applied first, as the forward does
        up = conv_transpose2x2_nhwc(_materialized(up, up_read), up_weight, up_bias)
    elif up is not None and up_mode != "direct":
        up = upsample2x_nhwc(up, up_mode, align_corners, norm_in=up_read)
    c_up = up.shape[3] if up is not None else 0
    read = _read_of(in_scale, in_shift, in_activation, in_slope, in_lo, in_hi)
    d_in = empty
    if mask_x and (c_up or in_scale is not None):
        raise ValueError("mask_x: the input gradient's mask covers one source read as stored (no up, no norm read)")
    gate = x if mask_x else None
    if _head_read(ksize, up, read, norm_groups, activation, pool, stride, c_main, c_out):
        # A 1x1 head that read its map through a norm (a norm layout's head launch): one pass over z gives z's
        # gradient through the read, the read's scale and shift gradients, dW and db.
        d_in, sums, d_scale, d_shift = head_backward_sums_nhwc(x, dz, weight, norm_read=read)
        db = sums[c_main].clone() if has_bias else x.new_empty(0, dtype=stat_dtype(x.dtype))  # (no aliased outputs)
        if not need_input:
            d_in, d_scale, d_shift = empty, *(x.new_empty(0, dtype=stat_dtype(x.dtype)) for _ in range(2))
        dx_read = x.new_empty(0, dtype=stat_dtype(x.dtype))
        return d_in, dx_read, sums[:c_main], db, d_scale, d_shift, d_norm_weight, d_norm_bias
    if need_input and read is not None and not _read_grad_apart(stride):
        # x's gradient through its read in the input gradient's epilogue, which also writes the values the forward
        # read: the weight gradient's operand, with no normalize launch reading x once more.
        d_in, d_scale, d_shift, source = conv2d_input_grad_nhwc(
            dz, weight, c_main + c_up, ksize, padding, grad_mask=x, grad_norm=read, grad_norm_applied=True
        )  # fmt: skip
    else:
        source = _materialized(x, read)
    if up is None:
        dw, db = conv2d_weight_grad_nhwc(source, dz, ksize, padding, bias=has_bias, stride=stride)
    else:
        taps = ksize * ksize
        parts = alloc((taps * c_main, c_out), stat_dtype(x.dtype), x.device)
        up_parts = alloc((taps * c_up, c_out), stat_dtype(x.dtype), x.device)
        _, db = conv2d_weight_grad_nhwc(source, dz, ksize, padding, bias=has_bias, out=parts)
        framed = up if up.shape[1:3] == x.shape[1:3] else _frame(up, height, width, join)
        conv2d_weight_grad_nhwc(framed, dz, ksize, padding, bias=False, out=up_parts)
        # The two sources' rows regrouped into the joined weight's tap-major order (row tap * c_in + channel).
        dw = alloc((taps, c_main + c_up, c_out), stat_dtype(x.dtype), x.device)
        dw[:, :c_main] = parts.view(taps, c_main, c_out)
        dw[:, c_main:] = up_parts.view(taps, c_up, c_out)
        dw = dw.view(taps * (c_main + c_up), c_out)
    if need_input and stride != 1:
        d_in = conv2d_input_grad_nhwc(
            dz, weight, c_main, ksize, padding, stride=stride, in_size=(height, width), grad_mask=gate
        )
    elif need_input and read is None:  # (through a read at stride 1: above, ahead of the weight gradient)
        d_in = conv2d_input_grad_nhwc(dz, weight, c_main + c_up, ksize, padding, grad_mask=gate)
    dx_read = x.new_empty(0, dtype=stat_dtype(x.dtype))
    if need_input and read is not None and _read_grad_apart(stride):
        dx_read, d_scale, d_shift = _read_backward(d_in[..., :c_main], x, read)
    elif not (need_input and read is not None):
        d_scale, d_shift = (x.new_empty(0, dtype=stat_dtype(x.dtype)) for _ in range(2))
    db = db if db is not None else x.new_empty(0, dtype=stat_dtype(x.dtype))
    return d_in, dx_read, dw, db, d_scale, d_shift, d_norm_weight, d_norm_bias


_conv_backward_op = torch.library.custom_op(
    "fastunet::conv2d_nhwc_backward", mutates_args=(), schema=_CONV_BACKWARD_SCHEMA
)(_conv_backward)


def _frame(up: torch.Tensor, height: int, width: int, join: str = "pad") -> torch.Tensor:
    """The upsampled map placed into the skip's (height, width) frame, as the forward's loader reads it (odd
    sizes only: a copy): zero-padded and centered, or (``"replicate"``) padded at the bottom/right by repeating its
    last row and column."""
    up_h, up_w = up.shape[1], up.shape[2]
    dy, dx = height - up_h, width - up_w
    if join == "replicate":
        return F.pad(up.permute(0, 3, 1, 2), (0, dx, 0, dy), mode="replicate").permute(0, 2, 3, 1)
    return F.pad(up, (0, 0, dx // 2, dx - dx // 2, dy // 2, dy - dy // 2))


def _unframe(grad: torch.Tensor, up_h: int, up_w: int, join: str = "pad") -> torch.Tensor:
    """The adjoint of :func:`_frame`: the frame's gradient cut (or zero-extended) back to the upsampled map; with
    ``"replicate"``, the rows and columns past the map added onto its last row and column."""
    height, width = grad.shape[1], grad.shape[2]
    dy, dx = height - up_h, width - up_w
    if join == "replicate":
        out = grad[:, :up_h, :up_w].clone()
        if dy:
            out[:, up_h - 1] += grad[:, up_h:, :up_w].sum(1)
        if dx:
            out[:, :, up_w - 1] += grad[:, :up_h, up_w:].sum(2)
        if dy and dx:
            out[:, up_h - 1, up_w - 1] += grad[:, up_h:, up_w:].sum((1, 2))
        return out
    return F.pad(grad, (0, 0, -(dx // 2), -(dx - dx // 2), -(dy // 2), -(dy - dy // 2)))


@_conv_backward_op.register_fake
def _conv_backward_fake(
    x, weight, up, y, grad_y, grad_pooled, ksize, padding, activation, pool, has_bias, need_input, up_mode,
    align_corners, join, in_scale=None, in_shift=None, in_activation="none", in_slope=0.0, in_lo=0.0, in_hi=0.0,
    grad_scale=None, grad_shift=None, stat_mean=None, stat_var=None, norm_weight=None, norm_groups=0, norm_eps=0.0,
    norm_over_batch=False, up_weight=None, up_bias=None, up_scale=None, up_shift=None, up_activation="none",
    up_slope=0.0, up_lo=0.0, up_hi=0.0, stride=1, grad_is_dz=False, mask_x=False,
):  # fmt: skip
    batch, height, width, c_main = x.shape
    c_up = 0 if up is None else up_weight.shape[1] // 4 if up_mode == "transpose" else up.shape[3]
    c_in = c_main + c_up
    c_out = weight.shape[1]

    def fp32(shape: tuple, present: bool) -> torch.Tensor:
        return x.new_empty(shape if present else (0,), dtype=stat_dtype(x.dtype))

    d_in = x.new_empty((batch, height, width, c_in) if need_input else (0,))
    read = need_input and in_scale is not None
    # x's gradient through its read: the input gradient's first channels at stride 1, a tensor of its own at 2.
    dx_read = x.new_empty(x.shape) if read and _read_grad_apart(stride) else fp32((0,), False)
    d_scale, d_shift = fp32((batch, c_main), read), fp32((batch, c_main), read)
    affine = bool(norm_groups) and norm_weight is not None
    d_nw, d_nb = fp32((c_out,), affine), fp32((c_out,), affine)
    db = fp32((c_out,), has_bias)
    dw = x.new_empty((weight.shape[0], c_out), dtype=stat_dtype(x.dtype))
    return d_in, dx_read, dw, db, d_scale, d_shift, d_nw, d_nb


def _upsample_backward(
    grad, height, width, mode, align_corners, pad_top=0, pad_left=0, x=None, in_scale=None, in_shift=None,
    in_activation="none", in_slope=0.0, in_lo=0.0, in_hi=0.0, mask_x=False,
):  # fmt: skip
    """(dx, d_in_scale, d_in_shift): the gradient of the (height, width) map ``x`` whose 2x upsampling sat at
    (pad_top, pad_left) in ``grad``'s frame; read through its norm (``in_scale``), also the norm's scale and
    shift's (else those two empty). ``mask_x``: ``x`` is a ReLU's output, whose derivative the adjoint's launch
    applies (``where(x <= 0, 0, dx)``)."""
    from fastunet.kernels.backward import upsample2x_adjoint_nhwc

    if mask_x and (x is None or in_scale is not None):
        raise ValueError("mask_x: the adjoint masks with the stored map x itself (given, not read through a norm)")
    d_low = upsample2x_adjoint_nhwc(
        grad, (height, width), mode, align_corners, pad_top=pad_top, pad_left=pad_left, gate=x if mask_x else None
    )
    read = _read_of(in_scale, in_shift, in_activation, in_slope, in_lo, in_hi)
    if read is None:
        empty = grad.new_empty(0, dtype=stat_dtype(grad.dtype))
        return d_low, empty, empty.clone()
    return _read_backward(d_low, x, read)


_upsample_backward_op = torch.library.custom_op(
    "fastunet::upsample2x_nhwc_backward",
    mutates_args=(),
    schema=(
        "(Tensor grad, int height, int width, str mode, bool align_corners, int pad_top=0, int pad_left=0, "
        f"Tensor? x=None, {_READ_ARGS}, bool mask_x=False) -> (Tensor, Tensor, Tensor)"
    ),
)(_upsample_backward)


@_upsample_backward_op.register_fake
def _upsample_backward_fake(
    grad, height, width, mode, align_corners, pad_top=0, pad_left=0, x=None, in_scale=None, in_shift=None,
    in_activation="none", in_slope=0.0, in_lo=0.0, in_hi=0.0, mask_x=False,
):  # fmt: skip
    d_low = grad.new_empty((grad.shape[0], height, width, grad.shape[3]))
    stats = (grad.shape[0], grad.shape[3]) if in_scale is not None else (0,)
    stat = stat_dtype(grad.dtype)
    return d_low, grad.new_empty(stats, dtype=stat), grad.new_empty(stats, dtype=stat)


def _conv_transpose_backward(
    x, weight, grad, has_bias, need_x, in_scale=None, in_shift=None, in_activation="none", in_slope=0.0, in_lo=0.0,
    in_hi=0.0, mask_x=False,
):  # fmt: skip
    """(dx, dW packed, db4, d_in_scale, d_in_shift) of a 2x2 stride-2 transposed conv; dW and db4 (one bias block
    per sub-pixel) in fp32; x read through its norm (``in_scale``): x's own gradient and its norm's scale and
    shift's (else those two empty). ``mask_x``: x is a ReLU's output, whose derivative the input gradient's launch
    applies."""
    from fastunet.kernels.conv_grad import conv2d_weight_grad_nhwc, conv_transpose2x2_input_grad_nhwc

    read = _read_of(in_scale, in_shift, in_activation, in_slope, in_lo, in_hi)
    if mask_x and read is not None:
        raise ValueError("mask_x: the input gradient masks with the stored map x itself (not read through a norm)")
    source = _materialized(x, read)
    dx = conv_transpose2x2_input_grad_nhwc(grad, weight, x if mask_x else None) if need_x else x.new_empty(0)
    d_scale, d_shift = x.new_empty(0, dtype=stat_dtype(x.dtype)), x.new_empty(0, dtype=stat_dtype(x.dtype))
    if need_x and read is not None:
        dx, d_scale, d_shift = _read_backward(dx, x, read)
    # Sub-pixel (a, b) of every low-resolution pixel: a 1x1 conv of x to that strided view of the gradient, all four
    # in one launch. The packed weight's columns are (a * 2 + b) * c_out + channel; so are the repeated bias's.
    dw, db = conv2d_weight_grad_nhwc(source, grad, 1, 0, bias=has_bias, phases=4, sum_phases=False)
    return dx, dw, db if has_bias else x.new_empty(0, dtype=stat_dtype(x.dtype)), d_scale, d_shift


_conv_transpose_backward_op = torch.library.custom_op(
    "fastunet::conv_transpose2x2_nhwc_backward",
    mutates_args=(),
    schema=(
        f"(Tensor x, Tensor weight, Tensor grad, bool has_bias, bool need_x, {_READ_ARGS}, bool mask_x=False) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
)(_conv_transpose_backward)


@_conv_transpose_backward_op.register_fake
def _conv_transpose_backward_fake(
    x, weight, grad, has_bias, need_x, in_scale=None, in_shift=None, in_activation="none", in_slope=0.0, in_lo=0.0,
    in_hi=0.0, mask_x=False,
):  # fmt: skip
    empty = x.new_empty(0, dtype=stat_dtype(x.dtype))
    dx = x.new_empty(x.shape) if need_x else x.new_empty(0)
    db = x.new_empty((weight.shape[1],), dtype=stat_dtype(x.dtype)) if has_bias else empty
    stats = (x.shape[0], x.shape[3]) if need_x and in_scale is not None else (0,)
    d_read = [x.new_empty(stats, dtype=stat_dtype(x.dtype)) for _ in range(2)]
    return dx, x.new_empty(weight.shape, dtype=stat_dtype(x.dtype)), db, *d_read


def _normalize_backward(
    grad, z, pool, in_scale, in_shift, in_activation="none", in_slope=0.0, in_lo=0.0, in_hi=0.0
):  # fmt: skip
    """(dz, d_scale, d_shift) of the normalize (+ 2x2 max-pool) launch: the pooled gradient routed to each window's
    maximum of the normalized map (made again in registers, as the forward stored it) and taken through the norm's
    read, in one pass over z."""
    from fastunet.kernels.backward import activation_pool_backward_nhwc

    read = NormIn(in_scale, in_shift, in_activation, float(in_slope), float(in_lo), float(in_hi))
    if pool:  # the pooled gradient routed and taken through the read in one pass over z
        return activation_pool_backward_nhwc(z, None, grad, activation="none", norm_read=read)
    return _read_backward(grad, z, read)


_normalize_backward_op = torch.library.custom_op(
    "fastunet::normalize_nhwc_backward",
    mutates_args=(),
    schema=(
        '(Tensor grad, Tensor z, bool pool, Tensor in_scale, Tensor in_shift, str in_activation="none", '
        "float in_slope=0.0, float in_lo=0.0, float in_hi=0.0) -> (Tensor, Tensor, Tensor)"
    ),
)(_normalize_backward)


@_normalize_backward_op.register_fake
def _normalize_backward_fake(
    grad, z, pool, in_scale, in_shift, in_activation="none", in_slope=0.0, in_lo=0.0, in_hi=0.0
):  # fmt: skip
    return z.new_empty(z.shape), in_scale.new_empty(in_scale.shape), in_shift.new_empty(in_shift.shape)


def _head_backward(a, grad_logits, weight, grad_map=None, mask=False):
    """(d_a, sums) of a 1x1 head ``logits = a @ W + b`` over the NHWC map ``a``: ``d_a = dlogits @ W^T`` (plus
    ``grad_map``, the map's own gradient where something else read it); ``sums`` (C + 1, n_cls) in fp32 holds
    ``dW = a^T dlogits`` in rows 0..C-1 and ``db`` (the pixel sum of dlogits) in row C: one pass over the map and a
    fixed-order sum of the partials (:func:`fastunet.kernels.backward.head_backward_nhwc`). ``mask``: ``a`` is a
    ReLU's output whose conv takes its gradient as dZ (``grad_is_dz``): the head's part of ``d_a`` gets the ReLU's
    derivative in the same pass (``grad_map``, from a reader that applied it already, is added as it is)."""
    from fastunet.kernels.backward import head_backward_sums_nhwc

    d_a, sums = head_backward_sums_nhwc(a, grad_logits, weight, mask=mask)
    if grad_map is not None:
        d_a = d_a + grad_map
    return d_a, sums


_head_backward_op = torch.library.custom_op(
    "fastunet::head_backward",
    mutates_args=(),
    schema="(Tensor a, Tensor grad_logits, Tensor weight, Tensor? grad_map=None, bool mask=False) -> (Tensor, Tensor)",
)(_head_backward)


@_head_backward_op.register_fake
def _head_backward_fake(a, grad_logits, weight, grad_map=None, mask=False):
    return a.new_empty(a.shape), a.new_empty((weight.shape[0] + 1, weight.shape[1]), dtype=stat_dtype(a.dtype))


def _backward_op(name: str):
    """The backward launch ``name`` as its custom op; in a dry run (:func:`fastunet.kernels.dry_run`: tensors on the
    ``meta`` device, the launchers record and launch nothing) its implementation itself, so that a traced backward
    lists its launches (the op would dispatch meta tensors to its fake implementation, which records nothing)."""
    if is_dry_run():
        return _IMPLEMENTATIONS[name]
    return getattr(torch.ops.fastunet, name)


_IMPLEMENTATIONS = {
    "conv2d_nhwc_backward": _conv_backward,
    "upsample2x_nhwc_backward": _upsample_backward,
    "conv_transpose2x2_nhwc_backward": _conv_transpose_backward,
    "normalize_nhwc_backward": _normalize_backward,
    "pack_weights_backward": _pack_backward_impl,
    "head_backward": _head_backward,
}


# ---------------------------------------------------------------------------------------------------------------
# The ops' own math in PyTorch, for second derivatives
# ---------------------------------------------------------------------------------------------------------------
def _read_math(x: torch.Tensor, scale, shift, activation, slope, lo, hi) -> torch.Tensor:
    """``act(x * scale + shift)`` on an NHWC map, per (image, channel) scale and shift."""
    if scale is None:
        return x
    u = x * scale[:, None, None, :] + shift[:, None, None, :]
    return apply_act(Act(activation, slope, lo, hi), u)


def _norm_math(z: torch.Tensor, weight, bias, groups, eps, over_batch):
    """(scale, shift) of a norm with data statistics of the NHWC map ``z``, (N, C) each, differentiable."""
    batch, height, width, channels = z.shape
    z32 = z.to(stat_dtype(z.dtype))  # the statistics' dtype: fp32, fp64 for a float64 map
    if over_batch:
        mean = z32.mean((0, 1, 2))[None].expand(batch, channels)
        var = z32.var((0, 1, 2), unbiased=False)[None].expand(batch, channels)
    else:
        size = channels // groups
        grouped = z32.reshape(batch, height * width, groups, size)
        mean = grouped.mean((1, 3)).repeat_interleave(size, 1)
        var = grouped.var((1, 3), unbiased=False).repeat_interleave(size, 1)
    scale = (var + eps).rsqrt()
    if weight is not None:
        scale = scale * weight[None, :]
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias[None, :]
    return scale, shift


def _conv_math(inputs: list, up_mode: str, align_corners: bool):
    """The conv launch in PyTorch (NHWC in and out): (y, pooled or None, scale or None, shift or None)."""
    x, weight, bias, up = inputs[_X], inputs[_W], inputs[_B], inputs[_UP]
    ksize, padding, activation, pool = inputs[_KSIZE], inputs[_PADDING], inputs[_ACT], inputs[_POOL]
    read = [inputs[i] for i in range(_IN_SCALE, _IN_SCALE + 6)]
    x = _read_math(x, read[0], read[1], read[2], read[3], read[4], read[5])
    features = x.permute(0, 3, 1, 2)
    if up is not None:
        up = _read_math(up, *(inputs[i] for i in range(_UP_SCALE, _UP_SCALE + 6)))
    if up is not None and up_mode == "transpose":
        up_weight, up_bias = inputs[_UP_W], inputs[_UP_B]
        c_low, c_up = up_weight.shape[0], up_weight.shape[1] // 4
        w = up_weight.view(c_low, 2, 2, c_up).permute(0, 3, 1, 2)
        up = F.conv_transpose2d(up.permute(0, 3, 1, 2), w, stride=2).permute(0, 2, 3, 1)
        if up_bias is not None:  # each sub-pixel (a, b) adds its own bias block (a * 2 + b)
            batch, height, width = up.shape[0], up.shape[1] // 2, up.shape[2] // 2
            tiled = up.reshape(batch, height, 2, width, 2, c_up) + up_bias.view(2, 1, 2, c_up)
            up = tiled.reshape(batch, 2 * height, 2 * width, c_up)
    elif up is not None and up_mode != "direct":
        align = align_corners if up_mode == "bilinear" else None
        up = F.interpolate(up.permute(0, 3, 1, 2), scale_factor=2, mode=up_mode, align_corners=align)
        up = up.permute(0, 2, 3, 1)
    if up is not None:
        framed = _frame(up, x.shape[1], x.shape[2], inputs[_JOIN]) if up.shape[1:3] != x.shape[1:3] else up
        features = torch.cat([features, framed.permute(0, 3, 1, 2)], dim=1)
    c_in = features.shape[1]
    w = weight.view(ksize, ksize, c_in, weight.shape[1]).permute(3, 2, 0, 1)
    y = F.conv2d(features, w, bias, stride=inputs[_STRIDE], padding=padding)
    if inputs[_NORM_GROUPS]:
        z = y.permute(0, 2, 3, 1)
        scale, shift = _norm_math(
            z, inputs[_NORM_W], inputs[_NORM_B], inputs[_NORM_GROUPS], inputs[_NORM_EPS], inputs[_NORM_BATCH]
        )
        return z, None, scale, shift
    if activation == "relu":
        y = torch.relu(y)
    if inputs[_HEAD_W] is not None:  # the fused head: (logits, the activated map under them)
        features = y.permute(0, 2, 3, 1)
        return features @ inputs[_HEAD_W] + inputs[_HEAD_B], features, None, None
    pooled = F.max_pool2d(y, 2).permute(0, 2, 3, 1) if pool else None
    return y.permute(0, 2, 3, 1), pooled, None, None


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
_CONV_ARGS = 46
_X, _W, _B, _UP, _HEAD_W, _HEAD_B, _SLOPES, _KSIZE, _PADDING, _UP_MODE, _ALIGN, _JOIN, _ACT = range(13)
_POOL, _NCHW, _STRIDE, _IN_SCALE, _IN_SHIFT, _IN_ACT, _IN_SLOPE, _IN_LO, _IN_HI, _IN_SLOPES = range(16, 26)
_NORM_GROUPS, _NORM_W, _NORM_B, _NORM_EPS, _NORM_BATCH = range(26, 31)
_UP_W, _UP_B, _UP_SCALE, _UP_SHIFT, _UP_ACT, _UP_SLOPE, _UP_LO, _UP_HI, _UP_SLOPES = range(31, 40)
_HEAD_MAP = 40
_GRAD_IS_DZ, _MASK_X, _MASK_UP = range(41, 44)
# x (the low-resolution map) read through its norm, applied ahead for the forward's loader only: never kept for the
# backward, no gradient
_X_APPLIED, _UP_APPLIED = 44, 45
_DIFFERENTIABLE_ARGS = (
    _X, _W, _B, _UP, _IN_SCALE, _IN_SHIFT, _NORM_W, _NORM_B, _UP_W, _UP_B, _UP_SCALE, _UP_SHIFT, _HEAD_W, _HEAD_B
)  # fmt: skip
# What the low-resolution map a decoder conv upsamples itself feeds: the gradients that need its upsampled map's.
_UP_SIDE = (_UP, _UP_W, _UP_B, _UP_SCALE, _UP_SHIFT)


def _unsupported_conv(inputs) -> str | None:
    if inputs[_HEAD_W] is not None and not inputs[_HEAD_MAP]:
        return "a fused head whose launch does not store the map under it (head_map)"
    if inputs[_PADDING] != inputs[_KSIZE] // 2 or inputs[_KSIZE] not in (1, 3):
        return "a valid conv"
    if inputs[_STRIDE] != 1 and (inputs[_STRIDE], inputs[_KSIZE]) != (2, 3):
        return f"a {inputs[_KSIZE]}x{inputs[_KSIZE]} stride-{inputs[_STRIDE]} conv"
    if inputs[_NORM_GROUPS] and inputs[_POOL]:
        return "a pool after a norm with data statistics in the same launch"
    if not inputs[_NORM_GROUPS] and inputs[_ACT] not in _EPILOGUE_ACTIVATIONS:
        return f"the {inputs[_ACT]} activation in the epilogue"
    if inputs[_IN_SCALE] is not None and (inputs[_IN_ACT] not in _NORM_ACTIVATIONS or inputs[_IN_SLOPES] is not None):
        return f"the {inputs[_IN_ACT]} activation after a norm"
    if inputs[_UP_SCALE] is not None and (inputs[_UP_ACT] not in _NORM_ACTIVATIONS or inputs[_UP_SLOPES] is not None):
        return f"the {inputs[_UP_ACT]} activation after the low-resolution map's norm"
    up_modes = ("direct", "nearest", "bilinear", "transpose")
    if inputs[_UP] is not None and (inputs[_UP_MODE] not in up_modes or inputs[_JOIN] == "crop"):
        return "a second source joined by a crop"
    if inputs[_SLOPES] is not None:
        return "PReLU slopes"
    plain_relu = inputs[_ACT] == "relu" and not (inputs[_POOL] or inputs[_NORM_GROUPS])
    if inputs[_GRAD_IS_DZ] and not plain_relu:
        return "grad_is_dz on a conv other than a plain ReLU one (no pool, no norm)"
    if inputs[_MASK_X] and (inputs[_IN_SCALE] is not None or inputs[_UP] is not None):
        return "mask_x on a map read through its norm or joined with a second source"
    if inputs[_MASK_UP] and (
        inputs[_UP_SCALE] is not None or inputs[_UP_MODE] not in ("nearest", "bilinear", "transpose")
    ):
        return "mask_up without a low-resolution map the launch upsamples itself"
    return None


def _conv_setup(ctx, inputs, output):
    ctx.unsupported = _unsupported_conv(inputs)
    ctx.stage = current_launch_stage()
    kept = (*_DIFFERENTIABLE_ARGS, _X_APPLIED, _UP_APPLIED)  # saved below, or (applied ahead) not kept at all
    ctx.constants = {i: inputs[i] for i in range(_CONV_ARGS) if i not in kept}
    keep_y = inputs[_ACT] != "none" or inputs[_POOL] or inputs[_NORM_GROUPS]
    y = output[0] if keep_y else None
    if inputs[_HEAD_W] is not None:  # the activated map under the logits: the head's and the conv's gradients read it
        y = output[1]
        ctx.set_materialize_grads(False)  # no zero-filled gradient for an unread map (or unread logits)
    stats = (output[4], output[5]) if inputs[_NORM_GROUPS] else (None, None)
    ctx.save_for_backward(*(inputs[i] for i in _DIFFERENTIABLE_ARGS), y, *stats)


def _conv_autograd(ctx, grad_y, grad_pooled, grad_scale, grad_shift, _grad_mean, _grad_var):
    if ctx.unsupported is not None:
        raise NotImplementedError(f"fastunet::conv2d_nhwc has no backward for {ctx.unsupported}")
    saved = ctx.saved_tensors
    inputs: list = [None] * _CONV_ARGS
    for i, index in enumerate(_DIFFERENTIABLE_ARGS):
        inputs[index] = saved[i]
    for index, value in ctx.constants.items():
        inputs[index] = value
    y, stat_mean, stat_var = saved[len(_DIFFERENTIABLE_ARGS) :]
    x, weight, bias, up = inputs[_X], inputs[_W], inputs[_B], inputs[_UP]
    up_mode, align_corners = inputs[_UP_MODE] or "direct", inputs[_ALIGN]
    need = ctx.needs_input_grad
    grads: list = [None] * _CONV_ARGS
    if torch.is_grad_enabled():  # create_graph=True: differentiate the op's own math, graph kept
        wrt = _own_nodes([inputs[i] for i in _DIFFERENTIABLE_ARGS])
        for index, value in zip(_DIFFERENTIABLE_ARGS, wrt, strict=True):
            inputs[index] = value
        outputs = _conv_math(inputs, up_mode, align_corners)
        found = _grads_of(outputs, (grad_y, grad_pooled, grad_scale, grad_shift), wrt)
        for index, value in zip(_DIFFERENTIABLE_ARGS, found, strict=True):
            grads[index] = value
        return tuple(grads)
    stage = current_launch_stage()
    set_launch_stage(f"{ctx.stage}.backward" if ctx.stage else None)
    up_read = tuple(inputs[i] for i in range(_UP_SCALE, _UP_SCALE + 6))
    try:
        head_weight, head_bias = inputs[_HEAD_W], inputs[_HEAD_B]
        if head_weight is not None:  # the head first: the logits' gradient becomes the activated map's
            grad_y, d_head_w, d_head_b = _head_grads(
                y, grad_y, grad_pooled, head_weight, need[_HEAD_B], inputs[_GRAD_IS_DZ]
            )
            grad_pooled = None
        need_up = up is not None and any(need[i] for i in _UP_SIDE)
        read = inputs[_IN_SCALE] is not None
        d_in, dx_read, dw, db, d_scale, d_shift, d_nw, d_nb = _backward_op("conv2d_nhwc_backward")(
            x, weight, up, y, grad_y, grad_pooled if inputs[_POOL] else None, inputs[_KSIZE], inputs[_PADDING],
            inputs[_ACT], inputs[_POOL], bias is not None and need[_B], need[_X] or need_up, up_mode, align_corners,
            inputs[_JOIN], *(inputs[i] for i in range(_IN_SCALE, _IN_SCALE + 6)), grad_scale, grad_shift, stat_mean,
            stat_var, inputs[_NORM_W], inputs[_NORM_GROUPS], inputs[_NORM_EPS], inputs[_NORM_BATCH],
            inputs[_UP_W], inputs[_UP_B], *up_read, inputs[_STRIDE], inputs[_GRAD_IS_DZ], inputs[_MASK_X],
        )  # fmt: skip
        c_main = x.shape[3]
        if need[_X]:
            grads[_X] = dx_read if read and _read_grad_apart(inputs[_STRIDE]) else d_in[..., :c_main]
        if need_up:
            _up_side_grads(grads, d_in[..., c_main:], inputs, need, up_read)
    finally:
        set_launch_stage(stage)
    grads[_W] = dw.to(weight.dtype) if need[_W] else None
    grads[_B] = db.to(bias.dtype) if bias is not None and need[_B] else None
    if head_weight is not None:
        grads[_HEAD_W] = d_head_w.to(head_weight.dtype) if need[_HEAD_W] and d_head_w is not None else None
        grads[_HEAD_B] = d_head_b.to(head_bias.dtype) if need[_HEAD_B] and d_head_b is not None else None
    if read and need[_X]:
        grads[_IN_SCALE] = d_scale if need[_IN_SCALE] else None
        grads[_IN_SHIFT] = d_shift if need[_IN_SHIFT] else None
    if inputs[_NORM_W] is not None:
        grads[_NORM_W] = d_nw.to(inputs[_NORM_W].dtype) if need[_NORM_W] else None
        grads[_NORM_B] = d_nb.to(inputs[_NORM_B].dtype) if need[_NORM_B] else None
    return tuple(grads)


def _head_grads(y, grad_logits, grad_map, head_weight, need_bias: bool, mask: bool = False):
    """(the activated map's gradient, the head's dW, its db) of a conv with a fused head, from the logits' gradient
    (and the map's own, where anything read the map); None for what got no gradient. ``mask``: the conv takes its
    gradient as dZ (``grad_is_dz``): the head's backward applies the conv's ReLU derivative."""
    if grad_logits is None:
        return (grad_map if grad_map is not None else y.new_zeros(y.shape)), None, None
    d_map, sums = _backward_op("head_backward")(y, grad_logits, head_weight, grad_map, mask)
    channels = head_weight.shape[0]
    return d_map, sums[:channels], sums[channels] if need_bias else None


def _up_side_grads(grads: list, d_up: torch.Tensor, inputs: list, need: tuple, up_read: tuple) -> None:
    """The gradients of what a decoder conv's launch made its upsampled map from, given that map's gradient over
    the skip's frame ``d_up``: the low-resolution map (and its norm's scale and shift), the transposed conv's weight
    and bias (``mask_up``: the low-resolution map's gradient with its producer's ReLU derivative applied). Fills
    ``grads`` in place."""
    up, up_mode, align_corners, join = inputs[_UP], inputs[_UP_MODE] or "direct", inputs[_ALIGN], inputs[_JOIN]
    mask = inputs[_MASK_UP]
    height, width = d_up.shape[1], d_up.shape[2]
    if up_mode in ("nearest", "bilinear"):  # the adjoint of the upsampling, read from the skip's frame
        pad_top = pad_left = 0
        if join == "replicate" and (height, width) != (2 * up.shape[1], 2 * up.shape[2]):
            d_up = _unframe(d_up, 2 * up.shape[1], 2 * up.shape[2], join)
        elif join == "pad":
            pad_top, pad_left = center_pad_offsets(height, width, 2 * up.shape[1], 2 * up.shape[2])
        d_low, d_scale, d_shift = _backward_op("upsample2x_nhwc_backward")(
            d_up, up.shape[1], up.shape[2], up_mode, align_corners, pad_top, pad_left, up, *up_read, mask
        )
    else:  # the map itself (or the transposed conv's output), cut back from the skip's frame where the sizes differ
        scale = 2 if up_mode == "transpose" else 1
        up_h, up_w = scale * up.shape[1], scale * up.shape[2]
        d_up = d_up if (height, width) == (up_h, up_w) else _unframe(d_up, up_h, up_w, join)
        if up_mode == "direct":
            grads[_UP] = d_up
            return
        up_weight, up_bias = inputs[_UP_W], inputs[_UP_B]
        need_low = need[_UP] or (up_read[0] is not None and (need[_UP_SCALE] or need[_UP_SHIFT]))
        d_low, dw, db, d_scale, d_shift = _backward_op("conv_transpose2x2_nhwc_backward")(
            up, up_weight, d_up, up_bias is not None and need[_UP_B], need_low, *up_read, mask
        )
        grads[_UP_W] = dw.to(up_weight.dtype) if need[_UP_W] else None
        grads[_UP_B] = db.to(up_bias.dtype) if up_bias is not None and need[_UP_B] else None
    grads[_UP] = d_low if need[_UP] else None
    if up_read[0] is not None:
        grads[_UP_SCALE] = d_scale if need[_UP_SCALE] else None
        grads[_UP_SHIFT] = d_shift if need[_UP_SHIFT] else None


def _read_unsupported(inputs, start: int) -> str | None:
    scale, activation, slopes = inputs[start], inputs[start + 2], inputs[start + 6]
    if scale is not None and (activation not in _NORM_ACTIVATIONS or slopes is not None):
        return f"the {activation} activation after a norm"
    return None


def _upsample_setup(ctx, inputs, output):
    x, mode, align_corners = inputs[0], inputs[1], inputs[2]
    ctx.unsupported = _read_unsupported(inputs, 3)
    ctx.constants = (x.shape[1], x.shape[2], mode, align_corners, inputs[5], inputs[6], inputs[7], inputs[8])
    ctx.stage = current_launch_stage()
    ctx.save_for_backward(x, inputs[3], inputs[4])  # the producer's output, saved by it too: no extra memory


def _upsample_autograd(ctx, grad):
    if ctx.unsupported is not None:
        raise NotImplementedError(f"fastunet::upsample2x_nhwc has no backward for {ctx.unsupported}")
    height, width, mode, align_corners, activation, slope, lo, hi = ctx.constants
    x, scale, shift = ctx.saved_tensors
    need = ctx.needs_input_grad
    if torch.is_grad_enabled():
        align = align_corners if mode == "bilinear" else None
        x, scale, shift = _own_nodes([x, scale, shift])
        values = _read_math(x, scale, shift, activation, slope, lo, hi)
        out = F.interpolate(values.permute(0, 3, 1, 2), scale_factor=2, mode=mode, align_corners=align)
        dx, d_scale, d_shift = _grads_of([out.permute(0, 2, 3, 1)], [grad], [x, scale, shift])
    else:
        stage = current_launch_stage()
        set_launch_stage(f"{ctx.stage}.backward" if ctx.stage else None)
        try:
            dx, d_scale, d_shift = _backward_op("upsample2x_nhwc_backward")(
                grad, height, width, mode, align_corners, 0, 0, x, scale, shift, activation, slope, lo, hi
            )
        finally:
            set_launch_stage(stage)
        if scale is None:
            d_scale = d_shift = None
    return (dx if need[0] else None, None, None, d_scale, d_shift) + (None,) * 5


def _conv_transpose_setup(ctx, inputs, output):
    ctx.unsupported = _read_unsupported(inputs, 3)
    ctx.stage = current_launch_stage()
    ctx.has_bias = inputs[2] is not None
    ctx.read = (inputs[5], inputs[6], inputs[7], inputs[8])
    ctx.save_for_backward(inputs[0], inputs[1], inputs[2], inputs[3], inputs[4])


def _conv_transpose_autograd(ctx, grad):
    if ctx.unsupported is not None:
        raise NotImplementedError(f"fastunet::conv_transpose2x2_nhwc has no backward for {ctx.unsupported}")
    x, weight, bias4, scale, shift = ctx.saved_tensors
    activation, slope, lo, hi = ctx.read
    need = ctx.needs_input_grad
    if torch.is_grad_enabled():
        x, weight, scale, shift = _own_nodes([x, weight, scale, shift])
        c_in, c_out = weight.shape[0], weight.shape[1] // 4
        w = weight.view(c_in, 2, 2, c_out).permute(0, 3, 1, 2)
        bias = bias4[:c_out] if bias4 is not None else None
        values = _read_math(x, scale, shift, activation, slope, lo, hi)
        out = F.conv_transpose2d(values.permute(0, 3, 1, 2), w, bias, stride=2).permute(0, 2, 3, 1)
        dx, dw, d_scale, d_shift = _grads_of([out], [grad], [x, weight, scale, shift])
        db = None
        if bias4 is not None and bias4.requires_grad:  # each sub-pixel's bias block gets its own pixels' sum
            db = grad.reshape(grad.shape[0], grad.shape[1] // 2, 2, grad.shape[2] // 2, 2, c_out).sum((0, 1, 3))
            db = db.reshape(-1)
    else:
        stage = current_launch_stage()
        set_launch_stage(f"{ctx.stage}.backward" if ctx.stage else None)
        try:
            dx, dw, db, d_scale, d_shift = _backward_op("conv_transpose2x2_nhwc_backward")(
                x, weight, grad, ctx.has_bias and need[2], need[0] or (scale is not None and need[3]),
                scale, shift, activation, slope, lo, hi,
            )  # fmt: skip
        finally:
            set_launch_stage(stage)
        dx = dx if need[0] else None
        dw = dw.to(weight.dtype) if need[1] else None
        db = db.to(bias4.dtype) if ctx.has_bias and need[2] else None
        if scale is None:
            d_scale = d_shift = None
    return (dx, dw, db, d_scale, d_shift) + (None,) * 5


def _normalize_setup(ctx, inputs, output):
    z, pool = inputs[0], inputs[1]
    ctx.unsupported = _read_unsupported(inputs, 2)
    ctx.pool = pool
    ctx.read = (inputs[4], inputs[5], inputs[6], inputs[7])
    ctx.stage = current_launch_stage()
    ctx.save_for_backward(z, inputs[2], inputs[3])


def _normalize_autograd(ctx, grad):
    if ctx.unsupported is not None:
        raise NotImplementedError(f"fastunet::normalize_nhwc has no backward for {ctx.unsupported}")
    z, scale, shift = ctx.saved_tensors
    activation, slope, lo, hi = ctx.read
    if torch.is_grad_enabled():
        z, scale, shift = _own_nodes([z, scale, shift])
        values = _read_math(z, scale, shift, activation, slope, lo, hi)
        if ctx.pool:
            values = F.max_pool2d(values.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        dz, d_scale, d_shift = _grads_of([values], [grad], [z, scale, shift])
    else:
        stage = current_launch_stage()
        set_launch_stage(f"{ctx.stage}.backward" if ctx.stage else None)
        try:
            dz, d_scale, d_shift = _backward_op("normalize_nhwc_backward")(
                grad, z, ctx.pool, scale, shift, activation, slope, lo, hi
            )
        finally:
            set_launch_stage(stage)
    return (dz, None, d_scale, d_shift) + (None,) * 5


torch.library.register_autograd("fastunet::conv2d_nhwc", _conv_autograd, setup_context=_conv_setup)
torch.library.register_autograd("fastunet::upsample2x_nhwc", _upsample_autograd, setup_context=_upsample_setup)
torch.library.register_autograd(
    "fastunet::conv_transpose2x2_nhwc", _conv_transpose_autograd, setup_context=_conv_transpose_setup
)
torch.library.register_autograd("fastunet::normalize_nhwc", _normalize_autograd, setup_context=_normalize_setup)
torch.library.register_autograd("fastunet::pack_weights", _pack_op_autograd, setup_context=_pack_op_setup)
