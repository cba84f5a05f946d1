"""Calibrate the issue model against a recorded GPU run: each launch's measured kernel time next to its modeled time.

Inputs, all from files (no GPU needed):

* the compile report's JSON (``python -m bench.compile_report --arch sm_90 --json M``) built **at the commit the GPU
  run timed**, so the model describes the kernels that ran;
* the run's torch.profiler Chrome traces of one fastunet forward (``profile/*-fastunet.trace.json`` in a GPU suite
  record's ``rest.tar.gz``), one per batch size: the GPU-side duration of each kernel, in launch order, without
  the host's launch overhead (which the suite's per-stage medians at batch 1 are dominated by).

Output: one row per launch (model's tensor, issue and memory times, the modeled time, the measured time and their
ratio) and ``eta`` fitted with :func:`fastunet.tooling.issue_model.fit_eta` over the launches the model calls
issue-bound. The result goes to ``bench/calibration/`` and the fit into ``ETA_FITS``::

    python -m bench.calibrate --model M.json --trace 16=b16.trace.json --trace 1=b1.trace.json \\
        --gpu "H200 SXM" --commit 3587097 --run bench/results/2026-11-29-h200-gpu-suite --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from fastunet.tooling import issue_model


def kernel_durations(trace: dict) -> list[tuple[str, float]]:
    """(kernel name, duration in us) of each GPU kernel of a Chrome trace, in start order."""
    events = [e for e in trace.get("traceEvents", ()) if e.get("cat") == "kernel" and "dur" in e]
    events.sort(key=lambda e: e["ts"])
    return [(e["name"], float(e["dur"])) for e in events]


def _same_kernel(modeled: str, launched: str) -> bool:
    """A modeled launch (``conv3x3+pool``, ``upsample2x``...) and a traced kernel name name the same kind of launch."""
    return ("upsample" in modeled) == ("upsample" in launched)


def rows_for(model: dict, durations: list[tuple[str, float]]) -> list[dict]:
    """Pair a modeled forward's launches with a trace's kernels, in order. Raises ValueError when they differ in
    number or kind (a trace of another configuration or commit)."""
    layers = model["layers"]
    if len(layers) != len(durations):
        raise ValueError(
            f"batch {model['batch']}: the model has {len(layers)} launches, the trace {len(durations)} kernels; "
            "expected a trace of exactly one forward of the modeled configuration"
        )
    rows = []
    for layer, (name, measured) in zip(layers, durations, strict=True):
        if not _same_kernel(layer["kernel"], name):
            raise ValueError(f"launch {layer['stage']}: the model has {layer['kernel']!r}, the trace {name!r}")
        rows.append(
            {
                "batch": model["batch"],
                "stage": layer["stage"],
                "kernel": layer["kernel"],
                "traced_kernel": name,
                "bound": layer["bound"],
                "tensor_us": layer["tensor_us"],
                "issue_us": layer["issue_us"],  # before dividing by eta
                "memory_us": layer["memory_us"],
                "model_us": layer["time_us"],
                "measured_us": measured,
                "measured_over_model": measured / layer["time_us"] if layer["time_us"] else None,
            }
        )
    return rows


def fit(rows: list[dict]) -> float | None:
    """``eta`` over the rows (see :func:`~fastunet.tooling.issue_model.fit_eta`)."""
    return issue_model.fit_eta(
        [r["issue_us"] for r in rows],
        [r["measured_us"] for r in rows],
        [max(r["tensor_us"], r["memory_us"]) for r in rows],
    )


def summary(rows: list[dict]) -> dict:
    """Per batch and bound: how many launches, the median and range of measured / modeled time."""
    out: dict[str, dict] = {}
    for batch in sorted({r["batch"] for r in rows}):
        for bound in sorted({r["bound"] for r in rows if r["batch"] == batch}):
            ratios = [r["measured_over_model"] for r in rows if r["batch"] == batch and r["bound"] == bound]
            out[f"batch {batch}, {bound}-bound"] = {
                "launches": len(ratios),
                "median_measured_over_model": statistics.median(ratios),
                "min": min(ratios),
                "max": max(ratios),
            }
        measured = sum(r["measured_us"] for r in rows if r["batch"] == batch)
        modeled = sum(r["model_us"] for r in rows if r["batch"] == batch)
        out[f"batch {batch}, all kernels"] = {"measured_us": measured, "model_us": modeled, "ratio": measured / modeled}
    return out


def _trace_arg(text: str) -> tuple[int, str]:
    batch, sep, path = text.partition("=")
    if not sep or not batch.isdigit():
        raise argparse.ArgumentTypeError(f"expected BATCH=PATH, got {text!r}")
    return int(batch), path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="compile report JSON built at the run's commit")
    parser.add_argument("--trace", type=_trace_arg, action="append", required=True, help="BATCH=Chrome trace")
    parser.add_argument("--gpu", required=True)
    parser.add_argument("--commit", required=True, help="the commit the GPU run timed")
    parser.add_argument("--run", required=True, help="the recorded run (a bench/results path)")
    parser.add_argument("--json", help="write the calibration here")
    args = parser.parse_args(argv)
    with open(args.model) as f:
        report = json.load(f)
    models = {m["batch"]: m for m in report["model"]}
    rows: list[dict] = []
    for batch, path in args.trace:
        if batch not in models:
            parser.error(f"the model has batches {sorted(models)}, not {batch}")
        with open(path) as f:
            rows += rows_for(models[batch], kernel_durations(json.load(f)))
    eta = fit(rows)
    result = {
        "kind": "issue model against measured kernel times of a recorded GPU run",
        "gpu": args.gpu,
        "commit": args.commit,
        "run": args.run,
        "model_triton": report.get("triton"),
        "model_arch": report.get("arch"),
        "model_assumptions": report.get("model_assumptions"),
        "eta": eta,
        "eta_launches": [
            f"batch {r['batch']} {r['stage']}"
            for r in rows
            if r["issue_us"] > max(r["tensor_us"], r["memory_us"]) and r["measured_us"] > 0
        ],
        "summary": summary(rows),
        "rows": rows,
    }
    text = json.dumps(result, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    for row in rows:
        print(
            f"batch {row['batch']:>2} {row['stage']:<17} {row['bound']:<7} model {row['model_us']:8.1f} us "
            f"measured {row['measured_us']:8.1f} us  x{row['measured_over_model']:.2f}"
        )
    for key, value in result["summary"].items():
        print(key, value)
    print("eta:", eta, "from", ", ".join(result["eta_launches"]) or "no issue-bound launch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
