"""The options of a GPU timing run, shared by ``fastunet bench`` and ``bench/run_gpu.py``.

Kept apart from :mod:`fastunet.tooling.timing` so that building the ``fastunet`` command line imports neither
Triton nor the kernels: ``fastunet check`` still chooses the interpreter before they are imported.
"""

from __future__ import annotations

import argparse
import os

# The benchmark providers (what each runs: :mod:`fastunet.tooling.providers`).
# fastunet-graphs: the fused forward replayed as a CUDA graph (FusedForward.use_cuda_graphs), whole network only.
PROVIDERS: tuple[str, ...] = (
    "fastunet",
    "fastunet-graphs",
    "torch-eager",
    "torch-compile",
    "torch-compile-max-autotune",
)
# The providers of the training step (--train): the forward, loss, backward and optimizer step of each.
TRAIN_PROVIDERS: tuple[str, ...] = ("fastunet", "torch-eager", "torch-compile")
# What fastunet is compared with.
BASELINES: tuple[str, ...] = ("torch-eager", "torch-compile", "torch-compile-max-autotune")
# Seconds of time budget a compiling step needs before it is started (a whole-network compile; a single stage
# compiles in about a quarter of that). Measured orders of magnitude: torch.compile default of the reference U-Net
# 30-60 s, max-autotune 1.5-5 min.
COMPILE_START_S = 60.0
MAX_AUTOTUNE_START_S = 240.0
RESULTS_DIR = os.path.join("bench", "results")


def default_out() -> str:
    """Where results go without ``--out``/``--json``: ``bench/results`` when run from a checkout's root, else the
    current directory."""
    return RESULTS_DIR if os.path.isdir(RESULTS_DIR) else "."


def add_timing_args(parser: argparse.ArgumentParser) -> None:
    """Options of a GPU timing run."""
    group = parser.add_argument_group("timing (GPU)")
    group.add_argument(
        "--providers",
        nargs="+",
        choices=PROVIDERS,
        default=list(PROVIDERS),
        help="whole-network providers (default: all)",
    )
    group.add_argument(
        "--stage-providers",
        nargs="+",
        choices=[p for p in PROVIDERS if p != "fastunet-graphs"],
        default=["fastunet", "torch-eager", "torch-compile"],
        help="providers of the per-stage timings (default %(default)s)",
    )
    group.add_argument("--no-stages", action="store_true", help="leave out the per-stage timings")
    group.add_argument(
        "--train",
        nargs="*",
        metavar="CONFIG",
        help="also time a training step (norm=None, train mode; forward, MSE loss against a random target, backward, "
        "fused AdamW step; float32 parameters under torch.autocast for bf16/fp16) of fastunet, torch-eager and "
        "torch-compile (those of --providers), after the whole-network forward timings, fastunet's gradients checked "
        "against eager first: on the configurations named (run_gpu.py: among --configs), or on every one when none "
        "are named",
    )
    group.add_argument(
        "--max-autotune-mode",
        default="max-autotune",
        help="torch.compile mode of torch-compile-max-autotune (default %(default)s; max-autotune-no-cudagraphs "
        "leaves out CUDA graphs, which fastunet does not use)",
    )
    group.add_argument("--quick", action="store_true", help="shorter timing (and the quick config set of run_gpu.py)")
    group.add_argument("--no-fp64", action="store_true", help="skip the float64 reference check")
    group.add_argument("--no-ceilings", action="store_true", help="use the recorded H100 ceilings, measure none")
    group.add_argument(
        "--autotune",
        action="store_true",
        help="let fastunet time its candidate tiles on the first call of each shape (as FASTUNET_AUTOTUNE=1 does)",
    )
    group.add_argument("--warmup-ms", type=float, default=None, help="do_bench warm-up time (default 100, quick 25)")
    group.add_argument("--rep-ms", type=float, default=None, help="do_bench timed time (default 500, quick 200)")
    group.add_argument("--stage-rep-ms", type=float, default=None, help="do_bench time per stage (default 100)")
    group.add_argument(
        "--time-budget-s",
        type=float,
        default=360.0,
        help="start no new configuration and no new torch.compile after this many seconds (default %(default)s)",
    )
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    group.add_argument(
        "--out",
        metavar="DIR",
        help="without --json, write <DIR>/<date>-<device>-<commit>.json (default: bench/results when run from a "
        "checkout's root, else the current directory)",
    )
    group.add_argument(
        "--profile", metavar="DIR", help="write a torch.profiler trace (Chrome format) of one forward per provider"
    )
    group.add_argument(
        "--compile-start-s",
        type=float,
        default=COMPILE_START_S,
        help="start a torch.compile (default mode) of the whole network only with this much of the time budget "
        "left, a stage's with a quarter of it (default %(default)s)",
    )
    group.add_argument(
        "--max-autotune-start-s",
        type=float,
        default=MAX_AUTOTUNE_START_S,
        help="the same for max-autotune (default %(default)s)",
    )


def finish_timing_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on ``--quick`` or on where the run starts; ``ValueError`` for options that
    contradict each other."""
    if args.warmup_ms is None:
        args.warmup_ms = 25.0 if args.quick else 100.0
    if args.rep_ms is None:
        args.rep_ms = 200.0 if args.quick else 500.0
    if args.stage_rep_ms is None:
        args.stage_rep_ms = 50.0 if args.quick else 100.0
    if args.out is None:
        args.out = default_out()
    if args.train is not None and not any(provider in args.providers for provider in TRAIN_PROVIDERS):
        raise ValueError(
            f"--train times {', '.join(TRAIN_PROVIDERS)}; --providers names none of them: {' '.join(args.providers)}"
        )
    return args
