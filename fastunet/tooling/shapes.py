"""The benchmark shapes: one table of named network configurations, and the per-stage shapes derived from it.

Shared by the GPU timing run (``fastunet bench``, ``bench/run_gpu.py``), the pytest-benchmark suite in ``bench/``
and the roofline report of the benchmark configurations (``bench/roofline.py``). A *stage* is one launch of the
fused forward, as :func:`fastunet.trace` lists it; :func:`stages` reads its sizes back from the traced launch, so
the stage benchmarks always match what the network launches.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

from fastunet.kernels._common import dry_run, launch_log
from fastunet.kernels.conv import conv2d_nhwc
from fastunet.kernels.upsample import BILINEAR_ALIGN_CORNERS, NEAREST
from fastunet.tooling.roofline import stage_labels, trace_config


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One U-Net configuration and input size to benchmark."""

    name: str
    in_channels: int
    num_classes: int
    base_channels: int
    depth: int
    upsample: str
    norm: str | None
    batch: int
    height: int
    width: int
    align_corners: bool = False
    note: str = ""

    def model_kwargs(self) -> dict:
        """Constructor arguments of :class:`fastunet.UNet` / :class:`fastunet.FastUNet`."""
        return {
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "base_channels": self.base_channels,
            "depth": self.depth,
            "upsample": self.upsample,
            "norm": self.norm,
            "align_corners": self.align_corners,
        }

    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.in_channels, self.height, self.width)


def _reference(name: str, upsample: str, batch: int, size: int = 512, **kw) -> BenchConfig:
    return BenchConfig(name, 3, 2, 64, 4, upsample, None, batch, size, size, **kw)


# Cheapest first, so that a run cut short by its time budget still covers every layout at batch 1.
CONFIGS: dict[str, BenchConfig] = {
    c.name: c
    for c in (
        BenchConfig("smoke", 3, 2, 16, 3, "bilinear", None, 2, 128, 128, note="small and fast: checks the plumbing"),
        _reference("ref-bilinear-256-b1", "bilinear", 1, 256, note="reference config at 256x256"),
        _reference("ref-bilinear-b1", "bilinear", 1, note="reference config, 445.5 GFLOP per image"),
        _reference("ref-transpose-b1", "transpose", 1, note="reference config with transposed-conv upsampling"),
        BenchConfig(
            "milesial-b1",
            3,
            2,
            64,
            4,
            "transpose",
            "batch",
            1,
            512,
            512,
            note="milesial/Pytorch-UNet layout (bilinear=False): bias-free convs + BatchNorm, ConvTranspose2d",
        ),
        _reference("ref-bilinear-256-b16", "bilinear", 16, 256, note="reference config at 256x256, batch 16"),
        _reference("ref-bilinear-b16", "bilinear", 16, note="reference config, batch 16"),
        _reference("ref-transpose-b16", "transpose", 16, note="transposed-conv upsampling, batch 16"),
        BenchConfig(
            "milesial-b16", 3, 2, 64, 4, "transpose", "batch", 16, 512, 512, note="milesial/Pytorch-UNet, batch 16"
        ),
    )
}

# A subset that runs in a few minutes on one GPU (compilation and autotuning included).
QUICK_CONFIGS: tuple[str, ...] = ("smoke", "ref-bilinear-b1", "ref-transpose-b1")
# Configurations whose stages the per-stage benchmarks cover by default.
STAGE_CONFIGS: tuple[str, ...] = ("ref-bilinear-b1", "ref-transpose-b1")
# The reference config at both sizes and batch sizes: the default of the whole-network benchmarks.
NETWORK_CONFIGS: tuple[str, ...] = (
    "ref-bilinear-256-b1",
    "ref-bilinear-b1",
    "ref-bilinear-256-b16",
    "ref-bilinear-b16",
)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One launch of the fused forward, with the sizes needed to rebuild it alone.

    ``kind`` is ``conv`` (3x3 + bias + ReLU), ``conv+pool``, ``conv+up`` (the decoder's first conv reading the skip
    map and the full-size upsampled map, ``up_mode`` "direct"), ``conv+head`` (last conv with the 1x1 head fused),
    ``head`` (unfused 1x1 head), ``conv-transpose`` (2x2 stride-2 transposed conv) or ``upsample`` (2x nearest or
    bilinear, ``up_mode`` and ``align_corners``; ``low_h``/``low_w`` its input size). ``x_shape``/``x_stride`` and
    friends are the NHWC views the launcher received (an NCHW tensor seen through a permutation has NCHW strides).
    """

    config: str
    index: int
    label: str
    kernel: str
    kind: str
    batch: int
    height: int
    width: int
    c_main: int
    c_up: int
    c_out: int
    n_cls: int
    low_h: int
    low_w: int
    up_mode: str | None
    align_corners: bool
    x_shape: tuple[int, ...]
    x_stride: tuple[int, ...]
    up_shape: tuple[int, ...] | None
    up_stride: tuple[int, ...] | None
    y_shape: tuple[int, ...]
    y_stride: tuple[int, ...]
    flops: int
    bytes_read: int
    bytes_written: int

    @property
    def id(self) -> str:
        return f"{self.config}-{self.index:02d}-{self.label}"


def _kernel_args(record) -> dict:
    """The launch's runtime arguments by parameter name (constexprs are passed by keyword, the rest in order)."""
    fn = record.kernel
    while hasattr(fn, "fn"):  # an Autotuner wraps a JITFunction, which wraps the Python function
        fn = fn.fn
    names = [name for name in inspect.signature(fn).parameters if name not in record.constexprs]
    return dict(zip(names, record.args, strict=True))


def _kind(record) -> str:
    c = record.constexprs
    if "MODE" in c:  # the upsample kernel
        return "upsample"
    if c["D2S"]:
        return "conv-transpose"
    if c["HEAD"]:
        return "conv+head"
    if c["KSIZE"] == 1:
        return "head"
    if c["TWO_SOURCES"]:
        return "conv+up"
    return "conv+pool" if c["POOL"] else "conv"


def _upsample_stage(config: BenchConfig, index: int, label: str, record) -> Stage:
    args = _kernel_args(record)
    x, y, mode = args["x_ptr"], args["y_ptr"], record.constexprs["MODE"]
    return Stage(
        config=config.name,
        index=index,
        label=label,
        kernel=record.name,
        kind="upsample",
        batch=args["batch"],
        height=y.shape[1],
        width=y.shape[2],
        c_main=args["channels"],
        c_up=0,
        c_out=args["channels"],
        n_cls=0,
        low_h=args["low_h"],
        low_w=args["low_w"],
        up_mode="nearest" if mode == NEAREST.value else "bilinear",
        align_corners=mode == BILINEAR_ALIGN_CORNERS.value,
        x_shape=tuple(x.shape),
        x_stride=tuple(x.stride()),
        up_shape=None,
        up_stride=None,
        y_shape=tuple(y.shape),
        y_stride=tuple(y.stride()),
        flops=record.flops,
        bytes_read=record.bytes_read,
        bytes_written=record.bytes_written,
    )


def _stage(config: BenchConfig, index: int, label: str, record) -> Stage:
    if _kind(record) == "upsample":
        return _upsample_stage(config, index, label, record)
    args = _kernel_args(record)
    x, up, y = args["x_ptr"], args["up_ptr"], args["y_ptr"]
    has_up = bool(record.constexprs["TWO_SOURCES"])
    return Stage(
        config=config.name,
        index=index,
        label=label,
        kernel=record.name,
        kind=_kind(record),
        batch=args["batch"],
        height=args["height"],
        width=args["width"],
        c_main=args["c_main"],
        c_up=args["c_up"],
        c_out=args["c_out"],
        n_cls=args["n_cls"],
        low_h=args["up_h"],
        low_w=args["up_w"],
        up_mode="direct" if has_up else None,
        align_corners=False,
        x_shape=tuple(x.shape),
        x_stride=tuple(x.stride()),
        up_shape=tuple(up.shape) if has_up else None,
        up_stride=tuple(up.stride()) if has_up else None,
        y_shape=tuple(y.shape),
        y_stride=tuple(y.stride()),
        flops=record.flops,
        bytes_read=record.bytes_read,
        bytes_written=record.bytes_written,
    )


def stages(config: BenchConfig, dtype: torch.dtype = torch.float16) -> list[Stage]:
    """The launches of ``config``'s fused forward in ``dtype``, as standalone stages (traced on ``meta``)."""
    records = trace_config(config.model_kwargs(), config.input_shape(), dtype)
    labels = stage_labels(records)
    pairs = enumerate(zip(labels, records, strict=True))
    return [_stage(config, index, label, record) for index, (label, record) in pairs]


def head_stage(config: BenchConfig, dtype: torch.dtype = torch.float16, index: int = 0) -> Stage:
    """The 1x1 head as its own launch (NHWC features in, NCHW logits out), traced on ``meta``.

    The fused forward folds the head into the last conv whenever it can; this stage times the head alone, the
    launch that wider networks make and the kernel eager PyTorch runs for it.
    """
    n, h, w, c, k = config.batch, config.height, config.width, config.base_channels, config.num_classes
    features = torch.empty((n, h, w, c), device="meta", dtype=dtype)
    weight = torch.empty((c, k), device="meta", dtype=dtype)  # packed (ksize * ksize * C_in, C_out)
    bias = torch.empty((k,), device="meta", dtype=dtype)
    logits = torch.empty((n, k, h, w), device="meta", dtype=dtype).permute(0, 2, 3, 1)
    with dry_run(), launch_log() as records:
        conv2d_nhwc(features, weight, bias, ksize=1, activation="none", out=logits)
    (record,) = records
    return _stage(config, index, "head", record)


def bench_stages(config: BenchConfig, dtype: torch.dtype = torch.float16) -> list[Stage]:
    """What the per-stage benchmarks time: every launch of the fused forward, then the standalone head."""
    launches = stages(config, dtype)
    return [*launches, head_stage(config, dtype, index=len(launches))]


def main() -> None:
    """Print the configuration table and the stages of the default stage configurations."""
    for config in CONFIGS.values():
        print(f"{config.name:<18} {config.input_shape()!s:<20} {config.model_kwargs()}  {config.note}")
    for name in STAGE_CONFIGS:
        print(f"\n{name} stages (fp16):")
        for stage in stages(CONFIGS[name]):
            print(
                f"  {stage.index:>2} {stage.label:<16} {stage.kind:<15} x{stage.x_shape} up{stage.up_shape} "
                f"-> y{stage.y_shape} {stage.flops / 1e9:.2f} GFLOP"
            )


if __name__ == "__main__":
    main()
