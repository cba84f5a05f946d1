"""``convert``: turn a supported U-Net module into a fused module over the same tensors.

* :class:`fastunet.UNet`: returns :meth:`FastUNet.from_reference`; a fused module is returned as it is.
* Any other module: :func:`fastunet.recognize.recognize` records what its forward computes and matches it to a
  :class:`~fastunet.ops.Layout` (any module names; milesial/Pytorch-UNet's ``inc``/``down<i>``/``up<i>``/``outc``
  is one case); the recognised layout's math is checked against the source's own output in float64 on the same
  probe; then, where the kernels can run that layout (:func:`fastunet.ops.unfused_reason`), a
  :class:`ConvertedUNet` sharing the source's tensors and keys is returned.

Anything else raises :class:`ConversionError` naming the model, the module (or call) that does not fit and why. No
approximate conversion, no partial PyTorch fallback.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import warnings

import torch
from torch import nn

from fastunet.model import FastUNet, FusedForward
from fastunet.ops import Layout, layout_forward, unfused_reason
from fastunet.recognize import ConversionError, Recipe, Recognition, probe_sizes, read_up, recognize
from fastunet.reference import UNet

__all__ = [
    "ConversionError",
    "ConvertedUNet",
    "UnwrappedModuleWarning",
    "convert",
    "probe_sizes",
    "read_up",
    "recognize",
]


_CHECK = 1e-9  # relative L2 in float64: the layout's math is the source's up to rounding


def _verify(name: str, found: Recognition) -> None:
    """Check, in float64 on the CPU copy the recogniser ran, that the recognised layout's math computes what the
    source's own forward computed on the probe (catches what the trace cannot show: a module whose forward was
    replaced, a branch taken only at other sizes is not caught), and that the source's forward runs on the
    converted module and gives the same result."""
    layout = found.recipe.resolve(found.probe)
    with torch.no_grad():
        try:
            got = layout_forward(layout, found.x)
        except Exception as failure:
            raise ConversionError(
                f"convert: {name}: verification could not run the recognised layout's math on a "
                f"{tuple(found.x.shape)} probe ({type(failure).__name__}: {failure}); {_SKIP}"
            ) from failure
        expected = found.expected
        if expected.shape != got.shape:
            raise ConversionError(
                f"convert: {name}.forward returned {tuple(expected.shape)}, the recognised layout computes "
                f"{tuple(got.shape)}"
            )
        error = (expected - got).norm() / got.norm().clamp_min(1e-300)
        if not error.item() <= _CHECK:
            raise ConversionError(
                f"convert: {name}.forward does not compute what its recognised layout computes (relative L2 "
                f"difference {error.item():.1e} in float64): a module does something its type does not say (a "
                f"replaced forward?), or the forward differs in a way the trace cannot show; {_SKIP}"
            )
        try:
            own = ConvertedUNet(found.probe, found.recipe).reference_forward(found.x)
        except Exception as failure:  # e.g. a helper it lacks, or zero-argument super() on another class
            raise ConversionError(
                f"convert: {name}.forward cannot run on the converted module ({failure})"
            ) from failure
        if not torch.equal(own, expected):
            raise ConversionError(f"convert: {name}.forward gives another result on the converted module")


_SKIP = "convert(model, verify=False) converts without this check"

_UNCHECKED_TRAINING = (
    "its training-mode forward was not checked against the layout (convert(model, verify=False), or a model on the "
    "meta device)"
)


def _check_training(found: Recognition) -> str | None:
    """Why the source's training-mode forward is not the recognised layout's training-mode math (None: it is), in
    float64 on copies of the probe model: the outputs to the verification's tolerance and every buffer after the
    step (running statistics, ``num_batches_tracked``) equal. A dropout with ``p > 0``, a deep-supervision output or
    any other training-only branch fails it."""
    source = copy.deepcopy(found.probe).train()
    mirror = copy.deepcopy(found.probe).train()
    layout = found.recipe.resolve(mirror)
    with torch.no_grad():
        try:
            expected = source(found.x)
            got = layout_forward(layout, found.x, training=True)
        except Exception as failure:
            return f"its training-mode forward could not be checked ({type(failure).__name__}: {failure})"
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape:
        what = tuple(expected.shape) if isinstance(expected, torch.Tensor) else type(expected).__name__
        return f"its training-mode forward returns {what}, the layout computes {tuple(got.shape)}"
    error = ((expected - got).norm() / got.norm().clamp_min(1e-300)).item()
    if not error <= _CHECK:
        return (
            f"its training-mode forward computes something the layout does not (relative L2 difference {error:.1e} "
            "in float64: a dropout or another training-only branch)"
        )
    for (name, a), b in zip(source.named_buffers(), mirror.buffers(), strict=True):
        if a.shape != b.shape or not torch.allclose(a.double(), b.double(), rtol=1e-9, atol=0.0):
            return f"its training-mode forward leaves buffer '{name}' different from the layout's norms"
    return None


def _unfused(name: str, recipe: Recipe, reason: str) -> ConversionError:
    """The refusal of a recognised layout the kernels cannot run yet, with the source's module paths."""
    stage, sep, rest = reason.partition(": ")
    where = recipe.locate(stage) if sep else None
    if where is None:
        stage, where, rest = "join", recipe.locate("join"), reason
    at = f" ({where})" if where else ""
    return ConversionError(f"convert: {name}: {stage}{at}: {rest}; the fused kernels cannot run this U-Net yet")


class ConvertedUNet(FusedForward, nn.Module):
    """The fused forward of a recognised U-Net (see :func:`convert`); ``recipe`` says which of its modules make
    up the layout (:class:`fastunet.recognize.Recipe`).

    Holds copies of the source model's submodules that share its parameter and buffer tensors, under the same
    names, so ``state_dict`` keys are the source's and checkpoints load into either. Train/eval modes are its
    own. With autograd on, the backward runs on the kernels where :func:`fastunet.training.kernel_training_blocker`
    allows; in training mode only where :func:`convert` also found the source's training-mode forward to be the
    layout's (:meth:`backward_blocker`). Elsewhere in training mode, and where the kernels cannot run, it runs the
    source class's own ``forward``.
    """

    def __init__(self, source: nn.Module, recipe: Recipe) -> None:
        nn.Module.__init__(self)
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
        self._recipe = recipe
        # Set by convert() once the source's training-mode forward was checked against the layout's.
        self._training_blocker: str | None = _UNCHECKED_TRAINING
        layout = recipe.resolve(self)
        self._input = (layout.in_channels, layout.depth)
        self._init_fused(source)

    def __getattr__(self, name: str):
        """Methods and class attributes of the source class (its ``forward`` may call helpers of its own)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            cls = self.__dict__.get("_source_class")
            if cls is None or name.startswith("__") or not hasattr(cls, name):
                raise
            raw = inspect.getattr_static(cls, name)
            if isinstance(raw, staticmethod):
                return raw.__func__
            if isinstance(raw, classmethod):
                return raw.__get__(None, cls)
            value = getattr(cls, name)
            return value.__get__(self, type(self)) if hasattr(value, "__get__") else value

    def input_spec(self) -> tuple[int, int]:
        return self._input

    def fused_layout(self) -> Layout:
        """The recognised layout over this module's own submodules (read again at every plan build: a replaced
        upsampling or activation module is what the next plan fuses)."""
        return self._recipe.resolve(self)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._source_class.forward(self, x)

    def backward_blocker(self, training: bool) -> str | None:
        """In training mode, the source class's own ``forward`` runs unless :func:`convert` found its training-mode
        forward to be the layout's training-mode math (a dropout, a deep-supervision output or any other
        training-only branch is not in the layout); then, as in eval mode, the layout's blocker (see
        :func:`fastunet.training.kernel_training_blocker`)."""
        if training and self._training_blocker is not None:
            return f"a converted model runs its source class's own forward in training mode: {self._training_blocker}"
        return super().backward_blocker(training)

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
    * Any other U-Net whose forward computes a :class:`~fastunet.ops.Layout` (see :mod:`fastunet.recognize`:
      its forward is run once on a copy and what it computes is matched, whatever the module names) ->
      :class:`ConvertedUNet`, with the source's ``state_dict`` keys, where the kernels can run that layout.

    ``verify``: record the forward in float64 on a CPU copy and check that the recognised layout's math gives the
    source's own output there (catches what a trace cannot show: a module whose ``forward`` was replaced), and
    whether its training-mode forward is the layout's training-mode math too (outputs and buffers after one step, on
    copies: where it is not, say for a dropout, training mode runs the source's own forward); the probe
    is batch 2 of ``2**(depth+1) + 1`` by ``2**(depth+1) + 3``, or, if the source's forward rejects that, the first
    of :func:`probe_sizes` it accepts. ``verify=False`` records the forward on the meta device (nothing computed,
    nothing compared); so does a model whose tensors are on the meta device.

    A model inside ``nn.DataParallel``, ``DistributedDataParallel`` or ``torch.compile`` is converted and returned
    unwrapped, with an :class:`UnwrappedModuleWarning` (wrap the fused model again to run it that way).

    Raises :class:`ConversionError` (a ``TypeError``) naming the model, the first module or call on the way to the
    output that cannot be mapped (or the feature the kernels lack yet, with its module paths), and why.
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
    name = type(module).__name__
    found = recognize(module, numeric=verify)
    if verify and found.numeric:
        _verify(name, found)
    converted = ConvertedUNet(module, found.recipe)
    reason = unfused_reason(converted.fused_layout())
    if reason is not None:
        raise _unfused(name, found.recipe, reason)
    if verify and found.numeric:
        converted._training_blocker = _check_training(found)
    return converted
