"""SASS issue model: a speed estimate of compiled kernels that any machine can compute (a model, not a measurement).

An SM issues about 4 warp-instructions per clock. A kernel's main loop feeds the tensor cores one K-step of its
``BLOCK_M x BLOCK_N x BLOCK_K`` tile per iteration (a kernel that names its GEMM otherwise, such as the weight
gradient's ``BLOCK_C x BLOCK_N x BLOCK_P``, is read through :data:`GEMM_VIEWS`); if the warps of a CTA need more
issue slots per K-step than the tensor cores need clocks for it, the loop cannot keep them busy whatever the memory
system does. Per compiled variant, from its SASS:

* the innermost loops that hold the tensor-core instructions (``HGMMA`` on sm_90, ``HMMA`` on sm_80): found from
  the control flow, a backward ``BRA`` closes a loop that starts at its target;
* instructions per warp per K-step in each (a loop iteration may cover one K-step or, unrolled, several: the MMA
  instructions in the body say how many), ``UTMALDG`` (TMA) and ``LDGSTS`` (cp.async) loads there;
* tensor-core clocks per K-step of the tile at the GPU's dense rate, and
  ``issue_ratio = num_warps * instructions / issue_per_clock / tensor_clocks``: above 1 the loop is issue-bound.

Per launch of a traced forward (:func:`model_layer`), the modeled time is
``max(tensor time, issue time / eta, bytes / bandwidth)``, with CTAs dealt to SMs in waves; summed over the launches
it is a modeled forward (over a training step's launches, a modeled training step). L2, latency, prologues and
epilogues are ignored: the model is optimistic, and ``eta`` (the share of issue slots a loop gets in practice) is the
knob GPU runs calibrate (:func:`fit_eta`, :data:`ETA_FITS`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
from collections.abc import Mapping, Sequence

# ---------------------------------------------------------------------------------------------------------------
# Assumptions
# ---------------------------------------------------------------------------------------------------------------
DEFAULT_ETA = 0.7


@dataclasses.dataclass(frozen=True)
class EtaFit:
    """A value of ``eta`` fitted from a GPU run (see :func:`fit_eta`), recorded as data."""

    arch: int
    gpu: str
    eta: float
    source: str  # the run it came from (a results file of bench/)


# Fitted values, newest last; the model of ``sm_<arch>`` uses the newest fit for that arch, else DEFAULT_ETA.
# Each source is a file of bench/calibration/ (written by ``python -m bench.calibrate``), whose rows the tests refit.
ETA_FITS: tuple[EtaFit, ...] = (
    # The first H200 suite run (commit 3587097): profiler kernel times of one forward at batch 16 and 1. Only the
    # 3-channel first conv is issue-bound in the model, so this fit rests on that one launch at two batch sizes.
    EtaFit(arch=90, gpu="H200 SXM", eta=0.648, source="bench/calibration/2026-11-29-h200-3587097.json"),
)


@dataclasses.dataclass(frozen=True)
class Assumptions:
    """What the model assumes about one GPU."""

    gpu: str
    arch: int
    peak_flops: Mapping[str, float]  # dense tensor-core FLOP/s per operand type (bf16, fp16, tf32)
    sm_count: int
    clock_hz: float
    bandwidth: float  # bytes/s
    issue_per_clock: int = 4  # warp-instructions an SM issues per clock (one per scheduler)
    eta: float = DEFAULT_ETA
    eta_source: str = "default, not fitted"
    notes: tuple[str, ...] = ()

    def flops_per_clock(self, operand: str) -> float:
        """Dense tensor-core FLOPs per clock per SM for ``operand`` (bf16, fp16, tf32)."""
        return self.peak_flops[operand] / (self.sm_count * self.clock_hz)

    def lines(self) -> list[str]:
        """The assumptions, one per line, for printing beside every modeled figure."""
        peaks = ", ".join(f"{k} {v / 1e12:.0f}" for k, v in self.peak_flops.items())
        return [
            f"{self.gpu} (sm_{self.arch}): dense tensor cores {peaks} TFLOP/s; {self.sm_count} SMs at "
            f"{self.clock_hz / 1e9:.2f} GHz; {self.issue_per_clock} warp-instructions per clock per SM; "
            f"{self.bandwidth / 1e12:.1f} TB/s; eta = {self.eta:g} ({self.eta_source})",
            "ignored: L2 (bytes are compulsory traffic at DRAM bandwidth), latency, stalls other than issue slots, "
            "instructions outside the tensor-core loops (prologue, epilogue), launch gaps; a kernel with a loop but "
            "no tensor-core instruction counts its bytes only (its trip count is not known)",
            "a kernel with no tensor-core instruction and no loop (elementwise, gathers) is one straight pass of all "
            "its instructions a CTA, against its bytes",
            "CTAs are dealt to SMs breadth-first; the CTAs resident on one SM share its tensor cores and issue slots, "
            "so a launch takes ceil(CTAs / SMs) times one CTA's time (a weight gradient's bias programs, launched last "
            "with no tensor-core loop, counted by their bytes only)",
            *self.notes,
        ]

    def to_json(self) -> dict:
        row = {"kind": "issue-slot model of the compiled kernels, not a measurement", **dataclasses.asdict(self)}
        row["peak_flops"] = dict(self.peak_flops)
        row["lines"] = self.lines()
        return row


H200 = Assumptions(
    gpu="H200 SXM",
    arch=90,
    peak_flops={"bf16": 790e12, "fp16": 790e12, "tf32": 395e12},
    sm_count=132,
    clock_hz=1.75e9,
    bandwidth=4.3e12,
    notes=("790 TFLOP/s: a large dense bf16 matmul on an H200 (fp16 assumed equal, tf32 half); 4.3 TB/s copy",),
)
A100 = Assumptions(
    gpu="A100 SXM",
    arch=80,
    peak_flops={"bf16": 312e12, "fp16": 312e12, "tf32": 156e12},
    sm_count=108,
    clock_hz=1.41e9,
    bandwidth=2.0e12,
    notes=("A100: datasheet figures (312 TFLOP/s dense bf16, 1.41 GHz boost, 2.0 TB/s), not measured",),
)
ASSUMPTIONS = {90: H200, 80: A100}


def assumptions_for(arch: int, eta: float | None = None) -> Assumptions | None:
    """The assumptions of ``sm_<arch>`` (None when not tabled) with ``eta``: the given value, else the newest fit
    in :data:`ETA_FITS`, else :data:`DEFAULT_ETA`."""
    base = ASSUMPTIONS.get(arch)
    if base is None:
        return None
    if eta is not None:
        if not 0 < eta <= 1:
            raise ValueError(f"eta must be in (0, 1], got {eta}")
        return dataclasses.replace(base, eta=eta, eta_source="given")
    fits = [fit for fit in ETA_FITS if fit.arch == arch]
    if fits:
        return dataclasses.replace(base, eta=fits[-1].eta, eta_source=f"fitted on {fits[-1].gpu}: {fits[-1].source}")
    return base


def operand_type(dtype: str, constexprs: Mapping[str, object]) -> str | None:
    """Tensor-core operand type of a variant: its storage dtype, fp32 as TF32 (None: fp32 in IEEE mode)."""
    if dtype in ("bf16", "fp16"):
        return dtype
    if dtype == "fp32" and constexprs.get("DOT_PRECISION", "tf32") != "ieee":
        return "tf32"
    return None


@dataclasses.dataclass(frozen=True)
class GemmView:
    """How a kernel names its GEMM: the constexprs holding the CTA's tile (``m`` x ``n`` outputs, ``k`` per K-step),
    and, for a kernel whose K extent is not a convolution's taps x channels, the runtime arguments whose product is
    the K-steps the fullest CTA runs (``k_steps``)."""

    m: str = "BLOCK_M"
    n: str = "BLOCK_N"
    k: str = "BLOCK_K"
    k_steps: tuple[str, ...] = ()

    @property
    def keys(self) -> tuple[str, str, str]:
        return self.m, self.n, self.k

    def tile(self, constexprs: Mapping[str, object]) -> tuple[int, int, int] | None:
        """The (M, N, K) tile of a variant with these constexprs; None when the kernel has no such tile (data
        movement)."""
        dims = tuple(constexprs.get(key) for key in self.keys)
        return dims if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in dims) else None


# The convolution family's names (M output pixels, N output channels, K input channels x taps).
CONV_VIEW = GemmView()
# Kernels that name their GEMM otherwise, by their function's name. The conv weight gradient (kernels/conv_grad.py):
# dW = A^T dZ, each CTA one BLOCK_C x BLOCK_N tile of (tap, input channel) rows by output channels, reducing over
# the output rows of its slice (``rows_per_split``), each row ``blocks_per_row`` steps of BLOCK_P pixels.
GEMM_VIEWS = {
    "_weight_grad_partial_kernel": GemmView("BLOCK_C", "BLOCK_N", "BLOCK_P", ("rows_per_split", "blocks_per_row"))
}


def gemm_view(kernel: object) -> GemmView:
    """The GEMM view of a ``@triton.jit`` kernel (:data:`GEMM_VIEWS`, else :data:`CONV_VIEW`)."""
    name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", None)
    return GEMM_VIEWS.get(name, CONV_VIEW)


# ---------------------------------------------------------------------------------------------------------------
# SASS: instructions, loops, tensor-core loops
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with modifiers: "HGMMA.64x128x16.F32.BF16", "BRA", "LDGSTS.E.BYPASS.128"
    target: int | None = None  # branch target address of a BRA


# cuobjdump / nvdisasm: "/*2900*/  @P5 BRA 0x2900 ;" or "... BRA `(.L_x_3) ;"; labels ".L_x_3:" on their own line.
_LINE_RE = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][\w.]*)([^;]*);")
_LABEL_RE = re.compile(r"^\s*(\.L\w*):")
_HEX_RE = re.compile(r"0x([0-9a-fA-F]+)")
_LABEL_REF_RE = re.compile(r"`\((\.L\w*)\)")
_HGMMA_SHAPE_RE = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)")
# HMMA shapes m, n, k by their SASS spelling (one warp's instruction).
_HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4)}


def _sig(value: float | None, digits: int = 6) -> float | None:
    """``value`` to ``digits`` significant digits, for JSON."""
    return None if value is None else float(f"{value:.{digits}g}")


def parse_sass(text: str) -> list[Instruction]:
    """Instructions of a SASS listing (``cuobjdump -sass`` or ``nvdisasm``), in address order, with the target of
    each branch (an address, or a label resolved to the address of the instruction after it)."""
    instructions: list[tuple[int, str, str]] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    for line in text.splitlines():
        label = _LABEL_RE.match(line)
        if label:
            pending.append(label.group(1))
            continue
        match = _LINE_RE.match(line)
        if not match:
            continue
        address = int(match.group(1), 16)
        for name in pending:
            labels[name] = address
        pending.clear()
        instructions.append((address, match.group(2), match.group(3)))
    parsed = []
    for address, opcode, operands in instructions:
        target = None
        if opcode == "BRA" or opcode.startswith("BRA."):
            ref = _LABEL_REF_RE.search(operands)
            if ref and ref.group(1) in labels:
                target = labels[ref.group(1)]
            else:
                numbers = _HEX_RE.findall(operands)
                target = int(numbers[-1], 16) if numbers else None
        parsed.append(Instruction(address, opcode, target))
    return sorted(parsed, key=lambda ins: ins.address)


def find_loops(instructions: Sequence[Instruction]) -> list[tuple[int, int]]:
    """Loops as (first, last) instruction addresses: each backward branch closes a loop starting at its target.
    Several backward branches to one target make one loop (up to the last of them).

    Loops nest or are disjoint. A backward branch whose span starts inside a loop and ends past it comes from an
    out-of-line block jumping back into that loop (the retry path of a TMA loop's mbarrier wait, placed after the
    kernel's exit): it closes no loop."""
    ends: dict[int, int] = {}
    for ins in instructions:
        if ins.target is not None and ins.target < ins.address:
            ends[ins.target] = max(ends.get(ins.target, ins.address), ins.address)
    spans = sorted(ends.items())
    return [(a, b) for a, b in spans if not any(first < a <= last < b for first, last in spans)]


def is_mma(opcode: str) -> bool:
    return opcode.startswith(("HGMMA", "HMMA"))


def mma_per_k_step(opcode: str, tile: tuple[int, int, int], num_warps: int) -> int | None:
    """How many of the MMA instruction ``opcode`` each warp issues per K-step of a ``tile`` (M, N, K) CTA.

    An ``HGMMA`` is one warpgroup's (4 warps) MxNxK, an ``HMMA`` one warp's. The tile's M x N is dealt out in
    instruction-sized pieces over the warpgroups (or warps); a tile smaller than that leaves them padded or doing
    the same piece, one piece each. Each piece takes ``BLOCK_K / k`` instructions. None for a shape not known here.
    """
    shape = _HGMMA_SHAPE_RE.match(opcode)
    if shape:
        (m, n, k), units = map(int, shape.groups()), max(1, num_warps // 4)
    elif opcode.startswith("HMMA.") and opcode.split(".")[1] in _HMMA_SHAPES:
        (m, n, k), units = _HMMA_SHAPES[opcode.split(".")[1]], num_warps
    else:
        return None
    block_m, block_n, block_k = tile
    pieces = max(1, -(-block_m * block_n // (units * m * n)))
    return pieces * -(-block_k // k)


@dataclasses.dataclass(frozen=True)
class TensorLoop:
    """One innermost loop holding tensor-core instructions, per warp and per iteration (static counts: a
    predicated-off or branched-over instruction counts as issued)."""

    first: int  # address of its first instruction
    last: int  # address of the backward branch
    instructions: int
    mma: int
    mma_opcodes: tuple[str, ...]
    k_steps: float  # K-steps of the tile per iteration (1 unless unrolled)
    instructions_per_k_step: float
    tma_loads: int  # UTMALDG
    cp_async: int  # LDGSTS
    global_loads: int  # LDG
    barriers: int  # BAR.*
    tensor_clocks: float | None  # per K-step, at the assumed dense rate
    issue_clocks: float  # per K-step: num_warps * instructions_per_k_step / issue_per_clock
    issue_ratio: float | None  # issue_clocks / tensor_clocks

    def to_json(self) -> dict:
        row = dataclasses.asdict(self)
        row["first"], row["last"] = f"{self.first:#x}", f"{self.last:#x}"
        for key in ("k_steps", "instructions_per_k_step", "tensor_clocks", "issue_clocks", "issue_ratio"):
            row[key] = _sig(row[key])
        return row


def tensor_loops(
    instructions: Sequence[Instruction],
    tile: tuple[int, int, int] | None,
    num_warps: int,
    tensor_clocks: float | None,
    issue_per_clock: int,
) -> list[TensorLoop]:
    """The innermost loop of each tensor-core instruction that sits in a loop, in address order, less loops that hold
    another such loop (a persistent kernel's loop over tiles, whose fused head GEMM runs once a tile). A kernel whose
    tensor-core instructions all sit outside loops (a single K block, unrolled) is one straight pass: the whole
    kernel counts as its one "loop", every instruction issued once (branches not taken are counted too).

    ``tile``: the CTA's (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``), which with the MMA instructions of an iteration says
    how many K-steps it covers (one unless unrolled; None: one); ``tensor_clocks``: tensor-core clocks of a K-step.
    """
    loops = find_loops(instructions)
    chosen: set[tuple[int, int]] = set()
    for ins in instructions:
        if is_mma(ins.opcode):
            around = [(a, b) for a, b in loops if a <= ins.address <= b]
            if around:
                chosen.add(min(around, key=lambda loop: loop[1] - loop[0]))
    # A loop around another tensor-core loop is a loop over tiles (a persistent kernel's), not over K-steps: its own
    # tensor-core instructions are per-tile epilogue work (a fused head's GEMM), as outside every loop.
    chosen = {(a, b) for a, b in chosen if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in chosen)}
    if not chosen and any(is_mma(ins.opcode) for ins in instructions):
        chosen.add((instructions[0].address, instructions[-1].address))
    found = []
    for first, last in sorted(chosen):
        body = [ins for ins in instructions if first <= ins.address <= last]
        mmas = [ins.opcode for ins in body if is_mma(ins.opcode)]
        per_step = [mma_per_k_step(op, tile, num_warps) for op in mmas] if tile else [None]
        k_steps = sum(1 / n for n in per_step) if None not in per_step else 1.0
        per_step = len(body) / k_steps
        issue = num_warps * per_step / issue_per_clock

        def count(prefix: str, body=body) -> int:
            return sum(ins.opcode == prefix or ins.opcode.startswith(prefix + ".") for ins in body)

        found.append(
            TensorLoop(
                first=first,
                last=last,
                instructions=len(body),
                mma=len(mmas),
                mma_opcodes=tuple(sorted(set(mmas))),
                k_steps=k_steps,
                instructions_per_k_step=per_step,
                tma_loads=count("UTMALDG"),
                cp_async=count("LDGSTS"),
                global_loads=count("LDG"),
                barriers=count("BAR"),
                tensor_clocks=tensor_clocks,
                issue_clocks=issue,
                issue_ratio=issue / tensor_clocks if tensor_clocks else None,
            )
        )
    return found


@dataclasses.dataclass(frozen=True)
class MainLoop:
    """The issue figures of one compiled variant: its tensor-core loops, and the costliest of them."""

    loops: tuple[TensorLoop, ...]
    tensor_clocks: float | None  # per K-step of the tile
    # A kernel with no tensor-core instruction and no loop (an elementwise or gather launch: one straight pass a CTA):
    # its instructions per warp, every one issued once; None for any other kernel.
    straight_instructions: int | None = None

    @property
    def worst(self) -> TensorLoop | None:
        """The loop with the most issue clocks per K-step."""
        return max(self.loops, key=lambda loop: loop.issue_clocks, default=None)

    def summary(self) -> dict:
        """Variant-level figures, of the costliest loop: ``issue_ratio``, ``mainloop_instructions`` (per warp per
        K-step), ``tma_loads`` and ``cp_async`` (per iteration), ``tensor_clocks`` (per K-step), and ``loops``."""
        worst = self.worst
        return {
            "issue_ratio": None if worst is None else _sig(worst.issue_ratio),
            "mainloop_instructions": None if worst is None else _sig(worst.instructions_per_k_step),
            "tma_loads": None if worst is None else worst.tma_loads,
            "cp_async": None if worst is None else worst.cp_async,
            "tensor_clocks": _sig(self.tensor_clocks),
            "tensor_loops": len(self.loops),
            "straight_instructions": self.straight_instructions,
        }


def analyze(
    sass: str,
    constexprs: Mapping[str, object],
    dtype: str,
    num_warps: int,
    assumptions: Assumptions | None,
    view: GemmView = CONV_VIEW,
) -> MainLoop:
    """The issue figures of one variant from its SASS, tile (``view``'s constexprs: ``BLOCK_M``, ``BLOCK_N``,
    ``BLOCK_K`` for the convolutions) and dtype."""
    tile = view.tile(constexprs)
    operand = operand_type(dtype, constexprs)
    clocks = None
    if assumptions is not None and operand is not None and tile:
        clocks = 2 * math.prod(tile) / assumptions.flops_per_clock(operand)
    issue_per_clock = assumptions.issue_per_clock if assumptions else 4
    instructions = parse_sass(sass)
    loops = tensor_loops(instructions, tile, num_warps, clocks, issue_per_clock)
    straight = None
    if instructions and not any(is_mma(ins.opcode) for ins in instructions) and not find_loops(instructions):
        straight = len(instructions)
    return MainLoop(loops=tuple(loops), tensor_clocks=clocks, straight_instructions=straight)


# ---------------------------------------------------------------------------------------------------------------
# Layers and the forward
# ---------------------------------------------------------------------------------------------------------------
def k_steps_per_source(record) -> list[int] | None:
    """K-steps one CTA runs per source loop of a convolution launch: ``KSIZE**2 * cdiv(c, BLOCK_K)`` for the main
    input (``c_main``) and, with ``TWO_SOURCES``, for the upsampled one (``c_up``); one flattened loop of
    ``cdiv(KSIZE**2 * c_main, BLOCK_K)`` with ``PACKED_K`` (the small-K path; its value is the channel
    count); with ``SPLIT_K`` parts, the fullest part's share of them. For a kernel whose :class:`GemmView` names its
    K-steps (the weight gradient's rows per slice times pixel blocks per row): one loop of their product (the fullest
    CTA). None for a kernel without these arguments."""
    params = getattr(record.kernel, "params", None)
    c = record.constexprs
    if params is None:
        return None
    values = dict(zip((p.name for p in params if not p.is_constexpr), record.args, strict=False))
    view = gemm_view(record.kernel)
    if view.k_steps:
        factors = [values.get(name) for name in view.k_steps]
        if not all(isinstance(f, int) for f in factors):
            return None
        return [math.prod(factors)]
    if "KSIZE" not in c or "BLOCK_K" not in c:
        return None
    if not isinstance(values.get("c_main"), int):
        return None
    taps, block_k = c["KSIZE"] ** 2, c["BLOCK_K"]
    if c.get("PACKED_K"):
        return [-(-taps * values["c_main"] // block_k)]
    steps = [taps * -(-values["c_main"] // block_k)]
    if c.get("TWO_SOURCES") and values.get("c_up"):
        steps.append(taps * -(-values["c_up"] // block_k))
    if c.get("SPLIT_K", 1) > 1:  # one source, its steps dealt to the parts: the fullest part's
        steps = [-(-steps[0] // c["SPLIT_K"])]
    return steps


@dataclasses.dataclass(frozen=True)
class LayerModel:
    """One launch of a forward on the model (times in seconds)."""

    stage: str
    kernel: str
    tile: str
    num_warps: int
    flops: int
    bytes: int
    ctas: int  # programs launched (a persistent launch's programs each loop over several tiles)
    ctas_per_sm: int | None  # resident at once (occupancy)
    ctas_per_busiest_sm: int  # the tiles the busiest SM works through: ceil(CTAs / SMs) at one tile a CTA
    waves: int | None  # ceil(CTAs / (SMs * CTAs per SM))
    k_steps: tuple[int, ...]  # per CTA, per tensor-core loop
    issue_ratio: float | None  # K-step-weighted over the loops
    tensor_s: float
    issue_s: float  # before dividing by eta
    memory_s: float
    time_s: float | None  # None: the launch cannot run (no CTA fits on an SM)
    bound: str  # "tensor", "issue", "memory", or "cannot launch"
    note: str = ""
    tiles: int = 0  # output tiles: CTAs, or the tiles a persistent launch's programs loop over
    persistent: bool = False

    @property
    def tflops(self) -> float | None:
        return self.flops / self.time_s / 1e12 if self.time_s else None

    def to_json(self) -> dict:
        row = dataclasses.asdict(self)
        row["k_steps"] = list(self.k_steps)
        for key in ("tensor_s", "issue_s", "memory_s", "time_s"):
            value = row.pop(key)
            row[key.removesuffix("_s") + "_us"] = None if value is None else _sig(value * 1e6)
        row["tflops"] = _sig(self.tflops)
        row["issue_ratio"] = _sig(self.issue_ratio)
        return row


def busiest_sm_tiles(tiles: int, programs: int, sms: int) -> int:
    """Tiles the busiest SM runs in a persistent launch: program p takes tiles p, p + programs, ...; programs are
    dealt to SMs breadth-first (p to SM p mod sms), so SM 0 holds the programs with the most tiles."""
    if tiles <= 0 or programs <= 0:
        return 0
    return sum(-(-(tiles - p) // programs) for p in range(0, min(programs, tiles), sms))


def model_layer(stage: str, record, variant, assumptions: Assumptions) -> LayerModel:
    """Model one launch: ``record`` a :class:`~fastunet.kernels._common.LaunchRecord` (grid, FLOPs, bytes), and
    ``variant`` its compiled variant (anything with ``mainloop``, ``ctas_per_sm``, ``num_warps``).

    Per tensor-core loop ``l`` a tile spends ``max(k_l * tensor_clocks, k_l * issue_clocks_l / eta)`` clocks, ``k_l``
    its K-steps there; the launch takes ``ceil(CTAs / SMs)`` tile times, or the bytes over the bandwidth if longer.
    A persistent launch (``record.persistent_tiles``): its CTAs are its programs, each looping over several tiles;
    it takes the busiest SM's tiles (:func:`busiest_sm_tiles`) times one tile's time. What it saves, a tile's
    prologue and epilogue overlapped with the next tile's work, is outside the model.
    ``record.light_programs`` (programs launched after the others that run no tensor-core loop: a weight gradient's
    bias sums) are left out of the CTAs: only their bytes count.
    """
    c = record.constexprs
    tile = "x".join(str(c.get(key, "-")) for key in gemm_view(record.kernel).keys)
    ctas = math.prod(record.grid)
    sms = assumptions.sm_count
    persistent = bool(getattr(record, "persistent_tiles", 0))
    # Programs without a tensor-core loop launched after the GEMM programs (a weight gradient's bias sums): left out
    # of the tiles; their bytes count in the memory time.
    light = getattr(record, "light_programs", 0)
    tiles = record.persistent_tiles if persistent else ctas - light
    busiest = busiest_sm_tiles(tiles, ctas, sms) if persistent else -(-tiles // sms)
    nbytes = record.bytes_read + record.bytes_written
    memory_s = nbytes / assumptions.bandwidth
    loops = variant.mainloop.loops
    clocks = variant.mainloop.tensor_clocks
    note = ""
    steps = k_steps_per_source(record)
    if steps is None and clocks:
        # A kernel the convolution reader does not know: its K-steps from its FLOPs over the tile's.
        tile_flops = clocks * assumptions.flops_per_clock(operand_type(variant.dtype, c) or "bf16")
        steps = [max(1, round(record.flops / tiles / tile_flops))] if tiles else [0]
        note = "K-steps estimated from FLOPs"
    if loops and steps and len(steps) != len(loops):
        total = sum(steps)
        steps = [total // len(loops) + (i < total % len(loops)) for i in range(len(loops))]
        note = "K-steps split evenly: loops and sources differ in number"
    tensor_clocks = issue_clocks = compute_clocks = 0.0
    if loops and clocks:
        for loop, k in zip(loops, steps, strict=True):
            tensor_clocks += k * clocks
            issue_clocks += k * loop.issue_clocks
            compute_clocks += max(k * clocks, k * loop.issue_clocks / assumptions.eta)
    elif not loops:
        straight = getattr(variant.mainloop, "straight_instructions", None)
        if straight:
            # One straight pass a CTA: its instructions against its bytes, like a single unrolled K block.
            issue_clocks = variant.num_warps * straight / assumptions.issue_per_clock
            compute_clocks = issue_clocks / assumptions.eta
            note = "no tensor-core instruction, no loop: one straight pass of its instructions a CTA"
        else:
            note = "no tensor-core loop: memory time only"
    scale = busiest / assumptions.clock_hz
    tensor_s, issue_s, compute_s = tensor_clocks * scale, issue_clocks * scale, compute_clocks * scale
    operand = operand_type(variant.dtype, c)
    if loops and operand is not None:
        # The loops' K-steps leave out tensor work outside them (a fused head's GEMM in the epilogue): the launch's
        # FLOPs at the peak rate bound it from below.
        flops_s = record.flops / (assumptions.flops_per_clock(operand) * sms * assumptions.clock_hz)
        tensor_s, compute_s = max(tensor_s, flops_s), max(compute_s, flops_s)
    cps = variant.ctas_per_sm
    if cps == 0:
        time_s, bound = None, "cannot launch"
    else:
        time_s = max(compute_s, memory_s)
        if memory_s >= compute_s:
            bound = "memory"
        else:
            bound = "issue" if issue_s / assumptions.eta > tensor_s else "tensor"
    return LayerModel(
        stage=stage,
        kernel=record.name + ("+persistent" if persistent else ""),
        tile=tile,
        num_warps=variant.num_warps,
        flops=record.flops,
        bytes=nbytes,
        ctas=ctas,
        ctas_per_sm=cps,
        ctas_per_busiest_sm=busiest,
        waves=-(-(ctas - light) // (sms * cps)) if cps else None,
        k_steps=tuple(steps or ()) if loops else (),
        issue_ratio=issue_clocks / tensor_clocks if tensor_clocks else None,
        tensor_s=tensor_s,
        issue_s=issue_s,
        memory_s=memory_s,
        time_s=time_s,
        bound=bound,
        note=note,
        tiles=tiles,
        persistent=persistent,
    )


# Stage names of a training step's backward launches end in this (``dec0.conv1.backward``, see
# fastunet.tooling.trace.trace_training).
BACKWARD_SUFFIX = ".backward"


def _total_s(layers: Sequence[LayerModel]) -> float | None:
    times = [layer.time_s for layer in layers]
    return None if None in times else sum(times)


@dataclasses.dataclass(frozen=True)
class ForwardModel:
    """A modeled forward of one configuration: its launches one after another. ``step="training"``: a training
    step's launches, the forward as the training path runs it, then the backward (stages ending in
    :data:`BACKWARD_SUFFIX`)."""

    upsample: str
    dtype: str
    size: int
    batch: int
    layers: tuple[LayerModel, ...]
    assumptions: Assumptions
    step: str = "forward"  # "forward" or "training"
    label: str = ""  # the configuration's label in the compile report (``used_by``)

    @property
    def flops(self) -> int:
        return sum(layer.flops for layer in self.layers)

    @property
    def time_s(self) -> float | None:
        return _total_s(self.layers)

    @property
    def forward_s(self) -> float | None:
        """Modeled time of the launches outside the backward (the whole model for a forward)."""
        return _total_s([layer for layer in self.layers if not layer.stage.endswith(BACKWARD_SUFFIX)])

    @property
    def backward_s(self) -> float | None:
        """Modeled time of the backward's launches (0 for a forward)."""
        return _total_s([layer for layer in self.layers if layer.stage.endswith(BACKWARD_SUFFIX)])

    @property
    def tflops(self) -> float | None:
        return self.flops / self.time_s / 1e12 if self.time_s else None

    @property
    def fraction_of_peak(self) -> float | None:
        operand = self.dtype if self.dtype in ("bf16", "fp16") else "tf32"
        peak = self.assumptions.peak_flops.get(operand)
        return self.tflops * 1e12 / peak if self.tflops is not None and peak else None

    def to_json(self) -> dict:
        def ms(value: float | None) -> float | None:
            return None if value is None else _sig(value * 1e3)

        return {
            "dtype": self.dtype,
            "batch": self.batch,
            "ms": ms(self.time_s),
            "tflops": _sig(self.tflops),
            "fraction_of_peak": _sig(self.fraction_of_peak),
            "upsample": self.upsample,
            "size": self.size,
            "gpu": self.assumptions.gpu,
            "gflop": _sig(self.flops / 1e9),
            "tensor_ms": ms(sum(layer.tensor_s for layer in self.layers)),
            "issue_ms_at_eta": ms(sum(layer.issue_s for layer in self.layers) / self.assumptions.eta),
            "memory_ms": ms(sum(layer.memory_s for layer in self.layers)),
            "step": self.step,
            "label": self.label,
            "forward_ms": ms(self.forward_s),
            "backward_ms": ms(self.backward_s) if self.step == "training" else None,
            "layers": [layer.to_json() for layer in self.layers],
        }


def model_forward(
    upsample: str,
    dtype: str,
    size: int,
    batch: int,
    stages: Sequence[str],
    records: Sequence,
    variants: Sequence,
    assumptions: Assumptions,
    step: str = "forward",
    label: str = "",
) -> ForwardModel:
    """Model each launch of a traced forward, or of a training step with ``step="training"`` (``records[i]``
    compiled as ``variants[i]``, named ``stages[i]``)."""
    if step not in ("forward", "training"):
        raise ValueError(f"step: expected 'forward' or 'training', got {step!r}")
    layers = tuple(
        model_layer(stage, record, variant, assumptions)
        for stage, record, variant in zip(stages, records, variants, strict=True)
    )
    return ForwardModel(upsample, dtype, size, batch, layers, assumptions, step, label)


def fit_eta(issue_s: Sequence[float], measured_s: Sequence[float], floor_s: Sequence[float]) -> float | None:
    """``eta`` from GPU timings of launches: ``issue_s / measured_s`` over the launches the model calls issue-bound
    (measured time above their tensor and memory time, ``floor_s``); the median, clipped to (0, 1]. None when no
    launch qualifies."""
    ratios = [i / m for i, m, f in zip(issue_s, measured_s, floor_s, strict=True) if m > 0 and i > f]
    return min(1.0, statistics.median(ratios)) if ratios else None


# ---------------------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------------------
def format_model(models: Sequence[ForwardModel], layers: bool = True) -> str:
    """The modeled forwards (one line each), their assumptions and, with ``layers``, a per-launch table each."""
    if not models:
        return ""
    assumptions = models[0].assumptions
    what = "the forward and the training step" if any(m.step == "training" for m in models) else "the forward"
    lines = [f"Issue-slot MODEL of {what} (not a measurement; {assumptions.gpu}):"]
    lines += [f"  assumption: {text}" for text in assumptions.lines()]
    for model in models:
        if layers:
            lines.append("")
            lines.append(
                f"{_step_name(model)} {model.upsample} {model.dtype} batch {model.batch} {model.size}x{model.size} "
                "(model):"
            )
            lines.append(format_layers(model))
    lines.append("")

    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value * 1e3:.3f} ms"

    for model in models:
        rate = "" if model.tflops is None else f", {model.tflops:.0f} TFLOP/s, {model.fraction_of_peak:.0%} of peak"
        parts = ""
        if model.step == "training":
            parts = f" (forward {ms(model.forward_s)} + backward {ms(model.backward_s)})"
        lines.append(
            f"MODEL {_step_name(model)} {model.upsample} {model.dtype} batch {model.batch} {model.size}x{model.size}: "
            f"{ms(model.time_s)}{parts}{rate} ({model.flops / 1e9:.0f} GFLOP)"
        )
    return "\n".join(lines)


# Labels of forwards traced with autotuning candidates in place of the heuristic's tiles (the compile report's
# --persistent and --split-k), and how the model's text names them.
CANDIDATE_LABELS = {"persistent-": " with persistent grids", "split-k-": " with split K"}


def _step_name(model: ForwardModel) -> str:
    name = "training step (forward + backward)" if model.step == "training" else "forward"
    return name + next((text for prefix, text in CANDIDATE_LABELS.items() if model.label.startswith(prefix)), "")


def format_layers(model: ForwardModel) -> str:
    """One line per launch: tile, CTAs, resident CTAs, K-steps, issue ratio, the three times and the bound."""
    sw = max(16, *(len(layer.stage) for layer in model.layers)) if model.layers else 16
    wide = model.step == "training" or any(len(layer.kernel) > 12 for layer in model.layers)
    kw = max(12, *(min(30, len(layer.kernel)) for layer in model.layers)) if wide else 12
    header = (
        f"{'stage':<{sw}} {'kernel':<{kw}} {'tile':<11} {'w':>2} {'CTAs':>6} {'/SM':>3} {'K-steps':>9} {'issue':>5} "
        f"{'tensor us':>9} {'issue/eta':>9} {'memory us':>9} {'model us':>9} {'TFLOP/s':>7} {'bound':<7}"
    )
    header = header.rstrip()
    lines = [header, "-" * len(header)]
    eta = model.assumptions.eta
    for layer in model.layers:
        ratio = "-" if layer.issue_ratio is None else f"{layer.issue_ratio:.2f}"
        time = "-" if layer.time_s is None else f"{layer.time_s * 1e6:.1f}"
        rate = "-" if layer.tflops is None else f"{layer.tflops:.0f}"
        lines.append(
            f"{layer.stage:<{sw}} {layer.kernel[:kw]:<{kw}} {layer.tile:<11} {layer.num_warps:>2} {layer.ctas:>6} "
            f"{'-' if layer.ctas_per_sm is None else layer.ctas_per_sm:>3} {'+'.join(map(str, layer.k_steps)):>9} "
            f"{ratio:>5} {layer.tensor_s * 1e6:>9.1f} {layer.issue_s / eta * 1e6:>9.1f} "
            f"{layer.memory_s * 1e6:>9.1f} {time:>9} {rate:>7} {layer.bound:<7}"
            + (f"  ({layer.note})" if layer.note else "")
        )
        lines[-1] = lines[-1].rstrip()
    total = model.time_s
    lines.append("-" * len(header))
    lines.append(
        f"{'total':<{sw}} {len(model.layers):>3} launches{'':<{27 + kw - 12}} "
        f"{sum(la.tensor_s for la in model.layers) * 1e6:>15.1f} "
        f"{sum(la.issue_s for la in model.layers) / eta * 1e6:>9.1f} "
        f"{sum(la.memory_s for la in model.layers) * 1e6:>9.1f} {'-' if total is None else f'{total * 1e6:.1f}':>9} "
        f"{'-' if model.tflops is None else f'{model.tflops:.0f}':>7}"
    )
    return "\n".join(lines)
