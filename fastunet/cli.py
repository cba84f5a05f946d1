"""The ``fastunet`` command: parity check, launch trace, roofline model, GPU benchmark, sm_90 compile report.

::

    fastunet check                     # FastUNet vs the float64 reference on a small config (CPU: interpreter)
    fastunet check --dtype float16 --upsample transpose --norm batch --size 33
    fastunet trace --upsample bilinear # the launches of the reference config (base 64, depth 4, 512x512)
    fastunet roofline --batch 16       # a roofline model of those launches (a model, not a measurement)
    fastunet bench                     # the reference config: parity, then timings vs eager and torch.compile
    fastunet report                    # compile every kernel variant for sm_90, model the forward (no GPU needed)

``check`` runs the kernels where they can run: compiled on a CUDA device, otherwise on the CPU under Triton's
interpreter. The interpreter is chosen by ``TRITON_INTERPRET=1`` before ``triton`` is imported; when this process
imported it already, ``check`` re-runs itself in a child process with the variable set.

``bench`` on a CUDA machine checks parity, then times each provider and each stage (:mod:`fastunet.tooling.timing`,
part of the installed package). Without a GPU it makes no timings: it says so, runs the parity check under the
interpreter on a small configuration, and prints the roofline model, the sm_90 compile report and the issue model of
the chosen configuration instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import torch

from fastunet.tooling.dtypes import DTYPES, SHORT_NAMES, dtype_name, short_dtype_name
from fastunet.tooling.timing_args import add_timing_args, finish_timing_args

_CHILD_MARK = "FASTUNET_CLI_INTERPRETER_CHILD"

CHECK_DEFAULTS = {"base_channels": 8, "depth": 3, "size": 32, "batch": 2, "dtype": "float32"}
REFERENCE_DEFAULTS = {"base_channels": 64, "depth": 4, "size": 512, "batch": 1, "dtype": "float16"}


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, refused with what was expected and what was given."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _add_model_args(parser: argparse.ArgumentParser, defaults: dict) -> None:
    group = parser.add_argument_group("configuration")
    group.add_argument("--in-channels", type=positive_int, default=3)
    group.add_argument("--num-classes", type=positive_int, default=2)
    group.add_argument("--base-channels", type=positive_int, default=defaults["base_channels"])
    group.add_argument("--depth", type=positive_int, default=defaults["depth"], help="poolings; H, W >= 2**depth")
    group.add_argument("--upsample", choices=("transpose", "bilinear", "nearest"), default="bilinear")
    group.add_argument("--norm", choices=("none", "batch"), default="none", help="batch: BatchNorm (folded in eval)")
    group.add_argument("--align-corners", action="store_true", help="bilinear upsampling with align_corners=True")
    group.add_argument("--batch", type=positive_int, default=defaults["batch"])
    group.add_argument("--size", type=positive_int, default=defaults["size"], help="H and W (default %(default)s)")
    group.add_argument("--height", type=positive_int, help="H, overriding --size")
    group.add_argument("--width", type=positive_int, help="W, overriding --size")
    group.add_argument(
        "--dtype",
        type=dtype_name,
        default=defaults["dtype"],
        help="float32 (fp32), float16 (fp16) or bfloat16 (bf16) (default %(default)s)",
    )


def _check_size_for_depth(depth: int, height: int, width: int, options: str) -> None:
    smallest = 2**depth
    if height < smallest or width < smallest:
        raise ValueError(f"depth {depth} needs H and W >= 2**{depth} = {smallest}, got {height}x{width} ({options})")


def validate_args(args: argparse.Namespace) -> None:
    """Checks across options (each option's own range is checked while parsing); raises ValueError."""
    if getattr(args, "depth", None) is None:
        return
    _check_size_for_depth(args.depth, *_input_shape(args)[2:], "raise --size/--height/--width or lower --depth")
    if getattr(args, "check_depth", None) is not None:
        size = args.check_size
        _check_size_for_depth(args.check_depth, size, size, "raise --check-size or lower --check-depth")


def _check_weights(args: argparse.Namespace) -> None:
    """Refuse a configuration whose largest conv (the bottleneck's second) the kernels cannot address. Imports the
    kernels: call it once the interpreter choice is made."""
    from fastunet.kernels.conv import check_weight_addressable

    widest = args.base_channels * 2**args.depth
    try:
        check_weight_addressable(9 * widest, widest)
    except ValueError as error:
        raise ValueError(
            f"--base-channels {args.base_channels} at --depth {args.depth} gives a {widest}-channel bottleneck: {error}"
        ) from None


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

    bench = sub.add_parser(
        "bench",
        help="parity, then timings vs eager PyTorch and torch.compile (GPU); model and compile report without one",
        description="On a CUDA machine: check parity of the chosen configuration (default: the reference config), "
        "measure the device's bf16 matmul and copy ceilings, then time each provider (median of CUDA-event timings) "
        "and each stage. Without a GPU: no timings; parity under the interpreter on a small configuration, the "
        "roofline model and the sm_90 compile report of the chosen configuration.",
    )
    _add_model_args(bench, REFERENCE_DEFAULTS)
    add_timing_args(bench)
    cpu = bench.add_argument_group("without a GPU")
    cpu.add_argument(
        "--report-dtypes",
        nargs="+",
        type=short_dtype_name,
        help="dtypes of the compile report (default fp16 bf16 for half-precision configs, else the config's dtype)",
    )
    cpu.add_argument("--no-report", action="store_true", help="leave out the sm_90 compile report")
    cpu.add_argument("--check-base-channels", type=positive_int, default=CHECK_DEFAULTS["base_channels"])
    cpu.add_argument("--check-depth", type=positive_int, default=CHECK_DEFAULTS["depth"])
    cpu.add_argument("--check-size", type=positive_int, default=CHECK_DEFAULTS["size"])
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

    _check_weights(args)
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
    from fastunet.tooling.trace import saved_for_backward, stage_labels, summarize, trace_config

    _check_weights(args)

    records = trace_config(_model_kwargs(args), _input_shape(args), DTYPES[args.dtype])
    labels = stage_labels(records)
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
    try:
        saved = saved_for_backward(_model_kwargs(args), _input_shape(args), DTYPES[args.dtype])
    except ValueError as error:
        print(f"saved for backward: the reference backward ({error})")
    else:
        print(
            f"saved for backward (backward kernels, training mode): {saved['maps'] / 1e6:.2f} MB of maps, "
            f"{saved['weights'] / 1e6:.2f} MB of packed weights"
        )
    return 0


def _run_roofline(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from fastunet.tooling.roofline import (
        DEFAULT_CEILINGS,
        config_roofline,
        eager_estimate,
        format_roofline_report,
        format_summary,
        roofline_report,
    )

    _check_weights(args)
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


# -- bench ----------------------------------------------------------------------------------------------------------
def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 100 - len(title)), flush=True)


def _child_env(interpret: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", _CHILD_MARK)}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def _bench_without_gpu(args: argparse.Namespace) -> int:
    """No GPU: say so, then parity under the interpreter (small config), the roofline model and the compile report
    of the chosen configuration. Nothing here is timed as speed."""
    from fastunet.tooling.roofline import format_roofline_report, roofline_report

    started = time.perf_counter()
    print(
        "bench: no GPU here (torch.cuda.is_available() is False), so no timings are made: speed is measured only on "
        "a CUDA device.\n"
        "Instead: 1. parity under Triton's interpreter on a small configuration; 2. the roofline MODEL of the chosen "
        "configuration (lower bounds, not measurements); 3. the sm_90 COMPILE REPORT of its kernels (built, not run) "
        "and the issue MODEL of its forward from their SASS (a model, not a measurement)."
    )
    result: dict = {"kind": "no GPU: parity (interpreter), roofline model, compile report; no timings", "sections": {}}
    status = 0

    _section("1. parity (Triton interpreter on the CPU; checks values, not speed)")
    check_argv = [
        "check",
        "--device",
        "cpu",
        "--base-channels",
        str(args.check_base_channels),
        "--depth",
        str(args.check_depth),
        "--size",
        str(args.check_size),
        "--batch",
        str(CHECK_DEFAULTS["batch"]),
        "--dtype",
        args.dtype,
        "--upsample",
        args.upsample,
        "--norm",
        args.norm,
        "--in-channels",
        str(args.in_channels),
        "--num-classes",
        str(args.num_classes),
        *(["--align-corners"] if args.align_corners else []),
    ]
    print(f"$ fastunet {' '.join(check_argv)}", flush=True)
    check_status = subprocess.call([sys.executable, "-m", "fastunet.cli", *check_argv], env=_child_env(True))
    result["sections"]["parity"] = {"argv": check_argv, "passed": check_status == 0}
    status = status or (check_status != 0)

    _section("2. roofline model (not a measurement)")
    report = roofline_report(_model_kwargs(args), _input_shape(args), DTYPES[args.dtype])
    print(f"configuration: {_describe(args)}")
    print(format_roofline_report(report))
    result["sections"]["roofline"] = report

    if not args.no_report:
        dtypes = args.report_dtypes or (
            ["fp16", "bf16"] if args.dtype in ("float16", "bfloat16") else [SHORT_NAMES[args.dtype]]
        )
        _section(
            f"3. sm_90 compile report and issue model ({' and '.join(dtypes)}; compiled for the GPU, nothing runs here)"
        )
        with tempfile.TemporaryDirectory(prefix="fastunet-report-") as work:
            path = os.path.join(work, "report.json")
            report_argv = [
                "--arch",
                "90",
                "--dtype",
                *dtypes,
                "--upsample",
                args.upsample,
                "--batch",
                str(args.batch),
                "--size",
                str(_input_shape(args)[2]),
                "--in-channels",
                str(args.in_channels),
                "--num-classes",
                str(args.num_classes),
                "--base-channels",
                str(args.base_channels),
                "--depth",
                str(args.depth),
                "--json",
                path,
            ]
            if _input_shape(args)[2] != _input_shape(args)[3]:
                print("compile report: traced at H = W = --height (tile choices rarely depend on the aspect)")
            command = [sys.executable, "-m", "fastunet.tooling.compile_report", *report_argv]
            report_status = subprocess.call(command, env=_child_env(False))
            if os.path.exists(path):
                with open(path) as handle:
                    result["sections"]["compile_report"] = json.load(handle)
            else:
                result["sections"]["compile_report"] = {"error": f"exit status {report_status}"}
        status = status or report_status not in (0, 1)

    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(f"\nbench (no GPU): done in {result['elapsed_s']:.0f} s; no timings were made.")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1, default=str)
            handle.write("\n")
        print(f"wrote {args.json}")
    return int(bool(status))


def _bench_on_gpu(args: argparse.Namespace) -> int:
    if _interpreter_state() or os.environ.get("TRITON_INTERPRET") == "1":
        print("bench: TRITON_INTERPRET=1 is set: unset it to time the compiled kernels", file=sys.stderr)
        return 2
    from fastunet.tooling import timing
    from fastunet.tooling.shapes import BenchConfig

    batch, c_in, height, width = _input_shape(args)
    kwargs = _model_kwargs(args)
    config = BenchConfig(
        name=f"{kwargs['upsample']}-b{kwargs['base_channels']}-d{kwargs['depth']}-{height}x{width}-n{batch}",
        in_channels=c_in,
        num_classes=kwargs["num_classes"],
        base_channels=kwargs["base_channels"],
        depth=kwargs["depth"],
        upsample=kwargs["upsample"],
        norm=kwargs["norm"],
        batch=batch,
        height=height,
        width=width,
        align_corners=kwargs["align_corners"],
        note="fastunet bench",
    )
    status, _ = timing.run(args, [config], [args.dtype], train=[config.name] if args.train is not None else [])
    return status


def _run_bench(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.train:
        raise ValueError(
            "--train takes no configuration names here (fastunet bench times the one configuration its options "
            f"describe), got {' '.join(args.train)}"
        )
    finish_timing_args(args)
    _check_weights(args)
    if torch.cuda.is_available():
        return _bench_on_gpu(args)
    return _bench_without_gpu(args)


def _run_report(rest: Sequence[str]) -> int:
    from fastunet.tooling import compile_report

    return compile_report.main(list(rest), prog="fastunet report")


_PASSTHROUGH = {"report": _run_report}
_COMMANDS = {"check": _run_check, "trace": _run_trace, "roofline": _run_roofline, "bench": _run_bench}


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
        validate_args(args)
        return _COMMANDS[args.command](args, argv)
    except (ValueError, TypeError) as error:  # an unsupported configuration: say which, no traceback
        print(f"fastunet {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
