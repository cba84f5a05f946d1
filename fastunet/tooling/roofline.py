"""Roofline model of a U-Net forward: a lower bound on its time from FLOPs and compulsory bytes.

This is a model, not a measurement. Each launch of :func:`fastunet.trace` gets a time floor
``max(flops / peak_flops, bytes / peak_bandwidth)``; launches run one after another, so the network floor is the
sum of the launch floors. Bytes are compulsory traffic: every input, weight and bias read once, every output
written once (halo re-reads that hit in cache are free, misses are not modelled).

For comparison, :func:`eager_estimate` models eager PyTorch (cuDNN) on the same network: one kernel per ATen op
reading its inputs once and writing its outputs once, plus the separate bias-add kernel that cuDNN convolutions
get in ATen. Each eager kernel is attributed to the fused stage that absorbs it (bias, ReLU, BatchNorm and pooling
to the conv before them; upsampling, padding and concatenation to the decoder conv after them), so the two can be
compared stage by stage.

Ceilings: :data:`H100` holds rates measured on the lent H100s, :data:`H200` datasheet-derived assumptions (no H200
has been measured), and :func:`measured_ceilings` builds a set from what a GPU run measures (a large bf16 matmul
and a device-to-device copy).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fastunet.kernels._common import LaunchRecord
from fastunet.parity import math_mode
from fastunet.reference import UNet
from fastunet.tooling.trace import stage_labels, trace_config


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """Peak rates of one GPU: dense tensor-core FLOP/s per math mode, and memory bandwidth."""

    name: str
    peak_flops: dict[str, float]
    bandwidth: float  # bytes/s
    sm_count: int
    assumptions: tuple[str, ...] = ()

    def peak_for(self, mode: str) -> float:
        """Peak FLOP/s of math mode ``mode`` (``fp16``, ``bf16``, ``tf32`` or ``fp32``)."""
        return self.peak_flops[mode]


H100 = Ceilings(
    name="H100 SXM",
    peak_flops={"fp16": 798e12, "bf16": 798e12, "tf32": 399e12, "fp32": 67e12},
    bandwidth=3.0e12,
    sm_count=132,
    assumptions=(
        "fp16/bf16 798 TFLOP/s dense matmul and 3.0 TB/s copy: measured on the lent H100s",
        "TF32 399 TFLOP/s: assumed to be half the fp16 peak, not measured",
        "fp32 without tensor cores 67 TFLOP/s: datasheet figure, not measured",
    ),
)


H200 = Ceilings(
    name="H200 SXM",
    peak_flops={"fp16": 798e12, "bf16": 798e12, "tf32": 399e12, "fp32": 67e12},
    bandwidth=4.8e12,
    sm_count=132,
    assumptions=(
        "H200: not measured; datasheet-derived assumptions",
        "fp16/bf16 798 TFLOP/s: the H100 SXM's measured rate (the datasheets give both the same GH100 tensor-core "
        "peak, 989 TFLOP/s dense)",
        "4.8 TB/s: the H200 SXM datasheet HBM3e bandwidth (a copy reached ~90% of the datasheet figure on the H100)",
        "TF32 half the fp16 peak and fp32 67 TFLOP/s, as for the H100",
    ),
)
DEFAULT_CEILINGS: tuple[Ceilings, ...] = (H100, H200)


def measured_ceilings(name: str, matmul_flops: float, copy_bytes_per_s: float, sm_count: int) -> Ceilings:
    """Ceilings from a GPU run: ``matmul_flops`` of a large dense bf16 matmul, ``copy_bytes_per_s`` of a
    device-to-device copy (bytes read plus bytes written per second). TF32 and fp32 are scaled from the bf16 rate
    in the H100's proportions (not measured)."""
    return Ceilings(
        name=f"{name} (measured)",
        peak_flops={
            "fp16": matmul_flops,
            "bf16": matmul_flops,
            "tf32": matmul_flops / 2,
            "fp32": matmul_flops * H100.peak_flops["fp32"] / H100.peak_flops["bf16"],
        },
        bandwidth=copy_bytes_per_s,
        sm_count=sm_count,
        assumptions=(
            f"fp16/bf16 {matmul_flops / 1e12:.0f} TFLOP/s: a large bf16 matmul measured on this device (fp16 assumed "
            "equal)",
            f"{copy_bytes_per_s / 1e12:.2f} TB/s: a device-to-device copy measured on this device",
            "TF32 and fp32 scaled from the bf16 rate in the H100's proportions, not measured",
        ),
    )


@dataclasses.dataclass(frozen=True)
class LaunchRoofline:
    """One launch placed on the roofline."""

    stage: str
    kernel: str
    grid: tuple[int, ...]
    flops: int
    bytes_read: int
    bytes_written: int
    compute_s: float
    memory_s: float
    sm_count: int

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOP per byte of compulsory traffic."""
        return self.flops / self.bytes if self.bytes else math.inf

    @property
    def floor_s(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"

    @property
    def ctas(self) -> int:
        return math.prod(self.grid)

    @property
    def wave_efficiency(self) -> float:
        """Fraction of SM slots busy over the launch's waves of one CTA per SM (a tile-quantization hint)."""
        waves = math.ceil(self.ctas / self.sm_count)
        return self.ctas / (waves * self.sm_count) if waves else 0.0


@dataclasses.dataclass(frozen=True)
class NetworkRoofline:
    """All launches of one forward on the roofline, with network totals."""

    launches: list[LaunchRoofline]
    mode: str
    peak_flops: float
    bandwidth: float

    @property
    def flops(self) -> int:
        return sum(launch.flops for launch in self.launches)

    @property
    def bytes(self) -> int:
        return sum(launch.bytes for launch in self.launches)

    @property
    def floor_s(self) -> float:
        """Sum of the launch floors: the launches run one after another."""
        return sum(launch.floor_s for launch in self.launches)

    @property
    def aggregate_floor_s(self) -> float:
        """max(total FLOPs / peak, total bytes / bandwidth): the floor if compute and traffic overlapped perfectly."""
        return max(self.flops / self.peak_flops, self.bytes / self.bandwidth)


def roofline(
    records: Sequence[LaunchRecord],
    dtype: torch.dtype,
    *,
    ceilings: Ceilings = H100,
    allow_tf32: bool = True,
    labels: Sequence[str] | None = None,
) -> NetworkRoofline:
    """Place each traced launch on the roofline of ``ceilings`` for compute dtype ``dtype`` on a GPU."""
    mode = math_mode(dtype, "cuda", allow_tf32)
    peak = ceilings.peak_for(mode)
    labels = list(labels) if labels is not None else stage_labels(records)
    if len(labels) != len(records):
        raise ValueError(f"got {len(labels)} labels for {len(records)} launches")
    launches = [
        LaunchRoofline(
            stage=label,
            kernel=record.name,
            grid=tuple(record.grid),
            flops=record.flops,
            bytes_read=record.bytes_read,
            bytes_written=record.bytes_written,
            compute_s=record.flops / peak,
            memory_s=(record.bytes_read + record.bytes_written) / ceilings.bandwidth,
            sm_count=ceilings.sm_count,
        )
        for label, record in zip(labels, records, strict=True)
    ]
    return NetworkRoofline(launches=launches, mode=mode, peak_flops=peak, bandwidth=ceilings.bandwidth)


def config_roofline(
    model_kwargs: dict,
    input_shape: Sequence[int],
    dtype: torch.dtype = torch.float16,
    *,
    ceilings: Ceilings = H100,
    allow_tf32: bool = True,
) -> NetworkRoofline:
    """Trace ``UNet(**model_kwargs)`` on ``input_shape`` and place it on the roofline."""
    records = trace_config(model_kwargs, input_shape, dtype)
    return roofline(records, dtype, ceilings=ceilings, allow_tf32=allow_tf32)


# -- eager PyTorch estimate ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EagerStage:
    """The eager kernels attributed to one fused stage."""

    stage: str
    kernels: int
    flops: int
    bytes_read: int
    bytes_written: int
    floor_s: float

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


@dataclasses.dataclass(frozen=True)
class EagerEstimate:
    """Modelled kernels, FLOPs and compulsory bytes of the eager (cuDNN) reference forward, in total and per fused
    stage (``stages``, in forward order)."""

    kernels: int
    flops: int
    bytes_read: int
    bytes_written: int
    floor_s: float
    stages: tuple[EagerStage, ...] = ()

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    def stage(self, label: str) -> EagerStage | None:
        return next((s for s in self.stages if s.stage == label), None)


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _conv_flops(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, transposed: bool) -> int:
    """Multiply-adds x 2 of one ``aten.convolution``."""
    taps_per_output = math.prod(weight.shape[1:])  # (c_in / groups) * kh * kw; c_out / groups * kh * kw if transposed
    # A transposed conv scatters every input element into taps_per_output outputs.
    return 2 * (x.numel() if transposed else out.numel()) * taps_per_output


class _EagerOpLog(TorchDispatchMode):
    """Records, per ATen op that launches a kernel, the current stage label, its FLOPs and compulsory bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.stage = ""
        self.kernels: list[tuple[str, int, int, int]] = []  # (stage, flops, bytes_read, bytes_written)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outputs = [a for a in tree_flatten(out)[0] if isinstance(a, torch.Tensor)]
        if func.is_view or not inputs:
            return out  # views and factory functions launch no kernel
        if func is torch.ops.aten.convolution.default:
            x, weight, bias, transposed = args[0], args[1], args[2], args[6]
            flops = _conv_flops(x, weight, outputs[0], bool(transposed))
            self.kernels.append((self.stage, flops, _nbytes([x, weight]), _nbytes(outputs)))
            if bias is not None:
                # ATen's cuDNN path adds the bias in a second kernel that reads and rewrites the output.
                self.kernels.append((self.stage, 0, _nbytes([outputs[0], bias]), _nbytes(outputs)))
            return out
        self.kernels.append((self.stage, 0, _nbytes(inputs), _nbytes(outputs)))
        return out


def _label_stages(model: UNet, log: _EagerOpLog, head_label: str) -> list:
    """Forward pre-hooks that point ``log.stage`` at the fused stage each eager op belongs to; returns the handles.

    A conv's label holds until the next module sets another, so bias, BatchNorm, ReLU and pooling go to the conv
    before them. A decoder block starts its first conv's stage; its upsampling (transposed conv or interpolation)
    is its own stage (``decN.up``), and the padding and concatenation after it go to the first conv, which reads
    the skip and the upsampled map directly.
    """

    def setter(label: str):
        def hook(*_):
            log.stage = label

        return hook

    handles = []
    for level, encoder in enumerate(model.encoders):
        tag = f"enc{level}" if level < model.depth else "bottleneck"
        handles.append(encoder.conv1.register_forward_pre_hook(setter(f"{tag}.conv1")))
        handles.append(encoder.conv2.register_forward_pre_hook(setter(f"{tag}.conv2")))
    for level, decoder in enumerate(model.decoders):
        handles.append(decoder.register_forward_pre_hook(setter(f"dec{level}.conv1")))
        handles.append(decoder.up.register_forward_pre_hook(setter(f"dec{level}.up")))
        handles.append(decoder.up.register_forward_hook(setter(f"dec{level}.conv1")))
        handles.append(decoder.conv.conv1.register_forward_pre_hook(setter(f"dec{level}.conv1")))
        handles.append(decoder.conv.conv2.register_forward_pre_hook(setter(f"dec{level}.conv2")))
    handles.append(model.head.register_forward_pre_hook(setter(head_label)))
    return handles


def eager_estimate(
    model_kwargs: dict,
    input_shape: Sequence[int],
    dtype: torch.dtype = torch.float16,
    *,
    ceilings: Ceilings = H100,
    allow_tf32: bool = True,
) -> EagerEstimate:
    """Model the eager reference forward (eval mode) on the ``meta`` device: kernels, FLOPs, bytes and its floor,
    in total and per fused stage.

    Like the fused floor, the eager floor is the sum of per-kernel ``max(flops / peak, bytes / bandwidth)``.
    """
    peak = ceilings.peak_for(math_mode(dtype, "cuda", allow_tf32))
    model = UNet(**model_kwargs, device="meta", dtype=dtype).eval()
    x = torch.empty(tuple(input_shape), device="meta", dtype=dtype)
    fused_labels = stage_labels(trace_config(model_kwargs, input_shape, dtype))
    log = _EagerOpLog()
    log.stage = fused_labels[0]
    handles = _label_stages(model, log, "head" if "head" in fused_labels else fused_labels[-1])
    try:
        with torch.no_grad(), log:
            model(x)
    finally:
        for handle in handles:
            handle.remove()

    def floor(flops: int, read: int, written: int) -> float:
        return max(flops / peak, (read + written) / ceilings.bandwidth)

    per_stage: dict[str, list[tuple[int, int, int]]] = {}
    for stage, *counts in log.kernels:
        per_stage.setdefault(stage, []).append(tuple(counts))
    order = [label for label in fused_labels if label in per_stage] + [s for s in per_stage if s not in fused_labels]
    stages = tuple(
        EagerStage(
            stage=label,
            kernels=len(per_stage[label]),
            flops=sum(k[0] for k in per_stage[label]),
            bytes_read=sum(k[1] for k in per_stage[label]),
            bytes_written=sum(k[2] for k in per_stage[label]),
            floor_s=sum(floor(*k) for k in per_stage[label]),
        )
        for label in order
    )
    return EagerEstimate(
        kernels=len(log.kernels),
        flops=sum(k[1] for k in log.kernels),
        bytes_read=sum(k[2] for k in log.kernels),
        bytes_written=sum(k[3] for k in log.kernels),
        floor_s=sum(floor(*k[1:]) for k in log.kernels),
        stages=stages,
    )


# -- text output ----------------------------------------------------------------------------------------------------
def format_launches(net: NetworkRoofline) -> str:
    """Per-launch table: FLOPs, bytes, intensity, bound and floor."""
    header = (
        f"{'#':>3}  {'stage':<16} {'kernel':<19} {'GFLOP':>8} {'MB read':>9} {'MB write':>9} {'FLOP/B':>7} "
        f"{'bound':<7} {'floor us':>9} {'share':>6} {'CTAs':>6} {'wave eff':>8}"
    )
    lines = [header, "-" * len(header)]
    total = net.floor_s
    for i, launch in enumerate(net.launches):
        lines.append(
            f"{i:>3}  {launch.stage:<16} {launch.kernel:<19} {launch.flops / 1e9:>8.2f} "
            f"{launch.bytes_read / 1e6:>9.2f} {launch.bytes_written / 1e6:>9.2f} {launch.intensity:>7.0f} "
            f"{launch.bound:<7} {launch.floor_s * 1e6:>9.2f} {launch.floor_s / total if total else 0.0:>6.1%} "
            f"{launch.ctas:>6} {launch.wave_efficiency:>8.0%}"
        )
    return "\n".join(lines)


def format_summary(net: NetworkRoofline, eager: EagerEstimate | None = None) -> str:
    """Network totals of the fused forward, and of the eager estimate when given."""
    lines = [
        f"fused forward: {len(net.launches)} launches, {net.flops / 1e9:.1f} GFLOP, {net.bytes / 1e6:.0f} MB traffic, "
        f"floor {net.floor_s * 1e3:.3f} ms (sum over launches; {net.aggregate_floor_s * 1e3:.3f} ms if compute and "
        f"traffic overlapped across launches)",
    ]
    if eager is not None:
        lines.append(
            f"eager estimate: {eager.kernels} kernels, {eager.flops / 1e9:.1f} GFLOP, "
            f"{eager.bytes / 1e6:.0f} MB traffic ({eager.bytes_written / 1e6:.0f} MB written), "
            f"floor {eager.floor_s * 1e3:.3f} ms"
        )
    return "\n".join(lines)


def format_ceilings(ceilings: Ceilings, mode: str) -> str:
    """One header line naming the model and its ceilings, with the assumptions spelled out."""
    lines = [
        f"Roofline MODEL (a lower bound, not a measurement): {ceilings.name}, {mode} peak "
        f"{ceilings.peak_for(mode) / 1e12:.0f} TFLOP/s, {ceilings.bandwidth / 1e12:.1f} TB/s",
    ]
    lines += [f"  assumption: {text}" for text in ceilings.assumptions]
    return "\n".join(lines)


# -- per-stage report over several ceilings -------------------------------------------------------------------------
def ceilings_json(ceilings: Ceilings) -> dict:
    """A JSON-ready description of ``ceilings``."""
    return {
        "name": ceilings.name,
        "peak_flops": dict(ceilings.peak_flops),
        "bandwidth_bytes_per_s": ceilings.bandwidth,
        "sm_count": ceilings.sm_count,
        "assumptions": list(ceilings.assumptions),
    }


def roofline_report(
    model_kwargs: dict,
    input_shape: Sequence[int],
    dtype: torch.dtype = torch.float16,
    *,
    ceilings: Sequence[Ceilings] = DEFAULT_CEILINGS,
    allow_tf32: bool = True,
) -> dict:
    """The roofline model of one forward, per fused stage and in total, against each set of ``ceilings``.

    Per stage: FLOPs, the fused launch's bytes and arithmetic intensity, the eager kernels that do the same work
    (their count, bytes and intensity), and for each ceiling the fused and eager floors and what bounds the fused
    launch. JSON-ready; :func:`format_roofline_report` prints it.
    """
    records = trace_config(model_kwargs, input_shape, dtype)
    nets = {c.name: roofline(records, dtype, ceilings=c, allow_tf32=allow_tf32) for c in ceilings}
    eagers = {
        c.name: eager_estimate(model_kwargs, input_shape, dtype, ceilings=c, allow_tf32=allow_tf32) for c in ceilings
    }
    first = next(iter(nets.values()))
    first_eager = next(iter(eagers.values()))
    stages = []
    for index, launch in enumerate(first.launches):
        eager = first_eager.stage(launch.stage)
        row = {
            "index": index,
            "stage": launch.stage,
            "kernel": launch.kernel,
            "flops": launch.flops,
            "fused_bytes_read": launch.bytes_read,
            "fused_bytes_written": launch.bytes_written,
            "fused_intensity": launch.intensity,
            "eager_kernels": eager.kernels if eager else 0,
            "eager_flops": eager.flops if eager else 0,
            "eager_bytes": eager.bytes if eager else 0,
            "eager_intensity": eager.flops / eager.bytes if eager and eager.bytes else None,
            "floors": {},
        }
        for name, net in nets.items():
            eager_c = eagers[name].stage(launch.stage)
            fused = net.launches[index]
            row["floors"][name] = {
                "fused_s": fused.floor_s,
                "fused_bound": fused.bound,
                "eager_s": eager_c.floor_s if eager_c else 0.0,
            }
        stages.append(row)
    totals = {
        "launches": len(first.launches),
        "flops": first.flops,
        "fused_bytes": first.bytes,
        "fused_intensity": first.flops / first.bytes if first.bytes else None,
        "eager_kernels": first_eager.kernels,
        "eager_bytes": first_eager.bytes,
        "eager_bytes_written": first_eager.bytes_written,
        "eager_intensity": first_eager.flops / first_eager.bytes if first_eager.bytes else None,
        "floors": {
            name: {
                "fused_s": net.floor_s,
                "fused_aggregate_s": net.aggregate_floor_s,
                "eager_s": eagers[name].floor_s,
            }
            for name, net in nets.items()
        },
    }
    return {
        "kind": "model (a lower bound from FLOPs and compulsory bytes, not a measurement)",
        "model": dict(model_kwargs),
        "input_shape": list(input_shape),
        "dtype": str(dtype).removeprefix("torch."),
        "math": first.mode,
        "ceilings": [ceilings_json(c) for c in ceilings],
        "stages": stages,
        "total": totals,
    }


def format_roofline_report(report: dict) -> str:
    """Per-stage table of :func:`roofline_report` with a floor column pair (fused, eager) per ceiling, then totals
    and the ceilings' assumptions."""
    names = [c["name"] for c in report["ceilings"]]
    short = [name.removeprefix("NVIDIA ").split()[0] + ("*" if "measured" in name else "") for name in names]
    floor_heads = "".join(f" {s + ' fused':>11} {s + ' eager':>11}" for s in short)
    header = (
        f"{'#':>3}  {'stage':<16} {'kernel':<18} {'GFLOP':>8} {'fused MB':>9} {'FLOP/B':>7} {'bound':<7} "
        f"{'eager k':>7} {'eager MB':>9} {'FLOP/B':>7}{floor_heads}"
    )
    total = report["total"]
    batch = report["input_shape"][0]
    per_image = f"{total['flops'] / batch / 1e9:.1f} GFLOP per image" if batch else "empty batch"
    lines = [
        f"Roofline MODEL (lower bounds, not a measurement): {report['math']}, input "
        f"{'x'.join(map(str, report['input_shape']))}: {total['flops'] / 1e9:.1f} GFLOP per forward ({per_image}); "
        f"floors in microseconds (*: measured ceilings); bound: against {names[0]}",
        header,
        "-" * len(header),
    ]

    def intensity(value: float | None) -> str:
        return f"{value:>7.0f}" if value is not None else f"{'-':>7}"

    for row in report["stages"]:
        floors = "".join(
            f" {row['floors'][n]['fused_s'] * 1e6:>11.2f} {row['floors'][n]['eager_s'] * 1e6:>11.2f}" for n in names
        )
        lines.append(
            f"{row['index']:>3}  {row['stage']:<16} {row['kernel']:<18} {row['flops'] / 1e9:>8.2f} "
            f"{(row['fused_bytes_read'] + row['fused_bytes_written']) / 1e6:>9.2f} "
            f"{intensity(row['fused_intensity'])} {row['floors'][names[0]]['fused_bound']:<7} "
            f"{row['eager_kernels']:>7} {row['eager_bytes'] / 1e6:>9.2f} {intensity(row['eager_intensity'])}{floors}"
        )
    floors = "".join(
        f" {total['floors'][n]['fused_s'] * 1e6:>11.2f} {total['floors'][n]['eager_s'] * 1e6:>11.2f}" for n in names
    )
    lines.append("-" * len(header))
    lines.append(
        f"{'':>3}  {'total':<16} {str(total['launches']) + ' launches':<18} {total['flops'] / 1e9:>8.1f} "
        f"{total['fused_bytes'] / 1e6:>9.1f} {intensity(total['fused_intensity'])} {'':<7} "
        f"{total['eager_kernels']:>7} {total['eager_bytes'] / 1e6:>9.1f} {intensity(total['eager_intensity'])}{floors}"
    )
    for ceiling in report["ceilings"]:
        mode = report["math"]
        lines.append(
            f"{ceiling['name']}: {mode} peak {ceiling['peak_flops'][mode] / 1e12:.0f} TFLOP/s, "
            f"{ceiling['bandwidth_bytes_per_s'] / 1e12:.1f} TB/s; fused floor "
            f"{total['floors'][ceiling['name']]['fused_s'] * 1e3:.3f} ms, eager floor "
            f"{total['floors'][ceiling['name']]['eager_s'] * 1e3:.3f} ms"
        )
        lines += [f"  assumption: {text}" for text in ceiling["assumptions"]]
    return "\n".join(lines)
