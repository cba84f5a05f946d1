"""Compile report: every kernel variant a U-Net forward launches, built for a real GPU target without a GPU.

A forward is traced (:func:`fastunet.trace`), its launches are reduced to the distinct compiled variants (kernel,
constexprs, argument specialization, launch options), and each variant goes through the full Triton pipeline to
a cubin with ``triton.compile``. The cubin is then inspected with the ``cuobjdump`` that ships in Triton's wheel:
registers, local memory (where ``ptxas`` puts spills), shared memory and the tensor-core instructions of the SASS
(``HGMMA`` is the sm_90 warpgroup MMA, ``HMMA`` the sm_80-style one). This is the performance check that runs on
any machine, and it catches compile errors the interpreter never sees.

The arguments are specialized the way Triton's JIT does at launch (integers equal to 1 become constants, integers
and pointers divisible by 16 get a divisibility hint), so each cubin is the one a launch would build.

Must run where ``TRITON_INTERPRET`` is unset: under the interpreter the kernels are not compilable objects and the
launchers pick interpreter-only constexprs. Usage::

    python -m fastunet.compile_report --dtype fp16 bf16 --upsample transpose bilinear --json report.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastunet.kernels._common import INTERPRET, LaunchRecord
from fastunet.reference import UNet
from fastunet.trace import trace

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
UPSAMPLES = ("transpose", "bilinear", "nearest")
# The reference configuration of the performance work: base 64, depth 4, RGB in, 2 classes, 512x512.
REFERENCE_MODEL = {"in_channels": 3, "num_classes": 2, "base_channels": 64, "depth": 4}
REFERENCE_SIZE = 512
REFERENCE_BATCHES = (16, 1)

_POINTER_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32"}
_DIVISIBILITY = 16
_MMA_RE = re.compile(r"\b(HGMMA|HMMA)(\.[\w.]+)?")
_LOCAL_RE = re.compile(r"\b(LDL|STL)(\.[\w.]+)?\b")
_RES_USAGE_RE = re.compile(r"\b(REG|STACK|SHARED|LOCAL):(\d+)")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One distinct compiled kernel: what ``triton.compile`` needs, plus which launches use it."""

    name: str
    kernel: object
    signature: dict
    constexprs: dict
    divisible: tuple[int, ...]  # indices of the runtime arguments that carry a divisible-by-16 hint
    launch_options: dict
    launches: int
    configs: tuple[str, ...]

    @property
    def dtype(self) -> str:
        """Element type of the first pointer argument (the activations)."""
        return next(t[1:] for t in self.signature.values() if t.startswith("*"))


@dataclasses.dataclass(frozen=True)
class VariantReport:
    """Compiled figures of one variant for one target."""

    name: str
    dtype: str
    arch: int
    constexprs: dict
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int  # per-thread local memory plus stack: where ptxas puts spilled registers
    local_ops: int  # LDL/STL instructions in the SASS
    shared_bytes: int  # dynamic shared memory the launch requests
    static_shared_bytes: int
    hgmma: int  # HGMMA instructions in the SASS
    hmma: int
    mma_opcodes: tuple[str, ...]
    compile_s: float
    launches: int
    configs: tuple[str, ...]

    def to_json(self) -> dict:
        row = dataclasses.asdict(self)
        row["constexprs"] = {k: _jsonable(v) for k, v in self.constexprs.items()}
        return row


def _jsonable(value: object) -> object:
    return value if isinstance(value, (bool, int, float, str)) or value is None else str(value)


# ---------------------------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------------------------
def specialize(arg: object) -> tuple[str, object, bool]:
    """(Triton type, constant value or None, divisible by 16) of one runtime argument, as the JIT sees it at launch.

    Integers equal to 1 are compiled in as constants; 32-bit or 64-bit by magnitude; a pointer or integer divisible
    by 16 gets the ``tt.divisibility`` hint that lets loads and stores vectorize.
    """
    if isinstance(arg, torch.Tensor):
        if arg.dtype not in _POINTER_TYPES:
            raise TypeError(f"no Triton pointer type for {arg.dtype}")
        return _POINTER_TYPES[arg.dtype], None, arg.data_ptr() % _DIVISIBILITY == 0
    if isinstance(arg, bool):
        raise TypeError("runtime bool arguments are not specialized here; pass flags as constexprs")
    if isinstance(arg, int):
        if arg == 1:
            return "constexpr", 1, False
        if -(2**31) <= arg < 2**31:
            kind = "i32"
        elif -(2**63) <= arg < 2**63:
            kind = "i64"
        elif arg < 2**64:
            kind = "u64"
        else:
            raise OverflowError(f"integer argument {arg} does not fit 64 bits")
        return kind, None, arg % _DIVISIBILITY == 0
    if isinstance(arg, float):
        return "fp32", None, False
    raise TypeError(f"unsupported runtime argument of type {type(arg).__name__}")


def _param_names(kernel: object) -> tuple[list[str], set[str]]:
    """All parameter names of a ``@triton.jit`` kernel, and the constexpr ones."""
    params = getattr(kernel, "params", None)
    if params is None:
        raise TypeError(
            f"{kernel!r} is not a compilable @triton.jit function; run the compile report with TRITON_INTERPRET unset"
        )
    return [p.name for p in params], {p.name for p in params if p.is_constexpr}


def _variant_key(record: LaunchRecord) -> tuple:
    names, constexpr_names = _param_names(record.kernel)
    runtime = [n for n in names if n not in constexpr_names]
    if len(runtime) != len(record.args):
        raise ValueError(f"{record.name}: {len(record.args)} runtime arguments for parameters {runtime}")
    signature, constexprs, divisible = {}, {}, []
    specialized = dict(zip(runtime, (specialize(a) for a in record.args)))
    for index, name in enumerate(names):
        if name in constexpr_names:
            signature[name], constexprs[name] = "constexpr", record.constexprs[name]
            continue
        kind, value, div16 = specialized[name]
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = value
        elif div16:
            divisible.append(index)
    options = tuple(sorted(record.launch_options.items()))
    key = (id(record.kernel), tuple(signature.items()), tuple(sorted(constexprs.items())), tuple(divisible), options)
    return key, signature, constexprs, tuple(divisible)


def collect_variants(traces: Iterable[tuple[str, Sequence[LaunchRecord]]]) -> list[Variant]:
    """Distinct kernel variants over labelled traces, in first-launch order.

    Two launches share a variant when they run the same kernel with the same constexprs, argument specialization
    and launch options: one cubin serves both.
    """
    found: dict[tuple, dict] = {}
    for label, records in traces:
        for record in records:
            key, signature, constexprs, divisible = _variant_key(record)
            entry = found.setdefault(
                key,
                {
                    "name": record.name,
                    "kernel": record.kernel,
                    "signature": signature,
                    "constexprs": constexprs,
                    "divisible": divisible,
                    "launch_options": dict(record.launch_options),
                    "launches": 0,
                    "configs": [],
                },
            )
            entry["launches"] += 1
            if label not in entry["configs"]:
                entry["configs"].append(label)
    return [Variant(**{**entry, "configs": tuple(entry["configs"])}) for entry in found.values()]


def trace_config(
    upsample: str,
    dtype: torch.dtype,
    batch: int,
    size: int = REFERENCE_SIZE,
    **model_kwargs: int,
) -> list[LaunchRecord]:
    """Launches of one forward of the reference U-Net (or ``model_kwargs`` overrides) on a ``size``-square input."""
    kwargs = {**REFERENCE_MODEL, **model_kwargs}
    model = UNet(
        kwargs["in_channels"],
        kwargs["num_classes"],
        kwargs["base_channels"],
        kwargs["depth"],
        upsample=upsample,
        device="meta",
    )
    x = torch.empty(batch, kwargs["in_channels"], size, size, dtype=dtype, device="meta")
    return trace(model, x)


# ---------------------------------------------------------------------------------------------------------------
# Compilation and inspection
# ---------------------------------------------------------------------------------------------------------------
def _cuobjdump() -> str:
    with contextlib.suppress(AttributeError):
        return triton.knobs.nvidia.cuobjdump.path
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"cuobjdump not found at {path}")
    return path


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED (static) and LOCAL of the cubin's kernel, from ``cuobjdump -res-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run(
            [_cuobjdump(), "-res-usage", handle.name], check=True, capture_output=True, text=True
        ).stdout
    usage = {key: int(value) for key, value in _RES_USAGE_RE.findall(text)}
    if "REG" not in usage:
        raise RuntimeError(f"cuobjdump -res-usage printed no register count:\n{text}")
    return usage


def _target_options(variant: Variant) -> dict:
    return {k: variant.launch_options[k] for k in ("num_warps", "num_stages") if k in variant.launch_options}


def compile_variant(variant: Variant, arch: int = 90) -> VariantReport:
    """Compile one variant for ``sm_<arch>`` (no GPU needed) and read its registers, spills, smem and MMA ops."""
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    attrs = {(index,): backend.parse_attr("D") for index in variant.divisible}
    source = ASTSource(variant.kernel, dict(variant.signature), dict(variant.constexprs), attrs)
    start = time.perf_counter()
    compiled = triton.compile(source, target=target, options=_target_options(variant))
    compile_s = time.perf_counter() - start

    usage = _resource_usage(compiled.asm["cubin"])
    sass = compiled.asm["sass"]
    opcodes = [m.group(0) for m in _MMA_RE.finditer(sass)]
    registers = getattr(compiled, "n_regs", None)
    spills = getattr(compiled, "n_spills", None)
    metadata = compiled.metadata
    constexprs = {k: v for k, v in variant.constexprs.items() if variant.signature[k] == "constexpr"}
    return VariantReport(
        name=variant.name,
        dtype=variant.dtype,
        arch=arch,
        constexprs=constexprs,
        num_warps=metadata.num_warps,
        num_stages=metadata.num_stages,
        registers=registers if isinstance(registers, int) else usage["REG"],
        spill_bytes=spills if isinstance(spills, int) else usage.get("LOCAL", 0) + usage.get("STACK", 0),
        local_ops=len(_LOCAL_RE.findall(sass)),
        shared_bytes=metadata.shared,
        static_shared_bytes=usage.get("SHARED", 0),
        hgmma=sum(op.startswith("HGMMA") for op in opcodes),
        hmma=sum(op.startswith("HMMA") for op in opcodes),
        mma_opcodes=tuple(sorted(set(opcodes))),
        compile_s=round(compile_s, 3),
        launches=variant.launches,
        configs=variant.configs,
    )


@contextlib.contextmanager
def _fresh_cache() -> Iterator[None]:
    """Compile into an empty Triton cache, so compile times are cold and no stale cubin is read back."""
    previous = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="triton-cache-") as cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = previous


def report(
    dtypes: Sequence[str] = ("fp16", "bf16", "fp32"),
    upsamples: Sequence[str] = UPSAMPLES,
    batches: Sequence[int] = REFERENCE_BATCHES,
    size: int = REFERENCE_SIZE,
    arch: int = 90,
    fresh_cache: bool = True,
    **model_kwargs: int,
) -> list[VariantReport]:
    """Compile every distinct variant that the given configurations launch; one report row per variant."""
    if INTERPRET:
        raise RuntimeError("the compile report needs real Triton compilation: run it with TRITON_INTERPRET unset")
    traces = [
        (f"{upsample}/{dtype}/b{batch}", trace_config(upsample, DTYPES[dtype], batch, size, **model_kwargs))
        for dtype in dtypes
        for upsample in upsamples
        for batch in batches
    ]
    variants = collect_variants(traces)
    with _fresh_cache() if fresh_cache else contextlib.nullcontext():
        return [compile_variant(v, arch) for v in variants]


def _uses_tensor_cores(row: VariantReport) -> bool:
    """HGMMA on sm_90, HMMA on sm_80/sm_89; other targets are not judged."""
    if row.arch == 90:
        return row.hgmma > 0
    if 80 <= row.arch < 90:
        return row.hmma > 0
    return True


def format_table(rows: Sequence[VariantReport]) -> str:
    """Fixed-width table: one line per variant."""
    header = (
        f"{'variant':<18} {'dtype':<5} {'up':>2} {'BM':>4} {'BN':>4} {'BK':>3} {'warps':>5} {'stg':>3} "
        f"{'regs':>4} {'spill':>5} {'smem KiB':>8} {'HGMMA':>5} {'HMMA':>4} {'s':>5} {'n':>3}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        c = row.constexprs
        lines.append(
            f"{row.name:<18} {row.dtype:<5} {c.get('UP_MODE', '-'):>2} {c.get('BLOCK_M', '-'):>4} "
            f"{c.get('BLOCK_N', '-'):>4} {c.get('BLOCK_K', '-'):>3} {row.num_warps:>5} {row.num_stages:>3} "
            f"{row.registers:>4} {row.spill_bytes:>5} {row.shared_bytes / 1024:>8.1f} {row.hgmma:>5} {row.hmma:>4} "
            f"{row.compile_s:>5.2f} {row.launches:>3}"
        )
    total = sum(row.compile_s for row in rows)
    lines.append(f"{len(rows)} variants, {total:.1f} s compile (HGMMA/HMMA: instruction counts in the SASS)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print the table; ``--json`` also writes the rows. Exit status 1 if a variant spills or lacks MMA."""
    parser = argparse.ArgumentParser(prog="python -m fastunet.compile_report", description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16", "fp32"])
    parser.add_argument("--upsample", nargs="+", choices=UPSAMPLES, default=list(UPSAMPLES))
    parser.add_argument("--batch", nargs="+", type=int, default=list(REFERENCE_BATCHES))
    parser.add_argument("--size", type=int, default=REFERENCE_SIZE)
    parser.add_argument("--in-channels", type=int, default=REFERENCE_MODEL["in_channels"])
    parser.add_argument("--num-classes", type=int, default=REFERENCE_MODEL["num_classes"])
    parser.add_argument("--base-channels", type=int, default=REFERENCE_MODEL["base_channels"])
    parser.add_argument("--depth", type=int, default=REFERENCE_MODEL["depth"])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an integer (90 = sm_90)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    rows = report(
        args.dtype,
        args.upsample,
        args.batch,
        args.size,
        args.arch,
        in_channels=args.in_channels,
        num_classes=args.num_classes,
        base_channels=args.base_channels,
        depth=args.depth,
    )
    wall_s = time.perf_counter() - start
    print(format_table(rows))
    print(f"wall {wall_s:.1f} s, triton {triton.__version__}, target sm_{args.arch}")
    if args.json:
        payload = {
            "triton": triton.__version__,
            "arch": args.arch,
            "wall_s": round(wall_s, 3),
            "args": vars(args),
            "variants": [row.to_json() for row in rows],
        }
        with open(args.json, "w") as handle:
            json.dump(payload, handle, indent=1)
    return 0 if all(r.spill_bytes == 0 and r.local_ops == 0 and _uses_tensor_cores(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
