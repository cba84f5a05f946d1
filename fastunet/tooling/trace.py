"""``trace``: the kernels one forward launches, with shapes, FLOPs and bytes, without running them.

:func:`trace` lists the launches of a model's forward; :func:`trace_config` traces one configuration, built from
the reference U-Net's constructor arguments, the way every tool here (roofline, compile report, benchmarks) does;
:func:`stage_labels` gives each launch the stage name the fused forward stamped on its record;
:func:`saved_for_backward` counts what autograd keeps from a forward whose backward runs on the kernels, and
:func:`trace_training` lists the launches of such a forward and its backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from fastunet.kernels._common import LaunchRecord, dry_run, launch_log, modeled_target
from fastunet.model import FastUNet, FusedForward
from fastunet.ops import build_plan, run_plan, unet_forward_kernel_grad
from fastunet.reference import UNet, check_input


def trace(model: torch.nn.Module, x: torch.Tensor) -> list[LaunchRecord]:
    """List the launches of ``model``'s eval-mode Triton forward on an input shaped like ``x``.

    ``model``: a :class:`fastunet.UNet`, a :class:`fastunet.FastUNet`, or a module returned by
    :func:`fastunet.convert`.

    Nothing runs: the plan is built on the ``meta`` device and the launchers validate, allocate and record in
    dry-run mode, so any size can be traced on any machine. ``x`` may itself be a meta tensor; only its shape,
    dtype and strides are used.

    Each record has the kernel name, grid, FLOPs, bytes read (each input, weight and bias once), bytes written and
    the name of the network stage it belongs to (``enc0.conv1`` ... ``dec0.conv2``).
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


def trace_config(
    model_kwargs: dict,
    input_shape: Sequence[int],
    dtype: torch.dtype = torch.float16,
    *,
    sm_count: int | None = None,
    arch: int = 90,
) -> list[LaunchRecord]:
    """Trace the fused forward of ``UNet(**model_kwargs)`` on an input of ``input_shape`` and ``dtype``.

    Everything lives on the ``meta`` device: any size traces in milliseconds on any machine. ``sm_count``: choose
    the tiles (and, with ``arch``, the load path: TMA from sm_90 on) for a GPU with that many SMs (what a compile
    report for a given target traces); by default the launchers' own choice where no GPU is involved.
    """
    model = UNet(**model_kwargs, device="meta")
    x = torch.empty(tuple(input_shape), device="meta", dtype=dtype)
    with modeled_target(sm_count, arch) if sm_count is not None else contextlib.nullcontext():
        return trace(model, x)


def stage_labels(records: Sequence[LaunchRecord]) -> list[str]:
    """The stage name of each launch (``enc0.conv1`` ... ``dec0.conv2``), as the fused forward stamped it on the
    record; ``launch<i>`` for a launch made outside a forward (a launcher called on its own)."""
    return [record.stage or f"launch{i}" for i, record in enumerate(records)]


def summarize(records: list[LaunchRecord]) -> dict:
    """Totals over a trace: launches, FLOPs, bytes read and written."""
    return {
        "launches": len(records),
        "flops": sum(r.flops for r in records),
        "bytes_read": sum(r.bytes_read for r in records),
        "bytes_written": sum(r.bytes_written for r in records),
    }


def _training_model(model_kwargs: dict) -> FastUNet:
    model = FastUNet(**model_kwargs, device="meta")
    _check_trains(model.fused_layout())
    return model


def _check_trains(layout) -> None:
    from fastunet.training import kernel_training_blocker

    reason = kernel_training_blocker(layout, training=True)
    if reason is not None:
        raise ValueError(f"the backward kernels cannot run this configuration: {reason}")


def trace_training(
    model_kwargs: dict,
    input_shape: Sequence[int],
    dtype: torch.dtype = torch.float16,
    *,
    sm_count: int | None = None,
    arch: int = 90,
) -> list[LaunchRecord]:
    """The launches of one training step's forward and backward of ``UNet(**model_kwargs)`` on the backward kernels
    (the input needs no gradient; the optimizer step is not included), nothing run: the forward as the training
    path launches it (a 1x1 head fused into the last conv, whose launch stores the map under the logits too; the
    upsampling inside the decoder conv's launch), then the backward, whose records carry the forward stage's name
    with ``.backward``. Raises ``ValueError`` for a layout the backward kernels do not cover."""
    layout = _training_model(model_kwargs).fused_layout()
    return trace_training_layout(layout, input_shape, dtype, sm_count=sm_count, arch=arch)


def trace_training_layout(
    layout,
    input_shape: Sequence[int],
    dtype: torch.dtype = torch.float16,
    *,
    sm_count: int | None = None,
    arch: int = 90,
) -> list[LaunchRecord]:
    """:func:`trace_training` of a fused layout (:class:`fastunet.ops.Layout`, on the ``meta`` device) rather than
    of the reference U-Net's constructor arguments: strided down-sampling convs, norms with data statistics, other
    activations, as the backward kernels take them. Raises ``ValueError`` for a layout they do not cover."""
    from fastunet.training import build_training_plan

    _check_trains(layout)
    x = torch.empty(tuple(input_shape), device="meta", dtype=dtype)
    with modeled_target(sm_count, arch) if sm_count is not None else contextlib.nullcontext():
        with torch.no_grad(), dry_run(), launch_log() as forward:
            plan, _ = build_training_plan(layout, dtype, x.device, training=True)
            run_plan(plan, x, upsample_in_conv=True)
        with torch.enable_grad():
            # meta: the graph, nothing launched
            logits = unet_forward_kernel_grad(layout, x, dtype, training=True)
            with dry_run(), launch_log() as backward:
                logits.backward(torch.empty_like(logits))
    return [*forward, *backward]


def saved_for_backward(model_kwargs: dict, input_shape: Sequence[int], dtype: torch.dtype = torch.float16) -> dict:
    """Bytes autograd keeps between the forward and the backward of ``UNet(**model_kwargs)`` on the backward kernels
    (see :mod:`fastunet.training`), measured on the ``meta`` device (nothing computed): every tensor the ops save,
    each storage counted once (a map saved by its producer and by its consumer is one map).

    Returns ``{"maps": bytes of 4-D tensors (the activations), "weights": bytes of the rest (packed weights and
    biases), "tensors": how many distinct storages}``. Raises ``ValueError`` for a layout the backward kernels do
    not cover.
    """
    model = _training_model(model_kwargs)
    seen: dict[int, tuple[int, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage._cdata] = (storage.nbytes(), t.dim())
        return t

    x = torch.empty(tuple(input_shape), device="meta", dtype=dtype)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet_forward_kernel_grad(model.fused_layout(), x, dtype, training=True)
    maps = sum(size for size, dim in seen.values() if dim == 4)
    return {"maps": maps, "weights": sum(size for size, dim in seen.values() if dim != 4), "tensors": len(seen)}
