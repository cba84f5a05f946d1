"""Config choice: every autotuning candidate computes the same result; the tuner keeps the fastest per key."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from fastunet.kernels import _common, launch_log
from fastunet.kernels.conv import conv2d_nhwc, pack_conv_weight
from tolerances import assert_kernel_close, precision_key


@pytest.fixture
def fresh_tuning_cache(monkeypatch):
    monkeypatch.setattr(_common, "_tuned", {})


# (c_skip, c_up, c_out, up_mode, pool, head, load path: None for the process default)
CASES = [
    pytest.param(24, 0, 40, None, True, False, None, id="conv-pool"),
    pytest.param(16, 32, 24, "bilinear", False, False, None, id="bilinear-loader"),
    pytest.param(16, 0, 32, None, False, True, None, id="head"),
    # TMA row boxes admit 128 x 256 tiles on two warpgroups (the pointer path stays at 64 accumulators a thread)
    pytest.param(16, 0, 256, None, False, False, "tma", id="tma-wide"),
    pytest.param(16, 0, 256, None, True, False, "tma", id="tma-wide-pool"),
]


@pytest.mark.parametrize("c_skip, c_up, c_out, up_mode, pool, head, path", CASES)
def test_every_candidate_config_is_correct(device, fresh_tuning_cache, c_skip, c_up, c_out, up_mode, pool, head, path):
    batch, height, width = 2, 11, 10
    target = contextlib.nullcontext()
    if path == "tma":
        # 128-pixel tiles are candidates only where they leave no SM idle: a GPU gets a map of that many tiles, the
        # interpreter a modeled GPU of one SM.
        if device.type == "cuda":
            height, width = 64, 68
        else:
            target = _common.modeled_target(1)
    skip = torch.randn(batch, c_skip, height, width, device=device)
    low = torch.randn(batch, c_up, height // 2, width // 2, device=device) if c_up else None
    weight = torch.randn(c_out, c_skip + c_up, 3, 3, device=device) / (3 * (c_skip + c_up) ** 0.5)
    bias = torch.randn(c_out, device=device)
    head_w = torch.randn(3, c_out, 1, 1, device=device) if head else None
    head_b = torch.randn(3, device=device) if head else None
    x64 = skip.double().cpu()
    if low is not None:
        up = F.interpolate(low.double().cpu(), scale_factor=2, mode="bilinear")
        x64 = torch.cat([x64, F.pad(up, [0, 0, 0, 1])], dim=1)
    expected = F.conv2d(x64, weight.double().cpu(), bias.double().cpu(), padding=1).relu()
    if head:
        expected = F.conv2d(expected, head_w.double().cpu(), head_b.double().cpu())
    out = torch.full((batch, height, width, expected.shape[1]), float("nan"), device=device)
    seen = []

    def timer(fn):
        out.fill_(float("nan"))
        fn()
        assert_kernel_close(out.permute(0, 3, 1, 2), expected, 9 * (c_skip + c_up) + c_out,
                            precision_key(torch.float32, device))  # fmt: skip
        seen.append(len(seen))
        return -len(seen)  # the last candidate "wins"

    original = _common.choose_config

    def choose_with_timer(key, candidates, run, timer_=None):
        return original(key, candidates, run, timer=timer)

    kwargs = {"up": low.permute(0, 2, 3, 1), "up_mode": up_mode} if low is not None else {}
    if head:
        kwargs |= {"head_weight": pack_conv_weight(head_w), "head_bias": head_b}
    context = _common.load_path(path) if path else contextlib.nullcontext()
    skip_nhwc = skip.permute(0, 2, 3, 1)
    if path == "tma":  # a descriptor needs a unit channel stride and 16-byte aligned row strides
        skip_nhwc = skip_nhwc.contiguous()
    with pytest.MonkeyPatch.context() as patch, context, target, _common.autotuning(), launch_log() as records:
        patch.setattr("fastunet.kernels.conv.choose_config", choose_with_timer)
        conv2d_nhwc(skip_nhwc, pack_conv_weight(weight), bias, pool=pool, out=out, **kwargs)
    assert len(seen) >= 2, "expected more than one candidate config"
    (record,) = [r for r in records if r.name.startswith("conv")]  # the bilinear case also launches an upsample
    if path == "tma":
        assert record.path == "tma", record.path_reason
        tiles = {(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"]) for c in record.candidates}
        assert (128, 256, 8) in tiles, sorted(tiles)
    (winner,) = _common.tuned_configs().values()
    assert record.launch_options == {"num_warps": winner["num_warps"], "num_stages": winner["num_stages"]}
    assert record.constexprs["BLOCK_M"] == winner["BLOCK_M"]
    assert_kernel_close(out.permute(0, 3, 1, 2), expected, 9 * (c_skip + c_up) + c_out,
                        precision_key(torch.float32, device))  # fmt: skip


def test_tuning_is_off_by_default_and_cached(fresh_tuning_cache):
    calls = []

    def run(config):
        calls.append(config)

    candidates = [{"id": 0}, {"id": 1}, {"id": 2}]
    assert _common.choose_config(("k",), candidates, run, timer=lambda fn: fn() or 1.0) == {"id": 0}
    assert calls == []
    with _common.autotuning():
        times = iter([3.0, 1.0, 2.0])
        best = _common.choose_config(("k",), candidates, run, timer=lambda fn: fn() or next(times))
        assert best == {"id": 1} and len(calls) == 3
        assert _common.choose_config(("k",), candidates, run, timer=lambda fn: 1 / 0) == {"id": 1}


def test_tuner_skips_candidates_that_cannot_launch(fresh_tuning_cache):
    """A candidate asking for more shared memory than the GPU has is dropped, not fatal."""
    from triton.runtime.errors import OutOfResources

    def run(config):
        if config["id"] != 1:
            raise OutOfResources(300_000, 232_448, "shared memory")

    candidates = [{"id": 0}, {"id": 1}]
    with _common.autotuning():
        assert _common.choose_config(("oor",), candidates, run, timer=lambda fn: fn() or 1.0) == {"id": 1}
        with pytest.raises(RuntimeError, match="no candidate config could be launched"):
            _common.choose_config(("oor2",), [{"id": 0}, {"id": 2}], run, timer=lambda fn: fn() or 1.0)


def test_preferring_a_candidate(device, fresh_tuning_cache):
    """``preferring(key)`` launches the first candidate that sets ``key`` where a launch has one (split K for a
    layer with fewer tiles than SMs; a persistent grid on TMA loads where tiles outnumber the programs), the
    heuristic's tile elsewhere; the results agree with float64 either way."""
    x = torch.randn(1, 128, 3, 64, device=device)  # one 64-pixel TMA row box a row
    weight = torch.randn(32, 128, 3, 3, device=device) / 34
    bias = torch.randn(32, device=device)
    expected = F.conv2d(x.double().cpu(), weight.double().cpu(), bias.double().cpu(), padding=1).relu()
    x_nhwc = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    cases = [
        ("SPLIT_K", contextlib.nullcontext(), lambda r: r.constexprs["SPLIT_K"] == 2),
        ("PROGRAMS_PER_SM", contextlib.nullcontext(), lambda r: not r.persistent),  # pointer loads: none
        ("PROGRAMS_PER_SM", _common.load_path("tma"), lambda r: r.persistent),
    ]
    for key, path, chosen in cases:
        target = _common.modeled_target(1) if key == "PROGRAMS_PER_SM" else contextlib.nullcontext()
        with path, target, _common.preferring(key), launch_log() as records:
            y, _ = conv2d_nhwc(x_nhwc, pack_conv_weight(weight), bias)
        if device.type == "cuda" and key == "PROGRAMS_PER_SM":
            assert records[0].persistent == (records[0].path == "tma" and records[0].persistent_tiles > 0)
        else:
            assert chosen(records[0]), (key, records[0].constexprs, records[0].candidates)
        assert_kernel_close(y.permute(0, 3, 1, 2), expected, 9 * 128, precision_key(torch.float32, device))
    with launch_log() as records:
        conv2d_nhwc(x_nhwc, pack_conv_weight(weight), bias)
    assert records[0].constexprs["SPLIT_K"] == 1 and not records[0].persistent and len(records) == 1
