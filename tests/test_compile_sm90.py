"""sm_90 build of every kernel variant the reference U-Net launches: compiles, no spills, HGMMA, fits in smem,
no ptxas performance warnings; the issue model's figures of each variant and of each forward; and the sm_80
(Ampere) build of the reference config: HMMA, no spills.

The kernels go through Triton's real compiler down to a cubin (no GPU needed) in a subprocess: this test process
has ``TRITON_INTERPRET=1`` on CPU machines, under which nothing compiles and the launchers pick interpreter-only
constexprs. The report's figures come from ``cuobjdump`` on each cubin.

Default: fp16 and bf16, every upsampling mode, batch 16 and 1 (24 variants per dtype, about 40 s per dtype on a
2-core machine) for sm_90; the reference config (bilinear) for sm_80. fp32 is under ``slow``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

from fastunet.tooling.compile_report import REFERENCE_MODEL, specialize, trace_for_target
from fastunet.tooling.dtypes import torch_dtype
from fastunet.tooling.roofline import Ceilings, config_roofline

UPSAMPLES = ("transpose", "bilinear", "nearest")
BATCHES = (16, 1)
# Operand type of the warpgroup MMA for each storage dtype (fp32 runs as TF32: cudnn.allow_tf32 defaults on).
HGMMA_SUFFIX = {"fp16": ".F32", "bf16": ".F32.BF16", "fp32": ".F32.TF32"}
HGMMA_K = {"fp16": 16, "bf16": 16, "fp32": 8}
pytestmark = pytest.mark.tooling  # compiles for sm_90 on any machine: CI runs it, the GPU suite need not
H100_MAX_SHARED_PER_BLOCK = 227 * 1024
A100_MAX_SHARED_PER_BLOCK = 163 * 1024
# sm_80: one warp's MMA, m16n8k16 for 16-bit operands.
HMMA_OPCODE = {"fp16": "HMMA.16816.F32", "bf16": "HMMA.16816.F32.BF16"}
# What the issue model assumes of an H200: dense tensor-core FLOP/s, SMs, clock, DRAM bandwidth.
H200_PEAK = {"fp16": 790e12, "bf16": 790e12, "fp32": 395e12}
H200_SMS, H200_CLOCK, H200_BANDWIDTH = 132, 1.75e9, 4.3e12


def expected_launches(upsample: str, depth: int = REFERENCE_MODEL["depth"]) -> int:
    """Launches of one forward: 2 convs per encoder level and bottleneck, per decoder level the upsampled map (a
    transposed conv or an upsample launch, whatever ``upsample``) and 2 convs (the head is fused into the last)."""
    return 2 * (depth + 1) + 3 * depth


def gemm_rows(report: dict) -> list[dict]:
    """The conv family's variants (the tensor-core GEMMs); the upsample kernel is data movement."""
    return [row for row in report["variants"] if "BLOCK_K" in row["config"]]


def run_report(out_dir, *options: str, timeout: int = 840, arch: int = 90) -> dict:
    """Run the compile report for ``sm_<arch>`` in a process without TRITON_INTERPRET; return its JSON."""
    out = out_dir / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "fastunet.tooling.compile_report", "--arch", str(arch), *options]
    command += ["--json", str(out)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    # Exit status 1 means the report found a problem; the checks below say which.
    assert proc.returncode in (0, 1) and out.exists(), f"compile report failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(out.read_text())


def compile_report(dtype: str, out_dir) -> dict:
    """The report for one dtype over every upsampling mode and both batch sizes."""
    return run_report(out_dir, "--dtype", dtype, "--upsample", *UPSAMPLES, "--batch", *map(str, BATCHES))


def _label(row: dict) -> str:
    c = row["config"]
    tile = "x".join(str(c.get(key, "-")) for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return (
        f"{row['kernel']} up={int(c.get('TWO_SOURCES', 0))} {tile} "
        f"w{c['num_warps']} s{c['num_stages']} batch={c.get('batch', 'n')}"
    )


def coverage_problems(report: dict, dtype: str, arch: int = 90, upsamples=UPSAMPLES) -> list[str]:
    """Every launch of every configuration is in exactly one compiled variant."""
    variants = report["variants"]
    expected = {f"{u}/{dtype}/b{b}": expected_launches(u) for u in upsamples for b in BATCHES}
    found = []
    target = f"sm_{arch}"
    if report["arch"] != target or any(row["arch"] != target or row["config"]["dtype"] != dtype for row in variants):
        found.append("rows for another target or dtype")
    if {label for row in variants for label in row["used_by"]} != set(expected):
        found.append(f"configurations {sorted({label for row in variants for label in row['used_by']})}")
    if sum(row["launches"] for row in variants) != sum(expected.values()):
        found.append(f"{sum(row['launches'] for row in variants)} launches, expected {sum(expected.values())}")
    # batch=1 is compiled in as a constant by the JIT, so each batch size has variants of its own.
    if {row["config"].get("batch") for row in variants} != {None, 1}:
        found.append("batch 1 did not get variants of its own")
    return found


def spill_problems(report: dict) -> list[str]:
    return [
        f"{_label(row)}: {row['registers']} regs, {row['spill_bytes']} B/thread spilled, {row['local_ops']} LDL/STL"
        for row in report["variants"]
        if row["spill_bytes"] or row["local_ops"] or not 0 < row["registers"] <= 255
    ]


def tensor_core_problems(report: dict, dtype: str) -> list[str]:
    """HGMMA on the storage dtype's operands, enough instructions for one BLOCK_M x BLOCK_K step, no HMMA."""
    found = []
    for row in gemm_rows(report):
        c = row["config"]
        # One K step of the tile: BLOCK_M / 64 rows of m64 HGMMA, split over the warpgroups, times BLOCK_K / k.
        needed = max(1, c["BLOCK_M"] // 64 // max(1, c["num_warps"] // 4)) * (c["BLOCK_K"] // HGMMA_K[dtype])
        opcodes = [op for op in row["mma_opcodes"] if op.startswith("HGMMA")]
        if row["hgmma"] < needed or not opcodes or not all(op.endswith(HGMMA_SUFFIX[dtype]) for op in opcodes):
            found.append(f"{_label(row)}: {row['hgmma']} HGMMA (need >= {needed}), opcodes {row['mma_opcodes']}")
        if row["hmma"]:
            found.append(f"{_label(row)}: {row['hmma']} HMMA (the sm_80 path) on sm_90")
    return found


def shared_memory_problems(report: dict) -> list[str]:
    return [
        f"{_label(row)}: {row['shared_bytes']} B (limit {H100_MAX_SHARED_PER_BLOCK} B): the launch would fail"
        for row in report["variants"]
        if row["shared_bytes"] > H100_MAX_SHARED_PER_BLOCK or not row["ctas_per_sm"]
    ]


def ptxas_problems(report: dict) -> list[str]:
    """``ptxas -v`` performance warnings, such as wgmma serialized (each HGMMA waits for the one before)."""
    return [f"{_label(row)}: {warning}" for row in report["variants"] for warning in row["ptxas_warnings"]]


def issue_problems(report: dict, dtype: str) -> list[str]:
    """Each variant's tensor-core loops are found in its SASS, load their operands there, and the issue ratio is the
    arithmetic of the costliest one's counts: num_warps * instructions / 4 per K-step against the tensor-core clocks
    of the tile's K-step at 790 TFLOP/s over 132 SMs at 1.75 GHz (395 for TF32)."""
    found = []
    for row in gemm_rows(report):
        c, loops = row["config"], row["loops"]
        if not loops:
            found.append(f"{_label(row)}: no tensor-core loop found")
            continue
        clocks = 2 * c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_K"] / (H200_PEAK[dtype] / H200_SMS / H200_CLOCK)
        worst = max(loops, key=lambda loop: loop["instructions_per_k_step"])
        ratio = c["num_warps"] * worst["instructions_per_k_step"] / 4 / clocks
        if row["issue_ratio"] != pytest.approx(ratio, rel=1e-3) or row["tensor_loops"] != len(loops):
            found.append(f"{_label(row)}: issue ratio {row['issue_ratio']}, its counts give {ratio:.3f}")
        for loop in loops:
            if not loop["mma"] < loop["instructions"] <= row["sass_instructions"] or not loop["k_steps"] >= 1:
                found.append(f"{_label(row)}: loop {loop}")
            # The small-K path gathers scattered elements through registers (LDG + STS), not cp.async.
            if loop["cp_async"] + loop["tma_loads"] == 0 and not c["PACKED_K"]:
                found.append(f"{_label(row)}: no cp.async or TMA load in the loop at {loop['first']}")
            # The TMA path: descriptor loads (one per row box and one for the weight), no cp.async gathers.
            if c.get("TMA_ROWS") and (loop["tma_loads"] < c["TMA_ROWS"] + 1 or loop["cp_async"]):
                found.append(f"{_label(row)}: TMA path with {loop['tma_loads']} TMA, {loop['cp_async']} cp.async")
    return found


# The issue-model target of the TMA path: every variant's loop leaves the tensor cores 40% of the issue slots spare.
TMA_ISSUE_RATIO = 0.6


def tma_problems(report: dict) -> list[str]:
    """The reference config's wide aligned convs take TMA loads within the issue-model target: some variant of
    each configuration does (its maps from 64 px wide; the first conv keeps its small-K loader)."""
    tma = [row for row in gemm_rows(report) if row["config"].get("TMA_ROWS")]
    found = [f"{_label(row)}: issue ratio {row['issue_ratio']}" for row in tma if row["issue_ratio"] > TMA_ISSUE_RATIO]
    missing = {label for row in report["variants"] for label in row["used_by"]} - {
        label for row in tma for label in row["used_by"]
    }
    return found + [f"{label}: no TMA variant" for label in sorted(missing)]


def model_problems(report: dict, dtype: str, upsamples=UPSAMPLES) -> list[str]:
    """One modeled forward per configuration, launch by launch: the FLOPs and bytes of the roofline model (traced
    on its own here), never faster than its floor on the same ceilings, and totals that add up."""
    found = []
    models = {(m["upsample"], m["batch"]): m for m in report["model"]}
    if set(models) != {(u, b) for u in upsamples for b in BATCHES}:
        return [f"modeled configurations {sorted(models)}"]
    ceilings = Ceilings("model", {"fp16": H200_PEAK["fp16"], "bf16": H200_PEAK["bf16"]}, H200_BANDWIDTH, H200_SMS)
    for (upsample, batch), model in sorted(models.items()):
        kwargs = {**REFERENCE_MODEL, "upsample": upsample}
        floor = config_roofline(kwargs, (batch, 3, 512, 512), torch_dtype(dtype), ceilings=ceilings)
        layers = model["layers"]
        if [la["stage"] for la in layers] != [la.stage for la in floor.launches]:
            found.append(f"{upsample} b{batch}: stages {[la['stage'] for la in layers]}")
            continue
        for layer, bound in zip(layers, floor.launches, strict=True):
            if (layer["flops"], layer["bytes"]) != (bound.flops, bound.bytes):
                found.append(f"{upsample} b{batch} {layer['stage']}: FLOPs or bytes differ from the roofline's")
            if layer["time_us"] is None or layer["time_us"] < bound.floor_s * 1e6 * (1 - 1e-6):
                found.append(f"{upsample} b{batch} {layer['stage']}: {layer['time_us']} us below the floor")
        total_ms = sum(la["time_us"] for la in layers) / 1e3
        if model["ms"] != pytest.approx(total_ms, rel=1e-3):
            found.append(f"{upsample} b{batch}: {model['ms']} ms, its launches add up to {total_ms}")
        if model["fraction_of_peak"] != pytest.approx(floor.flops / (total_ms * 1e-3) / H200_PEAK[dtype], rel=1e-3):
            found.append(f"{upsample} b{batch}: fraction of peak {model['fraction_of_peak']}")
    return found


# One test per dtype (not one per check): under pytest-xdist, tests sharing a fixture can land on different
# workers and each would compile the whole set again.
@pytest.mark.parametrize("dtype", ["fp16", "bf16", pytest.param("fp32", marks=pytest.mark.slow)])
def test_sm90_build(dtype, tmp_path):
    report = compile_report(dtype, tmp_path)
    sections = {
        "coverage": coverage_problems(report, dtype),
        "register spills": spill_problems(report),
        "tensor cores": tensor_core_problems(report, dtype),
        "shared memory": shared_memory_problems(report),
        "ptxas warnings": ptxas_problems(report),
        "issue figures": issue_problems(report, dtype),
        "TMA loads": tma_problems(report),
    }
    if dtype != "fp32":  # the model tables the H200's 16-bit peak; fp32 runs as TF32 at half of it
        sections["forward model"] = model_problems(report, dtype)
    found = {name: problems for name, problems in sections.items() if problems}
    assert not found, "\n".join(f"{name}:\n  " + "\n  ".join(problems) for name, problems in found.items())


def hmma_problems(report: dict, dtype: str) -> list[str]:
    """sm_80: the m16n8k16 warp MMA on the storage dtype's operands, in a loop; no HGMMA (an sm_90 instruction)."""
    found = []
    for row in gemm_rows(report):
        if row["hgmma"] or not row["hmma"] or set(row["mma_opcodes"]) != {HMMA_OPCODE[dtype]}:
            found.append(f"{_label(row)}: {row['hgmma']} HGMMA, {row['hmma']} HMMA, opcodes {row['mma_opcodes']}")
        if not row["loops"] or any(loop["mma_opcodes"] != [HMMA_OPCODE[dtype]] for loop in row["loops"]):
            found.append(f"{_label(row)}: no HMMA loop ({row['loops']})")
    return found


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_sm80_build(dtype, tmp_path):
    """Ampere: every variant of the reference config (bilinear, batch 16 and 1) builds for sm_80 with HMMA, no
    spills, within the A100's shared memory, without ptxas performance warnings."""
    options = ("--dtype", dtype, "--upsample", "bilinear", "--batch", *map(str, BATCHES))
    report = run_report(tmp_path, *options, arch=80)
    sections = {
        "coverage": coverage_problems(report, dtype, arch=80, upsamples=("bilinear",)),
        "register spills": spill_problems(report),
        "tensor cores": hmma_problems(report, dtype),
        "shared memory": [
            f"{_label(row)}: {row['shared_bytes']} B, {row['ctas_per_sm']} CTAs/SM"
            for row in gemm_rows(report)
            if row["shared_bytes"] > A100_MAX_SHARED_PER_BLOCK or not row["ctas_per_sm"]
        ],
        "ptxas warnings": ptxas_problems(report),
        "pointer loads only": [_label(row) for row in gemm_rows(report) if row["config"]["TMA_ROWS"]],
        "model": [] if {m["gpu"] for m in report["model"]} == {"A100 SXM"} else [f"models {report['model']}"],
    }
    found = {name: problems for name, problems in sections.items() if problems}
    assert not found, "\n".join(f"{name}:\n  " + "\n  ".join(problems) for name, problems in found.items())


# ---------------------------------------------------------------------------------------------------------------
# The report compiles what the JIT would: same argument specialization (no compilation needed here).
# ---------------------------------------------------------------------------------------------------------------
EXTRA_ARGS = [
    pytest.param(1, id="int-one"),
    pytest.param(0, id="int-zero"),
    pytest.param(48, id="int-div16"),
    pytest.param(-32, id="int-negative-div16"),
    pytest.param(17, id="int-odd"),
    pytest.param(2**31, id="int64"),
    pytest.param(-(2**31), id="int32-min"),
    pytest.param(0.5, id="float"),
    pytest.param(torch.empty(64, dtype=torch.float16, device="meta"), id="fp16-aligned"),
    pytest.param(torch.empty(8, 8, dtype=torch.bfloat16, device="meta")[:, 1:], id="bf16-misaligned"),
    pytest.param(torch.empty(8, dtype=torch.float32, device="meta")[4:], id="fp32-offset-16B"),
]


def _jit_specialization():
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
    except ImportError as error:
        pytest.skip(f"this Triton has no native_specialize_impl to compare with: {error}")
    backend = type(make_backend(GPUTarget("cuda", 90, 32)))
    return lambda arg: native_specialize_impl(backend, arg, False, True, True)


def _matches(ours: tuple, jit: tuple) -> bool:
    kind, spec = ours
    if kind == "constexpr":
        return tuple(jit) == ("constexpr", spec)
    return jit[0] == kind and (jit[1] == "D") == spec


@pytest.mark.parametrize("arg", EXTRA_ARGS)
def test_specialization_matches_jit(arg):
    jit = _jit_specialization()
    assert _matches(specialize(arg), jit(arg)), (specialize(arg), jit(arg))


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("upsample", UPSAMPLES)
def test_traced_arguments_specialize_like_jit(upsample, batch):
    jit = _jit_specialization()
    records = trace_for_target(upsample, torch.float16, batch)
    assert len(records) == expected_launches(upsample)
    mismatches = [
        (record.name, index, specialize(arg), jit(arg))
        for record in records
        for index, arg in enumerate(record.args)
        if not _matches(specialize(arg), jit(arg))
    ]
    assert not mismatches


@pytest.mark.parametrize("base_channels, fused", [(128, True), (256, False)], ids=["fused-head-128", "head-256"])
def test_sm90_build_wide_head(tmp_path, base_channels, fused):
    """The widest fused head (128 channels: BLOCK_N 128 holds a pixel's channels) and, past it, the head as its
    own 1x1 launch (at BLOCK_N 256 the fused head serialized the wgmma pipeline)."""
    report = run_report(
        tmp_path, "--dtype", "fp16", "--upsample", "bilinear", "--batch", "2", "--size", "64",
        "--base-channels", str(base_channels), "--depth", "1",
    )  # fmt: skip
    heads = [row for row in gemm_rows(report) if row["config"]["HEAD"]]
    standalone = [row for row in gemm_rows(report) if row["config"]["KSIZE"] == 1]
    if fused:
        assert heads and not standalone and all(row["config"]["BLOCK_N"] == base_channels for row in heads)
    else:
        assert standalone and not heads
    found = spill_problems(report) + tensor_core_problems(report, "fp16") + shared_memory_problems(report)
    found += ptxas_problems(report)
    assert not found, "\n".join(found)


@pytest.mark.slow
def test_sm90_build_autotuning_candidates(tmp_path):
    """Every config the autotuner may launch for the reference config (fp16) builds as cleanly as the chosen ones:
    timing a spilling or serialized candidate would waste the tuning, one over the smem limit would not launch."""
    options = ["--dtype", "fp16", "--candidates", "--upsample", *UPSAMPLES, "--batch", *map(str, BATCHES)]
    report = run_report(tmp_path, *options, timeout=1800)
    assert len(report["variants"]) > 3 * len(UPSAMPLES) * len(BATCHES)
    found = spill_problems(report) + tensor_core_problems(report, "fp16") + shared_memory_problems(report)
    found += ptxas_problems(report)
    assert not found, "\n".join(found)


def test_sm90_build_feature_variants(tmp_path):
    """The layout features' variants (LeakyReLU, per-channel PReLU and SiLU epilogues, the replicate join's clamped
    loader, valid convs with the crop join) build like the reference's: no spills, HGMMA, no ptxas warnings."""
    report = run_report(
        tmp_path, "--dtype", "fp16", "--upsample", "transpose", "--batch", "1",
        "--features", "leaky_relu", "prelu", "silu", "replicate", "valid",
    )  # fmt: skip
    rows = gemm_rows(report)

    def built(feature: str) -> list[dict]:
        return [row for row in rows if f"{feature}/fp16/b1" in row["used_by"]]

    assert {row["config"]["ACT"] for row in built("leaky_relu")} >= {2}
    assert {row["config"]["ACT"] for row in built("prelu")} >= {3}
    assert {row["config"]["ACT"] for row in built("silu")} >= {4}
    assert any(row["config"]["CLAMP_UP"] for row in built("replicate"))
    assert built("valid")
    found = spill_problems(report) + tensor_core_problems(report, "fp16") + shared_memory_problems(report)
    found += ptxas_problems(report)
    assert not found, "\n".join(found)


NORM_FEATURES = ("instance", "group", "instance_bilinear", "stride")


@pytest.fixture(scope="module")
def norm_report(tmp_path_factory) -> dict:
    """The report of the norm features' forwards and training steps (fp16, batch 1): InstanceNorm/GroupNorm +
    LeakyReLU after every conv with max-pool, bilinear or strided-conv down/up-sampling."""
    out_dir = tmp_path_factory.mktemp("norms")
    return run_report(out_dir, "--dtype", "fp16", "--upsample", "bilinear", "--batch", "1", "--training",
                      "--features", *NORM_FEATURES)  # fmt: skip


def test_sm90_build_norm_variants(norm_report):
    """Every new variant builds: the statistics epilogue (STATS), normalize-on-load in the 1x1 head's loader
    (NORM_IN), the stride-2 conv, the finalize, normalize(+pool, +full) and upsample+normalize launches; no spills,
    HGMMA in every conv variant, shared memory within the limit. The eval forward applies each norm by a pass before
    a (transposed) conv reads the map: its only normalize-on-load readers are the 1x1 head and the upsample
    kernel."""
    rows = norm_report["variants"]
    convs = gemm_rows(norm_report)
    for feature in NORM_FEATURES:
        assert any(f"{feature}/fp16/b1" in row["used_by"] for row in rows), feature
    evals = [row for row in rows if any(not use.startswith("train-") for use in row["used_by"])]
    on_load = {row["kernel"] for row in evals if row["config"].get("NORM_IN")}
    assert on_load == {"conv1x1+norm_in", "upsample2x+norm_in"}, on_load
    assert not ptxas_problems({**norm_report, "variants": evals})
    assert {"normalize", "normalize+pool+full"} <= {row["kernel"] for row in evals}
    assert any(row["config"]["STATS"] and not row["config"]["NORM_IN"] for row in convs)
    assert any(row["config"]["STRIDE"] == 2 and row["config"]["STATS"] for row in convs)
    assert any(row["config"]["HEAD"] is False and row["config"]["KSIZE"] == 1 and row["config"]["NORM_IN"]
               for row in convs)  # fmt: skip
    names = {row["kernel"] for row in rows}
    assert {"norm_scale_shift", "normalize+pool", "upsample2x+norm_in"} <= names
    found = spill_problems(norm_report) + tensor_core_problems(norm_report, "fp16")
    found += shared_memory_problems(norm_report)
    assert not found, "\n".join(found)


def test_sm90_norm_layouts_launch_no_serialized_wgmma(norm_report):
    """No variant the norm features' forwards and training steps launch draws a ptxas warning. The one that did,
    the 3x3 (and transposed) conv normalizing its operand on load (ptxas serialized the wgmma of some of its tiles,
    C7515: the A operand passes through registers), is no longer launched by either: a normalize launch applies the
    norm ahead of such a reader. It stays reachable through the kernel-level ``conv2d_nhwc(norm_in=...)``."""
    rows = norm_report["variants"]
    assert not ptxas_problems(norm_report), "\n".join(ptxas_problems(norm_report))
    convs = [row for row in gemm_rows(norm_report) if row["config"].get("NORM_IN")]
    assert {row["kernel"] for row in convs} == {"conv1x1+norm_in"}, [_label(row) for row in convs]  # the heads
    assert any(row["kernel"] == "upsample2x+norm_in" for row in rows)


def test_sm90_norm_layouts_take_each_read_backward_in_a_pass_it_already_makes(norm_report):
    """The norm layouts' training steps take a map's gradient through its normalized read in the stride-1 conv
    reader's input gradient (``+norm_read+applied``: GRAD_MASK 3, on HGMMA, no spill), whose epilogue also writes the
    values the forward read for the weight gradient, and in the pool's backward over z
    (``activation_pool_backward+pool+norm_read``); a launch of its own (``norm_input_backward``) is left for the
    strided conv's input and the low-resolution map an upsample kernel reads. The epilogue runs over the tile's two
    column halves one after the other: the 8-warp 128x128 tiles, at 248-254 registers with the whole tile at once
    (and spilling once the applied map was written too), build at about 190-215."""
    trained = [row for row in norm_report["variants"] if any(use.startswith("train-") for use in row["used_by"])]
    names = {row["kernel"] for row in trained}
    assert {"conv3x3+norm_read+applied", "activation_pool_backward+pool+norm_read"} <= names, sorted(names)
    reads = [row for row in trained if row["kernel"] == "conv3x3+norm_read+applied"]
    assert all(row["config"]["GRAD_MASK"] == 3 and not row["config"]["NORM_IN"] for row in reads)
    assert all(op.startswith("HGMMA") for row in reads for op in row["mma_opcodes"]) and reads[0]["mma_opcodes"]
    heavy = [f"{_label(row)}: {row['registers']} registers" for row in reads if row["registers"] > 224]
    assert not heavy, "\n".join(heavy)
    found = spill_problems({"variants": trained}) + ptxas_problems({"variants": trained})
    assert not found, "\n".join(found)


# ---------------------------------------------------------------------------------------------------------------
# Persistent grid: the autotuner's persistent candidates on the TMA path (one-row, two-row pooled and two-source
# tiles of the reference config's batch-16 levels), traced on ``meta`` tensors for sm_90 and compiled
# ---------------------------------------------------------------------------------------------------------------
PERSISTENT_BUILD = """
import json, sys
import torch
from fastunet.kernels._common import dry_run, launch_log
from fastunet.kernels.conv import conv2d_nhwc
from fastunet.tooling.compile_report import collect_variants, compile_variant, with_candidates

def meta(*shape):
    return torch.empty(*shape, device="meta", dtype=torch.bfloat16)

with dry_run(), launch_log() as records:
    conv2d_nhwc(meta(16, 64, 64, 256), meta(9 * 256, 256), meta(256))
    conv2d_nhwc(meta(16, 64, 64, 256), meta(9 * 256, 256), meta(256), pool=True)
    conv2d_nhwc(meta(16, 128, 128, 128), meta(9 * 256, 128), meta(128), up=meta(16, 128, 128, 128), up_mode="direct")
    conv2d_nhwc(meta(16, 512, 512, 64), meta(9 * 64, 64), meta(64), head_weight=meta(64, 2), head_bias=meta(2))
assert all(record.path == "tma" and not record.persistent for record in records)
persistent = [record for record in with_candidates(records) if record.constexprs["PERSISTENT"]]
variants = collect_variants([("persistent/bf16/b16", persistent)])
json.dump([compile_variant(variant).to_json() for variant in variants], sys.stdout)
"""


def test_sm90_build_persistent_candidates():
    """The persistent candidates build like the chosen tiles: no spills, HGMMA fed by TMA in the tensor-core loop
    (the per-tile K loop nested in the tile loop, which the issue model reads as the main loop, the fused head's GEMM
    in the tile loop as epilogue work), resident CTAs, no ptxas warnings (wgmma not serialized)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", PERSISTENT_BUILD], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, f"persistent build failed:\n{proc.stderr[-4000:]}"
    rows = json.loads(proc.stdout)
    built = sorted((row["kernel"], row["config"]["POOL"], row["config"]["TWO_SOURCES"]) for row in rows)
    assert {name for name, _, _ in built} == {"conv3x3+persistent", "conv3x3+pool+persistent",
                                              "conv3x3+up+persistent", "conv3x3+head+persistent"}, built  # fmt: skip
    assert all(row["config"]["PERSISTENT"] and row["config"]["TMA_ROWS"] for row in rows)
    # The issue model reads the K loops inside the loop over tiles: one per source, the head's GEMM outside them.
    found = [
        f"{_label(row)}: {row['tensor_loops']} tensor-core loops, issue ratio {row['issue_ratio']}"
        for row in rows
        if row["tensor_loops"] != 1 + row["config"]["TWO_SOURCES"] or not 0 < row["issue_ratio"] < 0.6
    ]
    report = {"variants": rows}
    found += spill_problems(report) + tensor_core_problems(report, "bf16") + shared_memory_problems(report)
    found += ptxas_problems(report)
    found += [f"{_label(row)}: no TMA load in the tensor-core loop" for row in rows if not row["tma_loads"]]
    assert not found, "\n".join(found)


# Split K: the candidates of the reference config's batch-1 layers with fewer tiles than SMs (the bottleneck on
# pointer loads, 32 px wide; a 64 x 64 map of 256 channels on TMA), and their sum launch
SPLIT_K_BUILD = """
import json, sys
import torch
from fastunet.kernels import conv as conv_module
from fastunet.kernels._common import dry_run, launch_log
from fastunet.kernels.conv import conv2d_nhwc
from fastunet.tooling.compile_report import collect_variants, compile_variant, with_candidates

def meta(*shape):
    return torch.empty(*shape, device="meta", dtype=torch.bfloat16)

def layers():
    conv2d_nhwc(meta(1, 32, 32, 512), meta(9 * 512, 1024), meta(1024))
    conv2d_nhwc(meta(1, 64, 64, 256), meta(9 * 256, 256), meta(256))

with dry_run(), launch_log() as records:
    layers()
assert [record.path for record in records] == ["pointer", "tma"]
split = [record for record in with_candidates(records) if record.constexprs["SPLIT_K"] > 1]
# The sum launches, as the launcher records them when it runs a split candidate.
conv_module.choose_config = lambda key, candidates, run: next(c for c in candidates if c.get("SPLIT_K"))
with dry_run(), launch_log() as sums:
    layers()
variants = collect_variants([("split/bf16/b1", split + [r for r in sums if r.name.endswith("split_k_sum")])])
json.dump([compile_variant(variant).to_json() for variant in variants], sys.stdout)
"""


def test_sm90_build_split_k_candidates():
    """The split-K candidates build like the chosen tiles (no spills, HGMMA, TMA on the TMA path, no ptxas
    warnings, one tensor-core loop), and so does the sum of their parts."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SPLIT_K_BUILD], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, f"split-K build failed:\n{proc.stderr[-4000:]}"
    rows = json.loads(proc.stdout)
    convs = [row for row in rows if row["kernel"] == "conv3x3"]
    assert {(row["config"]["SPLIT_K"], bool(row["config"]["TMA_ROWS"])) for row in convs} >= {(2, False), (2, True)}
    assert any(row["kernel"] == "conv3x3.split_k_sum" for row in rows)
    found = [
        f"{_label(row)}: {row['tensor_loops']} tensor-core loops, {row['tma_loads']} TMA loads"
        for row in convs
        if row["tensor_loops"] != 1 or bool(row["tma_loads"]) != bool(row["config"]["TMA_ROWS"])
    ]
    report = {"variants": rows}
    found += spill_problems(report) + tensor_core_problems({"variants": convs}, "bf16") + shared_memory_problems(report)
    found += ptxas_problems(report)
    assert not found, "\n".join(found)


# ---------------------------------------------------------------------------------------------------------------
# The backward's elementwise and gather kernels (kernels/backward.py): sm_90 builds of a typical launch
# ---------------------------------------------------------------------------------------------------------------
# Traced in a dry run on ``meta`` tensors (bf16, batch 16, level 0 of the reference config: dec0's first conv reads
# cat([skip0, up0]), 64 channels each, so the gradients at skip0 and at the upsampled map are channel slices of one
# 128-channel gradient), compiled like the report's variants; prints the variants as JSON.
BACKWARD_BUILD = """
import json, sys
import torch
from fastunet.kernels._common import dry_run, launch_log
from fastunet.kernels.backward import activation_pool_backward_nhwc, center_pad_offsets, upsample2x_adjoint_nhwc
from fastunet.tooling.compile_report import collect_variants, compile_variant

def meta(*shape):
    return torch.empty(*shape, device="meta", dtype=torch.bfloat16)

with dry_run(), launch_log() as records:
    grad_in = meta(16, 512, 512, 128)
    activation_pool_backward_nhwc(meta(16, 512, 512, 64), grad_in[..., :64], meta(16, 256, 256, 64))
    top, left = center_pad_offsets(512, 512, 512, 512)
    for mode, corners in (("bilinear", False), ("bilinear", True), ("nearest", False)):
        upsample2x_adjoint_nhwc(grad_in[..., 64:], (256, 256), mode, corners, pad_top=top, pad_left=left,
                                gate=meta(16, 256, 256, 64))
variants = collect_variants([("backward/bf16/b16", records)])
json.dump([compile_variant(variant).to_json() for variant in variants], sys.stdout)
"""


def test_sm90_build_backward_kernels():
    """The activation/max-pool backward and the three upsample adjoints (nearest, bilinear, bilinear with
    align_corners; gated) build for sm_90: no spills, at most 255 registers, resident CTAs, no ptxas warnings."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", BACKWARD_BUILD], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"backward build failed:\n{proc.stderr[-4000:]}"
    rows = json.loads(proc.stdout)
    built = sorted((row["kernel"], row["config"].get("MODE")) for row in rows)
    assert built == [("activation_pool_backward+pool", None)] + [("upsample2x_adjoint+gate", m) for m in (0, 1, 2)]
    assert all(row["arch"] == "sm_90" and row["config"]["dtype"] == "bf16" for row in rows)
    found = []
    for row in rows:
        label = f"{row['kernel']} MODE={row['config'].get('MODE')} BLOCK_P={row['config']['BLOCK_P']}"
        if row["spill_bytes"] or row["local_ops"] or not 0 < row["registers"] <= 255 or not row["ctas_per_sm"]:
            found.append(f"{label}: {row['registers']} regs, {row['spill_bytes']} B/thread spilled, "
                         f"{row['local_ops']} LDL/STL, {row['ctas_per_sm']} CTAs/SM")  # fmt: skip
        found += [f"{label}: {warning}" for warning in row["ptxas_warnings"]]
    assert not found, "\n".join(found)


# ---------------------------------------------------------------------------------------------------------------
# The 3x3 stride-2 down-sampling conv's backward: the polyphase input gradient on the forward conv kernel (TMA row
# boxes where the map is wide enough, pointer loads on a narrow one) and the weight gradient reading x at a stride
# ---------------------------------------------------------------------------------------------------------------
# Traced in a dry run on ``meta`` tensors for sm_90 (bf16, batch 2, nnU-Net's second and third stages at 256x256:
# 32 -> 64 and 64 -> 128 channels, odd sizes for the narrow pointer-path case), compiled like the report's variants.
STRIDED_BUILD = """
import json, sys
import torch
from fastunet.kernels._common import dry_run, launch_log, modeled_target
from fastunet.kernels.conv_grad import conv2d_input_grad_nhwc, conv2d_weight_grad_nhwc
from fastunet.tooling.compile_report import collect_variants, compile_variant

def meta(*shape):
    return torch.empty(*shape, device="meta", dtype=torch.bfloat16)

with modeled_target(132, 90), dry_run(), launch_log() as records:
    for c_in, c_out, size in ((32, 64, 256), (64, 128, 128), (64, 128, 61)):
        half = (size + 1) // 2
        dz = meta(2, half, half, c_out)
        conv2d_input_grad_nhwc(dz, meta(9 * c_in, c_out), c_in, stride=2, in_size=(size, size))
        conv2d_weight_grad_nhwc(meta(2, size, size, c_in), dz, 3, 1, stride=2)
variants = collect_variants([("strided/bf16/b2", records)])
paths = {(r.name, r.path) for r in records}
print(json.dumps({"paths": sorted(paths), "rows": [compile_variant(v).to_json() for v in variants]}))
"""


def test_sm90_build_strided_conv_backward():
    """The stride-2 conv's backward variants build for sm_90: the polyphase input gradient on both load paths with
    the warpgroup MMA (HGMMA), the strided weight gradient on both load paths (TMA pixel-pair row boxes over an even
    input width, pointer loads over the odd 61-pixel one) with HGMMA in its 64-channel tiles; no spills, no ptxas
    warnings, nothing the report flags."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", STRIDED_BUILD], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"strided backward build failed:\n{proc.stderr[-4000:]}"
    result = json.loads(proc.stdout)
    assert {tuple(p) for p in result["paths"]} >= {
        ("conv3x3/2.input_grad", "tma"),
        ("conv3x3/2.input_grad", "pointer"),
        ("conv_weight_grad", "tma"),
        ("conv_weight_grad", "pointer"),
    }
    rows = result["rows"]
    polyphase = [row for row in rows if row["config"].get("POLYPHASE")]
    strided = [row for row in rows if row["kernel"] == "conv_weight_grad" and row["config"]["STRIDE"] == 2]
    assert {row["config"]["TMA_ROWS"] > 0 for row in polyphase} == {True, False}
    assert len(strided) >= 2 and {row["config"]["TMA"] for row in strided} == {True, False}
    found = spill_problems({"variants": rows}) + ptxas_problems({"variants": rows})
    found += [f"{_label(row)}: {row['problems']}" for row in rows if row["problems"]]
    found += tensor_core_problems({"variants": polyphase}, "bf16")
    for row in strided:
        c = row["config"]
        mma = "HGMMA" if c["BLOCK_C"] >= 64 else "HMMA"
        if not row["mma_opcodes"] or not all(op.startswith(mma) for op in row["mma_opcodes"]):
            found.append(f"conv_weight_grad {c['BLOCK_C']}x{c['BLOCK_N']}x{c['BLOCK_P']}: {row['mma_opcodes']}")
    assert not found, "\n".join(found)


# ---------------------------------------------------------------------------------------------------------------
# The training step (--training): every backward variant of a small U-Net builds, and the model has the step
# ---------------------------------------------------------------------------------------------------------------
# Base 64 (the reference's channel counts, so the weight gradient takes its 64-row tiles), depth 1, 64x64, batch 2:
# about 30 variants, 30 s on 2 cores.
TRAIN_MODEL = {"in_channels": 3, "num_classes": 2, "base_channels": 64, "depth": 1}
TRAIN_SHAPE = (2, 3, 64, 64)
TRAIN_UPSAMPLES = ("bilinear", "transpose")
# The backward's kernels in a bilinear and a transposed-conv U-Net; the forward conv kernel also runs the input
# gradients (conv3x3, conv2x2/2 for the transposed conv), with the ReLU derivative of the map they read in the
# epilogue (+mask) where that map's producer is a plain ReLU conv, as the upsample adjoint (+gate) and the head's
# one-pass backward (+mask) with the sum of its partials.
BACKWARD_KERNELS = {
    "activation_pool_backward+pool",
    "conv_weight_grad",
    "conv_weight_grad.sum",
    "upsample2x_adjoint+gate",
    "conv3x3+mask",
    "conv2x2/2+mask",
    "head_backward+mask",
    "head_backward.sum",
}


@pytest.fixture(scope="module")
def training_report(tmp_path_factory) -> dict:
    out_dir = tmp_path_factory.mktemp("training")
    return run_report(
        out_dir, "--dtype", "bf16", "--upsample", *TRAIN_UPSAMPLES, "--batch", str(TRAIN_SHAPE[0]),
        "--size", str(TRAIN_SHAPE[2]), "--depth", str(TRAIN_MODEL["depth"]), "--training",
    )  # fmt: skip


# The training step's launches as the report traces them: in a process without the interpreter (which takes pointer
# loads, hence other tiles and row slices), each record's stage, kernel, FLOPs and launch arguments by name.
TRAINING_TRACE = """
import inspect, json, sys
import torch
from fastunet.tooling.trace import trace_training

model = {**json.loads(sys.argv[1]), "upsample": sys.argv[2]}
rows = []
for r in trace_training(model, tuple(json.loads(sys.argv[3])), torch.bfloat16, sm_count=132, arch=90):
    # The launchers pass their runtime arguments positionally, first in the signature; constexprs by name.
    names = list(inspect.signature(getattr(r.kernel, "fn", r.kernel)).parameters)[: len(r.args)]
    args = {n: a for n, a in zip(names, r.args) if isinstance(a, int)}
    rows.append({"stage": r.stage, "name": r.name, "flops": r.flops, "args": args})
print(json.dumps(rows))
"""


@functools.cache
def _training_trace(upsample: str) -> list:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    argv = [sys.executable, "-c", TRAINING_TRACE, json.dumps(TRAIN_MODEL), upsample, json.dumps(TRAIN_SHAPE)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"training trace failed:\n{proc.stderr[-4000:]}"
    return [types.SimpleNamespace(**row) for row in json.loads(proc.stdout)]


def test_sm90_build_training_step(training_report):
    """``--training``: each training step's launches are all compiled (forward as the training path runs it, then the
    backward), with no spills, no ptxas warning (wgmma serialization), HGMMA in every conv and in every weight
    gradient whose tile has 64 rows (HMMA under that: wgmma's smallest M), and the weight gradient's main loop found
    with the issue ratio of its own tile (BLOCK_C x BLOCK_N x BLOCK_P)."""
    report = training_report
    assert report["configuration"]["training"] is True
    rows = report["variants"]
    labels = {label for row in rows for label in row["used_by"]}
    assert labels == {f"{p}{u}/bf16/b2" for p in ("", "train-") for u in TRAIN_UPSAMPLES}
    traced = {u: _training_trace(u) for u in TRAIN_UPSAMPLES}
    for upsample, records in traced.items():
        label = f"train-{upsample}/bf16/b2"
        built = {row["kernel"] for row in rows if label in row["used_by"]}
        assert {r.name for r in records} == built, upsample
    trained = [row for row in rows if any(label.startswith("train-") for label in row["used_by"])]
    assert BACKWARD_KERNELS <= {row["kernel"] for row in trained}
    assert sum(row["launches"] for row in rows) == sum(map(len, traced.values())) + sum(
        expected_launches(u, TRAIN_MODEL["depth"]) for u in TRAIN_UPSAMPLES
    )
    found = spill_problems({"variants": trained}) + ptxas_problems({"variants": trained})
    found += [f"{_label(row)}: {row['problems']}" for row in trained if row["problems"]]
    for row in trained:
        if row["kernel"] != "conv_weight_grad":
            continue
        c, tile = row["config"], row["gemm_tile"]
        label = f"conv_weight_grad {c['BLOCK_C']}x{c['BLOCK_N']}x{c['BLOCK_P']} KSIZE={c['KSIZE']}"
        if tile != [c["BLOCK_C"], c["BLOCK_N"], c["BLOCK_P"]]:
            found.append(f"{label}: GEMM tile {tile}")
            continue
        # wgmma needs 64 rows of the accumulator: BLOCK_C, or BLOCK_N where PACK_TAPS computes dW^T = dz^T A.
        mma = "HGMMA" if (c["BLOCK_N"] if c.get("PACK_TAPS") else c["BLOCK_C"]) >= 64 else "HMMA"
        if not row["mma_opcodes"] or not all(op.startswith(mma) for op in row["mma_opcodes"]):
            found.append(f"{label}: expected {mma}, got {row['mma_opcodes']}")
        # Both operands by TMA in every weight gradient of this net but the first conv's (3 channels), whose strides
        # are not 16-byte multiples (the head's gradients have a kernel of their own).
        tma = c["BLOCK_C"] >= 64 and c["BLOCK_N"] > 16
        if c["TMA"] != tma or bool(row["tma_loads"]) != tma or (tma and row["cp_async"]):
            found.append(f"{label}: TMA {c['TMA']}, {row['tma_loads']} TMA loads, {row['cp_async']} cp.async")
        if not row["loops"] or any(loop["mma"] == 0 or loop["k_steps"] != 1 for loop in row["loops"]):
            found.append(f"{label}: main loop {row['loops']}")
            continue
        clocks = 2 * math.prod(tile) / (H200_PEAK["bf16"] / H200_SMS / H200_CLOCK)
        ratio = c["num_warps"] * row["mainloop_instructions"] / 4 / clocks
        if row["issue_ratio"] != pytest.approx(ratio, rel=1e-3) or row["tensor_clocks"] != pytest.approx(
            clocks, rel=1e-5
        ):
            found.append(f"{label}: issue ratio {row['issue_ratio']}, its counts give {ratio:.3f}")
    assert not found, "\n".join(found)


def test_weight_gradient_resident_ctas_estimate_matches_the_build(training_report):
    """The split choice's estimate of a weight-gradient tile's resident CTAs an SM (from its block sizes, before
    compiling) equals what the build's registers and shared memory give, for every weight-gradient variant of the
    training steps (the packed-taps first conv, the head's narrow tile, 64- and 128-channel TMA tiles)."""
    from fastunet.kernels.conv_grad import ctas_per_sm

    rows = [row for row in training_report["variants"] if row["kernel"] == "conv_weight_grad"]
    assert len({(r["config"]["BLOCK_C"], r["config"]["BLOCK_N"], r["config"]["BLOCK_P"]) for r in rows}) >= 3
    found = []
    for row in rows:
        c = row["config"]
        estimate = ctas_per_sm(c["BLOCK_P"], c["BLOCK_C"], c["BLOCK_N"], 2, 4, bool(c.get("PACK_TAPS")))
        if estimate != row["ctas_per_sm"]:
            found.append(
                f"{c['BLOCK_C']}x{c['BLOCK_N']}x{c['BLOCK_P']} PACK_TAPS={c.get('PACK_TAPS')}: estimate {estimate}, "
                f"build {row['ctas_per_sm']} ({row['registers']} registers, {row['shared_bytes']} B shared)"
            )
    assert not found, "\n".join(found)


def test_training_step_model(training_report):
    """The ``model`` list holds each forward and, next to it, each training step: launch by launch the traced
    training step (stages, kernels, FLOPs, the variant each runs), its ``ms`` the sum of its launches and of its
    forward and backward parts, no launch under its memory or tensor-core floor; each weight gradient runs the
    K-steps of its row slice, rows_per_split x blocks_per_row (BLOCK_P-pixel blocks of a row)."""
    models = {(m["step"], m["upsample"]): m for m in training_report["model"]}
    assert set(models) == {(step, u) for step in ("forward", "training") for u in TRAIN_UPSAMPLES}
    found = []
    for upsample in TRAIN_UPSAMPLES:
        model, forward = models["training", upsample], models["forward", upsample]
        assert model["label"] == f"train-{upsample}/bf16/b2" and forward["label"] == f"{upsample}/bf16/b2"
        assert forward["backward_ms"] is None and forward["forward_ms"] == forward["ms"]
        records = _training_trace(upsample)
        layers = model["layers"]
        if [(la["stage"], la["kernel"], la["flops"]) for la in layers] != [(r.stage, r.name, r.flops) for r in records]:
            found.append(f"{upsample}: launches {[(la['stage'], la['kernel']) for la in layers]}")
            continue
        backward = [la for la in layers if la["stage"].endswith(".backward")]
        assert backward and len(backward) < len(layers)
        forward_us = sum(la["time_us"] for la in layers if not la["stage"].endswith(".backward"))
        backward_us = sum(la["time_us"] for la in backward)
        checks = {
            "ms": (model["ms"], (forward_us + backward_us) / 1e3),
            "forward_ms": (model["forward_ms"], forward_us / 1e3),
            "backward_ms": (model["backward_ms"], backward_us / 1e3),
        }
        found += [
            f"{upsample} {k}: {got} != {want}"
            for k, (got, want) in checks.items()
            if got != pytest.approx(want, rel=1e-3)
        ]
        for layer, record in zip(layers, records, strict=True):
            if record.name == "conv_weight_grad":
                values = record.args
                per_split, per_row = values["rows_per_split"], values["blocks_per_row"]
                if layer["k_steps"] != [per_split * per_row] or not layer["issue_ratio"]:
                    found.append(f"{upsample} {layer['stage']}: K-steps {layer['k_steps']}, {per_split} rows per slice")
            variant = training_report["variants"][layer["variant"]]
            if variant["kernel"] != layer["kernel"] or model["label"] not in variant["used_by"]:
                found.append(f"{upsample} {layer['stage']} {layer['kernel']}: variant {variant['kernel']}")
            floor_us = max(layer["bytes"] / H200_BANDWIDTH, layer["flops"] / H200_PEAK["bf16"]) * 1e6
            if layer["time_us"] is None or layer["time_us"] < floor_us * (1 - 1e-5):
                found.append(f"{upsample} {layer['stage']} {layer['kernel']}: {layer['time_us']} us < {floor_us}")
    assert not found, "\n".join(found)


def test_sm80_build_training_step(tmp_path):
    """Ampere: the same training steps build for sm_80 with the warp MMA (HMMA) in every GEMM, no spills, no ptxas
    warnings, and a modeled training step on the A100 assumptions."""
    report = run_report(
        tmp_path, "--dtype", "bf16", "--upsample", *TRAIN_UPSAMPLES, "--batch", str(TRAIN_SHAPE[0]),
        "--size", str(TRAIN_SHAPE[2]), "--depth", str(TRAIN_MODEL["depth"]), "--training", arch=80,
    )  # fmt: skip
    trained = [row for row in report["variants"] if any(u.startswith("train-") for u in row["used_by"])]
    assert BACKWARD_KERNELS <= {row["kernel"] for row in trained}
    found = spill_problems({"variants": trained}) + ptxas_problems({"variants": trained})
    found += [f"{_label(row)}: {row['problems']}" for row in trained if row["problems"]]
    found += [
        f"{_label(row)}: opcodes {row['mma_opcodes']}, loops {len(row['loops'])}"
        for row in trained
        if row["gemm_tile"] and (row["hgmma"] or set(row["mma_opcodes"]) != {HMMA_OPCODE["bf16"]} or not row["loops"])
    ]
    steps = {(m["step"], m["upsample"], m["gpu"]) for m in report["model"]}
    assert steps == {(s, u, "A100 SXM") for s in ("forward", "training") for u in TRAIN_UPSAMPLES}
    assert not found, "\n".join(found)
