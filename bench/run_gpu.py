"""Time the whole U-Net on a GPU: fastunet against eager PyTorch (cuDNN) and torch.compile, in one process.

For each configuration of ``bench/shapes.py`` and each dtype: check fastunet's output against eager PyTorch and a
float64 reference (normwise errors, published budgets), then time every provider with
``triton.testing.do_bench`` (CUDA events, L2 flushed between calls, median of the timed calls; the first call,
which compiles and autotunes, and the warm-up calls are not timed). Results go to
``<out>/<date>-<device>-<commit>.json``, rewritten after every configuration so a run cut short keeps what it
measured.

Run from the repository root on a CUDA machine (no network needed)::

    pip install --no-deps --no-build-isolation -e .   # optional: without it the source tree is used directly
    python bench/run_gpu.py --quick                   # a few minutes
    python bench/run_gpu.py --configs ref-bilinear-b16 --dtypes float16 bfloat16 --out /some/dir

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
from collections.abc import Callable

import _source_tree  # first: makes fastunet importable from the source tree
import torch
import triton
import triton.testing
from providers import DEFAULT_COMPILE_MODE, PROVIDERS, make_input, make_model, network_callable
from shapes import CONFIGS, QUICK_CONFIGS, BenchConfig

import fastunet
from fastunet.kernels import INTERPRET
from fastunet.kernels._common import autotuning, tuned_configs
from fastunet.parity import NETWORK_BUDGETS, math_mode, network_error
from fastunet.roofline import H100, config_roofline

REPO = _source_tree.REPO
PEAK_TFLOPS = 798.0  # H100 dense fp16/bf16 matmul, as measured on the lent H100 machines
DEVICE = "cuda"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
        "peak_tflops_fp16": PEAK_TFLOPS,
        "FASTUNET_AUTOTUNE": os.environ.get("FASTUNET_AUTOTUNE"),
    }


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


def time_call(fn: Callable, warmup_ms: float, rep_ms: float) -> dict:
    """First call (compile/autotune) timed on its own, then ``do_bench``: median and spread of the timed calls."""
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


def _errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    error = network_error(out, ref)
    return {"rel_l2": error.rel_l2, "max_norm": error.max_norm}


def bench_config(config: BenchConfig, dtype_name: str, args: argparse.Namespace, deadline: float) -> dict:
    """Check and time one configuration in one dtype; torch.compile is skipped once ``deadline`` has passed."""
    dtype = DTYPES[dtype_name]
    mode = math_mode(dtype, "cuda")
    budget = NETWORK_BUDGETS[mode]
    net = config_roofline(config.model_kwargs(), config.input_shape(), dtype, ceilings=H100)
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
        "roofline_note": "model (H100 ceilings), not a measurement",
        "budget": {"rel_l2": budget.rel_l2, "max_norm": budget.max_norm},
        "providers": {},
    }
    model = make_model(config, dtype, DEVICE, seed=args.seed)
    x = make_input(config, dtype, DEVICE, seed=args.seed + 1)

    # Parity before timing: fastunet against eager in the same dtype and against float64 on the same parameters.
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

    providers = [p for p in PROVIDERS if not (p == "torch-compile" and args.no_compile)]
    for provider in providers:
        if provider in run["providers"]:
            continue  # failed above
        if provider == "torch-compile" and time.perf_counter() > deadline:
            run["providers"][provider] = {"skipped": "time budget", "compile_mode": args.compile_mode}
            continue
        try:
            fn = callables.get(provider) or network_callable(model, x, provider, args.compile_mode)
            timing = time_call(fn, args.warmup_ms, args.rep_ms)
        except Exception as error:  # torch.compile or an OOM: record and go on
            traceback.print_exc()
            run["providers"][provider] = {"error": _error_text(error)}
            if provider == "torch-compile":
                run["providers"][provider]["compile_mode"] = args.compile_mode
            torch._dynamo.reset()
            _free()
            continue
        seconds = timing["median_ms"] / 1e3
        timing["tflops"] = net.flops / seconds / 1e12
        timing["fraction_of_798_tflops"] = timing["tflops"] / PEAK_TFLOPS
        timing["fraction_of_roofline"] = net.floor_s / seconds
        if provider == "torch-compile":
            timing["compile_mode"] = args.compile_mode
        timing["first_call_s"] = first_call_s.get(provider, timing["first_call_s"])
        run["providers"][provider] = timing
        callables.pop(provider, None)
        torch._dynamo.reset()
        _free()

    fast_ms = run["providers"].get("fastunet", {}).get("median_ms")
    ratios = {}
    for provider in ("torch-eager", "torch-compile"):
        other_ms = run["providers"].get(provider, {}).get("median_ms")
        if fast_ms and other_ms:
            ratios[f"speedup_vs_{_key(provider)}"] = other_ms / fast_ms
    run["ratios"] = ratios
    del model, x, callables
    _free()
    return run


def _cell(run: dict, provider: str) -> str:
    entry = run["providers"].get(provider, {})
    if "median_ms" in entry:
        return f"{entry['median_ms']:9.3f}"
    return f"{'error' if 'error' in entry else 'skipped' if 'skipped' in entry else '-':>9}"


def print_summary(runs: list[dict]) -> None:
    header = (
        f"{'config':<18} {'dtype':<9} {'fastunet':>9} {'eager':>9} {'compile':>9} {'x eager':>8} {'x compile':>9} "
        f"{'TFLOP/s':>8} {'% 798':>6} {'% roof':>6}  parity"
    )
    print("\nmedian ms per forward (speedups > 1: fastunet faster)")
    print(header)
    print("-" * len(header))
    for run in runs:
        if "skipped" in run:
            print(f"{run['config']:<18} {run['dtype']:<9} skipped: {run['skipped']}")
            continue
        fast = run["providers"].get("fastunet", {})
        ratios = run["ratios"]
        parity = run["parity"]
        rel = parity.get("fastunet_vs_fp64", parity.get("fastunet_vs_eager", {})).get("rel_l2", math.nan)
        print(
            f"{run['config']:<18} {run['dtype']:<9} {_cell(run, 'fastunet')} {_cell(run, 'torch-eager')} "
            f"{_cell(run, 'torch-compile')} {ratios.get('speedup_vs_torch_eager', math.nan):>8.2f} "
            f"{ratios.get('speedup_vs_torch_compile', math.nan):>9.2f} {fast.get('tflops', math.nan):>8.1f} "
            f"{fast.get('fraction_of_798_tflops', math.nan):>6.1%} {fast.get('fraction_of_roofline', math.nan):>6.1%}"
            f"  {'ok' if parity['ok'] else 'FAIL'} (rel-L2 {rel:.1e})"
        )


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=list(CONFIGS),
        metavar="NAME",
        help=f"from bench/shapes.py: {', '.join(CONFIGS)} (default: all, or the --quick set)",
    )
    parser.add_argument("--quick", action="store_true", help=f"configs {', '.join(QUICK_CONFIGS)}, shorter timing")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=list(DTYPES),
        default=["float16"],
        metavar="DTYPE",
        help=f"{', '.join(DTYPES)} (default float16)",
    )
    parser.add_argument(
        "--compile-mode",
        default=DEFAULT_COMPILE_MODE,
        help="torch.compile mode (default %(default)s: like fastunet, no CUDA graphs; max-autotune adds them)",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--no-fp64", action="store_true", help="skip the float64 reference check")
    parser.add_argument(
        "--autotune",
        action="store_true",
        help="let fastunet time its candidate tiles on the first call of each shape (as FASTUNET_AUTOTUNE=1 does); "
        "the winners are recorded in the JSON",
    )
    parser.add_argument("--warmup-ms", type=float, default=None, help="do_bench warm-up time (default 100, quick 25)")
    parser.add_argument("--rep-ms", type=float, default=None, help="do_bench timed time (default 500, quick 200)")
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=360.0,
        help="start no new configuration, and no new torch.compile, after this many seconds (default %(default)s; "
        "one max-autotune compilation of a 512x512 config can take minutes)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="results folder (default %(default)s)")
    args = parser.parse_args(argv)
    if args.configs is None:
        args.configs = list(QUICK_CONFIGS) if args.quick else list(CONFIGS)
    if args.warmup_ms is None:
        args.warmup_ms = 25.0 if args.quick else 100.0
    if args.rep_ms is None:
        args.rep_ms = 200.0 if args.quick else 500.0
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the checks and timings; return the exit status."""
    args = parse_args(argv, prog)
    if not torch.cuda.is_available():
        print("run_gpu.py times CUDA kernels: no CUDA device is available here", file=sys.stderr)
        return 2
    if INTERPRET:
        print("TRITON_INTERPRET=1 is set: unset it to time the compiled kernels", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True  # eager and compiled baselines with cuDNN autotuning
    env = environment()
    path = results_path(args.out, env)
    payload = {"environment": env, "args": vars(args), "runs": []}
    print(f"{env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}")
    print(f"results -> {path}")
    started = time.perf_counter()
    tuning = autotuning() if args.autotune else contextlib.nullcontext()
    with tuning:
        status = _run_all(args, payload, path, started)
    print_summary(payload["runs"])
    print(f"\nwrote {path} ({payload['elapsed_s']:.0f} s)")
    return status


def _run_all(args: argparse.Namespace, payload: dict, path: str, started: float) -> int:
    status = 0
    for name in args.configs:
        for dtype_name in args.dtypes:
            elapsed = time.perf_counter() - started
            if elapsed > args.time_budget_s:
                run = {"config": name, "dtype": dtype_name, "skipped": f"time budget ({elapsed:.0f} s elapsed)"}
            else:
                print(f"[{elapsed:6.0f} s] {name} {dtype_name} ...", flush=True)
                run = bench_config(CONFIGS[name], dtype_name, args, started + args.time_budget_s)
                if not run["parity"]["ok"] or "median_ms" not in run["providers"].get("fastunet", {}):
                    status = 1
            payload["runs"].append(run)
            payload["elapsed_s"] = time.perf_counter() - started
            payload["fastunet_tuned_configs"] = {str(key): cfg for key, cfg in tuned_configs().items()}
            _write(path, payload)
    return status


if __name__ == "__main__":
    sys.exit(main())
