"""``FastUNet``: the reference U-Net's parameters, run as a plan of fused Triton kernels.

:class:`FusedForward` holds the dispatch, the plan cache and the input checks; :class:`FastUNet` applies it to
:class:`fastunet.UNet`, and :func:`fastunet.convert` applies it to other supported U-Net layouts.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import NamedTuple

import torch
from torch import nn

from fastunet import ops
from fastunet.ops import INTERPRET, ConvSpec, Layout, Plan, UpSpec
from fastunet.reference import UNet, check_input

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

BACKEND_TRITON = "triton"
BACKEND_INTERPRETER = "triton-interpreter"
BACKEND_REFERENCE = "reference"

# One lock for every model's plan cache: the first forwards of several threads build a plan once, not racing.
_PLAN_LOCK = threading.RLock()


class FastUNetFallbackWarning(UserWarning):
    """Emitted (once per module and reason) when a forward runs the reference PyTorch math instead of the kernels."""


class _Scan(NamedTuple):
    training: list[str]
    hooked: list[str]
    params: list[torch.Tensor]
    key: tuple | None  # None: do not cache


def _global_hooks() -> bool:
    from torch.nn.modules import module as module_mod

    return bool(module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks)


def _refresh_in_place(cached: Plan, fresh: Plan) -> bool:
    """Copy ``fresh`` into ``cached`` where every tensor matches in shape, dtype and device; False otherwise."""
    old, new = ops.plan_tensors(cached), ops.plan_tensors(fresh)
    if cached.fuse_head != fresh.fuse_head or len(old) != len(new):
        return False
    for a, b in zip(old, new, strict=True):
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            return False
        if a.is_inference() and not torch.is_inference_mode_enabled():
            return False
    with torch.no_grad():
        for a, b in zip(old, new, strict=True):
            a.copy_(b)
    return True


class FusedForward:
    """The fused forward of an ``nn.Module`` U-Net: dispatch, plan cache, input checks.

    A subclass provides :meth:`fused_layout` (which modules the kernels read), :meth:`reference_forward` (the
    module's own PyTorch math) and :meth:`input_spec` (input channels and depth), and calls
    :meth:`_init_fused` from its constructor.
    """

    def _init_fused(self, source: nn.Module | None = None) -> None:
        """Per-instance state; ``source``: the module whose tensors this one shares (kept shared through ``.to()``,
        ``.half()`` and friends: see :meth:`_apply`)."""
        self.last_backend: str | None = None
        self.last_backend_reason: str | None = None
        self._plans: dict[tuple, tuple[tuple, Plan]] = {}
        self._warned: set[str] = set()
        self._source_ref = weakref.ref(source) if source is not None else None

    def fused_layout(self) -> Layout:
        raise NotImplementedError

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def input_spec(self) -> tuple[int, int]:
        """(input channels, depth) that the input is checked against."""
        raise NotImplementedError

    # -- sharing, copying, pickling -------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """``.to()``, ``.half()``, ``.cuda()``...: PyTorch swaps parameter data in place but replaces buffers with
        new tensors, which would silently end the sharing with the source model (BatchNorm statistics left behind,
        the source half-converted). Tensors shared before the conversion are pointed at again in the source."""
        source = self._source_ref() if self._source_ref is not None else None
        if source is None:
            return super()._apply(fn, recurse)
        own = dict(self.named_parameters()) | dict(self.named_buffers())
        theirs = dict(source.named_parameters()) | dict(source.named_buffers())
        shared = [name for name, tensor in own.items() if theirs.get(name) is tensor]
        result = super()._apply(fn, recurse)
        for name in shared:
            prefix, _, leaf = name.rpartition(".")
            module, mine = source.get_submodule(prefix), self.get_submodule(prefix)
            table = "_parameters" if leaf in module._parameters else "_buffers"
            getattr(module, table)[leaf] = getattr(mine, table)[leaf]
        return result

    def __getstate__(self):
        """Pickles and deep copies carry no plan cache (rebuilt on the next forward) and no link to the source."""
        state = super().__getstate__()
        state["_plans"], state["_warned"], state["_source_ref"] = {}, set(), None
        return state

    # -- plan ---------------------------------------------------------------------------------------------------
    def invalidate_plan(self) -> None:
        """Drop the folded/packed parameters; the next forward rebuilds them."""
        with _PLAN_LOCK:
            self._plans.clear()

    def _scan(self, keyed: bool = True) -> _Scan:
        """One walk over the modules per forward: modules in training mode, submodules with forward hooks, the
        parameters, and (when ``keyed``) the key that says whether a cached plan is still valid: every module's
        identity and type (module surgery), each parameter's and buffer's storage and version, every BatchNorm
        eps. Inference tensors have no version counter: a model holding them gets no cached plan."""
        training, hooked, params, key = [], [], [], []
        cacheable = keyed
        for name, module in self.named_modules():
            if module.training:
                training.append(name or "the model")
            if name and (module._forward_hooks or module._forward_pre_hooks):
                hooked.append(name)
            if keyed:
                key.append((id(module), type(module)))
            for tensors, is_param in ((module._parameters, True), (module._buffers, False)):
                for tensor in tensors.values():
                    if tensor is None:
                        continue
                    if is_param:
                        params.append(tensor)
                    if keyed:
                        if tensor.is_inference():
                            cacheable = False
                        else:
                            key.append((tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device))
            if keyed and isinstance(module, nn.BatchNorm2d):
                key.append(module.eps)
        return _Scan(training, hooked, params, tuple(key) if cacheable else None)

    def plan(self, dtype: torch.dtype, device: torch.device, state: tuple | None = None) -> Plan:
        """The packed parameters for ``dtype`` on ``device``, rebuilt if any parameter, buffer, module or BatchNorm
        ``eps`` changed since (one cached plan per dtype and device, so autocast and plain calls don't evict each
        other). A rebuild of the same shapes is copied into the cached tensors, so a captured CUDA graph replays
        with the new weights."""
        state = self._scan().key if state is None else state
        if state is None:
            return ops.build_plan(self.fused_layout(), dtype, device)
        cached = self._plans.get((dtype, device))
        if cached is not None and cached[0] == state:
            return cached[1]
        with _PLAN_LOCK:
            cached = self._plans.get((dtype, device))
            if cached is not None and cached[0] == state:
                return cached[1]
            plan = ops.build_plan(self.fused_layout(), dtype, device)
            if cached is not None and _refresh_in_place(cached[1], plan):
                plan = cached[1]
            self._plans[(dtype, device)] = (state, plan)
            return plan

    # -- forward ------------------------------------------------------------------------------------------------
    def _fallback(self, x: torch.Tensor, reason: str, warn: bool) -> torch.Tensor:
        self.last_backend, self.last_backend_reason = BACKEND_REFERENCE, reason
        if warn and reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(
                f"{type(self).__name__} ran the reference PyTorch forward: {reason}",
                FastUNetFallbackWarning,
                stacklevel=3,
            )
        return self.reference_forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_channels, depth = self.input_spec()
        check_input(x, in_channels, depth)
        # Traced (torch.compile, make_fx), the plan is built inside the graph and not cached: storage pointers
        # cannot be traced, and a plan of fake tensors must never reach an eager call.
        compiling = ops.is_traced()
        training, hooked, params, state = self._scan(keyed=not compiling)
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            found = sorted(map(str, dtypes))
            raise TypeError(f"{type(self).__name__} needs all parameters in one dtype, found {found}")
        (param_dtype,) = dtypes
        if params[0].device != x.device:
            raise RuntimeError(f"input is on {x.device} but the parameters are on {params[0].device}")
        autocast = torch.is_autocast_enabled(x.device.type)
        if not autocast and param_dtype != x.dtype:
            raise TypeError(
                f"input dtype {x.dtype} does not match the parameters' dtype {param_dtype} "
                "(convert one of them, or run under torch.autocast)"
            )
        if training:
            reason = f"training mode ({training[0]}; no Triton backward kernels yet)"
            return self._fallback(x, reason, warn=False)
        if hooked or _global_hooks():
            where = f"on {hooked[0]}" if hooked else "registered globally"
            reason = f"forward hooks {where}: the fused kernels cannot run them"
            return self._fallback(x, reason, warn=True)
        if compiling and torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            # The eager path's backward recomputes the reference with torch.autograd.grad, which TorchDynamo cannot
            # trace; compiled with autograd on, the whole forward is the reference math (inference: no_grad).
            reason = "torch.compile with autograd on (run inference under torch.no_grad() for the kernels)"
            return self._fallback(x, reason, warn=False)
        if INTERPRET and x.device.type != "cpu":
            return self._fallback(
                x, f"TRITON_INTERPRET=1 runs kernels on CPU tensors only, input is on {x.device}", warn=True
            )
        if not INTERPRET and x.device.type != "cuda":
            return self._fallback(x, f"compiled Triton kernels need CUDA tensors, input is on {x.device}", warn=True)
        compute_dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        if compute_dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"expected float32, float16 or bfloat16 input, got {compute_dtype}")
        if compiling:
            plan = ops.build_plan(self.fused_layout(), compute_dtype, x.device)
        else:
            plan = self.plan(compute_dtype, x.device, state)
        logits = ops.unet_forward(self, plan, x.to(compute_dtype), params)
        self.last_backend = BACKEND_INTERPRETER if INTERPRET else BACKEND_TRITON
        self.last_backend_reason = "eval mode"
        return logits


class FastUNet(FusedForward, UNet):
    """Drop-in :class:`fastunet.UNet` whose eval-mode forward runs on fused Triton kernels.

    Same constructor, parameters and ``state_dict`` keys as :class:`fastunet.UNet`: either loads the other's
    checkpoint with ``strict=True``. Dispatch, per forward:

    * eval mode, CUDA input: compiled Triton kernels (``last_backend == "triton"``);
    * eval mode, CPU input with ``TRITON_INTERPRET=1``: the same kernels under Triton's interpreter
      (``"triton-interpreter"``);
    * eval mode, CPU input otherwise: the reference PyTorch math (``"reference"``), with one
      :class:`FastUNetFallbackWarning`;
    * training mode: the reference PyTorch math (BatchNorm batch statistics and their running-stat updates,
      gradients). Backward kernels do not exist yet.

    When gradients are needed in eval mode, the Triton forward's output is returned and its backward recomputes
    the reference forward and differentiates that (same parameters, same math): gradients are the reference's.

    ``last_backend`` and ``last_backend_reason`` say what the latest forward ran. The folded and packed
    parameters are rebuilt whenever a parameter or buffer changes (``load_state_dict``, optimizer steps,
    ``.to()``, ``.half()``); an in-place edit through ``.data`` bypasses version counting, so call
    :meth:`invalidate_plan` after one.
    """

    def __init__(self, *args, **kwargs) -> None:
        dtype = kwargs.get("dtype")
        if dtype is not None and dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"FastUNet runs float32, float16 or bfloat16 parameters, got dtype={dtype}")
        super().__init__(*args, **kwargs)
        self._init_fused()

    @classmethod
    def from_reference(cls, unet: UNet) -> FastUNet:
        """A FastUNet holding ``unet``'s own parameter and buffer tensors (shared, not copied).

        The modules are FastUNet's own, so train/eval modes stay independent; the tensors are the same objects, so
        an optimizer step, ``load_state_dict`` or a dtype/device conversion of either model changes both.
        """
        if not isinstance(unet, UNet):
            raise TypeError(f"expected a fastunet.UNet, got {type(unet).__name__}")
        fast = cls(**unet.config, device="meta")
        fast.load_state_dict(unet.state_dict(keep_vars=True), strict=True, assign=True)
        fast.train(unet.training)
        fast._source_ref = weakref.ref(unet)
        return fast

    def input_spec(self) -> tuple[int, int]:
        return self.in_channels, self.depth

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        return UNet.forward(self, x)

    def fused_layout(self) -> Layout:
        def spec(conv: nn.Conv2d, norm: nn.Module) -> ConvSpec:
            return ConvSpec(conv, norm if isinstance(norm, nn.BatchNorm2d) else None)

        def double(block) -> tuple[ConvSpec, ConvSpec]:
            return spec(block.conv1, block.norm1), spec(block.conv2, block.norm2)

        if self.upsample == "transpose":
            ups = tuple(UpSpec("transpose", conv=block.up) for block in self.decoders)
        else:
            ups = tuple(UpSpec(self.upsample, self.align_corners) for _ in self.decoders)
        return Layout(
            encoders=tuple(double(block) for block in self.encoders),
            ups=ups,
            decoders=tuple(double(block.conv) for block in self.decoders),
            head=self.head,
        )
