"""``FastUNet``: the reference U-Net's parameters, run as a plan of fused Triton kernels.

:class:`FusedForward` is the thin shell every fused module shares: input checks, the dispatch decision
(:func:`fastunet.dispatch.dispatch_reason`), the plan cache (:class:`fastunet.plan_cache.PlanCache`) and the link
that keeps tensors shared with a source model (:mod:`fastunet.sharing`). :class:`FastUNet` applies it to
:class:`fastunet.UNet`, and :func:`fastunet.convert` applies it to other supported U-Net layouts.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import nn

from fastunet import ops
from fastunet.dispatch import (
    BACKEND_INTERPRETER,
    BACKEND_REFERENCE,
    BACKEND_TRITON,
    Dispatch,
    dispatch_reason,
)
from fastunet.graphs import GraphCache
from fastunet.kernels._common import is_dry_run, recording
from fastunet.ops import INTERPRET, ConvSpec, Layout, Plan
from fastunet.plan_cache import PlanCache, Stamp
from fastunet.reference import UNet, check_input
from fastunet.sharing import SourceLink
from fastunet.training import PackCache, kernel_training_blocker

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# float64 runs on the kernels under the interpreter only (gradcheck, float64 checks on the CPU): compiled kernels
# take the three dtypes above.
KERNEL_DTYPES = (*SUPPORTED_DTYPES, torch.float64) if INTERPRET else SUPPORTED_DTYPES


def _dtype_error(dtype: torch.dtype) -> str:
    interpreter = "" if INTERPRET else "; float64 runs on the kernels only under the interpreter (TRITON_INTERPRET=1)"
    return f"expected float32, float16 or bfloat16{' or float64' if INTERPRET else ''}, got {dtype}{interpreter}"


__all__ = [
    "BACKEND_INTERPRETER",
    "BACKEND_REFERENCE",
    "BACKEND_TRITON",
    "FastUNet",
    "FastUNetFallbackWarning",
    "FusedForward",
]


class FastUNetFallbackWarning(UserWarning):
    """Emitted (once per module and reason) when a forward runs the reference PyTorch math instead of the kernels
    for a reason the caller may not expect (CPU input without the interpreter, hooks, a training-mode forward with
    gradients disabled)."""


class _Scan(NamedTuple):
    training: list[str]
    hooked: list[str]
    params: list[torch.Tensor]
    stamp: Stamp | None  # None: do not cache


def _graph_replay_allowed() -> bool:
    """A captured graph may replace the launches: no capture in progress (a user's own graph records the plain
    launches), no launch log or dry run open (they want the launches themselves)."""
    return not torch.cuda.is_current_stream_capturing() and not recording() and not is_dry_run()


def _global_hooks() -> bool:
    from torch.nn.modules import module as module_mod

    return bool(module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks)


class FusedForward:
    """The fused forward of an ``nn.Module`` U-Net: input checks, dispatch, plan cache, sharing with a source.

    A subclass provides :meth:`fused_layout` (which modules the kernels read), :meth:`reference_forward` (the
    module's own PyTorch math) and :meth:`input_spec` (input channels and depth), and calls
    :meth:`_init_fused` from its constructor.
    """

    def _init_fused(self, source: nn.Module | None = None) -> None:
        """Per-instance state; ``source``: the module whose tensors this one shares (kept shared through ``.to()``,
        ``.half()`` and friends: see :meth:`_apply`)."""
        self.last_backend: str | None = None
        self.last_backend_reason: str | None = None
        self._plans = PlanCache()
        self._packs = PackCache()  # a training forward's packed weights, kept while the parameters are unchanged
        self._graphs: GraphCache | None = None  # CUDA graphs of the forward: off unless use_cuda_graphs() is called
        self._warned: set[str] = set()
        self._source_link = SourceLink(source) if source is not None else None

    def use_cuda_graphs(self, enabled: bool = True, limit: int = 2):
        """Replay the eval forward's kernel launches as CUDA graphs (see :mod:`fastunet.graphs`): one graph per input
        signature (shape, strides, dtype, device, stream), captured on its second forward, at most ``limit`` kept.
        For small inputs, where launching 22 kernels from Python takes longer than running them. Forwards that need
        gradients, run under a compiler or inside another capture, or on the CPU launch as usual. Returns the module.
        """
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        self._graphs = GraphCache(limit) if enabled else None
        return self

    def fused_layout(self) -> Layout:
        raise NotImplementedError

    def backward_blocker(self, training: bool) -> str | None:
        """Why the backward kernels cannot differentiate a forward of this module (None: they can), in training
        mode or not (see :func:`fastunet.training.kernel_training_blocker`)."""
        return kernel_training_blocker(self.fused_layout(), training)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def input_spec(self) -> tuple[int, int]:
        """(input channels, depth) that the input is checked against."""
        raise NotImplementedError

    # -- sharing, copying, pickling -------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """``.to()``, ``.half()``, ``.cuda()``...: tensors shared with the source model stay shared, and a plan
        built from the tensors before the conversion is released (a CUDA plan does not outlive ``.cpu()``)."""
        link = self._source_link
        if link is None:
            result = super()._apply(fn, recurse)
        else:
            with link.kept(self):
                result = super()._apply(fn, recurse)
        self._plans.release_if_stale(self._scan().stamp)
        self._packs.clear()
        if self._graphs is not None:
            self._graphs.clear()
        return result

    def __getstate__(self):
        """Pickles and deep copies carry no plan (rebuilt on the next forward) and no link to the source."""
        state = super().__getstate__()
        state["_plans"], state["_warned"], state["_source_link"] = PlanCache(), set(), None
        state["_packs"] = PackCache()
        return state

    # -- plan ---------------------------------------------------------------------------------------------------
    def invalidate_plan(self) -> None:
        """Drop the folded/packed parameters (and any CUDA graph reading them); the next forward rebuilds them."""
        self._plans.clear()
        self._packs.clear()
        if self._graphs is not None:
            self._graphs.clear()

    def _scan(self, keyed: bool = True) -> _Scan:
        """One walk over the modules per forward: modules in training mode, submodules with forward hooks, the
        parameters, and (when ``keyed``) the stamp that says whether the cached plan is still valid: every module's
        identity and type (module surgery), each parameter's and buffer's storage and version, every BatchNorm
        eps. Inference tensors have no version counter: a model holding them gets no cached plan."""
        training, hooked, params, key, objects = [], [], [], [], []
        cacheable = keyed
        for name, module in self.named_modules():
            if module.training:
                training.append(name or "the model")
            if name and (module._forward_hooks or module._forward_pre_hooks):
                hooked.append(name)
            if keyed:
                key.append((id(module), type(module)))
                if name:  # the model itself is not referenced from its own cache
                    objects.append(module)
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
                            objects.append(tensor)
            if keyed and isinstance(module, nn.BatchNorm2d):
                key.append(module.eps)
        stamp = Stamp(tuple(key), objects) if cacheable else None
        return _Scan(training, hooked, params, stamp)

    def plan(self, dtype: torch.dtype, device: torch.device, stamp: Stamp | None = None) -> Plan:
        """The packed parameters for ``dtype`` on ``device``: the cached plan while no parameter, buffer, module or
        BatchNorm ``eps`` changed since it was built and it has this dtype and device; rebuilt otherwise (one live
        plan per module: a plan of another dtype or device is released)."""
        stamp = self._scan().stamp if stamp is None else stamp
        if stamp is None:
            return ops.build_plan(self.fused_layout(), dtype, device)
        return self._plans.get(dtype, device, stamp, lambda: ops.build_plan(self.fused_layout(), dtype, device))

    # -- forward ------------------------------------------------------------------------------------------------
    def _fallback(self, x: torch.Tensor, decision: Dispatch) -> torch.Tensor:
        self.last_backend, self.last_backend_reason = decision.backend, decision.reason
        if decision.warn and decision.reason not in self._warned:
            self._warned.add(decision.reason)
            warnings.warn(
                f"{type(self).__name__} ran the reference PyTorch forward: {decision.reason}",
                FastUNetFallbackWarning,
                stacklevel=3,
            )
        return self.reference_forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_channels, depth = self.input_spec()
        check_input(x, in_channels, depth)
        # Traced (torch.compile, make_fx), the plan is built inside the graph and not cached: storage pointers
        # cannot be traced, and a plan of fake tensors must never reach an eager call.
        traced = ops.is_traced()
        training, hooked, params, stamp = self._scan(keyed=not traced)
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
        grad_enabled = torch.is_grad_enabled()
        needs_grad = grad_enabled and (x.requires_grad or any(p.requires_grad for p in params))
        blocker = self.backward_blocker(bool(training)) if needs_grad or (training and grad_enabled) else None
        decision = dispatch_reason(
            training=training[0] if training else None,
            grad_enabled=grad_enabled,
            hooked=hooked[0] if hooked else None,
            global_hooks=_global_hooks(),
            traced_with_grad=traced and needs_grad,
            device=x.device,
            interpret=INTERPRET,
            backward_blocker=blocker,
        )
        if decision.backend == BACKEND_REFERENCE:
            return self._fallback(x, decision)
        compute_dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        if compute_dtype not in KERNEL_DTYPES:
            raise TypeError(f"input: {_dtype_error(compute_dtype)}")
        # The backward on the kernels (fastunet.training); in training mode this path also when nothing needs a
        # gradient: it is the one that normalizes with batch statistics and updates the running ones.
        if (needs_grad or training) and blocker is None:
            logits = ops.unet_forward_kernel_grad(
                self.fused_layout(), x.to(compute_dtype), compute_dtype, training=bool(training), packs=self._packs
            )
            self.last_backend, self.last_backend_reason = decision.backend, f"{decision.reason}; backward kernels"
            return logits
        if traced:
            plan = ops.build_plan(self.fused_layout(), compute_dtype, x.device)
        else:
            plan = self.plan(compute_dtype, x.device, stamp)
        graphs = self._graphs
        if graphs is not None and not needs_grad and not traced and x.is_cuda and _graph_replay_allowed():
            logits = graphs.run(plan, x.to(compute_dtype))
            if logits is not None:
                self.last_backend, self.last_backend_reason = decision.backend, f"{decision.reason}; CUDA graph replay"
                return logits
        logits = ops.unet_forward(plan, x.to(compute_dtype), needs_grad)
        self.last_backend, self.last_backend_reason = decision.backend, decision.reason
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
    * training mode: forward and backward on the kernels (:mod:`fastunet.training`), the same backends as eval
      mode; a BatchNorm in training mode normalizes with the batch's statistics and updates its running ones as
      torch does, one frozen in eval mode folds;
    * training mode with gradients disabled: the reference math, with one :class:`FastUNetFallbackWarning` (most
      often ``.eval()`` was called on another model than this one).

    When gradients are needed in eval mode, the backward runs on the kernels too (folded BatchNorm included).

    ``last_backend`` and ``last_backend_reason`` say what the latest forward ran. The folded and packed
    parameters are rebuilt whenever a parameter or buffer changes (``load_state_dict``, optimizer steps,
    ``.to()``, ``.half()``); an in-place edit through ``.data`` bypasses version counting, so call
    :meth:`invalidate_plan` after one.
    """

    def __init__(self, *args, **kwargs) -> None:
        dtype = kwargs.get("dtype")
        if dtype is not None and dtype not in KERNEL_DTYPES:
            raise ValueError(f"FastUNet parameters: {_dtype_error(dtype)}")
        super().__init__(*args, **kwargs)
        self._init_fused()

    @classmethod
    def from_reference(cls, unet: UNet) -> FastUNet:
        """A FastUNet holding ``unet``'s own parameter and buffer tensors (shared, not copied).

        The modules are FastUNet's own, each starting in its counterpart's train/eval mode (a frozen BatchNorm in a
        training model stays frozen) and with its BatchNorm ``eps`` and ``momentum``, and independent afterwards;
        the tensors are the same objects, so an optimizer step, ``load_state_dict`` or a dtype/device conversion of
        either model changes both.
        """
        if not isinstance(unet, UNet):
            raise TypeError(f"expected a fastunet.UNet, got {type(unet).__name__}")
        fast = cls(**unet.config, device="meta")
        fast.load_state_dict(unet.state_dict(keep_vars=True), strict=True, assign=True)
        theirs = dict(unet.named_modules())
        for name, module in fast.named_modules():
            module.training = theirs[name].training
            if isinstance(module, nn.BatchNorm2d):  # settings the constructor does not carry
                module.eps, module.momentum = theirs[name].eps, theirs[name].momentum
        fast._source_link = SourceLink(unet)
        return fast

    def input_spec(self) -> tuple[int, int]:
        return self.in_channels, self.depth

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        return UNet.forward(self, x)

    def fused_layout(self) -> Layout:
        """The modules the kernels read, upsamplings included: a decoder's ``up`` replaced by another supported
        upsampling (module surgery) is what the next forward fuses."""
        from fastunet.convert import read_up  # convert builds on this module

        def spec(conv: nn.Conv2d, norm: nn.Module) -> ConvSpec:
            return ConvSpec(conv, norm if isinstance(norm, nn.BatchNorm2d) else None)

        def double(block) -> tuple[ConvSpec, ConvSpec]:
            return spec(block.conv1, block.norm1), spec(block.conv2, block.norm2)

        return Layout(
            encoders=tuple(double(block) for block in self.encoders),
            ups=tuple(read_up(f"decoders.{level}.up", block.up) for level, block in enumerate(self.decoders)),
            decoders=tuple(double(block.conv) for block in self.decoders),
            head=self.head,
        )
