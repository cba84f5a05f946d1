"""Which backend a fused module's forward runs: a pure function of the call's circumstances, mirroring the dispatch
table of the README (``tests/test_plan_cache.py`` checks the two against each other)."""

from __future__ import annotations

import dataclasses

import torch

BACKEND_TRITON = "triton"
BACKEND_INTERPRETER = "triton-interpreter"
BACKEND_REFERENCE = "reference"


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """The backend, why, and whether to say so with a ``FastUNetFallbackWarning`` (once per module and reason)."""

    backend: str
    reason: str
    warn: bool = False


def dispatch_reason(
    *,
    training: str | None,
    grad_enabled: bool,
    hooked: str | None,
    global_hooks: bool,
    traced_with_grad: bool,
    device: torch.device,
    interpret: bool,
    backward_blocker: str | None = None,
) -> Dispatch:
    """Decide the backend of one forward.

    Args:
        training: the first module found in training mode (the model itself or a submodule), None in eval mode.
        grad_enabled: ``torch.is_grad_enabled()``.
        hooked: the first submodule with forward hooks, None if none.
        global_hooks: forward hooks registered for every module.
        traced_with_grad: traced by ``torch.compile`` (or a tracing mode) while autograd needs the forward.
        device: the input's device.
        interpret: whether the kernels were imported for Triton's interpreter (``TRITON_INTERPRET=1``).
        backward_blocker: why the backward kernels cannot differentiate this forward (None: they can; see
            :func:`fastunet.training.kernel_training_blocker`). Asked for only where autograd needs the forward.
    """
    device_type = torch.device(device).type
    if training is not None:
        if not grad_enabled:
            return Dispatch(
                BACKEND_REFERENCE,
                f"training mode ({training}) with gradients disabled: BatchNorm normalizes with batch statistics and "
                "overwrites its running statistics; call .eval() on this module for inference (its train/eval mode "
                "is its own, not the source model's)",
                warn=True,
            )
        if backward_blocker is not None:
            return Dispatch(BACKEND_REFERENCE, f"training mode ({training}): {backward_blocker}")
    mode = "eval mode" if training is None else "training mode"
    if hooked is not None or global_hooks:
        where = f"on {hooked}" if hooked is not None else "registered globally"
        return Dispatch(BACKEND_REFERENCE, f"forward hooks {where}: the fused kernels cannot run them", warn=True)
    if traced_with_grad and backward_blocker is not None:
        # Without backward kernels the eager path's backward recomputes the layout's math with torch.autograd.grad,
        # which TorchDynamo cannot trace; compiled with autograd on, the whole forward is then the reference math.
        return Dispatch(
            BACKEND_REFERENCE,
            f"torch.compile with autograd on: {backward_blocker} (run inference under torch.no_grad() for the kernels)",
        )
    if interpret:
        if device_type != "cpu":
            return Dispatch(
                BACKEND_REFERENCE,
                f"TRITON_INTERPRET=1 runs kernels on CPU tensors only, input is on {device}",
                warn=True,
            )
        return Dispatch(BACKEND_INTERPRETER, mode)
    if device_type != "cuda":
        return Dispatch(
            BACKEND_REFERENCE, f"compiled Triton kernels need CUDA tensors, input is on {device}", warn=True
        )
    return Dispatch(BACKEND_TRITON, mode)
