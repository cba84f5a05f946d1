"""Time the U-Net on a GPU: fastunet against eager PyTorch (cuDNN) and torch.compile, in one process.

First the ceilings of this device: a large dense bf16 matmul and a device-to-device copy, both with
``triton.testing.do_bench``; the roofline floors and the "% of the bf16 matmul rate" use them. Then, for each
configuration of ``bench/shapes.py`` and each dtype: check fastunet's output against eager PyTorch and a float64
reference (normwise errors, published budgets), then time every provider with ``do_bench`` (CUDA events, L2
flushed between calls, median of the timed calls; the first call, which compiles and autotunes, and the warm-up
calls are not timed), record the peak memory of one forward, and time each stage of the fused forward alone against
the same math in eager PyTorch and torch.compile. With ``--profile DIR``, one forward per provider is also recorded
with ``torch.profiler`` (Chrome trace format).

Results go to ``<out>/<date>-<device>-<commit>.json`` (or ``--json FILE``), rewritten after every configuration
so a run cut short keeps what it measured. Run from the repository root on a CUDA machine (no network needed)::

    python bench/run_gpu.py --quick                   # a few minutes
    python bench/run_gpu.py --configs ref-bilinear-b16 --dtypes float16 bfloat16 --out /some/dir
    fastunet bench                                    # the same for one configuration built from options

The commit comes from ``git rev-parse HEAD`` (``FASTUNET_COMMIT`` overrides it, e.g. for a copied tree without
``.git``). A torch.compile failure is recorded in the JSON and the run goes on. Exit status 1 when fastunet failed
or missed its error budget on any configuration.
"""

from __future__ import annotations

import argparse
import contextlib
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

import _source_tree  # first: makes fastunet importable from the source tree
import torch
import triton
from providers import (
    PROVIDERS,
    compile_mode,
    eager_stage,
    make_input,
    make_model,
    network_callable,
    stage_callable,
    stage_tensors,
)
from shapes import CONFIGS, QUICK_CONFIGS, BenchConfig, bench_stages

import fastunet
from fastunet.cli import add_bench_timing_args, finish_bench_timing_args
from fastunet.kernels import INTERPRET
from fastunet.kernels._common import autotuning, tuned_configs
from fastunet.parity import NETWORK_BUDGETS, math_mode, network_error
from fastunet.roofline import H100, Ceilings, ceilings_json, config_roofline, measured_ceilings

REPO = _source_tree.REPO
DEVICE = "cuda"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MATMUL_SIZE = 8192  # bf16 (8192 x 8192) @ (8192 x 8192): 1.1 TFLOP, ~1.4 ms on an H100
COPY_BYTES = 2**30  # a 1 GiB device-to-device copy (2 GiB of traffic)


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def environment() -> dict:
    """Device, library versions and source revision of this run."""
    props = torch.cuda.get_device_properties(0)
    commit = os.environ.get("FASTUNET_COMMIT") or _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "fastunet": fastunet.__version__,
        "commit": commit,
        "dirty": bool(status) if status is not None else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "FASTUNET_AUTOTUNE": os.environ.get("FASTUNET_AUTOTUNE"),
    }


def _median_ms(fn: Callable) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def _matmul_ms(n: int) -> float:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    a = torch.randn((n, n), device=DEVICE, dtype=torch.bfloat16, generator=gen)
    b = torch.randn((n, n), device=DEVICE, dtype=torch.bfloat16, generator=gen)
    return _median_ms(lambda: a @ b)


def _copy_ms(nbytes: int) -> float:
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    src = torch.randint(0, 256, (nbytes,), device=DEVICE, dtype=torch.uint8, generator=gen)
    dst = torch.empty_like(src)
    return _median_ms(lambda: dst.copy_(src))


def measure_ceilings(sm_count: int) -> tuple[dict, Ceilings]:
    """This device's dense bf16 matmul rate and copy bandwidth (``do_bench`` medians), as a record and as
    :class:`~fastunet.roofline.Ceilings`."""
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


def time_call(fn: Callable, warmup_ms: float, rep_ms: float) -> dict:
    """First call (compile/autotune) timed on its own, then ``do_bench``: median and spread of the timed calls."""
    import triton.testing

    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first_call_s = time.perf_counter() - start
    times = sorted(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all"))

    def quantile(q: float) -> float:
        return times[min(len(times) - 1, int(q * len(times)))]

    return {
        "median_ms": quantile(0.5),
        "p20_ms": quantile(0.2),
        "p80_ms": quantile(0.8),
        "min_ms": times[0],
        "timed_calls": len(times),
        "first_call_s": first_call_s,
    }


def peak_memory(fn: Callable) -> dict:
    """Peak allocated memory over one call of ``fn``, in total and above what was allocated before it (torch's
    caching allocator; CUDA-graph pools of max-autotune were allocated when the graph was captured)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return {"peak_allocated_bytes": peak, "forward_peak_bytes": peak - before}


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
        for baseline in PROVIDERS[1:]:
            theirs = entries.get(baseline, {}).get("median_ms")
            if theirs and baseline != provider:
                ratios.setdefault(_key(provider), {})[f"speedup_vs_{_key(baseline)}"] = theirs / mine
    return ratios


def bench_config(
    config: BenchConfig,
    dtype_name: str,
    args: argparse.Namespace,
    deadline: float,
    ceilings: Ceilings,
    progress: Progress,
    checkpoint: Callable[[dict], None] = lambda run: None,
) -> dict:
    """Check and time one configuration in one dtype; compiled providers are skipped once ``deadline`` has passed.
    ``checkpoint`` gets the partial result after each step (a run killed part-way keeps what it measured)."""
    dtype = DTYPES[dtype_name]
    mode = math_mode(dtype, "cuda")
    budget = NETWORK_BUDGETS[mode]
    net = config_roofline(config.model_kwargs(), config.input_shape(), dtype, ceilings=ceilings)
    run: dict = {
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
    model = make_model(config, dtype, DEVICE, seed=args.seed)
    x = make_input(config, dtype, DEVICE, seed=args.seed + 1)

    # Parity before timing: fastunet against eager in the same dtype and against float64 on the same parameters.
    progress.step(f"{config.name} {dtype_name}: parity")
    parity: dict = {}
    outputs: dict[str, torch.Tensor] = {}
    callables: dict[str, Callable] = {}
    first_call_s: dict[str, float] = {}
    for provider in ("fastunet", "torch-eager"):
        try:
            fn = network_callable(model, x, provider)
            start = time.perf_counter()
            outputs[provider] = fn()
            torch.cuda.synchronize()
            first_call_s[provider] = time.perf_counter() - start  # includes Triton compilation / cuDNN autotuning
            callables[provider] = fn
        except Exception as error:  # recorded, the run goes on
            traceback.print_exc()
            run["providers"][provider] = {"error": _error_text(error)}
    fast_module = callables["fastunet"].module if "fastunet" in callables else None
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
                ref64.load_state_dict(model.state_dict())
                expected = ref64(x.double())
            for provider, out in outputs.items():
                parity[f"{_key(provider)}_vs_fp64"] = _errors(out, expected)
            del ref64, expected
        except Exception as error:
            traceback.print_exc()
            parity["fp64_error"] = _error_text(error)
        finally:
            torch.backends.cudnn.benchmark = saved
    ok = fast_module is not None and fast_module.last_backend == "triton"
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
    checkpoint(run)

    for provider in args.providers:
        progress.step(f"{config.name} {dtype_name}: {provider}")
        if provider in run["providers"]:
            continue  # failed above
        mode_name = compile_mode(provider, args.max_autotune_mode)
        if mode_name is not None and time.perf_counter() > deadline:
            run["providers"][provider] = {"skipped": "time budget", "compile_mode": mode_name}
            continue
        try:
            fn = callables.get(provider) or network_callable(model, x, provider, args.max_autotune_mode)
            timing = time_call(fn, args.warmup_ms, args.rep_ms)
            timing.update(peak_memory(fn))
            if args.profile:
                path = os.path.join(args.profile, f"{config.name}-{dtype_name}-{provider}.trace.json")
                timing["profile"] = write_profile(fn, path, f"{provider} forward")
        except Exception as error:  # torch.compile or an OOM: record and go on
            traceback.print_exc()
            run["providers"][provider] = {"error": _error_text(error), "compile_mode": mode_name}
            torch._dynamo.reset()
            _free()
            continue
        timing = _with_rates(timing, net.flops, config.batch, net.floor_s, ceilings)
        timing["compile_mode"] = mode_name
        timing["first_call_s"] = first_call_s.get(provider, timing["first_call_s"])
        run["providers"][provider] = timing
        run["ratios"] = _ratios(run["providers"])
        checkpoint(run)
        callables.pop(provider, None)
        torch._dynamo.reset()
        _free()
    run["ratios"] = _ratios(run["providers"])
    del model, x, callables
    _free()
    if not args.no_stages:
        run["stages"] = []
        bench_stage_set(config, dtype, args, deadline, ceilings, progress, run["stages"], lambda: checkpoint(run))
    return run


def bench_stage_set(
    config: BenchConfig,
    dtype: torch.dtype,
    args: argparse.Namespace,
    deadline: float,
    ceilings: Ceilings,
    progress: Progress,
    rows: list[dict],
    checkpoint: Callable[[], None] = lambda: None,
) -> list[dict]:
    """Each stage of the fused forward (and the standalone head) alone, per stage provider, with its roofline
    floor, appended to ``rows``; a provider's output is checked against eager PyTorch before it is timed."""
    import triton.testing

    budget = NETWORK_BUDGETS[math_mode(dtype, "cuda")]
    peak, size = ceilings.peak_for(math_mode(dtype, "cuda")), dtype.itemsize
    for stage in bench_stages(config):
        progress.step(f"{config.name} stage {stage.index:02d} {stage.label}")
        nbytes = (stage.bytes_read + stage.bytes_written) * size // 2  # traced in fp16
        row: dict = {
            "index": stage.index,
            "stage": stage.label,
            "kind": stage.kind,
            "kernel": stage.kernel,
            "flops": stage.flops,
            "fused_bytes": nbytes,
            "floor_ms": max(stage.flops / peak, nbytes / ceilings.bandwidth) * 1e3,
            "providers": {},
        }
        tensors = stage_tensors(stage, dtype, DEVICE, seed=args.seed)
        expected = eager_stage(stage, tensors)()
        for provider in args.stage_providers:
            mode_name = compile_mode(provider, args.max_autotune_mode)
            if mode_name is not None and time.perf_counter() > deadline:
                row["providers"][provider] = {"skipped": "time budget"}
                continue
            try:
                fn = stage_callable(stage, provider, tensors, args.max_autotune_mode)
                for got, want in zip(fn(), expected, strict=True):
                    error = network_error(got, want)
                    if error.rel_l2 > 2 * budget.rel_l2 or error.max_norm > 2 * budget.max_norm:
                        raise AssertionError(f"differs from eager by rel-L2 {error.rel_l2:.2e}")
                median_ms = triton.testing.do_bench(fn, warmup=10, rep=args.stage_rep_ms, return_mode="median")
                row["providers"][provider] = {
                    "median_ms": median_ms,
                    "tflops": stage.flops / (median_ms / 1e3) / 1e12,
                    "gbps": nbytes / (median_ms / 1e3) / 1e9,
                    "fraction_of_roofline": row["floor_ms"] / median_ms,
                }
            except Exception as error:
                traceback.print_exc()
                row["providers"][provider] = {"error": _error_text(error)}
            torch._dynamo.reset()
        row["ratios"] = _ratios(row["providers"])
        rows.append(row)
        checkpoint()
        del tensors, expected
        _free()
    return rows


def _cell(entry: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    value = entry.get(key)
    return format(value * scale, fmt) if isinstance(value, (int, float)) else "-"


def format_run(run: dict, ceilings_name: str) -> str:
    """One table per configuration: a row per provider."""
    if "skipped" in run:
        return f"{run['config']} {run['dtype']}: skipped ({run['skipped']})"
    parity = run["parity"]
    rel = parity.get("fastunet_vs_fp64", parity.get("fastunet_vs_eager", {})).get("rel_l2", math.nan)
    lines = [
        f"\n{run['config']}  {'x'.join(map(str, run['input_shape']))}  {run['dtype']} ({run['math']})  "
        f"{run['flops'] / 1e9:.1f} GFLOP per forward  parity {'ok' if parity['ok'] else 'FAIL'} "
        f"(fastunet rel-L2 {rel:.1e} vs float64)  roofline floor {run['roofline_floor_ms']:.3f} ms "
        f"({ceilings_name})",
    ]
    header = (
        f"{'provider':<27} {'ms':>9} {'images/s':>9} {'TFLOP/s':>8} {'% bf16 mm':>9} {'% roof':>6} "
        f"{'x eager':>7} {'x compile':>9} {'x max-at':>8} {'peak MB':>8}"
    )
    lines += [header, "-" * len(header)]
    for provider, entry in run["providers"].items():
        label = provider + (f" ({entry['compile_mode']})" if entry.get("compile_mode") else "")
        if "median_ms" not in entry:
            status = entry.get("skipped") or entry.get("error", "-")
            lines.append(f"{label:<27} {'skipped: ' if 'skipped' in entry else 'error: '}{status[:90]}")
            continue
        ratios = run["ratios"].get(_key(provider), {})
        lines.append(
            f"{label:<27} {entry['median_ms']:>9.3f} {entry['images_per_s']:>9.1f} {entry['tflops']:>8.1f} "
            f"{_cell(entry, 'fraction_of_bf16_matmul', '>9.1%')} {_cell(entry, 'fraction_of_roofline', '>6.1%')} "
            f"{_cell(ratios, 'speedup_vs_torch_eager', '>7.2f')} {_cell(ratios, 'speedup_vs_torch_compile', '>9.2f')} "
            f"{_cell(ratios, 'speedup_vs_torch_compile_max_autotune', '>8.2f')} "
            f"{_cell(entry, 'peak_allocated_bytes', '>8.0f', 1e-6)}"
        )
    stages = run.get("stages", [])
    if stages:
        names = list(stages[0]["providers"])
        lines.append("\nstages alone: median ms per provider, roofline floor ms, fastunet speedups")
        lines.append(
            f"{'#':>3} {'stage':<16} {'kind':<15} {'floor':>7} "
            + " ".join(f"{name[:13]:>13}" for name in names)
            + f" {'x eager':>7} {'x compile':>9}"
        )
    for stage in stages:
        ratios = stage["ratios"].get("fastunet", {})
        cells = " ".join(f"{_cell(entry, 'median_ms', '>13.4f')}" for entry in stage["providers"].values())
        lines.append(
            f"{stage['index']:>3} {stage['stage']:<16} {stage['kind']:<15} {stage['floor_ms']:>7.4f} {cells} "
            f"{_cell(ratios, 'speedup_vs_torch_eager', '>7.2f')} {_cell(ratios, 'speedup_vs_torch_compile', '>9.2f')}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=list(CONFIGS),
        metavar="NAME",
        help=f"from bench/shapes.py: {', '.join(CONFIGS)} (default: all, or the --quick set)",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=list(DTYPES),
        default=["float16"],
        metavar="DTYPE",
        help=f"{', '.join(DTYPES)} (default float16)",
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="results folder (default %(default)s)")
    add_bench_timing_args(parser)
    args = parser.parse_args(argv)
    if args.configs is None:
        args.configs = list(QUICK_CONFIGS) if args.quick else list(CONFIGS)
    return finish_bench_timing_args(args)


def run(args: argparse.Namespace, configs: Sequence[BenchConfig], dtype_names: Sequence[str]) -> tuple[int, dict]:
    """Measure the ceilings, then check and time every configuration in every dtype; returns (status, payload) and
    writes the payload to ``args.json`` or a new file under ``args.out``."""
    torch.backends.cudnn.benchmark = True  # eager and compiled baselines with cuDNN autotuning
    env = environment()
    path = args.json or results_path(args.out, env)
    payload: dict = {"kind": "GPU measurement", "environment": env, "args": vars(args), "runs": []}
    print(f"{env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}")
    print(f"results -> {path}")
    started = time.perf_counter()
    n_steps = len(configs) * len(dtype_names) * (1 + len(args.providers))
    if not args.no_stages:
        n_steps += sum(len(bench_stages(config)) for config in configs) * len(dtype_names)
    progress = Progress(n_steps + (0 if args.no_ceilings else 1))
    ceilings = H100
    if not args.no_ceilings:
        progress.step("ceilings: bf16 matmul, device copy")
        record, ceilings = measure_ceilings(env["sm_count"])
        payload["ceilings_measured"] = record
    payload["ceilings"] = ceilings_json(ceilings)
    status = 0
    tuning = autotuning() if args.autotune else contextlib.nullcontext()
    with tuning:
        for config in configs:
            for dtype_name in dtype_names:
                elapsed = time.perf_counter() - started
                if elapsed > args.time_budget_s:
                    entry = {"config": config.name, "dtype": dtype_name, "skipped": f"time budget ({elapsed:.0f} s)"}
                else:
                    deadline = started + args.time_budget_s
                    done = list(payload["runs"])

                    def checkpoint(partial: dict, done: list = done) -> None:
                        payload["runs"] = [*done, partial]
                        payload["elapsed_s"] = time.perf_counter() - started
                        _write(path, payload)

                    entry = bench_config(config, dtype_name, args, deadline, ceilings, progress, checkpoint)
                    payload["runs"] = done
                    if not entry["parity"]["ok"] or "median_ms" not in entry["providers"].get("fastunet", {}):
                        status = 1
                payload["runs"].append(entry)
                payload["elapsed_s"] = time.perf_counter() - started
                payload["fastunet_tuned_configs"] = {str(key): cfg for key, cfg in tuned_configs().items()}
                _write(path, payload)
    progress.close()
    payload["path"] = path
    for entry in payload["runs"]:
        print(format_run(entry, ceilings.name))
    print(f"\nwrote {path} ({payload.get('elapsed_s', 0.0):.0f} s)")
    return status, payload


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the checks and timings; return the exit status."""
    args = parse_args(argv, prog)
    if not torch.cuda.is_available():
        print("run_gpu.py times CUDA kernels: no CUDA device is available here", file=sys.stderr)
        return 2
    if INTERPRET:
        print("TRITON_INTERPRET=1 is set: unset it to time the compiled kernels", file=sys.stderr)
        return 2
    status, _ = run(args, [CONFIGS[name] for name in args.configs], args.dtypes)
    return status


if __name__ == "__main__":
    sys.exit(main())
