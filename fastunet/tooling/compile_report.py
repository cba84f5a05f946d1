"""Compile report: every kernel variant a U-Net forward launches, built for a real GPU target without a GPU.

A forward is traced (:func:`fastunet.trace`), its launches are reduced to the distinct compiled variants (kernel,
constexprs, argument specialization, launch options), and each variant goes through the full Triton pipeline to a
cubin with ``triton.compile``. The cubin is inspected with the ``cuobjdump`` that ships in Triton's wheel:
registers, spills (stack and local memory), shared memory and the tensor-core instructions of the SASS (``HGMMA``:
the sm_90 warpgroup MMA; ``HMMA``: the sm_80-style MMA); ``ptxas -v`` adds its performance warnings (wgmma
serialization). This is the performance check that runs on any machine, and it catches compile errors that the
interpreter never sees.

The SASS also feeds the issue model (:mod:`fastunet.tooling.issue_model`): per variant, the instructions per warp per
K-step of the loops that hold the tensor-core instructions against the tensor-core clocks of that K-step
(``issue_ratio``), and per traced configuration a modeled forward time (a model, not a measurement).

``--training`` adds, per upsampling mode, one training step (:func:`fastunet.tooling.trace.trace_training`): the
forward as the training path launches it, then the backward's launches (the pool gradient, the weight gradient
and the sum of its partials, the input gradients on the forward conv kernel, the upsampling adjoint, the transposed
conv's gradients). Its variants join the table, and its modeled time (forward + backward) joins the forward's in
``model``. With ``--features``, each feature layout the backward kernels train (the strided down-sampling convs,
norms with data statistics, LeakyReLU after a norm, the replicate join: :func:`trace_feature_training`) gets its
training step too, labelled ``train-<feature>/...``; the others are listed under ``untrained`` with the reason.

``--persistent`` and ``--split-k`` add, per forward, the same forward with every launch that has such an autotuning
candidate launched that way (:func:`fastunet.kernels._common.preferring`): a persistent grid (the conv kernel on the
TMA path, where tiles outnumber the programs), split K (a conv with fewer tiles than SMs, one source and a plain
store, plus the launch that adds its parts), labelled ``persistent-<upsample>/...`` and ``split-k-<upsample>/...``:
their variants and modeled times beside the launched forward's.

Arguments are specialized the way Triton's JIT does at launch (an integer equal to 1 becomes a constant; integers
and pointers divisible by 16 get a divisibility hint), so each cubin is the one a launch on the GPU would build.

One command line and one JSON schema, behind ``fastunet report`` and ``python -m bench.compile_report`` alike
(:func:`main`). The JSON (:func:`run`) holds, per variant, ``kernel``, ``config`` (tile, warps, stages, dtype and
the other compile-time constants), ``registers``, ``spill_bytes``, ``shared_bytes``, ``tensor_core_instructions``
(HGMMA + HMMA), the ``occupancy`` those allow on an SM, the issue figures of its costliest tensor-core loop
(``issue_ratio``, ``mainloop_instructions`` per warp per K-step, ``tma_loads`` and ``cp_async`` per iteration) and
``arch``, then the details (:meth:`VariantReport.to_json`); top level, ``model``: the modeled forward of each
configuration on the first target (``dtype``, ``batch``, ``ms``, ``tflops``, ``fraction_of_peak`` and its
``layers``; ``step``: ``"forward"``, or ``"training"`` for a training step, whose ``forward_ms`` and ``backward_ms``
split its ``ms``) under ``model_assumptions``.

Needs ``TRITON_INTERPRET`` unset: under the interpreter the kernels are not compilable objects and the launchers
choose interpreter-only constexprs. Usage::

    fastunet report                                          # the reference config, fp16 and bf16, sm_90
    fastunet report --arch sm_90 sm_80 --json report.json    # also Ampere (HMMA); the model is of the first
    python -m bench.compile_report --arch 90 --dtype bfloat16 --upsample transpose bilinear --batch 1
    python -m bench.compile_report --arch 90 --dtype bf16 --training         # also the training step
    python -m bench.compile_report --arch 90 --dtype bf16 --persistent --split-k  # those candidates, modeled
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.tools.tensor_descriptor import TensorDescriptor

from fastunet.kernels._common import INTERPRET, LaunchRecord, dry_run, launch_log, modeled_target, preferring
from fastunet.model import FastUNet
from fastunet.ops import Act, ConvSpec, Layout, build_plan, run_plan
from fastunet.reference import UNet
from fastunet.tooling import issue_model
from fastunet.tooling.dtypes import short_dtype_name, torch_dtype
from fastunet.tooling.trace import stage_labels, trace_config, trace_training, trace_training_layout

UPSAMPLES = ("transpose", "bilinear", "nearest")
# The reference configuration of the performance work: base 64, depth 4, RGB in, 2 classes, 512x512.
REFERENCE_MODEL = {"in_channels": 3, "num_classes": 2, "base_channels": 64, "depth": 4}
REFERENCE_SIZE = 512
REFERENCE_BATCHES = (16, 1)
# What the command compiles when not told otherwise: the reference config (bilinear) in both 16-bit dtypes, for the
# project's GPU (sm_90).
DEFAULT_DTYPES = ("fp16", "bf16")
DEFAULT_UPSAMPLES = ("bilinear",)
DEFAULT_ARCHS = (90,)
TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
# Layout features beyond the reference U-Net (see fastunet.ops.Layout) whose variants the report also builds: the
# reference network (transposed-conv upsampling) with every conv's activation, its join, or its padding changed;
# "instance" and "group": InstanceNorm2d (affine) or GroupNorm + LeakyReLU after every conv (the statistics
# epilogue, the finalize launch, the normalize launches ahead of the convs and transposed convs, normalize-on-load
# in the 1x1 head, the normalize+pool launch); "instance_bilinear": the same with bilinear upsampling (the upsample
# kernel normalizing on load); "stride": instance norms with strided-conv down-sampling (nnU-Net: stride-2 convs
# reading normalized maps).
FEATURES = ("leaky_relu", "prelu", "silu", "replicate", "valid", "instance", "group", "instance_bilinear", "stride")


@dataclasses.dataclass(frozen=True)
class SmLimits:
    """Per-SM resources of one compute capability (CUDA programming guide, compute capabilities table; allocation
    granularities as in CUDA's occupancy calculator)."""

    max_shared_per_block: int  # dynamic shared memory a launch may opt into
    shared_per_sm: int
    reserved_shared_per_block: int  # shared memory the driver keeps for each resident CTA
    registers_per_sm: int
    max_warps_per_sm: int
    max_blocks_per_sm: int
    register_unit: int = 256  # registers are allocated per warp in units of this many
    register_partitions: int = 4  # the register file is split between the SM's 4 schedulers; a warp lives in one
    shared_unit: int = 128  # shared memory is allocated per CTA in units of this many bytes


SM_LIMITS = {
    80: SmLimits(166912, 167936, 1024, 65536, 64, 32),
    86: SmLimits(101376, 102400, 1024, 65536, 48, 16),
    89: SmLimits(101376, 102400, 1024, 65536, 48, 24),
    90: SmLimits(232448, 233472, 1024, 65536, 64, 32),
}


@dataclasses.dataclass(frozen=True)
class Occupancy:
    """Resident CTAs and warps per SM that a kernel's registers, shared memory and warps allow."""

    blocks_per_sm: int
    warps_per_sm: int
    fraction: float  # warps_per_sm / the SM's warp limit
    limited_by: str  # "registers", "shared memory", "warps", "blocks", or "launch fails" (too much shared memory)
    by_registers: int
    by_shared: int
    by_warps: int
    max_blocks: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def occupancy(arch: int, registers: int, num_warps: int, shared_bytes: int) -> Occupancy | None:
    """Resident CTAs per SM from registers, shared memory, warps and the CTA limit of ``sm_<arch>``.

    Registers as the chip allocates them: per warp, ``registers x 32`` rounded up to a 256-register unit, each warp
    in one of the 4 register-file partitions (65536 / 4 registers each on sm_80 to sm_90). Shared memory per CTA:
    the request plus the 1 KiB the driver reserves, rounded up to 128 B, out of 228 KiB per SM on sm_90 (a launch
    may ask for at most 227 KiB). ``None`` for a target not in :data:`SM_LIMITS`.
    """
    limits = SM_LIMITS.get(arch)
    if limits is None:
        return None
    registers_per_warp = -(-registers * 32 // limits.register_unit) * limits.register_unit
    per_partition = limits.registers_per_sm // limits.register_partitions
    warps_by_registers = (per_partition // registers_per_warp) * limits.register_partitions if registers else 10**9
    by_registers = warps_by_registers // num_warps
    shared = -(-(shared_bytes + limits.reserved_shared_per_block) // limits.shared_unit) * limits.shared_unit
    by_shared = limits.shared_per_sm // shared
    by_warps = limits.max_warps_per_sm // num_warps
    candidates = {
        "registers": by_registers,
        "shared memory": by_shared,
        "warps": by_warps,
        "blocks": limits.max_blocks_per_sm,
    }
    blocks = min(candidates.values())
    limited_by = min(candidates, key=candidates.get)
    if shared_bytes > limits.max_shared_per_block:
        blocks, limited_by = 0, "launch fails"
    return Occupancy(
        blocks_per_sm=blocks,
        warps_per_sm=blocks * num_warps,
        fraction=blocks * num_warps / limits.max_warps_per_sm,
        limited_by=limited_by,
        by_registers=by_registers,
        by_shared=by_shared,
        by_warps=by_warps,
        max_blocks=limits.max_blocks_per_sm,
    )


_POINTER_TYPES = {
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.float32: "*fp32",
    torch.int32: "*i32",
    torch.int64: "*i64",
}
_DIVISIBILITY = 16
_MMA_RE = re.compile(r"\b(HGMMA|HMMA)(\.[\w.]+)?")
_LOCAL_RE = re.compile(r"\b(LDL|STL)(\.[\w.]+)?\b")
_SASS_LINE_RE = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", re.MULTILINE)
_RES_USAGE_RE = re.compile(r"\b(REG|STACK|SHARED|LOCAL):(\d+)")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One distinct compiled kernel: what ``triton.compile`` needs, plus which launches use it."""

    name: str
    kernel: object
    signature: dict
    constexprs: dict  # the kernel's constexprs plus runtime arguments the JIT compiles in as constants
    divisible: tuple[int, ...]  # parameter indices that carry the divisible-by-16 hint
    launch_options: dict
    launches: int
    configs: tuple[str, ...]

    @property
    def dtype(self) -> str:
        """Element type of the first pointer argument (the activations)."""
        return next(t[1:] for t in self.signature.values() if t.startswith("*"))


@dataclasses.dataclass(frozen=True)
class VariantReport:
    """Compiled figures of one variant for one target."""

    name: str
    dtype: str
    arch: int
    constexprs: dict
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int  # per-thread stack and local memory: where ptxas puts spilled registers
    local_ops: int  # LDL/STL instructions in the SASS
    shared_bytes: int  # dynamic shared memory the launch requests
    shared_limit_bytes: int | None  # the most a launch may request on this target (None: target not tabled)
    ctas_per_sm: int | None  # resident CTAs per SM allowed by registers, shared memory and warps
    occupancy: Occupancy | None
    hgmma: int  # HGMMA instructions in the SASS
    hmma: int
    mma_opcodes: tuple[str, ...]
    sass_instructions: int
    ptxas_warnings: tuple[str, ...]  # e.g. wgmma serialized: the tensor cores wait on each instruction
    compile_s: float
    launches: int
    configs: tuple[str, ...]
    mainloop: issue_model.MainLoop  # the tensor-core loops of the SASS: instructions per K-step, issue ratio
    gemm_tile: tuple[int, int, int] | None = None  # (M, N, K) of the CTA's GEMM tile; None: no GEMM (data movement)

    @property
    def issue_ratio(self) -> float | None:
        """Issue clocks over tensor-core clocks per K-step, in the costliest tensor-core loop (above 1: the loop
        cannot feed the tensor cores)."""
        return self.mainloop.summary()["issue_ratio"]

    def to_json(self) -> dict:
        """The variant in the report's schema: :data:`SCHEMA_KEYS` first, then the details (``tensor_clocks`` and
        ``tensor_loops`` of the issue model, each tensor-core loop in ``loops``, the GEMM tile (M, N, K) the issue
        model read (``gemm_tile``: ``BLOCK_M x BLOCK_N x BLOCK_K`` for the convs, ``BLOCK_C x BLOCK_N x BLOCK_P`` for
        the weight gradient), HGMMA and HMMA counts and opcodes, SASS size, LDL/STL count, the shared-memory limit,
        resident CTAs, ptxas warnings, what :func:`problems` finds, launches, the configurations that use it,
        compile seconds)."""
        config = {key: self.constexprs[key] for key in TILE_KEYS if key in self.constexprs}
        config.update({"num_warps": self.num_warps, "num_stages": self.num_stages, "dtype": self.dtype})
        config.update(
            {
                key: value if isinstance(value, (bool, int, float, str)) else str(value)
                for key, value in self.constexprs.items()
                if key not in TILE_KEYS
            }
        )
        issue = self.mainloop.summary()
        return {
            "kernel": self.name,
            "config": config,
            "registers": self.registers,
            "spill_bytes": self.spill_bytes,
            "shared_bytes": self.shared_bytes,
            "tensor_core_instructions": self.hgmma + self.hmma,
            "occupancy": self.occupancy.to_json() if self.occupancy else None,
            "issue_ratio": issue["issue_ratio"],
            "mainloop_instructions": issue["mainloop_instructions"],
            "tma_loads": issue["tma_loads"],
            "cp_async": issue["cp_async"],
            "arch": f"sm_{self.arch}",
            "tensor_clocks": issue["tensor_clocks"],
            "tensor_loops": issue["tensor_loops"],
            "straight_instructions": issue["straight_instructions"],
            "loops": [loop.to_json() for loop in self.mainloop.loops],
            "gemm_tile": None if self.gemm_tile is None else list(self.gemm_tile),
            "hgmma": self.hgmma,
            "hmma": self.hmma,
            "mma_opcodes": list(self.mma_opcodes),
            "sass_instructions": self.sass_instructions,
            "local_ops": self.local_ops,
            "shared_limit_bytes": self.shared_limit_bytes,
            "ctas_per_sm": self.ctas_per_sm,
            "ptxas_warnings": list(self.ptxas_warnings),
            "problems": problems(self),
            "launches": self.launches,
            "used_by": list(self.configs),
            "compile_s": self.compile_s,
        }


SCHEMA_KEYS = (
    "kernel",
    "config",
    "registers",
    "spill_bytes",
    "shared_bytes",
    "tensor_core_instructions",
    "occupancy",
    "issue_ratio",
    "mainloop_instructions",
    "tma_loads",
    "cp_async",
    "arch",
)


# ---------------------------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------------------------
def specialize(arg: object, specialize_value: bool = True, specialize_alignment: bool = True) -> tuple[str, object]:
    """(Triton type, specialization) of one runtime argument, as the JIT sees it at launch.

    The specialization is the constant value when the type is ``"constexpr"`` (an integer equal to 1), else True
    when the argument carries the ``tt.divisibility=16`` hint that lets loads and stores vectorize (a pointer or an
    integer divisible by 16). Integers are 32-bit or 64-bit by magnitude; floats are fp32.
    """
    if arg is None:  # an unused operand (the pointer path's TMA descriptors): the JIT makes it a constant
        return "constexpr", None
    if isinstance(arg, TensorDescriptor):
        block = ", ".join(map(str, arg.block_shape))
        return f"tensordesc<{_POINTER_TYPES[arg.base.dtype][1:]}[{block}]>", False
    if isinstance(arg, torch.Tensor):
        if arg.dtype not in _POINTER_TYPES:
            raise TypeError(f"no Triton pointer type for {arg.dtype}")
        return _POINTER_TYPES[arg.dtype], specialize_alignment and arg.data_ptr() % _DIVISIBILITY == 0
    if isinstance(arg, bool):
        raise TypeError("runtime bool arguments are not supported here; pass flags as constexprs")
    if isinstance(arg, int):
        if specialize_value and arg == 1:
            return "constexpr", 1
        if -(2**31) <= arg < 2**31:
            kind = "i32"
        elif -(2**63) <= arg < 2**63:
            kind = "i64"
        elif arg < 2**64:
            kind = "u64"
        else:
            raise OverflowError(f"integer argument {arg} does not fit in 64 bits")
        return kind, specialize_value and specialize_alignment and arg % _DIVISIBILITY == 0
    if isinstance(arg, float):
        return "fp32", False
    raise TypeError(f"unsupported runtime argument of type {type(arg).__name__}")


def _specialize_record(record: LaunchRecord) -> tuple[dict, dict, tuple[int, ...]]:
    """Signature, constants and divisible parameter indices of one launch."""
    params = getattr(record.kernel, "params", None)
    if params is None:
        raise TypeError(
            f"{record.kernel!r} is not a compilable @triton.jit function: run the compile report with "
            "TRITON_INTERPRET unset"
        )
    runtime = [p for p in params if not p.is_constexpr]
    if len(runtime) != len(record.args):
        raise ValueError(f"{record.name}: {len(record.args)} runtime arguments for {len(runtime)} parameters")
    values = dict(zip((p.name for p in runtime), record.args, strict=True))
    signature, constants, divisible = {}, {}, []
    for index, param in enumerate(params):
        if param.is_constexpr:
            signature[param.name], constants[param.name] = "constexpr", record.constexprs[param.name]
            continue
        kind, spec = specialize(
            values[param.name],
            specialize_value=not getattr(param, "do_not_specialize", False),
            specialize_alignment=not getattr(param, "do_not_specialize_on_alignment", False),
        )
        signature[param.name] = kind
        if kind == "constexpr":
            constants[param.name] = spec
        elif spec:
            divisible.append(index)
    return signature, constants, tuple(divisible)


def variant_key(record: LaunchRecord) -> tuple:
    """What makes a launch's cubin: kernel, constexprs, argument specialization and launch options."""
    signature, constants, divisible = _specialize_record(record)
    return (
        id(record.kernel),
        tuple(signature.items()),
        tuple((k, repr(v)) for k, v in sorted(constants.items())),
        divisible,
        tuple(sorted(record.launch_options.items())),
    )


def collect_variants(traces: Iterable[tuple[str, Sequence[LaunchRecord]]]) -> list[Variant]:
    """Distinct kernel variants over labelled traces, in first-launch order.

    Launches share a variant when they run the same kernel with the same constexprs, argument specialization and
    launch options (:func:`variant_key`): one cubin serves them all.
    """
    return _collect(traces)[0]


def _collect(traces: Iterable[tuple[str, Sequence[LaunchRecord]]]) -> tuple[list[Variant], list[tuple]]:
    """The variants of :func:`collect_variants` and their keys, in the same order."""
    found: dict[tuple, dict] = {}
    for label, records in traces:
        for record in records:
            signature, constants, divisible = _specialize_record(record)
            entry = found.setdefault(
                variant_key(record),
                {
                    # A persistent launch's programs loop over tiles: a cubin of its own, named so.
                    "name": record.name + ("+persistent" if record.constexprs.get("PERSISTENT") else ""),
                    "kernel": record.kernel,
                    "signature": signature,
                    "constexprs": constants,
                    "divisible": divisible,
                    "launch_options": dict(record.launch_options),
                    "launches": 0,
                    "configs": [],
                },
            )
            entry["launches"] += 1
            if label not in entry["configs"]:
                entry["configs"].append(label)
    return [Variant(**{**entry, "configs": tuple(entry["configs"])}) for entry in found.values()], list(found)


def with_candidates(records: Sequence[LaunchRecord]) -> list[LaunchRecord]:
    """Each launch once per autotuning candidate config (the chosen one included): what tuning may compile."""
    expanded = []
    for record in records:
        for candidate in record.candidates or (None,):
            if candidate is None:
                expanded.append(record)
                continue
            options = {key: candidate[key] for key in ("num_warps", "num_stages")}
            if record.retile is not None:  # arguments built for the tile (TMA descriptors), by the launcher itself
                args, constexprs = record.retile(candidate)
                expanded.append(dataclasses.replace(record, args=args, constexprs=constexprs, launch_options=options))
                continue
            constexprs = {**record.constexprs, **{key: candidate[key] for key in TILE_KEYS}}
            expanded.append(dataclasses.replace(record, constexprs=constexprs, launch_options=options))
    return expanded


def trace_for_target(
    upsample: str, dtype: torch.dtype, batch: int, size: int = REFERENCE_SIZE, arch: int = 90, **model_kwargs: int
) -> list[LaunchRecord]:
    """Launches of one forward of the reference U-Net (``model_kwargs`` override it) on a ``size``-square input,
    with the tiles the launchers choose for ``sm_<arch>`` (its SM count from
    :data:`fastunet.tooling.issue_model.ASSUMPTIONS`; a target not tabled there gets the launchers' default; TMA
    loads from sm_90 on)."""
    kwargs = {**REFERENCE_MODEL, **model_kwargs, "upsample": upsample}
    target = issue_model.ASSUMPTIONS.get(arch)
    shape = (batch, kwargs["in_channels"], size, size)
    return trace_config(kwargs, shape, dtype, sm_count=target.sm_count if target else None, arch=arch)


def trace_training_for_target(
    upsample: str, dtype: torch.dtype, batch: int, size: int = REFERENCE_SIZE, arch: int = 90, **model_kwargs: int
) -> list[LaunchRecord]:
    """Launches of one training step of the reference U-Net (``model_kwargs`` override it) on a ``size``-square input
    (:func:`fastunet.tooling.trace.trace_training`: the forward as the training path launches it, then the backward),
    with the tiles the launchers choose for ``sm_<arch>`` as in :func:`trace_for_target`. Raises ``ValueError`` for
    a layout the backward kernels do not cover."""
    kwargs = {**REFERENCE_MODEL, **model_kwargs, "upsample": upsample}
    target = issue_model.ASSUMPTIONS.get(arch)
    shape = (batch, kwargs["in_channels"], size, size)
    return trace_training(kwargs, shape, dtype, sm_count=target.sm_count if target else None, arch=arch)


def feature_layout(feature: str, **model_kwargs: int) -> Layout:
    """The reference U-Net's layout (on ``meta``) with one of :data:`FEATURES`."""
    kwargs = {**REFERENCE_MODEL, **model_kwargs}
    upsample = "bilinear" if feature == "instance_bilinear" else "transpose"
    model = UNet(kwargs["in_channels"], kwargs["num_classes"], kwargs["base_channels"], kwargs["depth"],
                 upsample=upsample, device="meta")  # fmt: skip
    layout = FastUNet.from_reference(model).fused_layout()
    if feature == "replicate":
        return dataclasses.replace(layout, join="replicate")
    strided = {id(pair[0].conv) for pair in layout.encoders[1:]} if feature == "stride" else set()

    def changed(spec: ConvSpec) -> ConvSpec:
        conv = spec.conv
        if feature in ("instance", "group", "instance_bilinear", "stride"):
            channels = conv.out_channels
            if feature == "group":
                norm = torch.nn.GroupNorm(32 if channels % 32 == 0 else 1, channels, device="meta")
            else:
                norm = torch.nn.InstanceNorm2d(channels, affine=True, device="meta")
            if id(conv) in strided:
                conv = torch.nn.Conv2d(conv.in_channels, channels, 3, stride=2, padding=1, device="meta")
            return dataclasses.replace(spec, conv=conv, norm=norm, act=Act("leaky_relu", slope=0.01))
        if feature == "valid":
            conv = torch.nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=0, device="meta")
            return dataclasses.replace(spec, conv=conv)
        if feature == "prelu":
            return dataclasses.replace(spec, act=Act("prelu", module=torch.nn.PReLU(conv.out_channels, device="meta")))
        return dataclasses.replace(spec, act=Act("leaky_relu", slope=0.01) if feature == "leaky_relu" else Act(feature))

    def pairs(levels):
        return tuple((changed(first), changed(second)) for first, second in levels)

    join = "crop" if feature == "valid" else layout.join
    down = "stride" if feature == "stride" else layout.down
    return dataclasses.replace(
        layout, encoders=pairs(layout.encoders), decoders=pairs(layout.decoders), join=join, down=down
    )


def trace_feature(
    feature: str, dtype: torch.dtype, batch: int, size: int = REFERENCE_SIZE, arch: int = 90, **model_kwargs: int
) -> list[LaunchRecord]:
    """Launches of one forward of :func:`feature_layout` (like :func:`trace_config`)."""
    layout = feature_layout(feature, **model_kwargs)
    plan = build_plan(layout, dtype, torch.device("meta"))
    x = torch.empty(batch, layout.in_channels, size, size, dtype=dtype, device="meta")
    target = issue_model.ASSUMPTIONS.get(arch)
    modeled = modeled_target(target.sm_count, arch) if target else contextlib.nullcontext()
    with modeled, dry_run(), launch_log() as records:
        run_plan(plan, x)
    return list(records)


def trace_feature_training(
    feature: str, dtype: torch.dtype, batch: int, size: int = REFERENCE_SIZE, arch: int = 90, **model_kwargs: int
) -> list[LaunchRecord]:
    """Launches of one training step of :func:`feature_layout` (like :func:`trace_training_for_target`). Raises
    ``ValueError`` for a feature the backward kernels do not cover."""
    layout = feature_layout(feature, **model_kwargs)
    target = issue_model.ASSUMPTIONS.get(arch)
    shape = (batch, layout.in_channels, size, size)
    return trace_training_layout(layout, shape, dtype, sm_count=target.sm_count if target else None, arch=arch)


@dataclasses.dataclass(frozen=True)
class TracedConfig:
    """One traced configuration of the report: its launches, the stage each belongs to, and their variants."""

    label: str  # upsample/dtype/b<batch>, or upsample/dtype/<size>/b<batch> when several sizes are reported;
    # train-<upsample>/... for a training step
    upsample: str
    dtype: str
    size: int
    batch: int
    records: tuple[LaunchRecord, ...]
    stages: tuple[str, ...]
    step: str = "forward"  # or "training": the forward as the training path launches it, then the backward


# ---------------------------------------------------------------------------------------------------------------
# Compilation and inspection
# ---------------------------------------------------------------------------------------------------------------
def _nvidia_tool(name: str) -> str:
    """Path of a CUDA tool shipped in Triton's wheel (``ptxas``, ``ptxas-blackwell``, ``cuobjdump``)."""
    with contextlib.suppress(AttributeError):
        return getattr(triton.knobs.nvidia, name.replace("-", "_")).path
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name} not found at {path}")
    return path


def _inspect_cubin(cubin: bytes) -> tuple[dict[str, int], str]:
    """REG, STACK, SHARED and LOCAL of the cubin's kernel, and its full SASS, from ``cuobjdump``.

    The cubin is disassembled here rather than read from ``compiled.asm["sass"]``: Triton's own SASS extraction
    stops part-way through large kernels (seen on 3.6), which would hide instructions from the counts.
    """
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run(
            [_nvidia_tool("cuobjdump"), "-res-usage", "-sass", handle.name], check=True, capture_output=True, text=True
        ).stdout
    usage = {key: int(value) for key, value in _RES_USAGE_RE.findall(text)}
    if "REG" not in usage:
        raise RuntimeError(f"cuobjdump -res-usage printed no register count:\n{text[:2000]}")
    return usage, text


def _ptxas_warnings(ptx: str, arch: int) -> tuple[str, ...]:
    """Warnings of ``ptxas -v`` on the kernel's PTX, such as wgmma serialization ("Potential Performance Loss").

    Triton runs ptxas with ``-v`` too but keeps the log to itself, so the PTX is assembled once more here.
    """
    try:  # the assembler Triton itself uses for this target (triton >= 3.9 uses its newer one from sm_90 on)
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except (ImportError, AttributeError):
        ptxas = _nvidia_tool("ptxas-blackwell" if arch >= 100 else "ptxas")
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as work:
        source = os.path.join(work, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        command = [ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", source, "-o", os.path.join(work, "kernel.cubin")]
        log = subprocess.run(command, check=True, capture_output=True, text=True)
    lines = (log.stdout + log.stderr).splitlines()
    found = (line for line in lines if "Performance" in line or "warning" in line.lower())
    return tuple(re.sub(r"^ptxas\s+\w+\s*:\s*", "", line.strip()) for line in found)


def ctas_per_sm(arch: int, registers: int, num_warps: int, shared_bytes: int) -> int | None:
    """Resident CTAs per SM (see :func:`occupancy`); None for a target not in :data:`SM_LIMITS`."""
    found = occupancy(arch, registers, num_warps, shared_bytes)
    return None if found is None else found.blocks_per_sm


def compile_variant(variant: Variant, arch: int = 90, sass_path: str | None = None) -> VariantReport:
    """Compile one variant for ``sm_<arch>`` (no GPU needed) and read its registers, spills, smem, MMA ops and the
    issue figures of its tensor-core loops (``sass_path``: also write its SASS there)."""
    target = GPUTarget("cuda", arch, 32)
    attrs = {(index,): make_backend(target).parse_attr("D") for index in variant.divisible}
    source = ASTSource(variant.kernel, dict(variant.signature), dict(variant.constexprs), attrs)
    options = {k: variant.launch_options[k] for k in ("num_warps", "num_stages") if k in variant.launch_options}
    start = time.perf_counter()
    compiled = triton.compile(source, target=target, options=options)
    compile_s = time.perf_counter() - start

    usage, sass = _inspect_cubin(compiled.asm["cubin"])
    if sass_path is not None:
        with open(sass_path, "w") as handle:
            handle.write(sass)
    ptxas_warnings = _ptxas_warnings(compiled.asm["ptx"], arch)
    opcodes = [m.group(0) for m in _MMA_RE.finditer(sass)]
    metadata = compiled.metadata
    # Filled in by newer Triton versions or once a kernel is loaded on a device; the cubin says the same.
    registers = getattr(compiled, "n_regs", None)
    registers = registers if isinstance(registers, int) else usage["REG"]
    spills = getattr(compiled, "n_spills", None)
    spills = spills if isinstance(spills, int) else usage.get("STACK", 0) + usage.get("LOCAL", 0)
    limits = SM_LIMITS.get(arch)
    view = issue_model.gemm_view(variant.kernel)
    return VariantReport(
        name=variant.name,
        dtype=variant.dtype,
        arch=arch,
        constexprs=dict(variant.constexprs),
        num_warps=metadata.num_warps,
        num_stages=metadata.num_stages,
        registers=registers,
        spill_bytes=spills,
        local_ops=len(_LOCAL_RE.findall(sass)),
        shared_bytes=metadata.shared,
        shared_limit_bytes=limits.max_shared_per_block if limits else None,
        ctas_per_sm=ctas_per_sm(arch, registers, metadata.num_warps, metadata.shared),
        occupancy=occupancy(arch, registers, metadata.num_warps, metadata.shared),
        hgmma=sum(op.startswith("HGMMA") for op in opcodes),
        hmma=sum(op.startswith("HMMA") for op in opcodes),
        mma_opcodes=tuple(sorted(set(opcodes))),
        sass_instructions=len(_SASS_LINE_RE.findall(sass)),
        ptxas_warnings=ptxas_warnings,
        compile_s=round(compile_s, 3),
        launches=variant.launches,
        configs=variant.configs,
        mainloop=issue_model.analyze(
            sass, variant.constexprs, variant.dtype, metadata.num_warps, issue_model.ASSUMPTIONS.get(arch), view
        ),
        gemm_tile=view.tile(variant.constexprs),
    )


@contextlib.contextmanager
def _fresh_cache() -> Iterator[None]:
    """Compile into an empty Triton cache: compile times are cold, and no stale cubin is read back."""
    previous = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="triton-cache-") as cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = previous


@dataclasses.dataclass(frozen=True)
class CompileResult:
    """The compiled variants of a report and the traced configurations that launch them."""

    arch: int
    rows: list[VariantReport]
    configs: list[TracedConfig]
    variant_of: dict[str, tuple[int, ...]]  # config label -> index in ``rows`` of each launch's variant
    # "train-<feature>/...: why": feature layouts asked for with ``training`` whose backward is not on the kernels
    untrained: list[str] = dataclasses.field(default_factory=list)

    def models(self, eta: float | None = None) -> list[issue_model.ForwardModel]:
        """The modeled forward (or training step) of each configuration (empty for a target without assumptions in
        :data:`~fastunet.tooling.issue_model.ASSUMPTIONS`); ``eta``: see
        :func:`~fastunet.tooling.issue_model.assumptions_for`."""
        assumptions = issue_model.assumptions_for(self.arch, eta)
        if assumptions is None:
            return []
        return [
            issue_model.model_forward(
                c.upsample,
                c.dtype,
                c.size,
                c.batch,
                c.stages,
                c.records,
                [self.rows[i] for i in self.variant_of[c.label]],
                assumptions,
                step=c.step,
                label=c.label,
            )
            for c in self.configs
        ]


def compile_configs(
    dtypes: Sequence[str] = DEFAULT_DTYPES,
    upsamples: Sequence[str] = UPSAMPLES,
    batches: Sequence[int] = REFERENCE_BATCHES,
    size: int | Sequence[int] = REFERENCE_SIZE,
    arch: int = 90,
    fresh_cache: bool = True,
    candidates: bool = False,
    sass_dir: str | None = None,
    features: Sequence[str] = (),
    training: bool = False,
    persistent: bool = False,
    split_k: bool = False,
    **model_kwargs: int,
) -> CompileResult:
    """Compile every distinct variant that the given configurations launch (``candidates``: every variant the
    autotuner may launch); one row per variant. Configurations are labelled ``upsample/dtype/b<batch>``, with
    ``/<size>`` before the batch when several sizes are given. ``training``: also one training step (forward and
    backward, :func:`trace_training_for_target`) per upsampling mode, dtype, size and batch, labelled
    ``train-<upsample>/dtype/b<batch>``. ``persistent``, ``split_k``: also each forward with its persistent (split-K)
    candidates launched, labelled ``persistent-<upsample>/...`` (``split-k-<upsample>/...``). ``sass_dir``: write
    each variant's SASS there."""
    if INTERPRET:
        raise RuntimeError("the compile report needs real Triton compilation: run it with TRITON_INTERPRET unset")
    expand = with_candidates if candidates else list
    sizes = [size] if isinstance(size, int) else list(size)

    def label(upsample: str, dtype: str, size: int, batch: int) -> str:
        return f"{upsample}/{dtype}/{size}/b{batch}" if len(sizes) > 1 else f"{upsample}/{dtype}/b{batch}"

    configs = []
    untrained: list[str] = []  # feature layouts whose training step the backward kernels do not run, and why
    for dtype in dtypes:
        for upsample in (*upsamples, *features):
            for size_ in sizes:
                for batch in batches:
                    if upsample in FEATURES:
                        records = trace_feature(upsample, torch_dtype(dtype), batch, size_, arch, **model_kwargs)
                    else:
                        records = trace_for_target(upsample, torch_dtype(dtype), batch, size_, arch, **model_kwargs)
                    configs.append(
                        TracedConfig(
                            label(upsample, dtype, size_, batch),
                            upsample,
                            dtype,
                            size_,
                            batch,
                            tuple(records),
                            tuple(stage_labels(records)),
                        )
                    )
                    for wanted, prefix, key in ((persistent, "persistent-", "PROGRAMS_PER_SM"),
                                                (split_k, "split-k-", "SPLIT_K")):  # fmt: skip
                        if wanted and upsample not in FEATURES:
                            with preferring(key):
                                records = trace_for_target(upsample, torch_dtype(dtype), batch, size_, arch,
                                                           **model_kwargs)  # fmt: skip
                            configs.append(
                                TracedConfig(
                                    prefix + label(upsample, dtype, size_, batch),
                                    upsample,
                                    dtype,
                                    size_,
                                    batch,
                                    tuple(records),
                                    tuple(stage_labels(records)),
                                )
                            )
                    if training:
                        if upsample in FEATURES:
                            try:
                                records = trace_feature_training(
                                    upsample, torch_dtype(dtype), batch, size_, arch, **model_kwargs
                                )
                            except ValueError as error:  # a layout still on the reference backward
                                untrained.append(f"train-{label(upsample, dtype, size_, batch)}: {error}")
                                continue
                        else:
                            records = trace_training_for_target(
                                upsample, torch_dtype(dtype), batch, size_, arch, **model_kwargs
                            )
                        configs.append(
                            TracedConfig(
                                "train-" + label(upsample, dtype, size_, batch),
                                upsample,
                                dtype,
                                size_,
                                batch,
                                tuple(records),
                                tuple(stage_labels(records)),
                                step="training",
                            )
                        )
    variants, keys = _collect((c.label, expand(c.records)) for c in configs)
    index = {key: i for i, key in enumerate(keys)}
    variant_of = {c.label: tuple(index[variant_key(record)] for record in c.records) for c in configs}
    if sass_dir is not None:
        os.makedirs(sass_dir, exist_ok=True)
    with _fresh_cache() if fresh_cache else contextlib.nullcontext():
        rows = [
            compile_variant(
                v, arch, None if sass_dir is None else os.path.join(sass_dir, f"sm{arch}_{i:03d}_{v.name}.sass")
            )
            for i, v in enumerate(variants)
        ]
    return CompileResult(arch, rows, configs, variant_of, untrained)


# The smallest M of a warpgroup MMA (wgmma): Triton lowers a dot whose tile has fewer rows to the sm_80 MMA.
WGMMA_MIN_M = 64


def uses_tensor_cores(row: VariantReport) -> bool:
    """HGMMA on sm_90 (HMMA where the MMA's M is under :data:`WGMMA_MIN_M`: a weight gradient's tile of fewer than 64
    rows; the packed-taps weight gradient of a few-channel first conv, whose MMA computes ``dW^T = dz^T A`` with the
    output channels, ``BLOCK_N``, as its rows), HMMA on sm_80 to sm_89; other targets are not judged."""
    if row.arch == 90:
        rows = None if row.gemm_tile is None else row.gemm_tile[1 if row.constexprs.get("PACK_TAPS") else 0]
        if rows is not None and rows < WGMMA_MIN_M:
            return row.hgmma + row.hmma > 0
        return row.hgmma > 0
    if 80 <= row.arch < 90:
        return row.hmma > 0
    return True


def problems(row: VariantReport) -> list[str]:
    """What is wrong with a variant: spills, shared memory over the launch limit, no tensor-core instructions in a
    GEMM kernel (one with a GEMM tile: the convs and the weight gradient; the upsample, pool-gradient and sum kernels
    are data movement), ptxas performance warnings."""
    found = []
    if row.spill_bytes or row.local_ops:
        found.append(f"spills ({row.spill_bytes} B/thread, {row.local_ops} LDL/STL)")
    if row.shared_limit_bytes is not None and row.shared_bytes > row.shared_limit_bytes:
        found.append(f"shared memory {row.shared_bytes} B > {row.shared_limit_bytes} B: the launch would fail")
    if row.gemm_tile is not None and not uses_tensor_cores(row):
        found.append("no tensor-core instructions")
    found += [f"ptxas: {warning}" for warning in row.ptxas_warnings]
    return found


def describe(row: VariantReport) -> str:
    """Short name of a variant: kernel, target, dtype, two sources or not, GEMM tile (M x N x K), warps, stages, and
    batch when compiled in as 1."""
    c = row.constexprs
    tile = "x".join(map(str, row.gemm_tile)) if row.gemm_tile else "-x-x-"
    batch = " batch=1" if c.get("batch") == 1 else ""
    return (
        f"{row.name} sm_{row.arch} {row.dtype} up={int(c.get('TWO_SOURCES', 0))} {tile} w{row.num_warps} "
        f"s{row.num_stages}{batch}"
    )


def _used_by(configs: Sequence[str]) -> str:
    """``transpose/fp16/b16``, ``bilinear/fp16/b16`` -> ``bilinear,transpose b16``."""
    parts = [label.split("/") for label in configs]
    upsamples = sorted({p[0] for p in parts})
    batches = sorted({p[-1] for p in parts}, key=lambda b: -int(b[1:]))
    sizes = sorted({int(p[2]) for p in parts if len(p) == 4})
    return f"{','.join(upsamples)} {','.join(map(str, sizes))}{' ' if sizes else ''}{','.join(batches)}"


def format_table(rows: Sequence[VariantReport]) -> str:
    """Fixed-width table, one line per variant. ``up``: 1 for the decoder's two-source conv; ``BM``, ``BN``, ``BK``:
    the GEMM tile (the weight gradient's BLOCK_C, BLOCK_N, BLOCK_P); ``CTA/SM``, ``warps/SM``: resident per SM, and
    ``limit``: what limits them (regs, smem, warps); ``warn``: ptxas performance warnings; ``ins/K``: SASS
    instructions per warp per K-step in the costliest tensor-core loop, ``issue``: its issue ratio (model), ``TMA``
    and ``cpA``: UTMALDG and LDGSTS per iteration there, ``lp``: tensor-core loops; ``s``: compile seconds; ``n``:
    launches."""
    width = max(18, *(len(row.name) for row in rows)) if rows else 18
    header = (
        f"{'variant':<{width}} {'arch':<5} {'dtype':<5} {'up':>2} {'BM':>4} {'BN':>4} {'BK':>3} {'warps':>5} "
        f"{'stg':>3} {'regs':>4} {'spill':>5} {'smem KiB':>8} {'CTA/SM':>6} {'warps/SM':>8} {'limit':<5} {'HGMMA':>5} "
        f"{'HMMA':>4} {'warn':>4} {'ins/K':>5} {'issue':>5} {'TMA':>3} {'cpA':>3} {'lp':>2} {'s':>5} {'n':>3}  used by"
    )
    lines = [header, "-" * len(header)]
    short = {"registers": "regs", "shared memory": "smem", "launch fails": "FAIL"}
    for row in rows:
        c, occ = row.constexprs, row.occupancy
        bm, bn, bk = row.gemm_tile or ("-", "-", "-")
        lines.append(
            f"{row.name:<{width}} {'sm_' + str(row.arch):<5} {row.dtype:<5} {int(c.get('TWO_SOURCES', 0)):>2} "
            f"{bm:>4} {bn:>4} {bk:>3} {row.num_warps:>5} "
            f"{row.num_stages:>3} {row.registers:>4} {row.spill_bytes:>5} {row.shared_bytes / 1024:>8.1f} "
            f"{'-' if occ is None else occ.blocks_per_sm:>6} {'-' if occ is None else occ.warps_per_sm:>8} "
            f"{'-' if occ is None else short.get(occ.limited_by, occ.limited_by):<5} {row.hgmma:>5} {row.hmma:>4} "
            f"{len(row.ptxas_warnings):>4} {_issue_columns(row)} {row.compile_s:>5.2f} {row.launches:>3}  "
            f"{_used_by(row.configs)}"
        )
    lines.append(f"{len(rows)} variants, {sum(row.compile_s for row in rows):.1f} s compiling")
    return "\n".join(lines)


def _issue_columns(row: VariantReport) -> str:
    summary = row.mainloop.summary()

    def cell(key: str, width: int, spec: str = "") -> str:
        value = summary[key]
        return f"{'-' if value is None else format(value, spec):>{width}}"

    return " ".join(
        (cell("mainloop_instructions", 5, ".0f"), cell("issue_ratio", 5, ".2f"), cell("tma_loads", 3))
        + (cell("cp_async", 3), cell("tensor_loops", 2))
    )


def print_model(models: Sequence[issue_model.ForwardModel], layers: bool | None = None) -> None:
    """Print the modeled forwards (``layers``: with per-launch tables; None: when there are at most 4)."""
    if models:
        print()
        print(issue_model.format_model(models, layers=len(models) <= 4 if layers is None else layers))


def parse_arch(text: str) -> int:
    """``sm_90``, ``sm_90a`` or ``90`` -> 90 (argparse type)."""
    value = str(text).strip().lower().removeprefix("sm_").removesuffix("a")
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected an architecture like sm_90 or 90, got {text!r}")
    return int(value)


def parse_eta(text: str) -> float:
    """``eta`` of the issue model: a share of issue slots, in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected eta in (0, 1], got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line of the report (``fastunet report``, ``python -m bench.compile_report``)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument(
        "--arch",
        nargs="+",
        type=parse_arch,
        default=list(DEFAULT_ARCHS),
        help="targets: sm_90 or 90 (default), sm_80 or 80, ...; the model is of the first",
    )
    parser.add_argument(
        "--dtype",
        nargs="+",
        type=short_dtype_name,
        default=list(DEFAULT_DTYPES),
        help="fp16 or float16, bf16 or bfloat16, fp32 or float32 (default: fp16 bf16)",
    )
    parser.add_argument("--upsample", nargs="+", choices=UPSAMPLES, default=list(DEFAULT_UPSAMPLES))
    parser.add_argument(
        "--features", nargs="*", choices=FEATURES, default=[], help="also layouts with these features (see FEATURES)"
    )
    parser.add_argument(
        "--training",
        action="store_true",
        help="also a training step per upsampling mode (forward and backward kernels, labelled train-<upsample>/...): "
        "its variants and its modeled time next to the forward's",
    )
    parser.add_argument(
        "--persistent",
        action="store_true",
        help="also each forward with its persistent autotuning candidates launched (labelled persistent-<upsample>/"
        "...): their variants and the modeled time next to the launched forward's",
    )
    parser.add_argument(
        "--split-k",
        action="store_true",
        help="also each forward with its split-K autotuning candidates launched (labelled split-k-<upsample>/...), "
        "each with the launch that adds its parts",
    )
    parser.add_argument("--batch", nargs="+", type=positive_int, default=list(REFERENCE_BATCHES))
    parser.add_argument("--size", nargs="+", type=positive_int, default=[REFERENCE_SIZE], help="H = W")
    parser.add_argument("--in-channels", type=positive_int, default=REFERENCE_MODEL["in_channels"])
    parser.add_argument("--num-classes", type=positive_int, default=REFERENCE_MODEL["num_classes"])
    parser.add_argument("--base-channels", type=positive_int, default=REFERENCE_MODEL["base_channels"])
    parser.add_argument("--depth", type=positive_int, default=REFERENCE_MODEL["depth"])
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    parser.add_argument(
        "--eta",
        type=parse_eta,
        help="share of issue slots a loop gets, for the model (default: the newest fit, else 0.7)",
    )
    layers = parser.add_mutually_exclusive_group()
    layers.add_argument("--layers", action="store_true", default=None, help="per-launch model tables, always")
    layers.add_argument("--no-layers", dest="layers", action="store_false", help="model totals only")
    parser.add_argument("--sass", metavar="DIR", help="write each variant's SASS to DIR")
    parser.add_argument(
        "--candidates", action="store_true", help="every autotuning candidate, not only the configs launched"
    )
    return parser


def run(args: argparse.Namespace) -> tuple[dict, list[VariantReport], list[issue_model.ForwardModel]]:
    """Compile the variants ``args`` selects for each target: the JSON payload (the schema above), the compiled
    rows of every target, and the modeled forwards on the first target."""
    start = time.perf_counter()
    archs = list(dict.fromkeys(args.arch))
    model_kwargs = {
        "in_channels": args.in_channels,
        "num_classes": args.num_classes,
        "base_channels": args.base_channels,
        "depth": args.depth,
    }
    results = [
        compile_configs(
            args.dtype,
            args.upsample,
            args.batch,
            args.size,
            arch,
            candidates=args.candidates,
            sass_dir=args.sass,
            features=args.features,
            training=args.training,
            persistent=args.persistent,
            split_k=args.split_k,
            **model_kwargs,
        )
        for arch in archs
    ]
    rows = [row for result in results for row in result.rows]
    models = results[0].models(args.eta)
    payload = {
        "kind": f"compile report ({', '.join(f'sm_{a}' for a in archs)} cubins built without a GPU; nothing was run "
        "or timed) and issue model (a model, not a measurement)",
        "triton": triton.__version__,
        "arch": f"sm_{archs[0]}",
        "archs": [f"sm_{arch}" for arch in archs],
        "configuration": {
            "model": model_kwargs,
            "upsample": list(args.upsample),
            "features": list(args.features),
            "training": bool(args.training),
            "persistent": bool(args.persistent),
            "split_k": bool(args.split_k),
            "dtypes": list(args.dtype),
            "batches": list(args.batch),
            "sizes": list(args.size),
            "candidates": bool(args.candidates),
        },
        "limits": dataclasses.asdict(SM_LIMITS[archs[0]]) if archs[0] in SM_LIMITS else None,
        "wall_s": round(time.perf_counter() - start, 3),
        "variants": [row.to_json() for row in rows],
        "model": [_model_json(model, results[0].variant_of[model.label]) for model in models],
        "model_assumptions": models[0].assumptions.to_json() if models else None,
        "untrained": list(results[0].untrained),
    }
    return payload, rows, models


def _model_json(model: issue_model.ForwardModel, variants: Sequence[int]) -> dict:
    """A modeled forward or training step in the JSON, each layer with ``variant``: the index in ``variants`` (of the
    first target, listed first) of the cubin its launch runs."""
    row = model.to_json()
    for layer, index in zip(row["layers"], variants, strict=True):
        layer["variant"] = index
    return row


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The report's command line: print the table, the problems and the issue model (``--json``: also write the
    payload of :func:`run`). Exit status 1 when a variant spills, lacks tensor-core instructions, asks for more shared
    memory than a launch may, or draws a ptxas performance warning; 2 when the report cannot run."""
    prog = prog or "fastunet report"
    args = build_parser(prog).parse_args(argv)
    if INTERPRET:
        print(f"{prog}: needs real Triton compilation; run it with TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    payload, rows, models = run(args)
    print(format_table(rows))
    print(
        f"wall {payload['wall_s']:.1f} s, triton {payload['triton']}, {', '.join(payload['archs'])} "
        "(compile report: built, not run)"
    )
    print_model(models, args.layers)
    for line in payload["untrained"]:
        print(f"no training step (reference backward): {line}")
    flagged = [(row, problems(row)) for row in rows]
    for row, found in flagged:
        if found:
            print(f"PROBLEM {describe(row)}: {'; '.join(found)}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(payload, handle, indent=1)
            handle.write("\n")
    return 1 if any(found for _, found in flagged) else 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m fastunet.tooling.compile_report"))
