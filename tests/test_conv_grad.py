"""Conv gradients (kernels/conv_grad.py) against float64 ``torch.nn.grad`` and autograd.

Weight and bias gradients of a conv; input gradients of a conv (the forward kernel on flipped weights); input, weight
and bias gradients of the 2x2 stride-2 transposed conv.

Error bound per element: the products summed are bounded by ``(|X|^T |dZ|)[k, n]`` (the same im2col GEMM on absolute
values; for an input gradient the same gradient of ``|W|`` and ``|dZ|``), so an fp32-accumulated sum of half-precision
products is within ``c * eps * that`` (an atol scaled by K alone is useless at K ~ 10^6). An input gradient is stored
in the input's dtype: one more rounding, relative to the value itself."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from fastunet.kernels import _common
from fastunet.kernels.conv import pack_conv_transpose_weight, pack_conv_weight
from fastunet.kernels.conv_grad import (
    conv2d_input_grad_nhwc,
    conv2d_weight_grad_nhwc,
    conv_transpose2x2_input_grad_nhwc,
    conv_transpose2x2_weight_grad_nhwc,
    flip_conv_weight,
)
from fastunet.kernels.stats import NormIn
from fastunet.parity import math_mode


def _reference(x_nchw, dz_nchw, ksize, padding, stride=1):
    x64, dz64 = x_nchw.double().cpu(), dz_nchw.double().cpu()
    shape = (dz64.shape[1], x64.shape[1], ksize, ksize)
    dw = torch.nn.grad.conv2d_weight(x64, shape, dz64, stride=stride, padding=padding)
    bound = torch.nn.grad.conv2d_weight(x64.abs(), shape, dz64.abs(), stride=stride, padding=padding)
    return pack_conv_weight(dw), pack_conv_weight(bound), dz64.sum((0, 2, 3)), dz64.abs().sum((0, 2, 3))


def _check(got, expected, bound, dtype):
    # Inputs are exact in the storage dtype; products are exact in fp32; the error is fp32 accumulation only.
    # fp32 run as TF32 (10-bit mantissa, cuDNN's switch on a GPU) rounds the operands too: the bound covers that.
    eps = 2**-10 if math_mode(dtype, got.device.type) == "tf32" else 2**-23
    tol = 64 * eps * bound + 1e-30
    err = (got.double().cpu() - expected).abs()
    assert (err <= tol).all(), f"max error {err.max():.3e}, max allowed {tol.min():.3e}..{tol.max():.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("ksize", "padding"), [(3, 1), (3, 0), (1, 0)])
@pytest.mark.parametrize("shape", [(2, 5, 7, 9, 6), (1, 17, 3, 8, 20)])
def test_matches_float64(device, dtype, ksize, padding, shape):
    batch, c_in, height, width, c_out = shape
    torch.manual_seed(0)
    x = torch.randn(batch, c_in, height, width).to(dtype).to(device)
    out_h, out_w = height + 2 * padding - ksize + 1, width + 2 * padding - ksize + 1
    dz = torch.randn(batch, c_out, out_h, out_w).to(dtype).to(device)
    dw, db = conv2d_weight_grad_nhwc(x.permute(0, 2, 3, 1), dz.permute(0, 2, 3, 1), ksize, padding, splits=3)
    expected, bound, db_expected, db_bound = _reference(x, dz, ksize, padding)
    assert dw.dtype == torch.float32 and dw.shape == expected.shape
    _check(dw, expected, bound, dtype)
    _check(db, db_expected, db_bound, dtype)


def test_splits_do_not_change_the_result_beyond_rounding_and_runs_are_bitwise_equal(device):
    torch.manual_seed(1)
    x = torch.randn(2, 9, 10, 8, device=device).to(torch.bfloat16)  # NHWC already
    dz = torch.randn(2, 9, 10, 5, device=device).to(torch.bfloat16)
    one, _ = conv2d_weight_grad_nhwc(x, dz, splits=1)
    four, _ = conv2d_weight_grad_nhwc(x, dz, splits=4)
    again, _ = conv2d_weight_grad_nhwc(x, dz, splits=4)
    assert torch.equal(four, again)
    torch.testing.assert_close(one, four, rtol=1e-5, atol=1e-5)


def test_bias_programs_after_several_output_channel_blocks_and_splits(device):
    """Two output-channel blocks, two input-channel blocks, three slices and a bias: the programs renumbered so that
    every GEMM program runs before every bias program still cover each (tap, channel block, output block, slice)
    once, and each bias slice once."""
    torch.manual_seed(2)
    x = torch.randn(2, 70, 4, 5).to(torch.bfloat16).to(device)
    dz = torch.randn(2, 150, 4, 5).to(torch.bfloat16).to(device)
    dw, db = conv2d_weight_grad_nhwc(x.permute(0, 2, 3, 1), dz.permute(0, 2, 3, 1), 3, 1, splits=3)
    expected, bound, db_expected, db_bound = _reference(x, dz, 3, 1)
    _check(dw, expected, bound, torch.bfloat16)
    _check(db, db_expected, db_bound, torch.bfloat16)


# The reference U-Net's weight gradients (bilinear, bf16, 512x512), as (batch, c_in, size, c_out): encoder, bottleneck
# and decoder convs, each decoder conv1's two sources, the head, the 3-channel first conv.
WEIGHT_GRAD_LAUNCHES = [
    (batch, c_in, size, c_out)
    for batch in (16, 1)
    for c_in, size, c_out in (
        (3, 512, 64), (64, 512, 64), (64, 256, 128), (128, 256, 128), (128, 128, 256), (256, 128, 256),
        (256, 64, 512), (512, 64, 512), (512, 32, 512), (128, 512, 64), (256, 256, 64), (512, 128, 128),
        (512, 64, 256), (64, 512, 16),
    )
]  # fmt: skip


@pytest.mark.parametrize("sms", [132, 114])
@pytest.mark.parametrize(("batch", "c_in", "size", "c_out"), WEIGHT_GRAD_LAUNCHES)
def test_default_splits_fill_whole_waves(sms, batch, c_in, size, c_out):
    """The default split count, read off the launch a dry run records for an sm_90 of ``sms`` SMs: each slice keeps at
    least 8 pixel blocks (or one row), the partials stay within MAX_PARTIAL_ELEMENTS, and at batch 16 the GEMM
    programs (the bias programs, launched last, apart) end without a nearly empty last round on the SMs, the busiest
    SM's pixel-block steps within 6% of an even share of every step."""
    from fastunet.kernels.conv_grad import MAX_PARTIAL_ELEMENTS

    ksize = 1 if c_out == 16 else 3
    x = torch.empty(batch, size, size, c_in, device="meta", dtype=torch.bfloat16)
    dz = torch.empty(batch, size, size, c_out, device="meta", dtype=torch.bfloat16)
    with _common.modeled_target(sms, 90), _common.dry_run(), _common.launch_log() as records:
        conv2d_weight_grad_nhwc(x, dz, ksize, ksize // 2)
    (record, *_) = records
    # The launch passes its runtime arguments positionally, first in the signature.
    names = list(inspect.signature(record.kernel.fn).parameters)[: len(record.args)]
    args = dict(zip(names, record.args, strict=True))
    per_split, per_row, rows = args["rows_per_split"], args["blocks_per_row"], args["rows"]
    image_rows, splits = args["image_rows"], record.grid[2]
    gemm = record.grid[0] * record.grid[1] * splits - record.light_programs
    # One bias program per (output block, slice), none where the GEMM's spare row sums dz (the first conv).
    assert record.light_programs == (0 if record.constexprs["BIAS_ROW"] else record.grid[1] * splits)
    assert record.constexprs["BIAS_ROW"] == (c_in == 3)
    assert splits * rows * c_out <= MAX_PARTIAL_ELEMENTS
    assert per_split * per_row >= min(8, image_rows * per_row) and -(-image_rows // per_split) == splits
    last_round = gemm % sms
    if batch == 1:
        return  # (the deep layers' partials, up to 9 MB a slice, cost more there than a fuller last round gains)
    assert last_round == 0 or last_round >= sms // 2, f"{gemm} GEMM programs on {sms} SMs"
    busiest = -(-gemm // sms) * per_split * per_row
    even = gemm // splits * image_rows * per_row / sms
    if ksize == 3 and c_in > 3:  # (the head's and the first conv's launches are memory-bound)
        assert busiest <= 1.06 * even, f"{splits} slices: {busiest} steps, even {even:.0f}"


@pytest.mark.parametrize(
    ("image_rows", "per_row", "tiles", "elements", "per_sm"),
    [(8192, 4, 9, 576 * 64, 2), (4096, 4, 18, 2304 * 64, 3), (512, 1, 576, 4608 * 512, 2), (7, 3, 5, 100, 4)],
)
def test_split_choice_keeps_its_limits_and_prefers_one_wave(image_rows, per_row, tiles, elements, per_sm):
    """The split choice against a brute force over every admissible count: none of them puts fewer pixel-block steps
    on the busiest SM by more than 5% (what a program's fixed cost may trade), and where one that keeps every GEMM
    program resident at once is within 1% of the fewest, the choice keeps them resident too."""
    from fastunet.kernels.conv_grad import MAX_PARTIAL_ELEMENTS, _splits

    sms = 132
    chosen = _splits(image_rows, per_row, tiles, sms, elements, per_sm)
    admissible = [
        s
        for s in range(1, image_rows + 1)
        if s * elements <= MAX_PARTIAL_ELEMENTS and (s == 1 or image_rows * per_row // s >= 8)
    ]
    assert chosen in admissible

    def busiest(s):
        return -(-tiles * s // sms) * -(-image_rows // s) * per_row

    best = min(busiest(s) for s in admissible)
    assert busiest(chosen) <= 1.05 * best
    resident = [s for s in admissible if tiles * s <= sms * per_sm and busiest(s) <= 1.01 * best]
    if resident:
        assert tiles * chosen <= sms * per_sm


# Row iteration: a split covers whole output rows, each walked BLOCK_P pixels at a time (BLOCK_P from the width:
# 16 for widths up to 16, then the next power of two up to 64, or 128 for at most 64 output channels).
# (batch, c_in, height, width, c_out, splits):
ROW_CASES = [
    pytest.param((2, 5, 6, 3, 4, 3), id="width-below-block"),  # 16-pixel blocks, 13 lanes masked off
    pytest.param((1, 4, 5, 37, 6, 2), id="odd-width-partial-block"),  # 64-pixel blocks, the last 27 lanes off
    pytest.param((1, 3, 3, 70, 72, 1), id="two-blocks-per-row"),  # a 64 + 6 pixel row (BLOCK_N 128)
    pytest.param((1, 3, 2, 150, 5, 2), id="two-128-blocks-per-row"),  # a 128 + 22 pixel row
    pytest.param((1, 2, 2, 128, 4, 1), id="width-equal-block-128"),
    pytest.param((2, 3, 2, 48, 4, 3), id="width-48"),  # 64-pixel blocks, the last 16 lanes off
    pytest.param((2, 3, 4, 16, 5, 3), id="width-equal-block"),  # rows of exactly one 16-pixel block
    pytest.param((1, 2, 5, 32, 3, 2), id="width-equal-block-32"),
    pytest.param((3, 6, 7, 9, 5, 1), id="many-rows-one-split"),  # 21 rows across 3 images in one split
    pytest.param((2, 6, 5, 11, 4, 4), id="rows-not-divisible"),  # 10 rows in splits of 3, the last of 1
    pytest.param((1, 4, 3, 5, 3, 7), id="more-splits-than-rows"),  # 3 rows, 7 splits: 4 empty partials
    pytest.param((3, 2, 1, 1, 3, 2), id="one-pixel-images"),
    # Channels filling their blocks (no channel masks), with and without a width filling its pixel blocks.
    pytest.param((2, 16, 4, 16, 32, 3), id="even-channels-even-width"),
    pytest.param((1, 32, 3, 20, 16, 2), id="even-channels-odd-width"),
]


@pytest.mark.parametrize(("ksize", "padding"), [(3, 1), (3, 0), (1, 0)])
@pytest.mark.parametrize("case", ROW_CASES)
def test_row_iteration_matches_float64(device, case, ksize, padding):
    batch, c_in, height, width, c_out, splits = case
    if ksize == 3 and padding == 0 and min(height, width) < 3:
        height, width = height + 2, width + 2  # a valid 3x3 conv needs a 3x3 input
    torch.manual_seed(sum(case) + ksize + padding)
    x = torch.randn(batch, c_in, height, width).to(torch.bfloat16).to(device)
    out_h, out_w = height + 2 * padding - ksize + 1, width + 2 * padding - ksize + 1
    dz = torch.randn(batch, c_out, out_h, out_w).to(torch.bfloat16).to(device)
    dw, db = conv2d_weight_grad_nhwc(x.permute(0, 2, 3, 1), dz.permute(0, 2, 3, 1), ksize, padding, splits=splits)
    expected, bound, db_expected, db_bound = _reference(x, dz, ksize, padding)
    _check(dw, expected, bound, torch.bfloat16)
    _check(db, db_expected, db_bound, torch.bfloat16)


def test_row_iteration_on_strided_views(device):
    """dz as every other row and column of a larger map (the transposed conv's phases), x a channel slice."""
    torch.manual_seed(5)
    big_x = torch.randn(2, 7, 19, 9, device=device)  # NHWC
    big_dz = torch.randn(2, 14, 38, 4, device=device)
    x, dz = big_x[..., 2:8], big_dz[:, 1::2, ::2, :]
    dw, db = conv2d_weight_grad_nhwc(x, dz, splits=5)
    expected, bound, db_expected, db_bound = _reference(x.permute(0, 3, 1, 2), dz.permute(0, 3, 1, 2), 3, 1)
    _check(dw, expected, bound, torch.float32)
    _check(db, db_expected, db_bound, torch.float32)


# The 3x3 stride-2 padding-1 down-sampling conv: (batch, c_in, height, width, c_out, splits, path with TMA asked
# for), the output ceil(H / 2) x ceil(W / 2). Pointer loads: lanes read every other input pixel, the padding tested
# per lane. TMA (an even input width, whole pixel blocks per row, 16-byte aligned pixels): x viewed as pixel pairs,
# a tap's row box one member of each pair, the left and bottom padding the hardware's zero fill.
STRIDED_CASES = [
    pytest.param((2, 5, 9, 7, 6, 3, "pointer"), id="odd-9x7"),
    pytest.param((1, 17, 8, 20, 3, 2, "pointer"), id="even-8x20-cin17"),  # 17 channels: unaligned pixels
    pytest.param((1, 4, 6, 37, 5, 2, "pointer"), id="odd-width-37"),  # 19 output pixels a row, a 32-pixel block
    pytest.param((1, 3, 5, 70, 72, 1, "pointer"), id="two-blocks-per-row"),  # 35-pixel rows, BLOCK_N 128: 64-px blocks
    pytest.param((3, 2, 1, 1, 3, 2, "pointer"), id="one-pixel-images"),
    pytest.param((2, 16, 4, 32, 32, 3, "tma"), id="even-channels-even-width"),  # whole pixel blocks, no channel masks
    pytest.param((2, 8, 7, 32, 16, 3, "tma"), id="tma-odd-height"),  # the last output row's dy = 1 tap: zero fill
    pytest.param((1, 8, 4, 256, 72, 2, "tma"), id="tma-two-blocks-per-row"),  # 128-px rows, 64-px blocks, 72 channels
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", STRIDED_CASES)
def test_strided_weight_grad_matches_float64(device, dtype, case):
    batch, c_in, height, width, c_out, splits, path = case
    torch.manual_seed(sum(case[:-1]))
    x = torch.randn(batch, c_in, height, width).to(dtype).to(device)
    dz = torch.randn(batch, c_out, (height + 1) // 2, (width + 1) // 2).to(dtype).to(device)
    # NCHW tensors read in place on pointer loads; the TMA cases' maps stored NHWC (a descriptor needs C innermost).
    x_nhwc, dz_nhwc = x.permute(0, 2, 3, 1), dz.permute(0, 2, 3, 1)
    if path == "tma":
        x_nhwc, dz_nhwc = x_nhwc.contiguous(), dz_nhwc.contiguous()
    with _common.load_path("tma"), _common.launch_log() as records:
        dw, db = conv2d_weight_grad_nhwc(x_nhwc, dz_nhwc, 3, 1, splits=splits, stride=2)
    launch = next(r for r in records if r.name == "conv_weight_grad")
    assert launch.constexprs["STRIDE"] == 2 and launch.path == path, launch.path_reason
    expected, bound, db_expected, db_bound = _reference(x, dz, 3, 1, stride=2)
    assert dw.shape == expected.shape
    _check(dw, expected, bound, dtype)
    _check(db, db_expected, db_bound, dtype)


def test_strided_weight_grad_paths_agree(device):
    """The pixel-pair TMA read and the per-lane pointer read of a stride-2 conv's input give the same weight
    gradient, and a NaN in x reaches the same taps on both as in float64: the taps whose stride-2 windows cover it."""
    torch.manual_seed(11)
    x = torch.randn(2, 5, 64, 8, device=device)  # NHWC: 5 rows (odd: the bottom padding), 64 px, 8 channels
    dz = torch.randn(2, 3, 32, 16, device=device)
    x[1, 4, 63, 2] = float("nan")  # the last row's last pixel: only tap (dy, dx) = (0, 1) of window (2, 31) reads it
    results = {}
    for path in ("pointer", "tma"):
        with _common.load_path(path), _common.launch_log() as records:
            results[path] = conv2d_weight_grad_nhwc(x, dz, stride=2, splits=2)
        assert next(r for r in records if r.name == "conv_weight_grad").path == path
    (dw_p, db_p), (dw_t, db_t) = results["pointer"], results["tma"]
    x64, dz64 = x.permute(0, 3, 1, 2).double().cpu(), dz.permute(0, 3, 1, 2).double().cpu()
    expected = pack_conv_weight(torch.nn.grad.conv2d_weight(x64, (16, 8, 3, 3), dz64, stride=2, padding=1))
    assert torch.equal(dw_t.cpu().isnan(), expected.isnan()) and torch.equal(dw_p.cpu().isnan(), expected.isnan())
    assert int(expected.isnan().any(1).sum()) == 1
    # fp32 operands (TF32 products on a GPU where cuDNN may use them): the same tiles and splits, so only the order
    # inside an MMA may differ between the paths.
    torch.testing.assert_close(dw_t, dw_p, rtol=1e-5, atol=1e-4, equal_nan=True)
    torch.testing.assert_close(db_t, db_p, rtol=1e-5, atol=1e-4)


def test_strided_weight_grad_nan_stays_in_its_taps(device):
    """A NaN in x reaches only the taps whose stride-2 windows cover it (a stride-1 read would reach all nine)."""
    x = torch.randn(1, 6, 6, 2, device=device)
    dz = torch.randn(1, 3, 3, 3, device=device)
    x[0, 2, 3, 1] = float("nan")
    dw, _ = conv2d_weight_grad_nhwc(x, dz, stride=2)
    x64, dz64 = x.permute(0, 3, 1, 2).double().cpu(), dz.permute(0, 3, 1, 2).double().cpu()
    expected = pack_conv_weight(torch.nn.grad.conv2d_weight(x64, (3, 2, 3, 3), dz64, stride=2, padding=1))
    assert torch.equal(dw.cpu().isnan(), expected.isnan()) and 0 < int(expected.isnan().any(1).sum()) < 9


@pytest.mark.parametrize("shape", [(0, 4, 5, 3), (2, 0, 5, 3), (2, 4, 0, 3)], ids=["batch-0", "height-0", "width-0"])
def test_empty_maps_give_zero_gradients(device, shape):
    x = torch.randn(*shape, device=device)
    dz = torch.randn(*shape[:3], 6, device=device)
    dw, db = conv2d_weight_grad_nhwc(x, dz)
    assert torch.equal(dw, torch.zeros(27, 6, device=device)) and torch.equal(db, torch.zeros(6, device=device))


def test_int64_offsets(device):
    """An image stride whose products with the image index pass 2**31: the loop switches to 64-bit offsets (``WIDE``)
    and gives the bits of the same maps stored compactly. Storage is allocated lazily: only touched pages are real."""
    big = 2**30 + 64
    x = torch.empty(3 * big, dtype=torch.float16, device=device).as_strided((3, 4, 5, 16), (big, 80, 16, 1))
    dz = torch.empty(3 * big, dtype=torch.float16, device=device).as_strided((3, 4, 5, 8), (big, 40, 8, 1))
    torch.manual_seed(6)
    x_small, dz_small = (
        torch.randn(3, 4, 5, 16).to(device, torch.float16),
        torch.randn(3, 4, 5, 8).to(device, torch.float16),
    )
    x.copy_(x_small)
    dz.copy_(dz_small)
    with _common.launch_log() as records:
        dw, db = conv2d_weight_grad_nhwc(x, dz, splits=2)
        dw_small, db_small = conv2d_weight_grad_nhwc(x_small, dz_small, splits=2)
    assert [r.constexprs["WIDE"] for r in records if r.name == "conv_weight_grad"] == [True, False]
    assert torch.equal(dw, dw_small) and torch.equal(db, db_small)


@pytest.mark.parametrize(
    ("c_in", "ksize", "packed"),
    [(3, 3, True), (7, 3, True), (8, 3, False), (3, 1, False)],
    ids=["first-conv", "7-channels", "8-channels", "1x1"],
)
def test_few_input_channels_take_every_tap_in_one_block(device, c_in, ksize, packed):
    """A 3x3 conv with at most 64 (tap, channel) rows reduces them all in one program along axis 0 (``PACK_TAPS``:
    the im2col block of all taps, dz read once per step); more rows, or a 1x1 conv, keep one program per tap and
    channel block. Both against float64, with the image borders, a partial pixel block and two images."""
    torch.manual_seed(c_in + ksize)
    padding = ksize // 2
    x = torch.randn(2, c_in, 5, 19).to(torch.bfloat16).to(device)
    dz = torch.randn(2, 6, 5, 19).to(torch.bfloat16).to(device)
    with _common.launch_log() as records:
        dw, db = conv2d_weight_grad_nhwc(x.permute(0, 2, 3, 1), dz.permute(0, 2, 3, 1), ksize, padding, splits=3)
    record = next(r for r in records if r.name == "conv_weight_grad")
    assert record.constexprs["PACK_TAPS"] is packed
    taps = ksize * ksize
    # + 1 bias program, unless the packed block's spare row (27 of 32, 63 of 64 rows) sums dz in the GEMM
    assert record.constexprs["BIAS_ROW"] is packed and record.light_programs == (0 if packed else record.grid[1] * 3)
    assert record.grid[0] == (1 if packed else taps * -(-c_in // record.constexprs["BLOCK_C"]) + 1)
    if packed:
        assert record.constexprs["BLOCK_C"] >= taps * c_in
    expected, bound, db_expected, db_bound = _reference(x, dz, ksize, padding)
    _check(dw, expected, bound, torch.bfloat16)
    _check(db, db_expected, db_bound, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("c_in", "width", "c_out", "bias"),
    [(3, 19, 6, True), (2, 16, 130, True), (7, 7, 3, True), (3, 19, 6, False)],
    ids=["3ch-partial-block", "2ch-whole-blocks-2-out-blocks", "7ch-63-of-64-rows", "no-bias"],
)
def test_bias_from_the_packed_gemms_spare_row(device, dtype, c_in, width, c_out, bias):
    """The packed (tap, channel) block has spare rows (9 * C_in rows padded to a power of two): one of them is 1 (dz
    reads 0 past a row's end), so the GEMM itself sums dz over the slice into the bias gradient. One launch of
    GEMM programs only (no bias programs, dz read once), its bias and weight gradients against float64, with slices,
    a partial pixel block and two output-channel blocks."""
    torch.manual_seed(c_in * 100 + width + c_out)
    x = torch.randn(3, c_in, 5, width).to(dtype).to(device)
    dz = torch.randn(3, c_out, 5, width).to(dtype).to(device)
    with _common.launch_log() as records:
        dw, db = conv2d_weight_grad_nhwc(x.permute(0, 2, 3, 1), dz.permute(0, 2, 3, 1), 3, 1, splits=4, bias=bias)
    record = next(r for r in records if r.name == "conv_weight_grad")
    assert record.constexprs["PACK_TAPS"] and record.constexprs["BIAS_ROW"] is bias
    assert not record.constexprs["HAS_BIAS"] and record.light_programs == 0 and record.grid[0] == 1
    assert record.bytes_read == (x.numel() + dz.numel()) * x.element_size()
    assert len(records) == 2 + int(bias)  # the launch, the weight's sum, the bias's sum
    expected, bound, db_expected, db_bound = _reference(x, dz, 3, 1)
    _check(dw, expected, bound, dtype)
    if bias:
        _check(db, db_expected, db_bound, dtype)
    else:
        assert db is None


def test_wide_offsets_compute_the_same(device, monkeypatch):
    """The 64-bit offset variant (chosen for maps reaching 2**31 elements) forced on small maps gives the same bits
    as the 32-bit one, so both variants run on every machine."""
    import fastunet.kernels.conv_grad as conv_grad_module

    torch.manual_seed(7)
    x, dz = torch.randn(2, 5, 9, 6, device=device), torch.randn(2, 5, 9, 7, device=device)
    narrow = conv2d_weight_grad_nhwc(x, dz, splits=3)
    monkeypatch.setattr(conv_grad_module, "element_span", lambda t: 2**31)
    with _common.launch_log() as records:
        wide = conv2d_weight_grad_nhwc(x, dz, splits=3)
    assert records[0].constexprs["WIDE"]
    assert torch.equal(wide[0], narrow[0]) and torch.equal(wide[1], narrow[1])


def test_two_sources_fill_their_rows(device):
    """A decoder conv on cat([skip, up]): two launches, one per source, into one packed gradient."""
    torch.manual_seed(2)
    skip = torch.randn(1, 6, 7, 3, device=device)
    up = torch.randn(1, 6, 7, 5, device=device)
    dz = torch.randn(1, 6, 7, 4, device=device)
    out = torch.full((9 * 8, 4), float("nan"), device=device)
    conv2d_weight_grad_nhwc(skip, dz, out=out, row_offset=0, bias=False)
    conv2d_weight_grad_nhwc(up, dz, out=out, row_offset=27, bias=False)
    joined = torch.cat([skip, up], dim=3)
    expected, bound, _, _ = _reference(joined.permute(0, 3, 1, 2), dz.permute(0, 3, 1, 2), 3, 1)
    # The packed rows of the joined conv are tap-major: regroup the two sources' blocks to compare.
    got = torch.cat([out[:27].view(9, 3, 4), out[27:].view(9, 5, 4)], dim=1).reshape(72, 4)
    _check(got, expected, bound, torch.float32)


def test_nan_and_inf_propagate(device):
    x = torch.randn(1, 4, 4, 2, device=device)
    dz = torch.randn(1, 4, 4, 3, device=device)
    dz[0, 1, 1, 0] = float("nan")
    x[0, 2, 2, 1] = float("inf")
    dw, db = conv2d_weight_grad_nhwc(x, dz)
    dw, db = dw.cpu(), db.cpu()
    x64, dz64 = x.permute(0, 3, 1, 2).double().cpu(), dz.permute(0, 3, 1, 2).double().cpu()
    expected = pack_conv_weight(torch.nn.grad.conv2d_weight(x64, (3, 2, 3, 3), dz64, padding=1))
    assert torch.equal(dw.isnan(), expected.isnan())
    assert torch.equal(dw.isinf(), expected.isinf())
    assert db[0].isnan() and not db[1:].isnan().any()


def test_bad_arguments_are_refused(device):
    x, dz = torch.randn(1, 4, 4, 2, device=device), torch.randn(1, 4, 4, 3, device=device)
    with pytest.raises(ValueError, match=r"dz: expected shape \(1, 2, 2, C_out\)"):
        conv2d_weight_grad_nhwc(x, dz, 3, 0)
    with pytest.raises(ValueError, match="share dtype"):
        conv2d_weight_grad_nhwc(x, dz.half())
    with pytest.raises(ValueError, match="ksize 1 or 3"):
        conv2d_weight_grad_nhwc(x, dz, 5, 2)
    with pytest.raises(ValueError, match="rows"):
        conv2d_weight_grad_nhwc(x, dz, out=torch.zeros(10, 3, device=device), row_offset=0)
    with pytest.raises(ValueError, match="splits must be"):
        conv2d_weight_grad_nhwc(x, dz, splits=0)
    with pytest.raises(ValueError, match="4-D"):
        conv2d_weight_grad_nhwc(x[0], dz)
    with pytest.raises(ValueError, match=r"dz: expected shape \(1, 2, 2, C_out\).*stride 2"):
        conv2d_weight_grad_nhwc(x, dz, stride=2)
    with pytest.raises(ValueError, match="expected stride 1, or 2 with ksize 3 and padding 1"):
        conv2d_weight_grad_nhwc(x, dz, 1, 0, stride=2)
    with pytest.raises(ValueError, match="expected stride 1, or 2 with ksize 3 and padding 1"):
        conv2d_weight_grad_nhwc(x, dz[:, :1, :1], stride=4)


# ---------------------------------------------------------------------------------------------------------------
# Input gradients
# ---------------------------------------------------------------------------------------------------------------
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
# Unit roundoff of the stored gradient.
STORAGE_EPS = {torch.float32: 2**-24, torch.bfloat16: 2**-8}


def _check_stored(got, expected, bound, dtype):
    """A gradient stored in ``dtype``: the fp32-accumulation bound of :func:`_check` plus the final rounding."""
    eps = 2**-10 if math_mode(dtype, got.device.type) == "tf32" else 2**-23
    tol = 64 * eps * bound + STORAGE_EPS[dtype] * expected.abs() + 1e-30
    err = (got.double().cpu() - expected).abs()
    assert not got.isnan().any(), "NaN in the result (an element never written?)"
    assert (err <= tol).all(), f"max error {err.max():.3e}, max allowed {tol.min():.3e}..{tol.max():.3e}"


def _unpack(w_packed, c_in, ksize):
    """(k*k*c_in, c_out) packed -> the (c_out, c_in, k, k) weight."""
    return w_packed.reshape(ksize, ksize, c_in, -1).permute(3, 2, 0, 1)


@pytest.mark.parametrize("ksize", [3, 1])
@pytest.mark.parametrize(("c_in", "c_out"), [(3, 17), (70, 1)])
def test_flipped_weight_computes_the_input_gradient_in_float64(ksize, c_in, c_out):
    """F.conv2d with the flipped weight equals torch.nn.grad.conv2d_input (float64: exact up to summation order)."""
    weight = torch.randn(c_out, c_in, ksize, ksize, dtype=torch.float64)
    dz = torch.randn(2, c_out, 5, 7, dtype=torch.float64)
    packed = pack_conv_weight(weight)
    before = packed.clone()
    flipped = flip_conv_weight(packed, c_in, ksize)
    assert torch.equal(packed, before), "flip_conv_weight modified its argument"
    assert flipped.shape == (ksize * ksize * c_out, c_in) and flipped.is_contiguous()
    got = F.conv2d(dz, _unpack(flipped, c_out, ksize), padding=ksize // 2)
    expected = torch.nn.grad.conv2d_input((2, c_in, 5, 7), weight, dz, padding=ksize // 2)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# (batch, c_in, c_out, height, width)
INPUT_GRAD_SHAPES = [
    pytest.param(2, 3, 17, 5, 7, id="odd-5x7"),
    pytest.param(1, 17, 70, 1, 1, id="1x1"),
    pytest.param(1, 70, 3, 3, 2, id="3x2-cin70"),
    pytest.param(2, 1, 3, 3, 2, id="cin1"),
    pytest.param(1, 17, 1, 5, 7, id="cout1"),
    pytest.param(0, 3, 17, 5, 7, id="batch0"),
    pytest.param(1, 192, 8, 3, 4, id="cin192"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ksize", [3, 1])
@pytest.mark.parametrize(("batch", "c_in", "c_out", "height", "width"), INPUT_GRAD_SHAPES)
def test_input_grad_matches_float64(device, dtype, ksize, batch, c_in, c_out, height, width):
    weight = torch.randn(c_out, c_in, ksize, ksize).to(dtype)
    dz = torch.randn(batch, c_out, height, width).to(dtype).to(device)  # NCHW logits' gradient, read permuted
    packed = pack_conv_weight(weight).to(device)
    dz_before, packed_before = dz.clone(), packed.clone()
    dx = conv2d_input_grad_nhwc(dz.permute(0, 2, 3, 1), packed, c_in, ksize, ksize // 2)
    assert torch.equal(dz, dz_before) and torch.equal(packed, packed_before), "an input was modified"
    assert dx.shape == (batch, height, width, c_in) and dx.dtype == dtype and dx.is_contiguous()
    w64, dz64 = weight.double(), dz.double().cpu()
    shape = (batch, c_in, height, width)
    expected = torch.nn.grad.conv2d_input(shape, w64, dz64, padding=ksize // 2)
    bound = torch.nn.grad.conv2d_input(shape, w64.abs(), dz64.abs(), padding=ksize // 2)
    _check_stored(dx.permute(0, 3, 1, 2), expected, bound, dtype)


# The 3x3 stride-2 padding-1 conv's input (batch, c_in, c_out, height, width); dz is ceil(H / 2) x ceil(W / 2).
STRIDED_INPUT_GRAD_SHAPES = [
    pytest.param(2, 5, 7, 9, 7, id="odd-9x7"),
    pytest.param(1, 12, 20, 8, 10, id="even-8x10"),
    pytest.param(1, 20, 12, 5, 6, id="odd-even-5x6"),
    pytest.param(2, 3, 17, 1, 2, id="1x2"),
    pytest.param(1, 70, 3, 3, 3, id="cin70-3x3"),
    pytest.param(0, 3, 5, 5, 5, id="batch0"),
]


def _strided_input_reference(weight, dz, shape):
    w64, dz64 = weight.double(), dz.double().cpu()
    expected = torch.nn.grad.conv2d_input(shape, w64, dz64, stride=2, padding=1)
    return expected, torch.nn.grad.conv2d_input(shape, w64.abs(), dz64.abs(), stride=2, padding=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "c_in", "c_out", "height", "width"), STRIDED_INPUT_GRAD_SHAPES)
def test_strided_input_grad_matches_float64(device, dtype, batch, c_in, c_out, height, width):
    """The stride-2 conv's input gradient as four output phases in one launch of the forward kernel (``POLYPHASE``):
    every element written (outputs are NaN-poisoned), odd sizes' shorter last phases included."""
    torch.manual_seed(batch + c_in + height)
    weight = torch.randn(c_out, c_in, 3, 3).to(dtype)
    dz = torch.randn(batch, c_out, (height + 1) // 2, (width + 1) // 2).to(dtype).to(device)
    packed = pack_conv_weight(weight).to(device)
    dz_before, packed_before = dz.clone(), packed.clone()
    with _common.launch_log() as records:
        dx = conv2d_input_grad_nhwc(dz.permute(0, 2, 3, 1), packed, c_in, stride=2, in_size=(height, width))
    assert torch.equal(dz, dz_before) and torch.equal(packed, packed_before), "an input was modified"
    assert dx.shape == (batch, height, width, c_in) and dx.dtype == dtype and dx.is_contiguous()
    if batch:
        assert [(r.name, r.constexprs["POLYPHASE"]) for r in records] == [("conv3x3/2.input_grad", True)]
        assert records[0].grid[0] % 4 == 0  # four phases
    expected, bound = _strided_input_reference(weight, dz, (batch, c_in, height, width))
    _check_stored(dx.permute(0, 3, 1, 2), expected, bound, dtype)


@pytest.mark.parametrize(
    ("path", "rows", "height", "width"),
    [
        pytest.param("pointer", 0, 9, 13, id="pointer-odd"),
        pytest.param("pointer", 0, 8, 6, id="pointer-even"),
        pytest.param("tma", 1, 9, 13, id="tma-odd"),
        pytest.param("tma", 1, 8, 6, id="tma-even"),
        # 2 x 46 x 46 lattice pixels a phase: enough tiles for 132 SMs at 128 pixels, two 64-pixel row boxes a tile.
        pytest.param("tma", 2, 91, 92, id="tma-2rows-odd"),
    ],
)
def test_strided_input_grad_on_both_load_paths(device, path, rows, height, width):
    """Pointer loads and TMA row boxes (dz at (qy + sy, qx + sx) of the phase's lattice; a box past dz's end reads
    zeros), one or two rows a tile, give the float64 gradient; channel counts whose rows are 16-byte aligned."""
    torch.manual_seed(height)
    c_in, c_out = 8, 16
    weight = torch.randn(c_out, c_in, 3, 3)
    dz = torch.randn(2, c_out, (height + 1) // 2, (width + 1) // 2, device=device)
    with _common.load_path(path), _common.launch_log() as records:
        dx = conv2d_input_grad_nhwc(
            dz.permute(0, 2, 3, 1).contiguous(), pack_conv_weight(weight).to(device), c_in, stride=2,
            in_size=(height, width),
        )  # fmt: skip
    assert [(r.path, r.constexprs["TMA_ROWS"]) for r in records] == [(path, rows)], records[0].path_reason
    expected, bound = _strided_input_reference(weight, dz, (2, c_in, height, width))
    _check_stored(dx.permute(0, 3, 1, 2), expected, bound, torch.float32)


def test_strided_input_grad_nan_reaches_only_its_window(device):
    """No tap of zeros is multiplied: a NaN in dz reaches exactly the input pixels its stride-2 window covers (3x3
    around (2 qy, 2 qx)), where a zero-interleaved read would spread it through its zero taps too."""
    dz = torch.randn(1, 4, 4, 3, device=device)
    dz[0, 1, 2, 0] = float("nan")
    packed = pack_conv_weight(torch.randn(3, 2, 3, 3)).to(device)
    dx = conv2d_input_grad_nhwc(dz, packed, 2, stride=2, in_size=(7, 8))
    expected = torch.zeros(7, 8, dtype=torch.bool)
    expected[1:4, 3:6] = True
    assert torch.equal(dx[0].isnan().any(-1).cpu(), expected)


@pytest.mark.parametrize(("c_in", "block_n"), [(192, 64), (320, 64), (256, 128), (200, 128), (128, 128)])
def test_input_grad_tiles_cover_the_channels_without_an_empty_half_block(c_in, block_n):
    """The input gradient of a decoder conv over 64 skip + 128 upsampled channels (the reference U-Net's dec0.conv1)
    writes 192 channels: three 64-wide blocks, not two 128-wide ones of which the second is half padding (a quarter
    of the launch's MMAs on zeros). Read off the launch a dry run records for an sm_90: the programs times the tile
    cover the pixels times the channels padded to the block, and the block leaves less padding than 128 would."""
    dz = torch.empty(16, 512, 512, 64, device="meta", dtype=torch.bfloat16)
    w = torch.empty(9 * c_in, 64, device="meta", dtype=torch.bfloat16)
    with _common.modeled_target(132, 90), _common.dry_run(), _common.launch_log() as records:
        conv2d_input_grad_nhwc(dz, w, c_in)
    (record,) = records
    tile_m, tile_n = record.constexprs["BLOCK_M"], record.constexprs["BLOCK_N"]
    assert tile_n == block_n and record.grid[1] == -(-c_in // tile_n)
    assert math.prod(record.grid) * tile_m * tile_n == 16 * 512 * 512 * record.grid[1] * tile_n
    assert record.grid[1] * tile_n <= -(-c_in // 128) * 128


@pytest.mark.parametrize(("size", "c_in", "programs"), [(32, 512, 128), (32, 1024, 128), (64, 512, 256)])
def test_input_grad_with_few_tiles_takes_narrower_channel_blocks(size, c_in, programs):
    """A deep layer's input gradient at batch 1 (the bottleneck's first conv: 32 x 32 pixels, 512 channels written):
    64 x 128 tiles would be 64 programs on 132 SMs; 64-wide channel blocks make 128. Where the tiles already
    reach half the SMs the block stays 128 wide. Read off the launch a dry run records for an sm_90."""
    dz = torch.empty(1, size, size, 256, device="meta", dtype=torch.bfloat16)
    w = torch.empty(9 * c_in, 256, device="meta", dtype=torch.bfloat16)
    with _common.modeled_target(132, 90), _common.dry_run(), _common.launch_log() as records:
        conv2d_input_grad_nhwc(dz, w, c_in)
    (record,) = records
    assert math.prod(record.grid) == programs, record.grid
    assert record.grid[1] * record.constexprs["BLOCK_N"] == c_in


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_source_input_grad_splits_into_skip_and_up(device, dtype):
    """A decoder conv on cat([skip, up]): the input gradient's channels [skip | up], sliced by the caller."""
    c_skip, c_up, c_out = 3, 5, 4
    skip = torch.randn(2, c_skip, 5, 7, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, c_up, 5, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(c_out, c_skip + c_up, 3, 3).to(dtype)
    dz = torch.randn(2, c_out, 5, 7).to(dtype)
    F.conv2d(torch.cat([skip, up], dim=1), weight.double(), padding=1).backward(dz.double())
    skip_abs, up_abs = skip.detach().abs().requires_grad_(), up.detach().abs().requires_grad_()
    F.conv2d(torch.cat([skip_abs, up_abs], dim=1), weight.double().abs(), padding=1).backward(dz.double().abs())
    dx = conv2d_input_grad_nhwc(dz.to(device).permute(0, 2, 3, 1), pack_conv_weight(weight).to(device), c_skip + c_up)
    d_skip, d_up = dx[..., :c_skip], dx[..., c_skip:]
    _check_stored(d_skip.permute(0, 3, 1, 2), skip.grad, skip_abs.grad, dtype)
    _check_stored(d_up.permute(0, 3, 1, 2), up.grad, up_abs.grad, dtype)


def _transpose_grads(x, weight, bias, dy):
    """float64 autograd of F.conv_transpose2d(kernel 2, stride 2): (dx, dW, db)."""
    x, weight, bias = (t.double().cpu().requires_grad_() for t in (x, weight, bias))
    F.conv_transpose2d(x, weight, bias, stride=2).backward(dy.double().cpu())
    return x.grad, weight.grad, bias.grad


# (batch, c_in, c_out, low_h, low_w)
TRANSPOSE_SHAPES = [
    pytest.param(1, 3, 16, 1, 1, id="1x1-3to16"),
    pytest.param(2, 16, 20, 3, 5, id="3x5-16to20"),
    pytest.param(1, 20, 3, 3, 5, id="3x5-20to3"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "c_in", "c_out", "low_h", "low_w"), TRANSPOSE_SHAPES)
def test_transposed_conv_grads_match_float64(device, dtype, batch, c_in, c_out, low_h, low_w):
    x = torch.randn(batch, c_in, low_h, low_w).to(dtype).to(device)
    weight = torch.randn(c_in, c_out, 2, 2).to(dtype)
    bias = torch.randn(c_out).to(dtype)
    dy = torch.randn(batch, c_out, 2 * low_h, 2 * low_w).to(dtype).to(device)  # read as a permuted NCHW tensor
    packed = pack_conv_transpose_weight(weight).to(device)
    before = [t.clone() for t in (x, dy, packed)]
    dx = conv_transpose2x2_input_grad_nhwc(dy.permute(0, 2, 3, 1), packed)
    dw, db = conv_transpose2x2_weight_grad_nhwc(x.permute(0, 2, 3, 1), dy.permute(0, 2, 3, 1))
    assert all(torch.equal(t, b) for t, b in zip((x, dy, packed), before, strict=True)), "an input was modified"
    expected = _transpose_grads(x, weight, bias, dy)
    bound = _transpose_grads(x.abs(), weight.abs(), bias.abs(), dy.abs())
    assert dx.shape == (batch, low_h, low_w, c_in) and dx.dtype == dtype and dx.is_contiguous()
    _check_stored(dx.permute(0, 3, 1, 2), expected[0], bound[0], dtype)
    assert dw.shape == (c_in, 4 * c_out) and dw.dtype == torch.float32 and dw.is_contiguous()
    _check(dw, pack_conv_transpose_weight(expected[1]), pack_conv_transpose_weight(bound[1]), dtype)
    assert db.shape == (c_out,) and db.dtype == torch.float32
    _check(db, expected[2], bound[2], dtype)


def test_transposed_weight_grad_without_bias(device):
    x, dy = torch.randn(1, 2, 3, 4, device=device), torch.randn(1, 4, 6, 5, device=device)
    dw, db = conv_transpose2x2_weight_grad_nhwc(x, dy, bias=False)
    assert db is None
    with_bias, _ = conv_transpose2x2_weight_grad_nhwc(x, dy)
    assert torch.equal(dw, with_bias)


# (batch, c_in, c_out, low_h, low_w, splits): channels not multiples of 8, odd sizes, several output-channel blocks
TRANSPOSE_WEIGHT_CASES = [
    pytest.param(2, 5, 11, 3, 5, None, id="3x5-5to11"),
    pytest.param(1, 17, 13, 5, 3, 3, id="5x3-17to13-3splits"),
    pytest.param(3, 70, 130, 1, 3, 2, id="1x3-70to130-2blocks-2splits"),
]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("batch", "c_in", "c_out", "low_h", "low_w", "splits"), TRANSPOSE_WEIGHT_CASES)
def test_transposed_weight_grad_is_one_launch(device, dtype, bias, batch, c_in, c_out, low_h, low_w, splits):
    """The four output phases' weight gradients and the bias gradient in one weight-gradient launch, whose tiles
    land in the packed (C_in, 4 * C_out) order (no permute), plus its fixed-order sums: against float64 autograd of
    F.conv_transpose2d, and two runs bitwise equal."""
    torch.manual_seed(batch * 100 + c_in + c_out)
    x = torch.randn(batch, c_in, low_h, low_w).to(dtype).to(device)
    weight = torch.randn(c_in, c_out, 2, 2).to(dtype)
    dy = torch.randn(batch, c_out, 2 * low_h, 2 * low_w).to(dtype).to(device)
    x_nhwc, dy_nhwc = x.permute(0, 2, 3, 1), dy.permute(0, 2, 3, 1)
    runs = []
    for _ in range(2):
        with _common.launch_log() as records:
            if splits is None:
                runs.append(conv_transpose2x2_weight_grad_nhwc(x_nhwc, dy_nhwc, bias=bias))
            else:
                runs.append(conv2d_weight_grad_nhwc(x_nhwc, dy_nhwc, 1, 0, bias=bias, phases=4, splits=splits))
    (dw, db), (dw2, db2) = runs
    assert torch.equal(dw, dw2) and (db is None and db2 is None or torch.equal(db, db2))
    gemm = [r for r in records if r.kernel.__name__ == "_weight_grad_partial_kernel"]
    assert len(gemm) == 1 and gemm[0].constexprs["PHASES"] == 4 and gemm[0].constexprs["HAS_BIAS"] == bias
    assert len(records) == 1 + 1 + int(bias), [r.name for r in records]  # the launch, its sum, the bias's sum
    expected = _transpose_grads(x, weight, torch.zeros(c_out), dy)
    bound = _transpose_grads(x.abs(), weight.abs(), torch.zeros(c_out), dy.abs())
    assert dw.shape == (c_in, 4 * c_out) and dw.dtype == torch.float32 and dw.is_contiguous()
    _check(dw, pack_conv_transpose_weight(expected[1]), pack_conv_transpose_weight(bound[1]), dtype)
    if bias:
        assert db.shape == (c_out,) and db.dtype == torch.float32
        _check(db, expected[2], bound[2], dtype)
    else:
        assert db is None


def test_transposed_weight_grad_per_phase_bias(device):
    """``sum_phases=False`` (the training step's repeated bias): db per phase, (4 * C_out,) in dW's column order
    ``(a * 2 + b) * C_out + co``, each the sum of its phase's pixels of dy, against float64; dW unchanged."""
    torch.manual_seed(6)
    x = torch.randn(2, 3, 5, 7, device=device)
    dy = torch.randn(2, 6, 10, 9, device=device)
    dw, db = conv2d_weight_grad_nhwc(x, dy, 1, 0, phases=4, sum_phases=False, splits=2)
    summed_dw, summed_db = conv2d_weight_grad_nhwc(x, dy, 1, 0, phases=4, splits=2)
    assert torch.equal(dw, summed_dw) and db.shape == (36,)
    dy64 = dy.double().cpu()
    expected = torch.cat([dy64[:, a::2, b::2, :].sum((0, 1, 2)) for a in (0, 1) for b in (0, 1)])
    bound = torch.cat([dy64[:, a::2, b::2, :].abs().sum((0, 1, 2)) for a in (0, 1) for b in (0, 1)])
    _check(db, expected, bound, torch.float32)
    _check(summed_db, dy64.sum((0, 1, 2)), dy64.abs().sum((0, 1, 2)), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_weight_grad_on_tma(device, dtype):
    """The phases' dy boxes by TMA (dy viewed as (N, 2h, w, 2, C), a box every other pixel): 12 output channels of a
    16-wide block (zero fill past C_out, not the next phase's channels), against float64."""
    torch.manual_seed(5)
    x = torch.randn(2, 3, 16, 8).to(dtype).to(device)  # NHWC: 16-px rows, whole pixel blocks
    dy = torch.randn(2, 6, 32, 16).to(dtype).to(device)[..., :12]  # a channel slice: pixel stride 16
    with _common.load_path("tma"), _common.launch_log() as records:
        dw, db = conv_transpose2x2_weight_grad_nhwc(x, dy)
    (record,) = [r for r in records if r.kernel.__name__ == "_weight_grad_partial_kernel"]
    assert record.path == "tma" and record.constexprs["TMA"] and record.constexprs["PHASES"] == 4, record.path_reason
    x_nchw, dy_nchw = x.permute(0, 3, 1, 2), dy.permute(0, 3, 1, 2)
    expected = _transpose_grads(x_nchw, torch.zeros(8, 12, 2, 2), torch.zeros(12), dy_nchw)
    bound = _transpose_grads(x_nchw.abs(), torch.zeros(8, 12, 2, 2), torch.zeros(12), dy_nchw.abs())
    _check(dw, pack_conv_transpose_weight(expected[1]), pack_conv_transpose_weight(bound[1]), dtype)
    _check(db, expected[2], bound[2], dtype)


def test_input_grads_are_bitwise_reproducible(device):
    dz = torch.randn(2, 5, 7, 17, device=device).to(torch.bfloat16)
    packed = pack_conv_weight(torch.randn(17, 6, 3, 3)).to(device, torch.bfloat16)
    assert torch.equal(conv2d_input_grad_nhwc(dz, packed, 6), conv2d_input_grad_nhwc(dz, packed, 6))
    strided = [conv2d_input_grad_nhwc(dz, packed, 6, stride=2, in_size=(9, 13)) for _ in range(2)]
    assert torch.equal(strided[0], strided[1])
    x = torch.randn(2, 3, 5, 16, device=device)
    dy = torch.randn(2, 6, 10, 20, device=device)
    packed_t = pack_conv_transpose_weight(torch.randn(16, 20, 2, 2)).to(device)
    assert torch.equal(conv_transpose2x2_input_grad_nhwc(dy, packed_t), conv_transpose2x2_input_grad_nhwc(dy, packed_t))
    (dw1, db1), (dw2, db2) = (conv_transpose2x2_weight_grad_nhwc(x, dy) for _ in range(2))
    assert torch.equal(dw1, dw2) and torch.equal(db1, db2)


def test_input_grad_bad_arguments_are_refused(device):
    dz = torch.randn(1, 4, 4, 3, device=device)
    packed = torch.randn(9 * 2, 3, device=device)
    with pytest.raises(NotImplementedError, match="valid conv"):
        conv2d_input_grad_nhwc(dz, packed, 2, 3, 0)
    with pytest.raises(NotImplementedError, match="strided conv"):
        conv2d_input_grad_nhwc(dz, packed, 2, stride=3)
    with pytest.raises(NotImplementedError, match="strided conv"):
        conv2d_input_grad_nhwc(dz, packed, 2, 3, 0, stride=2)
    with pytest.raises(ValueError, match="in_size: expected the input"):
        conv2d_input_grad_nhwc(dz, packed, 2, stride=2)
    with pytest.raises(ValueError, match="in_size: expected the input"):
        conv2d_input_grad_nhwc(dz, packed, 2, in_size=(8, 8))
    # ceil(H / 2) x ceil(W / 2) must be dz's size: 7 or 8 rows give 4, 9 gives 5.
    with pytest.raises(ValueError, match=r"stride-2 conv over 9x8 has a 5x4 output gradient"):
        conv2d_input_grad_nhwc(dz, packed, 2, stride=2, in_size=(9, 8))
    with pytest.raises(ValueError, match="ksize: expected 1 or 3, got 5"):
        conv2d_input_grad_nhwc(dz, packed, 2, 5, 2)
    with pytest.raises(ValueError, match=r"expected a packed weight of shape \(27, C_out\)"):
        conv2d_input_grad_nhwc(dz, packed, 3)
    with pytest.raises(ValueError, match="dz: expected 3 channels"):
        conv2d_input_grad_nhwc(dz[..., :2], packed, 2)
    with pytest.raises(ValueError, match="4-D"):
        conv2d_input_grad_nhwc(dz[0], packed, 2)
    with pytest.raises(ValueError, match=r"shape \(2, C_out\).*got \(18, 3\)"):
        flip_conv_weight(packed, 2, 1)
    dy, packed_t = torch.randn(1, 4, 6, 3, device=device), torch.randn(5, 12, device=device)
    with pytest.raises(ValueError, match="even height and width"):
        conv_transpose2x2_input_grad_nhwc(dy[:, :3], packed_t)
    with pytest.raises(ValueError, match=r"\(C_in, 4 \* 3\)"):
        conv_transpose2x2_input_grad_nhwc(dy, packed_t[:, :8])
    with pytest.raises(ValueError, match="expected torch.float32"):
        conv_transpose2x2_input_grad_nhwc(dy, packed_t.double())
    with pytest.raises(ValueError, match=r"dy: expected shape \(1, 4, 6, C_out\)"):
        conv_transpose2x2_weight_grad_nhwc(torch.randn(1, 2, 3, 5, device=device), dy[:, :2])


def _relu_output(shape, dtype, device, channels_last=True):
    """A stored ReLU output with exact zeros, negatives (a map a ReLU never writes, still masked like torch's
    ``threshold_backward``), NaN and infinities: (N, H, W, C), contiguous or a permuted NCHW tensor."""
    a = torch.randn(shape)
    a[torch.rand(shape) < 0.25] = 0.0
    a[torch.rand(shape) < 0.05] = float("nan")
    a[torch.rand(shape) < 0.05] = float("inf")
    a[torch.rand(shape) < 0.05] = float("-inf")
    a = a.to(dtype).to(device)
    return a if channels_last else a.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)


def _masked(expected, a):
    """``torch.where(a <= 0, 0, g)`` in float64 on an NCHW gradient, ``a`` NHWC: threshold_backward's rule."""
    a = a.permute(0, 3, 1, 2).double().cpu()
    return torch.where(a <= 0, torch.zeros_like(expected), expected)


# (batch, c_in, c_out, height, width, stride, mask channels last)
MASKED_INPUT_GRAD_SHAPES = [
    pytest.param(2, 5, 7, 5, 7, 1, True, id="odd-5x7"),
    pytest.param(1, 17, 20, 4, 6, 1, False, id="mask-nchw"),
    pytest.param(2, 6, 9, 9, 7, 2, True, id="stride2-odd"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ksize", [3, 1])
@pytest.mark.parametrize(("batch", "c_in", "c_out", "height", "width", "stride", "last"), MASKED_INPUT_GRAD_SHAPES)
def test_masked_input_grad_matches_float64(device, dtype, ksize, batch, c_in, c_out, height, width, stride, last):
    """``grad_mask``: the input gradient with the ReLU derivative of the map the conv read, applied in the launch's
    epilogue, equals ``torch.where(a <= 0, 0, conv2d_input(...))`` in float64: zeros and negatives masked, NaN and
    inf in ``a`` pass the gradient; one launch, named ``+mask``."""
    if stride == 2 and ksize == 1:
        pytest.skip("the strided input gradient is the 3x3 down-sampling conv's")
    weight = torch.randn(c_out, c_in, ksize, ksize).to(dtype)
    out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
    dz = torch.randn(batch, c_out, out_h, out_w).to(dtype).to(device)
    a = _relu_output((batch, height, width, c_in), dtype, device, last)
    packed = pack_conv_weight(weight).to(device)
    a_before = a.clone()
    size = {"stride": 2, "in_size": (height, width)} if stride == 2 else {}
    with _common.launch_log() as records:
        dx = conv2d_input_grad_nhwc(dz.permute(0, 2, 3, 1), packed, c_in, ksize, ksize // 2, grad_mask=a, **size)
    assert torch.equal(a.nan_to_num(), a_before.nan_to_num()), "the mask was modified"
    assert [r.name.endswith("+mask") for r in records] == [True]
    w64, dz64 = weight.double(), dz.double().cpu()
    shape = (batch, c_in, height, width)
    extra = {"stride": stride} if stride == 2 else {}
    expected = torch.nn.grad.conv2d_input(shape, w64, dz64, padding=ksize // 2, **extra)
    bound = torch.nn.grad.conv2d_input(shape, w64.abs(), dz64.abs(), padding=ksize // 2, **extra)
    got = dx.permute(0, 3, 1, 2)
    assert (got.double().cpu()[_masked(torch.ones_like(expected), a) == 0] == 0).all()
    _check_stored(got, _masked(expected, a), bound, dtype)


@pytest.mark.parametrize("stride", [1, 2])
def test_masked_input_grad_on_tma_row_boxes(device, stride):
    """The mask on the TMA load path (row boxes, 16-byte aligned channels) as on the pointer path."""
    weight = torch.randn(16, 8, 3, 3)
    height, width = 9, 13
    dz = torch.randn(2, 16, (height - 1) // stride + 1, (width - 1) // stride + 1, device=device)
    a = _relu_output((2, height, width, 8), torch.float32, device)
    size = {"stride": 2, "in_size": (height, width)} if stride == 2 else {}
    with _common.load_path("tma"), _common.launch_log() as records:
        dx = conv2d_input_grad_nhwc(
            dz.permute(0, 2, 3, 1).contiguous(), pack_conv_weight(weight).to(device), 8, grad_mask=a, **size
        )
    assert [r.path for r in records] == ["tma"], records[0].path_reason
    extra = {"stride": 2} if stride == 2 else {}
    expected = torch.nn.grad.conv2d_input((2, 8, height, width), weight.double(), dz.double().cpu(), padding=1, **extra)
    bound = torch.nn.grad.conv2d_input(
        (2, 8, height, width), weight.double().abs(), dz.double().cpu().abs(), padding=1, **extra
    )
    _check_stored(dx.permute(0, 3, 1, 2), _masked(expected, a), bound, torch.float32)


def test_masked_transposed_input_grad_matches_float64(device):
    """The transposed conv's input gradient with the ReLU derivative of its input (the map it upsampled)."""
    x = _relu_output((2, 3, 5, 16), torch.float32, device)
    weight = torch.randn(16, 6, 2, 2)
    dy = torch.randn(2, 6, 6, 10, device=device)
    dx = conv_transpose2x2_input_grad_nhwc(dy.permute(0, 2, 3, 1), pack_conv_transpose_weight(weight).to(device), x)
    expected, _, _ = _transpose_grads(torch.zeros(2, 16, 3, 5), weight, torch.zeros(6), dy)
    bound, _, _ = _transpose_grads(torch.zeros(2, 16, 3, 5), weight.abs(), torch.zeros(6), dy.abs())
    _check_stored(dx.permute(0, 3, 1, 2), _masked(expected, x), bound, torch.float32)


# (batch, c_in, c_out, low_h, low_w, how dy arrives): odd low-resolution sizes, channels not multiples of 8; dy's
# channels (the 2x2 conv's input) under 16 take the packed (tap, channel) K axis.
TRANSPOSE_INPUT_GRAD_CASES = [
    pytest.param(2, 5, 7, 3, 5, "nchw", id="3x5-cout7-packed-nchw"),
    pytest.param(1, 20, 12, 5, 3, "slice", id="5x3-cout12-packed-slice"),
    pytest.param(1, 6, 20, 3, 1, "nchw", id="3x1-cout20-nchw"),
    pytest.param(2, 3, 17, 1, 3, "slice", id="1x3-cout17-slice"),
]


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "mask"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "c_in", "c_out", "low_h", "low_w", "layout"), TRANSPOSE_INPUT_GRAD_CASES)
def test_transposed_input_grad_is_one_2x2_stride2_conv(device, dtype, masked, batch, c_in, c_out, low_h, low_w, layout):
    """The transposed conv's input gradient against float64 autograd of ``F.conv_transpose2d``, with and without the
    ReLU derivative of its input (NaN, +-inf, +-0 in the mask): one launch of the forward conv kernel as a 2x2 conv
    with stride 2 (``conv2x2/2``, its 4 taps' multiply-adds, packed K under 16 channels), reading ``dy`` as training
    passes it (an NCHW tensor permuted to NHWC, or a channel slice of a wider NHWC map); two runs bitwise equal."""
    weight = torch.randn(c_in, c_out, 2, 2).to(dtype)
    if layout == "nchw":
        dy = torch.randn(batch, c_out, 2 * low_h, 2 * low_w).to(dtype).to(device).permute(0, 2, 3, 1)
    else:
        dy = torch.randn(batch, 2 * low_h, 2 * low_w, c_out + 9).to(dtype).to(device)[..., 5 : 5 + c_out]
    a = None
    if masked:
        a = _relu_output((batch, low_h, low_w, c_in), dtype, device)
        a.view(-1)[::7] = -0.0
    packed = pack_conv_transpose_weight(weight).to(device)
    before = [t.clone() for t in (dy, packed)]
    runs = []
    for _ in range(2):
        with _common.launch_log() as records:
            runs.append(conv_transpose2x2_input_grad_nhwc(dy, packed, a))
    dx = runs[0]
    assert all(torch.equal(t, b) for t, b in zip((dy, packed), before, strict=True)), "an input was modified"
    assert torch.equal(runs[0], runs[1])
    assert [r.name for r in records] == ["conv2x2/2+mask" if masked else "conv2x2/2"]
    assert records[0].constexprs["KSIZE"] == 2 and records[0].constexprs["PACKED_K"] == (c_out if c_out < 16 else 0)
    assert records[0].flops == 2 * batch * low_h * low_w * c_in * 4 * c_out
    assert dx.shape == (batch, low_h, low_w, c_in) and dx.dtype == dtype and dx.is_contiguous()
    zeros = torch.zeros(batch, c_in, low_h, low_w)
    dy_nchw = dy.permute(0, 3, 1, 2)
    expected, _, _ = _transpose_grads(zeros, weight, torch.zeros(c_out), dy_nchw)
    bound, _, _ = _transpose_grads(zeros, weight.abs(), torch.zeros(c_out), dy_nchw.abs())
    got = dx.permute(0, 3, 1, 2)
    if masked:
        expected = _masked(expected, a)
        assert (got.double().cpu()[_masked(torch.ones_like(expected), a) == 0] == 0).all()
    _check_stored(got, expected, bound, dtype)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize(("row", "col"), [(3, 5), (2, 4), (3, 4)], ids=["block-last", "block-first", "mixed"])
def test_transposed_input_grad_keeps_a_non_finite_dy_element_in_one_pixel(device, value, row, col):
    """``dy[2i + a, 2j + b]`` feeds input pixel (i, j) only: one NaN or infinity in ``dy`` makes exactly that pixel
    non-finite, where float64 autograd has it (no tap of zeros reads a neighbouring block: 0 * inf would be NaN)."""
    dy = torch.randn(2, 8, 12, 5, device=device)
    dy[1, row, col, 2] = value
    weight = torch.randn(6, 5, 2, 2)
    dx = conv_transpose2x2_input_grad_nhwc(dy, pack_conv_transpose_weight(weight).to(device))
    expected = torch.zeros(2, 4, 6, dtype=torch.bool)
    expected[1, row // 2, col // 2] = True
    reference, _, _ = _transpose_grads(torch.zeros(2, 6, 4, 6), weight, torch.zeros(5), dy.permute(0, 3, 1, 2))
    assert torch.equal((~reference.isfinite()).any(1), expected)
    assert torch.equal((~dx.isfinite()).any(-1).cpu(), expected)
    assert torch.equal(dx.isnan().cpu(), reference.permute(0, 2, 3, 1).isnan())


def test_masked_input_grads_are_bitwise_reproducible_and_only_mask(device):
    """Two runs give the same bits; where ``a > 0`` (or NaN) the masked gradient is the unmasked one bit for bit."""
    dz = torch.randn(2, 5, 7, 17, device=device).to(torch.bfloat16)
    packed = pack_conv_weight(torch.randn(17, 6, 3, 3)).to(device, torch.bfloat16)
    a = _relu_output((2, 5, 7, 6), torch.bfloat16, device)
    first, second = (conv2d_input_grad_nhwc(dz, packed, 6, grad_mask=a) for _ in range(2))
    assert torch.equal(first, second)
    plain = conv2d_input_grad_nhwc(dz, packed, 6)
    assert torch.equal(first, torch.where(a <= 0, torch.zeros_like(plain), plain))


def test_grad_mask_bad_arguments_are_refused(device):
    dz = torch.randn(1, 4, 4, 3, device=device)
    packed = torch.randn(9 * 2, 3, device=device)
    with pytest.raises(ValueError, match=r"grad_mask: expected the output's shape \(1, 4, 4, 2\)"):
        conv2d_input_grad_nhwc(dz, packed, 2, grad_mask=torch.zeros(1, 4, 4, 3, device=device))
    with pytest.raises(ValueError, match="grad_mask: expected torch.float32"):
        conv2d_input_grad_nhwc(dz, packed, 2, grad_mask=torch.zeros(1, 4, 4, 2, device=device, dtype=torch.float64))
    from fastunet.kernels.conv import conv2d_nhwc

    with pytest.raises(ValueError, match="grad_mask: a masked gradient fuses nothing else, got the relu activation"):
        conv2d_nhwc(dz, packed.T.contiguous().reshape(9 * 3, 2), grad_mask=torch.zeros(1, 4, 4, 2, device=device))


# TMA row boxes (sm_90; under the interpreter when asked for): NHWC maps with 16-byte aligned strides whose output
# rows are whole pixel blocks. (batch, c_in, height, width, c_out, splits):
TMA_CASES = [
    pytest.param((2, 16, 5, 16, 32, 3), id="16px-rows"),
    pytest.param((1, 8, 3, 64, 8, 2), id="64px-rows-narrow-channels"),  # BLOCK_C 16 over 8 channels: zero fill
    pytest.param((1, 24, 2, 128, 72, 1), id="128px-rows-partial-blocks"),  # 24 of 32 channels, 72 of 128 outputs
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("ksize", "padding"), [(3, 1), (1, 0)])
@pytest.mark.parametrize("case", TMA_CASES)
def test_tma_path_matches_float64(device, dtype, case, ksize, padding):
    """Both operands by TMA: the zero fill of boxes past the map's edges is the padding, and of channels past the
    map's own the masked columns; the result is checked against float64 like the pointer path's."""
    batch, c_in, height, width, c_out, splits = case
    torch.manual_seed(sum(case) + ksize)
    x = torch.randn(batch, height, width, c_in).to(dtype).to(device)  # contiguous NHWC
    dz = torch.randn(batch, height, width, c_out).to(dtype).to(device)
    with _common.load_path("tma"), _common.launch_log() as records:
        dw, db = conv2d_weight_grad_nhwc(x, dz, ksize, padding, splits=splits)
    (record,) = [r for r in records if r.name == "conv_weight_grad"]
    assert record.path == "tma" and record.constexprs["TMA"], record.path_reason
    expected, bound, db_expected, db_bound = _reference(x.permute(0, 3, 1, 2), dz.permute(0, 3, 1, 2), ksize, padding)
    _check(dw, expected, bound, dtype)
    _check(db, db_expected, db_bound, dtype)


def test_tma_path_propagates_nan_and_inf(device):
    x = torch.randn(1, 4, 16, 8, device=device)
    dz = torch.randn(1, 4, 16, 8, device=device)
    dz[0, 1, 1, 0] = float("nan")
    x[0, 2, 15, 1] = float("inf")  # the last column: a box one pixel to the right reads the zero fill beside it
    with _common.load_path("tma"), _common.launch_log() as records:
        dw, _ = conv2d_weight_grad_nhwc(x, dz)
    assert [r.path for r in records if r.name == "conv_weight_grad"] == ["tma"]
    x64, dz64 = x.permute(0, 3, 1, 2).double().cpu(), dz.permute(0, 3, 1, 2).double().cpu()
    expected = pack_conv_weight(torch.nn.grad.conv2d_weight(x64, (8, 8, 3, 3), dz64, padding=1))
    assert torch.equal(dw.cpu().isnan(), expected.isnan())
    assert torch.equal(dw.cpu().isinf(), expected.isinf())


@pytest.mark.parametrize(
    ("width", "channels", "contiguous", "reason"),
    [
        pytest.param(20, 16, True, "not whole 32-px blocks", id="partial-block"),
        pytest.param(16, 6, True, "multiples of 16 bytes", id="unaligned-channels"),
        pytest.param(16, 16, False, "not contiguous in its last dimension", id="nchw-view"),
    ],
)
def test_tma_path_falls_back_to_pointer_loads_with_a_reason(device, width, channels, contiguous, reason):
    """What a row box cannot take runs on pointer loads, and gives the same gradient."""
    torch.manual_seed(width + channels)
    x = torch.randn(2, 3, width, channels).to(torch.bfloat16).to(device)
    if not contiguous:
        x = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    dz = torch.randn(2, 3, width, 8).to(torch.bfloat16).to(device)
    with _common.load_path("tma"), _common.launch_log() as records:
        dw, db = conv2d_weight_grad_nhwc(x, dz)
    (record,) = [r for r in records if r.name == "conv_weight_grad"]
    assert record.path == "pointer" and reason in record.path_reason, record.path_reason
    expected, bound, db_expected, db_bound = _reference(x.permute(0, 3, 1, 2), dz.permute(0, 3, 1, 2), 3, 1)
    _check(dw, expected, bound, torch.bfloat16)
    _check(db, db_expected, db_bound, torch.bfloat16)


def test_interpreter_takes_pointer_loads_unless_tma_is_asked_for():
    if not _common.INTERPRET:
        pytest.skip("the interpreter's default path")
    x, dz = torch.randn(1, 2, 16, 16), torch.randn(1, 2, 16, 16)
    with _common.load_path("auto"), _common.launch_log() as records:
        conv2d_weight_grad_nhwc(x, dz)
    (record,) = [r for r in records if r.name == "conv_weight_grad"]
    assert record.path == "pointer" and "interpreter" in record.path_reason


# ---------------------------------------------------------------------------------------------------------------
# An input gradient through a normalized read: the input was read as act(z * scale + shift) in its first channels
# ---------------------------------------------------------------------------------------------------------------
def _norm_read_reference(z, scale, shift, activation, slope, lo, hi):
    """Float64 autograd of the read ``act(z * scale + shift)`` (z NHWC, scale and shift (N, C))."""
    u = z.double().cpu() * scale.double().cpu()[:, None, None, :] + shift.double().cpu()[:, None, None, :]
    if activation == "relu":
        return F.relu(u)
    if activation == "leaky_relu":
        return F.leaky_relu(u, slope)
    if activation == "clamp":
        return F.hardtanh(u, lo, hi)
    return u


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "clamp", "none"])
@pytest.mark.parametrize("c_up", [0, 3], ids=["one-source", "two-sources"])
def test_input_grad_through_a_normalized_read_matches_float64(device, dtype, activation, c_up):
    """The epilogue takes the input gradient of the read map's channels through the read (z's gradient ``act'(u) *
    dx * scale``) and sums ``g * z`` and ``g`` per image and channel (the scale's and shift's gradients); a second
    source's channels (a decoder conv's upsampled map) come out as the plain input gradient. Against float64
    autograd of the read and the conv, the bound that of the conv's sums (see :func:`_check`) carried through."""
    torch.manual_seed(31 + c_up)
    batch, height, width, c_norm, c_out = 2, 7, 9, 5, 6
    c_in = c_norm + c_up
    z = torch.randn(batch, height, width, c_norm).to(dtype)
    scale, shift = torch.randn(batch, c_norm) + 0.5, torch.randn(batch, c_norm)
    dz = torch.randn(batch, height, width, c_out).to(dtype)
    weight = torch.randn(c_out, c_in, 3, 3).to(dtype)
    read = NormIn(scale.to(device), shift.to(device), activation, 0.1, -0.4, 0.6)
    with _common.launch_log() as records:
        dx, d_scale, d_shift = conv2d_input_grad_nhwc(
            dz.to(device), pack_conv_weight(weight).to(device), c_in, grad_mask=z.to(device), grad_norm=read
        )  # fmt: skip
    assert [r.name for r in records] == ["conv3x3+norm_read"] + ["conv3x3+norm_read.sum"] * 2
    # Float64: the conv's input gradient (and its bound), then autograd through the read.
    w64, dz64 = weight.double(), dz.double().permute(0, 3, 1, 2)
    shape = (batch, c_in, height, width)
    d_in = torch.nn.grad.conv2d_input(shape, w64, dz64, padding=1).permute(0, 2, 3, 1)
    bound = torch.nn.grad.conv2d_input(shape, w64.abs(), dz64.abs(), padding=1).permute(0, 2, 3, 1)
    z64 = z.double().requires_grad_()
    s64, t64 = scale.double().requires_grad_(), shift.double().requires_grad_()
    a = _norm_read_reference(z64, s64, t64, activation, 0.1, -0.4, 0.6)
    expected_z, expected_s, expected_t = torch.autograd.grad(a, (z64, s64, t64), d_in[..., :c_norm])
    # act' is 0, the slope or 1, and the rows of g each an input gradient (fp32 sums of exact products).
    eps = 2**-10 if math_mode(dtype, device) == "tf32" else 2**-23
    g_bound = 64 * eps * bound[..., :c_norm]
    _check_stored(dx[..., :c_norm], expected_z, bound[..., :c_norm] * scale.double().abs()[:, None, None, :], dtype)
    _check_stored(dx[..., c_norm:], d_in[..., c_norm:], bound[..., c_norm:], dtype)
    zd = z.double().abs()
    for got, expected, tol in (
        (d_scale, expected_s, (g_bound * zd).sum((1, 2)) + 64 * 2**-23 * (d_in[..., :c_norm].abs() * zd).sum((1, 2))),
        (d_shift, expected_t, g_bound.sum((1, 2)) + 64 * 2**-23 * d_in[..., :c_norm].abs().sum((1, 2))),
    ):
        assert got.shape == (batch, c_norm) and got.dtype == torch.float32
        err = (got.double().cpu() - expected).abs()
        assert (err <= tol + 1e-30).all(), f"max error {err.max():.3e} against {tol.min():.3e}..{tol.max():.3e}"


def test_input_grad_through_a_normalized_read_keeps_torch_special_values(device):
    """inf and NaN in the gradient and a NaN in z reach what the unfused launches (the input gradient, then the read's
    backward, each checked against torch) give them, bit for bit in fp32: the masks are torch's, not a product with
    0 (``inf * 0`` would be NaN where ReLU's backward gives 0)."""
    from fastunet.kernels.norm_grad import norm_input_backward_nhwc

    torch.manual_seed(7)
    dz = torch.randn(2, 6, 8, 4, device=device)
    dz[0, 2, 3, 1], dz[1, 4, 5, 0] = float("inf"), float("nan")
    packed = pack_conv_weight(torch.randn(4, 5, 3, 3)).to(device)
    z = torch.randn(2, 6, 8, 5, device=device)
    z[1, 0, 0, 2] = float("nan")
    scale, shift = torch.randn(2, 5, device=device), torch.randn(2, 5, device=device)
    for activation in ("relu", "leaky_relu", "clamp"):
        read = NormIn(scale, shift, activation, 0.2, -0.3, 0.3)
        dx, d_scale, d_shift = conv2d_input_grad_nhwc(dz, packed, 5, grad_mask=z, grad_norm=read)
        plain = conv2d_input_grad_nhwc(dz, packed, 5)
        expected, e_scale, e_shift = norm_input_backward_nhwc(plain, z, scale, shift, activation, 0.2, -0.3, 0.3)
        assert torch.equal(dx.isnan(), expected.isnan()) and torch.equal(dx.isinf(), expected.isinf()), activation
        torch.testing.assert_close(dx, expected, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(d_scale, e_scale, rtol=1e-5, atol=1e-5, equal_nan=True)
        torch.testing.assert_close(d_shift, e_shift, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "clamp", "none"])
@pytest.mark.parametrize("c_up", [0, 3], ids=["one-source", "two-sources"])
def test_input_grad_writes_the_applied_read_as_the_normalize_launch_does(device, dtype, activation, c_up):
    """``grad_norm_applied``: the epilogue also writes the read's values ``act(z * scale + shift)`` (the weight
    gradient's operand), bit for bit what :func:`normalize_nhwc` writes from the same z (inf, NaN and a z laid out
    channels-first included), and the input gradient and the sums are the launch's without it, bit for bit."""
    from fastunet.kernels.stats import normalize_nhwc

    torch.manual_seed(41 + c_up)
    batch, height, width, c_norm, c_out = 2, 5, 7, 5, 4
    z = (torch.randn(batch, c_norm, height, width) * 3).to(dtype).to(device).permute(0, 2, 3, 1)  # channels-first
    z[0, 1, 2, 3], z[1, 4, 6, 0], z[1, 0, 0, 4] = float("nan"), float("inf"), -float("inf")
    scale = (torch.randn(batch, c_norm) + 0.5).to(device)
    shift = torch.randn(batch, c_norm).to(device)
    dz = torch.randn(batch, height, width, c_out).to(dtype).to(device)
    packed = pack_conv_weight(torch.randn(c_out, c_norm + c_up, 3, 3).to(dtype)).to(device)
    read = NormIn(scale, shift, activation, 0.1, -0.4, 0.6)
    with _common.launch_log() as records:
        dx, d_scale, d_shift, applied = conv2d_input_grad_nhwc(
            dz, packed, c_norm + c_up, grad_mask=z, grad_norm=read, grad_norm_applied=True
        )  # fmt: skip
    assert [r.name for r in records] == ["conv3x3+norm_read+applied"] + ["conv3x3+norm_read+applied.sum"] * 2
    assert applied.shape == (batch, height, width, c_norm) and applied.dtype == dtype and applied.is_contiguous()
    torch.testing.assert_close(applied, normalize_nhwc(z, read), rtol=0, atol=0, equal_nan=True)
    plain = conv2d_input_grad_nhwc(dz, packed, c_norm + c_up, grad_mask=z, grad_norm=read)
    for got, expected in zip((dx, d_scale, d_shift), plain, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


def test_input_grad_through_a_normalized_read_refuses_bad_arguments(device):
    dz = torch.randn(1, 4, 4, 3, device=device)
    packed = torch.randn(9 * 2, 3, device=device)
    z = torch.randn(1, 4, 4, 2, device=device)
    read = NormIn(torch.ones(1, 2, device=device), torch.zeros(1, 2, device=device), "relu")
    with pytest.raises(ValueError, match=r"z must be \(1, 4, 4, C_norm\) with 1 <= C_norm <= 2"):
        conv2d_input_grad_nhwc(dz, packed, 2, grad_mask=z[:, :3], grad_norm=read)
    with pytest.raises(ValueError, match=r"grad_norm normalization scale: expected float32 \(1, 2\)"):
        conv2d_input_grad_nhwc(dz, packed, 2, grad_mask=z, grad_norm=NormIn(read.scale[:, :1], read.shift, "relu"))
    with pytest.raises(ValueError, match="relu, leaky_relu, clamp or none, got 'silu'"):
        conv2d_input_grad_nhwc(dz, packed, 2, grad_mask=z, grad_norm=NormIn(read.scale, read.shift, "silu"))
    with pytest.raises(ValueError, match="plain stride-1 tiling, got a polyphase launch"):
        conv2d_input_grad_nhwc(
            dz, packed, 2, stride=2, in_size=(8, 8), grad_mask=torch.randn(1, 8, 8, 2), grad_norm=read
        )
    with pytest.raises(ValueError, match="grad_norm_applied: expected a bool, True only with grad_norm"):
        conv2d_input_grad_nhwc(dz, packed, 2, grad_norm_applied=True)
    with pytest.raises(ValueError, match="grad_norm_applied: expected a bool, True only with grad_norm"):
        conv2d_input_grad_nhwc(dz, packed, 2, grad_mask=z, grad_norm=read, grad_norm_applied=1)
