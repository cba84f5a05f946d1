"""``convert``: turn a supported U-Net module into a fused module over the same tensors.

Supported layouts:

* :class:`fastunet.UNet`: returns :meth:`FastUNet.from_reference`.
* The ``inc`` / ``down1..downN`` / ``up1..upN`` / ``outc`` layout of the most used public PyTorch U-Net
  (milesial/Pytorch-UNet): ``inc`` a double conv; ``down<i>.maxpool_conv`` = [MaxPool2d(2), double conv];
  ``up<i>.up`` = ``nn.Upsample(scale_factor=2, mode="bilinear" or "nearest")`` or ``ConvTranspose2d(k=2, s=2)``,
  ``up<i>.conv`` a double conv; ``outc.conv`` (or ``outc``) a 1x1 conv. A double conv is a module whose
  ``double_conv`` (or itself, if a Sequential) is [Conv2d 3x3, BatchNorm2d?, ReLU, Conv2d 3x3, BatchNorm2d?,
  ReLU] (``nn.Identity`` and dropout layers in it are eval-mode no-ops). ``up<i>`` upsamples the map below,
  zero-pads it (centered) to the skip's size and convolves ``cat([skip, up])`` or ``cat([up, skip])`` (found by
  the verification run, level by level). Widths are read from the weights.

Anything else raises :class:`ConversionError` naming the first module that could not be mapped and why. No
approximate conversion, no partial PyTorch fallback.
"""

from __future__ import annotations

import copy
import itertools
import warnings

import torch
from torch import nn

from fastunet.model import FastUNet, FusedForward
from fastunet.ops import ConvSpec, Layout, UpSpec, layout_forward
from fastunet.reference import UNet


class ConversionError(TypeError):
    """A module that :func:`convert` cannot map onto the fused kernels (the message names it and says why)."""


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _fail(path: str, module: nn.Module, why: str) -> ConversionError:
    return ConversionError(f"convert: cannot map '{path}' ({type(module).__name__}): {why}")


def _check_conv(path: str, conv: nn.Module, ksize: int) -> nn.Conv2d:
    if type(conv) is not nn.Conv2d:
        raise _fail(path, conv, f"expected an nn.Conv2d {ksize}x{ksize}")
    padding = ksize // 2
    problems = []
    if _pair(conv.kernel_size) != (ksize, ksize):
        problems.append(f"kernel {conv.kernel_size} (expected {ksize}x{ksize})")
    if _pair(conv.stride) != (1, 1):
        problems.append(f"stride {conv.stride} (expected 1)")
    named_ok = conv.padding == "same" or (conv.padding == "valid" and padding == 0)
    if not named_ok and _pair(conv.padding) != (padding, padding):
        problems.append(f"padding {conv.padding} (expected {padding})")
    if _pair(conv.dilation) != (1, 1):
        problems.append(f"dilation {conv.dilation} (expected 1)")
    if conv.groups != 1:
        problems.append(f"groups={conv.groups} (grouped convolution is not fused)")
    if conv.padding_mode != "zeros":
        problems.append(f"padding_mode={conv.padding_mode!r} (expected 'zeros')")
    if problems:
        raise _fail(path, conv, "; ".join(problems))
    return conv


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _check_norm(path: str, norm: nn.Module, channels: int) -> nn.BatchNorm2d:
    if type(norm) is not nn.BatchNorm2d:
        raise _fail(path, norm, "only BatchNorm2d (folded into the conv in eval mode) is supported as a norm")
    if not norm.track_running_stats or norm.running_mean is None:
        raise _fail(path, norm, "BatchNorm2d without running statistics cannot be folded for eval-mode inference")
    if norm.num_features != channels:
        raise _fail(path, norm, f"normalizes {norm.num_features} channels, the conv before it has {channels}")
    return norm


# Identity in eval mode: skipped where they stand in a double conv (in training mode the source's own forward runs).
_NO_OPS = (nn.Identity, nn.modules.dropout._DropoutNd)


def _read_double_conv(path: str, block: nn.Module, accepted: list[nn.Module]) -> tuple[ConvSpec, ConvSpec]:
    """[Conv2d 3x3, BatchNorm2d?, ReLU] twice, from ``block.double_conv`` or ``block`` itself; ``nn.Identity`` and
    dropout layers anywhere in it are no-ops (eval mode)."""
    if isinstance(getattr(block, "double_conv", None), nn.Sequential):
        seq, prefix = block.double_conv, f"{path}.double_conv"
    elif isinstance(block, nn.Sequential):
        seq, prefix = block, path
    else:
        raise _fail(path, block, "expected a double conv: a `double_conv` Sequential of conv3x3 [+ BatchNorm2d] + ReLU")
    layers = []
    for name, layer in seq.named_children():
        if isinstance(layer, _NO_OPS):
            accepted.append(layer)
        else:
            layers.append((name, layer))
    specs: list[ConvSpec] = []
    i = 0
    while i < len(layers):
        name, conv = layers[i]
        if len(specs) == 2:
            raise _fail(f"{prefix}.{name}", conv, "a double conv ends after its second ReLU")
        conv = _check_conv(f"{prefix}.{name}", conv, 3)
        i += 1
        norm = None
        if i < len(layers) and isinstance(layers[i][1], _NORMS):
            norm = _check_norm(f"{prefix}.{layers[i][0]}", layers[i][1], conv.out_channels)
            i += 1
        if i >= len(layers):
            raise _fail(prefix, seq, f"conv '{name}' is not followed by a ReLU")
        act_name, act = layers[i]
        if type(act) is not nn.ReLU:
            raise _fail(
                f"{prefix}.{act_name}", act, "only ReLU activations are fused (directly after the conv or its norm)"
            )
        i += 1
        accepted.append(act)
        specs.append(ConvSpec(conv, norm))
    if len(specs) != 2:
        raise _fail(prefix, seq, f"expected two conv [+ norm] + ReLU groups, found {len(specs)}")
    if specs[1].conv.in_channels != specs[0].conv.out_channels:
        raise _fail(prefix, seq, "the second conv does not read the first conv's channels")
    return specs[0], specs[1]


def _read_pool(path: str, pool: nn.Module, accepted: list[nn.Module]) -> None:
    if type(pool) is not nn.MaxPool2d:
        raise _fail(path, pool, "expected nn.MaxPool2d(2)")
    stride = pool.stride if pool.stride is not None else pool.kernel_size
    if (
        _pair(pool.kernel_size) != (2, 2)
        or _pair(stride) != (2, 2)
        or _pair(pool.padding) != (0, 0)
        or _pair(pool.dilation) != (1, 1)
        or pool.ceil_mode
        or pool.return_indices
    ):
        raise _fail(path, pool, "only a 2x2 max-pool with stride 2, no padding, floor mode is fused")
    accepted.append(pool)


def read_up(path: str, up: nn.Module, accepted: list[nn.Module] | None = None) -> UpSpec:
    """The :class:`~fastunet.ops.UpSpec` of a 2x upsampling module (``path`` names it in errors); ``accepted``
    collects the stateless modules mapped."""
    if accepted is None:
        accepted = []
    if type(up) is nn.ConvTranspose2d:
        if (
            _pair(up.kernel_size) != (2, 2)
            or _pair(up.stride) != (2, 2)
            or _pair(up.padding) != (0, 0)
            or _pair(up.output_padding) != (0, 0)
            or _pair(up.dilation) != (1, 1)
            or up.groups != 1
        ):
            raise _fail(path, up, "only ConvTranspose2d(kernel_size=2, stride=2) without padding or groups is fused")
        return UpSpec("transpose", conv=up)
    if type(up) in (nn.Upsample, nn.UpsamplingBilinear2d, nn.UpsamplingNearest2d):
        accepted.append(up)
        scale = up.scale_factor
        scales = tuple(float(s) for s in _pair(scale)) if scale is not None else None
        if up.size is not None or scales != (2.0, 2.0):
            raise _fail(path, up, f"only 2x upsampling is fused, got scale_factor={scale}, size={up.size}")
        if up.mode == "bilinear":
            return UpSpec("bilinear", bool(up.align_corners))
        if up.mode == "nearest":
            return UpSpec("nearest")
        raise _fail(path, up, f"upsampling mode {up.mode!r} is not fused (bilinear or nearest)")
    raise _fail(path, up, "expected nn.Upsample(scale_factor=2) or nn.ConvTranspose2d(kernel_size=2, stride=2)")


def _numbered(children: dict[str, nn.Module], prefix: str) -> list[str]:
    names = []
    for i in itertools.count(1):
        if f"{prefix}{i}" not in children:
            return names
        names.append(f"{prefix}{i}")


def read_milesial_layout(model: nn.Module, up_first: tuple[bool, ...] = ()) -> Layout:
    """The :class:`~fastunet.ops.Layout` of an ``inc``/``down<i>``/``up<i>``/``outc`` U-Net (see the module doc);
    raises :class:`ConversionError` naming the first module that does not fit. ``up_first``: per decoder level,
    whether it concatenates the upsampled map before the skip (module names cannot say; the verification run finds
    it)."""
    children = dict(model.named_children())
    downs, ups = _numbered(children, "down"), _numbered(children, "up")
    expected = {"inc", "outc", *downs, *ups}
    for name, child in children.items():
        if name not in expected:
            raise _fail(name, child, "not part of the inc / down1..downN / up1..upN / outc layout")
    for name in ("inc", "outc"):
        if name not in children:
            raise ConversionError(
                f"convert: {type(model).__name__} has no '{name}' module: expected a fastunet.UNet or the "
                "inc / down1..downN / up1..upN / outc layout"
            )
    if not downs or len(ups) != len(downs):
        raise ConversionError(
            f"convert: {type(model).__name__} has {len(downs)} down and {len(ups)} up blocks: expected N >= 1 of each"
        )
    depth = len(downs)
    accepted: list[nn.Module] = []  # the stateless modules the layout accounts for: ReLUs, pools, interpolations
    encoders = [_read_double_conv("inc", children["inc"], accepted)]
    for name in downs:
        block = children[name]
        seq = getattr(block, "maxpool_conv", None)
        if not isinstance(seq, nn.Sequential) or len(seq) != 2:
            raise _fail(name, block, "expected `maxpool_conv` = Sequential(MaxPool2d(2), double conv)")
        _read_pool(f"{name}.maxpool_conv.0", seq[0], accepted)
        encoders.append(_read_double_conv(f"{name}.maxpool_conv.1", seq[1], accepted))
    up_specs: list[UpSpec] = [None] * depth
    decoders: list[tuple[ConvSpec, ConvSpec]] = [None] * depth
    for j, name in enumerate(ups):
        block, level = children[name], depth - 1 - j  # up1 joins the bottleneck with the deepest skip
        for attr in ("up", "conv"):
            if not isinstance(getattr(block, attr, None), nn.Module):
                raise _fail(name, block, f"expected an `{attr}` submodule (an upsampling and a double conv)")
        up_specs[level] = read_up(f"{name}.up", block.up, accepted)
        decoders[level] = _read_double_conv(f"{name}.conv", block.conv, accepted)
    outc = children["outc"]
    head = outc if type(outc) is nn.Conv2d else getattr(outc, "conv", None)
    if head is None:
        raise _fail("outc", outc, "expected a 1x1 nn.Conv2d (as `outc` or `outc.conv`)")
    head = _check_conv("outc" if head is outc else "outc.conv", head, 1)

    # Channel bookkeeping: every conv reads what the stage before it writes.
    paths = ["inc", *(f"{name}.maxpool_conv.1" for name in downs)]
    for level in range(1, depth + 1):
        below, conv = encoders[level - 1][1].conv, encoders[level][0].conv
        if conv.in_channels != below.out_channels:
            raise _fail(
                paths[level], conv, f"reads {conv.in_channels} channels, the level above writes {below.out_channels}"
            )
    below_channels = encoders[depth][1].conv.out_channels
    for level in reversed(range(depth)):
        name, up = ups[depth - 1 - level], up_specs[level]
        if up.conv is not None:
            if up.conv.in_channels != below_channels:
                raise _fail(f"{name}.up", up.conv, f"reads {up.conv.in_channels} channels, gets {below_channels}")
            up_channels = up.conv.out_channels
        else:
            up_channels = below_channels
        skip_channels = encoders[level][1].conv.out_channels
        conv = decoders[level][0].conv
        if conv.in_channels != skip_channels + up_channels:
            raise _fail(
                f"{name}.conv",
                conv,
                f"reads {conv.in_channels} channels, cat([skip, up]) has {skip_channels} + {up_channels}",
            )
        below_channels = decoders[level][1].conv.out_channels
    if head.in_channels != below_channels:
        raise _fail("outc", head, f"reads {head.in_channels} channels, the last decoder writes {below_channels}")
    layout = Layout(tuple(encoders), tuple(up_specs), tuple(decoders), head, tuple(up_first))
    _check_nothing_left_out(model, layout, set(map(id, accepted)))
    return layout


def _check_nothing_left_out(model: nn.Module, layout: Layout, stateless: set[int]) -> None:
    """Every parameter, buffer and leaf module of ``model`` must be one the layout maps: an extra branch (a
    residual 1x1 conv, a gate, a dropout) would otherwise be silently left out of the fused forward."""
    mapped = {id(layout.head)} | stateless
    for pair in (*layout.encoders, *layout.decoders):
        for spec in pair:
            mapped |= {id(spec.conv), id(spec.norm)}
    mapped |= {id(up.conv) for up in layout.ups if up.conv is not None}
    for name, module in model.named_modules():
        if id(module) in mapped:
            continue
        if not list(module.children()):
            raise _fail(name, module, "not part of the inc / down / up / outc layout: the fused forward would skip it")
        for kind, tensors in (("parameter", module._parameters), ("buffer", module._buffers)):
            for leaf, tensor in tensors.items():
                if tensor is not None:
                    raise _fail(
                        name or type(model).__name__, module, f"its own {kind} '{leaf}' is not used by the layout"
                    )


def probe_sizes(depth: int) -> list[tuple[int, int]]:
    """(H, W) of the verification probes, in the order tried: odd sizes first, so that every level pads; then
    sizes divisible by ``2**(depth + 1)``, for a source whose forward accepts only those."""
    size = 2 ** (depth + 1)  # a bottleneck of 2x2 or more
    return [(size + 1, size + 3), (size, 2 * size), (2 * size, 2 * size)]


_SKIP = "convert(model, verify=False) converts without this check"


def _verify(model: nn.Module, depth: int, in_channels: int) -> tuple[bool, ...]:
    """Check, in float64 on a CPU copy, that ``model``'s own eval forward computes what its layout says (catches a
    forward that skips a stage, adds one, or pads otherwise), and that the converted module's reference path (the
    source's forward run on it) does too. Module names cannot say in which order a decoder concatenates the skip
    and the upsampled map: the orders are tried, skip first everywhere first, and the one that matches is returned
    (per decoder level, whether the upsampled map comes first). Any failure of the run itself is reported as a
    :class:`ConversionError` that says it came from this verification."""
    if any(t.device.type == "meta" for t in itertools.chain(model.parameters(), model.buffers())):
        return  # nothing to compute with: the layout check alone applies
    name = type(model).__name__
    try:
        probe = copy.deepcopy(model).to("cpu", torch.float64).eval()
        layout = read_milesial_layout(probe)
    except ConversionError:
        raise
    except Exception as failure:
        raise ConversionError(
            f"convert: verification could not make a float64 CPU copy of {name} ({type(failure).__name__}: "
            f"{failure}); {_SKIP}"
        ) from failure
    generator = torch.Generator().manual_seed(0)
    rejected: list[tuple[tuple[int, int], Exception]] = []
    with torch.no_grad():
        for height, width in probe_sizes(depth):
            x = torch.randn(2, in_channels, height, width, generator=generator, dtype=torch.float64)
            try:
                expected = probe(x)
            except Exception as failure:  # e.g. a forward that accepts only sizes divisible by 16
                rejected.append(((height, width), failure))
                continue
            break
        else:
            tried = ", ".join(f"{h}x{w}" for (h, w), _ in rejected)
            first = rejected[0][1]
            raise ConversionError(
                f"convert: verification runs {name}.forward once in float64 on a CPU copy, and it raised on every "
                f"probe input tried (batch 2, {in_channels} channels, H x W {tried}); the first error: "
                f"{type(first).__name__}: {first}. {_SKIP}"
            ) from first
        try:
            got = layout_forward(layout, x)
        except Exception as failure:
            raise ConversionError(
                f"convert: verification could not run the layout's math on a {tuple(x.shape)} probe "
                f"({type(failure).__name__}: {failure}); {_SKIP}"
            ) from failure
        if not isinstance(expected, torch.Tensor) or expected.shape != got.shape:
            shape = tuple(expected.shape) if isinstance(expected, torch.Tensor) else type(expected).__name__
            raise ConversionError(f"convert: {name}.forward returned {shape}, the layout computes {tuple(got.shape)}")
        error = (expected - got).norm() / got.norm().clamp_min(1e-300)
        up_first: tuple[bool, ...] = ()
        orders = itertools.product((False, True), repeat=depth) if error.item() > 1e-9 else ()
        for order in orders:
            if any(order):
                candidate = layout_forward(read_milesial_layout(probe, order), x)
                if (expected - candidate).norm() / candidate.norm().clamp_min(1e-300) <= 1e-9:
                    error, up_first = 0.0, order
                    break
        if not error <= 1e-9:
            raise ConversionError(
                f"convert: {name}.forward does not compute what its inc/down/up/outc modules "
                f"describe in either concatenation order (relative L2 difference {float(error):.1e} in float64): "
                "its forward differs from the supported layout (padding, or a stage added or skipped)"
            )
        try:
            own = ConvertedUNet(probe).reference_forward(x)
        except Exception as failure:  # e.g. a helper it lacks, or zero-argument super() on another class
            raise ConversionError(
                f"convert: {name}.forward cannot run on the converted module ({failure})"
            ) from failure
        if not torch.equal(own, expected):
            raise ConversionError(f"convert: {name}.forward gives another result on the converted module")
    return up_first


class ConvertedUNet(FusedForward, nn.Module):
    """The fused forward of an ``inc``/``down<i>``/``up<i>``/``outc`` U-Net (see :func:`convert`).

    Holds copies of the source model's submodules that share its parameter and buffer tensors, under the same
    names, so ``state_dict`` keys are the source's and checkpoints load into either. Train/eval modes are its
    own. In training mode (or where the kernels cannot run) it runs the source class's own ``forward``.
    """

    def __init__(self, source: nn.Module) -> None:
        nn.Module.__init__(self)
        layout = read_milesial_layout(source)
        shared = {id(t): t for t in itertools.chain(source.parameters(), source.buffers())}
        clone = copy.deepcopy(source, shared)
        self._parameters = clone._parameters
        self._buffers = clone._buffers
        self._non_persistent_buffers_set = clone._non_persistent_buffers_set
        self._modules = clone._modules
        internals = set(nn.Module().__dict__) | {"forward"}
        for name, value in clone.__dict__.items():  # attributes the source's forward may read
            if name not in internals:
                self.__dict__.setdefault(name, value)
        self.training = source.training
        self._source_class = type(source)
        self._input = (layout.in_channels, layout.depth)
        self._up_first: tuple[bool, ...] = ()  # concatenation order per decoder level (see convert's verification)
        self._init_fused(source)

    def __getattr__(self, name: str):
        """Methods and class attributes of the source class (its ``forward`` may call helpers of its own)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            cls = self.__dict__.get("_source_class")
            if cls is None or name.startswith("__") or not hasattr(cls, name):
                raise
            value = getattr(cls, name)
            return value.__get__(self, type(self)) if hasattr(value, "__get__") else value

    def input_spec(self) -> tuple[int, int]:
        return self._input

    def fused_layout(self) -> Layout:
        return read_milesial_layout(self, self._up_first)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._source_class.forward(self, x)

    def extra_repr(self) -> str:
        cls = self._source_class
        return f"source={cls.__module__}.{cls.__qualname__}, in_channels={self._input[0]}, depth={self._input[1]}"


class UnwrappedModuleWarning(UserWarning):
    """:func:`convert` converted the model inside a wrapper (``DataParallel``, ``DistributedDataParallel``, a
    ``torch.compile``d module) and returns the fused model unwrapped."""


def _unwrap(module: nn.Module) -> tuple[nn.Module, list[str]]:
    """The model inside data-parallel and ``torch.compile`` wrappers, and the wrappers' names, outermost first."""
    from torch._dynamo.eval_frame import OptimizedModule

    wrappers = []
    while True:
        if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            wrappers.append(type(module).__name__)
            module = module.module
        elif isinstance(module, OptimizedModule):
            wrappers.append("torch.compile")
            module = module._orig_mod
        else:
            return module, wrappers


def convert(module: nn.Module, *, verify: bool = True) -> nn.Module:
    """A fused module computing what ``module`` computes, sharing its parameter and buffer tensors.

    * :class:`fastunet.UNet` -> :class:`fastunet.FastUNet` (via :meth:`FastUNet.from_reference`); a fused module
      is returned as it is.
    * An ``inc``/``down<i>``/``up<i>``/``outc`` U-Net (milesial/Pytorch-UNet's layout, either upsampling) ->
      :class:`ConvertedUNet`, with the source's ``state_dict`` keys.

    ``verify``: also run the source's own forward and the layout's math once in float64 on a CPU copy of the
    model and refuse the conversion if they differ; this catches a ``forward`` that does something the module names
    do not say. The probe is batch 2 of ``2**(depth+1) + 1`` by ``2**(depth+1) + 3``, or, if the source's forward
    rejects that, the first of :func:`probe_sizes` it accepts. Skipped for parameters on the meta device.

    A model inside ``nn.DataParallel``, ``DistributedDataParallel`` or ``torch.compile`` is converted and returned
    unwrapped, with an :class:`UnwrappedModuleWarning` (wrap the fused model again to run it that way).

    Raises :class:`ConversionError` (a ``TypeError``) naming the first module that cannot be mapped, and why.
    """
    if not isinstance(module, nn.Module):
        raise ConversionError(f"convert: expected an nn.Module, got {type(module).__name__}")
    module, wrappers = _unwrap(module)
    if wrappers:
        warnings.warn(
            f"convert: converted the {type(module).__name__} inside {' inside '.join(wrappers)}; the fused model "
            "is returned unwrapped (wrap it again to run it data-parallel or compiled)",
            UnwrappedModuleWarning,
            stacklevel=2,
        )
    if isinstance(module, FusedForward):
        return module
    if isinstance(module, UNet):
        if type(module).forward is not UNet.forward:
            raise ConversionError(
                f"convert: {type(module).__qualname__} subclasses fastunet.UNet and overrides forward: the fused "
                "forward computes UNet.forward only"
            )
        return FastUNet.from_reference(module)
    converted = ConvertedUNet(module)
    if verify:
        converted._up_first = _verify(module, converted._input[1], converted._input[0])
    return converted
