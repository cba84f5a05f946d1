"""``trace``: the kernels one forward launches, with shapes, FLOPs and bytes, without running them."""

from __future__ import annotations

import torch

from fastunet.kernels._common import LaunchRecord, dry_run, launch_log
from fastunet.model import FastUNet, FusedForward
from fastunet.ops import build_plan, run_plan
from fastunet.reference import UNet, check_input


def trace(model: torch.nn.Module, x: torch.Tensor) -> list[LaunchRecord]:
    """List the launches of ``model``'s eval-mode Triton forward on an input shaped like ``x``.

    ``model``: a :class:`fastunet.UNet`, a :class:`fastunet.FastUNet`, or a module returned by
    :func:`fastunet.convert`.

    Nothing runs: the plan is built on the ``meta`` device and the launchers validate, allocate and record in
    dry-run mode, so any size can be traced on any machine. ``x`` may itself be a meta tensor; only its shape,
    dtype and strides are used.

    Each record has the kernel name, grid, FLOPs, bytes read (each input, weight and bias once) and bytes written.
    """
    if isinstance(model, UNet) and not isinstance(model, FusedForward):
        model = FastUNet.from_reference(model)
    if not isinstance(model, FusedForward):
        raise TypeError(
            f"expected a fastunet.UNet, a FastUNet or a module from fastunet.convert(), got {type(model).__name__}"
        )
    in_channels, depth = model.input_spec()
    check_input(x, in_channels, depth)
    plan = build_plan(model.fused_layout(), x.dtype, torch.device("meta"))
    meta_x = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    with dry_run(), launch_log() as records:
        run_plan(plan, meta_x)
    return list(records)


def summarize(records: list[LaunchRecord]) -> dict:
    """Totals over a trace: launches, FLOPs, bytes read and written."""
    return {
        "launches": len(records),
        "flops": sum(r.flops for r in records),
        "bytes_read": sum(r.bytes_read for r in records),
        "bytes_written": sum(r.bytes_written for r in records),
    }
