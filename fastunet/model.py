"""``FastUNet``: the reference U-Net's parameters, run as a plan of fused Triton kernels."""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from fastunet import ops
from fastunet.kernels import INTERPRET
from fastunet.kernels.conv import MAX_HEAD_CHANNELS, pack_conv_transpose_weight, pack_conv_weight
from fastunet.reference import DoubleConv, UNet, check_input

BACKEND_TRITON = "triton"
BACKEND_INTERPRETER = "triton-interpreter"
BACKEND_REFERENCE = "reference"


class FastUNetFallbackWarning(UserWarning):
    """Emitted (once per module and reason) when a forward runs the reference PyTorch math instead of the kernels."""


@dataclasses.dataclass
class ConvStage:
    """One conv3x3 (+ folded eval BatchNorm): weight packed (9 * c_in, c_out), bias (c_out,)."""

    weight: torch.Tensor
    bias: torch.Tensor


@dataclasses.dataclass
class Plan:
    """Everything a forward launches with, in the compute dtype and on the compute device."""

    encoders: list[tuple[ConvStage, ConvStage]]
    ups: list[ConvStage | None]  # transposed conv per decoder level: weight (c_in, 4 c_out), bias repeated 4x
    decoders: list[tuple[ConvStage, ConvStage]]
    head: ConvStage  # weight (c_out, n_cls), bias (n_cls,)
    fuse_head: bool


def _fold(conv: nn.Conv2d, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight and bias with an eval-mode BatchNorm folded in, computed in float64."""
    weight = conv.weight.detach().double()
    bias = (
        conv.bias.detach().double()
        if conv.bias is not None
        else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    )
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
        super().__init__(*args, **kwargs)
        self.last_backend: str | None = None
        self.last_backend_reason: str | None = None
        self._plan: Plan | None = None
        self._plan_key: tuple | None = None
        self._warned: set[str] = set()

    @classmethod
    def from_reference(cls, unet: UNet) -> FastUNet:
        """A FastUNet that shares (not copies) ``unet``'s parameters and buffers."""
        if not isinstance(unet, UNet):
            raise TypeError(f"expected a fastunet.UNet, got {type(unet).__name__}")
        fast = cls(**unet.config, device="meta")
        fast.encoders, fast.decoders, fast.head = unet.encoders, unet.decoders, unet.head
        fast.train(unet.training)
        return fast

    # -- plan ---------------------------------------------------------------------------------------------------
    def invalidate_plan(self) -> None:
        """Drop the folded/packed parameters; the next forward rebuilds them."""
        self._plan = None
        self._plan_key = None

    def _state_key(self, dtype: torch.dtype, device: torch.device) -> tuple:
        tensors = [*self.parameters(), *self.buffers()]
        return (dtype, device, tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors))

    def plan(self, dtype: torch.dtype, device: torch.device) -> Plan:
        """The packed parameters for ``dtype`` on ``device``, rebuilt if any parameter changed since."""
        key = self._state_key(dtype, device)
        if self._plan is None or self._plan_key != key:
            self._plan = self._build_plan(dtype, device)
            self._plan_key = key
        return self._plan

    def _build_plan(self, dtype: torch.dtype, device: torch.device) -> Plan:
        def stage(conv: nn.Conv2d, norm: nn.Module) -> ConvStage:
            weight, bias = _fold(conv, norm)
            return ConvStage(pack_conv_weight(weight).to(device, dtype), bias.to(device, dtype).contiguous())

        def double(block: DoubleConv) -> tuple[ConvStage, ConvStage]:
            return stage(block.conv1, block.norm1), stage(block.conv2, block.norm2)

        ups: list[ConvStage | None] = []
        for decoder in self.decoders:
            if self.upsample == "transpose":
                weight = decoder.up.weight.detach()
                ups.append(
                    ConvStage(
                        pack_conv_transpose_weight(weight).to(device, dtype),
                        decoder.up.bias.detach().repeat(4).to(device, dtype).contiguous(),
                    )
                )
            else:
                ups.append(None)
        head_weight = self.head.weight.detach()[:, :, 0, 0].t().contiguous()
        return Plan(
            encoders=[double(encoder) for encoder in self.encoders],
            ups=ups,
            decoders=[double(decoder.conv) for decoder in self.decoders],
            head=ConvStage(head_weight.to(device, dtype), self.head.bias.detach().to(device, dtype).contiguous()),
            fuse_head=self.base_channels <= MAX_HEAD_CHANNELS,
        )

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
        params = list(self.parameters())
        if params[0].device != x.device:
            raise RuntimeError(f"input is on {x.device} but the parameters are on {params[0].device}")
        autocast = torch.is_autocast_enabled(x.device.type)
        if not autocast and params[0].dtype != x.dtype:
            raise TypeError(
                f"input dtype {x.dtype} does not match the parameters' dtype {params[0].dtype} "
                "(convert one of them, or run under torch.autocast)"
            )
        if self.training:
            return self._reference_forward(x, "training mode (no Triton backward kernels yet)", warn=False)
        if INTERPRET and x.device.type != "cpu":
            return self._reference_forward(
                x, f"TRITON_INTERPRET=1 runs kernels on CPU tensors only, input is on {x.device}", warn=True
            )
        if not INTERPRET and x.device.type != "cuda":
            return self._reference_forward(
                x, f"compiled Triton kernels need CUDA tensors, input is on {x.device}", warn=True
            )
        compute_dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        if compute_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"expected float32, float16 or bfloat16 input, got {compute_dtype}")
        self.last_backend = BACKEND_INTERPRETER if INTERPRET else BACKEND_TRITON
        self.last_backend_reason = "eval mode"
        plan = self.plan(compute_dtype, x.device)
        return ops.unet_forward(self, plan, x.to(compute_dtype), params)
