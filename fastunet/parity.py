"""Whole-network parity: normwise error metrics and the published error budgets per math mode.

Elementwise tolerances fail wherever a ReLU flips near zero, so whole networks are judged normwise: relative L2
error and max|err| / max|ref|, both against a float64 reference. The budgets leave about 4x headroom over the error
growth measured on a 23-conv U-Net (fp32 6e-7 / 1.5e-6, TF32 9.5e-4 / 2.2e-3, fp16 4.9e-3 / 9.4e-3,
bf16 7.7e-3 / 1.5e-2).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Budget:
    """Largest accepted whole-network error against the float64 reference."""

    rel_l2: float
    max_norm: float


NETWORK_BUDGETS: dict[str, Budget] = {
    "fp32": Budget(rel_l2=1e-5, max_norm=1e-5),
    "tf32": Budget(rel_l2=5e-3, max_norm=1e-2),
    "fp16": Budget(rel_l2=2e-2, max_norm=3e-2),
    "bf16": Budget(rel_l2=3e-2, max_norm=5e-2),
}


def math_mode(dtype: torch.dtype, device_type: str, allow_tf32: bool | None = None) -> str:
    """The arithmetic the kernels use for ``dtype`` on ``device_type``: ``fp32``, ``tf32``, ``fp16`` or ``bf16``.

    fp32 runs on TF32 tensor cores on CUDA when ``torch.backends.cudnn.allow_tf32`` is set (what cuDNN does by
    default, and what the kernels follow); Triton's interpreter computes fp32 dots exactly.
    """
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype != torch.float32:
        raise TypeError(f"expected float32, float16 or bfloat16, got {dtype}")
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cudnn.allow_tf32
    return "tf32" if device_type == "cuda" and allow_tf32 else "fp32"


@dataclasses.dataclass(frozen=True)
class NetworkError:
    """Normwise error of an output against a reference."""

    rel_l2: float
    max_norm: float

    def within(self, budget: Budget) -> bool:
        """True when both metrics are inside ``budget`` (NaN never is)."""
        return self.rel_l2 <= budget.rel_l2 and self.max_norm <= budget.max_norm


def network_error(out: torch.Tensor, ref: torch.Tensor) -> NetworkError:
    """Relative L2 error and max|out - ref| / max|ref|, computed in float64 on the reference's device.

    A NaN or inf in ``out`` where ``ref`` is finite gives an infinite error.
    """
    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} differs from the reference's {tuple(ref.shape)}")
    ref64 = ref.detach().double()
    out64 = out.detach().to(device=ref64.device, dtype=torch.float64)
    if not torch.isfinite(out64[torch.isfinite(ref64)]).all():
        return NetworkError(rel_l2=float("inf"), max_norm=float("inf"))
    diff = out64 - ref64
    ref_norm = torch.linalg.vector_norm(ref64).item()
    ref_max = ref64.abs().max().item() if ref64.numel() else 0.0
    diff_norm = torch.linalg.vector_norm(diff).item()
    diff_max = diff.abs().max().item() if diff.numel() else 0.0
    return NetworkError(
        rel_l2=diff_norm / ref_norm if ref_norm > 0 else diff_norm,
        max_norm=diff_max / ref_max if ref_max > 0 else diff_max,
    )


def randomize_norm_stats(model: torch.nn.Module, generator: torch.Generator | None = None) -> None:
    """Give every BatchNorm2d random running statistics and affine parameters (in place).

    Freshly built BatchNorm layers are the identity in eval mode (mean 0, var 1, weight 1, bias 0), which would let
    a wrong fold pass a parity check.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                shape, kwargs = module.num_features, {"generator": generator, "dtype": torch.float32}
                module.running_mean.copy_(torch.randn(shape, **kwargs) * 0.1)
                module.running_var.copy_(torch.rand(shape, **kwargs) * 0.5 + 0.75)
                if module.weight is not None:
                    module.weight.copy_(torch.rand(shape, **kwargs) * 0.5 + 0.75)
                    module.bias.copy_(torch.randn(shape, **kwargs) * 0.1)
