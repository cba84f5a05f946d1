#!/usr/bin/env bash
# GPU verification in as few machine calls as possible: install from the source tree (offline), the whole test
# suite on CUDA, the whole-network benchmark against eager PyTorch and torch.compile, and compute-sanitizer's
# memcheck over the small-shape kernel tests. Each stage has its own time limit; logs and JSON go to $OUT
# (default: bench/results/). Two calls of at most ten minutes each cover everything:
#
#   bash bench/gpu_verify.sh env install tests          # ~8 min at most
#   bash bench/gpu_verify.sh install bench sanitizer    # ~9.5 min at most
#   bash bench/gpu_verify.sh                            # all stages in one go, where no per-call limit applies
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env install tests bench sanitizer)
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
status=0

run_stage() {  # name, limit in seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s) ==="
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start))s ==="
  [ "$rc" -ne 0 ] && status=1
  return 0
}

for stage in "${stages[@]}"; do
  case "$stage" in
    env)
      run_stage env 60 bash -c "nvidia-smi; $PY -c 'import torch, triton, numpy; print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"numpy\", numpy.__version__, torch.cuda.get_device_name())'"
      ;;
    install)
      run_stage install 120 $PY -m pip install -q --no-deps --no-build-isolation -e .
      ;;
    tests)
      # The whole suite, compiled kernels on the GPU (the gpu-marked TF32/bf16 tests included).
      run_stage tests 300 $PY -m pytest -q -n 4 -p no:cacheprovider --junitxml="$OUT/tests-junit.xml"
      ;;
    bench)
      run_stage bench 330 $PY bench/run_gpu.py --quick --out "$OUT" --time-budget-s 270
      ;;
    sanitizer)
      sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -1)
      if [ -z "$sanitizer" ]; then
        echo "compute-sanitizer not found" | tee "$OUT/sanitizer.log"
        status=1
      else
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_stage sanitizer 240 "$sanitizer" --tool memcheck --error-exitcode 9 \
          $PY -m pytest -q -p no:cacheprovider tests/test_conv.py -k "not int64 and not thorough"
      fi
      ;;
    *)
      echo "unknown stage $stage (env, install, tests, bench, sanitizer)" >&2
      status=2
      ;;
  esac
done
exit $status
