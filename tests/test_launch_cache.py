"""The launchers' memo of what a launch signature comes to (``fastunet.kernels._common.LaunchCache``).

A launch served from the memo must be the launch derived from scratch: the same records (kernel, grid, arguments,
constexprs, options, tile candidates, load path and reason) for whole forwards of several layouts, batches, odd
sizes and a converted layout, and the same per-call checks. A changed size, stride, alignment, dtype or thread
switch on the same plan must not be served an old decision. Everything runs in dry runs on ``meta`` tensors (the
decisions are host-side; nothing here needs a kernel to run), except where a per-call check needs real storage.
"""

from __future__ import annotations

import gc
import math
import threading
import weakref

import pytest
import torch
from test_convert_norms import basic_like
from triton.tools.tensor_descriptor import TensorDescriptor

from fastunet import FastUNet, UNet, convert
from fastunet.kernels import _common
from fastunet.kernels.conv import conv2d_nhwc, conv_transpose2x2_nhwc
from fastunet.kernels.upsample import upsample2x_nhwc
from fastunet.ops import build_plan, run_plan

BF16 = torch.bfloat16


def summary(arg):
    """A launch argument as comparable plain values: a tensor by its layout (meta tensors hold no data), a
    descriptor by its base, sizes, strides and box; a float by its repr (so -0.0 and 0.0 differ)."""
    if isinstance(arg, torch.Tensor):
        return ("tensor", tuple(arg.shape), arg.stride(), arg.dtype, arg.device, arg.storage_offset())
    if isinstance(arg, TensorDescriptor):
        return ("descriptor", summary(arg.base), list(arg.shape), list(arg.strides), list(arg.block_shape))
    if isinstance(arg, float):
        return ("float", repr(arg))
    return arg


def records_of(records) -> list[tuple]:
    return [
        (r.name, r.kernel, r.grid, r.flops, r.bytes_read, r.bytes_written, tuple(map(summary, r.args)),
         r.constexprs, r.launch_options, r.candidates, r.stage, r.path, r.path_reason)
        for r in records
    ]  # fmt: skip


def forward_records(plan, x) -> list[tuple]:
    with _common.dry_run(), _common.launch_log() as records:
        run_plan(plan, x)
    return records_of(records)


def meta_nhwc(shape: tuple[int, int, int, int], dtype=BF16, offset: int = 0) -> torch.Tensor:
    """An (N, H, W, C) meta tensor ``offset`` elements into its storage (storage counts as 16-byte aligned)."""
    flat = torch.empty(math.prod(shape) + offset, device="meta", dtype=dtype)
    return flat[offset:].view(shape)


def meta_input(shape: tuple[int, int, int, int], dtype=BF16, offset: int = 0) -> torch.Tensor:
    """An (N, C, H, W) channels-last meta input ``offset`` elements into its storage."""
    n, c, h, w = shape
    return meta_nhwc((n, h, w, c), dtype, offset).permute(0, 3, 1, 2)


def meta_plan(model: torch.nn.Module, dtype=BF16):
    if isinstance(model, UNet):
        model = FastUNet.from_reference(model)
    return build_plan(model.fused_layout(), dtype, torch.device("meta"))


def reference_unet(upsample: str, **kw) -> UNet:
    args = dict(in_channels=3, num_classes=2, base_channels=64, depth=4, upsample=upsample, device="meta", dtype=BF16)
    return UNet(**(args | kw))


@pytest.fixture
def cold_caches():
    _common.clear_launch_caches()
    yield
    _common.clear_launch_caches()


# (model, dtype, input: NCHW shape, storage offset in elements, channels-last, load path asked for)
FORWARDS = [
    *(
        pytest.param(lambda up=up: reference_unet(up), BF16, (b, 3, 512, 512), 0, False, "auto", id=f"{up}-b{b}")
        for up in ("bilinear", "transpose", "nearest")
        for b in (1, 16)
    ),
    pytest.param(
        lambda: UNet(3, 5, base_channels=8, depth=3, upsample="bilinear", align_corners=True, device="meta"),
        torch.float32, (3, 3, 67, 45), 0, False, "tma", id="odd-67x45-align-corners",
    ),
    pytest.param(
        lambda: UNet(3, 2, base_channels=16, depth=3, upsample="transpose", norm="batch", device="meta", dtype=BF16),
        BF16, (2, 3, 41, 77), 0, True, "auto", id="odd-41x77-channels-last",
    ),
    pytest.param(
        lambda: UNet(16, 3, base_channels=16, depth=2, upsample="transpose", device="meta", dtype=BF16),
        BF16, (1, 16, 128, 96), 1, True, "tma", id="misaligned-input",
    ),
    pytest.param(
        lambda: convert(basic_like(widths=(8, 16, 32))).to(torch.bfloat16),
        BF16, (2, 3, 33, 70), 0, True, "tma", id="converted-instance-norm",
    ),
]  # fmt: skip


@pytest.mark.parametrize("model, dtype, shape, offset, last, path", FORWARDS)
def test_cached_launches_are_the_launches_derived_from_scratch(cold_caches, model, dtype, shape, offset, last, path):
    """Whole forwards: every record of a cold, then warm, then warm forward equals the record of the same forward
    whose launches are all derived from scratch (the memo neither read nor filled)."""
    plan = meta_plan(model(), dtype)
    if last:
        x = meta_input(shape, dtype, offset)
    else:
        x = torch.empty(math.prod(shape) + offset, device="meta", dtype=dtype)[offset:].view(shape)
    with _common.load_path(path):
        with _common.uncached_launches():
            fresh = forward_records(plan, x)
        assert not any(len(cache) for cache in _common._launch_caches)  # nothing was filled
        runs = [forward_records(plan, x) for _ in range(3)]
    assert any(len(cache) for cache in _common._launch_caches)
    for run in runs:
        assert len(run) == len(fresh)
        for cached, derived in zip(run, fresh, strict=True):
            assert cached == derived
    if offset % 8:
        assert "16-byte boundary" in fresh[0][-1]


def test_records_hold_their_own_dicts(cold_caches):
    """A record's constexprs and launch options are its own: editing one record does not reach the next launch."""
    plan = meta_plan(reference_unet("bilinear", base_channels=16, depth=2))
    x = torch.empty(1, 3, 64, 64, device="meta", dtype=BF16)
    with _common.dry_run(), _common.launch_log() as first:
        run_plan(plan, x)
    for record in first:
        record.constexprs["BLOCK_M"] = -1
        record.launch_options["num_warps"] = -1
    with _common.dry_run(), _common.launch_log() as second:
        run_plan(plan, x)
    assert all(r.launch_options["num_warps"] > 0 for r in second)
    assert all(r.constexprs["BLOCK_M"] > 0 for r in second if "BLOCK_M" in r.constexprs)


def conv_record(x, w_packed, bias=None, **kwargs):
    """The conv launch record of one call served through the memo, checked against the same call derived from
    scratch."""

    def record():
        with _common.dry_run(), _common.launch_log() as records:
            conv2d_nhwc(x, w_packed, bias, **kwargs)
        (conv,) = [r for r in records if r.name.startswith("conv")]
        return conv

    cached = record()
    with _common.uncached_launches():
        assert records_of([cached]) == records_of([record()])
    return cached


def test_same_plan_other_alignment_stride_or_shape_is_not_stale(cold_caches):
    """The same plan and input shape: a view one element off a 16-byte boundary takes pointer loads and names why,
    the aligned input takes TMA again, a non-channels-last input of the same shape names its stride; every forward
    equals its from-scratch derivation."""
    plan = meta_plan(UNet(16, 3, base_channels=16, depth=2, upsample="transpose", device="meta", dtype=BF16))
    shape = (1, 16, 128, 96)
    inputs = {
        "aligned": meta_input(shape),
        "misaligned": meta_input(shape, offset=1),
        "misaligned by 3": meta_input(shape, offset=3),
        "aligned at an offset": meta_input(shape, offset=8),
        "nchw": torch.empty(shape, device="meta", dtype=BF16),
        "aligned again": meta_input(shape),
    }
    with _common.load_path("tma"):
        seen = {name: forward_records(plan, x) for name, x in inputs.items()}
        with _common.uncached_launches():
            fresh = {name: forward_records(plan, x) for name, x in inputs.items()}
    assert seen == fresh
    first = {name: (records[0][-2], records[0][-1]) for name, records in seen.items()}
    assert first["aligned"][0] == first["aligned at an offset"][0] == first["aligned again"][0] == "tma"
    assert first["misaligned"] == ("pointer", "input starts 2 bytes past a 16-byte boundary (storage offset 1)")
    assert first["misaligned by 3"] == ("pointer", "input starts 6 bytes past a 16-byte boundary (storage offset 3)")
    assert first["nchw"][0] == "pointer" and "not contiguous in its last dimension" in first["nchw"][1]
    # Only the first conv reads the input: the rest of the forward is the same launches every time.
    assert seen["misaligned"][1:] == seen["aligned"][1:]


def test_a_launcher_sees_each_change_of_its_inputs(cold_caches):
    """One launcher, one signature after another that differs in one fact each: sizes, the upsampled source's
    alignment, the weight's alignment, dtype, the load path asked for, the modeled GPU."""
    w_packed = meta_nhwc((1, 1, 9 * 32, 32))[0, 0]
    bias = torch.empty(32, device="meta", dtype=BF16)
    skip = meta_nhwc((1, 64, 64, 16))
    w_two = meta_nhwc((1, 1, 9 * 32, 32))[0, 0]
    with _common.load_path("tma"):
        base = conv_record(meta_nhwc((1, 64, 64, 32)), w_packed, bias)
        smaller = conv_record(meta_nhwc((1, 16, 64, 32)), w_packed, bias)
        up_aligned = conv_record(skip, w_two, bias, up=meta_nhwc((1, 64, 64, 16)), up_mode="direct")
        up_misaligned = conv_record(skip, w_two, bias, up=meta_nhwc((1, 64, 64, 16), offset=4), up_mode="direct")
        w_misaligned = conv_record(meta_nhwc((1, 64, 64, 32)), meta_nhwc((1, 1, 9 * 32, 32), offset=2)[0, 0], bias)
        fp32 = conv_record(
            meta_nhwc((1, 64, 64, 32), torch.float32),
            meta_nhwc((1, 1, 9 * 32, 32), torch.float32)[0, 0],
            torch.empty(32, device="meta"),
        )
        with _common.modeled_target(132, 80), _common.load_path("auto"):
            sm80 = conv_record(meta_nhwc((1, 64, 64, 32)), w_packed, bias)
        with _common.load_path("pointer"):
            pointer = conv_record(meta_nhwc((1, 64, 64, 32)), w_packed, bias)
        again = conv_record(meta_nhwc((1, 64, 64, 32)), w_packed, bias)
    assert base.path == "tma" and again.path == "tma" and records_of([again]) == records_of([base])
    assert smaller.grid[0] < base.grid[0]
    assert up_aligned.path == "tma"
    assert up_misaligned.path == "pointer" and up_misaligned.path_reason.startswith("upsampled input starts 8 bytes")
    assert w_misaligned.path == "pointer" and w_misaligned.path_reason.startswith("packed weight starts 4 bytes")
    assert fp32.path == "tma" and fp32.args[0].dtype == torch.float32
    if _common.INTERPRET:
        assert sm80.path == "pointer" and "interpreter" in sm80.path_reason
    else:
        assert sm80.path == "pointer" and sm80.path_reason == "sm_80: TMA needs sm_90 or newer"
    assert pointer.path == "pointer" and "asked for" in pointer.path_reason


def test_threads_with_other_switches_get_their_own_launches(cold_caches):
    """Two threads launch the same signature at once, one asking for TMA, one for pointer loads: each gets its
    own path (the thread's switches are part of the signature)."""
    plan = meta_plan(UNet(16, 3, base_channels=16, depth=2, upsample="bilinear", device="meta", dtype=BF16))
    x = meta_input((1, 16, 128, 128))
    paths: dict[str, set[str]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def worker(path: str) -> None:
        try:
            start.wait()
            with _common.load_path(path):
                seen = set()
                for _ in range(20):
                    seen |= {record[-2] for record in forward_records(plan, x)}
            paths[path] = seen
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(path,)) for path in ("tma", "pointer")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert paths == {"tma": {"tma", "pointer"}, "pointer": {"pointer"}}


def test_checks_that_depend_on_the_call_still_run_on_a_cached_signature(cold_caches):
    """Served from the memo, a launch still refuses an output sharing memory with its input, and a tensor the
    current mode cannot run; with the messages a first call gets."""
    weight = torch.randn(9 * 8, 16)
    bias = torch.randn(16)
    storage = torch.randn(1, 4, 4, 16)
    x = storage[..., :8]
    with _common.dry_run():
        conv2d_nhwc(x, weight, bias, out=torch.empty(1, 4, 4, 16))  # fills the memo for this signature
        with pytest.raises(ValueError, match="out must not share memory with an input of the same launch"):
            conv2d_nhwc(x, weight, bias, out=storage)
    _common.clear_launch_caches()
    with _common.dry_run(), pytest.raises(ValueError, match="out must not share memory with an input of the same"):
        conv2d_nhwc(x, weight, bias, out=storage)
    meta = [t.to("meta") for t in (x, weight, bias)]
    with _common.dry_run():
        conv2d_nhwc(*meta)
        conv_transpose2x2_nhwc(meta[0], torch.empty(8, 64, device="meta"))
        upsample2x_nhwc(meta[0], "bilinear")
    expected = "TRITON_INTERPRET=1 runs kernels on CPU tensors" if _common.INTERPRET else "need a CUDA tensor"
    for launch in (
        lambda: conv2d_nhwc(*meta),
        lambda: conv_transpose2x2_nhwc(meta[0], torch.empty(8, 64, device="meta")),
        lambda: upsample2x_nhwc(meta[0], "bilinear"),
    ):
        with pytest.raises(RuntimeError, match=expected):  # outside the dry run a meta tensor cannot run
            launch()


def test_the_memo_is_bounded_and_pins_no_tensor(cold_caches):
    """Keys hold sizes, strides, dtypes, devices and alignment facts, never a tensor: a launch's tensors are freed
    with their last reference; and a full memo drops its least recently used entry."""
    x = torch.randn(1, 6, 5, 8)
    weight = torch.randn(9 * 8, 16)
    with _common.dry_run():
        conv2d_nhwc(x, weight)
        upsample2x_nhwc(x, "nearest")
        conv_transpose2x2_nhwc(x, torch.randn(8, 64))
    refs = [weakref.ref(t) for t in (x, weight)]
    del x, weight
    gc.collect()
    assert all(ref() is None for ref in refs)

    def tensors_in(value) -> bool:
        if isinstance(value, torch.Tensor):
            return True
        return isinstance(value, tuple) and any(tensors_in(v) for v in value)

    keys = [key for cache in _common._launch_caches for key in cache._entries]
    assert len(keys) >= 3 and not any(tensors_in(key) for key in keys)

    cache = _common.LaunchCache(maxsize=4)
    try:
        for key in range(4):
            cache.put(key, key)
        assert cache.get(0) == 0  # now the most recently used
        cache.put(4, 4)  # evicts 1, the least recently used
        assert len(cache) == 4 and cache.get(1) is None
        assert [cache.get(key) for key in (0, 2, 3, 4)] == [0, 2, 3, 4]
        cache.put([], 5)  # an unhashable argument is never an entry
        assert cache.get([]) is None and len(cache) == 4
    finally:
        _common._launch_caches.remove(cache)
