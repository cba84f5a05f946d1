"""Recognise a U-Net by what its forward computes: an execution trace matched to a :class:`~fastunet.ops.Layout`.

How the forward is read. The source's ``forward`` runs once on a copy of the model (float64 on the CPU; on the meta
device when no numbers are wanted) while a recorder watches: forward hooks on the leaf modules that ``torch.nn``
defines (a ``Conv2d``, a ``BatchNorm2d``, an activation, a pool, an ``Upsample``, a padding layer...) record each
call as one step with the module and its path, and a ``torch.overrides.TorchFunctionMode`` records every torch
function called outside those modules (``torch.cat``, ``F.pad``, ``F.interpolate``, ``F.relu``, reshapes, indexing,
arithmetic). Each step's input tensors are matched to the step that produced them by tensor identity, so the
record is the data-flow graph of what ran. Modules of other libraries or of the user are looked through: only what
they call is recorded.

Why not ``torch.fx`` or ``torch.export``. ``fx.symbolic_trace`` runs the forward on proxies: U-Nets that compare
shapes before padding cannot be traced, and MONAI's ``UpCat`` is traced silently wrong (a proxy is no
``torch.Tensor`` to ``torch.jit.isinstance``, so its skip concatenation is left out of the graph).
``torch.export`` traces correctly but decomposes to ATen (BatchNorm becomes a no-training ATen op; module identity
survives only as metadata), takes seconds per model, specializes on the example's shapes anyway, and needs a
forward it can export. The execution trace records exactly the branch that ran, with module paths, on the probe
input that ``convert``'s float64 verification needs anyway; what it cannot see (another branch at another size) is
what the verification run and the odd-sized probe (every level pads) are for.

Matching. From the output backwards: the head conv; per decoder level two conv [+ norm] [+ activation] groups over
the concatenation of a skip and an upsampled map, in either order (the upsampled map: a transposed conv, a 2x
interpolation with or without a 1x1 conv before it, or a conv + pixel shuffle with or without the 2x2 blur; padded
by zeros, centred, or by replication at the bottom/right; or the skip centre-cropped); then the bottleneck over a
2x2 max-pool, or with a 3x3 stride-2 first conv reading the skip above it; then the encoder levels down to the
input the same way, each ending at the skip its decoder concatenates. Every step on the way to the output must be
consumed by that pattern, and every module that runs (or whose tensors are read) must be used by it; the first that
is not is named in the refusal, with the model. Modules that never run in the eval forward are left out.

The result is a :class:`Recipe`: module paths and the facts no module holds (functional activations and their
parameters, concatenation order per level, how the skip and the upsampled map are joined). It resolves to a
:class:`~fastunet.ops.Layout` over any module with the same paths: the source, its float64 copy, or the converted
module that shares its tensors.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from fastunet.ops import Act, ConvSpec, Layout, UpSpec, act_of

__all__ = ["ConversionError", "Recipe", "Recognition", "probe_sizes", "read_up", "recognize"]


class ConversionError(TypeError):
    """A module that :func:`fastunet.convert` cannot map onto the fused kernels (the message names it and says
    why)."""


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


# ---------------------------------------------------------------------------------------------------------------
# Upsampling modules (also read by FastUNet.fused_layout)
# ---------------------------------------------------------------------------------------------------------------
_TRANSPOSE_K2 = ((2, 2), (2, 2), (0, 0), (0, 0))  # kernel, stride, padding, output_padding
_TRANSPOSE_K3 = ((3, 3), (2, 2), (1, 1), (1, 1))  # MONAI's UNet and DynUNet(upsample_kernel_size=3): also 2H x 2W


def read_up(path: str, up: nn.Module, accepted: list[nn.Module] | None = None, *, transpose_k3: bool = False) -> UpSpec:
    """The :class:`~fastunet.ops.UpSpec` of a 2x upsampling module (``path`` names it in errors); ``accepted``
    collects the stateless modules mapped. ``transpose_k3``: a ``ConvTranspose2d(kernel_size=3, stride=2,
    padding=1, output_padding=1)`` is a 2x upsampling too (the recogniser's layouts; the kernels say whether they
    run it)."""
    if accepted is None:
        accepted = []
    if type(up) is nn.ConvTranspose2d:
        form = tuple(_pair(v) for v in (up.kernel_size, up.stride, up.padding, up.output_padding))
        forms = (_TRANSPOSE_K2, _TRANSPOSE_K3) if transpose_k3 else (_TRANSPOSE_K2,)
        if form not in forms or _pair(up.dilation) != (1, 1) or up.groups != 1 or up.padding_mode != "zeros":
            also = " or (kernel_size=3, stride=2, padding=1, output_padding=1)" if transpose_k3 else ""
            raise ConversionError(
                f"convert: ConvTranspose2d at '{path}': only ConvTranspose2d(kernel_size=2, stride=2){also} without "
                "groups or dilation is fused"
            )
        return UpSpec("transpose", conv=up)
    if type(up) in (nn.Upsample, nn.UpsamplingBilinear2d, nn.UpsamplingNearest2d):
        accepted.append(up)
        return _interpolation(f"{type(up).__name__} at '{path}'", up.mode, up.scale_factor, up.size, up.align_corners)
    raise ConversionError(
        f"convert: {type(up).__name__} at '{path}': expected nn.Upsample(scale_factor=2) or "
        "nn.ConvTranspose2d(kernel_size=2, stride=2)"
    )


def _interpolation(where: str, mode: str, scale, size, align_corners) -> UpSpec:
    scales = tuple(float(s) for s in _pair(scale)) if scale is not None else None
    if size is not None or scales != (2.0, 2.0):
        raise ConversionError(
            f"convert: {where}: only 2x upsampling is fused, got scale_factor={scale}, size={size} (an interpolation "
            "to the skip's size is not 2x at odd sizes)"
        )
    if mode == "bilinear":
        return UpSpec("bilinear", bool(align_corners))
    if mode == "nearest":
        return UpSpec("nearest")
    raise ConversionError(f"convert: {where}: upsampling mode {mode!r} is not fused (bilinear or nearest)")


# ---------------------------------------------------------------------------------------------------------------
# Recipe: what was recognised, as module paths and facts
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ActRecipe:
    """An activation: ``path`` of its module (read again on every resolve), or a functional one (``kind`` and
    parameters; ``path`` then names the ``nn.PReLU`` whose weight a functional PReLU reads)."""

    kind: str = "relu"
    slope: float = 0.0
    lo: float = 0.0
    hi: float = 0.0
    path: str | None = None
    from_module: bool = False

    def resolve(self, root: nn.Module) -> Act | None:
        if self.from_module:
            act = act_of(root.get_submodule(self.path))
            return None if act.kind == "relu" else act
        if self.kind == "relu":
            return None  # ConvSpec's default: ReLU
        if self.kind == "prelu":
            return Act("prelu", module=root.get_submodule(self.path))
        return Act(self.kind, slope=self.slope, lo=self.lo, hi=self.hi)


@dataclasses.dataclass(frozen=True)
class ConvRecipe:
    conv: str
    norm: str | None
    act: ActRecipe

    def resolve(self, root: nn.Module) -> ConvSpec:
        norm = root.get_submodule(self.norm) if self.norm is not None else None
        return ConvSpec(root.get_submodule(self.conv), norm, self.act.resolve(root))


@dataclasses.dataclass(frozen=True)
class UpRecipe:
    """One level's upsampling: ``module``: the path of an ``nn.Upsample``-like or ``ConvTranspose2d`` module (read
    again on every resolve, so a replaced upsampling is what the next plan fuses); else ``mode`` with ``conv`` (a
    functional transposed conv's module, or pixel shuffle's conv), ``align_corners`` and ``blur``. ``pre_conv``:
    the 1x1 conv before an interpolation."""

    mode: str
    module: str | None = None
    conv: str | None = None
    pre_conv: str | None = None
    align_corners: bool = False
    blur: bool = False

    def resolve(self, root: nn.Module) -> UpSpec:
        pre_conv = root.get_submodule(self.pre_conv) if self.pre_conv is not None else None
        if self.module is not None:
            spec = read_up(self.module, root.get_submodule(self.module), transpose_k3=True)
            return dataclasses.replace(spec, pre_conv=pre_conv) if pre_conv is not None else spec
        conv = root.get_submodule(self.conv) if self.conv is not None else None
        return UpSpec(self.mode, self.align_corners, conv, pre_conv, self.blur)


Pair = tuple[ConvRecipe, ConvRecipe]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A recognised U-Net: per level the module paths of its convs, norms and activations, the upsamplings, the
    head, the concatenation order per decoder level and the join; ``where`` maps each stage name
    (``enc0.conv1``, ``dec1.up``, ``head``, ``join``) to the source's module paths, for messages."""

    encoders: tuple[Pair, ...]
    ups: tuple[UpRecipe, ...]
    decoders: tuple[Pair, ...]
    head: str
    up_first: tuple[bool, ...]
    join: str
    down: str = "pool"
    where: tuple[tuple[str, str], ...] = ()

    @property
    def depth(self) -> int:
        return len(self.decoders)

    def resolve(self, root: nn.Module) -> Layout:
        """The :class:`~fastunet.ops.Layout` over ``root``'s modules at the recorded paths."""
        return Layout(
            encoders=tuple((a.resolve(root), b.resolve(root)) for a, b in self.encoders),
            ups=tuple(up.resolve(root) for up in self.ups),
            decoders=tuple((a.resolve(root), b.resolve(root)) for a, b in self.decoders),
            head=root.get_submodule(self.head),
            up_first=self.up_first,
            join=self.join,
            down=self.down,
        )

    def locate(self, stage: str) -> str | None:
        return dict(self.where).get(stage)


# ---------------------------------------------------------------------------------------------------------------
# The execution trace
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Step:
    """One recorded call: ``kind`` (what the matcher reads it as), the steps its data inputs came from (0 is the
    input), where it ran (for messages), the module (a module call, or the module whose parameters a functional
    call read), the output's shape, and ``info``: the call's settings."""

    index: int
    kind: str
    inputs: tuple[int, ...]
    where: str
    shape: tuple[int, ...] = ()
    module: nn.Module | None = None
    path: str | None = None
    info: dict = dataclasses.field(default_factory=dict)


def _fn_name(func) -> str:
    name = getattr(func, "__name__", repr(func))
    qualname = getattr(func, "__qualname__", name)
    if "TensorBase." in qualname or qualname.startswith("Tensor."):
        return f"Tensor.{name}"
    module = getattr(func, "__module__", None) or "torch"
    if module == "torch.nn.functional":
        return f"F.{name}"
    return f"torch.{name}" if module.startswith("torch") else f"{module}.{name}"


T = torch.Tensor
_RELU_FNS = {F.relu, F.relu_, torch.relu, torch.relu_, T.relu, T.relu_}
_LEAKY_FNS = {F.leaky_relu, F.leaky_relu_}
_HARDTANH_FNS = {F.hardtanh, F.hardtanh_}
_CLAMP_FNS = {torch.clamp, torch.clip, T.clamp, T.clamp_, T.clip, T.clip_}
_OTHER_ACT_FNS = {
    F.gelu, F.elu, F.selu, F.celu, F.mish, F.hardswish, F.hardsigmoid, F.softplus, F.sigmoid, F.tanh, torch.sigmoid,
    torch.tanh, T.sigmoid, T.tanh, F.softmax, F.log_softmax, F.glu,
}  # fmt: skip
_NORM_FNS = {F.instance_norm, F.group_norm, F.layer_norm, F.local_response_norm, torch.group_norm, torch.layer_norm}
_MAXPOOL_FNS = {F.max_pool2d, torch.max_pool2d, F.max_pool2d_with_indices}
_INTERP_FNS = {F.interpolate, F.upsample, F.upsample_bilinear, F.upsample_nearest}
_CAT_FNS = {torch.cat, torch.concat, torch.concatenate}
_DROPOUT_FNS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}
_SAME_FNS = {T.contiguous, T.clone, torch.clone, T.detach, torch.detach, T.to, T.type_as, T.float, T.double, T.type}
_VIEW_FNS = {
    T.view, T.reshape, torch.reshape, T.permute, torch.permute, T.transpose, torch.transpose, T.flatten,
    torch.flatten, T.unflatten, T.squeeze, T.unsqueeze, torch.squeeze, torch.unsqueeze, T.movedim, torch.movedim,
    T.narrow, torch.narrow, T.__getitem__,
}  # fmt: skip
_ACT_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.SiLU, nn.ReLU6, nn.Hardtanh)
_PAD_MODULES = (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReplicationPad2d, nn.ReflectionPad2d, nn.CircularPad2d)
_NORM_MODULES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
_ONE_OR_THREE_D = (
    nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose3d, nn.BatchNorm1d, nn.BatchNorm3d, nn.InstanceNorm1d,
    nn.InstanceNorm3d, nn.MaxPool1d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool3d,
)  # fmt: skip


def _arg(args, kwargs, index: int, name: str, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _atomic(module: nn.Module) -> bool:
    """A leaf module that torch.nn defines: recorded as one step (its own forward is torch's)."""
    return type(module).__module__.startswith("torch.nn.") and not module._modules


class _Recorder(TorchFunctionMode):
    """Records the forward of ``model`` (see the module doc). Use :meth:`run`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.paths = {id(m): name for name, m in model.named_modules()}
        self.owners: dict[int, tuple[nn.Module, str]] = {}
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for leaf, tensor in table.items():
                    if tensor is not None:
                        self.owners.setdefault(id(tensor), (module, leaf))
        self.steps: list[Step] = []
        self.producer: dict[int, int] = {}
        self.kept: list[torch.Tensor] = []  # ids stay unique while the tensors live
        self.called: set[int] = set()  # modules that ran
        self.touched: set[int] = set()  # modules whose parameters or buffers a traced function read
        self.stack: list[nn.Module] = []
        self.inside_atomic = 0

    # -- helpers ----------------------------------------------------------------------------------------------
    def _location(self) -> str:
        module = self.stack[-1] if self.stack else self.model
        path = self.paths.get(id(module), "")
        return f"in '{path}' ({type(module).__name__}.forward)" if path else f"in {type(module).__name__}.forward"

    def _add(self, kind: str, inputs, where: str, out, **fields) -> Step:
        step = Step(len(self.steps), kind, tuple(inputs), where, **fields)
        self.steps.append(step)
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for tensor in outputs:
            if isinstance(tensor, torch.Tensor):
                self.producer[id(tensor)] = step.index
                self.kept.append(tensor)
                if not step.shape:
                    step.shape = tuple(tensor.shape)
        return step

    def _data(self, values) -> list[int]:
        """The producing steps of the data tensors among ``values`` (parameters and buffers are not data)."""
        found = []
        for value in values:
            if isinstance(value, (tuple, list)):
                found += self._data(value)
            elif isinstance(value, torch.Tensor):
                if id(value) in self.producer:
                    found.append(self.producer[id(value)])
                elif id(value) not in self.owners:
                    constant = Step(len(self.steps), "other", (), "a tensor made outside the traced ops")
                    constant.info["name"] = "a constant tensor"
                    self.steps.append(constant)
                    self.producer[id(value)] = constant.index
                    self.kept.append(value)
                    found.append(constant.index)
        return found

    def _owner(self, tensor) -> tuple[nn.Module | None, str | None]:
        if not isinstance(tensor, torch.Tensor) or id(tensor) not in self.owners:
            return None, None
        module, _ = self.owners[id(tensor)]
        return module, self.paths.get(id(module))

    # -- module calls -----------------------------------------------------------------------------------------
    def _pre_hook(self, module, args):
        self.stack.append(module)
        self.called.add(id(module))
        if _atomic(module):
            self.inside_atomic += 1

    def _post_hook(self, module, args, out):
        self.stack.pop()
        if not _atomic(module):
            return
        self.inside_atomic -= 1
        path = self.paths.get(id(module), "")
        where = f"{type(module).__name__} at '{path}'"
        inputs = self._data(args)
        if isinstance(module, (nn.modules.dropout._DropoutNd, nn.Identity)) and len(inputs) == 1:
            if isinstance(out, torch.Tensor):
                self.producer[id(out)] = inputs[0]
                self.kept.append(out)
            return
        kind = "other"
        info: dict = {}
        if type(module) is nn.Conv2d or type(module) is nn.ConvTranspose2d:
            kind = "conv" if type(module) is nn.Conv2d else "conv_transpose"
        elif isinstance(module, _NORM_MODULES):
            kind = "norm"
        elif type(module).__module__ == "torch.nn.modules.activation":
            kind = "act"
        elif type(module) is nn.MaxPool2d:
            kind = "maxpool"
            info = dict(
                kernel=module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                ceil=module.ceil_mode,
                indices=module.return_indices,
            )
        elif type(module) is nn.AvgPool2d:
            kind, info = "avgpool", dict(kernel=module.kernel_size, stride=module.stride, padding=module.padding)
        elif type(module) in (nn.Upsample, nn.UpsamplingBilinear2d, nn.UpsamplingNearest2d):
            kind = "interp"
        elif isinstance(module, _PAD_MODULES):
            mode = {nn.ReplicationPad2d: "replicate", nn.ReflectionPad2d: "reflect", nn.CircularPad2d: "circular"}
            kind = "pad"
            info = dict(pads=tuple(module.padding), mode=mode.get(type(module), "constant"))
            info["value"] = float(getattr(module, "value", 0.0))
        elif type(module) is nn.PixelShuffle:
            kind, info = "pixel_shuffle", dict(factor=module.upscale_factor)
        step = self._add(kind, inputs, where, out, module=module, path=path, info=info)
        step.info.setdefault("name", type(module).__name__)

    # -- functions --------------------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside_atomic == 0:
            for value in itertools.chain(_flat(args), _flat(kwargs.values())):
                if isinstance(value, torch.Tensor) and id(value) in self.owners:
                    self.touched.add(id(self.owners[id(value)][0]))
        if self.inside_atomic == 0 and func is T.__setitem__:  # an in-place write: what reads the tensor next reads it
            target = args[0]
            self._add("other", self._data(list(args)), f"Tensor.__setitem__ {self._location()}", target)
            return out
        if self.inside_atomic == 0 and (
            isinstance(out, torch.Tensor)
            or (isinstance(out, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in out))
        ):
            self._function(func, args, kwargs, out)
        return out

    def _function(self, func, args, kwargs, out) -> None:
        name = _fn_name(func)
        where = f"{name} {self._location()}"
        first = args[0] if args else None
        if func in _CAT_FNS:
            tensors = list(first)
            self._add("cat", self._data(tensors), where, out, info=dict(dim=_arg(args, kwargs, 1, "dim", 0), name=name))
            return
        inputs = self._data([first]) if isinstance(first, torch.Tensor) else []
        kind, info, module, path = "other", {"name": name}, None, None
        if (func in _DROPOUT_FNS and not _arg(args, kwargs, 2, "training", True)) or (
            func in _SAME_FNS
            and isinstance(out, torch.Tensor)
            and isinstance(first, torch.Tensor)
            and (out.dtype, out.device, out.shape) == (first.dtype, first.device, first.shape)
        ):
            if len(inputs) == 1:
                self.producer[id(out)] = inputs[0]
                self.kept.append(out)
                return
        if func in (torch.conv2d, torch.conv_transpose2d):
            module, path = self._owner(_arg(args, kwargs, 1, "weight"))
            transpose = func is torch.conv_transpose2d
            expected = nn.ConvTranspose2d if transpose else nn.Conv2d
            if isinstance(module, expected) and self._same_conv(module, args, kwargs, transpose):
                kind = "conv_transpose" if transpose else "conv"
                where = f"{name} with the weights of {type(module).__name__} at '{path}' {self._location()}"
            else:
                info["why"] = (
                    "the layout needs each conv to be an nn.Conv2d (or ConvTranspose2d) called with its own weight, "
                    "bias and settings"
                )
        elif func in (F.batch_norm, torch.batch_norm):
            module, path = self._owner(_arg(args, kwargs, 1, "running_mean"))
            training = _arg(args, kwargs, 5, "training", False)
            if type(module) is nn.BatchNorm2d and not training and _arg(args, kwargs, 7, "eps", 1e-5) == module.eps:
                kind = "norm"
            else:
                info["why"] = "a functional batch_norm folds only with an nn.BatchNorm2d's own statistics, in eval"
        elif func in _NORM_FNS:
            module, path, why = self._own_norm(func, args, kwargs)
            if why is None:
                kind = "norm"
            else:
                info["why"] = why
        elif func in _RELU_FNS:
            kind, info["act"] = "act", ActRecipe("relu")
        elif func in _LEAKY_FNS:
            slope = float(_arg(args, kwargs, 1, "negative_slope", 0.01))
            kind, info["act"] = "act", ActRecipe("leaky_relu", slope=slope)
        elif func is F.silu:
            kind, info["act"] = "act", ActRecipe("silu")
        elif func is F.relu6:
            kind, info["act"] = "act", ActRecipe("clamp", lo=0.0, hi=6.0)
        elif func in _HARDTANH_FNS:
            lo, hi = float(_arg(args, kwargs, 1, "min_val", -1.0)), float(_arg(args, kwargs, 2, "max_val", 1.0))
            kind, info["act"] = "act", ActRecipe("clamp", lo=lo, hi=hi)
        elif func in _CLAMP_FNS:
            lo, hi = _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max")
            if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo <= hi:
                kind, info["act"] = "act", ActRecipe("clamp", lo=float(lo), hi=float(hi))
            elif lo == 0 and hi is None:
                kind, info["act"] = "act", ActRecipe("relu")
        elif func in (F.prelu, torch.prelu):
            module, path = self._owner(_arg(args, kwargs, 1, "weight"))
            if type(module) is nn.PReLU:
                kind, info["act"] = "act", ActRecipe("prelu", path=path)
        elif func in _OTHER_ACT_FNS:
            info["why"] = "not a supported activation (ReLU, LeakyReLU, PReLU, SiLU, ReLU6, Hardtanh or none)"
        elif func in _MAXPOOL_FNS:
            kind = "maxpool"
            info |= dict(
                kernel=_arg(args, kwargs, 1, "kernel_size"),
                stride=_arg(args, kwargs, 2, "stride") or None,
                padding=_arg(args, kwargs, 3, "padding", 0),
                dilation=_arg(args, kwargs, 4, "dilation", 1),
                ceil=_arg(args, kwargs, 5, "ceil_mode", False),
                indices=func is F.max_pool2d_with_indices or _arg(args, kwargs, 6, "return_indices", False),
            )
        elif func is F.avg_pool2d:
            kind = "avgpool"
            info |= dict(
                kernel=_arg(args, kwargs, 1, "kernel_size"),
                stride=_arg(args, kwargs, 2, "stride") or None,
                padding=_arg(args, kwargs, 3, "padding", 0),
            )
        elif func in _INTERP_FNS:
            kind = "interp"
            defaults = {F.upsample_bilinear: ("bilinear", True), F.upsample_nearest: ("nearest", None)}
            mode, align = defaults.get(func, (_arg(args, kwargs, 3, "mode", "nearest"), None))
            info |= dict(
                size=_arg(args, kwargs, 1, "size"),
                scale=_arg(args, kwargs, 2, "scale_factor"),
                mode=mode,
                align=align if func in defaults else _arg(args, kwargs, 4, "align_corners"),
            )
        elif func in (F.pad, torch.constant_pad_nd):
            kind = "pad"
            mode = "constant" if func is torch.constant_pad_nd else _arg(args, kwargs, 2, "mode", "constant")
            value = _arg(args, kwargs, 2 if func is torch.constant_pad_nd else 3, "value", 0.0)
            info |= dict(pads=tuple(_arg(args, kwargs, 1, "pad")), mode=mode, value=float(value or 0.0))
        elif func in (F.pixel_shuffle, torch.pixel_shuffle):
            kind, info["factor"] = "pixel_shuffle", _arg(args, kwargs, 1, "upscale_factor")
        elif (
            func in _VIEW_FNS
            and len(inputs) == 1
            and not any(isinstance(a, torch.Tensor) for a in itertools.chain(_flat(args[1:]), _flat(kwargs.values())))
        ):
            kind = "view"
            rest = args[1:]
            info["replay"] = lambda t, func=func, rest=rest, kwargs=kwargs: func(t, *rest, **kwargs)
        if kind == "other":  # every tensor it reads: what reaches the output through it is on its way
            inputs = self._data([*args, *kwargs.values()])
        self._add(kind, inputs, where, out, module=module, path=path, info=info)

    def _own_norm(self, func, args, kwargs) -> tuple[nn.Module | None, str | None, str | None]:
        """The module of a functional instance or group norm that is exactly its module's eval-mode call (its own
        parameters, statistics and settings), and its path; else why not."""
        if func is F.instance_norm:
            why = (
                "a functional instance_norm maps onto the layout only as an nn.InstanceNorm2d's own eval-mode call "
                "(its weight, bias, running statistics and eps)"
            )
            owned = [_arg(args, kwargs, i, n) for i, n in ((3, "weight"), (1, "running_mean"))]
            module, path = next((self._owner(t) for t in owned if t is not None), (None, None))
            if type(module) is not nn.InstanceNorm2d:
                return None, None, why
            same = (
                _arg(args, kwargs, 3, "weight") is module.weight
                and _arg(args, kwargs, 4, "bias") is module.bias
                and _arg(args, kwargs, 1, "running_mean") is module.running_mean
                and _arg(args, kwargs, 2, "running_var") is module.running_var
                and bool(_arg(args, kwargs, 5, "use_input_stats", True)) == (module.running_mean is None)
                and _arg(args, kwargs, 7, "eps", 1e-5) == module.eps
            )
            return (module, path, None) if same else (None, None, why)
        if func in (F.group_norm, torch.group_norm):
            why = (
                "a functional group_norm maps onto the layout only as an nn.GroupNorm's own call (its weight, bias, "
                "number of groups and eps)"
            )
            weight = _arg(args, kwargs, 2, "weight")
            module, path = self._owner(weight) if weight is not None else (None, None)
            if type(module) is not nn.GroupNorm:
                return None, None, why
            same = (
                weight is module.weight
                and _arg(args, kwargs, 3, "bias") is module.bias
                and _arg(args, kwargs, 1, "num_groups") == module.num_groups
                and _arg(args, kwargs, 4, "eps", 1e-5) == module.eps
            )
            return (module, path, None) if same else (None, None, why)
        return None, None, "not a supported norm (BatchNorm2d, InstanceNorm2d, GroupNorm)"

    @staticmethod
    def _same_conv(module, args, kwargs, transpose: bool) -> bool:
        """Whether a functional conv call is exactly its module's own (weight, bias, stride, padding, ...)."""
        if _arg(args, kwargs, 1, "weight") is not module.weight or _arg(args, kwargs, 2, "bias") is not module.bias:
            return False
        if transpose:
            names = (("stride", 3, 1), ("padding", 4, 0), ("output_padding", 5, 0), ("groups", 6, 1))
            names += (("dilation", 7, 1),)
        else:
            names = (("stride", 3, 1), ("padding", 4, 0), ("dilation", 5, 1), ("groups", 6, 1))
        for attr, index, default in names:
            given, own = _arg(args, kwargs, index, attr, default), getattr(module, attr)
            if given != own and (isinstance(given, str) or isinstance(own, str) or _pair(given) != _pair(own)):
                return False
        return True

    # -- run --------------------------------------------------------------------------------------------------
    def run(self, x: torch.Tensor):
        self.steps = [Step(0, "input", (), "the input", tuple(x.shape))]
        self.producer, self.kept, self.called, self.stack, self.inside_atomic = {id(x): 0}, [x], set(), [], 0
        self.touched = set()
        handles = []
        for module in self.model.modules():
            handles.append(module.register_forward_pre_hook(self._pre_hook))
            handles.append(module.register_forward_hook(self._post_hook))
        try:
            with self:
                out = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        return out


def _flat(values):
    for value in values:
        if isinstance(value, (tuple, list)):
            yield from _flat(value)
        else:
            yield value


# ---------------------------------------------------------------------------------------------------------------
# Matching the trace to a layout
# ---------------------------------------------------------------------------------------------------------------
_STRUCTURE = (
    "the U-Net layout: conv [+ norm] [+ activation] pairs, 2x2 max-pools or stride-2 convs, 2x upsamplings, skip "
    "concatenations, a head conv"
)


class _Matcher:
    def __init__(self, name: str, recorder: _Recorder, output: torch.Tensor) -> None:
        self.name = name
        self.rec = recorder
        self.steps = recorder.steps
        self.output = recorder.producer.get(id(output))
        self.used: set[int] = set()  # steps the layout consumed
        self.where: dict[str, str] = {}

    def refuse(self, where: str, why: str) -> ConversionError:
        return ConversionError(f"convert: {self.name}: {where}: {why}")

    def step(self, index: int) -> Step:
        self.used.add(index)
        return self.steps[index]

    # -- movement chains (reshape, permute, indexing): their net effect on an index map -----------------------------
    def movement(self, index: int) -> tuple[int, torch.Tensor | None]:
        """The step before the chain of view/indexing steps ending at ``index``, and the chain's effect on an
        index map of that step's output (None: no chain)."""
        chain = []
        while self.steps[index].kind == "view":
            chain.append(index)
            index = self.steps[index].inputs[0]
        if not chain:
            return index, None
        shape = self.steps[index].shape
        mapped = torch.arange(int(torch.Size(shape).numel())).reshape(shape)
        for step_index in reversed(chain):
            self.used.add(step_index)
            mapped = self.steps[step_index].info["replay"](mapped)
        return index, mapped

    def resolved(self, index: int) -> int:
        """``index`` with view chains that move nothing (identity reshapes, full slices) looked through."""
        base, mapped = self.movement(index)
        if mapped is not None and mapped.shape == self.steps[base].shape:
            if torch.equal(mapped, torch.arange(mapped.numel()).reshape(mapped.shape)):
                return base
        return index

    # -- per-step checks, in execution order (the first blocker the forward meets) --------------------------------
    def live(self) -> list[int]:
        seen, todo = set(), [self.output]
        while todo:
            index = todo.pop()
            if index not in seen:
                seen.add(index)
                todo += self.steps[index].inputs
        return sorted(seen)

    def check_steps(self) -> None:
        for index in self.live():
            step = self.steps[index]
            if step.kind == "other":
                why = step.info.get("why") or f"not part of {_STRUCTURE}"
                raise self.refuse(step.where, why)
            if step.kind == "norm":
                self.check_norm(step)
            elif step.kind == "act" and step.module is not None:
                try:
                    act_of(step.module)
                except ValueError as failure:
                    raise self.refuse(step.where, str(failure)) from None
            elif step.kind == "conv":
                self.check_conv(step, (1, 3))
            elif step.kind == "maxpool":
                self.check_pool(step)

    def check_norm(self, step: Step) -> None:
        """BatchNorm2d with running statistics, InstanceNorm2d (with or without them) and GroupNorm map onto the
        layout (see :func:`fastunet.ops.norm_kind`)."""
        norm = step.module
        if type(norm) not in (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm):
            raise self.refuse(step.where, "not a supported norm (BatchNorm2d, InstanceNorm2d, GroupNorm)")
        if type(norm) is nn.BatchNorm2d and (not norm.track_running_stats or norm.running_mean is None):
            raise self.refuse(
                step.where,
                "BatchNorm2d without running statistics normalizes by batch statistics even in eval mode: it cannot "
                "fold into the conv weights",
            )

    def check_conv(self, step: Step, kernels: tuple[int, ...]) -> None:
        conv = step.module
        problems = []
        kernel = _pair(conv.kernel_size)
        if kernel[0] != kernel[1] or kernel[0] not in kernels:
            problems.append(f"kernel {conv.kernel_size} (expected {' or '.join(f'{k}x{k}' for k in kernels)})")
        if _pair(conv.stride) == (2, 2):
            if kernel != (3, 3) or conv.padding in ("same", "valid") or _pair(conv.padding) != (1, 1):
                problems.append(
                    f"stride {conv.stride} with kernel {conv.kernel_size} and padding {conv.padding} (a strided conv "
                    "down-samples in the layout only as a 3x3 conv with stride 2 and padding 1)"
                )
        elif _pair(conv.stride) != (1, 1):
            problems.append(
                f"stride {conv.stride} (expected 1, or 2 for a level's first conv: the layout down-samples by a 2x2 "
                "max-pool or a 3x3 stride-2 conv)"
            )
        if conv.padding not in ("same", "valid") and _pair(conv.padding) not in ((0, 0), (kernel[0] // 2,) * 2):
            problems.append(f"padding {conv.padding} (expected {kernel[0] // 2}, or 0 for valid convs)")
        if _pair(conv.dilation) != (1, 1):
            problems.append(f"dilation {conv.dilation} (expected 1)")
        if conv.groups != 1:
            problems.append(f"groups={conv.groups} (grouped convolution is not fused)")
        if conv.padding_mode != "zeros":
            problems.append(f"padding_mode={conv.padding_mode!r} (expected 'zeros')")
        if problems:
            raise self.refuse(step.where, "; ".join(problems))

    def check_pool(self, step: Step) -> None:
        info = step.info
        stride = info["stride"] if info["stride"] is not None else info["kernel"]
        if (
            _pair(info["kernel"]) != (2, 2)
            or _pair(stride) != (2, 2)
            or _pair(info["padding"]) != (0, 0)
            or _pair(info["dilation"]) != (1, 1)
            or info["ceil"]
            or info["indices"]
        ):
            raise self.refuse(step.where, "only a 2x2 max-pool with stride 2, no padding, floor mode is fused")

    # -- structure ----------------------------------------------------------------------------------------------
    def path_of(self, step: Step) -> str:
        return f"'{step.path}'" if step.path is not None else step.where

    def conv_group(self, index: int) -> tuple[ConvRecipe, int, list[str]] | None:
        """One conv [+ norm] [+ activation] group ending at ``index`` (read backwards), or None if ``index`` is no
        part of one."""
        index = self.resolved(index)
        step, act, norm = self.steps[index], None, None
        if step.kind == "act":
            act, index = step, self.resolved(step.inputs[0])
            step = self.steps[index]
        if step.kind == "norm":
            norm, index = step, self.resolved(step.inputs[0])
            step = self.steps[index]
        if step.kind != "conv" or _pair(step.module.kernel_size) != (3, 3):
            if act is None and norm is None:
                return None
            after = norm or act
            raise self.refuse(
                after.where, f"expected a 3x3 conv before it (conv [+ norm] [+ activation]), found {step.where}"
            )
        for used in (act, norm, step):
            if used is not None:
                self.used.add(used.index)
        if norm is not None:
            channels = getattr(norm.module, "num_features", getattr(norm.module, "num_channels", None))
            if channels != step.module.out_channels:
                raise self.refuse(
                    norm.where, f"normalizes {channels} channels, the conv writes {step.module.out_channels}"
                )
        if act is None:
            act_recipe = ActRecipe("none")
        elif act.module is not None and act.info.get("act") is None:
            act_recipe = ActRecipe(act_of(act.module).kind, path=act.path, from_module=True)
        else:
            act_recipe = act.info["act"]
        paths = [self.path_of(s) for s in (step, norm, act) if s is not None]
        return ConvRecipe(step.path, norm.path if norm is not None else None, act_recipe), step.inputs[0], paths

    def groups(self, index: int, stop: int | None = None) -> tuple[list, int]:
        """The conv groups read backwards from ``index`` (last first, up to the step ``stop`` if it is met) and the
        step before the first of them."""
        groups = []
        while self.resolved(index) != stop and (group := self.conv_group(index)) is not None:
            groups.append(group)
            index = group[1]
        return groups, self.resolved(index)

    def pair(self, groups: list, first: int, stage: str) -> Pair:
        """The level's two groups (``stage`` names it in messages and in :attr:`Recipe.where`)."""
        if len(groups) != 2:
            convs = ", ".join(f"'{g[0].conv}'" for g in reversed(groups)) or "none"
            raise self.refuse(
                stage,
                f"has {len(groups)} convs ({convs}; before them: {self.steps[first].where}): the layout has two conv "
                "[+ norm] [+ activation] groups per level",
            )
        second, first_group = groups
        self.where[f"{stage}.conv1"] = ", ".join(first_group[2])
        self.where[f"{stage}.conv2"] = ", ".join(second[2])
        return first_group[0], second[0]

    def head(self) -> tuple[str, int]:
        index = self.resolved(self.output)
        step = self.step(index)
        if step.kind == "conv_transpose":
            raise self.refuse(
                step.where,
                "the output comes from a transposed conv: an up-sampling after the last skip concatenation (as in "
                "MONAI's UNet, whose up path up-samples the concatenated map); the layout concatenates a skip with "
                "the map up-sampled to its size, then runs two 3x3 convs and a head conv at that size",
            )
        if step.kind != "conv":
            raise self.refuse(
                step.where,
                "the output comes from here, not from a conv: the layout ends with the head conv (the logits, no "
                "activation after it)",
            )
        self.check_conv(step, (1, 3))
        if _pair(step.module.stride) != (1, 1):
            raise self.refuse(step.where, f"stride {step.module.stride}: the head conv has stride 1")
        self.where["head"] = f"'{step.path}'"
        return step.path, step.inputs[0]

    def pad_join(self, step: Step, skip_shape: tuple[int, ...]) -> str | None:
        pads = tuple(step.info["pads"])
        before = self.steps[step.inputs[0]].shape
        dy, dx = skip_shape[-2] - before[-2], skip_shape[-1] - before[-1]
        spatial = (pads + (0, 0, 0, 0))[:4]
        if any(pads[4:]) or not any(spatial):
            return None if not any(pads) else "bad"
        mode, value = step.info["mode"], step.info["value"]
        if mode == "constant" and value == 0 and spatial == (dx // 2, dx - dx // 2, dy // 2, dy - dy // 2):
            return "pad"
        if mode == "replicate" and spatial == (0, dx, 0, dy):
            return "replicate"
        return "bad"

    def up_branch(self, index: int, skip_shape) -> tuple[UpRecipe, str | None, int, str] | None:
        """The upsampling read backwards from a concatenation's operand, or None if it is not one."""
        try:
            return self._up_branch(index, skip_shape)
        except ConversionError as failure:
            message = str(failure)
            if not message.startswith(f"convert: {self.name}: "):
                message = message.replace("convert: ", f"convert: {self.name}: ", 1)
            raise ConversionError(message) from None

    def _up_branch(self, index: int, skip_shape) -> tuple[UpRecipe, str | None, int, str] | None:
        index = self.resolved(index)
        step, join, visited, join_where = self.steps[index], None, [], None
        if step.kind == "pad":
            join = self.pad_join(step, skip_shape)
            if join == "bad":
                raise self.refuse(
                    step.where,
                    f"pads the upsampled map by {step.info['pads']} ({step.info['mode']}, value "
                    f"{step.info['value']}) to the skip's {tuple(skip_shape[-2:])}: the layout pads it with zeros, "
                    "centred, or by replicating its last row and column",
                )
            visited.append(index)
            join_where = step.where
            index = self.resolved(step.inputs[0])
            step = self.steps[index]
        blur = False
        if step.kind == "avgpool":
            pad = self.steps[self.resolved(step.inputs[0])]
            info = step.info
            stride = info["stride"] if info["stride"] is not None else info["kernel"]
            if not (
                _pair(info["kernel"]) == (2, 2)
                and _pair(stride) == (1, 1)
                and _pair(info["padding"]) == (0, 0)
                and pad.kind == "pad"
                and tuple(pad.info["pads"]) == (1, 0, 1, 0)
                and pad.info["mode"] == "constant"
                and pad.info["value"] == 0
            ):
                raise self.refuse(
                    step.where, "average pooling is not part of the layout (but for the 2x2 blur after pixel shuffle)"
                )
            visited += [index, pad.index]
            index, blur = self.resolved(pad.inputs[0]), True
            step = self.steps[index]
        base, mapped = self.movement(index)
        if step.kind == "pixel_shuffle" or (mapped is not None and self.steps[base].kind == "conv"):
            if step.kind == "pixel_shuffle":
                if step.info["factor"] != 2:
                    raise self.refuse(step.where, f"pixel shuffle by {step.info['factor']}: only 2x is fused")
                visited.append(index)
                base = self.resolved(step.inputs[0])
            else:
                shape = self.steps[base].shape
                reference = F.pixel_shuffle(torch.arange(int(torch.Size(shape).numel())).reshape(shape), 2)
                if mapped.shape != reference.shape or not torch.equal(mapped, reference):
                    raise self.refuse(step.where, "reshapes the map in a way that is not a 2x pixel shuffle")
            conv = self.steps[base]
            if conv.kind != "conv":
                raise self.refuse(step.where, f"pixel shuffle of {conv.where}: the layout shuffles a conv's output")
            visited.append(base)
            up = UpRecipe("pixelshuffle", conv=conv.path, blur=blur)
            below, where = conv.inputs[0], f"'{conv.path}'"
        elif blur:
            raise self.refuse(step.where, "the 2x2 blur is fused only after a pixel shuffle")
        elif step.kind == "conv_transpose":
            visited.append(index)
            module_call = step.info.get("name") == "ConvTranspose2d"
            read_up(step.path, step.module, transpose_k3=True)  # its settings
            up = UpRecipe("transpose", module=step.path if module_call else None, conv=step.path)
            below, where = step.inputs[0], f"'{step.path}'"
        elif step.kind == "interp":
            visited.append(index)
            if step.module is not None:
                spec = read_up(step.path, step.module)
                up = UpRecipe(spec.mode, module=step.path)
            else:
                info = step.info
                spec = _interpolation(step.where, info["mode"], info["scale"], info["size"], info["align"])
                up = UpRecipe(spec.mode, align_corners=spec.align_corners)
            below, where = self.resolved(step.inputs[0]), step.where
            pre = self.steps[below]
            if pre.kind == "conv" and _pair(pre.module.kernel_size) == (1, 1):
                visited.append(below)
                up = dataclasses.replace(up, pre_conv=pre.path)
                below, where = pre.inputs[0], f"'{pre.path}', {where}"
        else:
            return None
        self.used.update(visited)
        return up, (join, join_where) if join else None, self.resolved(below), where

    def skip_branch(self, index: int, up_shape) -> tuple[int, tuple[str, str] | None]:
        base, mapped = self.movement(index)
        if mapped is None:
            return self.resolved(index), None
        shape = self.steps[base].shape
        full = torch.arange(int(torch.Size(shape).numel())).reshape(shape)
        dy, dx = shape[-2] - up_shape[-2], shape[-1] - up_shape[-1]
        if dy >= 0 and dx >= 0:
            top, left = dy // 2, dx // 2
            crop = full[..., top : top + up_shape[-2], left : left + up_shape[-1]]
            if mapped.shape == crop.shape and torch.equal(mapped, crop):
                return self.resolved(base), (("crop", self.steps[index].where) if dy or dx else None)
        raise self.refuse(
            self.steps[index].where,
            f"the skip {tuple(shape[-2:])} is reshaped or cut in a way that is not a centred crop to the upsampled "
            f"map's {tuple(up_shape[-2:])}",
        )

    def decoder_level(self, cat: Step, level: int):
        operands = cat.inputs
        dim = cat.info["dim"]
        if len(operands) != 2 or dim not in (1, -3):
            raise self.refuse(
                cat.where, f"concatenates {len(operands)} maps along dim {dim}: the layout joins a skip and an "
                "upsampled map along the channels"
            )  # fmt: skip
        shapes = [self.steps[i].shape for i in operands]
        for up_index, skip_index, order in ((operands[1], operands[0], False), (operands[0], operands[1], True)):
            skip_shape = self.steps[self.resolved(skip_index)].shape
            found = self.up_branch(up_index, skip_shape)
            if found is not None:
                up_first = order
                break
        else:
            a, b = (self.steps[self.resolved(i)].where for i in operands)
            raise self.refuse(cat.where, f"neither input ({a}; {b}) is an upsampled map (the layout's decoder "
                              "concatenates a skip with a 2x upsampling of the level below)")  # fmt: skip
        up, join, below, where = found
        skip, crop = self.skip_branch(skip_index, shapes[operands.index(up_index)])
        self.where[f"dec{level}.up"] = where
        return up, up_first, join or crop, below, skip

    def match(self) -> Recipe:
        if self.output is None:
            raise ConversionError(f"convert: {self.name}.forward returns a tensor that no traced step produced")
        self.check_steps()
        head, index = self.head()
        decoders, ups, up_first, joins, skips = [], [], [], [], []
        while True:
            level = len(decoders)
            # Below a decoder level: another one (its convs read a concatenation), or the bottleneck, whose first
            # conv reads the pooled skip of the level above, or that skip itself with stride 2.
            groups, first = self.groups(index, stop=skips[-1] if skips else None)
            step = self.step(first)
            if step.kind == "cat":
                decoders.append(self.pair(groups, first, f"dec{level}"))
                up, order, join, below, skip = self.decoder_level(step, level)
                ups.append(up)
                up_first.append(order)
                skips.append(skip)
                if join is not None:
                    joins.append(join)
                index = below
                continue
            if decoders and (step.kind == "maxpool" or first == skips[-1]):
                bottleneck = self.pair(groups, first, "bottleneck")
                break
            convs = ", ".join(f"'{g[0].conv}'" for g in reversed(groups)) or "the head"
            raise self.refuse(
                step.where,
                f"feeds {convs}, where the layout has the concatenation of a skip and an upsampled map"
                + (" (or the bottleneck's 2x2 max-pool or stride-2 conv)" if decoders else " (the last decoder level)"),
            )
        depth = len(decoders)
        encoders: list = [None] * (depth + 1)
        encoders[depth] = bottleneck
        downs: dict[int, tuple[str, str]] = {}  # level: how the level above passes its map down, and where
        for level in reversed(range(1, depth + 1)):
            skip, stage = skips[level - 1], "bottleneck" if level == depth else f"enc{level}"
            step = self.step(first)
            if first == skip:  # the level's first conv reads the skip itself: a strided conv down-samples
                downs[level] = ("stride", self.where[f"{stage}.conv1"])
                index = skip
            elif step.kind == "maxpool":
                self.check_pool(step)
                index = self.resolved(step.inputs[0])
                if index != skip:
                    raise self.refuse(
                        f"dec{level - 1}",
                        f"concatenates {self.steps[skip].where}, but the encoder's level {level - 1} output (pooled "
                        f"by {step.where}) is {self.steps[index].where}",
                    )
                downs[level] = ("pool", step.where)
            else:
                raise self.refuse(
                    step.where,
                    f"found where the layout has a 2x2 max-pool (or, for a stride-2 first conv of {stage}, the skip "
                    f"{self.steps[skip].where})",
                )
            groups, first = self.groups(index, stop=skips[level - 2] if level > 1 else None)
            encoders[level - 1] = self.pair(groups, first, f"enc{level - 1}")
        if first != 0:
            raise self.refuse(self.step(first).where, "found where the first conv should read the input")
        down = self.down(downs, depth)
        self.check_strides(encoders, decoders, ups, down)
        kinds = {kind for kind, _ in joins}
        if len(kinds) > 1:
            raise self.refuse(
                "; ".join(where for _, where in joins), f"joins the skips in different ways ({sorted(kinds)})"
            )
        join = kinds.pop() if kinds else "pad"
        if joins:
            self.where["join"] = joins[0][1]
        # Levels were read from the output down: level 0 first, as the layout indexes them.
        return Recipe(
            encoders=tuple(encoders),
            ups=tuple(ups),
            decoders=tuple(decoders),
            head=head,
            up_first=tuple(up_first),
            join=join,
            down=down,
            where=tuple(self.where.items()),
        )

    def down(self, downs: dict[int, tuple[str, str]], depth: int) -> str:
        """The layout's ``down``: every level down-samples the same way."""
        kinds = {kind for kind, _ in downs.values()}
        if len(kinds) > 1:
            stage = {level: "bottleneck" if level == depth else f"enc{level}" for level in downs}
            told = "; ".join(
                f"{stage[level]}: {'a 2x2 max-pool' if kind == 'pool' else 'a stride-2 conv'} ({where})"
                for level, (kind, where) in sorted(downs.items())
            )
            raise self.refuse(
                "down-sampling", f"mixes max-pools and strided convs ({told}): the layout down-samples the same way "
                "at every level"
            )  # fmt: skip
        return kinds.pop()

    def check_strides(self, encoders: list, decoders: list, ups: list, down: str) -> None:
        """A stride-2 conv only as the first conv of a level below the first, where the layout strides."""
        model = self.rec.model
        convs = []
        for level, pair in enumerate(encoders):
            for i, recipe in enumerate(pair):
                convs.append((recipe.conv, down == "stride" and level > 0 and i == 0))
        convs += [(recipe.conv, False) for pair in decoders for recipe in pair]
        for up in ups:  # a transposed conv's stride is its upsampling (read_up checks it)
            convs += [(path, False) for path in (up.pre_conv, up.conv if up.mode == "pixelshuffle" else None) if path]
        for path, strided in convs:
            stride = _pair(model.get_submodule(path).stride)
            if strided and stride != (2, 2):
                raise self.refuse(
                    f"'{path}'", f"reads the skip of the level above at its own size (stride {stride}): a level "
                    "down-samples by a 2x2 max-pool or by a stride-2 first conv"
                )  # fmt: skip
            if not strided and stride != (1, 1):
                raise self.refuse(
                    f"'{path}'", f"stride {stride}: a strided conv is fused only as the first conv of an encoder "
                    "level, where it down-samples"
                )  # fmt: skip

    def check_accounted(self, recipe: Recipe, model: nn.Module) -> None:
        """What the eval forward runs is the layout: every module that ran, or whose parameters or buffers a traced
        call read, is one the layout reads, a container, an eval-mode no-op (dropout, ``nn.Identity``), or a leaf
        whose result the layout consumed; one that ran with its result discarded is refused. A module that never
        ran and whose tensors nothing read (the trace shows it) is no part of the eval forward and is left out:
        nnU-Net's deep-supervision heads with deep supervision off."""
        layout = recipe.resolve(model)
        reads = {id(layout.head)}
        for pair in (*layout.encoders, *layout.decoders):
            for spec in pair:
                reads |= {id(spec.conv), id(spec.norm), id(spec.activation.module)}
        for up in layout.ups:
            reads |= {id(up.conv), id(up.pre_conv)}
        consumed = {id(self.steps[i].module) for i in self.used if self.steps[i].module is not None}
        for path, module in model.named_modules():
            if id(module) in reads:
                continue
            if id(module) not in self.rec.called and id(module) not in self.rec.touched:
                continue  # never ran in the eval forward: not part of what it computes
            leaf_ran = id(module) in self.rec.called and not module._modules
            no_op = isinstance(module, (nn.Identity, nn.modules.dropout._DropoutNd))  # eval-mode no-ops
            if leaf_ran and id(module) not in consumed and not no_op:
                raise self.refuse(
                    f"{type(module).__name__} at '{path}'",
                    "runs, but its result does not reach the output: not part of the U-Net its forward computes",
                )
            for table, kind in ((module._parameters, "parameter"), (module._buffers, "buffer")):
                for leaf, tensor in table.items():
                    if tensor is not None:
                        name = f"{path}.{leaf}" if path else leaf
                        raise self.refuse(
                            f"{kind} '{name}' of {type(module).__name__}",
                            "read by the forward, but not used by the U-Net it computes (an extra branch, or one "
                            "whose result is discarded, that the fused forward would leave out)",
                        )


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------
def probe_sizes(depth: int) -> list[tuple[int, int]]:
    """(H, W) of the probes, in the order tried: odd sizes first, so that levels pad (or crop by odd amounts), the
    second for a valid-conv U-Net, which loses 4 pixels a level; then sizes divisible by ``2**(depth + 1)``, for a
    source whose forward accepts only those."""
    size = 2 ** (depth + 1)  # a bottleneck of 2x2 or more
    return [(size + 1, size + 3), (2 * size + 1, 2 * size + 3), (size, 2 * size), (2 * size, 2 * size)]


@dataclasses.dataclass
class Recognition:
    """What :func:`recognize` found: the recipe, the copy of the model it ran (float64 on the CPU, or on the meta
    device), the probe input and the copy's output."""

    recipe: Recipe
    probe: nn.Module
    x: torch.Tensor
    expected: torch.Tensor

    @property
    def numeric(self) -> bool:
        return self.x.device.type != "meta"


def _first_conv_channels(model: nn.Module, name: str) -> int:
    for path, module in model.named_modules():
        if isinstance(module, _ONE_OR_THREE_D):
            raise ConversionError(
                f"convert: {name}: {type(module).__name__} at '{path}': only 2-D U-Nets convert (1-D and 3-D layers "
                "are not supported)"
            )
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise ConversionError(f"convert: {name} has no nn.Conv2d: not a U-Net that convert can read")


_MAX_DEPTH_GUESS = 6


def recognize(model: nn.Module, *, numeric: bool = True) -> Recognition:
    """Run ``model``'s eval forward once on a copy (float64 on the CPU; on the meta device when ``numeric`` is
    False or the model's tensors are on the meta device), record what it computes and match it to a layout.

    The probe is batch 2, with the input channels of the model's first ``nn.Conv2d``, at the first of
    :func:`probe_sizes` the forward accepts (for a depth guessed from the model's max-pool modules and stride-2
    convs, then deeper);
    when the recognised depth is not the guess, the forward is recorded again at that depth's sizes. Raises
    :class:`ConversionError` naming the model, the module or call that does not fit, and why.
    """
    name = type(model).__name__
    in_channels = _first_conv_channels(model, name)
    on_meta = not numeric or any(t.device.type == "meta" for t in itertools.chain(model.parameters(), model.buffers()))
    try:
        probe = copy.deepcopy(model)
        probe = (probe.to("meta") if on_meta else probe.to("cpu", torch.float64)).eval()
    except Exception as failure:
        raise ConversionError(
            f"convert: {name}: could not make a {'meta' if on_meta else 'float64 CPU'} copy to run its forward "
            f"({type(failure).__name__}: {failure})"
        ) from failure
    device, dtype = ("meta", torch.float32) if on_meta else ("cpu", torch.float64)
    downs = sum(
        type(m) is nn.MaxPool2d or (type(m) is nn.Conv2d and _pair(m.stride) == (2, 2)) for m in model.modules()
    )
    guesses = sorted({max(1, downs), 4, _MAX_DEPTH_GUESS} - set(range(1, max(1, downs))))
    generator = torch.Generator().manual_seed(0)
    rejected: list[tuple[tuple[int, int], Exception]] = []

    def attempt(sizes):
        for height, width in sizes:
            x = torch.randn(2, in_channels, height, width, generator=generator, dtype=dtype).to(device)
            recorder = _Recorder(probe)
            try:
                with torch.no_grad():
                    out = recorder.run(x)
            except Exception as failure:  # e.g. a forward that accepts only sizes divisible by 16
                rejected.append(((height, width), failure))
                continue
            return recorder, x, out, sizes.index((height, width))
        return None

    found = None
    for guess in guesses:
        found = attempt(probe_sizes(guess))
        if found is not None:
            break
    if found is None:
        tried = ", ".join(f"{h}x{w}" for (h, w), _ in rejected)
        first = rejected[0][1]
        raise ConversionError(
            f"convert: {name}: convert runs {name}.forward once on a copy to see what it computes, and it raised on "
            f"every probe input tried (batch 2, {in_channels} channels, H x W {tried}); the first error: "
            f"{type(first).__name__}: {first}"
        ) from first
    recorder, x, out, kind = found
    if not isinstance(out, torch.Tensor):
        raise ConversionError(
            f"convert: {name}.forward returned {type(out).__name__}: the fused forward computes one tensor (logits)"
        )
    matcher = _Matcher(name, recorder, out)
    recipe = matcher.match()
    if probe_sizes(recipe.depth)[kind] != tuple(x.shape[-2:]):
        again = attempt([probe_sizes(recipe.depth)[kind]])
        if again is not None and isinstance(again[2], torch.Tensor):
            recorder, x, out, _ = again
            matcher = _Matcher(name, recorder, out)
            recipe = matcher.match()
    matcher.check_accounted(recipe, probe)
    return Recognition(recipe, probe, x, out)
