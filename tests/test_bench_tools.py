"""The benchmark tools that run without a GPU: the suite's collection, the compile report's schema and occupancy,
the per-stage roofline report against hand counts, the PNG writer, and the GPU timing run's plumbing on fake
timings."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from fastunet import model as fastunet_model
from fastunet.tooling import providers
from fastunet.tooling import timing as run_gpu
from fastunet.tooling.compile_report import occupancy
from fastunet.tooling.roofline import H100, H200, roofline_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def bench_path(monkeypatch):
    """The scripts of ``bench/`` (plots, suite record) importable as modules, for this test only."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))


# -- the benchmark suite without CUDA: collected, then skipped ---------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the suite's behaviour without CUDA")
def test_bench_suite_collects_and_skips_without_cuda():
    command = [sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    tail = proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail  # 5 would mean nothing was collected
    summary = re.search(r"(\d+) skipped", proc.stdout)
    assert summary and int(summary.group(1)) > 100, tail
    assert not re.search(r"\d+ (passed|failed|error)", proc.stdout), tail


# -- occupancy as the chip allocates it ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("registers", "warps", "smem_kib", "blocks", "limited_by"),
    [
        # 186 regs -> 192 x 32 = 6144 a warp; 16384 a partition holds 2 warps; 4 partitions: 8 warps = 1 CTA of 8.
        # smem: (112 + 1) KiB per CTA -> 2 fit in 228 KiB.
        pytest.param(186, 8, 112, 1, "registers", id="bilinear-up-tile"),
        # 128 regs -> 4096 a warp: 4 per partition, 16 warps = 2 CTAs; smem (96 + 1) KiB -> 2 (registers first).
        pytest.param(128, 8, 96, 2, "registers", id="conv-128x128"),
        # 99 regs round to 104: 3328 a warp, 4 per partition: 2 CTAs of 8 warps; smem 21 KiB -> 10.
        pytest.param(99, 8, 20, 2, "registers", id="small-k"),
        # 246 regs -> 248 x 32 = 7936: 2 per partition, 8 warps = 2 CTAs of 4; smem (120 + 1) KiB -> 1.
        pytest.param(246, 4, 120, 1, "shared memory", id="smem-bound"),
        # 16 regs, 1 warp, no smem: 128 CTAs by registers, 64 by warps, 32 by the CTA limit.
        pytest.param(16, 1, 0, 32, "blocks", id="cta-limit"),
        # 32 regs, 2 warps: 64 warps by registers = 32 CTAs, 32 by warps, 32 by the CTA limit: registers first.
        pytest.param(32, 2, 0, 32, "registers", id="tie"),
        # 230 KiB is over the 227 KiB a launch may ask for.
        pytest.param(64, 4, 230, 0, "launch fails", id="too-much-smem"),
    ],
)
def test_occupancy_hand_counts(registers, warps, smem_kib, blocks, limited_by):
    found = occupancy(90, registers, warps, smem_kib * 1024)
    assert (found.blocks_per_sm, found.limited_by) == (blocks, limited_by)
    assert found.warps_per_sm == blocks * warps and found.fraction == pytest.approx(blocks * warps / 64)
    assert occupancy(75, registers, warps, 0) is None  # no table for that target


# -- bench.compile_report: the schema on a cheap configuration ---------------------------------------------
@pytest.mark.tooling
def test_bench_compile_report_schema(tmp_path):
    """``python -m bench.compile_report`` from the repository root compiles for sm_90 (no GPU) and writes, per
    variant, kernel, config, registers, spills, shared memory, tensor-core instructions, occupancy and the issue
    figures of its main loop, and the modeled forward of each configuration."""
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "bench.compile_report", "--arch", "sm_90", "--dtype", "fp16", "--batch", "1"]
    command += ["--size", "16", "--base-channels", "8", "--depth", "1", "--json", str(out)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 1) and out.exists(), proc.stdout + proc.stderr
    assert "CTA/SM" in proc.stdout and "built, not run" in proc.stdout
    report = json.loads(out.read_text())
    assert report["arch"] == "sm_90" and report["configuration"]["dtypes"] == ["fp16"]
    variants = report["variants"]
    # depth 1: enc0 (conv, conv+pool), bottleneck (2 convs), dec0 (upsample, conv+up, conv+head).
    assert sum(v["launches"] for v in variants) == 7 and len(variants) >= 5
    (upsample,) = [v for v in variants if v["kernel"] == "upsample2x"]
    assert upsample["tensor_core_instructions"] == 0 and not upsample["loops"] and upsample["spill_bytes"] == 0
    for v in variants:
        if v is upsample:
            continue
        assert list(v)[:12] == ["kernel", "config", "registers", "spill_bytes", "shared_bytes",
                                "tensor_core_instructions", "occupancy", "issue_ratio", "mainloop_instructions",
                                "tma_loads", "cp_async", "arch"]  # fmt: skip
        assert v["arch"] == "sm_90" and v["loops"] and v["issue_ratio"] > 0 and v["mainloop_instructions"] > 0
        # The main loop loads its operands (tiles this small take plain loads, not cp.async).
        assert all(loop["cp_async"] + loop["tma_loads"] + loop["global_loads"] > 0 for loop in v["loops"])
        assert v["kernel"].startswith("conv3x3")
        assert {"BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"} <= set(v["config"])
        assert 0 < v["registers"] <= 255 and v["spill_bytes"] >= 0 and v["shared_bytes"] > 0
        assert v["tensor_core_instructions"] == v["hgmma"] + v["hmma"] > 0
        expected = occupancy(90, v["registers"], v["config"]["num_warps"], v["shared_bytes"])
        assert v["occupancy"] == expected.to_json()
    (model,) = report["model"]
    assert {k: model[k] for k in ("dtype", "batch")} == {"dtype": "fp16", "batch": 1} and len(model["layers"]) == 7
    assert model["ms"] == pytest.approx(sum(layer["time_us"] for layer in model["layers"]) / 1e3, rel=1e-3)
    # GFLOP per ms is TFLOP/s.
    assert model["fraction_of_peak"] == pytest.approx(model["gflop"] / model["ms"] / 790, rel=1e-3)
    assert "MODEL forward" in proc.stdout and "not a measurement" in proc.stdout


# -- the per-stage roofline report: hand counts for a tiny U-Net ---------------------------------------------------
def test_roofline_report_stage_by_stage_hand_count():
    """in 3, classes 2, base 4, depth 1, bilinear, fp16, input 1x3x8x8.

    Fused launches (element counts, 2 bytes each), FLOPs = 2 * N*H*W * Cout * 9 * Cin (+ 2 * N*H*W * Cout * classes
    for the fused head):
      enc0.conv1: 8x8, 3 -> 4;   enc0.conv2 (+pool): 8x8, 4 -> 4, pooled 4x4x4;
      bottleneck.conv1: 4x4, 4 -> 8;  bottleneck.conv2: 4x4, 8 -> 8;
      dec0.up: 4x4x8 -> 8x8x8 (data movement, no FLOPs);
      dec0.conv1: 8x8, skip 4 + upsampled 8 -> 4;  dec0.conv2 (+head): 8x8, 4 -> 4 -> 2 logits.
    Floor of a launch = max(FLOPs / peak, bytes / bandwidth); the network floor is their sum.
    """
    e, hw, low = 2, 64, 16
    fused = {  # stage: (flops, elements read, elements written)
        "enc0.conv1": (2 * hw * 4 * 9 * 3, hw * 3 + 9 * 3 * 4 + 4, hw * 4),
        "enc0.conv2": (2 * hw * 4 * 9 * 4, hw * 4 + 9 * 4 * 4 + 4, hw * 4 + low * 4),
        "bottleneck.conv1": (2 * low * 8 * 9 * 4, low * 4 + 9 * 4 * 8 + 8, low * 8),
        "bottleneck.conv2": (2 * low * 8 * 9 * 8, low * 8 + 9 * 8 * 8 + 8, low * 8),
        "dec0.up": (0, low * 8, hw * 8),
        "dec0.conv1": (2 * hw * 4 * 9 * 12, hw * 4 + hw * 8 + 9 * 12 * 4 + 4, hw * 4),
        "dec0.conv2": (2 * hw * 4 * 9 * 4 + 2 * hw * 4 * 2, hw * 4 + 9 * 4 * 4 + 4 + 4 * 2 + 2, hw * 2),
    }
    # Eager kernels per stage: (flops, elements read, elements written). Conv, bias add, ReLU; pool writes values
    # and int64 indices (4 elements of 2 bytes each); the decoder upsamples, then concatenates before its conv.
    conv = lambda n_out, c_in, c_out, taps=9: [  # noqa: E731
        (2 * n_out * c_out * taps * c_in, n_out // c_out * c_in + taps * c_in * c_out, n_out),
        (0, n_out + c_out, n_out),
        (0, n_out, n_out),
    ]
    eager = {
        "enc0.conv1": conv(hw * 4, 3, 4),
        "enc0.conv2": [*conv(hw * 4, 4, 4), (0, hw * 4, low * 4 + low * 4 * 4)],
        "bottleneck.conv1": conv(low * 8, 4, 8),
        "bottleneck.conv2": conv(low * 8, 8, 8),
        "dec0.up": [(0, low * 8, hw * 8)],
        "dec0.conv1": [(0, hw * 4 + hw * 8, hw * 12), *conv(hw * 4, 12, 4)],
        "dec0.conv2": [*conv(hw * 4, 4, 4), *conv(hw * 2, 4, 2, taps=1)[:2]],
    }
    report = roofline_report(
        {"in_channels": 3, "num_classes": 2, "base_channels": 4, "depth": 1, "upsample": "bilinear"},
        (1, 3, 8, 8),
        torch.float16,
        ceilings=(H100, H200),
    )
    assert [row["stage"] for row in report["stages"]] == list(fused)
    totals = {c.name: 0.0 for c in (H100, H200)}
    for row in report["stages"]:
        flops, read, written = fused[row["stage"]]
        assert (row["flops"], row["fused_bytes_read"], row["fused_bytes_written"]) == (flops, read * e, written * e)
        kernels = eager[row["stage"]]
        assert row["eager_kernels"] == len(kernels), row["stage"]
        assert row["eager_bytes"] == sum(r + w for _, r, w in kernels) * e, row["stage"]
        for ceilings in (H100, H200):
            peak, bandwidth = ceilings.peak_for("fp16"), ceilings.bandwidth
            floor = max(flops / peak, (read + written) * e / bandwidth)
            eager_floor = sum(max(f / peak, (r + w) * e / bandwidth) for f, r, w in kernels)
            assert row["floors"][ceilings.name]["fused_s"] == pytest.approx(floor, rel=1e-12)
            assert row["floors"][ceilings.name]["eager_s"] == pytest.approx(eager_floor, rel=1e-12)
            totals[ceilings.name] += floor
    for name, total in totals.items():
        assert report["total"]["floors"][name]["fused_s"] == pytest.approx(total, rel=1e-12)
    assert report["total"]["flops"] == sum(f for f, _, _ in fused.values())
    # H200: the same tensor-core peak, 4.8 TB/s: only memory-bound stages get faster.
    assert H200.peak_for("fp16") == H100.peak_for("fp16") and H200.bandwidth == 4.8e12


# -- PNG writer and plots --------------------------------------------------------------------------------------------
def _paeth(left: int, up: int, up_left: int) -> int:
    estimate = left + up - up_left
    d_left, d_up, d_up_left = abs(estimate - left), abs(estimate - up), abs(estimate - up_left)
    if d_left <= d_up and d_left <= d_up_left:
        return left
    return up if d_up <= d_up_left else up_left


def _read_png(path: str) -> tuple[int, int, np.ndarray]:
    """Width, height and the (height, width, 3) RGB pixels of an 8-bit RGB or RGBA PNG (what the built-in writer and
    matplotlib's Agg backend write), checking the signature, IHDR and every CRC and undoing the five scanline filters.
    Written from the PNG specification, so it checks the writer against an independent reader."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, color, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, compression, filtering, interlace) == (8, 0, 0, 0) and color in (2, 6), (depth, color)
    channels = 3 if color == 2 else 4
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = width * channels
    assert len(raw) == height * (1 + stride)
    rows, previous = [], np.zeros(stride, np.uint8)
    for r in range(height):
        kind = raw[r * (1 + stride)]
        line = np.frombuffer(raw, np.uint8, stride, r * (1 + stride) + 1).copy()
        if kind == 1:  # sub: running sum of each channel along the row, modulo 256
            line = np.cumsum(line.reshape(width, channels), axis=0, dtype=np.uint8).reshape(-1)
        elif kind == 2:  # up
            line = line + previous
        elif kind in (3, 4):  # average, Paeth: each byte depends on the one decoded before it
            out, up = bytearray(line.tobytes()), previous.tolist()
            for i in range(stride):
                left = out[i - channels] if i >= channels else 0
                up_left = up[i - channels] if i >= channels else 0
                predictor = (left + up[i]) // 2 if kind == 3 else _paeth(left, up[i], up_left)
                out[i] = (out[i] + predictor) & 0xFF
            line = np.frombuffer(bytes(out), np.uint8)
        else:
            assert kind == 0, f"filter type {kind}"
        rows.append(line)
        previous = line
    pixels = np.stack(rows).reshape(height, width, channels)
    return width, height, pixels[:, :, :3]


def test_png_writer_round_trip(bench_path, tmp_path):
    import plots

    pixels = torch.randint(0, 256, (5, 7, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy()
    path = str(tmp_path / "tiny.png")
    plots.write_png(path, pixels)
    width, height, decoded = _read_png(path)
    assert (width, height) == (7, 5)
    assert decoded.tobytes() == pixels.tobytes()


def _fake_stages(n: int) -> list[dict]:
    return [
        {
            "index": i,
            "stage": f"s{i}",
            "kind": "conv",
            "flops": 1e9 * (i + 1),
            "fused_bytes": 1e6,
            "floor_ms": 0.001,
            "providers": {
                "fastunet": {"median_ms": 0.01, "tflops": 100.0 * (i + 1)},
                "torch-eager": {"median_ms": 0.02, "tflops": 50.0 * (i + 1)},
            },
            "ratios": {"fastunet": {"speedup_vs_torch_eager": 2.0}},
        }
        for i in range(n)
    ]


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize(
    "use",
    [
        "builtin",
        pytest.param(
            "matplotlib", marks=pytest.mark.skipif(not _has_matplotlib(), reason="matplotlib is not installed")
        ),
    ],
)
def test_plots_draw_bars_and_points(bench_path, tmp_path, use):
    import plots

    stages = _fake_stages(4)
    speedup, roofline = str(tmp_path / "speedup.png"), str(tmp_path / "roofline.png")
    assert plots.speedup_plot(stages, speedup, "speedup", use=use) == use
    assert plots.roofline_plot(stages, 798.0, 3.0, roofline, "roofline", use=use) == use
    for path, color in ((speedup, plots.COLORS["torch-eager"]), (roofline, plots.COLORS["point"])):
        _, _, pixels = _read_png(path)
        drawn = (pixels == np.array(color, np.uint8)).all(axis=-1).sum()
        assert drawn > 20, path  # bars (speedup) and stage points (roofline) were drawn


def test_plot_backend_follows_what_is_importable(bench_path, tmp_path, monkeypatch):
    """Without matplotlib the built-in rasterizer draws; with nothing to draw no backend is claimed."""
    import plots

    payload = {"environment": {"device": "test"}, "ceilings": {}, "runs": [{"config": "c", "dtype": "d",
               "stages": _fake_stages(3)}]}  # fmt: skip
    expected = "matplotlib" if _has_matplotlib() else "builtin"
    assert plots.plot_results(payload, str(tmp_path / "a"))["backend"] == expected
    monkeypatch.setattr(plots, "_matplotlib", lambda: None)
    result = plots.plot_results(payload, str(tmp_path / "b"))
    assert result["backend"] == "builtin" and len(result["files"]) == 2
    assert all(_read_png(path)[0] > 0 for path in result["files"])
    assert plots.plot_results({"runs": [{"config": "c", "dtype": "d"}]}, str(tmp_path / "c")) == {
        "backend": None,
        "files": [],
    }


# -- the GPU run's plumbing, with fake timings (never shown as speed) -------------------------------------------------
class _Tracked:
    """Fake timings for the GPU run: the callables each provider gets are remembered, and timing one of them returns
    that provider's fixed number (or raises, to stand for SIGINT); every callable made is logged in order."""

    def __init__(self, monkeypatch, run_gpu, providers, fake_ms: dict, interrupt_on: str | None = None) -> None:
        self.provider_of: dict = {}
        self.log: list[tuple] = []
        self.fake_ms, self.interrupt_on = fake_ms, interrupt_on
        real_network, real_stage = run_gpu.network_callable, run_gpu.stage_callable

        def network_callable(model, x, provider, *rest):
            fn = real_network(model, x, provider, *rest)
            self.provider_of[fn] = provider
            self.log.append(("network", x.shape[0], provider))
            return fn

        def stage_callable(stage, provider, *rest):
            fn = real_stage(stage, provider, *rest)
            self.provider_of[fn] = provider
            self.log.append(("stages", stage.config, provider))
            return fn

        monkeypatch.setattr(run_gpu, "network_callable", network_callable)
        monkeypatch.setattr(run_gpu, "stage_callable", stage_callable)
        monkeypatch.setattr(run_gpu, "bench_ms", self.bench_ms)
        monkeypatch.setattr(providers, "compiled", lambda fn, mode: fn)  # no dynamo: the order is what is checked

    def bench_ms(self, fn, warmup_ms, rep_ms, return_mode="median"):
        provider = self.provider_of[fn]
        if provider == self.interrupt_on:
            raise KeyboardInterrupt
        fn()
        ms = self.fake_ms[provider]
        return [ms] if return_mode == "all" else ms


def _bench_args(run_gpu, tmp_path, *extra: str):
    return run_gpu.parse_args(
        ["--configs", "ref-bilinear-b16", "ref-bilinear-b1", "--dtypes", "float32", "--no-ceilings", "--quick",
         "--json", str(tmp_path / "bench.json"), *extra]
    )  # fmt: skip


def _gpu_run_mode(run_gpu, monkeypatch, device: torch.device) -> str:
    """The bench's device: CUDA with the compiled kernels where there is one, else the CPU under the interpreter
    (the dry-run mode); returns the backend fastunet must report."""
    if device.type == "cuda":
        # run() turns cuDNN autotuning on for the baselines: put the switch back after the test.
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
        return "triton"
    monkeypatch.setattr(run_gpu, "DEVICE", "cpu")
    monkeypatch.setattr(run_gpu, "DRY_RUN", True)
    return "triton-interpreter"


def test_run_gpu_phases_and_bookkeeping(bench_path, tmp_path, monkeypatch, device, capsys):
    """run() on two shrunken configs with fixed fake timings: fastunet and eager first (whole network for every
    config, then every stage), then torch.compile, and max-autotune skipped by the time rule; parity on the real
    kernels, rates, ratios, checkpoints, the tables, the plots and the suite record. Bookkeeping, not speed."""
    import suite_record

    from fastunet.parity import NETWORK_BUDGETS, math_mode

    backend = _gpu_run_mode(run_gpu, monkeypatch, device)
    timings = {"fastunet": 1.0, "fastunet-graphs": 0.5, "torch-eager": 2.0, "torch-compile": 4.0}
    tracked = _Tracked(monkeypatch, run_gpu, providers, timings)
    args = _bench_args(run_gpu, tmp_path, "--compile-start-s", "0", "--max-autotune-start-s", "1e9")
    configs = [run_gpu.dry_run_config(run_gpu.CONFIGS[name]) for name in args.configs]
    writes = []
    real_write = run_gpu._write
    monkeypatch.setattr(run_gpu, "_write", lambda path, payload: (writes.append(path), real_write(path, payload)))
    status, payload = run_gpu.run(args, configs, args.dtypes)

    a, b = (config.name for config in configs)
    phases = [entry for i, entry in enumerate(tracked.log) if i == 0 or entry != tracked.log[i - 1]]
    assert phases == [
        ("network", 2, "fastunet"), ("network", 2, "torch-eager"), ("network", 2, "fastunet-graphs"),
        ("network", 1, "fastunet"), ("network", 1, "torch-eager"), ("network", 1, "fastunet-graphs"),
        *[("stages", a, provider) for _ in range(8) for provider in ("fastunet", "torch-eager")],
        *[("stages", b, provider) for _ in range(8) for provider in ("fastunet", "torch-eager")],
        ("network", 2, "torch-compile"), ("network", 1, "torch-compile"),
        ("stages", a, "torch-compile"), ("stages", b, "torch-compile"),
    ]  # fmt: skip
    assert status == 0 and len(writes) > 20  # written after every step
    budget = NETWORK_BUDGETS[math_mode(torch.float32, device.type)]
    for run in payload["runs"]:
        assert run["fastunet_backend"] == backend and run["parity"]["ok"] is True
        assert run["parity"]["fastunet_vs_fp64"]["rel_l2"] <= budget.rel_l2  # the real kernels ran
        fast = run["providers"]["fastunet"]
        assert fast["images_per_s"] == pytest.approx(run["input_shape"][0] * 1000.0)
        assert fast["tflops"] == pytest.approx(run["flops"] / 1e-3 / 1e12)
        assert run["ratios"]["fastunet"] == pytest.approx(
            {"speedup_vs_torch_eager": 2.0, "speedup_vs_torch_compile": 4.0}
        )
        assert "time budget" in run["providers"]["torch-compile-max-autotune"]["skipped"]
        assert [s["stage"] for s in run["stages"]][-1] == "head" and len(run["stages"]) == 8
        for stage in run["stages"]:
            assert stage["ratios"]["fastunet"] == pytest.approx(
                {"speedup_vs_torch_eager": 2.0, "speedup_vs_torch_compile": 4.0}
            )
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["runs"][1]["stages"][6]["providers"]["torch-compile"]["median_ms"] == 4.0

    # Tables: every timed row as wide as its header, whatever the provider names.
    table = run_gpu.format_run(payload["runs"][0], H100.name)
    assert re.search(r"fastunet\s+1\.000\s+2000\.0", table) and "stages alone" in table
    lines = table.splitlines()
    for header_start in ("provider", "  #"):
        (at,) = [i for i, line in enumerate(lines) if line.startswith(header_start)]
        width = len(lines[at])
        rows = lines[at + 1 :] if header_start == "  #" else lines[at + 2 : at + 5]
        assert rows and all(len(row) == width for row in rows), (lines[at], rows)
    out = capsys.readouterr().out
    assert "torch-compile-max-autotune (max-autotune" in out and "skipped: time budget" in out

    # The suite record: plots of both configs, headline, stage rows.
    folder = tmp_path / "suite"
    folder.mkdir()
    (folder / "bench.json").write_text((tmp_path / "bench.json").read_text())
    (folder / "stages.tsv").write_text("tests\t0\t12\t150\nbench\t124\t200\t200\n")
    result = suite_record.record(str(folder))
    assert result["plots"]["files"] == [
        f"{name}-float32-{kind}.png" for name in (a, b) for kind in ("speedup", "roofline")
    ]
    assert all(_read_png(str(folder / name))[0] > 0 for name in result["plots"]["files"])
    assert [s["ok"] for s in result["stages"]] == [True, False] and result["stages"][1]["timed_out"]
    assert [row["config"] for row in result["headline"]] == [a, b]
    assert result["headline"][0]["torch-compile_ms"] == 4.0 and result["headline"][0]["speedup_vs_torch_eager"] == 2.0


def test_run_gpu_keeps_its_results_when_interrupted(tmp_path, monkeypatch, device):
    """SIGINT (the suite's `timeout -s INT`) during the torch.compile phase: the run stops, writes what it measured
    with the interruption noted, and says it failed."""
    _gpu_run_mode(run_gpu, monkeypatch, device)
    _Tracked(monkeypatch, run_gpu, providers, {"fastunet": 1.0, "torch-eager": 2.0}, interrupt_on="torch-compile")
    args = _bench_args(run_gpu, tmp_path, "--no-stages", "--configs", "ref-bilinear-b1", "--compile-start-s", "0")
    configs = [run_gpu.dry_run_config(run_gpu.CONFIGS[name]) for name in args.configs]
    status, _ = run_gpu.run(args, configs, args.dtypes)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert status == 1 and "SIGINT" in saved["interrupted"]
    (run,) = saved["runs"]
    assert run["providers"]["fastunet"]["median_ms"] == 1.0 and run["providers"]["torch-eager"]["median_ms"] == 2.0
    assert "torch-compile" not in run["providers"]


def test_compile_steps_start_only_with_time_for_them():
    import argparse

    args = argparse.Namespace(max_autotune_mode="max-autotune", compile_start_s=60.0, max_autotune_start_s=240.0)
    now = run_gpu.time.perf_counter()
    assert run_gpu._time_skip("fastunet", "network", args, now + 1) is None
    assert run_gpu._time_skip("fastunet", "network", args, now - 1) == "time budget spent"
    assert run_gpu._time_skip("torch-compile", "network", args, now + 100) is None
    assert "needs about 60 s" in run_gpu._time_skip("torch-compile", "network", args, now + 30)
    assert run_gpu._time_skip("torch-compile", "stage", args, now + 30) is None  # a stage: a quarter of that
    assert "needs about 240 s" in run_gpu._time_skip("torch-compile-max-autotune", "network", args, now + 200)


def test_profile_writes_a_chrome_trace(tmp_path):
    path = run_gpu.write_profile(lambda: torch.ones(8) @ torch.ones(8), str(tmp_path / "p.trace.json"), "x", False)
    events = json.loads(open(path).read())["traceEvents"]
    assert any(event.get("name") == "x" for event in events)


# -- the training step (--train): end to end in the dry-run mode, the kernel check, the gradient check, bad options ---
def _train_job(run_gpu, tmp_path, dtype_name: str, *extra: str):
    """A training job of the shrunken batch-1 reference config with its options, outside run()."""
    args = run_gpu.parse_args(
        ["--configs", "ref-bilinear-b1", "--dtypes", dtype_name, "--no-ceilings", "--quick", "--no-stages",
         "--train", "--json", str(tmp_path / "bench.json"), *extra]
    )  # fmt: skip
    config = run_gpu.dry_run_config(run_gpu.CONFIGS["ref-bilinear-b1"])
    job = run_gpu.new_job(config, dtype_name, H100, train=True)
    return args, job


def test_training_step_runs_end_to_end_on_the_kernels(tmp_path, monkeypatch, device, capsys):
    """run() with --train on a shrunken config in bf16: the training phase of fastunet and eager comes right after
    the whole-network forward, torch.compile's right after the compiled forward; fastunet's step ran on the backward
    kernels, its gradients were compared with eager's (within the budget), and every provider has ms per step,
    images/s, a first step and ratios in the JSON and the table. Bookkeeping, not speed."""
    backend = _gpu_run_mode(run_gpu, monkeypatch, device)
    monkeypatch.setattr(providers, "COMPILE_BACKEND", "eager")  # dynamo traces forward and backward, no inductor
    made = []
    real_network, real_training = run_gpu.network_callable, run_gpu.training_step
    monkeypatch.setattr(
        run_gpu, "network_callable", lambda model, x, provider, *rest: (
            made.append(("network", provider)), real_network(model, x, provider, *rest))[1]
    )  # fmt: skip
    monkeypatch.setattr(
        run_gpu, "training_step", lambda model, provider, *rest: (
            made.append(("train", provider)), real_training(model, provider, *rest))[1]
    )  # fmt: skip
    args = run_gpu.parse_args(
        ["--configs", "ref-bilinear-b1", "--dtypes", "bfloat16", "--no-ceilings", "--quick", "--no-stages",
         "--no-fp64", "--providers", "fastunet", "torch-eager", "torch-compile", "--compile-start-s", "0",
         "--train", "ref-bilinear-b1", "--json", str(tmp_path / "bench.json")]
    )  # fmt: skip
    configs = [run_gpu.dry_run_config(run_gpu.CONFIGS[name]) for name in args.configs]
    train = run_gpu.train_configs(args, configs)
    assert train == ["ref-bilinear-b1-dry"]
    status, payload = run_gpu.run(args, configs, args.dtypes, train=train)

    # The eager reference step is built first (inside fastunet's turn), then fastunet's; compile after its forward.
    assert made == [("network", "fastunet"), ("network", "torch-eager"), ("train", "torch-eager"),
                    ("train", "fastunet"), ("network", "torch-compile"), ("train", "torch-compile")]  # fmt: skip
    assert status == 0
    (run,) = payload["runs"]
    train_entry = run["train"]
    assert train_entry["fastunet_backend"] == backend
    assert train_entry["fastunet_backend_reason"].endswith("; backward kernels")
    assert train_entry["model"]["norm"] is None and train_entry["input_shape"] == [1, 3, 8, 8]
    assert "autocast(bfloat16)" in train_entry["precision"] and train_entry["optimizer"]["fused"] is True
    gradients = train_entry["gradients"]
    assert gradients["ok"] is True and train_entry["gradient_budget"] == {"rel_l2": 6e-2, "max_norm": 1e-1}
    for key in ("fastunet_vs_eager", "torch_compile_vs_eager"):
        assert gradients[key]["rel_l2"] <= 6e-2 and gradients[key]["max_norm"] <= 1e-1, gradients
        assert gradients[key]["loss_rel_diff"] < 1e-2
    timed = train_entry["providers"]
    assert list(timed) == ["fastunet", "torch-eager", "torch-compile"]
    for provider, entry in timed.items():
        assert entry["timed_calls"] >= 1 and entry["first_call_s"] > 0 and entry["finite_after_timing"], provider
        assert entry["images_per_s"] == pytest.approx(1 / (entry["median_ms"] / 1e3)), provider
        assert abs(entry["first_step_loss"] - train_entry["eager_first_step_loss"]) < 1e-2 * entry["first_step_loss"]
        if device.type == "cuda":
            assert entry["peak_allocated_bytes"] >= entry["step_peak_bytes"] > 0
    assert train_entry["ratios"]["fastunet"] == pytest.approx(
        {
            "speedup_vs_torch_eager": timed["torch-eager"]["median_ms"] / timed["fastunet"]["median_ms"],
            "speedup_vs_torch_compile": timed["torch-compile"]["median_ms"] / timed["fastunet"]["median_ms"],
        }
    )
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["runs"][0]["train"]["providers"]["fastunet"]["median_ms"] == timed["fastunet"]["median_ms"]
    out = capsys.readouterr().out
    assert "training step (ref-bilinear-b1-dry" in out and "gradient check ok" in out
    assert re.search(r"^torch-compile\s+\d+\.\d{3}\s+\d", out, re.M), out


def test_a_training_step_off_the_backward_kernels_is_not_timed(tmp_path, monkeypatch, device):
    """When the fused model's training forward falls back to the PyTorch math (a backward blocker), the step is
    recorded as an error naming the backend and why, nothing is timed, and the run fails."""
    _gpu_run_mode(run_gpu, monkeypatch, device)
    monkeypatch.setattr(fastunet_model.FusedForward, "backward_blocker", lambda self, training: "a blocker")
    args, job = _train_job(run_gpu, tmp_path, "float32")
    run_gpu.time_training(job, ["fastunet"], args, float("inf"), run_gpu.Progress(1), lambda: None)
    train = job.run["train"]
    entry = train["providers"]["fastunet"]
    assert "median_ms" not in entry and "did not run on the" in entry["error"], entry
    assert train["fastunet_backend"] == "reference" and "a blocker" in train["fastunet_backend_reason"]
    assert train["gradients"]["ok"] is False
    assert run_gpu.failed(job.run)


def test_training_gradients_that_differ_from_eager_fail_the_check(tmp_path, monkeypatch, device):
    """fastunet's gradients scaled by 1.01 (one parameter's by 1.05) through hooks: still on the kernels, but the
    check against eager finds the difference, names the parameter worst off, and fails the run; the time (a fake
    one here) is kept."""
    _gpu_run_mode(run_gpu, monkeypatch, device)
    real_training = run_gpu.training_step

    def skewed(model, provider, *rest):
        step = real_training(model, provider, *rest)
        if provider == "fastunet":
            for name, param in step.module.named_parameters():
                factor = 1.05 if name == "decoders.0.conv.conv1.weight" else 1.01
                param.register_hook(lambda grad, factor=factor: grad * factor)
        return step

    monkeypatch.setattr(run_gpu, "training_step", skewed)
    monkeypatch.setattr(run_gpu, "bench_ms", lambda fn, warmup_ms, rep_ms, return_mode="median": [1.0])
    args, job = _train_job(run_gpu, tmp_path, "float32")
    names = [name for name, _ in run_gpu.training_model(job.config, "cpu").named_parameters()]
    assert "decoders.0.conv.conv1.weight" in names
    run_gpu.time_training(job, ["fastunet"], args, float("inf"), run_gpu.Progress(1), lambda: None)
    train = job.run["train"]
    check = train["gradients"]["fastunet_vs_eager"]
    assert train["fastunet_backend_reason"].endswith("; backward kernels")
    assert train["gradients"]["ok"] is False and 1e-2 < check["rel_l2"] < 5e-2
    assert check["worst_parameter"] == "decoders.0.conv.conv1.weight"
    assert check["worst_parameter_rel_l2"] == pytest.approx(0.05, rel=1e-3)
    assert "median_ms" in train["providers"]["fastunet"] and run_gpu.failed(job.run)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--train", "nope"], "argument --train: unknown configuration 'nope' (expected one of: smoke,",
                     id="unknown-name"),
        pytest.param(["--configs", "ref-bilinear-b1", "--train", "ref-bilinear-b16"],
                     "argument --train: ref-bilinear-b16 is not among the configurations run (--configs "
                     "ref-bilinear-b1)", id="not-run"),
        pytest.param(["--providers", "fastunet-graphs", "torch-compile-max-autotune", "--train"],
                     "--train times fastunet, torch-eager, torch-compile; --providers names none of them: "
                     "fastunet-graphs torch-compile-max-autotune", id="no-training-provider"),
    ],
)  # fmt: skip
def test_bad_training_options_are_refused(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        run_gpu.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_training_configurations_follow_the_names_given():
    """--train with names: those among --configs (a dry run's renamed copies followed one for one); without names:
    every configuration; without --train: none."""
    names = ["smoke", "ref-bilinear-b1", "ref-bilinear-b16"]
    configs = [run_gpu.dry_run_config(run_gpu.CONFIGS[name]) for name in names]
    for extra, expected in (
        (["--train", "ref-bilinear-b16", "smoke"], ["smoke-dry", "ref-bilinear-b16-dry"]),
        (["--train"], [config.name for config in configs]),
        ([], []),
    ):
        args = run_gpu.parse_args(["--configs", *names, *extra])
        assert run_gpu.train_configs(args, configs) == expected, extra
    assert run_gpu.plan_phases(args, train=True)[1] == ("train", ["fastunet", "torch-eager"])
    assert ("train", ["torch-compile"]) not in run_gpu.plan_phases(args)


def test_bad_training_calls_are_refused(capsys):
    from fastunet import cli

    assert cli.main(["bench", "--train", "ref-bilinear-b16"]) == 2
    err = capsys.readouterr().err
    assert "--train takes no configuration names here" in err and "got ref-bilinear-b16" in err
    config = run_gpu.dry_run_config(run_gpu.CONFIGS["ref-bilinear-b1"])
    args = run_gpu.parse_args(["--configs", "ref-bilinear-b1", "--no-ceilings"])
    with pytest.raises(ValueError, match="train names configurations not run: smoke"):
        run_gpu.run(args, [config], ["float32"], train=["smoke"])
    model = run_gpu.training_model(config, "cpu")
    x, target = torch.zeros(1, 3, 8, 8), torch.zeros(1, 2, 8, 8)
    with pytest.raises(ValueError, match=r"unknown training provider 'fastunet-graphs'; expected one of \("):
        providers.training_step(model, "fastunet-graphs", x, target, torch.float32)
    with pytest.raises(TypeError, match="a training step runs float32, float16 or bfloat16, got torch.float64"):
        providers.training_step(model, "torch-eager", x, target, torch.float64)
    with pytest.raises(TypeError, match="keeps float32 parameters"):
        providers.training_step(model.half(), "torch-eager", x, target, torch.float16)
    step = providers.training_step(run_gpu.training_model(config, "cpu"), "torch-eager", x, target, torch.float32)
    with pytest.raises(RuntimeError, match="no training step has run yet"):
        step.gradients()


def test_problems_judge_the_packed_taps_weight_gradient_by_its_mma_rows():
    """The packed-taps weight gradient computes ``dW^T = dz^T A``: its MMA's rows are the output channels
    (``BLOCK_N``), so a 64 x 16 x 64 tile (a 4-channel input's 36 rows, 16 output channels) is judged by 16 rows
    (the warp MMA is right), while a plain 64-row tile without HGMMA is flagged."""
    from types import SimpleNamespace

    from fastunet.tooling.compile_report import uses_tensor_cores

    def row(pack_taps, hgmma, hmma):
        return SimpleNamespace(
            arch=90, gemm_tile=(64, 16, 64), constexprs={"PACK_TAPS": pack_taps}, hgmma=hgmma, hmma=hmma
        )

    assert uses_tensor_cores(row(True, 0, 8))
    assert not uses_tensor_cores(row(True, 0, 0))
    assert not uses_tensor_cores(row(False, 0, 8))
    assert uses_tensor_cores(row(False, 4, 0))
