"""The one-call GPU suite without a GPU: its packing (what comes back from a lent machine is at most 8 files of at
most 16 MiB), its dry run through every stage on the CPU, and the environment stage's record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def suite_record(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import suite_record

    return suite_record


def _listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def _suite_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "TRITON_", "FASTUNET_"))}
    return env | {"PYTHON": sys.executable} | extra


def test_pack_keeps_the_main_files_and_tars_the_rest(suite_record, tmp_path):
    """Six PNGs, logs, a profile folder, an earlier tarball and a file too large to come back: record.json,
    bench.json, tests-junit.xml, four PNGs and one tarball stay; the other PNGs, the logs, the traces and the earlier
    tarball's members go into the tarball; what cannot fit even compressed is dropped and named."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("bench.json", "tests-junit.xml", "record.json", "stages.tsv", "env.json", "bench.log"):
        (out / name).write_text(name)
    pngs = [f"c{i}-speedup.png" for i in range(6)]
    for name in pngs:
        (out / name).write_bytes(b"\x89PNG" + name.encode())
    (out / "profile").mkdir()
    (out / "profile" / "a.trace.json").write_text("{}" * 100)
    (out / "huge.log").write_bytes(os.urandom(64 * 1024))  # incompressible, over the limit below
    with tarfile.open(out / "rest.tar.gz", "w:gz") as tar:
        earlier = tmp_path / "earlier.log"
        earlier.write_text("from an earlier pack")
        tar.add(earlier, arcname="earlier.log")

    manifest = suite_record.pack(str(out), max_files=8, max_file_bytes=32 * 1024)

    kept = ["bench.json", *pngs[:4], "record.json", "rest.tar.gz", "tests-junit.xml"]
    assert _listing(out) == sorted(kept) == manifest["files"]
    assert manifest["pngs_packed"] == pngs[4:]
    assert manifest["dropped"] == [{"name": "huge.log", "bytes": 64 * 1024}]
    with tarfile.open(out / "rest.tar.gz") as tar:
        members = sorted(tar.getnames())
    expected = ["bench.log", "earlier.log", "env.json", *pngs[4:], "profile/a.trace.json", "stages.tsv"]
    assert members == sorted(expected) == sorted(manifest["packed"])
    assert os.path.getsize(out / "rest.tar.gz") <= 32 * 1024


def test_pack_refuses_too_few_files(suite_record, tmp_path):
    with pytest.raises(ValueError, match="room for 4 files at least, got max_files=3"):
        suite_record.pack(str(tmp_path), max_files=3)


def test_stage_rows(suite_record, tmp_path):
    (tmp_path / "stages.tsv").write_text(
        "env\t0\t3\t45\ntests\t124\t150\t150\nbench\t137\t210\t210\nsanitizer\tnot found\t0\t0\n"
        "sanitizer\tnot run: no compute-sanitizer (dry run)\t0\t0\ntests\tskipped: time budget\t0\t0\n"
    )
    rows = suite_record.read_stages(str(tmp_path / "stages.tsv"))
    assert [(r["stage"], r["ok"]) for r in rows] == [
        ("env", True), ("tests", False), ("bench", False), ("sanitizer", False), ("sanitizer", None), ("tests", False)
    ]  # fmt: skip
    assert [r.get("timed_out") for r in rows[:3]] == [False, True, True]


def test_commit_from_the_environment(suite_record, monkeypatch):
    monkeypatch.setenv("FASTUNET_COMMIT", "0123abc")
    assert suite_record.commit_info() == {"commit": "0123abc", "commit_source": "FASTUNET_COMMIT", "dirty": None}
    monkeypatch.delenv("FASTUNET_COMMIT")
    monkeypatch.setattr(suite_record, "_git", lambda *args: None)  # a copy without .git
    info = suite_record.commit_info()
    assert info["commit"] is None and "FASTUNET_COMMIT" in info["commit_source"]


def test_source_digest_follows_the_sources(suite_record, tmp_path):
    for folder in ("fastunet", "bench/results"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text("[project]")
    (tmp_path / "fastunet" / "a.py").write_text("x = 1")
    first = suite_record.source_digest(tmp_path)
    (tmp_path / "bench" / "results" / "run.json").write_text("{}")  # results are not source
    assert suite_record.source_digest(tmp_path) == first
    (tmp_path / "fastunet" / "a.py").write_text("x = 2")
    assert suite_record.source_digest(tmp_path) != first


@pytest.mark.tooling
def test_dry_run_goes_through_every_stage_and_packs(tmp_path):
    """``DRY_RUN=1 bash bench/gpu_suite.sh OUT`` on the CPU: every stage runs as far as a CPU allows (the bench's
    dry run on shrunken configs with two providers and the training step of the batch-16 one, a small test
    selection, a stand-in compute-sanitizer that checks its options and runs the command), the record names the
    commit given in the environment, and the folder holds at most 8 plain files: record.json, bench.json,
    tests-junit.xml, 4 PNGs and rest.tar.gz."""
    out, argv_file = tmp_path / "out", tmp_path / "sanitizer-argv"
    sanitizer = tmp_path / "compute-sanitizer"
    sanitizer.write_text(
        "#!/usr/bin/env bash\n"
        'echo "$@" > "$SANITIZER_ARGV"\n'
        'while [ $# -gt 0 ] && [[ "$1" == --* ]]; do shift 2; done\n'
        'exec "$@"\n'
    )
    sanitizer.chmod(0o755)
    env = _suite_env(
        DRY_RUN="1",
        FASTUNET_COMMIT="feedc0ffee",
        COMPUTE_SANITIZER=str(sanitizer),
        SANITIZER_ARGV=str(argv_file),
        SUITE_TESTS="tests/test_tolerances.py",
        BENCH_ARGS="--providers fastunet torch-eager --stage-providers fastunet torch-eager --no-fp64",
    )
    proc = subprocess.run(
        ["bash", "bench/gpu_suite.sh", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail

    files = _listing(out)
    pngs = [name for name in files if name.endswith(".png")]
    assert len(files) <= 8 and all((out / name).is_file() for name in files), files
    assert set(files) - set(pngs) == {"record.json", "bench.json", "tests-junit.xml", "rest.tar.gz"}
    assert len(pngs) == 4  # speedup and roofline of both headline configs

    record = json.loads((out / "record.json").read_text())
    assert record["kind"].startswith("dry run") and record["commit"] == "feedc0ffee"
    assert record["commit_source"] == "FASTUNET_COMMIT" and len(record["source_sha256"]) == 64
    assert record["torch"] and record["triton"] and record["numpy"] and "driver" in record
    stages = [(s["stage"], s["ok"]) for s in record["stages"]]
    assert stages == [("env", True), ("install", True), ("bench", True), ("tests", True), ("sanitizer", True),
                      ("record", True)]  # fmt: skip
    assert record["tests"]["passed"] > 0 and record["tests"]["failures"] == 0
    assert record["sanitizer_tests"]["passed"] == record["tests"]["passed"]
    assert [row["config"] for row in record["headline"]] == ["ref-bilinear-b16-dry", "ref-bilinear-b1-dry"]
    assert all(row["parity_ok"] and row["fastunet_ms"] and row["torch-eager_ms"] for row in record["headline"])
    (train,) = record["train_headline"]  # --train ref-bilinear-b16: the batch-16 config only
    assert (train["config"], train["batch"], train["gradients_ok"]) == ("ref-bilinear-b16-dry", 2, True)
    assert train["fastunet_ms"] and train["torch-eager_ms"] and train["torch-compile_ms"] is None
    (summary,) = [run for run in record["bench"] if "train" in run]
    assert summary["train"]["fastunet_backend_reason"].endswith("; backward kernels")
    assert "training step" in proc.stdout and "gradients" in proc.stdout
    assert record["plots"]["backend"] in ("matplotlib", "builtin") and sorted(record["plots"]["files"]) == pngs
    assert argv_file.read_text().split()[:6] == ["--tool", "memcheck", "--report-api-errors", "no",
                                                 "--error-exitcode", "9"]  # fmt: skip

    with tarfile.open(out / "rest.tar.gz") as tar:
        members = set(tar.getnames())
    for name in ("env.json", "stages.tsv", "env.log", "install.log", "bench.log", "tests.log", "sanitizer.log",
                 "sanitizer-junit.xml"):  # fmt: skip
        assert name in members, (name, members)
    assert any(name.startswith("profile/") and name.endswith(".trace.json") for name in members)
    assert "profile/ref-bilinear-b16-dry-bfloat16-train-fastunet.trace.json" in members
    assert "8 files" in proc.stdout or f"{len(files)} files" in proc.stdout


def test_env_stage_alone_records_versions_and_the_folder_still_packs(tmp_path):
    """The env stage by itself leaves a record.json with the versions (whatever fails later), and a folder left with
    more than 8 entries without a record stage is packed by the script itself."""
    out = tmp_path / "out"
    out.mkdir()
    for i in range(9):
        (out / f"left-over-{i}.log").write_text(str(i))
    proc = subprocess.run(
        ["bash", "bench/gpu_suite.sh", str(out)],
        cwd=ROOT,
        env=_suite_env(STAGES="env", DRY_RUN="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert _listing(out) == ["record.json", "rest.tar.gz"]
    record = json.loads((out / "record.json").read_text())
    import numpy
    import torch
    import triton

    assert (record["torch"], record["triton"], record["numpy"]) == (
        torch.__version__,
        triton.__version__,
        numpy.__version__,
    )
    assert record["environment"]["cuda_available"] == torch.cuda.is_available()
    with tarfile.open(out / "rest.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"left-over-{i}.log" for i in range(9)} | {"env.json", "env.log", "stages.tsv"} <= names
