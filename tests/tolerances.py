"""The one tolerance table of the suite (see TESTING.md of the design notes for where the figures come from)."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class KernelTolerance:
    """Elementwise |out - ref| <= atol_per_k * K + rtol * |ref| for one kernel with reduction length K."""

    rtol: float
    atol_per_k: float


@dataclasses.dataclass(frozen=True)
class NetworkBudget:
    """Normwise budgets for a whole network against float64."""

    rel_l2: float
    max_normalized: float


KERNEL = {
    "fp32": KernelTolerance(rtol=1.3e-6, atol_per_k=2e-7),
    "tf32": KernelTolerance(rtol=1e-2, atol_per_k=2e-6),
    "fp16": KernelTolerance(rtol=1e-3, atol_per_k=1e-4),
    "bf16": KernelTolerance(rtol=1.6e-2, atol_per_k=1e-5),
}

NETWORK = {
    "fp32": NetworkBudget(rel_l2=1e-5, max_normalized=1e-5),
    "tf32": NetworkBudget(rel_l2=5e-3, max_normalized=1e-2),
    "fp16": NetworkBudget(rel_l2=2e-2, max_normalized=3e-2),
    "bf16": NetworkBudget(rel_l2=3e-2, max_normalized=5e-2),
}


def precision_key(dtype: torch.dtype, device: torch.device) -> str:
    """Which row applies: fp32 on a GPU runs TF32 unless cuDNN's TF32 switch is off."""
    if dtype == torch.float32:
        return "tf32" if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else "fp32"
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def assert_kernel_close(out: torch.Tensor, ref: torch.Tensor, k: int, key: str) -> None:
    """Elementwise check of a single kernel's output against a float64 reference; NaN never passes."""
    tol = KERNEL[key]
    out64 = out.detach().double().cpu()
    ref64 = ref.detach().double().cpu()
    assert out64.shape == ref64.shape, f"shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}"
    assert not out64.isnan().any(), f"{int(out64.isnan().sum())} NaN in the output (unwritten or wrong)"
    err = (out64 - ref64).abs()
    bound = tol.atol_per_k * k + tol.rtol * ref64.abs()
    worst = (err - bound).max().item() if err.numel() else 0.0
    assert worst <= 0, f"{key}: max error {err.max().item():.3e} exceeds the bound by {worst:.3e} (K={k})"


def network_errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative L2, max |err| / max |ref|) of a whole-network output against float64."""
    out64 = out.detach().double().cpu()
    ref64 = ref.detach().double().cpu()
    if ref64.numel() == 0:
        return 0.0, 0.0
    err = out64 - ref64
    return (err.norm() / ref64.norm()).item(), (err.abs().max() / ref64.abs().max()).item()


def assert_network_close(out: torch.Tensor, ref: torch.Tensor, key: str) -> None:
    budget = NETWORK[key]
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert not out.detach().isnan().any(), "NaN in the network output"
    rel_l2, max_norm = network_errors(out, ref)
    assert rel_l2 <= budget.rel_l2, f"{key}: relative L2 {rel_l2:.3e} > {budget.rel_l2:.0e}"
    assert max_norm <= budget.max_normalized, f"{key}: max-normalized {max_norm:.3e} > {budget.max_normalized:.0e}"
