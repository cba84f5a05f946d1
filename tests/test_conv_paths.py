"""The conv family's two load paths: TMA tensor descriptors and pointer loads.

Every conv variant runs both ways against float64 (under the interpreter the descriptors' out-of-bounds zero fill
is what pads the convolution, as on the GPU), and the launcher's choice is checked: what TMA cannot address stays
on pointer loads, and the launch record says which path ran and why.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from fastunet.kernels import _common
from fastunet.kernels import conv as conv_module
from fastunet.kernels.conv import (
    TMA_MIN_ROW,
    choose_load_path,
    conv2d_nhwc,
    conv_transpose2x2_nhwc,
    pack_conv_transpose_weight,
    pack_conv_weight,
)
from fastunet.reference import center_pad
from tolerances import assert_kernel_close, precision_key

PATHS = ["tma", "pointer"]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """An NCHW tensor stored channels-last, as an NHWC view (the layout a TMA descriptor can address)."""
    return t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)


def nchw(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


def rand_weight(c_out: int, c_in: int, k: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.randn(c_out, c_in, k, k) / math.sqrt(c_in * k * k)
    return weight.to(device, dtype), (torch.randn(c_out) * 0.1).to(device, dtype)


def expected_path(requested: str, device: torch.device) -> str:
    """TMA where asked for, except on a GPU older than sm_90."""
    if requested == "tma" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        return "pointer"
    return requested


def run_logged(path: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with ``path`` asked for, and its one launch record."""
    with _common.load_path(path), _common.launch_log() as log:
        result = fn(*args, **kwargs)
    convs = [record for record in log if record.kernel is conv_module._conv_nhwc_kernel]
    assert len(convs) == 1, [record.name for record in log]
    return result, convs[0]


def check_record(record, requested: str, device: torch.device) -> None:
    path = expected_path(requested, device)
    assert record.path == path, record.path_reason
    assert record.path_reason
    assert (record.constexprs["TMA_ROWS"] > 0) == (path == "tma")


# (batch, c_in, c_out, height, width, pool)
CONV_CASES = [
    pytest.param(2, 16, 24, 5, 7, False, id="odd-5x7"),
    pytest.param(1, 16, 16, 3, 70, False, id="two-row-boxes-across"),
    pytest.param(2, 16, 16, 7, 9, True, id="pool-odd-7x9"),
    pytest.param(1, 40, 16, 6, 4, True, id="pool-c40"),
    pytest.param(1, 24, 16, 3, 5, True, id="pool-3x5-c24"),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, c_in, c_out, height, width, pool", CONV_CASES)
def test_conv_both_paths(device, path, dtype, batch, c_in, c_out, height, width, pool):
    x = torch.randn(batch, c_in, height, width).to(device, dtype)
    weight, bias = rand_weight(c_out, c_in, 3, dtype, device)
    (y, pooled), record = run_logged(path, conv2d_nhwc, channels_last(x), pack_conv_weight(weight), bias, pool=pool)
    check_record(record, path, device)
    reference = F.conv2d(x.double().cpu(), weight.double().cpu(), bias.double().cpu(), padding=1).relu()
    key = precision_key(dtype, device)
    assert_kernel_close(nchw(y), reference, 9 * c_in, key)
    if pool:
        # Pooling is data movement: bit-exact against torch's max-pool of the kernel's own skip output.
        assert torch.equal(nchw(pooled).cpu(), F.max_pool2d(nchw(y).float().cpu(), 2).to(dtype))
        assert_kernel_close(nchw(pooled), F.max_pool2d(reference, 2), 9 * c_in, key)


# (c_skip, c_up, height, width, up_h, up_w): the upsampled map centered in the skip's frame by zero padding.
TWO_SOURCE_CASES = [
    pytest.param(16, 16, 6, 8, 6, 8, id="same-size"),
    pytest.param(24, 8, 7, 9, 3, 4, id="padded-odd-c24"),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c_skip, c_up, height, width, up_h, up_w", TWO_SOURCE_CASES)
def test_two_sources_both_paths(device, path, dtype, c_skip, c_up, height, width, up_h, up_w):
    skip = torch.randn(2, c_skip, height, width).to(device, dtype)
    up = torch.randn(2, c_up, up_h, up_w).to(device, dtype)
    weight, bias = rand_weight(16, c_skip + c_up, 3, dtype, device)
    (y, _), record = run_logged(
        path, conv2d_nhwc, channels_last(skip), pack_conv_weight(weight), bias, up=channels_last(up), up_mode="direct"
    )
    check_record(record, path, device)
    joined = torch.cat([skip.double().cpu(), center_pad(up.double().cpu(), height, width)], dim=1)
    reference = F.conv2d(joined, weight.double().cpu(), bias.double().cpu(), padding=1).relu()
    assert_kernel_close(nchw(y), reference, 9 * (c_skip + c_up), precision_key(dtype, device))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_head_both_paths(device, path, dtype):
    x = torch.randn(2, 16, 5, 6).to(device, dtype)
    weight, bias = rand_weight(24, 16, 3, dtype, device)
    head_w, head_b = rand_weight(3, 24, 1, dtype, device)
    (logits, _), record = run_logged(
        path, conv2d_nhwc, channels_last(x), pack_conv_weight(weight), bias,
        head_weight=pack_conv_weight(head_w), head_bias=head_b,
    )  # fmt: skip
    check_record(record, path, device)
    features = F.conv2d(x.double().cpu(), weight.double().cpu(), bias.double().cpu(), padding=1).relu()
    reference = F.conv2d(features.to(dtype).double(), head_w.double().cpu(), head_b.double().cpu())
    assert_kernel_close(nchw(logits), reference, 9 * 16 + 24, precision_key(dtype, device))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv1x1_both_paths(device, path, dtype):
    x = torch.randn(1, 16, 3, 5).to(device, dtype)
    weight, bias = rand_weight(8, 16, 1, dtype, device)
    (y, _), record = run_logged(
        path, conv2d_nhwc, channels_last(x), pack_conv_weight(weight), bias, ksize=1, activation="none"
    )
    check_record(record, path, device)
    reference = F.conv2d(x.double().cpu(), weight.double().cpu(), bias.double().cpu())
    assert_kernel_close(nchw(y), reference, 16, precision_key(dtype, device))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_transpose_both_paths(device, path, dtype):
    x = torch.randn(2, 16, 3, 5).to(device, dtype)
    weight = (torch.randn(16, 8, 2, 2) / 4).to(device, dtype)
    bias = (torch.randn(8) * 0.1).to(device, dtype)
    y, record = run_logged(
        path, conv_transpose2x2_nhwc, channels_last(x), pack_conv_transpose_weight(weight), bias.repeat(4)
    )
    check_record(record, path, device)
    reference = F.conv_transpose2d(x.double().cpu(), weight.double().cpu(), bias.double().cpu(), stride=2)
    assert_kernel_close(nchw(y), reference, 16, precision_key(dtype, device))


# ---------------------------------------------------------------------------------------------------------------
# The choice
# ---------------------------------------------------------------------------------------------------------------
def misaligned_nhwc(batch: int, height: int, width: int, channels: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A contiguous NHWC tensor whose first element sits one element past a 16-byte boundary (a storage offset)."""
    flat = torch.randn(batch * height * width * channels + 1).to(device, dtype)
    view = flat[1:].view(batch, height, width, channels)
    assert view.data_ptr() % 16
    return view


def test_choice_and_reason(device):
    """Asked for TMA: what a descriptor cannot address stays on pointer loads, with the reason in the record; the
    results are right either way."""
    dtype = torch.bfloat16
    aligned = channels_last(torch.randn(1, 16, 4, 5).to(device, dtype))
    weight, bias = rand_weight(16, 16, 3, dtype, device)
    cases = {
        "small-K": (channels_last(torch.randn(1, 3, 4, 5).to(device, dtype)), rand_weight(16, 3, 3, dtype, device)),
        "multiples of 16 bytes": (
            channels_last(torch.randn(1, 20, 4, 5).to(device, dtype)),
            rand_weight(16, 20, 3, dtype, device),
        ),
        "16-byte boundary": (misaligned_nhwc(1, 4, 5, 16, dtype, device), (weight, bias)),
        "not contiguous in its last dimension": (
            torch.randn(1, 16, 4, 5).to(device, dtype).permute(0, 2, 3, 1),
            (weight, bias),
        ),
        "packed weight": (aligned, rand_weight(20, 16, 3, dtype, device)),
        "": (aligned, (weight, bias)),
    }
    for reason, (x, (w, b)) in cases.items():
        (y, _), record = run_logged("tma", conv2d_nhwc, x, pack_conv_weight(w), b)
        assert record.path == ("pointer" if reason else expected_path("tma", device)), (reason, record.path_reason)
        assert reason in record.path_reason
        reference = F.conv2d(nchw(x).double().cpu(), w.double().cpu(), b.double().cpu(), padding=1).relu()
        assert_kernel_close(nchw(y), reference, 9 * x.shape[-1], precision_key(dtype, device))


def test_choice_for_the_upsampled_source(device):
    dtype = torch.float16
    skip = channels_last(torch.randn(1, 16, 4, 6).to(device, dtype))
    weight, bias = rand_weight(16, 24, 3, dtype, device)
    up = misaligned_nhwc(1, 2, 3, 8, dtype, device)
    _, record = run_logged("tma", conv2d_nhwc, skip, pack_conv_weight(weight), bias, up=up, up_mode="direct")
    assert record.path == "pointer" and "upsampled input" in record.path_reason


def test_asking_for_a_path(device):
    x = channels_last(torch.randn(1, 16, 4, 5, device=device))
    weight, bias = rand_weight(16, 16, 3, torch.float32, device)
    _, record = run_logged("pointer", conv2d_nhwc, x, pack_conv_weight(weight), bias)
    assert record.path == "pointer" and "asked for" in record.path_reason
    with pytest.raises(ValueError, match="load path must be one of"):
        with _common.load_path("cp.async"):
            pass
    if _common.INTERPRET:
        _, record = run_logged("auto", conv2d_nhwc, x, pack_conv_weight(weight), bias)
        assert record.path == "pointer" and "interpreter" in record.path_reason


@pytest.mark.parametrize(
    "arch, width, path, reason",
    [
        pytest.param(90, TMA_MIN_ROW, "tma", "sm_90", id="sm90"),
        pytest.param(80, TMA_MIN_ROW, "pointer", "sm_80", id="sm80"),
        pytest.param(90, TMA_MIN_ROW // 2, "pointer", "px wide", id="sm90-narrow-map"),
    ],
)
def test_automatic_choice_off_the_interpreter(monkeypatch, arch, width, path, reason):
    """What a compiled run chooses by itself (here on ``meta`` tensors, for a modeled target): TMA from sm_90 on,
    and not for maps narrower than one TMA row box."""
    monkeypatch.setattr(conv_module, "INTERPRET", False)
    x = torch.empty(2, 8, width, 64, device="meta").contiguous()
    w_packed = torch.empty(9 * 64, 128, device="meta")
    with _common.modeled_target(132, arch), _common.load_path("auto"):
        assert choose_load_path(x, None, w_packed, packed_k=False)[0] == path
        assert reason in choose_load_path(x, None, w_packed, packed_k=False)[1]


# ---------------------------------------------------------------------------------------------------------------
# Persistent grid: fewer programs than tiles, each looping over every programs-th tile
# ---------------------------------------------------------------------------------------------------------------
def forced_config(block_n: int | None, programs_per_sm: int):
    """A ``choose_config`` that launches 16-pixel tiles (the TMA path widens them to its 64-pixel row boxes) of
    ``block_n`` channels (if given) on a persistent grid of ``programs_per_sm`` programs an SM (0: one tile a
    program)."""

    def choose(key, candidates, run, timer=None):
        config = {**candidates[0], "BLOCK_M": 16, **({"BLOCK_N": block_n} if block_n else {})}
        return {**config, "PROGRAMS_PER_SM": programs_per_sm} if programs_per_sm else config

    return choose


# (SMs of the modeled GPU, programs an SM, batch, c_out, BLOCK_N, height, width, pool, two sources). On the
# interpreter the modeled GPU sets the programs; ids count TMA tiles (pointer tiles: 7, 36, 8, 3, 4).
PERSISTENT_CASES = [
    pytest.param(1, 2, 1, 16, None, 7, 9, False, False, id="7-tiles-2-programs"),
    pytest.param(2, 2, 2, 40, 16, 11, 5, False, False, id="66-tiles-4-programs-3-groups"),
    pytest.param(3, 1, 1, 24, 16, 9, 6, True, False, id="pool-10-tiles-3-programs"),
    pytest.param(2, 1, 1, 16, None, 5, 7, False, True, id="two-sources-5-tiles-2-programs"),
    pytest.param(8, 2, 1, 24, 16, 3, 5, False, False, id="6-tiles-16-slots"),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sms, per_sm, batch, c_out, block_n, height, width, pool, two", PERSISTENT_CASES)
def test_persistent_grid(device, monkeypatch, path, sms, per_sm, batch, c_out, block_n, height, width, pool, two):
    """Persistent launches against float64 (odd tile counts, more tiles than programs, fewer), bitwise equal to the
    launch of one tile a program; the record says persistent, its grid is the programs, and it counts the tiles."""
    dtype = torch.float32
    c_skip, c_up = 16, 16 if two else 0
    skip = torch.randn(batch, c_skip, height, width).to(device, dtype)
    up = torch.randn(batch, c_up, height, width).to(device, dtype) if two else None
    weight, bias = rand_weight(c_out, c_skip + c_up, 3, dtype, device)
    kwargs = {"up": channels_last(up), "up_mode": "direct"} if two else {}
    runs = {}
    for programs in (0, per_sm):
        monkeypatch.setattr(conv_module, "choose_config", forced_config(block_n, programs))
        with _common.modeled_target(sms):
            runs[programs] = run_logged(
                path, conv2d_nhwc, channels_last(skip), pack_conv_weight(weight), bias, pool=pool, **kwargs
            )
    (y, pooled), record = runs[per_sm]
    (y_plain, pooled_plain), plain = runs[0]
    check_record(record, path, device)
    tiles = math.prod(plain.grid)
    with _common.modeled_target(sms):
        programs = min(tiles, _common.sm_count(y) * per_sm)
    assert not plain.persistent and plain.persistent_tiles == 0
    assert record.persistent and record.persistent_tiles == tiles and record.grid == (programs,)
    assert record.constexprs["PERSISTENT"] and not plain.constexprs["PERSISTENT"]
    if device.type == "cpu":  # the modeled GPU sets the programs: the case's name holds
        assert programs == min(tiles, sms * per_sm)
    assert torch.equal(y, y_plain)
    joined = skip.double().cpu() if up is None else torch.cat([skip.double().cpu(), up.double().cpu()], dim=1)
    reference = F.conv2d(joined, weight.double().cpu(), bias.double().cpu(), padding=1).relu()
    assert_kernel_close(nchw(y), reference, 9 * (c_skip + c_up), precision_key(dtype, device))
    if pool:
        assert torch.equal(pooled, pooled_plain)
        assert torch.equal(nchw(pooled).cpu(), F.max_pool2d(nchw(y).cpu(), 2))


# ---------------------------------------------------------------------------------------------------------------
# Split K: parts of (taps x channel blocks) in programs of their own, added in a fixed order by a second launch
# ---------------------------------------------------------------------------------------------------------------
def split_config(parts: int, block_n: int | None, block_k: int):
    """A ``choose_config`` that launches 16-pixel tiles (64 on the TMA path) with ``block_k`` channels a K-step in
    ``parts`` parts of K."""

    def choose(key, candidates, run, timer=None):
        return {**candidates[0], "BLOCK_M": 16, "BLOCK_K": block_k, "SPLIT_K": parts,
                **({"BLOCK_N": block_n} if block_n else {})}  # fmt: skip

    return choose


# (parts, batch, c_in, c_out, BLOCK_N, BLOCK_K, height, width, activation, slope): K-steps = 9 x channel blocks,
# dealt unevenly where the parts do not divide them.
SPLIT_CASES = [
    pytest.param(2, 1, 48, 24, 16, 16, 5, 7, "relu", 0.0, id="27-steps-2-parts"),
    pytest.param(4, 2, 32, 40, 16, 16, 3, 9, "leaky_relu", 0.1, id="18-steps-4-parts-leaky"),
    pytest.param(3, 1, 16, 16, None, 16, 4, 5, "none", 0.0, id="9-steps-3-parts"),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("parts, batch, c_in, c_out, block_n, block_k, height, width, act, slope", SPLIT_CASES)
def test_split_k(device, monkeypatch, path, parts, batch, c_in, c_out, block_n, block_k, height, width, act, slope):
    """Split-K against float64; two runs bitwise equal (fixed parts, summed in a fixed order); the records: the conv
    with a part a program (grid dimension 2) writing fp32 partial sums, then the sum launch that writes the map."""
    dtype = torch.float32
    x = torch.randn(batch, c_in, height, width).to(device, dtype)
    weight, bias = rand_weight(c_out, c_in, 3, dtype, device)
    monkeypatch.setattr(conv_module, "choose_config", split_config(parts, block_n, block_k))
    runs = []
    for _ in range(2):
        with _common.load_path(path), _common.launch_log() as log:
            y, _ = conv2d_nhwc(channels_last(x), pack_conv_weight(weight), bias, activation=act, slope=slope)
        runs.append((y, log))
    (y, log), (y_again, _) = runs
    conv, total = log
    check_record(conv, path, device)
    assert conv.constexprs["SPLIT_K"] == parts and conv.grid[2] == parts
    assert total.kernel is conv_module._split_k_sum_kernel and total.constexprs["SPLIT_K"] == parts
    assert conv.bytes_written == parts * batch * height * width * c_out * 4
    assert torch.equal(y, y_again)
    reference = F.conv2d(x.double().cpu(), weight.double().cpu(), bias.double().cpu(), padding=1)
    reference = (
        F.leaky_relu(reference, slope) if act == "leaky_relu" else reference.relu() if act == "relu" else reference
    )
    assert_kernel_close(nchw(y), reference, 9 * c_in, precision_key(dtype, device))


def test_split_k_candidates():
    """Split-K is a candidate only where the heuristic's tiles leave SMs idle, K has steps to split, and the
    epilogue is a plain store of one source; never the heuristic's choice."""
    problem = conv_module.ConvProblem(m=256, c_out=1024, c_main=1024, c_up=0, element_size=2, splittable=True)

    def parts(problem) -> list[int]:
        configs = conv_module.candidate_configs(problem)
        assert "SPLIT_K" not in configs[0]
        return [c["SPLIT_K"] for c in configs if c.get("SPLIT_K")]

    assert parts(problem) == [2, 4]  # 32 tiles of 64 x 128
    # The reference bottleneck at batch 1 (32 x 32): 128 tiles, 4 parts would be 512 programs on 132 SMs
    assert parts(dataclasses.replace(problem, m=1024)) == [2]
    for changed in ({"splittable": False}, {"m": 16 * 1024}, {"c_main": 16}):
        other = conv_module.ConvProblem(**{**dataclasses.asdict(problem), **changed})
        assert not any(c.get("SPLIT_K") for c in conv_module.candidate_configs(other)), changed
