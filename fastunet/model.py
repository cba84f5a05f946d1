"""``FastUNet``: the reference U-Net's parameters, run as a plan of fused Triton kernels."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from fastunet import ops
from fastunet.ops import INTERPRET, Plan
from fastunet.reference import UNet, check_input

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

BACKEND_TRITON = "triton"
BACKEND_INTERPRETER = "triton-interpreter"
BACKEND_REFERENCE = "reference"


class FastUNetFallbackWarning(UserWarning):
    """Emitted (once per module and reason) when a forward runs the reference PyTorch math instead of the kernels."""


class FastUNet(UNet):
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
        self.last_backend: str | None = None
        self.last_backend_reason: str | None = None
        self._plans: dict[tuple, tuple[tuple, Plan]] = {}
        self._warned: set[str] = set()

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
        return fast

    # -- plan ---------------------------------------------------------------------------------------------------
    def invalidate_plan(self) -> None:
        """Drop the folded/packed parameters; the next forward rebuilds them."""
        self._plans.clear()

    def _scan(self) -> tuple[list[str], list[torch.Tensor], tuple]:
        """One walk over the modules per forward: the names of modules in training mode, the parameters, and the
        key that says whether a cached plan is still valid (each parameter's and buffer's storage and version,
        and every BatchNorm eps)."""
        training, params, key = [], [], []
        for name, module in self.named_modules():
            if module.training:
                training.append(name or "the model")
            for param in module._parameters.values():
                if param is not None:
                    params.append(param)
                    key.append((param.data_ptr(), param._version, param.dtype, param.device))
            for buffer in module._buffers.values():
                if buffer is not None:
                    key.append((buffer.data_ptr(), buffer._version, buffer.dtype, buffer.device))
            if isinstance(module, nn.BatchNorm2d):
                key.append(module.eps)
        return training, params, tuple(key)

    def plan(self, dtype: torch.dtype, device: torch.device, state: tuple | None = None) -> Plan:
        """The packed parameters for ``dtype`` on ``device``, rebuilt if any parameter, buffer or BatchNorm ``eps``
        changed since (one cached plan per dtype and device, so autocast and plain calls don't evict each other)."""
        state = self._scan()[2] if state is None else state
        cached = self._plans.get((dtype, device))
        if cached is None or cached[0] != state:
            cached = (state, ops.build_plan(self, dtype, device))
            self._plans[(dtype, device)] = cached
        return cached[1]

    # -- forward ------------------------------------------------------------------------------------------------
    def _reference_forward(self, x: torch.Tensor, reason: str, warn: bool) -> torch.Tensor:
        self.last_backend, self.last_backend_reason = BACKEND_REFERENCE, reason
        if warn and reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(
                f"FastUNet ran the reference PyTorch forward: {reason}", FastUNetFallbackWarning, stacklevel=3
            )
        return super().forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, self.depth)
        training, params, state = self._scan()
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise TypeError(f"FastUNet needs all parameters in one dtype, found {sorted(map(str, dtypes))}")
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
            return self._reference_forward(x, reason, warn=False)
        if INTERPRET and x.device.type != "cpu":
            return self._reference_forward(
                x, f"TRITON_INTERPRET=1 runs kernels on CPU tensors only, input is on {x.device}", warn=True
            )
        if not INTERPRET and x.device.type != "cuda":
            return self._reference_forward(
                x, f"compiled Triton kernels need CUDA tensors, input is on {x.device}", warn=True
            )
        compute_dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        if compute_dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"expected float32, float16 or bfloat16 input, got {compute_dtype}")
        plan = self.plan(compute_dtype, x.device, state)
        logits = ops.unet_forward(self, plan, x.to(compute_dtype), params)
        self.last_backend = BACKEND_INTERPRETER if INTERPRET else BACKEND_TRITON
        self.last_backend_reason = "eval mode"
        return logits
