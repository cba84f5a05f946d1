"""Compile report of the reference configuration: every kernel variant it launches, built without a GPU, and the
issue model of its forward.

Each distinct variant that the reference U-Net (3 -> 2 classes, base 64, depth 4, bilinear, 512x512; batch 1 and
16) launches in fp16 and bf16 goes through Triton's real compiler to a cubin for each target, sm_90 (H100/H200)
and sm_80 (A100) by default (:mod:`fastunet.compile_report` does the compiling and the SASS inspection). Per
variant the JSON holds ``kernel``, ``config`` (tile, warps, stages and the other compile-time constants),
``registers``, ``spill_bytes``, ``shared_bytes``, ``tensor_core_instructions`` (HGMMA + HMMA in the SASS), the
``occupancy`` those allow on an SM, the issue figures of its costliest tensor-core loop
(:mod:`fastunet.issue_model`): ``issue_ratio``, ``mainloop_instructions`` (SASS instructions per warp per K-step),
``tma_loads`` (UTMALDG) and ``cp_async`` (LDGSTS) per iteration, then ``arch``, and every such loop in ``loops``.
Top level, ``model``: the modeled forward of each configuration on the first target, ``{dtype, batch, ms, tflops,
fraction_of_peak}`` and its ``layers``, under ``model_assumptions``.

This is a compile report and a model, not a measurement: nothing runs. Run from the repository root::

    python -m bench.compile_report --arch sm_90 --json report.json
    python -m bench.compile_report --dtype fp16 --batch 1 --upsample bilinear transpose

Exit status 1 when a variant spills, lacks tensor-core instructions, asks for too much shared memory or draws a
ptxas performance warning; 2 when the report cannot run (``TRITON_INTERPRET=1`` set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

try:  # python -m bench.compile_report from the repository root
    from bench import _source_tree  # noqa: F401  (makes fastunet importable from the source tree)
except ImportError:  # python bench/compile_report.py, or bench/ on sys.path
    import _source_tree  # noqa: F401  (makes fastunet importable from the source tree)

from fastunet import compile_report as core

REFERENCE = {
    "upsample": ("bilinear",),
    "batch": (1, 16),
    "size": (512,),
    "dtype": ("fp16", "bf16"),
    "arch": (90, 80),
}
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
SCHEMA_KEYS = (
    "kernel",
    "config",
    "registers",
    "spill_bytes",
    "shared_bytes",
    "tensor_core_instructions",
    "occupancy",
    "issue_ratio",
    "mainloop_instructions",
    "tma_loads",
    "cp_async",
    "arch",
)
parse_arch = core.parse_arch


def variant_json(row: core.VariantReport) -> dict:
    """One variant in the report's schema (``SCHEMA_KEYS`` first, then the details)."""
    constexprs = row.to_json()["constexprs"]
    config = {key: constexprs[key] for key in CONFIG_KEYS if key in constexprs}
    config.update({"num_warps": row.num_warps, "num_stages": row.num_stages, "dtype": row.dtype})
    config.update({key: value for key, value in constexprs.items() if key not in CONFIG_KEYS})
    issue = row.mainloop.summary()
    return {
        "kernel": row.name,
        "config": config,
        "registers": row.registers,
        "spill_bytes": row.spill_bytes,
        "shared_bytes": row.shared_bytes,
        "tensor_core_instructions": row.hgmma + row.hmma,
        "occupancy": row.occupancy.to_json() if row.occupancy else None,
        "issue_ratio": issue["issue_ratio"],
        "mainloop_instructions": issue["mainloop_instructions"],
        "tma_loads": issue["tma_loads"],
        "cp_async": issue["cp_async"],
        "arch": f"sm_{row.arch}",
        "tensor_clocks": issue["tensor_clocks"],
        "loops": [loop.to_json() for loop in row.mainloop.loops],
        "hgmma": row.hgmma,
        "hmma": row.hmma,
        "local_ops": row.local_ops,
        "ptxas_warnings": list(row.ptxas_warnings),
        "problems": core.problems(row),
        "launches": row.launches,
        "used_by": list(row.configs),
        "compile_s": row.compile_s,
    }


def format_table(variants: Sequence[dict]) -> str:
    """One line per variant: target, tile, registers, spills, shared memory, tensor-core instructions, occupancy,
    and the issue model's figures of the costliest tensor-core loop (``ins/K``: instructions per warp per K-step,
    ``issue``: issue ratio, ``TMA``, ``cpA``: UTMALDG and LDGSTS per iteration)."""
    header = (
        f"{'kernel':<14} {'arch':<5} {'dtype':<5} {'up':>2} {'tile MxNxK':<12} {'warps':>5} {'stg':>3} {'regs':>4} "
        f"{'spill B':>7} {'smem KiB':>8} {'TC ops':>6} {'CTA/SM':>6} {'warps/SM':>8} {'occ':>5} {'limited by':<13} "
        f"{'ins/K':>5} {'issue':>5} {'TMA':>3} {'cpA':>3} {'n':>2}  used by"
    )
    lines = [header, "-" * len(header)]
    for v in variants:
        c, occ = v["config"], v["occupancy"] or {}
        tile = "x".join(str(c.get(key, "-")) for key in CONFIG_KEYS)
        ins = "-" if v["mainloop_instructions"] is None else f"{v['mainloop_instructions']:.0f}"
        ratio = "-" if v["issue_ratio"] is None else f"{v['issue_ratio']:.2f}"
        tma, cp_async = ("-" if v[key] is None else v[key] for key in ("tma_loads", "cp_async"))
        lines.append(
            f"{v['kernel']:<14} {v['arch']:<5} {c['dtype']:<5} {int(c.get('TWO_SOURCES', 0)):>2} {tile:<12} "
            f"{c['num_warps']:>5} "
            f"{c['num_stages']:>3} {v['registers']:>4} {v['spill_bytes']:>7} {v['shared_bytes'] / 1024:>8.1f} "
            f"{v['tensor_core_instructions']:>6} {occ.get('blocks_per_sm', '-'):>6} {occ.get('warps_per_sm', '-'):>8} "
            f"{occ.get('fraction', 0.0):>5.0%} {occ.get('limited_by', '-'):<13} {ins:>5} {ratio:>5} "
            f"{tma:>3} {cp_async:>3} {v['launches']:>2}  "
            f"{' '.join(v['used_by'])}"
        )
    return "\n".join(lines)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument(
        "--arch",
        nargs="+",
        type=parse_arch,
        default=list(REFERENCE["arch"]),
        help="targets, e.g. sm_90 sm_80 (default); the model is of the first",
    )
    parser.add_argument("--dtype", nargs="+", choices=list(core.DTYPES), default=list(REFERENCE["dtype"]))
    parser.add_argument("--upsample", nargs="+", choices=core.UPSAMPLES, default=list(REFERENCE["upsample"]))
    parser.add_argument("--batch", nargs="+", type=int, default=list(REFERENCE["batch"]))
    parser.add_argument("--size", nargs="+", type=int, default=list(REFERENCE["size"]), help="H = W")
    parser.add_argument("--in-channels", type=int, default=core.REFERENCE_MODEL["in_channels"])
    parser.add_argument("--num-classes", type=int, default=core.REFERENCE_MODEL["num_classes"])
    parser.add_argument("--base-channels", type=int, default=core.REFERENCE_MODEL["base_channels"])
    parser.add_argument("--depth", type=int, default=core.REFERENCE_MODEL["depth"])
    parser.add_argument("--json", metavar="FILE", help="write the variants as JSON")
    parser.add_argument(
        "--eta",
        type=core.parse_eta,
        help="share of issue slots a loop gets, for the model (default: the newest fit, else 0.7)",
    )
    return parser


def run(args: argparse.Namespace) -> tuple[dict, list]:
    """Compile the variants ``args`` selects for each target; the JSON payload (``variants`` and ``model`` in the
    schema above) and the modeled forwards of the first target."""
    start = time.perf_counter()
    results = [
        core.compile_configs(
            args.dtype,
            args.upsample,
            args.batch,
            args.size,
            arch,
            in_channels=args.in_channels,
            num_classes=args.num_classes,
            base_channels=args.base_channels,
            depth=args.depth,
        )
        for arch in args.arch
    ]
    models = results[0].models(args.eta)
    payload = {
        "kind": f"compile report ({', '.join(f'sm_{a}' for a in args.arch)} cubins built without a GPU; nothing "
        "was run or timed) and issue model (a model, not a measurement)",
        "triton": core.triton.__version__,
        "arch": f"sm_{args.arch[0]}",
        "archs": [f"sm_{arch}" for arch in args.arch],
        "configuration": {
            "model": {
                "in_channels": args.in_channels,
                "num_classes": args.num_classes,
                "base_channels": args.base_channels,
                "depth": args.depth,
            },
            "upsample": list(args.upsample),
            "dtypes": list(args.dtype),
            "batches": list(args.batch),
            "sizes": list(args.size),
        },
        "limits": vars(core.SM_LIMITS[args.arch[0]]) if args.arch[0] in core.SM_LIMITS else None,
        "wall_s": round(time.perf_counter() - start, 3),
        "variants": [variant_json(row) for result in results for row in result.rows],
        "model": [model.to_json() for model in models],
        "model_assumptions": models[0].assumptions.to_json() if models else None,
    }
    return payload, models


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if core.INTERPRET:
        print(
            f"{prog or 'bench.compile_report'}: needs real Triton compilation; unset TRITON_INTERPRET", file=sys.stderr
        )
        return 2
    payload, models = run(args)
    print(format_table(payload["variants"]))
    print(
        f"{len(payload['variants'])} variants, {', '.join(payload['archs'])}, triton {payload['triton']}, "
        f"{payload['wall_s']:.1f} s (compile report: built, not run)"
    )
    core.print_model(models)
    flagged = [v for v in payload["variants"] if v["problems"]]
    for v in flagged:
        print(f"PROBLEM {v['kernel']} {v['arch']} {v['config']}: {'; '.join(v['problems'])}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(payload, handle, indent=1)
            handle.write("\n")
    return 1 if flagged else 0


if __name__ == "__main__":
    sys.exit(main())
