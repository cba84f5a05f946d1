"""Helpers shared by every kernel family: interpreter detection, device checks, output allocation,
launch recording.

Nothing here queries a GPU at import time.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import os
import re
import threading
from collections.abc import Hashable, Iterator

import torch
import triton
import triton.language as tl
from triton.runtime.jit import constexpr_function

# The @triton.jit decorator decides between compiled and interpreted kernels when the kernel module is
# imported, from this same variable; reading it here keeps the launchers consistent with the kernels.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# float64 runs under the interpreter only (gradcheck, float64 references): the kernels then accumulate, keep their
# statistics and write their partial sums in float64. Compiled, it is refused (see check_runnable).
INTERPRETER_DTYPES = (*SUPPORTED_DTYPES, torch.float64)

# Triton's interpreter before 3.7 turns 1-element arrays into Python ints, which NumPy 2.4 refuses ("only
# 0-dimensional arrays can be converted to Python scalars"); Triton 3.7 converts them explicitly.
INTERPRETER_FIXED_TRITON = (3, 7)
NUMPY_STRICT_SCALARS = (2, 4)


def _major_minor(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


@functools.cache
def interpreter_numpy_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run with these versions (None when it can), naming the fix."""
    if _major_minor(triton_version) >= INTERPRETER_FIXED_TRITON:
        return None
    if _major_minor(numpy_version) < NUMPY_STRICT_SCALARS:
        return None
    return (
        f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) cannot run with NumPy {numpy_version}: it "
        "converts 1-element arrays to Python scalars, which NumPy 2.4 refuses. Install NumPy < 2.4 "
        "(pip install 'numpy<2.4') or Triton >= 3.7 (pip install 'triton>=3.7')."
    )


def check_interpreter_versions() -> None:
    """Raise a RuntimeError naming the fix when this Triton's interpreter cannot run with this NumPy."""
    import numpy

    problem = interpreter_numpy_problem(triton.__version__, numpy.__version__)
    if problem is not None:
        raise RuntimeError(problem)


@dataclasses.dataclass(frozen=True)
class LaunchRecord:
    """One kernel launch, as the launcher layer saw it.

    ``bytes_read`` counts each input, weight and bias once (compulsory traffic; halo re-reads that hit in cache
    are not counted); ``bytes_written`` counts every output buffer the launch fills.
    """

    name: str
    kernel: object
    grid: tuple[int, ...]
    flops: int
    bytes_read: int
    bytes_written: int
    args: tuple
    constexprs: dict
    launch_options: dict
    candidates: tuple = ()  # the autotuning candidates (tile constexprs + launch options), chosen one included
    stage: str | None = None  # the network stage the caller named (``enc0.conv1``, ``dec2.up``...), if any
    path: str = "pointer"  # how the main loop loads its operands: "tma" (tensor descriptors) or "pointer"
    path_reason: str = ""  # why the launcher chose that path
    # ``retile(candidate) -> (args, constexprs)``: what the launcher would pass with another candidate config, where
    # the arguments depend on the tile (a TMA launch's descriptors are built for its boxes). None: only the tile
    # constexprs change.
    retile: object = dataclasses.field(default=None, compare=False, repr=False)
    # A persistent launch: the output tiles its ``grid`` of programs loops over (each program takes every
    # programs-th tile). 0: one tile a program (the grid counts tiles).
    persistent_tiles: int = 0
    # Programs of the grid that run no tensor-core loop and are launched after all the others (a weight gradient's
    # bias sums); counted apart from the GEMM programs in the issue model's waves.
    light_programs: int = 0

    @property
    def persistent(self) -> bool:
        """Whether the launch's programs loop over several tiles each (see ``persistent_tiles``)."""
        return self.persistent_tiles > 0


@dataclasses.dataclass(frozen=True)
class ModeledTarget:
    """The GPU that launch choices model where no GPU is involved (dry-run traces, interpreter): its SM count and
    compute capability."""

    sm_count: int
    arch: int = 90  # compute capability as an integer: 90 is sm_90


# The default modeled GPU: an H100/H200 SXM (sm_90, 132 SMs).
MODELED_TARGET = ModeledTarget(sm_count=132, arch=90)


class _ThreadState(threading.local):
    """Per-thread switches: a dry run or a launch log in one thread (``fastunet.trace``, say) must not change
    what another thread's forward launches or records."""

    def __init__(self) -> None:
        self.launch_logs: list[list[LaunchRecord]] = []
        self.dry_run_depth = 0
        self.autotune: bool | None = None  # None: the process default (FASTUNET_AUTOTUNE)
        self.stage: str | None = None  # stamped on the records of this thread's next launches
        self.target: ModeledTarget = MODELED_TARGET
        self.load_path: str | None = None  # None: the process default (FASTUNET_LOAD_PATH)
        self.launch_caching = True  # launchers reuse what they derived for a signature seen before
        self.prefer: str | None = None  # launch the first candidate setting this config key (see preferring)


_thread = _ThreadState()
# Process-wide on purpose: a test aid that only changes the fill of fresh buffers, never what a kernel computes.
_poison_depth = 0


@contextlib.contextmanager
def launch_log() -> Iterator[list[LaunchRecord]]:
    """Record every launch this thread makes through the launchers inside the ``with`` block."""
    records: list[LaunchRecord] = []
    _thread.launch_logs.append(records)
    try:
        yield records
    finally:
        _thread.launch_logs.remove(records)


def set_launch_stage(stage: str | None) -> None:
    """Name the network stage of this thread's following launches (their records carry it); None clears it."""
    _thread.stage = stage


def current_launch_stage() -> str | None:
    """The stage name this thread's launches are stamped with (see :func:`set_launch_stage`)."""
    return _thread.stage


def recording() -> bool:
    """Whether a launch log of this thread is open: launchers build their :class:`LaunchRecord` only then (the
    record costs microseconds of host time a launch)."""
    return bool(_thread.launch_logs)


def record_launch(record: LaunchRecord) -> None:
    if record.stage is None and _thread.stage is not None:
        record = dataclasses.replace(record, stage=_thread.stage)
    for records in _thread.launch_logs:
        records.append(record)


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Fill every buffer the launchers allocate with NaN, so that an element a kernel forgot to write shows up."""
    global _poison_depth
    _poison_depth += 1
    try:
        yield
    finally:
        _poison_depth -= 1


@contextlib.contextmanager
def dry_run() -> Iterator[None]:
    """Launchers validate, allocate (on the ``meta`` device) and record, but launch nothing (this thread only).

    Lets :func:`fastunet.trace` list the launches of any shape without running them.
    """
    _thread.dry_run_depth += 1
    try:
        yield
    finally:
        _thread.dry_run_depth -= 1


def is_dry_run() -> bool:
    return _thread.dry_run_depth > 0


def alloc(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, channels_last: bool = False
) -> torch.Tensor:
    """Allocate an output buffer (NaN-filled while :func:`poison_outputs` is active)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if _poison_depth and device.type != "meta":
        return torch.full(shape, float("nan"), dtype=dtype, device=device).contiguous(memory_format=memory_format)
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


def check_runnable(t: torch.Tensor, what: str) -> None:
    """Refuse tensors that the active Triton mode cannot read (CPU tensors are never handed to a compiled kernel)."""
    if t.dtype not in INTERPRETER_DTYPES:
        raise TypeError(
            f"{what}: expected a float32, float16 or bfloat16 tensor (or float64 under TRITON_INTERPRET=1), "
            f"got {t.dtype}"
        )
    if is_dry_run() and t.device.type == "meta":
        return
    if t.dtype == torch.float64 and not INTERPRET:
        raise TypeError(
            f"{what}: float64 runs only under the interpreter (TRITON_INTERPRET=1, CPU tensors); compiled kernels take "
            f"float32, float16 or bfloat16 tensors, got float64 on {t.device}"
        )
    if INTERPRET:
        if t.device.type != "cpu":
            raise RuntimeError(f"{what}: TRITON_INTERPRET=1 runs kernels on CPU tensors, got a tensor on {t.device}")
        check_interpreter_versions()
    elif t.device.type != "cuda":
        raise RuntimeError(
            f"{what}: compiled Triton kernels need a CUDA tensor, got a tensor on {t.device} "
            "(set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU)"
        )


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a launch's statistics, norm scales and shifts and partial sums for maps stored in ``dtype``:
    float64 for float64 maps (nothing is rounded below the storage precision), float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def element_span(t: torch.Tensor) -> int:
    """One past the largest element offset a kernel reads through ``t``'s sizes and strides (0 when empty)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True))


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch under the tensor's own GPU (a tensor on a non-current device would otherwise fault)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@contextlib.contextmanager
def modeled_target(sm_count: int, arch: int = 90) -> Iterator[None]:
    """Launch choices of this thread (tiles, load path) model ``sm_<arch>`` with ``sm_count`` SMs where no GPU is
    involved: what a compile report for another target traces."""
    previous = _thread.target
    _thread.target = ModeledTarget(sm_count, arch)
    try:
        yield
    finally:
        _thread.target = previous


@functools.cache
def _cuda_capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def capability(t: torch.Tensor) -> int:
    """Compute capability of the tensor's GPU as an integer (90: sm_90); the modeled target's off the GPU."""
    if t.device.type == "cuda":
        return _cuda_capability(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return _thread.target.arch


LOAD_PATHS = ("auto", "tma", "pointer")
_LOAD_PATH_DEFAULT = os.environ.get("FASTUNET_LOAD_PATH", "auto")


@contextlib.contextmanager
def load_path(path: str) -> Iterator[None]:
    """How this thread's conv launches load their operands: ``"auto"`` (TMA on sm_90 and newer where the tensors
    allow it, pointer loads elsewhere and under the interpreter), ``"tma"`` (TMA wherever the tensors allow it, the
    interpreter included: how the CPU test suite runs that path) or ``"pointer"``. ``FASTUNET_LOAD_PATH`` sets the
    process default. Each launch record says which path ran and why."""
    if path not in LOAD_PATHS:
        raise ValueError(f"load path must be one of {list(LOAD_PATHS)}, got {path!r}")
    previous = _thread.load_path
    _thread.load_path = path
    try:
        yield
    finally:
        _thread.load_path = previous


def requested_load_path() -> str:
    """The load path this thread asks for (see :func:`load_path`)."""
    path = _LOAD_PATH_DEFAULT if _thread.load_path is None else _thread.load_path
    if path not in LOAD_PATHS:
        raise ValueError(f"FASTUNET_LOAD_PATH must be one of {list(LOAD_PATHS)}, got {path!r}")
    return path


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(t: torch.Tensor) -> int:
    """Streaming multiprocessors of the tensor's GPU (queried once per device, at the first launch on it)."""
    if t.device.type == "cuda":
        return _cuda_sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return _thread.target.sm_count


_AUTOTUNE_DEFAULT = os.environ.get("FASTUNET_AUTOTUNE", "0") == "1"
_tuned: dict[tuple, dict] = {}


@contextlib.contextmanager
def autotuning(enabled: bool = True) -> Iterator[None]:
    """Time every candidate config the first time a launch key is seen (GPU only) and keep the fastest.

    Off by default (the first forward of each shape would otherwise pay for timing every candidate);
    ``FASTUNET_AUTOTUNE=1`` turns it on for the whole process, this context manager for the calling thread. Under
    the interpreter the first candidate (the heuristic choice) is always used.
    """
    previous = _thread.autotune
    _thread.autotune = enabled
    try:
        yield
    finally:
        _thread.autotune = previous


def _autotune_on() -> bool:
    return _AUTOTUNE_DEFAULT if _thread.autotune is None else _thread.autotune


# Triton's interpreter keeps global state while it runs a kernel: launches from several threads take turns.
_INTERPRETER_LOCK = threading.Lock()
# One tuning at a time, so two threads seeing a new key time its candidates once, not concurrently.
_TUNE_LOCK = threading.RLock()


def launch_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context of one kernel launch: the tensor's GPU current, or the interpreter held by this thread alone."""
    if INTERPRET:
        return _INTERPRETER_LOCK
    return device_guard(t)


@contextlib.contextmanager
def preferring(key: str) -> Iterator[None]:
    """Launches of this thread inside the block take the first autotuning candidate that sets config ``key``
    (``"PROGRAMS_PER_SM"``: a persistent grid; ``"SPLIT_K"``: split K), where a launch has one, instead of the
    heuristic's or the tuner's choice: what the compile report models and the tests run, with no GPU to time them."""
    previous = _thread.prefer
    _thread.prefer = key
    try:
        yield
    finally:
        _thread.prefer = previous


def choose_config(key: tuple, candidates: list[dict], run, timer=None) -> dict:
    """The config to launch with: ``candidates[0]`` unless autotuning is on, else the fastest by ``timer``; inside
    :func:`preferring`, the first candidate that sets the preferred key, if any.

    ``run(config)`` launches once with ``config``; ``timer(fn)`` returns a time in ms (default: Triton's
    ``do_bench``, median of CUDA-event timings after warm-up). Winners are cached per ``key``.
    """
    if _thread.prefer is not None:
        preferred = next((c for c in candidates if c.get(_thread.prefer)), None)
        if preferred is not None:
            return preferred
    if not _autotune_on() or is_dry_run() or len(candidates) == 1:
        return candidates[0]
    if key in _tuned:
        return _tuned[key]
    if INTERPRET and timer is None:
        return candidates[0]
    with _TUNE_LOCK:
        if key not in _tuned:
            _tuned[key] = _fastest(key, candidates, run, timer)
    return _tuned[key]


def _fastest(key: tuple, candidates: list[dict], run, timer) -> dict:
    if timer is None:

        def timer(fn):
            return triton.testing.do_bench(fn, warmup=5, rep=20)

    times = []
    for config in candidates:
        try:
            times.append(timer(lambda config=config: run(config)))
        except triton.runtime.errors.OutOfResources:  # e.g. more shared memory than this GPU has: not a candidate
            times.append(float("inf"))
    if all(t == float("inf") for t in times):
        raise RuntimeError(f"no candidate config could be launched for {key}")
    return candidates[min(range(len(candidates)), key=times.__getitem__)]


def tuned_configs() -> dict[tuple, dict]:
    """The autotuning winners so far (to record as data for a device)."""
    return dict(_tuned)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ---------------------------------------------------------------------------------------------------------------
# Launch signatures: what a launcher derives from shapes, strides, dtypes, devices and alignment is derived once
# ---------------------------------------------------------------------------------------------------------------
class LaunchCache:
    """A bounded map (least recently used entry evicted) from a launch signature to what a launcher derived from it:
    validated sizes, the chosen tiles, the load path and its reason, grids, constexprs, integer arguments.

    Keys hold plain values only (sizes, strides, dtypes, devices, alignment facts, switches), never a tensor or an
    address, so an entry pins no memory. A key must hold everything the derivation reads, the calling thread's
    switches included (see :func:`launch_environment`); errors are never cached, so bad input fails the same way
    every time. One lock per cache: several threads may launch at once."""

    def __init__(self, maxsize: int = 1024) -> None:
        self.maxsize = maxsize
        self._entries: collections.OrderedDict[Hashable, object] = collections.OrderedDict()
        self._lock = threading.Lock()
        _launch_caches.append(self)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> object | None:
        """The entry for ``key`` (None when absent, when ``key`` holds an unhashable argument, or while this thread
        has caching off)."""
        if not _thread.launch_caching:
            return None
        with self._lock:
            try:
                value = self._entries.get(key)
            except TypeError:  # an unhashable argument: the launcher validates it (and refuses it) every time
                return None
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: Hashable, value: object) -> None:
        if not _thread.launch_caching:
            return
        with self._lock:
            try:
                self._entries[key] = value
            except TypeError:
                return
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_launch_caches: list[LaunchCache] = []


def clear_launch_caches() -> None:
    """Forget every launcher's derived launches (they are rebuilt on the next call)."""
    for cache in _launch_caches:
        cache.clear()


@contextlib.contextmanager
def uncached_launches() -> Iterator[None]:
    """This thread's launchers derive every launch from scratch inside the block, neither reading nor filling the
    caches: what a cached launch must be indistinguishable from."""
    previous = _thread.launch_caching
    _thread.launch_caching = False
    try:
        yield
    finally:
        _thread.launch_caching = previous


def tensor_meta(t: torch.Tensor | None) -> tuple | None:
    """Sizes, strides, dtype and device of ``t`` (None for None): what launch validation reads of most tensors."""
    if t is None:
        return None
    return t.shape, t.stride(), t.dtype, t.device


def tensor_facts(t: torch.Tensor | None) -> tuple | None:
    """:func:`tensor_meta` and where ``t``'s first element sits against a 16-byte boundary (its storage offset too
    when off one: a path reason names it), what a TMA descriptor needs; never the address itself (on ``meta``, the
    storage offset stands for it: storage itself counts as aligned)."""
    if t is None:
        return None
    offset = t.storage_offset()
    misaligned = (offset * t.element_size() if t.is_meta else t.data_ptr()) % 16
    return t.shape, t.stride(), t.dtype, t.device, misaligned, offset if misaligned else 0


def launch_environment() -> tuple:
    """This thread's switches and the process settings that launch choices read (the kernel mode, the load path
    asked for, the modeled target, TF32): part of every launch signature."""
    return (
        INTERPRET,
        _thread.load_path,
        _LOAD_PATH_DEFAULT,
        _thread.target,
        torch.backends.cudnn.allow_tf32,
    )


# ---------------------------------------------------------------------------------------------------------------
# Triton-side helpers
# ---------------------------------------------------------------------------------------------------------------


@constexpr_function
def acc_type(dtype):
    """The accumulator dtype for operands or maps stored in ``dtype`` (a Triton dtype, at compile time): float64
    for float64, float32 for everything else."""
    return tl.float64 if dtype == tl.float64 else tl.float32


@triton.jit
def mma(a, b, acc, INTERPRETER: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``acc + a @ b`` accumulated in ``acc``'s dtype (fp32; fp64 for float64 operands).

    Under the interpreter, ``tl.dot`` multiplies bf16 operands as raw bit patterns, so the operands are widened
    to the accumulator's dtype first (exact: a product of two 16-bit floats fits in fp32); float64 operands stay
    float64 there.
    """
    if INTERPRETER:
        return tl.dot(a.to(acc.dtype), b.to(acc.dtype), acc, input_precision="ieee", out_dtype=acc.dtype)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def pixel_offset(img, y, x, stride_n, stride_h, stride_w):
    """Element offset of pixel (img, y, x), in int64: a 16 x 64-channel x 1024^2 map is 2^30 elements already."""
    return img.to(tl.int64) * stride_n + y.to(tl.int64) * stride_h + x.to(tl.int64) * stride_w


@triton.jit
def to_storage(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """Round an fp32 tensor to the storage ``dtype``, to nearest even as the GPU does.

    The interpreter truncates fp32 -> bf16; there the rounding is done on the bits (NaN kept as is).
    """
    if INTERPRETER and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        rounded = bits.to(tl.float32, bitcast=True)
        return tl.where(x != x, x, rounded).to(dtype)
    return x.to(dtype)


def dot_flags(dtype: torch.dtype, allow_tf32: bool) -> tuple[bool, str]:
    """(INTERPRETER, DOT_PRECISION) constexprs for a kernel whose operands have ``dtype``."""
    if INTERPRET:
        return True, "ieee"
    if dtype == torch.float32:
        return False, "tf32" if allow_tf32 else "ieee"
    return False, "tf32"


# Epilogue activations: constexpr globals, so the kernel compares names, not numbers.
ACT_NONE = tl.constexpr(0)
ACT_RELU = tl.constexpr(1)
ACT_LEAKY_RELU = tl.constexpr(2)
ACT_PRELU = tl.constexpr(3)
ACT_SILU = tl.constexpr(4)
ACT_CLAMP = tl.constexpr(5)
ACTIVATIONS = {"none": ACT_NONE, "relu": ACT_RELU, "leaky_relu": ACT_LEAKY_RELU, "prelu": ACT_PRELU,
               "silu": ACT_SILU, "clamp": ACT_CLAMP}  # fmt: skip


@triton.jit
def activate(acc, slopes_ptr, offs_n, n_mask, slope, lo, hi, ACT: tl.constexpr):
    """The activation ``ACT`` on an fp32 tile whose columns are channels ``offs_n`` (``slopes_ptr``: PReLU's, one per
    channel; masked by ``n_mask``), with torch's special values: comparisons and selects rather than
    ``tl.maximum``/``tl.minimum`` (compiled, those drop NaN), so NaN stays NaN; LeakyReLU and PReLU scale every
    non-positive value (``-inf * 0`` is NaN, as in torch); SiLU is ``x / (1 + exp(-x))`` (``-inf`` gives NaN,
    as in torch)."""
    if ACT == ACT_RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # relu that keeps NaN (tl.maximum would drop it)
    elif ACT == ACT_LEAKY_RELU:
        acc = tl.where(acc > 0.0, acc, acc * slope)
    elif ACT == ACT_PRELU:
        slopes = tl.load(slopes_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc = tl.where(acc > 0.0, acc, acc * slopes[None, :])
    elif ACT == ACT_SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    elif ACT == ACT_CLAMP:
        acc = tl.where(acc < lo, lo, tl.where(acc > hi, hi, acc))
    return acc
