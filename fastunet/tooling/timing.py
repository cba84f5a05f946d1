"""Time the U-Net on a GPU: fastunet against eager PyTorch (cuDNN) and torch.compile, in one process.

First the ceilings of this device: a large dense bf16 matmul and a device-to-device copy, both with
``triton.testing.do_bench``; the roofline floors and the "% of the bf16 matmul rate" use them. Then, for each
configuration of the benchmark table (:mod:`fastunet.tooling.shapes`) and each dtype: check fastunet's output
against eager PyTorch and a float64 reference (normwise errors, published budgets), then time every provider with
``do_bench`` (CUDA events, L2 flushed between calls, median of the timed calls; the first call, which compiles and
autotunes, and the warm-up calls are not timed), record the peak memory of one forward, and time each stage of the
fused forward alone against the same math in eager PyTorch and torch.compile. With ``--profile DIR``, one forward
per provider is also recorded with ``torch.profiler`` (Chrome trace format).

The work runs in phases, so that a run cut short keeps what matters most: fastunet and eager PyTorch on every
configuration (whole network, then each stage), then ``torch.compile`` (default mode), then max-autotune. A step
that compiles starts only when the time budget still holds what such a compile takes (``--compile-start-s``,
``--max-autotune-start-s``); SIGINT (``timeout -s INT``) ends the run with its results written and printed.

With ``--train``, a training step is timed too (:func:`time_training`): fastunet and eager right after the
whole-network forward phase, ``torch.compile`` right after the compiled forward. One step is the forward in training
mode of the configuration with ``norm=None`` (the layout the backward kernels cover), the mean squared error against
a fixed random target, the backward and a ``torch.optim.AdamW`` step (fused where PyTorch has the fused kernel for the
device, the same for every provider). Parameters stay float32 and bf16/fp16 runs go through ``torch.autocast``, the
way mixed-precision training is done (fp16 with a ``GradScaler``), rather than parameters in the bench dtype: that is
what a user of the backward kernels times, and what the kernels' autocast path (the packed weights cast from the
float32 parameters inside the graph, gradients returned in float32) must carry. Before a fastunet step is timed, its
first step must have run on the backward kernels (``last_backend_reason`` ending in "backward kernels"; otherwise it
is recorded as an error and not timed) and its gradients are compared with eager's first step from the same
parameters (normwise over all parameters, held to twice the forward's budget for the math mode, as the forward's
fastunet-vs-eager check is; a miss is recorded and fails the run, and the time is still recorded, as for the forward).

Results go to ``<out>/<date>-<device>-<commit>.json`` (or ``--json FILE``), rewritten after every step. This module
ships in the package: an installed wheel times a GPU as well as a checkout does (no network needed)::

    fastunet bench                                    # one configuration built from options
    python -m fastunet.tooling.timing --quick         # the configurations of fastunet.tooling.shapes (a few minutes)
    python bench/run_gpu.py --configs ref-bilinear-b16 ref-bilinear-b1 --dtypes bfloat16 --out /some/dir
    TRITON_INTERPRET=1 python bench/run_gpu.py --dry-run --json /tmp/dry.json   # the plumbing on a CPU

``--dry-run`` runs the same steps on the CPU under Triton's interpreter, on shrunken copies of the configurations,
with one wall-clock call in place of ``do_bench`` and dynamo's eager backend in place of inductor: it checks the
bookkeeping, never speed, and says so in its JSON and tables.

The commit comes from ``FASTUNET_COMMIT`` when set (a copied tree without ``.git``), else ``git rev-parse HEAD`` of the
checkout the package is imported from (none for an installed wheel).
A torch.compile failure is recorded in the JSON and the run goes on. Exit status 1 when fastunet failed or missed
its error budget on any configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import triton

import fastunet
from fastunet.kernels import INTERPRET
from fastunet.kernels._common import autotuning, tuned_configs
from fastunet.parity import NETWORK_BUDGETS, math_mode, network_error
from fastunet.tooling import providers as providers_module
from fastunet.tooling.dtypes import DTYPES, dtype_name
from fastunet.tooling.providers import (
    TRAIN_INIT_SCALE,
    TRAIN_LR,
    TrainingStep,
    compile_mode,
    eager_stage,
    make_input,
    make_model,
    network_callable,
    stage_callable,
    stage_tensors,
    training_model,
    training_step,
)
from fastunet.tooling.roofline import H100, Ceilings, ceilings_json, config_roofline, measured_ceilings
from fastunet.tooling.shapes import CONFIGS, QUICK_CONFIGS, BenchConfig, Stage, bench_stages
from fastunet.tooling.timing_args import BASELINES, add_timing_args, finish_timing_args

DEVICE = "cuda"
DRY_RUN = False  # set by --dry-run: CPU tensors, the interpreter, wall-clock placeholders instead of GPU timings
DRY_RUN_NOTE = "dry run on the CPU (Triton interpreter, one wall-clock call per timing): bookkeeping, not speed"
MATMUL_SIZE = 8192  # bf16 (8192 x 8192) @ (8192 x 8192): 1.1 TFLOP, ~1.4 ms on an H100
COPY_BYTES = 2**30  # a 1 GiB device-to-device copy (2 GiB of traffic)
STAGE_SHARE = 0.25
# A training step is timed over at least this many steps (do_bench's timed window is widened to hold them).
TRAIN_MIN_STEPS = 10
TRAIN_LOSS = "mean squared error against a fixed random target (seeded standard normal, the logits' shape)"
# Phases, most important first: each is (kind, providers); providers not asked for are left out, and so are the
# "train" phases without --train.
PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("network", ("fastunet", "fastunet-graphs", "torch-eager")),
    ("train", ("fastunet", "torch-eager")),
    ("stages", ("fastunet", "torch-eager")),
    ("network", ("torch-compile",)),
    ("train", ("torch-compile",)),
    ("stages", ("torch-compile",)),
    ("network", ("torch-compile-max-autotune",)),
    ("stages", ("torch-compile-max-autotune",)),
)


def _source_root() -> Path | None:
    """The checkout the package is imported from (an editable install or the source tree), None for a wheel."""
    root = Path(fastunet.__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "kernels").is_dir() else None


def commit_info() -> dict:
    """The source revision: ``FASTUNET_COMMIT`` when set (a copy without ``.git``), else git's HEAD of the checkout
    the package comes from and whether its tracked files differ from it; ``commit`` is None when neither says (an
    installed wheel)."""
    from_env = os.environ.get("FASTUNET_COMMIT", "").strip()
    if from_env:
        return {"commit": from_env, "commit_source": "FASTUNET_COMMIT", "dirty": None}
    root = _source_root()

    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    head = git("rev-parse", "HEAD") if root is not None else None
    if head is None:
        return {"commit": None, "commit_source": "unknown: no checkout and FASTUNET_COMMIT not set", "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head, "commit_source": "git", "dirty": bool(status) if status is not None else None}


def environment() -> dict:
    """Device, library versions and source revision of this run."""
    env: dict = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        env |= {
            "device": torch.cuda.get_device_name(0),
            "capability": list(torch.cuda.get_device_capability(0)),
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
        }
    else:
        env |= {"device": "cpu (dry run)", "capability": None, "sm_count": None, "memory_gib": None}
    env |= {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if DEVICE == "cuda" else None,
        "python": platform.python_version(),
        "fastunet": fastunet.__version__,
        **commit_info(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "FASTUNET_AUTOTUNE": os.environ.get("FASTUNET_AUTOTUNE"),
    }
    return env


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn: Callable, warmup_ms: float, rep_ms: float, return_mode: str = "median"):
    """``triton.testing.do_bench`` on a GPU; in a dry run one call timed by the wall clock (a placeholder)."""
    if DRY_RUN:
        start = time.perf_counter()
        fn()
        elapsed_ms = (time.perf_counter() - start) * 1e3
        return [elapsed_ms] if return_mode == "all" else elapsed_ms
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode=return_mode)


def _matmul_ms(n: int) -> float:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    a = torch.randn((n, n), device=DEVICE, dtype=torch.bfloat16, generator=gen)
    b = torch.randn((n, n), device=DEVICE, dtype=torch.bfloat16, generator=gen)
    return bench_ms(lambda: a @ b, 50, 300)


def _copy_ms(nbytes: int) -> float:
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    src = torch.randint(0, 256, (nbytes,), device=DEVICE, dtype=torch.uint8, generator=gen)
    dst = torch.empty_like(src)
    return bench_ms(lambda: dst.copy_(src), 50, 300)


def measure_ceilings(sm_count: int) -> tuple[dict, Ceilings]:
    """This device's dense bf16 matmul rate and copy bandwidth (``do_bench`` medians), as a record and as
    :class:`~fastunet.tooling.roofline.Ceilings`."""
    matmul_ms = _matmul_ms(MATMUL_SIZE)
    copy_ms = _copy_ms(COPY_BYTES)
    _free()
    matmul_flops = 2 * MATMUL_SIZE**3 / (matmul_ms / 1e3)
    copy_rate = 2 * COPY_BYTES / (copy_ms / 1e3)  # read + write
    record = {
        "matmul_bf16": {"shape": [MATMUL_SIZE] * 3, "median_ms": matmul_ms, "tflops": matmul_flops / 1e12},
        "copy": {"bytes": COPY_BYTES, "median_ms": copy_ms, "tb_per_s_read_plus_write": copy_rate / 1e12},
        "timer": "triton.testing.do_bench median (CUDA events, warm-up excluded)",
    }
    return record, measured_ceilings(torch.cuda.get_device_name(0), matmul_flops, copy_rate, sm_count)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _key(provider: str) -> str:
    """JSON key fragment of a provider name: ``torch-eager`` -> ``torch_eager``."""
    return provider.replace("-", "_")


def results_path(out_dir: str, env: dict) -> str:
    """``<out>/<date>-<device>-<commit>.json``; a numeric suffix keeps earlier runs of the same day."""
    commit = (env["commit"] or "nocommit")[:12] + ("-dirty" if env["dirty"] else "")
    stem = f"{env['date_utc'][:10]}-{_slug(env['device'])}-{commit}"
    os.makedirs(out_dir, exist_ok=True)
    path, n = os.path.join(out_dir, stem + ".json"), 2
    while os.path.exists(path):
        path, n = os.path.join(out_dir, f"{stem}-{n}.json"), n + 1
    return path


def _write(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:2000]


def _free() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


class Progress:
    """A one-line progress bar on stderr (one line per step when stderr is not a terminal)."""

    def __init__(self, total: int, width: int = 30) -> None:
        self.total, self.done, self.width = max(total, 1), 0, width
        self.tty = sys.stderr.isatty()
        self.started = time.perf_counter()

    def step(self, label: str) -> None:
        """Announce the step about to run."""
        filled = self.width * self.done // self.total
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"[{bar}] {self.done}/{self.total} {time.perf_counter() - self.started:5.0f} s  {label}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line[:150])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
        self.done = min(self.done + 1, self.total)

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _spread(times: Sequence[float]) -> dict:
    """Median, 20th and 80th percentiles and minimum of the timed calls (ms)."""
    times = sorted(times)

    def quantile(q: float) -> float:
        return times[min(len(times) - 1, int(q * len(times)))]

    return {
        "median_ms": quantile(0.5),
        "p20_ms": quantile(0.2),
        "p80_ms": quantile(0.8),
        "min_ms": times[0],
        "timed_calls": len(times),
    }


def time_call(fn: Callable, warmup_ms: float, rep_ms: float) -> dict:
    """First call (compile/autotune) timed on its own, then ``do_bench``: median and spread of the timed calls."""
    start = time.perf_counter()
    fn()
    _sync()
    first_call_s = time.perf_counter() - start
    return _spread(bench_ms(fn, warmup_ms, rep_ms, return_mode="all")) | {"first_call_s": first_call_s}


def peak_memory(fn: Callable, label: str = "forward") -> dict:
    """Peak allocated memory over one call of ``fn``, in total and (``<label>_peak_bytes``) above what was allocated
    before it (torch's caching allocator; CUDA-graph pools of max-autotune were allocated when the graph was
    captured). Empty off a GPU."""
    if DEVICE != "cuda":
        return {}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return {"peak_allocated_bytes": peak, f"{label}_peak_bytes": peak - before}


def write_profile(fn: Callable, path: str, label: str, cuda: bool = True) -> str:
    """Record one call of ``fn`` (already warmed up) with ``torch.profiler`` and write a Chrome trace to ``path``."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with profile(activities=activities, record_shapes=True) as prof:
        with record_function(label):
            fn()
            if cuda:
                torch.cuda.synchronize()
    prof.export_chrome_trace(path)
    return path


def _errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    error = network_error(out, ref)
    return {"rel_l2": error.rel_l2, "max_norm": error.max_norm}


def _with_rates(timing: dict, flops: int, images: int, floor_s: float, ceilings: Ceilings) -> dict:
    seconds = timing["median_ms"] / 1e3
    timing["images_per_s"] = images / seconds
    timing["tflops"] = flops / seconds / 1e12
    timing["fraction_of_bf16_matmul"] = flops / seconds / ceilings.peak_for("bf16")
    timing["fraction_of_roofline"] = floor_s / seconds
    return timing


def _ratios(entries: dict) -> dict:
    """Per provider: the time of eager and of each compiled provider over its own (> 1: this provider faster)."""
    ratios: dict = {}
    for provider, entry in entries.items():
        mine = entry.get("median_ms")
        if not mine:
            continue
        for baseline in BASELINES:
            theirs = entries.get(baseline, {}).get("median_ms")
            if theirs and baseline != provider:
                ratios.setdefault(_key(provider), {})[f"speedup_vs_{_key(baseline)}"] = theirs / mine
    return ratios


def start_needs_s(provider: str, kind: str, args: argparse.Namespace) -> float:
    """Seconds of time budget a step must still have to be started: 0 for the uncompiled providers, the expected
    compile time for the compiled ones (a stage compiles in a fraction of the whole network's time). A training step
    (``kind == "train"``) compiles the forward and the backward graph: the whole network's figure covers both (the
    default-mode forward of the reference config compiled in 14 s at batch 16 on the H200, the default figure is
    60 s)."""
    if compile_mode(provider, args.max_autotune_mode) is None:
        return 0.0
    need = args.max_autotune_start_s if provider == "torch-compile-max-autotune" else args.compile_start_s
    return need * STAGE_SHARE if kind == "stage" else need


def _time_skip(provider: str, kind: str, args: argparse.Namespace, deadline: float) -> str | None:
    """Why a step of ``provider`` is not started now (None: start it)."""
    left = deadline - time.perf_counter()
    need = start_needs_s(provider, kind, args)
    if left <= 0:
        return "time budget spent"
    if left < need:
        return f"time budget: {left:.0f} s left, a {provider} compile needs about {need:.0f} s"
    return None


@dataclasses.dataclass
class Job:
    """One configuration in one dtype: its JSON entry, filled in phase by phase, and what later phases reuse."""

    config: BenchConfig
    dtype_name: str
    run: dict
    model: torch.nn.Module | None = None
    x: torch.Tensor | None = None
    started: bool = False
    callables: dict = dataclasses.field(default_factory=dict)
    first_call_s: dict = dataclasses.field(default_factory=dict)
    stages: list[Stage] | None = None
    train: bool = False  # --train asked for this configuration
    training: TrainingState | None = None

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    def release(self) -> None:
        self.model = self.x = self.training = None
        self.callables.clear()


@dataclasses.dataclass
class TrainingState:
    """What the training phases of one job share: the starting float32 model, the input and target, eager's first
    step from those parameters (the reference of the gradient check: its gradients and loss) and that eager step
    itself, kept to be timed when torch-eager is asked for."""

    model: torch.nn.Module
    x: torch.Tensor
    target: torch.Tensor
    reference: dict[str, torch.Tensor]
    reference_loss: float
    eager: TrainingStep | None
    eager_first_call_s: float


def _precision(dtype_name: str, math: str) -> str:
    if dtype_name == "float32":
        return f"float32 parameters and maps ({math})"
    scaler = f", torch.amp.GradScaler (initial scale {TRAIN_INIT_SCALE:g})" if dtype_name == "float16" else ""
    return f"float32 parameters, forward and backward under torch.autocast({dtype_name}){scaler}"


def new_job(config: BenchConfig, dtype_name: str, ceilings: Ceilings, train: bool = False) -> Job:
    """The job's JSON entry with what is known before anything runs (sizes, roofline floor, budget; with ``train``,
    the training step's description)."""
    dtype = DTYPES[dtype_name]
    mode = math_mode(dtype, "cuda")
    budget = NETWORK_BUDGETS[mode]
    net = config_roofline(config.model_kwargs(), config.input_shape(), dtype, ceilings=ceilings)
    run = {
        "config": config.name,
        "model": config.model_kwargs(),
        "input_shape": list(config.input_shape()),
        "dtype": dtype_name,
        "math": mode,
        "launches": len(net.launches),
        "flops": net.flops,
        "fused_bytes": net.bytes,
        "roofline_floor_ms": net.floor_s * 1e3,
        "roofline_note": f"model against {ceilings.name} ceilings, not a measurement",
        "budget": {"rel_l2": budget.rel_l2, "max_norm": budget.max_norm},
        "providers": {},
    }
    if train:
        run["train"] = {
            "model": dataclasses.replace(config, norm=None).model_kwargs(),
            "mode": "train",
            "input_shape": list(config.input_shape()),
            "precision": _precision(dtype_name, mode),
            "loss": TRAIN_LOSS,
            "optimizer": {"name": "AdamW", "lr": TRAIN_LR, "fused": None},
            "gradient_budget": {"rel_l2": 2 * budget.rel_l2, "max_norm": 2 * budget.max_norm},
            "providers": {},
        }
    return Job(config, dtype_name, run, train=train)


def start_job(job: Job, args: argparse.Namespace, progress: Progress) -> None:
    """Build the model and input, then parity before any timing: fastunet against eager in the same dtype and
    against float64 on the same parameters. The first calls (Triton compilation, cuDNN autotuning) are timed."""
    config, run = job.config, job.run
    budget = NETWORK_BUDGETS[run["math"]]
    job.started = True
    job.model = make_model(config, job.dtype, DEVICE, seed=args.seed)
    job.x = make_input(config, job.dtype, DEVICE, seed=args.seed + 1)
    progress.step(f"{config.name} {job.dtype_name}: parity")
    parity: dict = {}
    outputs: dict[str, torch.Tensor] = {}
    for provider in ("fastunet", "torch-eager"):
        try:
            fn = network_callable(job.model, job.x, provider)
            start = time.perf_counter()
            outputs[provider] = fn()
            _sync()
            job.first_call_s[provider] = time.perf_counter() - start  # Triton compilation / cuDNN autotuning
            job.callables[provider] = fn
        except Exception as error:  # recorded, the run goes on
            traceback.print_exc()
            run["providers"][provider] = {"error": _error_text(error)}
    fast_module = job.callables["fastunet"].module if "fastunet" in job.callables else None
    if fast_module is not None:
        run["fastunet_backend"] = fast_module.last_backend
    if len(outputs) == 2:
        parity["fastunet_vs_eager"] = _errors(outputs["fastunet"], outputs["torch-eager"])
    if not args.no_fp64 and outputs:
        saved = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = False  # no point autotuning float64 convolutions
        try:
            with torch.no_grad():
                ref64 = fastunet.UNet(**config.model_kwargs(), device=DEVICE, dtype=torch.float64).eval()
                ref64.load_state_dict(job.model.state_dict())
                expected = ref64(job.x.double())
            for provider, out in outputs.items():
                parity[f"{_key(provider)}_vs_fp64"] = _errors(out, expected)
            del ref64, expected
        except Exception as error:
            traceback.print_exc()
            parity["fp64_error"] = _error_text(error)
        finally:
            torch.backends.cudnn.benchmark = saved
    kernels = "triton-interpreter" if DRY_RUN else "triton"
    ok = fast_module is not None and fast_module.last_backend == kernels
    if "fastunet_vs_fp64" in parity:
        ok = ok and parity["fastunet_vs_fp64"]["rel_l2"] <= budget.rel_l2
        ok = ok and parity["fastunet_vs_fp64"]["max_norm"] <= budget.max_norm
    if "fastunet_vs_eager" in parity:
        ok = ok and parity["fastunet_vs_eager"]["rel_l2"] <= 2 * budget.rel_l2
        ok = ok and parity["fastunet_vs_eager"]["max_norm"] <= 2 * budget.max_norm
    else:
        ok = False
    parity["ok"] = ok
    run["parity"] = parity
    del outputs
    _free()


def time_network(
    job: Job,
    providers: Sequence[str],
    args: argparse.Namespace,
    deadline: float,
    ceilings: Ceilings,
    progress: Progress,
    checkpoint: Callable[[], None],
) -> None:
    """Time the whole forward for each of ``providers`` (those whose step fits the time left)."""
    run, config = job.run, job.config
    for provider in providers:
        progress.step(f"{config.name} {job.dtype_name}: {provider}")
        if provider in run["providers"]:
            continue  # failed in the parity check
        mode_name = compile_mode(provider, args.max_autotune_mode)
        skip = _time_skip(provider, "network", args, deadline)
        if skip is not None:
            run["providers"][provider] = {"skipped": skip, "compile_mode": mode_name}
            job.callables.pop(provider, None)
            continue
        try:
            fn = job.callables.get(provider) or network_callable(job.model, job.x, provider, args.max_autotune_mode)
            timing = time_call(fn, args.warmup_ms, args.rep_ms)
            timing.update(peak_memory(fn))
            if args.profile:
                path = os.path.join(args.profile, f"{config.name}-{job.dtype_name}-{provider}.trace.json")
                timing["profile"] = write_profile(fn, path, f"{provider} forward", cuda=DEVICE == "cuda")
        except Exception as error:  # torch.compile or an OOM: record and go on
            traceback.print_exc()
            run["providers"][provider] = {"error": _error_text(error), "compile_mode": mode_name}
            job.callables.pop(provider, None)
            torch._dynamo.reset()
            _free()
            continue
        timing = _with_rates(timing, run["flops"], config.batch, run["roofline_floor_ms"] / 1e3, ceilings)
        timing["compile_mode"] = _mode_label(mode_name)
        timing["first_call_s"] = job.first_call_s.get(provider, timing["first_call_s"])
        if DRY_RUN:
            timing["timer"] = DRY_RUN_NOTE
        run["providers"][provider] = timing
        run["ratios"] = _ratios(run["providers"])
        checkpoint()
        job.callables.pop(provider, None)
        torch._dynamo.reset()
        _free()
    run["ratios"] = _ratios(run["providers"])


def _gradient_errors(found: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict:
    """Normwise error of one step's gradients against the reference's: over all parameters at once (relative L2,
    max|err| / max|ref|), and the parameter with the largest relative L2 error on its own."""
    if list(found) != list(reference):
        raise RuntimeError(f"parameter names differ from the reference's: {list(found)[:3]} vs {list(reference)[:3]}")
    error = network_error(
        torch.cat([g.detach().reshape(-1).double() for g in found.values()]),
        torch.cat([g.detach().reshape(-1).double() for g in reference.values()]),
    )
    each = {name: network_error(found[name], reference[name]).rel_l2 for name in reference}
    worst = max(each, key=each.get)
    return {"rel_l2": error.rel_l2, "max_norm": error.max_norm, "worst_parameter": worst,
            "worst_parameter_rel_l2": each[worst]}  # fmt: skip


def _first_step(step: TrainingStep) -> tuple[float, float]:
    """Run ``step`` once (compilation, autotuning); returns (seconds, loss)."""
    start = time.perf_counter()
    loss = step()
    _sync()
    return time.perf_counter() - start, float(loss)


def _training_state(job: Job, args: argparse.Namespace) -> TrainingState:
    """The job's training state, built on first use: the float32 model (``norm=None``, seeded), a float32 input and
    target, and eager's first step from those parameters."""
    if job.training is None:
        config, entry = job.config, job.run["train"]
        model = training_model(config, DEVICE, seed=args.seed)
        x = make_input(config, torch.float32, DEVICE, seed=args.seed + 1)
        generator = torch.Generator().manual_seed(args.seed + 2)
        target = torch.randn((config.batch, config.num_classes, config.height, config.width), generator=generator)
        target = target.to(DEVICE)
        eager = training_step(model, "torch-eager", x, target, job.dtype)
        first_s, loss = _first_step(eager)
        reference = {name: grad.detach().clone() for name, grad in eager.gradients().items()}
        entry["optimizer"]["fused"] = eager.fused
        entry["eager_first_step_loss"] = loss
        kept = eager if "torch-eager" in args.providers else None
        job.training = TrainingState(model, x, target, reference, loss, kept, first_s)
    return job.training


def _check_training_step(job: Job, step: TrainingStep, loss: float) -> None:
    """Compare the first step's gradients and loss with eager's; for fastunet, also record the backend its forward
    ran and raise when it was not the backward kernels (a fallback is never timed)."""
    entry, state = job.run["train"], job.training
    errors = _gradient_errors(step.gradients(), state.reference)
    errors["loss_rel_diff"] = abs(loss - state.reference_loss) / max(abs(state.reference_loss), 1e-30)
    gradients = entry.setdefault("gradients", {})
    gradients[f"{_key(step.provider)}_vs_eager"] = errors
    if step.provider != "fastunet":
        return
    module = step.module
    entry["fastunet_backend"], entry["fastunet_backend_reason"] = module.last_backend, module.last_backend_reason
    kernels = "triton-interpreter" if DRY_RUN else "triton"
    on_kernels = module.last_backend == kernels and (module.last_backend_reason or "").endswith("backward kernels")
    budget = entry["gradient_budget"]
    within = errors["rel_l2"] <= budget["rel_l2"] and errors["max_norm"] <= budget["max_norm"]
    gradients["ok"] = on_kernels and within
    if not on_kernels:
        raise RuntimeError(
            f"the training step did not run on the {kernels} backward kernels (last_backend {module.last_backend!r}: "
            f"{module.last_backend_reason}): not timed"
        )


def _time_training_step(step: TrainingStep, args: argparse.Namespace) -> dict:
    """``do_bench`` of the step after its first call, over at least ``TRAIN_MIN_STEPS`` steps (the timed window is
    widened to hold them, from one step timed by the wall clock); one placeholder call in a dry run."""
    rep_ms = args.rep_ms
    if not DRY_RUN:
        start = time.perf_counter()
        step()
        _sync()
        rep_ms = max(rep_ms, TRAIN_MIN_STEPS * (time.perf_counter() - start) * 1e3)
    return _spread(bench_ms(step, args.warmup_ms, rep_ms, return_mode="all"))


def time_training(
    job: Job,
    providers: Sequence[str],
    args: argparse.Namespace,
    deadline: float,
    progress: Progress,
    checkpoint: Callable[[], None],
) -> None:
    """Time the training step (see the module docstring) for each of ``providers`` into ``job.run["train"]``: the
    first step of each is checked against eager's first step from the same parameters (fastunet: on the backward
    kernels, or not timed), then timed; ms per step, images/s, peak memory of one step, ratios."""
    entry, config = job.run["train"], job.config
    for provider in providers:
        progress.step(f"{config.name} {job.dtype_name}: training step, {provider}")
        mode_name = _mode_label(compile_mode(provider, args.max_autotune_mode))
        skip = _time_skip(provider, "train", args, deadline)
        if skip is not None:
            entry["providers"][provider] = {"skipped": skip, "compile_mode": mode_name}
            continue
        step = None
        try:
            state = _training_state(job, args)
            if provider == "torch-eager" and state.eager is not None:
                step, first_s, loss = state.eager, state.eager_first_call_s, state.reference_loss
                state.eager = None
            else:
                step = training_step(state.model, provider, state.x, state.target, job.dtype)
                first_s, loss = _first_step(step)
                _check_training_step(job, step, loss)
            timing = _time_training_step(step, args)
            timing.update(peak_memory(step, "step"))
            if args.profile:
                path = os.path.join(args.profile, f"{config.name}-{job.dtype_name}-train-{provider}.trace.json")
                timing["profile"] = write_profile(step, path, f"{provider} training step", cuda=DEVICE == "cuda")
            timing["finite_after_timing"] = all(bool(p.isfinite().all()) for p in step.module.parameters())
        except Exception as error:  # torch.compile, an OOM, a step off the kernels: record and go on
            traceback.print_exc()
            entry["providers"][provider] = {"error": _error_text(error), "compile_mode": mode_name}
            step = None
            torch._dynamo.reset()
            _free()
            continue
        timing["images_per_s"] = config.batch / (timing["median_ms"] / 1e3)
        timing |= {"first_call_s": first_s, "first_step_loss": loss, "compile_mode": mode_name}
        if DRY_RUN:
            timing["timer"] = DRY_RUN_NOTE
        entry["providers"][provider] = timing
        entry["ratios"] = _ratios(entry["providers"])
        checkpoint()
        step = None
        torch._dynamo.reset()
        _free()
    entry["ratios"] = _ratios(entry["providers"])


def _mode_label(mode_name: str | None) -> str | None:
    if mode_name is None or not DRY_RUN:
        return mode_name
    return f"{mode_name}; dry run: eager backend"


def time_stages(
    job: Job,
    providers: Sequence[str],
    args: argparse.Namespace,
    deadline: float,
    ceilings: Ceilings,
    progress: Progress,
    checkpoint: Callable[[], None],
) -> None:
    """Each stage of the fused forward (and the standalone head) alone for each of ``providers``, with its roofline
    floor, in ``job.run["stages"]`` (one row per stage, providers added phase by phase); a provider's output is
    checked against eager PyTorch before it is timed."""
    config, dtype = job.config, job.dtype
    budget = NETWORK_BUDGETS[math_mode(dtype, "cuda")]
    peak, size = ceilings.peak_for(math_mode(dtype, "cuda")), dtype.itemsize
    if job.stages is None:
        job.stages = bench_stages(config)
    rows = job.run.setdefault("stages", [])
    by_index = {row["index"]: row for row in rows}
    for stage in job.stages:
        progress.step(f"{config.name} {job.dtype_name} stage {stage.index:02d} {stage.label}: {', '.join(providers)}")
        row = by_index.get(stage.index)
        if row is None:
            nbytes = (stage.bytes_read + stage.bytes_written) * size // 2  # traced in fp16
            row = {
                "index": stage.index,
                "stage": stage.label,
                "kind": stage.kind,
                "kernel": stage.kernel,
                "flops": stage.flops,
                "fused_bytes": nbytes,
                "floor_ms": max(stage.flops / peak, nbytes / ceilings.bandwidth) * 1e3,
                "providers": {},
            }
            rows.append(row)
            by_index[stage.index] = row
        skips = {provider: _time_skip(provider, "stage", args, deadline) for provider in providers}
        for provider, skip in skips.items():
            if skip is not None:
                row["providers"][provider] = {"skipped": skip}
        todo = [provider for provider, skip in skips.items() if skip is None]
        if todo:
            tensors = stage_tensors(stage, dtype, DEVICE, seed=args.seed)
            expected = eager_stage(stage, tensors)()
            for provider in todo:
                try:
                    fn = stage_callable(stage, provider, tensors, args.max_autotune_mode)
                    for got, want in zip(fn(), expected, strict=True):
                        error = network_error(got, want)
                        if error.rel_l2 > 2 * budget.rel_l2 or error.max_norm > 2 * budget.max_norm:
                            raise AssertionError(f"differs from eager by rel-L2 {error.rel_l2:.2e}")
                    median_ms = bench_ms(fn, 10, args.stage_rep_ms)
                    entry = {
                        "median_ms": median_ms,
                        "tflops": stage.flops / (median_ms / 1e3) / 1e12,
                        "gbps": row["fused_bytes"] / (median_ms / 1e3) / 1e9,
                        "fraction_of_roofline": row["floor_ms"] / median_ms,
                    }
                    if DRY_RUN:
                        entry["timer"] = DRY_RUN_NOTE
                    row["providers"][provider] = entry
                except Exception as error:
                    traceback.print_exc()
                    row["providers"][provider] = {"error": _error_text(error)}
                torch._dynamo.reset()
            del tensors, expected
        row["ratios"] = _ratios(row["providers"])
        checkpoint()
        _free()


def _cell(entry: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    """``entry[key]`` formatted with ``fmt``, or a dash as wide as that format would be."""
    value = entry.get(key)
    if isinstance(value, (int, float)):
        return format(value * scale, fmt)
    width = re.match(r"[<>^]?(\d*)", fmt).group(1)
    return format("-", f">{width}") if width else "-"


def _stage_cell(entry: dict, width: int) -> str:
    """A stage's median ms for one provider, or why there is none."""
    if "median_ms" in entry:
        return f"{entry['median_ms']:>{width}.4f}"
    status = "skipped" if "skipped" in entry else "error" if "error" in entry else "-"
    return f"{status:>{width}}"


def format_run(run: dict, ceilings_name: str) -> str:
    """One table per configuration: a row per provider, then a row per stage (columns as wide as their names)."""
    if "skipped" in run or "error" in run:
        status = f"skipped ({run['skipped']})" if "skipped" in run else f"failed ({run['error']})"
        return f"{run['config']} {run['dtype']}: {status}"
    parity = run["parity"]
    rel = parity.get("fastunet_vs_fp64", parity.get("fastunet_vs_eager", {})).get("rel_l2", math.nan)
    lines = [
        f"\n{run['config']}  {'x'.join(map(str, run['input_shape']))}  {run['dtype']} ({run['math']})  "
        f"{run['flops'] / 1e9:.1f} GFLOP per forward  parity {'ok' if parity['ok'] else 'FAIL'} "
        f"(fastunet rel-L2 {rel:.1e} vs float64)  roofline floor {run['roofline_floor_ms']:.3f} ms "
        f"({ceilings_name})",
    ]
    if DRY_RUN:
        lines.append(f"{DRY_RUN_NOTE}: the times below are placeholders")
    labels = {
        provider: provider + (f" ({entry['compile_mode']})" if entry.get("compile_mode") else "")
        for provider, entry in run["providers"].items()
    }
    width = max([len("provider"), *map(len, labels.values())])
    header = (
        f"{'provider':<{width}} {'ms':>9} {'images/s':>9} {'TFLOP/s':>8} {'% bf16 mm':>9} {'% roof':>6} "
        f"{'x eager':>7} {'x compile':>9} {'x max-at':>8} {'peak MB':>8}"
    )
    lines += [header, "-" * len(header)]
    for provider, entry in run["providers"].items():
        label = labels[provider]
        if "median_ms" not in entry:
            status = entry.get("skipped") or entry.get("error", "-")
            lines.append(f"{label:<{width}} {'skipped: ' if 'skipped' in entry else 'error: '}{status[:90]}")
            continue
        ratios = run.get("ratios", {}).get(_key(provider), {})
        lines.append(
            f"{label:<{width}} {entry['median_ms']:>9.3f} {entry['images_per_s']:>9.1f} {entry['tflops']:>8.1f} "
            f"{_cell(entry, 'fraction_of_bf16_matmul', '>9.1%')} {_cell(entry, 'fraction_of_roofline', '>6.1%')} "
            f"{_cell(ratios, 'speedup_vs_torch_eager', '>7.2f')} {_cell(ratios, 'speedup_vs_torch_compile', '>9.2f')} "
            f"{_cell(ratios, 'speedup_vs_torch_compile_max_autotune', '>8.2f')} "
            f"{_cell(entry, 'peak_allocated_bytes', '>8.0f', 1e-6)}"
        )
    if "train" in run:
        lines.append(format_training(run["train"], run["config"]))
    stages = run.get("stages", [])
    if stages:
        names = list(dict.fromkeys(name for stage in stages for name in stage["providers"]))
        widths = {name: max(len(name), 9) for name in names}
        label_width = max([len("stage"), *(len(stage["stage"]) for stage in stages)])
        lines.append("\nstages alone: median ms per provider, roofline floor ms, fastunet speedups")
        lines.append(
            f"{'#':>3} {'stage':<{label_width}} {'kind':<15} {'floor':>7} "
            + " ".join(f"{name:>{widths[name]}}" for name in names)
            + f" {'x eager':>7} {'x compile':>9}"
        )
    for stage in stages:
        ratios = stage.get("ratios", {}).get("fastunet", {})
        cells = " ".join(_stage_cell(stage["providers"].get(name, {}), widths[name]) for name in names)
        lines.append(
            f"{stage['index']:>3} {stage['stage']:<{label_width}} {stage['kind']:<15} {stage['floor_ms']:>7.4f} "
            f"{cells} {_cell(ratios, 'speedup_vs_torch_eager', '>7.2f')} "
            f"{_cell(ratios, 'speedup_vs_torch_compile', '>9.2f')}"
        )
    return "\n".join(lines)


def format_training(train: dict, config_name: str) -> str:
    """The training step's table: a row per provider (ms per step, images/s, speedups, peak memory, first step),
    under a line with the gradient check."""
    gradients = train.get("gradients", {})
    check = gradients.get("fastunet_vs_eager")
    status = {True: "ok", False: "FAIL"}.get(gradients.get("ok"), "not checked")
    lines = [
        f"\ntraining step ({config_name}, norm=None, {train['precision']}; {train['loss']}; AdamW "
        f"fused={train['optimizer']['fused']}): gradient check {status}"
        + (
            f" (fastunet vs eager: rel-L2 {check['rel_l2']:.1e}, max-norm {check['max_norm']:.1e}; budget "
            f"{train['gradient_budget']['rel_l2']:.0e} / {train['gradient_budget']['max_norm']:.0e}; backend "
            f"{train.get('fastunet_backend_reason')})"
            if check
            else ""
        )
    ]
    if DRY_RUN:
        lines.append(f"{DRY_RUN_NOTE}: the times below are placeholders")
    width = max([len("provider"), *map(len, train["providers"])])
    header = f"{'provider':<{width}} {'ms/step':>9} {'images/s':>9} {'x eager':>7} {'x compile':>9} {'peak MB':>8}"
    header += f" {'first s':>7}"
    lines += [header, "-" * len(header)]
    for provider, entry in train["providers"].items():
        if "median_ms" not in entry:
            status = entry.get("skipped") or entry.get("error", "-")
            lines.append(f"{provider:<{width}} {'skipped: ' if 'skipped' in entry else 'error: '}{status[:90]}")
            continue
        ratios = train.get("ratios", {}).get(_key(provider), {})
        lines.append(
            f"{provider:<{width}} {entry['median_ms']:>9.3f} {entry['images_per_s']:>9.1f} "
            f"{_cell(ratios, 'speedup_vs_torch_eager', '>7.2f')} {_cell(ratios, 'speedup_vs_torch_compile', '>9.2f')} "
            f"{_cell(entry, 'peak_allocated_bytes', '>8.0f', 1e-6)} {entry['first_call_s']:>7.1f}"
        )
    return "\n".join(lines)


def parse_args(
    argv: Sequence[str] | None, prog: str | None = None, default_out: str | None = None
) -> argparse.Namespace:
    """The run's options (``default_out``: the results folder when neither ``--out`` nor ``--json`` is given)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=list(CONFIGS),
        metavar="NAME",
        help=f"from fastunet.tooling.shapes, run in this order: {', '.join(CONFIGS)} (default: all, or the --quick "
        "set)",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        type=dtype_name,
        default=["float16"],
        metavar="DTYPE",
        help="float32 (fp32), float16 (fp16), bfloat16 (bf16) (default float16)",
    )
    add_timing_args(parser)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="the same steps on the CPU under TRITON_INTERPRET=1, on shrunken configurations, with wall-clock "
        "placeholders for the timings and dynamo's eager backend for torch.compile: checks the plumbing, not speed",
    )
    args = parser.parse_args(argv)
    if args.configs is None:
        args.configs = list(QUICK_CONFIGS) if args.quick else list(CONFIGS)
    if args.out is None:
        args.out = default_out
    for name in args.train or ():
        if name not in CONFIGS:
            parser.error(f"argument --train: unknown configuration {name!r} (expected one of: {', '.join(CONFIGS)})")
        if name not in args.configs:
            parser.error(
                f"argument --train: {name} is not among the configurations run (--configs {' '.join(args.configs)})"
            )
    try:
        return finish_timing_args(args)
    except ValueError as error:
        parser.error(str(error))


def train_configs(args: argparse.Namespace, configs: Sequence[BenchConfig]) -> list[str]:
    """The names, in ``configs``, of the configurations whose training step is timed: none without ``--train``,
    those ``--train`` names among ``args.configs`` (which ``configs`` follow one for one, renamed in a dry run), or
    every one when it names none."""
    if args.train is None:
        return []
    chosen = zip(args.configs, configs, strict=True)
    return [config.name for name, config in chosen if not args.train or name in args.train]


def plan_phases(args: argparse.Namespace, train: bool = False) -> list[tuple[str, list[str]]]:
    """The phases of this run in order, each with the providers asked for (empty phases left out; the training
    phases only with ``train``)."""
    plan = []
    for kind, group in PHASES:
        if (kind == "stages" and args.no_stages) or (kind == "train" and not train):
            continue
        asked = args.stage_providers if kind == "stages" else args.providers
        chosen = [provider for provider in group if provider in asked]
        if chosen:
            plan.append((kind, chosen))
    return plan


def run(
    args: argparse.Namespace,
    configs: Sequence[BenchConfig],
    dtype_names: Sequence[str],
    train: Sequence[str] = (),
) -> tuple[int, dict]:
    """Measure the ceilings, then check and time every configuration in every dtype, phase by phase (see the module
    docstring), with the training step of the configurations named in ``train``; returns (status, payload) and
    writes the payload to ``args.json`` or a new file under ``args.out`` after every step."""
    unknown = sorted(set(train) - {config.name for config in configs})
    if unknown:
        raise ValueError(f"train names configurations not run: {', '.join(unknown)}")
    if DEVICE == "cuda":
        torch.backends.cudnn.benchmark = True  # eager and compiled baselines with cuDNN autotuning
    env = environment()
    path = args.json or results_path(args.out, env)
    payload: dict = {
        "kind": DRY_RUN_NOTE if DRY_RUN else "GPU measurement",
        "environment": env,
        "args": vars(args),
        "runs": [],
    }
    print(f"{env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}")
    print(f"results -> {path}")
    started = time.perf_counter()
    deadline = started + args.time_budget_s
    plan = plan_phases(args, train=bool(train))
    stage_count = sum(len(bench_stages(config)) for config in configs) if not args.no_stages else 0
    steps = 0
    for kind, chosen in plan:
        count = {"network": len(chosen) * len(configs), "train": len(chosen) * len(train), "stages": stage_count}
        steps += count[kind] * len(dtype_names)
    progress = Progress(steps + len(configs) * len(dtype_names) + (0 if args.no_ceilings else 1))
    ceilings = H100
    if not args.no_ceilings:
        progress.step("ceilings: bf16 matmul, device copy")
        record, ceilings = measure_ceilings(env["sm_count"])
        payload["ceilings_measured"] = record
    payload["ceilings"] = ceilings_json(ceilings)
    jobs = [
        new_job(config, dtype_name, ceilings, train=config.name in train)
        for config in configs
        for dtype_name in dtype_names
    ]
    payload["runs"] = [job.run for job in jobs]  # filled in place, phase by phase

    def checkpoint() -> None:
        payload["elapsed_s"] = time.perf_counter() - started
        payload["fastunet_tuned_configs"] = {str(key): cfg for key, cfg in tuned_configs().items()}
        _write(path, payload)

    checkpoint()
    tuning = autotuning() if args.autotune else contextlib.nullcontext()
    status = 0
    try:
        with tuning:
            for kind, chosen in plan:
                for job in jobs:
                    if "skipped" in job.run or "error" in job.run or (kind == "train" and not job.train):
                        continue
                    if not job.started:
                        if time.perf_counter() >= deadline:
                            job.run["skipped"] = f"time budget ({time.perf_counter() - started:.0f} s)"
                            continue
                        try:
                            start_job(job, args, progress)
                        except Exception as error:  # an OOM building the model, say: recorded, the run goes on
                            traceback.print_exc()
                            job.run["error"] = _error_text(error)
                            job.release()
                            continue
                        checkpoint()
                    if kind == "network":
                        time_network(job, chosen, args, deadline, ceilings, progress, checkpoint)
                    elif kind == "train":
                        time_training(job, chosen, args, deadline, progress, checkpoint)
                    else:
                        time_stages(job, chosen, args, deadline, ceilings, progress, checkpoint)
                    checkpoint()
    except KeyboardInterrupt:
        traceback.print_exc()
        payload["interrupted"] = "stopped by SIGINT (a time limit): what was measured before is kept"
        status = 1
    finally:
        for job in jobs:
            job.release()
        _free()
    progress.close()
    if any(failed(job.run) for job in jobs):
        status = 1
    checkpoint()
    payload["path"] = path
    for entry in payload["runs"]:
        print(format_run(entry, ceilings.name))
    print(f"\nwrote {path} ({payload.get('elapsed_s', 0.0):.0f} s)")
    return status, payload


def failed(entry: dict) -> bool:
    """Whether one configuration's JSON entry fails the run: an error, a parity or gradient check missed, or
    fastunet's forward or training step not timed (an error, a fallback to PyTorch or the time budget)."""
    if "error" in entry or ("parity" in entry and not entry["parity"]["ok"]):
        return True
    if "parity" in entry and "median_ms" not in entry["providers"].get("fastunet", {"median_ms": None}):
        return True
    trained = entry.get("train", {})
    if trained.get("gradients", {}).get("ok") is False:
        return True
    return "median_ms" not in trained.get("providers", {}).get("fastunet", {"median_ms": None})


def configure_dry_run() -> None:
    """Switch this module to the dry run: CPU tensors, wall-clock placeholders, dynamo's eager backend."""
    global DEVICE, DRY_RUN
    DEVICE, DRY_RUN = "cpu", True
    providers_module.COMPILE_BACKEND = "eager"


def dry_run_config(config: BenchConfig) -> BenchConfig:
    """``config`` shrunk for the interpreter (base 4, depth 1, 8x8, batch at most 2), same layout and norm."""
    return dataclasses.replace(
        config,
        name=f"{config.name}-dry",
        base_channels=4,
        depth=1,
        height=8,
        width=8,
        batch=min(config.batch, 2),
        note=f"dry-run copy of {config.name}",
    )


def main(argv: Sequence[str] | None = None, prog: str | None = None, default_out: str | None = None) -> int:
    """Run the checks and timings; return the exit status."""
    args = parse_args(argv, prog, default_out)
    configs = [CONFIGS[name] for name in args.configs]
    if args.dry_run:
        if not INTERPRET:
            print("--dry-run runs the kernels under Triton's interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        configure_dry_run()
        configs = [dry_run_config(config) for config in configs]
        args.no_ceilings = True
    elif not torch.cuda.is_available():
        print(
            f"{prog or 'timing'}: times CUDA kernels: no CUDA device is available here (--dry-run: the plumbing on a "
            "CPU)",
            file=sys.stderr,
        )
        return 2
    elif INTERPRET:
        print("TRITON_INTERPRET=1 is set: unset it to time the compiled kernels", file=sys.stderr)
        return 2
    status, _ = run(args, configs, args.dtypes, train=train_configs(args, configs))
    return status


if __name__ == "__main__":
    sys.exit(main(prog="python -m fastunet.tooling.timing"))
