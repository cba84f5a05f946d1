#!/usr/bin/env bash
# One call on a lent GPU machine, inside 9 minutes, leaving at most 8 files in OUTDIR:
#
#   FASTUNET_COMMIT=<sha> bash bench/gpu_suite.sh OUTDIR      # OUTDIR default: bench/results/<date>-gpu-suite
#
# The stages, in this order, each under its own time limit (cut so the whole run ends by SUITE_BUDGET_S, default
# 530 s, keeping RECORD_S for the record stage):
#   env        versions, driver and device into env.json and a first record.json (a cold CUDA import can be slow)
#   install    pip install --no-deps --no-build-isolation --no-index -e .   (offline)
#   bench      the headline first: the reference config in bf16 at batch 16, then batch 1: parity, fastunet and
#              eager PyTorch (whole network); then a training step of the reference config in bf16 at batch 16
#              (fastunet, eager; gradients checked against eager first), each stage alone, then torch.compile
#              (default: the forward, the training step, the stages), then max-autotune only when enough of the stage
#              remains; one torch.profiler trace per provider
#   tests      the test suite on CUDA with one xdist worker per spare core (gpu-marked TF32/bf16 tests included;
#              the CPU tooling tests that CI runs, marked `tooling`, are left out)
#   sanitizer  compute-sanitizer memcheck over the small-shape kernel tests (after the tests: a warm kernel cache)
#   record     record.json (device, versions, commit, headline, times, ratios, stage statuses with its own, test
#              counts), the PNG plots, then the packing: record.json, bench.json, tests-junit.xml, the PNGs and
#              rest.tar.gz (logs, stages.tsv, env.json, profiler traces, sanitizer results)
# Stages run under `timeout -s INT`, so pytest still writes its JUnit XML and summary and run_gpu.py its JSON and
# tables. A stage that fails or times out is recorded and the next one still runs. Exit status 1 when any failed.
#
#   STAGES="env install bench record" bash bench/gpu_suite.sh OUTDIR         # a subset
#   DRY_RUN=1 bash bench/gpu_suite.sh /tmp/dry                             # every stage on a CPU machine
#
# DRY_RUN=1 runs the same stages on a machine without a GPU, as far as they can go there: the kernels under
# Triton's interpreter, `pip install --dry-run`, a small test selection, run_gpu.py --dry-run (shrunken configs,
# wall-clock placeholders that are not timings), compute-sanitizer only where one is found (COMPUTE_SANITIZER names
# one), and the same record and packing. SUITE_TESTS replaces the test selection of the tests and sanitizer stages
# (space-separated pytest arguments); BENCH_ARGS adds options to run_gpu.py.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${1:-bench/results/$(date -u +%Y-%m-%d)-gpu-suite}"
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY="${PYTHON:-python3}"
BUDGET="${SUITE_BUDGET_S:-530}"
RECORD_S="${RECORD_S:-30}"
DRY_RUN="${DRY_RUN:-0}"
MAX_FILES=8
KILL_AFTER=10
read -r -a stages <<< "${STAGES:-env install bench tests sanitizer record}"
read -r -a extra_bench <<< "${BENCH_ARGS:-}"
export PYTHONUNBUFFERED=1
[ -n "${FASTUNET_COMMIT:-}" ] && export FASTUNET_COMMIT  # else the records ask git, or say the commit is unknown
if [ "$DRY_RUN" = 1 ]; then
  export TRITON_INTERPRET=1
else
  unset TRITON_INTERPRET
fi
status=0
: > "$OUT/stages.tsv"

cut_limit() {  # nominal limit -> what the budget allows, keeping RECORD_S for the record stage
  local left=$((BUDGET - SECONDS - RECORD_S - KILL_AFTER))
  if [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}

run_stage() {  # name, limit in seconds, command...
  local name=$1 limit=$2
  shift 2
  if [ "$limit" -lt 10 ]; then
    echo "=== $name: skipped (suite time budget spent) ==="
    printf '%s\tskipped: time budget\t0\t0\n' "$name" >> "$OUT/stages.tsv"
    status=1
    return 0
  fi
  echo "=== $name (limit ${limit}s, ${SECONDS}s elapsed) ==="
  local start=$SECONDS
  timeout -s INT --kill-after="$KILL_AFTER" "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start))s ==="
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >> "$OUT/stages.tsv"
  [ "$rc" -ne 0 ] && status=1
  return 0
}

find_sanitizer() {  # prints the path of compute-sanitizer, or nothing
  local candidate
  for candidate in "${COMPUTE_SANITIZER:-}" "$(command -v compute-sanitizer 2>/dev/null)" \
      /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer \
      /usr/local/cuda-*/bin/compute-sanitizer /usr/local/cuda-*/compute-sanitizer/compute-sanitizer \
      /opt/nvidia/*/compute-sanitizer/compute-sanitizer; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then
      echo "$candidate"
      return 0
    fi
  done
  # The nvidia-cuda-sanitizer-api wheel ships it inside site-packages.
  $PY -c 'import glob, site
roots = site.getsitepackages() + [site.getusersitepackages()]
found = [p for r in roots for p in sorted(glob.glob(r + "/nvidia/*/compute-sanitizer/compute-sanitizer"))]
print(found[0] if found else "")' 2>/dev/null
}

fallback_pack() {  # the record stage did not pack: keep the main files and PNGs, tar the rest
  local keep=() rest=() name
  for name in record.json bench.json tests-junit.xml; do
    [ -f "$OUT/$name" ] && keep+=("$name")
  done
  while IFS= read -r name; do
    [ "${#keep[@]}" -lt $((MAX_FILES - 1)) ] && keep+=("$name")
  done < <(cd "$OUT" && ls -1 -- *.png 2>/dev/null)
  while IFS= read -r name; do
    [[ " ${keep[*]} " == *" $name "* ]] || rest+=("$name")
  done < <(cd "$OUT" && ls -1A)
  [ "${#rest[@]}" -eq 0 ] && return 0
  tar -czf "$OUT/.rest.tar.gz" -C "$OUT" -- "${rest[@]}" && (cd "$OUT" && rm -rf -- "${rest[@]}") &&
    mv "$OUT/.rest.tar.gz" "$OUT/rest.tar.gz"
}

workers=$(( $(nproc) - 2 ))
[ "$workers" -gt 14 ] && workers=14
[ "$workers" -lt 2 ] && workers=0
pytest_opts=(-q -p no:cacheprovider -rfE --continue-on-collection-errors)
$PY -c "import pytest_timeout" 2>/dev/null && pytest_opts+=(--timeout=120)
xdist=()
$PY -c "import xdist" 2>/dev/null && xdist=(-n "$workers")
if [ -n "${SUITE_TESTS:-}" ]; then
  read -r -a test_args <<< "$SUITE_TESTS"
  sanitizer_args=("${test_args[@]}")
elif [ "$DRY_RUN" = 1 ]; then
  test_args=(tests/test_conv.py -k "bias_relu_matches and fp32")
  sanitizer_args=("${test_args[@]}")
else
  test_args=()
  sanitizer_args=(tests/test_conv.py -k "not int64 and not thorough")
fi

for stage in "${stages[@]}"; do
  case "$stage" in
    env)
      run_stage env "$(cut_limit 45)" bash -c \
        'nvidia-smi || echo "nvidia-smi: not available"; exec "$0" bench/suite_record.py env "$1"' "$PY" "$OUT"
      ;;
    install)
      pip_args=(install -q --no-deps --no-build-isolation --no-index -e .)
      [ "$DRY_RUN" = 1 ] && pip_args=(install -q --dry-run --no-deps --no-build-isolation --no-index -e .)
      run_stage install "$(cut_limit 45)" "$PY" -m pip "${pip_args[@]}"
      ;;
    bench)
      limit=$(cut_limit 240)
      budget_s=$((limit - 30 > 10 ? limit - 30 : 10))  # imports, the final tables and the JSON fit in the rest
      bench_args=(--configs ref-bilinear-b16 ref-bilinear-b1 --dtypes bfloat16 --quick --time-budget-s "$budget_s"
                  --train ref-bilinear-b16 --json "$OUT/bench.json" --profile "$OUT/profile")
      [ "$DRY_RUN" = 1 ] && bench_args+=(--dry-run)
      run_stage bench "$limit" "$PY" bench/run_gpu.py "${bench_args[@]}" "${extra_bench[@]}"
      ;;
    tests)
      run_stage tests "$(cut_limit 240)" "$PY" -m pytest "${pytest_opts[@]}" "${xdist[@]}" --durations=30 \
        -m "not slow and not tooling" --junitxml="$OUT/tests-junit.xml" "${test_args[@]}"
      ;;
    sanitizer)
      sanitizer=$(find_sanitizer)
      if [ -z "$sanitizer" ]; then
        if [ "$DRY_RUN" = 1 ]; then
          echo "=== sanitizer: compute-sanitizer not found (dry run: not a failure) ==="
          printf 'sanitizer\tnot run: no compute-sanitizer (dry run)\t0\t0\n' >> "$OUT/stages.tsv"
        else
          echo "=== sanitizer: compute-sanitizer not found (PATH, /usr/local/cuda*, site-packages/nvidia) ==="
          printf 'sanitizer\tnot found\t0\t0\n' >> "$OUT/stages.tsv"
          status=1
        fi
      else
        # --report-api-errors no: CUDA API probes that fail by design (driver entry points, peer access) are not
        # memory errors; out-of-bounds and misaligned accesses still exit with status 9.
        run_stage sanitizer "$(cut_limit 75)" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck \
          --report-api-errors no --error-exitcode 9 "$PY" -m pytest "${pytest_opts[@]}" -p no:xdist \
          -m "not slow and not tooling" --junitxml="$OUT/sanitizer-junit.xml" "${sanitizer_args[@]}"
      fi
      ;;
    record)
      left=$((BUDGET - SECONDS))
      limit=$((left > RECORD_S ? left : RECORD_S))
      echo "=== record (limit ${limit}s, ${SECONDS}s elapsed) ==="
      # No log file: the record stage packs the folder, and its summary is the last thing printed.
      timeout -s INT --kill-after=5 "$limit" "$PY" bench/suite_record.py record "$OUT" --pack \
        --max-files "$MAX_FILES" --stage-limit "$limit"
      rc=$?
      echo "=== record: exit $rc ==="
      [ "$rc" -ne 0 ] && status=1
      ;;
    *)
      echo "unknown stage $stage (env, install, bench, tests, sanitizer, record)" >&2
      status=2
      ;;
  esac
done

count=$(find "$OUT" -mindepth 1 -maxdepth 1 | wc -l)
if [ "$count" -gt "$MAX_FILES" ]; then
  echo "gpu_suite: $count entries in $OUT: packing all but the main files into rest.tar.gz"
  fallback_pack
  count=$(find "$OUT" -mindepth 1 -maxdepth 1 | wc -l)
fi
if [ "$count" -gt "$MAX_FILES" ] || [ -n "$(find "$OUT" -mindepth 1 -maxdepth 1 ! -type f)" ]; then
  echo "gpu_suite: $OUT holds $count entries, not at most $MAX_FILES plain files" >&2
  status=1
fi
echo "gpu_suite: ${SECONDS}s in all (budget ${BUDGET}s); $count files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exit $status
