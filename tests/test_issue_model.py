"""The SASS issue model without a compiler: the loop finder on hand-written SASS, and the launch model on made-up
launches, each against arithmetic done here."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import subprocess
import sys
import threading
import types

import pytest
import torch

from fastunet.kernels._common import modeled_target, sm_count
from fastunet.tooling import issue_model

# A kernel in cuobjdump's layout (second encoding words on their own lines, as cuobjdump prints them):
#   0x000-0x040 prologue with one cp.async,
#   0x050-0x0f0 loop A: one K-step of a 128x128x64 tile on 2 warpgroups (4 HGMMA.64x128x16), a TMA load, and a
#               second backward branch to the loop head at 0x0d0 (a "continue"),
#   0x100-0x130 a loop without tensor-core instructions,
#   0x140-0x260 an outer loop around loop B at 0x160-0x230: two K-steps per iteration (8 HGMMA, unrolled), two
#               cp.async loads,
#   0x270       an HGMMA outside every loop (a fused epilogue GEMM), then the trailing self-branch.
SASS_90 = """
	code for sm_90a
		Function : toy_kernel
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                               /* 0x00000a00ff017b82 */
                                                                                        /* 0x000fe20000000800 */
        /*0010*/                   S2R R0, SR_TID.X ;                                   /* 0x0000000000007919 */
                                                                                        /* 0x000e220000002100 */
        /*0020*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;                  /* 0x000000100000780c */
        /*0030*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64] ;        /* 0x0000000004027fae */
        /*0040*/                   ULDC UR4, c[0x0][0x20] ;                             /* 0x0000080000047ab9 */
        /*0050*/                   IMAD R6, R0, 0x2, R1 ;                               /* 0x0000000200067824 */
        /*0060*/                   UTMALDG.4D [UR8], [UR10] ;                           /* 0x00000008000075b4 */
        /*0070*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;                        /* 0x0000000000007b1d */
        /*0080*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspB, R24 ; /* 0x41e00000081879f0 */
        /*0090*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR12].tnspB, R24 ; /* 0x41e000000c1879f0 */
        /*00a0*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR16].tnspB, R24 ; /* 0x41e00000101879f0 */
        /*00b0*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR20].tnspB, R24, gsb0 ; /* 0x41e0000014 */
        /*00c0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;                      /* 0x00008000000079c5 */
        /*00d0*/               @P6 BRA 0x50 ;                                           /* 0xffffffec00f05947 */
        /*00e0*/                   ISETP.GE.AND P1, PT, R7, R8, PT ;                    /* 0x000000080700720c */
        /*00f0*/              @!P1 BRA 0x50 ;                                           /* 0xffffffec00f09947 */
        /*0100*/                   IADD3 R9, R9, 0x1, RZ ;                              /* 0x0000000109097810 */
        /*0110*/                   STS [R9], RZ ;                                       /* 0x000000ff09007388 */
        /*0120*/                   ISETP.NE.AND P2, PT, R9, 0x4, PT ;                   /* 0x000000040900780c */
        /*0130*/               @P2 BRA 0x100 ;                                          /* 0xfffffffc00f02947 */
        /*0140*/                   IMAD.MOV.U32 R10, RZ, RZ, RZ ;                       /* 0x000000ffff0a7224 */
        /*0150*/                   MOV R11, 0x400 ;                                     /* 0x00000400000b7802 */
        /*0160*/                   LDGSTS.E.BYPASS.128 [R11], desc[UR4][R12.64], P3 ;   /* 0x000000000c0b7fae */
        /*0170*/                   LDGSTS.E.BYPASS.128 [R11+0x800], desc[UR4][R14.64] ; /* 0x008000000e0b7fae */
        /*0180*/                   LDGDEPBAR ;                                          /* 0x00000000000079af */
        /*0190*/                   DEPBAR.LE SB0, 0x1 ;                                 /* 0x000080800000791a */
        /*01a0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;                        /* 0x0000000000007b1d */
        /*01b0*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspB, R24 ; /* 0x41e00000081879f0 */
        /*01c0*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspB, R24 ; /* 0x41e00000081879f0 */
        /*01d0*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspB, R24 ; /* 0x41e00000081879f0 */
        /*01e0*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspB, R24 ; /* 0x41e00000081879f0 */
        /*01f0*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspB, R24 ; /* 0x41e00000081879f0 */
        /*0200*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspB, R24 ; /* 0x41e00000081879f0 */
        /*0210*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspB, R24 ; /* 0x41e00000081879f0 */
        /*0220*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspB, R24, gsb0 ; /* 0x41e000000818 */
        /*0230*/               @P4 BRA 0x160 ;                                          /* 0xffffffec00f04947 */
        /*0240*/                   IADD3 R15, R15, 0x1, RZ ;                            /* 0x000000010f0f7810 */
        /*0250*/                   ISETP.LT.AND P5, PT, R15, R16, PT ;                  /* 0x000000100f00720c */
        /*0260*/               @P5 BRA 0x140 ;                                          /* 0xfffffffc00f05947 */
        /*0270*/                   HGMMA.64x32x16.F32.BF16 R60, R40, gdesc[UR24], RZ, gsb0 ; /* 0x41e000001818 */
        /*0280*/                   EXIT ;                                               /* 0x000000000000794d */
        /*0290*/                   BRA 0x290;                                           /* 0xfffffffc00fc7947 */
"""
TILE = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}
WARPS = 8


def h200_tensor_clocks(tile: dict) -> float:
    """Tensor-core clocks of one K-step of ``tile``: its FLOPs at 790 TFLOP/s shared by 132 SMs at 1.75 GHz."""
    return 2 * math.prod(tile.values()) / (790e12 / 132 / 1.75e9)


def test_parse_reads_addresses_opcodes_and_branch_targets():
    instructions = issue_model.parse_sass(SASS_90)
    assert len(instructions) == 0x290 // 16 + 1  # encoding continuation lines are not instructions
    assert [ins.address for ins in instructions] == list(range(0, 0x2A0, 0x10))
    by_address = {ins.address: ins for ins in instructions}
    assert by_address[0xF0].opcode == "BRA" and by_address[0xF0].target == 0x50
    assert by_address[0x60].opcode == "UTMALDG.4D" and by_address[0x60].target is None
    assert by_address[0x80].opcode == "HGMMA.64x128x16.F32.BF16"


def test_loops_from_backward_branches():
    loops = issue_model.find_loops(issue_model.parse_sass(SASS_90))
    # Two branches back to 0x50 make one loop; the self-branch after EXIT is no loop.
    assert loops == [(0x50, 0xF0), (0x100, 0x130), (0x140, 0x260), (0x160, 0x230)]


def test_innermost_tensor_core_loops_and_their_counts():
    clocks = h200_tensor_clocks(TILE)
    found = issue_model.analyze(SASS_90, TILE, "bf16", WARPS, issue_model.H200)
    first, second = found.loops
    # Loop A: 11 instructions, one K-step (4 x 64x128x16 on each of 2 warpgroups = 128x128x64).
    assert (first.first, first.last, first.instructions, first.mma) == (0x50, 0xF0, 11, 4)
    assert (first.k_steps, first.instructions_per_k_step) == (1, 11)
    assert (first.tma_loads, first.cp_async, first.barriers) == (1, 0, 1)
    # Loop B, not the loop around it: 14 instructions covering two K-steps, so 7 per K-step.
    assert (second.first, second.last, second.instructions, second.mma) == (0x160, 0x230, 14, 8)
    assert (second.k_steps, second.instructions_per_k_step) == (2, 7)
    assert (second.tma_loads, second.cp_async, second.barriers) == (0, 2, 1)
    assert found.tensor_clocks == pytest.approx(clocks)
    assert first.issue_ratio == pytest.approx(WARPS * 11 / 4 / clocks)
    assert second.issue_ratio == pytest.approx(WARPS * 7 / 4 / clocks)
    summary = found.summary()
    assert summary["mainloop_instructions"] == 11 and summary["tma_loads"] == 1 and summary["cp_async"] == 0
    assert summary["issue_ratio"] == pytest.approx(WARPS * 11 / 4 / clocks, abs=1e-3)
    assert summary["tensor_loops"] == 2


def test_loop_over_tiles_is_no_k_step_loop():
    """A persistent kernel: the loop over tiles holds the K loop and, once a tile, a fused head's GEMM. Only the K
    loop is a tensor-core loop; without the rule the outer loop would count as a second, costlier one."""
    lines = SASS_90.splitlines()
    at = next(i for i, line in enumerate(lines) if "/*0240*/" in line)
    head = "        /*0244*/                   HGMMA.64x32x16.F32.BF16 R60, R40, gdesc[UR24], RZ, gsb0 ;"
    found = issue_model.analyze("\n".join([*lines[:at], head, *lines[at:]]), TILE, "bf16", WARPS, issue_model.H200)
    assert [(loop.first, loop.last) for loop in found.loops] == [(0x50, 0xF0), (0x160, 0x230)]
    assert found.loops[1].instructions == 14


def test_labels_as_nvdisasm_prints_them():
    sass = """
        /*0000*/                   MOV R0, RZ ;
.L_x_0:
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0020*/                   HMMA.16816.F32.BF16 R16, R8, R14, R16 ;
        /*0030*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64] ;
        /*0040*/                   ISETP.NE.AND P0, PT, R0, R1, PT ;
        /*0050*/               @P0 BRA `(.L_x_0) ;
        /*0060*/                   EXIT ;
"""
    tile = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}
    (loop,) = issue_model.analyze(sass, tile, "bf16", 4, issue_model.A100).loops
    assert (loop.first, loop.last, loop.instructions, loop.cp_async) == (0x10, 0x50, 5, 1)
    # 2 HMMA.16816 (16x8x16 each) on each of 4 warps = 32x32x16: one K-step per iteration.
    assert loop.k_steps == 1
    a100_clocks = 2 * 32 * 32 * 16 / (312e12 / 108 / 1.41e9)
    assert loop.issue_ratio == pytest.approx(4 * 5 / 4 / a100_clocks)


def test_k_step_of_a_tile_smaller_than_the_warps():
    """A 16x16x64 tile on 8 warps: each warp runs the m16n8k16 MMA on one 16x8 piece (several warps the same
    one), so 4 HMMA per warp are one K-step, not four."""
    body = "".join(f"        /*{0x10 * i:04x}*/                   HMMA.16816.F32 R4, R8, R12, R4 ;\n" for i in range(4))
    sass = body + "        /*0040*/               @P0 BRA 0x0 ;\n"
    (loop,) = issue_model.analyze(sass, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64}, "fp16", 8, None).loops
    assert (loop.instructions, loop.mma, loop.k_steps, loop.instructions_per_k_step) == (5, 4, 1, 5)


def test_no_tensor_core_loop():
    found = issue_model.analyze(SASS_90.replace("HGMMA", "NOP"), TILE, "bf16", WARPS, issue_model.H200)
    assert found.loops == () and found.summary()["issue_ratio"] is None


# ---------------------------------------------------------------------------------------------------------------
# Launches and the forward
# ---------------------------------------------------------------------------------------------------------------
_CONV_PARAMS = tuple(types.SimpleNamespace(name=n, is_constexpr=False) for n in ("x_ptr", "c_main", "c_up"))


def fake_record(grid, c_main=256, c_up=0, flops=None, nbytes=1 << 20, **constexprs):
    """A launch record of a made-up conv kernel with the launchers' argument names."""
    kernel = types.SimpleNamespace(params=_CONV_PARAMS)
    c = {"KSIZE": 3, "TWO_SOURCES": bool(c_up), "PACKED_K": 0, **TILE, **constexprs}
    return types.SimpleNamespace(
        name="conv",
        kernel=kernel,
        grid=grid,
        flops=flops if flops is not None else 2 * math.prod(grid) * 128 * 128 * 9 * (c_main + c_up),
        bytes_read=nbytes // 2,
        bytes_written=nbytes - nbytes // 2,
        args=(None, c_main, c_up),
        constexprs=c,
    )


def fake_variant(instructions: tuple[int, ...], ctas_per_sm=1, warps=WARPS, tile=TILE):
    clocks = h200_tensor_clocks(tile)
    loops = tuple(
        issue_model.TensorLoop(
            first=i,
            last=i + 1,
            instructions=n,
            mma=4,
            mma_opcodes=(),
            k_steps=1.0,
            instructions_per_k_step=n,
            tma_loads=0,
            cp_async=0,
            global_loads=0,
            barriers=0,
            tensor_clocks=clocks,
            issue_clocks=warps * n / 4,
            issue_ratio=warps * n / 4 / clocks,
        )
        for i, n in enumerate(instructions)
    )
    return types.SimpleNamespace(
        mainloop=issue_model.MainLoop(loops, clocks), ctas_per_sm=ctas_per_sm, num_warps=warps, dtype="bf16"
    )


def test_k_steps_per_source():
    assert issue_model.k_steps_per_source(fake_record((4, 1), c_main=512, c_up=1024)) == [72, 144]
    assert issue_model.k_steps_per_source(fake_record((4, 1), c_main=100)) == [9 * 2]
    packed = fake_record((4, 1), c_main=3, PACKED_K=True, BLOCK_K=32)
    assert issue_model.k_steps_per_source(packed) == [1]  # 27 (tap, channel) pairs in one 32-wide K block
    # Split K: each part runs its share of the steps (the fullest part's count)
    assert issue_model.k_steps_per_source(fake_record((4, 1, 2), c_main=512, SPLIT_K=2)) == [36]
    assert issue_model.k_steps_per_source(fake_record((4, 1, 4), c_main=100, SPLIT_K=4)) == [5]


@pytest.mark.parametrize("ctas, busiest", [(132, 1), (133, 2), (264, 2), (1000, 8)])
def test_wave_quantization(ctas, busiest):
    h200 = issue_model.H200
    record = fake_record((ctas, 1), c_main=256)
    layer = issue_model.model_layer("s", record, fake_variant((100,), ctas_per_sm=2), h200)
    k = 9 * 256 // 64
    tensor = busiest * k * 2 * 128 * 128 * 64 * 132 / 790e12
    issue = busiest * k * WARPS * 100 / 4 / 1.75e9
    assert layer.ctas_per_busiest_sm == busiest and layer.waves == -(-ctas // 264)
    assert layer.tensor_s == pytest.approx(tensor) and layer.issue_s == pytest.approx(issue)
    assert layer.time_s == pytest.approx(max(tensor, issue / 0.7, (1 << 20) / 4.3e12))


@pytest.mark.parametrize(
    "tiles, programs, busiest",
    [(1000, 264, 8), (1000, 132, 8), (133, 132, 2), (300, 264, 3), (64, 64, 1), (7, 2, 4)],
)
def test_persistent_launch(tiles, programs, busiest):
    """A persistent launch: its CTAs are its programs, program p runs tiles p, p + programs, ..., programs go to SMs
    breadth-first; the busiest SM's tiles, at one tile's time each (the same K-steps as a launch of one tile a CTA),
    make the launch's time."""
    expected = max(
        sum(len(range(p, tiles, programs)) for p in range(programs) if p % 132 == sm) for sm in range(132)
    )  # fmt: skip
    assert expected == busiest
    assert issue_model.busiest_sm_tiles(tiles, programs, 132) == busiest
    flops = 2 * tiles * 128 * 128 * 9 * 256
    record = fake_record((programs,), flops=flops, PERSISTENT=True)
    record.persistent_tiles = tiles
    layer = issue_model.model_layer("s", record, fake_variant((100,), ctas_per_sm=2), issue_model.H200)
    plain = issue_model.model_layer("s", fake_record((tiles, 1), flops=flops), fake_variant((100,)), issue_model.H200)
    assert layer.persistent and layer.kernel == "conv+persistent" and not plain.persistent
    assert layer.ctas == programs and layer.tiles == tiles and layer.ctas_per_busiest_sm == busiest
    assert layer.k_steps == plain.k_steps == (9 * 256 // 64,)
    per_tile = plain.issue_s / plain.ctas_per_busiest_sm
    assert layer.issue_s == pytest.approx(busiest * per_tile)


def test_bounds_and_eta():
    record = fake_record((264, 1))
    lean, busy = fake_variant((100,)), fake_variant((400,))
    assert issue_model.model_layer("s", record, lean, issue_model.H200).bound == "tensor"
    slow = issue_model.model_layer("s", record, busy, issue_model.H200)
    assert slow.bound == "issue" and slow.time_s == pytest.approx(slow.issue_s / 0.7)
    half = issue_model.model_layer("s", record, busy, dataclasses.replace(issue_model.H200, eta=0.35))
    assert half.time_s == pytest.approx(2 * slow.time_s)
    flood = issue_model.model_layer("s", fake_record((264, 1), nbytes=10**10), lean, issue_model.H200)
    assert flood.bound == "memory" and flood.time_s == pytest.approx(10**10 / 4.3e12)


def test_two_source_loops_get_their_own_k_steps():
    """A decoder conv: the skip loop (cheap) runs c_main's K-steps, the upsampled loop (costly) c_up's."""
    record = fake_record((132, 1), c_main=64, c_up=128)
    layer = issue_model.model_layer("s", record, fake_variant((100, 1000)), issue_model.H200)
    assert layer.k_steps == (9, 18)
    clocks = h200_tensor_clocks(TILE)
    expected = 9 * max(clocks, WARPS * 100 / 4 / 0.7) + 18 * max(clocks, WARPS * 1000 / 4 / 0.7)
    assert layer.time_s == pytest.approx(expected / 1.75e9)


def test_forward_totals_and_a_launch_that_cannot_run():
    records = [fake_record((264, 1)), fake_record((132, 2), nbytes=10**9)]
    variants = [fake_variant((300,)), fake_variant((100,))]
    model = issue_model.model_forward("bilinear", "bf16", 512, 16, ["a", "b"], records, variants, issue_model.H200)
    total = sum(layer.time_s for layer in model.layers)
    flops = sum(r.flops for r in records)
    assert model.time_s == pytest.approx(total)
    assert model.fraction_of_peak == pytest.approx(flops / total / 790e12)
    row = model.to_json()
    assert row["ms"] == pytest.approx(total * 1e3, rel=1e-3) and len(row["layers"]) == 2
    broken = issue_model.model_forward(
        "bilinear", "bf16", 512, 16, ["a"], records[:1], [fake_variant((300,), ctas_per_sm=0)], issue_model.H200
    )
    assert broken.layers[0].bound == "cannot launch" and broken.time_s is None and broken.to_json()["ms"] is None


def test_fit_eta():
    issue = [1.0, 2.0, 3.0, 0.1]
    floors = [0.5, 0.5, 0.5, 0.5]
    measured = [1.0 / 0.6, 2.0 / 0.6, 3.0 / 0.6, 0.6]  # the last launch is not issue-bound
    assert issue_model.fit_eta(issue, measured, floors) == pytest.approx(0.6)
    assert issue_model.fit_eta([0.1], [1.0], [0.5]) is None


def test_eta_choice(monkeypatch):
    monkeypatch.setattr(issue_model, "ETA_FITS", ())
    assert issue_model.assumptions_for(90).eta == issue_model.DEFAULT_ETA
    assert issue_model.assumptions_for(90, 0.5).eta == 0.5
    with pytest.raises(ValueError, match="eta must be in"):
        issue_model.assumptions_for(90, 1.5)
    fit = issue_model.EtaFit(arch=90, gpu="H200", eta=0.55, source="bench/results/x.json")
    monkeypatch.setattr(issue_model, "ETA_FITS", (fit,))
    chosen = issue_model.assumptions_for(90)
    assert chosen.eta == 0.55 and "x.json" in chosen.eta_source
    assert issue_model.assumptions_for(80).eta == issue_model.DEFAULT_ETA
    assert issue_model.assumptions_for(75) is None


def test_modeled_target_is_per_thread():
    x = torch.empty(1, device="meta")
    seen = {}
    with modeled_target(108):
        assert sm_count(x) == 108
        other = threading.Thread(target=lambda: seen.update(target=sm_count(x)))
        other.start()
        other.join()
    assert seen["target"] == 132
    assert sm_count(x) == 132


def test_straight_line_kernel_is_one_pass():
    """Tensor-core instructions outside every loop and no loop holding any (a single K block, unrolled): the whole
    kernel is one pass, every instruction counted once (the trailing self-branch included)."""
    ops = [
        "LDC R1, c[0x0][0x28]",
        "IMAD R2, R1, 0x2, RZ",
        "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24",
        "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], R24",
        "STG.E desc[UR4][R2.64], R24",
        "EXIT",
        "BRA 0x60",
    ]
    sass = "\n".join(f"        /*{16 * i:04x}*/                   {op} ;" for i, op in enumerate(ops))
    (loop,) = issue_model.tensor_loops(issue_model.parse_sass(sass), (64, 64, 32), 4, 100.0, 4)
    assert (loop.first, loop.last) == (0, 0x60)
    assert loop.mma == 2 and loop.instructions == 7 and loop.k_steps == 1
    assert loop.issue_ratio == pytest.approx(4 * 7 / 4 / 100.0)


def test_out_of_line_wait_is_no_loop():
    """TMA loops wait on an mbarrier whose retry path sits after the kernel's exit and jumps back into the loop. That
    backward jump straddles the loop's end and closes no loop: counting it would take the epilogue (and its fused
    head's HGMMA) for a main loop of several hundred instructions."""
    ops = [
        "UTMALDG.4D [UR8], [UR10]",  # 0x00 prologue load
        "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR7], R5",  # 0x10 loop head: wait for the stage
        "@!P0 BRA 0xa0",  # 0x20 not ready yet: the out-of-line retry
        "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4].tnspB, R24",  # 0x30 resumes here
        "UTMALDG.4D [UR8], [UR10]",
        "@P1 BRA 0x10",  # 0x50 loop end
        "HGMMA.64x16x16.F32.BF16 R40, R24, gdesc[UR16].tnspB, R40",  # 0x60 epilogue GEMM
        "STG.E desc[UR4][R2.64], R40",
        "EXIT",
        "NOP",
        "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR7], R5",  # 0xa0 retry: spin, then back into the loop
        "@!P0 BRA 0xa0",
        "BRA 0x30",  # 0xc0
        "BRA 0xd0",
    ]
    sass = "\n".join(f"        /*{16 * i:04x}*/                   {op} ;" for i, op in enumerate(ops))
    instructions = issue_model.parse_sass(sass)
    assert issue_model.find_loops(instructions) == [(0x10, 0x50), (0xA0, 0xB0)]
    (loop,) = issue_model.tensor_loops(instructions, (64, 64, 16), 4, 100.0, 4)
    assert (loop.first, loop.last, loop.instructions, loop.mma, loop.tma_loads) == (0x10, 0x50, 5, 1, 1)


# ---------------------------------------------------------------------------------------------------------------
# The weight gradient's GEMM (M: BLOCK_C rows of taps x channels, N: BLOCK_N, K: BLOCK_P pixels) and a training step
# ---------------------------------------------------------------------------------------------------------------
WEIGHT_GRAD_TILE = {"BLOCK_C": 64, "BLOCK_N": 128, "BLOCK_P": 64}


def test_weight_gradient_tile():
    """The weight-gradient kernel's view: its K-step is BLOCK_P pixels of a BLOCK_C x BLOCK_N tile, so one loop
    iteration with 4 HGMMA.64x128x16 (one warpgroup) is one K-step of a 64x128x64 tile."""
    from fastunet.kernels.conv_grad import _weight_grad_partial_kernel

    view = issue_model.gemm_view(_weight_grad_partial_kernel)
    assert view.keys == ("BLOCK_C", "BLOCK_N", "BLOCK_P") and view.k_steps == ("rows_per_split", "blocks_per_row")
    assert issue_model.gemm_view(types.SimpleNamespace()) == issue_model.CONV_VIEW
    ops = ["LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64]"] * 3 + ["HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24"] * 4
    ops += ["IMAD R6, R0, 0x2, R1"] * 92 + ["@P0 BRA 0x0"]
    sass = "\n".join(f"        /*{16 * i:04x}*/                   {op} ;" for i, op in enumerate(ops))
    (loop,) = issue_model.analyze(sass, WEIGHT_GRAD_TILE, "bf16", 4, issue_model.H200, view).loops
    clocks = h200_tensor_clocks({"m": 64, "n": 128, "k": 64})
    assert (loop.instructions, loop.mma, loop.k_steps, loop.cp_async) == (100, 4, 1, 3)
    assert loop.tensor_clocks == pytest.approx(clocks) and loop.issue_ratio == pytest.approx(4 * 100 / 4 / clocks)
    # Read as a conv tile (BLOCK_M x BLOCK_N x BLOCK_K), the same kernel has no tile and no clocks.
    assert issue_model.analyze(sass, WEIGHT_GRAD_TILE, "bf16", 4, issue_model.H200).tensor_clocks is None


def weight_grad_record(grid, rows_per_split: int, blocks_per_row: int, flops: int):
    names = ("x_ptr", "rows", "rows_per_split", "blocks_per_row")
    params = tuple(types.SimpleNamespace(name=n, is_constexpr=False) for n in names)
    kernel = types.SimpleNamespace(__name__="_weight_grad_partial_kernel", params=params)
    return types.SimpleNamespace(
        name="conv_weight_grad",
        kernel=kernel,
        grid=grid,
        flops=flops,
        bytes_read=1 << 20,
        bytes_written=1 << 20,
        args=(None, 576, rows_per_split, blocks_per_row),
        constexprs={"KSIZE": 3, "HAS_BIAS": True, **WEIGHT_GRAD_TILE},
    )


def test_weight_gradient_k_steps_and_layer():
    """A weight-gradient launch: each CTA reduces its slice of ``rows_per_split`` output rows, ``blocks_per_row``
    K-steps each (BLOCK_P pixels of a row per step), rows x blocks K-steps (not the launch's FLOPs over its CTAs:
    the last slice, a row's last block and partial channel blocks do less)."""
    grid = (9, 1, 30)  # 9 (tap, channel block) rows, 1 output-channel block, 30 row slices
    record = weight_grad_record(grid, rows_per_split=25, blocks_per_row=5, flops=2 * 200_000 * 576 * 128)
    assert issue_model.k_steps_per_source(record) == [125]  # 25 rows of 5 blocks
    layer = issue_model.model_layer("enc0.conv2.backward", record, fake_variant((700,), warps=4), issue_model.H200)
    assert layer.tile == "64x128x64" and layer.k_steps == (125,) and layer.note == ""
    clocks = h200_tensor_clocks(TILE)  # fake_variant's loops: TILE's clocks, 700 instructions on 4 warps
    assert layer.ctas_per_busiest_sm == 3
    assert layer.issue_s == pytest.approx(3 * 125 * 4 * 700 / 4 / 1.75e9)
    assert layer.time_s == pytest.approx(max(3 * 125 * max(clocks, 700 / 0.7) / 1.75e9, 2 * (1 << 20) / 4.3e12))
    assert layer.bound == "issue"


def test_weight_gradient_bias_programs_count_apart():
    """A weight gradient's bias programs (launched after its GEMM programs, no tensor-core loop) are left out of the
    tiles the busiest SM runs: 261 GEMM programs on 132 SMs take two rounds, the 29 bias programs after them add none
    (counted among the CTAs, 290 take three); their bytes stay in the memory time."""
    grid = (10, 1, 29)  # 9 (tap, channel block) GEMM programs + 1 bias program, 29 row slices
    record = weight_grad_record(grid, rows_per_split=283, blocks_per_row=4, flops=2 * 8192 * 512 * 576 * 64)
    variant = fake_variant((100,), ctas_per_sm=2, warps=4)
    counted = issue_model.model_layer("dec0.conv2.backward", record, variant, issue_model.H200)
    record.light_programs = 29
    apart = issue_model.model_layer("dec0.conv2.backward", record, variant, issue_model.H200)
    assert counted.ctas == apart.ctas == 290 and counted.tiles == 290 and apart.tiles == 261
    assert counted.ctas_per_busiest_sm == 3 and apart.ctas_per_busiest_sm == 2 and apart.waves == 1
    assert apart.tensor_s == pytest.approx(counted.tensor_s * 2 / 3)
    assert apart.memory_s == counted.memory_s


def test_training_step_totals():
    """A training step's model: its time split between the forward's launches and the backward's (stages ending in
    ``.backward``), both in the JSON and the printed line."""
    records = [fake_record((264, 1)), fake_record((132, 1)), fake_record((132, 2), nbytes=10**9)]
    variants = [fake_variant((300,)), fake_variant((100,)), fake_variant((100,))]
    stages = ["enc0.conv1", "enc0.conv1.backward", "head.backward"]
    model = issue_model.model_forward(
        "bilinear", "bf16", 512, 16, stages, records, variants, issue_model.H200, step="training", label="train-x"
    )
    forward, *backward = (layer.time_s for layer in model.layers)
    assert model.forward_s == pytest.approx(forward) and model.backward_s == pytest.approx(sum(backward))
    row = model.to_json()
    assert (row["step"], row["label"]) == ("training", "train-x")
    assert row["forward_ms"] == pytest.approx(forward * 1e3, rel=1e-5)
    assert row["backward_ms"] == pytest.approx(sum(backward) * 1e3, rel=1e-5)
    text = issue_model.format_model([model], layers=True)
    assert "MODEL training step (forward + backward) bilinear bf16 batch 16" in text and "head.backward" in text
    plain = issue_model.model_forward("bilinear", "bf16", 512, 16, stages[:1], records[:1], variants[:1],
                                      issue_model.H200).to_json()  # fmt: skip
    assert plain["step"] == "forward" and plain["forward_ms"] == plain["ms"] and plain["backward_ms"] is None
    with pytest.raises(ValueError, match="expected 'forward' or 'training'"):
        issue_model.model_forward("bilinear", "bf16", 512, 16, [], [], [], issue_model.H200, step="backward")


# -- calibration: every recorded eta is refitted from the data it names -------------------------------------------
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("fit", issue_model.ETA_FITS, ids=lambda f: f.source)
def test_recorded_eta_refits_from_its_data(fit):
    """An ``ETA_FITS`` entry is the fit of the measured and modeled launch times in the file it names."""
    data = json.loads((REPO / fit.source).read_text())
    rows = data["rows"]
    assert rows and data["gpu"] == fit.gpu and data["model_arch"] == f"sm_{fit.arch}"
    for row in rows:  # each row's modeled time is the model's max() of its parts at the eta the report used
        eta_used = data["model_assumptions"]["eta"]
        parts = (row["tensor_us"], row["issue_us"] / eta_used, row["memory_us"])
        assert row["model_us"] == pytest.approx(max(parts), abs=2e-3)  # the report rounds to 1 ns
    refit = issue_model.fit_eta(
        [r["issue_us"] for r in rows],
        [r["measured_us"] for r in rows],
        [max(r["tensor_us"], r["memory_us"]) for r in rows],
    )
    assert refit == pytest.approx(data["eta"], rel=1e-9)
    assert fit.eta == pytest.approx(refit, abs=5e-4)
    assert issue_model.assumptions_for(fit.arch).eta == issue_model.ETA_FITS[-1].eta


def test_calibrate_pairs_launches_in_order(tmp_path):
    """``bench.calibrate`` pairs a modeled forward with a trace's kernels in start order, fits eta over the
    issue-bound launches, and refuses a trace of another configuration."""
    layer = {
        "stage": "a",
        "kernel": "conv3x3",
        "bound": "issue",
        "tensor_us": 1.0,
        "issue_us": 6.0,
        "memory_us": 2.0,
        "time_us": 10.0,
    }
    up = {
        "stage": "b",
        "kernel": "upsample2x",
        "bound": "memory",
        "tensor_us": 0.0,
        "issue_us": 0.0,
        "memory_us": 5.0,
        "time_us": 5.0,
    }
    report = {
        "triton": "x",
        "arch": "sm_90",
        "model_assumptions": {"eta": 0.6},
        "model": [{"batch": 2, "layers": [layer, up]}],
    }
    (tmp_path / "m.json").write_text(json.dumps(report))

    def trace(names_durations):
        events = [{"cat": "kernel", "name": n, "ts": 100 - i, "dur": d} for i, (n, d) in enumerate(names_durations)]
        events.append({"cat": "cpu_op", "name": "aten::empty", "ts": 0, "dur": 3})
        return json.dumps({"traceEvents": events})

    # ts decreasing in list order: the calibration must sort by start time, so the upsample comes first in the list
    (tmp_path / "t.json").write_text(trace([("_upsample2x_nhwc_kernel", 7.0), ("_conv_nhwc_kernel", 12.0)]))
    out = tmp_path / "out.json"
    command = [
        sys.executable,
        "-m",
        "bench.calibrate",
        "--model",
        str(tmp_path / "m.json"),
        "--trace",
        f"2={tmp_path / 't.json'}",
        "--gpu",
        "G",
        "--commit",
        "c",
        "--run",
        "r",
        "--json",
        str(out),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert [r["measured_us"] for r in result["rows"]] == [12.0, 7.0]
    assert result["eta"] == pytest.approx(6.0 / 12.0) and result["eta_launches"] == ["batch 2 a"]

    (tmp_path / "t.json").write_text(trace([("_conv_nhwc_kernel", 12.0)]))
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "the model has 2 launches, the trace 1 kernels" in done.stderr
    (tmp_path / "t.json").write_text(trace([("_conv_nhwc_kernel", 7.0), ("_conv_nhwc_kernel", 12.0)]))
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "launch b: the model has 'upsample2x'" in done.stderr


def test_feature_layouts_trace_their_training_step():
    """``--training --features``: the strided nnU-Net-like layout's training step traces the kernels its backward
    launches (the polyphase input gradient of the down-sampling convs, norm backward, weight gradients), with every
    backward launch named after its forward stage; a layout whose backward is still the reference is refused with the
    reason, which the report lists rather than modeling."""
    from fastunet.tooling.compile_report import trace_feature, trace_feature_training

    small = {"base_channels": 16, "depth": 2}
    with modeled_target(132, 90):
        records = trace_feature_training("stride", torch.bfloat16, 2, 32, **small)
        forward = trace_feature("stride", torch.bfloat16, 2, 32, **small)
    names = [r.name for r in records]
    assert "conv3x3/2.input_grad" in names
    # the strided conv reads the skip's norm applied ahead (a normalize launch), not on load
    assert any(n.startswith("conv3x3/2+stats") for n in names) and "normalize" in names
    assert not any(n.startswith("conv3x3/2+norm_in") for n in names)
    assert "conv_weight_grad" in names
    backward = [r for r in records if r.stage and r.stage.endswith(".backward")]
    assert backward and len(backward) > len(forward) // 2
    assert {r.stage.removesuffix(".backward") for r in backward} <= {r.stage for r in records} | {"pack"}
    strided = [r for r in records if r.name == "conv_weight_grad" and r.constexprs.get("STRIDE") == 2]
    assert len(strided) == small["depth"]  # one per down-sampling conv
    with pytest.raises(ValueError, match="crop"):
        trace_feature_training("valid", torch.bfloat16, 2, 32, **small)


def _sass(ops: list[str]) -> str:
    return "\n".join(f"        /*{16 * i:04x}*/                   {op} ;" for i, op in enumerate(ops))


def test_elementwise_kernel_is_one_straight_pass():
    """No tensor-core instruction and no loop (an elementwise or gather launch): every instruction issued once a CTA,
    set against the launch's bytes; many instructions make it issue-bound, few leave it memory-bound. A loop without
    tensor-core instructions (its trip count unknown) leaves the launch to its bytes."""
    body = ["LDG.E.128 R4, desc[UR4][R2.64]", "FFMA R4, R4, R5, R6", "STG.E.128 desc[UR4][R8.64], R4"]
    heavy = _sass(["LDC R1, c[0x0][0x28]", *body * 100, "EXIT", f"BRA {16 * 302:#x}"])  # the trailing self-branch
    found = issue_model.analyze(heavy, {}, "bf16", 4, issue_model.H200)
    assert found.loops == () and found.straight_instructions == 303 and found.summary()["straight_instructions"] == 303
    variant = types.SimpleNamespace(mainloop=found, ctas_per_sm=4, num_warps=4, dtype="bf16")
    record = types.SimpleNamespace(
        name="copy", kernel=None, grid=(1000, 2), flops=0, bytes_read=1 << 20, bytes_written=1 << 20, constexprs={}
    )
    h200 = issue_model.H200
    layer = issue_model.model_layer("s", record, variant, h200)
    busiest = -(-2000 // 132)
    issue = busiest * 4 * 303 / 4 / h200.clock_hz
    assert layer.issue_s == pytest.approx(issue) and layer.tensor_s == 0
    assert layer.memory_s == pytest.approx((2 << 20) / h200.bandwidth)
    assert issue / h200.eta > layer.memory_s and layer.bound == "issue"
    assert layer.time_s == pytest.approx(issue / h200.eta) and "straight pass" in layer.note
    light = issue_model.analyze(_sass(["LDC R1, c[0x0][0x28]", *body, "EXIT", "BRA 0x50"]), {}, "bf16", 4, h200)
    light_variant = types.SimpleNamespace(mainloop=light, ctas_per_sm=4, num_warps=4, dtype="bf16")
    quick = issue_model.model_layer("s", record, light_variant, h200)
    assert quick.bound == "memory" and quick.time_s == pytest.approx(quick.memory_s) and quick.issue_s > 0
    looped = _sass(["LDC R1, c[0x0][0x28]", *body, "@P0 BRA 0x10", "EXIT", "BRA 0x60"])
    found = issue_model.analyze(looped, {}, "bf16", 4, h200)
    assert found.straight_instructions is None
    loop_variant = types.SimpleNamespace(mainloop=found, ctas_per_sm=4, num_warps=4, dtype="bf16")
    layer = issue_model.model_layer("s", record, loop_variant, h200)
    assert layer.issue_s == 0 and layer.bound == "memory" and layer.note == "no tensor-core loop: memory time only"
