"""Moat test: every tensor a launch reads or writes sits inside a larger buffer filled with a recognisable NaN.

Each input, weight, bias and output is a strided view into a buffer of its own whose other elements (a margin
before and after, and gaps between rows, pixels and channels) hold a NaN with a payload no arithmetic produces. An
unmasked read pulls that NaN into the result; a stray write changes the fill. After each launch the outputs match
float64 and every fill is bit-for-bit what it was (inputs: the whole buffer). Outputs the launchers allocate
themselves (the pooled map, a transposed conv's output, ``out=None``) come from the same kind of buffer: the test
swaps the launchers' allocator.

That part runs unchanged on a GPU, where the compiled kernels' predicated and vectorized accesses are what is
checked. Under the interpreter, :class:`AddressAudit` also wraps its masked load and store: every active read must
land on an element of the launch's own inputs, every write on an element of its outputs, and each output element
must be written exactly once (and :class:`HostGuard` keeps a faulty kernel from corrupting host memory first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastunet.kernels import INTERPRET
from fastunet.kernels import conv as conv_module
from fastunet.kernels import upsample as upsample_module
from fastunet.kernels.conv import conv2d_nhwc, conv_transpose2x2_nhwc, pack_conv_transpose_weight, pack_conv_weight
from fastunet.kernels.upsample import upsample2x_nhwc
from fastunet.reference import center_pad
from interpreter_patch import patched_builder
from tolerances import assert_kernel_close, precision_key

# Quiet NaNs with a payload of their own (the NaN that arithmetic makes is 0x7FC00000 / 0x7E00 / 0x7FC0 on the CPU
# and all ones on the GPU), written and compared as integers so that no float conversion can touch the payload.
FILL = {
    torch.float32: (torch.int32, 0x7FC7A5A5),
    torch.float16: (torch.int16, 0x7E5A),
    torch.bfloat16: (torch.int16, 0x7FD5),
}
MARGIN = 29  # fill elements before and after every tensor
GAP = 3  # fill elements after every run of the inner dimensions (row, pixel, channel plane, image)

# Physical order of the logical (N, C, H, W) dimensions, outermost first, and the step between neighbours along the
# innermost one (2: a fill element between any two channels of a pixel). "expanded" is an NCHW buffer of shape
# (1, C, H, 1) broadcast to (N, C, H, W): batch and width strides 0.
LAYOUTS = {"nchw": ((0, 1, 2, 3), 1), "channels_last": ((0, 2, 3, 1), 2)}
INPUT_LAYOUTS = ["nchw", "channels_last", "expanded"]


def nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1)


def nchw(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(FILL[t.dtype][0])


# ---------------------------------------------------------------------------------------------------------------
# Address audit (interpreter only)
# ---------------------------------------------------------------------------------------------------------------
def element_addresses(t: torch.Tensor) -> np.ndarray:
    """Byte address of every element of ``t`` (repeated where strides are 0)."""
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride(), strict=True):
        offsets = offsets[..., None] + torch.arange(size, dtype=torch.int64) * stride
    return offsets.reshape(-1).numpy().astype(np.uint64) * np.uint64(t.element_size()) + np.uint64(t.data_ptr())


class AddressAudit:
    """What the interpreter's masked loads and stores touched, against the launch's own tensors."""

    def __init__(self) -> None:
        self._readable: list[np.ndarray] = []
        self._readable_sorted: np.ndarray | None = None
        self._outputs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted element addresses, writes per element)
        self.loads = self.stores = 0
        self.stray_reads: list[int] = []
        self.stray_writes: list[int] = []

    def allow_read(self, t: torch.Tensor) -> None:
        self._readable.append(element_addresses(t))
        self._readable_sorted = None

    def expect_write(self, t: torch.Tensor) -> None:
        addresses = np.unique(element_addresses(t))
        assert addresses.size == t.numel(), "an output must not overlap itself"
        self._outputs.append((addresses, np.zeros(addresses.size, dtype=np.int64)))

    @staticmethod
    def _active(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return np.broadcast_to(np.asarray(mask, dtype=bool), shape)

    def read(self, ptrs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Record one masked load; returns the mask with stray lanes switched off (they must not touch memory)."""
        self.loads += 1
        if self._readable_sorted is None:
            self._readable_sorted = np.unique(np.concatenate(self._readable))
        active = self._active(mask, ptrs.shape)
        ok = np.isin(ptrs.astype(np.uint64), self._readable_sorted)
        self.stray_reads.extend(int(a) for a in ptrs[active & ~ok][:8])
        return active & ok

    def write(self, ptrs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Record one masked store; returns the mask with stray lanes switched off."""
        self.stores += 1
        active = self._active(mask, ptrs.shape)
        addresses_written = ptrs[active].astype(np.uint64)
        hit = np.zeros(addresses_written.shape, dtype=bool)
        for addresses, counts in self._outputs:
            if not addresses.size:
                continue
            pos = np.minimum(np.searchsorted(addresses, addresses_written), addresses.size - 1)
            found = addresses[pos] == addresses_written
            np.add.at(counts, pos[found], 1)
            hit |= found
        self.stray_writes.extend(int(a) for a in addresses_written[~hit][:8])
        keep = np.zeros(ptrs.shape, dtype=bool)
        keep[active] = hit
        return keep

    def verify(self) -> None:
        assert self.loads and self.stores, "the audit saw no load or store: the interpreter hooks are not in place"
        assert not self.stray_reads, f"reads outside the launch's inputs, at {list(map(hex, self.stray_reads[:8]))}"
        assert not self.stray_writes, f"writes outside the launch's outputs, at {list(map(hex, self.stray_writes[:8]))}"
        for index, (_, counts) in enumerate(self._outputs):
            unwritten, repeated = int((counts == 0).sum()), int((counts > 1).sum())
            assert not unwritten and not repeated, (
                f"output {index}: {unwritten} elements never written, {repeated} written more than once "
                f"(up to {int(counts.max())} times)"
            )


class HostGuard:
    """Under the interpreter a stray access reaches host memory, where it can crash the process before any check
    runs: lanes that fall outside every buffer of the launch (moats included) are recorded and masked off. Lanes
    inside a moat go through, so that the value checks see what a GPU would do."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.stray: list[int] = []

    def add_buffer(self, buffer: torch.Tensor) -> None:
        self._starts.append(buffer.data_ptr())
        self._ends.append(buffer.data_ptr() + buffer.numel() * buffer.element_size())

    def _keep(self, ptrs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        active = np.broadcast_to(np.asarray(mask, dtype=bool), ptrs.shape)
        addresses = ptrs.astype(np.uint64)
        inside = np.zeros(ptrs.shape, dtype=bool)
        for start, end in zip(self._starts, self._ends, strict=True):
            inside |= (addresses >= np.uint64(start)) & (addresses < np.uint64(end))
        self.stray.extend(int(a) for a in addresses[active & ~inside][:8])
        return active & inside

    read = write = _keep

    def verify(self) -> None:
        assert not self.stray, f"accesses outside every buffer of the launch, at {list(map(hex, self.stray[:8]))}"


@contextlib.contextmanager
def hooked_memory_ops(audit: AddressAudit | HostGuard) -> Iterator[None]:
    """Route the interpreter's masked loads and stores (plain ones go through them too) past ``audit``; lanes it
    finds stray are masked off, so that a faulty kernel cannot corrupt host memory while it is audited."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    load, store = builder.create_masked_load, builder.create_masked_store

    def masked_load(ptrs, mask, other, *args):
        keep = audit.read(ptrs.data, mask.data)
        return load(ptrs, interpreter.TensorHandle(keep, mask.dtype), other, *args)

    def masked_store(ptrs, value, mask, *args):
        keep = audit.write(ptrs.data, mask.data)
        return store(ptrs, value, interpreter.TensorHandle(keep, mask.dtype), *args)

    with patched_builder({"create_masked_load": masked_load, "create_masked_store": masked_store}):
        yield


# ---------------------------------------------------------------------------------------------------------------
# Moats
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Moat:
    label: str
    buffer: torch.Tensor  # the whole allocation, 1-D
    inside: torch.Tensor  # bool over the buffer: the elements the view covers
    view: torch.Tensor
    snapshot: torch.Tensor | None  # bits of the whole buffer before the launch (inputs only)


class MoatedLaunch:
    """Places the tensors of one launch in moats, and checks the moats afterwards."""

    def __init__(self, device: torch.device, audit: AddressAudit | None = None, guard: HostGuard | None = None):
        self.device, self.audit, self.guard = device, audit, guard
        self.moats: list[Moat] = []

    def _moat(self, label: str, shape, dtype, order, step: int, gap: int, is_output: bool) -> torch.Tensor:
        strides = [0] * len(shape)
        stride = step
        for dim in reversed(order):
            strides[dim] = stride
            stride = stride * max(shape[dim], 1) + gap
        span = sum((size - 1) * s for size, s in zip(shape, strides, strict=True)) + 1 if all(shape) else 0
        buffer = torch.empty(2 * MARGIN + span, dtype=dtype, device=self.device)
        bits(buffer).fill_(FILL[dtype][1])
        inside = torch.zeros(buffer.shape, dtype=torch.bool, device=self.device)
        inside.as_strided(shape, strides, MARGIN).fill_(True)
        view = buffer.as_strided(shape, strides, MARGIN)
        self.moats.append(Moat(label, buffer, inside, view, None))
        if self.guard is not None:
            self.guard.add_buffer(buffer)
        if self.audit is not None:
            (self.audit.expect_write if is_output else self.audit.allow_read)(view)
        return view

    def _filled(self, view: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        view.copy_(values)
        moat = self.moats[-1]
        moat.snapshot = bits(moat.buffer).clone()
        return view

    def input(self, label: str, values: torch.Tensor, layout: str) -> torch.Tensor:
        """A logical (N, C, H, W) input holding ``values`` (their dtype), in ``layout`` (see :data:`LAYOUTS`)."""
        if layout == "expanded":
            batch, channels, height, width = values.shape
            base = values[:1, :, :, :1]
            view = self._moat(label, base.shape, values.dtype, (0, 1, 2, 3), 1, GAP, is_output=False)
            return self._filled(view, base.to(self.device)).expand(batch, channels, height, width)
        order, step = LAYOUTS[layout]
        view = self._moat(label, values.shape, values.dtype, order, step, GAP, is_output=False)
        return self._filled(view, values.to(self.device))

    def param(self, label: str, values: torch.Tensor) -> torch.Tensor:
        """A contiguous weight or bias (what the launchers require), with a margin of fill on both sides."""
        view = self._moat(label, values.shape, values.dtype, tuple(range(values.dim())), 1, 0, is_output=False)
        return self._filled(view, values.to(self.device))

    def output(self, label: str, shape: tuple[int, ...], dtype: torch.dtype, layout: str) -> torch.Tensor:
        """A logical (N, C, H, W) output buffer, NaN everywhere: an element the launch forgets stays NaN."""
        order, step = LAYOUTS[layout]
        return self._moat(label, shape, dtype, order, step, GAP, is_output=True)

    def alloc(self, shape, dtype, device, channels_last: bool = False) -> torch.Tensor:
        """Stands in for the launchers' allocator: an (N, H, W, C) output view with gaps between channels."""
        assert torch.device(device).type == self.device.type
        batch, height, width, channels = shape
        return nhwc(self.output("allocated", (batch, channels, height, width), dtype, "channels_last"))

    def alloc_intermediate(self, shape, dtype, device, channels_last: bool = False) -> torch.Tensor:
        """Stands in for the allocator of a map that one launch of a launcher writes and the next one reads (the
        upsampled map of ``conv2d_nhwc(up_mode="nearest" | "bilinear")``): an output that may also be read."""
        view = self.alloc(shape, dtype, device, channels_last)
        if self.audit is not None:
            self.audit.allow_read(view)
        return view

    def check(self) -> None:
        """Inputs: the whole buffer unchanged. Outputs: every fill element unchanged."""
        for moat in self.moats:
            now = bits(moat.buffer)
            if moat.snapshot is not None:
                changed = now != moat.snapshot
                what = "input buffer"
            else:
                changed = (now != FILL[moat.buffer.dtype][1]) & ~moat.inside
                what = "fill around an output"
            if changed.any():
                where = changed.nonzero().flatten()[:6].tolist()
                raise AssertionError(
                    f"{moat.label}: {int(changed.sum())} elements of the {what} changed (buffer offsets {where}, "
                    f"the view starts at {MARGIN})"
                )


# ---------------------------------------------------------------------------------------------------------------
# Launch cases: each places its tensors with ``m`` and returns (label, output, float64 reference, K) to check
# ---------------------------------------------------------------------------------------------------------------
Result = tuple[str, torch.Tensor, torch.Tensor, int]


def _conv_weight(c_out: int, c_in: int, ksize: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.randn(c_out, c_in, ksize, ksize) / math.sqrt(c_in * ksize * ksize)
    return weight.to(dtype), (torch.randn(c_out) * 0.1).to(dtype)


def _out_for(m: MoatedLaunch, layout: str, shape, dtype) -> torch.Tensor | None:
    """A caller-provided ``out=`` in the input's layout; None (the launcher allocates) after an expanded input."""
    return None if layout == "expanded" else nhwc(m.output("out", shape, dtype, layout))


ACTS = {  # the epilogue's activations: launcher arguments and torch's function on the float64 map
    "relu": ({}, F.relu),
    "none": ({}, lambda t: t),
    "leaky_relu": ({"slope": 0.2}, lambda t: F.leaky_relu(t, 0.2)),
    "silu": ({}, F.silu),
    "clamp": ({"lo": -0.1, "hi": 0.2}, lambda t: F.hardtanh(t, -0.1, 0.2)),
}


def conv_case(
    m: MoatedLaunch, *, batch, c_in, c_out, height, width, layout, dtype=torch.float32, pool=False, ksize=3,
    activation="relu", padding=None, stride=1,
) -> list[Result]:  # fmt: skip
    """One-source conv; ``activation`` "prelu": per-channel slopes read from a moated parameter."""
    padding = (0 if ksize == 2 else ksize // 2) if padding is None else padding
    shrink = ksize - 1 - 2 * padding
    x = m.input("x", torch.randn(batch, c_in, height, width).to(dtype), layout)
    weight, bias = _conv_weight(c_out, c_in, ksize, dtype)
    out_h, out_w = (height - shrink - 1) // stride + 1, (width - shrink - 1) // stride + 1
    out = _out_for(m, layout, (batch, c_out, out_h, out_w), dtype)
    if activation == "prelu":
        slopes = torch.linspace(-0.5, 0.5, c_out).to(dtype)
        kwargs, act = {"slopes": m.param("slopes", slopes)}, lambda t: F.prelu(t, slopes.double())
    else:
        kwargs, act = ACTS[activation]
    y, pooled = conv2d_nhwc(
        nhwc(x), m.param("weight", pack_conv_weight(weight)), m.param("bias", bias), ksize=ksize, padding=padding,
        activation=activation, pool=pool, out=out, stride=stride, **kwargs,
    )  # fmt: skip
    ref = act(F.conv2d(x.double().cpu(), weight.double(), bias.double(), padding=padding, stride=stride))
    results = [("y", y, ref, ksize * ksize * c_in)]
    if pool:
        results.append(("pooled", pooled, F.max_pool2d(ref, 2), ksize * ksize * c_in))
    return results


def join_case(m: MoatedLaunch, *, join, layout, dtype=torch.float32) -> list[Result]:
    """Decoder loader with the replicate join (the map one row and column short, its last ones repeated) or the
    crop join (a valid conv over the skip center-cropped to the map, odd margins) and the pool."""
    batch, c_skip, c_up, c_out = 2, 5, 7, 18
    height, width, up_h, up_w = (9, 11, 8, 10) if join == "replicate" else (12, 11, 7, 8)
    padding = 1 if join == "replicate" else 0
    skip = m.input("skip", torch.randn(batch, c_skip, height, width).to(dtype), layout)
    up = m.input("up", torch.randn(batch, c_up, up_h, up_w).to(dtype), layout)
    weight, bias = _conv_weight(c_out, c_skip + c_up, 3, dtype)
    out_h, out_w = (height, width) if join == "replicate" else (up_h - 2, up_w - 2)
    out = _out_for(m, layout, (batch, c_out, out_h, out_w), dtype)
    y, pooled = conv2d_nhwc(
        nhwc(skip), m.param("weight", pack_conv_weight(weight)), m.param("bias", bias), padding=padding, up=nhwc(up),
        up_mode="direct", join=join, pool=True, out=out,
    )  # fmt: skip
    skip64, up64 = skip.double().cpu(), up.double().cpu()
    if join == "replicate":
        up64 = F.pad(up64, [0, width - up_w, 0, height - up_h], mode="replicate")
    else:
        top, left = (height - up_h) // 2, (width - up_w) // 2
        skip64 = skip64[..., top : top + up_h, left : left + up_w]
    ref = F.conv2d(torch.cat([skip64, up64], 1), weight.double(), bias.double(), padding=padding).relu()
    k = 9 * (c_skip + c_up)
    return [("y", y, ref, k), ("pooled", pooled, F.max_pool2d(ref, 2), k)]


def shuffle_case(m: MoatedLaunch, *, blur, layout, dtype=torch.float32) -> list[Result]:
    """The upsample kernel's pixel shuffle (+ blur) of a low-resolution map whose channels are sub-pixel-major."""
    batch, channels, low_h, low_w = 2, 5, 3, 4
    low = m.input("low", torch.randn(batch, 4 * channels, low_h, low_w).to(dtype), layout)
    y = upsample2x_nhwc(nhwc(low), "pixelshuffle_blur" if blur else "pixelshuffle")
    # Sub-pixel-major (k * C + c) back to pixel_shuffle's channel order (c * 4 + k).
    ordered = low.double().cpu().view(batch, 4, channels, low_h, low_w).transpose(1, 2)
    ref = F.pixel_shuffle(ordered.reshape(batch, 4 * channels, low_h, low_w), 2)
    if blur:
        ref = F.avg_pool2d(F.pad(ref, [1, 0, 1, 0]), 2, stride=1)
    return [("y", y, ref, 4)]


def _upsample(low: torch.Tensor, mode: str, align_corners: bool) -> torch.Tensor:
    low = low.double().cpu()
    if mode == "direct":
        return low
    if mode == "nearest":
        return F.interpolate(low, scale_factor=2, mode="nearest")
    return F.interpolate(low, scale_factor=2, mode="bilinear", align_corners=align_corners)


def up_case(m: MoatedLaunch, *, mode, align_corners, layout, dtype=torch.float32) -> list[Result]:
    """Decoder loader with centered padding: the skip map (9x11) is larger than the upsampled map on both sides."""
    batch, c_skip, c_up, c_out, height, width = 2, 5, 7, 18, 9, 11
    low_h, low_w = (7, 9) if mode == "direct" else (3, 4)
    skip = m.input("skip", torch.randn(batch, c_skip, height, width).to(dtype), layout)
    low = m.input("low", torch.randn(batch, c_up, low_h, low_w).to(dtype), layout)
    weight, bias = _conv_weight(c_out, c_skip + c_up, 3, dtype)
    out = _out_for(m, layout, (batch, c_out, height, width), dtype)
    y, _ = conv2d_nhwc(
        nhwc(skip), m.param("weight", pack_conv_weight(weight)), m.param("bias", bias), up=nhwc(low), up_mode=mode,
        align_corners=align_corners, out=out,
    )  # fmt: skip
    # Rounded to the storage dtype, as the materialized upsampled map of the unfused network would be.
    up = center_pad(_upsample(low, mode, align_corners).to(dtype).double(), height, width)
    ref = F.conv2d(torch.cat([skip.double().cpu(), up], dim=1), weight.double(), bias.double(), padding=1).relu()
    return [("y", y, ref, 9 * (c_skip + c_up))]


def head_case(m: MoatedLaunch, *, n_cls, layout, out_layout, dtype=torch.float32) -> list[Result]:
    batch, c_in, c_mid, height, width = 2, 17, 20, 5, 7
    x = m.input("x", torch.randn(batch, c_in, height, width).to(dtype), layout)
    weight, bias = _conv_weight(c_mid, c_in, 3, dtype)
    head_w, head_b = _conv_weight(n_cls, c_mid, 1, dtype)
    logits = m.output("logits", (batch, n_cls, height, width), dtype, out_layout)
    y, _ = conv2d_nhwc(
        nhwc(x), m.param("weight", pack_conv_weight(weight)), m.param("bias", bias),
        head_weight=m.param("head weight", pack_conv_weight(head_w)), head_bias=m.param("head bias", head_b),
        out=nhwc(logits),
    )  # fmt: skip
    features = F.conv2d(x.double().cpu(), weight.double(), bias.double(), padding=1).relu()
    # The features are rounded to the storage dtype before the head, as the unfused network stores them.
    ref = F.conv2d(features.to(dtype).double(), head_w.double(), head_b.double())
    return [("logits", y, ref, 9 * c_in + c_mid)]


def d2s_case(m: MoatedLaunch, *, c_in, c_out, layout, dtype=torch.float32) -> list[Result]:
    """Transposed conv as a GEMM with a depth-to-space store (its output comes from the launcher's allocator)."""
    batch, height, width = 2, 3, 5
    x = m.input("x", torch.randn(batch, c_in, height, width).to(dtype), layout)
    weight = (torch.randn(c_in, c_out, 2, 2) / math.sqrt(c_in)).to(dtype)
    bias = (torch.randn(c_out) * 0.1).to(dtype)
    y = conv_transpose2x2_nhwc(
        nhwc(x), m.param("weight", pack_conv_transpose_weight(weight)), m.param("bias4", bias.repeat(4))
    )
    ref = F.conv_transpose2d(x.double().cpu(), weight.double(), bias.double(), stride=2)
    return [("y", y, ref, c_in)]


def _case(fn: Callable[..., list[Result]], case_id: str, **kwargs):
    return pytest.param(fn, kwargs, id=case_id)


def _cases() -> list:
    cases = []
    for layout in INPUT_LAYOUTS:
        cases += [
            _case(conv_case, f"conv-prime-{layout}", batch=2, c_in=17, c_out=19, height=7, width=5, layout=layout),
            _case(conv_case, f"conv-small-k-{layout}", batch=1, c_in=3, c_out=17, height=11, width=13, layout=layout),
            _case(conv_case, f"conv-pool-{layout}", batch=2, c_in=20, c_out=18, height=9, width=7, layout=layout,
                  pool=True),
            _case(d2s_case, f"depth-to-space-{layout}", c_in=7, c_out=5, layout=layout),
        ]  # fmt: skip
        for mode, align_corners in (("direct", False), ("nearest", False), ("bilinear", False), ("bilinear", True)):
            name = f"up-{mode}" + ("-align-corners" if align_corners else "")
            cases.append(_case(up_case, f"{name}-{layout}", mode=mode, align_corners=align_corners, layout=layout))
    heads = ((1, "nchw", "nchw"), (2, "channels_last", "channels_last"), (3, "expanded", "nchw"),
             (64, "nchw", "channels_last"))  # fmt: skip
    for n_cls, layout, out_layout in heads:
        cases.append(_case(head_case, f"head-{n_cls}-classes-{layout}", n_cls=n_cls, layout=layout,
                           out_layout=out_layout))  # fmt: skip
    for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        cases += [
            _case(conv_case, f"conv-pool-{name}", batch=2, c_in=20, c_out=24, height=5, width=7,
                  layout="channels_last", dtype=dtype, pool=True),
            _case(up_case, f"up-bilinear-{name}", mode="bilinear", align_corners=False, layout="nchw", dtype=dtype),
            _case(head_case, f"head-3-classes-{name}", n_cls=3, layout="channels_last", out_layout="nchw",
                  dtype=dtype),
            _case(d2s_case, f"depth-to-space-wide-{name}", c_in=9, c_out=17, layout="expanded", dtype=dtype),
        ]  # fmt: skip
    for activation in ("leaky_relu", "prelu", "silu", "clamp"):
        cases.append(_case(conv_case, f"conv-pool-{activation}", batch=2, c_in=20, c_out=18, height=9, width=7,
                           layout="channels_last", pool=True, activation=activation))  # fmt: skip
    for layout in INPUT_LAYOUTS:
        cases += [
            _case(conv_case, f"conv-valid-pool-{layout}", batch=2, c_in=17, c_out=19, height=9, width=8,
                  layout=layout, pool=True, padding=0),
            _case(join_case, f"join-replicate-{layout}", join="replicate", layout=layout),
            _case(join_case, f"join-crop-valid-{layout}", join="crop", layout=layout),
            _case(shuffle_case, f"pixel-shuffle-blur-{layout}", blur=True, layout=layout),
        ]  # fmt: skip
    cases += [
        _case(shuffle_case, "pixel-shuffle", blur=False, layout="nchw"),
        _case(conv_case, "conv-prelu-fp16", batch=1, c_in=20, c_out=24, height=5, width=7, layout="nchw",
              dtype=torch.float16, activation="prelu"),
        _case(join_case, "join-replicate-bf16", join="replicate", layout="nchw", dtype=torch.bfloat16),
        _case(d2s_case, "depth-to-space-wide", c_in=9, c_out=17, layout="channels_last"),
        _case(conv_case, "conv1x1-unfused-head", batch=2, c_in=19, c_out=5, height=5, width=3, layout="nchw", ksize=1,
              activation="none"),
    ]  # fmt: skip
    for layout in ("nchw", "channels_last"):  # the 2x2 stride-2 conv (odd sizes: the last row and column unread)
        cases += [
            _case(conv_case, f"conv2x2-stride2-small-k-{layout}", batch=2, c_in=5, c_out=7, height=7, width=9,
                  layout=layout, ksize=2, stride=2, activation="none"),
            _case(conv_case, f"conv2x2-stride2-{layout}", batch=1, c_in=17, c_out=19, height=6, width=5,
                  layout=layout, ksize=2, stride=2),
        ]  # fmt: skip
    return cases


CASES = _cases()


def _run(case: Callable[..., list[Result]], kwargs: dict, m: MoatedLaunch, monkeypatch) -> list[Result]:
    monkeypatch.setattr(conv_module, "alloc", m.alloc)
    monkeypatch.setattr(upsample_module, "alloc", m.alloc_intermediate)
    return case(m, **kwargs)


@pytest.mark.parametrize("case, kwargs", CASES)
def test_value_moat(device, monkeypatch, case, kwargs):
    """Outputs match float64 (no fill NaN read in, nothing left unwritten), inputs untouched, the fill intact."""
    guard = HostGuard() if INTERPRET else None
    m = MoatedLaunch(device, guard=guard)
    with hooked_memory_ops(guard) if guard is not None else contextlib.nullcontext():
        results = _run(case, kwargs, m, monkeypatch)
    m.check()
    if guard is not None:
        guard.verify()
    for label, out, ref, k in results:
        assert any(out.data_ptr() == moat.view.data_ptr() for moat in m.moats), f"{label} is not in a moat"
        try:
            assert_kernel_close(nchw(out), ref, k, precision_key(out.dtype, device))
        except AssertionError as error:
            raise AssertionError(f"{label}: {error}") from None


@pytest.mark.skipif(not INTERPRET, reason="the address audit wraps Triton's interpreter; on a GPU the value moat "
                    "and compute-sanitizer cover stray accesses")  # fmt: skip
@pytest.mark.parametrize("case, kwargs", CASES)
def test_address_audit(device, monkeypatch, case, kwargs):
    """Reads only from the launch's inputs, writes only to its outputs, each output element exactly once."""
    audit = AddressAudit()
    m = MoatedLaunch(device, audit)
    with hooked_memory_ops(audit):
        _run(case, kwargs, m, monkeypatch)
    audit.verify()


# ---------------------------------------------------------------------------------------------------------------
# The checks themselves can fail
# ---------------------------------------------------------------------------------------------------------------
def test_moat_check_sees_a_changed_fill_element(device):
    m = MoatedLaunch(device)
    out = m.output("out", (1, 2, 3, 4), torch.float32, "channels_last")
    m.input("x", torch.randn(1, 2, 3, 4), "nchw")
    out.fill_(1.0)
    m.check()
    m.moats[0].buffer[MARGIN + 1] = 0.0  # the gap between channels 0 and 1 of the first pixel
    with pytest.raises(AssertionError, match="out: 1 elements of the fill around an output changed"):
        m.check()
    m.moats[0].buffer[MARGIN + 1] = m.moats[0].buffer[0]
    m.moats[1].view[0, 0, 0, 0] += 1.0
    with pytest.raises(AssertionError, match="x: 1 elements of the input buffer changed"):
        m.check()


@pytest.mark.skipif(not INTERPRET, reason="the address audit wraps Triton's interpreter")
def test_audit_sees_stray_reads_and_unwritten_outputs(device, monkeypatch):
    """A bias the audit was not told about is a stray read; an output the launch never fills is reported."""
    audit = AddressAudit()
    m = MoatedLaunch(device, audit)
    x = m.input("x", torch.randn(1, 16, 3, 5), "nchw")
    weight, bias = _conv_weight(16, 16, 3, torch.float32)
    out = m.output("out", (1, 16, 3, 5), torch.float32, "nchw")
    never = m.output("never written", (1, 1, 1, 1), torch.float32, "nchw")
    with hooked_memory_ops(audit):
        conv2d_nhwc(nhwc(x), m.param("weight", pack_conv_weight(weight)), bias.clone(), out=nhwc(out))
    with pytest.raises(AssertionError, match="reads outside the launch's inputs"):
        audit.verify()
    audit.stray_reads.clear()
    with pytest.raises(AssertionError, match="output 1: 1 elements never written"):
        audit.verify()
    assert never.isnan().all()
    from triton.runtime import interpreter

    assert "create_masked_load" not in vars(interpreter.interpreter_builder), "the interpreter hook was not removed"
