"""The ``fastunet`` command: parity check, launch trace, roofline model, GPU benchmark, sm_90 compile report.

::

    fastunet check                     # FastUNet vs the float64 reference on a small config (CPU: interpreter)
    fastunet check --dtype float16 --upsample transpose --norm batch --size 33
    fastunet trace --upsample bilinear # the launches of the reference config (base 64, depth 4, 512x512)
    fastunet roofline --batch 16       # a roofline model of those launches (a model, not a measurement)
    fastunet bench --quick             # GPU timings against eager PyTorch and torch.compile (source checkout)
    fastunet report                    # compile every kernel variant for sm_90 (no GPU needed)

``check`` runs the kernels where they can run: compiled on a CUDA device, otherwise on the CPU under Triton's
interpreter. The interpreter is chosen by ``TRITON_INTERPRET=1`` before ``triton`` is imported; when this process
imported it already, ``check`` re-runs itself in a child process with the variable set.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CHILD_MARK = "FASTUNET_CLI_INTERPRETER_CHILD"

CHECK_DEFAULTS = {"base_channels": 8, "depth": 3, "size": 32, "batch": 2, "dtype": "float32"}
REFERENCE_DEFAULTS = {"base_channels": 64, "depth": 4, "size": 512, "batch": 1, "dtype": "float16"}


def _add_model_args(parser: argparse.ArgumentParser, defaults: dict) -> None:
    group = parser.add_argument_group("configuration")
    group.add_argument("--in-channels", type=int, default=3)
    group.add_argument("--num-classes", type=int, default=2)
    group.add_argument("--base-channels", type=int, default=defaults["base_channels"])
    group.add_argument("--depth", type=int, default=defaults["depth"])
    group.add_argument("--upsample", choices=("transpose", "bilinear", "nearest"), default="bilinear")
    group.add_argument("--norm", choices=("none", "batch"), default="none", help="batch: BatchNorm (folded in eval)")
    group.add_argument("--align-corners", action="store_true", help="bilinear upsampling with align_corners=True")
    group.add_argument("--batch", type=int, default=defaults["batch"])
    group.add_argument("--size", type=int, default=defaults["size"], help="H and W (default %(default)s)")
    group.add_argument("--height", type=int, help="H, overriding --size")
    group.add_argument("--width", type=int, help="W, overriding --size")
    group.add_argument("--dtype", choices=sorted(DTYPES), default=defaults["dtype"])


def _model_kwargs(args: argparse.Namespace) -> dict:
    return {
        "in_channels": args.in_channels,
        "num_classes": args.num_classes,
        "base_channels": args.base_channels,
        "depth": args.depth,
        "upsample": args.upsample,
        "norm": None if args.norm == "none" else args.norm,
        "align_corners": args.align_corners,
    }


def _input_shape(args: argparse.Namespace) -> tuple[int, int, int, int]:
    height = args.height if args.height is not None else args.size
    width = args.width if args.width is not None else args.size
    return (args.batch, args.in_channels, height, width)


def _describe(args: argparse.Namespace) -> str:
    kwargs = _model_kwargs(args)
    return ", ".join(f"{k}={v}" for k, v in kwargs.items()) + f"; input {_input_shape(args)} {args.dtype}"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fastunet`` command."""
    parser = argparse.ArgumentParser(prog="fastunet", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = sub.add_parser(
        "check",
        help="compare FastUNet with the float64 reference (random weights and input)",
        description="Compare FastUNet with the float64 reference PyTorch U-Net on random weights and input, "
        "against the published whole-network error budgets. Exit status 1 on failure.",
    )
    _add_model_args(check, CHECK_DEFAULTS)
    check.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="auto: CUDA if available, else the CPU under Triton's interpreter",
    )
    check.add_argument("--channels-last", action="store_true", help="feed a channels_last input")
    check.add_argument("--ieee", action="store_true", help="fp32 on CUDA without TF32 (the strict fp32 budget)")
    check.add_argument("--seed", type=int, default=0)

    trace = sub.add_parser("trace", help="list the launches of one forward (nothing runs)")
    _add_model_args(trace, REFERENCE_DEFAULTS)

    roofline = sub.add_parser("roofline", help="roofline model of one forward (a model, not a measurement)")
    _add_model_args(roofline, REFERENCE_DEFAULTS)
    roofline.add_argument("--no-eager", action="store_true", help="leave out the eager PyTorch estimate")
    roofline.add_argument("--ieee", action="store_true", help="fp32 without TF32 (CUDA-core fp32 peak)")

    sub.add_parser(
        "bench",
        help="GPU timings vs eager PyTorch and torch.compile (bench/run_gpu.py; options: fastunet bench --help)",
        add_help=False,
    )
    sub.add_parser(
        "report",
        help="compile every kernel variant for sm_90 and report registers, spills, tensor cores "
        "(options: fastunet report --help)",
        add_help=False,
    )
    return parser


# -- check ------------------------------------------------------------------------------------------------------
def _interpreter_state() -> bool | None:
    """Whether the kernels were imported for the interpreter; None while they are not imported yet."""
    common = sys.modules.get("fastunet.kernels._common")
    return None if common is None else bool(common.INTERPRET)


def _run_check(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("check: --device cuda, but no CUDA device is available", file=sys.stderr)
        return 2
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    state = _interpreter_state()
    if device.type == "cpu":
        why = "--device cpu" if args.device == "cpu" else "no CUDA device"
        if state is None:
            os.environ["TRITON_INTERPRET"] = "1"
            print(f"check: {why}: the Triton kernels run on the CPU under the interpreter (TRITON_INTERPRET=1)")
        elif not state:
            if os.environ.get(_CHILD_MARK):
                print("check: could not switch to Triton's interpreter", file=sys.stderr)
                return 2
            print(
                f"check: {why}: re-running under Triton's interpreter (TRITON_INTERPRET=1 must be set before "
                "triton is imported)",
                flush=True,
            )
            env = {**os.environ, "TRITON_INTERPRET": "1", _CHILD_MARK: "1"}
            return subprocess.call([sys.executable, "-m", "fastunet.cli", *argv], env=env)
    elif state or (state is None and os.environ.get("TRITON_INTERPRET") == "1"):
        print("check: TRITON_INTERPRET=1 is set: unset it to run the compiled kernels on CUDA", file=sys.stderr)
        return 2

    from fastunet.model import FastUNet
    from fastunet.parity import NETWORK_BUDGETS, math_mode, network_error, randomize_norm_stats
    from fastunet.reference import UNet

    dtype = DTYPES[args.dtype]
    saved_tf32 = torch.backends.cudnn.allow_tf32
    if args.ieee:
        torch.backends.cudnn.allow_tf32 = False
    try:
        torch.manual_seed(args.seed)
        generator = torch.Generator().manual_seed(args.seed + 1)
        model = UNet(**_model_kwargs(args))
        randomize_norm_stats(model, generator)
        model = model.to(dtype).eval()  # parameters rounded to dtype: the reference uses the same values
        x = torch.randn(_input_shape(args), generator=generator).to(dtype)
        with torch.no_grad():
            expected = copy.deepcopy(model).double()(x.double())
            fast = FastUNet.from_reference(copy.deepcopy(model).to(device)).eval()
            inp = x.to(device)
            if args.channels_last:
                inp = inp.contiguous(memory_format=torch.channels_last)
            out = fast(inp)
            try:
                torch_out = copy.deepcopy(model).to(device)(inp)
            except RuntimeError as error:  # e.g. a dtype without CPU kernels in this torch build
                torch_out, torch_error = None, error
        mode = math_mode(dtype, device.type)
        budget = NETWORK_BUDGETS[mode]
        error = network_error(out, expected)
        # Logits come back in the input's memory format (a 1-channel channels_last input is also contiguous).
        channels_last_input = inp.is_contiguous(memory_format=torch.channels_last) and not inp.is_contiguous()
        layout_ok = out.is_contiguous(
            memory_format=torch.channels_last if channels_last_input else torch.contiguous_format
        )
        backend_ok = fast.last_backend in ("triton", "triton-interpreter")
        passed = backend_ok and layout_ok and error.within(budget)

        print(f"config:  {_describe(args)}{' channels_last' if args.channels_last else ''}")
        print(f"device:  {device} ({fast.last_backend}: {fast.last_backend_reason})")
        print(f"math:    {mode}; budget relative L2 <= {budget.rel_l2:.0e}, max|err|/max|ref| <= {budget.max_norm:.0e}")
        print(f"fastunet vs float64 reference: relative L2 {error.rel_l2:.2e}, max-normalized {error.max_norm:.2e}")
        if torch_out is not None:
            torch_err = network_error(torch_out, expected)
            print(
                f"torch    vs float64 reference: relative L2 {torch_err.rel_l2:.2e}, "
                f"max-normalized {torch_err.max_norm:.2e} (same dtype, for context)"
            )
        else:
            print(f"torch    vs float64 reference: n/a ({torch_error})")
        if not backend_ok:
            print(f"FAIL: the forward ran the {fast.last_backend} backend, not the Triton kernels")
        if not layout_ok:
            print("FAIL: the output is not in the input's memory format")
        print("PASS" if passed else "FAIL")
        return 0 if passed else 1
    finally:
        torch.backends.cudnn.allow_tf32 = saved_tf32


# -- trace and roofline -------------------------------------------------------------------------------------------
def _run_trace(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from fastunet.roofline import stage_labels, trace_config
    from fastunet.trace import summarize

    records = trace_config(_model_kwargs(args), _input_shape(args), DTYPES[args.dtype])
    labels = stage_labels(records, args.depth, args.upsample)
    print(f"launches of one FastUNet forward (traced, nothing runs): {_describe(args)}")
    header = (
        f"{'#':>3}  {'stage':<16} {'kernel':<19} {'grid':<12} {'BLOCK MxNxK':<13} {'warps':>5} {'stages':>6} "
        f"{'GFLOP':>9} {'MB read':>9} {'MB write':>9}"
    )
    print(header)
    print("-" * len(header))
    for i, (label, record) in enumerate(zip(labels, records, strict=True)):
        c = record.constexprs
        tile = f"{c.get('BLOCK_M', '?')}x{c.get('BLOCK_N', '?')}x{c.get('BLOCK_K', '?')}"
        grid = "x".join(str(g) for g in record.grid)
        print(
            f"{i:>3}  {label:<16} {record.name:<19} {grid:<12} {tile:<13} "
            f"{record.launch_options.get('num_warps', '?'):>5} {record.launch_options.get('num_stages', '?'):>6} "
            f"{record.flops / 1e9:>9.2f} {record.bytes_read / 1e6:>9.2f} {record.bytes_written / 1e6:>9.2f}"
        )
    totals = summarize(records)
    print(
        f"launches: {totals['launches']}  GFLOP: {totals['flops'] / 1e9:.2f}  MB read: {totals['bytes_read'] / 1e6:.2f}"
        f"  MB written: {totals['bytes_written'] / 1e6:.2f}"
    )
    return 0


def _run_roofline(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from fastunet.roofline import (
        DEFAULT_CEILINGS,
        config_roofline,
        eager_estimate,
        format_roofline_report,
        format_summary,
        roofline_report,
    )

    dtype, allow_tf32 = DTYPES[args.dtype], not args.ieee
    kwargs, shape = _model_kwargs(args), _input_shape(args)
    print(f"configuration: {_describe(args)}")
    print(format_roofline_report(roofline_report(kwargs, shape, dtype, allow_tf32=allow_tf32)))
    for ceilings in DEFAULT_CEILINGS:
        net = config_roofline(kwargs, shape, dtype, ceilings=ceilings, allow_tf32=allow_tf32)
        eager = None
        if not args.no_eager:
            eager = eager_estimate(kwargs, shape, dtype, ceilings=ceilings, allow_tf32=allow_tf32)
        print(f"{ceilings.name}: {format_summary(net, eager)}")
    return 0


# -- bench and report (their own options) -------------------------------------------------------------------------
def _bench_dir() -> Path | None:
    import fastunet

    for root in (Path(fastunet.__file__).resolve().parents[1], Path.cwd()):
        if (root / "bench" / "run_gpu.py").is_file():
            return root / "bench"
    return None


def _run_bench(rest: Sequence[str]) -> int:
    if not torch.cuda.is_available() and not {"-h", "--help"} & set(rest):
        print(
            "bench: timings need a CUDA device and none is available here.\n"
            "  On a GPU machine, from a source checkout: fastunet bench --quick   (or python bench/run_gpu.py)\n"
            "  Without a GPU: fastunet roofline (the roofline model), fastunet report (sm_90 compile report)",
            file=sys.stderr,
        )
        return 2
    bench = _bench_dir()
    if bench is None:
        print(
            "bench: bench/run_gpu.py not found: the benchmarks live in the source tree, not in the installed "
            "package; run this from a checkout of the repository",
            file=sys.stderr,
        )
        return 2
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    run_gpu = importlib.import_module("run_gpu")
    return int(run_gpu.main(list(rest), prog="fastunet bench") or 0)


def _run_report(rest: Sequence[str]) -> int:
    try:
        compile_report = importlib.import_module("fastunet.compile_report")
    except ImportError as error:
        print(f"report: the compile report is not available in this installation ({error})", file=sys.stderr)
        return 2
    return int(compile_report.main(list(rest), prog="fastunet report") or 0)


_PASSTHROUGH = {"bench": _run_bench, "report": _run_report}
_COMMANDS = {"check": _run_check, "trace": _run_trace, "roofline": _run_roofline}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastunet`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _PASSTHROUGH:
        return _PASSTHROUGH[argv[0]](argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _COMMANDS[args.command](args, argv)
    except (ValueError, TypeError) as error:  # an unsupported configuration: say which, no traceback
        print(f"fastunet {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
