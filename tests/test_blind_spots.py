"""Checks for faults that the rest of the suite did not notice when they were introduced by mutation testing.

* backward after a forward under ``torch.autocast`` (the reference recompute must run under the same autocast);
* every autotuning candidate of the fused head holds all of a pixel's channels in one tile;
* NaN through ReLU, pooling, upsampling and the head with the GPU's ``tl.maximum``/``tl.minimum`` (the interpreter
  runs them as ``np.maximum``/``np.minimum``, which keep a NaN that compiled code drops);
* the small-K loader's register budget in the tile choice, checked on the sm_90 build;
* ``fold_batchnorm`` against ``F.batch_norm`` with an ``eps`` comparable to the running variance.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from milesial_layout import MilesialUNet
from torch import nn

import fastunet
from fastunet import FastUNet, UNet
from fastunet.kernels import INTERPRET, _common
from fastunet.kernels.conv import ConvProblem, candidate_configs, conv2d_nhwc, pack_conv_weight
from fastunet.ops import fold_batchnorm
from fastunet.parity import randomize_norm_stats
from fastunet.reference import center_pad
from interpreter_patch import patched_builder
from tolerances import assert_kernel_close, precision_key


def nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1)


def nchw(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------------------------
# Backward after an autocast forward
# ---------------------------------------------------------------------------------------------------------------
def _autocast_pair(which: str, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(fused model, reference model) with equal parameters and BatchNorm statistics but no shared tensors."""
    if which == "fastunet":
        config = {"in_channels": 3, "num_classes": 2, "base_channels": 4, "depth": 2, "norm": "batch"}
        reference = UNet(**config, upsample="bilinear")
        randomize_norm_stats(reference)
        fast = FastUNet(**config, upsample="bilinear")
        fast.load_state_dict(reference.state_dict(), strict=True)
    else:
        reference = MilesialUNet(3, 2, True, width=4, depth=2)
        randomize_norm_stats(reference)
        fast = fastunet.convert(copy.deepcopy(reference).to(device).eval())
    return fast.to(device).eval(), reference.to(device).eval()


@pytest.mark.parametrize("which", ["fastunet", "converted"])
def test_backward_after_an_autocast_forward(device, which):
    """The forward runs in float16 under autocast; the backward runs under the same precision (the kernels' backward
    on float16 maps; a recompute of the reference would meet a float16 input and float32 weights and fail with
    autocast off). Every gradient is as close to the float64 model's as eager autocast's own (at most twice its
    error, plus a floor). float16, not bfloat16: with bfloat16's 8-bit mantissa the ReLU masks of this tiny
    network's 3x2 bottleneck flip by chance, and single gradients land 1-70% off float64 for eager autocast too,
    depending on the seed (tests/test_training.py checks bfloat16 autocast where both sides round alike)."""
    fast, reference = _autocast_pair(which, device)
    exact_model = copy.deepcopy(reference).cpu().double()
    x = torch.randn(2, 3, 12, 10, device=device)
    grad = torch.randn(2, 2, 12, 10, device=device).to(torch.float16)
    found = []
    for model in (fast, reference):
        x_in = x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.float16):
            out = model(x_in)
        assert out.dtype == torch.float16
        out.backward(grad)
        found.append({"input": x_in.grad, **{name: p.grad for name, p in model.named_parameters()}})
    x_in = x.cpu().double().requires_grad_()
    exact_model(x_in).backward(grad.cpu().double())
    found.append({"input": x_in.grad, **{name: p.grad for name, p in exact_model.named_parameters()}})
    assert fast.last_backend in ("triton", "triton-interpreter"), fast.last_backend_reason
    ours, eager, exact = found
    assert ours.keys() == eager.keys() == exact.keys()
    for name, expected in exact.items():
        assert ours[name] is not None and ours[name].dtype == eager[name].dtype, name
        error, eager_error = (
            float((t.double().cpu() - expected).norm() / expected.norm()) for t in (ours[name], eager[name])
        )
        assert error <= 2 * eager_error + 1e-3, (name, error, eager_error)


# ---------------------------------------------------------------------------------------------------------------
# Every autotuning candidate of the fused head holds all its channels
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("c_out", [65, 72, 100, 128])
@pytest.mark.parametrize("m", [64, 4096, 1 << 20])
def test_head_candidates_keep_a_pixel_in_one_tile(c_out, m):
    """The head's logits sum over all of a pixel's channels inside one tile: a narrower candidate would write
    partial sums (and several tiles would write the same logits)."""
    problem = ConvProblem(m=m, c_out=c_out, c_main=32, c_up=0, element_size=2, head=True)
    candidates = candidate_configs(problem)
    narrow = [config for config in candidates if config["BLOCK_N"] < c_out]
    assert not narrow, f"{len(narrow)} of {len(candidates)} candidates split {c_out} channels: {narrow}"


@pytest.fixture
def fresh_tuning_cache(monkeypatch):
    monkeypatch.setattr(_common, "_tuned", {})


@pytest.mark.parametrize("c_mid", [72, 128])
def test_every_head_candidate_matches_float64(device, fresh_tuning_cache, c_mid):
    """Autotuning times every candidate; each one must write the right logits (run through the tuner, as a GPU
    run with FASTUNET_AUTOTUNE=1 would)."""
    batch, c_in, height, width, n_cls = 1, 16, 8, 8, 3
    x = torch.randn(batch, c_in, height, width)
    weight = torch.randn(c_mid, c_in, 3, 3) / math.sqrt(9 * c_in)
    bias = torch.randn(c_mid) * 0.1
    head_w = torch.randn(n_cls, c_mid, 1, 1) / math.sqrt(c_mid)
    head_b = torch.randn(n_cls) * 0.1
    features = F.conv2d(x.double(), weight.double(), bias.double(), padding=1).relu()
    expected = F.conv2d(features, head_w.double(), head_b.double())
    logits = torch.full((batch, n_cls, height, width), float("nan"), device=device)
    ran: list[dict] = []
    offered: list[dict] = []

    def timer(fn):
        logits.fill_(float("nan"))
        fn()
        try:
            assert_kernel_close(logits, expected, 9 * c_in + c_mid, precision_key(torch.float32, device))
        except AssertionError as error:
            raise AssertionError(f"candidate {ran[-1]}: {error}") from None
        return float(len(ran))

    original = _common.choose_config

    def choose_with_timer(key, candidates, run, timer_=None):
        offered.extend(candidates)

        def recorded(config):
            ran.append(config)
            return run(config)

        return original(key, candidates, recorded, timer=timer)

    with pytest.MonkeyPatch.context() as patch, _common.autotuning():
        patch.setattr("fastunet.kernels.conv.choose_config", choose_with_timer)
        conv2d_nhwc(
            nhwc(x.to(device)), pack_conv_weight(weight.to(device)), bias.to(device),
            head_weight=pack_conv_weight(head_w.to(device)), head_bias=head_b.to(device), out=nhwc(logits),
        )  # fmt: skip
    assert len(ran) >= 2 and ran == offered
    assert_kernel_close(logits, expected, 9 * c_in + c_mid, precision_key(torch.float32, device))


# ---------------------------------------------------------------------------------------------------------------
# NaN with the GPU's maximum/minimum
# ---------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def gpu_nan_rules() -> Iterator[None]:
    """Compiled ``tl.maximum``/``tl.minimum`` lower to maxnum/minnum, which return the other operand when one is
    NaN; the interpreter runs them as ``np.maximum``/``np.minimum``, which return the NaN. Under the interpreter,
    swap in ``np.fmax``/``np.fmin`` (the GPU's rule) for the duration; a GPU needs nothing."""
    if not INTERPRET:
        yield
        return
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    replacements = {
        "create_maxnumf": lambda lhs, rhs: builder.binary_op(lhs, rhs, np.fmax),
        "create_minnumf": lambda lhs, rhs: builder.binary_op(lhs, rhs, np.fmin),
    }
    with patched_builder(replacements):
        yield


@pytest.fixture
def gpu_nan_semantics():
    with gpu_nan_rules():
        yield


# The interpreter's max reduction (the pool) is np.nanmax, which warns on an all-NaN window.
all_nan_windows = pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")


@triton.jit
def _max_min_kernel(x_ptr, max_ptr, min_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(max_ptr + offs, tl.maximum(x, 0.0))
    tl.store(min_ptr + offs, tl.minimum(x, 0.0))


def _max_min(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    high, low = torch.empty_like(x), torch.empty_like(x)
    with _common.launch_guard(x):
        _max_min_kernel[(1,)](x, high, low, BLOCK=x.numel())
    return high, low


def test_gpu_nan_rules_drop_nan_in_maximum_and_minimum(device):
    """The fixture gives the compiled rule, and gives the interpreter back its own afterwards."""
    x = torch.tensor([float("nan"), -1.0, 2.0, float("nan")] * 4, device=device)
    with gpu_nan_rules():
        high, low = _max_min(x)
    assert high.tolist() == [0.0, 0.0, 2.0, 0.0] * 4
    assert low.tolist() == [0.0, -1.0, 0.0, 0.0] * 4
    if INTERPRET:
        high, _ = _max_min(x)
        assert high.isnan().sum() == 8, "the interpreter's own rule was not restored"


def assert_same_special_values(out: torch.Tensor, expected: torch.Tensor) -> None:
    out = out.detach().double().cpu()
    assert expected.isnan().any(), "the case has no NaN to follow"
    assert torch.equal(out.isnan(), expected.isnan()), (
        f"NaN at {int(out.isnan().sum())} positions, torch has {int(expected.isnan().sum())}"
    )
    finite = expected.isfinite()
    assert torch.isfinite(out[finite]).all()


@all_nan_windows
@pytest.mark.parametrize("c_in", [4, 32], ids=["small-k", "main-loop"])
def test_nan_through_conv_relu_and_pool(device, gpu_nan_semantics, c_in):
    x = torch.randn(1, c_in, 8, 9)
    x[0, 1, 2, 3] = float("nan")
    x[0, 3, 6, 8] = float("nan")
    weight = torch.randn(16, c_in, 3, 3) / math.sqrt(9 * c_in)
    bias = torch.randn(16) * 0.1
    y, pooled = conv2d_nhwc(nhwc(x.to(device)), pack_conv_weight(weight.to(device)), bias.to(device), pool=True)
    expected = F.conv2d(x.double(), weight.double(), bias.double(), padding=1).relu()
    assert_same_special_values(nchw(y), expected)
    assert_same_special_values(nchw(pooled), F.max_pool2d(expected, 2))


@pytest.mark.parametrize(
    "mode, align_corners",
    [("direct", False), ("nearest", False), ("bilinear", False), ("bilinear", True)],
    ids=["direct", "nearest", "bilinear", "bilinear-align-corners"],
)
def test_nan_through_the_upsampling_loader(device, gpu_nan_semantics, mode, align_corners):
    skip = torch.randn(1, 16, 9, 8)
    low = torch.randn(1, 16, *((8, 7) if mode == "direct" else (4, 4)))
    low[0, 2, 1, 2] = float("nan")
    skip[0, 5, 7, 1] = float("nan")
    weight = torch.randn(16, 32, 3, 3) / math.sqrt(9 * 32)
    bias = torch.randn(16) * 0.1
    y, _ = conv2d_nhwc(
        nhwc(skip.to(device)), pack_conv_weight(weight.to(device)), bias.to(device), up=nhwc(low.to(device)),
        up_mode=mode, align_corners=align_corners,
    )  # fmt: skip
    if mode == "direct":
        up = low.double()
    else:
        kwargs = {"align_corners": align_corners} if mode == "bilinear" else {}
        up = F.interpolate(low.double(), scale_factor=2, mode=mode, **kwargs)
    concatenated = torch.cat([skip.double(), center_pad(up, 9, 8)], dim=1)
    assert_same_special_values(nchw(y), F.conv2d(concatenated, weight.double(), bias.double(), padding=1).relu())


@pytest.mark.parametrize("n_cls", [1, 3])
def test_nan_through_the_fused_head(device, gpu_nan_semantics, n_cls):
    x = torch.randn(2, 8, 5, 6)
    x[1, 4, 0, 5] = float("nan")
    weight = torch.randn(32, 8, 3, 3) / math.sqrt(72)
    bias = torch.randn(32) * 0.1
    head_w = torch.randn(n_cls, 32, 1, 1) / math.sqrt(32)
    head_b = torch.randn(n_cls) * 0.1
    logits, _ = conv2d_nhwc(
        nhwc(x.to(device)), pack_conv_weight(weight.to(device)), bias.to(device),
        head_weight=pack_conv_weight(head_w.to(device)), head_bias=head_b.to(device),
    )  # fmt: skip
    features = F.conv2d(x.double(), weight.double(), bias.double(), padding=1).relu()
    assert_same_special_values(nchw(logits), F.conv2d(features, head_w.double(), head_b.double()))


@all_nan_windows
def test_nan_through_the_network(device, gpu_nan_semantics):
    """End to end (encoder, pool, transposed conv, decoder, fused head): NaN where the reference puts it, and only
    there (the map is larger than the NaN's receptive field)."""
    reference = UNet(3, 2, base_channels=4, depth=1).eval()
    fast = FastUNet(3, 2, base_channels=4, depth=1).eval()
    fast.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, 24, 21)
    x[0, 1, 2, 19] = float("nan")
    with torch.no_grad():
        out = fast.to(device)(x.to(device))
        expected = reference.double()(x.double())
    assert fast.last_backend in ("triton", "triton-interpreter")
    assert not expected.isnan().all()
    assert_same_special_values(out, expected)


# ---------------------------------------------------------------------------------------------------------------
# The small-K loader's register budget: the chosen tile, built for sm_90
# ---------------------------------------------------------------------------------------------------------------
_SMALL_K_BUILD = textwrap.dedent(
    """
    import json, sys
    from fastunet.tooling.compile_report import collect_variants, compile_variant, trace_for_target
    from fastunet.tooling.dtypes import torch_dtype

    rows = []
    for dtype in sys.argv[1:]:
        for batch in (16, 1):
            records = [r for r in trace_for_target("transpose", torch_dtype(dtype), batch) if r.constexprs["PACKED_K"]]
            for variant in collect_variants([(f"{dtype}/b{batch}", records)]):
                row = compile_variant(variant, 90)
                rows.append({"label": f"{dtype}/b{batch}", "registers": row.registers, "spill_bytes": row.spill_bytes,
                             "local_ops": row.local_ops, "num_warps": row.num_warps, "tile": {k: row.constexprs[k]
                             for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}})
    print(json.dumps(rows))
    """
)


def test_small_k_tile_builds_without_hitting_the_register_ceiling():
    """The first conv (3 input channels) runs the small-K loader, whose per-element addresses take twice the
    registers of the main loader. Its tile, as the reference network chooses it, must build for sm_90 below the
    255-register ceiling and without spills: a budget that ignores the doubled loader state picks a 128-pixel tile
    on one warpgroup, which ptxas squeezes into exactly 255 registers.

    Compiled in a subprocess with TRITON_INTERPRET unset (the interpreter compiles nothing)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _SMALL_K_BUILD, "fp16", "bf16", "fp32"], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"sm_90 build failed:\n{proc.stdout}\n{proc.stderr}"
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {row["label"] for row in rows} == {f"{d}/b{b}" for d in ("fp16", "bf16", "fp32") for b in (16, 1)}
    too_many = [row for row in rows if not 0 < row["registers"] < 255 or row["spill_bytes"] or row["local_ops"]]
    assert not too_many, too_many


# ---------------------------------------------------------------------------------------------------------------
# BatchNorm folding
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "conv_bias, affine",
    [(True, True), (False, True), (True, False)],
    ids=["conv-bias", "no-conv-bias", "no-affine"],
)
def test_fold_batchnorm_matches_batch_norm(conv_bias, affine):
    """conv + eval BatchNorm == conv with the folded weight and bias, in float64. The running variances are of the
    order of ``eps``, so a fold without ``eps`` (or with it in the wrong place) is off by far more than rounding."""
    generator = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(5, 7, 3, padding=1, bias=conv_bias).double()
    norm = nn.BatchNorm2d(7, eps=1e-2, affine=affine).double().eval()
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn(7, generator=generator, dtype=torch.float64))
        norm.running_var.copy_(torch.rand(7, generator=generator, dtype=torch.float64) * 4e-2 + 5e-3)
        if affine:
            norm.weight.copy_(torch.randn(7, generator=generator, dtype=torch.float64))
            norm.bias.copy_(torch.randn(7, generator=generator, dtype=torch.float64))
    x = torch.randn(2, 5, 6, 7, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        expected = F.batch_norm(
            conv(x), norm.running_mean, norm.running_var, norm.weight, norm.bias, training=False, eps=norm.eps
        )
        weight, bias = fold_batchnorm(conv, norm)
        folded = F.conv2d(x, weight, bias, padding=1)
    assert weight.dtype == bias.dtype == torch.float64
    torch.testing.assert_close(folded, expected, rtol=1e-12, atol=1e-12)


def test_fold_without_batchnorm_is_the_conv():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    weight, bias = fold_batchnorm(conv, None)
    assert torch.equal(weight, conv.weight.detach().double())
    assert torch.equal(bias, torch.zeros(6, dtype=torch.float64))
