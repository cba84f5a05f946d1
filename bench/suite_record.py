"""The JSON record and PNG plots of one ``bench/gpu_suite.sh`` run.

Reads what the suite's stages left in OUTDIR (``stages.tsv``, ``tests-junit.xml``, ``bench.json``) and writes
``OUTDIR/record.json``: device, torch/triton versions, commit, configuration, times and ratios per provider and per
stage, the measured ceilings, the status of every stage and the test counts, and the plots (speedup per stage,
roofline with each stage on it) with the backend that drew them::

    python bench/suite_record.py OUTDIR
"""

from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence

from plots import plot_results


def read_stages(path: str) -> list[dict]:
    """``stages.tsv`` rows (name, exit status, seconds, limit) as dicts; a timeout shows as exit status 124/137."""
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
            else:
                entry["status"], entry["ok"] = rc, False
            rows.append(entry)
    return rows


def read_junit(path: str) -> dict | None:
    """Test counts from a pytest JUnit XML file (None when there is none)."""
    if not os.path.exists(path):
        return None
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    counts["time_s"] = sum(float(suite.get("time", 0.0)) for suite in suites)
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


def record(out_dir: str) -> dict:
    """Build and write ``out_dir/record.json`` (plots included); returns it."""
    bench_path = os.path.join(out_dir, "bench.json")
    bench: dict = {}
    if os.path.exists(bench_path):
        with open(bench_path) as handle:
            bench = json.load(handle)
    env = bench.get("environment", {})
    result = {
        "kind": "GPU suite record (timings measured on the device named here)",
        "device": env.get("device"),
        "environment": env,
        "torch": env.get("torch"),
        "triton": env.get("triton"),
        "commit": env.get("commit") or os.environ.get("FASTUNET_COMMIT"),
        "ceilings": bench.get("ceilings"),
        "ceilings_measured": bench.get("ceilings_measured"),
        "stages": read_stages(os.path.join(out_dir, "stages.tsv")),
        "tests": read_junit(os.path.join(out_dir, "tests-junit.xml")),
        "bench": [summarize_run(run) for run in bench.get("runs", [])],
        "bench_args": bench.get("args"),
    }
    result["plots"] = plot_results(bench, out_dir) if bench else {"backend": None, "files": []}
    result["plots"]["files"] = [os.path.basename(path) for path in result["plots"]["files"]]
    with open(os.path.join(out_dir, "record.json"), "w") as handle:
        json.dump(result, handle, indent=2)
        handle.write("\n")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python bench/suite_record.py OUTDIR", file=sys.stderr)
        return 2
    result = record(argv[0])
    failed = [stage["stage"] for stage in result["stages"] if not stage["ok"]]
    print(f"record.json: {len(result['bench'])} bench runs, plots {result['plots']}, failed stages {failed or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
