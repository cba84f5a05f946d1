"""Tolerances of the suite: per-kernel bounds here, whole-network budgets from :mod:`fastunet.parity` (the same
table ``fastunet check`` applies)."""

from __future__ import annotations

import dataclasses

import torch

from fastunet.parity import NETWORK_BUDGETS, math_mode, network_error


@dataclasses.dataclass(frozen=True)
class KernelTolerance:
    """Elementwise |out - ref| <= atol_per_k * K + rtol * |ref| for one kernel with reduction length K."""

    rtol: float
    atol_per_k: float


KERNEL = {
    "fp32": KernelTolerance(rtol=1.3e-6, atol_per_k=2e-7),
    "tf32": KernelTolerance(rtol=1e-2, atol_per_k=2e-6),
    "fp16": KernelTolerance(rtol=1e-3, atol_per_k=1e-4),
    "bf16": KernelTolerance(rtol=1.6e-2, atol_per_k=1e-5),
}


def precision_key(dtype: torch.dtype, device: torch.device) -> str:
    """Which row applies: fp32 on a GPU runs TF32 unless cuDNN's TF32 switch is off."""
    return math_mode(dtype, device.type)


def check_precision_key(key: str, dtype: torch.dtype, device_type: str, allow_tf32: bool | None = None) -> None:
    """Refuse a float32 tolerance row that is not the math the output was computed with.

    fp32 runs as TF32 on CUDA by default: a test that names ``"fp32"`` there holds TF32 results to the strict budget
    and fails on the first GPU run (and ``"tf32"`` on the CPU would be ten times too loose). Tests pass
    ``precision_key(dtype, device)``, or take the ``ieee_fp32`` fixture to keep the strict budget on a GPU.
    """
    if dtype != torch.float32 or key not in ("fp32", "tf32"):
        return
    expected = math_mode(dtype, device_type, allow_tf32)
    if key != expected:
        raise AssertionError(
            f"float32 on {device_type} runs as {expected}, but the test checks it with the {key!r} tolerances: "
            "use precision_key(dtype, device), or the ieee_fp32 fixture for the strict fp32 budget on a GPU"
        )


def assert_kernel_close(out: torch.Tensor, ref: torch.Tensor, k: int, key: str) -> None:
    """Elementwise check of a single kernel's output against a float64 reference; NaN never passes."""
    check_precision_key(key, out.dtype, out.device.type)
    tol = KERNEL[key]
    out64 = out.detach().double().cpu()
    ref64 = ref.detach().double().cpu()
    assert out64.shape == ref64.shape, f"shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}"
    assert not out64.isnan().any(), f"{int(out64.isnan().sum())} NaN in the output (unwritten or wrong)"
    err = (out64 - ref64).abs()
    bound = tol.atol_per_k * k + tol.rtol * ref64.abs()
    worst = (err - bound).max().item() if err.numel() else 0.0
    assert worst <= 0, f"{key}: max error {err.max().item():.3e} exceeds the bound by {worst:.3e} (K={k})"


def assert_network_close(out: torch.Tensor, ref: torch.Tensor, key: str) -> None:
    """Normwise check of a whole network's output against float64, with the published budget for ``key``."""
    check_precision_key(key, out.dtype, out.device.type)
    budget = NETWORK_BUDGETS[key]
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert not out.detach().isnan().any(), "NaN in the network output"
    error = network_error(out.cpu(), ref.cpu())
    assert error.rel_l2 <= budget.rel_l2, f"{key}: relative L2 {error.rel_l2:.3e} > {budget.rel_l2:.0e}"
    assert error.max_norm <= budget.max_norm, f"{key}: max-normalized {error.max_norm:.3e} > {budget.max_norm:.0e}"


def assert_error_ratio(
    out: torch.Tensor, same_dtype_torch: torch.Tensor, ref: torch.Tensor, factor: float = 1.25
) -> None:
    """Our error against float64 is at most ``factor`` times what PyTorch in the same dtype gets (relative L2).

    Both accumulate in fp32 and round once, so their errors match closely; a wrong rounding mode (truncation
    instead of round-to-nearest-even doubles the error) or a lost accumulation precision does not pass.
    """
    ours = network_error(out.cpu(), ref.cpu()).rel_l2
    theirs = network_error(same_dtype_torch.cpu(), ref.cpu()).rel_l2
    assert ours <= factor * theirs + 1e-7, f"relative L2 {ours:.3e} vs PyTorch's {theirs:.3e} in the same dtype"
