#!/usr/bin/env bash
# One call on a lent GPU machine, inside 9 minutes: install from the source tree (offline), the test suite on CUDA,
# compute-sanitizer's memcheck over the small-shape kernel tests, the bench (device ceilings, parity, every provider
# on the reference config, each stage alone, a torch.profiler trace per provider), then a JSON record and PNG plots.
#
#   bash bench/gpu_suite.sh OUTDIR                 # OUTDIR default: bench/results/<date>-gpu-suite
#   STAGES="env install bench record" bash bench/gpu_suite.sh OUTDIR     # a subset
#
# Each stage has its own time limit, cut further so the whole run ends by SUITE_BUDGET_S (default 530 s); a stage
# that fails or times out is recorded and the next one still runs. OUTDIR gets <stage>.log, tests-junit.xml,
# bench.json (run_gpu.py's results), profile/ (Chrome traces), *.png and record.json (device, versions, commit,
# configuration, times, ratios, ceilings, stage statuses, plots). Exit status 1 when any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${1:-bench/results/$(date -u +%Y-%m-%d)-gpu-suite}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET="${SUITE_BUDGET_S:-530}"
read -r -a stages <<< "${STAGES:-env install tests sanitizer bench record}"
export PYTHONUNBUFFERED=1
export FASTUNET_COMMIT="${FASTUNET_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
unset TRITON_INTERPRET
status=0
: > "$OUT/stages.tsv"

run_stage() {  # name, limit in seconds, command...
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS - 5))
  if [ "$left" -lt 10 ]; then
    echo "=== $name: skipped (suite time budget spent) ==="
    printf '%s\tskipped\t0\t0\n' "$name" >> "$OUT/stages.tsv"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s, ${SECONDS}s elapsed) ==="
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start))s ==="
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >> "$OUT/stages.tsv"
  [ "$rc" -ne 0 ] && status=1
  return 0
}

xdist=()
$PY -c "import xdist" 2>/dev/null && xdist=(-n 4)

for stage in "${stages[@]}"; do
  case "$stage" in
    env)
      run_stage env 20 bash -c "nvidia-smi; $PY -c 'import torch, triton, numpy; print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"numpy\", numpy.__version__, torch.cuda.get_device_name())'"
      ;;
    install)
      run_stage install 60 $PY -m pip install -q --no-deps --no-build-isolation --no-index -e .
      ;;
    tests)
      # The whole suite, compiled kernels on the GPU (the gpu-marked TF32/bf16 tests included).
      run_stage tests 150 $PY -m pytest -q "${xdist[@]}" -p no:cacheprovider --junitxml="$OUT/tests-junit.xml"
      ;;
    sanitizer)
      sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
      if [ -z "$sanitizer" ]; then
        echo "compute-sanitizer not found" | tee "$OUT/sanitizer.log"
        printf 'sanitizer\tnot found\t0\t0\n' >> "$OUT/stages.tsv"
        status=1
      else
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_stage sanitizer 90 "$sanitizer" --tool memcheck --error-exitcode 9 \
          $PY -m pytest -q -p no:cacheprovider tests/test_conv.py -k "not int64 and not thorough"
      fi
      ;;
    bench)
      left=$((BUDGET - SECONDS - 60))
      run_stage bench 200 $PY bench/run_gpu.py --configs ref-bilinear-b1 --dtypes float16 --quick \
        --time-budget-s "$((left > 200 ? 140 : left * 7 / 10))" --json "$OUT/bench.json" --profile "$OUT/profile"
      ;;
    record)
      run_stage record 30 $PY bench/suite_record.py "$OUT"
      ;;
    *)
      echo "unknown stage $stage (env, install, tests, sanitizer, bench, record)" >&2
      status=2
      ;;
  esac
done
echo "gpu_suite: ${SECONDS}s in all; results in $OUT"
exit $status
