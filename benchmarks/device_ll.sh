#!/usr/bin/env bash
# One call on a GPU machine for the low-latency kernels: build against the image's packages, run
# the LL GPU tests (then the normal-mode GPU tests as a regression check), then time the LL ops
# with both backends. Logs and JSON go to $OUT (or ./device_out).
# Usage (repo root, on the GPU machine):  bash benchmarks/device_ll.sh [tests|bench|all]
# Env: TEST_BUDGET, BENCH_BUDGET (s), PYTEST_ARGS (words), PYTEST_K (a -k expression),
# PYTEST_TESTS (words: files or node ids; default tests/test_gpu_ll.py),
# BENCH_ARGS, NORMAL=1 (also the normal-mode GPU tests).
set -uo pipefail
OUT=${OUT:-device_out}; mkdir -p "$OUT"
STAGE=${1:-all}
# PYTHONFAULTHANDLER: a crash (e.g. the profiler abort of session 9) prints the Python stacks
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0
export CPLUS_INCLUDE_PATH=/usr/local/cuda/include/cccl${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvidia-smi topo -m;
  python3 -c 'import jax, sys; print(sys.version); print("jax", jax.__version__, jax.devices())'
} 2>&1 | tee "$OUT/machine.txt"
python3 -m pip install --no-build-isolation -v -e . > "$OUT/build.log" 2>&1
rc=$?; echo "build rc=$rc"; [ $rc -eq 0 ] || { grep -iE "error" "$OUT/build.log" | head -40; exit 1; }
if [ "$STAGE" != bench ]; then
  timeout ${TEST_BUDGET:-330} python3 -m pytest ${PYTEST_TESTS:-tests/test_gpu_ll.py} -q -rs --timeout=150 \
    ${PYTEST_ARGS:-} ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/pytest_ll.log" | tail -40
  echo "ll tests rc=${PIPESTATUS[0]}"
  if [ -n "${NORMAL:-}" ]; then
    timeout 200 python3 -m pytest tests/test_gpu.py tests/test_gpu_normal.py tests/test_gpu_timeout.py \
      -q -rs --timeout=150 2>&1 | tee "$OUT/pytest_normal.log" | tail -15
  fi
fi
if [ "$STAGE" != tests ]; then
  timeout ${BENCH_BUDGET:-300} python3 benchmarks/bench_ll.py ${BENCH_ARGS:---tokens 128} \
    --json "$OUT/bench_ll.json" --plot "$OUT/bench_ll.png" 2>&1 | tee "$OUT/bench_ll.log" | tail -30
fi
