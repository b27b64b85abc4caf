#!/usr/bin/env bash
# One call on a GPU machine for the process-per-GPU transport: build against the image's
# packages, then run the single-process GPU tests (on one GPU: the R=1 cases) and the
# multi-process GPU tests (N processes, one per GPU, or all on GPU 0 when there is one).
# nvshmem4py is not in the image: carry its wheel in .whl/ (device README: `pip download
# --no-deps nvshmem4py-cu13==0.4.1 ...`); it is installed to /tmp/site here.
# Usage (repo root):  bash benchmarks/device_multiprocess.sh [sp|mp|all]
# Env: SP_BUDGET, MP_BUDGET (s), SP_FILES, SP_ARGS, MP_ARGS (pytest words), MP_K (a -k expression),
# OUT (logs; default device_out)
set -uo pipefail
OUT=${OUT:-device_out}; mkdir -p "$OUT"
STAGE=${1:-all}
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0
export CPLUS_INCLUDE_PATH=/usr/local/cuda/include/cccl${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import jax, sys; print(sys.version); print("jax", jax.__version__, jax.devices())'
  python3 -c 'import nvshmem.core as n; print(n.get_version())'
  git rev-parse HEAD 2>/dev/null; } 2>&1 | tee "$OUT/machine.txt"
t0=$(date +%s)
python3 -m pip install --no-build-isolation -v -e . > "$OUT/build.log" 2>&1
rc=$?; echo "build rc=$rc in $(( $(date +%s) - t0 )) s"
[ $rc -eq 0 ] || { grep -iE "error" "$OUT/build.log" | head -40; exit 1; }
rc_sp=skipped; rc_mp=skipped
if [ "$STAGE" != mp ]; then
  timeout ${SP_BUDGET:-300} python3 -m pytest ${SP_FILES:-tests/test_gpu.py tests/test_gpu_normal.py \
    tests/test_gpu_grouped.py tests/test_gpu_ll.py tests/test_gpu_timeout.py} -q -rs --timeout=200 ${SP_ARGS:-} 2>&1 \
    | tee "$OUT/pytest_sp.log" | tail -25
  rc_sp=${PIPESTATUS[0]}
fi
if [ "$STAGE" != sp ]; then
  timeout ${MP_BUDGET:-400} python3 -m pytest tests/test_multiprocess_gpu.py -v -rs \
    --timeout=500 ${MP_ARGS:-} ${MP_K:+-k "$MP_K"} 2>&1 | tee "$OUT/pytest_mp.log" | tail -40
  rc_mp=${PIPESTATUS[0]}
fi
echo "single-process GPU tests rc=$rc_sp, multi-process GPU tests rc=$rc_mp"
