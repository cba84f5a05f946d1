"""What each benchmark provider runs: the fused stages and network, and their PyTorch equivalents.

Providers:

* ``fastunet``: the Triton launchers (one stage) or :class:`fastunet.FastUNet` (whole network), fed the layout the
  fused forward uses: the user's NCHW input, NHWC activations.
* ``torch-eager``: the same math in eager PyTorch, channels_last (cuDNN's fast layout for fp16/bf16); run it with
  ``torch.backends.cudnn.benchmark = True``.
* ``torch-compile``: the eager callable through ``torch.compile`` (default mode).
* ``torch-compile-max-autotune``: the same with ``mode="max-autotune"`` (inductor's tuned Triton templates and
  CUDA graphs; ``--max-autotune-mode max-autotune-no-cudagraphs`` leaves the graphs out, as fastunet has none).

Every provider of a stage sees the same random values, so their outputs can be compared before timing.

A training step (:func:`training_step`, providers ``fastunet``, ``torch-eager`` and ``torch-compile``): forward, mean
squared error against a fixed random target, backward and a ``torch.optim.AdamW`` step, each provider on its own copy
of the same starting parameters.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastunet.kernels.conv import (
    conv2d_nhwc,
    conv_transpose2x2_nhwc,
    pack_conv_transpose_weight,
    pack_conv_weight,
)
from fastunet.kernels.upsample import upsample2x_nhwc
from fastunet.model import FastUNet
from fastunet.parity import randomize_norm_stats
from fastunet.reference import UNet, center_pad
from fastunet.tooling.shapes import BenchConfig, Stage
from fastunet.tooling.timing_args import PROVIDERS, TRAIN_PROVIDERS

# torch.compile mode of each compiled provider. max-autotune captures CUDA graphs, which the fused forward does not
# use (it pays its 18-22 launches): "max-autotune-no-cudagraphs" compares like with like on launch overhead.
COMPILE_MODES: dict[str, str] = {"torch-compile": "default", "torch-compile-max-autotune": "max-autotune"}
DEFAULT_COMPILE_MODE = COMPILE_MODES["torch-compile-max-autotune"]
# torch.compile backend of the compiled providers: None for inductor (what is timed). A dry run on the CPU sets
# "eager" (dynamo traces, nothing is generated), so the plumbing runs in seconds without a C++ toolchain.
COMPILE_BACKEND: str | None = None


def compile_mode(provider: str, max_autotune_mode: str = DEFAULT_COMPILE_MODE) -> str | None:
    """The ``torch.compile`` mode of ``provider`` (None for the uncompiled ones)."""
    if provider == "torch-compile-max-autotune":
        return max_autotune_mode
    return COMPILE_MODES.get(provider)


def _nchw(t: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) -> (N, C, H, W) view."""
    return t.permute(0, 3, 1, 2)


def _like_traced(values_nchw: torch.Tensor, shape: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
    """An NHWC view with the traced ``shape`` and ``stride`` holding ``values_nchw``."""
    nhwc = torch.empty_strided(shape, stride, dtype=values_nchw.dtype, device=values_nchw.device)
    nhwc.copy_(values_nchw.permute(0, 2, 3, 1))
    return nhwc


@dataclasses.dataclass
class StageTensors:
    """Random inputs and parameters of one stage, in torch's layout (NCHW channels_last, torch weight shapes)."""

    x: torch.Tensor
    up: torch.Tensor | None
    weight: torch.Tensor
    bias: torch.Tensor
    head_weight: torch.Tensor | None
    head_bias: torch.Tensor | None


def stage_tensors(stage: Stage, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> StageTensors:
    """Random (not zero) inputs and weights for ``stage``; weights scaled so activations stay O(1) in fp16."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)

    n, h, w = stage.x_shape[0], stage.x_shape[1], stage.x_shape[2]
    x = randn(n, stage.x_shape[3], h, w).contiguous(memory_format=torch.channels_last)
    up = None
    if stage.up_shape is not None:
        un, uh, uw, uc = stage.up_shape
        up = randn(un, uc, uh, uw).contiguous(memory_format=torch.channels_last)
    head_weight = head_bias = None
    if stage.kind == "upsample":  # no parameters
        weight = bias = x.new_empty(0)
    elif stage.kind == "conv-transpose":
        c_in, c_real = stage.c_main, stage.c_out // 4
        weight, bias = randn(c_in, c_real, 2, 2, scale=(1.0 / c_in) ** 0.5), randn(c_real, scale=0.1)
    elif stage.kind == "head":
        weight, bias = randn(stage.c_out, stage.c_main, 1, 1, scale=(1.0 / stage.c_main) ** 0.5), randn(stage.c_out)
    else:
        c_in = stage.c_main + stage.c_up
        weight, bias = randn(stage.c_out, c_in, 3, 3, scale=(2.0 / (9 * c_in)) ** 0.5), randn(stage.c_out, scale=0.1)
        if stage.kind == "conv+head":
            head_weight = randn(stage.n_cls, stage.c_out, 1, 1, scale=(1.0 / stage.c_out) ** 0.5)
            head_bias = randn(stage.n_cls, scale=0.1)
    return StageTensors(x, up, weight, bias, head_weight, head_bias)


def eager_stage(stage: Stage, t: StageTensors) -> Callable[[], tuple[torch.Tensor, ...]]:
    """The stage as eager PyTorch ops on NCHW (channels_last) tensors; returns the stage's outputs."""
    kind, x, up, weight, bias = stage.kind, t.x, t.up, t.weight, t.bias
    height, width = stage.height, stage.width

    if kind == "conv-transpose":
        return lambda: (F.conv_transpose2d(x, weight, bias, stride=2),)
    if kind == "head":
        return lambda: (F.conv2d(x, weight, bias),)
    if kind == "upsample":
        mode, align_corners = stage.up_mode, stage.align_corners
        return lambda: (
            F.interpolate(x, scale_factor=2, mode=mode, align_corners=align_corners if mode == "bilinear" else None),
        )

    def conv(inp: torch.Tensor) -> torch.Tensor:
        return F.relu(F.conv2d(inp, weight, bias, padding=1))

    if kind == "conv":
        return lambda: (conv(x),)
    if kind == "conv+pool":

        def conv_pool() -> tuple[torch.Tensor, ...]:
            features = conv(x)
            return features, F.max_pool2d(features, 2)

        return conv_pool
    if kind == "conv+head":
        head_weight, head_bias = t.head_weight, t.head_bias
        return lambda: (F.conv2d(conv(x), head_weight, head_bias),)
    if kind == "conv+up":
        mode, align_corners = stage.up_mode, stage.align_corners

        def conv_up() -> tuple[torch.Tensor, ...]:
            if mode == "direct":
                upsampled = up
            else:
                upsampled = F.interpolate(
                    up, scale_factor=2, mode=mode, align_corners=align_corners if mode == "bilinear" else None
                )
            return (conv(torch.cat([x, center_pad(upsampled, height, width)], dim=1)),)

        return conv_up
    raise ValueError(f"unknown stage kind {kind!r}")


def fused_stage(stage: Stage, t: StageTensors) -> Callable[[], tuple[torch.Tensor, ...]]:
    """The stage as one fastunet launch on NHWC views laid out as in the traced forward; returns NCHW views."""
    x = _like_traced(t.x, stage.x_shape, stage.x_stride)
    kind = stage.kind
    if kind == "upsample":
        mode, align_corners = stage.up_mode, stage.align_corners
        return lambda: (_nchw(upsample2x_nhwc(x, mode, align_corners)),)
    if kind == "conv-transpose":
        w_packed = pack_conv_transpose_weight(t.weight)
        bias4 = t.bias.repeat(4).contiguous()
        return lambda: (_nchw(conv_transpose2x2_nhwc(x, w_packed, bias4)),)
    if kind == "head":
        w_packed = pack_conv_weight(t.weight)
        logits = torch.empty_strided(stage.y_shape, stage.y_stride, dtype=x.dtype, device=x.device)
        return lambda: (_nchw(conv2d_nhwc(x, w_packed, t.bias, ksize=1, activation="none", out=logits)[0]),)
    w_packed = pack_conv_weight(t.weight)
    if kind in ("conv", "conv+pool"):
        pool = kind == "conv+pool"

        def conv_pool() -> tuple[torch.Tensor, ...]:
            features, pooled = conv2d_nhwc(x, w_packed, t.bias, pool=pool)
            return (_nchw(features), _nchw(pooled)) if pool else (_nchw(features),)

        return conv_pool
    if kind == "conv+head":
        head_weight = t.head_weight[:, :, 0, 0].t().contiguous()
        logits = torch.empty_strided(stage.y_shape, stage.y_stride, dtype=x.dtype, device=x.device)
        return lambda: (
            _nchw(conv2d_nhwc(x, w_packed, t.bias, head_weight=head_weight, head_bias=t.head_bias, out=logits)[0]),
        )
    if kind == "conv+up":
        up = _like_traced(t.up, stage.up_shape, stage.up_stride)
        mode, align_corners = stage.up_mode, stage.align_corners
        return lambda: (_nchw(conv2d_nhwc(x, w_packed, t.bias, up=up, up_mode=mode, align_corners=align_corners)[0]),)
    raise ValueError(f"unknown stage kind {kind!r}")


def compiled(fn: Callable, mode: str) -> Callable:
    """``torch.compile(fn, mode=mode)`` after resetting dynamo.

    Stage callables share code objects, so without the reset each new shape would count against dynamo's
    recompilation limit and, past it, silently run eager.
    """
    torch._dynamo.reset()
    if COMPILE_BACKEND is not None:
        return torch.compile(fn, backend=COMPILE_BACKEND)
    return torch.compile(fn, mode=mode)


def stage_callable(
    stage: Stage, provider: str, t: StageTensors, max_autotune_mode: str = DEFAULT_COMPILE_MODE
) -> Callable[[], tuple[torch.Tensor, ...]]:
    """The callable that runs ``stage`` for ``provider`` (outputs as NCHW tensors or views)."""
    if provider == "fastunet":
        return fused_stage(stage, t)
    if provider == "torch-eager":
        return eager_stage(stage, t)
    if provider in COMPILE_MODES:
        return compiled(eager_stage(stage, t), compile_mode(provider, max_autotune_mode))
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def make_model(config: BenchConfig, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> UNet:
    """The reference U-Net of ``config`` with seeded random weights (and BatchNorm statistics), in eval mode."""
    torch.manual_seed(seed)
    model = UNet(**config.model_kwargs())
    randomize_norm_stats(model, torch.Generator().manual_seed(seed + 1))
    return model.to(device=device, dtype=dtype).eval()


def make_input(config: BenchConfig, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> torch.Tensor:
    """A random NCHW-contiguous input for ``config``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(config.input_shape(), generator=gen).to(device=device, dtype=dtype)


def network_callable(
    model: UNet, x: torch.Tensor, provider: str, max_autotune_mode: str = DEFAULT_COMPILE_MODE
) -> Callable[[], torch.Tensor]:
    """The whole forward for ``provider`` on ``x`` (NCHW), under ``torch.no_grad``; ``.module`` is what it runs.

    ``fastunet`` shares ``model``'s parameters and reads ``x`` as given; the torch providers run a channels_last
    copy of the model on a channels_last copy of ``x``.
    """
    if provider in ("fastunet", "fastunet-graphs"):
        module: torch.nn.Module = FastUNet.from_reference(model).eval()
        if provider == "fastunet-graphs":
            module.use_cuda_graphs()
        inp = x
    elif provider == "torch-eager" or provider in COMPILE_MODES:
        module = copy.deepcopy(model).to(memory_format=torch.channels_last).eval()
        inp = x.contiguous(memory_format=torch.channels_last)
        if provider in COMPILE_MODES:
            module = compiled(module, compile_mode(provider, max_autotune_mode))
    else:
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return module(inp)

    forward.module = module  # lets callers check e.g. FastUNet.last_backend
    return forward


# The optimizer of the training step: AdamW with PyTorch's default betas and weight decay, a learning rate small
# enough that the few hundred timed steps stay finite on random data (the value does not change the work done).
TRAIN_LR = 1e-4
# GradScaler's starting scale for float16 steps (PyTorch's default); the same for every provider, so that their
# first step's gradients, scaled alike, compare normwise.
TRAIN_INIT_SCALE = 2.0**16


def training_model(config: BenchConfig, device: torch.device | str, seed: int = 0) -> UNet:
    """The reference U-Net of ``config`` with ``norm=None`` (the layout the backward kernels cover: BatchNorm with
    batch statistics trains on the reference math), seeded random float32 weights, in training mode."""
    return make_model(dataclasses.replace(config, norm=None), torch.float32, device, seed=seed).train()


def adamw(params, device: torch.device | str) -> tuple[torch.optim.AdamW, bool]:
    """``AdamW(params, lr=TRAIN_LR, fused=True)`` where PyTorch has the fused kernel for ``device`` (and these
    parameters), else the default implementation; returns (optimizer, fused)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=TRAIN_LR, fused=True), True
    except RuntimeError:  # "`fused=True` requires all the params to be floating point Tensors of supported devices"
        return torch.optim.AdamW(params, lr=TRAIN_LR), False


def autocast_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The ``torch.autocast`` dtype of a training step in ``dtype`` (None: float32 throughout)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"a training step runs float32, float16 or bfloat16, got {dtype}")
    return None if dtype == torch.float32 else dtype


@dataclasses.dataclass
class TrainingStep:
    """One provider's training step, callable: ``optimizer.zero_grad(set_to_none=True)``; under
    ``torch.autocast(dtype)`` (bf16/fp16; float32: none) the forward and ``F.mse_loss(logits, target)``; the backward;
    the optimizer step (through a ``GradScaler`` in float16, as mixed-precision training does). Returns the loss,
    detached (no host sync). ``module`` holds the parameters (``runs``: what is called, the compiled wrapper for
    ``torch-compile``)."""

    provider: str
    module: nn.Module
    runs: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    fused: bool
    scaler: torch.amp.GradScaler
    x: torch.Tensor
    target: torch.Tensor
    dtype: torch.dtype
    steps: int = 0

    def __call__(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        amp = autocast_dtype(self.dtype)
        with torch.autocast(self.x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = F.mse_loss(self.runs(self.x), self.target)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.steps += 1
        return loss.detach()

    def gradients(self) -> dict[str, torch.Tensor]:
        """The parameters' gradients left by the latest step, by parameter name. In float16 with the fused optimizer
        they stay multiplied by the loss scale (the fused kernel unscales on the fly); on the first step that scale
        is ``TRAIN_INIT_SCALE`` for every provider, which a relative comparison does not see."""
        if self.steps == 0:
            raise RuntimeError("no training step has run yet: call the step once before reading its gradients")
        missing = [name for name, p in self.module.named_parameters() if p.grad is None]
        if missing:
            raise RuntimeError(f"{self.provider}: no gradient reached {', '.join(missing[:5])}")
        return {name: p.grad for name, p in self.module.named_parameters()}


def training_step(
    model: UNet, provider: str, x: torch.Tensor, target: torch.Tensor, dtype: torch.dtype
) -> TrainingStep:
    """``provider``'s training step on its own copy of ``model`` (float32 parameters, training mode), for input
    ``x`` (NCHW, float32) and ``target`` (the logits' shape):

    * ``fastunet``: :class:`FastUNet` on the copy's tensors, fed ``x`` as given (forward and backward on the
      kernels where the layout allows: the caller checks ``module.last_backend_reason``);
    * ``torch-eager``: the reference U-Net, channels_last, on a channels_last copy of ``x``;
    * ``torch-compile``: the same module through ``torch.compile`` (default mode): forward and backward compiled,
      the loss and the optimizer step eager.
    """
    if provider not in TRAIN_PROVIDERS:
        raise ValueError(f"unknown training provider {provider!r}; expected one of {TRAIN_PROVIDERS}")
    autocast_dtype(dtype)  # refuses other dtypes before anything is copied
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise TypeError("a training step keeps float32 parameters (mixed precision comes from torch.autocast)")
    module: nn.Module = copy.deepcopy(model).train()
    if provider == "fastunet":
        module = FastUNet.from_reference(module).train()
        runs, inp = module, x
    else:
        module = module.to(memory_format=torch.channels_last)
        inp = x.contiguous(memory_format=torch.channels_last)
        runs = compiled(module, compile_mode(provider)) if provider in COMPILE_MODES else module
    optimizer, fused = adamw(module.parameters(), x.device)
    scaler = torch.amp.GradScaler(x.device.type, init_scale=TRAIN_INIT_SCALE, enabled=dtype == torch.float16)
    return TrainingStep(provider, module, runs, optimizer, fused, scaler, inp, target, dtype)
