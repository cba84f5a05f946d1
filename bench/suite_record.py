"""The JSON record, PNG plots and packing of one ``bench/gpu_suite.sh`` run.

Two stages of the suite call it::

    python bench/suite_record.py env OUTDIR                    # the env stage: versions, driver, device
    python bench/suite_record.py record OUTDIR --pack          # the record stage: record.json, plots, packing
    python bench/suite_record.py digest                        # the source digest a record names (to compare)

``env`` writes ``OUTDIR/env.json`` (torch, triton, numpy, driver, device, commit, source digest) and a first
``record.json`` from it, so a run whose later stages fail still says what it ran on. ``record`` reads what the
stages left (``env.json``, ``stages.tsv``, ``tests-junit.xml``, ``sanitizer-junit.xml``, ``bench.json``) and writes
``record.json``: device, versions, commit, the headline table, times and ratios per provider and per stage, the
training step's table when the bench timed one, the measured ceilings, the status of every stage (its own included),
the test counts and failures, and the plots (speedup per stage, roofline with each stage on it) with the backend that
drew them. ``--pack`` then leaves at most ``--max-files`` files in OUTDIR (default 8, each at most ``--max-file-mib``
MiB): record.json, bench.json, tests-junit.xml, the PNGs that fit, and ``rest.tar.gz`` with everything else (logs,
stages.tsv, env.json, profiler traces, ...).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from pathlib import Path

from plots import backend as plot_backend
from plots import plot_results

REPO = Path(__file__).resolve().parents[1]
TARBALL = "rest.tar.gz"
KEEP = ("record.json", "bench.json", "tests-junit.xml")  # kept as files, in this order of priority
MAX_FILES = 8
MAX_FILE_MIB = 16
SOURCE_DIRS = ("fastunet", "kernels", "bench", "tests", ".ci")
HEADLINE_PROVIDERS = ("fastunet", "fastunet-graphs", "torch-eager", "torch-compile", "torch-compile-max-autotune")
TRAIN_PROVIDERS = ("fastunet", "torch-eager", "torch-compile")


# -- environment ---------------------------------------------------------------------------------------------------
def source_digest(root: Path = REPO) -> str:
    """SHA-256 over the source files (``pyproject.toml`` and the Python and shell files of the package, kernels,
    bench, tests and CI; recorded results left out), path and content of each: which tree ran, when no commit is
    known or the copy may differ from it."""
    digest = hashlib.sha256()
    paths = [root / "pyproject.toml"]
    for folder in SOURCE_DIRS:
        for path in (root / folder).rglob("*"):
            parts = path.relative_to(root).parts
            if "__pycache__" in parts or parts[:2] == ("bench", "results") or not path.is_file():
                continue
            if path.suffix in (".py", ".sh") or path.parent.name == ".ci":
                paths.append(path)
    for path in sorted(paths):
        if path.is_file():
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def commit_info() -> dict:
    """The source revision: ``FASTUNET_COMMIT`` when set (a copy without ``.git``), else git's HEAD and whether the
    tracked files differ from it; ``commit`` is None when neither says."""
    from_env = os.environ.get("FASTUNET_COMMIT", "").strip()
    if from_env:
        return {"commit": from_env, "commit_source": "FASTUNET_COMMIT", "dirty": None}
    head = _git("rev-parse", "HEAD")
    if head is None:
        return {"commit": None, "commit_source": "unknown: no .git here and FASTUNET_COMMIT not set", "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head, "commit_source": "git", "dirty": bool(status) if status is not None else None}


def _nvidia_smi() -> dict:
    """Driver version, device names and memory from ``nvidia-smi`` (``{"error": ...}`` when it cannot say)."""
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    try:
        result = subprocess.run(query, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        return {"error": f"{type(error).__name__}: {error}"}
    if result.returncode != 0:
        return {"error": (result.stderr or result.stdout).strip()[:500] or f"exit status {result.returncode}"}
    gpus = [[field.strip() for field in line.split(",")] for line in result.stdout.strip().splitlines()]
    return {
        "driver": gpus[0][1] if gpus and len(gpus[0]) > 1 else None,
        "gpus": [{"name": g[0], "memory": g[2] if len(g) > 2 else None} for g in gpus],
    }


def collect_environment() -> dict:
    """What the run ran on, found without a GPU kernel: versions, driver, device, commit, source digest."""
    env: dict = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        **commit_info(),
        "source_sha256": source_digest(),
        "plots": plot_backend(),
    }
    for name in ("numpy", "torch", "triton", "matplotlib"):
        try:
            env[name] = __import__(name).__version__
        except Exception as error:  # not installed, or broken: say which
            env[name] = None if isinstance(error, ImportError) else f"{type(error).__name__}: {error}"
    env["test_packages"] = {}  # what the tests stage can use (a missing one changes what runs)
    for dist in ("pytest", "pytest-xdist", "pytest-timeout", "hypothesis", "setuptools"):
        try:
            env["test_packages"][dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            env["test_packages"][dist] = None
    env["nvidia_smi"] = _nvidia_smi()
    env["driver"] = env["nvidia_smi"].get("driver")
    try:
        import torch

        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if env["cuda_available"]:
            props = torch.cuda.get_device_properties(0)
            env["device"] = torch.cuda.get_device_name(0)
            env["device_count"] = torch.cuda.device_count()
            env["capability"] = list(torch.cuda.get_device_capability(0))
            env["sm_count"] = props.multi_processor_count
            env["memory_gib"] = round(props.total_memory / 2**30, 1)
            env["cudnn"] = torch.backends.cudnn.version()
        else:
            env["device"] = None
    except Exception as error:
        env["cuda_error"] = f"{type(error).__name__}: {error}"
    return env


# -- what the stages left ------------------------------------------------------------------------------------------
def read_stages(path: str) -> list[dict]:
    """``stages.tsv`` rows (name, exit status or a status word, seconds, limit) as dicts; a timeout shows as exit
    status 124 (``timeout -s INT``) or 137 (killed after that)."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as handle:
        for line in handle:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 4:
                continue
            name, rc, seconds, limit = parts
            entry: dict = {"stage": name, "seconds": int(seconds), "limit_s": int(limit)}
            if rc.lstrip("-").isdigit():
                entry["exit_status"] = int(rc)
                entry["timed_out"] = int(rc) in (124, 137)
                entry["ok"] = int(rc) == 0
            else:  # "skipped: ...", "not found": did not run; a dry run's "(dry run)" statuses are no verdict
                entry["status"], entry["ok"] = rc, None if rc.endswith("(dry run)") else False
            rows.append(entry)
    return rows


def read_junit(path: str, max_listed: int = 50) -> dict | None:
    """Test counts from a pytest JUnit XML file, and the ids of the failed tests (None when there is none)."""
    if not os.path.exists(path):
        return None
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        return {"error": f"unreadable JUnit XML: {error}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts: dict = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            counts[key] += int(suite.get(key, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["time_s"] = sum(float(suite.get("time", 0.0)) for suite in suites)
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    counts["failed"] = failed[:max_listed]
    if len(failed) > max_listed:
        counts["failed_not_listed"] = len(failed) - max_listed
    return counts


def summarize_run(run: dict) -> dict:
    """Times, rates and ratios of one configuration of ``bench.json``, without the bulky parts."""
    keep = ("median_ms", "images_per_s", "tflops", "fraction_of_bf16_matmul", "fraction_of_roofline")
    providers = {
        name: {key: entry[key] for key in (*keep, "peak_allocated_bytes", "compile_mode") if key in entry}
        if "median_ms" in entry
        else entry
        for name, entry in run.get("providers", {}).items()
    }
    return {
        "config": run.get("config"),
        "model": run.get("model"),
        "input_shape": run.get("input_shape"),
        "dtype": run.get("dtype"),
        "flops": run.get("flops"),
        "roofline_floor_ms": run.get("roofline_floor_ms"),
        "parity": run.get("parity"),
        "providers": providers,
        "ratios": run.get("ratios"),
        **({"skipped": run["skipped"]} if "skipped" in run else {}),
        **({"error": run["error"]} if "error" in run else {}),
        **({"train": summarize_training(run["train"])} if "train" in run else {}),
        "stages": [
            {
                "index": stage["index"],
                "stage": stage["stage"],
                "floor_ms": stage["floor_ms"],
                "median_ms": {name: e.get("median_ms") for name, e in stage["providers"].items()},
                "ratios": stage.get("ratios", {}).get("fastunet", {}),
            }
            for stage in run.get("stages", [])
        ],
    }


def summarize_training(train: dict) -> dict:
    """The training step of one configuration: what a step is, the gradient check, and per provider the median ms
    per step, images/s, peak memory and first step (or why it was not timed)."""
    keep = ("median_ms", "images_per_s", "peak_allocated_bytes", "first_call_s", "compile_mode")
    providers = {
        name: {key: entry[key] for key in keep if key in entry} if "median_ms" in entry else entry
        for name, entry in train.get("providers", {}).items()
    }
    described = ("model", "input_shape", "precision", "loss", "optimizer", "gradient_budget", "gradients")
    return {key: train.get(key) for key in described} | {
        "fastunet_backend_reason": train.get("fastunet_backend_reason"),
        "providers": providers,
        "ratios": train.get("ratios"),
    }


def train_headline(runs: Sequence[dict]) -> list[dict]:
    """One row per configuration with a training step: the gradient check, each provider's median ms per step,
    fastunet's speedups."""
    rows = []
    for run in runs:
        train = run.get("train")
        if train is None:
            continue
        row: dict = {
            "config": run.get("config"),
            "dtype": run.get("dtype"),
            "batch": (train.get("input_shape") or [None])[0],
            "gradients_ok": (train.get("gradients") or {}).get("ok"),
        }
        for name in TRAIN_PROVIDERS:
            entry = train.get("providers", {}).get(name, {})
            row[f"{name}_ms"] = entry.get("median_ms")
            if "median_ms" not in entry and entry:
                row[f"{name}_status"] = entry.get("skipped") or entry.get("error")
        row |= (train.get("ratios") or {}).get("fastunet", {})
        rows.append(row)
    return rows


def headline(runs: Sequence[dict]) -> list[dict]:
    """One row per configuration: parity, each provider's median ms, fastunet's speedups."""
    rows = []
    for run in runs:
        providers = run.get("providers", {})
        row: dict = {
            "config": run.get("config"),
            "dtype": run.get("dtype"),
            "batch": (run.get("input_shape") or [None])[0],
            "parity_ok": (run.get("parity") or {}).get("ok"),
        }
        for name in HEADLINE_PROVIDERS:
            entry = providers.get(name, {})
            row[f"{name}_ms"] = entry.get("median_ms")
            if "median_ms" not in entry and entry:
                row[f"{name}_status"] = entry.get("skipped") or entry.get("error")
        row |= (run.get("ratios") or {}).get("fastunet", {})
        rows.append(row)
    return rows


def format_headline(rows: Sequence[dict], names: Sequence[str] = HEADLINE_PROVIDERS, check: str = "parity") -> str:
    """The headline rows as a small table (ms; x: fastunet's speedup over that provider); ``check``: the row's
    ``<check>_ok`` column (the training rows: ``gradients``)."""
    width = max(6, len(check))
    header = f"{'config':<22} {'dtype':<9} {check:<{width}} " + " ".join(f"{name:>26}" for name in names)
    lines = [header]
    for row in rows:
        cells = []
        for name in names:
            ms = row.get(f"{name}_ms")
            speedup = row.get(f"speedup_vs_{name.replace('-', '_')}")
            if ms is None:
                text = "-" if f"{name}_status" not in row else "not timed"
            else:
                text = f"{ms:.3f} ms" + (f" (x{speedup:.2f})" if speedup else "")
            cells.append(f"{text:>26}")
        parity = {True: "ok", False: "FAIL", None: "-"}[row.get(f"{check}_ok")]
        lines.append(f"{str(row['config']):<22} {str(row['dtype']):<9} {parity:<{width}} " + " ".join(cells))
    return "\n".join(lines)


# -- the record ------------------------------------------------------------------------------------------------------
def _load_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        return {"unreadable": f"{type(error).__name__}: {error}"}


def build_record(out_dir: str, own_stage: dict | None = None) -> dict:
    """The record of ``out_dir`` as it stands (plots drawn when bench.json has stage timings)."""
    bench = _load_json(os.path.join(out_dir, "bench.json"))
    env = _load_json(os.path.join(out_dir, "env.json"))
    bench_env = bench.get("environment", {})
    dry_run = str(bench.get("kind", "")).startswith("dry run")
    commit = env.get("commit") or bench_env.get("commit") or os.environ.get("FASTUNET_COMMIT") or None
    stages = read_stages(os.path.join(out_dir, "stages.tsv"))
    if own_stage is not None:
        stages.append(own_stage)
    runs = bench.get("runs", [])
    result = {
        "kind": "dry run of the GPU suite on a CPU: no timing here is a measurement"
        if dry_run
        else "GPU suite record (timings measured on the device named here)",
        "device": env.get("device") or bench_env.get("device"),
        "driver": env.get("driver"),
        "torch": env.get("torch") or bench_env.get("torch"),
        "triton": env.get("triton") or bench_env.get("triton"),
        "numpy": env.get("numpy"),
        "commit": commit,
        "commit_source": env.get("commit_source") or bench_env.get("commit_source"),
        "source_sha256": env.get("source_sha256"),
        "environment": env,
        "bench_environment": bench_env,
        "headline": headline(runs),
        "train_headline": train_headline(runs),
        "ceilings": bench.get("ceilings"),
        "ceilings_measured": bench.get("ceilings_measured"),
        "stages": stages,
        "tests": read_junit(os.path.join(out_dir, "tests-junit.xml")),
        "sanitizer_tests": read_junit(os.path.join(out_dir, "sanitizer-junit.xml")),
        "bench": [summarize_run(run) for run in runs],
        "bench_interrupted": bench.get("interrupted"),
        "bench_args": bench.get("args"),
    }
    if commit is None:
        result["commit_note"] = "no commit known: pass FASTUNET_COMMIT=<sha> to the suite (the copy has no .git)"
    result["plots"] = plot_results(bench, out_dir) if runs else {"backend": None, "files": []}
    result["plots"]["files"] = [os.path.basename(path) for path in result["plots"]["files"]]
    return result


def write_record(out_dir: str, result: dict) -> str:
    path = os.path.join(out_dir, "record.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(result, handle, indent=2, default=str)
        handle.write("\n")
    os.replace(tmp, path)
    return path


def record(out_dir: str) -> dict:
    """Build and write ``out_dir/record.json`` (plots included); returns it."""
    result = build_record(out_dir)
    write_record(out_dir, result)
    return result


# -- packing -------------------------------------------------------------------------------------------------------
def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _files_under(out_dir: str, names: Sequence[str]) -> list[str]:
    """Every file below ``names`` (entries of ``out_dir``), as paths relative to ``out_dir``."""
    found = []
    for name in names:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            for folder, _, files in os.walk(path):
                found += [os.path.relpath(os.path.join(folder, f), out_dir) for f in sorted(files)]
        else:
            found.append(name)
    return found


def pack(out_dir: str, max_files: int = MAX_FILES, max_file_bytes: int = MAX_FILE_MIB * 2**20) -> dict:
    """Leave at most ``max_files`` plain files in ``out_dir`` (``record.json`` counted, written after this), each at
    most ``max_file_bytes``: the ``KEEP`` files, as many PNGs as fit, and one tarball of everything else. A tarball
    left by an earlier pack is merged into the new one. Files that cannot fit even compressed are dropped, largest
    first, and listed. Returns the manifest that goes into ``record.json``."""
    if max_files < len(KEEP) + 1:
        raise ValueError(f"expected room for {len(KEEP) + 1} files at least, got max_files={max_files}")
    entries = sorted(os.listdir(out_dir))
    small = {name for name in entries if os.path.isfile(os.path.join(out_dir, name))}
    small = {name for name in small if _size(os.path.join(out_dir, name)) <= max_file_bytes}
    kept = ["record.json"] + [name for name in KEEP[1:] if name in small]
    pngs = [name for name in entries if name.endswith(".png") and name in small]
    room = max_files - len(kept) - 1  # one slot for the tarball
    kept += pngs[:room]
    rest = [name for name in entries if name not in kept and name != TARBALL and not name.endswith(".tmp")]
    previous = os.path.join(out_dir, TARBALL)
    members = _files_under(out_dir, rest)
    dropped: list[dict] = []
    tmp = os.path.join(out_dir, TARBALL + ".tmp")
    while True:
        with tarfile.open(tmp, "w:gz") as tar:
            if os.path.exists(previous):
                with tarfile.open(previous, "r:gz") as old:
                    for member in old.getmembers():
                        tar.addfile(member, old.extractfile(member) if member.isfile() else None)
            for member in members:
                tar.add(os.path.join(out_dir, member), arcname=member)
        if os.path.getsize(tmp) <= max_file_bytes or not members:
            break
        largest = max(members, key=lambda m: os.path.getsize(os.path.join(out_dir, m)))
        dropped.append({"name": largest, "bytes": os.path.getsize(os.path.join(out_dir, largest))})
        members.remove(largest)
    with tarfile.open(tmp, "r:gz") as tar:
        packed = [member.name for member in tar.getmembers() if member.isfile()]
    os.replace(tmp, previous)
    for name in rest:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    left = sorted(set(os.listdir(out_dir)) | {"record.json"})
    if len(left) > max_files:
        raise RuntimeError(f"packing left {len(left)} files in {out_dir}, expected at most {max_files}: {left}")
    return {
        "max_files": max_files,
        "max_file_bytes": max_file_bytes,
        "files": left,
        "tarball": TARBALL,
        "packed": packed,
        "dropped": dropped,
        "pngs_packed": [name for name in pngs if name not in kept],
    }


# -- command line ----------------------------------------------------------------------------------------------------
def _env_main(out_dir: str) -> int:
    os.makedirs(out_dir, exist_ok=True)
    env = collect_environment()
    with open(os.path.join(out_dir, "env.json"), "w") as handle:
        json.dump(env, handle, indent=2, default=str)
        handle.write("\n")
    print(json.dumps({k: env.get(k) for k in ("device", "driver", "torch", "triton", "numpy", "commit")}))
    if env.get("commit") is None:
        print("no commit known: pass FASTUNET_COMMIT=<sha> (a copy without .git cannot say)")
    record(out_dir)
    return 0


def _record_main(args: argparse.Namespace, started: float) -> int:
    own = None
    if args.stage_limit is not None:
        own = {"stage": "record", "seconds": 0, "limit_s": args.stage_limit, "exit_status": 0, "timed_out": False}
        own |= {"ok": True, "note": "its own row, written before the stage ended"}
    result = build_record(args.out_dir, own)
    if args.pack:
        if own is not None:
            own["seconds"] = round(time.perf_counter() - started)
        write_record(args.out_dir, result)  # packed into nothing: record.json stays beside the tarball
        result["packing"] = pack(args.out_dir, args.max_files, int(args.max_file_mib * 2**20))
    if own is not None:
        own["seconds"] = round(time.perf_counter() - started)
    write_record(args.out_dir, result)
    failed = [stage["stage"] for stage in result["stages"] if stage.get("ok") is False]
    tests = result["tests"] or {}
    print(f"\n== GPU suite record ({result['kind']}) ==")
    print(f"device {result['device']}  driver {result['driver']}  torch {result['torch']}  triton {result['triton']}")
    print(f"commit {result['commit']} ({result['commit_source']})  source sha256 {result['source_sha256']}")
    for stage in result["stages"]:
        status = stage.get("status") or f"exit {stage.get('exit_status')}"
        print(f"  stage {stage['stage']:<10} {status:<16} {stage['seconds']:>4} s of {stage['limit_s']} s")
    if tests:
        print(
            f"tests: {tests.get('passed')} passed, {tests.get('failures')} failed, {tests.get('errors')} errors, "
            f"{tests.get('skipped')} skipped in {tests.get('time_s', 0.0):.0f} s"
        )
        for name in tests.get("failed", []):
            print(f"  FAILED {name}")
    if result["headline"]:
        print(format_headline(result["headline"]))
    if result["train_headline"]:
        print("training step (ms per step: forward, loss, backward, AdamW step; x: fastunet's speedup)")
        print(format_headline(result["train_headline"], TRAIN_PROVIDERS, check="gradients"))
    print(f"plots {result['plots']['backend']}: {', '.join(result['plots']['files']) or 'none'}")
    if "packing" in result:
        print(f"{len(result['packing']['files'])} files in {args.out_dir}: {', '.join(result['packing']['files'])}")
    print(f"failed stages: {', '.join(failed) or 'none'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("env", "record", "digest", "-h", "--help"):
        argv.insert(0, "record")  # the old form: suite_record.py OUTDIR
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    env = commands.add_parser("env", help="versions, driver and device into OUTDIR/env.json and record.json")
    env.add_argument("out_dir", metavar="OUTDIR")
    rec = commands.add_parser("record", help="OUTDIR/record.json and the plots; --pack: at most 8 files")
    rec.add_argument("out_dir", metavar="OUTDIR")
    rec.add_argument("--pack", action="store_true", help="pack everything but the main files into one tarball")
    rec.add_argument("--max-files", type=int, default=MAX_FILES, help="files left in OUTDIR (default %(default)s)")
    rec.add_argument("--max-file-mib", type=float, default=MAX_FILE_MIB, help="size limit of each (default 16)")
    rec.add_argument("--stage-limit", type=int, help="this stage's time limit: add its own row to the stages")
    commands.add_parser("digest", help="print the source digest of this tree (compare with a record's)")
    args = parser.parse_args(argv)
    if args.command == "digest":
        print(source_digest())
        return 0
    if args.command == "env":
        return _env_main(args.out_dir)
    return _record_main(args, started)


if __name__ == "__main__":
    sys.exit(main())
